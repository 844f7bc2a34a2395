"""Expert-parallel quantization and decode on several devices against one device, same process.

  python -m experiments.bench_expert_parallel --model_path=DIR [--devices=2] [--out=DIR]

1. K-means only (no ACCF), then the default CodeQuant config (scope full, W4A4, Adam ACCF): each
   on one device and on a mesh whose `expert` axis spans `--devices` devices. Reports wall time,
   how many codes differ, the largest centroid difference, and the WikiText-2 perplexity of both.
2. Greedy decode (a 32-token prompt, `--new_tokens` new ones) at batch 1 and 16, full precision
   (bf16) and quantized, on one device and on the mesh: median of `--repeats` jitted calls.
Writes results.json and prints a table. On a CPU, run with
XLA_FLAGS=--xla_force_host_platform_device_count=2 to try it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import cqjax
from cqjax.codebook import CodebookWeight, codes_of
from cqjax.generate import generate
from cqjax.perplexity import perplexity
from cqjax.sharding import MeshConfig, make_mesh, shard_params
from cqjax.text_data import calibration_windows, eval_windows, read_text, tokenize

_is_cb = lambda x: isinstance(x, CodebookWeight)


def _agreement(a: cqjax.QuantizedModel, b: cqjax.QuantizedModel) -> dict:
  codes = differ = 0
  cent = 0.0
  for x, y in zip(jax.tree.leaves(a.params, is_leaf=_is_cb), jax.tree.leaves(b.params, is_leaf=_is_cb)):
    if _is_cb(x):
      cx, cy = np.asarray(codes_of(x)), np.asarray(codes_of(y))
      codes, differ = codes + cx.size, differ + int(np.sum(cx != cy))
      cent = max(cent, float(np.max(np.abs(np.asarray(x.centroids) - np.asarray(y.centroids)))))
  return {"codes": codes, "codes_differing": differ, "max_centroid_diff": cent}


def _decode_tps(model, params, batch: int, new_tokens: int, repeats: int) -> float:
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, model.config.vocab_size, (batch, 32)), jnp.int32)
  jax.block_until_ready(generate(model, params, prompt, new_tokens))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(generate(model, params, prompt, new_tokens))
    times.append(time.perf_counter() - t0)
  return batch * new_tokens / statistics.median(times)


def main():
  from experiments.configs import base  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model_path", required=True)
  p.add_argument("--devices", type=int, default=2)
  p.add_argument("--calib_samples", type=int, default=256)
  p.add_argument("--eval_windows", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="experiments/results/expert-parallel")
  a = p.parse_args()
  defaults = base.base_config()
  cfg, params = cqjax.load_params(a.model_path, jnp.float32, progress=False)
  tok = cqjax.load_tokenizer(a.model_path)
  windows = calibration_windows(defaults.calib_text, tok, a.calib_samples, defaults.calib_seqlen, 0)
  test = eval_windows(tokenize(tok, read_text(defaults.eval_texts.split(",")[0])[1]), 512)[: a.eval_windows]
  mesh = make_mesh(MeshConfig(), cfg.num_experts, jax.devices()[: a.devices])
  out = {"device": jax.devices()[0].device_kind, "devices": a.devices, "mesh": dict(mesh.shape),
         "model": os.path.basename(os.path.normpath(a.model_path)), "quantize": {}, "decode": []}
  print(f"{out['device']} x{a.devices}, mesh {dict(mesh.shape)}", flush=True)

  models = {}
  for name, qcfg in [("kmeans", cqjax.QuantizeConfig(rotation="hadamard", accf=None)),
                     ("codequant", cqjax.QuantizeConfig())]:
    row = {"config": json.loads(json.dumps(dataclasses.asdict(qcfg)))}
    for where, m in [("1_device", None), (f"{a.devices}_devices", mesh)]:
      t0 = time.perf_counter()
      q = cqjax.quantize(params, cfg, windows, qcfg, progress=False, mesh=m)
      jax.block_until_ready(jax.tree.leaves(q.params))
      row[f"seconds_{where}"] = time.perf_counter() - t0
      with jax.set_mesh(mesh) if m is not None else contextlib.nullcontext():
        row[f"perplexity_{where}"] = perplexity(q.module(), q.params, test, 8, progress=False)["perplexity"]
      models[(name, where)] = q
      print(name, where, f"{row[f'seconds_{where}']:.1f} s, ppl {row[f'perplexity_{where}']:.3f}", flush=True)
    row.update(_agreement(models[(name, "1_device")], models[(name, f"{a.devices}_devices")]))
    out["quantize"][name] = row
    print(name, {k: row[k] for k in ("codes", "codes_differing", "max_centroid_diff")}, flush=True)

  q = models[("codequant", "1_device")]
  fp = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  for kind, model, weights in [("bf16", cqjax.MoeCausalLM(cfg, jnp.bfloat16), fp),
                               ("w4a4", q.module(jnp.bfloat16), q.params)]:
    for batch in (1, 16):
      for devices, m in [(1, None), (a.devices, mesh)]:
        with jax.set_mesh(m) if m is not None else contextlib.nullcontext():
          w = shard_params(weights, m) if m is not None else weights
          tps = _decode_tps(model, w, batch, a.new_tokens, a.repeats)
        out["decode"].append({"weights": kind, "batch": batch, "devices": devices, "tokens_per_s": tps})
        print(f"decode {kind} batch {batch} on {devices}: {tps:.1f} tok/s", flush=True)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
