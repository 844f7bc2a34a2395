"""The CUDA codebook matmul with int8 numerics (cuda_kernels/lut_matmul_int8.*) against its jnp
reference (cqjax.lut_matmul.lut_matmul_int8_reference) on a GPU where the library is built, and
its host-side parts (tuning, refusals) everywhere."""
import dataclasses
import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_int8_numerics, assert_single_int8_product, random_codebook_weight
from cqjax.errors import CqjaxError
from cqjax.lut_matmul import grouped_lut_matmul_int8_reference, lut_matmul_int8_reference
from cuda_kernels import lut_matmul_int8 as ck8

needs_gpu = pytest.mark.skipif(not ck8.available(),
                               reason="needs a CUDA GPU and the built library (python -m cuda_kernels.build)")


# (k, n): whole 128-input chunks, chunks and a 32/64/96-input tail, a tail alone; n off the
# 16-column block and below it.
SHAPES = [(256, 64), (352, 37), (96, 130), (1440, 200), (4096, 5)]


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_reference(m, k, n, dtype):
  assert_single_int8_product(ck8.lut_matmul_int8, lut_matmul_int8_reference, m, k, n, dtype)


@needs_gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9])
def test_long_rows_take_sixteen_warps(m):
  """d_in >= 8192 takes 16 warps with a two-chunk ring (up to 8 rows; 9+ take 8 warps, 2 row tiles)."""
  rng = np.random.default_rng(m)
  w = random_codebook_weight(rng, (), 37, 8224, 4, 8224)  # 64 chunks and a 32-input tail
  x = jnp.asarray(rng.normal(size=(m, 8224)), jnp.bfloat16)
  assert ck8.default_tuning(m, 8224, 37).warps == (16 if m <= 8 else 8)
  assert_int8_numerics(ck8.lut_matmul_int8(x, w.packed, w.centroids, 4),
                       lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.bfloat16)


@needs_gpu
@pytest.mark.parametrize("cdtype", [jnp.bfloat16, jnp.float16])
def test_codebooks_rounded_in_the_kernel(cdtype):
  """The kernel rounds bf16 codebooks itself (float16 ones reach it as float32); an all-zero
  codebook takes scale 1; halves between int8 steps round to even as in jnp."""
  rng = np.random.default_rng(7)
  w = random_codebook_weight(rng, (), 40, 480, 4, 480)
  cent = np.array(w.centroids, np.float32)
  cent[3] = 0.0
  cent[5, 0] = [127.0, 0.5, 1.5, -2.5, -0.5] + [0.25] * 11  # scale 1: exact halves
  w = dataclasses.replace(w, centroids=jnp.asarray(cent, cdtype))
  x = jnp.asarray(rng.normal(size=(5, 480)), jnp.float32)
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4)
  assert_int8_numerics(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.float32)
  assert not np.asarray(got[:, 3]).any()


@needs_gpu
@pytest.mark.parametrize("tuning", ck8.TUNINGS, ids=str)
def test_tunings_compute_the_same_function(tuning):
  if tuning.wgmma and not ck8.cuda.is_hopper():
    pytest.skip("the wgmma kernel runs on Hopper GPUs")
  rng = np.random.default_rng(5)
  w = random_codebook_weight(rng, (), 45, 2336, 4, 2336)  # 18 chunks + a 32-input tail: warps with 1-5 chunks
  x = jnp.asarray(rng.normal(size=(21, 2336)) * np.linspace(0.1, 10, 21)[:, None], jnp.float32)  # 3 passes at mt 1
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4, tuning=tuning)
  assert_int8_numerics(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.float32)


needs_hopper = pytest.mark.skipif(not (ck8.available() and ck8.cuda.is_hopper()),
                                  reason="needs a Hopper GPU and the built library (the wgmma kernel)")


@needs_hopper
@pytest.mark.parametrize("m", [1, 17, 64, 65, 130])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("warps,mt", sorted(ck8.WGMMA_KERNELS))
def test_wgmma_kernel_matches_reference(m, k, n, warps, mt):
  """The Hopper prefill kernel: row blocks of 32, 64 or 128 (the last partial), K tails of 32-96
  inputs (x padded to whole 128-input stages), column blocks of 64-256 past n."""
  rng = np.random.default_rng(m * 100 + k + n + mt)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)) * np.linspace(0.1, 10, m)[:, None], jnp.bfloat16)
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4, tuning=ck8.Int8Tuning(warps=warps, mt=mt, wgmma=True))
  assert_int8_numerics(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.bfloat16)


