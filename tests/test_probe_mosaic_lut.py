"""The Mosaic GPU codebook-matmul probe (experiments/probe_mosaic_lut.py) on the CPU: the select
decode through Mosaic GPU's interpreter against the reference, both decodes lowered for CUDA, and
the byte-permute decode's register placement checked against Mosaic GPU's own layouts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

mgpu_layouts = pytest.importorskip("jax.experimental.mosaic.gpu.fragmented_array")
probe = pytest.importorskip("experiments.probe_mosaic_lut")


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
  with pytest.raises(ValueError, match="dividing the codebook group"):
    probe.lut_matmul_mgpu(x, packed, _group_codebooks(0, (64,), 8), decode="select", interpret=True)


def test_prmt_decode_is_refused_in_the_interpreter():
  x, p, c = probe.operands(0, 1, 256, 64)
  with pytest.raises(ValueError, match="compiled"):
    probe.lut_matmul_mgpu(x, p, c, decode="prmt", interpret=True)


@pytest.mark.parametrize("decode", ["select", "prmt"])
def test_both_decodes_lower_for_cuda(decode):
  # Mixtral's experts, batch 2 top-2; Mosaic GPU's layout inference and shared-memory budget run here.
  args = (jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((8, 14336, 2048), jnp.uint8),
          jax.ShapeDtypeStruct((8, 14336, 16), jnp.bfloat16), jax.ShapeDtypeStruct((8,), jnp.int32))
  f = lambda *a: probe.grouped_lut_matmul_mgpu(*a, decode=decode, k_splits=2)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


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
  perm = probe.prmt_permutation(kt)
  assert sorted(perm) == list(range(kt))
  for (t, reg, e), (row, code_col) in up4.items():
    assert rows[(t, probe.table_register(reg), 0)] == row
    # Codes 2p, 2p + 1 of a word are bf16 pair p (DECODE4_PTX: code j of a half in bits 16j).
    out_row, out_col = wg[(t, probe.pair_register(reg, e // 2), e % 2)]
    assert out_row == row and perm[out_col] == code_col


on_hopper = pytest.mark.skipif(
    not (jax.devices()[0].platform == "gpu" and getattr(jax.devices()[0], "compute_capability", "") == "9.0"),
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
