"""Pallas GPU codebook (LUT) matmuls over the packed format of cqjax/codebook.py.

  lut_matmul:          x [m, d_in] @ (packed uint8 [d_out, bytes], centroids [d_out, groups, 2^b])
                       -> [m, d_out]
  grouped_lut_matmul:  x [t, d_in] rows sorted by expert, packed [e, d_out, bytes],
                       centroids [e, d_out, groups, 2^b], group_sizes int32 [e] -> [t, d_out]
                       (the `jax.lax.ragged_dot` contract; rows past the last group are zero)

Codes of b in {1, 2, 4, 8} bits sit 8/b to a byte, low bits first. A row is read in uint32 words
when it is a whole number of words (32/b codes a word), else in bytes. Instead of interleaving
decoded codes, the kernel multiplies the strided slice s of x (x[:, u*per_unit + s] over units u)
by the weights decoded from bit field s of every unit. For prefill's large blocks the wrapper
splits x into those slices first (xs[s, :, u], contiguous tiles); decode blocks load a contiguous
tile of x and split it into the slices in registers (one XLA pass fewer before the launch).

Two decodes, no dense weight ever in device memory: 4-bit codes with bf16 activations (the
GPU's serving case) decode in registers by byte permutes (decode4.py: `DECODE4_SELECTORS`, `DECODE4_PTX`,
inline PTX: 23 ALU instructions per eight codes, plus one a code to widen it for the FMA units;
the tensor cores take the bf16 pairs as they are); everything else, and interpret mode,
gathers through the flattened centroid table ref (`table[row*2^b + code]`: Pallas' Triton
lowering has no value gather, but indexing a ref with an integer array lowers to a pointer load
that hits L1; about 10 instructions a code in all, by ncu). Interpret mode cannot run PTX: on CPU
the register decode is checked by a PTX interpreter test, compiled on GPUs by the same tests.

One program owns `block_n` output columns, `block_m` rows of x and a 1/k_splits share of d_in,
which it walks in steps of `block_k` inputs. block_m < 16 multiplies on the FMA units with an
elementwise accumulator reduced once at the end (decode: no shared-memory round trip of the
weight tile), block_m >= 16 on the tensor cores (`pl.dot`). With k_splits > 1 the partial sums are
written to [k_splits, m, d_out] float32 and added by XLA: deterministic, and at decode the
partials are a few percent of the code bytes; an unsplit launch stores its result directly.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cqjax.codebook import check_codebook_operands, expert_slots
from cqjax.errors import CqjaxError
from pallas_kernels.decode4 import DECODE4_PTX, DECODE4_SELECTORS, decode4_registers

SUPPORTED_BITS = (1, 2, 4, 8)
_SM_COUNT = 132  # H100 SXM; only steers how far K is split to fill the chip
_ONE_ROW_PER_SM = 4  # one-row programs resident on an SM (117-128 registers a thread, 4 warps)


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

  @property
  def dots(self) -> bool:
    """Whether a block multiplies on the tensor cores (16 rows or more), else on the FMA units."""
    return self.block_m >= 16


def pow2_at_least(v: int) -> int:
  """The smallest power of two >= v (1 for v <= 1): block sizes for v rows or inputs."""
  return 1 << max(0, (v - 1).bit_length())


# Pallas builds Triton's IR itself, past the front end's rule that a dot has K >= 16. On an H200
# and an H100 (jax 0.11.2, Triton 3.6) a bf16 tensor-core dot of 8 inputs counted every product
# twice, with its weights loaded or decoded in registers alike; 16 and 32 inputs, and float32 at 8,
# were exact (experiments.probe_short_dot, BENCHMARKS.md session 44). Every dot here takes 16 or more
# (float32 too, as Triton's own rule has it: a few float32 weights of d_in < 256 so read bytes, not words).
_MIN_DOT_INPUTS = 16


def _dot_inputs(block_k: int, bits: int, unit_bytes: int) -> int:
  """Inputs of each tensor-core dot of a K step: the step splits into one slice per code of a unit."""
  return block_k * bits // (8 * unit_bytes)


def _min_dot_block_k(bits: int) -> int:
  """The shortest K step of whole dots when codes are read as bytes (the layout that allows most)."""
  return pow2_at_least(_MIN_DOT_INPUTS * 8 // bits)


def _decodes_in_registers(bits: int, row_bytes: int, x_dtype, group_size: int, block_k: int, interpret: bool) -> bool:
  """The register decode (DECODE4_PTX) applies: compiled only (inline PTX), 4-bit codes in whole
  words, bf16 activations (its values are bf16), one codebook per K step, and steps of whole
  dots (_MIN_DOT_INPUTS in each of a word's eight slices: block_k >= 128; one-row blocks, which
  have no dot, keep the same rule)."""
  return (not interpret and bits == 4 and row_bytes % 4 == 0 and jnp.dtype(x_dtype) == jnp.bfloat16
          and group_size % block_k == 0 and _dot_inputs(block_k, bits, 4) >= _MIN_DOT_INPUTS)


def default_tuning(m: int, d_in: int, d_out: int, bits: int, experts: int = 1, x_dtype=jnp.bfloat16,
                   group_size: int | None = None) -> LutTuning:
  """Blocks for an m-row product with each of `experts` weights in one launch (codebooks over
  `group_size` inputs, default a whole row), from the H100 sweeps in BENCHMARKS.md. One row: the
  FMA path, 16 columns a program. More rows: tensor cores (one decode of the weights serves up to
  128 rows; at M = 2 the FMA path ran at half this speed). At 128 rows of a weight with 4096+
  outputs, wide column blocks and 8 warps: every program reads all of x, and wide blocks cut
  that traffic (256 columns: 0.68-0.73x of the 64-column time on the Mixtral shapes); 256 only
  for the register decode, 128 for other bf16 and 64 for float32, whose tiles would overflow the
  227 KB of shared memory. K is split until about `per_sm` programs per SM are in flight,
  counting every expert's programs, rounded to the nearest for wide and one-row blocks; one-row
  programs that already fill every SM at their occupancy (four a SM at 117-128 registers) stay unsplit
  (4096x14336, 896 programs: 20.7-20.9 against 22.2-22.3 us split in two; 14336x4096's 256 split
  in seven: 21.8-22.2 against 22.4-22.8 in four, H100, BENCHMARKS.md session 48), and keep at
  least four K steps (on 2048x768 experts, shorter ones lost to their set-up)."""
  block_m = 1 if m <= 1 else min(128, max(16, pow2_at_least(m)))
  block_k = max(8 // bits, min(512 if block_m == 1 else 256, pow2_at_least(d_in)))
  if block_m >= 16:  # tensor-core dots of whole slices, even where d_in is shorter (x reads as zeros past it)
    block_k = max(block_k, _min_dot_block_k(bits))
  if block_m == 1 and -(-d_in // 256) * 256 < -(-d_in // block_k) * block_k:
    block_k = 256  # less of the last step past d_in (d_in = 768: three steps of 256, not 1024 of work,
    # and whole steps, which the register decode needs)
  block_n = 16 if block_m == 1 else 64
  if block_m == 128 and d_out >= 4096:
    registers = _decodes_in_registers(bits, -(-d_in * bits // 8), x_dtype, group_size or d_in, block_k, False)
    block_n = 256 if registers else 256 // jnp.dtype(x_dtype).itemsize
  wide = block_n >= 128
  per_sm = 1 if wide else {1: 16, 16: 7, 32: 7}.get(block_m, 2)
  programs = experts * -(-d_out // block_n) * -(-m // block_m)
  steps = -(-d_in // block_k)
  splits = round(per_sm * _SM_COUNT / programs) if wide or block_m == 1 else -(-per_sm * _SM_COUNT // programs)
  if block_m == 1:
    splits = 1 if programs >= _ONE_ROW_PER_SM * _SM_COUNT else min(splits, steps // 4)
  return LutTuning(block_m, block_n, block_k, max(1, min(steps, splits)), num_warps=8 if wide else 4)


def default_grouped_tuning(t: int, experts: int, d_in: int, d_out: int, bits: int, x_dtype=jnp.bfloat16,
                           group_size: int | None = None) -> LutTuning:
  """default_tuning for grouped_lut_matmul's t rows over `experts` stacked weights: the rows an
  active expert gets if spread evenly (past one row per token, random routing gives some experts
  two), K split over the programs of its min(t, experts) slots."""
  per_row = max(1, -(-t // experts)) if t <= experts // 2 or t == 1 else max(2, -(-t // experts))
  return default_tuning(per_row, d_in, d_out, bits, experts=max(min(t, experts), 1), x_dtype=x_dtype,
                        group_size=group_size)


def _decode4(words, regs, dtype, whole_words: bool = True):
  """words uint32 [bn, bku], regs: eight uint32 [bn] -> eight `dtype` [bn, bku] (code s of each word),
  the selectors built once a word (whole_words) or once a half (DECODE4_SELECTORS).

  dtype: float32 for the FMA units and prefill's wgmma blocks; bfloat16 for decode's tensor-core
  blocks, each half of a pair as it is, by a 16-bit register move (widening to float32 and
  narrowing back cost a shift or mask a code and a convert a pair; Triton's own 16-bit split of
  the 64-bit result shifted and repacked every value: offline compile, Triton 3.6, sm_90, 16 rows
  of 4096x14336, K loop 757 -> 642 instructions with _pair_slices, against 710 with Triton's split)."""
  values = []
  regs = [jnp.broadcast_to(r[:, None], words.shape) for r in regs]
  int64 = jax.ShapeDtypeStruct(words.shape, jnp.int64)
  for half in range(2):
    with jax.enable_x64(True):  # 64-bit results (signless for Triton), the decoded one split at once into two bf16 pairs
      if half == 0 or not whole_words:
        (selectors,) = plgpu.elementwise_inline_asm(DECODE4_SELECTORS[0 if whole_words else half], args=[words],
                                                    constraints="=l,r", pack=1, result_shape_dtypes=[int64])
      (four,) = plgpu.elementwise_inline_asm(DECODE4_PTX[half if whole_words else 0], args=[selectors, *regs],
                                             constraints="=l,l," + ",".join(["r"] * 8), pack=1, result_shape_dtypes=[int64])
      pairs = (four.astype(jnp.uint32), (four >> 32).astype(jnp.uint32))
    for pair in pairs:
      if dtype == jnp.bfloat16:
        values += [plgpu.elementwise_inline_asm(
            "{ .reg .b16 %t; mov.b32 {" + operands + "}, $1; }", args=[pair], constraints="=h,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.bfloat16)])[0]
                   for operands in ("$0, %t", "%t, $0")]
      else:
        values += [jax.lax.bitcast_convert_type(pair << 16, jnp.float32),
                   jax.lax.bitcast_convert_type(pair & jnp.uint32(0xFFFF0000), jnp.float32)]
  return values


@dataclasses.dataclass(frozen=True)
class _Layout:
  """How one launch reads a row of codes (uint32 words or bytes) and decodes them."""

  bits: int
  groups: int
  group_size: int
  units: int        # row length in load units
  unit_bytes: int   # 4 (uint32 words) or 1 (bytes)
  registers: bool   # decode with DECODE4_PTX (else gather through the flat table ref)
  # The register decode's tables built in the kernel, once a program, from its rows' centroids:
  # one codebook a row (CodeQuant's default) and blocks of up to 64 columns. Else (prefill's
  # 256-column blocks, column groups) the wrapper builds them: built each K step in the kernel
  # they spilled more and ran 8-10% slower at M = 128 (H100, BENCHMARKS.md session 41).
  tables_in_kernel: bool
  compiled: bool    # not interpreted: inline PTX (the register decode, _fma) may be used

  @property
  def per_unit(self) -> int:
    return 8 * self.unit_bytes // self.bits


def _layout(x, packed, centroids, bits: int, tuning: LutTuning, interpret: bool) -> _Layout:
  if bits not in SUPPORTED_BITS:
    raise CqjaxError(f"Pallas lut_matmul: {bits}-bit codes are not supported (codes must not straddle bytes: "
                     f"bits in {SUPPORTED_BITS}); use the reference")
  nbytes, groups = packed.shape[-1], centroids.shape[-2]
  group_size = x.shape[1] // groups
  registers = _decodes_in_registers(bits, nbytes, x.dtype, group_size, tuning.block_k, interpret)
  # Words wherever they were timed. bf16 tensor-core dots fed by word-unit *gathers* read bytes: their
  # wrong sums on the H100 (session 18) were dots of 8 inputs, and with whole dots they passed compiled
  # (experiments/pallas_word_gathers.patch, session 44), but they were never timed.
  dots = tuning.dots
  words = (nbytes % 4 == 0 and tuning.block_k >= 32 // bits and (registers or not dots or x.dtype == jnp.float32)
           and (not dots or _dot_inputs(tuning.block_k, bits, 4) >= _MIN_DOT_INPUTS))
  unit_bytes = 4 if words else 1
  if tuning.block_k < 8 * unit_bytes // bits:
    raise CqjaxError(f"LutTuning.block_k={tuning.block_k} is below one byte of {bits}-bit codes")
  inputs = _dot_inputs(tuning.block_k, bits, unit_bytes)
  if dots and inputs < _MIN_DOT_INPUTS:
    raise CqjaxError(f"LutTuning.block_k={tuning.block_k} with block_m={tuning.block_m} gives tensor-core dots of "
                     f"{inputs} inputs; {bits}-bit codes need block_k >= {_min_dot_block_k(bits)} (shorter dots "
                     "counted every product twice on Hopper GPUs)")
  return _Layout(bits, groups, group_size, nbytes // unit_bytes, unit_bytes, registers,
                 registers and groups == 1 and tuning.block_n <= 64, not interpret)


def _codes(packed: jax.Array, lay: _Layout) -> jax.Array:
  """packed uint8 [..., bytes] viewed in load units (a free bitcast for words)."""
  if lay.unit_bytes == 1:
    return packed
  return jax.lax.bitcast_convert_type(packed.reshape(*packed.shape[:-1], lay.units, 4), jnp.uint32)


def _table(centroids: jax.Array, dtype, lay: _Layout) -> jax.Array:
  """What the decode reads: the flat table [... * 2^b] for the gather, rounded to the activations'
  dtype as the reference rounds it; for the register decode the centroids as they are (the kernel
  rounds them, decode4_registers) or, built here, the registers [..., groups, 8, d_out]."""
  if lay.tables_in_kernel:
    return centroids
  if lay.registers:
    regs = decode4_registers([centroids[..., i] for i in range(16)])  # eight [..., d_out, groups]
    return jnp.moveaxis(jnp.stack(regs, axis=-1), -3, -1)
  return centroids.astype(dtype).reshape(-1)


def _splits_x(tuning: LutTuning) -> bool:
  """Whether the wrapper splits x into its strided slices (contiguous tiles for the large blocks of
  prefill); decode blocks (block_m < 64, FMA or tensor cores) split tiles of x themselves: one XLA
  pass fewer, at the same kernel time (H100 and H200, BENCHMARKS.md session 41)."""
  return tuning.block_m >= 64


def _deinterleave(tile: jax.Array, ways: int) -> list:
  """[rows, n * ways] -> `ways` arrays [rows, n]; array s holds columns j * ways + s. Halves by the
  lowest index bit at a time (Triton's split of a size-2 minor axis: register moves, no memory)."""
  rows, width = tile.shape
  levels = ways.bit_length() - 1
  parts = [(0, tile.reshape(rows, width // ways, *([2] * levels)))]
  for level in range(levels):
    parts = [(s | bit << level, half) for s, part in parts
             for bit, half in enumerate(jax.lax.unstack(part, axis=part.ndim - 1))]
  return [part for _, part in sorted(parts, key=lambda sp: sp[0])]


def _pair_slices(parts: list) -> list:
  """per_unit slices [rows, n] (slice s: inputs u * per_unit + s) -> per_unit / 2 arrays [rows, 2n],
  array j holding slices 2j and 2j + 1 side by side, column 2u + b from slice 2j + b: a decoded
  bf16 pair lands as one register of a tensor-core operand (Triton's join of a size-2 minor axis)."""
  return [jnp.stack(parts[j:j + 2], axis=-1).reshape(parts[j].shape[0], -1) for j in range(0, len(parts), 2)]


def _fma(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
  """a * b + c (float32, one shape) as one fma.rn: XLA's Triton emits a product and a sum apart
  (mul.rn + add.rn, which ptxas may not fuse), two instructions a code in the one-row K loop
  (XLA's compile for an H200, experiments.compile_only_gpu)."""
  (out,) = plgpu.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)])
  return out


def _split_activations(x: jax.Array, lay: _Layout, rows: int) -> jax.Array:
  """x [m, d_in] -> xs [codes per unit, rows, units], xs[s, :, u] = x[:, u*per_unit + s], zero
  past d_in and past m (rows past m are read by the last block, never stored)."""
  x = jnp.pad(x, ((0, rows - x.shape[0]), (0, lay.units * lay.per_unit - x.shape[1])))
  return jnp.moveaxis(x.reshape(rows, lay.units, lay.per_unit), 2, 0)


def _kernel_activations(x: jax.Array, lay: _Layout, tuning: LutTuning, rows: int) -> jax.Array:
  """What the kernel reads for x: split into strided slices for prefill blocks (_splits_x); for
  one-row blocks x in float32, the FMA's operand type, converted once here rather than by each of
  the block_n / 2 threads that read each value (offline compile, Triton 3.6, sm_90: 421 -> 364
  instructions in the K loop of 4096x14336); else x as it is."""
  if _splits_x(tuning):
    return _split_activations(x, lay, rows)
  return x.astype(jnp.float32) if tuning.block_m == 1 else x


def _k_steps(lay: _Layout, tuning: LutTuning) -> tuple[int, int, int]:
  """(steps in all, steps per split, splits) of the K loop."""
  total = -(-lay.units // (tuning.block_k // lay.per_unit))
  per_split = -(-total // tuning.k_splits)
  return total, per_split, -(-total // per_split)


def _load(ref, mask):
  """A load, masked (zeros outside) only where the shape needs it: unmasked loads vectorise."""
  return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0)


def _accumulate(xs_ref, packed_ref, table_ref, *, lay: _Layout, expert, r0, row_limit, n0, n_ok, book0, step0,
                n_steps, tuning, masked_n, masked_k):
  """The K loop of one program: [block_m, block_n] float32 partial sums over n_steps steps.

  xs_ref: x split into [codes per unit, rows, units] (_splits_x), else x [rows, d_in] itself;
  packed_ref [d_out, units], or [experts, d_out, units] read at `expert`; table_ref: the flat
  centroid table (gather) or, for the register decode, the centroids [experts?, d_out, groups, 16]
  (tables_in_kernel) or the registers [experts?, groups, 8, d_out]; r0: the
  first of the block_m rows of x this program reads (those from row_limit on read as zeros); n0 / n_ok
  [block_n]: its first output column and which columns are in range; book0 [block_n]: index of
  each column's first codebook in the flat table (clamped into range).
  """
  per_unit, entries = lay.per_unit, 2 ** lay.bits
  bku = tuning.block_k // per_unit
  use_dot = tuning.dots
  f32 = xs_ref.dtype == jnp.float32
  # Decode's tensor-core blocks with the register decode: bf16 values, dots over slice pairs.
  paired = use_dot and lay.registers and not _splits_x(tuning)
  lead = () if expert is None else (expert,)
  one_row = tuning.block_m == 1

  def registers(group):
    """The decode4 registers of this program's columns for one codebook group."""
    if lay.tables_in_kernel:  # from 16 column loads of the centroids
      return decode4_registers([_load(table_ref.at[(*lead, pl.ds(n0, tuning.block_n), group, jnp.int32(i))],
                                      n_ok if masked_n else None) for i in range(entries)])
    return [_load(table_ref.at[(*lead, group, jnp.int32(j), pl.ds(n0, tuning.block_n))], n_ok if masked_n else None)
            for j in range(8)]

  # Tables built in the kernel are built once, before the K loop. The wrapper's are loaded each step:
  # held across the loop in prefill's 256-column blocks they spilled more (XLA's compile for an H200,
  # experiments.compile_only_gpu: stack 432 bytes against 184).
  row_regs = registers(jnp.int32(0)) if lay.tables_in_kernel else None

  def x_slices(u0, k_ok):
    """per_unit arrays [block_m, bku]; slice s holds the rows' inputs u * per_unit + s (units u from u0)."""
    return [_load(xs_ref.at[jnp.int32(s), pl.ds(r0, tuning.block_m), pl.ds(u0, bku)], k_ok[None, :] if masked_k else None)
            for s in range(per_unit)]

  def x_tile(u0, live=None):
    """One contiguous tile of x [block_m, block_k] (wide, coalesced loads; _deinterleave splits it in registers)."""
    mask = (r0 + jnp.arange(tuning.block_m) < row_limit)[:, None] & (True if live is None else live)
    if masked_k or lay.units * per_unit != xs_ref.shape[1]:
      mask = mask & (u0 * per_unit + jnp.arange(tuning.block_k) < xs_ref.shape[1])[None, :]
    return plgpu.load(xs_ref.at[pl.ds(r0, tuning.block_m), pl.ds(u0 * per_unit, tuning.block_k)], mask=mask, other=0)

  # One-row blocks load step i + 1 while step i decodes: Triton pipelines only loads that feed a
  # dot, so their codes and x came in the step that used them. (Carried so in the tensor-core
  # blocks, the codes took Triton's decoded tiles through shared memory: K loop 593 -> 709.)
  def step_loads(i, live=None):
    """Step i's codes [block_n, bku] and, for one-row blocks, its tile of x; zeros unless `live`."""
    u0 = (step0 + i) * bku
    k_ok = u0 + jnp.arange(bku) < lay.units
    mask = None
    if masked_n or masked_k or live is not None:
      mask = ((n_ok[:, None] if masked_n else True) & (k_ok[None, :] if masked_k else True)
              & (True if live is None else live))
    codes = _load(packed_ref.at[(*lead, pl.ds(n0, tuning.block_n), pl.ds(u0, bku))], mask)
    return (codes, x_tile(u0, live)) if one_row else (codes,)

  def step(i, carry):
    acc, loaded = carry
    u0 = (step0 + i) * bku
    unit = u0 + jnp.arange(bku)
    k_ok = unit < lay.units
    if one_row:
      loaded, (codes, tile) = step_loads(i + 1, live=i + 1 < n_steps), loaded  # none past the last step
    else:
      (codes,) = step_loads(i)
      tile = None if _splits_x(tuning) else x_tile(u0)
    if lay.registers:
      values = _decode4(codes, row_regs if row_regs is not None else registers(u0 * per_unit // lay.group_size),
                        jnp.bfloat16 if paired else jnp.float32, whole_words=not _splits_x(tuning))
    else:
      codes = codes.astype(jnp.uint32)
      values = []
      for s in range(per_unit):
        code = codes >> (s * lay.bits) if s else codes
        if s < per_unit - 1:  # the top field needs no mask
          code = code & (entries - 1)
        book = book0[:, None]
        if lay.groups > 1:
          book = book + jnp.minimum((unit * per_unit + s) // lay.group_size, lay.groups - 1)[None, :]
        values.append(table_ref[book * entries + code.astype(jnp.int32)])  # [block_n, bku], from L1
    xs = x_slices(u0, k_ok) if tile is None else _deinterleave(tile, per_unit)
    if paired:
      xs, values = _pair_slices(xs), _pair_slices(values)
    for x, w in zip(xs, values):
      if use_dot:
        acc = acc + plgpu.dot(x, w.astype(x.dtype), trans_b=True,
                              precision=jax.lax.Precision.HIGHEST if f32 else None)
      elif one_row and lay.compiled:
        acc = _fma(jnp.broadcast_to(x.astype(jnp.float32), w.shape), w.astype(jnp.float32), acc)
      elif one_row:
        acc = acc + x.astype(jnp.float32) * w.astype(jnp.float32)  # [1, bku] against [block_n, bku]
      else:
        acc = acc + x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None, :, :]
    return acc, loaded

  # One row (decode's FMA blocks): a [block_n, bku] accumulator in the decoded weights' own layout.
  # A [1, block_n, bku] one made Triton move every decoded tile through shared memory, a store, a
  # load and two barriers each (offline compile, Triton 3.6, sm_90).
  shape = (tuning.block_m, tuning.block_n) if use_dot else (tuning.block_n, bku) if one_row else (
      tuning.block_m, tuning.block_n, bku)
  acc, _ = jax.lax.fori_loop(0, n_steps, step, (jnp.zeros(shape, jnp.float32), step_loads(0) if one_row else ()))
  return acc if use_dot else acc.sum(axis=-1)[None, :] if one_row else acc.sum(axis=-1)


def _partials_dtype(splits: int, dtype):
  """An unsplit launch writes the result itself; split partials are added in float32."""
  return dtype if splits == 1 else jnp.float32


def _sum_partials(partials: jax.Array, dtype) -> jax.Array:
  """[splits, rows, d_out] -> [rows, d_out] in dtype (no extra pass when unsplit)."""
  return partials[0] if partials.shape[0] == 1 else partials.sum(axis=0).astype(dtype)


def _params(tuning: LutTuning):
  return plgpu.CompilerParams(num_warps=tuning.num_warps, num_stages=tuning.num_stages)


@functools.partial(jax.jit, static_argnames=("bits", "tuning", "interpret"))
def lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
               tuning: LutTuning | None = None, interpret: bool = False) -> jax.Array:
  """x [m, d_in] times one codebook weight -> [m, d_out] in x's dtype (d_in = x.shape[1])."""
  m, d_in = x.shape
  d_out = check_codebook_operands("Pallas lut_matmul", x, packed, centroids, bits, d_in, ())
  tuning = tuning or default_tuning(max(m, 1), d_in, d_out, bits, x_dtype=x.dtype,
                                    group_size=d_in // centroids.shape[-2])
  lay = _layout(x, packed, centroids, bits, tuning, interpret)
  if m == 0:
    return jnp.zeros((0, d_out), x.dtype)
  total, per_split, splits = _k_steps(lay, tuning)
  bm, bn = tuning.block_m, tuning.block_n
  xs = _kernel_activations(x, lay, tuning, pl.cdiv(m, bm) * bm)
  masked_n, masked_k = d_out % bn != 0, lay.units % (tuning.block_k // lay.per_unit) != 0

  def kernel(xs_ref, packed_ref, table_ref, out_ref):
    pm, pn, ps = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pm * bm + jnp.arange(bm)
    cols = pn * bn + jnp.arange(bn)
    n_ok = cols < d_out
    acc = _accumulate(xs_ref, packed_ref, table_ref, lay=lay, expert=None, r0=pm * bm, row_limit=m, n0=pn * bn,
                      n_ok=n_ok, book0=jnp.minimum(cols, d_out - 1) * lay.groups, step0=ps * per_split,
                      n_steps=jnp.minimum(per_split, total - ps * per_split), tuning=tuning, masked_n=masked_n,
                      masked_k=masked_k)
    plgpu.store(out_ref.at[ps, pl.ds(pm * bm, bm), pl.ds(pn * bn, bn)], acc.astype(out_ref.dtype),
                mask=(rows < m)[:, None] & n_ok[None, :])

  partials = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, m, d_out), _partials_dtype(splits, x.dtype)),
      grid=(pl.cdiv(m, bm), pl.cdiv(d_out, bn), splits),
      compiler_params=_params(tuning), interpret=interpret, name="cqjax_lut_matmul",
  )(xs, _codes(packed, lay), _table(centroids, x.dtype, lay))
  return _sum_partials(partials, x.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "tuning", "interpret"))
def grouped_lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                       group_sizes: jax.Array, *, slots: jax.Array | None = None, tuning: LutTuning | None = None,
                       interpret: bool = False) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights -> [t, d_out] (x's dtype).

  The grid runs over min(t, experts) slots of non-empty experts; a slot walks its expert's rows
  in blocks of block_m, so an expert without rows costs one program that exits at once. slots:
  int32 [3, min(t, experts)], `cqjax.codebook.expert_slots` of group_sizes computed by the caller
  (the dispatcher passes the CUDA library's one-warp kernel's where built); None: XLA's, here.
  """
  t, d_in = x.shape
  e = packed.shape[0] if packed.ndim == 3 else -1
  d_out = check_codebook_operands("Pallas grouped_lut_matmul", x, packed, centroids, bits, d_in, (e,))
  if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise CqjaxError(f"Pallas grouped_lut_matmul: group_sizes must be integers [{e}], got "
                     f"{group_sizes.dtype}{group_sizes.shape}")
  n_slots = min(t, e)
  if slots is not None and (slots.shape != (3, n_slots) or slots.dtype != jnp.int32):
    raise CqjaxError(f"Pallas grouped_lut_matmul: slots must be int32 [3, {n_slots}] (expert_slots of group_sizes), "
                     f"got {slots.dtype}{slots.shape}")
  tuning = tuning or default_grouped_tuning(t, e, d_in, d_out, bits, x_dtype=x.dtype,
                                            group_size=d_in // centroids.shape[-2])
  lay = _layout(x, packed, centroids, bits, tuning, interpret)
  if t == 0:
    return jnp.zeros((0, d_out), x.dtype)
  total, per_split, splits = _k_steps(lay, tuning)
  bm, bn = tuning.block_m, tuning.block_n
  xs = _kernel_activations(x, lay, tuning, t + bm)  # a row block may run past the last row
  masked_n, masked_k = d_out % bn != 0, lay.units % (tuning.block_k // lay.per_unit) != 0
  slots = expert_slots(group_sizes, n_slots) if slots is None else slots

  def kernel(slots_ref, xs_ref, packed_ref, table_ref, out_ref):
    slot, pn, ps = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, start, count = (slots_ref[jnp.int32(i), slot] for i in range(3))
    cols = pn * bn + jnp.arange(bn)
    n_ok = cols < d_out
    book0 = (expert * d_out + jnp.minimum(cols, d_out - 1)) * lay.groups

    def row_block(rb, carry):
      r0 = start + rb * bm
      row_ok = r0 + jnp.arange(bm) < start + count
      acc = _accumulate(xs_ref, packed_ref, table_ref, lay=lay, expert=expert, r0=r0, row_limit=t, n0=pn * bn,
                        n_ok=n_ok, book0=book0, step0=ps * per_split,
                        n_steps=jnp.minimum(per_split, total - ps * per_split), tuning=tuning, masked_n=masked_n,
                        masked_k=masked_k)
      plgpu.store(out_ref.at[ps, pl.ds(r0, bm), pl.ds(pn * bn, bn)], acc.astype(out_ref.dtype),
                  mask=row_ok[:, None] & n_ok[None, :])
      return carry

    jax.lax.fori_loop(0, pl.cdiv(count, bm), row_block, 0)

    # Rows past the last group are zeroed here, by the slot that ends the groups (the last
    # non-empty one, or slot 0 when all are empty), so no XLA pass follows the launch (a reduce
    # of group_sizes and a select, 2-3 launches a call). Slots past the last are (0, 0, 0).
    end = start + count
    ends = (((slot == 0) | (count > 0))
            & ((slot == n_slots - 1) | (slots_ref[jnp.int32(2), jnp.minimum(slot + 1, n_slots - 1)] == 0)))

    def zero_block(rb, carry):
      r0 = end + rb * bm
      plgpu.store(out_ref.at[ps, pl.ds(r0, bm), pl.ds(pn * bn, bn)], jnp.zeros((bm, bn), out_ref.dtype),
                  mask=(r0 + jnp.arange(bm) < t)[:, None] & n_ok[None, :])
      return carry

    jax.lax.fori_loop(0, jnp.where(ends, pl.cdiv(t - end, bm), 0), zero_block, 0)

  grid = (n_slots, pl.cdiv(d_out, bn), splits)
  partials = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((splits, t, d_out), _partials_dtype(splits, x.dtype)), grid=grid,
      compiler_params=_params(tuning), interpret=interpret, name="cqjax_grouped_lut_matmul",
  )(slots, xs, _codes(packed, lay), _table(centroids, x.dtype, lay))
  return _sum_partials(partials, x.dtype)
