"""Probe: Mosaic GPU codebook matmuls, single and grouped over experts (weights decoded in
registers as wgmma's A operand, x^T in shared memory as B), timed on a GPU against XLA's bf16
`dot` / `ragged_dot` and the Pallas (Triton) kernels on the same weights, 8 weights (or past L2)
a jitted call, median of repeats:

  python -m experiments.probe_mosaic_lut [--shapes=4096x14336] [--ms=1,16] [--grouped=8x2x4096x14336]
  python -m experiments.probe_mosaic_lut --interpret   # no GPU: the select decode, interpreted
  PYTHONPATH=/tmp/cuda_plugin python -m experiments.probe_mosaic_lut --compile_for=h100_sxm --ms=1,128,2048 \
      --batches=128,2048   # no GPU: the default tunings compiled for an H100

The kernels are pallas_kernels/lut_matmul_mgpu.py (Pallas' Mosaic GPU backend; its Triton backend
is deprecated in jax 0.11); this script times their tunings."""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cqjax.codebook import CodebookWeight
from cqjax.lut_matmul import grouped_lut_matmul_reference, lut_matmul_reference
from pallas_kernels import lut_matmul_mgpu as mg


def grouped_lut_matmul_mgpu(x, packed, cents, group_sizes, *, interpret=False, **tuning):
  """pallas_kernels.lut_matmul_mgpu's grouped product with cents [e, n, 16] or [e, n, groups, 16] and
  the tuning's fields as keywords (the probe's --configs); default tuning where none is given."""
  c = cents.reshape(*packed.shape[:2], -1, 16)
  t = mg.MgpuTuning(**tuning) if tuning else None
  return mg.grouped_lut_matmul(x, packed, c, 4, group_sizes, tuning=t, interpret=interpret)


def lut_matmul_mgpu(x, packed, cents, *, interpret=False, **tuning):
  """x [m, k] @ (packed uint8 [n, k/2] of 4-bit codes, cents [n, 16] or [n, groups, 16]) -> [m, n]."""
  t = mg.MgpuTuning(**tuning) if tuning else None
  return mg.lut_matmul(x, packed, cents.reshape(packed.shape[0], -1, 16), 4, tuning=t, interpret=interpret)


def _weight(packed, cents) -> CodebookWeight:
  return CodebookWeight(packed, cents.reshape(*packed.shape[:-1], -1, 16), 4, 2 * packed.shape[-1])


def reference(x, packed, cents):
  """cqjax's reference in float32, rounded to x's dtype as the kernel's float32 accumulator is."""
  return lut_matmul_reference(x.astype(jnp.float32), _weight(packed, cents)).astype(x.dtype)


def grouped_reference(x, packed, cents, group_sizes):
  return grouped_lut_matmul_reference(x.astype(jnp.float32), _weight(packed, cents), group_sizes).astype(x.dtype)


