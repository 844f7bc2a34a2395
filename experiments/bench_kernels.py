"""GPU benchmark of the codebook matmuls (pallas_kernels/, cuda_kernels/) against XLA in the same run.

  python -m experiments.bench_kernels [--quick] [--sweep] [--grouped_sweep] [--decode] [--single=...] [--grouped=...]
      [--kernels=pallas,cuda,int8,bitplane,bitplane_laid_out,affine,affine_laid_out,mosaic] [--cuda_sweep [--cuda_layouts=7,5]] [--int8_sweep | --int8_tunings=8/2p,4/16w2]
      [--out=FILE] [--plot=PNG]
  python -m experiments.bench_kernels --replot=FILE --plot=PNG   # the figure of a saved run

Single weight: Mixtral-8x7B expert (4096->14336, 14336->4096), Qwen3-30B-A3B expert (2048->768,
768->2048), attention 4096x4096; M in 1..128. Grouped: 8 experts top-2 (Mixtral shapes) and 128
experts top-8 (Qwen3 shapes) at decode batch 1..64, random routing. Baselines: XLA bf16 `dot` /
`ragged_dot` on dense weights, and XLA's own unpack + gather + dot of the same codes (the jnp
reference). Every timing is one jitted call over `sets` distinct weights (at least 8, and enough to
read twice the 50 MB L2; grouped: the experts active at the smallest batch), issued `calls` times
back to back and synchronised once (so host dispatch overlaps the GPU), median of `repeats` such
batches, reported per weight; a grouped row also records the host's floor for a call over the same
arguments (a call timed near it is bound by dispatch, not the GPU). GB/s counts the codes and codebooks
read once; the device copy rate (read + write) is measured in the same run. --sweep tries block
shapes on the Mixtral shapes, --grouped_sweep at each grouped shape and batch; --cuda_sweep tries the CUDA kernel's tunings at every single-weight
shape and M (its candidates recorded beside the default; --int8_sweep the same for every
Int8Tuning); kernel int8 is the CUDA kernel with int8 numerics (cuda_kernels/lut_matmul_int8.py: error against its own
reference, which should be float32 rounding, and against the float product), kernel bitplane the same
numerics on binary tensor cores (cuda_kernels/lut_matmul_bitplane.py), bitplane_laid_out that kernel on weights laid
out ahead (bitplane_layout: codes in bit-planes, codebooks as alpha), affine and affine_laid_out the
same kernel with the W4A4 model's affine numerics (x fake-quantized to 4 bits per token inside the
timed call; error against fake_quant's float32 x times the float weight); --decode times greedy decoding of the small reference model's
architecture (--decode_arch=qwen3-layers: 4 layers of Qwen3-30B-A3B's shapes; mixtral-layers: 2 of
Mixtral-8x7B's), bf16 vs 4-bit codebooks (--decode_act_bits=4: W4A4, activations quantized too).
--plot draws each kernel's speedup against M and the decode batch, and a --decode run's tokens/s against
the batch (experiments.plots.plot_kernel_speedups).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.act_quant import ActQuantConfig, fake_quant
from cqjax.codebook import CodebookWeight
from cqjax.errors import CqjaxError
from cqjax.lut_matmul import (grouped_lut_matmul_int8_reference, grouped_lut_matmul_reference, kernels_mode,
                              lut_matmul_int8_reference, lut_matmul_reference)
from cuda_kernels import lut_matmul as ck
from experiments.plots import plot_kernel_speedups
from cuda_kernels import lut_matmul_bitplane as kb
from cuda_kernels import lut_matmul_int8 as ck8
from pallas_kernels import lut_matmul as pk
from pallas_kernels import lut_matmul_mgpu as mgk

BITS = 4


def _per_call_us(fn, args, repeats=7, calls=20) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls * 1e6)
  return statistics.median(times)


def host_floor_us(args) -> float:
  """What dispatching one jitted call over these arguments (any pytree) costs the host, timed as
  _per_call_us times the calls (a call that does next to nothing on the GPU): a call timed near it
  is bound by the host's dispatch, not by the GPU."""
  return _per_call_us(jax.jit(lambda *a: jax.tree.leaves(a)[0].ravel()[:1] + 1), args)


def copy_bandwidth_gbs() -> float:
  a = jax.random.normal(jax.random.key(0), (256 << 20,), jnp.float32)  # 1 GiB
  us = _per_call_us(jax.jit(lambda a: a * 2), (a,), calls=10)
  return 2 * a.nbytes / us / 1e3


