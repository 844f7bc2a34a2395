"""Projections that read the same input, fused into one kernel for inference.

Attention's q, k and v become `attn/qkv_proj` [d, q + 2 kv] and every SwiGLU's gate and up
(stacked experts `moe/gate_up_proj` [experts, d, 2 f], dense `mlp/` and DeepSeek's `moe/shared/`
`gate_up_proj` [d, 2 f]) one kernel whose output the model splits again, so a decode step runs one
product where it ran three or two. The function is unchanged: a codebook weight stores its codes
and codebooks per output channel, so the fused weight is the parts' rows one after the other.
Why: at decode batch sizes every product is a launch and a round trip. On an H200 the small
reference architecture's 4-bit decode at batch 16 went from 0.84x to 0.98x of bf16's tokens/s
fused, 265 -> 241 launches a step (BENCHMARKS.md session 41).

    params = fuse_projections(params)   # after quantize / load_quantized, before generate

Parts that cannot be concatenated (different kinds, code widths, group counts or dtypes) stay
separate, and the model runs either form. Stacked experts stay sharded along `expert`; the fused
attention and dense-MLP kernels have no tensor-parallel rule (`cqjax.sharding`) and are replicated,
so a model sharded along `model` is better left unfused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.codebook import CodebookWeight, LaidOutCodebookWeight

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def concat_outputs(kernels):
  """Kernels [..., d_in, d_out_i] (all arrays, or all CodebookWeights of one code width, group
  count and codebook dtype) -> one kernel [..., d_in, sum d_out_i]; None where they differ. Laid
  out for the bit-plane kernel (cqjax.lay_out_bitplanes) all of them, the layout too: it is per row."""
  first = kernels[0]
  if all(isinstance(k, CodebookWeight) for k in kernels):
    same = {(k.bits, k.d_in, k.packed.shape[:-2], k.centroids.shape[-2:], k.centroids.dtype) for k in kernels}
    if len(same) > 1:
      return None
    rows = lambda field, axis: jnp.concatenate([getattr(k, field) for k in kernels], axis=axis)
    if all(isinstance(k, LaidOutCodebookWeight) for k in kernels):
      return LaidOutCodebookWeight(rows("packed", -2), rows("centroids", -3), first.bits, first.d_in,
                                   rows("planes", -2), rows("alpha", -3))
    return CodebookWeight(rows("packed", -2), rows("centroids", -3), first.bits, first.d_in)
  if all(isinstance(k, (jax.Array, np.ndarray)) for k in kernels):
    if len({(k.shape[:-1], k.dtype) for k in kernels}) > 1:
      return None
    return jnp.concatenate(kernels, axis=-1)
  return None


def _fuse(tree: dict, parts: tuple[str, ...], name: str) -> dict:
  """tree with its `parts` (kernels, or {'kernel': kernel} submodules) replaced by one `name`."""
  if not all(p in tree for p in parts):
    return tree
  wrapped = all(isinstance(tree[p], dict) and set(tree[p]) == {"kernel"} for p in parts)
  fused = concat_outputs([tree[p]["kernel"] if wrapped else tree[p] for p in parts])
  if fused is None:
    return tree
  out = {k: v for k, v in tree.items() if k not in parts}
  out[name] = {"kernel": fused} if wrapped else fused
  return out


def fuse_projections(params: dict) -> dict:
  """A model's params (as `MoeCausalLM` takes them) with q/k/v and gate/up fused wherever they
  can be; everything else is the same objects."""
  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    tree = {k: walk(v) for k, v in tree.items()}
    return _fuse(_fuse(tree, QKV, "qkv_proj"), GATE_UP, "gate_up_proj")
  return walk(params)
