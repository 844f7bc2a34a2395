"""Expert parallelism on 8 CPU devices (conftest): the sharding rules, the all-to-all MoE forward
against the single-device model, and the sharded quantization pipeline against the unsharded one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import cqjax
from cqjax.codebook import CodebookWeight, codes_of
from cqjax.config import ModelConfig
from cqjax.errors import CqjaxError
from cqjax.finetune_centroids import AccfConfig
from cqjax.kmeans import kmeans_quantize, rtn_quantize
from cqjax.lay_out_bitplanes import lay_out
from cqjax.model import MoeCausalLM
from cqjax.moe import MoeBlock
from cqjax.quantize_weights import quantize_scope
from cqjax.sharding import MeshConfig, make_mesh, param_shardings, shard_params

MESHES = [MeshConfig(), MeshConfig(data=2, expert=4), MeshConfig(expert=2, model=4)]


def test_eight_devices():
  assert jax.device_count() == 8


def test_mesh_defaults_and_errors():
  assert dict(make_mesh(MeshConfig(), 8).shape) == {"data": 1, "expert": 8, "model": 1}
  assert dict(make_mesh(MeshConfig(), 6).shape) == {"data": 4, "expert": 2, "model": 1}
  assert dict(make_mesh(MeshConfig(model=2), 8).shape) == {"data": 1, "expert": 4, "model": 2}
  with pytest.raises(CqjaxError, match="MeshConfig.expert=3 does not divide the model's 8 experts"):
    make_mesh(MeshConfig(expert=3), 8)
  with pytest.raises(CqjaxError, match="needs 16 devices, 8 are given"):
    make_mesh(MeshConfig(data=4, expert=4), 8)
  with pytest.raises(CqjaxError, match="MeshConfig.model=3"):
    make_mesh(MeshConfig(model=3), 8)


def _tiny_random(model_type="mixtral", experts=8, top_k=2):
  cfg = ModelConfig(model_type=model_type, vocab_size=61, hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, num_experts=experts, top_k=top_k, moe_intermediate_size=24,
                    intermediate_size=40, qk_norm=model_type == "qwen3_moe",
                    dense_layers=(1,) if model_type == "qwen3_moe" else ())
  tokens = jnp.zeros((1, 3), jnp.int32)
  params = MoeCausalLM(cfg).init(jax.random.key(0), tokens)["params"]
  return cfg, jax.tree.map(lambda p: p * 5, params)  # decisive routing, large activations


def test_sharding_rules_place_experts_codes_and_centroids():
  cfg, params = _tiny_random()
  q = quantize_scope(cfg, params, "full", lambda w, p: rtn_quantize(w, 4))
  mesh = make_mesh(MeshConfig(expert=4, model=2), cfg.num_experts)
  sh = param_shardings(q, mesh)
  moe, attn = sh["layers_0"]["moe"], sh["layers_0"]["attn"]
  assert moe["gate_proj"].packed.spec == P("expert", None, None)
  assert moe["down_proj"].centroids.spec == P("expert", None, None, None)
  assert moe["router"].packed.spec == P(None, None)  # not stacked: replicated
  assert attn["q_proj"]["kernel"].packed.spec == P("model", None)  # output rows split
  assert attn["o_proj"]["kernel"].packed.spec == P(None, "model")  # input bytes split
  assert sh["embed"]["embedding"].spec == P(None, None)
  # Laid out for the bit-plane kernel (cqjax.lay_out_bitplanes): planes as the codes, alpha as the codebooks.
  laid = {**q, "layers_0": {"moe": {"gate_proj": lay_out(q["layers_0"]["moe"]["gate_proj"])},
                            "attn": {n: {"kernel": lay_out(q["layers_0"]["attn"][n]["kernel"])} for n in ("q_proj", "o_proj")}}}
  sh_laid = param_shardings(laid, mesh)["layers_0"]
  for w, want in ((sh_laid["moe"]["gate_proj"], moe["gate_proj"]), (sh_laid["attn"]["q_proj"]["kernel"], attn["q_proj"]["kernel"]),
                  (sh_laid["attn"]["o_proj"]["kernel"], attn["o_proj"]["kernel"])):
    assert (w.planes.spec, w.alpha.spec) == (want.packed.spec, want.centroids.spec) == (w.packed.spec, w.centroids.spec)
  dense = param_shardings(params, mesh)["layers_0"]
  assert dense["moe"]["up_proj"].spec == P("expert", None, None)
  assert dense["attn"]["k_proj"]["kernel"].spec == P(None, "model")
  odd = make_mesh(MeshConfig(expert=2, model=4), cfg.num_experts)
  lm = param_shardings(params, odd)["lm_head"]["kernel"]
  assert lm.spec == P(None, None)  # vocab 61 is not divisible by 4: replicated


@pytest.mark.parametrize("model_type,top_k", [("mixtral", 2), ("qwen3_moe", 3)])
@pytest.mark.parametrize("quantized", [False, True])
def test_expert_parallel_logits_equal_single_device(model_type, top_k, quantized):
  cfg, params = _tiny_random(model_type, top_k=top_k)
  if quantized:
    params = quantize_scope(cfg, params, "full", lambda w, p: kmeans_quantize(w, 4))
  model = MoeCausalLM(cfg)
  fwd = lambda p, t: model.apply({"params": p}, t)[0]
  rng = np.random.default_rng(1)
  for shape in [(1, 1), (3, 7)]:  # 1 token: padding rows, 7 of 8 devices get no copies
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, shape), jnp.int32)
    ref = jax.jit(fwd)(params, tokens)
    for mc in MESHES:
      mesh = make_mesh(mc, cfg.num_experts)
      with jax.set_mesh(mesh):
        out = jax.jit(fwd)(shard_params(params, mesh), tokens)
      np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()),
                                 err_msg=f"{shape} on {dict(mesh.shape)}")


def test_expert_parallel_with_every_token_on_one_expert():
  cfg, params = _tiny_random()
  x = jax.random.normal(jax.random.key(2), (2, 9, cfg.hidden_size))
  moe = params["layers_0"]["moe"]
  router = jnp.zeros_like(moe["router"]).at[:, 5].set(10.0).at[:, 6].set(9.0)
  moe = dict(moe, router=router)
  x = jnp.abs(x)  # positive inputs: experts 5 and 6 win for every token
  ref = MoeBlock(cfg).apply({"params": moe}, x)
  mesh = make_mesh(MeshConfig(), cfg.num_experts)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda p, x: MoeBlock(cfg).apply({"params": p}, x))(shard_params(moe, mesh), x)
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


def test_expert_parallel_gradients_equal_single_device():
  """ACCF differentiates through the all-to-alls: centroid gradients must not change."""
  cfg, params = _tiny_random()
  moe = quantize_scope(cfg, params, "full", lambda w, p: kmeans_quantize(w, 3))["layers_0"]["moe"]
  x = jax.random.normal(jax.random.key(3), (2, 6, cfg.hidden_size))

  def loss(cents):
    p = {k: dataclasses.replace(w, centroids=cents[k]) for k, w in moe.items()}
    return jnp.sum(MoeBlock(cfg).apply({"params": p}, x) ** 2)

  cents = {k: w.centroids for k, w in moe.items()}
  ref = jax.grad(loss)(cents)
  with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4), cfg.num_experts)):
    got = jax.jit(jax.grad(loss))(cents)
  for k in cents:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6 * float(jnp.abs(ref[k]).max()), err_msg=k)


def test_sharded_quantize_matches_single_device():
  """K-means is bit-identical; ACCF under SGD (the reference's optimizer) differs only by float32
  reduction order. (Adam would turn that noise into ±lr steps on centroids whose gradient is
  near zero, see BENCHMARKS.md.)"""
  cfg, params = _tiny_random()
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32))
  qcfg = cqjax.QuantizeConfig(rotation="hadamard", accf=AccfConfig(lr=1e-2, optimizer="sgd", epochs=1, batch_size=2))
  single = cqjax.quantize(params, cfg, windows, qcfg, progress=False)
  mesh = make_mesh(MeshConfig(data=2, expert=4), cfg.num_experts)
  sharded = cqjax.quantize(params, cfg, windows, qcfg, progress=False, mesh=mesh)
  gate = sharded.params["layers_0"]["moe"]["gate_proj"]
  assert gate.packed.sharding.spec[0] == "expert"
  is_cb = lambda x: isinstance(x, CodebookWeight)
  pairs = zip(jax.tree.leaves(single.params, is_leaf=is_cb), jax.tree.leaves(sharded.params, is_leaf=is_cb))
  for a, b in pairs:
    if is_cb(a):
      np.testing.assert_array_equal(codes_of(a), codes_of(b))
      np.testing.assert_allclose(a.centroids, b.centroids, rtol=0, atol=1e-6)
    else:
      np.testing.assert_array_equal(a, b)
