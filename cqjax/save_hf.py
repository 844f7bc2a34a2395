"""Writes a cqjax parameter pytree back as a Hugging Face checkpoint directory (the loader's
inverse), so models trained or transformed here load in transformers and other tools."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from cqjax.config import ModelConfig
from cqjax.load import ATTN_HF_NAMES, MOE_TENSOR_NAMES, SHARED_EXPERTS_HF_PREFIX, Params


def hf_tensors(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """params -> {HF tensor name: host array}, per-expert names as real checkpoints have them."""
  a = lambda x: np.asarray(x)
  t = {"model.embed_tokens.weight": a(params["embed"]["embedding"]),
       "model.norm.weight": a(params["final_norm"]["scale"])}
  if not cfg.tie_word_embeddings:
    t["lm_head.weight"] = a(params["lm_head"]["kernel"]).T
  block, router, (g, u, dn) = MOE_TENSOR_NAMES[cfg.model_type]
  for i in range(cfg.num_layers):
    lp, p = params[f"layers_{i}"], f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = a(lp["input_norm"]["scale"])
    t[p + "post_attention_layernorm.weight"] = a(lp["post_attention_norm"]["scale"])
    for name, leaf in lp["attn"].items():  # linears ({"kernel"}) and norms inside attention ({"scale"})
      hf = f"{p}self_attn.{ATTN_HF_NAMES.get(name, name)}.weight"
      t[hf] = a(leaf["kernel"]).T if "kernel" in leaf else a(leaf["scale"])
    if not cfg.is_moe_layer(i):
      t.update(_swiglu(lp["mlp"], p + "mlp"))
      continue
    moe = lp["moe"]
    t[f"{p}{block}.{router}.weight"] = a(moe["router"]).T
    for ours, theirs in (("gate_proj", g), ("up_proj", u), ("down_proj", dn)):
      w = a(moe[ours])
      for x in range(cfg.num_experts):
        t[f"{p}{block}.experts.{x}.{theirs}.weight"] = w[x].T
    if "shared" in moe:
      t.update(_swiglu(moe["shared"], p + SHARED_EXPERTS_HF_PREFIX))
  return t


def _swiglu(mlp: Params, prefix: str) -> dict[str, np.ndarray]:
  return {f"{prefix}.{name}.weight": np.asarray(mlp[name]["kernel"]).T for name in ("gate_proj", "up_proj", "down_proj")}


def save_hf_checkpoint(path: str, cfg: ModelConfig, params: Params, hf_config: dict,
                       dtype=jnp.bfloat16, max_shard_bytes: int = 5 << 30) -> None:
  """Writes config.json and model.safetensors (or shards + index when larger than
  `max_shard_bytes`) with arrays cast to `dtype`."""
  os.makedirs(path, exist_ok=True)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
  tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in hf_tensors(cfg, params).items()}
  shards, current, size = [], {}, 0
  for k in sorted(tensors):
    if current and size + tensors[k].nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[k] = tensors[k]
    size += tensors[k].nbytes
  shards.append(current)
  torch_dtype = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16",
                 np.dtype(np.float32): "float32"}[np_dtype]
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**hf_config, "torch_dtype": torch_dtype}, f, indent=2)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map |= {k: name for k in shard}
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
           "weight_map": weight_map}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)
