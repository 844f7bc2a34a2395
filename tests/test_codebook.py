"""Packed codebook format, K-means and RTN quantizers, and the matmul dispatcher."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.codebook import CodebookWeight, codes_of, dequantize, expert_slots, from_codes, pack_codes, unpack_codes
from cqjax.errors import CqjaxError
from cqjax.kmeans import kmeans_fit, kmeans_quantize, rtn_quantize
from cqjax.lut_matmul import grouped_lut_matmul, lut_matmul


@pytest.fixture(autouse=True)
def _float32_dots():
  """These tests compare float32 paths at 1e-5, and XLA's default f32 dot on a GPU rounds through tf32."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 7, 64, 129])
def test_pack_unpack_round_trip(bits, k):
  codes = jnp.asarray(np.random.default_rng(bits * k).integers(0, 2 ** bits, (3, 5, k)))
  packed = pack_codes(codes, bits)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, 5, -(-k * bits // 8))
  np.testing.assert_array_equal(unpack_codes(packed, bits, k), codes)


def test_four_bit_layout_is_two_codes_per_byte_low_nibble_first():
  packed = pack_codes(jnp.asarray([[1, 2, 15, 0]]), 4)
  np.testing.assert_array_equal(packed, [[0x21, 0x0F]])


def test_dequantize_gathers_per_row_and_group():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 16, (2, 6, 8))  # [experts, d_out, d_in]
  cent = rng.normal(size=(2, 6, 2, 16)).astype(np.float32)  # two groups of 4 inputs
  w = from_codes(jnp.asarray(codes), jnp.asarray(cent), 4)
  assert w.shape == (2, 8, 6) and w.group_size == 4
  dense = np.asarray(dequantize(w))
  for e, n, j in [(0, 0, 0), (1, 5, 7), (1, 3, 4), (0, 2, 3)]:
    assert dense[e, j, n] == cent[e, n, j // 4, codes[e, n, j]]
  # Through a pytree transformation and back, bit-exactly.
  w2 = jax.tree.map(lambda a: a, w)
  assert isinstance(w2, CodebookWeight)
  np.testing.assert_array_equal(dequantize(w2), dense)
  np.testing.assert_array_equal(codes_of(w2), codes)


def test_kmeans_fit_finds_separated_clusters_and_beats_rtn():
  rng = np.random.default_rng(0)
  true = np.array([-3.0, -1.0, 0.5, 2.0])
  rows = jnp.asarray(true[rng.integers(0, 4, (5, 200))] + rng.normal(size=(5, 200)) * 0.01, jnp.float32)
  cent, codes = kmeans_fit(rows, 4, jax.random.key(0))
  np.testing.assert_allclose(np.sort(np.asarray(cent), -1), np.tile(true, (5, 1)), atol=0.01)
  np.testing.assert_allclose(np.take_along_axis(np.asarray(cent), np.asarray(codes), -1), rows, atol=0.05)


@pytest.mark.parametrize("shape,group", [((33, 7), -1), ((3, 32, 10), 8), ((1, 1), -1)])
def test_kmeans_quantize_shapes_and_error(shape, group):
  w = jax.random.normal(jax.random.key(1), shape)
  q = kmeans_quantize(w, bits=4, group_size=group)
  assert q.shape == shape
  deq = dequantize(q)
  r = rtn_quantize(w, bits=4, group_size=group)
  err_km = float(jnp.mean((deq - w) ** 2))
  assert err_km <= float(jnp.mean((dequantize(r) - w) ** 2)) + 1e-9
  # At most 16 distinct values per row group.
  rows = np.asarray(jnp.swapaxes(deq, -1, -2)).reshape(-1, shape[-2] if group == -1 else group)
  assert max(len(np.unique(r_)) for r_ in rows) <= 16


def test_kmeans_handles_constant_rows_and_chunking():
  w = jnp.zeros((40, 5)).at[:, 0].set(1.0)  # rows (of the kernel's transpose) nearly constant
  q = kmeans_quantize(w, bits=3)
  np.testing.assert_allclose(dequantize(q), w, atol=1e-6)
  rows = jax.random.normal(jax.random.key(2), (10, 50))
  a = kmeans_fit(rows, 8, jax.random.key(3), chunk=3)
  b = kmeans_fit(rows, 8, jax.random.key(3), chunk=10)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)


