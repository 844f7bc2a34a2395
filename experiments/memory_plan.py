"""Peak device bytes of every quantization stage and of decode at a real model's shapes, without
its weights: `jax.eval_shape` builds the parameter trees, each stage's jitted function is lowered
and compiled for the device mesh, and XLA's buffer assignment (`memory_analysis()`) gives its
per-device argument, output and temporary bytes.

  python -m experiments.memory_plan --model=mixtral-8x7b                      # one device
  python -m experiments.memory_plan --model=qwen3-235b-a22b --devices=8 --device_gb=141

On a machine without that many accelerators, `--devices=N` compiles for N CPU devices
(`jax_num_cpu_devices`): the plan is XLA:CPU's buffer assignment, the GPU compiler's differs in
fusion but not in what must be resident. Stages are the layer-by-layer plan: one layer's weights
(or one stacked expert tensor) plus what is carried between layers. `--config_json` reads any
Hugging Face config.json instead of a named model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import numpy as np

GB = 1e9
MODELS = {  # the fields of their Hugging Face config.json that cqjax reads
    # A toy entry: how the tests and `bench_layer_streaming` exercise the scripts on a CPU.
    "toy-mixtral": dict(model_type="mixtral", vocab_size=128, hidden_size=64, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=16, num_experts=8, top_k=2, moe_intermediate_size=128),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, moe_intermediate_size=14336),
    "mixtral-8x22b": dict(model_type="mixtral", vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48,
                          num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, moe_intermediate_size=16384),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32,
                          num_kv_heads=4, head_dim=128, num_experts=128, top_k=8, moe_intermediate_size=768,
                          intermediate_size=6144,
                          qk_norm=True),
    "qwen3-235b-a22b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, num_layers=94,
                            num_heads=64, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8,
                            moe_intermediate_size=1536, qk_norm=True),
    # config.json of deepseek-ai/DeepSeek-V2-Lite: latent attention, 2 shared experts, dense layer 0.
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, num_layers=27,
                             num_heads=16, num_kv_heads=16, head_dim=64, num_experts=64, top_k=6,
                             moe_intermediate_size=1408, intermediate_size=10944, dense_layers=(0,),
                             norm_topk_prob=False, kv_lora_rank=512, qk_nope_head_dim=128, v_head_dim=128,
                             n_shared_experts=2, rope_theta=1e4, max_position_embeddings=163840,
                             yarn_factor=40.0, yarn_original_max_position=4096, yarn_mscale=0.707,
                             yarn_mscale_all_dim=0.707),
}


@dataclasses.dataclass(frozen=True)
class PlanSettings:
  """The run's sizes (defaults: the paper's / `experiments/configs/base.py`)."""

  calib_samples: int = 512
  calib_seqlen: int = 256
  calib_batch: int = 16
  aos_batch: int = 16
  accf_batch: int = 32
  bits: int = 4
  decode_batch: int = 16
  decode_context: int = 4096


def _nbytes(tree, shardings) -> int:
  """Per-device bytes of abstract arrays with their shardings (the largest shard)."""
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = sh.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def _compiled(stage: str, fn, *args) -> dict:
  """Per-device bytes of fn compiled for abstract args (arguments, outputs, temporaries)."""
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  print(f"  compiled {stage} in {time.perf_counter() - t0:.1f} s", flush=True)
  out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
  return out


STAGES = ("calibrate", "aos_step", "kmeans_expert_tensor", "accf_moe_step", "decode")


def plan(cfg, mesh, s: PlanSettings = PlanSettings(), stages=STAGES) -> dict:
  """{stage: per-device bytes} for ModelConfig cfg on mesh (a `cqjax.sharding` mesh), for the
  named `stages`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from cqjax.act_quant import ActQuantConfig  # pylint: disable=g-import-not-at-top
  from cqjax.finetune_centroids import _apply  # pylint: disable=g-import-not-at-top
  from cqjax.kmeans import kmeans_quantize  # pylint: disable=g-import-not-at-top
  from cqjax.learn_rotation import aos_step  # pylint: disable=g-import-not-at-top
  from cqjax.model import DecoderLayer, MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.quantize_weights import quantize_scope  # pylint: disable=g-import-not-at-top
  from cqjax.sharding import param_shardings  # pylint: disable=g-import-not-at-top

  bf16, f32 = jnp.bfloat16, jnp.float32
  d, t = cfg.hidden_size, s.calib_seqlen
  act = ActQuantConfig(bits=4, scope="full")
  one = jnp.zeros((1, 1), jnp.int32)

  def placed(tree, shardings):
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)

  def batch(*shape, dtype=f32):
    split = shape[0] % mesh.shape["data"] == 0
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data" if split else None)))

  quantizer = lambda w, p: kmeans_quantize(w, s.bits, -1)
  with jax.set_mesh(mesh):
    params = jax.eval_shape(lambda: MoeCausalLM(cfg, bf16).init(jax.random.key(0), one)["params"])
    qparams = jax.eval_shape(lambda p: quantize_scope(cfg, p, "full", quantizer), params)
    moe_layer = next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
    name = f"layers_{moe_layer}"
    sh, qsh = param_shardings(params, mesh), param_shardings(qparams, mesh)  # rules match full paths
    layer, qlayer = placed(params[name], sh[name]), placed(qparams[name], qsh[name])
    out = {"model": {"fp_bf16_weights": _nbytes(params, sh), "w4_weights": _nbytes(qparams, qsh),
                     "fp_bf16_layer": _nbytes(params[name], sh[name]), "w4_layer": _nbytes(qparams[name], qsh[name])}}
    opt = optax.adam(1e-4)
    if "calibrate" in stages:
      dec = DecoderLayer(cfg, moe_layer, bf16)
      out["calibrate"] = _compiled("calibrate", lambda p, x, pos: _apply(dec, p, x, pos, collect="mlp_input"),
                                   layer, batch(s.calib_batch, t, d, dtype=bf16), batch(s.calib_batch, t, dtype=jnp.int32))
    if "aos_step" in stages:  # every norm output of a batch: [2 * layers, batch, t, d]
      b = jax.ShapeDtypeStruct((d, d), f32)
      out["aos_step"] = _compiled("aos_step", lambda b, st, x, h: aos_step(h, opt, act)(b, st, x), b,
                                  jax.eval_shape(opt.init, b),
                                  jax.ShapeDtypeStruct((2 * cfg.num_layers, s.aos_batch, t, d), f32), b)
    if "kmeans_expert_tensor" in stages:
      out["kmeans_expert_tensor"] = _compiled("kmeans_expert_tensor", lambda w: kmeans_quantize(w, s.bits, -1),
                                              layer["moe"]["gate_proj"])
    if "accf_moe_step" in stages:
      _accf(out, cfg, s, layer, qlayer, batch, opt, act)
    if "decode" in stages:
      _decode(out, cfg, s, qlayer, moe_layer, batch, act)
  for stage in ("calibrate", "aos_step", "kmeans_expert_tensor", "accf_moe_step"):
    if stage in out:
      out[stage]["peak"] += out[stage].get("carried_activations", 0)
  return out


