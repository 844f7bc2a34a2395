"""The Pallas codebook matmuls against the jnp reference: on CPU through `interpret=True`, compiled
where a GPU is present (the same tests, run on the H100: BENCHMARKS.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import float64_product, random_codebook_weight
from cqjax.errors import CqjaxError
from pallas_kernels import lut_matmul as pk
from pallas_kernels.lut_matmul import LutTuning

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU


def _close(got, ref, dtype):
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  # f32: the GPU's tensor cores at HIGHEST precision; bf16: one output rounding.
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


# (k, n, bits, group): k and n off every block; per-row and column-group codebooks; 1/2/4/8 bits; and
# one K step of 64 inputs, slices of 8 (_decodes_in_registers).
SHAPES = [(272, 37, 4, 272), (200, 70, 4, 40), (96, 130, 2, 96), (80, 33, 8, 16), (136, 19, 1, 136), (64, 24, 4, 64)]


@pytest.mark.parametrize("m", [1, 3, 16, 64])
@pytest.mark.parametrize("k,n,bits,group", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lut_matmul_matches_reference(m, k, n, bits, group, dtype):
  rng = np.random.default_rng(m * 1000 + k + n + bits)
  w = random_codebook_weight(rng, (), n, k, bits, group)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  got = pk.lut_matmul(x, w.packed, w.centroids, bits, interpret=INTERPRET)
  assert got.dtype == dtype and got.shape == (m, n)
  _close(got, float64_product(x, w), dtype)


@pytest.mark.parametrize("n", [300, 4096])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_rows_take_128_row_blocks(dtype, n):
  """m past 128: 128-row blocks, and for a wide weight the widest column blocks (compiled: their
  shared-memory budget in f32)."""
  rng = np.random.default_rng(11)
  w = random_codebook_weight(rng, (), n, 272, 4, 272)
  x = jnp.asarray(rng.normal(size=(130, 272)), dtype)
  tuning = pk.default_tuning(130, 272, n, 4, x_dtype=dtype)
  assert tuning.block_m == 128 and (tuning.block_n > 64) == (n >= 4096 and dtype == jnp.bfloat16)
  _close(pk.lut_matmul(x, w.packed, w.centroids, 4, interpret=INTERPRET), float64_product(x, w), dtype)


@pytest.mark.parametrize("tuning", [
    LutTuning(block_m=16, block_n=16, block_k=128, k_splits=3),  # tensor cores at m=5, uneven splits
    LutTuning(block_m=2, block_n=64, block_k=16, k_splits=7),   # FMA path, more splits than even
    LutTuning(block_m=1, block_n=8, block_k=512, k_splits=1),   # one step covers all of K
])
def test_tunings_compute_the_same_function(tuning):
  rng = np.random.default_rng(7)
  w = random_codebook_weight(rng, (), 45, 464, 4, 116)
  x = jnp.asarray(rng.normal(size=(5, 464)), jnp.float32)
  got = pk.lut_matmul(x, w.packed, w.centroids, 4, tuning=tuning, interpret=INTERPRET)
  _close(got, float64_product(x, w), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 48), (4, 16), (2, 48)])
def test_grouped_matches_reference_with_empty_experts(dtype, bits, group):
  rng = np.random.default_rng(bits + group)
  w = random_codebook_weight(rng, (5,), 23, 48, bits, group)
  x = jnp.asarray(rng.normal(size=(21, 48)), dtype)
  for sizes in ([3, 0, 6, 0, 2], [0, 0, 0, 0, 0], [21, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 17, 0, 0, 4]):
    gs = jnp.asarray(sizes, jnp.int32)
    got = pk.grouped_lut_matmul(x, w.packed, w.centroids, bits, gs, interpret=INTERPRET)
    assert got.dtype == dtype and got.shape == (21, 23)
    _close(got, float64_product(x, w, gs), dtype)
    assert not np.asarray(got[sum(sizes):]).any()  # rows past the last group are zero


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_decode_rows_take_the_fma_path(dtype):
  """Batch 1 at top-2 of 8 experts (and one row): a row a slot, the FMA path (block_m 1), odd K and N."""
  rng = np.random.default_rng(12)
  w = random_codebook_weight(rng, (8,), 37, 272, 4, 272)
  for sizes in ([0, 1, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]):
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.normal(size=(sum(sizes), 272)), dtype)
    assert pk.default_grouped_tuning(sum(sizes), 8, 272, 37, 4).block_m == 1
    got = pk.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, interpret=INTERPRET)
    _close(got, float64_product(x, w, gs), dtype)


def test_grouped_takes_the_callers_slots():
  """Slots computed elsewhere (the dispatcher's one-warp kernel) run the same grid; a wrong shape is refused."""
  from cqjax.codebook import expert_slots  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  w = random_codebook_weight(rng, (4,), 19, 64, 4, 64)
  x = jnp.asarray(rng.normal(size=(9, 64)), jnp.float32)
  gs = jnp.asarray([2, 0, 7, 0], jnp.int32)
  got = pk.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, slots=expert_slots(gs, 4), interpret=INTERPRET)
  _close(got, float64_product(x, w, gs), jnp.float32)
  with pytest.raises(CqjaxError, match=r"slots must be int32 \[3, 4\]"):
    pk.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, slots=expert_slots(gs, 3), interpret=INTERPRET)


