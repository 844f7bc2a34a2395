"""Codebook matmuls through Pallas' Mosaic GPU backend, single and grouped over experts (Hopper).

The swapped product y^T = W x^T: a program decodes block_n rows of one weight in registers as
wgmma's A operand, and its slot's rows of x (up to `MAX_SLOT_ROWS`, padded to a multiple of 16)
sit in shared memory as B, so one decode serves every row of the slot and no decoded weight passes
through shared memory. Grid: (slot, block_n outputs, K share). A slot is up to MAX_SLOT_ROWS rows
of one expert (`row_block_slots`); slots without rows launch nothing. TMA pipelines each step's
codes and x tile; K shares add float32 partials. A row's codebook is read once a program; column
groups' (POG's layout) come with each step's codes (block_k must divide the group).

Decodes: "prmt" (DECODE4_PTX's byte permutes through inline PTX: each word's four bf16 pairs stay
in their thread's registers as WGMMA column tiles, x's columns permuted once to match,
`prmt_permutation`; compiled only) and "select" (a select tree over the 16 centroids, plain jnp:
it also runs in Mosaic GPU's interpreter, which the CPU tests use).

Pallas' Triton backend, which pallas_kernels/lut_matmul.py lowers through, is deprecated in jax 0.11;
Mosaic GPU is the backend that stays. Timings: BENCHMARKS.md, `experiments/probe_mosaic_lut.py`."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from cqjax.errors import CqjaxError
from cuda_kernels.lut_matmul import is_hopper
from pallas_kernels.decode4 import decode4_registers

SUPPORTED_BITS = (4,)
MAX_SLOT_ROWS = 256  # wgmma's largest N
MIN_ROWS = 128
_SM_COUNT = 132  # H100 SXM; H200 has as many


@dataclasses.dataclass(frozen=True)
class MgpuTuning:
  """block_n outputs a program (64 or 128: wgmma's M, one or two 64-row tiles), block_k inputs a
  pipeline step, `steps` steps in flight, k_splits shares of K (float32 partials)."""

  block_n: int = 64
  block_k: int = 128
  steps: int = 2
  k_splits: int = 1
  decode: str = "prmt"

  def __post_init__(self):
    if self.decode not in ("select", "prmt"):
      raise CqjaxError(f"MgpuTuning.decode must be 'select' or 'prmt', got {self.decode!r}")
    if self.block_n not in (64, 128) or self.block_k % 32 or self.block_k <= 0 or self.steps < 1 or self.k_splits < 1:
      raise CqjaxError(f"MgpuTuning({self}): block_n 64 or 128, block_k a positive multiple of 32, steps and "
                       "k_splits at least 1")


def slot_rows(t: int) -> int:
  """The rows of x one slot holds for t rows: a multiple of 16 (wgmma's N), at most MAX_SLOT_ROWS."""
  return min(MAX_SLOT_ROWS, max(16, -(-t // 16) * 16))


def default_tuning(t: int, d_in: int, d_out: int, slots: int = 1, interpret: bool = False) -> MgpuTuning:
  """Measured on an H100 (BENCHMARKS.md, session 64): 256-input steps for slots of up to 64 rows,
  128 beyond (two steps of 256 rows x 256 inputs overflow shared memory); K split until the
  programs fill the SMs."""
  block_k = 256 if slot_rows(t) <= 64 and d_in % 256 == 0 else 128
  programs = slots * (d_out // 64)
  k_splits = 1
  while programs * k_splits < _SM_COUNT and d_in % (block_k * k_splits * 2) == 0 and k_splits < 4:
    k_splits *= 2
  return MgpuTuning(block_k=block_k, k_splits=k_splits, decode="select" if interpret else "prmt")


def serves(rows: int, d_in: int, d_out: int, triton: bool = True) -> bool:
  """Whether cqjax.lut_matmul's automatic choice takes these kernels for `rows` rows of x a weight
  (or an expert slot, on average), where the CUDA library does not serve. Beside Pallas' Triton
  kernels (triton=True): MIN_ROWS to MAX_SLOT_ROWS rows (one slot) of weights of 2^25 codes or more.
  H100, BENCHMARKS.md sessions 63 and 64, 4096x14336: at 128 rows 43.0 us against the Triton
  kernels' 85.5 (bf16 dot 45.2); at 16 rows even (28.7 against 28.2), at one row behind (29.4
  against 20.6). Without them (triton=False; the alternative is the reference): up to
  MAX_SLOT_ROWS rows. Longer slots (prefill rows past 256) and smaller weights are not timed yet."""
  if rows > MAX_SLOT_ROWS:
    return False
  return not triton or (rows >= MIN_ROWS and d_in * d_out >= 1 << 25)


def supports(bits: int, x_dtype, d_in: int, d_out: int, groups: int) -> bool:
  """Whether these kernels take the product: 4-bit codes, bf16 x, d_out a multiple of 64, d_in of
  128, and column groups (if any) of a multiple of 128 inputs."""
  return (bits == 4 and jnp.dtype(x_dtype) == jnp.bfloat16 and d_out % 64 == 0 and d_in % 128 == 0
          and d_in % groups == 0 and (groups == 1 or (d_in // groups) % 128 == 0))


def available() -> bool:
  """Whether the default backend is a Hopper GPU (wgmma), as the CUDA library's wgmma layouts ask."""
  return is_hopper()


def _transforms(minor: int, bits: int) -> tuple:
  """Shared-memory tiling (and swizzle, where a row spans 32 bytes or more) for tiles of `minor`
  elements of `bits` bits a row, as TMA and wgmma read them."""
  sw = plgpu.find_swizzle(minor * bits)
  t = (plgpu.TilingTransform((8, sw * 8 // bits)),)
  return t if sw == 16 else t + (plgpu.SwizzleTransform(sw),)


def x_columns(k: int, decode: str) -> np.ndarray:
  """x's column at each row of wgmma's B: the select decode multiplies the low nibbles (even
  inputs) and then the high ones (odd), the byte-permute decode as prmt_permutation places them."""
  if decode == "select":
    return np.concatenate([np.arange(0, k, 2), np.arange(1, k, 2)])
  return prmt_permutation(k)


def row_block_slots(group_sizes: jax.Array, slots: int, rows: int) -> jax.Array:
  """int32 [3, slots]: (expert, first row, rows) of each block of up to `rows` consecutive rows of
  one expert (the ragged_dot contract: rows sorted by expert), experts in order; slots past the
  last block are (0, 0, 0), so empty experts launch nothing. With rows >= every group this is
  cqjax.codebook.expert_slots' table."""
  gs = group_sizes.astype(jnp.int32)
  blocks, first_slot, first_row = _expert_blocks(gs, rows)
  ends = first_slot + blocks
  s = jnp.arange(slots, dtype=jnp.int32)
  used = s < ends[-1]
  expert = jnp.where(used, jnp.sum(ends[None, :] <= s[:, None], axis=1, dtype=jnp.int32), 0)
  within = s - first_slot[expert]  # the block's place in its expert's rows
  first = jnp.where(used, first_row[expert] + within * rows, 0)
  count = jnp.where(used, jnp.clip(gs[expert] - within * rows, 0, rows), 0)
  return jnp.stack([expert, first, count]).astype(jnp.int32)


def _expert_blocks(gs: jax.Array, rows: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each expert's blocks of up to `rows` rows, the slot of its first block, and its first row
  (int32 [e] each): what row_block_slots lays out and the grouped output gathers back."""
  blocks = (gs + rows - 1) // rows
  return blocks, jnp.cumsum(blocks) - blocks, jnp.cumsum(gs) - gs


def _check(x, packed, centroids, bits, tuning: MgpuTuning, interpret: bool):
  t, k = x.shape
  n, groups = packed.shape[-2], centroids.shape[-2]
  what = f"x {x.shape} {x.dtype}, codes {packed.shape}, codebooks {centroids.shape}, {bits}-bit, {tuning}"
  if tuning.decode == "prmt" and interpret:
    raise CqjaxError(f"Mosaic GPU codebook matmul: decode='prmt' runs compiled only (inline PTX); the interpreter "
                     f"takes decode='select' ({what})")
  if bits not in SUPPORTED_BITS or packed.shape[-1] * 2 != k or centroids.shape[-1] != 16:
    raise CqjaxError(f"Mosaic GPU codebook matmul takes 4-bit codes [.., n, d_in/2] and 16-entry codebooks ({what})")
  group = k // groups if k % groups == 0 else 0
  if (n % tuning.block_n or k % (tuning.block_k * tuning.k_splits) or not group
      or (groups > 1 and group % tuning.block_k)):
    raise CqjaxError(f"Mosaic GPU codebook matmul: d_out={n} must be a multiple of block_n={tuning.block_n}, "
                     f"d_in={k} of block_k x k_splits = {tuning.block_k * tuning.k_splits}, and block_k must divide "
                     f"each of the {groups} codebook groups ({what})")
  if t and jnp.dtype(x.dtype) != jnp.bfloat16:
    raise CqjaxError(f"Mosaic GPU codebook matmul multiplies bf16 x, got {x.dtype} ({what})")


def grouped_lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, group_sizes: jax.Array, *,
                       tuning: MgpuTuning | None = None, interpret: bool = False) -> jax.Array:
  """x [t, d_in] rows sorted by expert @ (packed uint8 [e, n, d_in/2] of 4-bit codes, centroids
  [e, n, groups, 16]: a codebook a row or a column group of d_in / groups inputs) by group_sizes
  int32 [e] -> [t, n] (the ragged_dot contract: rows past the last group are zero)."""
  t, k = x.shape
  e, n = packed.shape[:2]
  mp = slot_rows(t)
  slots = min(e, t) + (t // mp if t > mp else 0)  # blocks of mp rows: at most one partial one an expert
  tuning = tuning or default_tuning(t, k, n, slots, interpret)
  _check(x, packed, centroids, bits, tuning, interpret)
  if t == 0:
    return jnp.zeros((0, n), x.dtype)
  table = row_block_slots(group_sizes, slots, mp)
  j = jnp.arange(mp)
  xs = jnp.where((j < table[2][:, None])[..., None], x[jnp.minimum(table[1][:, None] + j, t - 1)], 0)
  out = _call(table, xs, packed, centroids, tuning, interpret)  # [k_splits, slots, n, mp]
  # Row r: its expert's first block, the block within it, and its place in the block.
  gs = group_sizes.astype(jnp.int32)
  _, first_slot, first_row = _expert_blocks(gs, mp)
  ends = first_row + gs
  r = jnp.arange(t)
  expert_r = jnp.minimum(jnp.sum(r[:, None] >= ends[None, :], axis=1), e - 1)
  at = r - first_row[expert_r]
  slot_r = first_slot[expert_r] + at // mp
  y = out[:, jnp.minimum(slot_r, slots - 1), :, at % mp]  # [t, k_splits, n]
  y = jnp.where((r < ends[-1])[:, None, None], y.astype(jnp.float32), 0).sum(1)
  return y.astype(x.dtype)


def lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
               tuning: MgpuTuning | None = None, interpret: bool = False) -> jax.Array:
  """x [m, d_in] @ (packed uint8 [n, d_in/2], centroids [n, groups, 16]) -> [m, n]: blocks of up
  to MAX_SLOT_ROWS rows of x: a constant slot table, x padded, no rows gathered."""
  m, k = x.shape
  n = packed.shape[0]
  mp = slot_rows(m)
  slots = -(-m // mp)
  tuning = tuning or default_tuning(m, k, n, slots, interpret)
  _check(x, packed, centroids, bits, tuning, interpret)
  if m == 0:
    return jnp.zeros((0, n), x.dtype)
  first = np.arange(slots, dtype=np.int32) * mp  # known while tracing: a constant, no XLA work
  table = jnp.asarray(np.stack([np.zeros_like(first), first, np.minimum(mp, m - first)]))
  xs = jnp.pad(x, ((0, slots * mp - m), (0, 0))).reshape(slots, mp, k)
  out = _call(table, xs, packed[None], centroids[None], tuning, interpret)  # [k_splits, slots, n, mp]
  y = out[0] if tuning.k_splits == 1 else out.sum(0)  # K shares: float32 partials
  return y.transpose(0, 2, 1).reshape(slots * mp, n)[:m].astype(x.dtype)


def _call(table, xs, packed, centroids, tuning: MgpuTuning, interpret: bool):
  """table int32 [3, slots] (expert, first row, rows), xs [slots, mp, k] (the slots' rows of x,
  zero past each slot's rows), packed [e, n, k/2], centroids [e, n, groups, 16] -> the
  [k_splits, slots, n, mp] products of each slot's rows (x's dtype; float32 with K shares)."""
  slots, mp, k = xs.shape
  e, n = packed.shape[:2]
  groups = centroids.shape[2]
  group_size = k // groups
  decode, block_n, block_k, k_splits = tuning.decode, tuning.block_n, tuning.block_k, tuning.k_splits
  step_k = block_k // 2 if decode == "select" else block_k  # B rows a wgmma of a step
  k_steps = k // block_k // k_splits
  xs = xs[:, :, x_columns(k, decode)].transpose(0, 2, 1)  # [slots, k, mp]
  if decode == "select":
    codes, tab = packed, centroids.astype(xs.dtype).transpose(0, 2, 3, 1)  # [e, groups, 16, n]
  else:
    codes = jax.lax.bitcast_convert_type(packed, jnp.uint4).reshape(e, n, k)
    tab = jnp.stack(decode4_registers([centroids[..., i] for i in range(16)]), axis=2)  # [e, n, 8, groups] uint32
    tab = tab.transpose(0, 3, 2, 1)  # [e, groups, 8, n]
  tab = tab[:, 0] if groups == 1 else tab
  tab_rows = tab.shape[-2]
  out_dtype = xs.dtype if k_splits == 1 else jnp.float32
  wg = plgpu.Layout.WGMMA
  row = wg.reduce(1)
  lc = (lambda a, _: a) if interpret else plgpu.layout_cast  # the interpreter has no layouts

  def load_tables(ref, lead=()):
    if decode == "select":
      return [lc(ref[(*lead, i)], row) for i in range(16)]
    return [plgpu.load(ref, (*lead, i, slice(None)), layout=row) for i in range(8)]

  def select_step(acc_ref, table, c_smem, xe_smem, xo_smem, a_smem):
    def decode_half(v):
      lvl = [lax.broadcast_in_dim(c, v.shape, (0,)) for c in table]
      for b in range(4):
        bit = ((v >> b) & 1) == 1
        lvl = [jnp.where(bit, lvl[2 * i + 1], lvl[2 * i]) for i in range(len(lvl) // 2)]
      return lvl[0]

    def operand(w, i):
      if not a_smem:
        return w
      a_smem[0][i] = w  # the interpreter's wgmma reads A from shared memory only
      return a_smem[0].at[i]

    v = lc(c_smem[...], wg).astype(jnp.int32)
    plgpu.wgmma(acc_ref, operand(decode_half(v & 15), 0), xe_smem)
    plgpu.wgmma(acc_ref, operand(decode_half(v >> 4), 1), xo_smem)

  dec = None if decode == "select" else _prmt_decoder(block_n, block_k)

  def kernel(slot_gmem, codes_gmem, tab_gmem, x_gmem, o_gmem, *scratch):
    s, ni, si = lax.axis_index("slot"), lax.axis_index("n"), lax.axis_index("s")
    expert = slot_gmem[0, s]
    first = si * k_steps
    a_smem = scratch[2:] if groups == 1 else scratch

    @pl.when(slot_gmem[2, s] > 0)
    def _():
      if groups == 1:
        tab_smem, bar = scratch[:2]
        plgpu.copy_gmem_to_smem(tab_gmem.at[expert, :, pl.ds(ni * block_n, block_n)], tab_smem, bar)
        plgpu.barrier_wait(bar)
      x_spec = lambda base: plgpu.BlockSpec((step_k, mp), lambda kk: (base + first + kk, 0),
                                            transforms=_transforms(mp, 16))
      if decode == "select":
        specs = [plgpu.BlockSpec((block_n, step_k), lambda kk: (ni, first + kk), transforms=_transforms(step_k, 8)),
                 x_spec(0), x_spec(k // 2 // step_k)]
        operands = [codes_gmem.at[expert], x_gmem.at[s], x_gmem.at[s]]
      else:
        specs = [plgpu.BlockSpec((block_n, block_k), lambda kk: (ni, first + kk), transforms=_transforms(block_k, 4)),
                 x_spec(0)]
        operands = [codes_gmem.at[expert], x_gmem.at[s]]
      if groups > 1:  # this step's group's codebooks
        specs.append(plgpu.BlockSpec((1, tab_rows, block_n), lambda kk: ((first + kk) * block_k // group_size, 0, ni)))
        operands.append(tab_gmem.at[expert])

      def acc_scope(acc_ref):
        fixed = load_tables(tab_smem) if groups == 1 else None

        def body(_, c_smem, *refs):
          table = fixed if groups == 1 else load_tables(refs[-1], (0,))
          x_refs = refs if groups == 1 else refs[:-1]
          if decode == "select":
            select_step(acc_ref, table, c_smem, *x_refs, a_smem)
          else:
            plgpu.wgmma(acc_ref, dec(plgpu.load(c_smem, (), layout=plgpu.Layout.WGMMA_UPCAST_4X), *table), x_refs[0])
          plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(body, grid=(k_steps,), in_specs=specs, max_concurrent_steps=tuning.steps)(*operands)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((block_n, mp)))
      o_gmem[si, s, pl.ds(ni * block_n, block_n), :] = acc.astype(o_gmem.dtype)

  kwargs = {}
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
    kwargs["interpret"] = InterpretGPUParams()
  f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((k_splits, slots, n, mp), out_dtype),
                   grid=(slots, n // block_n, k_splits), grid_names=("slot", "n", "s"),
                   scratch_types=([plgpu.SMEM((tab_rows, block_n), tab.dtype), plgpu.Barrier()] if groups == 1 else [])
                   + ([plgpu.SMEM((2, block_n, step_k), xs.dtype)] if interpret else []), **kwargs)
  return f(table, codes, tab, xs)


def _prmt_decoder(block_n, kt):
  """An inline_mgpu function: codes uint4 [block_n, kt] (WGMMA_UPCAST_4X: a thread's word of eight
  codes of one row) and DECODE4_PTX's eight table registers of its rows -> bf16 [block_n, kt] in the
  WGMMA layout, each word's four bf16 pairs put where the layout has that thread's pairs of four
  8-column tiles (x's columns permuted to match: prmt_permutation)."""
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir.dialects import arith, llvm  # pylint: disable=g-import-not-at-top
  from jax.experimental.mosaic import gpu as mgpu  # pylint: disable=g-import-not-at-top
  from pallas_kernels.decode4 import DECODE4_PTX, DECODE4_SELECTORS  # pylint: disable=g-import-not-at-top
  up4, wg = plgpu.Layout.WGMMA_UPCAST_4X, plgpu.Layout.WGMMA
  row = wg.reduce(1)

  @plgpu.inline_mgpu(arg_types=(up4,) + (row,) * 8,
                     return_type=plgpu.ShapeDtypeStruct((block_n, kt), jnp.bfloat16, layout=wg))
  def decode(ctx, codes, *tables):
    del ctx
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    bf2 = ir.VectorType.get((2,), ir.BF16Type.get())
    out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape((block_n, kt)), dtype=object)
    for idx in np.ndindex(codes.registers.shape):
      word = mgpu.utils.bitcast(codes.registers[idx], i32)
      regs = [mgpu.utils.bitcast(t.registers[table_register(idx)], i32) for t in tables]
      sel = llvm.inline_asm(i64, [word], DECODE4_SELECTORS[0], "=l,r")
      for half in range(2):
        four = llvm.inline_asm(i64, [sel, *regs], DECODE4_PTX[half], "=l,l," + ",".join(["r"] * 8))
        pairs = (arith.trunci(i32, four), arith.trunci(i32, arith.shrui(four, arith.constant(i64, 32))))
        for q, pair in enumerate(pairs):
          out[pair_register(idx, 2 * half + q)] = mgpu.utils.bitcast(pair, bf2)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode


def table_register(word_register: tuple) -> tuple:
  """The register of a rows' vector (WGMMA's row layout) holding the codebook of the row whose word
  sits at `word_register` of WGMMA_UPCAST_4X: same 64-row tile, same row half."""
  return (word_register[0], 0, word_register[4], 0, 0)


def pair_register(word_register: tuple, pair: int) -> tuple:
  """Where the prmt decoder puts bf16 pair `pair` (codes 2*pair, 2*pair + 1) of the word at register
  index `word_register` of WGMMA_UPCAST_4X: the same thread's WGMMA register of column tile
  4 * (word's 32-column block) + pair, same row half."""
  o = list(word_register)
  o[1] = 4 * word_register[1] + pair
  return tuple(o)


def prmt_permutation(k):
  """x's column at B row 32b + 8p + 2c + v: the code at 32b + 8c + 2p + v (thread c's word, pair p)."""
  j = np.arange(k)
  b, p, c, v = j // 32, j % 32 // 8, j % 8 // 2, j % 2
  return 32 * b + 8 * c + 2 * p + v
