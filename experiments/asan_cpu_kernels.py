"""Runs every case of tests/test_cpu_kernels.py's kernel tests once, for a build of the CPU kernels
under AddressSanitizer (WORKSPACE.md gives the build and the preload; pytest itself does not start
under the preloaded runtime here, hence this plain loop)."""
import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import test_cpu_kernels as t  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  n = 0
  for case in t.CASES:
    for dtype in (jnp.float32, jnp.bfloat16):
      t.test_lut_matmul_matches_reference(*case, dtype)
      n += 1
  for bits, group in [(4, 48), (3, 48)]:
    t.test_grouped_matches_reference_with_empty_experts(bits, group)
    n += 1
  for m in (1, 2, 7, 32):
    for shape in ((256, 37, 256), (512, 19, 128), (192, 70, 64)):
      for dtype in (jnp.float32, jnp.bfloat16):
        t.test_int8_path_matches_its_reference(m, *shape, dtype)
        n += 1
  t.test_int8_grouped_and_fallback()
  t.test_empty_batch()
  t.test_bad_inputs_raise_errors_not_crashes()
  print(f"{n + 3} kernel test cases passed")


if __name__ == "__main__":
  main()