def test_grouped_many_rows_per_expert_walks_row_blocks():
  rng = np.random.default_rng(3)
  w = random_codebook_weight(rng, (3,), 17, 64, 4, 64)
  x = jnp.asarray(rng.normal(size=(70, 64)), jnp.float32)
  tuning = LutTuning(block_m=16, block_n=16, block_k=128, k_splits=2)
  for sizes in ([37, 0, 33], [20, 0, 13], [0, 0, 0]):  # uncovered rows: two row blocks and more, in each split
    gs = jnp.asarray(sizes, jnp.int32)
    got = pk.grouped_lut_matmul(x, w.packed, w.centroids, 4, gs, tuning=tuning, interpret=INTERPRET)
    _close(got, float64_product(x, w, gs), jnp.float32)
    assert not np.asarray(got[sum(sizes):]).any()


def _run_ptx(program: str, operands: dict) -> dict:
  """A numpy interpreter of the PTX subset DECODE4_SELECTORS and DECODE4_PTX use (and, or, shr, prmt
  on b32; mov.b64 to and from a register pair)."""
  regs = dict(operands)
  val = lambda tok: regs[tok] if tok[0] in "%$" else np.uint32(int(tok, 0))
  for line in program.splitlines():
    line = line.strip().rstrip(";")
    if not line or line[0] in "{}." or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    if op == "mov.b64" and rest.startswith("{"):  # {lo, hi}, $s
      pair, src = rest.rsplit(",", 1)
      lo, hi = (t.strip() for t in pair.strip(" {}").split(","))
      regs[lo], regs[hi] = (regs[src.strip()] & np.uint64(0xFFFFFFFF)).astype(np.uint32), (
          regs[src.strip()] >> np.uint64(32)).astype(np.uint32)
      continue
    if op == "mov.b64":  # $d, {lo, hi}
      dst, pair = rest.split(",", 1)
      lo, hi = (regs[t.strip()] for t in pair.strip(" {}").split(","))
      regs[dst.strip()] = lo.astype(np.uint64) | (hi.astype(np.uint64) << np.uint64(32))
      continue
    dst, *src = [t.strip() for t in rest.split(",")]
    a = [val(t) for t in src]
    if op == "and.b32":
      regs[dst] = a[0] & a[1]
    elif op == "or.b32":
      regs[dst] = a[0] | a[1]
    elif op == "shr.b32":
      regs[dst] = a[0] >> a[1]
    elif op == "prmt.b32":  # default mode: byte k of dst = byte (sel nibble k & 7) of {b, a}
      pool = np.stack([(a[0] >> (8 * i)) & 0xFF for i in range(4)] + [(a[1] >> (8 * i)) & 0xFF for i in range(4)])
      out = np.zeros_like(a[0])
      for k in range(4):
        sel = np.broadcast_to((a[2] >> np.uint32(4 * k)) & np.uint32(0xF), out.shape)
        assert not np.any(sel & 8), "sign-replicate mode is not used"
        out |= (np.take_along_axis(pool, sel[None].astype(np.int64), 0)[0] << np.uint32(8 * k)).astype(np.uint32)
      regs[dst] = out.astype(np.uint32)
    else:
      raise AssertionError(f"unexpected instruction {op}")
  return regs


