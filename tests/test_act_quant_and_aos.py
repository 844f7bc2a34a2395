"""Activation fake quantization and the AOS rotation learner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.errors import CqjaxError
from cqjax.learn_rotation import AosConfig, cayley, initial_rotation, learn_rotation, quantization_error


def _reference_asym(x, bits):
  lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
  scale = np.maximum((hi - lo) / (2 ** bits - 1), 1e-5)
  return np.clip(np.round((x - lo) / scale), 0, 2 ** bits - 1) * scale + lo


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_per_token_asymmetric_matches_numpy(bits):
  x = np.random.default_rng(bits).normal(size=(3, 5, 64)).astype(np.float32)
  got = np.asarray(fake_quant(jnp.asarray(x), ActQuantConfig(bits=bits)))
  np.testing.assert_allclose(got, _reference_asym(x, bits), rtol=1e-5, atol=1e-6)
  for tok in got.reshape(-1, 64):  # at most 2^b levels per token
    assert len(np.unique(tok)) <= 2 ** bits


def test_groups_symmetric_clip_and_ste():
  x = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
  grouped = fake_quant(jnp.asarray(x), ActQuantConfig(group_size=8))
  np.testing.assert_allclose(grouped.reshape(4, 4, 8), _reference_asym(x.reshape(4, 4, 8), 4), rtol=1e-5, atol=1e-6)
  sym = np.asarray(fake_quant(jnp.asarray(x), ActQuantConfig(symmetric=True)))
  scale = np.abs(x).max(-1, keepdims=True) / 7
  np.testing.assert_allclose(sym, np.clip(np.round(x / scale), -8, 7) * scale, rtol=1e-5, atol=1e-6)
  clipped = np.asarray(fake_quant(jnp.asarray(x), ActQuantConfig(clip_ratio=0.5)))
  assert np.abs(clipped).max() < np.abs(x).max()
  g = jax.grad(lambda v: jnp.sum(fake_quant(v, ActQuantConfig(ste=True))))(jnp.asarray(x))
  np.testing.assert_array_equal(g, np.ones_like(x))
  with pytest.raises(CqjaxError, match="group_size 7 does not divide"):
    fake_quant(jnp.asarray(x), ActQuantConfig(group_size=7))
  with pytest.raises(CqjaxError, match="scope"):
    ActQuantConfig(scope="most")


def test_cayley_is_orthogonal():
  b = jax.random.normal(jax.random.key(0), (48, 48)) * 0.3
  q = cayley(b)
  np.testing.assert_allclose(q.T @ q, np.eye(48), atol=1e-5)
  np.testing.assert_allclose(cayley(jnp.zeros((8, 8))), np.eye(8))


def _outlier_activations(seed, sources=2, n=32, t=16, d=64):
  """Gaussian tokens with a few large fixed channels, like real norm outputs."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(sources, n, t, d)).astype(np.float32)
  x[..., [3, 17]] *= 25.0
  return x


def test_learned_rotation_beats_hadamard_and_identity():
  x = _outlier_activations(0)
  cfg = AosConfig(lr=1e-4, epochs=4, batch_size=8)
  r, history = learn_rotation(x, cfg, progress=False)
  assert np.abs(r.T @ r - np.eye(64)).max() <= 1e-5
  assert history[-1] < history[0]
  err = lambda rot: float(jnp.sum(quantization_error(jnp.asarray(x), jnp.asarray(rot, jnp.float32), cfg.act)))
  none, had, learned = err(np.eye(64)), err(initial_rotation(64, cfg.seed)), err(r)
  assert learned < had < none, (learned, had, none)


def test_too_few_samples_is_refused():
  with pytest.raises(CqjaxError, match="at least batch_size=16"):
    learn_rotation(_outlier_activations(0, n=4), AosConfig(), progress=False)
