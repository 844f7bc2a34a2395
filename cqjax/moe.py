"""Mixture-of-experts block: one router, two ways to run the experts.

Expert weights are stacked per projection: `gate_proj`/`up_proj` are [experts, d_model, d_ff]
(or one `gate_up_proj` [experts, d_model, 2 d_ff] after `cqjax.fuse_projections`) and `down_proj`
is [experts, d_ff, d_model]. The production path sorts token copies by expert
and runs grouped matmuls (`jax.lax.ragged_dot`); the dense path runs every expert on every token
and exists only as the reference the grouped path is tested against. Under a mesh whose `expert`
axis has several devices (`with jax.set_mesh(mesh):`, see `cqjax.sharding`) the grouped path runs
expert-parallel: `_expert_parallel` sends each token copy to the device holding its expert.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cqjax.act_quant import ActQuantConfig, full_scope, quantize_input
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.codebook import CodebookWeight, dequantize
from cqjax.hadamard import hadamard_transform
from cqjax.lut_matmul import Linear, grouped_lut_matmul, has_params, kernel_param, lut_matmul
from cqjax.sharding import expert_axis_size


def route(router_logits: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Softmax over experts, then top-k (renormalised if `cfg.norm_topk_prob`). DeepSeek's
  `group_limited_greedy` first keeps the `topk_group` expert groups with the highest single
  score; the weights are scaled by `routed_scaling_factor`.

  router_logits: [tokens, experts] -> (weights [tokens, k] float32, expert ids [tokens, k] int32).
  """
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  scores = probs
  if cfg.topk_method == "group_limited_greedy":
    grouped = probs.reshape(*probs.shape[:-1], cfg.n_group, -1)
    _, groups = jax.lax.top_k(jnp.max(grouped, axis=-1), cfg.topk_group)
    keep = jnp.zeros(grouped.shape[:-1], bool).at[jnp.arange(probs.shape[0])[:, None], groups].set(True)
    scores = jnp.where(keep[..., None], grouped, 0.0).reshape(probs.shape)
  weights, ids = jax.lax.top_k(scores, cfg.top_k)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  if cfg.routed_scaling_factor != 1.0:
    weights = weights * cfg.routed_scaling_factor
  return weights, ids.astype(jnp.int32)


def _expert_dispatch(x, expert_ids, num_experts):
  """Copies each token once per chosen expert and sorts the copies by expert.

  x: [n, d], expert_ids: [n, k] -> (sorted copies [n*k, d], order [n*k], group_sizes [experts]).
  """
  flat = expert_ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_x = x[order // expert_ids.shape[1]]
  # One reduction; bincount's scatter-add costs a decode step three launches (zeros, copy, scatter).
  group_sizes = jnp.sum(flat[:, None] == jnp.arange(num_experts, dtype=flat.dtype), axis=0, dtype=jnp.int32)
  return sorted_x, order, group_sizes


def _expert_collect(sorted_y, order, weights):
  """Inverse of `_expert_dispatch`: unsorts [n*k, d] and sums the k copies with router weights."""
  n, k = weights.shape
  y = jnp.zeros_like(sorted_y).at[order].set(sorted_y).reshape(n, k, -1)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights)


def down_proj_input(module: nn.Module, gate, up):
  """SwiGLU, then the online Hadamard (R4) where the module asks for it: a down projection's input
  (before activation quantization, which the product takes: `full_scope(module.act_quant)`)."""
  h = jax.nn.silu(gate) * up
  return hadamard_transform(h) if module.online_down_hadamard else h


def _gate_up(x, w_in: tuple, product):
  """SwiGLU's (gate, up) of x: two products over w_in = (gate, up), or one over w_in = (gate_up,)
  (cqjax.fuse_projections), split in halves. product(x, w) is the product with one weight."""
  if len(w_in) == 1:
    return jnp.split(product(x, w_in[0]), 2, axis=-1)
  return product(x, w_in[0]), product(x, w_in[1])


def _expert_ffn(module: nn.Module, xs, group_sizes, w_in: tuple, w_down):
  """Token copies [m, d] sorted by expert through their experts' SwiGLU, each product of its
  input's Q_a (module.act_quant; the down projections' in scope 'full') -> (down input, [m, d]).
  w_in: the stacked (gate, up) kernels or (gate_up,), see `_gate_up`."""
  act = module.act_quant
  h = down_proj_input(module, *_gate_up(xs, w_in, lambda x, w: grouped_lut_matmul(x, w, group_sizes, act)))
  return h, grouped_lut_matmul(h, w_down, group_sizes, full_scope(act))


