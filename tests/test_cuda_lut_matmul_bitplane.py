"""The CUDA codebook matmul on binary tensor cores (cuda_kernels/lut_matmul_bitplane.*): its
arithmetic (bit-planes, the Moebius transform of the codebooks, the kernel's order of k) simulated
in numpy against the int8 reference everywhere, and the kernel itself against
cqjax.lut_matmul.lut_matmul_int8_reference on a GPU where the library is built."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_int8_numerics, assert_single_int8_product, random_codebook_weight
from cqjax.act_quant import ActQuantConfig, fake_quant, quant_codes
from cqjax.codebook import CodebookWeight, dequantize
from cqjax.errors import CqjaxError
from cqjax.lut_matmul import (grouped_lut_matmul_int8_reference, grouped_lut_matmul_reference, int8_round,
                              lut_matmul_int8_reference, lut_matmul_reference)
from cuda_kernels import lut_matmul_bitplane as kb

needs_gpu = pytest.mark.skipif(not kb.available(),
                               reason="needs a CUDA GPU and the built library (python -m cuda_kernels.build)")


def test_x_planes_hold_each_input_bit_where_the_kernel_reads_it():
  rng = np.random.default_rng(0)
  xq = rng.integers(-128, 128, (3, 512)).astype(np.int8)
  planes = np.asarray(kb.x_planes(jnp.asarray(xq)))
  assert planes.shape == (3, 2, 8, 8) and planes.dtype == np.uint32
  u = xq.astype(np.uint8)
  for r in range(3):
    for k in range(512):
      chunk, w, j, i = k // 256, k % 256 // 32, k % 32 // 8, k % 8
      for p in range(8):
        at = 2 * (w % 4) + w // 4  # words t and t + 4 side by side
        assert (planes[r, chunk, p, at] >> (4 * i + j)) & 1 == (u[r, k] >> p) & 1


def _unplane(planes):
  """x_planes' layout back to the bytes it holds: uint32 [t, chunks, 8, 8] -> uint8 [t, 256 chunks]."""
  t, chunks = planes.shape[:2]
  k = np.arange(256)
  at = np.argsort(kb.WORD_ORDER)[k // 32]  # where word k // 32 is stored
  bits = planes[:, :, :, at] >> (4 * (k % 8) + k % 32 // 8) & 1                         # [t, chunk, plane, k]
  return (bits << np.arange(8)[:, None]).sum(2).reshape(t, chunks * 256).astype(np.uint8)


def test_unplane_inverts_x_planes():
  xq = np.random.default_rng(8).integers(-128, 128, (2, 512)).astype(np.int8)
  np.testing.assert_array_equal(_unplane(np.asarray(kb.x_planes(jnp.asarray(xq)))), xq.view(np.uint8))


# The affine numerics' activation quantizers: the default (4 bits, asymmetric min-max), the widest
# asymmetric, and symmetric ones (two's complement codes, no plane of ones).
ACTS = [ActQuantConfig(), ActQuantConfig(bits=3), ActQuantConfig(bits=7, clip_ratio=0.9),
        ActQuantConfig(symmetric=True), ActQuantConfig(bits=8, symmetric=True)]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{'sym' if a.symmetric else 'asym'}{a.bits}")
def test_affine_planes_hold_the_codes_and_give_back_the_fake_quantized_x(act):
  """affine_planes: the bytes are the codes (asymmetric: q with a plane of ones above it;
  symmetric: q's two's complement), and sum_j coef[j] plane_j is fake_quant's x in float32."""
  x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 512)) * [[1.0], [30.0], [1e-3]], jnp.float32)
  planes, coef = kb.affine_planes(x, act)
  assert planes.shape == (3, 2, 8, 8) and coef.shape == (3, 8) and coef.dtype == jnp.float32
  codes = _unplane(np.asarray(planes))
  q = np.asarray(quant_codes(x, act)[0][:, 0]).astype(np.int64)
  b = act.bits
  want = q & (2 ** b - 1) if act.symmetric else q | 2 ** b
  np.testing.assert_array_equal(codes, want)
  values = (codes[..., None] >> np.arange(8) & 1) @ np.asarray(coef, np.float64)[:, :, None]
  fq = np.asarray(fake_quant(x, act), np.float64)
  assert (np.abs(values[..., 0] - fq) <= 1e-6 * np.abs(fq).max(-1, keepdims=True)).all()  # float32 rounding of fq


