"""The Mosaic GPU codebook matmuls (pallas_kernels/lut_matmul_mgpu.py) on the CPU: the select
decode through Mosaic GPU's interpreter against the reference, both decodes lowered for CUDA, and
the byte-permute decode's register placement checked against Mosaic GPU's own layouts; compiled
on Hopper GPUs. Called through experiments/probe_mosaic_lut.py's wrappers (tuning as keywords)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

mgpu_layouts = pytest.importorskip("jax.experimental.mosaic.gpu.fragmented_array")
probe = pytest.importorskip("experiments.probe_mosaic_lut")
from cqjax.codebook import expert_slots  # pylint: disable=g-import-not-at-top,wrong-import-position
from cqjax.errors import CqjaxError  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import lut_matmul_mgpu as mg  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize("m,k,n,kw", [(1, 256, 64, {}), (3, 512, 128, dict(k_splits=2)),
                                      (17, 256, 128, dict(block_k=256)), (40, 256, 64, dict(steps=4)),
                                      (5, 256, 256, dict(block_n=128))])
def test_select_decode_interpreted_equals_the_reference(m, k, n, kw):
  x, packed, cents = probe.operands(m * 1000 + k + n, m, k, n)
  got = probe.lut_matmul_mgpu(x, packed, cents, decode="select", interpret=True, **kw)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(probe.reference(x, packed, cents), np.float32))


@pytest.mark.parametrize("sizes,k_splits", [([2, 0, 3], 1), ([0, 1, 0], 2), ([0, 0, 4], 1)])
def test_grouped_select_decode_interpreted_equals_the_reference(sizes, k_splits):
  # Empty experts, a single row, and rows past the last group (zero: the ragged_dot contract).
  t, k, n = 6, 256, 64
  x, p, c = probe.operands(sum(sizes) + k_splits, t, k, n)
  packed, cents = jnp.stack([p, p ^ 0x5A, p[::-1]]), jnp.stack([c, -c, 2 * c])
  gs = jnp.array(sizes, jnp.int32)
  got = probe.grouped_lut_matmul_mgpu(x, packed, cents, gs, decode="select", k_splits=k_splits, interpret=True)
  want = probe.grouped_reference(x, packed, cents, gs)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-2)
  assert not np.asarray(got[sum(sizes):]).any()


def _group_codebooks(seed, lead, groups):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((*lead, groups, 16)), jnp.bfloat16)


@pytest.mark.parametrize("m,k,groups,kw", [(3, 512, 4, {}), (1, 1024, 4, dict(k_splits=2, block_k=256)),
                                           (17, 512, 2, dict(k_splits=2))])
def test_column_group_codebooks_interpreted_equal_the_reference(m, k, groups, kw):
  # Each K step reads its group's codebooks (K splits start mid-row: the group index counts from the split).
  x, packed, _ = probe.operands(m + k + groups, m, k, 64)
  cents = _group_codebooks(m, (64,), groups)
  got = probe.lut_matmul_mgpu(x, packed, cents, decode="select", interpret=True, **kw)
  _close(got, probe.reference(x, packed, cents))


def test_grouped_experts_with_column_group_codebooks_interpreted():
  x, p, _ = probe.operands(7, 5, 512, 64)
  packed, cents, gs = jnp.stack([p, p ^ 0x33]), _group_codebooks(8, (2, 64), 4), jnp.array([0, 4], jnp.int32)
  got = probe.grouped_lut_matmul_mgpu(x, packed, cents, gs, decode="select", interpret=True)
  _close(got, probe.grouped_reference(x, packed, cents, gs))


def test_block_k_must_divide_the_codebook_group():
  x, packed, _ = probe.operands(0, 1, 512, 64)
  with pytest.raises(CqjaxError, match="must divide each of the 8 codebook groups"):
    probe.lut_matmul_mgpu(x, packed, _group_codebooks(0, (64,), 8), decode="select", interpret=True)


def test_rows_past_one_slot_take_blocks_of_256_interpreted():
  x, packed, cents = probe.operands(3, 300, 256, 64)
  got = probe.lut_matmul_mgpu(x, packed, cents, interpret=True)  # default tuning: select, K in two shares
  _close(got, probe.reference(x, packed, cents))


def test_grouped_expert_past_one_slot_interpreted():
  # Expert 1 holds 258 rows: two blocks (256 + 2); an empty expert before it, rows past the groups.
  sizes = [0, 258, 3]
  x, p, c = probe.operands(4, 265, 256, 64)
  packed, cents = jnp.stack([p ^ 0x33, p, p[::-1]]), jnp.stack([2 * c, c, -c])
  gs = jnp.array(sizes, jnp.int32)
  got = probe.grouped_lut_matmul_mgpu(x, packed, cents, gs, interpret=True)
  _close(got, probe.grouped_reference(x, packed, cents, gs))
  assert not np.asarray(got[sum(sizes):]).any()


@pytest.mark.parametrize("sizes,rows", [([0, 258, 3, 0, 512, 1], 256), ([5, 0, 16, 2], 16), ([0, 0, 0], 16),
                                        ([7, 0, 3], 16)])
def test_row_block_slots_cover_each_experts_rows_in_order(sizes, rows):
  slots = min(len(sizes), sum(sizes)) + sum(sizes) // rows
  got = np.asarray(mg.row_block_slots(jnp.array(sizes, jnp.int32), slots, rows))
  want, start = [], 0
  for e, g in enumerate(sizes):
    want += [(e, start + b, min(rows, g - b)) for b in range(0, g, rows)]
    start += g
  assert len(want) <= slots
  want += [(0, 0, 0)] * (slots - len(want))
  np.testing.assert_array_equal(got.T, np.array(want).reshape(-1, 3))
  if max(sizes) <= rows:  # one block an expert: expert_slots' table
    np.testing.assert_array_equal(got, np.asarray(expert_slots(jnp.array(sizes, jnp.int32), slots)))


def test_unsupported_products_are_refused_in_one_line():
  x, packed, cents = probe.operands(0, 2, 256, 64)
  with pytest.raises(CqjaxError, match="multiplies bf16 x, got float32"):
    mg.lut_matmul(x.astype(jnp.float32), packed, cents[:, None], 4, interpret=True)
  with pytest.raises(CqjaxError, match="d_out=48 must be a multiple of block_n=64"):
    mg.lut_matmul(x, packed[:48], cents[:48, None], 4, interpret=True)
  with pytest.raises(CqjaxError, match="4-bit codes"):
    mg.lut_matmul(x, packed, cents[:, None], 2, interpret=True)
  assert mg.supports(4, jnp.bfloat16, 4096, 14336, 1) and not mg.supports(4, jnp.float32, 4096, 14336, 1)
  assert mg.supports(4, jnp.bfloat16, 4096, 64, 32) and not mg.supports(4, jnp.bfloat16, 4096, 64, 64)


def test_empty_inputs_give_empty_outputs():
  _, packed, cents = probe.operands(0, 1, 256, 64)
  x = jnp.zeros((0, 256), jnp.bfloat16)
  assert mg.lut_matmul(x, packed, cents[:, None], 4, interpret=True).shape == (0, 64)
  got = mg.grouped_lut_matmul(x, packed[None], cents[None, :, None], 4, jnp.zeros(1, jnp.int32), interpret=True)
  assert got.shape == (0, 64)


def test_prmt_decode_is_refused_in_the_interpreter():
  x, p, c = probe.operands(0, 1, 256, 64)
  with pytest.raises(CqjaxError, match="compiled only"):
    probe.lut_matmul_mgpu(x, p, c, decode="prmt", interpret=True)


@pytest.mark.parametrize("decode", ["select", "prmt"])
def test_both_decodes_lower_for_cuda(decode):
  # Mixtral's experts, batch 2 top-2; Mosaic GPU's layout inference and shared-memory budget run here.
  args = (jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((8, 14336, 2048), jnp.uint8),
          jax.ShapeDtypeStruct((8, 14336, 16), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32))
  f = lambda *a: probe.grouped_lut_matmul_mgpu(*a, decode=decode, k_splits=2)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


@pytest.mark.parametrize("shape,t,experts", [((4096, 14336), 2048, 0), ((14336, 4096), 300, 0),
                                             ((4096, 14336), 4096, 8), ((2048, 768), 2048, 128)])
def test_default_tunings_lower_for_cuda_at_prefill_shapes(shape, t, experts):
  # Mosaic GPU checks the shared-memory budget at lowering: the defaults must fit at any row count.
  k, n = shape
  x = jax.ShapeDtypeStruct((t, k), jnp.bfloat16)
  if experts:
    args = (x, jax.ShapeDtypeStruct((experts, n, k // 2), jnp.uint8),
            jax.ShapeDtypeStruct((experts, n, 1, 16), jnp.bfloat16), jax.ShapeDtypeStruct((experts,), jnp.int32))
    f = lambda x, p, c, g: mg.grouped_lut_matmul(x, p, c, 4, g)
  else:
    args = (x, jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((n, 1, 16), jnp.bfloat16))
    f = lambda x, p, c: mg.lut_matmul(x, p, c, 4)
  assert "mosaic_gpu" in jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _close(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  # Both round a float32 sum to bf16; the sums differ in order only.
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * max(np.abs(want).max(), 1e-6))


def _tile(a, tiles):
  """a's elements in Mosaic GPU's tiled shape: each tile splits the trailing dims into (outer, tile)."""
  for tile in tiles:
    lead, trail = a.shape[:-len(tile)], a.shape[-len(tile):]
    split = [d for t, s in zip(tile, trail) for d in (s // t, t)]
    a = a.reshape(*lead, *split)
    r = len(lead)
    a = a.transpose(*range(r), *(r + 2 * i for i in range(len(tile))), *(r + 2 * i + 1 for i in range(len(tile))))
  return a


def _coordinates(layout, shape):
  """{(thread, register index, vector element): (row, column)} of a TiledLayout without replicated
  dims (its lanes numbered with the first lane dim major)."""
  flat = _tile(np.arange(np.prod(shape)).reshape(shape), layout.tiling.tiles)
  nd = flat.ndim
  warp, = [d % nd for d in layout.warp_dims]
  # A replicated lane dim (a rows' vector: a row's four lanes) holds the same element in each lane.
  lanes = [(d % nd, 1) if isinstance(d, int) else (None, d.times) for d in layout.lane_dims]
  vec = layout.vector_dim % nd
  regs = [d for d in range(nd) if d not in (warp, *(d for d, _ in lanes), vec)]
  out = {}
  for ix in np.ndindex(flat.shape):
    reg = tuple(ix[d] if d in regs else 0 for d in range(nd))
    at = divmod(int(flat[ix]), shape[1]) if len(shape) == 2 else int(flat[ix])
    lane_sets = [range(ix[d], ix[d] + 1) if d is not None else range(times) for d, times in lanes]
    sizes = [flat.shape[d] if d is not None else times for d, times in lanes]
    for l0 in lane_sets[0]:
      for l1 in lane_sets[1]:
        out[(32 * ix[warp] + l0 * sizes[1] + l1, reg, ix[vec])] = at
  return out


def test_layout_model_reproduces_the_wgmma_fragment():
  # PTX's wgmma A fragment: a warp's 16 rows, lane l holds rows l/4 and l/4 + 8, columns 2(l%4) + {0, 1} (+8 a tile).
  c = _coordinates(mgpu_layouts.WGMMA_LAYOUT, (64, 16))
  for (t, reg, v), (r, col) in c.items():
    w, l = divmod(t, 32)
    assert r == 16 * w + l // 4 + 8 * reg[4] and col == 8 * reg[1] + 2 * (l % 4) + v


@pytest.mark.parametrize("block_n", [64, 128])
def test_prmt_decoder_places_each_code_against_its_input_and_its_rows_codebook(block_n):
  kt = 128
  up4 = _coordinates(mgpu_layouts.WGMMA_LAYOUT_UPCAST_4X, (block_n, kt))
  wg = _coordinates(mgpu_layouts.WGMMA_LAYOUT, (block_n, kt))
  rows = _coordinates(mgpu_layouts.WGMMA_LAYOUT.reduce((1,)), (block_n,))
  perm = mg.prmt_permutation(kt)
  assert sorted(perm) == list(range(kt))
  for (t, reg, e), (row, code_col) in up4.items():
    assert rows[(t, mg.table_register(reg), 0)] == row
    # Codes 2p, 2p + 1 of a word are bf16 pair p (DECODE4_PTX: code j of a half in bits 16j).
    out_row, out_col = wg[(t, mg.pair_register(reg, e // 2), e % 2)]
    assert out_row == row and perm[out_col] == code_col


on_hopper = pytest.mark.skipif(
    not mg.available(),
    reason="Mosaic GPU's wgmma kernels run on Hopper GPUs (H100 / H200)")


@on_hopper
@pytest.mark.parametrize("decode", ["select", "prmt"])
@pytest.mark.parametrize("m,k,n,kw", [(1, 4096, 192, {}), (3, 256, 64, dict(k_splits=2)), (17, 1024, 128, dict(block_k=256)),
                                      (64, 512, 64, dict(steps=4)), (130, 256, 64, {}), (2, 512, 256, dict(block_n=128))])
def test_compiled_single_products_equal_the_reference(decode, m, k, n, kw):
  x, packed, cents = probe.operands(m * 1000 + k + n, m, k, n)
  _close(probe.lut_matmul_mgpu(x, packed, cents, decode=decode, **kw), probe.reference(x, packed, cents))


@on_hopper
@pytest.mark.parametrize("decode", ["select", "prmt"])
@pytest.mark.parametrize("sizes,k_splits", [([2, 0, 3], 1), ([0, 1, 0], 2), ([0, 0, 4], 1)])
def test_compiled_grouped_products_equal_the_reference(decode, sizes, k_splits):
  t, k, n = 6, 512, 128
  x, p, c = probe.operands(sum(sizes) + k_splits, t, k, n)
  packed, cents = jnp.stack([p, p ^ 0x5A, p[::-1]]), jnp.stack([c, -c, 2 * c])
  gs = jnp.array(sizes, jnp.int32)
  got = probe.grouped_lut_matmul_mgpu(x, packed, cents, gs, decode=decode, k_splits=k_splits)
  _close(got, probe.grouped_reference(x, packed, cents, gs))
  assert not np.asarray(got[sum(sizes):]).any()


@on_hopper
@pytest.mark.parametrize("decode", ["select", "prmt"])
def test_compiled_column_group_codebooks_equal_the_reference(decode):
  x, packed, _ = probe.operands(11, 5, 1024, 128)
  cents = _group_codebooks(5, (128,), 4)
  _close(probe.lut_matmul_mgpu(x, packed, cents, decode=decode, k_splits=2), probe.reference(x, packed, cents))


@on_hopper
@pytest.mark.parametrize("m", [1, 16, 200, 300, 600])
def test_compiled_default_tunings_equal_the_reference(m):
  x, packed, cents = probe.operands(m, m, 1024, 192)
  _close(mg.lut_matmul(x, packed, cents[:, None], 4), probe.reference(x, packed, cents))


@on_hopper
def test_compiled_grouped_experts_past_one_slot_equal_the_reference():
  sizes = [0, 300, 5, 513]
  x, p, c = probe.operands(9, 820, 512, 128)
  packed = jnp.stack([p ^ 0x33, p, p[::-1], p ^ 0x5A])
  cents = jnp.stack([2 * c, c, -c, 0.5 * c])
  gs = jnp.array(sizes, jnp.int32)
  got = mg.grouped_lut_matmul(x, packed, cents[:, :, None], 4, gs)
  _close(got, probe.grouped_reference(x, packed, cents, gs))
  assert not np.asarray(got[sum(sizes):]).any()


def test_dispatcher_takes_mosaic_for_prefill_rows_on_hopper(monkeypatch):
  """cqjax.lut_matmul's choice on a Hopper GPU (shapes only): the CUDA kernel where it measured
  faster (its wgmma layout for 49-512 prefill rows of Mixtral-size weights), else Mosaic GPU's
  kernels for one slot of MIN_ROWS or more rows of Mixtral-size weights, else Pallas' Triton
  kernels; without Triton, the CUDA kernel wherever it applies, then Mosaic for up to a slot's
  rows, then the reference."""
  from cqjax import lut_matmul as dispatch  # pylint: disable=g-import-not-at-top
  from cuda_kernels import lut_matmul as cuda  # pylint: disable=g-import-not-at-top
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mg, "available", lambda: True)
  monkeypatch.setattr(cuda, "available", lambda: False)
  monkeypatch.setattr(cuda, "is_hopper", lambda: True)
  shape = lambda *s, dtype=jnp.uint8: jax.ShapeDtypeStruct(s, dtype)
  grouped = (shape(8, 14336, 2048), shape(8, 14336, 1, 16, dtype=jnp.bfloat16))
  single = (shape(14336, 2048), shape(14336, 1, 16, dtype=jnp.bfloat16))
  attention = (shape(4096, 2048), shape(4096, 1, 16, dtype=jnp.bfloat16))  # 2^24 codes

  def pick(t, weight, is_grouped, dtype=jnp.bfloat16, bits=4, everywhere=False):
    return dispatch._CudaFirst(everywhere=everywhere)._pick(shape(t, 4096, dtype=dtype), *weight, bits, is_grouped)

  low, high = mg.MIN_ROWS, mg.MAX_SLOT_ROWS
  assert pick(low, single, False) is mg and pick(high, single, False) is mg
  assert pick(low - 1, single, False) is pk and pick(high + 1, single, False) is pk
  assert pick(8 * low, grouped, True) is mg and pick(8 * low - 8, grouped, True) is pk
  assert pick(low, attention, False) is pk
  assert pick(low, single, False, dtype=jnp.float32) is pk and pick(low, single, False, bits=2) is pk
  monkeypatch.setattr(cuda, "available", lambda: True)
  assert pick(2, single, False) is cuda and pick(low, single, False) is cuda and pick(1024, single, False) is pk
  assert pick(1024, single, False, everywhere=True) is cuda  # CQJAX_KERNELS=cuda: CUDA wherever it applies
  assert pick(low, attention, False, everywhere=True) is cuda
  monkeypatch.setattr(dispatch, "_pallas_kernels", lambda: None)
  assert pick(1, single, False) is cuda and pick(1024, single, False) is cuda
  monkeypatch.setattr(cuda, "available", lambda: False)
  assert pick(1, single, False) is mg and pick(1, grouped, True) is mg and pick(1, attention, False) is mg
  assert pick(high + 1, single, False) is dispatch._ReferenceKernels
  assert pick(1, single, False, dtype=jnp.float32) is dispatch._ReferenceKernels


def test_dispatched_mosaic_product_lowers_for_cuda(monkeypatch):
  """Through cqjax.lut_matmul (its custom VJP and all) a prefill product lowers to Mosaic GPU's call."""
  from cqjax import lut_matmul as dispatch  # pylint: disable=g-import-not-at-top
  from cqjax.codebook import CodebookWeight  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mg, "available", lambda: True)
  w = CodebookWeight(jax.ShapeDtypeStruct((8192, 2048), jnp.uint8), jax.ShapeDtypeStruct((8192, 1, 16), jnp.bfloat16),
                     4, 4096)  # 2^25 codes
  x = jax.ShapeDtypeStruct((mg.MIN_ROWS, 4096), jnp.bfloat16)
  with dispatch.kernels_mode("auto", backend="gpu"):
    text = jax.jit(dispatch.lut_matmul).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "xla.gpu.triton" not in text