def _accf(out, cfg, s, layer, qlayer, batch, opt, act):
  """The MoE block's ACCF step (loss, gradients, Adam, re-assignment) on one batch; the FP and
  quantized activations of every calibration sample are carried between layers."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cqjax.finetune_centroids import (AccfConfig, _codebooks, accf_step, codebook_targets,  # pylint: disable=g-import-not-at-top
                                       moe_block_loss, moe_ratios)
  from cqjax.moe import MoeBlock  # pylint: disable=g-import-not-at-top
  f32, d, t = jnp.float32, cfg.hidden_size, s.calib_seqlen
  cbs = _codebooks(qlayer["moe"])
  fp_ws, ratios = codebook_targets(qlayer["moe"], layer["moe"], moe_ratios(cfg, jnp.ones((d,), f32)))
  accf = AccfConfig(lr=1e-3, optimizer="adam")
  loss = moe_block_loss(MoeBlock(cfg, f32, False, act), accf.kl_weight)
  data = (batch(s.accf_batch, t, d), batch(s.accf_batch, t, d), batch(s.accf_batch, t, cfg.num_experts))
  out["accf_moe_step"] = _compiled(
      "accf_moe_step", lambda c, o, bt, fp: accf_step(qlayer["moe"], fp, ratios, loss, opt, accf)(c, o, bt),
      cbs, jax.eval_shape(opt.init, [cb.centroids for cb in cbs]), data, fp_ws)
  out["accf_moe_step"]["carried_activations"] = 2 * s.calib_samples * t * d * 4 // jax.sharding.get_abstract_mesh().shape["data"]


def _decode(out, cfg, s, qlayer, moe_layer, batch, act):
  """One decode step of one quantized layer (online R4 included); the whole model's codes and
  the KV cache of every layer stay resident."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from cqjax.finetune_centroids import _apply  # pylint: disable=g-import-not-at-top
  from cqjax.model import DecoderLayer, init_cache  # pylint: disable=g-import-not-at-top
  bf16 = jnp.bfloat16
  qdec = DecoderLayer(cfg, moe_layer, bf16, act_quant=act, online_down_hadamard=True)
  cache = jax.tree.map(lambda a: batch(*a.shape, dtype=bf16),
                       jax.eval_shape(lambda: init_cache(cfg, s.decode_batch, s.decode_context, bf16)[moe_layer]))
  step = _compiled("decode_layer_step", lambda p, x, pos, c: _apply(qdec, p, x, pos, c, s.decode_context - 1),
                   qlayer, batch(s.decode_batch, 1, cfg.hidden_size, dtype=bf16),
                   batch(s.decode_batch, 1, dtype=jnp.int32), cache)
  data = jax.sharding.get_abstract_mesh().shape["data"]
  kv = _nbytes(cache, jax.tree.map(lambda a: a.sharding, cache)) * cfg.num_layers
  out["decode"] = {"w4_weights": out["model"]["w4_weights"], "kv_cache": kv,
                   "one_layer_step": step["temporaries"] + step["outputs"]}
  out["decode"]["peak"] = sum(out["decode"].values())


