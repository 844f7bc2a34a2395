"""The Pallas kernels compiled for a GPU on a machine without one: registers, spills, shared memory
and SASS instructions of each kernel and of its K loop, before any device time is spent (a stack
means spills).

  pip install triton==3.6.0   # the Triton of the GPU image's XLA; not a project dependency
  python -m experiments.pallas_offline_compile [--single=1x4096x14336,...] [--grouped=8x2x1x4096x14336,...]
                                               [--tunings=2/16/512/1,...] [--arch=90] [--out=FILE.json]

Each product is traced and lowered for CUDA (Pallas' Triton lowering runs in Python, so this works
on any backend); the Triton IR of each of its pallas_calls, with the call's warps and stages, is then
compiled by the `triton` package for the given SM to PTX and a cubin, whose resource usage and SASS
come from the cuobjdump that package bundles. It catches what lowering alone does not (Triton's
verifier, PTX assembly) and shows what a change (a patch) does to registers and instructions. XLA
compiles the same IR with its own Triton, so the numbers are a close estimate, not the GPU's:
Triton's TTIR passes run first, as in XLA's pipeline (until session 42 they did not, which left
each dot's accumulation outside it and overstated the 128-row block's spills, 3392 stack bytes
against 216; XLA's own compile, `compile_only_gpu`, gives 184).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
# Private: the one place jax hands over a pallas_call's Triton module before serializing it.
from jax._src.pallas.triton import pallas_call_registration
from jax.experimental import pallas as pl

from cqjax.errors import CqjaxError
from pallas_kernels import lut_matmul as pk

SINGLE = "1x4096x14336,16x4096x14336,128x4096x14336,1x14336x4096,16x14336x4096,1x2048x768,1x768x2048,1x4096x4096"
GROUPED = "8x2x1x4096x14336,8x2x16x4096x14336,128x8x1x2048x768,128x8x16x2048x768,128x8x1x768x2048"


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  """One pallas_call as Triton compiles it: the Triton IR text (no debug locations) and its launch options."""

  name: str
  ttir: str
  num_warps: int
  num_stages: int


@contextlib.contextmanager
def captured_kernels():
  """Yields a list that fills with a TritonKernel for every pallas_call lowered inside (jit caches
  are dropped first, so that each call is traced, and its options seen, again)."""
  jax.clear_caches()
  kernels, options = [], []
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
  call = pl.pallas_call

  def recording_call(*args, **kwargs):
    params = kwargs.get("compiler_params")
    options.append((kwargs.get("name", "kernel"), getattr(params, "num_warps", 4), getattr(params, "num_stages", 3)))
    return call(*args, **kwargs)

  def recording_lower(*args, **kwargs):
    result = lower(*args, **kwargs)
    name, warps, stages = options[len(kernels)]
    kernels.append(TritonKernel(name, result.module.operation.get_asm(enable_debug_info=False), warps, stages))
    return result

  pl.pallas_call = recording_call
  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = recording_lower
  try:
    yield kernels
  finally:
    pl.pallas_call = call
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower


def product_call(m: int, k: int, n: int, experts: int = 0, top_k: int = 0, tuning: pk.LutTuning | None = None) -> tuple:
  """(function, abstract arguments) of one 4-bit bf16 product through the Pallas kernels with
  `tuning` (None: the defaults): a single weight [k, n] at m rows, or (experts > 0) the grouped
  product of m tokens routed to top_k of `experts`."""
  x = jax.ShapeDtypeStruct((m * max(top_k, 1), k), jnp.bfloat16)
  lead = (experts,) if experts else ()
  packed = jax.ShapeDtypeStruct((*lead, n, k // 2), jnp.uint8)
  cent = jax.ShapeDtypeStruct((*lead, n, 1, 16), jnp.bfloat16)
  if experts:
    return (lambda x, p, c, gs: pk.grouped_lut_matmul(x, p, c, 4, gs, tuning=tuning)), (
        x, packed, cent, jax.ShapeDtypeStruct((experts,), jnp.int32))
  return (lambda x, p, c: pk.lut_matmul(x, p, c, 4, tuning=tuning)), (x, packed, cent)


def parse_products(single: str, grouped: str) -> list[dict]:
  """product_call's keyword arguments for --single (MxKxN, ...) and --grouped (EXPERTSxTOPKxBATCHxKxN, ...)."""
  cases = [dict(m=m, k=k, n=n) for m, k, n in (map(int, s.split("x")) for s in single.split(",") if s)]
  return cases + [dict(experts=e, top_k=t, m=b, k=k, n=n)
                  for e, t, b, k, n in (map(int, s.split("x")) for s in grouped.split(",") if s)]


