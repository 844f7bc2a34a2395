"""Thin JAX wrapper of the CUDA codebook matmul (lut_matmul.cu): loading, checks, tuning, ffi_call.

  lut_matmul:          x [m, d_in] @ (packed uint8 [d_out, d_in/2], centroids [d_out, 1, 16])
                       -> [m, d_out]
  grouped_lut_matmul:  x [t, d_in] rows sorted by expert, packed [e, d_out, d_in/2],
                       centroids [e, d_out, 1, 16], group_sizes int32 [e] -> [t, d_out]
                       (the `jax.lax.ragged_dot` contract; rows past the last group are zero)

The kernel covers the GPU serving case (`supports`): 4-bit codes, one codebook per output row
(CodeQuant's default), bf16 activations, d_in a multiple of 32. It computes what the Pallas
kernels compute: centroids rounded to bf16, bf16 products on the tensor cores with float32
accumulation, the result rounded to bf16 once. With K split over several blocks, the last block
of each column block adds the float32 partials in split order (deterministic, in the same launch).

The library `_lut_matmul_cuda.so` is built by `python -m cuda_kernels.build` (or by
`pip install -Ccmake.define.CQJAX_CUDA=ON`); `available()` is False without it or without a GPU.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.codebook import check_codebook_operands
from cqjax.errors import CqjaxError
from cuda_kernels.expert_slots import expert_slots

SUPPORTED_BITS = (4,)
LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lut_matmul_cuda.so")
_TARGET = "cqjax_cuda_lut_matmul"
_CHUNK = 128          # inputs per full chunk of the kernel's K loop
_WARPS = 4            # warps per block; a block owns 8 * nt columns per warp


@functools.cache
def library() -> ctypes.CDLL | None:
  """The loaded library (the handlers of this kernel, lut_matmul_int8 and expert_slots), or None
  where it is not built or a CUDA GPU is not the default backend."""
  if jax.default_backend() != "gpu" or not os.path.exists(LIBRARY):
    return None
  return ctypes.cdll.LoadLibrary(LIBRARY)


def register_target(target: str, symbol: str) -> bool:
  """Registers the library's handler `symbol` as the FFI target `target`: False where the library
  is not loaded (library()) or was built before that handler (rebuild it)."""
  lib = library()
  if lib is None or not hasattr(lib, symbol):
    return False
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
  return True


@functools.cache
def available() -> bool:
  """Whether the library is built and a CUDA GPU is the default backend (registers the target)."""
  return register_target(_TARGET, "CqjaxLutMatmulCuda")


def supports(x_dtype, bits: int, d_in: int, groups: int) -> bool:
  """Whether the kernel takes this product (else the dispatcher uses the Pallas kernels)."""
  return bits == 4 and jnp.dtype(x_dtype) == jnp.bfloat16 and groups == 1 and d_in % 32 == 0


# The (layout, kgroups, mt, nt) instantiated in lut_matmul.cu (its switch in LutMatmulImpl).
KERNELS = frozenset(
    [(2, 4, 1, 2), (2, 4, 1, 4)]
    + [(3, 4, mt, nt) for mt in (1, 2) for nt in (1, 2, 4)]
    + [(4, 4, mt, nt) for mt in (1, 2) for nt in (1, 2, 4)] + [(4, 4, 4, 1), (4, 4, 4, 2)]
    + [(4, 1, 1, nt) for nt in (1, 2, 4)]
    + [(5, 4, mt, 2) for mt in (1, 2, 4)] + [(5, 1, 1, 2)]
    + [(6, 4, mt, 2) for mt in (1, 2)]
    + [(7, kgroups, mt, 2) for kgroups in (4, 8, 16) for mt in (1, 2)]
    + [(8, 1, mt, nt) for mt in (1, 2) for nt in (2, 4, 8)])


@dataclasses.dataclass(frozen=True)
class CudaTuning:
  """mt: 16-row tiles of x per pass over the codes; nt: 8-column tiles per warp (a block owns
  32 * nt columns); splits: blocks along d_in; layout: the decode (lut_matmul.cu: 4 registers
  only, 5 the same with the weights as the tensor-core A operand and x as B, 3 half through 1
  KB-a-row pair tables in shared memory and half in registers, 6 layout 3 with 5's operands, 2 a
  timing probe without the decode, wrong results, 7 layout 5's decode with each warp holding one
  128-input chunk of x in registers and walking 16-column tiles); kgroups: warps per column warp
  that split the block's chunks (layout 7: warps a block, each one chunk); stage_x: copy each
  pass's rows of x over the block's K range into shared memory first, where they fit (else x is
  read from global memory). Layout 7 reads mt as 8-row tiles of x per pass, ignores nt and
  stage_x, and splits K by kgroups (ceil(chunks / kgroups) blocks: leave splits at 1); sum_once:
  layout 7 adds its warps' sums in as few groups of tiles as shared memory holds at the same
  blocks an SM (at best once, after all of a block's tiles; False: every 4 tiles; the same bits).
  Layout 8 (Hopper only: wgmma) multiplies 64 mt rows of x at a time, each weight decoded once
  per pass, nt / 2 warpgroups of 64 columns a block (kgroups 1), K split into `splits` blocks; it
  ignores stage_x.
  KERNELS lists the combinations built; the field defaults are layout 5's measured default."""

  mt: int = 1
  nt: int = 2
  splits: int = 1
  layout: int = 5
  kgroups: int = 4
  stage_x: bool = False
  sum_once: bool = True

  def __post_init__(self):
    if self.splits < 1 or (self.layout, self.kgroups, self.mt, self.nt) not in KERNELS:
      raise CqjaxError(f"CudaTuning out of range: {self} (built: splits >= 1 and (layout, kgroups, mt, nt) in "
                       f"{sorted(KERNELS)})")
    if self.layout == 7 and self.splits != 1:
      raise CqjaxError(f"CudaTuning: layout 7 splits K by kgroups (ceil(chunks / kgroups) blocks); leave splits at 1, "
                       f"got {self}")

  def k_splits(self, d_in: int) -> int:
    """Blocks along d_in of a launch with this tuning."""
    return -(-_chunks(d_in) // self.kgroups) if self.layout == 7 else self.splits


def _chunks(d_in: int) -> int:
  """128-input chunks of d_in, the last one partial (layout 7 gives each warp one)."""
  return max(1, -(-d_in // _CHUNK))


@functools.cache
def is_hopper() -> bool:
  """Whether the default GPU is an sm_90 one (layout 8's wgmma)."""
  return jax.default_backend() == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def prefill_rows(rows: int, d_in: int, d_out: int) -> bool:
  """Where layout 8 measured ahead of the Pallas kernels on the H200 (BENCHMARKS.md, sessions 26
  and 27): more than 48 rows a slot (three quarters of its 64-row pass), up to 512 where d_out >
  d_in (4096x14336), else up to 256 (14336x4096: it lost at 512); Mixtral-size weights (2^25
  codes or more: at 4096x4096, 256 and 512 rows, it lost)."""
  return 48 < rows <= (512 if d_out > d_in else 256) and d_in * d_out >= 1 << 25


def default_tuning(rows: int, d_in: int, d_out: int, slots: int = 1, sms: int = 132,
                   hopper: bool | None = None) -> CudaTuning:
  """rows: rows of x per slot (per expert when grouped); slots: launched expert slots; hopper:
  whether layout 8 runs (None: is_hopper()).

  From the H200 runs (BENCHMARKS.md, sessions 21, 23, 26 and 27). On Hopper, prefill_rows take
  layout 8: passes of 64 rows (up to 64) or 128; 256 columns a block for 64-row passes where d_in >
  d_out (few column blocks), else 128; K split up to 8 ways so that the blocks number about one
  per SM. Layout 7 (each warp holds one chunk of x and walks the weight's column tiles) only where
  it measured ahead of layout 5 in the same run: one row a slot, at most two slots (a single
  weight, or a top-2 MoE at batch 1, whose slots are all busy: a persistent grid wastes the
  blocks of empty slots), d_in up to 4096 (K split at most two ways at 16 warps a block: longer K
  spends the gain on split sums) and d_out of 4096 or more (enough column tiles); 16 warps a
  block, fewer where K has fewer chunks or the (tile, K split) units would not give every SM one.
  Elsewhere layout 5: 64 columns a block, four warps per column warp splitting the chunks (16
  warps a block, one block an SM at 128 registers), x read from global memory, K split so that
  the blocks number about one per SM."""
  if (is_hopper() if hopper is None else hopper) and prefill_rows(rows, d_in, d_out):
    mt = 1 if rows <= 64 else 2
    t = CudaTuning(layout=8, kgroups=1, mt=mt, nt=8 if mt == 1 and d_in > d_out else 4)
    blocks = _column_blocks(d_out, t) * slots
    return dataclasses.replace(t, splits=max(1, min(8, d_in // 64, round(sms / blocks))))
  if rows == 1 and slots <= 2 and d_in <= 4096 <= d_out:
    chunks = _chunks(d_in)
    tiles = -(-d_out // 16) * slots
    units = lambda w: tiles * CudaTuning(layout=7, kgroups=w).k_splits(d_in)  # (tile, K split) pairs
    kgroups = next((w for w in (16, 8) if w <= chunks and units(w) >= sms), 4)
    return CudaTuning(layout=7, kgroups=kgroups)
  blocks = _column_blocks(d_out, CudaTuning()) * slots
  splits = max(1, min(d_in // _CHUNK, 16, round(sms / blocks)))
  return CudaTuning(mt=1 if rows <= 16 else 2, splits=splits)


def serves(rows: int, d_in: int, d_out: int, hopper: bool | None = None, experts: int | None = None) -> bool:
  """Whether the dispatcher's automatic choice takes this kernel over the Pallas ones: where it
  measured ahead. Decode, on weights of more than 2^24 codes: 2 to 8 rows of x per weight; for a
  grouped product (experts: its expert count; rows: all its t rows), t rows that more than half
  fill 8 or more experts (fewer experts: 2 rows a slot), up to 16 rows per expert slot
  (rows_per_slot). H100, BENCHMARKS.md sessions 49 and 50, Mixtral's experts: 3-18 % ahead at 2, 4
  and 8 rows, single and grouped; grouped slots of 10-16 rows ahead over the pair of expert
  products on two machines (14336x4096 14-22 %, 4096x14336 even to 3 %). Session 58, two layers of
  Mixtral's shapes end to end: slots of one or two rows decode 9 % faster on this kernel at
  batches 3 and 4 (6 and 8 rows over 8 experts), 0.8 % slower at batch 2 (4 rows). At one row
  Pallas' FMA blocks are ahead (5-23 %; on the H200 of session 44 they were behind for Mixtral's
  experts), and on single weights of 9-16 rows its tensor-core blocks (within 5 % either way at
  9-15 rows, 7-10 % ahead at 16). Smaller weights are launch-bound: at 4096x4096 (2^24 codes;
  attention) Pallas was faster at 15 of 17 points of 1-16 rows on two machines, 13 % less time
  summed over those of 2-8 rows, and its one-row kernel 2x at Qwen3's experts. On Hopper (hopper
  None: is_hopper()) also prefill_rows (layout 8; a grouped product's rows per slot). Elsewhere
  prefill tiles favour the Pallas kernels."""
  per_slot = rows if experts is None else rows_per_slot(rows, experts)
  if experts is None:
    decode = 2 <= rows <= 8
  else:  # more than half of 8 or more experts (measured at 8); fewer: 2 rows a slot, as before
    decode = (2 * rows > experts if experts >= 8 else per_slot >= 2) and per_slot <= 16
  if decode and d_in * d_out > 1 << 24:
    return True
  return (is_hopper() if hopper is None else hopper) and prefill_rows(per_slot, d_in, d_out)


def _column_blocks(d_out: int, tuning: CudaTuning) -> int:
  """Column blocks along d_out, each with its split counter: 16-column tiles in layout 7, else
  _WARPS warps of nt 8-column tiles (lut_matmul.cu's LutMatmulImpl checks the same count)."""
  return -(-d_out // (16 if tuning.layout == 7 else _WARPS * 8 * tuning.nt))


def rows_per_slot(t: int, experts: int) -> int:
  """The most rows of x one launch slot of a grouped product can hold: t rows over the
  min(t, experts) slots of non-empty experts, on average."""
  return max(1, -(-t // max(1, min(t, experts))))


def _call(x, packed, centroids, slots, tuning: CudaTuning):
  """packed [e, n, d_in/2], centroids [e, n, 1, 16], slots int32 [3, s] -> [t, n] bf16 (rows no
  slot covers are zero)."""
  t, n = x.shape[0], packed.shape[-2]
  splits = tuning.k_splits(x.shape[1])
  blocks = _column_blocks(n, tuning)  # counted in per split launch
  split = splits > 1  # only split launches use the float32 partials and the block counters
  partials = (splits, t, n) if split else (1, 1, 1)
  counters = jnp.zeros((slots.shape[1] * blocks if split else 1,), jnp.int32)
  out = (jax.ShapeDtypeStruct((t, n), jnp.bfloat16), jax.ShapeDtypeStruct(partials, jnp.float32),
         jax.ShapeDtypeStruct(counters.shape, jnp.int32))
  # Only a split launch counts in, so only it needs the counters zeroed (aliased: a fresh zero
  # buffer every call); otherwise they stay an unused constant and XLA zeroes nothing.
  aliases = {4: 2} if split else {}
  y, _, _ = jax.ffi.ffi_call(_TARGET, out, input_output_aliases=aliases, vmap_method="sequential")(
      x, packed, centroids.reshape(*packed.shape[:2], 16).astype(jnp.bfloat16), slots, counters,
      splits=np.int64(splits), mt=np.int64(tuning.mt), nt=np.int64(tuning.nt), layout=np.int64(tuning.layout),
      kgroups=np.int64(tuning.kgroups), stage=np.int64(tuning.stage_x),
      sum_once=np.int64(tuning.sum_once))
  return y


def check_call(op: str, x, packed, centroids, bits: int, lead: tuple, ready: bool, takes, needs: str,
               group_sizes=None) -> int:
  """The checks of a call into the library (this kernel's and lut_matmul_int8's): `ready` (the
  library loaded and the target registered), the codebook operands and the group sizes of a
  grouped call, then takes(x dtype, bits, d_in, groups), whose refusal says what the kernel
  `needs`. Returns d_out."""
  if not ready:
    raise CqjaxError(f"{op}: the CUDA kernel library is not available (build it with python -m cuda_kernels.build; "
                     "it needs a CUDA GPU backend)")
  n = check_codebook_operands(op, x, packed, centroids, bits, x.shape[-1], lead)
  if group_sizes is not None and (group_sizes.shape != lead or not jnp.issubdtype(group_sizes.dtype, jnp.integer)):
    raise CqjaxError(f"{op}: group_sizes must be integers {list(lead)}, got {group_sizes.dtype}{group_sizes.shape}")
  if not takes(x.dtype, bits, x.shape[-1], centroids.shape[-2]):
    raise CqjaxError(f"{op}: takes {needs}; got {bits}-bit codes, {centroids.shape[-2]} groups, {x.dtype} x, "
                     f"d_in={x.shape[-1]}")
  return n


def _check(op, x, packed, centroids, bits, lead, group_sizes=None):
  return check_call(op, x, packed, centroids, bits, lead, available(), supports,
                    "4-bit codes, one codebook per row, bf16 x and d_in % 32 == 0", group_sizes)


@functools.partial(jax.jit, static_argnames=("bits", "tuning"))
def lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
               tuning: CudaTuning | None = None) -> jax.Array:
  """x [m, d_in] (bf16) times one codebook weight -> [m, d_out] (bf16)."""
  m, d_in = x.shape
  n = _check("CUDA lut_matmul", x, packed, centroids, bits, ())
  if m == 0:
    return jnp.zeros((0, n), x.dtype)
  tuning = tuning or default_tuning(m, d_in, n)
  slots = jnp.asarray([[0], [0], [m]], jnp.int32)
  return _call(x, packed[None], centroids[None], slots, tuning)


@functools.partial(jax.jit, static_argnames=("bits", "tuning"))
def grouped_lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, group_sizes: jax.Array, *,
                       tuning: CudaTuning | None = None) -> jax.Array:
  """x [t, d_in] rows sorted by expert (bf16) times stacked codebook weights -> [t, d_out] (bf16)."""
  t, d_in = x.shape
  e = packed.shape[0] if packed.ndim == 3 else -1
  n = _check("CUDA grouped_lut_matmul", x, packed, centroids, bits, (e,), group_sizes)
  if t == 0:
    return jnp.zeros((0, n), x.dtype)
  slots = min(t, e)
  tuning = tuning or default_tuning(rows_per_slot(t, e), d_in, n, slots)
  return _call(x, packed, centroids, expert_slots(group_sizes, slots), tuning)