def _codebook(key, lead, k, n) -> CodebookWeight:
  kp, kc = jax.random.split(key)
  packed = jax.random.randint(kp, (*lead, n, k * BITS // 8), 0, 256, jnp.int32).astype(jnp.uint8)
  cent = jax.random.normal(kc, (*lead, n, 1, 2 ** BITS), jnp.float32).astype(jnp.bfloat16)
  return CodebookWeight(packed, cent, BITS, k)


def _code_bytes(w: CodebookWeight) -> int:
  return w.packed.nbytes + w.centroids.nbytes


def _rel_err(got, ref) -> float:
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def deeper_pipelines(base: pk.LutTuning) -> list[pk.LutTuning]:
  """A tensor-core decode tuning at 3 and 4 pipeline stages: its blocks hold 130-210 registers a
  thread, so few warps hide the load latency, and Triton stages the loads that feed its dots. None
  for one-row blocks: their loads feed no dot, and every stage count compiles to the same K loop
  (offline, Triton 3.6, sm_90; timed within 3 % of each other on an H100, BENCHMARKS.md session 48)."""
  return [dataclasses.replace(base, num_stages=stages) for stages in (3, 4)] if base.dots else []


def sweep_candidates(m: int, k: int, n: int) -> list[pk.LutTuning]:
  """The default and its neighbours: column block, K step, warps, how far K is split, pipeline
  depth (deeper_pipelines); for prefill rows, wider tiles, more warps and deeper pipelines for
  the tensor cores; for 2-15 rows, FMA blocks of them all too; for one row, 16-row tensor-core
  blocks too."""
  base = pk.default_tuning(m, k, n, BITS)
  out = [base]
  if base.block_m >= 64:
    # Every program reads all m rows of x: wider column blocks cut that L2 traffic (at M = 128 and
    # 64 columns a program, 224 programs read x's 1 MB each: 8x the code bytes). block_k 512 and
    # 3 stages at 128+ columns exceed the 227 KB of shared memory (first sweep).
    for bn, warps, stages in ((64, 8, 3), (128, 8, 2), (256, 8, 2)):
      for splits in (1, 2, 4, 8):
        out.append(dataclasses.replace(base, block_n=bn, block_k=256, num_warps=warps, num_stages=stages,
                                       k_splits=splits))
    return list(dict.fromkeys(out))
  for bn in (16, 32, 64):
    for bk in (512, 1024, 2048):
      for warps in (4, 8):
        programs = -(-n // bn) * -(-m // base.block_m)
        splits = max(1, min(-(-k // bk), -(-2 * 132 // programs)))
        out.append(dataclasses.replace(base, block_n=bn, block_k=bk, num_warps=warps, k_splits=splits))
  for splits in (1, 2, 4, 8, 16):
    out.append(dataclasses.replace(base, k_splits=splits))
  out += deeper_pipelines(base)
  if 1 < m < 16:  # FMA blocks of all m rows: one decode for every row
    one = pk.default_tuning(1, k, n, BITS)
    out += [dataclasses.replace(one, block_m=pk.pow2_at_least(m), block_n=bn) for bn in (16, 32)]
  if m == 1:  # the tensor-core blocks of 2-16 rows, which decode with fewer instructions a code
    dot = pk.default_tuning(16, k, n, BITS)
    out += [dataclasses.replace(dot, k_splits=splits) for splits in (dot.k_splits, 2 * dot.k_splits)]
  return list(dict.fromkeys(out))


def grouped_sweep_candidates(t: int, experts: int, k: int, n: int) -> list[pk.LutTuning]:
  """The grouped default for t rows over `experts` weights, then FMA blocks of one row (a decode
  a row of each slot), of 2 and 4 rows (a decode for them all), and 16-row tensor-core blocks,
  over column block and K splits; the default with deeper pipelines (deeper_pipelines)."""
  base = pk.default_grouped_tuning(t, experts, k, n, BITS)
  one = pk.default_tuning(1, k, n, BITS, experts=min(t, experts))
  dot = pk.default_tuning(16, k, n, BITS, experts=min(t, experts))
  out = [base]
  for bn in (16, 32):
    out += [dataclasses.replace(one, block_n=bn, k_splits=splits) for splits in (1, 2, 4)]
  for bm in (2, 4):  # FMA blocks of a few rows: one decode for them all
    out += [dataclasses.replace(one, block_m=bm, k_splits=splits) for splits in (1, 2)]
  for bn, warps in ((32, 4), (64, 4), (128, 8)):
    out += [dataclasses.replace(dot, block_n=bn, num_warps=warps, k_splits=splits) for splits in (1, 2, 4)]
  out += deeper_pipelines(base)
  return list(dict.fromkeys(c for c in out if c is base or c.k_splits <= -(-k // c.block_k)))  # no split without steps


def sets_beyond_l2(bytes_per_set: int, sets: int, l2_mb: float = 50.0) -> int:
  """At least `sets`, and enough that one pass reads twice the H100's 50 MB L2 (a smaller
  working set would time L2 hits, not memory)."""
  return max(sets, min(256, -(-int(2 * l2_mb * 2**20) // bytes_per_set)))


def _expert_bytes(k: int, n: int) -> int:
  """What one expert of _codebook's weights holds: its codes and bf16 codebooks."""
  return n * (k * BITS // 8 + 2 * 2**BITS)


def grouped_sets(routings, k: int, n: int, sets: int) -> int:
  """sets_beyond_l2 for grouped calls, counting the experts a call reads (codes and bf16 codebooks)
  at its sparsest routing (group sizes): 8 sets of Qwen3's 8 experts active at batch 1 (52 MB)
  would be read partly from L2, and their calls, too short for the host to keep ahead of, time its
  dispatch (BENCHMARKS.md session 36)."""
  active = min(int(jnp.sum(g > 0)) for g in routings)
  return sets_beyond_l2(active * _expert_bytes(k, n), sets)


def cuda_candidates(m: int, k: int, n: int, layouts=None) -> list[ck.CudaTuning]:
  """The default first, then every built decode, column width and row tiling with K split 1..8
  ways (x staged in shared memory; also read from global memory for the two 64-column families),
  layout 7 at each of its warp counts (sums in long groups or every 4 tiles), layout 8 (Hopper
  prefill) at one, two or four warpgroups a block and K split 1 to 8 ways, and the no-decode
  probe at the default's split and unsplit (what loads and mma cost alone). layouts: only these
  decodes after the default (None: all)."""
  base = ck.default_tuning(m, k, n)
  out = [base]
  for layout, kgroups, mt, nt in sorted(ck.KERNELS):
    if layouts is not None and layout not in layouts:
      continue
    if layout == 7:  # K split by its warps; 8-row tiles of x
      if (mt == 1) == (m <= 8):  # sums in long groups (sum_once) and every 4 tiles
        out += [ck.CudaTuning(mt=mt, layout=7, kgroups=kgroups, sum_once=o) for o in (True, False)]
      continue
    if layout == 8:  # Hopper prefill: 64 mt rows a pass, 32 nt columns a block, K split 1 to 8 ways
      if mt == 1 or m > 64:
        out += [ck.CudaTuning(mt=mt, nt=nt, layout=8, kgroups=1, splits=s) for s in (1, 2, 4, 8) if s <= max(1, k // 64)]
      continue
    if layout == 2 or (mt > 1 and m <= 16 * (mt // 2)):  # more row tiles than rows: same work
      continue
    for splits in (1, 2, 3, 4, 6, 8) if kgroups == 4 and layout >= 4 else (1, 2, 4, 8):
      for stage in (True, False) if (kgroups, mt, nt) == (4, 1, 2) else (True,):
        if splits <= max(1, k // 128):
          out.append(ck.CudaTuning(mt=mt, nt=nt, splits=splits, layout=layout, kgroups=kgroups, stage_x=stage))
  for splits in dict.fromkeys((base.k_splits(k), 1)) if layouts is None or 2 in layouts else ():
    for stage in (True, False):
      out.append(ck.CudaTuning(mt=1, nt=2, splits=splits, layout=2, kgroups=4, stage_x=stage))
  return list(dict.fromkeys(out))


def _time_tunings(matmul, x, weights, tunings, sets, repeats, *extra):
  """(µs per weight, tuning) of each tuning that runs, in order; one that fails is reported.
  extra: matmul's arguments after bits (group sizes)."""
  res = []
  for t in tunings:
    f = jax.jit(lambda x, ws, *extra, t=t: [matmul(x, w.packed, w.centroids, BITS, *extra, tuning=t) for w in ws])
    try:
      res.append((_per_call_us(f, (x, weights, *extra), repeats=repeats) / sets, t))
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {x.shape[1]}x{weights[0].packed.shape[-2]} M={x.shape[0]} {t}: failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}")
  if not res:
    raise SystemExit(f"bench_kernels: every tuning failed at {x.shape[1]}x{weights[0].packed.shape[-2]} M={x.shape[0]}")
  return res


# The bit-plane kernel's kinds: (weights laid out ahead, its act: None for int8 numerics, else the
# W4A4 model's default activation quantizer, the affine numerics).
BITPLANE_KINDS = {"bitplane": (False, None), "bitplane_laid_out": (True, None),
                  "affine": (False, ActQuantConfig()), "affine_laid_out": (True, ActQuantConfig())}


def _bitplane_operands(weights, kind: str) -> list:
  """Each weight's (packed, centroids) for the bit-plane kernel: as stored, or laid out ahead by
  bitplane_layout (kinds *_laid_out; not timed)."""
  laid_out, act = BITPLANE_KINDS[kind]
  if not laid_out:
    return [(w.packed, w.centroids) for w in weights]
  return [jax.block_until_ready(kb.bitplane_layout(w.packed, w.centroids, act is not None)) for w in weights]


def _bitplane_own_reference(x, w, act, group_sizes=None):
  """The numerics the bit-plane kind computes: int8 (act None), or fake_quant's float32 x times the
  float weight."""
  if act is None:
    if group_sizes is None:
      return lut_matmul_int8_reference(x, w.packed, w.centroids, BITS)
    return grouped_lut_matmul_int8_reference(x, w.packed, w.centroids, BITS, group_sizes)
  xq = fake_quant(x.astype(jnp.float32), act)
  return lut_matmul_reference(xq, w) if group_sizes is None else grouped_lut_matmul_reference(xq, w, group_sizes)


def bench_single(k, n, ms, sets, sweep, bw, kernels=("pallas",), cuda_sweep=False, cuda_layouts=None,
                 int8_sweep=()):
  key = jax.random.key(k * 7 + n)
  sets = sets_beyond_l2(k * n * BITS // 8, sets)
  weights = [_codebook(jax.random.fold_in(key, i), (), k, n) for i in range(sets)]
  dense = [jax.random.normal(jax.random.fold_in(key, 100 + i), (k, n), jnp.bfloat16) for i in range(sets)]
  bytes_codes = _code_bytes(weights[0])
  bf16 = jax.jit(lambda x, ws: [x @ w for w in ws])
  gather = jax.jit(lambda x, ws: [lut_matmul_reference(x, w) for w in ws])
  bitplane_ops = {kind: _bitplane_operands(weights, kind) for kind in BITPLANE_KINDS if kind in kernels}
  rows = []
  for m in ms:
    x = jax.random.normal(jax.random.fold_in(key, 1000 + m), (m, k), jnp.bfloat16)
    t_bf16 = _per_call_us(bf16, (x, dense)) / sets
    t_gather = _per_call_us(gather, (x, weights)) / sets
    ref = lut_matmul_reference(x.astype(jnp.float32), weights[0])
    row = dict(k=k, n=n, m=m, bf16_us=t_bf16, xla_gather_us=t_gather, sets=sets,
               floor_us=bytes_codes / bw / 1e3)
    if "cuda" in kernels:
      w0 = weights[0]
      cerr = _rel_err(ck.lut_matmul(x, w0.packed, w0.centroids, BITS), ref)
      cands = cuda_candidates(m, k, n, cuda_layouts) if cuda_sweep else [ck.default_tuning(m, k, n)]
      res = _time_tunings(ck.lut_matmul, x, weights, cands, sets, 5 if cuda_sweep else 7)
      t_c = res[0][0]
      cbest, cbest_t = min((r for r in res if r[1].layout != 2), key=lambda r: r[0])  # the probe is wrong on purpose
      row.update(cuda_us=t_c, cuda_err=cerr, cuda_tuning=dataclasses.asdict(res[0][1]), cuda_best_us=cbest,
                 cuda_best_tuning=dataclasses.asdict(cbest_t), cuda_speedup_vs_bf16=t_bf16 / t_c,
                 cuda_pct_copy=100 * bytes_codes / t_c / 1e3 / bw)
      if cuda_sweep:
        row["cuda_candidates"] = [dict(us=us, **dataclasses.asdict(t)) for us, t in res]
      print(f"{k:>5}x{n:<5} M={m:<3} bf16 {t_bf16:7.1f}  cuda {t_c:6.1f} us ({t_bf16 / t_c:4.2f}x bf16, "
            f"{row['cuda_pct_copy']:3.0f}% of copy, {res[0][1]}; best {cbest:6.1f} {cbest_t}) err {cerr:.1e}", flush=True)
    if "int8" in kernels:
      w0 = weights[0]
      got = ck8.lut_matmul_int8(x, w0.packed, w0.centroids, BITS)
      res = _time_tunings(ck8.lut_matmul_int8, x, weights, _int8_candidates(m, k, n, int8_sweep), sets, 5 if int8_sweep else 7)
      t_i, (ibest, ibest_t) = res[0][0], min(res, key=lambda r: r[0])
      row.update(int8_us=t_i, int8_err_own=_rel_err(got, lut_matmul_int8_reference(x, w0.packed, w0.centroids, BITS)),
                 int8_err_float=_rel_err(got, ref), int8_tuning=dataclasses.asdict(res[0][1]), int8_best_us=ibest,
                 int8_best_tuning=dataclasses.asdict(ibest_t), int8_speedup_vs_bf16=t_bf16 / t_i)
      if int8_sweep:
        row["int8_candidates"] = [dict(us=us, **dataclasses.asdict(t)) for us, t in res]
        print(f"  int8 tunings: " + ", ".join(f"{t.spec} {us:.1f}" for us, t in res))
      print(f"{k:>5}x{n:<5} M={m:<3} bf16 {t_bf16:7.1f}  int8 {t_i:6.1f} us ({t_bf16 / t_i:4.2f}x bf16, {res[0][1]}; "
            f"best {ibest:6.1f} {ibest_t}) err own {row['int8_err_own']:.1e} float {row['int8_err_float']:.1e}",
            flush=True)
    for kind, operands in bitplane_ops.items():
      act = BITPLANE_KINDS[kind][1]
      got = kb.lut_matmul_bitplane(x, *operands[0], BITS, act=act)
      bitplane = jax.jit(lambda x, ws, act=act: [kb.lut_matmul_bitplane(x, p, c, BITS, act=act) for p, c in ws])
      t_p = _per_call_us(bitplane, (x, operands)) / sets
      row.update({f"{kind}_us": t_p, f"{kind}_speedup_vs_bf16": t_bf16 / t_p,
                  f"{kind}_pct_copy": 100 * bytes_codes / t_p / 1e3 / bw,
                  f"{kind}_err_own": _rel_err(got, _bitplane_own_reference(x, weights[0], act))})
      print(f"{k:>5}x{n:<5} M={m:<3} bf16 {t_bf16:7.1f}  {kind} {t_p:6.1f} us ({t_bf16 / t_p:4.2f}x bf16, "
            f"{row[f'{kind}_pct_copy']:3.0f}% of copy) err own {row[f'{kind}_err_own']:.1e}", flush=True)
    if "mosaic" in kernels:
      got = mgk.lut_matmul(x, weights[0].packed, weights[0].centroids, BITS)
      t_m = _per_call_us(jax.jit(lambda x, ws: [mgk.lut_matmul(x, w.packed, w.centroids, BITS) for w in ws]),
                         (x, weights)) / sets
      row.update(mosaic_us=t_m, mosaic_err=_rel_err(got, ref), mosaic_speedup_vs_bf16=t_bf16 / t_m)
      print(f"{k:>5}x{n:<5} M={m:<3} bf16 {t_bf16:7.1f}  mosaic {t_m:6.1f} us ({t_bf16 / t_m:4.2f}x bf16) "
            f"err {row['mosaic_err']:.1e}", flush=True)
    if "pallas" not in kernels:
      rows.append(row)
      continue
    err = _rel_err(pk.lut_matmul(x, weights[0].packed, weights[0].centroids, BITS), ref)
    tunings = sweep_candidates(m, k, n) if sweep else [pk.default_tuning(m, k, n, BITS)]
    results = _time_tunings(pk.lut_matmul, x, weights, tunings, sets, 5 if sweep else 7)
    t_default = results[0][0]  # the default tuning comes first
    best, best_t = min(results, key=lambda r: r[0])
    row.update(kernel_us=t_default, best_us=best, best_tuning=dataclasses.asdict(best_t), rel_err=err,
               gbs=bytes_codes / t_default / 1e3, pct_copy=100 * bytes_codes / t_default / 1e3 / bw,
               speedup_vs_bf16=t_bf16 / t_default)
    if sweep:
      row["candidates"] = [dict(us=us, **dataclasses.asdict(t)) for us, t in results]
    rows.append(row)
    print(f"{k:>5}x{n:<5} M={m:<3} sets={sets} bf16 {t_bf16:7.1f}  xla-gather {t_gather:7.1f}  kernel {t_default:6.1f} us "
          f"({row['speedup_vs_bf16']:4.2f}x bf16, {row['gbs']:5.0f} GB/s = {row['pct_copy']:3.0f}% of copy; "
          f"best {best:6.1f} {best_t}) err {err:.1e}", flush=True)
  return rows


def random_routing(key, batch, experts, top_k):
  """Random top-k routing of `batch` tokens -> group sizes [experts] of the batch*top_k copies."""
  scores = jax.random.uniform(key, (batch, experts))
  ids = jax.lax.top_k(scores, top_k)[1].reshape(-1)
  return jnp.bincount(ids, length=experts).astype(jnp.int32)


def _int8_candidates(rows, d_in, d_out, sweep, grouped=False):
  """The default int8 tuning at this many rows a slot, then those of `sweep` (Int8Tunings)."""
  return list(dict.fromkeys([ck8.default_tuning(rows, d_in, d_out, grouped), *sweep]))


def _int8_tunings(spec: str) -> tuple:
  """'8/2p,4/8w,4/8w2' -> Int8Tunings (Int8Tuning.parse: warps/mt, p: persistent, w: the wgmma
  kernel, then K splits)."""
  try:
    return tuple(ck8.Int8Tuning.parse(v) for v in spec.split(",") if v)
  except CqjaxError as e:
    raise SystemExit(f"bench_kernels: --int8_tunings: {e}") from None


def bench_grouped(name, experts, top_k, k, n, batches, sets, bw, kernels=("pallas",), int8_sweep=(), sweep=False):
  key = jax.random.key(experts * 31 + k)
  routing = {b: random_routing(jax.random.fold_in(key, b), b, experts, top_k) for b in batches}
  sets = grouped_sets(routing.values(), k, n, sets)
  weights = [_codebook(jax.random.fold_in(key, i), (experts,), k, n) for i in range(sets)]
  dense = [jax.random.normal(jax.random.fold_in(key, 100 + i), (experts, k, n), jnp.bfloat16) for i in range(sets)]
  per_expert = _expert_bytes(k, n)
  ragged = jax.jit(lambda x, ws, gs: [jax.lax.ragged_dot(x, w, gs) for w in ws])
  gather = jax.jit(lambda x, ws, gs: [grouped_lut_matmul_reference(x, w, gs) for w in ws])
  kern = jax.jit(lambda x, ws, gs: [pk.grouped_lut_matmul(x, w.packed, w.centroids, BITS, gs) for w in ws])
  cuda = jax.jit(lambda x, ws, gs: [ck.grouped_lut_matmul(x, w.packed, w.centroids, BITS, gs) for w in ws])
  bitplane_ops = {kind: _bitplane_operands(weights, kind) for kind in BITPLANE_KINDS if kind in kernels}
  rows = []
  for b in batches:
    gs = routing[b]
    x = jax.random.normal(jax.random.fold_in(key, 2000 + b), (b * top_k, k), jnp.bfloat16)
    active = int(jnp.sum(gs > 0))
    t_ragged = _per_call_us(ragged, (x, dense, gs)) / sets
    t_gather = _per_call_us(gather, (x, weights, gs)) / sets
    ref = grouped_lut_matmul_reference(x.astype(jnp.float32), weights[0], gs)
    read = active * per_expert
    row = dict(name=name, experts=experts, top_k=top_k, k=k, n=n, batch=b, active_experts=active,
               ragged_bf16_us=t_ragged, xla_gather_us=t_gather, sets=sets,
               host_floor_us=host_floor_us((x, weights, gs)))
    rows.append(row)
    if "cuda" in kernels:
      t_c = _per_call_us(cuda, (x, weights, gs)) / sets
      cerr = _rel_err(ck.grouped_lut_matmul(x, weights[0].packed, weights[0].centroids, BITS, gs), ref)
      row.update(cuda_us=t_c, cuda_err=cerr, cuda_speedup_vs_ragged=t_ragged / t_c,
                 cuda_pct_copy=100 * read / t_c / 1e3 / bw)
      print(f"{name} {k}x{n} batch={b:<3} active={active:<3} ragged-bf16 {t_ragged:7.1f}  cuda {t_c:6.1f} us "
            f"({t_ragged / t_c:5.2f}x, {row['cuda_pct_copy']:3.0f}% of copy for active experts) err {cerr:.1e}",
            flush=True)
    if "int8" in kernels:
      cands = _int8_candidates(ck.rows_per_slot(x.shape[0], experts), k, n, int8_sweep, grouped=True)  # first: its own pick
      res = _time_tunings(ck8.grouped_lut_matmul_int8, x, weights, cands, sets, 7, gs)
      t_i = res[0][0]
      if int8_sweep:
        row["int8_candidates"] = [dict(us=us, **dataclasses.asdict(t)) for us, t in res]
        print(f"  int8 tunings: " + ", ".join(f"{t.spec} {us:.1f}" for us, t in res))
      w0 = weights[0]
      got = ck8.grouped_lut_matmul_int8(x, w0.packed, w0.centroids, BITS, gs)
      own = grouped_lut_matmul_int8_reference(x, w0.packed, w0.centroids, BITS, gs) if experts <= 8 else None
      row.update(int8_us=t_i, int8_speedup_vs_ragged=t_ragged / t_i, int8_err_float=_rel_err(got, ref),
                 int8_err_own=None if own is None else _rel_err(got, own))
      print(f"{name} {k}x{n} batch={b:<3} active={active:<3} ragged-bf16 {t_ragged:7.1f}  int8 {t_i:6.1f} us "
            f"({t_ragged / t_i:5.2f}x; a call {t_i * sets:.0f} us, its host floor {row['host_floor_us']:.0f}) "
            f"err own {row['int8_err_own']} float {row['int8_err_float']:.1e}", flush=True)
    for kind, operands in bitplane_ops.items():
      act = BITPLANE_KINDS[kind][1]
      got = kb.grouped_lut_matmul_bitplane(x, *operands[0], BITS, gs, act=act)
      own = _bitplane_own_reference(x, weights[0], act, gs) if experts <= 8 else None
      bitplane = jax.jit(lambda x, ws, gs, act=act: [kb.grouped_lut_matmul_bitplane(x, p, c, BITS, gs, act=act)
                                                     for p, c in ws])
      t_p = _per_call_us(bitplane, (x, operands, gs)) / sets
      row.update({f"{kind}_us": t_p, f"{kind}_speedup_vs_ragged": t_ragged / t_p, f"{kind}_err_float": _rel_err(got, ref),
                  f"{kind}_err_own": None if own is None else _rel_err(got, own)})
      print(f"{name} {k}x{n} batch={b:<3} active={active:<3} ragged-bf16 {t_ragged:7.1f}  {kind} {t_p:6.1f} us "
            f"({t_ragged / t_p:5.2f}x) err own {row[f'{kind}_err_own']} float {row[f'{kind}_err_float']:.1e}", flush=True)
    if "mosaic" in kernels:
      got = mgk.grouped_lut_matmul(x, weights[0].packed, weights[0].centroids, BITS, gs)
      t_m = _per_call_us(jax.jit(lambda x, ws, gs: [mgk.grouped_lut_matmul(x, w.packed, w.centroids, BITS, gs)
                                                    for w in ws]), (x, weights, gs)) / sets
      row.update(mosaic_us=t_m, mosaic_err=_rel_err(got, ref), mosaic_speedup_vs_ragged=t_ragged / t_m)
      print(f"{name} {k}x{n} batch={b:<3} active={active:<3} ragged-bf16 {t_ragged:7.1f}  mosaic {t_m:6.1f} us "
            f"({t_ragged / t_m:5.2f}x) err {row['mosaic_err']:.1e}", flush=True)
    if "pallas" not in kernels:
      continue
    t_kernel = _per_call_us(kern, (x, weights, gs)) / sets
    err = _rel_err(pk.grouped_lut_matmul(x, weights[0].packed, weights[0].centroids, BITS, gs), ref)
    row.update(kernel_us=t_kernel, rel_err=err, speedup_vs_ragged=t_ragged / t_kernel, gbs=read / t_kernel / 1e3,
               pct_copy=100 * read / t_kernel / 1e3 / bw)
    if sweep:
      res = _time_tunings(pk.grouped_lut_matmul, x, weights, grouped_sweep_candidates(x.shape[0], experts, k, n), sets, 5, gs)
      best, best_t = min(res, key=lambda r: r[0])
      row.update(sweep_default_us=res[0][0], best_us=best, best_tuning=dataclasses.asdict(best_t),
                 candidates=[dict(us=us, **dataclasses.asdict(t)) for us, t in res])
      print(f"  pallas tunings: default {res[0][0]:.1f} us, best {best:.1f} us {best_t}; " +
            ", ".join(f"{t.block_m}/{t.block_n}/{t.k_splits}/{t.num_warps}w {us:.1f}" for us, t in res[1:]), flush=True)
    print(f"{name} {k}x{n} batch={b:<3} active={active:<3} ragged-bf16 {t_ragged:7.1f}  xla-gather {t_gather:8.1f}  "
          f"kernel {t_kernel:6.1f} us ({row['speedup_vs_ragged']:5.2f}x, {row['gbs']:5.0f} GB/s of active "
          f"experts = {row['pct_copy']:3.0f}% of copy) err {err:.1e}", flush=True)
  return rows


LAID_OUT = "codebook_w4_laid_out"  # W4A4 only: the 4-bit params laid out for the bit-plane kernel (`decode_params`)
DECODE_SETTINGS = (("bf16", False, "auto"), ("codebook_w4", True, "auto"), ("codebook_w4_cuda", True, "cuda"),
                   ("codebook_w4_int8", True, "int8"),
                   ("codebook_w4_unfused", True, "unfused"),
                   (LAID_OUT, True, "auto"))  # name, 4-bit weights, CQJAX_KERNELS


DECODE_SETTINGS_HELP = (f"comma list of the 4-bit settings ({', '.join(n for n, four_bit, _ in DECODE_SETTINGS if four_bit)})"
                        " or all; bf16 always")


def decode_settings(arg: str = "all", act_bits: int = 0) -> tuple:
  """The DECODE_SETTINGS named in arg (a comma list, or all), bf16 always: every speedup's baseline.
  Without quantized activations (act_bits 0) `all` leaves codebook_w4_unfused and
  codebook_w4_laid_out out: with nothing to fuse the first is the same program as codebook_w4, and
  nothing reads the second's layout."""
  names = [name for name, _, _ in DECODE_SETTINGS]
  chosen = ([n for n, _, mode in DECODE_SETTINGS if act_bits or (mode != "unfused" and n != LAID_OUT)]
            if arg == "all" else [a for a in arg.split(",") if a])
  unknown = [a for a in chosen if a not in names]
  if unknown:
    raise SystemExit(f"unknown decode setting {unknown[0]!r}; choose from {', '.join(names)} or all")
  if LAID_OUT in chosen and not act_bits:
    raise SystemExit(f"decode setting {LAID_OUT} lays weights out for products of quantized inputs: give the "
                     "activation bits (--decode_act_bits / --act_bits)")
  return tuple(s for s in DECODE_SETTINGS if s[0] == "bf16" or s[0] in chosen)


# Qwen3-30B-A3B's layer (hidden 2048, 32 query and 4 KV heads of 128, 128 experts of 768, top-8)
# in 4 layers with a small vocabulary: its products are the shapes the dispatcher decides between
# (2^20.6-code experts, 2^23-code q/o), unlike the small reference architecture's.
QWEN3_LAYERS = {"model_type": "qwen3_moe", "vocab_size": 8192, "hidden_size": 2048, "intermediate_size": 6144,
                "moe_intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 32,
                "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                "norm_topk_prob": True, "max_position_embeddings": 4096, "rope_theta": 1e6, "rms_norm_eps": 1e-6}
# Two layers of Mixtral-8x7B's shapes (hidden 4096, 32 query and 8 KV heads of 128, 8 experts of
# 14336, top-2): the 2^25.8-code experts the fused activation quantization serves at batch 1.
MIXTRAL_LAYERS = {"model_type": "mixtral", "vocab_size": 8192, "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
                  "rope_theta": 1e6, "rms_norm_eps": 1e-5}
DECODE_ARCHS = ("small", "qwen3-layers", "mixtral-layers")


def decode_arch_config(arch: str):
  """The ModelConfig of a --decode_arch: the small reference architecture, QWEN3_LAYERS or
  MIXTRAL_LAYERS."""
  from cqjax.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from experiments.train_reference import SIZES  # pylint: disable=g-import-not-at-top
  if arch not in DECODE_ARCHS:
    raise SystemExit(f"unknown decode architecture {arch!r}; choose from {', '.join(DECODE_ARCHS)}")
  hf = SIZES["small"].hf_config() if arch == "small" else {"qwen3-layers": QWEN3_LAYERS, "mixtral-layers": MIXTRAL_LAYERS}[arch]
  return ModelConfig.from_hf_dict(hf, source=arch)


def decode_models(arch: str = "small", fused: bool = False, act=None, abstract: bool = False):
  """A decode architecture (decode_arch_config) with random weights (decode speed does not depend
  on the values): (config, bf16 model, 4-bit model (with act: its activations quantized, W4A4),
  bf16 params, every MoE and attention kernel as 4-bit RTN codebooks); fused: both with q/k/v and
  gate/up fused (cqjax.fuse_projections); abstract: the weights as ShapeDtypeStructs (a
  compile-only device needs no values, and Mixtral's layers need not fit the host)."""
  from cqjax.fuse_projections import fuse_projections  # pylint: disable=g-import-not-at-top
  from cqjax.kmeans import rtn_quantize  # pylint: disable=g-import-not-at-top
  from cqjax.model import MoeCausalLM  # pylint: disable=g-import-not-at-top
  from cqjax.quantize_weights import quantize_scope  # pylint: disable=g-import-not-at-top

  cfg = decode_arch_config(arch)
  model = MoeCausalLM(cfg, jnp.bfloat16)
  q_model = MoeCausalLM(cfg, jnp.bfloat16, act_quant=act)

  def weights():
    params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    quant = quantize_scope(cfg, params, "full", lambda w, path: rtn_quantize(w, BITS))
    quant = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a, quant)
    return (fuse_projections(params), fuse_projections(quant)) if fused else (params, quant)

  params, quant = jax.eval_shape(weights) if abstract else weights()
  return cfg, model, q_model, params, quant


def decode_params(settings, params, quant, act) -> dict:
  """{setting name: the params it decodes with}: bf16's, the 4-bit ones, or for LAID_OUT those laid
  out for the bit-plane kernel (cqjax.lay_out_bitplanes under act; abstract weights stay abstract)."""
  from cqjax.lay_out_bitplanes import lay_out_bitplanes  # pylint: disable=g-import-not-at-top
  laid = None
  if any(name == LAID_OUT for name, _, _ in settings):
    lay = lambda q: lay_out_bitplanes(q, act)
    abstract = any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(quant))
    laid = jax.eval_shape(lay, quant) if abstract else lay(quant)
  return {name: (laid if name == LAID_OUT else quant) if four_bit else params for name, four_bit, _ in settings}


def decode_act(bits: int, scope: str = "official"):
  """The W4A<bits> activation quantizer of --decode_act_bits / --act_bits (0: None, weights only) in
  --decode_act_scope / --act_scope (full: o_proj's and the down projections' inputs too)."""
  return ActQuantConfig(bits=bits, scope=scope) if bits else None


def bench_decode(batches, new_tokens=64, prompt_len=32, fused=False, settings=DECODE_SETTINGS, arch="small",
                 act=None):
  """Greedy decode of a decode architecture (decode_arch_config), bf16 vs every MoE and attention kernel as
  4-bit RTN codebooks under each of `settings` (default kernels, CQJAX_KERNELS=cuda, int8, unfused,
  default kernels on params laid out for the bit-plane kernel);
  fused: q/k/v and gate/up fused in both (cqjax.fuse_projections); act: the 4-bit model's
  activations quantized too (W4A4; bf16 stays unquantized)."""
  from cqjax.generate import generate  # pylint: disable=g-import-not-at-top

  cfg, model, q_model, params, quant = decode_models(arch, fused, act)
  given = decode_params(settings, params, quant, act)
  out = []
  for b in batches:
    prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 0, cfg.vocab_size)
    row = {"arch": arch, "batch": b, "new_tokens": new_tokens, "prompt": prompt_len, "fused": fused,
           "act_bits": None if act is None else act.bits,
           "act_scope": None if act is None else act.scope}
    for name, four_bit, mode in settings:
      with kernels_mode(mode):
        m = q_model if four_bit else model
        run = jax.jit(lambda p, prompt, m=m: generate(m, p, prompt, new_tokens))
        us = _per_call_us(run, (given[name], prompt), repeats=5, calls=3)
      row[f"{name}_tokens_per_s"] = b * new_tokens / (us * 1e-6)
    speeds = []
    for name, four_bit, mode in settings:
      if four_bit:
        key = "speedup" + name.removeprefix("codebook_w4")  # speedup, speedup_cuda, speedup_int8: earlier runs' keys
        row[key] = row[f"{name}_tokens_per_s"] / row["bf16_tokens_per_s"]
        kind = "default kernels" if mode == "auto" else "CQJAX_KERNELS=" + mode
        speeds.append(f"{kind + ', laid out' if name == LAID_OUT else kind} "
                      f"{row[f'{name}_tokens_per_s']:.0f} tok/s ({row[key]:.2f}x)")
    four = "4-bit" if act is None else f"W4A{act.bits}"
    print(f"decode {arch} arch batch={b}: bf16 {row['bf16_tokens_per_s']:.0f} tok/s; {four}: {'; '.join(speeds)}; {new_tokens} new "
          f"tokens after a {prompt_len}-token prefill{'; q/k/v and gate/up fused' if fused else ''}", flush=True)
    out.append(row)
  return out


SINGLE = {"4096x14336": (4096, 14336), "14336x4096": (14336, 4096), "2048x768": (2048, 768),
          "768x2048": (768, 2048), "4096x4096": (4096, 4096)}
GROUPED = {"mixtral-4096x14336": ("mixtral", 8, 2, 4096, 14336), "mixtral-14336x4096": ("mixtral", 8, 2, 14336, 4096),
           "qwen3-2048x768": ("qwen3", 128, 8, 2048, 768), "qwen3-768x2048": ("qwen3", 128, 8, 768, 2048)}


def int_list(arg: str) -> tuple[int, ...]:
  """An argparse type: a comma list of integers ("" gives none, so the caller's default)."""
  return tuple(int(v) for v in arg.split(",") if v)


def _names(arg: str, table: dict, any_kxn: bool = False) -> list[str]:
  """The shapes named in arg; with any_kxn, also any d_in x d_out spelt KxN (e.g. a fused gate and up)."""
  names = list(table) if arg == "all" else [a for a in arg.split(",") if a]
  unknown = [a for a in names if a not in table and not (any_kxn and re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", a))]
  if unknown:
    more = ", any KxN" if any_kxn else ""
    raise SystemExit(f"bench_kernels: unknown shape {unknown[0]!r}; choose from {', '.join(table)}{more} or all")
  return names


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="fewer M values and batches")
  ap.add_argument("--sweep", action="store_true", help="try block shapes on the Mixtral shapes at --sweep_ms")
  ap.add_argument("--sweep_ms", type=int_list, default="128", help="comma list of M for --sweep")
  ap.add_argument("--grouped_sweep", action="store_true", help="try Pallas block shapes at each --grouped shape and batch")
  ap.add_argument("--decode", action="store_true", help="decode tokens/s of --decode_arch")
  ap.add_argument("--decode_arch", default="small", choices=DECODE_ARCHS,
                  help="--decode: the small reference architecture, 4 layers of Qwen3-30B-A3B's shapes, or 2 of "
                  "Mixtral-8x7B's")
  ap.add_argument("--decode_act_bits", type=int, default=0,
                  help="--decode: the 4-bit model's activations quantized to these bits (W4A4 at 4; 0: weights only)")
  ap.add_argument("--decode_act_scope", default="official", choices=("official", "full"),
                  help="--decode with --decode_act_bits: the quantized inputs (full: o_proj's and the down "
                  "projections' too; ../shared/PROTOCOL.md)")
  ap.add_argument("--fused", action="store_true", help="--decode with q/k/v and gate/up fused (cqjax.fuse_projections)")
  ap.add_argument("--decode_batches", type=int_list, default="1,16", help="--decode: comma list of decode batches")
  ap.add_argument("--decode_settings", default="all", help="--decode: " + DECODE_SETTINGS_HELP)
  ap.add_argument("--single", default="all", help=f"comma list of {', '.join(SINGLE)}, any KxN, all, or empty")
  ap.add_argument("--grouped", default="all", help=f"comma list of {', '.join(GROUPED)}, all, or empty")
  ap.add_argument("--kernels", default="pallas,cuda", help="comma list of pallas, cuda, int8, bitplane, bitplane_laid_out, "
                  "affine, affine_laid_out (all but pallas where built), mosaic (Hopper: pallas_kernels/lut_matmul_mgpu)")
  ap.add_argument("--cuda_sweep", action="store_true", help="try every CUDA tuning at each single-weight shape")
  ap.add_argument("--int8_sweep", action="store_true", help="try every int8 kernel tuning at each shape, single and grouped")
  ap.add_argument("--int8_tunings", default="", help="try these int8 tunings at each shape (Int8Tuning.spec: warps/mt, "
                  "p: persistent, w: wgmma, then its K splits: 8/2p, 4/16w2)")
  ap.add_argument("--cuda_layouts", type=int_list, default="", help="with --cuda_sweep: comma list of the layouts to try (default all)")
  ap.add_argument("--ms", type=int_list, default="", help="comma list of M for single weights (default: 1..128)")
  ap.add_argument("--batches", type=int_list, default="", help="comma list of decode batches for grouped (default: 1, 4, 16, 64)")
  ap.add_argument("--sets", type=int, default=8, help="weights per jitted call (raised past twice the L2)")
  ap.add_argument("--out", default="experiments/results/bench-kernels/results.json",
                  help="written after every shape, so a run stopped early keeps what it measured")
  ap.add_argument("--plot", default="", help="also draw the speedups of this run (PNG; experiments.plots)")
  ap.add_argument("--replot", default="", help="measure nothing: draw --plot from this saved --out JSON")
  args = ap.parse_args()
  if args.replot:
    if not args.plot:
      raise SystemExit("bench_kernels: --replot needs --plot=PNG")
    with open(args.replot) as f:
      plot_kernel_speedups(json.load(f), args.plot)
    return
  settings = decode_settings(args.decode_settings, args.decode_act_bits)  # refused before anything is timed
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  bw = copy_bandwidth_gbs()
  print(f"device copy: {bw:.0f} GB/s (read + write)", flush=True)
  ms = (1, 16, 128) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128)
  batches = (1, 16) if args.quick else (1, 4, 16, 64)
  ms, batches = args.ms or ms, args.batches or batches
  kernels = tuple(k for k in args.kernels.split(",")
                  if k and (k not in ("cuda", "int8") or ck.available()) and (k not in BITPLANE_KINDS or kb.available())
                  and (k != "mosaic" or mgk.available()))
  int8_sweep = ck8.TUNINGS if args.int8_sweep else _int8_tunings(args.int8_tunings)
  print(f"kernels: {', '.join(kernels)}", flush=True)
  result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy_gbs": bw, "single": [],
            "grouped": []}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

  def save():
    with open(args.out + ".tmp", "w") as f:
      json.dump(result, f, indent=2)
    os.replace(args.out + ".tmp", args.out)

  for name in _names(args.single, SINGLE, any_kxn=True):
    k, n = SINGLE.get(name) or map(int, name.split("x"))
    result["single"] += bench_single(k, n, ms, args.sets, False, bw, kernels, args.cuda_sweep,
                                      list(args.cuda_layouts) or None,
                                      int8_sweep)
    save()
  for name in _names(args.grouped, GROUPED):
    result["grouped"] += bench_grouped(*GROUPED[name], batches, args.sets, bw, kernels, int8_sweep, args.grouped_sweep)
    save()
  if args.sweep:
    result["sweep"] = []
    for m in args.sweep_ms:
      for k, n in ((4096, 14336), (14336, 4096)):
        result["sweep"] += bench_single(k, n, (m,), args.sets, True, bw)
        save()
  if args.decode:
    act = decode_act(args.decode_act_bits, args.decode_act_scope)
    result["decode"] = bench_decode(args.decode_batches, fused=args.fused, settings=settings, arch=args.decode_arch, act=act)
    save()
  if args.plot:
    plot_kernel_speedups(result, args.plot)


if __name__ == "__main__":
  main()
