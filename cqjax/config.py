"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cqjax.errors import CqjaxError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only MoE language model (Mixtral or Qwen3-MoE family)."""

  model_type: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  num_experts: int
  top_k: int
  moe_intermediate_size: int
  # Dense-MLP width for layers that are not MoE (Qwen3 `mlp_only_layers`); 0 if none.
  intermediate_size: int = 0
  dense_layers: tuple[int, ...] = ()
  rms_norm_eps: float = 1e-5
  rope_theta: float = 1e6
  norm_topk_prob: bool = True
  qk_norm: bool = False
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise CqjaxError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if not 0 < self.top_k <= self.num_experts:
      raise CqjaxError(
          f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def is_moe_layer(self, layer: int) -> bool:
    return layer not in self.dense_layers

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
    """Reads the fields of a transformers config dict; `source` names the file in errors."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise CqjaxError(
          f"{source}: unknown model_type {model_type!r}; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")

    def need(*keys):
      for k in keys:
        if d.get(k) is not None:
          return d[k]
      raise CqjaxError(f"{source}: missing key {keys[0]!r}")

    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise CqjaxError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
    rope_theta = rope.get("rope_theta", d.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))

    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    num_layers = int(need("num_hidden_layers"))
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
      eos = eos[0] if eos else None
    common = dict(
        model_type=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        top_k=int(need("num_experts_per_tok")),
    )
    if model_type == "mixtral":
      return cls(
          **common,
          num_experts=int(need("num_local_experts")),
          moe_intermediate_size=int(need("intermediate_size")),
          norm_topk_prob=True,
          qk_norm=False,
          sliding_window=d.get("sliding_window"),
      )
    # qwen3_moe
    step = int(d.get("decoder_sparse_step", 1))
    mlp_only = set(d.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(num_layers)
                  if i in mlp_only or not (d.get("num_experts", 1) > 0 and (i + 1) % step == 0))
    if d.get("use_sliding_window"):
      raise CqjaxError(f"{source}: use_sliding_window=true is not supported for qwen3_moe")
    return cls(
        **common,
        num_experts=int(need("num_experts", "num_local_experts")),
        moe_intermediate_size=int(need("moe_intermediate_size")),
        intermediate_size=int(d.get("intermediate_size") or 0),
        dense_layers=dense,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        qk_norm=True,
    )

  @classmethod
  def from_file(cls, path: str) -> "ModelConfig":
    if not os.path.isfile(path):
      raise CqjaxError(f"{path}: config.json not found")
    try:
      with open(path) as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise CqjaxError(f"{path}: not valid JSON ({e})") from None
    return cls.from_hf_dict(d, source=path)
