"""Pallas GPU codebook (LUT) matmuls over the packed format of cqjax/codebook.py.

  lut_matmul:          x [m, d_in] @ (packed uint8 [d_out, bytes], centroids [d_out, groups, 2^b])
                       -> [m, d_out]
  grouped_lut_matmul:  x [t, d_in] rows sorted by expert, packed [e, d_out, bytes],
                       centroids [e, d_out, groups, 2^b], group_sizes int32 [e] -> [t, d_out]
                       (the `jax.lax.ragged_dot` contract; rows past the last group are zero)

Codes of b in {1, 2, 4, 8} bits sit 8/b to a byte, low bits first, so byte j of a row holds the
codes of inputs j*8/b ... j*8/b + 8/b - 1. Instead of interleaving decoded codes, the wrapper
splits x into 8/b strided slices (xs[s, :, j] = x[:, j*8/b + s]: activations are small) and the
kernel multiplies slice s by the weights decoded from bit field s of every byte.

The decode is a gather through the flattened centroid table ref (`table[row*2^b + code]`): Pallas'
Triton lowering has no value gather, but indexing a ref with an integer array lowers to a pointer
load that hits L1, since one program reads only its rows' 2^b-entry codebooks. No dense bf16
weight ever reaches device memory.

One program owns `block_n` output columns, `block_m` rows of x and a 1/k_splits share of d_in,
which it walks in steps of `block_k` inputs. block_m < 16 multiplies on the FMA units with an
elementwise accumulator reduced once at the end (decode: no shared-memory round trip of the
weight tile), block_m >= 16 on the tensor cores (`pl.dot`). The k_splits partial sums are written
to [k_splits, m, d_out] float32 and added by XLA: deterministic, and at decode the partials are
a few percent of the code bytes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cqjax.codebook import check_codebook_operands
from cqjax.errors import CqjaxError

SUPPORTED_BITS = (1, 2, 4, 8)
_SM_COUNT = 132  # H100 SXM; only steers how far K is split to fill the chip


@dataclasses.dataclass(frozen=True)
class LutTuning:
  """Block sizes of one launch (powers of two). block_k counts inputs per step of the K loop."""

  block_m: int
  block_n: int
  block_k: int
  k_splits: int = 1
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise CqjaxError(f"LutTuning.{name} must be a power of two, got {v}")
    if self.k_splits < 1:
      raise CqjaxError(f"LutTuning.k_splits must be >= 1, got {self.k_splits}")


def _pow2_at_least(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def default_tuning(m: int, d_in: int, d_out: int, bits: int) -> LutTuning:
  """Blocks for an m-row product, from the H100 sweep in BENCHMARKS.md: the FMA path up to 2
  rows with 16 columns a program, tensor cores above (one decode of the weights serves up to 128
  rows); K is split until about two programs per SM are in flight. On the Mixtral expert shapes
  at M=1 this is the sweep's best tuning."""
  block_m = _pow2_at_least(m) if m <= 2 else min(128, max(16, _pow2_at_least(m)))
  block_n = 16 if block_m <= 2 else 64
  block_k = max(8 // bits, min(512 if block_m <= 2 else 256, _pow2_at_least(d_in)))
  programs = -(-d_out // block_n) * -(-m // block_m)
  steps = -(-d_in // block_k)
  k_splits = max(1, min(steps, -(-2 * _SM_COUNT // programs)))
  return LutTuning(block_m, block_n, block_k, k_splits)


def _accumulate(xs_ref, packed_ref, table_ref, *, expert, rows, row_ok, n0, n_ok, table_row0, step0, n_steps,
                bits, groups, group_size, tuning):
  """The K loop of one program: [block_m, block_n] float32 partial sums over n_steps steps.

  xs_ref [8/b, m, bytes]; packed_ref [d_out, bytes], or [experts, d_out, bytes] read at `expert`;
  table_ref flat [... * 2^b]; rows (a slice) / row_ok [block_m]: rows of xs this program reads;
  table_row0 [block_n]: index of each column's first codebook (in codebooks of 2^b entries).
  """
  per_byte, entries = 8 // bits, 2 ** bits
  bkb = tuning.block_k // per_byte
  nbytes = packed_ref.shape[-1]
  use_dot = tuning.block_m >= 16
  f32 = xs_ref.dtype == jnp.float32

  def step(i, acc):
    b0 = (step0 + i) * bkb
    byte = b0 + jnp.arange(bkb)
    k_ok = byte < nbytes
    lead = () if expert is None else (expert,)
    codes = plgpu.load(packed_ref.at[(*lead, pl.ds(n0, tuning.block_n), pl.ds(b0, bkb))],
                       mask=n_ok[:, None] & k_ok[None, :], other=0).astype(jnp.int32)
    for s in range(per_byte):
      code = codes >> (s * bits)
      if s < per_byte - 1:  # the top field needs no mask
        code = code & (entries - 1)
      if groups == 1:
        book = table_row0[:, None]
      else:
        group = jnp.minimum((byte * per_byte + s) // group_size, groups - 1)
        book = table_row0[:, None] + group[None, :]
      w = table_ref[book * entries + code]  # [block_n, bkb], gathered from L1
      x = plgpu.load(xs_ref.at[jnp.int32(s), rows, pl.ds(b0, bkb)], mask=row_ok[:, None] & k_ok[None, :], other=0)
      if use_dot:
        acc = acc + plgpu.dot(x, w, trans_b=True,
                           precision=jax.lax.Precision.HIGHEST if f32 else None)
      else:
        acc = acc + x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None, :, :]
    return acc

  shape = (tuning.block_m, tuning.block_n) if use_dot else (tuning.block_m, tuning.block_n, bkb)
  acc = jax.lax.fori_loop(0, n_steps, step, jnp.zeros(shape, jnp.float32))
  return acc if use_dot else acc.sum(axis=-1)


def _k_steps(nbytes: int, bits: int, tuning: LutTuning) -> tuple[int, int, int]:
  """(steps in all, steps per split, splits) of the K loop over `nbytes` bytes of a row."""
  total = -(-nbytes // (tuning.block_k // (8 // bits)))
  per_split = -(-total // tuning.k_splits)
  return total, per_split, -(-total // per_split)


def _split_activations(x: jax.Array, bits: int, nbytes: int) -> jax.Array:
  """x [m, d_in] -> xs [8/b, m, bytes] with xs[s, :, j] = x[:, j*8/b + s] (zero past d_in)."""
  per_byte = 8 // bits
  x = jnp.pad(x, ((0, 0), (0, nbytes * per_byte - x.shape[1])))
  return jnp.moveaxis(x.reshape(x.shape[0], nbytes, per_byte), 2, 0)


def _check_bits(bits: int, tuning: LutTuning):
  if bits not in SUPPORTED_BITS:
    raise CqjaxError(f"Pallas lut_matmul: {bits}-bit codes are not supported (codes must not straddle bytes: "
                     f"bits in {SUPPORTED_BITS}); use the reference")
  if tuning.block_k < 8 // bits:
    raise CqjaxError(f"LutTuning.block_k={tuning.block_k} is below one byte of {bits}-bit codes")


def _table(centroids: jax.Array, dtype) -> jax.Array:
  """The flat centroid table in the activations' dtype, rounded as the reference rounds it (a
  float32 table for bf16 activations measured 10% slower at M=1: twice the L1 bytes per gather)."""
  return centroids.astype(dtype).reshape(-1)


def _params(tuning: LutTuning):
  return plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)


@functools.partial(jax.jit, static_argnames=("bits", "tuning", "interpret"))
def lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
               tuning: LutTuning | None = None, interpret: bool = False) -> jax.Array:
  """x [m, d_in] times one codebook weight -> [m, d_out] in x's dtype (d_in = x.shape[1])."""
  m, d_in = x.shape
  d_out = check_codebook_operands("Pallas lut_matmul", x, packed, centroids, bits, d_in, ())
  tuning = tuning or default_tuning(max(m, 1), d_in, d_out, bits)
  _check_bits(bits, tuning)
  if m == 0:
    return jnp.zeros((0, d_out), x.dtype)
  nbytes, groups = packed.shape[-1], centroids.shape[-2]
  xs = _split_activations(x, bits, nbytes)
  total, per_split, splits = _k_steps(nbytes, bits, tuning)

  def kernel(xs_ref, packed_ref, table_ref, out_ref):
    pm, pn, ps = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pm * tuning.block_m + jnp.arange(tuning.block_m)
    cols = pn * tuning.block_n + jnp.arange(tuning.block_n)
    row_ok, n_ok = rows < m, cols < d_out
    acc = _accumulate(xs_ref, packed_ref, table_ref, expert=None, rows=pl.ds(pm * tuning.block_m, tuning.block_m),
                      row_ok=row_ok, n0=pn * tuning.block_n, n_ok=n_ok,
                      table_row0=jnp.minimum(cols, d_out - 1) * groups, step0=ps * per_split,
                      n_steps=jnp.minimum(per_split, total - ps * per_split), bits=bits, groups=groups,
                      group_size=d_in // groups, tuning=tuning)
    plgpu.store(out_ref.at[ps, pl.ds(pm * tuning.block_m, tuning.block_m), pl.ds(pn * tuning.block_n, tuning.block_n)],
                acc, mask=row_ok[:, None] & n_ok[None, :])

  grid = (pl.cdiv(m, tuning.block_m), pl.cdiv(d_out, tuning.block_n), splits)
  partials = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, m, d_out), jnp.float32), grid=grid,
      compiler_params=_params(tuning), interpret=interpret, name="cqjax_lut_matmul",
  )(xs, packed, _table(centroids, x.dtype))
  return partials.sum(axis=0).astype(x.dtype)


def _expert_slots(group_sizes: jax.Array, slots: int):
  """The experts that have rows, compacted: (expert, first row, rows) per slot, int32 [slots];
  slots past the last non-empty expert have 0 rows, so empty experts launch no work."""
  starts = jnp.cumsum(group_sizes) - group_sizes
  (expert,) = jnp.nonzero(group_sizes > 0, size=slots, fill_value=0)
  used = jnp.arange(slots) < jnp.sum(group_sizes > 0)
  count = jnp.where(used, group_sizes[expert], 0)
  return expert.astype(jnp.int32), starts[expert].astype(jnp.int32), count.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("bits", "tuning", "interpret"))
def grouped_lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                       group_sizes: jax.Array, *, tuning: LutTuning | None = None, interpret: bool = False) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights -> [t, d_out] (x's dtype).

  The grid runs over min(t, experts) slots of non-empty experts; a slot walks its expert's rows
  in blocks of block_m, so an expert without rows costs one program that exits at once.
  """
  t, d_in = x.shape
  e = packed.shape[0] if packed.ndim == 3 else -1
  d_out = check_codebook_operands("Pallas grouped_lut_matmul", x, packed, centroids, bits, d_in, (e,))
  if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise CqjaxError(f"Pallas grouped_lut_matmul: group_sizes must be integers [{e}], got "
                     f"{group_sizes.dtype}{group_sizes.shape}")
  # Rows per expert if spread evenly; past one row per token, random routing gives some experts two.
  per_row = max(1, -(-t // e)) if t <= e // 2 or t == 1 else max(2, -(-t // e))
  tuning = tuning or default_tuning(per_row, d_in, d_out, bits)
  _check_bits(bits, tuning)
  if t == 0:
    return jnp.zeros((0, d_out), x.dtype)
  nbytes, groups = packed.shape[-1], centroids.shape[-2]
  xs = _split_activations(x, bits, nbytes)
  total, per_split, splits = _k_steps(nbytes, bits, tuning)
  slots = min(t, e)
  slot_expert, slot_start, slot_rows = _expert_slots(group_sizes.astype(jnp.int32), slots)

  def kernel(expert_ref, start_ref, rows_ref, xs_ref, packed_ref, table_ref, out_ref):
    slot, pn, ps = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, start, count = expert_ref[slot], start_ref[slot], rows_ref[slot]
    cols = pn * tuning.block_n + jnp.arange(tuning.block_n)
    n_ok = cols < d_out
    table_row0 = (expert * d_out + jnp.minimum(cols, d_out - 1)) * groups

    def row_block(rb, carry):
      r0 = start + rb * tuning.block_m
      row_ok = r0 + jnp.arange(tuning.block_m) < start + count
      acc = _accumulate(xs_ref, packed_ref, table_ref, expert=expert, rows=pl.ds(r0, tuning.block_m), row_ok=row_ok,
                        n0=pn * tuning.block_n, n_ok=n_ok, table_row0=table_row0, step0=ps * per_split,
                        n_steps=jnp.minimum(per_split, total - ps * per_split), bits=bits, groups=groups,
                        group_size=d_in // groups, tuning=tuning)
      plgpu.store(out_ref.at[ps, pl.ds(r0, tuning.block_m), pl.ds(pn * tuning.block_n, tuning.block_n)],
                  acc, mask=row_ok[:, None] & n_ok[None, :])
      return carry

    jax.lax.fori_loop(0, pl.cdiv(count, tuning.block_m), row_block, 0)

  grid = (slots, pl.cdiv(d_out, tuning.block_n), splits)
  partials = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, t, d_out), jnp.float32), grid=grid,
      compiler_params=_params(tuning), interpret=interpret, name="cqjax_grouped_lut_matmul",
  )(slot_expert, slot_start, slot_rows, xs, packed, _table(centroids, x.dtype))
  # Rows outside every group are written by no program.
  covered = jnp.arange(t) < jnp.sum(group_sizes)
  return jnp.where(covered[:, None], partials.sum(axis=0), 0).astype(x.dtype)
