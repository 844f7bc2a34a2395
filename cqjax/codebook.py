"""The packed codebook weight format shared by every quantization method and kernel.

A linear kernel W [d_in, d_out] (or stacked experts [experts, d_in, d_out]) is stored per
output channel n ("row" in Hugging Face's [out, in] layout): the row's d_in codes, b bits each,
bit-packed little-endian into bytes, row-major so a row streams contiguously (4-bit: two codes a
byte, low nibble first); and one codebook of 2^b centroids per group of `group_size` consecutive
inputs (the whole row when group_size == d_in).

  packed     uint8 [..., d_out, ceil(d_in * bits / 8)]
  centroids  float [..., d_out, d_in / group_size, 2^bits]

RTN is the special case whose centroids are scale · (integer levels), so one format and one
kernel serve K-means, CodeQuant and the baselines.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cqjax.errors import CqjaxError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CodebookWeight:
  """A codebook-quantized kernel; behaves as W [..., d_in, d_out] in `lut_matmul`."""

  packed: jax.Array
  centroids: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True))
  d_in: int = dataclasses.field(metadata=dict(static=True))

  @property
  def group_size(self) -> int:
    return self.d_in // self.centroids.shape[-2]

  @property
  def shape(self) -> tuple[int, ...]:
    """The logical shape of the kernel it stands for: [..., d_in, d_out]."""
    return (*self.packed.shape[:-2], self.d_in, self.packed.shape[-2])

  @property
  def dtype(self):
    return self.centroids.dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LaidOutCodebookWeight(CodebookWeight):
  """A CodebookWeight with, beside it, its layout for the bit-plane kernel's affine numerics
  (`cqjax.lay_out_bitplanes`): planes uint8 [..., d_out, d_in/2] and alpha uint32 [..., d_out, 1,
  16], `cuda_kernels.lut_matmul_bitplane.bitplane_layout(packed, centroids, affine=True)`. Derived
  from packed and centroids, for inference only: fine-tuning and export refuse it
  (`refuse_laid_out`), so that no layout outlives the centroids it was made from."""

  planes: jax.Array
  alpha: jax.Array


def refuse_laid_out(tree, op: str) -> None:
  """Raises CqjaxError naming the first LaidOutCodebookWeight in `tree`, which `op` must not take."""
  laid_out = lambda x: isinstance(x, LaidOutCodebookWeight)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=laid_out)[0]:
    if laid_out(leaf):
      raise CqjaxError(f"{op}: {jax.tree_util.keystr(path)} holds a bit-plane layout (cqjax.lay_out_bitplanes), "
                       "for inference only; give the params as quantized or loaded, before laying them out")


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """codes [..., k] integers in [0, 2^bits) -> uint8 [..., ceil(k * bits / 8)]."""
  if not 1 <= bits <= 8:
    raise CqjaxError(f"code bits must be in [1, 8], got {bits}")
  k = codes.shape[-1]
  shifts = jnp.arange(bits, dtype=jnp.uint8)
  bit_stream = ((codes.astype(jnp.uint8)[..., None] >> shifts) & 1).reshape(*codes.shape[:-1], k * bits)
  pad = (-k * bits) % 8
  bit_stream = jnp.pad(bit_stream, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  by = bit_stream.reshape(*codes.shape[:-1], -1, 8)
  return jnp.sum(by << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int, k: int) -> jax.Array:
  """Inverse of `pack_codes`: uint8 [..., nbytes] -> int32 codes [..., k]."""
  bit_stream = ((packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1).reshape(*packed.shape[:-1], -1)
  bit_stream = bit_stream[..., : k * bits].reshape(*packed.shape[:-1], k, bits).astype(jnp.int32)
  return jnp.sum(bit_stream << jnp.arange(bits, dtype=jnp.int32), axis=-1)


def from_codes(codes: jax.Array, centroids: jax.Array, bits: int) -> CodebookWeight:
  """codes int [..., d_out, d_in], centroids [..., d_out, groups, 2^bits] -> CodebookWeight."""
  d_in = codes.shape[-1]
  if centroids.shape[-1] != 2 ** bits or d_in % centroids.shape[-2]:
    raise CqjaxError(f"centroids {centroids.shape} do not fit {bits}-bit codes over {d_in} inputs")
  return CodebookWeight(pack_codes(codes, bits), centroids, bits, d_in)


def codes_of(w: CodebookWeight) -> jax.Array:
  """The unpacked codes [..., d_out, d_in] (int32)."""
  return unpack_codes(w.packed, w.bits, w.d_in)


def dequantize(w: CodebookWeight, dtype=None) -> jax.Array:
  """The dense kernel [..., d_in, d_out] the codes and centroids stand for (jnp reference)."""
  codes = codes_of(w)
  groups = w.centroids.shape[-2]
  codes = codes.reshape(*codes.shape[:-1], groups, w.group_size)
  rows = jnp.take_along_axis(w.centroids, codes, axis=-1)  # [..., d_out, groups, group_size]
  rows = rows.reshape(*rows.shape[:-2], w.d_in)
  return jnp.swapaxes(rows, -1, -2).astype(dtype or w.centroids.dtype)


def check_codebook_operands(op: str, x, packed, centroids, bits: int, d_in: int, lead: tuple[int, ...]) -> int:
  """Trace-time checks shared by every kernel wrapper (CPU and GPU); returns d_out.

  x [m, d_in] floating; packed uint8 [*lead, d_out, ceil(d_in*bits/8)];
  centroids [*lead, d_out, groups, 2^bits] with groups dividing d_in. Errors name `op` and the operand.
  """
  if x.ndim != 2 or x.shape[1] != d_in:
    raise CqjaxError(f"{op}: x must be [m, {d_in}], got {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise CqjaxError(f"{op}: x must be floating point, got {x.dtype}")
  if packed.dtype != jnp.uint8:
    raise CqjaxError(f"{op}: packed codes must be uint8, got {packed.dtype}")
  if not jnp.issubdtype(centroids.dtype, jnp.floating):  # e.g. a bit-plane kernel's laid-out int32 codebooks
    raise CqjaxError(f"{op}: centroids must be floating point, got {centroids.dtype}")
  if not 1 <= bits <= 8:
    raise CqjaxError(f"{op}: bits must be in [1, 8], got {bits}")
  n = packed.shape[len(lead)] if packed.ndim == len(lead) + 2 else -1
  want_packed = (*lead, n, (d_in * bits + 7) // 8)
  if packed.shape != want_packed:
    raise CqjaxError(f"{op}: packed codes {packed.shape} do not fit {bits}-bit codes over d_in={d_in}; "
                     f"expected {want_packed}")
  if (centroids.ndim != len(lead) + 3 or centroids.shape[: len(lead) + 1] != (*lead, n)
      or centroids.shape[-1] != 2 ** bits or d_in % centroids.shape[-2]):
    raise CqjaxError(f"{op}: centroids {centroids.shape} do not fit packed codes {packed.shape} "
                     f"({2 ** bits} entries per group, groups dividing d_in={d_in})")
  return n


def expert_slots(group_sizes: jax.Array, slots: int) -> jax.Array:
  """int32 [3, slots]: (expert, first row, rows) of each expert that has rows, compacted, for the
  grouped kernels' grids (the ragged_dot contract: rows sorted by expert). Slots past the last
  non-empty expert are (0, 0, 0), so empty experts launch no work.

  Comparisons summed over [slots, experts], not nonzero / cumsum / gather: on an H200 XLA runs
  one one-block kernel fewer before each grouped call (with x's int8 rounding: 7 of 19.1 µs -> 6
  of 16.5 under ncu, BENCHMARKS.md session 36). Slot s holds the non-empty expert of rank s + 1,
  where rank is the inclusive count of non-empty experts; the experts before it: rank <= s."""
  group_sizes = group_sizes.astype(jnp.int32)
  experts = group_sizes.shape[0]
  filled = (group_sizes > 0).astype(jnp.int32)
  at = jnp.arange(experts)
  rank = jnp.sum(jnp.where(at[None, :] <= at[:, None], filled[None, :], 0), axis=1)  # [experts]
  s = jnp.arange(slots, dtype=jnp.int32)[:, None]
  before = rank[None, :] <= s  # [slots, experts]
  used = s[:, 0] < rank[-1]
  expert = jnp.where(used, jnp.sum(before, axis=1, dtype=jnp.int32), 0)
  start = jnp.where(used, jnp.sum(jnp.where(before, group_sizes[None, :], 0), axis=1), 0)
  rows = jnp.sum(jnp.where((rank[None, :] == s + 1) & (filled[None, :] > 0), group_sizes[None, :], 0), axis=1)
  return jnp.stack([expert, start, rows]).astype(jnp.int32)
