"""The one dispatcher through which the model multiplies by a kernel that may be quantized.

Dense arrays take XLA's dot / ragged_dot. A `CodebookWeight` takes, on the CPU backend, the C++
FFI kernel of cpu_kernels/ (when the package build compiled it); on GPUs the CUDA kernel of
cuda_kernels/ where its library is built and it was measured faster (4-bit codes, one codebook
per row, bf16 activations, 2 to 8 rows per weight or 2 to 16 per expert slot, weights of more than 2^24 codes:
`cuda_kernels.lut_matmul.serves`, BENCHMARKS.md), else the Pallas kernels of pallas_kernels/
(1-, 2-, 4- and 8-bit codes), except that on Hopper GPUs 4-bit products of bf16 x with many rows a
weight or expert slot (`pallas_kernels.lut_matmul_mgpu.serves`) take the Mosaic GPU kernels of
pallas_kernels/lut_matmul_mgpu.py; otherwise the jnp reference (unpack + gather + dot) that every
kernel is tested against. Where this jax lacks Pallas' Triton backend (deprecated in jax 0.11), GPU
products take the CUDA kernel wherever it applies, then the Mosaic GPU kernels (Hopper), and the
reference elsewhere, with a warning.
Kernels compute the forward pass only; gradients (ACCF fine-tunes centroids through these
products) come from the reference's VJP, so a kernel never changes what is learned.
`CQJAX_KERNELS=reference` forces the reference; `CQJAX_KERNELS=int8` takes the opt-in int8
numerics (`lut_matmul_int8_reference`): the CPU kernel's int8 path, and on GPUs the int8 CUDA
kernel (cuda_kernels/lut_matmul_int8.py) for up to its `MAX_ROWS` (16) rows a weight or expert
slot (the decode batches it was measured at) and, on Hopper, for any rows (its wgmma kernel), the
default kernels elsewhere; on GPUs `CQJAX_KERNELS=cuda` takes the CUDA kernel wherever it applies
and `pallas` never.
A product may take the activation quantizer of its input (`act`: the W4A4 model's Q_a). The
others multiply fake_quant(x); on GPUs the bit-plane CUDA kernel (cuda_kernels/lut_matmul_bitplane.py)
takes x's codes themselves (its affine numerics: y = fake_quant(x) in float32 times the weight)
where it was measured ahead (`cuda_kernels.lut_matmul_bitplane.serves`: one-row products of
large weights; with `CQJAX_KERNELS=cuda` wherever it applies; `unfused` never, else as auto), from
the weight's bit-plane layout where `cqjax.lay_out_bitplanes` keeps one (`_layout`).
The variable is read when a function is traced: set it before the first call, call
`jax.clear_caches()` after changing it, or trace inside `with kernels_mode(mode):`.
The backend is `jax.default_backend()`, except inside `kernels_mode(mode, backend="gpu")`: code
compiled ahead of time for a GPU from a host without one (compile-only devices of
`jax.experimental.topologies`) then takes the GPU's kernels; the CUDA library, which loads only
beside a GPU, then never serves, so GPU products take the Pallas kernels.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig, quantize_input
from cqjax.codebook import CodebookWeight, LaidOutCodebookWeight, dequantize, unpack_codes
from cqjax.errors import CqjaxError


def kernel_param(module: nn.Module, name: str, init, shape, dtype):
  """A module's kernel: the stored value (an array or a CodebookWeight, whose packed leaves
  would fail Linen's shape check) when params are given, else a fresh initialisation."""
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, shape, dtype)


def has_params(module: nn.Module, name: str) -> bool:
  """Whether the params given to `module` hold `name` (a kernel or a submodule's kernel): how the
  model tells a fused projection (cqjax.fuse_projections) from its parts. False while initialising."""
  return name in module.variables.get("params", {})


class Linear(nn.Module):
  """x @ kernel [d_in, d_out], the kernel an array or a CodebookWeight (params: {'kernel': ...});
  with act_quant, Q_a(x) @ kernel (`lut_matmul`'s act)."""

  d_in: int
  d_out: int
  dtype: jnp.dtype = jnp.float32
  act_quant: ActQuantConfig | None = None

  @nn.compact
  def __call__(self, x):
    kernel = kernel_param(self, "kernel", nn.initializers.normal(0.02), (self.d_in, self.d_out), self.dtype)
    return lut_matmul(x, kernel, self.act_quant)


