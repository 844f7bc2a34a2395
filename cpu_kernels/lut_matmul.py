"""Thin JAX wrapper of the C++ codebook matmul (lut_matmul.cc): checks, registration, ffi_call.

Both ops take the packed format of cqjax/codebook.py directly:
  x [m, d_in] @ (packed uint8 [d_out, bytes], centroids [d_out, groups, 2^bits]) -> [m, d_out]
  grouped: x [t, d_in] sorted by expert, packed [e, d_out, bytes], centroids [e, d_out, groups, 2^bits],
           group_sizes int32 [e] -> [t, d_out]
float32 activations are computed in float32 throughout; bfloat16 activations stay bf16 and meet
bf16-rounded centroids in bf16 dot products with float32 accumulation where the CPU has
AVX512-BF16 (4-bit codes, groups of 32k), else they are widened. `int8=True` (the dispatcher's
`CQJAX_KERNELS=int8`) rounds each activation row and each codebook to int8 with absmax scales and
takes int8 dot products where the CPU has AVX512-VNNI (4-bit codes, groups of 64k): other
numerics, defined by `cqjax.lut_matmul.lut_matmul_int8_reference`. The result has x's dtype. Shapes and dtypes are checked here, at trace time, with errors that name the
operand; the handlers check again and reject bad group sizes at run time, so no input reaches
memory it should not.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.codebook import check_codebook_operands
from cqjax.errors import CqjaxError


@functools.cache
def available() -> bool:
  """Whether the compiled extension is importable (it is built by `pip install`), registering
  its FFI targets on first use."""
  try:
    from cpu_kernels import _lut_matmul  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  for name, capsule in _lut_matmul.registrations().items():
    jax.ffi.register_ffi_target(name, capsule, platform="cpu")
  return True


def _check(op, x, packed, centroids, bits: int, d_in: int, lead: tuple[int, ...]):
  """Trace-time checks of one call; returns d_out."""
  if not available():
    raise CqjaxError("the CPU kernel extension cpu_kernels._lut_matmul is not built: reinstall with pip install -e .")
  return check_codebook_operands(op, x, packed, centroids, bits, d_in, lead)


def _activations(x):
  return x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)


def lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int, int8: bool = False) -> jax.Array:
  """x [m, d_in] times one codebook weight -> [m, d_out] (d_in = x.shape[1])."""
  n = _check("lut_matmul", x, packed, centroids, bits, x.shape[-1], ())
  call = jax.ffi.ffi_call("cqjax_lut_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
  out = call(_activations(x), packed, centroids.astype(jnp.float32), bits=np.int32(bits), int8=np.int32(int8))
  return out.astype(x.dtype)


def grouped_lut_matmul(x: jax.Array, packed: jax.Array, centroids: jax.Array, bits: int,
                       group_sizes: jax.Array, int8: bool = False) -> jax.Array:
  """x [t, d_in] rows sorted by expert times stacked codebook weights -> [t, d_out]."""
  e = packed.shape[0] if packed.ndim == 3 else -1
  n = _check("grouped_lut_matmul", x, packed, centroids, bits, x.shape[-1], (e,))
  if group_sizes.shape != (e,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise CqjaxError(f"grouped_lut_matmul: group_sizes must be integers [{e}], got {group_sizes.dtype}{group_sizes.shape}")
  call = jax.ffi.ffi_call("cqjax_grouped_lut_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
  out = call(_activations(x), packed, centroids.astype(jnp.float32), group_sizes.astype(jnp.int32),
             bits=np.int32(bits), int8=np.int32(int8))
  return out.astype(x.dtype)


class Int8:
  """The kernels with int8 numerics, as the dispatcher takes them (`CQJAX_KERNELS=int8`)."""

  lut_matmul = staticmethod(functools.partial(lut_matmul, int8=True))
  grouped_lut_matmul = staticmethod(functools.partial(grouped_lut_matmul, int8=True))


def int8_supported(bits: int, d_in: int, groups: int) -> bool:
  """Whether `int8=True` takes the int8 path for this weight on this CPU (else the float path
  runs): 4-bit codes, groups of 64k inputs, AVX512-VNNI and VBMI."""
  return bits == 4 and (d_in // groups) % 64 == 0 and _int8_cpu()


@functools.cache
def _int8_cpu() -> bool:
  if not available():
    return False
  from cpu_kernels import _lut_matmul  # pylint: disable=g-import-not-at-top
  return bool(_lut_matmul.int8_cpu())


