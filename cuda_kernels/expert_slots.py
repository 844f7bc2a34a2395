"""Thin JAX wrapper of expert_slots.cu: `cqjax.codebook.expert_slots` in one CUDA launch.

  expert_slots:  group_sizes int32 [e] -> int32 [3, slots] (expert, first row, rows) of each expert
                 with rows, compacted; the grid of the grouped CUDA kernels

Where the library predates this kernel (or there is no GPU), XLA computes the same slots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cqjax import codebook

_TARGET = "cqjax_cuda_expert_slots"


@functools.cache
def available() -> bool:
  """Whether the built library has this kernel and a CUDA GPU is the default backend."""
  from cuda_kernels import lut_matmul as cuda  # pylint: disable=g-import-not-at-top (it imports this module)
  return cuda.register_target(_TARGET, "CqjaxExpertSlotsCuda")


def expert_slots(group_sizes: jax.Array, slots: int) -> jax.Array:
  """cqjax.codebook.expert_slots, one warp on the GPU."""
  if not available():
    return codebook.expert_slots(group_sizes, slots)
  return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((3, slots), jnp.int32))(group_sizes.astype(jnp.int32))
