"""cqjax.lay_out_bitplanes: which weights it lays out, that the layout is the weight's, and that the
dispatcher hands it to the fused bit-plane kernel only. That kernel is stood in for by one that
undoes the layout and computes the reference, so the wiring runs on any host (the kernel itself
reads laid-out weights in tests/test_cuda_lut_matmul_bitplane.py, on GPUs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cqjax.lut_matmul as dispatch
from conftest import random_codebook_weight
from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.codebook import CodebookWeight, LaidOutCodebookWeight, refuse_laid_out
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.export import export_quantized
from cqjax.finetune_centroids import finetune_centroids
from cqjax.kmeans import rtn_quantize
from cqjax.lay_out_bitplanes import lay_out, lay_out_bitplanes
from cqjax.model import MoeCausalLM
from cqjax.quantize import QuantizedModel
from cqjax.quantize_weights import quantize_scope
from cuda_kernels import lut_matmul_bitplane as kb


@pytest.fixture(autouse=True)
def _float32_matmuls():
  """Products in float32 on GPUs too, whose default (TF32) would round the compared paths apart."""
  with jax.default_matmul_precision("float32"):
    yield


def _unlay(planes, alpha):
  """The layout undone: (packed, centroids). The bit transpose is its own inverse; the codebook is
  the sum of its Moebius transform over each entry's subsets."""
  *lead, n, half = planes.shape
  words = jax.lax.bitcast_convert_type(planes.reshape(*lead, n, half // 16, 4, 4), jnp.uint32)
  packed = jax.lax.bitcast_convert_type(kb._nibbles_to_planes(words), jnp.uint8).reshape(planes.shape)
  entries = jax.lax.bitcast_convert_type(alpha, jnp.float32).reshape(*lead, n, 2, 2, 2, 2)
  for axis in (-1, -2, -3, -4):
    lo, hi = jnp.split(entries, 2, axis)
    entries = jnp.concatenate([lo, hi + lo], axis)
  return packed, entries.reshape(*lead, n, 1, 16)


def test_the_layout_undone_is_the_weight():
  rng = np.random.default_rng(40)
  w = random_codebook_weight(rng, (3,), 24, 512, 4, 512)
  laid = lay_out(w)
  assert isinstance(laid, LaidOutCodebookWeight) and laid.packed is w.packed and laid.centroids is w.centroids
  packed, centroids = _unlay(laid.planes, laid.alpha)
  np.testing.assert_array_equal(packed, w.packed)
  assert not np.array_equal(laid.planes, w.packed)  # the codes are transposed, not copied
  np.testing.assert_allclose(centroids, w.centroids, rtol=1e-6, atol=1e-6)


def _tree(rng):
  cb = lambda lead, k, n: random_codebook_weight(rng, lead, n, k, 4, k)
  return {"embed": {"embedding": jnp.zeros((8, 256))},
          "layers_0": {"attn": {n: {"kernel": cb((), 256, 64)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                       "moe": {"router": jnp.zeros((256, 4)), "gate_proj": cb((4,), 256, 32),
                               "up_proj": cb((4,), 256, 32), "down_proj": cb((4,), 512, 16)}},
          "layers_1": {"mlp": {"gate_up_proj": {"kernel": cb((), 256, 64)}, "down_proj": {"kernel": cb((), 96, 16)}}},
          "lm_head": {"kernel": cb((), 256, 8)}}


def _laid_out_paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, CodebookWeight))[0]
  return {jax.tree_util.keystr(p) for p, v in flat if isinstance(v, LaidOutCodebookWeight)}


@pytest.mark.parametrize("scope", ["official", "full"])
def test_lays_out_the_weights_whose_inputs_the_scope_quantizes(scope):
  tree = _tree(np.random.default_rng(41))
  got = lay_out_bitplanes(tree, ActQuantConfig(scope=scope), min_codes=0)
  want = {f"['layers_0']['attn']['{n}']['kernel']" for n in ("q_proj", "k_proj", "v_proj")}
  want |= {"['layers_0']['moe']['gate_proj']", "['layers_0']['moe']['up_proj']",
           "['layers_1']['mlp']['gate_up_proj']['kernel']"}
  if scope == "full":  # the dense MLP's down projection (96 inputs) is not the kernel's: left
    want |= {"['layers_0']['attn']['o_proj']['kernel']", "['layers_0']['moe']['down_proj']"}
  assert _laid_out_paths(got) == want
  assert got["lm_head"]["kernel"] is tree["lm_head"]["kernel"] and got["embed"] is not None
  assert got["layers_0"]["moe"]["router"] is tree["layers_0"]["moe"]["router"]  # dense: as it is
  again = lay_out_bitplanes(got, ActQuantConfig(scope=scope), min_codes=0)
  assert again["layers_0"]["moe"]["gate_proj"] is got["layers_0"]["moe"]["gate_proj"]  # not laid out twice
  # The dispatcher's default: only weights it may fuse (more than 2^24 codes): none here.
  assert not _laid_out_paths(lay_out_bitplanes(tree, ActQuantConfig(scope=scope)))
  # Codes a weight (or an expert): the 256 x 32 experts are not over 256 * 32, the 256 x 64 kernels are.
  wide = {p for p in want if "moe" not in p}
  assert _laid_out_paths(lay_out_bitplanes(tree, ActQuantConfig(scope=scope), min_codes=256 * 32)) == wide


def test_refuses_quantizers_the_kernel_does_not_take_and_laid_out_params_where_they_would_go_stale(tmp_path):
  tree = _tree(np.random.default_rng(42))
  with pytest.raises(CqjaxError, match="lay_out: .* got 4-bit codes, 2 codebooks a row, 256 inputs"):
    lay_out(random_codebook_weight(np.random.default_rng(45), (), 8, 256, 4, 128))
  for act in (None, ActQuantConfig(group_size=128), ActQuantConfig(bits=8)):
    with pytest.raises(CqjaxError, match="lay_out_bitplanes"):
      lay_out_bitplanes(tree, act, min_codes=0)
  laid = lay_out_bitplanes(tree, ActQuantConfig(), min_codes=0)
  refuse_laid_out(tree, "op")  # plain params pass
  with pytest.raises(CqjaxError, match=r"finetune: \['layers_0'\]\['attn'\]\['k_proj'\]\['kernel'\] holds a bit-plane"):
    refuse_laid_out(laid, "finetune")
  with pytest.raises(CqjaxError, match="finetune_centroids: .* holds a bit-plane layout"):
    finetune_centroids(None, None, laid, np.zeros((1, 4), np.int32), ActQuantConfig())
  model = QuantizedModel(None, laid, ActQuantConfig(), False, None)
  with pytest.raises(CqjaxError, match="export_quantized: .* holds a bit-plane layout"):
    export_quantized(str(tmp_path / "out"), model)
  assert not (tmp_path / "out").exists()


class _Kernels:
  """Kernels that fuse every product of Q_a(x) (where `fuse`; else none, as where the bit-plane
  kernel does not serve) into a stand-in for the bit-plane kernel, which reads the layout where it
  is given one (it undoes it, then computes the reference), and note what each product was given."""

  def __init__(self, fuse=True):
    self.fuse, self.calls = fuse, []

  def fusing(self, act, x, packed, centroids, bits, grouped):
    del x, packed, centroids, bits, grouped
    return _Fused(self, act) if self.fuse else None

  def lut_matmul(self, x, packed, centroids, bits):
    self.calls.append("plain")
    return dispatch.lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]))

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    self.calls.append("plain")
    return dispatch.grouped_lut_matmul_reference(x, CodebookWeight(packed, centroids, bits, x.shape[-1]), group_sizes)


