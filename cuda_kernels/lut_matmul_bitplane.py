"""Thin JAX wrapper of the CUDA codebook matmul on binary tensor cores (lut_matmul_bitplane.cu).

  lut_matmul_bitplane:          x [m, d_in] @ (packed uint8 [d_out, d_in/2], centroids [d_out, 1, 16])
                                -> [m, d_out]
  grouped_lut_matmul_bitplane:  x [t, d_in] rows sorted by expert, packed [e, d_out, d_in/2],
                                centroids [e, d_out, 1, 16], group_sizes int32 [e] -> [t, d_out]
                                (the `jax.lax.ragged_dot` contract; rows past the last group are zero)

The numerics are `cqjax.lut_matmul.lut_matmul_int8_reference`'s, as lut_matmul_int8's: x rows
rounded to int8 here (`int8_round`, in XLA, so that the products of one x share it) and split into
bit-planes (`x_planes`), each row's codebook rounded in the kernel, exact int32 dot products,
y = (sc * dot) * sx in float32, written in x's dtype by the kernel (d_in up to 4096), or with d_in
split into 4096-input ranges summed and scaled here. 4-bit codes, one codebook per row, d_in a
multiple of 256 (`supports`).

The kernel decodes by bit-planes (one binary mma a 256 codes of a row and row of x): for decode
rows, where the byte-permute decodes are bound by instruction issue. Each row of x costs one
more mma a chunk, and a slot of more than one row reloads x's planes for every column.

With `act` (an `ActQuantConfig` of whole-token groups) both take the affine numerics instead:
x is fake-quantized by `act` here, x_hat = q * scale + offset per row, and its integer codes q go
to the kernel as planes, each with its float32 coefficient (scale 2^j, the offset on a plane of
ones), against the centroids as they are (float32 Moebius transform, no rounding): y equals
fake_quant(x) (in float32, before its cast to x's dtype) times the dequantized weight, up to
float32 rounding. This is the W4A4 model's own product (the activation fake quantization fused).

Both functions also take a weight laid out once by `bitplane_layout` (codes already in
bit-planes, codebooks already rounded and transformed) in the (packed, centroids) places; the
kernel then skips that work for every column (H100: 17 µs a 4096x14336 product at one row
against 20.5 as stored, BENCHMARKS.md session 52).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig, quant_codes
from cqjax.errors import CqjaxError
from cqjax.lut_matmul import int8_round
from cuda_kernels import lut_matmul as cuda
from cuda_kernels.expert_slots import expert_slots
from cuda_kernels.lut_matmul_int8 import KERNEL_DTYPES, MAX_D_IN

_TARGET = "cqjax_cuda_lut_matmul_bitplane"
CHUNK = 256   # inputs an mma (kChunk)
K_RANGE = 16  # chunks a warp's K range (kChunks): d_in past CHUNK * K_RANGE is split
MAX_PER_WARP = 64  # output columns a warp may be asked to walk (the kernel refuses more)
_LAID_OUT = (jnp.int32, jnp.uint32)  # bitplane_layout's codebooks, by numerics: int8 and affine
MIN_CODES = 1 << 24  # weights of at most this many codes are never fused (`serves`)
WORD_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # x_planes' words of a plane, as stored: t and t + 4 side by side


@functools.cache
def available() -> bool:
  """Whether the CUDA library is built with this kernel and a CUDA GPU is the default backend
  (registers the target)."""
  return cuda.register_target(_TARGET, "CqjaxLutMatmulBitplaneCuda")


def supports(bits: int, d_in: int, groups: int) -> bool:
  """Whether the kernel takes this product: 4-bit codes, one codebook per row, d_in a multiple of
  256 up to MAX_D_IN (x of any float dtype: it is rounded to int8 first)."""
  return bits == 4 and groups == 1 and d_in % CHUNK == 0 and d_in <= MAX_D_IN


def takes_act(act: ActQuantConfig) -> bool:
  """Whether the affine numerics take this quantizer: whole-token groups, at most 7 bits (8
  symmetric), so that its codes and a plane of ones fill x's 8 planes."""
  return act.group_size in (-1, 0) and act.bits <= (8 if act.symmetric else 7)


