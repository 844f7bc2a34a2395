"""ACCF: fine-tune the centroids of a codebook-quantized model block by block, so each block's
output on the quantized model's own (fake-quantized) inputs matches the full-precision block.

- Attention: each quantized linear (q/k/v, and o_proj in scope `full`) matches its FP output:
  MSE(Q_a(x_q) Ŵ, x_fp W).
- MoE block: MSE of the block output + KL(p_fp ‖ p_q) of the router softmax.
- A centroid's gradient is the mean of the gradients of the weights assigned to it (the
  reference's rule; autodiff through the gather gives their sum, which is divided by the count),
  then SGD. After every step the codes are re-assigned input-aware: weight w at input channel j
  goes to the centroid c minimising (E[x_j x̂_j] w − E[x_j²] c)², i.e. the centroid nearest to
  w · E[x_j x̂_j] / E[x_j²] (x: FP input, x̂: the quantized model's input). Linears whose input is
  not a norm output (o_proj, down projections) are re-assigned to the nearest centroid of w.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.checkpoint import load_tree, save_tree
from cqjax.codebook import CodebookWeight, codes_of, dequantize, from_codes, refuse_laid_out
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.layer_streaming import on_host, to_device, to_host
from cqjax.load import Params
from cqjax.model import Attention, LatentAttention, RMSNorm
from cqjax.param_paths import attn_inner_linears, attn_input_readers
from cqjax.moe import MoeBlock, SwigluMlp
from cqjax.sharding import shard_batch

_is_cb = lambda x: isinstance(x, CodebookWeight)


@dataclasses.dataclass(frozen=True)
class AccfConfig:
  """Defaults are the reference's: SGD lr 1e-4, batch 32, 4 epochs; KL weight 1.
  optimizer: 'sgd' or 'adam'."""

  lr: float = 1e-4
  optimizer: str = "sgd"
  epochs: int = 4
  batch_size: int = 32
  kl_weight: float = 1.0
  reassign: bool = True
  seed: int = 0


def reassign_codes(w_fp: jax.Array, centroids: jax.Array, ratio: jax.Array) -> tuple[jax.Array, jax.Array]:
  """w_fp [..., d_in, d_out], centroids [..., d_out, groups, C], ratio [d_in] ->
  (sorted centroids, codes [..., d_out, d_in]) with each code the centroid nearest w·ratio."""
  cent = jnp.sort(centroids, axis=-1)
  target = jnp.swapaxes(w_fp * ratio[:, None], -1, -2).astype(cent.dtype)  # [..., d_out, d_in]
  groups = cent.shape[-2]
  t = target.reshape(*target.shape[:-1], groups, -1)
  mids = (cent[..., 1:] + cent[..., :-1]) / 2
  codes = jax.vmap(jnp.searchsorted, in_axes=(0, 0))(mids.reshape(-1, mids.shape[-1]),
                                                     t.reshape(-1, t.shape[-1]))
  return cent, codes.reshape(target.shape).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module", "collect"))
def _apply(module, params, *args, collect: str | tuple[str, ...] | None = None):
  """module.apply under jit (with a mesh, eager op-by-op dispatch of sharded arrays is slow and
  has deadlocked XLA:CPU's collectives); collect: an intermediate (or a tuple of them) to return
  beside the output."""
  if collect is None:
    return module.apply({"params": params}, *args)
  y, state = module.apply({"params": params}, *args, mutable=["intermediates"])
  take = lambda name: state["intermediates"][name][0]
  return y, take(collect) if isinstance(collect, str) else tuple(take(name) for name in collect)


@jax.jit
def _channel_ratio(x_fp, x_q):
  """E[x_j x̂_j] / E[x_j²] per input channel j, over every token."""
  x_fp = x_fp.reshape(-1, x_fp.shape[-1]).astype(jnp.float32)
  x_q = x_q.reshape(-1, x_q.shape[-1]).astype(jnp.float32)
  return jnp.mean(x_fp * x_q, 0) / jnp.maximum(jnp.mean(x_fp * x_fp, 0), 1e-12)


def _codebooks(tree) -> list[CodebookWeight]:
  return [leaf for leaf in jax.tree.leaves(tree, is_leaf=_is_cb) if _is_cb(leaf)]


def _rebuild(tree, new_cbs):
  it = iter(new_cbs)
  return jax.tree.map(lambda leaf: next(it) if _is_cb(leaf) else leaf, tree, is_leaf=_is_cb)


def accf_step(q_sub, fp_ws: list, ratios: list, loss_fn, opt: optax.GradientTransformation, cfg: AccfConfig):
  """One ACCF update of every CodebookWeight in q_sub (fp_ws / ratios: their FP kernels and input
  ratios, in tree order): (codebooks, opt_state, batch) -> (codebooks, opt_state, loss). Pure."""
  def step(cbs, opt_state, batch):
    cents = [cb.centroids for cb in cbs]

    def loss_of(cents):
      tree = _rebuild(q_sub, [dataclasses.replace(cb, centroids=c) for cb, c in zip(cbs, cents)])
      return loss_fn(tree, batch)

    loss, grads = jax.value_and_grad(loss_of)(cents)
    mean_grads = []
    for cb, c, g in zip(cbs, cents, grads):
      codes = codes_of(cb).reshape(*c.shape[:-1], -1)
      counts = jax.vmap(lambda k: jnp.bincount(k, length=c.shape[-1]))(codes.reshape(-1, codes.shape[-1]))
      mean_grads.append(g / jnp.maximum(counts.reshape(c.shape), 1))
    updates, opt_state = opt.update(mean_grads, opt_state, cents)
    new = []
    for cb, c, w, r in zip(cbs, optax.apply_updates(cents, updates), fp_ws, ratios):
      if cfg.reassign:
        c, new_codes = reassign_codes(w, c, r)
        new.append(from_codes(new_codes, c, cb.bits))
      else:
        new.append(dataclasses.replace(cb, centroids=c))
    return new, opt_state, loss
  return step


def codebook_targets(q_sub, fp_sub, ratio_of: Callable[[tuple], Any]) -> tuple[list, list]:
  """The FP kernels of q_sub's CodebookWeights and their input-channel ratios (ratio_of(key
  path)), in tree order: `accf_step`'s fp_ws and ratios."""
  paths_cb = [p for p, leaf in jax.tree_util.tree_flatten_with_path(q_sub, is_leaf=_is_cb)[0] if _is_cb(leaf)]
  fp_ws = [w for path, w in jax.tree_util.tree_flatten_with_path(fp_sub)[0]
           if any(path[:len(p)] == p for p in paths_cb)]
  return fp_ws, [ratio_of(p) for p in paths_cb]


