"""Addressing kernels inside the parameter pytree by key path, and which kernels of a layer
read or write the residual stream (what norm folding, rotations and quantization act on)."""
from __future__ import annotations

from typing import Any

from cqjax.config import ModelConfig

Path = tuple[str, ...]


def get_path(params: dict, path: Path) -> Any:
  for k in path:
    params = params[k]
  return params


def set_path(params: dict, path: Path, value) -> dict:
  """A copy of params with `path` set (only the dicts along the path are copied; the last key
  may be new)."""
  out = dict(params)
  out[path[0]] = value if len(path) == 1 else set_path(params[path[0]], path[1:], value)
  return out


def ffn_path(cfg: ModelConfig, layer: int, name: str) -> Path:
  """Path of a feed-forward kernel (gate_proj, up_proj, down_proj; router for MoE layers)."""
  if cfg.is_moe_layer(layer):
    return (f"layers_{layer}", "moe", name)
  return (f"layers_{layer}", "mlp", name, "kernel")


def attn_path(layer: int, name: str) -> Path:
  return (f"layers_{layer}", "attn", name, "kernel")


def shared_path(layer: int, name: str) -> Path:
  """Path of a DeepSeek shared-expert kernel (gate_proj, up_proj, down_proj)."""
  return (f"layers_{layer}", "moe", "shared", name, "kernel")


def attn_input_readers(cfg: ModelConfig, layer: int) -> list[Path]:
  """Kernels that read the attention input (the input_layernorm output): q/k/v, or with latent
  attention the query (or its low-rank down-projection) and the key/value down-projection."""
  if cfg.mla:
    return [attn_path(layer, "q_a_proj" if cfg.q_lora_rank else "q_proj"), attn_path(layer, "kv_a_proj")]
  return [attn_path(layer, n) for n in ("q_proj", "k_proj", "v_proj")]


def attn_inner_linears(cfg: ModelConfig, layer: int) -> list[Path]:
  """Latent attention's up-projections, which read its own normalised latents, not the stream."""
  if not cfg.mla:
    return []
  return [attn_path(layer, "q_b_proj")] * bool(cfg.q_lora_rank) + [attn_path(layer, "kv_b_proj")]


def ffn_input_readers(cfg: ModelConfig, layer: int) -> list[Path]:
  """Kernels that read the MoE / MLP input (the post_attention_layernorm output)."""
  names = ("router", "gate_proj", "up_proj") if cfg.is_moe_layer(layer) else ("gate_proj", "up_proj")
  shared = [shared_path(layer, n) for n in ("gate_proj", "up_proj")] if has_shared(cfg, layer) else []
  return [ffn_path(cfg, layer, n) for n in names] + shared


def down_projections(cfg: ModelConfig, layer: int) -> list[tuple[Path, int]]:
  """(path, d_ff) of every down projection of the layer: routed experts or dense MLP, and shared experts."""
  d_ff = cfg.moe_intermediate_size if cfg.is_moe_layer(layer) else cfg.intermediate_size
  out = [(ffn_path(cfg, layer, "down_proj"), d_ff)]
  if has_shared(cfg, layer):
    out.append((shared_path(layer, "down_proj"), cfg.moe_intermediate_size * cfg.n_shared_experts))
  return out


def residual_writers(cfg: ModelConfig, layer: int) -> list[Path]:
  """Kernels that write the residual stream: o_proj and every down projection."""
  return [attn_path(layer, "o_proj")] + [path for path, _ in down_projections(cfg, layer)]


def has_shared(cfg: ModelConfig, layer: int) -> bool:
  return cfg.is_moe_layer(layer) and cfg.n_shared_experts > 0
