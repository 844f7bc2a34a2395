"""Runs a GPU codebook matmul once per tuning, for a profiler to read (ncu on the GPU image):

  ncu --clock-control none -k 'regex:(lut_matmul|xs)_kernel' --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 -m experiments.profile_cuda_lut --shape=4096x14336 --ms=1,16 --tunings=3/4/1/2/1,4/4/1/2/1

A tuning is layout/kgroups/mt/nt/splits[/stage_x 0 or 1] (cuda_kernels.lut_matmul.CudaTuning, whose defaults fill the rest); "default" is the
default tuning at that shape and M. With --int8 the kernel is the int8 one (-k 'regex:(int8|wg8)_kernel') and a
tuning is warps/mt[p] or warps/mtw[splits] (cuda_kernels.lut_matmul_int8.Int8Tuning.parse, as bench_kernels
spells them: 8/2p, 4/16w2). With --pallas it is the Pallas kernel (-k regex:cqjax_) and a tuning is
block_m/block_n/block_k/k_splits/num_warps/num_stages (pallas_kernels.lut_matmul.LutTuning). With
--bitplane it is the bit-plane kernel (-k regex:bitplane_kernel) and a tuning is its output columns a warp
(cuda_kernels.lut_matmul_bitplane's per_warp; "default" lets the kernel choose), --laid_out gives it
the weights laid out ahead (bitplane_layout), and --affine takes its affine numerics (x fake-quantized
by the default ActQuantConfig, 4 bits a token).
--experts=E --top_k=K instead runs the grouped kernel over E stacked experts at decode batches --ms
(random top-K routing), two weights in one jitted call as bench_kernels times them, so that a
profiler without a kernel filter also sees what XLA runs around the kernel (quantizing x, the
expert slots); --trace=N also prints each kernel's µs a call from jax.profiler's trace of N calls
(experiments.device_trace). Launches come in the order printed.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from cqjax.act_quant import ActQuantConfig
from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError
from cuda_kernels import lut_matmul as ck
from cuda_kernels import lut_matmul_bitplane as ckb
from cuda_kernels import lut_matmul_int8 as ck8
from pallas_kernels import lut_matmul as pk
from experiments.bench_kernels import random_routing
from experiments.device_trace import print_kernels, traced_kernels


def parse_int8_tuning(spec: str, m: int, k: int, n: int, slots: int = 0) -> ck8.Int8Tuning:
  """slots: a grouped call's launch slots (0: one weight), whose default is the grouped one."""
  if spec == "default":
    return ck8.default_tuning(m, k, n, grouped=slots > 0)
  try:
    return ck8.Int8Tuning.parse(spec)
  except CqjaxError as e:
    raise SystemExit(f"profile_cuda_lut: {e}") from None


def parse_pallas_tuning(spec: str, m: int, k: int, n: int, experts: int = 0) -> pk.LutTuning:
  """m: rows of x; experts: a grouped call's stacked experts (0: one weight)."""
  if spec == "default":
    return pk.default_grouped_tuning(m, experts, k, n, 4) if experts else pk.default_tuning(m, k, n, 4)
  try:
    return pk.LutTuning(*(int(v) for v in spec.split("/")))
  except (ValueError, TypeError, CqjaxError) as e:
    raise SystemExit(f"profile_cuda_lut: tuning {spec!r} is not block_m/block_n/block_k/k_splits/num_warps/num_stages: "
                     f"{e}") from None


def parse_tuning(spec: str, m: int, k: int, n: int, slots: int = 0) -> ck.CudaTuning:
  if spec == "default":
    return ck.default_tuning(m, k, n, max(slots, 1))
  try:
    layout, kgroups, mt, nt, splits, *stage = (int(v) for v in spec.split("/"))
  except ValueError:
    raise SystemExit(f"profile_cuda_lut: tuning {spec!r} is not layout/kgroups/mt/nt/splits[/stage_x]") from None
  staging = {"stage_x": bool(stage[0])} if stage else {}  # else CudaTuning's default
  return ck.CudaTuning(mt=mt, nt=nt, splits=splits, layout=layout, kgroups=kgroups, **staging)


def kernel(args, grouped: bool = False):
  """The kernel the flags pick (--pallas, --int8, --bitplane, else the bf16 CUDA one); grouped: its
  grouped form. Called as run(x, packed, centroids, 4, [group_sizes,] tuning=...)."""
  if args.bitplane:
    run = ckb.grouped_lut_matmul_bitplane if grouped else ckb.lut_matmul_bitplane
    act = ActQuantConfig() if args.affine else None
    return lambda *operands, tuning: run(*operands, per_warp=tuning, act=act)  # tuning: columns a warp (`tuning`)
  if args.pallas:
    return pk.grouped_lut_matmul if grouped else pk.lut_matmul
  if args.int8:
    return ck8.grouped_lut_matmul_int8 if grouped else ck8.lut_matmul_int8
  return ck.grouped_lut_matmul if grouped else ck.lut_matmul


