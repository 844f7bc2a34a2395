"""Layer streaming: parameters that live in host memory (numpy leaves, e.g. from
`load_params(..., on_host=True)`) stay there. Each step of `cqjax.quantize` then puts one tensor
or one decoder layer on the device and brings its result back, so a model larger than the device
is quantized on it (Mixtral-8x7B: 93 GB of bf16 weights, one layer 2.9 GB, on one 80 GB GPU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def on_host(tree) -> bool:
  """Whether a param tree (or array) is host-resident: its first leaf is a numpy array."""
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and isinstance(leaves[0], np.ndarray)


def like(value, ref):
  """value in ref's dtype and placement: a numpy array if ref is one (a device result is brought
  back; a numpy value stays on the host), else a device array."""
  if isinstance(ref, np.ndarray):
    return np.asarray(jax.device_get(value), ref.dtype)
  return jnp.asarray(value, ref.dtype)


def to_device(tree, host: bool):
  """One layer's tree on the device for a step (a no-op for device trees)."""
  return jax.device_put(tree) if host else tree


def to_host(tree, host: bool):
  """A step's result back to host memory when the params it came from live there."""
  return jax.device_get(tree) if host else tree
