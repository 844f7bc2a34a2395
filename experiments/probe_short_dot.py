"""Is a Pallas (Triton) tensor-core dot with few inputs exact on this GPU? (device machine)

  python -m experiments.probe_short_dot

Triton's Python front end refuses dots with K < 16; Pallas builds its IR directly and does not.
With the register-decode tails patch (experiments/pallas_register_decode_tails.patch) a compiled
test gave exactly twice the product where the kernel's K steps split into slices of 8 inputs a dot
(BENCHMARKS.md session 43). This probe times nothing: it runs one program's
acc += dot(x [rows, k], w [n, k]^T) for k in 8, 16, 32 on random data, once with w loaded from
memory (bf16 and float32) and once with w decoded in registers by the kernel's inline PTX
(_decode4), and prints the ratio of the result to XLA's product (1.0 where exact, 2.0 where each
input counts twice).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import lut_matmul as pk


@functools.partial(jax.jit, static_argnames=("decode",))
def short_dot(x, w_or_words, regs, decode: bool):
  """x [rows, k] and w [n, k] (bf16, or float32 as the kernel multiplies it: HIGHEST), or (decode)
  x [8, rows, k] and words uint32 [n, k] with regs eight uint32 [n] -> float32 [rows, n]: one
  program, one tensor-core dot (decode: one per slice s, the codes s of the words)."""
  rows, n = x.shape[-2], w_or_words.shape[0]

  def kernel(x_ref, w_ref, regs_ref, out_ref):
    acc = jnp.zeros((rows, n), jnp.float32)
    if decode:
      values = pk._decode4(w_ref[...], [regs_ref[j] for j in range(8)], jnp.float32)
      for s, w in enumerate(values):  # slice s holds inputs u * 8 + s
        acc = acc + plgpu.dot(x_ref[s], w.astype(jnp.bfloat16), trans_b=True)
    else:
      acc = acc + plgpu.dot(x_ref[...], w_ref[...], trans_b=True,
                            precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None)
    out_ref[...] = acc

  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32),
                        compiler_params=plgpu.CompilerParams(num_warps=4))(x, w_or_words, regs)


def main():
  rng = np.random.default_rng(0)
  rows, n = 16, 64
  for k in (8, 16, 32):
    for dtype in (jnp.bfloat16, jnp.float32):
      x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
      w = jnp.asarray(rng.standard_normal((n, k)), dtype)
      ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
      got = short_dot(x, w, jnp.zeros((8, n), jnp.uint32), decode=False)
      ratio = float(jnp.sum(got * ref) / jnp.sum(ref * ref))
      print(f"loaded w {jnp.dtype(dtype).name:8s} k {k:3d}: result / product = {ratio:.4f}")

    # Register decode: 8 inputs a word (k * 8 inputs in all), 16 bf16 centroids a column.
    books = rng.standard_normal((n, 16)).astype(np.float32)
    codes = rng.integers(0, 16, (n, k, 8))
    words = jnp.asarray((codes.astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64))).sum(-1).astype(np.uint32))
    regs = jnp.stack(pk.decode4_registers([jnp.asarray(books[:, i], jnp.bfloat16) for i in range(16)]))
    xs = jnp.asarray(rng.standard_normal((8, rows, k)), jnp.bfloat16)  # slice s: inputs u * 8 + s
    wd = jnp.asarray(books, jnp.bfloat16).astype(jnp.float32)[np.arange(n)[:, None, None], codes]  # [n, k, 8]
    ref = jnp.einsum("srk,nks->rn", xs.astype(jnp.float32), wd)
    got = short_dot(xs, words, regs, decode=True)
    ratio = float(jnp.sum(got * ref) / jnp.sum(ref * ref))
    print(f"registers bfloat16 k {k:3d} a slice: result / product = {ratio:.4f}")


if __name__ == "__main__":
  main()
