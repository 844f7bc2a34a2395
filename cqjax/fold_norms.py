"""Fold every residual-stream RMSNorm scale into the linears that read it, leaving unit scales.

RMSNorm(x) · diag(s) · W = RMSNorm_unit(x) · (diag(s) W), exactly. With unit scales the norm
commutes with any orthogonal rotation of the residual stream, which is what R1 needs.
The per-head q/k norms of Qwen3 act inside attention, not on the residual stream, and stay.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cqjax.config import ModelConfig
from cqjax.layer_streaming import like
from cqjax.load import Params
from cqjax.param_paths import attn_input_readers, ffn_input_readers, get_path, set_path


def _scale_inputs(params: Params, path, s):
  """W [..., d_in, d_out] -> diag(s) W (stacked experts included), placed as W is."""
  w = get_path(params, path)
  return set_path(params, path, like(jnp.asarray(s)[:, None] * jnp.asarray(w), w))


def fold_norms(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
  """Returns (config, params) with input/post-attention/final norm scales folded (set to 1).
  Tied embeddings are untied: lm_head becomes its own (scaled) kernel."""
  for i in range(cfg.num_layers):
    for norm, readers in (("input_norm", attn_input_readers(cfg, i)),
                          ("post_attention_norm", ffn_input_readers(cfg, i))):
      s = params[f"layers_{i}"][norm]["scale"]
      for path in readers:
        params = _scale_inputs(params, path, s)
      params = set_path(params, (f"layers_{i}", norm, "scale"), like(jnp.ones(s.shape), s))
  s = params["final_norm"]["scale"]
  head = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  params = set_path(params, ("lm_head",), {"kernel": like(jnp.asarray(s)[:, None] * jnp.asarray(head), head)})
  params = set_path(params, ("final_norm", "scale"), like(jnp.ones(s.shape), s))
  return dataclasses.replace(cfg, tie_word_embeddings=False), params
