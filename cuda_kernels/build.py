"""Builds the CUDA kernel library in place: python -m cuda_kernels.build [--verbose].

nvcc compiles lut_matmul.cu, lut_matmul_int8.cu, lut_matmul_bitplane.cu and expert_slots.cu for Hopper (sm_90a: wgmma) and Ampere (sm_80; mma.sync bf16 needs sm_80+)
against the XLA FFI headers that jaxlib ships, into cuda_kernels/_lut_matmul_cuda.so, which
cuda_kernels/lut_matmul.py loads. `pip install` builds the same library when asked to
(`-Ccmake.define.CQJAX_CUDA=ON`, CMakeLists.txt); this command serves editable checkouts and GPU
machines where the package is not installed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import jax.ffi

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [os.path.join(HERE, name)
           for name in ("lut_matmul.cu", "lut_matmul_int8.cu", "lut_matmul_bitplane.cu", "expert_slots.cu")]
LIBRARY = os.path.join(HERE, "_lut_matmul_cuda.so")
ARCHS = ("80", "90a")  # 90a: the wgmma of layout 8 (runs on every sm_90 GPU)


def command(nvcc: str, out: str, verbose: bool = False) -> list[str]:
  cmd = [nvcc, "-O3", "-std=c++17", "--threads", "0", "-shared", "-Xcompiler", "-fPIC", "-isystem", jax.ffi.include_dir(), *SOURCES, "-o", out]
  for arch in ARCHS:
    cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
  if verbose:
    cmd += ["-Xptxas", "-v"]
  return cmd


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--verbose", action="store_true", help="print registers, shared memory and spills (ptxas -v)")
  ap.add_argument("--out", default=LIBRARY)
  args = ap.parse_args()
  nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
  if nvcc is None:
    print("cuda_kernels.build: nvcc not found (set NVCC or put the CUDA toolkit's bin on PATH)", file=sys.stderr)
    return 1
  tmp = args.out + ".tmp"
  done = subprocess.run(command(nvcc, tmp, args.verbose), check=False)
  if done.returncode != 0:
    return done.returncode
  os.replace(tmp, args.out)  # a process loading the library never sees a half-written file
  print(f"built {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
