"""Thin JAX wrapper of the CUDA codebook matmul with int8 numerics (lut_matmul_int8.cu).

  lut_matmul_int8:          x [m, d_in] @ (packed uint8 [d_out, d_in/2], centroids [d_out, 1, 16])
                            -> [m, d_out]
  grouped_lut_matmul_int8:  x [t, d_in] rows sorted by expert, packed [e, d_out, d_in/2],
                            centroids [e, d_out, 1, 16], group_sizes int32 [e] -> [t, d_out]
                            (the `jax.lax.ragged_dot` contract; rows past the last group are zero)

It computes `cqjax.lut_matmul.lut_matmul_int8_reference`, the numerics of the CPU kernel's int8
path: x rows and each row's codebook rounded to int8 (absmax / 127; x's in XLA, so it can fuse
with x's producer, the codebooks' in the kernel, only those of the rows it multiplies), exact
int32 dot products, y = (sc * dot) * sx in float32, written in x's dtype.
4-bit codes, one codebook per row, d_in a multiple of 32 (`supports`).

The dispatcher (cqjax/lut_matmul.py) takes it under CQJAX_KERNELS=int8 for decode batches;
measured on an H200 in BENCHMARKS.md (session 29).
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.errors import CqjaxError
from cqjax.lut_matmul import int8_round
from cuda_kernels import lut_matmul as cuda
from cuda_kernels.expert_slots import expert_slots

_TARGET = "cqjax_cuda_lut_matmul_int8"
MAX_D_IN = 133143  # |dot| <= d_in * 127 * 127 stays within int32

# Codebook and output dtypes the kernel reads and writes itself (others go through float32).
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

# The (warps, mt) instantiated in lut_matmul_int8.cu (its switch in LutMatmulInt8Impl): the
# mma.sync kernel's, and the Hopper wgmma kernel's (warps / 4 warpgroups, 8 mt rows of x a block).
KERNELS = frozenset((warps, mt) for warps in (4, 8, 16) for mt in (1, 2))
WGMMA_KERNELS = frozenset({(4, 4), (4, 8), (8, 8), (4, 16), (8, 16)})

# Rows a weight or expert slot the mma.sync kernel serves off Hopper (CQJAX_KERNELS=int8): those of
# one pass over the codes (more stream the codes again per pass); on Hopper the wgmma kernel takes
# more (`serves`).
MAX_ROWS = 8 * max(mt for _, mt in KERNELS)

# Inputs of one stage of the wgmma kernel (kWg8Inputs): x is padded to whole stages and permuted
# within each (wg_order).
_WG_STAGE = 128

# d_in from which a single weight's 16 warps each get at least 4 of the kernel's 128-input chunks
# (kChunk8) a column tile: 8192.
_SIXTEEN_WARPS_D_IN = 16 * 4 * 128

# Blocks of the wgmma kernel that fill the GPU well enough, a share of its SMs: below, a candidate
# with more, smaller blocks won (H200, 132 SMs: 119).
_WGMMA_FILL = 0.9

# A single weight's wgmma blocks, a share of the SMs, short of which K is split (H200: 198; the
# winners at n = 4096 had 256 blocks, two an SM), and the fewest 128-input stages a split keeps.
_SPLIT_FILL = 1.5
_MIN_SPLIT_STAGES = 4


@dataclasses.dataclass(frozen=True)
class Int8Tuning:
  """warps: warps a block, splitting K by 128-input chunks (a block owns 16 output columns);
  mt: 8-row tiles of x a pass over the codes (each code decoded once a pass); persistent: as many
  blocks as are resident at once, each looping over column tiles with its code loads running on
  across them (else one block a tile); wgmma: the Hopper prefill kernel instead, warps / 4
  warpgroups of 64 columns and 8 mt rows of x a block (WGMMA_KERNELS; never persistent)."""

  warps: int = 8
  mt: int = 1
  persistent: bool = False
  wgmma: bool = False
  splits: int = 1

  def __post_init__(self):
    built = WGMMA_KERNELS if self.wgmma else KERNELS
    if ((self.warps, self.mt) not in built or (self.wgmma and self.persistent) or self.splits < 1
        or (self.splits > 1 and not self.wgmma)):
      raise CqjaxError(f"Int8Tuning out of range: {self} (built: (warps, mt) in {sorted(KERNELS)}; "
                       f"wgmma, not persistent, K split 1+ ways: {sorted(WGMMA_KERNELS)})")

  @property
  def spec(self) -> str:
    """The tuning as the scripts spell it: warps/mt, then p (persistent) or w (the wgmma kernel) and
    its K splits past 1: '8/2p', '4/16w2'."""
    return f"{self.warps}/{self.mt}{'p' if self.persistent else ''}{'w' if self.wgmma else ''}{self.splits if self.splits > 1 else ''}"

  @classmethod
  def parse(cls, spec: str) -> Int8Tuning:
    """The inverse of `spec`."""
    m = re.fullmatch(r"(\d+)/(\d+)(p?)(w?)(\d*)", spec.strip())
    if m is None or (m[5] and not m[4]):
      raise CqjaxError(f"int8 tuning {spec!r} is not warps/mt[p] or warps/mtw[splits], e.g. 8/2p, 4/16w2")
    return cls(int(m[1]), int(m[2]), bool(m[3]), bool(m[4]), int(m[5] or 1))


# Every tuning built: each (warps, mt), one block a tile or persistent, and the wgmma kernels
# (sweeps and tests).
TUNINGS = (tuple(Int8Tuning(warps, mt, persistent) for warps, mt in sorted(KERNELS) for persistent in (False, True))
           + tuple(Int8Tuning(warps, mt, wgmma=True, splits=s) for warps, mt in sorted(WGMMA_KERNELS) for s in (1, 2, 4)))


def _sm_count() -> int:
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)  # 132: H100 / H200 SXM


def _wgmma_tuning(rows: int, d_in: int, d_out: int, grouped: bool, sms: int) -> Int8Tuning:
  """The wgmma kernel for `rows` rows a slot. Grouped experts (slots give blocks enough): up to 32
  rows one warpgroup, 32-row blocks; past that 2 warpgroups, 128-row blocks. A single weight:
  32-, 64- or 128-row blocks, the fewest that hold its rows (more row blocks decode each code
  again; half-empty ones cost their tensor work), 2 warpgroups past 32 rows where their blocks
  still fill the GPU (they share one copy of x, which every column block reads from L2), then K
  split 2 or 4 ways until the blocks number _SPLIT_FILL of the SMs (a block's time is its stage
  count; each split keeps _MIN_SPLIT_STAGES stages). H200, BENCHMARKS.md sessions 33 and 34: the
  best measured, or within 1 % of it, at all twelve Mixtral single shapes of 32-512 rows."""
  if grouped:
    return Int8Tuning(warps=4, mt=4, wgmma=True) if rows <= 32 else Int8Tuning(warps=8, mt=16, wgmma=True)
  mt = 4 if rows <= 32 else 8 if rows <= 64 else 16
  row_blocks = -(-rows // (8 * mt))
  warps = 8 if mt > 4 and -(-d_out // 128) * row_blocks >= _WGMMA_FILL * sms else 4
  blocks, stages = -(-d_out // (16 * warps)) * row_blocks, -(-d_in // _WG_STAGE)
  splits = 1
  while splits < 4 and blocks * splits < _SPLIT_FILL * sms and stages >= 2 * splits * _MIN_SPLIT_STAGES:
    splits *= 2
  return Int8Tuning(warps=warps, mt=mt, wgmma=True, splits=splits)


def serves(rows: int, hopper: bool | None = None) -> bool:
  """Whether CQJAX_KERNELS=int8 takes this kernel for `rows` rows a weight or expert slot: up to
  MAX_ROWS, and on Hopper (hopper None: the default GPU's) any number (the wgmma kernel, ahead of
  the bf16 kernels' layout 8 at every prefill shape measured, BENCHMARKS.md session 33)."""
  return rows <= MAX_ROWS or (cuda.is_hopper() if hopper is None else hopper)


def default_tuning(rows: int, d_in: int, d_out: int, grouped: bool = False, hopper: bool | None = None,
                   sms: int | None = None) -> Int8Tuning:
  """The mma.sync kernel, one pass over the codes, for up to 16 rows a slot. A single weight: a
  persistent grid (its at most ~900 column tiles) of 8 warps a block; for up to 8 rows and d_in >=
  8192 (4+ chunks a warp) 16 warps, two blocks an SM (14336x4096's 256 column tiles left a third of
  the GPU's 8-warp block slots idle; ncu: 17.7 -> 15.0 us). Grouped experts: 4 warps a block, one
  block a tile (slots x tiles blocks are plenty, a persistent grid balanced uneven slots badly, and
  8 warps left some idle on d_in = 768). Measured on an H200, BENCHMARKS.md sessions 30 and 32.
  On Hopper (hopper None: the default GPU's; sms: its SMs) the wgmma kernel past 16 rows a single
  weight or 8 an expert slot (_wgmma_tuning)."""
  if rows > (8 if grouped else MAX_ROWS) and (cuda.is_hopper() if hopper is None else hopper):
    return _wgmma_tuning(rows, d_in, d_out, grouped, sms or _sm_count())
  mt = 1 if rows <= 8 else 2
  if grouped:
    return Int8Tuning(warps=4, mt=mt, persistent=False)
  return Int8Tuning(warps=16 if mt == 1 and d_in >= _SIXTEEN_WARPS_D_IN else 8, mt=mt, persistent=True)


@functools.cache
def available() -> bool:
  """Whether the CUDA library is built and a CUDA GPU is the default backend (registers the target)."""
  return cuda.register_target(_TARGET, "CqjaxLutMatmulInt8Cuda")


def supports(bits: int, d_in: int, groups: int) -> bool:
  """Whether the kernel takes this product: 4-bit codes, one codebook per row, d_in a multiple of
  32 up to MAX_D_IN (x of any float dtype: it is rounded to int8 first)."""
  return bits == 4 and groups == 1 and d_in % 32 == 0 and d_in <= MAX_D_IN


def wg_order(xq: jax.Array) -> jax.Array:
  """x [t, k] -> [t, k padded to whole 128-input stages] in the wgmma kernel's order: within each
  stage, input 32 l + 8 j + 4 h + i (lane l's codes, k32 step j, half h) at 32 j + 16 h + 4 l + i,
  where wgmma reads the B operand of lane l's A registers (mma.sync m16n8k32's A: k 4 l ... and
  16 + 4 l ...). Padding is zeros, so a stage's missing inputs add nothing."""
  t, k = xq.shape
  kp = -(-k // _WG_STAGE) * _WG_STAGE
  xq = jnp.pad(xq, ((0, 0), (0, kp - k))).reshape(t, kp // _WG_STAGE, 4, 4, 2, 4)  # [t, stage, l, j, h, i]
  return xq.transpose(0, 1, 3, 4, 2, 5).reshape(t, kp)


def _call(x, packed, centroids, slots, tuning: Int8Tuning):
  """packed [e, n, d_in/2], centroids [e, n, 1, 16], slots int32 [3, s] -> [t, n] in x's dtype.
  With K split (one weight), the kernel's int32 sums of each split are added and scaled here as
  the kernel would: (sc * dot) * sx."""
  e, n = packed.shape[:2]
  xq, sx = int8_round(x.astype(jnp.float32), -1)
  xq = xq.astype(jnp.int8)
  if tuning.wgmma:
    xq = wg_order(xq)
  centroids = centroids.reshape(e, n, 16)
  if centroids.dtype not in KERNEL_DTYPES:
    centroids = centroids.astype(jnp.float32)
  if tuning.splits > 1:
    out = jax.ShapeDtypeStruct((tuning.splits, x.shape[0], n), jnp.int32)
  else:
    out = jax.ShapeDtypeStruct((x.shape[0], n), x.dtype if x.dtype in KERNEL_DTYPES else jnp.float32)
  y = jax.ffi.ffi_call(_TARGET, out, vmap_method="sequential")(
      xq, sx[:, 0], packed, centroids, slots, warps=np.int64(tuning.warps), mt=np.int64(tuning.mt),
      persistent=bool(tuning.persistent), wgmma=bool(tuning.wgmma))
  if tuning.splits > 1:
    sc = int8_round(centroids[0].astype(jnp.float32), -1)[1][:, 0]  # [n]: the kernel's codebook scales
    y = (sc * y.sum(0).astype(jnp.float32)) * sx
  return y.astype(x.dtype)


def _check(op, x, packed, centroids, bits, lead, group_sizes=None):
  return cuda.check_call(op, x, packed, centroids, bits, lead, available(), lambda _, *rest: supports(*rest),
                         f"4-bit codes, one codebook per row and d_in a multiple of 32 up to {MAX_D_IN}", group_sizes)


@functools.partial(jax.jit, static_argnames=("bits", "tuning"))
def lut_matmul_int8(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, *,
                    tuning: Int8Tuning | None = None) -> jax.Array:
  """x [m, d_in] times one codebook weight with int8 numerics -> [m, d_out] (x's dtype)."""
  m = x.shape[0]
  n = _check("CUDA lut_matmul_int8", x, packed, centroids, bits, ())
  if m == 0:
    return jnp.zeros((0, n), x.dtype)
  slots = jnp.asarray([[0], [0], [m]], jnp.int32)
  return _call(x, packed[None], centroids[None], slots, tuning or default_tuning(m, x.shape[1], n))


@functools.partial(jax.jit, static_argnames=("bits", "tuning"))
def grouped_lut_matmul_int8(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                            group_sizes: jax.Array, *, tuning: Int8Tuning | None = None) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights, int8 numerics -> [t, d_out]."""
  t = x.shape[0]
  e = packed.shape[0] if packed.ndim == 3 else -1
  n = _check("CUDA grouped_lut_matmul_int8", x, packed, centroids, bits, (e,), group_sizes)
  if t == 0:
    return jnp.zeros((0, n), x.dtype)
  slots = min(t, e)
  tuning = tuning or default_tuning(cuda.rows_per_slot(t, e), x.shape[1], n, grouped=True)
  if tuning.splits > 1:
    raise CqjaxError(f"CUDA grouped_lut_matmul_int8: {tuning} splits K, which only single weights do")
  return _call(x, packed, centroids, expert_slots(group_sizes, slots), tuning)


class Int8Kernels:
  """This kernel under the dispatcher's kernel names (`CQJAX_KERNELS=int8` on GPUs)."""

  lut_matmul = staticmethod(lut_matmul_int8)
  grouped_lut_matmul = staticmethod(grouped_lut_matmul_int8)