@needs_hopper
@pytest.mark.parametrize("m", [1, 65])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_wgmma_kernel_split_k_matches_reference(m, k, n, splits):
  """K split across blocks, each split's exact int32 sums added and scaled in XLA: the same
  numbers, including splits left without a stage (k = 96: one stage)."""
  rng = np.random.default_rng(m * 10 + k + n + splits)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  got = ck8.lut_matmul_int8(x, w.packed, w.centroids, 4, tuning=ck8.Int8Tuning(warps=4, mt=8, wgmma=True, splits=splits))
  assert_int8_numerics(got, lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.bfloat16)


@needs_hopper
def test_grouped_refuses_split_k():
  rng = np.random.default_rng(3)
  w = random_codebook_weight(rng, (2,), 16, 64, 4, 64)
  with pytest.raises(CqjaxError, match="only single weights"):
    ck8.grouped_lut_matmul_int8(jnp.ones((3, 64), jnp.bfloat16), w.packed, w.centroids, 4, jnp.asarray([1, 2]),
                                tuning=ck8.Int8Tuning(warps=4, mt=8, wgmma=True, splits=2))


@needs_hopper
@pytest.mark.parametrize("sizes", [[70, 0, 5, 0], [0, 0, 0, 0], [1, 130, 1, 1], [0, 17, 0, 64]])
@pytest.mark.parametrize("mt", [8, 16])
def test_wgmma_kernel_grouped(sizes, mt):
  """Grouped experts: slots of uneven rows (a block loops over the row blocks its slot has beyond
  the grid's), empty experts, rows past the last group zero."""
  rng = np.random.default_rng(sum(sizes) + 1)
  w = random_codebook_weight(rng, (4,), 70, 352, 4, 352)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 3, 352)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  got = ck8.grouped_lut_matmul_int8(x, w.packed, w.centroids, 4, gs, tuning=ck8.Int8Tuning(warps=4, mt=mt, wgmma=True))
  assert_int8_numerics(got, grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, gs), jnp.float32)
  assert not np.asarray(got[sum(sizes):]).any()


def test_wg_order_puts_each_lanes_inputs_where_wgmma_reads_them():
  """Within a 128-input stage, input 32 l + 8 j + 4 h + i (lane l's codes of k32 step j, half h)
  lands at 32 j + 16 h + 4 l + i; the padding to whole stages is zeros."""
  k = 160
  x = jnp.arange(1, k + 1, dtype=jnp.int32)[None] % 127
  got = np.asarray(ck8.wg_order(x.astype(jnp.int8)))[0]
  assert got.shape == (256,)
  for l in range(4):
    for j in range(4):
      for h in range(2):
        for i in range(4):
          for stage in range(2):
            src = 128 * stage + 32 * l + 8 * j + 4 * h + i
            dst = 128 * stage + 32 * j + 16 * h + 4 * l + i
            assert got[dst] == (np.asarray(x)[0, src] if src < k else 0)


@needs_gpu
@pytest.mark.parametrize("sizes", [[3, 0, 5, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 17, 0, 2]])
def test_grouped_matches_reference(sizes):
  rng = np.random.default_rng(sum(sizes) + len(sizes))
  w = random_codebook_weight(rng, (4,), 50, 352, 4, 352)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, 352)), jnp.bfloat16)  # 2 rows past the last group
  gs = jnp.asarray(sizes, jnp.int32)
  got = ck8.grouped_lut_matmul_int8(x, w.packed, w.centroids, 4, gs)
  assert_int8_numerics(got, grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, gs), jnp.bfloat16)
  assert not np.asarray(got[sum(sizes):], np.float32).any()


@needs_gpu
def test_dispatcher_takes_it_for_decode_batches(monkeypatch):
  """CQJAX_KERNELS=int8 on a GPU: the int8 numerics up to MAX_ROWS rows a weight (single and
  grouped), above them on Hopper (the wgmma kernel), the default bf16 kernels above elsewhere."""
  import jax
  from cqjax import lut_matmul as dispatch
  monkeypatch.setenv("CQJAX_KERNELS", "int8")
  jax.clear_caches()
  rng = np.random.default_rng(9)
  w = random_codebook_weight(rng, (), 48, 256, 4, 256)
  for m in (1, ck8.MAX_ROWS):
    x = jnp.asarray(rng.normal(size=(m, 256)), jnp.float32)
    assert_int8_numerics(dispatch.lut_matmul(x, w), lut_matmul_int8_reference(x, w.packed, w.centroids, 4), jnp.float32)
  g = random_codebook_weight(rng, (3,), 48, 256, 4, 256)
  gs = jnp.asarray([2, 0, 3], jnp.int32)
  x = jnp.asarray(rng.normal(size=(5, 256)), jnp.bfloat16)
  assert_int8_numerics(dispatch.grouped_lut_matmul(x, g, gs),
                       grouped_lut_matmul_int8_reference(x, g.packed, g.centroids, 4, gs), jnp.bfloat16)
  big = jnp.asarray(rng.normal(size=(ck8.MAX_ROWS + 1, 256)), jnp.bfloat16)
  int8_mode = dispatch.lut_matmul(big, w)
  if ck8.serves(big.shape[0]):  # Hopper: the wgmma kernel
    assert_int8_numerics(int8_mode, lut_matmul_int8_reference(big, w.packed, w.centroids, 4), jnp.bfloat16)
  monkeypatch.setenv("CQJAX_KERNELS", "auto")
  jax.clear_caches()
  if not ck8.serves(big.shape[0]):
    np.testing.assert_array_equal(np.asarray(int8_mode, np.float32), np.asarray(dispatch.lut_matmul(big, w), np.float32))
  jax.clear_caches()


