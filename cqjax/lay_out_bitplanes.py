"""The W4A4 model's fused products read their weights laid out ahead for the bit-plane kernel.

On GPUs the dispatcher fuses a product of Q_a(x) into the bit-plane CUDA kernel where it measured
ahead (`cuda_kernels.lut_matmul_bitplane.serves`: Mixtral's gate/up at decode batches 1-3). That
kernel transposes each row's codes into bit-planes and transforms its codebook on every call;
laid out once, the call skips both (Mixtral's batch-1 expert pair 33.3 -> 30.2 and 35.9 -> 30.6 µs,
H100, BENCHMARKS.md session 57). The other kernels, which serve every other batch and prefill,
still read the packed codes, so a laid-out weight keeps both: the weights laid out take twice
their memory (Mixtral-8x7B's gate/up at 4 bits: about 15 GB more).

    params = lay_out_bitplanes(params, act)   # after quantize / load_quantized, before or after fuse_projections

Only the weights whose inputs `act` quantizes (its scope: q/k/v, router and gate/up; in scope
'full' also o_proj and the down projections) and that the kernel could be dispatched for (4-bit
codes, one codebook per row, d_in a multiple of 256, more than `min_codes` codes) are laid out;
every other leaf is the same object. The layout is for inference: fine-tuning and export refuse
it (`cqjax.codebook.refuse_laid_out`). Elsewhere than on a GPU with the CUDA library built, the
model computes the same as without it.
"""
from __future__ import annotations

import jax

from cqjax.act_quant import ActQuantConfig
from cqjax.codebook import CodebookWeight, LaidOutCodebookWeight
from cqjax.errors import CqjaxError

# The linears whose inputs each scope quantizes (cqjax.model, cqjax.moe), fused forms included.
OFFICIAL = ("q_proj", "k_proj", "v_proj", "qkv_proj", "router", "gate_proj", "up_proj", "gate_up_proj")
FULL = OFFICIAL + ("o_proj", "down_proj")


def _bitplane():
  # Imported when called: cuda_kernels' modules import cqjax's, so `import cqjax` must not need them.
  from cuda_kernels import lut_matmul_bitplane  # pylint: disable=g-import-not-at-top
  return lut_matmul_bitplane


def lay_out(w: CodebookWeight) -> LaidOutCodebookWeight:
  """w (4-bit codes, one codebook per row, d_in a multiple of 32) with its bit-plane layout for the
  affine numerics beside it."""
  if w.bits != 4 or w.centroids.shape[-2] != 1 or w.d_in % 32:
    raise CqjaxError(f"lay_out: the bit-plane layout takes 4-bit codes with one codebook per row over a multiple "
                     f"of 32 inputs; got {w.bits}-bit codes, {w.centroids.shape[-2]} codebooks a row, {w.d_in} inputs")
  planes, alpha = _bitplane().bitplane_layout(w.packed, w.centroids, affine=True)
  return LaidOutCodebookWeight(w.packed, w.centroids, w.bits, w.d_in, planes, alpha)


def _eligible(w, min_codes: int) -> bool:
  return (isinstance(w, CodebookWeight) and not isinstance(w, LaidOutCodebookWeight)
          and _bitplane().supports(w.bits, w.d_in, w.centroids.shape[-2]) and w.d_in * w.packed.shape[-2] > min_codes)


def lay_out_bitplanes(params: dict, act: ActQuantConfig, min_codes: int | None = None) -> dict:
  """A model's params (as `MoeCausalLM` takes them) with the kernels that the bit-plane kernel may
  take under `act` (see the module) as LaidOutCodebookWeights. min_codes: weights of at most this
  many codes (d_in * d_out) stay as they are (None: the dispatcher's, below which it never fuses:
  `cuda_kernels.lut_matmul_bitplane.MIN_CODES`)."""
  bitplane = _bitplane()
  min_codes = bitplane.MIN_CODES if min_codes is None else min_codes
  if not isinstance(act, ActQuantConfig):
    raise CqjaxError(f"lay_out_bitplanes: act must be the model's ActQuantConfig (W4A4), got {act!r}")
  if not bitplane.takes_act(act):
    raise CqjaxError(f"lay_out_bitplanes: the bit-plane kernel does not take act (group_size {act.group_size}, "
                     f"bits {act.bits}): nothing would read the layout")
  names = FULL if act.scope == "full" else OFFICIAL

  def walk(tree, name):
    if isinstance(tree, dict):
      return {k: walk(v, name if k == "kernel" else k) for k, v in tree.items()}
    return lay_out(tree) if name in names and _eligible(tree, min_codes) else tree
  return walk(params, None)
