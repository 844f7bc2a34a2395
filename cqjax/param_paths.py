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


def attn_input_readers(layer: int) -> list[Path]:
  """Kernels that read the attention input (the input_layernorm output)."""
  return [attn_path(layer, n) for n in ("q_proj", "k_proj", "v_proj")]


def ffn_input_readers(cfg: ModelConfig, layer: int) -> list[Path]:
  """Kernels that read the MoE / MLP input (the post_attention_layernorm output)."""
  names = ("router", "gate_proj", "up_proj") if cfg.is_moe_layer(layer) else ("gate_proj", "up_proj")
  return [ffn_path(cfg, layer, n) for n in names]
