"""Perplexity over non-overlapping windows (the GPTQ / QuaRot / SpinQuant protocol)."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cqjax.model import MoeCausalLM


@functools.partial(jax.jit, static_argnames=("model",))
def window_nll(model: MoeCausalLM, params, tokens: jax.Array) -> jax.Array:
  """tokens: [b, t] -> summed next-token NLL per window [b] (t-1 predictions each), float32."""
  logits, _ = model.apply({"params": params}, tokens)
  logits = logits[:, :-1]
  targets = tokens[:, 1:]
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(nll, axis=-1)


def perplexity(model: MoeCausalLM, params, windows: np.ndarray, batch_size: int = 4,
               desc: str = "perplexity", progress: bool = True) -> dict:
  """windows: [n, seqlen] -> {'perplexity', 'nll', 'windows', 'tokens'}; every token but each
  window's first is predicted. The last batch is padded so one compiled shape serves all."""
  n, seqlen = windows.shape
  batch_size = min(batch_size, n)
  total = 0.0
  for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False):
    batch = windows[start: start + batch_size]
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, 0)])
    total += float(np.sum(np.asarray(window_nll(model, params, jnp.asarray(batch)))[:real], dtype=np.float64))
  nll = total / (n * (seqlen - 1))
  return {"perplexity": math.exp(nll), "nll": nll, "windows": int(n), "tokens": int(n * seqlen)}
