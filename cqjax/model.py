"""The MoE decoder as Flax Linen modules over an explicit parameter pytree.

Parameter tree (kernels are [d_in, d_out]; experts stacked, see `cqjax.moe`):
  embed/embedding [vocab, d]
  layers_i/{input_norm, post_attention_norm}/scale [d]
  layers_i/attn/{q_proj, k_proj, v_proj, o_proj}/kernel, attn/{q_norm, k_norm}/scale (Qwen3)
  layers_i/attn/{q_proj | q_a_proj, q_a_norm, q_b_proj}, {kv_a_proj, kv_a_norm, kv_b_proj, o_proj}
      (DeepSeek-V2's multi-head latent attention)
  layers_i/moe/{router, gate_proj, up_proj, down_proj}, moe/shared/{gate,up,down}_proj/kernel
      (DeepSeek-V2)   or   layers_i/mlp/{gate,up,down}_proj/kernel
  final_norm/scale [d], lm_head/kernel [d, vocab] (absent when embeddings are tied)
  For inference `cqjax.fuse_projections` may replace q/k/v by attn/qkv_proj/kernel and each
  gate/up pair by one gate_up_proj; the modules run either form.

`model.apply(..., mutable=["intermediates"])` also returns what calibration needs: every
RMSNorm output that feeds a linear (`attn_input`, `mlp_input`), the input of each `o_proj`,
router logits and the expert down-projection inputs (all before activation quantization).

`act_quant` fake-quantizes the inputs of the quantized linears (its scope says which): each
product takes the quantizer (`cqjax.lut_matmul`'s act), so a kernel may fuse it;
`online_down_hadamard` multiplies every down projection's input by a Hadamard matrix (R4; the
down kernels must have absorbed its transpose, see `cqjax.rotate`).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig, full_scope
from cqjax.config import ModelConfig
from cqjax.lut_matmul import Linear, has_params
from cqjax.moe import MoeBlock, SwigluMlp

KVCache = list[dict[str, jax.Array]]


class RMSNorm(nn.Module):
  dim: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (self.dim,), self.dtype)
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return scale * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention. x: [b, t, heads, hd], positions: [b, t]."""
  hd = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, hd/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_rope(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """(inverse frequencies [head_dim / 2], cos/sin factor) of the config's RoPE: plain, or YaRN
  (frequencies blended between interpolated and extrapolated by a linear ramp over the
  dimensions whose wavelength the original context saw), as transformers computes them."""
  d, base = cfg.head_dim, cfg.rope_theta
  pos_freqs = base ** (np.arange(0, d, 2, dtype=np.float32) / d)
  if not cfg.yarn_factor:
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  factor = cfg.yarn_factor
  attention_factor = cfg.yarn_attention_factor or (
      _yarn_mscale(factor, cfg.yarn_mscale) / _yarn_mscale(factor, cfg.yarn_mscale_all_dim)
      if cfg.yarn_mscale and cfg.yarn_mscale_all_dim else _yarn_mscale(factor))
  dim_of = lambda rotations: (d * math.log(cfg.yarn_original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))
  low, high = dim_of(cfg.yarn_beta_fast), dim_of(cfg.yarn_beta_slow)
  if cfg.yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / ((high + 0.001 if low == high else high) - low), 0, 1)
  extrapolate = 1 - ramp
  inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
  return inv_freq.astype(np.float32), float(attention_factor)


def attention_scale(cfg: ModelConfig) -> float:
  """Softmax scale: 1/sqrt(query-key width), times YaRN's mscale(factor, mscale_all_dim)^2."""
  scale = cfg.qk_head_dim ** -0.5
  if cfg.yarn_factor and cfg.yarn_mscale_all_dim:
    scale *= _yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
  return scale


def rope_interleaved(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float) -> jax.Array:
  """Rotary embedding on interleaved pairs (x[2i], x[2i+1]) as complex numbers (DeepSeek), with
  frequencies and cos/sin factor from `yarn_rope`. x: [b, t, heads, hd], positions: [b, t]."""
  angles = (positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq))[:, :, None, :]  # [b, t, 1, hd/2]
  cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
  xf = x.astype(jnp.float32)
  re, im = xf[..., 0::2], xf[..., 1::2]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def _attend(cfg: ModelConfig, q, k, v, positions, key_pos, scale: float):
  """Causal (optionally sliding-window) softmax attention in float32.
  q [b, t, kvh, g, hq], k [b, s, kvh, hq], v [b, s, kvh, hv] -> [b, t, kvh * g * hv]."""
  b, t = q.shape[:2]
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k.astype(q.dtype)).astype(jnp.float32) * scale
  rel = positions[:, :, None] - key_pos[:, None, :]  # [b, t, s]
  allowed = rel >= 0
  if cfg.sliding_window:
    allowed &= rel < cfg.sliding_window
  scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v.astype(q.dtype)).reshape(b, t, -1)


