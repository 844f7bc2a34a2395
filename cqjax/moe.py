"""Mixture-of-experts block: one router, two ways to run the experts.

Expert weights are stacked per projection: `gate_proj`/`up_proj` are [experts, d_model, d_ff]
and `down_proj` is [experts, d_ff, d_model]. The production path sorts token copies by expert
and runs grouped matmuls (`jax.lax.ragged_dot`); the dense path runs every expert on every token
and exists only as the reference the grouped path is tested against.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.config import ModelConfig
from cqjax.codebook import CodebookWeight, dequantize
from cqjax.hadamard import hadamard_matrix
from cqjax.lut_matmul import grouped_lut_matmul, kernel_param, lut_matmul


def route(router_logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
  """Softmax over experts, then top-k (renormalised if `normalize`).

  router_logits: [tokens, experts] -> (weights [tokens, k] float32, expert ids [tokens, k] int32).
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, ids.astype(jnp.int32)


def _expert_dispatch(x, expert_ids, num_experts):
  """Copies each token once per chosen expert and sorts the copies by expert.

  x: [n, d], expert_ids: [n, k] -> (sorted copies [n*k, d], order [n*k], group_sizes [experts]).
  """
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_x = x[order // expert_ids.shape[1]]
  group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return sorted_x, order, group_sizes


def _expert_collect(sorted_y, order, weights):
  """Inverse of `_expert_dispatch`: unsorts [n*k, d] and sums the k copies with router weights."""
  n, k = weights.shape
  y = jnp.zeros_like(sorted_y).at[order].set(sorted_y).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)


def down_proj_input(module: nn.Module, gate, up):
  """SwiGLU, then what the module's options do to a down projection's input: the online
  Hadamard (R4) and, in the full scope, activation fake quantization."""
  h = jax.nn.silu(gate) * up
  if module.online_down_hadamard:
    h = h @ jnp.asarray(hadamard_matrix(h.shape[-1]), h.dtype)
  if module.act_quant is not None and module.act_quant.scope == "full":
    h = fake_quant(h, module.act_quant)
  return h


class MoeBlock(nn.Module):
  """Router + stacked SwiGLU experts. `dense_reference=True` selects the test-only dense path."""

  config: ModelConfig
  dtype: jnp.dtype = jnp.float32
  dense_reference: bool = False
  act_quant: ActQuantConfig | None = None
  online_down_hadamard: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
    cfg = self.config
    e, d, f = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    init = nn.initializers.normal(0.02)
    router = kernel_param(self, "router", init, (d, e), self.dtype)
    w_gate = kernel_param(self, "gate_proj", init, (e, d, f), self.dtype)
    w_up = kernel_param(self, "up_proj", init, (e, d, f), self.dtype)
    w_down = kernel_param(self, "down_proj", init, (e, f, d), self.dtype)

    shape = x.shape
    x = x.reshape(-1, d)
    logits = lut_matmul(x, router)
    self.sow("intermediates", "router_logits", logits)
    weights, ids = route(logits, cfg.top_k, cfg.norm_topk_prob)
    if cfg.model_type == "qwen3_moe":
      # transformers' Qwen3-MoE rounds the router weights to the model dtype; Mixtral keeps f32.
      weights = weights.astype(x.dtype).astype(jnp.float32)

    if self.dense_reference:
      w_gate, w_up, w_down = (dequantize(w, x.dtype) if isinstance(w, CodebookWeight) else w
                              for w in (w_gate, w_up, w_down))
      h = down_proj_input(self, jnp.einsum("nd,edf->enf", x, w_gate), jnp.einsum("nd,edf->enf", x, w_up))
      y = jnp.einsum("enf,efd->end", h, w_down).astype(jnp.float32)
      dense_w = jnp.zeros((x.shape[0], e), jnp.float32).at[
          jnp.arange(x.shape[0])[:, None], ids].set(weights)
      out = jnp.einsum("end,ne->nd", y, dense_w)
    else:
      xs, order, group_sizes = _expert_dispatch(x, ids, e)
      h = down_proj_input(self, grouped_lut_matmul(xs, w_gate, group_sizes),
                          grouped_lut_matmul(xs, w_up, group_sizes))
      self.sow("intermediates", "down_proj_input", (h, group_sizes))
      out = _expert_collect(grouped_lut_matmul(h, w_down, group_sizes), order, weights)
    return out.astype(x.dtype).reshape(shape)