@pytest.mark.parametrize("ways", [1, 2, 8, 32])
def test_deinterleave_splits_a_tile_into_strided_slices(ways):
  """The decode blocks' in-register split of an x tile: slice s is columns s, s + ways, s + 2 ways, ..."""
  tile = jnp.arange(3 * 4 * ways, dtype=jnp.float32).reshape(3, 4 * ways)
  got = pk._deinterleave(tile, ways)  # pylint: disable=protected-access
  assert len(got) == ways
  for s, part in enumerate(got):
    np.testing.assert_array_equal(part, tile[:, s::ways])


@pytest.mark.parametrize("ways", [2, 8])
def test_pair_slices_keep_the_product(ways):
  """Dots over pairs of slices (the register decode's tensor-core blocks): array j holds slices 2j
  and 2j + 1 side by side, and the dots of x's and w's pairs sum to x @ w.T."""
  rng = np.random.default_rng(ways)
  x = jnp.asarray(rng.normal(size=(3, 5 * ways)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(7, 5 * ways)), jnp.float32)
  xs, ws = (pk._pair_slices(pk._deinterleave(a, ways)) for a in (x, w))  # pylint: disable=protected-access
  assert len(xs) == ways // 2
  for j, part in enumerate(xs):
    np.testing.assert_array_equal(part[:, 0::2], x[:, 2 * j::ways])
    np.testing.assert_array_equal(part[:, 1::2], x[:, 2 * j + 1::ways])
  got = sum(a @ b.T for a, b in zip(xs, ws))
  np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("whole_words", [True, False])
def test_register_decode_program_decodes_every_code(whole_words):
  """The inline PTX of the bf16 4-bit decode, run by an interpreter: selectors for a whole word
  and both decode programs, or selectors for each half and the first program; four codes per
  decode, each its row's bf16 centroid (compiled, it runs in the GPU tests)."""
  rng = np.random.default_rng(5)
  n = 4096
  books = jnp.asarray(rng.normal(size=(n, 16)), jnp.bfloat16)
  words = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
  regs = np.stack([np.asarray(r) for r in pk.decode4_registers([books[:, i] for i in range(16)])], axis=-1)
  books16 = np.asarray(books).view(np.uint16)
  for half in range(2):
    selectors = _run_ptx(pk.DECODE4_SELECTORS[0 if whole_words else half], {"$1": words})["$0"]
    operands = {"$1": selectors, **{f"${2 + j}": regs[:, j] for j in range(8)}}
    out = _run_ptx(pk.DECODE4_PTX[half if whole_words else 0], operands)["$0"]
    for j in range(4):
      code = (words >> np.uint32(4 * (4 * half + j))) & 15
      got = (out >> np.uint64(16 * j)) & np.uint64(0xFFFF)
      np.testing.assert_array_equal(got.astype(np.uint16), books16[np.arange(n), code])


def test_empty_batch():
  rng = np.random.default_rng(0)
  w = random_codebook_weight(rng, (), 9, 32, 4, 32)
  got = pk.lut_matmul(jnp.zeros((0, 32), jnp.float32), w.packed, w.centroids, 4, interpret=INTERPRET)
  assert got.shape == (0, 9)


