"""The CUDA codebook matmul (cuda_kernels/) against a float64 reference on a GPU where the library
is built (`python -m cuda_kernels.build`; run on the H200: BENCHMARKS.md), and its host-side
parts (tuning, slots, refusals) everywhere."""
import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import float64_product, random_codebook_weight
from cqjax.errors import CqjaxError
from cuda_kernels import lut_matmul as ck
from cuda_kernels.lut_matmul import CudaTuning

BUILT = ck.available()
needs_gpu = pytest.mark.skipif(not BUILT, reason="needs a CUDA GPU and the built library (python -m cuda_kernels.build)")


def _close(got, ref):
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  # bf16 output: one rounding of a float32 sum of exact bf16 products.
  np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * float(np.abs(ref).max()))


# (k, n): full 128-input chunks only, chunks plus a 32/64/96-input tail, a tail alone; n off the
# 64-column block, odd n (scalar stores), n below one 8-column tile.
SHAPES = [(256, 64), (352, 37), (96, 130), (1408, 200), (4096, 5)]


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("k,n", SHAPES)
def test_lut_matmul_matches_reference(m, k, n):
  rng = np.random.default_rng(m * 1000 + k + n)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  got = ck.lut_matmul(x, w.packed, w.centroids, 4)
  assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
  _close(got, float64_product(x, w))


# Every built kernel but the probe, each with a K split from a cycle that includes more splits than
# chunks (splits with no chunk write zeros), x staged in shared memory or read from global memory.
# Layout 7 splits K by its warps: 10 chunks over 4, 8 or 16 warps (dead warps, a partial chunk).
TUNINGS = [CudaTuning(mt=mt, nt=nt, splits=1 if layout == 7 else (1, 3, 5, 16, 2)[i % 5], layout=layout,
                      kgroups=kgroups, stage_x=i % 3 != 1)
           for i, (layout, kgroups, mt, nt) in enumerate(sorted(k for k in ck.KERNELS if k[0] != 2))]
TUNINGS += [dataclasses.replace(t, sum_once=False) for t in TUNINGS if t.layout == 7 and t.kgroups < 16]


@needs_gpu
@pytest.mark.parametrize("tuning", TUNINGS, ids=str)
def test_tunings_compute_the_same_function(tuning):
  rng = np.random.default_rng(3)
  w = random_codebook_weight(rng, (), 77, 1184, 4, 1184)  # 9 chunks + a 32-input tail
  x = jnp.asarray(rng.normal(size=(71, 1184)), jnp.bfloat16)  # rows past 64 loop again at every mt
  _close(ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=tuning), float64_product(x, w))


@needs_gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_x_staging_falls_back_where_it_does_not_fit(splits):
  """16 rows of x over K = 8192 need 262 KB of shared memory unsplit (read from global memory),
  66 KB in four splits (staged): both give the product."""
  rng = np.random.default_rng(splits)
  w = random_codebook_weight(rng, (), 40, 8192, 4, 8192)
  x = jnp.asarray(rng.normal(size=(16, 8192)), jnp.bfloat16)
  got = ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=CudaTuning(splits=splits, layout=4, stage_x=True))
  _close(got, float64_product(x, w))


@needs_gpu
@pytest.mark.parametrize("sizes", [[0, 3, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [20, 0, 5, 9, 1]])
@pytest.mark.parametrize("k,n", [(352, 37), (768, 130)])
def test_grouped_matches_reference(sizes, k, n):
  """Empty experts, one token, no token at all, many rows per expert; one spare row past the groups."""
  rng = np.random.default_rng(sum(sizes) + k)
  w = random_codebook_weight(rng, (len(sizes),), n, k, 4, k)
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 1, k)), jnp.bfloat16)
  got = ck.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs)
  assert got.shape == (x.shape[0], n)
  _close(got, float64_product(x, w, gs))
  assert not np.asarray(got[-1], np.float32).any()  # the row outside every group is zero


