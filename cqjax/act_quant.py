"""Activation fake quantization (the `Q_a` of CodeQuant / QuaRot / SpinQuant).

Default: per token (the whole hidden vector is one group), asymmetric min-max, 4 bits:
scale = (max - min) / (2^b - 1) clamped below at 1e-5, q = clip(round((x - min) / scale)),
x_hat = q * scale + min.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cqjax.errors import CqjaxError


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
  """bits; group_size along the last axis (-1: whole token); symmetric or min-max; clip_ratio
  shrinks the range; ste: straight-through gradient (identity) for training through Q_a;
  scope: 'official' quantizes the inputs of q/k/v, router and experts' gate/up only, 'full' also
  those of o_proj and every down projection."""

  bits: int = 4
  group_size: int = -1
  symmetric: bool = False
  clip_ratio: float = 1.0
  ste: bool = False
  scope: str = "official"

  def __post_init__(self):
    if not 2 <= self.bits <= 16:
      raise CqjaxError(f"activation bits must be in [2, 16], got {self.bits}")
    if not 0.0 < self.clip_ratio <= 1.0:
      raise CqjaxError(f"activation clip_ratio must be in (0, 1], got {self.clip_ratio}")
    if self.scope not in ("official", "full"):
      raise CqjaxError(f"activation quantization scope must be 'official' or 'full', got {self.scope!r}")


def quant_codes(x: jax.Array, cfg: ActQuantConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [..., d] -> Q_a's integer codes q float32 [..., d/g, g] (0 .. 2^b - 1, or signed when
  symmetric), scale and offset float32 [..., d/g, 1] (offset 0 when symmetric): the fake-quantized
  x is q * scale + offset, in float32. g: cfg.group_size (-1: d)."""
  d = x.shape[-1]
  g = d if cfg.group_size in (-1, 0) else cfg.group_size
  if d % g:
    raise CqjaxError(f"activation group_size {g} does not divide the hidden size {d}")
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], d // g, g)
  if cfg.symmetric:
    qmax = 2 ** (cfg.bits - 1) - 1
    scale = jnp.maximum(jnp.max(jnp.abs(xg), -1, keepdims=True) * cfg.clip_ratio / qmax, 1e-5)
    return jnp.clip(jnp.round(xg / scale), -qmax - 1, qmax), scale, jnp.zeros_like(scale)
  qmax = 2 ** cfg.bits - 1
  lo = jnp.min(xg, -1, keepdims=True) * cfg.clip_ratio
  hi = jnp.max(xg, -1, keepdims=True) * cfg.clip_ratio
  scale = jnp.maximum((hi - lo) / qmax, 1e-5)
  return jnp.clip(jnp.round((xg - lo) / scale), 0, qmax), scale, lo


def fake_quant(x: jax.Array, cfg: ActQuantConfig) -> jax.Array:
  """Quantize-dequantize x [..., d] per group of the last axis; same shape and dtype."""
  q, scale, offset = quant_codes(x, cfg)
  xq = (q * scale if cfg.symmetric else q * scale + offset).reshape(x.shape)
  if cfg.ste:
    xf = x.astype(jnp.float32)
    xq = xf + jax.lax.stop_gradient(xq - xf)
  return xq.astype(x.dtype)


def quantize_input(x: jax.Array, act: ActQuantConfig | None) -> jax.Array:
  """fake_quant(x, act), or x itself without a quantizer: what a product taking `act` multiplies."""
  return x if act is None else fake_quant(x, act)


def full_scope(act: ActQuantConfig | None) -> ActQuantConfig | None:
  """The quantizer of the inner linears' inputs (o_proj, down projections): act in scope 'full',
  else None."""
  return act if act is not None and act.scope == "full" else None