def _cache_update(cache, new: dict[str, jax.Array], cache_index, positions):
  """Writes `new` ([b, t, ...] each) into the cache at cache_index -> (new cache, full
  arrays, key positions [b, s]); without a cache, the arrays themselves."""
  if cache is None:
    return None, new, positions
  full = {k: jax.lax.dynamic_update_slice_in_dim(cache[k], v.astype(cache[k].dtype), cache_index, 1)
          for k, v in new.items()}
  s = next(iter(full.values())).shape[1]
  return full, full, jnp.broadcast_to(jnp.arange(s), (positions.shape[0], s))


class Attention(nn.Module):
  """Grouped-query attention with RoPE, optional per-head q/k RMSNorm and a KV cache. act_quant:
  Q_a of x in the q/k/v products (and of o_proj's input in scope 'full')."""

  config: ModelConfig
  dtype: Any = jnp.float32
  act_quant: ActQuantConfig | None = None

  @nn.compact
  def __call__(self, x, positions, cache: dict[str, jax.Array] | None, cache_index):
    """x: [b, t, d]; positions: [b, t]; cache k/v: [b, max_len, kv_heads, hd]."""
    cfg = self.config
    b, t, d = x.shape
    hd, kvh = cfg.head_dim, cfg.num_kv_heads
    linear = lambda n, name: Linear(d, n, self.dtype, self.act_quant, name=name)
    if has_params(self, "qkv_proj"):  # cqjax.fuse_projections: one product, split
      q, k, v = jnp.split(linear(cfg.q_size + 2 * cfg.kv_size, "qkv_proj")(x),
                          (cfg.q_size, cfg.q_size + cfg.kv_size), axis=-1)
    else:
      q, k, v = (linear(n, name)(x) for n, name in
                 ((cfg.q_size, "q_proj"), (cfg.kv_size, "k_proj"), (cfg.kv_size, "v_proj")))
    q, k, v = q.reshape(b, t, cfg.num_heads, hd), k.reshape(b, t, kvh, hd), v.reshape(b, t, kvh, hd)
    if cfg.qk_norm:
      q = RMSNorm(hd, cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
      k = RMSNorm(hd, cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    new_cache, kv, key_pos = _cache_update(cache, {"k": k, "v": v}, cache_index, positions)
    q = q.reshape(b, t, kvh, cfg.num_heads // kvh, hd)
    out = _attend(cfg, q, kv["k"], kv["v"], positions, key_pos, hd ** -0.5)
    return _o_proj(self, out, cfg.attn_out_size, d), new_cache


def _o_proj(module: nn.Module, out, d_in: int, d: int):
  """The attention output projection; its input is sown for calibration and fake-quantized in
  scope `full`."""
  module.sow("intermediates", "o_proj_input", out)
  return Linear(d_in, d, module.dtype, full_scope(module.act_quant), name="o_proj")(out)


class LatentAttention(nn.Module):
  """DeepSeek-V2 multi-head latent attention. Keys and values come from one kv_lora_rank latent
  (normalised) and a single RoPE key part shared by all heads; the KV cache holds exactly those
  two, {'latent' [b, max_len, kv_lora_rank], 'k_pe' [b, max_len, rope dim]}, and expands them
  through kv_b_proj at every step."""

  config: ModelConfig
  dtype: Any = jnp.float32
  act_quant: ActQuantConfig | None = None

  @nn.compact
  def __call__(self, x, positions, cache: dict[str, jax.Array] | None, cache_index):
    cfg = self.config
    b, t, d = x.shape
    h, nope, rope_dim, vd, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    freqs = yarn_rope(cfg)  # once for queries and keys
    if cfg.q_lora_rank:
      q = Linear(d, cfg.q_lora_rank, self.dtype, self.act_quant, name="q_a_proj")(x)
      q = RMSNorm(cfg.q_lora_rank, 1e-6, self.dtype, name="q_a_norm")(q)  # transformers' default eps
      self.sow("intermediates", "q_b_proj_input", q)  # ACCF fits the up-projections on these
      q = Linear(cfg.q_lora_rank, cfg.q_size, self.dtype, name="q_b_proj")(q)
    else:
      q = Linear(d, cfg.q_size, self.dtype, self.act_quant, name="q_proj")(x)
    q = q.reshape(b, t, h, nope + rope_dim)
    q = jnp.concatenate([q[..., :nope], rope_interleaved(q[..., nope:], positions, *freqs)], -1)
    ckv = Linear(d, r + rope_dim, self.dtype, self.act_quant, name="kv_a_proj")(x)
    latent = RMSNorm(r, 1e-6, self.dtype, name="kv_a_norm")(ckv[..., :r])
    k_pe = rope_interleaved(ckv[..., None, r:], positions, *freqs)[:, :, 0]
    new_cache, kv, key_pos = _cache_update(cache, {"latent": latent, "k_pe": k_pe}, cache_index, positions)
    s = kv["latent"].shape[1]
    self.sow("intermediates", "kv_b_proj_input", kv["latent"])
    expanded = Linear(r, h * (nope + vd), self.dtype, name="kv_b_proj")(kv["latent"].astype(x.dtype))
    expanded = expanded.reshape(b, s, h, nope + vd)
    k = jnp.concatenate([expanded[..., :nope], jnp.broadcast_to(kv["k_pe"][:, :, None].astype(x.dtype),
                                                                 (b, s, h, rope_dim))], -1)
    out = _attend(cfg, q[:, :, :, None], k, expanded[..., nope:], positions, key_pos, attention_scale(cfg))
    return _o_proj(self, out, cfg.attn_out_size, d), new_cache


class DecoderLayer(nn.Module):
  config: ModelConfig
  layer: int
  dtype: Any = jnp.float32
  dense_moe_reference: bool = False
  act_quant: ActQuantConfig | None = None
  online_down_hadamard: bool = False

  @nn.compact
  def __call__(self, x, positions, cache=None, cache_index=0):
    cfg = self.config
    h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, name="input_norm")(x)
    self.sow("intermediates", "attn_input", h)
    attention = LatentAttention if cfg.mla else Attention
    attn, new_cache = attention(cfg, self.dtype, self.act_quant, name="attn")(
        h, positions, cache, cache_index)
    x = x + attn
    h = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, name="post_attention_norm")(x)
    self.sow("intermediates", "mlp_input", h)
    if cfg.is_moe_layer(self.layer):
      ff = MoeBlock(cfg, self.dtype, self.dense_moe_reference, self.act_quant,
                    self.online_down_hadamard, name="moe")(h)
    else:
      ff = SwigluMlp(cfg.intermediate_size, self.dtype, self.act_quant, self.online_down_hadamard,
                     name="mlp")(h)
    return x + ff, new_cache


class MoeCausalLM(nn.Module):
  """Decoder-only MoE language model.

  __call__(tokens [b, t], positions [b, t] | None, cache, cache_index) -> (logits [b, t, vocab] f32,
  new cache or None). With a cache, positions default to cache_index + arange(t).
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  dense_moe_reference: bool = False
  act_quant: ActQuantConfig | None = None
  online_down_hadamard: bool = False

  @nn.compact
  def __call__(self, tokens, positions=None, cache: KVCache | None = None, cache_index=0):
    cfg = self.config
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.dtype, dtype=self.dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    x = embed(tokens)
    new_cache = [] if cache is not None else None
    for i in range(cfg.num_layers):
      layer = DecoderLayer(cfg, i, self.dtype, self.dense_moe_reference, self.act_quant,
                           self.online_down_hadamard, name=f"layers_{i}")
      x, c = layer(x, positions, None if cache is None else cache[i], cache_index)
      if cache is not None:
        new_cache.append(c)
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
    self.sow("intermediates", "lm_head_input", x)
    if cfg.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Linear(cfg.hidden_size, cfg.vocab_size, self.dtype, name="lm_head")(x)
    return logits.astype(jnp.float32), new_cache


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """Zeroed KV cache: one {'k', 'v'} of [batch, max_len, kv_heads, head_dim] per layer, or for
  latent attention one {'latent' [batch, max_len, kv_lora_rank], 'k_pe' [batch, max_len, rope dim]}."""
  if config.mla:
    return [{"latent": jnp.zeros((batch, max_len, config.kv_lora_rank), dtype),
             "k_pe": jnp.zeros((batch, max_len, config.head_dim), dtype)} for _ in range(config.num_layers)]
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]
