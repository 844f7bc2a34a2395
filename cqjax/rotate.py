"""Fuse orthogonal rotations into the weights so the full-precision function is unchanged.

R1 [d, d] rotates the residual stream: every activation x becomes x·R1. Writers of the stream
(embedding, o_proj, down projections) are right-multiplied by R1, readers (q/k/v, router,
gate/up, lm_head) left-multiplied by R1ᵀ. Requires unit norm scales (`fold_norms` first): a unit
RMSNorm commutes with an orthogonal R1.
R2 [head_dim, head_dim] rotates each value head, undone in o_proj. R4 [d_ff, d_ff] is the
Hadamard the model applies online to every down projection's input (`online_down_hadamard`);
the down kernels absorb its transpose here.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.hadamard import hadamard_matrix
from cqjax.load import Params


def _left(r_t, w):
  """R1ᵀ · W for W [d, out] or stacked [e, d, out]."""
  return jnp.einsum("ij,...jk->...ik", r_t, w.astype(jnp.float32))


def _right(w, r):
  return jnp.einsum("...ij,jk->...ik", w.astype(jnp.float32), r)


def rotate_params(cfg: ModelConfig, params: Params, r1: np.ndarray | None = None,
                  r2: np.ndarray | None = None, online_down_hadamard: bool = False) -> Params:
  """Returns params with R1 (residual stream), R2 (per value head) and the R4 counterpart fused,
  computed in float32 and cast back to each tensor's dtype."""
  for i in range(cfg.num_layers):
    for norm in ("input_norm", "post_attention_norm"):
      if r1 is not None and not bool(jnp.all(params[f"layers_{i}"][norm]["scale"] == 1)):
        raise CqjaxError(f"layers_{i}/{norm}: scale is not 1; call fold_norms before rotating")
  out = {k: v for k, v in params.items()}
  cast = lambda new, old: new.astype(old.dtype)
  if r1 is not None:
    r = jnp.asarray(r1, jnp.float32)
    rt = r.T
    emb = params["embed"]["embedding"]
    out["embed"] = {"embedding": cast(_right(emb, r), emb)}
    head = params["lm_head"]["kernel"]
    out["lm_head"] = {"kernel": cast(_left(rt, head), head)}
  for i in range(cfg.num_layers):
    lp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params[f"layers_{i}"].items()}
    attn = {k: dict(v) for k, v in lp["attn"].items()}
    if r1 is not None:
      for name in ("q_proj", "k_proj", "v_proj"):
        attn[name]["kernel"] = cast(_left(rt, attn[name]["kernel"]), attn[name]["kernel"])
      attn["o_proj"]["kernel"] = cast(_right(attn["o_proj"]["kernel"], r), attn["o_proj"]["kernel"])
    if r2 is not None:
      r2j = jnp.asarray(r2, jnp.float32)
      hd = cfg.head_dim
      v = attn["v_proj"]["kernel"]
      v_rot = jnp.einsum("dkh,hj->dkj", v.astype(jnp.float32).reshape(v.shape[0], -1, hd), r2j)
      attn["v_proj"]["kernel"] = cast(v_rot.reshape(v.shape), v)
      o = attn["o_proj"]["kernel"]
      o_rot = jnp.einsum("ij,kjd->kid", r2j.T, o.astype(jnp.float32).reshape(-1, hd, o.shape[-1]))
      attn["o_proj"]["kernel"] = cast(o_rot.reshape(o.shape), o)
    lp["attn"] = attn
    if cfg.is_moe_layer(i):
      moe = dict(lp["moe"])
      if r1 is not None:
        for name in ("router", "gate_proj", "up_proj"):
          moe[name] = cast(_left(rt, moe[name]), moe[name])
        moe["down_proj"] = cast(_right(moe["down_proj"], r), moe["down_proj"])
      if online_down_hadamard:
        h_t = jnp.asarray(hadamard_matrix(cfg.moe_intermediate_size).T, jnp.float32)
        moe["down_proj"] = cast(_left(h_t, moe["down_proj"]), moe["down_proj"])
      lp["moe"] = moe
    else:
      mlp = {k: dict(v) for k, v in lp["mlp"].items()}
      if r1 is not None:
        for name in ("gate_proj", "up_proj"):
          mlp[name]["kernel"] = cast(_left(rt, mlp[name]["kernel"]), mlp[name]["kernel"])
        mlp["down_proj"]["kernel"] = cast(_right(mlp["down_proj"]["kernel"], r), mlp["down_proj"]["kernel"])
      if online_down_hadamard:
        h_t = jnp.asarray(hadamard_matrix(cfg.intermediate_size).T, jnp.float32)
        mlp["down_proj"]["kernel"] = cast(_left(h_t, mlp["down_proj"]["kernel"]), mlp["down_proj"]["kernel"])
      lp["mlp"] = mlp
    out[f"layers_{i}"] = lp
  return out