def lut_matmul_reference(x: jax.Array, w: CodebookWeight) -> jax.Array:
  """x [..., d_in] @ dequantize(w) [d_in, d_out] -> [..., d_out]."""
  return x @ dequantize(w, x.dtype)


def grouped_lut_matmul_reference(x: jax.Array, w: CodebookWeight, group_sizes: jax.Array) -> jax.Array:
  """ragged_dot(x [m, d_in], dequantize(w) [experts, d_in, d_out], group_sizes) -> [m, d_out]."""
  return jax.lax.ragged_dot(x, dequantize(w, x.dtype), group_sizes)


_INV_127 = np.float32(1) / np.float32(127)


def int8_round(v: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """v rounded to int8 along `axis` with an absmax scale: (int32 values in [-127, 127], float32
  scale amax · f32(1/127), 1 where amax is 0), v ~ values * scale.

  Written as the multiplies XLA compiles `amax / 127` and `v / scale` into (values =
  rint(v · (1 / scale)), one IEEE division), so that the CPU and CUDA kernels, which spell the same
  operations out, round halves exactly as this reference does."""
  amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
  scale = jnp.where(amax > 0, amax * _INV_127, np.float32(1))
  return jnp.round(v * (np.float32(1) / scale)).astype(jnp.int32), scale


def lut_matmul_int8_reference(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int) -> jax.Array:
  """The opt-in int8 numerics of the kernels (CPU: `CQJAX_KERNELS=int8`; GPU:
  cuda_kernels/lut_matmul_int8.py), in jnp: x [m, d_in] rows and each group's codebook
  (centroids [d_out, groups, 2^bits]) rounded to int8 (`int8_round`), exact integer dot products
  per group, then y = sx * sum over groups (in order) of sc * dot (float32 [m, d_out])."""
  d_in = x.shape[1]
  groups = centroids.shape[-2]
  xq, sx = int8_round(x.astype(jnp.float32), -1)                  # [m, d_in], [m, 1]
  cq, sc = int8_round(centroids.astype(jnp.float32), -1)          # [n, G, 16], [n, G, 1]
  codes = unpack_codes(packed, bits, d_in).reshape(packed.shape[0], groups, -1)
  wq = jnp.take_along_axis(cq, codes, axis=-1)                    # [n, G, group]
  dots = jnp.einsum("mgj,ngj->mng", xq.reshape(x.shape[0], groups, d_in // groups), wq,
                    preferred_element_type=jnp.int32).astype(jnp.float32)
  y = jnp.zeros(dots.shape[:2], jnp.float32)
  for g in range(groups):
    y = y + sc[None, :, g, 0] * dots[:, :, g]
  return y * sx


def grouped_lut_matmul_int8_reference(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                                      group_sizes: jax.Array) -> jax.Array:
  """The int8 numerics under ragged_dot's contract: row i of x [t, d_in] (sorted by expert) times
  its expert's weight of packed [e, d_out, bytes] -> float32 [t, d_out]; rows past the last group
  are zero. Computes every expert for every row: for tests, not for large shapes."""
  e = packed.shape[0]
  expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[0]), side="right")
  every = jax.vmap(lambda p, c: lut_matmul_int8_reference(x, p, c, bits))(packed, centroids)  # [e, t, n]
  y = jnp.take_along_axis(every, jnp.minimum(expert, e - 1)[None, :, None], axis=0)[0]
  return jnp.where((expert < e)[:, None], y, 0.0)


@functools.cache
def _pallas_kernels():
  """pallas_kernels.lut_matmul, or None (warning once) where this jax lacks the Pallas Triton
  backend it lowers through: deprecated in jax 0.11 and due to be removed, while cqjax accepts any
  jax from 0.6. GPU products then take the CUDA library's kernels where they apply, else Mosaic
  GPU's (Hopper), else the reference (`_ReferenceKernels`)."""
  try:
    import jax.experimental.pallas.triton  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    warnings.warn(f"cqjax: this jax has no Pallas Triton backend ({type(e).__name__}: {e}), so GPU codebook "
                  "products take the CUDA library's kernels where they apply (python -m cuda_kernels.build), "
                  "then on Hopper GPUs the Mosaic GPU kernels, and the jnp reference (unpack + gather + dot, "
                  "slower than bf16) elsewhere", RuntimeWarning,
                  stacklevel=2)
    return None
  from pallas_kernels import lut_matmul as pallas  # pylint: disable=g-import-not-at-top
  return pallas


