#!/usr/bin/env bash
# Decode with the whole token loop in XLA's command buffers (CUDA graphs) against XLA's defaults, on
# one GPU (device machine, from the repository root; well under 10 minutes):
#   bash experiments/decode_graphs.sh OUT_DIR [ROUNDS]   (DECODE_SETTINGS: bench_kernels --decode_settings, default all)
# The decode step is bound by its launches (BENCHMARKS.md session 37). XLA's default command
# buffers hold runs of fusions and custom calls but not a while loop; with WHILE (and CONDITIONAL)
# added, `generate`'s scan of steps can become one graph launch a call. Each round times
# `bench_kernels --decode` (bf16 and every 4-bit setting, batch 1 and 16) under the defaults, then
# under the wider command buffers (XLA_FLAGS is read once a process, so one process each); the CUDA
# library is built first if absent. Compiled without a GPU (session 39, jax 0.10.2's XLA for an H200,
# experiments.compile_only_gpu), the defaults already put each step's kernels in one command buffer,
# and WHILE did not take the loop itself in (a compile-only device may not claim the driver's
# conditional nodes): this run says what 0.11.2 does on the GPU;
# results in OUT_DIR/decode_{default,while}_<round>.json, the summary on stdout.
set -u
out=$1 rounds=${2:-1}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
[ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { tail "$out/build.txt"; exit 1; }
while_flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
for round in $(seq "$rounds"); do
  for name in default while; do
    flags=""
    [ "$name" = while ] && flags=$while_flags
    echo "== $name (round $round) ${flags}"
    # A run's first process compiles the Triton kernels (Triton's cache serves the rest); a failure shows its tail.
    # XLA reads a flags value not starting with "--" (even " ") as a file name: set only what is there.
    xf=$(echo ${XLA_FLAGS:-} $flags)
    (if [ -n "$xf" ]; then export XLA_FLAGS=$xf; else unset XLA_FLAGS; fi
     timeout 300 python3 -m experiments.bench_kernels --single= --grouped= --decode \
      --decode_settings="${DECODE_SETTINGS:-all}" --out="$out/decode_${name}_$round.json" > "$out/decode_${name}_$round.log" 2>&1)
    grep "decode small" "$out/decode_${name}_$round.log" || tail -n 5 "$out/decode_${name}_$round.log"
  done
done