def _transpose_nibbles(u):
  """The kernel's in-place transpose of a 16-byte group (four uint32 words of 8 nibbles) into
  four bit-planes, in numpy: four delta swaps."""
  x, y, z, w = (u[..., i].astype(np.uint64) for i in range(4))
  m = np.uint64(0xFFFFFFFF)
  d = ((x >> 1) ^ y) & 0x55555555; x = (x ^ (d << 1)) & m; y ^= d
  d = ((z >> 1) ^ w) & 0x55555555; z = (z ^ (d << 1)) & m; w ^= d
  d = ((x >> 2) ^ z) & 0x33333333; x = (x ^ (d << 2)) & m; z ^= d
  d = ((y >> 2) ^ w) & 0x33333333; y = (y ^ (d << 2)) & m; w ^= d
  return np.stack([x, y, z, w], -1).astype(np.uint32)


def _popcount(v):
  return np.vectorize(lambda a: bin(int(a)).count("1"))(v)


_PLANE_WEIGHTS = np.array([1, 2, 4, 8, 16, 32, 64, -128])  # x's two's-complement bit-planes


def _bit_plane_problem(seed, n, k, act=None):
  """Two rows of x against an n x k codebook weight, in the kernel's pieces: the product `want`
  [2, n], the code planes by its transpose [n, k/32, plane], x's planes [row, chunk, plane, word],
  their weights [2, 8] and the Moebius transform alpha [n, 16] of each codebook. int8 numerics
  (act None): x rounded to int8 (x_planes), integer alpha of the int8-rounded codebooks, exact
  int64 dots; affine: x's codes under act (affine_planes) weighted by their coefficients, float64
  alpha of the codebooks as they are, and want = fake_quant's x times the weight in float64."""
  rng = np.random.default_rng(seed)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(2, k)), jnp.float32)
  if act is None:
    xq = np.asarray(int8_round(x, -1)[0], np.int8)
    cb = np.asarray(int8_round(jnp.asarray(w.centroids, jnp.float32), -1)[0])[:, 0].astype(np.int64)  # [n, 16]
    xv, xp, weights = xq.astype(np.int64), kb.x_planes(jnp.asarray(xq)), np.stack([_PLANE_WEIGHTS] * 2)
  else:
    cb = np.asarray(w.centroids, np.float64)[:, 0]
    xp, coef = kb.affine_planes(x, act)
    xv, weights = np.asarray(fake_quant(x, act), np.float64), np.asarray(coef, np.float64)
  want = xv @ np.stack([cb[c][np.asarray(codes)] for c, codes in enumerate(_codes(w, n, k))]).T   # [2, n]
  groups = np.asarray(w.packed).view("<u4").reshape(n, k // 32, 4)                          # 16-byte groups
  code_planes = _transpose_nibbles(groups)
  xp = np.asarray(xp).reshape(2, k // 256, 8, 8)[..., np.argsort(kb.WORD_ORDER)]  # words back in their order of k
  alpha = cb.copy()
  for bit in (1, 2, 4, 8):  # Moebius transform over the subsets of each entry's bits
    alpha[:, [s for s in range(16) if s & bit]] -= alpha[:, [s ^ bit for s in range(16) if s & bit]]
  return want, code_planes, xp, weights, alpha


def _assert_products(got, want, affine):
  """int8: exact; affine: want up to float64 rounding and fake_quant's float32 rounding of x."""
  if affine:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  else:
    np.testing.assert_array_equal(got, want)


_NUMERICS = pytest.mark.parametrize("act", [None, ActQuantConfig(), ActQuantConfig(bits=3, symmetric=True)],
                                    ids=["int8", "affine", "affine_sym3"])


@_NUMERICS
def test_bit_plane_arithmetic_gives_the_products(act):
  """What the kernel computes, step for step in numpy: code planes by its transpose, x's planes,
  the 16 subset masks, counts of mask AND plane (the binary mma), the Moebius transform of each
  codebook and the weighted sum, equal to the exact int8 dots (or the affine product)."""
  n, k = 5, 512
  want, code_planes, xp, weights, alpha = _bit_plane_problem(1, n, k, act)
  got = np.zeros((2, n), want.dtype)
  for s in range(16):
    mask = np.full(code_planes.shape[:2], 0xFFFFFFFF, np.uint32)
    for b in range(4):
      if s >> b & 1:
        mask &= code_planes[..., b]
    mask = mask.reshape(n, k // 256, 8)                                                     # [n, chunk, w]
    for j in range(8):
      counts = _popcount(mask[None] & xp[:, None, :, j, :]).sum(axis=(2, 3))                # [r, n]
      got += alpha[None, :, s] * weights[:, j, None] * counts
  _assert_products(got, want, act is not None)


def _mma_b1(a, b):
  """mma.sync m16n8k256 .b1 AND+POPC as PTX lays out its fragments, for a warp: a[lane] = (a0..a3),
  b[lane] = (b0, b1) uint32 -> d[lane] = (d0..d3). Lane (g, t): a0 / a1 row g / g + 8 and a2 / a3
  the same rows 128 inputs on (word t or t + 4 of a 256-bit row), b0 / b1 column g at words t and
  t + 4; d0 / d1 row g, columns 2t / 2t + 1, d2 / d3 row g + 8."""
  rows, cols = np.zeros((16, 8), np.uint32), np.zeros((8, 8), np.uint32)
  for lane in range(32):
    g, t = lane >> 2, lane & 3
    rows[g, t], rows[g + 8, t], rows[g, t + 4], rows[g + 8, t + 4] = a[lane]
    cols[g, t], cols[g, t + 4] = b[lane]
  d = _popcount(rows[:, None, :] & cols[None, :, :]).sum(-1)                                 # [16, 8]
  return [(d[l >> 2, 2 * (l & 3)], d[l >> 2, 2 * (l & 3) + 1], d[(l >> 2) + 8, 2 * (l & 3)],
           d[(l >> 2) + 8, 2 * (l & 3) + 1]) for l in range(32)]


@_NUMERICS
def test_both_lane_mappings_give_the_products(act):
  """The kernel's two mappings of a warp onto the binary mma, lane by lane in numpy (_mma_b1):
  one row of x (subsets in A, x's planes in B: SubsetLane.multiply / dot) and rows of x in A two
  at a time with the subset masks in B (masks, multiply_rows, dot_rows). The compiled tests run
  both on a GPU (slots of one row and of several), so they check this model of the fragments too."""
  n, k = 3, 512
  want, planes, xp, weights, alpha = _bit_plane_problem(3, n, k, act)
  planes = planes.astype(np.int64)
  ones = 0xFFFFFFFF

  def masks(lane, lo, hi):  # subset g over codes 32t.. / 128 + 32t.., then subset g + 8
    g = lane >> 2
    m = [ones, ones]
    for bit in range(3):
      if g >> bit & 1:
        m = [m[0] & lo[bit], m[1] & hi[bit]]
    return m[0], m[1], m[0] & lo[3], m[1] & hi[3]

  one_row, rows_in_a = np.zeros((2, n), want.dtype), np.zeros((2, n), want.dtype)
  for col in range(n):
    acc1 = [np.zeros(4, np.int64) for _ in range(32)]                                        # row 0 only
    acc_e = [np.zeros(4, np.int64) for _ in range(32)]
    acc_f = [np.zeros(4, np.int64) for _ in range(32)]
    for cc in range(k // 256):
      m = [masks(l, planes[col, cc * 8 + (l & 3)], planes[col, cc * 8 + (l & 3) + 4]) for l in range(32)]
      x0 = [(xp[0, cc, l >> 2, l & 3], xp[0, cc, l >> 2, (l & 3) + 4]) for l in range(32)]
      x1 = [(xp[1, cc, l >> 2, l & 3], xp[1, cc, l >> 2, (l & 3) + 4]) for l in range(32)]
      d = _mma_b1([(ml[0], ml[2], ml[1], ml[3]) for ml in m], x0)
      e = _mma_b1([(a[0], b[0], a[1], b[1]) for a, b in zip(x0, x1)], [(ml[0], ml[1]) for ml in m])
      f = _mma_b1([(a[0], b[0], a[1], b[1]) for a, b in zip(x0, x1)], [(ml[2], ml[3]) for ml in m])
      for l in range(32):
        acc1[l] += d[l]; acc_e[l] += e[l]; acc_f[l] += f[l]
    for l in range(32):
      g, t = l >> 2, l & 3
      w0, w1 = weights[0, 2 * t], weights[0, 2 * t + 1]
      one_row[0, col] += alpha[col, g] * (w0 * acc1[l][0] + w1 * acc1[l][1]) + \
          alpha[col, g + 8] * (w0 * acc1[l][2] + w1 * acc1[l][3])
      a4 = alpha[col, [2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9]]
      for h in (0, 1):
        rows_in_a[h, col] += weights[h, g] * (a4[0] * acc_e[l][2 * h] + a4[1] * acc_e[l][2 * h + 1] +
                                              a4[2] * acc_f[l][2 * h] + a4[3] * acc_f[l][2 * h + 1])
  _assert_products(one_row[0], want[0], act is not None)
  _assert_products(rows_in_a, want, act is not None)


@pytest.mark.parametrize("act", [ActQuantConfig(), ActQuantConfig(bits=3), ActQuantConfig(bits=4, symmetric=True)],
                         ids=["asym4", "asym3", "sym4"])
def test_two_rows_of_four_planes_in_b_give_the_products(act):
  """The kernel's slots of two rows under the affine numerics of at most 4 bits (`pairs_rows`),
  lane by lane in numpy: subsets in A as for one row, B's columns g planes g & 3 of row g >> 2, a
  lane's D columns 2t and 2t + 1 in row t >> 1, summed over the lanes of that row; the plane of ones
  (4-bit codes' offset, plane 4) counted by popcount of each lane's masks, weighed by plane 4's
  coefficient (zero below 4 bits, whose plane of ones is among planes 0-3, and for symmetric codes)."""
  assert kb.pairs_rows(act) and not kb.pairs_rows(ActQuantConfig(bits=5))
  n, k = 3, 512
  want, planes, xp, weights, alpha = _bit_plane_problem(4, n, k, act)
  planes, ones = planes.astype(np.int64), 0xFFFFFFFF
  assert not xp[..., 5:, :].any() and not weights[:, 5:].any()  # what lets the pair drop planes 5-7
  got = np.zeros((2, n), want.dtype)
  for col in range(n):
    acc = [np.zeros(4, np.int64) for _ in range(32)]
    count = np.zeros((32, 2), np.int64)  # each lane's count of subsets g and g + 8
    for cc in range(k // 256):
      m = []
      for l in range(32):
        lo, hi, pair = planes[col, cc * 8 + (l & 3)], planes[col, cc * 8 + (l & 3) + 4], [ones, ones]
        for bit in range(3):
          if (l >> 2) >> bit & 1:
            pair = [pair[0] & lo[bit], pair[1] & hi[bit]]
        m.append((pair[0], pair[1], pair[0] & lo[3], pair[1] & hi[3]))
      b = [(xp[l >> 4, cc, (l >> 2) & 3, l & 3], xp[l >> 4, cc, (l >> 2) & 3, (l & 3) + 4]) for l in range(32)]
      d = _mma_b1([(ml[0], ml[2], ml[1], ml[3]) for ml in m], b)
      for l in range(32):
        acc[l] += d[l]
        count[l] += _popcount(np.asarray(m[l][:2], np.uint32)).sum(), _popcount(np.asarray(m[l][2:], np.uint32)).sum()
    total = sum(alpha[col, l >> 2] * count[l, 0] + alpha[col, (l >> 2) + 8] * count[l, 1] for l in range(32))
    for l in range(32):
      g, t = l >> 2, l & 3
      c0, c1 = weights[t >> 1, 2 * (t & 1)], weights[t >> 1, 2 * (t & 1) + 1]
      got[t >> 1, col] += (alpha[col, g] * (c0 * acc[l][0] + c1 * acc[l][1])
                           + alpha[col, g + 8] * (c0 * acc[l][2] + c1 * acc[l][3]))
    got[:, col] += weights[:, 4] * total
  _assert_products(got, want, True)


def test_bitplane_layout_is_the_kernels_transpose_and_moebius_transform():
  """bitplane_layout does once what the kernel otherwise does a call: the codes' transpose into
  planes, and codebooks whose int16 alpha give back each int8-rounded entry as the sum over the
  subsets of its bits (here with the largest |alpha|, 16 * 127, in one row) and whose word 8 is
  the codebook's scale."""
  rng = np.random.default_rng(4)
  w = random_codebook_weight(rng, (2,), 5, 512, 4, 512)
  cent = np.array(w.centroids, np.float32)
  cent[1, 2, 0] = [(-1.0) ** bin(c).count("1") for c in range(16)]
  planes, codebooks = kb.bitplane_layout(w.packed, jnp.asarray(cent))
  assert planes.shape == w.packed.shape and planes.dtype == np.uint8 and codebooks.shape == (2, 5, 1, 16)
  want = _transpose_nibbles(np.asarray(w.packed).view("<u4").reshape(2, 5, 16, 4))
  np.testing.assert_array_equal(np.asarray(planes).view("<u4").reshape(2, 5, 16, 4), want)
  words = np.asarray(codebooks)[:, :, 0]
  alpha = words[..., :8].view("<i2").astype(np.int64)                                       # [2, 5, 16]
  cq, scale = (np.asarray(v) for v in int8_round(jnp.asarray(cent[:, :, 0]), -1))
  rebuilt = np.stack([alpha[..., [s for s in range(16) if s & c == s]].sum(-1) for c in range(16)], -1)
  np.testing.assert_array_equal(rebuilt, cq)
  assert np.abs(alpha).max() == 16 * 127
  np.testing.assert_array_equal(words[..., 8].view(np.float32), scale[..., 0])
  assert not words[..., 9:].any()


def test_affine_bitplane_layout_is_the_float_moebius_transform():
  """affine=True: the same code planes, and uint32 codebooks holding the float32 alpha whose sums
  over the subsets of each entry's bits give back the centroids as they are (float32 rounding)."""
  w = random_codebook_weight(np.random.default_rng(10), (2,), 5, 512, 4, 512)
  planes, codebooks = kb.bitplane_layout(w.packed, w.centroids, affine=True)
  assert codebooks.shape == (2, 5, 1, 16) and codebooks.dtype == jnp.uint32
  np.testing.assert_array_equal(planes, kb.bitplane_layout(w.packed, w.centroids)[0])
  alpha = np.asarray(codebooks).view(np.float32)[:, :, 0].astype(np.float64)
  rebuilt = np.stack([alpha[..., [s for s in range(16) if s & c == s]].sum(-1) for c in range(16)], -1)
  cent = np.asarray(w.centroids, np.float64)[:, :, 0]
  np.testing.assert_allclose(rebuilt, cent, rtol=0, atol=1e-5 * np.abs(cent).max())


def test_refuses_what_the_affine_numerics_cannot_take():
  """Before anything runs (any host): act of token groups or too many bits, and codebooks laid out
  for the other numerics, stop with the option named."""
  w = random_codebook_weight(np.random.default_rng(11), (), 16, 256, 4, 256)
  x = jnp.ones((1, 256), jnp.bfloat16)
  with pytest.raises(CqjaxError, match="act must quantize whole tokens .* got group_size 128, bits 4"):
    kb.lut_matmul_bitplane(x, w.packed, w.centroids, 4, act=ActQuantConfig(group_size=128))
  with pytest.raises(CqjaxError, match="at most 7 bits .* bits 8"):
    kb.lut_matmul_bitplane(x, w.packed, w.centroids, 4, act=ActQuantConfig(bits=8))
  with pytest.raises(CqjaxError, match="laid out by bitplane_layout for the int8 numerics; lay them out with affine=True"):
    kb.lut_matmul_bitplane(x, *kb.bitplane_layout(w.packed, w.centroids), 4, act=ActQuantConfig())
  with pytest.raises(CqjaxError, match="for the affine numerics; lay them out with affine=False"):
    kb.lut_matmul_bitplane(x, *kb.bitplane_layout(w.packed, w.centroids, affine=True), 4)


def _codes(w, n, k):
  """The codes of a CodebookWeight's rows, low nibble first."""
  b = np.asarray(w.packed).reshape(n, k // 2)
  return [np.stack([b[c] & 15, b[c] >> 4], -1).reshape(k) for c in range(n)]


def test_supports_whole_chunks_of_four_bit_codes():
  assert kb.supports(4, 4096, 1) and kb.supports(4, 256, 1)
  assert not kb.supports(4, 352, 1) and not kb.supports(2, 4096, 1) and not kb.supports(4, 4096, 2)
  assert [kb.splits(k) for k in (256, 4096, 4352, 14336)] == [1, 1, 2, 4]


def test_refuses_without_the_library():
  if kb.available():
    pytest.skip("the library is built here")
  w = random_codebook_weight(np.random.default_rng(2), (), 16, 256, 4, 256)
  with pytest.raises(CqjaxError, match="CUDA kernel library is not available"):
    kb.lut_matmul_bitplane(jnp.ones((1, 256), jnp.bfloat16), w.packed, w.centroids, 4)


def test_refuses_columns_a_warp_out_of_range():
  """per_warp past what the kernel walks stops with its name before anything runs (any host)."""
  w = random_codebook_weight(np.random.default_rng(3), (2,), 16, 256, 4, 256)
  x = jnp.ones((1, 256), jnp.bfloat16)
  with pytest.raises(CqjaxError, match="lut_matmul_bitplane: per_warp is the output columns a warp walks, 1 to 64"):
    kb.lut_matmul_bitplane(x, w.packed[0], w.centroids[0], 4, per_warp=65)
  with pytest.raises(CqjaxError, match="grouped_lut_matmul_bitplane: per_warp .* got -1"):
    kb.grouped_lut_matmul_bitplane(x, w.packed, w.centroids, 4, jnp.asarray([1, 0], jnp.int32), per_warp=-1)


def _on_cpu(reference, *args):
  """The reference computed by XLA:CPU. On the H100 (jax 0.11.2), lut_matmul_int8_reference run
  by XLA:GPU put a few columns 0.4-2 % off the exact int8 products (y 43.9497 where the exact dot
  gives 43.7535, as this kernel and XLA:CPU did; BENCHMARKS.md session 50); which of its steps
  differs was not found."""
  cpu = jax.devices("cpu")[0]
  return reference(*(jax.device_put(a, cpu) if isinstance(a, jax.Array) else a for a in args))


# (k, n): one chunk; three (one K range, short); 17 (a second K range of one chunk); n off the
# block's columns and below them.
SHAPES = [(256, 64), (768, 37), (4352, 130), (4096, 5)]


def _laid_out(run, affine=False):
  """run(x, packed, centroids, bits, ...) given the weight as bitplane_layout lays it out."""
  return lambda x, packed, centroids, bits, *rest: run(x, *kb.bitplane_layout(packed, centroids, affine), bits, *rest)


@needs_gpu
@pytest.mark.parametrize("m", [1, 2, 3, 17])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("laid_out", [False, True])
def test_matches_reference(m, k, n, dtype, laid_out):
  run = _laid_out(kb.lut_matmul_bitplane) if laid_out else kb.lut_matmul_bitplane
  assert_single_int8_product(run, functools.partial(_on_cpu, lut_matmul_int8_reference), m, k, n, dtype)


@needs_gpu
@pytest.mark.parametrize("per_warp", [1, 2, 3, 5])
@pytest.mark.parametrize("laid_out", [False, True])
def test_columns_a_warp_match_reference(per_warp, laid_out):
  """Any output columns a warp, odd counts included: n = 130 is no multiple of 4 warps x
  per_warp, so the last block's warps run out of columns at different steps."""
  run = functools.partial(kb.lut_matmul_bitplane, per_warp=per_warp)
  assert_single_int8_product(_laid_out(run) if laid_out else run, functools.partial(_on_cpu, lut_matmul_int8_reference),
                             2, 768, 130, jnp.bfloat16)


@needs_gpu
def test_bf16_codebooks_rounded_in_the_kernel():
  """bf16 codebooks reach the kernel as they are; an all-zero codebook takes scale 1 (zero
  outputs); halves between int8 steps round to even as in jnp."""
  rng = np.random.default_rng(7)
  w = random_codebook_weight(rng, (), 40, 512, 4, 512)
  cent = np.array(w.centroids, np.float32)
  cent[3] = 0.0
  cent[5, 0] = [127.0, 0.5, 1.5, -2.5, -0.5] + [0.25] * 11  # scale 1: exact halves
  w = dataclasses.replace(w, centroids=jnp.asarray(cent, jnp.bfloat16))
  x = jnp.asarray(rng.normal(size=(1, 512)), jnp.float32)
  got = kb.lut_matmul_bitplane(x, w.packed, w.centroids, 4)
  assert_int8_numerics(got, _on_cpu(lut_matmul_int8_reference, x, w.packed, w.centroids, 4), jnp.float32)
  assert not np.asarray(got[:, 3]).any()


@needs_gpu
@pytest.mark.parametrize("sizes", [[0, 3, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [20, 0, 5, 9, 1]])
@pytest.mark.parametrize("laid_out", [False, True])
def test_grouped_matches_reference(sizes, laid_out):
  rng = np.random.default_rng(sum(sizes) + len(sizes))
  w = random_codebook_weight(rng, (5,), 50, 768, 4, 768)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, 768)), jnp.bfloat16)  # 2 rows past the last group
  gs = jnp.asarray(sizes, jnp.int32)
  run = _laid_out(kb.grouped_lut_matmul_bitplane) if laid_out else kb.grouped_lut_matmul_bitplane
  got = run(x, w.packed, w.centroids, 4, gs)
  assert_int8_numerics(got, _on_cpu(grouped_lut_matmul_int8_reference, x, w.packed, w.centroids, 4, gs), jnp.bfloat16)
  assert not np.asarray(got[sum(sizes):], np.float32).any()


@needs_gpu
@pytest.mark.parametrize("sizes", [[2, 0, 1], [0, 0, 0]])
@pytest.mark.parametrize("laid_out", [False, True])
def test_grouped_with_split_k_matches_reference(sizes, laid_out):
  """d_in past 4096: the K ranges' dots summed and scaled by the wrapper, rows past the last group
  zero (the kernel leaves them unwritten), here with x's padding rows all inf."""
  rng = np.random.default_rng(5 + sum(sizes))
  w = random_codebook_weight(rng, (3,), 24, 4352, 4, 4352)
  x = np.asarray(rng.normal(size=(sum(sizes) + 2, 4352)), np.float32)
  x[sum(sizes):] = np.inf
  x, gs = jnp.asarray(x), jnp.asarray(sizes, jnp.int32)
  run = _laid_out(kb.grouped_lut_matmul_bitplane) if laid_out else kb.grouped_lut_matmul_bitplane
  got = run(x, w.packed, w.centroids, 4, gs)
  if sum(sizes):
    want = _on_cpu(grouped_lut_matmul_int8_reference, x[:sum(sizes)], w.packed, w.centroids, 4, gs)
    assert_int8_numerics(got[:sum(sizes)], want, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got[sum(sizes):]), 0.0)


def _assert_affine(got, x, w, act, group_sizes=None):
  """got against the affine product in float64 of what the wrapper sends the kernel (affine_planes'
  codes and coefficients decoded back to x, computed where the kernel's are) and the dequantized
  weight: within float32 rounding of |x| . |w| (and bf16's of the result). Grouped: row i takes
  its group's expert; rows past the last group are zero."""
  planes, coef = kb.affine_planes(x, act)
  xd = (_unplane(np.asarray(planes))[..., None] >> np.arange(8) & 1) @ np.asarray(coef, np.float64)[:, :, None]
  xd = xd[..., 0]                                                                            # [t, k]
  dense = np.asarray(dequantize(w), np.float64)                                             # [(e,) k, n]
  if group_sizes is None:
    want, mag = xd @ dense, np.abs(xd) @ np.abs(dense)
  else:
    expert = np.repeat(np.arange(len(group_sizes)), group_sizes)
    want, mag = np.zeros((x.shape[0], dense.shape[-1])), np.zeros((x.shape[0], dense.shape[-1]))
    for i, e in enumerate(expert):
      want[i], mag[i] = xd[i] @ dense[e], np.abs(xd[i]) @ np.abs(dense[e])
  got = np.asarray(got, np.float64)
  tol = 1e-5 * mag + (2.0 ** -8 * np.abs(want) if x.dtype == jnp.bfloat16 else 0.0)
  bad = np.abs(got - want) > tol
  assert not bad.any(), f"{bad.sum()} of {bad.size} off; worst {np.abs(got - want).max()} (tolerance {tol.max()})"


@needs_gpu
@pytest.mark.parametrize("m", [1, 2, 17])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("laid_out", [False, True])
def test_affine_matches_reference(m, k, n, laid_out):
  rng = np.random.default_rng(m + k + n)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
  act = ActQuantConfig()
  run = functools.partial(kb.lut_matmul_bitplane, act=act)
  got = (_laid_out(run, affine=True) if laid_out else run)(x, w.packed, w.centroids, 4)
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  _assert_affine(got, x, w, act)


@needs_gpu
@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: f"{'sym' if a.symmetric else 'asym'}{a.bits}")
def test_affine_quantizers_and_bf16_codebooks_match_reference(act, m):
  """Every quantizer the planes can hold, float32 x and bf16 codebooks (taken as they are); two
  rows (paired in B up to 4 bits, `pairs_rows`) and three (in A)."""
  rng = np.random.default_rng(act.bits + m)
  w = random_codebook_weight(rng, (), 37, 768, 4, 768)
  w = dataclasses.replace(w, centroids=w.centroids.astype(jnp.bfloat16))
  x = jnp.asarray(rng.normal(size=(m, 768)), jnp.float32)
  _assert_affine(kb.lut_matmul_bitplane(x, w.packed, w.centroids, 4, act=act), x, w, act)


@needs_gpu
@pytest.mark.parametrize("sizes", [[0, 3, 0, 1, 0], [1, 1, 1, 1, 1], [2, 0, 2, 1, 2], [20, 0, 5, 9, 1], [0, 0, 0, 0, 0]])
@pytest.mark.parametrize("k", [768, 4352])
@pytest.mark.parametrize("laid_out", [False, True])
def test_affine_grouped_matches_reference(sizes, k, laid_out):
  """Empty experts, one row a slot, two (paired in B) and more, one K range and two (parts added by
  the wrapper); two rows past the last group, zero."""
  rng = np.random.default_rng(sum(sizes) + k)
  w = random_codebook_weight(rng, (5,), 24, k, 4, k)
  x = jnp.asarray(rng.normal(size=(sum(sizes) + 2, k)), jnp.bfloat16)
  act, gs = ActQuantConfig(), jnp.asarray(sizes, jnp.int32)
  run = functools.partial(kb.grouped_lut_matmul_bitplane, act=act)
  got = (_laid_out(run, affine=True) if laid_out else run)(x, w.packed, w.centroids, 4, gs)
  _assert_affine(got, x, w, act, np.asarray(sizes))


def test_serves_one_row_products_of_large_weights():
  """The dispatcher's rule for fusing Q_a into the affine numerics: where they measured ahead."""
  act = ActQuantConfig()
  assert kb.serves(act, 1, 4096, 14336) and kb.serves(act, 1, 14336, 4096)   # Mixtral's experts, one row
  assert kb.serves(act, 2, 4096, 14336, experts=8)                           # its batch 1 (top-2)
  assert not kb.serves(act, 2, 4096, 14336)                                  # a single weight's 2 rows
  assert kb.serves(act, 4, 14336, 4096, experts=8)                           # batch 2: half the experts
  assert kb.serves(act, 6, 4096, 14336, experts=8)                           # batch 3: gate/up (one K range) ...
  assert not kb.serves(act, 6, 14336, 4096, experts=8)                       # ... not down (split K: slower)
  assert kb.serves(act, 8, 4096, 14336, experts=8)                           # batch 4: gate/up, rows paired ...
  assert not kb.serves(act, 9, 4096, 14336, experts=8)                       # ... up to all the experts
  wide = ActQuantConfig(bits=8, symmetric=True)                               # rows not paired: 3/4 exactly
  assert kb.serves(wide, 6, 4096, 14336, experts=8) and not kb.serves(wide, 7, 4096, 14336, experts=8)
  assert not kb.serves(act, 8, 2048, 768, experts=128)                       # Qwen3's experts
  assert not kb.serves(act, 1, 4096, 4096) and not kb.serves(act, 1, 4096, 1024)  # attention: slower fused
  assert kb.serves(ActQuantConfig(bits=8, symmetric=True), 1, 4096, 14336)
  for other in (ActQuantConfig(group_size=128), ActQuantConfig(bits=8)):    # not in x's 8 planes
    assert not kb.takes_act(other) and not kb.serves(other, 1, 4096, 14336)


def test_pairing_kernel_only_where_a_slot_may_hold_two_rows():
  """The kernel that pairs two-row slots runs its one-row slots slower, so the wrapper launches it
  only where rows may pair: a single weight's 2 rows, grouped products past 2 rows (Mixtral's
  batch 1, top-2, has one row an expert), and only for codes of at most 4 bits."""
  act = ActQuantConfig()
  assert [kb._pairs(act, t, grouped=False) for t in (1, 2, 3)] == [False, True, False]
  assert [kb._pairs(act, t, grouped=True) for t in (1, 2, 3, 8)] == [False, False, True, True]
  assert not kb._pairs(None, 8, grouped=True)                                   # int8 numerics
  assert not kb._pairs(ActQuantConfig(bits=5), 8, grouped=True)                 # planes 0-4 of x's codes
  assert kb._pairs(ActQuantConfig(bits=3), 8, grouped=True)


def _random_weight(rng, lead, n, k):
  """A 4-bit CodebookWeight of random bytes (cheaper than random_codebook_weight's codes at these sizes)."""
  packed = jnp.asarray(rng.integers(0, 256, (*lead, n, k // 2), dtype=np.uint8))
  return CodebookWeight(packed, jnp.asarray(rng.normal(size=(*lead, n, 1, 16)), jnp.float32), 4, k)


@needs_gpu
@pytest.mark.parametrize("mode", ["auto", "unfused"])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("laid_out", [False, True])
def test_dispatcher_fuses_one_row_products_of_quantized_inputs(mode, grouped, laid_out):
  """cqjax.lut_matmul's products of Q_a(x) take the affine numerics at one row of a weight of more
  than 2^24 codes (auto; from its layout where cqjax.lay_out_bitplanes made one), and fake_quant
  then the default kernels with CQJAX_KERNELS=unfused."""
  from cqjax.lay_out_bitplanes import lay_out  # pylint: disable=g-import-not-at-top
  from cqjax.lut_matmul import grouped_lut_matmul, kernels_mode, lut_matmul  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(56)
  act, k, n = ActQuantConfig(), 4096, 4104
  w = _random_weight(rng, (4,) if grouped else (), n, k)
  w = lay_out(w) if laid_out else w
  gs = jnp.asarray([0, 1, 0, 0], jnp.int32)
  x = jnp.asarray(rng.normal(size=(1, k)), jnp.bfloat16)
  product = jax.jit((lambda x: grouped_lut_matmul(x, w, gs, act)) if grouped else (lambda x: lut_matmul(x, w, act)))
  with kernels_mode(mode):
    fused = "cqjax_cuda_lut_matmul_bitplane" in product.lower(x).as_text()
    got = product(x)
  assert fused == (mode == "auto")
  if fused:
    _assert_affine(got, x, w, act, np.asarray(gs) if grouped else None)
  else:
    want = (grouped_lut_matmul_reference if grouped else lut_matmul_reference)(
        fake_quant(x, act).astype(jnp.float32), w, *((gs,) if grouped else ()))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.02 * float(jnp.abs(want).max()))
