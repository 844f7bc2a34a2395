"""Products of quantized inputs (cqjax.lut_matmul's `act`): the model hands each quantized linear
its input as it is with the quantizer, and the dispatcher either fake-quantizes x for the kernels
or hands both to kernels that fuse Q_a (on GPUs the bit-plane kernel's affine numerics). Kernels
that fuse are stood in for here by the reference's Q_a(x) @ W, so the wiring runs on any host."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cqjax.lut_matmul as dispatch
from conftest import TINY_DEFAULT, random_codebook_weight
from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.codebook import CodebookWeight
from cqjax.kmeans import kmeans_quantize
from cqjax.load import load_params
from cqjax.model import MoeCausalLM
from cqjax.quantize_weights import quantize_scope


class _Kernels:
  """Kernels that note what each product is given: ("plain", x) for their own products, ("fused",
  x, act) for those they fuse (all where `fuse`, else none), each computed as the reference."""

  def __init__(self, fuse: bool):
    self.fuse, self.calls = fuse, []

  def fusing(self, act, x, packed, centroids, bits, grouped):
    del x, packed, centroids, bits, grouped
    return _Fused(self, act) if self.fuse else None

  def lut_matmul(self, x, packed, centroids, bits):
    self.calls.append(("plain", x))
    return dispatch.lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]))

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    self.calls.append(("plain", x))
    return dispatch.grouped_lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]), group_sizes)


class _Fused:
  def __init__(self, kernels, act):
    self.kernels, self.act = kernels, act

  def lut_matmul(self, x, packed, centroids, bits):
    self.kernels.calls.append(("fused", x, self.act))
    return dispatch.lut_matmul_reference(fake_quant(x, self.act), CodebookWeight(packed, centroids, bits, x.shape[-1]))

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    self.kernels.calls.append(("fused", x, self.act))
    w = CodebookWeight(packed, centroids, bits, x.shape[-1])
    return dispatch.grouped_lut_matmul_reference(fake_quant(x, self.act), w, group_sizes)


@pytest.fixture
def kernels(monkeypatch):
  def use(fuse: bool) -> _Kernels:
    k = _Kernels(fuse)
    monkeypatch.setattr(dispatch, "_kernels", lambda: k)
    return k
  return use


@pytest.mark.parametrize("grouped", [False, True])
def test_fusing_kernels_get_x_as_given_the_others_fake_quant_x(kernels, grouped):
  rng = np.random.default_rng(21)
  act = ActQuantConfig()
  w = random_codebook_weight(rng, (3,) if grouped else (), 24, 64, 4, 64)
  x = jnp.asarray(rng.normal(size=(6, 64)) * 3.0, jnp.float32)
  gs = jnp.asarray([2, 0, 3], jnp.int32)
  product = ((lambda x, a: dispatch.grouped_lut_matmul(x, w, gs, a)) if grouped
             else (lambda x, a: dispatch.lut_matmul(x, w, a)))
  for fuse in (True, False):
    k = kernels(fuse)
    got = product(x, act)
    (kind, given, *fused_act), = k.calls
    assert kind == ("fused" if fuse else "plain")
    np.testing.assert_array_equal(given, x if fuse else fake_quant(x, act))
    assert fused_act == ([act] if fuse else [])
    np.testing.assert_array_equal(got, product(fake_quant(x, act), None))
  k = kernels(True)
  product(x, None)  # no quantizer: nothing to fuse
  assert [c[0] for c in k.calls] == ["plain"]


@pytest.mark.parametrize("ste", [False, True])
def test_gradients_through_fused_products_are_the_references(kernels, ste):
  """ACCF differentiates through these products: the fused kernel's gradients (centroids and x)
  are those of fake_quant then the reference product (straight-through or not)."""
  rng = np.random.default_rng(22)
  act = ActQuantConfig(ste=ste)
  w = random_codebook_weight(rng, (3,), 24, 64, 4, 64)
  x = jnp.asarray(rng.normal(size=(7, 64)), jnp.float32)
  gs = jnp.asarray([3, 0, 4], jnp.int32)
  loss = lambda c, x: jnp.sum(jnp.tanh(dispatch.grouped_lut_matmul(x, CodebookWeight(w.packed, c, 4, 64), gs, act)))
  k = kernels(True)
  got = jax.grad(loss, argnums=(0, 1))(w.centroids, x)
  assert k.calls and all(c[0] == "fused" for c in k.calls)
  ref_loss = lambda c, x: jnp.sum(jnp.tanh(dispatch.grouped_lut_matmul_reference(
      fake_quant(x, act), CodebookWeight(w.packed, c, 4, 64), gs)))
  want = jax.grad(ref_loss, argnums=(0, 1))(w.centroids, x)
  if ste:  # straight through: x has a gradient
    assert float(jnp.abs(want[1]).max()) > 0
  for a, b in zip(got, want):  # the same sums, associated as each path's XLA fusions do
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_dense_weights_multiply_the_fake_quantized_x():
  rng = np.random.default_rng(23)
  act = ActQuantConfig(bits=3)
  x = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 9)), jnp.float32)
  np.testing.assert_array_equal(dispatch.lut_matmul(x, w, act), fake_quant(x, act) @ w)
  stacked, gs = jnp.asarray(rng.normal(size=(2, 16, 9)), jnp.float32), jnp.asarray([3, 2], jnp.int32)
  np.testing.assert_array_equal(dispatch.grouped_lut_matmul(x, stacked, gs, act),
                                jax.lax.ragged_dot(fake_quant(x, act), stacked, gs))


@pytest.fixture(scope="module")
def tiny_quantized():
  cfg, params = load_params(TINY_DEFAULT, jnp.float32, progress=False)
  return cfg, quantize_scope(cfg, params, "full", lambda w, path: kmeans_quantize(w, 4, max_iters=5))


@pytest.mark.parametrize("scope", ["official", "full"])
def test_the_model_hands_each_quantized_linear_its_input_and_quantizer(kernels, tiny_quantized, monkeypatch, scope):
  """Fused or not, the W4A4 model computes what the reference computes; the fused products are
  the inputs the scope quantizes (official: the norm outputs' q/k/v, gate/up; full: also o_proj's
  and the down projections'), given as they are."""
  cfg, q = tiny_quantized
  act = ActQuantConfig(scope=scope)
  model = MoeCausalLM(cfg, act_quant=act)
  tokens = jnp.asarray(np.random.default_rng(24).integers(0, cfg.vocab_size, (2, 7)))
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  want = model.apply({"params": q}, tokens)[0]
  for fuse in (True, False):
    k = kernels(fuse)
    (got, _), state = model.apply({"params": q}, tokens, mutable=["intermediates"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    if fuse:  # layer 0's q/k/v are given the norm's output itself
      h = state["intermediates"]["layers_0"]["attn_input"][0].reshape(-1, cfg.hidden_size)
      assert any(c[0] == "fused" and c[1].shape == h.shape and bool(jnp.all(c[1] == h)) for c in k.calls)
    fused = {c[1].shape[-1] for c in k.calls if c[0] == "fused"}
    plain = {c[1].shape[-1] for c in k.calls if c[0] == "plain"}
    inner = {cfg.attn_out_size, cfg.moe_intermediate_size}
    if not fuse:
      assert not fused
    elif scope == "official":
      assert fused == {cfg.hidden_size} and inner <= plain
    else:
      assert fused >= {cfg.hidden_size} | inner
    assert all(c[2] == act for c in k.calls if c[0] == "fused")
