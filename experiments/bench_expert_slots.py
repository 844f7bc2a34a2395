"""Times the grouped calls' expert slots: XLA's (cqjax.codebook.expert_slots) against the one-warp
CUDA kernel (cuda_kernels.expert_slots), on the GPU image after `python -m cuda_kernels.build`:

  python -m experiments.bench_expert_slots [--sets=64]

Each jitted call computes the slots of --sets different routings (random top-k, so XLA cannot share
one computation between them): a call of that many launches or kernel chains is bound by the GPU,
not by the host's dispatch, which a grouped bench call of 8 weights is at batch 1 (BENCHMARKS.md
session 36). Prints µs per slots computation, median of repeats, and the ratio; then the kernels
each computation launches and their time on the GPU, from a jax.profiler trace of one call
(experiments.device_trace), which tells the kernels' time from the cost of launching them.
"""
from __future__ import annotations

import argparse
import json

import jax

from cqjax import codebook
from cuda_kernels import expert_slots as ces
from experiments.bench_kernels import _per_call_us, host_floor_us, random_routing
from experiments.device_trace import traced_kernels

CASES = ((8, 2, 1), (8, 2, 16), (128, 8, 1), (128, 8, 16), (128, 8, 64))  # experts, top_k, batch


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sets", type=int, default=64, help="routings (slots computations) a jitted call")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  args = ap.parse_args()
  if not ces.available():
    raise SystemExit("bench_expert_slots: needs a CUDA GPU and the built library (python -m cuda_kernels.build)")
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.sets} routings a call")
  rows = []
  for experts, top_k, batch in CASES:
    key = jax.random.key(experts * 1000 + batch)
    sizes = [random_routing(jax.random.fold_in(key, i), batch, experts, top_k) for i in range(args.sets)]
    slots = min(experts, batch * top_k)
    row = dict(experts=experts, top_k=top_k, batch=batch, sets=args.sets,
               host_floor_us=host_floor_us((sizes,)))
    for name, fn in (("xla", codebook.expert_slots), ("cuda", ces.expert_slots)):
      call = jax.jit(lambda ss, fn=fn: [fn(s, slots) for s in ss])
      row[f"{name}_us"] = _per_call_us(call, (sizes,)) / args.sets
      kernels = traced_kernels(call, (sizes,))
      row[f"{name}_kernels"] = sum(n for n, _ in kernels.values()) / args.sets
      row[f"{name}_kernel_us"] = sum(us for _, us in kernels.values()) / args.sets
    rows.append(row)
    print(f"experts={experts:<4} top_k={top_k} batch={batch:<3} slots={slots:<4} xla {row['xla_us']:6.2f} us  "
          f"cuda {row['cuda_us']:6.2f} us ({row['xla_us'] / row['cuda_us']:4.1f}x; a call's host floor "
          f"{row['host_floor_us']:.0f} us); on the GPU (jax.profiler): xla {row['xla_kernels']:.1f} kernels "
          f"{row['xla_kernel_us']:.2f} us, cuda {row['cuda_kernels']:.1f} kernels {row['cuda_kernel_us']:.2f} us",
          flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
