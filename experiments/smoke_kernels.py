"""One compiled check of each Pallas kernel path on a GPU before longer runs: prints the relative
error against the float32 reference, or the compile error, in a few seconds.

  python -m experiments.smoke_kernels
"""
import jax
import jax.numpy as jnp
import numpy as np

from cqjax.codebook import CodebookWeight
from cqjax.lut_matmul import grouped_lut_matmul_reference, lut_matmul_reference
from pallas_kernels import lut_matmul as pk


def main():
  key = jax.random.key(0)
  for m, k, n, dtype, lead in ((1, 4096, 1024, jnp.bfloat16, ()), (16, 4096, 1024, jnp.bfloat16, ()),
                               (1, 4096, 1024, jnp.float32, ()), (3, 2048, 768, jnp.bfloat16, (4,))):
    packed = jax.random.randint(key, (*lead, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    cent = jax.random.normal(key, (*lead, n, 1, 16), jnp.float32)
    w = CodebookWeight(packed, cent, 4, k)
    x = jax.random.normal(key, (m * (2 if lead else 1), k), dtype)
    try:
      if lead:
        gs = jnp.asarray([m, 0, m, 0], jnp.int32)
        got = pk.grouped_lut_matmul(x, packed, cent, 4, gs)
        ref = grouped_lut_matmul_reference(x.astype(jnp.float32), CodebookWeight(packed, cent.astype(dtype), 4, k), gs)
      else:
        got = pk.lut_matmul(x, packed, cent, 4)
        ref = lut_matmul_reference(x.astype(jnp.float32), CodebookWeight(packed, cent.astype(dtype), 4, k))
      err = float(np.linalg.norm(np.asarray(got, np.float32) - ref) / np.linalg.norm(ref))
      print(f"M={m} {k}x{n} {jnp.dtype(dtype).name} {'grouped' if lead else 'single'}: rel err {err:.2e}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"M={m} {k}x{n} {jnp.dtype(dtype).name}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)


if __name__ == "__main__":
  main()