def moe_ratios(cfg: ModelConfig, in_ratio: jax.Array) -> Callable[[tuple], jax.Array]:
  """ratio_of for a MoE block: the block input's ratio for router and gate/up kernels, ones for
  the down projections (routed: d_ff inputs; shared: n_shared · d_ff)."""
  ones = jnp.ones((cfg.moe_intermediate_size,))
  shared_ones = jnp.ones((cfg.moe_intermediate_size * cfg.n_shared_experts,))

  def ratio_of(path):
    keys = [getattr(k, "key", None) for k in path]
    if "down_proj" not in keys:
      return in_ratio
    return shared_ones if "shared" in keys else ones
  return ratio_of


def moe_block_loss(q_mod: MoeBlock, kl_weight: float):
  """The MoE block's ACCF loss: loss(params, (x, y_fp, router_logits_fp)) = MSE of the block
  output + kl_weight · KL(p_fp ‖ p_q) of the router softmax, per token."""
  def loss(tree, b):
    y, state = q_mod.apply({"params": tree}, b[0], mutable=["intermediates"])
    logits = state["intermediates"]["router_logits"][0]
    logp_fp = jax.nn.log_softmax(b[2].astype(jnp.float32), -1)
    logp_q = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(logp_fp.shape)
    kl = jnp.sum(jnp.exp(logp_fp) * (logp_fp - logp_q)) / (logp_fp.shape[0] * logp_fp.shape[1])
    return jnp.mean((y - b[1]) ** 2) + kl_weight * kl
  return loss