def parse_tunings(spec: str) -> list:
  """--tunings 'BM/BN/BK/SPLITS[/WARPS],...' -> LutTunings ([None]: the defaults, when empty)."""
  try:
    return [pk.LutTuning(*(int(v) for v in t.split("/"))) for t in spec.split(",") if t] or [None]
  except (ValueError, TypeError, CqjaxError) as e:
    raise SystemExit(f"pallas_offline_compile: --tunings={spec!r}: {e} (want BM/BN/BK/SPLITS[/WARPS], ...)") from None


def tuning_label(tuning: pk.LutTuning) -> str:
  """A LutTuning as --tunings writes it (parse_tunings reads it back)."""
  return f"{tuning.block_m}/{tuning.block_n}/{tuning.block_k}/{tuning.k_splits}/{tuning.num_warps}"


def product_label(case: dict) -> str:
  shape = f"{case['experts']} experts top-{case['top_k']} batch {case['m']}" if "experts" in case else f"M={case['m']}"
  return f"{case['k']}x{case['n']} {shape}"


def product_kernels(m: int, k: int, n: int, experts: int = 0, top_k: int = 0,
                    tuning: pk.LutTuning | None = None) -> list[TritonKernel]:
  """The Triton kernels of one product (product_call's)."""
  f, args = product_call(m, k, n, experts, top_k, tuning)
  with captured_kernels() as kernels:
    jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
  return kernels


def triton_cuobjdump() -> str:
  """The cuobjdump the triton package bundles (ImportError without the package)."""
  import triton  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(kernel: TritonKernel, arch: int, workdir: str) -> dict:
  """Compiles with the `triton` package for sm_<arch>: registers and stack bytes (spills) of the
  cubin (its bundled cuobjdump), the shared memory Triton allocates, and SASS instructions."""
  import triton  # pylint: disable=g-import-not-at-top
  from triton._C.libtriton import ir  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.compiler.compiler import Language, make_backend  # pylint: disable=g-import-not-at-top

  target = GPUTarget("cuda", arch, 32)
  options = {"num_warps": kernel.num_warps, "num_stages": kernel.num_stages}
  path = os.path.join(workdir, f"{kernel.name}.ttir")
  with open(path, "w") as f:
    f.write(kernel.ttir)
  # triton.compile skips the passes of an IR file's own stage; XLA runs them on Pallas' TTIR
  # (its MakeTTIR: canonicalize, combine a dot's add into its accumulator, CSE, ...), so run them here.
  backend = make_backend(target)
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  module = ir.parse_mlir_module(path, context)
  module.context = context  # as triton.compile's IRSource does
  stages = {}
  backend.add_stages(stages, backend.parse_options(options), Language.TRITON)
  with open(path, "w") as f:
    f.write(str(stages["ttir"](module, {})))
  compiled = triton.compile(path, target=target, options=options)
  cubin = os.path.join(workdir, f"{kernel.name}.cubin")
  with open(cubin, "wb") as f:
    f.write(compiled.asm["cubin"])
  cuobjdump = triton_cuobjdump()
  usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
  sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
  field = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else 0
  return {"registers": field("REG"), "stack": field("STACK"), "shared": compiled.metadata.shared,
          "sass_instructions": len(_sass_instructions(sass)),
          "num_warps": kernel.num_warps, "num_stages": kernel.num_stages, **k_loop(sass)}


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
  """A cuobjdump SASS listing's instructions: (address, text without its predicate)."""
  return [(int(a, 16), re.sub(r"^@!?U?P\w+\s+", "", op))
          for a, op in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass, flags=re.M)]


