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

Both functions also take a weight laid out once by `bitplane_layout` (codes already in
bit-planes, codebooks already rounded and transformed) in the (packed, centroids) places; the
kernel then skips that work for every column (H100: 17 µs a 4096x14336 product at one row
against 20.5 as stored, BENCHMARKS.md session 52).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.errors import CqjaxError
from cqjax.lut_matmul import int8_round
from cuda_kernels import lut_matmul as cuda
from cuda_kernels.expert_slots import expert_slots
from cuda_kernels.lut_matmul_int8 import KERNEL_DTYPES, MAX_D_IN

_TARGET = "cqjax_cuda_lut_matmul_bitplane"
CHUNK = 256   # inputs an mma (kChunk)
K_RANGE = 16  # chunks a warp's K range (kChunks): d_in past CHUNK * K_RANGE is split
MAX_PER_WARP = 64  # output columns a warp may be asked to walk (the kernel refuses more)


@functools.cache
def available() -> bool:
  """Whether the CUDA library is built with this kernel and a CUDA GPU is the default backend
  (registers the target)."""
  return cuda.register_target(_TARGET, "CqjaxLutMatmulBitplaneCuda")


def supports(bits: int, d_in: int, groups: int) -> bool:
  """Whether the kernel takes this product: 4-bit codes, one codebook per row, d_in a multiple of
  256 up to MAX_D_IN (x of any float dtype: it is rounded to int8 first)."""
  return bits == 4 and groups == 1 and d_in % CHUNK == 0 and d_in <= MAX_D_IN


