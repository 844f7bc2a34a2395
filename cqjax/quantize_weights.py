"""Which linears a quantization scope covers, and replacing their kernels by codebook weights.

Scope `official` (the paper's W4A4 numbers): q/k/v, the router and every expert's gate/up
(w1/w3) — the linears that read the rotated residual stream (with latent attention: the query
and key/value down-projections; with shared experts, theirs too). Scope `full` adds o_proj, every
down projection (w2) and latent attention's up-projections. Embeddings and lm_head stay in 16
bits in both.
"""
from __future__ import annotations

from typing import Callable

import jax

from cqjax.codebook import CodebookWeight
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.load import Params
from cqjax.param_paths import (Path, attn_inner_linears, attn_input_readers, ffn_input_readers, get_path,
                               residual_writers, set_path)

SCOPES = ("official", "full")


def scope_paths(cfg: ModelConfig, scope: str) -> list[Path]:
  """Key paths (into params) of every kernel the scope quantizes."""
  if scope not in SCOPES:
    raise CqjaxError(f"quantization scope must be one of {SCOPES}, got {scope!r}")
  paths = []
  for i in range(cfg.num_layers):
    paths += attn_input_readers(cfg, i) + ffn_input_readers(cfg, i)
    if scope == "full":
      paths += attn_inner_linears(cfg, i) + residual_writers(cfg, i)
  return paths


def quantize_scope(cfg: ModelConfig, params: Params, scope: str,
                   quantizer: Callable[[jax.Array, Path], CodebookWeight],
                   progress=None) -> Params:
  """Replaces every kernel of `scope` by `quantizer(kernel, path)`."""
  for path in scope_paths(cfg, scope):
    params = set_path(params, path, quantizer(get_path(params, path), path))
    if progress is not None:
      progress.update()
  return params
