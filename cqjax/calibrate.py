"""Calibration: run the full-precision model on calibration windows and keep what later stages
need. Here: every residual-stream RMSNorm output (the inputs of the quantized linears)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cqjax.config import ModelConfig
from cqjax.layer_streaming import to_device
from cqjax.model import DecoderLayer, MoeCausalLM


@functools.partial(jax.jit, static_argnames=("model",))
def _norm_outputs(model: MoeCausalLM, params, tokens):
  _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
  inter = state["intermediates"]
  return jnp.stack([inter[f"layers_{i}"][key][0]
                    for i in range(model.config.num_layers) for key in ("attn_input", "mlp_input")])


def collect_norm_outputs(model: MoeCausalLM, params, windows: np.ndarray, batch_size: int = 16,
                         dtype=np.float32, progress: bool = True) -> np.ndarray:
  """windows [n, t] -> host array [2 * layers, n, t, d]: for layer i, row 2i is the attention
  input (input_layernorm output), row 2i + 1 the MoE input (post_attention_layernorm output)."""
  cfg = model.config
  n, t = windows.shape
  out = np.empty((2 * cfg.num_layers, n, t, cfg.hidden_size), dtype)
  for s in tqdm(range(0, n, batch_size), desc="calibrate", disable=not progress, leave=False):
    out[:, s: s + batch_size] = np.asarray(_norm_outputs(model, params, jnp.asarray(windows[s: s + batch_size])))
  return out


@functools.partial(jax.jit, static_argnames=("layer",))
def _layer_norm_outputs(layer: DecoderLayer, params, x, positions):
  (y, _), state = layer.apply({"params": params}, x, positions, mutable=["intermediates"])
  inter = state["intermediates"]
  return y, inter["attn_input"][0], inter["mlp_input"][0]


def collect_norm_outputs_by_layer(cfg: ModelConfig, params, windows: np.ndarray, batch_size: int = 16,
                                  dtype=np.float32, compute_dtype=jnp.float32, progress: bool = True) -> np.ndarray:
  """`collect_norm_outputs` for host-resident params: one decoder layer on the device at a time,
  the residual stream of every window [n, t, d] carried between layers in host memory."""
  n, t = windows.shape
  out = np.empty((2 * cfg.num_layers, n, t, cfg.hidden_size), dtype)
  x = np.asarray(params["embed"]["embedding"])[windows].astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (min(batch_size, n), t))
  for i in tqdm(range(cfg.num_layers), desc="calibrate layers", disable=not progress, leave=False):
    layer = DecoderLayer(cfg, i, compute_dtype)
    p = to_device(params[f"layers_{i}"], True)
    for s in range(0, n, batch_size):
      xb = jnp.asarray(x[s: s + batch_size], compute_dtype)
      y, attn_in, mlp_in = _layer_norm_outputs(layer, p, xb, positions[: xb.shape[0]])
      out[2 * i, s: s + batch_size], out[2 * i + 1, s: s + batch_size] = np.asarray(attn_in), np.asarray(mlp_in)
      x[s: s + batch_size] = np.asarray(y, np.float32)
    del p
  return out
