"""Counts what one decode step of the small reference architecture launches, from the compiled HLO
of the step (one token a row against a KV cache), bf16 against 4-bit codebooks under each kernel
setting (the settings of `bench_kernels --decode`):

  python -m experiments.count_decode_kernels [--batches=1,16] [--out=FILE.json]

A row counts the entry computation's instructions that run work on the device: fusions, custom
calls (by target: the codebook kernels, cuBLAS GEMMs, ...) and any other op outside a fusion.
Layout-only instructions (parameter, tuple, get-tuple-element, bitcast, constant) are not counted.
Why: at the small architecture's shapes the weights are a few MB and a decode step is bound by its
launches (BENCHMARKS.md: the 4-bit model decodes at 0.63-0.86x bf16), so the count says where a
quantized step adds work. Runs on any backend; the counts are the backend's own (a GPU's differ
from a CPU's).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re

import jax
import jax.numpy as jnp

from cqjax.config import ModelConfig
from cqjax.kmeans import rtn_quantize
from cqjax.model import MoeCausalLM, init_cache
from cqjax.quantize_weights import quantize_scope
from experiments.train_reference import SIZES

BITS = 4
_NO_WORK = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?\S+\s*=\s*.*?\s([a-z][a-z0-9-]*)\((.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def entry_work(hlo_text: str) -> collections.Counter:
  """Opcode (custom calls: 'custom-call:target') -> count over the ENTRY computation of a compiled
  module's text, layout-only instructions left out."""
  counts = collections.Counter()
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if in_entry and line.startswith("}"):
      break
    m = _INSTRUCTION.match(line) if in_entry else None
    if not m or m.group(1) in _NO_WORK:
      continue
    target = _TARGET.search(line)
    counts[f"custom-call:{target.group(1)}" if m.group(1) == "custom-call" and target else m.group(1)] += 1
  return counts


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,16", help="comma list of decode batches")
  ap.add_argument("--cache_len", type=int, default=96, help="KV cache length (the step writes position len - 1)")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  args = ap.parse_args()
  cfg = ModelConfig.from_hf_dict(SIZES["small"].hf_config())
  model = MoeCausalLM(cfg, jnp.bfloat16)
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  quant = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, BITS))
  quant = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, quant)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; one decode step, {cfg.num_layers} layers")
  rows = []
  for b in (int(v) for v in args.batches.split(",")):
    token = jnp.zeros((b, 1), jnp.int32)
    cache = init_cache(cfg, b, args.cache_len, jnp.bfloat16)
    for name, p, mode in (("bf16", params, "auto"), ("codebook_w4", quant, "auto"),
                          ("codebook_w4_cuda", quant, "cuda"), ("codebook_w4_int8", quant, "int8")):
      os.environ["CQJAX_KERNELS"] = mode  # read by the dispatcher while tracing: a fresh trace each
      jax.clear_caches()
      step = jax.jit(lambda p, token, cache: model.apply({"params": p}, token, cache=cache,
                                                         cache_index=args.cache_len - 1))
      counts = entry_work(step.lower(p, token, cache).compile().as_text())
      rows.append(dict(batch=b, setting=name, total=sum(counts.values()), counts=dict(counts)))
      top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
      print(f"batch={b:<3} {name:<17} {sum(counts.values()):5d} launches a step ({top})", flush=True)
    os.environ.pop("CQJAX_KERNELS")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