def tuning(args, spec: str, rows: int, k: int, n: int, experts: int = 0):
  """spec as the flags' kernel spells it, for `rows` rows of x over `experts` stacked weights (0: one
  weight); the CUDA kernels' defaults follow the rows and count of a grouped call's launch slots.
  The bit-plane kernel's is its output columns a warp (default: 0, the kernel's choice)."""
  if args.bitplane:
    if spec == "default":
      return 0
    if not spec.isdigit() or not 1 <= int(spec) <= ckb.MAX_PER_WARP:
      raise SystemExit(f"profile_cuda_lut: a bit-plane tuning is its output columns a warp, 1 to {ckb.MAX_PER_WARP}; "
                       f"got {spec!r}")
    return int(spec)
  if args.pallas:
    return parse_pallas_tuning(spec, rows, k, n, experts)
  parse = parse_int8_tuning if args.int8 else parse_tuning
  if not experts:
    return parse(spec, rows, k, n)
  return parse(spec, ck.rows_per_slot(rows, experts), k, n, min(rows, experts))


def operands(args, w: CodebookWeight) -> tuple:
  """The kernel's (packed, centroids) of w: as stored, or laid out ahead (--laid_out)."""
  if not args.laid_out:
    return w.packed, w.centroids
  return jax.block_until_ready(ckb.bitplane_layout(w.packed, w.centroids, args.affine))


def profile_grouped(args, k, n, kp, kc, kx):
  e, run = args.experts, kernel(args, grouped=True)
  ws = [CodebookWeight(jax.random.randint(jax.random.fold_in(kp, i), (e, n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8),
                       jax.random.normal(jax.random.fold_in(kc, i), (e, n, 1, 16), jnp.bfloat16), 4, k) for i in range(2)]
  ws = [operands(args, w) for w in ws]
  for b in (int(v) for v in args.ms.split(",")):
    gs = random_routing(jax.random.fold_in(kx, b), b, e, args.top_k)
    x = jax.random.normal(jax.random.fold_in(kx, 1000 + b), (b * args.top_k, k), jnp.bfloat16)
    for spec in args.tunings.split(","):
      t = tuning(args, spec, x.shape[0], k, n, e)
      f = jax.jit(lambda x, ws, gs, t=t: [run(x, *w, 4, gs, tuning=t) for w in ws])
      jax.block_until_ready(f(x, ws, gs))  # compiled and run once before the launches printed
      print(f"launch: {e} experts {k}x{n} batch={b} top-{args.top_k} ({int(jnp.sum(gs > 0))} active) {t}", flush=True)
      jax.block_until_ready(f(x, ws, gs))
      if args.trace:
        print_kernels(traced_kernels(f, (x, ws, gs), calls=args.trace), args.trace, "a call of 2 weights", top=12)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shape", default="4096x14336", help="d_in x d_out")
  ap.add_argument("--ms", default="1,16", help="comma list of rows of x")
  ap.add_argument("--tunings", default="default", help="comma list of layout/kgroups/mt/nt/splits[/stage_x] or default")
  which = ap.add_mutually_exclusive_group()  # one kernel a run
  which.add_argument("--int8", action="store_true", help="the int8 kernel; tunings are warps/mt[p], or warps/mtw[splits] for its wgmma kernel")
  which.add_argument("--bitplane", action="store_true", help="the bit-plane kernel (int8 numerics); tunings are "
                     "its output columns a warp")
  which.add_argument("--pallas", action="store_true", help="the Pallas kernel; tunings are block_m/block_n/block_k/"
                     "k_splits/num_warps/num_stages")
  ap.add_argument("--laid_out", action="store_true", help="--bitplane on weights laid out ahead (bitplane_layout)")
  ap.add_argument("--affine", action="store_true", help="--bitplane with the affine numerics (x fake-quantized to "
                  "4 bits a token)")
  ap.add_argument("--experts", type=int, default=0, help="grouped: this many stacked experts (0: one weight)")
  ap.add_argument("--top_k", type=int, default=2, help="grouped: experts a token")
  ap.add_argument("--trace", type=int, default=0, help="grouped: also trace this many calls under jax.profiler and "
                  "print their device kernels a call (no ncu needed)")
  args = ap.parse_args()
  if (args.laid_out or args.affine) and not args.bitplane:
    raise SystemExit("profile_cuda_lut: --laid_out and --affine are the bit-plane kernel's; give --bitplane")
  if args.pallas and jax.default_backend() != "gpu":
    raise SystemExit("profile_cuda_lut: --pallas profiles the compiled Pallas kernel; this host has no GPU")
  built = ckb.available() if args.bitplane else ck8.available() if args.int8 else ck.available()
  if not args.pallas and not built:
    raise SystemExit("profile_cuda_lut: the CUDA kernel library is not available, or built before the kernel asked "
                     "for (python -m cuda_kernels.build)")
  if args.trace and not args.experts:
    raise SystemExit("profile_cuda_lut: --trace profiles grouped calls; give --experts=E")
  k, n = (int(v) for v in args.shape.split("x"))
  kp, kc, kx = jax.random.split(jax.random.key(0), 3)
  if args.experts:
    return profile_grouped(args, k, n, kp, kc, kx)
  packed = jax.random.randint(kp, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
  w = CodebookWeight(packed, jax.random.normal(kc, (n, 1, 16), jnp.bfloat16), 4, k)
  run, ops = kernel(args), operands(args, w)
  for m in (int(v) for v in args.ms.split(",")):
    x = jax.random.normal(jax.random.fold_in(kx, m), (m, k), jnp.bfloat16)
    for spec in args.tunings.split(","):
      t = tuning(args, spec, m, k, n)
      print(f"launch: {k}x{n} M={m} {t}", flush=True)
      jax.block_until_ready(run(x, *ops, 4, tuning=t))


if __name__ == "__main__":
  main()