def _train(q_sub, fp_sub, ratio_of: Callable[[tuple], Any], loss_fn, data: tuple, n: int,
           cfg: AccfConfig, desc: str | None) -> tuple[Any, list[float]]:
  """Optimises every CodebookWeight's centroids in q_sub; loss_fn(q_sub, batch_data) -> scalar.
  data: arrays with a leading sample axis, batched together; desc: progress-bar title (None: no
  bar). Returns (q_sub, block loss before training and after each epoch)."""
  if not _codebooks(q_sub):
    return q_sub, []
  fp_ws, ratios = codebook_targets(q_sub, fp_sub, ratio_of)
  opt = optax.adam(cfg.lr) if cfg.optimizer == "adam" else optax.sgd(cfg.lr)
  step = jax.jit(accf_step(q_sub, fp_ws, ratios, loss_fn, opt, cfg))

  @jax.jit
  def batch_loss(cbs, batch):
    return loss_fn(_rebuild(q_sub, cbs), batch)

  steps = max(n // cfg.batch_size, 1)

  def full_loss(cbs):
    # float() per batch: numpy cannot average bfloat16 device scalars (a bf16 compute dtype).
    return float(np.mean([float(batch_loss(cbs, tuple(d[k * cfg.batch_size: (k + 1) * cfg.batch_size] for d in data)))
                          for k in range(steps)]))

  cbs = _codebooks(q_sub)
  opt_state = opt.init([cb.centroids for cb in cbs])
  rng = np.random.default_rng(cfg.seed)
  # Block loss on all calibration samples before training and after each epoch; the best
  # epoch's centroids are kept, so a block never ends worse than its K-means start.
  history = [full_loss(cbs)]
  best, best_loss = cbs, history[0]
  for _ in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=desc is None):
    order = rng.permutation(n)
    for k in range(steps):
      idx = np.sort(order[k * cfg.batch_size: (k + 1) * cfg.batch_size])
      cbs, opt_state, _ = step(cbs, opt_state, tuple(d[idx] for d in data))
    history.append(full_loss(cbs))
    if history[-1] < best_loss:
      best, best_loss = cbs, history[-1]
  cbs = best
  return _rebuild(q_sub, cbs), history