def test_bad_inputs_raise_clear_errors():
  rng = np.random.default_rng(1)
  w = random_codebook_weight(rng, (), 9, 32, 4, 32)
  x = jnp.ones((2, 32), jnp.float32)
  with pytest.raises(CqjaxError, match="3-bit codes are not supported"):
    w3 = random_codebook_weight(rng, (), 9, 32, 3, 32)
    pk.lut_matmul(x, w3.packed, w3.centroids, 3, interpret=True)
  with pytest.raises(CqjaxError, match="do not fit 4-bit codes over d_in=40"):
    pk.lut_matmul(jnp.ones((2, 40)), w.packed, w.centroids, 4, interpret=True)
  with pytest.raises(CqjaxError, match="packed codes must be uint8"):
    pk.lut_matmul(x, w.packed.astype(jnp.int32), w.centroids, 4, interpret=True)
  with pytest.raises(CqjaxError, match="centroids"):
    pk.lut_matmul(x, w.packed, w.centroids[..., :8], 4, interpret=True)
  with pytest.raises(CqjaxError, match="Pallas lut_matmul: centroids must be floating point, got int32"):
    pk.lut_matmul(x, w.packed, w.centroids.astype(jnp.int32), 4, interpret=True)  # e.g. laid out for bit-planes
  with pytest.raises(CqjaxError, match="group_sizes must be integers"):
    pk.grouped_lut_matmul(x, w.packed[None], w.centroids[None], 4, jnp.ones((2,), jnp.float32), interpret=True)
  with pytest.raises(CqjaxError, match="block_n must be a power of two"):
    LutTuning(block_m=1, block_n=24, block_k=64)


def test_default_tuning_picks_fma_for_decode_and_tensor_cores_for_batches():
  assert pk.default_tuning(1, 4096, 14336, 4).block_m == 1
  assert pk.default_tuning(16, 4096, 14336, 4).block_m == 16
  assert pk.default_tuning(128, 4096, 14336, 4).block_m == 128  # one decode of W for 128 rows
  small_n = pk.default_tuning(1, 14336, 4096, 4)
  assert small_n.k_splits > 1  # 128 column blocks alone would leave SMs idle
  # Grouped: 128 active experts fill the GPU without splitting K (each split adds a float32
  # partial pass); the same weight alone is split.
  assert pk.default_tuning(2, 2048, 768, 4).k_splits > 1
  assert pk.default_tuning(2, 2048, 768, 4, experts=128).k_splits == 1
  # Qwen3 at batch 16 (128 rows over 128 experts): random routing gives some experts two rows, so
  # 16-row tensor-core blocks; batch 1 (8 rows) and Mixtral's batch 1 (2 rows of 8 experts): one row
  assert pk.default_grouped_tuning(128, 128, 2048, 768, 4) == pk.default_tuning(2, 2048, 768, 4, experts=128)
  assert [pk.default_grouped_tuning(t, e, 2048, 768, 4).block_m for t, e in ((8, 128), (2, 8), (1, 8))] == [1, 1, 1]
  # One-row programs that fill every SM at their occupancy (4 a SM) run unsplit: Mixtral at batch 1
  # (two experts' 1792), one 4096x14336 weight's 896, four 14336x4096 weights' 1024; one's 256 split
  assert pk.default_grouped_tuning(2, 8, 4096, 14336, 4).k_splits == 1
  assert pk.default_tuning(1, 4096, 14336, 4).k_splits == 1
  assert pk.default_tuning(1, 14336, 4096, 4, experts=4).k_splits == 1


def test_one_row_steps_run_least_past_d_in():
  """One-row K steps of 256 where 512 would run further past d_in (768: 768 against 1024). Qwen3's
  down projection (d_in 768) so takes whole steps, and with them the register decode."""
  assert [pk.default_tuning(1, k, 2048, 4).block_k for k in (768, 1280, 1408, 272, 4096)] == [256, 256, 512, 512, 512]
  assert pk._decodes_in_registers(4, 384, jnp.bfloat16, 768, 256, interpret=False)
  assert not pk._decodes_in_registers(4, 384, jnp.bfloat16, 768, 512, interpret=False)  # a last step past d_in
  assert not pk._decodes_in_registers(4, 32, jnp.bfloat16, 64, 64, interpret=False)  # slices of 8 inputs


