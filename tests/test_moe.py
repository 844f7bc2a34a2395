"""The grouped (ragged_dot) MoE path against the dense every-expert reference, and routing."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.config import ModelConfig
from cqjax.moe import MoeBlock, _expert_collect, _expert_dispatch, route

BASE = ModelConfig(model_type="mixtral", vocab_size=10, hidden_size=24, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=12, num_experts=8, top_k=2, moe_intermediate_size=20)


@pytest.mark.parametrize("tokens", [1, 3, 37])
@pytest.mark.parametrize("model_type,top_k,normalize", [("mixtral", 2, True),
                                                        ("qwen3_moe", 3, False)])
def test_grouped_matches_dense_reference(tokens, model_type, top_k, normalize):
  cfg = dataclasses.replace(BASE, model_type=model_type, top_k=top_k, norm_topk_prob=normalize)
  x = jax.random.normal(jax.random.key(tokens), (1, tokens, cfg.hidden_size))
  params = MoeBlock(cfg).init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda p: p * 10, params)  # decisive routing, large activations
  # Full float32 products: GPUs' default (TF32) rounds the two paths' different dots differently.
  with jax.default_matmul_precision("highest"):
    grouped = MoeBlock(cfg).apply({"params": params}, x)
    dense = MoeBlock(cfg, dense_reference=True).apply({"params": params}, x)
  np.testing.assert_allclose(grouped, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))


def test_one_token_leaves_most_experts_empty():
  cfg = BASE
  x = jax.random.normal(jax.random.key(0), (1, 1, cfg.hidden_size))
  params = MoeBlock(cfg).init(jax.random.key(1), x)["params"]
  _, inter = MoeBlock(cfg).apply({"params": params}, x, mutable=["intermediates"])
  _, group_sizes = inter["intermediates"]["down_proj_input"][0]
  assert int(jnp.sum(group_sizes == 0)) == cfg.num_experts - cfg.top_k
  assert int(jnp.sum(group_sizes)) == cfg.top_k


def test_route_normalizes_and_picks_largest():
  logits = jax.random.normal(jax.random.key(0), (50, 8)) * 3
  cfg = dataclasses.replace(BASE, num_experts=8, top_k=3, norm_topk_prob=True)
  w, ids = route(logits, cfg)
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  probs = jax.nn.softmax(logits, -1)
  np.testing.assert_array_equal(ids, jnp.argsort(-probs, axis=-1)[:, :3])
  w_raw, _ = route(logits, dataclasses.replace(cfg, norm_topk_prob=False))
  np.testing.assert_allclose(w_raw, jnp.sort(probs, -1)[:, ::-1][:, :3], rtol=1e-6)


def test_group_limited_routing_matches_its_definition():
  """DeepSeek-V2: keep the topk_group groups with the largest single probability, top-k inside
  them, weights scaled by routed_scaling_factor."""
  cfg = dataclasses.replace(BASE, num_experts=12, top_k=3, norm_topk_prob=False, topk_method="group_limited_greedy",
                            n_group=4, topk_group=2, routed_scaling_factor=1.7)
  logits = jax.random.normal(jax.random.key(1), (40, 12)) * 2
  w, ids = route(logits, cfg)
  probs = np.asarray(jax.nn.softmax(logits, -1))
  for n in range(40):
    best_groups = np.argsort(-probs[n].reshape(4, 3).max(-1))[:2]
    allowed = np.concatenate([np.arange(3 * g, 3 * g + 3) for g in best_groups])
    want = allowed[np.argsort(-probs[n][allowed])[:3]]
    np.testing.assert_array_equal(np.asarray(ids[n]), want)
    np.testing.assert_allclose(np.asarray(w[n]), 1.7 * probs[n][want], rtol=1e-6)


def test_dispatch_collect_round_trip():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(13, 5)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=(13, 2)), jnp.int32)
  xs, order, sizes = _expert_dispatch(x, ids, 4)
  assert np.all(np.diff(np.asarray(ids).reshape(-1)[np.asarray(order)]) >= 0)  # sorted by expert
  np.testing.assert_array_equal(sizes, np.bincount(np.asarray(ids).reshape(-1), minlength=4))
  w = jnp.full((13, 2), 0.5)
  np.testing.assert_allclose(_expert_collect(xs, order, w), x, rtol=1e-6)
