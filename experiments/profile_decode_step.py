"""What a decode step of a decode architecture launches and where its time goes, bf16 against 4-bit
codebooks under each kernel setting (those of `bench_kernels --decode`, whose --decode_arch and
--decode_act_bits and --decode_act_scope are --arch, --act_bits and --act_scope here):

  python -m experiments.profile_decode_step [--arch=small] [--act_bits=0] [--act_scope=official] [--batches=1,16] [--trace_tokens=16] [--fused] [--out=FILE.json]
  PYTHONPATH=/tmp/cuda_plugin python -m experiments.profile_decode_step --compile_for=h200 --settings=codebook_w4

1. Launches: the entry computation of one compiled step (one token a row against a KV cache):
   fusions, custom calls by target (the codebook kernels, cuBLAS GEMMs, ...) and any other op
   outside a fusion; layout-only instructions (parameter, tuple, get-tuple-element, bitcast,
   constant) are not counted. Beside them, the longest chain of launches that each wait on the one
   before (data dependencies): XLA runs each of `generate`'s decode steps as one CUDA graph
   (BENCHMARKS.md session 39), whose independent kernels may overlap, so a step of small kernels
   is bound by the chain as well as by the count.
2. With --trace_tokens=T > 0: one greedy `generate` of T new tokens under `jax.profiler.trace`; the
   device's kernels from the trace (CUPTI's records: no ncu needed), summed by name, per new token
   (the 32-token prefill's kernels are spread over the T tokens), beside the call's wall time per
   token timed outside the trace. Their ratio is how busy the GPU is: near 1, the kernels bound
   the step; far below, launches and their gaps do (experiments.device_trace).
3. With --compile_for=SPEC, on a machine without a GPU: the step compiled by XLA's GPU pipeline
   for a compile-only device (experiments.compile_only_gpu; install line there), counted as in 1.
   The CUDA and int8 settings need --cuda_library=PATH (a library built by `python -m
   cuda_kernels.build`, which needs nvcc, not a GPU).

Why: at the small architecture's shapes the weights are a few MB, so decode is bound by launches,
not bytes: the 4-bit model decodes at 1.03x bf16 at batch 1 and 0.84x at batch 16, 0.98-0.99x
with fused projections (H200, BENCHMARKS.md session 41). This says which launches a quantized step
adds and which of its kernels cost. Runs on any backend; the counts are the backend's own, and on
the CPU the trace holds no device kernels.
"""
from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import jax.numpy as jnp

from cqjax.generate import generate
from cqjax.lut_matmul import kernels_mode
from cqjax.model import init_cache
from experiments import compile_only_gpu
from experiments.bench_kernels import (DECODE_ARCHS, DECODE_SETTINGS_HELP, _per_call_us, decode_act, decode_models,
                                      decode_params, decode_settings, int_list)
from experiments.device_trace import print_kernels, traced_kernels