def table(name: str, result: dict, devices: int, device_gb: float) -> str:
  rows = [f"{name} on {devices} device(s) of {device_gb:g} GB: per-device peak bytes",
          f"  weights: bf16 {result['model']['fp_bf16_weights'] / GB:.2f} GB, "
          f"4-bit codes + centroids {result['model']['w4_weights'] / GB:.2f} GB; "
          f"one MoE layer bf16 {result['model']['fp_bf16_layer'] / GB:.2f} GB"]
  for stage in (st for st in STAGES if st in result):
    r = result[stage]
    detail = ", ".join(f"{k} {v / GB:.2f}" for k, v in r.items() if k != "peak")
    fits = "fits" if r["peak"] <= device_gb * GB else "DOES NOT FIT"
    rows.append(f"  {stage:22s} {r['peak'] / GB:8.2f} GB  {fits}  ({detail})")
  return "\n".join(rows)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", choices=sorted(MODELS), default="mixtral-8x7b")
  p.add_argument("--config_json", default="", help="a Hugging Face config.json instead of --model")
  p.add_argument("--devices", type=int, default=0, help="0: the accelerators present (else 1 CPU)")
  p.add_argument("--device_gb", type=float, default=80.0)
  p.add_argument("--decode_batch", type=int, default=16)
  p.add_argument("--accf_batch", type=int, default=PlanSettings.accf_batch)
  p.add_argument("--stages", default=",".join(STAGES), help="a subset of " + ",".join(STAGES))
  p.add_argument("--out", default="", help="write the plan as JSON here")
  a = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  if a.devices and jax.config.jax_platforms in (None, "", "cpu") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    jax.config.update("jax_num_cpu_devices", a.devices)
  from cqjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from cqjax.sharding import MeshConfig, make_mesh  # pylint: disable=g-import-not-at-top
  if a.config_json:
    with open(a.config_json) as f:
      cfg, name = ModelConfig.from_hf_dict(json.load(f), a.config_json), a.config_json
  else:
    cfg, name = ModelConfig(**MODELS[a.model]), a.model
  devices = jax.devices()[: a.devices] if a.devices else jax.devices()
  mesh = make_mesh(MeshConfig(), cfg.num_experts, devices)
  stages = a.stages.split(",")
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
  result = plan(cfg, mesh, PlanSettings(decode_batch=a.decode_batch, accf_batch=a.accf_batch), stages)
  result["mesh"] = dict(mesh.shape)
  result["backend"] = jax.default_backend()
  print(table(name, result, len(devices), a.device_gb))
  if a.out:
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