@needs_gpu
@pytest.mark.parametrize("mt", [1, 2])
def test_persistent_blocks_loop_over_tiles(mt):
  """A persistent grid (fewer blocks than column tiles: each loops over several, its code loads
  running on across them) over grouped experts with several passes of rows, an empty expert and
  a K tail; and a single weight of more tiles than blocks fit on the GPU at once."""
  rng = np.random.default_rng(mt)
  w = random_codebook_weight(rng, (4,), 1000, 352, 4, 352)
  sizes = [20, 0, 3, 9]
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 1, 352)), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)
  tuning = ck8.Int8Tuning(warps=4, mt=mt, persistent=True)
  got = ck8.grouped_lut_matmul_int8(x, w.packed, w.centroids, 4, gs, tuning=tuning)
  assert_int8_numerics(got, grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, 4, gs), jnp.bfloat16)
  v = random_codebook_weight(rng, (), 16 * 1500 + 5, 64, 4, 64)
  xs = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
  assert_int8_numerics(ck8.lut_matmul_int8(xs, v.packed, v.centroids, 4, tuning=tuning),
                       lut_matmul_int8_reference(xs, v.packed, v.centroids, 4), jnp.float32)


def test_supports_and_tunings():
  assert ck8.supports(4, 4096, 1) and ck8.supports(4, 32, 1)
  assert not ck8.supports(4, 4096, 2) and not ck8.supports(3, 4096, 1) and not ck8.supports(4, 4080, 1)
  assert not ck8.supports(4, ck8.MAX_D_IN + 1, 1)
  assert ck8.default_tuning(1, 4096, 14336).mt == 1 and ck8.default_tuning(9, 4096, 14336).mt == 2
  assert ck8.default_tuning(1, 4096, 14336).warps == 8 and ck8.default_tuning(1, 14336, 4096).warps == 16
  for rows in (1, 8, 9, ck8.MAX_ROWS, 17, 33, 64, 65, 128, 256, 1000):  # the defaults name built kernels
    for d_in, d_out in ((768, 2048), (4096, 14336), (14336, 4096)):
      for grouped in (False, True):
        for hopper in (False, True):
          t = ck8.default_tuning(rows, d_in, d_out, grouped, hopper=hopper, sms=132)
          assert (t.warps, t.mt) in (ck8.WGMMA_KERNELS if t.wgmma else ck8.KERNELS)
          assert t.wgmma == (hopper and rows > (8 if grouped else 16))
          assert t.splits == 1 or not grouped
  assert ck8.serves(ck8.MAX_ROWS, hopper=False) and not ck8.serves(ck8.MAX_ROWS + 1, hopper=False)
  assert ck8.serves(4096, hopper=True)


