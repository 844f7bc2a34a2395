"""POG: a function-preserving permutation of a linear's input channels that puts one
high-variance block into every quantization group (column groups of `group_size` inputs).

For the consumer kernel W [d_in, d_out]: input channels are sorted by Σ|w| over outputs and cut
into blocks of group_size / blocks_per_group channels; blocks are ranked by the mean over output
rows of the weights' std within the block; each group then takes one of the highest-std blocks
followed by low-std blocks. The producer's output channels get the same permutation, so the
model computes exactly the same function:
- o_proj: its inputs are the value heads' channels, so the permutation acts inside each KV head
  (the same one for every query head of the group), and v_proj's outputs follow it;
- each expert's down projection: its inputs are that expert's gate/up outputs, which follow.
With the online Hadamard R4 the down projection's inputs are mixed at run time, so no producer
permutation can compensate there: `permute_down=False` leaves the down projections alone (the Hadamard
has already spread each channel's energy evenly, which is what POG buys by permuting).
"""
from __future__ import annotations

import numpy as np

from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.layer_streaming import like
from cqjax.load import Params


def pog_permutation(w: np.ndarray, group_size: int, blocks_per_group: int = 2) -> np.ndarray:
  """w [d_in, d_out] -> permutation of the d_in input channels (new order of old indices)."""
  d_in = w.shape[0]
  if group_size <= 0 or d_in % group_size or group_size % blocks_per_group:
    raise CqjaxError(f"POG: group_size {group_size} must divide d_in={d_in} and be a multiple of "
                     f"blocks_per_group={blocks_per_group}")
  block = group_size // blocks_per_group
  order = np.argsort(-np.abs(w).sum(axis=1), kind="stable")
  blocks = order.reshape(-1, block)  # [n_blocks, block]
  spread = np.array([w[b].std(axis=0).mean() for b in blocks])
  ranked = blocks[np.argsort(-spread, kind="stable")]
  groups = d_in // group_size
  high, low = ranked[:groups], ranked[groups:]
  per_group = [np.concatenate([high[g], *low[g * (blocks_per_group - 1):(g + 1) * (blocks_per_group - 1)]])
               for g in range(groups)]
  return np.concatenate(per_group)


def apply_pog(cfg: ModelConfig, params: Params, group_size: int, blocks_per_group: int = 2,
              permute_down: bool = True) -> Params:
  """Permutes the inputs of every o_proj (within KV heads) and, if `permute_down`, every down projection
  (per expert), with the compensating permutation on v_proj and gate/up; the function is unchanged."""
  if cfg.mla or cfg.n_shared_experts:
    raise CqjaxError(f"POG is not supported for {cfg.model_type} yet (latent attention, shared experts)")
  hd, kvh, g = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
  if hd % group_size:
    raise CqjaxError(f"POG: group_size {group_size} must divide head_dim={hd} (o_proj groups stay inside heads)")
  out = dict(params)
  for i in range(cfg.num_layers):
    lp = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params[f"layers_{i}"].items()}
    attn = {k: dict(v) for k, v in lp["attn"].items()}
    o = np.asarray(attn["o_proj"]["kernel"], np.float32).reshape(kvh, g, hd, -1)
    v = np.asarray(attn["v_proj"]["kernel"], np.float32).reshape(-1, kvh, hd)
    perms = [pog_permutation(o[k].transpose(1, 0, 2).reshape(hd, -1), group_size, blocks_per_group)
             for k in range(kvh)]
    o_new = np.stack([o[k][:, perms[k]] for k in range(kvh)])
    v_new = np.stack([v[:, k, perms[k]] for k in range(kvh)], axis=1)
    attn["o_proj"]["kernel"] = like(o_new.reshape(attn["o_proj"]["kernel"].shape), attn["o_proj"]["kernel"])
    attn["v_proj"]["kernel"] = like(v_new.reshape(attn["v_proj"]["kernel"].shape), attn["v_proj"]["kernel"])
    lp["attn"] = attn
    if permute_down and cfg.is_moe_layer(i):
      moe = dict(lp["moe"])
      down = np.asarray(moe["down_proj"], np.float32)
      perms = [pog_permutation(down[e], group_size, blocks_per_group) for e in range(cfg.num_experts)]
      for name in ("gate_proj", "up_proj"):
        w = np.asarray(moe[name], np.float32)
        moe[name] = like(np.stack([w[e][:, perms[e]] for e in range(cfg.num_experts)]), moe[name])
      moe["down_proj"] = like(np.stack([down[e][perms[e]] for e in range(cfg.num_experts)]), moe["down_proj"])
      lp["moe"] = moe
    elif permute_down:
      mlp = {k: dict(v) for k, v in lp["mlp"].items()}
      down = np.asarray(mlp["down_proj"]["kernel"], np.float32)
      perm = pog_permutation(down, group_size, blocks_per_group)
      for name in ("gate_proj", "up_proj"):
        mlp[name]["kernel"] = like(np.asarray(mlp[name]["kernel"])[:, perm], mlp[name]["kernel"])
      mlp["down_proj"]["kernel"] = like(down[perm], mlp["down_proj"]["kernel"])
      lp["mlp"] = mlp
    out[f"layers_{i}"] = lp
  return out
