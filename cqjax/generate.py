"""Greedy or sampled decoding with the KV cache: one jitted prefill, one jitted scan of steps."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cqjax.model import MoeCausalLM, init_cache


def _pick(logits, rng, temperature: float, top_k: int):
  """logits: [b, vocab] -> next tokens [b]. temperature 0 means greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "eos_token_id"))
def generate(model: MoeCausalLM, params, prompt: jax.Array, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             eos_token_id: int | None = None) -> jax.Array:
  """prompt: [b, t] int (all rows the same length) -> new tokens [b, max_new_tokens].

  After a row emits `eos_token_id`, the rest of that row is filled with it.
  """
  b, t = prompt.shape
  rng = jax.random.key(0) if rng is None else rng
  cache = init_cache(model.config, b, t + max_new_tokens, model.dtype)
  logits, cache = model.apply({"params": params}, prompt, cache=cache, cache_index=0)
  rng, sub = jax.random.split(rng)
  first = _pick(logits[:, -1], sub, temperature, top_k)
  done = jnp.zeros((b,), bool) if eos_token_id is None else first == eos_token_id

  def step(carry, i):
    token, cache, done, rng = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache, cache_index=t + i)
    rng, sub = jax.random.split(rng)
    nxt = _pick(logits[:, -1], sub, temperature, top_k)
    if eos_token_id is not None:
      nxt = jnp.where(done, eos_token_id, nxt)
      done = done | (nxt == eos_token_id)
    return (nxt, cache, done, rng), nxt

  _, rest = jax.lax.scan(step, (first, cache, done, rng), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first[:, None], rest.T], axis=1)
