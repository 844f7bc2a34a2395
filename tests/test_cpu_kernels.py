"""The C++ FFI codebook matmul against the jnp reference, its input checks, and its use in the model."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_DEFAULT, random_codebook_weight
from cpu_kernels import lut_matmul as cpu
from cqjax.errors import CqjaxError
from cqjax.kmeans import kmeans_quantize
from cqjax.load import load_params
from cqjax.lut_matmul import (grouped_lut_matmul_int8_reference, grouped_lut_matmul_reference, int8_round,
                              lut_matmul_int8_reference, lut_matmul_reference)
from cqjax.model import MoeCausalLM
from cqjax.quantize_weights import quantize_scope

pytestmark = pytest.mark.skipif(not cpu.available(), reason="cpu_kernels extension not built")


# (m, k, n, bits, group): k and n off every tile; 1-4-bit codes in groups of 16k take the AVX-512
# path (bf16 activations, 4 bits, groups of 32k and M >= 8 the bf16 dot-product path), other
# groups and 5-8 bits the portable one.
CASES = [(m, k, n, bits, group) for m in (1, 2, 7, 32) for (k, n, bits, group) in
         [(272, 37, 4, 272), (96, 130, 4, 32), (320, 41, 4, 320), (72, 19, 4, 8), (96, 29, 3, 48), (64, 11, 2, 64),
          (100, 33, 3, 100), (60, 21, 3, 20), (40, 9, 6, 40)]]


@pytest.mark.parametrize("m,k,n,bits,group", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lut_matmul_matches_reference(m, k, n, bits, group, dtype):
  rng = np.random.default_rng(m * 1000 + k + n + bits)
  w = random_codebook_weight(rng, (), n, k, bits, group)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  got = jax.jit(cpu.lut_matmul, static_argnums=3)(x, w.packed, w.centroids, bits)
  ref = lut_matmul_reference(x.astype(jnp.float32), w)
  assert got.dtype == dtype and got.shape == (m, n)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("bits,group", [(4, 48), (3, 48)])
def test_grouped_matches_reference_with_empty_experts(bits, group):
  rng = np.random.default_rng(bits)
  w = random_codebook_weight(rng, (5,), 23, 48, bits, group)
  x = jnp.asarray(rng.normal(size=(13, 48)), jnp.float32)
  for sizes in ([3, 0, 6, 0, 2], [0, 0, 0, 0, 0], [13, 0, 0, 0, 0], [1, 1, 1, 1, 1]):
    gs = jnp.asarray(sizes, jnp.int32)
    got = cpu.grouped_lut_matmul(x, w.packed, w.centroids, bits, gs)
    ref = grouped_lut_matmul_reference(x, w, gs)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not np.asarray(got[sum(sizes):]).any()  # rows past the last group are zero


def test_empty_batch():
  w = random_codebook_weight(np.random.default_rng(0), (), 8, 32, 4, 32)
  assert cpu.lut_matmul(jnp.zeros((0, 32)), w.packed, w.centroids, 4).shape == (0, 8)


def test_bad_inputs_raise_errors_not_crashes():
  rng = np.random.default_rng(0)
  w = random_codebook_weight(rng, (), 8, 32, 4, 16)
  x = jnp.ones((2, 32))
  with pytest.raises(CqjaxError, match="do not fit 4-bit codes over d_in=40"):
    cpu.lut_matmul(jnp.ones((2, 40)), w.packed, w.centroids, 4)
  with pytest.raises(CqjaxError, match=r"x must be \[m, 32\]"):
    cpu.lut_matmul(jnp.ones((2, 2, 32)), w.packed, w.centroids, 4)
  with pytest.raises(CqjaxError, match="packed codes must be uint8"):
    cpu.lut_matmul(x, w.packed.astype(jnp.int32), w.centroids, 4)
  with pytest.raises(CqjaxError, match="do not fit 3-bit codes"):
    cpu.lut_matmul(x, w.packed, w.centroids, 3)
  with pytest.raises(CqjaxError, match="centroids"):
    cpu.lut_matmul(x, w.packed, w.centroids[..., :8], 4)
  with pytest.raises(CqjaxError, match="must be floating point"):
    cpu.lut_matmul(x.astype(jnp.int32), w.packed, w.centroids, 4)
  stacked = random_codebook_weight(rng, (3,), 8, 32, 4, 32)
  with pytest.raises(CqjaxError, match="group_sizes must be integers"):
    cpu.grouped_lut_matmul(x, stacked.packed, stacked.centroids, 4, jnp.ones((3,)))
  # Group sizes are data, so the handler checks them when it runs.
  for sizes in ([1, -1, 1], [2, 1, 0]):
    with pytest.raises(Exception, match="negative group size|more rows than x has"):
      jax.block_until_ready(cpu.grouped_lut_matmul(x, stacked.packed, stacked.centroids, 4,
                                                   jnp.asarray(sizes, jnp.int32)))


def test_quantized_model_uses_kernel_and_matches_reference(monkeypatch):
  cfg, params = load_params(TINY_DEFAULT, jnp.float32, progress=False)
  q = quantize_scope(cfg, params, "full", lambda w, path: kmeans_quantize(w, 4, max_iters=5))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  model = MoeCausalLM(cfg)
  hlo = jax.jit(lambda p: model.apply({"params": p}, tokens)[0]).lower(q).as_text()
  assert "cqjax_grouped_lut_matmul" in hlo and "cqjax_lut_matmul" in hlo
  got = model.apply({"params": q}, tokens)[0]
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  ref = model.apply({"params": q}, tokens)[0]
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) <= 1e-5


def test_centroid_gradients_through_kernel_equal_reference(monkeypatch):
  from cqjax.lut_matmul import grouped_lut_matmul
  rng = np.random.default_rng(3)
  w = random_codebook_weight(rng, (4,), 24, 64, 4, 64)
  x = jnp.asarray(rng.normal(size=(10, 64)), jnp.float32)
  gs = jnp.asarray([3, 0, 5, 2], jnp.int32)
  loss = lambda c, x: jnp.sum(jnp.tanh(grouped_lut_matmul(x, type(w)(w.packed, c, 4, 64), gs)))
  got = jax.grad(loss, argnums=(0, 1))(w.centroids, x)
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  ref = jax.grad(loss, argnums=(0, 1))(w.centroids, x)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("m", [1, 2, 7, 32])
@pytest.mark.parametrize("k,n,group", [(256, 37, 256), (512, 19, 128), (192, 70, 64)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_path_matches_its_reference(m, k, n, group, dtype):
  rng = np.random.default_rng(m + k + n)
  w = random_codebook_weight(rng, (), n, k, 4, group)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  got = jax.jit(lambda x: cpu.lut_matmul(x, w.packed, w.centroids, 4, int8=True))(x)
  exact = lut_matmul_reference(x.astype(jnp.float32), w)
  # A CPU without AVX512-VNNI runs the float path: then its result is the exact product.
  ref = lut_matmul_int8_reference(x, w.packed, w.centroids, 4) if cpu.int8_supported(4, k, k // group) else exact
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the output's rounding
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=tol, atol=tol * float(jnp.abs(ref).max()))
  # Really other numerics: int8 rounding moves the result off the float path's.
  int8 = lut_matmul_int8_reference(x, w.packed, w.centroids, 4)
  assert float(jnp.abs(int8 - exact).max()) > 1e-4 * float(jnp.abs(exact).max())


def test_int8_grouped_and_fallback():
  rng = np.random.default_rng(11)
  w = random_codebook_weight(rng, (4,), 21, 128, 4, 64)
  x = jnp.asarray(rng.normal(size=(9, 128)), jnp.float32)
  gs = jnp.asarray([3, 0, 5, 0], jnp.int32)
  got = cpu.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, int8=True)
  path = lut_matmul_int8_reference if cpu.int8_supported(4, 128, 2) else (
      lambda x, p, c, bits: lut_matmul_reference(x, type(w)(p, c, bits, 128)))  # no VNNI: the float path
  start = 0
  for e, size in enumerate([3, 0, 5, 0]):
    ref = path(x[start:start + size], w.packed[e], w.centroids[e], 4)
    np.testing.assert_allclose(got[start:start + size], ref, rtol=1e-5, atol=1e-5)
    start += size
  assert not np.asarray(got[8:]).any()
  if cpu.int8_supported(4, 128, 2):
    np.testing.assert_allclose(got, grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, gs),
                               rtol=1e-5, atol=1e-5)
  # Shapes the int8 path does not take (3-bit codes; groups of 48) run the float path.
  for bits, group in ((3, 48), (4, 48)):
    v = random_codebook_weight(rng, (), 13, 96, bits, group)
    assert not cpu.int8_supported(bits, 96, 96 // group)
    got = cpu.lut_matmul(x[:, :96], v.packed, v.centroids, bits, int8=True)
    np.testing.assert_allclose(got, lut_matmul_reference(x[:, :96], v), rtol=1e-5, atol=1e-5)


def test_int8_round_is_the_kernels_multiplies():
  """int8_round is defined by the operations the kernels spell out (scale = amax * f32(1/127),
  values = rint(v * (1 / scale))), not by `v / scale`, which XLA compiles into those multiplies
  anyway: they differ on ties such as 0.83984375 * 127 / 1.6796875 = 63.5 exactly."""
  v = np.array([[1.6796875, 0.83984375, -0.5, 0.25], [0, 0, 0, 0], [127, 0.5, 1.5, -2.5]], np.float32)
  q, s = jax.jit(lambda v: int8_round(v, -1))(v)
  amax = np.abs(v).max(-1, keepdims=True)
  want_s = np.where(amax > 0, amax * (np.float32(1) / np.float32(127)), np.float32(1)).astype(np.float32)
  np.testing.assert_array_equal(s, want_s)
  np.testing.assert_array_equal(q, np.rint(v * (np.float32(1) / want_s)).astype(np.int32))
  assert q[0, 1] == 63 and list(q[2]) == [127, 0, 2, -2]  # halves to even; the f32 reciprocal's tie breaks down


def test_grouped_int8_reference_is_the_single_one_per_expert():
  """Each expert's rows get the single-weight int8 numerics (x rounded per row, so a row's
  result does not depend on its neighbours); rows past the last group are zero."""
  rng = np.random.default_rng(13)
  w = random_codebook_weight(rng, (4,), 19, 96, 4, 96)
  x = jnp.asarray(rng.normal(size=(10, 96)), jnp.float32)
  sizes = [0, 4, 0, 3]
  got = grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, jnp.asarray(sizes, jnp.int32))
  start = 0
  for e, size in enumerate(sizes):
    want = lut_matmul_int8_reference(x[start:start + size], w.packed[e], w.centroids[e], 4)
    np.testing.assert_array_equal(got[start:start + size], want)
    start += size
  assert start == 7 and not np.asarray(got[7:]).any()


def test_dispatcher_int8_mode(monkeypatch):
  from cqjax.lut_matmul import grouped_lut_matmul, lut_matmul
  rng = np.random.default_rng(12)
  w = random_codebook_weight(rng, (), 30, 128, 4, 128)
  stacked = random_codebook_weight(rng, (3,), 30, 128, 4, 64)
  x = jnp.asarray(rng.normal(size=(6, 128)), jnp.float32)
  gs = jnp.asarray([2, 0, 4], jnp.int32)
  monkeypatch.setenv("CQJAX_KERNELS", "int8")
  if cpu.int8_supported(4, 128, 1):
    ref, ref_grouped = lut_matmul_int8_reference(x, w.packed, w.centroids, 4), lut_matmul_int8_reference(
        x[:2], stacked.packed[0], stacked.centroids[0], 4)
  else:  # no VNNI: the float path
    ref, ref_grouped = lut_matmul_reference(x, w), lut_matmul_reference(x[:2], type(w)(
        stacked.packed[0], stacked.centroids[0], 4, 128))
  np.testing.assert_allclose(lut_matmul(x, w), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grouped_lut_matmul(x, stacked, gs)[:2], ref_grouped, rtol=1e-5, atol=1e-5)
  monkeypatch.setenv("CQJAX_KERNELS", "fast")
  with pytest.raises(CqjaxError, match="CQJAX_KERNELS must be one of auto, reference, int8, cuda, pallas, unfused"):
    lut_matmul(x, w)


def test_kernels_mode_is_read_while_tracing_and_restored(monkeypatch):
  from cqjax.lut_matmul import kernels_mode, lut_matmul
  w = random_codebook_weight(np.random.default_rng(13), (), 8, 32, 4, 32)
  x = jnp.ones((2, 32), jnp.float32)
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  f = jax.jit(lut_matmul)
  f(x, w)  # traced under "reference"; the mode drops that trace on the way in
  with kernels_mode("fast"):
    with pytest.raises(CqjaxError, match="CQJAX_KERNELS must be"):
      f(x, w)
  assert os.environ["CQJAX_KERNELS"] == "reference"
  monkeypatch.delenv("CQJAX_KERNELS")
  with kernels_mode("reference"):
    np.testing.assert_allclose(f(x, w), lut_matmul_reference(x, w), rtol=1e-6)
  assert "CQJAX_KERNELS" not in os.environ
