"""Which linears a quantization scope covers, and replacing their kernels by codebook weights.

Scope `official` (the paper's W4A4 numbers): q/k/v, the router and every expert's gate/up
(w1/w3) — the linears that read the rotated residual stream. Scope `full` adds o_proj and every
down projection (w2). Embeddings and lm_head stay in 16 bits in both.
"""
from __future__ import annotations

from typing import Callable

import jax

from cqjax.codebook import CodebookWeight
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.load import Params

SCOPES = ("official", "full")


def scope_paths(cfg: ModelConfig, scope: str) -> list[tuple[str, ...]]:
  """Key paths (into params) of every kernel the scope quantizes."""
  if scope not in SCOPES:
    raise CqjaxError(f"quantization scope must be one of {SCOPES}, got {scope!r}")
  paths = []
  for i in range(cfg.num_layers):
    layer = f"layers_{i}"
    paths += [(layer, "attn", n, "kernel") for n in ("q_proj", "k_proj", "v_proj")]
    if cfg.is_moe_layer(i):
      paths += [(layer, "moe", n) for n in ("router", "gate_proj", "up_proj")]
    else:
      paths += [(layer, "mlp", n, "kernel") for n in ("gate_proj", "up_proj")]
    if scope == "full":
      paths.append((layer, "attn", "o_proj", "kernel"))
      paths.append((layer, "moe", "down_proj") if cfg.is_moe_layer(i) else (layer, "mlp", "down_proj", "kernel"))
  return paths


def get_path(params: Params, path: tuple[str, ...]):
  for k in path:
    params = params[k]
  return params


def set_path(params: Params, path: tuple[str, ...], value) -> Params:
  """A copy of params with `path` replaced (only the dicts along the path are copied)."""
  if not path:
    return value
  out = dict(params)
  out[path[0]] = set_path(params[path[0]], path[1:], value)
  return out


def quantize_scope(cfg: ModelConfig, params: Params, scope: str,
                   quantizer: Callable[[jax.Array, tuple[str, ...]], CodebookWeight],
                   progress=None) -> Params:
  """Replaces every kernel of `scope` by `quantizer(kernel, path)`."""
  for path in scope_paths(cfg, scope):
    params = set_path(params, path, quantizer(get_path(params, path), path))
    if progress is not None:
      progress.update()
  return params
