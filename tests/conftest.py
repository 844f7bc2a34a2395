"""Shared fixtures: tiny random Hugging Face MoE checkpoints written by transformers itself."""
import os

import jax
import pytest

# Expert-parallel tests need a mesh: 8 CPU devices (before any backend starts). Every other test
# runs on the default device, as before.
jax.config.update("jax_num_cpu_devices", 8)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DEFAULT = os.path.join(REPO, "experiments", "assets", "tiny-mixtral-imdb")
TEST_TEXT = os.path.join(REPO, "tests", "data", "wikitext2_valid_excerpt.txt")


def float64_product(x, w, group_sizes=None):
  """x @ w (or its ragged_dot with group_sizes) in float64 on the host (a GPU's own f32 dot may
  use tf32), with the centroids rounded to x's dtype, as the kernels use them."""
  import numpy as np
  from cqjax.codebook import dequantize
  dense = np.asarray(dequantize(w, x.dtype), np.float64)  # [..., d_in, d_out]
  x64 = np.asarray(x, np.float64)
  if group_sizes is None:
    return x64 @ dense
  out, start = np.zeros((x.shape[0], dense.shape[-1])), 0
  for e, size in enumerate(np.asarray(group_sizes)):
    out[start:start + size] = x64[start:start + size] @ dense[e]
    start += size
  return out


def assert_int8_numerics(got, ref, dtype):
  """An int8-numerics kernel against lut_matmul_int8_reference: both make the same float32
  operations on the same exact int32 dots; a float32 ulp of slack, and bf16 outputs one rounding
  of that."""
  import jax.numpy as jnp
  import numpy as np
  got = np.asarray(got, np.float32)
  assert np.isfinite(got).all()
  ref = np.asarray(jnp.asarray(ref).astype(dtype), np.float32)
  tol = 1e-6 if dtype == jnp.float32 else 2.0 ** -7
  np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def assert_single_int8_product(run, reference, m, k, n, dtype):
  """One weight's int8-numerics kernel run(x, packed, centroids, 4) -> [m, n] in x's dtype, against
  reference (the same signature), on operands seeded by the shape."""
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(m * 1000 + k + n)
  w = random_codebook_weight(rng, (), n, k, 4, k)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  got = run(x, w.packed, w.centroids, 4)
  assert got.dtype == dtype and got.shape == (m, n)
  assert_int8_numerics(got, reference(x, w.packed, w.centroids, 4), dtype)


def random_codebook_weight(rng, lead, n, k, bits, group):
  """A CodebookWeight of random codes and normal centroids: W [*lead, k, n], codebooks of `group` inputs."""
  import jax.numpy as jnp
  from cqjax.codebook import from_codes
  codes = jnp.asarray(rng.integers(0, 2 ** bits, (*lead, n, k)))
  cent = jnp.asarray(rng.normal(size=(*lead, n, k // group, 2 ** bits)), jnp.float32)
  return from_codes(codes, cent, bits)


def _mixtral_config(**kw):
  from transformers import MixtralConfig
  return MixtralConfig(vocab_size=211, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, num_local_experts=5,
                       num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.1,
                       eos_token_id=None, bos_token_id=None, **kw)


def _qwen3_config(**kw):
  from transformers import Qwen3MoeConfig
  return Qwen3MoeConfig(vocab_size=197, hidden_size=40, intermediate_size=48,
                        moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
                        mlp_only_layers=[1], max_position_embeddings=256, initializer_range=0.1,
                        eos_token_id=None, bos_token_id=None, **kw)


def _deepseek_v2_config(**kw):
  from transformers import DeepseekV2Config
  return DeepseekV2Config(vocab_size=151, hidden_size=48, intermediate_size=40, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                          num_experts_per_tok=3, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8,
                          v_head_dim=12, max_position_embeddings=256, initializer_range=0.1,
                          eos_token_id=None, bos_token_id=None, **kw)


def _save(config, path, seed, **save_kw):
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(config).eval()
  model.save_pretrained(path, **save_kw)
  return str(path)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """name -> directory of a saved random model (single-file, sharded, Qwen3 with a dense layer)."""
  root = tmp_path_factory.mktemp("hf")
  return {
      "mixtral": _save(_mixtral_config(), root / "mixtral", 0),
      "mixtral_sharded": _save(_mixtral_config(sliding_window=7), root / "mixtral_sharded", 1,
                               max_shard_size="30KB"),
      "qwen3_moe": _save(_qwen3_config(norm_topk_prob=False), root / "qwen3", 2),
      "qwen3_moe_norm_topk": _save(_qwen3_config(norm_topk_prob=True), root / "qwen3_norm", 3),
      # Low-rank queries, a dense first layer, two shared experts, group-limited routing, sharded.
      "deepseek_v2": _save(_deepseek_v2_config(q_lora_rank=24, first_k_dense_replace=1, n_shared_experts=2,
                                               topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                               routed_scaling_factor=1.5), root / "deepseek_v2", 4,
                           max_shard_size="60KB"),
      # Full-rank queries, every layer MoE, one shared expert, greedy routing.
      "deepseek_v2_greedy": _save(_deepseek_v2_config(q_lora_rank=None, n_shared_experts=1), root / "deepseek_greedy", 5),
      # YaRN RoPE as DeepSeek-V2-Lite sets it (factor, mscale and mscale_all_dim).
      "deepseek_v2_yarn": _save(_deepseek_v2_config(
          q_lora_rank=24, n_shared_experts=2, rope_parameters={
              "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
              "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}), root / "deepseek_yarn", 6),
  }
