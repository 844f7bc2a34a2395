"""KV-cache decoding and the calibration intermediates of the Flax model."""
import jax.numpy as jnp
import numpy as np

from cqjax.load import load_params
from cqjax.model import MoeCausalLM, init_cache


def test_cached_decoding_matches_full_forward(hf_checkpoints):
  cfg, params = load_params(hf_checkpoints["qwen3_moe"], jnp.float32, progress=False)
  model = MoeCausalLM(cfg, jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)))
  full, _ = model.apply({"params": params}, tokens)
  cache = init_cache(cfg, 2, 16)
  prefix, cache = model.apply({"params": params}, tokens[:, :7], cache=cache, cache_index=0)
  steps = [prefix]
  for i in range(7, 12):
    logits, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache, cache_index=i)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4,
                             atol=1e-5 * float(jnp.abs(full).max()))


def test_intermediates_cover_every_quantized_linear_input(hf_checkpoints):
  cfg, params = load_params(hf_checkpoints["qwen3_moe"], jnp.float32, progress=False)
  tokens = jnp.zeros((2, 5), jnp.int32)
  _, state = MoeCausalLM(cfg).apply({"params": params}, tokens, mutable=["intermediates"])
  inter = state["intermediates"]
  for i in range(cfg.num_layers):
    layer = inter[f"layers_{i}"]
    assert layer["attn_input"][0].shape == (2, 5, cfg.hidden_size)
    assert layer["mlp_input"][0].shape == (2, 5, cfg.hidden_size)
    assert layer["attn"]["o_proj_input"][0].shape == (2, 5, cfg.q_size)
    if cfg.is_moe_layer(i):
      assert layer["moe"]["router_logits"][0].shape == (10, cfg.num_experts)
      h, sizes = layer["moe"]["down_proj_input"][0]
      assert h.shape == (10 * cfg.top_k, cfg.moe_intermediate_size)
      assert int(sizes.sum()) == 10 * cfg.top_k
    else:
      assert "moe" not in layer
  assert inter["lm_head_input"][0].shape == (2, 5, cfg.hidden_size)
  # The dense layer of this config (mlp_only_layers=[1]) is an MLP, not an MoE block.
  assert cfg.dense_layers == (1,) and "mlp" in params["layers_1"]
