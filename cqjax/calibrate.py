"""Calibration: run the full-precision model on calibration windows and keep what later stages
need. Here: every residual-stream RMSNorm output (the inputs of the quantized linears)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cqjax.model import MoeCausalLM


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