def test_tensor_core_dots_take_16_inputs_or_more():
  """Every dot of a default tuning has 16 inputs or more (8 counted each product twice on an H200:
  pk._MIN_DOT_INPUTS); a tuning that would run shorter dots is refused, naming block_k."""
  for bits in pk.SUPPORTED_BITS:
    for d_in in (8, 12, 16, 24, 48, 64, 96, 136, 272):
      d_in = -(-d_in * bits // 8) * 8 // bits  # whole bytes of codes
      for dtype in (jnp.float32, jnp.bfloat16):
        tuning = pk.default_tuning(16, d_in, 40, bits, x_dtype=dtype)
        x = jax.ShapeDtypeStruct((16, d_in), dtype)
        packed = jax.ShapeDtypeStruct((40, d_in * bits // 8), jnp.uint8)
        lay = pk._layout(x, packed, jax.ShapeDtypeStruct((40, 1, 2 ** bits), jnp.float32), bits, tuning, interpret=False)
        assert pk._dot_inputs(tuning.block_k, bits, lay.unit_bytes) >= 16, (bits, d_in, dtype, tuning, lay)
  rng = np.random.default_rng(2)
  w = random_codebook_weight(rng, (), 9, 32, 4, 32)
  with pytest.raises(CqjaxError, match="LutTuning.block_k=16 with block_m=16 gives tensor-core dots of 8 inputs"):
    pk.lut_matmul(jnp.ones((16, 32), jnp.bfloat16), w.packed, w.centroids, 4,
                  tuning=LutTuning(block_m=16, block_n=16, block_k=16), interpret=True)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_short_rows_take_whole_dots(bits):
  """d_in shorter than a whole dot's step (12 inputs): the step runs past d_in, where x reads as zeros."""
  rng = np.random.default_rng(bits)
  d_in = 16 if bits == 1 else 12
  w = random_codebook_weight(rng, (), 21, d_in, bits, d_in)
  x = jnp.asarray(rng.normal(size=(16, d_in)), jnp.bfloat16)
  _close(pk.lut_matmul(x, w.packed, w.centroids, bits, interpret=INTERPRET), float64_product(x, w), jnp.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="the dispatcher picks the Pallas kernels on GPUs only")
def test_model_on_gpu_uses_the_kernels_and_matches_the_reference(monkeypatch):
  from conftest import TINY_DEFAULT
  from cqjax.kmeans import rtn_quantize
  from cqjax.load import load_params
  from cqjax.model import MoeCausalLM
  from cqjax.quantize_weights import quantize_scope

  cfg, params = load_params(TINY_DEFAULT, jnp.float32)
  q = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, 4))
  model = MoeCausalLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24)))
  hlo = jax.jit(lambda p: model.apply({"params": p}, tokens)[0]).lower(q).as_text()
  assert "cqjax_grouped_lut_matmul" in hlo and "cqjax_lut_matmul" in hlo
  # float32 everywhere else too: XLA's default f32 dot on a GPU rounds through tf32.
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(q)
    monkeypatch.setenv("CQJAX_KERNELS", "reference")
    ref = jax.jit(lambda p: model.apply({"params": p}, tokens)[0])(q)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_cuda_first_dispatch_offers_the_pallas_bit_widths():
  """CQJAX_KERNELS=cuda falls back to Pallas for what CUDA does not take, so it must claim
  exactly the Pallas bit widths (its copy is there to avoid importing Pallas on CPU)."""
  from cqjax.lut_matmul import _CudaFirst  # pylint: disable=g-import-not-at-top
  from cuda_kernels import lut_matmul as cuda  # pylint: disable=g-import-not-at-top
  assert _CudaFirst.SUPPORTED_BITS == pk.SUPPORTED_BITS
  assert set(cuda.SUPPORTED_BITS) <= set(pk.SUPPORTED_BITS)


