"""cqjax.fuse_projections: q/k/v and gate/up fused for inference compute the same function, in
float and as 4-bit codebooks, on every family, on one device and expert-parallel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.codebook import CodebookWeight
from cqjax.fuse_projections import concat_outputs, fuse_projections
from cqjax.generate import generate
from cqjax.kmeans import rtn_quantize
from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.quantize_weights import quantize_scope
from cqjax.sharding import MeshConfig, make_mesh, shard_params
from conftest import random_codebook_weight


def _names(tree, prefix=""):
  if not isinstance(tree, dict):
    return {prefix}
  return set().union(*(_names(v, f"{prefix}/{k}") for k, v in tree.items()))


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v2", "deepseek_v2_greedy"])
@pytest.mark.parametrize("quantized", [False, True])
def test_fused_model_computes_the_same_logits(hf_checkpoints, name, quantized):
  cfg, params = load_params(hf_checkpoints[name], jnp.float32, progress=False)
  if quantized:
    params = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, 4))
  fused = fuse_projections(params)
  names, fused_names = _names(params), _names(fused)
  assert any("gate_up_proj" in n for n in fused_names) and not any("/moe/gate_proj" in n for n in fused_names)
  assert any("qkv_proj" in n for n in fused_names) == (not cfg.mla)  # latent attention has no k/v kernels
  assert len(fused_names) < len(names)
  model = MoeCausalLM(cfg, jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
  _close(model.apply({"params": fused}, tokens)[0], model.apply({"params": params}, tokens)[0])
  np.testing.assert_array_equal(generate(model, fused, tokens, 4), generate(model, params, tokens, 4))


def test_dense_reference_path_takes_the_fused_experts(hf_checkpoints):
  cfg, params = load_params(hf_checkpoints["qwen3_moe"], jnp.float32, progress=False)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 6)))
  dense = MoeCausalLM(cfg, jnp.float32, dense_moe_reference=True)
  _close(dense.apply({"params": fuse_projections(params)}, tokens)[0], dense.apply({"params": params}, tokens)[0])


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_experts_run_expert_parallel(hf_checkpoints, quantized):
  cfg, params = load_params(hf_checkpoints["qwen3_moe"], jnp.float32, progress=False)  # 8 experts
  if quantized:
    params = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, 4))
  model = MoeCausalLM(cfg, jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 5)))
  ref = model.apply({"params": params}, tokens)[0]
  mesh = make_mesh(MeshConfig(data=2, expert=4), 8)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(shard_params(fuse_projections(params), mesh), tokens)
  _close(out, ref)


def test_concatenates_codes_and_codebooks_row_after_row():
  rng = np.random.default_rng(3)
  a, b = random_codebook_weight(rng, (3,), 5, 32, 4, 16), random_codebook_weight(rng, (3,), 7, 32, 4, 16)
  fused = concat_outputs([a, b])
  assert isinstance(fused, CodebookWeight) and fused.shape == (3, 32, 12)
  from cqjax.codebook import dequantize
  np.testing.assert_array_equal(dequantize(fused), jnp.concatenate([dequantize(a), dequantize(b)], axis=-1))
  # Laid out for the bit-plane kernel: the layout is per row, so the fused one is the layout of the fused weight.
  from cqjax.lay_out_bitplanes import lay_out
  a, b = random_codebook_weight(rng, (3,), 5, 64, 4, 64), random_codebook_weight(rng, (3,), 7, 64, 4, 64)
  laid, want = concat_outputs([lay_out(a), lay_out(b)]), lay_out(concat_outputs([a, b]))
  for field in ("packed", "centroids", "planes", "alpha"):
    np.testing.assert_array_equal(getattr(laid, field), getattr(want, field))
  assert type(concat_outputs([lay_out(a), b])) is CodebookWeight  # one part plain: the layout is dropped


def test_parts_that_differ_stay_separate():
  rng = np.random.default_rng(4)
  row_books, group_books = random_codebook_weight(rng, (), 6, 32, 4, 32), random_codebook_weight(rng, (), 6, 32, 4, 16)
  assert concat_outputs([row_books, group_books]) is None
  assert concat_outputs([row_books, jnp.ones((32, 6))]) is None
  assert concat_outputs([jnp.ones((32, 6)), jnp.ones((32, 6), jnp.bfloat16)]) is None
  attn = {"q_proj": {"kernel": row_books}, "k_proj": {"kernel": group_books}, "v_proj": {"kernel": row_books}}
  assert fuse_projections({"attn": attn}) == {"attn": attn}
