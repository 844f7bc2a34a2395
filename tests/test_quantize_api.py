"""cqjax.quantize: the pipeline as one call, its options, its errors and its resumable checkpoints."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

import cqjax
from conftest import TINY_DEFAULT
from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError


@pytest.fixture(scope="module")
def tiny():
  cfg, params = cqjax.load_params(TINY_DEFAULT, jnp.float32, progress=False)
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32))
  return cfg, params, windows


@pytest.mark.parametrize("scope,pog", [("full", True), ("official", False)])
def test_near_lossless_codebooks_stay_close_to_full_precision(tiny, scope, pog):
  cfg, params, windows = tiny
  qcfg = cqjax.QuantizeConfig(bits=6, act_bits=16, scope=scope, rotation="hadamard", group_size=32, pog=pog, accf=None)
  qm = cqjax.quantize(params, cfg, [windows[:2], windows[2:]], qcfg, progress=False)
  ref = cqjax.MoeCausalLM(cfg).apply({"params": params}, jnp.asarray(windows))[0]
  got = qm.module().apply({"params": qm.params}, jnp.asarray(windows))[0]
  # 64 centroids per 32 inputs (more than the group holds) after an exact rotation: a few 1e-3 of
  # the logits' range.
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 2e-2
  down = qm.params["layers_0"]["moe"]["down_proj"]
  assert isinstance(down, CodebookWeight) == (scope == "full") and qm.online_down_hadamard == (scope == "full")
  assert isinstance(qm.params["layers_0"]["attn"]["q_proj"]["kernel"], CodebookWeight)
  np.testing.assert_allclose(qm.r1 @ qm.r1.T, np.eye(cfg.hidden_size), atol=1e-5)


def test_bad_settings_raise_clear_errors(tiny):
  cfg, params, windows = tiny
  for qcfg, match in [(cqjax.QuantizeConfig(scope="everything"), "QuantizeConfig.scope"),
                      (cqjax.QuantizeConfig(rotation="random"), "QuantizeConfig.rotation"),
                      (cqjax.QuantizeConfig(pog=True), "pog needs column groups")]:
    with pytest.raises(CqjaxError, match=match):
      cqjax.quantize(params, cfg, windows, qcfg, progress=False)
  with pytest.raises(CqjaxError, match="calibration_batches must be integer token windows"):
    cqjax.quantize(params, cfg, windows.astype(np.float32), progress=False)


def test_checkpoint_dir_resumes_to_the_same_model_and_refuses_other_inputs(tiny, tmp_path, monkeypatch):
  import dataclasses

  import jax

  import cqjax.finetune_centroids as fc
  cfg, params, windows = tiny
  qcfg = cqjax.QuantizeConfig(rotation="hadamard", accf=fc.AccfConfig(lr=1e-3, optimizer="adam", epochs=1, batch_size=2))
  whole = cqjax.quantize(params, cfg, windows, qcfg, progress=False)
  ckpt = str(tmp_path / "ckpt")
  save_tree = fc.save_tree

  def crash_after_layer_1(path, tree, meta=None):
    save_tree(path, tree, meta)
    if meta and meta.get("next_layer") == 2:
      raise KeyboardInterrupt("simulated crash")

  monkeypatch.setattr(fc, "save_tree", crash_after_layer_1)
  with pytest.raises(KeyboardInterrupt):
    cqjax.quantize(params, cfg, windows, qcfg, progress=False, checkpoint_dir=ckpt)
  monkeypatch.setattr(fc, "save_tree", save_tree)
  layer0 = os.stat(os.path.join(ckpt, "accf", "layer_000")).st_ino
  resumed = cqjax.quantize(params, cfg, windows, qcfg, progress=False, checkpoint_dir=ckpt)
  assert os.stat(os.path.join(ckpt, "accf", "layer_000")).st_ino == layer0  # not redone
  assert os.path.exists(os.path.join(ckpt, "accf", "layer_003"))
  for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(CqjaxError, match=r"quantize_config.bits: checkpoint has 4, now 3"):
    cqjax.quantize(params, cfg, windows, dataclasses.replace(qcfg, bits=3), progress=False, checkpoint_dir=ckpt)
  with pytest.raises(CqjaxError, match="calibration_crc32"):
    cqjax.quantize(params, cfg, windows[:, :16], qcfg, progress=False, checkpoint_dir=ckpt)


@pytest.mark.parametrize("scope", ["official", "full"])
def test_deepseek_v2_quantizes_with_learned_rotation(hf_checkpoints, scope):
  """DeepSeek-V2 (latent attention, shared experts, a dense layer): learned R1, K-means codebooks
  over the scope's linears; 8-bit codes stay close to the float model. POG is refused clearly."""
  cfg, params = cqjax.load_params(hf_checkpoints["deepseek_v2"], jnp.float32, progress=False)
  windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 16))
  from cqjax.learn_rotation import AosConfig
  qcfg = cqjax.QuantizeConfig(bits=8, act_bits=16, scope=scope, accf=None, aos=AosConfig(epochs=2, batch_size=2))
  qm = cqjax.quantize(params, cfg, windows, qcfg, progress=False)
  assert len(qm.history["aos"]) == 2
  ref = cqjax.MoeCausalLM(cfg).apply({"params": params}, jnp.asarray(windows))[0]
  got = qm.module().apply({"params": qm.params}, jnp.asarray(windows))[0]
  assert float(jnp.abs(got - ref).max() / jnp.abs(ref).max()) < 2e-2
  attn, moe = qm.params["layers_1"]["attn"], qm.params["layers_1"]["moe"]
  for name in ("q_a_proj", "kv_a_proj"):
    assert isinstance(attn[name]["kernel"], CodebookWeight)
  assert isinstance(moe["shared"]["gate_proj"]["kernel"], CodebookWeight) and isinstance(moe["router"], CodebookWeight)
  full = scope == "full"
  for kernel in (attn["kv_b_proj"]["kernel"], attn["o_proj"]["kernel"], moe["shared"]["down_proj"]["kernel"],
                 moe["down_proj"], qm.params["layers_0"]["mlp"]["down_proj"]["kernel"]):
    assert isinstance(kernel, CodebookWeight) == full
  with pytest.raises(CqjaxError, match="POG is not supported for deepseek_v2 yet"):
    cqjax.quantize(params, cfg, windows, cqjax.QuantizeConfig(rotation="hadamard", group_size=4, pog=True),
                   progress=False)