PROMPT_LEN = 32
_NO_WORK = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?\S+\s*=\s*.*?\s([a-z][a-z0-9-]*)\((.*)$")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def entry_work(hlo_text: str) -> collections.Counter:
  """Opcode (custom calls: 'custom-call:target') -> count over the ENTRY computation of a compiled
  module's text, layout-only instructions left out."""
  return collections.Counter(op for _, op, _ in _entry_instructions(hlo_text) if op not in _NO_WORK)


def _entry_instructions(hlo_text: str):
  """(name, opcode or 'custom-call:target', operand names) of each ENTRY instruction of a compiled module's text."""
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      in_entry = True
      continue
    if in_entry and line.startswith("}"):
      return
    m = _INSTRUCTION.match(line) if in_entry else None
    if m:
      target = _TARGET.search(line)
      op = f"custom-call:{target.group(1)}" if m.group(1) == "custom-call" and target else m.group(1)
      yield line.split("=", 1)[0].replace("ROOT", "").strip(), op, re.findall(r"%[\w.\-]+", m.group(2).split(")", 1)[0])


def longest_chain(hlo_text: str) -> int:
  """Launches on the longest data-dependent chain of the ENTRY computation (layout-only
  instructions pass their operands' chains on without adding a launch)."""
  depth = {}
  for name, op, operands in _entry_instructions(hlo_text):
    depth[name] = max((depth.get(o, 0) for o in operands), default=0) + (op not in _NO_WORK)
  return max(depth.values(), default=0)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--arch", default="small", choices=DECODE_ARCHS, help="the decode architecture (bench_kernels --decode_arch)")
  ap.add_argument("--act_bits", type=int, default=0, help="the 4-bit model's activations quantized to these bits "
                  "(W4A4 at 4; 0: not quantized); bf16 stays unquantized")
  ap.add_argument("--act_scope", default="official", choices=("official", "full"),
                  help="with --act_bits: the quantized inputs (full: o_proj's and the down projections' too)")
  ap.add_argument("--batches", type=int_list, default="1,16", help="comma list of decode batches")
  ap.add_argument("--cache_len", type=int, default=96, help="KV cache length of the counted step")
  ap.add_argument("--trace_tokens", type=int, default=0, help="trace a generate of this many new tokens (0: no trace)")
  ap.add_argument("--fused", action="store_true", help="q/k/v and gate/up fused in both models (cqjax.fuse_projections)")
  ap.add_argument("--settings", default="all", help=DECODE_SETTINGS_HELP)
  ap.add_argument("--top", type=int, default=8, help="kernels printed a setting, most time first")
  ap.add_argument("--compile_for", default="", help="count a step compiled for this GPU spec without a GPU "
                  "(experiments.compile_only_gpu: a name in experiments/assets/gpu_specs or a path)")
  ap.add_argument("--cuda_library", default="", help="with --compile_for: the CUDA kernels' library to compile "
                  "the cuda and int8 settings with (python -m cuda_kernels.build)")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  args = ap.parse_args()
  settings = decode_settings(args.settings, args.act_bits)
  target = None
  if args.compile_for:
    if args.trace_tokens:
      raise SystemExit("--compile_for compiles without a GPU: a trace (--trace_tokens) needs one")
    cuda_only = [name for name, _, mode in settings if mode in ("cuda", "int8")]
    if cuda_only and not args.cuda_library:
      raise SystemExit(f"--compile_for compiles {', '.join(cuda_only)} with the CUDA kernels' library: give "
                       "--cuda_library=PATH (python -m cuda_kernels.build), or choose --settings=codebook_w4")
    (target,) = compile_only_gpu.compile_only_devices(args.compile_for)  # before the backends start
    if args.cuda_library:
      compile_only_gpu.use_cuda_library(args.cuda_library)
  act = decode_act(args.act_bits, args.act_scope)
  cfg, model, q_model, params, quant = decode_models(args.arch, args.fused, act, abstract=target is not None)
  given = decode_params(settings, params, quant, act)
  device = target or jax.devices()[0]
  print(f"device: {device.device_kind}{' (compile only)' if target else ''}, jax {jax.__version__}; "
        f"{args.arch} architecture, {cfg.num_layers} layers{'' if act is None else f', W4A{act.bits}'}")
  rows = []
  for b in args.batches:
    token = jnp.zeros((b, 1), jnp.int32)
    cache = init_cache(cfg, b, args.cache_len, jnp.bfloat16)
    prompt = jax.random.randint(jax.random.key(b), (b, PROMPT_LEN), 0, cfg.vocab_size)
    for name, four_bit, mode in settings:
      p, m = given[name], (q_model if four_bit else model)
      with kernels_mode(mode, backend="gpu" if target else None):
        step = lambda p, token, cache, m=m: m.apply({"params": p}, token, cache=cache, cache_index=args.cache_len - 1)
        compiled = (compile_only_gpu.compile_for(step, (p, token, cache), target) if target
                    else jax.jit(step).lower(p, token, cache).compile())
        text = compiled.as_text()
        counts = entry_work(text)
        row = dict(arch=args.arch, act_bits=args.act_bits or None, act_scope=act and act.scope, batch=b, setting=name, fused=args.fused,
                   launches=sum(counts.values()), chain=longest_chain(text), counts=dict(counts),
                   compiled_for=args.compile_for or None)
        top = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
        print(f"batch={b:<3} {name:<17} {row['launches']:5d} launches a step, {row['chain']:4d} in the longest chain "
              f"({top})", flush=True)
        if args.trace_tokens:
          run = jax.jit(lambda p, prompt, m=m: generate(m, p, prompt, args.trace_tokens))
          kernels = traced_kernels(run, (p, prompt))
          row["wall_us_per_token"] = _per_call_us(run, (p, prompt), repeats=5, calls=3) / args.trace_tokens
          row["kernels_per_token"] = {k: [n / args.trace_tokens, us / args.trace_tokens] for k, (n, us) in kernels.items()}
          print_kernels(kernels, args.trace_tokens, "a token", row["wall_us_per_token"], args.top)
      rows.append(row)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
