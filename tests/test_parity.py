"""cqjax logits and greedy generation against transformers on the same saved checkpoints."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cqjax.generate import generate
from cqjax.load import load_params
from cqjax.model import MoeCausalLM

NAMES = ["mixtral", "mixtral_sharded", "qwen3_moe", "qwen3_moe_norm_topk", "deepseek_v2", "deepseek_v2_greedy",
         "deepseek_v2_yarn"]


def _hf(path):
  return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dense_reference", [False, True])
def test_logits_match_transformers(hf_checkpoints, name, dense_reference):
  path = hf_checkpoints[name]
  cfg, params = load_params(path, jnp.float32, progress=False)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 19))
  with torch.no_grad():
    ref = _hf(path)(torch.tensor(tokens)).logits.numpy()
  out, _ = MoeCausalLM(cfg, jnp.float32, dense_reference).apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(out) - ref).max() / np.abs(ref).max() <= 1e-4


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v2_greedy", "deepseek_v2_yarn"])
def test_greedy_generation_matches_transformers(hf_checkpoints, name):
  path = hf_checkpoints[name]
  cfg, params = load_params(path, jnp.float32, progress=False)
  prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 6))
  ref = _hf(path).generate(torch.tensor(prompt), max_new_tokens=20, min_new_tokens=20,
                           do_sample=False, pad_token_id=0)[:, 6:].numpy()
  ours = np.asarray(generate(MoeCausalLM(cfg, jnp.float32), params, jnp.asarray(prompt), 20))
  np.testing.assert_array_equal(ours, ref)


def test_bf16_checkpoint_loads_exactly(tmp_path, hf_checkpoints):
  from safetensors.torch import load_file
  _hf(hf_checkpoints["mixtral"]).to(torch.bfloat16).save_pretrained(tmp_path)
  saved = load_file(str(tmp_path / "model.safetensors"))
  w2 = saved["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  assert w2.dtype == torch.bfloat16
  cfg, params = load_params(str(tmp_path), jnp.float32, progress=False)
  assert cfg.num_experts == 5
  # HF stores w2 as [d, f]; cqjax stacks it as down_proj[expert] = w2.T, [f, d].
  np.testing.assert_array_equal(np.asarray(params["layers_1"]["moe"]["down_proj"][3]),
                                w2.float().numpy().T)
  _, params_bf16 = load_params(str(tmp_path), jnp.bfloat16, progress=False)
  assert params_bf16["layers_1"]["moe"]["down_proj"].dtype == jnp.bfloat16


def test_yarn_config_is_read(hf_checkpoints):
  from cqjax.model import attention_scale, yarn_rope
  cfg, _ = load_params(hf_checkpoints["deepseek_v2_yarn"], jnp.float32, progress=False)
  assert (cfg.yarn_factor, cfg.yarn_original_max_position, cfg.yarn_mscale_all_dim) == (4.0, 64, 0.707)
  inv_freq, factor = yarn_rope(cfg)
  plain, _ = yarn_rope(load_params(hf_checkpoints["deepseek_v2"], jnp.float32, progress=False)[0])
  assert factor == 1.0 and not np.allclose(inv_freq, plain)  # mscale == mscale_all_dim: cos/sin unscaled
  assert attention_scale(cfg) > cfg.qk_head_dim ** -0.5


def test_latent_attention_caches_the_compressed_latent(hf_checkpoints):
  """DeepSeek-V2 decode keeps the kv_lora_rank latent and the shared RoPE key, not per-head keys
  and values: that is what makes its cache small."""
  from cqjax.model import init_cache
  cfg, params = load_params(hf_checkpoints["deepseek_v2"], jnp.float32, progress=False)
  cache = init_cache(cfg, 2, 32)
  assert set(cache[0]) == {"latent", "k_pe"}
  assert cache[0]["latent"].shape == (2, 32, cfg.kv_lora_rank) and cache[0]["k_pe"].shape == (2, 32, cfg.head_dim)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 9)))
  model = MoeCausalLM(cfg, jnp.float32)
  full, _ = model.apply({"params": params}, tokens)
  _, cache = model.apply({"params": params}, tokens[:, :5], cache=cache, cache_index=0)
  step, _ = model.apply({"params": params}, tokens[:, 5:], cache=cache, cache_index=5)
  np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 5:]), rtol=1e-5, atol=1e-5 * float(jnp.abs(full).max()))
