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


def test_sampled_generation_is_seeded_and_respects_eos(hf_checkpoints):
  import jax
  from cqjax.generate import generate
  cfg, params = load_params(hf_checkpoints["mixtral"], jnp.float32, progress=False)
  model = MoeCausalLM(cfg, jnp.float32)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 5)))
  a = generate(model, params, prompt, 12, jax.random.key(1), temperature=1.0, top_k=5)
  b = generate(model, params, prompt, 12, jax.random.key(1), temperature=1.0, top_k=5)
  c = generate(model, params, prompt, 12, jax.random.key(2), temperature=1.0, top_k=5)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # top_k=1 sampling is greedy decoding.
  np.testing.assert_array_equal(generate(model, params, prompt, 12, jax.random.key(3), temperature=0.7, top_k=1),
                                generate(model, params, prompt, 12))
  # After a row emits eos, the rest of the row is eos.
  greedy = np.asarray(generate(model, params, prompt, 12))
  eos = int(greedy[0, 2])
  stopped = np.asarray(generate(model, params, prompt, 12, eos_token_id=eos))
  first = int(np.argmax(stopped[0] == eos))
  assert np.all(stopped[0, first:] == eos)
  np.testing.assert_array_equal(stopped[0, :first], greedy[0, :first])