class _ReferenceKernels:
  """The kernels' signatures over the jnp references: GPU products that no available kernel takes."""

  @staticmethod
  def lut_matmul(x, packed, centroids, bits):
    return lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]))

  @staticmethod
  def grouped_lut_matmul(x, packed, centroids, bits, group_sizes):
    return grouped_lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]), group_sizes)


def _mosaic_kernels():
  """pallas_kernels.lut_matmul_mgpu where the default backend is a Hopper GPU and this jax has
  Pallas' Mosaic GPU backend, else None."""
  try:
    from pallas_kernels import lut_matmul_mgpu as mgpu  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return mgpu if mgpu.available() else None


@dataclasses.dataclass(frozen=True)
class _CudaFirst:
  """The CUDA kernel where it applies (everywhere=False: only where `serves` says it is faster),
  else the Pallas kernels (same signatures); int8=True: the int8 CUDA kernel first, for the rows
  it serves (cuda_kernels/lut_matmul_int8.serves). On Hopper, where CUDA does not serve, the Mosaic
  GPU kernels where they do (pallas_kernels/lut_matmul_mgpu.serves)."""

  everywhere: bool = False
  int8: bool = False
  fuse: bool = True  # take the bit-plane kernel's affine numerics for products of Q_a(x) (`fusing`)
  SUPPORTED_BITS = (1, 2, 4, 8)  # the Pallas kernels' (read lazily: no Pallas import on CPU); CUDA's 4 is among them

  def _pick(self, x, packed, centroids, bits, grouped):
    from cuda_kernels import lut_matmul as cuda  # pylint: disable=g-import-not-at-top
    pallas = _pallas_kernels()
    experts = packed.shape[0] if grouped else None
    rows = cuda.rows_per_slot(x.shape[0], experts) if grouped else x.shape[0]
    if self.int8:
      from cuda_kernels import lut_matmul_int8 as cuda8  # pylint: disable=g-import-not-at-top
      if cuda8.available() and cuda8.serves(rows) and cuda8.supports(bits, x.shape[-1], centroids.shape[-2]):
        return cuda8.Int8Kernels
    if cuda.available() and cuda.supports(x.dtype, bits, x.shape[-1], centroids.shape[-2]):
      # Without Pallas the CUDA kernel serves wherever it applies: slower than Pallas at some shapes,
      # it is still several times faster than the reference.
      if self.everywhere or pallas is None or cuda.serves(x.shape[0], x.shape[-1], packed.shape[-2], experts=experts):
        return cuda
    mosaic = _mosaic_kernels()
    if (mosaic is not None and mosaic.supports(bits, x.dtype, x.shape[-1], packed.shape[-2], centroids.shape[-2])
        and mosaic.serves(rows, x.shape[-1], packed.shape[-2], triton=pallas is not None)):
      return mosaic
    return pallas or _ReferenceKernels

  def fusing(self, act, x, packed, centroids, bits, grouped):
    """The bit-plane kernel's affine numerics for a product of Q_a(x) (act), where they serve
    (everywhere: wherever they apply), else None (the caller fake-quantizes x for the others)."""
    if not self.fuse:
      return None
    from cuda_kernels import lut_matmul_bitplane as bitplane  # pylint: disable=g-import-not-at-top
    experts = packed.shape[0] if grouped else None
    wanted = (bitplane.takes_act(act) if self.everywhere
              else bitplane.serves(act, x.shape[0], x.shape[-1], packed.shape[-2], experts))
    if wanted and bitplane.supports(bits, x.shape[-1], centroids.shape[-2]) and bitplane.available():
      return bitplane.Affine(act)
    return None

  def lut_matmul(self, x, packed, centroids, bits):
    return self._pick(x, packed, centroids, bits, False).lut_matmul(x, packed, centroids, bits)

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    kernels = self._pick(x, packed, centroids, bits, True)
    if kernels is _pallas_kernels() and x.shape[0]:
      # The one-warp slots where the library has them (else XLA's, as the Pallas kernel would compute).
      from cuda_kernels import expert_slots as ces  # pylint: disable=g-import-not-at-top
      slots = ces.expert_slots(group_sizes, min(x.shape[0], packed.shape[0]))
      return kernels.grouped_lut_matmul(x, packed, centroids, bits, group_sizes, slots=slots)
    return kernels.grouped_lut_matmul(x, packed, centroids, bits, group_sizes)