class _Fused:
  READS_LAYOUT = True

  def __init__(self, kernels, act):
    self.kernels, self.act = kernels, act

  def _weight(self, packed, centroids, bits, d_in):
    if centroids.dtype == jnp.uint32:
      self.kernels.calls.append("laid out")
      packed, centroids = _unlay(packed, centroids)
    else:
      self.kernels.calls.append("fused")
    return CodebookWeight(packed, centroids, bits, d_in)

  def lut_matmul(self, x, packed, centroids, bits):
    w = self._weight(packed, centroids, bits, x.shape[-1])
    return dispatch.lut_matmul_reference(fake_quant(x, self.act), w)

  def grouped_lut_matmul(self, x, packed, centroids, bits, group_sizes):
    w = self._weight(packed, centroids, bits, x.shape[-1])
    return dispatch.grouped_lut_matmul_reference(fake_quant(x, self.act), w, group_sizes)


def _small_model():
  hf = {"model_type": "mixtral", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 256,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4,
        "num_experts_per_tok": 2, "max_position_embeddings": 64}
  cfg = ModelConfig.from_hf_dict(hf, source="test")
  params = MoeCausalLM(cfg).init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  return cfg, quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, 4))


@pytest.mark.parametrize("scope", ["official", "full"])
def test_the_fused_kernel_reads_the_layout_and_the_model_computes_the_same(monkeypatch, scope):
  cfg, q = _small_model()
  act = ActQuantConfig(scope=scope)
  laid = lay_out_bitplanes(q, act, min_codes=0)
  model = MoeCausalLM(cfg, act_quant=act)
  tokens = jnp.asarray(np.random.default_rng(43).integers(0, cfg.vocab_size, (2, 5)))
  monkeypatch.setenv("CQJAX_KERNELS", "reference")
  want = model.apply({"params": q}, tokens)[0]
  assert np.array_equal(model.apply({"params": laid}, tokens)[0], want)  # the reference ignores the layout
  k = _Kernels()
  monkeypatch.setattr(dispatch, "_kernels", lambda: k)
  got = model.apply({"params": laid}, tokens)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
  # In order: q/k/v, o_proj, the router, gate/up, down. Scope official quantizes neither o_proj's
  # input nor down's, so those products are the kernels' own, from the packed codes.
  assert k.calls == (["laid out"] * 3 + ["plain"] + ["laid out"] * 3 + ["plain"] if scope == "official" else
                     ["laid out"] * 8)
  k = _Kernels(fuse=False)  # products not fused take the packed codes, laid out or not
  monkeypatch.setattr(dispatch, "_kernels", lambda: k)
  np.testing.assert_allclose(model.apply({"params": laid}, tokens)[0], want, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))
  assert k.calls == ["plain"] * 8


def test_gradients_through_a_laid_out_product_are_the_references(monkeypatch):
  rng = np.random.default_rng(44)
  act = ActQuantConfig(ste=True)
  w = random_codebook_weight(rng, (3,), 16, 256, 4, 256)
  laid = lay_out(w)
  x = jnp.asarray(rng.normal(size=(5, 256)), jnp.float32)
  gs = jnp.asarray([2, 0, 3], jnp.int32)
  k = _Kernels()
  monkeypatch.setattr(dispatch, "_kernels", lambda: k)
  r = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)  # a linear loss: its cotangent is r whatever y is
  loss = lambda c, x, w: jnp.sum(r * dispatch.grouped_lut_matmul(
      x, type(w)(w.packed, c, 4, 256, *([w.planes, w.alpha] if w is laid else [])), gs, act))
  got = jax.grad(loss, argnums=(0, 1))(w.centroids, x, laid)
  want = jax.grad(loss, argnums=(0, 1))(w.centroids, x, w)
  assert k.calls == ["laid out", "fused"]
  assert float(jnp.abs(got[1]).max()) > 0  # straight through: x has a gradient
  for a, b in zip(got, want):  # both the reference's backward pass, from packed and centroids (two programs)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))
