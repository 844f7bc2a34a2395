"""ACCF centroid fine-tuning and input-aware code re-assignment."""
import jax.numpy as jnp
import numpy as np

from conftest import TINY_DEFAULT
from cqjax.act_quant import ActQuantConfig
from cqjax.codebook import CodebookWeight, codes_of, dequantize
from cqjax.finetune_centroids import AccfConfig, finetune_centroids, reassign_codes
from cqjax.fold_norms import fold_norms
from cqjax.kmeans import kmeans_quantize
from cqjax.learn_rotation import initial_rotation
from cqjax.load import load_params
from cqjax.param_paths import get_path
from cqjax.quantize_weights import quantize_scope, scope_paths
from cqjax.rotate import rotate_params


def test_reassign_codes_matches_brute_force():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 12, 5)).astype(np.float32)  # [experts, d_in, d_out]
  cent = rng.normal(size=(3, 5, 2, 8)).astype(np.float32)  # groups of 6 inputs
  ratio = rng.uniform(0.5, 1.5, size=12).astype(np.float32)
  sorted_c, codes = reassign_codes(jnp.asarray(w), jnp.asarray(cent), jnp.asarray(ratio))
  target = np.swapaxes(w * ratio[:, None], -1, -2)  # [3, 5, 12]
  for e in range(3):
    for n in range(5):
      for j in range(12):
        c = np.asarray(sorted_c)[e, n, j // 6]
        want = np.min(np.abs(c - target[e, n, j]))
        assert abs(abs(c[codes[e, n, j]] - target[e, n, j]) - want) < 1e-6


def test_accf_lowers_block_losses_and_keeps_the_format():
  cfg, params = load_params(TINY_DEFAULT, jnp.float32, progress=False)
  fcfg, folded = fold_norms(cfg, params)
  rotated = rotate_params(fcfg, folded, initial_rotation(cfg.hidden_size, 0))
  q = quantize_scope(fcfg, rotated, "official", lambda w, p: kmeans_quantize(w, 4))
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 32)).astype(np.int32)
  tuned, history = finetune_centroids(fcfg, rotated, q, windows, ActQuantConfig(bits=4), False,
                                      AccfConfig(lr=1e-3, optimizer="adam", epochs=3, batch_size=8))
  assert set(history) == {f"layers_{i}/{n}" for i in range(4) for n in ("q_proj", "k_proj", "v_proj", "moe")}
  for key, losses in history.items():
    assert len(losses) == 4  # before training, then after each of the 3 epochs
  for key in ("layers_0/moe", "layers_3/moe", "layers_1/q_proj"):
    assert min(history[key][1:]) < history[key][0], (key, history[key])
  for path in scope_paths(fcfg, "official"):
    before, after = get_path(q, path), get_path(tuned, path)
    assert isinstance(after, CodebookWeight) and after.shape == before.shape
    assert int(codes_of(after).max()) < 16
    # A block keeps its best epoch: changed where some epoch beat the K-means start.
    block = "/".join(path[:2] if path[1] == "moe" else path[:3:2])
    improved = min(history[block][1:]) < history[block][0]
    assert np.array_equal(dequantize(after), dequantize(before)) != improved
  # Kernels outside the scope are untouched.
  np.testing.assert_array_equal(tuned["layers_2"]["moe"]["down_proj"], q["layers_2"]["moe"]["down_proj"])


def test_accf_on_deepseek_v2_covers_latent_attention_shared_experts_and_dense_mlp(hf_checkpoints):
  """Scope full on DeepSeek-V2: the query/key-value down-projections, latent attention's
  up-projections and o_proj fit their FP outputs; the MoE block's loss includes the shared
  experts (their codes are in the block's parameters); the dense first layer is an MLP block."""
  cfg, params = load_params(hf_checkpoints["deepseek_v2"], jnp.float32, progress=False)
  fcfg, folded = fold_norms(cfg, params)
  rotated = rotate_params(fcfg, folded, initial_rotation(cfg.hidden_size, 0))
  q = quantize_scope(fcfg, rotated, "full", lambda w, p: kmeans_quantize(w, 3))
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, 24)).astype(np.int32)
  tuned, history = finetune_centroids(fcfg, rotated, q, windows, ActQuantConfig(bits=4, scope="full"), False,
                                      AccfConfig(lr=1e-3, optimizer="adam", epochs=3, batch_size=8))
  attn = ("q_a_proj", "kv_a_proj", "q_b_proj", "kv_b_proj", "o_proj")
  assert set(history) == ({f"layers_{i}/{n}" for i in range(3) for n in attn}
                          | {"layers_0/mlp", "layers_1/moe", "layers_2/moe"})
  improved = [k for k, losses in history.items() if min(losses[1:]) < losses[0]]
  assert {"layers_0/mlp", "layers_1/moe", "layers_1/kv_b_proj", "layers_2/q_a_proj"} <= set(improved), history
  shared_before = get_path(q, ("layers_1", "moe", "shared", "gate_proj", "kernel"))
  shared_after = get_path(tuned, ("layers_1", "moe", "shared", "gate_proj", "kernel"))
  assert isinstance(shared_after, CodebookWeight)
  assert not np.array_equal(dequantize(shared_after), dequantize(shared_before))  # trained with the block