def operands(seed, m, k, n):
  r = np.random.default_rng(seed)
  return (jnp.asarray(r.standard_normal((m, k)), jnp.bfloat16),
          jnp.asarray(r.integers(0, 256, (n, k // 2)), jnp.uint8),
          jnp.asarray(r.standard_normal((n, 16)), jnp.bfloat16))


def _timed_configs(line, configs, run, check, t_base):
  """line + ' | kind config: us (speedup over t_base, max error / max |ref|)' for each config."""
  for config in configs:
    name = f"{config[0]} {','.join(map(str, config[1:]))}" if config else "default"
    kw = dict(zip(("decode", "block_n", "block_k", "steps", "k_splits"), config))
    try:
      err = check(kw)
      t = run(kw)
      line += f" | {name}: {t:6.1f} ({t_base / t:4.2f}x, err {err:.2g})"
    except Exception as e:  # pylint: disable=broad-except
      line += f" | {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:100]}"
  return line


def _max_rel_err(got, ref):
  ref = ref.astype(jnp.float32)
  return float(jnp.abs(got.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())


def _compile_only(a):
  """Compile (not run) the default tunings for a GPU spec: Mosaic's lowering and shared-memory
  budget, then XLA's compile. Mosaic assembles its cubin at the first run, so that step waits for a GPU."""
  from experiments.compile_only_gpu import compile_only_devices  # pylint: disable=g-import-not-at-top
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  sharding = SingleDeviceSharding(compile_only_devices(a.compile_for)[0])
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  cases = [(None, k, n, m) for k, n in (map(int, s.split("x")) for s in filter(None, a.shapes.split(",")))
           for m in map(int, a.ms.split(","))]
  cases += [((e, top_k), k, n, b * top_k) for e, top_k, k, n in (map(int, g.split("x")) for g in filter(None, a.grouped.split(",")))
            for b in map(int, a.batches.split(","))]
  failed = 0
  for grouped, k, n, t in cases:
    x = spec((t, k), jnp.bfloat16)
    if grouped:
      e = grouped[0]
      f = lambda x, p, c, g: mg.grouped_lut_matmul(x, p, c, 4, g)
      args = (x, spec((e, n, k // 2), jnp.uint8), spec((e, n, 1, 16), jnp.bfloat16), spec((e,), jnp.int32))
    else:
      f = lambda x, p, c: mg.lut_matmul(x, p, c, 4)
      args = (x, spec((n, k // 2), jnp.uint8), spec((n, 1, 16), jnp.bfloat16))
    what = f"{'grouped %dx' % grouped[0] if grouped else ''}{k}x{n} rows={t}"
    try:
      jax.jit(f).trace(*args).lower().compile()
      print(f"{what}: compiled for {a.compile_for}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      failed += 1
      print(f"{what}: failed {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
  return 1 if failed else 0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--interpret", action="store_true", help="the select decode through Mosaic GPU's interpreter (CPU)")
  ap.add_argument("--shapes", default="4096x14336,14336x4096")
  ap.add_argument("--ms", default="1,16,128")
  ap.add_argument("--group_size", type=int, default=0,
                  help="single products' codebooks over column groups of this many inputs (0: a codebook a row)")
  ap.add_argument("--grouped", default="8x2x4096x14336,128x8x2048x768", help="experts x top_k x d_in x d_out")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--configs", default="default;select:64,128,2,1;prmt:64,128,2,1;prmt:64,256,2,1;prmt:64,128,4,1;"
                                       "prmt:64,256,4,1;prmt:64,128,2,4;prmt:128,128,2,1;prmt:128,128,2,2",
                  help="default (lut_matmul_mgpu.default_tuning) or decode:block_n,block_k,steps,k_splits; ...")
  ap.add_argument("--compile_for", default="",
                  help="a GPU spec (experiments/assets/gpu_specs, e.g. h100_sxm): compile the default tunings at "
                       "--shapes x --ms and --grouped x --batches with XLA for it, on a host without a GPU "
                       "(PYTHONPATH=/tmp/cuda_plugin: experiments/compile_only_gpu.py)")
  a = ap.parse_args()
  if a.compile_for:
    return _compile_only(a)
  if a.interpret:
    x, p, c = operands(0, 5, 256, 64)
    packed, cents = jnp.stack([p, p ^ 0x5A, p]), jnp.stack([c, -c, 2 * c])
    gs = jnp.array([2, 0, 3], jnp.int32)
    err = _max_rel_err(grouped_lut_matmul_mgpu(x, packed, cents, gs, decode="select", interpret=True),
                       grouped_reference(x, packed, cents, gs))
    print(f"interpreted, 3 experts (one empty), 5 rows: max error / max |ref| {err:.2g}")
    return
  if jax.default_backend() != "gpu":
    raise SystemExit("probe_mosaic_lut: timing needs a Hopper GPU; on this host, --interpret runs the select decode")
  from experiments.bench_kernels import _per_call_us as per_call_us  # pylint: disable=g-import-not-at-top
  from pallas_kernels import lut_matmul as pk  # pylint: disable=g-import-not-at-top
  configs = [() if c == "default" else (c.split(":")[0], *(int(v) for v in c.split(":")[1].split(",")))
             for c in a.configs.split(";")]
  print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
  sets = 8
  for shape in filter(None, a.shapes.split(",")):
    k, n = (int(v) for v in shape.split("x"))
    ws = [operands(i, 1, k, n)[1:] for i in range(sets)]
    if a.group_size:
      ws = [(p, jnp.asarray(np.random.default_rng(200 + i).standard_normal((n, k // a.group_size, 16)), jnp.bfloat16))
            for i, (p, _) in enumerate(ws)]
    dense = [jnp.asarray(np.random.default_rng(100 + i).standard_normal((k, n)), jnp.bfloat16) for i in range(sets)]
    for m in (int(v) for v in a.ms.split(",")):
      x = operands(1000 + m, m, k, n)[0]
      t_bf16 = per_call_us(jax.jit(lambda x, ds: [x @ d for d in ds]), (x, dense)) / sets
      t_pk = per_call_us(jax.jit(lambda x, ws: [pk.lut_matmul(x, p, c.reshape(n, -1, 16), 4) for p, c in ws]),
                         (x, ws)) / sets
      line = f"{k}x{n} M={m:<3} bf16 {t_bf16:6.1f} us  pallas-triton {t_pk:6.1f} ({t_bf16 / t_pk:4.2f}x)"
      run = lambda kw, x=x, ws=ws: per_call_us(jax.jit(lambda x, ws: [lut_matmul_mgpu(x, p, c, **kw) for p, c in ws]),
                                               (x, ws)) / sets
      check = lambda kw, x=x, ws=ws: _max_rel_err(lut_matmul_mgpu(x, *ws[0], **kw), reference(x, *ws[0]))
      print(_timed_configs(line, configs, run, check, t_bf16), flush=True)
  for spec in filter(None, a.grouped.split(",")):
    e, top_k, k, n = (int(v) for v in spec.split("x"))
    gsets = max(2, min(sets, (60 << 20) // (e * n * k // 2) + 1))  # past the 50 MB L2
    ws = [(p.reshape(e, n, k // 2), c.reshape(e, n, 16))
          for p, c in (operands(i, 1, k, n * e)[1:] for i in range(gsets))]
    dense = [jnp.asarray(np.random.default_rng(100 + i).standard_normal((e, k, n)), jnp.bfloat16) for i in range(gsets)]
    for b in (int(v) for v in a.batches.split(",")):
      scores = jax.random.uniform(jax.random.key(b), (b, e))
      gs = jnp.bincount(jax.lax.top_k(scores, top_k)[1].reshape(-1), length=e).astype(jnp.int32)
      x = operands(2000 + b, b * top_k, k, n)[0]
      t_rd = per_call_us(jax.jit(lambda x, ds, gs: [jax.lax.ragged_dot(x, d, gs) for d in ds]), (x, dense, gs)) / gsets
      t_pk = per_call_us(jax.jit(lambda x, ws, gs: [pk.grouped_lut_matmul(x, p, c.reshape(e, n, 1, 16), 4, gs)
                                                    for p, c in ws]), (x, ws, gs)) / gsets
      line = (f"grouped {e}x{n}x{k} top-{top_k} batch {b:<3} ragged_dot {t_rd:6.1f} us  pallas-triton {t_pk:6.1f} "
              f"({t_rd / t_pk:4.2f}x)")
      run = lambda kw, x=x, ws=ws, gs=gs: per_call_us(jax.jit(
          lambda x, ws, gs: [grouped_lut_matmul_mgpu(x, p, c, gs, **kw) for p, c in ws]), (x, ws, gs)) / gsets
      check = lambda kw, x=x, ws=ws, gs=gs: _max_rel_err(grouped_lut_matmul_mgpu(x, *ws[0], gs, **kw),
                                                         grouped_reference(x, *ws[0], gs))
      print(_timed_configs(line, configs, run, check, t_rd), flush=True)


if __name__ == "__main__":
  sys.exit(main())
