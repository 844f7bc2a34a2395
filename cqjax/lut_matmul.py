"""The one dispatcher through which the model multiplies by a kernel that may be quantized.

Dense arrays take XLA's dot / ragged_dot. A `CodebookWeight` takes the jnp reference
(unpack + gather + dot), which every kernel is tested against; the Pallas GPU and FFI CPU
kernels plug in here, chosen by backend and shape.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from cqjax.codebook import CodebookWeight, dequantize


def kernel_param(module: nn.Module, name: str, init, shape, dtype):
  """A module's kernel: the stored value (an array or a CodebookWeight, whose packed leaves
  would fail Linen's shape check) when params are given, else a fresh initialisation."""
  if module.has_variable("params", name):
    return module.get_variable("params", name)
  return module.param(name, init, shape, dtype)


def lut_matmul(x: jax.Array, w) -> jax.Array:
  """x [..., d_in] @ w [d_in, d_out] -> [..., d_out]."""
  if isinstance(w, CodebookWeight):
    return x @ dequantize(w, x.dtype)
  return x @ w


def grouped_lut_matmul(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
  """x [m, d_in] rows sorted by expert; w [experts, d_in, d_out]; the ragged_dot contract."""
  if isinstance(w, CodebookWeight):
    w = dequantize(w, x.dtype)
  return jax.lax.ragged_dot(x, w, group_sizes)
