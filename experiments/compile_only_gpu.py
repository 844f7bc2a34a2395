"""XLA's own GPU compiler on a machine without a GPU: the Pallas kernels as XLA builds them for an
H100 / H200 (registers, spills), and whole programs compiled for one (a decode step's launches:
`profile_decode_step --compile_for=h200`), before any device time is spent.

  pip install --no-deps --target /tmp/cuda_plugin jax-cuda12-plugin==$V jax-cuda12-pjrt==$V  # V: jax's version
  PYTHONPATH=/tmp/cuda_plugin python -m experiments.compile_only_gpu [--spec=h200] [--single=...] [--grouped=...]

jax's CUDA plugin (no GPU, CUDA libraries or driver needed for this) gives compile-only devices of
`jax.experimental.topologies` for a target spec (`experiments/assets/gpu_specs/*.txtpb`, XLA's
GpuTargetConfigProto: what XLA reads of a device); programs lowered for one compile with XLA's GPU
pipeline, its own Triton included, and `ptxas` from a CUDA toolkit on PATH. Nothing is autotuned
(there is no device to time on), so cuBLAS / Triton GEMM configurations may differ from a GPU's.

The CUDA kernels' library, built here by `python -m cuda_kernels.build` (nvcc, no GPU), can be
served too (`use_cuda_library`, `profile_decode_step --cuda_library=PATH`): its FFI handlers
register for the CUDA platform, and programs then take the CUDA and int8 kernels as on a GPU,
except where a choice asks the GPU itself (`is_hopper()` sees none: the int8 setting's prefill rows
take the default kernels, not its wgmma kernel).

Each product (pallas_offline_compile's shapes and parser) compiles with XLA's dump on; `ptxas -v`
then reads the registers, stack and spills of every `cqjax_` kernel in the dumped PTX, and a
cuobjdump (a CUDA toolkit's, or the one the triton package bundles) its K loop from the SASS. Unlike
pallas_offline_compile (the `triton` package compiling Pallas' Triton IR), these are the kernels XLA
itself emits, for this jaxlib's XLA (the GPU image's jaxlib may be newer).
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile

import jax
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from cuda_kernels import expert_slots as ces
from cuda_kernels import lut_matmul as cuda
from cuda_kernels import lut_matmul_bitplane as cudab
from cuda_kernels import lut_matmul_int8 as cuda8
from experiments import pallas_offline_compile as poc

SPECS_DIR = os.path.join(os.path.dirname(__file__), "assets", "gpu_specs")
_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def spec_names() -> list[str]:
  return sorted(os.path.basename(p)[:-len(".txtpb")] for p in glob.glob(os.path.join(SPECS_DIR, "*.txtpb")))


def compile_only_devices(spec: str = "h200", count: int = 1) -> list[jax.Device]:
  """`count` compile-only CUDA devices of one host for `spec` (a name in experiments/assets/gpu_specs,
  or a path to a GpuTargetConfigProto text file). Without a GPU call it before anything runs on jax's
  backends: the CUDA plugin initializes with them, and only skips its CUDA library checks (there are
  none to pass without a GPU) when asked to first."""
  path = spec if os.path.exists(spec) else os.path.join(SPECS_DIR, f"{spec}.txtpb")
  if not os.path.exists(path):
    raise SystemExit(f"no GPU spec {spec!r}: name one of {', '.join(spec_names())} or give a .txtpb path")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  with open(path) as f:
    config = f.read()
  try:
    topology = topologies.get_topology_desc(spec, "cuda", topology=f"1x1x{count}", target_config=config)
  except NotImplementedError:
    raise SystemExit(f"compiling for a GPU without one needs jax's CUDA plugin: pip install --no-deps --target DIR "
                     f"jax-cuda12-plugin=={jax.__version__} jax-cuda12-pjrt=={jax.__version__}, then run with "
                     "PYTHONPATH=DIR (and before jax's backends start)") from None
  return list(topology.devices)


def use_cuda_library(path: str) -> None:
  """The dispatcher takes the CUDA kernels of the library at `path` without a GPU (cuda_kernels
  loads its library only beside one): every wrapper asks `cuda_kernels.lut_matmul.library()`."""
  if not os.path.exists(path):
    raise SystemExit(f"no CUDA library at {path}: build one with python -m cuda_kernels.build (nvcc on PATH, no GPU needed)")
  lib = ctypes.cdll.LoadLibrary(path)
  cuda.library = lambda: lib
  for module in (cuda, cuda8, cudab, ces):
    module.available.cache_clear()


def on_device(tree, device: jax.Device):
  """The arrays / ShapeDtypeStructs of `tree` as abstract arguments placed on `device`."""
  sharding = SingleDeviceSharding(device)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def compile_for(f, args, device: jax.Device, dump_dir: str | None = None) -> jax.stages.Compiled:
  """`f` compiled for `device` (args: arrays or ShapeDtypeStructs); dump_dir: XLA's dump (HLO, PTX) there."""
  options = {"xla_dump_to": dump_dir} if dump_dir else {}
  return jax.jit(f).trace(*on_device(args, device)).lower().compile(compiler_options=options)


