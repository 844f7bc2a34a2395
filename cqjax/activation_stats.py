"""What the model's activations and router do on real text: per-expert token shares and the
outlier statistics (max |x| / RMS, top channels) of every RMSNorm output that feeds a linear."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.model import MoeCausalLM


@jax.jit
def _norm_output_stats(x):
  """x: [..., d] -> (max|x|, rms, per-channel max |x| [d])."""
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.max(jnp.abs(x)), jnp.sqrt(jnp.mean(x * x)), jnp.max(jnp.abs(x), axis=0)


def activation_stats(model: MoeCausalLM, params, windows: np.ndarray, batch_size: int = 8,
                     top_channels: int = 5) -> dict:
  """windows: [n, t] tokens -> per layer: expert token shares (MoE layers) and, for
  `attn_input` and `mlp_input`, max|x|/RMS with the `top_channels` largest channels."""
  cfg = model.config
  counts = np.zeros((cfg.num_layers, cfg.num_experts))
  amax = {}
  sq = {}
  chan = {}
  n_el = 0
  apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"])[1])
  for s in range(0, len(windows), batch_size):
    inter = apply(params, jnp.asarray(windows[s: s + batch_size]))["intermediates"]
    n_el += windows[s: s + batch_size].size
    for i in range(cfg.num_layers):
      layer = inter[f"layers_{i}"]
      if cfg.is_moe_layer(i):
        _, group_sizes = layer["moe"]["down_proj_input"][0]
        counts[i] += np.asarray(group_sizes)
      for key in ("attn_input", "mlp_input"):
        m, r, c = (np.asarray(v) for v in _norm_output_stats(layer[key][0]))
        k = (i, key)
        amax[k] = max(amax.get(k, 0.0), float(m))
        sq[k] = sq.get(k, 0.0) + float(r) ** 2 * windows[s: s + batch_size].size
        chan[k] = np.maximum(chan.get(k, 0.0), c)
  layers = []
  for i in range(cfg.num_layers):
    entry = {"layer": i}
    if cfg.is_moe_layer(i):
      share = counts[i] / counts[i].sum()
      entry["expert_share"] = share.round(4).tolist()
      entry["expert_share_min"], entry["expert_share_max"] = float(share.min()), float(share.max())
    for key in ("attn_input", "mlp_input"):
      rms = (sq[(i, key)] / n_el) ** 0.5
      top = np.argsort(-chan[(i, key)])[:top_channels]
      entry[key] = {"max_over_rms": amax[(i, key)] / rms, "max": amax[(i, key)], "rms": rms,
                    "top_channels": top.tolist(),
                    "top_channel_max": chan[(i, key)][top].round(3).tolist()}
    layers.append(entry)
  return {"layers": layers, "tokens": int(n_el)}