def test_rtn_matches_symmetric_absmax():
  w = np.random.default_rng(0).normal(size=(64, 9)).astype(np.float32)
  scale = np.maximum(np.abs(w).max(0, keepdims=True) / 7, 1e-5)
  want = np.clip(np.round(w / scale), -8, 7) * scale
  np.testing.assert_allclose(dequantize(rtn_quantize(jnp.asarray(w), 4)), want, rtol=1e-6, atol=1e-7)
  with pytest.raises(CqjaxError, match="group_size 5 does not divide"):
    rtn_quantize(jnp.asarray(w), 4, group_size=5)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_dispatcher_matches_dense(m):
  rng = np.random.default_rng(m)
  w = kmeans_quantize(jnp.asarray(rng.normal(size=(4, 24, 10)), jnp.float32), bits=4)
  dense = dequantize(w)
  x = jnp.asarray(rng.normal(size=(m, 24)), jnp.float32)
  np.testing.assert_allclose(lut_matmul(x, jax.tree.map(lambda a: a[1], w)), x @ dense[1], rtol=1e-5, atol=1e-6)
  sizes = jnp.asarray([m, 0, 0, 0] if m == 1 else [0, m - 1, 1, 0], jnp.int32)  # empty groups
  np.testing.assert_allclose(grouped_lut_matmul(x, w, sizes), jax.lax.ragged_dot(x, dense, sizes), rtol=1e-5, atol=1e-6)


def test_model_runs_on_codebook_params_like_their_dequantized_copy(hf_checkpoints):
  from cqjax.load import load_params
  from cqjax.model import MoeCausalLM
  cfg, params = load_params(hf_checkpoints["qwen3_moe"], jnp.float32, progress=False)
  q = jax.tree.map(lambda x: x, params)
  q["layers_0"]["attn"]["q_proj"]["kernel"] = kmeans_quantize(params["layers_0"]["attn"]["q_proj"]["kernel"])
  for name in ("router", "gate_proj", "down_proj"):
    q["layers_0"]["moe"][name] = kmeans_quantize(params["layers_0"]["moe"][name], bits=3)
  is_cb = lambda x: isinstance(x, CodebookWeight)
  dense = jax.tree.map(lambda x: dequantize(x) if is_cb(x) else x, q, is_leaf=is_cb)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  got = MoeCausalLM(cfg).apply({"params": q}, tokens)[0]
  np.testing.assert_allclose(got, MoeCausalLM(cfg).apply({"params": dense}, tokens)[0], rtol=1e-5, atol=1e-5)
  ref = MoeCausalLM(cfg, dense_moe_reference=True).apply({"params": q}, tokens)[0]
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_expert_slots_compact_non_empty_experts():
  slots = np.asarray(expert_slots(jnp.asarray([0, 3, 0, 2, 1], jnp.int32), 5))
  np.testing.assert_array_equal(slots, [[1, 3, 4, 0, 0], [0, 3, 5, 0, 0], [3, 2, 1, 0, 0]])


@pytest.mark.parametrize("experts,empty", [(1, 0.0), (1, 1.0), (8, 0.5), (128, 0.9), (300, 0.97), (16, 1.0)])
def test_expert_slots_match_a_loop_over_experts(experts, empty):
  rng = np.random.default_rng(experts)
  sizes = np.where(rng.random(experts) < empty, 0, rng.integers(1, 40, experts)).astype(np.int32)
  slots = max(1, min(int(sizes.sum()), experts))  # the grouped kernels' count: min(rows, experts)
  want = np.zeros((3, slots), np.int32)
  for i, e in enumerate(np.flatnonzero(sizes)):
    want[:, i] = e, sizes[:e].sum(), sizes[e]
  np.testing.assert_array_equal(np.asarray(expert_slots(jnp.asarray(sizes), slots)), want)