_BACKENDS = ("cpu", "gpu")
_MODES = ("auto", "reference", "int8", "cuda", "pallas", "unfused")
_backend_override: str | None = None  # kernels_mode(backend=...), else jax.default_backend()


@contextlib.contextmanager
def kernels_mode(mode: str, backend: str | None = None):
  """CQJAX_KERNELS=mode for what is traced inside, and the backend it is traced for (None: the
  default backend; "gpu" to compile for a GPU ahead of time from a host without one). The
  dispatcher reads both at trace time, so jit caches traced under others are dropped on the way in
  and out."""
  global _backend_override
  if backend is not None and backend not in _BACKENDS:
    raise CqjaxError(f"kernels_mode backend must be one of {', '.join(_BACKENDS)} or None, got {backend!r}")
  old, old_backend = os.environ.get("CQJAX_KERNELS"), _backend_override
  os.environ["CQJAX_KERNELS"] = mode
  _backend_override = backend
  jax.clear_caches()
  try:
    yield
  finally:
    jax.clear_caches()
    _backend_override = old_backend
    if old is None:
      del os.environ["CQJAX_KERNELS"]
    else:
      os.environ["CQJAX_KERNELS"] = old


def _kernels():
  """The kernels for this backend (same signatures in all), or None for the reference:
  cpu_kernels on the CPU backend when built (its int8 numerics with CQJAX_KERNELS=int8), on GPUs
  the CUDA kernel where built and measured faster, else Pallas (CQJAX_KERNELS=cuda: CUDA wherever
  it applies; pallas: Pallas only; int8: the int8 CUDA kernel for decode batches first;
  unfused: auto's, activation quantization never fused)."""
  mode = os.environ.get("CQJAX_KERNELS", "auto")
  if mode not in _MODES:
    raise CqjaxError(f"CQJAX_KERNELS must be one of {', '.join(_MODES)}, got {mode!r}")
  if mode == "reference":
    return None
  backend = _backend_override or jax.default_backend()
  if backend == "cpu":
    from cpu_kernels import lut_matmul as cpu  # pylint: disable=g-import-not-at-top
    if not cpu.available():
      return None
    return cpu.Int8 if mode == "int8" else cpu
  if backend == "gpu":
    if mode != "pallas":
      return _CudaFirst(everywhere=mode == "cuda", int8=mode == "int8", fuse=mode != "unfused")
    pallas = _pallas_kernels()
    if pallas is None:
      raise CqjaxError("CQJAX_KERNELS=pallas: this jax has no Pallas Triton backend (jax.experimental.pallas.triton), "
                       "which pallas_kernels/ lowers through; use CQJAX_KERNELS=auto (the CUDA library's kernels, "
                       "python -m cuda_kernels.build, else the jnp reference)")
    return pallas
  return None


def _supports(kernels, w: CodebookWeight) -> bool:
  return kernels is not None and w.bits in getattr(kernels, "SUPPORTED_BITS", range(1, 9))


def _route(kernels, act, x, w: CodebookWeight, grouped: bool):
  """(kernels, act, x) for a kernel product of Q_a(x): kernels that take x with its quantizer
  themselves (`_CudaFirst.fusing`), x as given; else `kernels` with fake_quant(x) and no quantizer."""
  fusing = getattr(kernels, "fusing", None)
  fused = None if act is None or fusing is None else fusing(act, x, w.packed, w.centroids, w.bits, grouped)
  return (fused, act, x) if fused is not None else (kernels, None, quantize_input(x, act))