def serves(act: ActQuantConfig, t: int, d_in: int, d_out: int, experts: int | None = None) -> bool:
  """Whether the dispatcher fuses a product of fake_quant(x, act) into this kernel (`Affine`)
  instead of fake-quantizing x for the default kernels: where it measured ahead on the H100, on
  weights of more than 2^24 codes: a single weight's t = 1, or a grouped product whose t rows fill
  at most all of its experts where d_in is one K range (`splits`) and act's rows pair up
  (`pairs_rows`: slots of two rows cost one row's mma), three quarters where they do not, half
  where d_in is split (slots of one row, mostly). Mixtral's experts: 35.3 against 41.9 µs over
  batch 1's expert pair (BENCHMARKS.md session 55); its layers decode 2.8-4.0 % faster fused at
  batch 1 (sessions 56-57), 3.9 % at batch 2 (session 58: 4 rows over 8 experts) and 1.2-1.5 % at
  batch 3 (session 59: gate/up's 6 rows), and with rows paired 3.5 % faster at batch 4 (session 61:
  8 rows, slots of one and two; 2.5 % slower unpaired, session 59); in scope full, the down
  projections (14336 inputs: 4 K ranges) 1.3-2.2 % fused at batches 1-2, yet 3 % slower at batch 3
  (session 59). Measured slower and left out: 4 rows a slot and more (1.2-2.1x, session 55); fused
  attention products (decode 3 % slower) and Qwen3's 2^20.6-code experts (5.6 % slower), session
  57."""
  filled = 2 if splits(d_in) > 1 else 4 if pairs_rows(act) else 3  # quarters of the experts the t rows may fill
  one_row = t == 1 if experts is None else 4 * t <= filled * experts
  return takes_act(act) and one_row and d_in * d_out > MIN_CODES


