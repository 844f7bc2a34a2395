"""cqjax.quantize: the pipeline as one call, its options and its errors."""
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
def test_eight_bit_codebooks_stay_close_to_full_precision(tiny, scope, pog):
  cfg, params, windows = tiny
  qcfg = cqjax.QuantizeConfig(bits=8, act_bits=16, scope=scope, rotation="hadamard", group_size=32, pog=pog, accf=None)
  qm = cqjax.quantize(params, cfg, [windows[:2], windows[2:]], qcfg, progress=False)
  ref = cqjax.MoeCausalLM(cfg).apply({"params": params}, jnp.asarray(windows))[0]
  got = qm.module().apply({"params": qm.params}, jnp.asarray(windows))[0]
  # 256 centroids per 32 inputs after an exact rotation: a few 1e-3 of the logits' range.
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
