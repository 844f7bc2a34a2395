"""The CUDA codebook matmul with int8 numerics (cuda_kernels/lut_matmul_int8.*) against its jnp
reference (cqjax.lut_matmul.lut_matmul_int8_reference) on a GPU where the library is built, and
its host-side parts (tuning, refusals) everywhere."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_codebook_weight
from cqjax.errors import CqjaxError
from cqjax.lut_matmul import grouped_lut_matmul_int8_reference, lut_matmul_int8_reference
from cuda_kernels import lut_matmul_int8 as ck8

needs_gpu = pytest.mark.skipif(not ck8.available(),
                               reason="needs a CUDA GPU and the built library (python -m cuda_kernels.build)")


def _same(got, ref, dtype):
  """The kernel and the reference make the same float32 operations on the same exact int32 dots;
  a float32 ulp of slack, and bf16 outputs one rounding of that."""
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  ref = np.asarray(jnp.asarray(ref).astype(dtype), np.float32)
  tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -7
  np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


# (k, n): whole 128-input chunks, chunks and a 32/64/96-input tail, a tail alone; n off the
# 16-column block and below it.
SHAPES = [(256, 64), (352, 37), (96, 130), (1440, 200), (4096, 5)]


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_reference(m, k, n, dtype):
  rng = np.random.default_rng(m * 1000 + k + n)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4)
  assert got.dtype == dtype and got.shape == (m, n)
  _same(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), dtype)


@needs_gpu
@pytest.mark.parametrize("tuning", [ck8.Int8Tuning(warps, mt) for warps, mt in sorted(ck8.KERNELS)], ids=str)
def test_tunings_compute_the_same_function(tuning):
  rng = np.random.default_rng(5)
  w = random_codebook_weight(rng, (), 45, 2336, 4, 2336)  # 18 chunks + a 32-input tail: warps with 1-5 chunks
  x = jnp.asarray(rng.normal(size=(21, 2336)) * np.linspace(0.1, 10, 21)[:, None], jnp.float32)  # 3 passes at mt 1
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4, tuning=tuning)
  _same(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.float32)


@needs_gpu
@pytest.mark.parametrize("sizes", [[3, 0, 5, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 17, 0, 2]])
def test_grouped_matches_reference(sizes):
  rng = np.random.default_rng(sum(sizes) + len(sizes))
  w = random_codebook_weight(rng, (4,), 50, 352, 4, 352)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, 352)), jnp.bfloat16)  # 2 rows past the last group
  gs = jnp.asarray(sizes, jnp.int32)
  got = ck8.grouped_lut_matmul_int8(x, w.packed, w.centroids, 4, gs)
  _same(got, grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, gs), jnp.bfloat16)
  assert not np.asarray(got[sum(sizes):], np.float32).any()


def test_supports_and_tunings():
  assert ck8.supports(4, 4096, 1) and ck8.supports(4, 32, 1)
  assert not ck8.supports(4, 4096, 2) and not ck8.supports(3, 4096, 1) and not ck8.supports(4, 4080, 1)
  assert not ck8.supports(4, ck8.MAX_D_IN + 1, 1)
  assert ck8.default_tuning(1).mt == 1 and ck8.default_tuning(9).mt == 2
  with pytest.raises(CqjaxError, match="Int8Tuning out of range"):
    ck8.Int8Tuning(warps=3)


@pytest.mark.skipif(ck8.available(), reason="checks the refusal where the library is not available")
def test_refuses_without_library():
  rng = np.random.default_rng(0)
  w = random_codebook_weight(rng, (), 16, 64, 4, 64)
  with pytest.raises(CqjaxError, match="CUDA kernel library is not available"):
    ck8.lut_matmul_int8(jnp.ones((1, 64), jnp.bfloat16), w.packed, w.centroids, 4)