@needs_gpu
@pytest.mark.parametrize("m,sizes", [(1, None), (11, None), (4, [2, 0, 1, 1])])
def test_layout7_sum_groups_give_the_same_bits(m, sizes):
  """Many tiles a block (20000 columns over a grid of a few hundred blocks), K in two splits: the
  warps' sums added in groups longer than 4 tiles (sum_once) or every 4 tiles; grouped with an
  empty expert."""
  rng = np.random.default_rng(m)
  gs = None if sizes is None else jnp.asarray(sizes, jnp.int32)
  w = random_codebook_weight(rng, () if sizes is None else (len(sizes),), 20000, 1024, 4, 1024)
  x = jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16)
  outs = []
  for once in (True, False):
    t = CudaTuning(layout=7, kgroups=4, mt=1 if m <= 8 else 2, sum_once=once)
    y = ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=t) if gs is None else \
        ck.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, tuning=t)
    outs.append(np.asarray(y, np.float32))
  _close(outs[0], float64_product(x, w, gs))
  np.testing.assert_array_equal(outs[0], outs[1])


PREFILL = [CudaTuning(layout=8, kgroups=1, mt=1, splits=3), CudaTuning(layout=8, kgroups=1, mt=2, nt=4),
           CudaTuning(layout=8, kgroups=1, mt=2, nt=8, splits=2)]


@needs_gpu
@pytest.mark.parametrize("tuning", PREFILL, ids=str)
@pytest.mark.parametrize("m", [1, 64, 129, 300])
def test_prefill_layout_passes_over_rows(tuning, m):
  """Layout 8 (wgmma): one row (the rest of the pass zeros), a whole pass, a pass and one row,
  several passes; K ends in a 32-input stage, n off the 64-, 128- or 256-column block."""
  rng = np.random.default_rng(m)
  w = random_codebook_weight(rng, (), 130, 1056, 4, 1056)
  x = jnp.asarray(rng.normal(size=(m, 1056)), jnp.bfloat16)
  _close(ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=tuning), float64_product(x, w))


@needs_gpu
@pytest.mark.parametrize("tuning", PREFILL, ids=str)
def test_prefill_layout_grouped(tuning):
  """Empty experts between experts of 150 and 140 rows (passes of 64 or 128), one of 3 rows."""
  sizes = [150, 0, 3, 0, 140]
  rng = np.random.default_rng(8)
  w = random_codebook_weight(rng, (len(sizes),), 200, 768, 4, 768)
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, 768)), jnp.bfloat16)
  got = ck.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, tuning=tuning)
  _close(got, float64_product(x, w, gs))
  assert not np.asarray(got[-2:], np.float32).any()


@needs_gpu
@pytest.mark.parametrize("t", [CudaTuning(splits=8), CudaTuning(layout=7, kgroups=4),
                               CudaTuning(layout=7, kgroups=4, sum_once=False),
                               CudaTuning(layout=8, kgroups=1, splits=8)], ids=str)
def test_results_do_not_depend_on_the_run(t):
  """Split partials are added in a fixed order: two runs give the same bits."""
  rng = np.random.default_rng(5)
  w = random_codebook_weight(rng, (), 64, 2048, 4, 2048)
  x = jnp.asarray(rng.normal(size=(4, 2048)), jnp.bfloat16)
  a = np.asarray(ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=t), np.float32)
  b = np.asarray(ck.lut_matmul(x, w.packed, w.centroids, 4, tuning=t), np.float32)
  np.testing.assert_array_equal(a, b)


@needs_gpu
def test_refuses_what_it_does_not_cover():
  rng = np.random.default_rng(1)
  w = random_codebook_weight(rng, (), 16, 256, 4, 64)  # column groups
  with pytest.raises(CqjaxError, match="one codebook per row"):
    ck.lut_matmul(jnp.ones((1, 256), jnp.bfloat16), w.packed, w.centroids, 4)
  w = random_codebook_weight(rng, (), 16, 256, 4, 256)
  with pytest.raises(CqjaxError, match="bf16 x"):
    ck.lut_matmul(jnp.ones((1, 256), jnp.float32), w.packed, w.centroids, 4)


