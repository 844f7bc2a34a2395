"""The 4-bit model's GPU paths, traced and lowered for CUDA on any machine (CI's CPU included): the
dispatcher's choice under each CQJAX_KERNELS setting, the Pallas kernels' Triton lowering and the
CUDA wrappers' custom calls, whose operand preparation, tunings and checks run while tracing.
Whether the kernels compute the right numbers is for the compiled tests on a GPU; this catches the
wiring around them, which otherwise runs first on a GPU."""
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cqjax.codebook import CodebookWeight
from cqjax.config import ModelConfig
from cqjax import lut_matmul as dispatch
from cqjax.fuse_projections import fuse_projections
from cqjax.kmeans import rtn_quantize
from cqjax.model import MoeCausalLM, init_cache
from cqjax.quantize_weights import quantize_scope
from cuda_kernels import expert_slots as ces
from cuda_kernels import lut_matmul as cuda
from cuda_kernels import lut_matmul_int8 as cuda8

# d_in of every product a multiple of 32 (the CUDA kernels' requirement), so each setting's kernels take them all.
CFG = ModelConfig(model_type="mixtral", vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, num_experts=4, top_k=2, moe_intermediate_size=96)


@pytest.fixture(scope="module")
def quantized():
  model = MoeCausalLM(CFG, jnp.bfloat16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
  q = quantize_scope(CFG, params, "full", lambda w, path: rtn_quantize(w, 4))
  return model, jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, q)


@pytest.fixture
def no_reference(monkeypatch):
  """A product that falls back to the jnp reference fails the trace."""
  def refuse(*args):
    raise AssertionError("a product took the jnp reference on the GPU path")

  for name in ("lut_matmul_reference", "grouped_lut_matmul_reference"):
    monkeypatch.setattr(dispatch, name, refuse)


@pytest.fixture
def as_gpu(monkeypatch, no_reference):
  """The dispatcher sees a CUDA GPU as the default backend, with the CUDA library built; a product
  that falls back to the jnp reference fails the trace."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  for module in (cuda, cuda8, ces):
    monkeypatch.setattr(module, "available", lambda: True)


def _lowered(model, params, tokens, decode: bool) -> str:
  """StableHLO of the forward (or of one cached decode step) lowered for CUDA GPUs."""
  if decode:
    cache = init_cache(CFG, tokens.shape[0], 16, jnp.bfloat16)
    f = lambda p, t, c: model.apply({"params": p}, t, cache=c, cache_index=7)[0]
    args = (params, tokens, cache)
  else:
    f = lambda p, t: model.apply({"params": p}, t)[0]
    args = (params, tokens)
  return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _targets(text: str) -> set:
  return set(re.findall(r"stablehlo.custom_call @([\w$.]+)", text))


# setting -> (custom-call targets every product of the step must come to, names that must not appear)
WANT = {"auto": ({"__gpu$xla.gpu.triton", "cqjax_cuda_expert_slots"}, "cqjax_cuda_lut_matmul"),  # small: Pallas'
        "pallas": ({"__gpu$xla.gpu.triton"}, "cqjax_cuda"),
        "cuda": ({"cqjax_cuda_lut_matmul", "cqjax_cuda_expert_slots"}, "xla.gpu.triton"),
        "int8": ({"cqjax_cuda_lut_matmul_int8", "cqjax_cuda_expert_slots"}, "xla.gpu.triton")}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("mode", list(WANT))
def test_model_lowers_for_cuda_under_each_kernel_setting(quantized, as_gpu, mode, decode, fused):
  model, params = quantized
  if fused:
    params = fuse_projections(params)
  # A decode step of 3 rows; a forward of 2 x 5 rows (10 rows, every expert busy at top-2 of 4).
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (3, 1) if decode else (2, 5)))
  with dispatch.kernels_mode(mode):
    text = _lowered(model, params, tokens, decode)
  want, absent = WANT[mode]
  assert want <= _targets(text) and absent not in text
  if mode in ("auto", "pallas"):
    assert "cqjax_grouped_lut_matmul" in text and "cqjax_lut_matmul" in text


def test_prefill_rows_on_hopper_take_the_wgmma_kernels(quantized, as_gpu, monkeypatch):
  """Past 16 rows a weight the int8 setting takes its wgmma kernel on Hopper (elsewhere the default
  kernels): both lower, with the wgmma tunings' operands."""
  model, params = quantized
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (4, 40)))  # 160 rows
  for hopper, want in ((True, "cqjax_cuda_lut_matmul_int8"), (False, "__gpu$xla.gpu.triton")):
    monkeypatch.setattr(cuda, "is_hopper", lambda hopper=hopper: hopper)
    with dispatch.kernels_mode("int8"):
      assert want in _targets(_lowered(model, params, tokens, False))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a host without a GPU: on a GPU the CUDA library serves")