def x_planes(xq: jax.Array) -> jax.Array:
  """int8 (or uint8) values xq [t, k] (k a multiple of 256) -> uint32 [t, k/256, 8, 8]: per chunk of 256
  inputs, two's-complement bit-plane j's eight words, word w's bit 4 i + j' holding input
  32 w + 8 j' + i (the order the kernel's code planes come out in: a 4 x 4 bit transpose of each
  16-byte group of nibbles), stored in the order of WORD_ORDER: words t and t + 4 side by side,
  which one lane reads in one 8-byte load."""
  t, k = xq.shape
  u = xq.astype(jnp.uint8).astype(jnp.uint32).reshape(t, k // CHUNK, 2, 4, 4, 8)  # [t, chunk, a, b, j', i]: word 4 a + b
  u = jnp.swapaxes(u, 2, 3)[:, :, None]                                            # [t, chunk, 1, b, a, j', i]
  plane = jnp.arange(8, dtype=jnp.uint32)[:, None, None, None, None]
  shift = 4 * jnp.arange(8, dtype=jnp.uint32) + jnp.arange(4, dtype=jnp.uint32)[:, None]  # [j', i]
  # Each word a reduction over its own 32 contiguous inputs, already in the stored order (word
  # 4 a + b at 2 b + a: WORD_ORDER): XLA then fuses x's quantization into it.
  return (((u >> plane) & 1) << shift).sum(axis=(-2, -1), dtype=jnp.uint32).reshape(t, k // CHUNK, 8, 8)


def affine_planes(x: jax.Array, act: ActQuantConfig) -> tuple[jax.Array, jax.Array]:
  """x [t, k] -> its codes under act as planes (`x_planes`' layout: uint32 [t, k/256, 8, 8]) and
  each row's plane coefficients float32 [t, 8], so that sum_j coef[j] * plane_j = q * scale +
  offset, the fake-quantized x in float32: asymmetric b bits: planes 0 .. b-1 of q (weights scale
  2^j) and plane b all ones (weight offset); symmetric: q's two's complement in b bits (the top
  plane weighs -scale 2^(b-1))."""
  q, scale, offset = (v[:, 0] for v in quant_codes(x, act))        # [t, k], [t, 1], [t, 1]
  b, j = act.bits, jnp.arange(8)
  weight = jnp.where(j < b, jnp.exp2(j.astype(jnp.float32)), 0.0)
  if act.symmetric:
    codes = q.astype(jnp.int32) & (2 ** b - 1)
    coef = scale * jnp.where(j == b - 1, -weight, weight)
  else:
    codes = q.astype(jnp.int32) | 2 ** b
    coef = jnp.where(j == b, offset, scale * weight)
  return x_planes(codes.astype(jnp.uint8)), coef


def _nibbles_to_planes(words: jax.Array) -> jax.Array:
  """uint32 [..., 4] 16-byte groups of 32 nibble codes -> their four bit-planes (the kernel's
  nibbles_to_planes: a 4 x 4 bit transpose within each nibble, four delta swaps)."""
  x, y, z, w = (words[..., i] for i in range(4))
  d = ((x >> 1) ^ y) & 0x55555555; x, y = x ^ (d << 1), y ^ d
  d = ((z >> 1) ^ w) & 0x55555555; z, w = z ^ (d << 1), w ^ d
  d = ((x >> 2) ^ z) & 0x33333333; x, z = x ^ (d << 2), z ^ d
  d = ((y >> 2) ^ w) & 0x33333333; y, w = y ^ (d << 2), w ^ d
  return jnp.stack([x, y, z, w], -1)


def _moebius(entries: jax.Array) -> jax.Array:
  """[..., 16] codebooks -> their Moebius transform over the entries' bits (alpha[S]: entry S
  minus the subsets' alpha), bits 1, 2, 4, 8 in turn as the kernel's codebook_moebius."""
  alpha = entries.reshape(*entries.shape[:-1], 2, 2, 2, 2)  # entry 8 b3 + 4 b2 + 2 b1 + b0 -> (b3, b2, b1, b0)
  for axis in (-1, -2, -3, -4):  # subsets with the bit minus those without it
    lo, hi = jnp.split(alpha, 2, axis)
    alpha = jnp.concatenate([lo, hi - lo], axis)
  return alpha.reshape(entries.shape)


@functools.partial(jax.jit, static_argnames="affine")
def bitplane_layout(packed: jax.Array, centroids: jax.Array, affine: bool = False) -> tuple[jax.Array, jax.Array]:
  """A 4-bit codebook weight laid out once for the kernel, which then neither transposes codes nor
  rounds codebooks a call: packed uint8 [..., n, d_in/2] (d_in a multiple of 32), centroids
  [..., n, 1, 16] -> (planes uint8 [..., n, d_in/2]: each 16-byte group of codes as its four
  bit-planes; codebooks int32 [..., n, 1, 16]: each row's int8-rounded codebook (`int8_round`)
  Moebius-transformed over its code bits, alpha[S] as int16 in words 0-7 (|alpha| <= 16 * 127),
  the scale's float32 bits in word 8, zeros). Both take the kernel's (packed, centroids) places.
  affine: for the affine numerics (`act`), codebooks uint32 [..., n, 1, 16]: the float32 bits of
  the Moebius transform of the centroids as they are."""
  *lead, n, half = packed.shape
  words = jax.lax.bitcast_convert_type(packed.reshape(*lead, n, half // 16, 4, 4), jnp.uint32)
  planes = jax.lax.bitcast_convert_type(_nibbles_to_planes(words), jnp.uint8).reshape(packed.shape)
  if affine:
    alpha = _moebius(centroids.reshape(*lead, n, 16).astype(jnp.float32))
    return planes, jax.lax.bitcast_convert_type(alpha, jnp.uint32).reshape(*lead, n, 1, 16)
  cq, scale = int8_round(centroids.reshape(*lead, n, 16).astype(jnp.float32), -1)
  alpha = _moebius(cq)
  a16 = alpha.reshape(*lead, n, 8, 2).astype(jnp.uint32) & 0xFFFF
  pairs = a16[..., 0] | (a16[..., 1] << 16)
  codebooks = jnp.concatenate([pairs, jax.lax.bitcast_convert_type(scale, jnp.uint32),
                               jnp.zeros((*lead, n, 7), jnp.uint32)], -1)
  return planes, jax.lax.bitcast_convert_type(codebooks, jnp.int32).reshape(*lead, n, 1, 16)


def splits(d_in: int) -> int:
  """The kernel's K ranges: d_in in 4096-input ranges, each a block of the grid."""
  return -(-d_in // (CHUNK * K_RANGE))


def _ffi(xpl, xs, packed, centroids, slots, out_dtype, per_warp=0, pairs=False):
  """xpl uint32 [t, d_in/256, 8, 8] (`x_planes`), xs float32: x's scales [t] (int8 numerics) or
  plane coefficients [t, 8] (affine), packed [e, n, d_in/2], centroids [e, n, 1, 16], slots int32
  [3, s], per_warp: output columns a warp walks (0: the kernel's choice, which fills the GPU's
  register-resident blocks once), pairs: the kernel whose slots of two rows run as one row's
  (`_pairs`) -> (out, scales): out [t, n] in out_dtype (float32 or bf16) with one K range, else the
  K ranges' int32 dots [splits, t, n] and the codebook scales [t, n] (affine: float32 parts of y
  [splits, t, n], no scales)."""
  t, chunks = xpl.shape[:2]
  e, n = packed.shape[:2]
  centroids = centroids.reshape(e, n, 16)
  if centroids.dtype not in (*KERNEL_DTYPES, *_LAID_OUT):
    centroids = centroids.astype(jnp.float32)
  s, affine = splits(chunks * CHUNK), xs.ndim == 2
  results = (jax.ShapeDtypeStruct((t, n), out_dtype) if s == 1 else
             jax.ShapeDtypeStruct((s, t, n), jnp.float32 if affine else jnp.int32),
             jax.ShapeDtypeStruct((t, n) if s > 1 and not affine else (0,), jnp.float32))
  return jax.ffi.ffi_call(_TARGET, results, vmap_method="sequential")(xpl, xs, packed, centroids, slots,
                                                                     per_warp=np.int64(per_warp), pairs=pairs)


def pairs_rows(act: ActQuantConfig) -> bool:
  """Whether act's planes (`affine_planes`) let the kernel multiply a slot of two rows as it does
  one: codes of at most 4 bits, whose planes 0-3 of both rows fill the mma's 8 columns, the plane
  of ones (4-bit codes: plane 4) counted apart. Slots of more rows go through A two rows at a time,
  as they do for 5 bits and more."""
  return act.bits <= 4


def _pairs(act: ActQuantConfig | None, t: int, grouped: bool) -> bool:
  """Whether to launch the kernel that pairs slots of two rows (`pairs_rows`): its one-row slots run
  3-13 % slower than the other kernel's on the H100 (BENCHMARKS.md sessions 60-61), so only where a
  slot may hold two rows: a single weight's 2 rows, or a grouped product of more than 2 rows (batch
  1 of top-2 routing, Mixtral's, gives its 2 experts one row each)."""
  return act is not None and pairs_rows(act) and (t > 2 if grouped else t == 2)


def _call(x, packed, centroids, slots, per_warp, covered=None, act=None):
  """x [t, d_in] -> [t, n] in x's dtype; covered: for grouped products, the rows the slots cover
  (None: a single weight's, all), past which rows are zero (the kernel zeroes them itself with one
  K range); act: the affine numerics."""
  out_dtype = x.dtype if x.dtype in KERNEL_DTYPES else jnp.float32
  if act is None:
    xq, sx = int8_round(x.astype(jnp.float32), -1)
    xpl, xs = x_planes(xq.astype(jnp.int8)), sx[:, 0]
  else:
    xpl, xs = affine_planes(x, act)
  pairs = _pairs(act, x.shape[0], grouped=covered is not None)
  y, scales = _ffi(xpl, xs, packed, centroids, slots, out_dtype, per_warp, pairs)
  if y.ndim == 3:  # the K ranges' parts: affine y, else int32 dots to scale
    y = y.sum(0) if act is not None else (scales * y.sum(0).astype(jnp.float32)) * xs[:, None]
    if covered is not None:
      y = jnp.where(jnp.arange(x.shape[0])[:, None] < covered, y, 0)
  return y.astype(x.dtype)


def _check(op, x, packed, centroids, bits, lead, group_sizes=None, per_warp=0, act=None):
  if not 0 <= per_warp <= MAX_PER_WARP:
    raise CqjaxError(f"{op}: per_warp is the output columns a warp walks, 1 to {MAX_PER_WARP} (0: the kernel's "
                     f"choice); got {per_warp}")
  if act is not None and not takes_act(act):
    raise CqjaxError(f"{op}: act must quantize whole tokens (group_size -1) to at most 7 bits (8 symmetric): its "
                     f"codes and a plane of ones fill x's 8 planes; got group_size {act.group_size}, bits {act.bits}")
  if centroids.dtype in _LAID_OUT:
    if (centroids.dtype == jnp.uint32) != (act is not None):
      raise CqjaxError(f"{op}: centroids laid out by bitplane_layout for the {'affine' if act is None else 'int8'} "
                       f"numerics; lay them out with affine={act is not None}")
    centroids = jax.ShapeDtypeStruct(centroids.shape, jnp.float32)  # checked by shape as float32 ones are
  return cuda.check_call(op, x, packed, centroids, bits, lead, available(), lambda _, *rest: supports(*rest),
                         f"4-bit codes, one codebook per row and d_in a multiple of {CHUNK} up to {MAX_D_IN}",
                         group_sizes)


@functools.partial(jax.jit, static_argnames=("bits", "per_warp", "act"))
def lut_matmul_bitplane(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
                        per_warp: int = 0, act: ActQuantConfig | None = None) -> jax.Array:
  """x [m, d_in] times one codebook weight with int8 numerics (with act: the affine numerics) ->
  [m, d_out] (x's dtype); per_warp: output columns a warp walks (0: the kernel's choice)."""
  m = x.shape[0]
  n = _check("CUDA lut_matmul_bitplane", x, packed, centroids, bits, (), per_warp=per_warp, act=act)
  if m == 0:
    return jnp.zeros((0, n), x.dtype)
  return _call(x, packed[None], centroids[None], jnp.asarray([[0], [0], [m]], jnp.int32), per_warp, act=act)


@functools.partial(jax.jit, static_argnames=("bits", "per_warp", "act"))
def grouped_lut_matmul_bitplane(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                                group_sizes: jax.Array, *, per_warp: int = 0,
                                act: ActQuantConfig | None = None) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights, int8 numerics (with act: the
  affine numerics) -> [t, d_out]; per_warp as lut_matmul_bitplane's."""
  t = x.shape[0]
  e = packed.shape[0] if packed.ndim == 3 else -1
  n = _check("CUDA grouped_lut_matmul_bitplane", x, packed, centroids, bits, (e,), group_sizes, per_warp, act)
  if t == 0:
    return jnp.zeros((0, n), x.dtype)
  return _call(x, packed, centroids, expert_slots(group_sizes, min(t, e)), per_warp, jnp.sum(group_sizes), act)


@dataclasses.dataclass(frozen=True)
class Affine:
  """The affine numerics under one quantizer, with the dispatcher's kernel signatures
  (cqjax.lut_matmul): x is given as it is and fake-quantized by `act` here."""

  act: ActQuantConfig
  READS_LAYOUT = True  # takes bitplane_layout(affine=True)'s (planes, alpha) in the (packed, centroids) places

  def lut_matmul(self, x, packed, centroids, bits):
    return lut_matmul_bitplane(x, packed, centroids, bits, act=self.act)

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    return grouped_lut_matmul_bitplane(x, packed, centroids, bits, group_sizes, act=self.act)