def test_unavailable_without_a_gpu_library():
  if jax.default_backend() != "gpu":
    assert not ck.available()
    rng = np.random.default_rng(0)
    w = random_codebook_weight(rng, (), 8, 64, 4, 64)
    with pytest.raises(CqjaxError, match="not available"):
      ck.lut_matmul(jnp.ones((1, 64), jnp.bfloat16), w.packed, w.centroids, 4)


def test_kernels_mirrors_the_cu_switch():
  """KERNELS restates lut_matmul.cu's switch (case kgroups layout mt nt, as digits); a tuning the
  switch lacks would fail only at run time on a GPU, so the two are compared on any machine."""
  source = (pathlib.Path(ck.__file__).parent / "lut_matmul.cu").read_text()
  keys = [int(v) for v in re.findall(r"case (\d+): err = launch", source)]
  assert len(keys) == len(set(keys))
  assert {(key // 100 % 10, key // 1000, key // 10 % 10, key % 10) for key in keys} == ck.KERNELS


def test_supports_only_the_serving_case():
  assert ck.supports(jnp.bfloat16, 4, 4096, 1)
  assert not ck.supports(jnp.float32, 4, 4096, 1)
  assert not ck.supports(jnp.bfloat16, 3, 4096, 1)
  assert not ck.supports(jnp.bfloat16, 4, 4096, 64)
  assert not ck.supports(jnp.bfloat16, 4, 4100, 1)


@pytest.mark.parametrize("rows,k,n,slots", [(1, 4096, 14336, 1), (1, 4096, 14336, 2), (1, 4096, 4096, 1),
                                            (1, 1024, 4096, 2)])
def test_decode_default_gives_every_sm_a_block(rows, k, n, slots):
  """Layout 7 at one row a slot, two slots, d_in <= 4096 <= d_out: 16 warps a block unless K has
  fewer chunks or fewer warps give every SM of the 132 a (column tile, K split) unit, four at the least."""
  t = ck.default_tuning(rows, k, n, slots)
  assert t.layout == 7 and t.mt == 1 and t.splits == 1
  tiles, chunks = -(-n // 16) * slots, k // 128
  assert t.kgroups <= max(4, chunks) and (tiles * t.k_splits(k) >= 132 or t.kgroups == 4)
  if t.kgroups < 16:  # the next wider block would have idle warps or leave SMs without a unit
    wider = dataclasses.replace(t, kgroups=2 * t.kgroups)
    assert wider.kgroups > chunks or tiles * wider.k_splits(k) < 132


@pytest.mark.parametrize("rows,k,n,slots", [(16, 14336, 4096, 1), (1, 14336, 4096, 1), (4, 4096, 14336, 1),
                                            (1, 4096, 14336, 8), (1, 2048, 768, 8), (1, 768, 2048, 1),
                                            (64, 4096, 4096, 1), (40, 2048, 768, 8)])
def test_other_defaults_give_about_one_block_per_sm(rows, k, n, slots):
  """Layout 5 past layout 7's measured range (more rows, longer K, more slots)."""
  t = ck.default_tuning(rows, k, n, slots)
  chunks = max(1, k // 128)
  blocks = -(-n // (32 * t.nt)) * slots
  assert 1 <= t.splits <= min(chunks, 16)
  assert t.mt == (1 if rows <= 16 else 2) and t.layout == 5 and t.kgroups == 4 and not t.stage_x
  assert dataclasses.replace(t, mt=1, splits=1) == CudaTuning()  # the field defaults are layout 5's default
  # About one block per SM of the 132, unless K has too few chunks or the grid is already larger.
  assert 66 <= blocks * t.splits <= 264 or t.splits in (1, chunks, 16)


@pytest.mark.parametrize("tuning,d_in,split", [
    (CudaTuning(), 1024, False), (CudaTuning(splits=2), 1024, True),
    (CudaTuning(layout=7, kgroups=4), 256, False), (CudaTuning(layout=7, kgroups=4), 1024, True),
    (CudaTuning(layout=7, kgroups=16, mt=2), 1024, False)])
def test_only_split_launches_have_xla_zero_their_counters(tuning, d_in, split):
  """An aliased zero operand makes XLA write a fresh zero buffer every call (1.3-3 us on the H200:
  BENCHMARKS.md, session 24): only a launch whose K is split counts blocks in and needs it (layout
  7 splits K by its warps: 8 chunks over 4 warps are two splits). Checked on the lowered program,
  no GPU needed."""
  x = jnp.zeros((1, d_in), jnp.bfloat16)
  packed, cent = jnp.zeros((1, 64, d_in // 2), jnp.uint8), jnp.zeros((1, 64, 1, 16), jnp.bfloat16)
  slots = jnp.asarray([[0], [0], [1]], jnp.int32)
  text = jax.jit(lambda *a: ck._call(*a, tuning)).lower(x, packed, cent, slots).as_text()
  assert "cqjax_cuda_lut_matmul" in text
  assert ("output_operand_aliases" in text) == split


def test_tuning_refuses_out_of_range_values():
  with pytest.raises(CqjaxError, match="out of range"):
    CudaTuning(mt=3)
  with pytest.raises(CqjaxError, match="out of range"):
    CudaTuning(splits=0)
  with pytest.raises(CqjaxError, match="out of range"):
    CudaTuning(mt=2, layout=2)  # the timing probe has one shape
  with pytest.raises(CqjaxError, match="out of range"):
    CudaTuning(layout=1, kgroups=4)  # tables alone: measured, lost, not built
  with pytest.raises(CqjaxError, match="out of range"):
    CudaTuning(layout=3, kgroups=1)
  with pytest.raises(CqjaxError, match="leave splits at 1"):
    CudaTuning(layout=7, kgroups=8, splits=2)  # layout 7's split follows from kgroups


def test_serves_the_decode_regime_of_large_weights():
  assert ck.serves(2, 4096, 14336) and ck.serves(8, 14336, 4096) and ck.serves(2, 4096, 4097)
  assert not ck.serves(2, 4096, 4096) and not ck.serves(8, 4096, 4096)  # 2^24 codes: Pallas' blocks
  assert not ck.serves(17, 4096, 14336)  # prefill rows: the Pallas tiles
  assert not ck.serves(9, 4096, 14336) and not ck.serves(16, 14336, 4096)  # Pallas' 16-row blocks
  # grouped products (t rows over 8 experts): CUDA from t rows that more than half fill the experts
  # (Mixtral's batch 3: 6 rows) to 16 rows a slot, still not for small weights
  assert ck.serves(6, 4096, 14336, experts=8) and ck.serves(8, 14336, 4096, experts=8)
  assert ck.serves(9 * 8, 4096, 14336, experts=8) and ck.serves(16 * 8, 14336, 4096, experts=8)
  assert not ck.serves(4, 4096, 14336, experts=8) and not ck.serves(2, 14336, 4096, experts=8)
  assert not ck.serves(16 * 8 + 1, 14336, 4096, experts=8) and not ck.serves(0, 14336, 4096, experts=8)
  assert not ck.serves(128, 2048, 768, experts=128)
  # fewer than 8 experts: 2 rows a slot, as measured for single weights (one row: Pallas)
  assert ck.serves(2, 4096, 14336, experts=1) and not ck.serves(1, 4096, 14336, experts=1)
  assert not ck.serves(2, 4096, 14336, experts=2) and ck.serves(3, 4096, 14336, experts=2)
  # one row: Pallas' FMA kernel
  assert not ck.serves(1, 4096, 14336) and not ck.serves(1, 4096, 4096) and not ck.serves(1, 2048, 768)
  assert not ck.serves(2, 2048, 768) and not ck.serves(8, 768, 2048)  # launch-bound smaller weights


def test_serves_prefill_rows_of_large_weights_on_hopper():
  """Layout 8 where it measured ahead of Pallas: 49 to 512 rows where d_out > d_in, else to 256;
  2^25 codes and more, sm_90 only."""
  for rows in (49, 64, 128, 256):
    assert ck.serves(rows, 4096, 14336, hopper=True) and ck.serves(rows, 14336, 4096, hopper=True)
    assert not ck.serves(rows, 4096, 14336, hopper=False)
  for rows in (257, 512):
    assert ck.serves(rows, 4096, 14336, hopper=True) and not ck.serves(rows, 14336, 4096, hopper=True)
  assert not ck.serves(48, 4096, 14336, hopper=True) and not ck.serves(513, 4096, 14336, hopper=True)
  assert not ck.serves(128, 4096, 4096, hopper=True)  # 2^24 codes: lost at 256 and 512 rows
  assert ck.serves(64 * 8, 14336, 4096, hopper=True, experts=8)  # grouped: rows per slot


@pytest.mark.parametrize("rows,k,n,slots,want", [(64, 4096, 14336, 1, (1, 4, 1)), (128, 4096, 14336, 1, (2, 4, 1)),
                                                 (64, 14336, 4096, 1, (1, 8, 8)), (128, 14336, 4096, 1, (2, 4, 4)),
                                                 (100, 4096, 14336, 8, (2, 4, 1)), (64, 14336, 4096, 8, (1, 8, 1)),
                                                 (512, 4096, 14336, 1, (2, 4, 1))])
def test_prefill_default_on_hopper(rows, k, n, slots, want):
  """The best layout-8 tunings of the session-26 and -27 sweeps on the Mixtral shapes; K split so
  that (column block, split) units number about one per SM, at most 8."""
  t = ck.default_tuning(rows, k, n, slots, hopper=True)
  assert (t.layout, t.kgroups, t.mt, t.nt, t.splits) == (8, 1, *want)
  assert ck.default_tuning(rows, k, n, slots, hopper=False).layout == 5  # not on other GPUs


def test_gpu_dispatch_takes_cuda_where_it_serves(monkeypatch):
  """The dispatcher's GPU choice, without a GPU: the CUDA kernel for 2 to 8 decode rows of a
  weight of more than 2^24 codes (2 to 16 an expert slot), the Pallas kernels for one row, 16
  rows of a single weight, prefill rows (but those of large weights on Hopper), small weights,
  other bit widths, and everywhere when CQJAX_KERNELS=pallas; CUDA wherever it applies with
  =cuda; the int8 kernel for decode rows it takes with =int8."""
  from cqjax import lut_matmul as dispatch  # pylint: disable=g-import-not-at-top
  from cuda_kernels import lut_matmul_int8 as ck8  # pylint: disable=g-import-not-at-top
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  called = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(ck, "available", lambda: True)
  monkeypatch.setattr(ck8, "available", lambda: True)
  monkeypatch.setattr(ck, "is_hopper", lambda: False)
  for mod, name in ((ck, "cuda"), (pk, "pallas"), (ck8.Int8Kernels, "int8")):
    monkeypatch.setattr(mod, "lut_matmul", staticmethod(lambda *a, name=name: called.append(name)))
    monkeypatch.setattr(mod, "grouped_lut_matmul", staticmethod(lambda *a, name=name, **kw: called.append(name)))

  def choice(mode, m, d_in, d_out, bits=4, experts=0):
    monkeypatch.setenv("CQJAX_KERNELS", mode)
    kernels = dispatch._kernels()  # pylint: disable=protected-access
    x = jnp.zeros((m, d_in), jnp.bfloat16)
    cent = jnp.zeros((*((experts,) if experts else ()), d_out, 1, 16), jnp.bfloat16)
    packed = jnp.zeros((*((experts,) if experts else ()), d_out, d_in // 2), jnp.uint8)
    if experts:
      kernels.grouped_lut_matmul(x, packed, cent, bits, jnp.zeros((experts,), jnp.int32))
    else:
      kernels.lut_matmul(x, packed, cent, bits)
    return called.pop()

  assert choice("auto", 1, 4096, 14336) == "pallas" and choice("auto", 2, 4096, 14336) == "cuda"
  assert choice("auto", 8, 4096, 6144) == "cuda" and choice("auto", 16, 4096, 6144) == "pallas"
  assert choice("auto", 8, 4096, 4096) == "pallas"  # 2^24 codes
  assert choice("auto", 1, 4096, 4096) == "pallas"
  assert choice("auto", 16, 1024, 1024) == "pallas"
  assert choice("auto", 64, 1024, 1024) == "pallas"
  assert choice("auto", 4, 512, 1024) == "pallas"
  assert choice("auto", 4, 1024, 1024, bits=2) == "pallas"
  assert choice("auto", 32, 4096, 14336, experts=8) == "cuda"  # batch 16 top-2: 4 rows an expert
  assert choice("auto", 2, 4096, 14336, experts=8) == "pallas"  # batch 1: one row an expert
  assert choice("auto", 128, 14336, 4096, experts=8) == "cuda"  # batch 64 top-2: 16 rows an expert
  assert choice("auto", 136, 14336, 4096, experts=8) == "pallas"  # 17 rows an expert
  assert choice("auto", 1024, 4096, 14336, experts=8) == "pallas"  # prefill: 128 rows an expert
  assert choice("cuda", 64, 512, 1024) == "cuda"
  assert choice("pallas", 1, 4096, 14336) == "pallas"
  assert choice("int8", 1, 4096, 14336) == "int8" and choice("int8", 16, 1024, 1024) == "int8"
  assert choice("int8", 32, 4096, 14336, experts=8) == "int8"  # 4 rows an expert slot
  assert choice("int8", 64, 1024, 1024) == "pallas"  # prefill rows: the default kernels
  assert choice("int8", 4, 1040, 1024) == choice("auto", 4, 1040, 1024) != "int8"  # d_in off 32: the default
  assert choice("int8", 4, 1024, 1024, bits=2) == "pallas"
  monkeypatch.setattr(ck, "is_hopper", lambda: True)  # layout 8 takes prefill rows of large weights
  assert choice("auto", 1024, 4096, 14336, experts=8) == "cuda"
  assert choice("auto", 128, 14336, 4096) == "cuda"
  assert choice("auto", 512, 4096, 14336) == "cuda" and choice("auto", 512, 14336, 4096) == "pallas"
  assert choice("auto", 1024, 4096, 14336) == "pallas"
  assert choice("auto", 64, 1024, 1024) == "pallas"


@needs_gpu
def test_bf16_model_takes_the_cuda_kernel(monkeypatch):
  """With CQJAX_KERNELS=cuda the dispatcher sends the quantized bf16 model's products (attention
  and grouped experts) to the CUDA kernel, and its logits match the reference path's."""
  from conftest import TINY_DEFAULT
  from cqjax.kmeans import rtn_quantize
  from cqjax.load import load_params
  from cqjax.model import MoeCausalLM
  from cqjax.quantize_weights import quantize_scope

  monkeypatch.setenv("CQJAX_KERNELS", "cuda")
  cfg, params = load_params(TINY_DEFAULT, jnp.bfloat16)
  q = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, 4))
  model = MoeCausalLM(cfg, jnp.bfloat16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)))
  hlo = jax.jit(lambda p: model.apply({"params": p}, tokens)[0]).lower(q).as_text()
  assert "cqjax_cuda_lut_matmul" in hlo
  got = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(q), np.float32)
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  ref = np.asarray(jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(q), np.float32)
  # bf16 activations through 4 layers: rounding differences of both paths compound.
  np.testing.assert_allclose(got, ref, rtol=5e-2, atol=5e-2 * float(np.abs(ref).max()))
  assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@needs_gpu
@pytest.mark.parametrize("m,n,cuda", [(4, 16448, True), (4, 16384, False), (64, 1024, False), (4, 256, False)])
def test_automatic_dispatch_takes_cuda_where_it_serves(monkeypatch, m, n, cuda):
  """Unset CQJAX_KERNELS on a GPU: the CUDA kernel at 2 to 8 decode rows of a weight of more than
  2^24 codes, the Pallas kernels for prefill rows and weights of 2^24 codes or fewer; both give
  the product."""
  from cqjax.lut_matmul import lut_matmul as dispatch  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("CQJAX_KERNELS", raising=False)
  rng = np.random.default_rng(m + n)
  w = random_codebook_weight(rng, (), n, 1024, 4, 1024)
  x = jnp.asarray(rng.normal(size=(m, 1024)), jnp.bfloat16)
  hlo = jax.jit(dispatch).lower(x, w).as_text()
  assert ("cqjax_cuda_lut_matmul" in hlo) == cuda
  _close(jax.jit(dispatch)(x, w), float64_product(x, w))