def _layout(kernels, w: CodebookWeight):
  """w's bit-plane layout (planes, alpha) where `kernels` read it (the fused bit-plane kernel) and
  w holds one (cqjax.lay_out_bitplanes), else None: the kernels take (packed, centroids)."""
  if isinstance(w, LaidOutCodebookWeight) and getattr(kernels, "READS_LAYOUT", False):
    return w.planes, w.alpha
  return None


def _no_cotangent(a):
  return np.zeros(a.shape, jax.dtypes.float0)


# The kernels' products of Q_a(x) (act: the quantizer the kernels fuse; None: x as given), from
# (packed, centroids) or, where given, their layout for the kernel (`_layout`). Their gradients are
# the reference's, through fake_quant where act is given.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_matmul(kernels, bits, act, x, packed, centroids, layout):
  return kernels.lut_matmul(x, *(layout or (packed, centroids)), bits)


def _kernel_matmul_fwd(kernels, bits, act, x, packed, centroids, layout):
  return _kernel_matmul(kernels, bits, act, x, packed, centroids, layout), (x, packed, centroids, layout)


def _kernel_matmul_bwd(kernels, bits, act, res, g):
  del kernels
  x, packed, centroids, layout = res
  ref = lambda x, c: lut_matmul_reference(quantize_input(x, act), CodebookWeight(packed, c, bits, x.shape[-1]))
  dx, dc = jax.vjp(ref, x, centroids)[1](g)
  return dx, _no_cotangent(packed), dc, jax.tree.map(_no_cotangent, layout)


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _kernel_grouped(kernels, bits, act, x, packed, centroids, layout, group_sizes):
  return kernels.grouped_lut_matmul(x, *(layout or (packed, centroids)), bits, group_sizes)


def _kernel_grouped_fwd(kernels, bits, act, x, packed, centroids, layout, group_sizes):
  return (_kernel_grouped(kernels, bits, act, x, packed, centroids, layout, group_sizes),
          (x, packed, centroids, layout, group_sizes))


def _kernel_grouped_bwd(kernels, bits, act, res, g):
  del kernels
  x, packed, centroids, layout, group_sizes = res
  ref = lambda x, c: grouped_lut_matmul_reference(quantize_input(x, act), CodebookWeight(packed, c, bits, x.shape[-1]),
                                                  group_sizes)
  dx, dc = jax.vjp(ref, x, centroids)[1](g)
  return dx, _no_cotangent(packed), dc, jax.tree.map(_no_cotangent, layout), _no_cotangent(group_sizes)


_kernel_grouped.defvjp(_kernel_grouped_fwd, _kernel_grouped_bwd)


def lut_matmul(x: jax.Array, w, act: ActQuantConfig | None = None) -> jax.Array:
  """Q_a(x) [..., d_in] @ w [d_in, d_out] -> [..., d_out]; act: the activation quantizer Q_a
  (`cqjax.act_quant.fake_quant`; None: x as given), fused into the kernel where one takes it."""
  if not isinstance(w, CodebookWeight):
    return quantize_input(x, act) @ w
  kernels = _kernels()
  if w.packed.ndim == 2 and _supports(kernels, w):
    kernels, act, x2 = _route(kernels, act, x.reshape(-1, w.d_in), w, grouped=False)
    y = _kernel_matmul(kernels, w.bits, act, x2, w.packed, w.centroids, _layout(kernels, w))
    return y.reshape(*x.shape[:-1], y.shape[-1])
  return lut_matmul_reference(quantize_input(x, act), w)


def grouped_lut_matmul(x: jax.Array, w, group_sizes: jax.Array, act: ActQuantConfig | None = None) -> jax.Array:
  """Q_a(x) [m, d_in], rows sorted by expert; w [experts, d_in, d_out]; the ragged_dot contract;
  act as lut_matmul's (Q_a is per row, so quantizing after the sort is quantizing before it)."""
  if not isinstance(w, CodebookWeight):
    return jax.lax.ragged_dot(quantize_input(x, act), w, group_sizes)
  kernels = _kernels()
  if _supports(kernels, w):
    kernels, act, x = _route(kernels, act, x, w, grouped=True)
    return _kernel_grouped(kernels, w.bits, act, x, w.packed, w.centroids, _layout(kernels, w), group_sizes)
  return grouped_lut_matmul_reference(quantize_input(x, act), w, group_sizes)