@pytest.mark.parametrize("rows,d_in,d_out,grouped,picked", [
    (32, 4096, 14336, False, (4, 4, 1)),     # 224 blocks of 32 rows (64-row blocks would be half empty)
    (64, 4096, 14336, False, (4, 8, 1)),     # 2 warpgroups: 112 blocks, too few
    (128, 4096, 14336, False, (4, 16, 1)),   # one row block: 34.5 us (2 of 64 rows: 42.7)
    (256, 4096, 14336, False, (8, 16, 1)),   # 224 blocks of 2 warpgroups
    (512, 4096, 14336, False, (8, 16, 1)),
    (32, 14336, 4096, False, (4, 4, 4)),     # 64 column blocks: K split 4 ways, 256 blocks
    (64, 14336, 4096, False, (4, 8, 4)),     # (32-row blocks, split 2 ways: 35.9 us against 29.4)
    (128, 14336, 4096, False, (4, 16, 4)),
    (256, 14336, 4096, False, (4, 16, 2)),   # (8/16w2: 50.6 us against 51.1)
    (512, 14336, 4096, False, (8, 16, 2)),   # 2 warpgroups: 128 blocks, split 2 ways
    (128, 512, 4096, False, (4, 16, 1)),     # 4 stages: too few to split
    (16, 4096, 14336, True, (4, 4, 1)),      # grouped: Mixtral top-2 at batch 64
    (64, 4096, 14336, True, (8, 16, 1)),     # batch 256: 153.4 us (one warpgroup, 64 rows: 200.5)
    (256, 4096, 14336, True, (8, 16, 1)),    # batch 1024
    (4, 4096, 14336, True, None),            # batch 16: the mma.sync kernel
])
def test_wgmma_defaults_follow_the_measured_choices(rows, d_in, d_out, grouped, picked):
  """The H200 sweeps of sessions 33 and 34 (BENCHMARKS.md): the wgmma block shape and K splits
  that won, or the mma.sync kernel."""
  t = ck8.default_tuning(rows, d_in, d_out, grouped, hopper=True, sms=132)
  assert ((t.warps, t.mt, t.splits) if t.wgmma else None) == picked
  with pytest.raises(CqjaxError, match="Int8Tuning out of range"):
    ck8.Int8Tuning(warps=3)
  with pytest.raises(CqjaxError, match="Int8Tuning out of range"):
    ck8.Int8Tuning(warps=4, mt=8, persistent=True, wgmma=True)
  with pytest.raises(CqjaxError, match="Int8Tuning out of range"):
    ck8.Int8Tuning(warps=8, mt=2, splits=2)  # K splits: the wgmma kernel's


def test_tuning_specs_round_trip():
  """The scripts' spelling of a tuning (bench_kernels, profile_cuda_lut): every built tuning back
  from its spec, and a clear error for a malformed one."""
  assert [ck8.Int8Tuning.parse(t.spec) for t in ck8.TUNINGS] == list(ck8.TUNINGS)
  assert ck8.Int8Tuning.parse("4/16w2") == ck8.Int8Tuning(warps=4, mt=16, wgmma=True, splits=2)
  for bad in ("8", "8/2x", "8/2p2", "w/4"):
    with pytest.raises(CqjaxError, match=f"int8 tuning '{bad}' is not warps/mt"):
      ck8.Int8Tuning.parse(bad)
  with pytest.raises(CqjaxError, match="Int8Tuning out of range"):
    ck8.Int8Tuning.parse("8/2w")  # spelled right, not built


def test_python_mirrors_the_cu_file():
  """KERNELS and MAX_D_IN restate lut_matmul_int8.cu's switch and kMaxK8 (a tuning the switch
  lacks fails only at run time on a GPU, so the two are compared here, on any machine)."""
  source = (pathlib.Path(ck8.__file__).parent / "lut_matmul_int8.cu").read_text()
  cases = [tuple(map(int, c)) for c in re.findall(r"case (\d+): err = launch_int8<(\d+), (\d+)>", source)]
  assert all(key == 10 * warps + mt for key, warps, mt in cases)  # the switch's key is warps * 10 + mt
  assert {(warps, mt) for _, warps, mt in cases} == ck8.KERNELS
  wg = [tuple(map(int, c)) for c in re.findall(r"case (\d+): err = launch_wg8<(\d+), (\d+)>", source)]
  assert {(key // 100 % 100, key % 100) for key, _, _ in wg} == ck8.WGMMA_KERNELS  # 100000 + warps * 100 + mt
  assert all(rows == 8 * (key % 100) and key // 100 % 100 == 4 * wg for key, rows, wg in wg)  # 8 mt rows, 4 warps a group
  assert int(re.search(r"kWg8Inputs = (\d+)", source).group(1)) == ck8._WG_STAGE
  assert int(re.search(r"constexpr int64_t kMaxK8 = (\d+);", source).group(1)) == ck8.MAX_D_IN
  assert ck8.MAX_D_IN * 127 * 127 <= 2**31 - 1  # int8 values in [-127, 127]: the int32 dot cannot overflow


@pytest.mark.skipif(ck8.available(), reason="checks the refusal where the library is not available")
def test_refuses_without_library():
  rng = np.random.default_rng(0)
  w = random_codebook_weight(rng, (), 16, 64, 4, 64)
  with pytest.raises(CqjaxError, match="CUDA kernel library is not available"):
    ck8.lut_matmul_int8(jnp.ones((1, 64), jnp.bfloat16), w.packed, w.centroids, 4)
