"""Model configuration: one frozen dataclass read from a Hugging Face `config.json`."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from cqjax.errors import CqjaxError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen3_moe", "deepseek_v2")
TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only MoE language model (Mixtral, Qwen3-MoE or DeepSeek-V2 family).

  DeepSeek-V2's multi-head latent attention (MLA) is on when kv_lora_rank > 0: queries through
  an optional low-rank q_lora_rank bottleneck, keys and values through a kv_lora_rank latent,
  RoPE on a separate qk_rope_head_dim part (head_dim is that part, as in transformers)."""

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
  # DeepSeek-V2: MLA dimensions, shared experts and the router's variants.
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  qk_nope_head_dim: int = 0
  v_head_dim: int = 0
  n_shared_experts: int = 0
  topk_method: str = "greedy"
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  # YaRN RoPE scaling (DeepSeek-V2; factor 0 = plain RoPE): as transformers' `rope_parameters`.
  yarn_factor: float = 0.0
  yarn_original_max_position: int = 0
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  yarn_mscale: float = 0.0
  yarn_mscale_all_dim: float = 0.0
  yarn_attention_factor: float = 0.0
  yarn_truncate: bool = True

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise CqjaxError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    if not 0 < self.top_k <= self.num_experts:
      raise CqjaxError(
          f"num_experts_per_tok={self.top_k} must be in [1, {self.num_experts}]")
    if self.topk_method not in TOPK_METHODS:
      raise CqjaxError(f"topk_method={self.topk_method!r} is not supported; supported: {', '.join(TOPK_METHODS)}")
    if self.num_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
      raise CqjaxError(f"n_group={self.n_group} must divide the {self.num_experts} experts and topk_group="
                       f"{self.topk_group} be in [1, n_group]")

  @property
  def mla(self) -> bool:
    return self.kv_lora_rank > 0

  @property
  def qk_head_dim(self) -> int:
    """Query/key width per head: the whole head, or MLA's no-RoPE part plus its RoPE part."""
    return self.qk_nope_head_dim + self.head_dim if self.mla else self.head_dim

  @property
  def q_size(self) -> int:
    return self.num_heads * self.qk_head_dim

  @property
  def value_head_dim(self) -> int:
    return self.v_head_dim if self.mla else self.head_dim

  @property
  def attn_out_size(self) -> int:
    """Width of o_proj's input: heads x value width."""
    return self.num_heads * self.value_head_dim

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
    if rope_type != "default" and not (rope_type == "yarn" and model_type == "deepseek_v2"):
      raise CqjaxError(f"{source}: rope_type {rope_type!r} is not supported (only 'default'; 'yarn' for deepseek_v2)")
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
    if model_type == "deepseek_v2":
      return cls._deepseek_v2(d, common, source, need)
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
  def _deepseek_v2(cls, d, common, source, need) -> "ModelConfig":
    for key in ("attention_bias", "mlp_bias"):
      if d.get(key):
        raise CqjaxError(f"{source}: {key}=true is not supported for deepseek_v2")
    if d.get("norm_topk_prob"):
      raise CqjaxError(f"{source}: norm_topk_prob=true is not supported for deepseek_v2 (transformers ignores it)")
    num_layers = common["num_layers"]
    first_dense = int(d.get("first_k_dense_replace") or 0)
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    yarn = {}
    if rope.get("rope_type", rope.get("type", "default")) == "yarn":
      original = int(rope.get("original_max_position_embeddings") or 0)
      if not original:
        raise CqjaxError(f"{source}: yarn RoPE needs rope_parameters.original_max_position_embeddings")
      factor = rope.get("factor") or common["max_position_embeddings"] / original
      yarn = dict(yarn_factor=float(factor), yarn_original_max_position=original,
                  yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1),
                  yarn_mscale=float(rope.get("mscale") or 0), yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0),
                  yarn_attention_factor=float(rope.get("attention_factor") or 0),
                  yarn_truncate=bool(rope.get("truncate", True)))
    common = dict(common, num_kv_heads=common["num_heads"], head_dim=int(need("qk_rope_head_dim")))
    return cls(
        **common,
        num_experts=int(need("n_routed_experts", "num_experts")),
        moe_intermediate_size=int(need("moe_intermediate_size")),
        intermediate_size=int(d.get("intermediate_size") or 0),
        dense_layers=tuple(range(min(first_dense, num_layers))),
        norm_topk_prob=False,
        q_lora_rank=int(d.get("q_lora_rank") or 0),
        kv_lora_rank=int(need("kv_lora_rank")),
        qk_nope_head_dim=int(need("qk_nope_head_dim")),
        v_head_dim=int(need("v_head_dim")),
        n_shared_experts=int(d.get("n_shared_experts") or 0),
        topk_method=d.get("topk_method") or "greedy",
        n_group=int(d.get("n_group") or 1),
        topk_group=int(d.get("topk_group") or 1),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        **yarn,
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
