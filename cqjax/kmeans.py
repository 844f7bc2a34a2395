"""Scalar K-means codebooks: each group of weights (a whole output row by default) gets its own
2^bits centroids, fitted by k-means++ seeding and Lloyd iterations.

The data are scalars, so assignment is a binary search among the sorted centroids' midpoints:
no [weights × centroids] distance tensor exists, and rows are processed in chunks, so the
largest Mixtral expert matrices fit. Empty clusters keep their previous centroid.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from cqjax.codebook import CodebookWeight, from_codes
from cqjax.errors import CqjaxError
from cqjax.sharding import expert_axis_size


def _assign(x, cent_sorted):
  """x [L], sorted centroids [C] -> index of the nearest centroid [L]."""
  mids = (cent_sorted[1:] + cent_sorted[:-1]) / 2
  return jnp.searchsorted(mids, x).astype(jnp.int32)


def _kmeans_pp(x, c, key):
  """k-means++ seeding of c centroids for one row x [L]."""
  k0, key = jax.random.split(key)
  first = x[jax.random.randint(k0, (), 0, x.shape[0])]
  cent = jnp.full((c,), first)
  d2 = (x - first) ** 2

  def body(i, carry):
    cent, d2, key = carry
    key, sub = jax.random.split(key)
    pick = x[jax.random.categorical(sub, jnp.log(d2 + 1e-30))]
    return cent.at[i].set(pick), jnp.minimum(d2, (x - pick) ** 2), key

  cent, _, _ = jax.lax.fori_loop(1, c, body, (cent, d2, key))
  return jnp.sort(cent)


def _lloyd(x, cent, max_iters, tol):
  """Lloyd iterations for one row until the largest centroid move is below tol · range."""
  c = cent.shape[0]
  scale = jnp.maximum(jnp.max(x) - jnp.min(x), 1e-12)

  def step(carry):
    cent, _, it = carry
    codes = _assign(x, cent)
    sums = jax.ops.segment_sum(x, codes, c)
    counts = jax.ops.segment_sum(jnp.ones_like(x), codes, c)
    new = jnp.sort(jnp.where(counts > 0, sums / jnp.maximum(counts, 1), cent))
    return new, jnp.max(jnp.abs(new - cent)), it + 1

  cent, _, _ = jax.lax.while_loop(lambda s: (s[2] < max_iters) & (s[1] > tol * scale), step,
                                  (cent, jnp.inf, 0))
  return cent, _assign(x, cent)


def _fit_rows(x, keys, c: int, max_iters: int, tol: float, chunk: int):
  """rows x [r, L] float32, one key per row -> (sorted centroids [r, c], codes [r, L]), `chunk`
  rows at a time. A row's result depends only on the row and its key, not on the chunking."""
  r, length = x.shape
  chunk = min(chunk, r)
  pad = (-r) % chunk
  x = jnp.pad(x, ((0, pad), (0, 0)))
  keys = jnp.concatenate([keys, keys[:pad]]) if pad else keys

  def fit_chunk(args):
    xs, ks = args
    init = jax.vmap(_kmeans_pp, in_axes=(0, None, 0))(xs, c, ks)
    return jax.vmap(_lloyd, in_axes=(0, 0, None, None))(xs, init, max_iters, tol)

  cent, codes = jax.lax.map(fit_chunk, (x.reshape(-1, chunk, length), keys.reshape(-1, chunk, *keys.shape[1:])))
  return cent.reshape(-1, c)[:r], codes.reshape(-1, length)[:r]


@functools.partial(jax.jit, static_argnames=("c", "max_iters", "chunk", "shards"))
def kmeans_fit(rows: jax.Array, c: int, key: jax.Array, max_iters: int = 300, tol: float = 1e-6,
               chunk: int = 4096, shards: int = 1) -> tuple[jax.Array, jax.Array]:
  """rows [r, L] -> (sorted centroids [r, c], codes [r, L] int32), one K-means per row.

  shards > 1: the rows are split into that many contiguous blocks (a stacked tensor's experts),
  each fitted on the device of the context mesh's `expert` axis that holds it; the result equals
  the unsharded one, since every row keeps its key."""
  x = rows.astype(jnp.float32)
  keys = jax.random.split(key, rows.shape[0])
  if shards == 1:
    return _fit_rows(x, keys, c, max_iters, tol, chunk)
  fit = lambda x, k: _fit_rows(x, k, c, max_iters, tol, chunk)
  return jax.shard_map(fit, in_specs=(P("expert"), P("expert")), out_specs=(P("expert"), P("expert")),
                       check_vma=False)(x, keys)  # the Lloyd loop's carry starts replicated


def column_group(d_in: int, group_size: int) -> int:
  """`group_size` where it divides the input size d_in, else -1 (one codebook per whole row)."""
  return group_size if group_size > 0 and d_in % group_size == 0 else -1


def _rows(w: jax.Array, group_size: int) -> tuple[jax.Array, int]:
  """Kernel [..., d_in, d_out] -> rows [(... * d_out * groups), group_size] and the group size."""
  d_in = w.shape[-2]
  g = d_in if group_size in (-1, 0) else group_size
  if d_in % g:
    raise CqjaxError(f"group_size {g} does not divide the input size {d_in}")
  return jnp.swapaxes(w, -1, -2).reshape(-1, g), g


def kmeans_quantize(w: jax.Array, bits: int = 4, group_size: int = -1, seed: int = 0,
                    max_iters: int = 300, tol: float = 1e-6) -> CodebookWeight:
  """K-means codebook quantization of a kernel [..., d_in, d_out] (stacked experts included).
  Under a mesh with an `expert` axis, stacked experts are fitted where that axis puts them."""
  if not 2 <= bits <= 8:
    raise CqjaxError(f"K-means bits must be in [2, 8] (4 to 256 centroids), got {bits}")
  rows, g = _rows(w, group_size)
  shards = expert_axis_size() if w.ndim == 3 and w.shape[0] % expert_axis_size() == 0 else 1
  cent, codes = kmeans_fit(rows, 2 ** bits, jax.random.key(seed), max_iters, tol, shards=shards)
  lead = (*w.shape[:-2], w.shape[-1])
  return from_codes(codes.reshape(*lead, w.shape[-2]), cent.reshape(*lead, -1, 2 ** bits).astype(w.dtype), bits)


def rtn_quantize(w: jax.Array, bits: int = 4, group_size: int = -1) -> CodebookWeight:
  """Round-to-nearest, symmetric absmax per output row (or group): scale = max|w| / (2^(b-1) − 1)
  clamped at 1e-5, the reference's weight quantizer, stored as a codebook of scale · levels."""
  rows, g = _rows(w, group_size)
  half = 2 ** (bits - 1)
  scale = jnp.maximum(jnp.max(jnp.abs(rows.astype(jnp.float32)), -1, keepdims=True) / (half - 1), 1e-5)
  codes = (jnp.clip(jnp.round(rows / scale), -half, half - 1) + half).astype(jnp.int32)
  cent = (jnp.arange(2 ** bits, dtype=jnp.float32) - half) * scale
  lead = (*w.shape[:-2], w.shape[-1])
  return from_codes(codes.reshape(*lead, w.shape[-2]), cent.reshape(*lead, -1, 2 ** bits).astype(w.dtype), bits)