def parse_ptxas(report: str, prefix: str = "cqjax_") -> list[dict]:
  """`ptxas -v`'s report -> per entry function whose name starts with `prefix`: name, registers,
  stack frame and spill store / load bytes."""
  rows, current = [], None
  for line in report.splitlines():
    if m := _ENTRY.search(line):
      current = {"kernel": m.group(1)} if m.group(1).startswith(prefix) else None
      if current:
        rows.append(current)
    elif current is not None and (m := _STACK.search(line)):
      current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
    elif current is not None and (m := _REGISTERS.search(line)):
      current["registers"] = int(m.group(1))
  return rows


def sass_functions(sass: str) -> dict[str, str]:
  """cuobjdump --dump-sass's listing -> each function's part of it, by name."""
  parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
  return dict(zip(parts[1::2], parts[2::2]))


def _cuobjdump() -> str | None:
  """A cuobjdump: a CUDA toolkit's on PATH, else the one the triton package bundles, else None."""
  found = shutil.which("cuobjdump")
  if found is None:
    try:
      bundled = poc.triton_cuobjdump()
    except ImportError:
      return None
    found = bundled if os.access(bundled, os.X_OK) else None
  return found


def _tool_failed(tool: str, path: str, stderr: str):
  raise SystemExit(f"{tool} failed on {path}: {(stderr.strip().splitlines() or ['no message'])[-1]}")


def dumped_kernels(dump_dir: str, prefix: str = "cqjax_") -> list[dict]:
  """Registers and spills of the `prefix` kernels in the PTX of an XLA dump (ptxas -v, for the
  target each PTX file names), and where a cuobjdump is found, each one's K loop
  (pallas_offline_compile.k_loop of its SASS): the kernels as XLA itself builds them."""
  ptxas = shutil.which("ptxas")
  if ptxas is None:
    raise SystemExit("reading the kernels' registers needs ptxas from a CUDA toolkit on PATH")
  cuobjdump = _cuobjdump()
  rows = []
  for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
    with open(path) as f:
      ptx = f.read()
    if f".entry {prefix}" not in ptx:
      continue
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.M).group(1)
    cubin = path[:-len(".ptx")] + ".cubin"
    out = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", cubin], capture_output=True, text=True)
    if out.returncode:
      _tool_failed("ptxas", path, out.stderr)
    kernels = parse_ptxas(out.stdout + out.stderr, prefix)
    if cuobjdump is not None:
      sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True)
      if sass.returncode:
        _tool_failed("cuobjdump", cubin, sass.stderr)
      functions = sass_functions(sass.stdout)
      for kernel in kernels:
        kernel.update(poc.k_loop(functions.get(kernel["kernel"], "")))
    rows += kernels
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--spec", default="h200", help="GPU to compile for: a name in experiments/assets/gpu_specs or a path")
  ap.add_argument("--single", default=poc.SINGLE, help="comma list of MxKxN single weights (empty: none)")
  ap.add_argument("--grouped", default=poc.GROUPED, help="comma list of EXPERTSxTOPKxBATCHxKxN grouped products (empty: none)")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  args = ap.parse_args()
  (device,) = compile_only_devices(args.spec)
  print(f"compiled for {device.device_kind} by jax {jax.__version__}'s XLA, no GPU attached")
  rows = []
  for case in poc.parse_products(args.single, args.grouped):
    f, fargs = poc.product_call(**case)
    with tempfile.TemporaryDirectory() as dump:
      compile_for(f, fargs, device, dump)
      kernels = dumped_kernels(dump)
    for kernel in kernels:
      rows.append({**case, **kernel})
      print(f"{poc.product_label(case):<40} {kernel['kernel']:<26} registers {kernel['registers']:3d}  "
            f"stack {kernel['stack']:4d}  spill stores {kernel['spill_stores']:4d}  loads {kernel['spill_loads']:4d}"
            + (f"  {poc.k_loop_label(kernel)}" if "loop_opcodes" in kernel else ""), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
