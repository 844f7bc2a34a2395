"""Real checkpoints' config.json files parse into the right architecture (checked by size)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.model import MoeCausalLM

# The fields of the published config.json files that the architecture depends on.
MIXTRAL_8X7B = {
    "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "sliding_window": None, "tie_word_embeddings": False, "max_position_embeddings": 32768,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
    "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48,
    "rms_norm_eps": 1e-6, "rope_theta": 1e6, "rope_scaling": None, "tie_word_embeddings": False,
    "max_position_embeddings": 40960, "bos_token_id": 151643, "eos_token_id": 151645,
}

# deepseek-ai/DeepSeek-V2-Lite.
DEEPSEEK_V2_LITE = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "attention_bias": False,
}


def _param_count(cfg):
  shapes = jax.eval_shape(lambda: MoeCausalLM(cfg, jnp.bfloat16).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


# DeepSeek-V2-Lite's count is transformers' DeepseekV2ForCausalLM built on the meta device (15.7 B).
@pytest.mark.parametrize("hf,total", [(MIXTRAL_8X7B, 46_702_792_704),
                                      (QWEN3_30B_A3B, 30_532_122_624),
                                      (DEEPSEEK_V2_LITE, 15_706_484_224)])
def test_published_configs_give_published_sizes(hf, total):
  cfg = ModelConfig.from_hf_dict(hf)
  assert _param_count(cfg) == total


def test_memory_plan_models_are_the_published_configs():
  from experiments.memory_plan import MODELS
  for name, hf in (("mixtral-8x7b", MIXTRAL_8X7B), ("qwen3-30b-a3b", QWEN3_30B_A3B),
                   ("deepseek-v2-lite", DEEPSEEK_V2_LITE)):
    published = ModelConfig.from_hf_dict(hf)
    ours = ModelConfig(**MODELS[name])
    keep = ("bos_token_id", "eos_token_id", "rms_norm_eps", "max_position_embeddings", "rope_theta", "sliding_window")
    assert dataclasses.replace(ours, **{k: getattr(published, k) for k in keep}) == published, name


def test_qwen3_fields():
  cfg = ModelConfig.from_hf_dict(QWEN3_30B_A3B)
  assert (cfg.head_dim, cfg.qk_norm, cfg.norm_topk_prob, cfg.dense_layers) == (128, True, True, ())
  assert cfg.num_experts == 128 and cfg.top_k == 8 and cfg.rope_theta == 1e6


def test_bad_configs():
  with pytest.raises(CqjaxError, match="missing key 'hidden_size'"):
    ModelConfig.from_hf_dict({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"})
  with pytest.raises(CqjaxError, match="num_experts_per_tok=9"):
    ModelConfig.from_hf_dict({**MIXTRAL_8X7B, "num_experts_per_tok": 9})
  with pytest.raises(CqjaxError, match="use_sliding_window=true"):
    ModelConfig.from_hf_dict({**QWEN3_30B_A3B, "use_sliding_window": True})