def _expert_parallel(module: nn.Module, x, weights, ids, w_in: tuple, w_down, num_experts: int):
  """The grouped path with experts sharded over the context mesh's `expert` axis.

  Tokens are split over the `data` and `expert` axes. Each device sorts its token copies by
  expert, sends every copy to the device that holds its expert (one `all_to_all`), runs its local
  experts, and gets the results back (a second `all_to_all`). A device's send buffer has room for
  all its copies in every destination, so no token is ever dropped (no capacity factor).
  x [n, d], weights / ids [n, k] -> [n, d] float32.
  """
  mesh = jax.sharding.get_abstract_mesh()
  devices = mesh.shape["expert"]
  if num_experts % devices:
    raise CqjaxError(f"the mesh's expert axis ({devices} devices) does not divide the {num_experts} experts")
  local_experts = num_experts // devices
  tokens = tuple(a for a in ("data", "expert") if a in mesh.axis_names)
  shards = devices * (mesh.shape["data"] if "data" in mesh.axis_names else 1)
  n, pad = x.shape[0], (-x.shape[0]) % shards
  x, weights, ids = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, ids))

  def local(x, weights, ids, w_in, w_down):
    copies, d = ids.size, x.shape[1]
    xs, order, _ = _expert_dispatch(x, ids, num_experts)
    expert = ids.reshape(-1)[order]
    dest = expert // local_experts
    counts = jnp.bincount(dest, length=devices)
    slot = jnp.arange(copies) - (jnp.cumsum(counts) - counts)[dest]  # position in dest's bucket
    send = jnp.zeros((devices, copies, d), xs.dtype).at[dest, slot].set(xs)
    send_ids = jnp.full((devices, copies), local_experts, jnp.int32).at[dest, slot].set(expert % local_experts)
    recv = jax.lax.all_to_all(send, "expert", 0, 0).reshape(-1, d)
    recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0).reshape(-1)
    # Empty slots carry the id `local_experts`: sorted last, outside every group, they stay zero.
    rorder = jnp.argsort(recv_ids, stable=True)
    sizes = jnp.bincount(recv_ids, length=local_experts).astype(jnp.int32)
    _, y = _expert_ffn(module, recv[rorder], sizes, w_in, w_down)
    y = jnp.zeros_like(y).at[rorder].set(y).reshape(devices, copies, -1)
    back = jax.lax.all_to_all(y, "expert", 0, 0)
    return _expert_collect(back[dest, slot], order, weights)

  spec = lambda w: jax.tree.map(lambda _: P("expert"), w)
  # check_vma=False: the kernels' custom VJPs (cqjax.lut_matmul) are written for plain arrays.
  out = jax.shard_map(local, in_specs=(P(tokens),) * 3 + (spec(w_in), spec(w_down)),
                      out_specs=P(tokens), check_vma=False)(x, weights, ids, w_in, w_down)
  return out[:n]


class SwigluMlp(nn.Module):
  """SwiGLU MLP of width `d_ff`: the dense layers (Qwen3 `mlp_only_layers`, DeepSeek's first
  layers) and DeepSeek's shared experts. Kernels gate_proj, up_proj [d, d_ff] (or one gate_up_proj
  [d, 2 d_ff], cqjax.fuse_projections), down_proj [d_ff, d]."""

  d_ff: int
  dtype: jnp.dtype = jnp.float32
  act_quant: ActQuantConfig | None = None  # Q_a of x in gate/up (and of down's input in scope 'full')
  online_down_hadamard: bool = False

  @nn.compact
  def __call__(self, x):
    d, f = x.shape[-1], self.d_ff
    linear = lambda n, name: Linear(d, n, self.dtype, self.act_quant, name=name)
    w_in = ((linear(2 * f, "gate_up_proj"),) if has_params(self, "gate_up_proj")
            else (linear(f, "gate_proj"), linear(f, "up_proj")))
    h = down_proj_input(self, *_gate_up(x, w_in, lambda x, module: module(x)))
    return Linear(f, d, self.dtype, full_scope(self.act_quant), name="down_proj")(h)


class MoeBlock(nn.Module):
  """Router + stacked SwiGLU experts. `dense_reference=True` selects the test-only dense path.
  act_quant: Q_a of x in the router's and the experts' gate/up products (and of the down
  projections' inputs in scope 'full')."""

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
    if has_params(self, "gate_up_proj"):  # cqjax.fuse_projections
      w_in = (kernel_param(self, "gate_up_proj", init, (e, d, 2 * f), self.dtype),)
    else:
      w_in = (kernel_param(self, "gate_proj", init, (e, d, f), self.dtype),
              kernel_param(self, "up_proj", init, (e, d, f), self.dtype))
    w_down = kernel_param(self, "down_proj", init, (e, f, d), self.dtype)

    shape = x.shape
    x = x.reshape(-1, d)
    logits = lut_matmul(x, router, self.act_quant)
    self.sow("intermediates", "router_logits", logits)
    weights, ids = route(logits, cfg)
    if cfg.model_type == "qwen3_moe":
      # transformers' Qwen3-MoE rounds the router weights to the model dtype; Mixtral keeps f32.
      weights = weights.astype(x.dtype).astype(jnp.float32)

    if self.dense_reference:
      dense = lambda w: dequantize(w, x.dtype) if isinstance(w, CodebookWeight) else w
      w_in, w_down = tuple(dense(w) for w in w_in), dense(w_down)
      xq = quantize_input(x, self.act_quant)
      h = down_proj_input(self, *_gate_up(xq, w_in, lambda x, w: jnp.einsum("nd,edf->enf", x, w)))
      h = quantize_input(h, full_scope(self.act_quant))
      y = jnp.einsum("enf,efd->end", h, w_down).astype(jnp.float32)
      dense_w = jnp.zeros((x.shape[0], e), jnp.float32).at[
          jnp.arange(x.shape[0])[:, None], ids].set(weights)
      out = jnp.einsum("end,ne->nd", y, dense_w)
    elif expert_axis_size() > 1:
      out = _expert_parallel(self, x, weights, ids, w_in, w_down, e)
    else:
      xs, order, group_sizes = _expert_dispatch(x, ids, e)
      h, y = _expert_ffn(self, xs, group_sizes, w_in, w_down)
      self.sow("intermediates", "down_proj_input", (h, group_sizes))  # calibration statistics
      out = _expert_collect(y, order, weights)
    if cfg.n_shared_experts:
      out = out + SwigluMlp(cfg.moe_intermediate_size * cfg.n_shared_experts, self.dtype, self.act_quant,
                            self.online_down_hadamard, name="shared")(x).astype(jnp.float32)
    return out.astype(x.dtype).reshape(shape)
