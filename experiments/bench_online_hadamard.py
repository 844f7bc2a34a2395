"""The online Hadamard (R4, before every down projection in scope full): the dense product with
the [n, n] matrix against `cqjax.hadamard.hadamard_transform` (one small matmul per Kronecker
factor), on whatever backend jax runs, at Mixtral's (14336) and DeepSeek-V2's (5120) widths.

  python -m experiments.bench_online_hadamard

Median of 7 batches of 5 jitted calls each, float32, in one process.
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.hadamard import hadamard_factors, hadamard_matrix, hadamard_transform


def _ms(f, args) -> float:
  f(*args).block_until_ready()
  times = []
  for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(5):
      out = f(*args)
    out.block_until_ready()
    times.append((time.perf_counter() - t0) / 5 * 1e3)
  return statistics.median(times)


def main():
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
  dense, factored = jax.jit(lambda x, h: x @ h), jax.jit(hadamard_transform)
  for n in (5120, 14336):
    h = jnp.asarray(hadamard_matrix(n), jnp.float32)
    for m in (1, 16):
      x = jnp.asarray(np.random.default_rng(m).normal(size=(m, n)), jnp.float32)
      t_dense, t_fact = _ms(dense, (x, h)), _ms(factored, (x,))
      print(f"n={n} (factors {[f.shape[0] for f in hadamard_factors(n)]}) m={m}: dense {t_dense:.3f} ms, "
            f"factored {t_fact:.3f} ms ({t_dense / t_fact:.0f}x)", flush=True)


if __name__ == "__main__":
  main()
