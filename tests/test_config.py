"""Real checkpoints' config.json files parse into the right architecture (checked by size)."""
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


def _param_count(cfg):
  shapes = jax.eval_shape(lambda: MoeCausalLM(cfg, jnp.bfloat16).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("hf,total", [(MIXTRAL_8X7B, 46_702_792_704),
                                      (QWEN3_30B_A3B, 30_532_122_624)])
def test_published_configs_give_published_sizes(hf, total):
  cfg = ModelConfig.from_hf_dict(hf)
  assert _param_count(cfg) == total


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