def finetune_centroids(cfg: ModelConfig, fp_params: Params, q_params: Params, windows: np.ndarray,
                       act: ActQuantConfig | None, online_down_hadamard: bool = False,
                       accf: AccfConfig = AccfConfig(), dtype=jnp.float32,
                       checkpoint_dir: str | None = None, progress: bool = True) -> tuple[Params, dict]:
  """fp_params: the rotated full-precision params; q_params: the same with the scope's kernels
  as CodebookWeights. windows [n, t]: calibration tokens. Returns (q_params with fine-tuned
  centroids and re-assigned codes, {block: loss per epoch}).

  checkpoint_dir: after each layer, its fine-tuned params and the activations carried to the next
  layer are saved there (atomically); a later call with the same inputs resumes after the last
  finished layer and returns the same result as an uninterrupted call."""
  refuse_laid_out(q_params, "finetune_centroids")
  n, t = windows.shape
  host = on_host(q_params)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
  emb = fp_params["embed"]["embedding"]
  x_fp = shard_batch(jax.jit(jnp.take, static_argnames="axis")(emb, jnp.asarray(windows), axis=0).astype(dtype))
  x_q = x_fp
  quant = (lambda h: h) if act is None else jax.jit(lambda h: fake_quant(h, act))
  matmul, add = jax.jit(jnp.matmul), jax.jit(jnp.add)
  full = act is not None and act.scope == "full"
  out = dict(q_params)
  history = {}
  start = 0
  if checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "carry")):
    carry, meta = load_tree(os.path.join(checkpoint_dir, "carry"))
    start, history = meta["next_layer"], meta["history"]
    x_fp, x_q = shard_batch(jnp.asarray(carry["x_fp"])), shard_batch(jnp.asarray(carry["x_q"]))
    for i in range(start):
      layer, _ = load_tree(os.path.join(checkpoint_dir, f"layer_{i:03d}"))
      out[f"layers_{i}"] = jax.tree_util.tree_map(np.asarray if host else jnp.asarray, layer)
  for i in range(start, cfg.num_layers):
    desc = lambda name, i=i: f"ACCF layer {i} {name}" if progress else None  # progress bar titles
    # Host-resident params (layer streaming): this layer alone comes to the device.
    fp_l, q_l = to_device(fp_params[f"layers_{i}"], host), dict(to_device(q_params[f"layers_{i}"], host))
    norm = functools.partial(_apply, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype))
    h_fp = norm(fp_l["input_norm"], x_fp)
    h_n = norm(q_l["input_norm"], x_q)  # the quantized model's attention input: its products take Q_a
    h_q = quant(h_n)
    attention = LatentAttention if cfg.mla else Attention
    attn_mod = attention(cfg, dtype, act)
    attn_q = {k: v for k, v in q_l["attn"].items()}
    in_ratio = _channel_ratio(h_fp, h_q)
    for name in [path[-2] for path in attn_input_readers(cfg, i)]:
      w_fp = fp_l["attn"][name]["kernel"]
      target = matmul(h_fp, w_fp)
      sub, hist = _train(
          attn_q[name], fp_l["attn"][name], lambda p: in_ratio,
          lambda tree, b: jnp.mean((b[0] @ dequantize(tree["kernel"], dtype) - b[1]) ** 2),
          (h_q, target), n, accf, desc(name))
      attn_q[name] = sub
      history[f"layers_{i}/{name}"] = hist
    # Linears fed inside attention (latent up-projections, o_proj): each on its own input, taken
    # from the FP attention (one pass gives every input and the output) and from the quantized
    # attention as fine-tuned so far (a pass per linear: each changes what follows).
    inner = [(path[-2], path[-2] + "_input") for path in attn_inner_linears(cfg, i)] + [("o_proj", "o_proj_input")]
    inner = [(name, source) for name, source in inner if full and _is_cb(attn_q[name]["kernel"])]
    (attn_fp, _), inputs_fp = _apply(attention(cfg, dtype), fp_l["attn"], h_fp, positions, None, 0,
                                     collect=tuple(source for _, source in inner))
    for (name, source), a_fp in zip(inner, inputs_fp):
      a_q = _apply(attn_mod, attn_q, h_n, positions, None, 0, collect=source)[1]
      a_q = quant(a_q) if name == "o_proj" else a_q  # o_proj's input is fake-quantized in scope full
      target = matmul(a_fp, fp_l["attn"][name]["kernel"])
      ones = jnp.ones((a_fp.shape[-1],))
      attn_q[name], history[f"layers_{i}/{name}"] = _train(
          attn_q[name], fp_l["attn"][name], lambda p, ones=ones: ones,
          lambda tree, b: jnp.mean((b[0] @ dequantize(tree["kernel"], dtype) - b[1]) ** 2),
          (a_q, target), n, accf, desc(name))
    q_l["attn"] = attn_q
    x_fp = add(x_fp, attn_fp)
    x_q = add(x_q, _apply(attn_mod, attn_q, h_n, positions, None, 0)[0])

    m_fp = norm(fp_l["post_attention_norm"], x_fp)
    m_n = norm(q_l["post_attention_norm"], x_q)  # the block's input, as h_n
    m_ratio = _channel_ratio(m_fp, quant(m_n))
    if cfg.is_moe_layer(i):
      fp_mod = MoeBlock(cfg, dtype, False, None, online_down_hadamard)
      q_mod = MoeBlock(cfg, dtype, False, act, online_down_hadamard)
      y_fp, logits_fp = _apply(fp_mod, fp_l["moe"], m_fp, collect="router_logits")
      logits_fp = logits_fp.reshape(n, t, -1)

      q_l["moe"], history[f"layers_{i}/moe"] = _train(
          q_l["moe"], fp_l["moe"], moe_ratios(cfg, m_ratio), moe_block_loss(q_mod, accf.kl_weight), (m_n, y_fp, logits_fp), n, accf, desc("MoE"))
      ff_fp, ff_q = y_fp, _apply(q_mod, q_l["moe"], m_n)
    else:
      fp_mod, q_mod = (SwigluMlp(cfg.intermediate_size, dtype, None, online_down_hadamard),
                      SwigluMlp(cfg.intermediate_size, dtype, act, online_down_hadamard))
      y_fp = _apply(fp_mod, fp_l["mlp"], m_fp)
      ones = jnp.ones((cfg.intermediate_size,))
      q_l["mlp"], history[f"layers_{i}/mlp"] = _train(
          q_l["mlp"], fp_l["mlp"], lambda p: ones if p[0].key == "down_proj" else m_ratio,
          lambda tree, b: jnp.mean((q_mod.apply({"params": tree}, b[0]) - b[1]) ** 2),
          (m_n, y_fp), n, accf, desc("MLP"))
      ff_fp, ff_q = y_fp, _apply(q_mod, q_l["mlp"], m_n)
    x_fp, x_q = add(x_fp, ff_fp), add(x_q, ff_q)
    out[f"layers_{i}"] = to_host(q_l, host)
    if checkpoint_dir is not None:  # the layer first: a crash between the two redoes layer i
      save_tree(os.path.join(checkpoint_dir, f"layer_{i:03d}"), q_l)
      save_tree(os.path.join(checkpoint_dir, "carry"), {"x_fp": x_fp, "x_q": x_q},
                {"next_layer": i + 1, "history": history})
  return out, history