def test_kernels_mode_traces_for_a_gpu_from_a_host_without_one(quantized, no_reference):
  """kernels_mode(backend="gpu") with nothing mocked but the reference (as for compiling ahead of
  time for a GPU, experiments.compile_only_gpu): every product a Pallas kernel, the CUDA library
  never loaded without a GPU, under every setting; an unknown backend is refused."""
  model, params = quantized
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (3, 1)))
  for mode in ("auto", "cuda", "int8"):
    with dispatch.kernels_mode(mode, backend="gpu"):
      text = _lowered(model, params, tokens, True)
    assert _targets(text) == {"__gpu$xla.gpu.triton"}, mode
  assert dispatch._backend_override is None  # the override ends with its block
  with pytest.raises(dispatch.CqjaxError, match=r"kernels_mode backend must be one of cpu, gpu or None, got 'tpu'"):
    with dispatch.kernels_mode("auto", backend="tpu"):
      pass


def _mesh_devices() -> list:
  """8 devices for a mesh: CPU stand-ins, or on a GPU host compile-only H200s (jax's CUDA plugin),
  since there Triton's lowering reads the GPU model from the mesh's devices (jax 0.11.2, an H100)."""
  if jax.devices()[0].platform != "gpu":  # as_gpu fakes default_backend
    return jax.devices("cpu")
  from experiments.compile_only_gpu import compile_only_devices  # pylint: disable=g-import-not-at-top
  return compile_only_devices("h200", 8)


@pytest.mark.parametrize("mode", ["pallas", "int8"])
def test_expert_parallel_model_lowers_for_cuda(quantized, as_gpu, mode):
  """On a data x expert mesh (8 devices standing in for GPUs) the kernels run inside the
  expert-parallel shard_map, every product still a kernel."""
  from cqjax.sharding import MeshConfig, make_mesh, param_shardings  # pylint: disable=g-import-not-at-top
  model, params = quantized
  mesh = make_mesh(MeshConfig(data=2, expert=4), CFG.num_experts, _mesh_devices())
  abstract = lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # placed nowhere yet
  tokens = abstract(jnp.zeros((2, 5), jnp.int32), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  with dispatch.kernels_mode(mode), jax.set_mesh(mesh):
    text = _lowered(model, jax.tree.map(abstract, params, param_shardings(params, mesh)), tokens, False)
  want, absent = WANT[mode]
  assert want <= _targets(text) and absent not in text
  assert "sdy.manual_computation" in text or "SPMDFullToShardShape" in text  # shard_map (Shardy or GSPMD)


@pytest.fixture
def without_pallas_triton(monkeypatch):
  """A jax without Pallas' Triton backend (deprecated in jax 0.11): its module cannot be imported."""
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  dispatch._pallas_kernels.cache_clear()
  yield
  dispatch._pallas_kernels.cache_clear()


def test_without_pallas_triton_gpu_products_take_the_cuda_kernels(quantized, as_gpu, without_pallas_triton):
  """Every product of a decode step goes to the CUDA library (auto takes it even where it measured
  slower than Pallas), with one warning naming the missing backend; CQJAX_KERNELS=pallas is refused
  in one line."""
  model, params = quantized
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (1, 1)))  # one row: Pallas' under auto
  with pytest.warns(RuntimeWarning, match=r"this jax has no Pallas Triton backend .*python -m cuda_kernels.build"):
    with dispatch.kernels_mode("auto"):
      text = _lowered(model, params, tokens, True)
  assert "cqjax_cuda_lut_matmul" in _targets(text) and "xla.gpu.triton" not in text
  with pytest.raises(dispatch.CqjaxError, match=r"CQJAX_KERNELS=pallas: this jax has no Pallas Triton backend"):
    with dispatch.kernels_mode("pallas"):
      _lowered(model, params, tokens, True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="a host without a GPU: on a GPU the CUDA library serves")
def test_without_pallas_triton_or_the_cuda_library_gpu_products_take_the_reference(without_pallas_triton):
  """No kernel at all for a GPU: a product and a grouped one (an expert without rows) lower with no
  custom call of cqjax's or Triton's and give the reference's numbers."""
  keys = jax.random.split(jax.random.key(5), 5)
  codebook = lambda kp, kc, *lead: CodebookWeight(
      jax.random.randint(kp, (*lead, 48, 32), 0, 256, jnp.int32).astype(jnp.uint8),
      jax.random.normal(kc, (*lead, 48, 1, 16), jnp.bfloat16), 4, 64)
  w, experts = codebook(keys[0], keys[1]), codebook(keys[2], keys[3], 3)
  x, sizes = jax.random.normal(keys[4], (3, 64), jnp.bfloat16), jnp.array([1, 0, 2], jnp.int32)
  products = lambda x: (dispatch.lut_matmul(x, w), dispatch.grouped_lut_matmul(x, experts, sizes))
  with pytest.warns(RuntimeWarning, match="no Pallas Triton backend"):
    with dispatch.kernels_mode("auto", backend="gpu"):
      text = jax.jit(products).trace(x).lower(lowering_platforms=("cuda",)).as_text()
      got = products(x)
  assert not any(t.startswith("cqjax") or "triton" in t for t in _targets(text))
  want = (dispatch.lut_matmul_reference(x, w), dispatch.grouped_lut_matmul_reference(x, experts, sizes))
  for g, r in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
