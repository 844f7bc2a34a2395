"""The device kernels of a jitted call, from jax.profiler's trace (CUPTI's records on a GPU): names,
launches and µs, with no ncu. Why: ncu crashed or overran on whole grouped calls and decode steps
on the H200 (BENCHMARKS.md session 37), and it serializes kernels; the profiler times them as they
run, command buffers included.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import tempfile

import jax


def device_kernel_times(trace: dict) -> dict:
  """Kernel name -> [launches, total µs] over the complete events ('ph': 'X') of a Chrome-format
  trace (what jax.profiler writes) whose process is a device ('/device:...'), host processes left
  out."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and str(e.get("args", {}).get("name", "")).startswith("/device:")}
  out = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices:
      row = out.setdefault(e["name"], [0, 0.0])
      row[0] += 1
      row[1] += float(e.get("dur", 0.0))
  return out


def traced_kernels(fn, args, calls: int = 1) -> dict:
  """device_kernel_times of `calls` calls of fn(*args) (run once beforehand, so compiled) under
  jax.profiler.trace."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    if not files:
      raise SystemExit(f"device_trace: jax.profiler wrote no *.trace.json.gz under {d}")
    with gzip.open(files[0], "rt") as f:
      return device_kernel_times(json.load(f))


def print_kernels(kernels: dict, per: float, label: str, wall_us: float | None = None, top: int = 8):
  """Prints the kernels' total per `per` units (calls, tokens) named by `label`, the largest `top`
  by time, and against `wall_us` (a unit's wall time) how busy the device was."""
  if not kernels:
    print(f"  {label}: the trace holds no device kernels (a CPU backend, or a profiler without CUPTI)", flush=True)
    return
  busy = sum(us for _, us in kernels.values()) / per
  launched = sum(n for n, _ in kernels.values()) / per
  wall = f"{wall_us:.1f} us wall, " if wall_us else ""
  share = f" ({100 * busy / wall_us:.0f}% busy)" if wall_us else ""
  print(f"  {label}: {wall}{launched:.0f} kernels taking {busy:.1f} us{share}", flush=True)
  for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
    print(f"    {us / per:7.2f} us  x{n / per:5.1f}  {name[:110]}")