def x_planes(xq: jax.Array) -> jax.Array:
  """int8 values xq [t, k] (k a multiple of 256) -> uint32 [t, k/256, 8, 8]: per chunk of 256
  inputs, two's-complement bit-plane j's eight words, word w's bit 4 i + j' holding input
  32 w + 8 j' + i (the order the kernel's code planes come out in: a 4 x 4 bit transpose of each
  16-byte group of nibbles)."""
  t, k = xq.shape
  u = xq.astype(jnp.uint8).astype(jnp.uint32).reshape(t, k // CHUNK, 8, 4, 8)   # [t, chunk, w, j', i]
  planes = (u[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1                  # [..., plane]
  shift = 4 * jnp.arange(8, dtype=jnp.uint32)[None, :] + jnp.arange(4, dtype=jnp.uint32)[:, None]  # [j', i]
  words = (planes << shift[..., None]).sum(axis=(3, 4), dtype=jnp.uint32)       # [t, chunk, w, plane]
  return jnp.swapaxes(words, -1, -2)


def _nibbles_to_planes(words: jax.Array) -> jax.Array:
  """uint32 [..., 4] 16-byte groups of 32 nibble codes -> their four bit-planes (the kernel's
  nibbles_to_planes: a 4 x 4 bit transpose within each nibble, four delta swaps)."""
  x, y, z, w = (words[..., i] for i in range(4))
  d = ((x >> 1) ^ y) & 0x55555555; x, y = x ^ (d << 1), y ^ d
  d = ((z >> 1) ^ w) & 0x55555555; z, w = z ^ (d << 1), w ^ d
  d = ((x >> 2) ^ z) & 0x33333333; x, z = x ^ (d << 2), z ^ d
  d = ((y >> 2) ^ w) & 0x33333333; y, w = y ^ (d << 2), w ^ d
  return jnp.stack([x, y, z, w], -1)


@jax.jit
def bitplane_layout(packed: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A 4-bit codebook weight laid out once for the kernel, which then neither transposes codes nor
  rounds codebooks a call: packed uint8 [..., n, d_in/2] (d_in a multiple of 32), centroids
  [..., n, 1, 16] -> (planes uint8 [..., n, d_in/2]: each 16-byte group of codes as its four
  bit-planes; codebooks int32 [..., n, 1, 16]: each row's int8-rounded codebook (`int8_round`)
  Moebius-transformed over its code bits, alpha[S] as int16 in words 0-7 (|alpha| <= 16 * 127),
  the scale's float32 bits in word 8, zeros). Both take the kernel's (packed, centroids) places."""
  *lead, n, half = packed.shape
  words = jax.lax.bitcast_convert_type(packed.reshape(*lead, n, half // 16, 4, 4), jnp.uint32)
  planes = jax.lax.bitcast_convert_type(_nibbles_to_planes(words), jnp.uint8).reshape(packed.shape)
  cq, scale = int8_round(centroids.reshape(*lead, n, 16).astype(jnp.float32), -1)
  alpha = cq.reshape(*lead, n, 2, 2, 2, 2)  # entry 8 b3 + 4 b2 + 2 b1 + b0 -> axes (b3, b2, b1, b0)
  for axis in range(-4, 0):  # subsets with the bit minus those without it
    lo, hi = jnp.split(alpha, 2, axis)
    alpha = jnp.concatenate([lo, hi - lo], axis)
  a16 = alpha.reshape(*lead, n, 8, 2).astype(jnp.uint32) & 0xFFFF
  pairs = a16[..., 0] | (a16[..., 1] << 16)
  codebooks = jnp.concatenate([pairs, jax.lax.bitcast_convert_type(scale, jnp.uint32),
                               jnp.zeros((*lead, n, 7), jnp.uint32)], -1)
  return planes, jax.lax.bitcast_convert_type(codebooks, jnp.int32).reshape(*lead, n, 1, 16)


def splits(d_in: int) -> int:
  """The kernel's K ranges: d_in in 4096-input ranges, each a block of the grid."""
  return -(-d_in // (CHUNK * K_RANGE))


def _ffi(xpl, sx, packed, centroids, slots, out_dtype, per_warp=0):
  """xpl uint32 [t, d_in/256, 8, 8] (`x_planes`), sx float32 [t], packed [e, n, d_in/2],
  centroids [e, n, 1, 16], slots int32 [3, s], per_warp: output columns a warp walks (0: the
  kernel's choice, which fills the GPU's register-resident blocks once) -> (out, scales): out
  [t, n] in out_dtype (float32 or bf16) with one K range, else the K ranges' int32 dots [splits,
  t, n] and the codebook scales [t, n]."""
  t, chunks = xpl.shape[:2]
  e, n = packed.shape[:2]
  centroids = centroids.reshape(e, n, 16)
  if centroids.dtype not in (*KERNEL_DTYPES, jnp.int32):  # int32: bitplane_layout's codebooks
    centroids = centroids.astype(jnp.float32)
  s = splits(chunks * CHUNK)
  results = (jax.ShapeDtypeStruct((t, n), out_dtype) if s == 1 else jax.ShapeDtypeStruct((s, t, n), jnp.int32),
             jax.ShapeDtypeStruct((t, n) if s > 1 else (0,), jnp.float32))
  return jax.ffi.ffi_call(_TARGET, results, vmap_method="sequential")(xpl, sx, packed, centroids, slots,
                                                                     per_warp=np.int64(per_warp))


def _call(x, packed, centroids, slots, per_warp, covered=None):
  """x [t, d_in] -> [t, n] in x's dtype; covered: the rows the slots cover (None: all), past which
  rows are zero (the kernel zeroes them itself with one K range)."""
  xq, sx = int8_round(x.astype(jnp.float32), -1)
  out_dtype = x.dtype if x.dtype in KERNEL_DTYPES else jnp.float32
  y, scales = _ffi(x_planes(xq.astype(jnp.int8)), sx[:, 0], packed, centroids, slots, out_dtype, per_warp)
  if y.ndim == 3:
    y = (scales * y.sum(0).astype(jnp.float32)) * sx
    if covered is not None:
      y = jnp.where(jnp.arange(x.shape[0])[:, None] < covered, y, 0)
  return y.astype(x.dtype)


def _check(op, x, packed, centroids, bits, lead, group_sizes=None, per_warp=0):
  if not 0 <= per_warp <= MAX_PER_WARP:
    raise CqjaxError(f"{op}: per_warp is the output columns a warp walks, 1 to {MAX_PER_WARP} (0: the kernel's "
                     f"choice); got {per_warp}")
  if centroids.dtype == jnp.int32:  # bitplane_layout's codebooks: checked by shape as float32 ones are
    centroids = jax.ShapeDtypeStruct(centroids.shape, jnp.float32)
  return cuda.check_call(op, x, packed, centroids, bits, lead, available(), lambda _, *rest: supports(*rest),
                         f"4-bit codes, one codebook per row and d_in a multiple of {CHUNK} up to {MAX_D_IN}",
                         group_sizes)


@functools.partial(jax.jit, static_argnames=("bits", "per_warp"))
def lut_matmul_bitplane(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
                        per_warp: int = 0) -> jax.Array:
  """x [m, d_in] times one codebook weight with int8 numerics -> [m, d_out] (x's dtype); per_warp:
  output columns a warp walks (0: the kernel's choice)."""
  m = x.shape[0]
  n = _check("CUDA lut_matmul_bitplane", x, packed, centroids, bits, (), per_warp=per_warp)
  if m == 0:
    return jnp.zeros((0, n), x.dtype)
  return _call(x, packed[None], centroids[None], jnp.asarray([[0], [0], [m]], jnp.int32), per_warp)


@functools.partial(jax.jit, static_argnames=("bits", "per_warp"))
def grouped_lut_matmul_bitplane(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                                group_sizes: jax.Array, *, per_warp: int = 0) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights, int8 numerics -> [t, d_out];
  per_warp as lut_matmul_bitplane's."""
  t = x.shape[0]
  e = packed.shape[0] if packed.ndim == 3 else -1
  n = _check("CUDA grouped_lut_matmul_bitplane", x, packed, centroids, bits, (e,), group_sizes, per_warp)
  if t == 0:
    return jnp.zeros((0, n), x.dtype)
  return _call(x, packed, centroids, expert_slots(group_sizes, min(t, e)), per_warp, jnp.sum(group_sizes))
