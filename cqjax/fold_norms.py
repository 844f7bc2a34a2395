"""Fold every residual-stream RMSNorm scale into the linears that read it, leaving unit scales.

RMSNorm(x) · diag(s) · W = RMSNorm_unit(x) · (diag(s) W), exactly. With unit scales the norm
commutes with any orthogonal rotation of the residual stream, which is what R1 needs.
The per-head q/k norms of Qwen3 act inside attention, not on the residual stream, and stay.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from cqjax.config import ModelConfig
from cqjax.load import Params


def fold_norms(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
  """Returns (config, params) with input/post-attention/final norm scales folded (set to 1).
  Tied embeddings are untied: lm_head becomes its own (scaled) kernel."""
  out = dict(params)
  for i in range(cfg.num_layers):
    lp = {k: dict(v) for k, v in params[f"layers_{i}"].items()}
    s_attn = lp["input_norm"]["scale"]
    attn = {k: dict(v) for k, v in lp["attn"].items()}
    for name in ("q_proj", "k_proj", "v_proj"):
      attn[name]["kernel"] = s_attn[:, None] * attn[name]["kernel"]
    lp["attn"] = attn
    s_mlp = lp["post_attention_norm"]["scale"]
    if cfg.is_moe_layer(i):
      moe = dict(lp["moe"])
      moe["router"] = s_mlp[:, None] * moe["router"]
      moe["gate_proj"] = s_mlp[None, :, None] * moe["gate_proj"]
      moe["up_proj"] = s_mlp[None, :, None] * moe["up_proj"]
      lp["moe"] = moe
    else:
      mlp = {k: dict(v) for k, v in lp["mlp"].items()}
      for name in ("gate_proj", "up_proj"):
        mlp[name]["kernel"] = s_mlp[:, None] * mlp[name]["kernel"]
      lp["mlp"] = mlp
    lp["input_norm"] = {"scale": jnp.ones_like(s_attn)}
    lp["post_attention_norm"] = {"scale": jnp.ones_like(s_mlp)}
    out[f"layers_{i}"] = lp
  s = params["final_norm"]["scale"]
  head = params["embed"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]
  out["lm_head"] = {"kernel": s[:, None] * head}
  out["final_norm"] = {"scale": jnp.ones_like(s)}
  return dataclasses.replace(cfg, tie_word_embeddings=False), out
