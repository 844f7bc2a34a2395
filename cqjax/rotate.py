"""Fuse orthogonal rotations into the weights so the full-precision function is unchanged.

R1 [d, d] rotates the residual stream: every activation x becomes x·R1. Writers of the stream
(embedding, o_proj, down projections) are right-multiplied by R1, readers (q/k/v, router,
gate/up, lm_head) left-multiplied by R1ᵀ. Requires unit norm scales (`fold_norms` first): a unit
RMSNorm commutes with an orthogonal R1.
R2 [value head, value head] rotates each value head (v_proj's outputs, or the value part of
latent attention's kv_b_proj), undone in o_proj. The norms inside latent attention stay: they act
on latents the rotation never touches. R4 [d_ff, d_ff] is the
Hadamard the model applies online to every down projection's input (`online_down_hadamard`);
the down kernels absorb its transpose here.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.hadamard import hadamard_transform
from cqjax.layer_streaming import like
from cqjax.load import Params
from cqjax.param_paths import (attn_input_readers, attn_path, down_projections, ffn_input_readers, get_path,
                               residual_writers, set_path)


def _left(r_t, w):
  """R1ᵀ · W for W [d, out] or stacked [e, d, out]."""
  return jnp.einsum("ij,...jk->...ik", r_t, w.astype(jnp.float32))


def _right(w, r):
  return jnp.einsum("...ij,jk->...ik", w.astype(jnp.float32), r)


def _update(params: Params, path, fn) -> Params:
  """Applies fn to the kernel at path in float32, keeping its dtype and placement."""
  w = get_path(params, path)
  return set_path(params, path, like(fn(jnp.asarray(w)), w))


def _rotate_latent_values(cfg: ModelConfig, w, r2):
  nope = cfg.qk_nope_head_dim
  x = w.astype(jnp.float32).reshape(w.shape[0], cfg.num_heads, nope + cfg.v_head_dim)
  return jnp.concatenate([x[..., :nope], x[..., nope:] @ r2], -1).reshape(w.shape)


def rotate_params(cfg: ModelConfig, params: Params, r1: np.ndarray | None = None,
                  r2: np.ndarray | None = None, online_down_hadamard: bool = False) -> Params:
  """Returns params with R1 (residual stream), R2 (per value head) and the R4 counterpart fused,
  computed in float32 and cast back to each tensor's dtype."""
  for i in range(cfg.num_layers):
    for norm in ("input_norm", "post_attention_norm"):
      if r1 is not None and not bool(jnp.all(params[f"layers_{i}"][norm]["scale"] == 1)):
        raise CqjaxError(f"layers_{i}/{norm}: scale is not 1; call fold_norms before rotating")
  if r1 is not None:
    r = jnp.asarray(r1, jnp.float32)
    params = _update(params, ("embed", "embedding"), lambda w: _right(w, r))
    params = _update(params, ("lm_head", "kernel"), lambda w: _left(r.T, w))
    for i in range(cfg.num_layers):
      for path in attn_input_readers(cfg, i) + ffn_input_readers(cfg, i):
        params = _update(params, path, lambda w: _left(r.T, w))
      for path in residual_writers(cfg, i):
        params = _update(params, path, lambda w: _right(w, r))
  hd = cfg.value_head_dim
  for i in range(cfg.num_layers):
    if r2 is not None:
      r2j = jnp.asarray(r2, jnp.float32)
      if cfg.mla:  # kv_b_proj [r, heads * (nope + v)]: each head's value columns
        params = _update(params, attn_path(i, "kv_b_proj"), lambda w: _rotate_latent_values(cfg, w, r2j))
      else:
        params = _update(params, attn_path(i, "v_proj"), lambda v: jnp.einsum(
            "dkh,hj->dkj", v.astype(jnp.float32).reshape(v.shape[0], -1, hd), r2j).reshape(v.shape))
      params = _update(params, attn_path(i, "o_proj"), lambda o: jnp.einsum(
          "ij,kjd->kid", r2j.T, o.astype(jnp.float32).reshape(-1, hd, o.shape[-1])).reshape(o.shape))
    if online_down_hadamard:
      for path, d_ff in down_projections(cfg, i):
        # Hᵀ · W = (Wᵀ · H)ᵀ: the factored transform, not a [d_ff, d_ff] matrix (822 MB at 14336).
        params = _update(params, path, lambda w: jnp.swapaxes(
            hadamard_transform(jnp.swapaxes(w.astype(jnp.float32), -1, -2)), -1, -2))
  return params
