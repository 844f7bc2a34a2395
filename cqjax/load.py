"""Loads a Hugging Face MoE checkpoint directory into cqjax's parameter pytree, layer by layer.

Only one layer's host arrays are alive at a time (the shards are memory-mapped), so loading
never holds two full copies of the model. No torch import.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.safetensors_index import CheckpointIndex

Params = dict[str, Any]

# Family-specific tensor names: (MoE block prefix, router, per-expert gate/up/down names).
MOE_TENSOR_NAMES = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}
# Attention tensors whose HF name (under self_attn.) differs from cqjax's; the others match.
ATTN_HF_NAMES = {"kv_a_proj": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "q_a_norm": "q_a_layernorm"}
SHARED_EXPERTS_HF_PREFIX = "mlp.shared_experts"


def _layer_params(ix: CheckpointIndex, cfg: ModelConfig, i: int,
                  place: Callable[[np.ndarray], jax.Array | np.ndarray]) -> Params:
  d, p = cfg.hidden_size, f"model.layers.{i}."

  def linear(name, d_in, d_out):  # HF stores [out, in]; cqjax kernels are [in, out].
    return {"kernel": place(ix.get(p + name + ".weight", (d_out, d_in)).T)}

  def attn_linear(name, d_in, d_out):
    return linear("self_attn." + ATTN_HF_NAMES.get(name, name), d_in, d_out)

  def attn_norm(name, dim):
    return norm("self_attn." + ATTN_HF_NAMES.get(name, name), dim)

  def norm(name, dim):
    return {"scale": place(ix.get(p + name + ".weight", (dim,)))}

  def swiglu(prefix, f):
    return {"gate_proj": linear(prefix + ".gate_proj", d, f), "up_proj": linear(prefix + ".up_proj", d, f),
            "down_proj": linear(prefix + ".down_proj", f, d)}

  if cfg.mla:
    r, heads = cfg.kv_lora_rank, cfg.num_heads
    attn = {
        "kv_a_proj": attn_linear("kv_a_proj", d, r + cfg.head_dim),
        "kv_a_norm": attn_norm("kv_a_norm", r),
        "kv_b_proj": attn_linear("kv_b_proj", r, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
        "o_proj": attn_linear("o_proj", cfg.attn_out_size, d),
    }
    if cfg.q_lora_rank:
      attn["q_a_proj"] = attn_linear("q_a_proj", d, cfg.q_lora_rank)
      attn["q_a_norm"] = attn_norm("q_a_norm", cfg.q_lora_rank)
      attn["q_b_proj"] = attn_linear("q_b_proj", cfg.q_lora_rank, cfg.q_size)
    else:
      attn["q_proj"] = attn_linear("q_proj", d, cfg.q_size)
  else:
    attn = {
        "q_proj": attn_linear("q_proj", d, cfg.q_size),
        "k_proj": attn_linear("k_proj", d, cfg.kv_size),
        "v_proj": attn_linear("v_proj", d, cfg.kv_size),
        "o_proj": attn_linear("o_proj", cfg.q_size, d),
    }
  if cfg.qk_norm:
    attn["q_norm"] = attn_norm("q_norm", cfg.head_dim)
    attn["k_norm"] = attn_norm("k_norm", cfg.head_dim)
  out = {
      "input_norm": norm("input_layernorm", d),
      "post_attention_norm": norm("post_attention_layernorm", d),
      "attn": attn,
  }
  if not cfg.is_moe_layer(i):
    out["mlp"] = swiglu("mlp", cfg.intermediate_size)
    return out
  out["moe"] = _moe_params(ix, cfg, i, place)
  if cfg.n_shared_experts:
    out["moe"]["shared"] = swiglu(SHARED_EXPERTS_HF_PREFIX, cfg.moe_intermediate_size * cfg.n_shared_experts)
  return out


def _moe_params(ix, cfg, i, place) -> Params:
  block, router, (g_name, u_name, d_name) = MOE_TENSOR_NAMES[cfg.model_type]
  e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
  p = f"model.layers.{i}.{block}."
  moe = {"router": place(ix.get(p + router + ".weight", (e, d)).T)}
  fused = p + "experts.gate_up_proj"
  if fused in ix:  # transformers >= 5 in-memory layout: [E, 2F, D] and [E, D, F].
    gate_up = ix.get(fused, (e, 2 * f, d))
    moe["gate_proj"] = place(np.swapaxes(gate_up[:, :f], 1, 2))
    moe["up_proj"] = place(np.swapaxes(gate_up[:, f:], 1, 2))
    moe["down_proj"] = place(np.swapaxes(ix.get(p + "experts.down_proj", (e, d, f)), 1, 2))
    return moe

  def stacked(name, d_out, d_in):
    return place(np.stack([ix.get(f"{p}experts.{x}.{name}.weight", (d_out, d_in)).T
                               for x in range(e)]))

  moe["gate_proj"] = stacked(g_name, f, d)
  moe["up_proj"] = stacked(u_name, f, d)
  moe["down_proj"] = stacked(d_name, d, f)
  return moe


def load_params(path: str, dtype=jnp.bfloat16, progress: bool = True,
                on_host: bool = False) -> tuple[ModelConfig, Params]:
  """Reads `path/config.json` and its safetensors into (config, params) with arrays in `dtype`.
  on_host: numpy arrays in host memory instead of device arrays, for a model larger than the
  device (`cqjax.quantize` then works layer by layer, see `cqjax.layer_streaming`)."""
  if not os.path.isdir(path):
    raise CqjaxError(f"{path}: model directory not found")
  cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
  ix = CheckpointIndex(path)
  np_dtype = jnp.dtype(dtype)

  def place(a: np.ndarray) -> jax.Array | np.ndarray:
    # On the host, a copy in memory: the shards are memory-mapped.
    return np.array(a, dtype=np_dtype) if on_host else jnp.asarray(np.asarray(a, dtype=np_dtype))

  v, d = cfg.vocab_size, cfg.hidden_size
  params: Params = {"embed": {"embedding": place(ix.get("model.embed_tokens.weight", (v, d)))}}
  for i in tqdm(range(cfg.num_layers), desc="load layers", disable=not progress, leave=False):
    params[f"layers_{i}"] = _layer_params(ix, cfg, i, place)
  params["final_norm"] = {"scale": place(ix.get("model.norm.weight", (d,)))}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": place(ix.get("lm_head.weight", (v, d)).T)}
  return cfg, params


def load_tokenizer(path: str):
  """The tokenizer saved beside the checkpoint, through transformers (no network)."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise CqjaxError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