def test_cuda_first_dispatch_counts_a_grouped_products_rows_over_its_experts(monkeypatch):
  """With the CUDA library loaded, the automatic choice for Mixtral's expert products: its batches 3
  and 4 (6 and 8 rows over 8 experts) to the CUDA kernel, batch 2 (4 rows) and one row of a single
  weight to Pallas, 2 rows of a single weight to CUDA (shapes only: nothing is allocated)."""
  from cqjax.lut_matmul import _CudaFirst  # pylint: disable=g-import-not-at-top
  from cuda_kernels import lut_matmul as cuda  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cuda, "available", lambda: True)
  monkeypatch.setattr(cuda, "is_hopper", lambda: False)
  shape = lambda *s, dtype=jnp.uint8: jax.ShapeDtypeStruct(s, dtype)
  grouped = (shape(8, 14336, 2048), shape(8, 14336, 1, 16, dtype=jnp.bfloat16))
  single = (shape(14336, 2048), shape(14336, 1, 16, dtype=jnp.bfloat16))
  pick = lambda t, weight, is_grouped: _CudaFirst()._pick(shape(t, 4096, dtype=jnp.bfloat16), *weight, 4, is_grouped)
  assert pick(6, grouped, True) is cuda and pick(8, grouped, True) is cuda
  assert pick(4, grouped, True) is pk and pick(2, grouped, True) is pk
  assert pick(1, single, False) is pk and pick(2, single, False) is cuda


def _lowers_to_triton(f, *args) -> bool:
  """Whether f, traced on these shapes, lowers for CUDA GPUs with its Pallas calls in Triton: Pallas'
  Triton lowering runs in Python, so CI's CPU checks what the compiled tests check on a GPU first
  (e.g. a value gather, which that lowering rejects)."""
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return "__gpu$xla.gpu.triton" in text


# (m, k, n, bits, group, dtype): the register decode (4-bit bf16 in words) at one row (FMA), 16 rows
# (tensor cores) and prefill (128-row blocks, 256 columns); the gather through the table ref in
# words and in bytes, f32, column-group codebooks, K split.
LOWERED = [(1, 4096, 14336, 4, 4096, jnp.bfloat16), (16, 4096, 14336, 4, 4096, jnp.bfloat16),
           (130, 4096, 4096, 4, 4096, jnp.bfloat16), (1, 14336, 4096, 4, 14336, jnp.bfloat16),
           (3, 272, 37, 4, 272, jnp.bfloat16), (16, 200, 70, 4, 40, jnp.float32),
           (1, 96, 130, 2, 96, jnp.float32), (64, 80, 33, 8, 16, jnp.bfloat16), (2, 136, 19, 1, 136, jnp.float32)]


@pytest.mark.parametrize("m,k,n,bits,group,dtype", LOWERED)
def test_kernels_lower_to_triton_for_cuda(m, k, n, bits, group, dtype):
  x = jax.ShapeDtypeStruct((m, k), dtype)
  packed = jax.ShapeDtypeStruct((n, k * bits // 8), jnp.uint8)
  cent = jax.ShapeDtypeStruct((n, k // group, 2 ** bits), jnp.float32)
  assert _lowers_to_triton(lambda x, p, c: pk.lut_matmul(x, p, c, bits), x, packed, cent)
  e = 8
  grouped = (jax.ShapeDtypeStruct((e, *packed.shape), jnp.uint8), jax.ShapeDtypeStruct((e, *cent.shape), jnp.float32),
             jax.ShapeDtypeStruct((e,), jnp.int32))
  assert _lowers_to_triton(lambda x, p, c, gs: pk.grouped_lut_matmul(x, p, c, bits, gs), x, *grouped)