def k_loop(sass: str) -> dict:
  """The K loop in a cuobjdump SASS listing: of the innermost loops (a backward branch with none
  inside its span), the longest; its instructions and their opcodes (predicates and modifiers
  dropped: `@P0 BAR.SYNC.DEFER_BLOCKING` counts as BAR). What a step costs a thread, which is what
  bounds a decode kernel that is not bound by bytes (BENCHMARKS.md)."""
  ins = _sass_instructions(sass)
  loops = [(int(m.group(1), 16), a) for a, op in ins if (m := re.match(r"BRA\s+(0x[0-9a-f]+)", op))
           and int(m.group(1), 16) <= a]
  inner = [(lo, hi) for lo, hi in loops if not any(lo <= l2 and h2 <= hi and (l2, h2) != (lo, hi) for l2, h2 in loops)]
  if not inner:
    return {"loop_instructions": 0, "loop_opcodes": {}}
  lo, hi = max(inner, key=lambda span: sum(span[0] <= a <= span[1] for a, _ in ins))
  body = [op.split()[0].split(".")[0] for a, op in ins if lo <= a <= hi]
  return {"loop_instructions": len(body), "loop_opcodes": dict(collections.Counter(body).most_common())}


def k_loop_label(row: dict) -> str:
  """k_loop's fields in a line: the loop's instructions and the opcodes that tell a decode kernel's
  cost (barriers, FMA or tensor-core work, byte permutes)."""
  ops = row["loop_opcodes"]
  return (f"K loop {row['loop_instructions']:4d} (BAR {ops.get('BAR', 0)}, FFMA {ops.get('FFMA', 0)}, "
          f"HMMA {ops.get('HMMA', 0)}, PRMT {ops.get('PRMT', 0)})")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--single", default=SINGLE, help="comma list of MxKxN single weights (empty: none)")
  ap.add_argument("--grouped", default=GROUPED, help="comma list of EXPERTSxTOPKxBATCHxKxN grouped products (empty: none)")
  ap.add_argument("--tunings", default="", help="compile each product with these LutTunings, BM/BN/BK/SPLITS[/WARPS] "
                  "comma-separated (default: the kernels' own)")
  ap.add_argument("--arch", type=int, default=90, help="SM to compile for (90: H100 / H200)")
  ap.add_argument("--out", default="", help="write the rows as JSON here")
  args = ap.parse_args()
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("pallas_offline_compile needs the triton package: pip install triton==3.6.0") from None
  cases = parse_products(args.single, args.grouped)
  tunings = parse_tunings(args.tunings)
  print(f"triton {triton.__version__}, sm_{args.arch}; jax {jax.__version__}")
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for case, tuning in itertools.product(cases, tunings):
      for kernel in product_kernels(**case, tuning=tuning):
        row = {**case, "kernel": kernel.name, **compile_kernel(kernel, args.arch, workdir)}
        if tuning:
          row["tuning"] = dataclasses.asdict(tuning)
        rows.append(row)
        label = product_label(case) + (f" {tuning_label(tuning)}" if tuning else "")
        print(f"{label:<40} {kernel.name:<26} warps {row['num_warps']:2d} stages "
              f"{row['num_stages']}  registers {row['registers']:3d}  stack {row['stack']:4d}  shared "
              f"{row['shared']:6d}  SASS {row['sass_instructions']:5d}  {k_loop_label(row)}", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
