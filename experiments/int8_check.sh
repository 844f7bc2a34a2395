#!/usr/bin/env bash
# The int8 CUDA kernel on a GPU (device machine, from the repository root): build (no ptxas C75),
# its compiled tests and the bf16 CUDA kernel's (one library), then either the decode shapes
# beside the bf16 CUDA kernel and XLA plus greedy decoding of the small model under
# CQJAX_KERNELS=auto / cuda / int8, or (second argument `profile`) every int8 tuning at the decode
# shapes and ncu on the kernel alone at M = 1 (duration, bandwidth, occupancy, warp states):
#   bash experiments/int8_check.sh OUT_DIR [profile]
set -u
out=$1
mode=${2:-}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m cuda_kernels.build --verbose > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "C75 warnings: $(grep -c C75 "$out/build.txt")"
timeout 200 python3 -m pytest -q tests/test_cuda_lut_matmul_int8.py > "$out/tests_int8.txt" 2>&1
grep -E "^FAILED|passed|failed" "$out/tests_int8.txt" | head
timeout 120 python3 -m pytest -q tests/test_cuda_kernels.py > "$out/tests_cuda.txt" 2>&1
tail -n 1 "$out/tests_cuda.txt"
if [ "$mode" != profile ]; then
  timeout 200 python3 -m experiments.bench_kernels --kernels=cuda,int8 --single=4096x14336,14336x4096 --ms=1,4,16 \
    --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16 --decode --out="$out/bench.json" > "$out/bench.log" 2>&1
  grep -E "int8|cuda|decode" "$out/bench.log" | cut -c1-200
  exit 0
fi
timeout 240 python3 -m experiments.bench_kernels --kernels=cuda,int8 --int8_sweep \
  --single=4096x14336,14336x4096,2048x768,768x2048 --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16 \
  --out="$out/bench.json" > "$out/bench.log" 2>&1
grep -E "int8|cuda" "$out/bench.log" | cut -c1-200
for shape in 4096x14336 14336x4096; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --clock-control none -k regex:int8_kernel \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    python3 -m experiments.profile_cuda_lut --int8 --shape=$shape --ms=1 --tunings=8/1,8/1p,4/1p > "$out/ncu_$shape.txt" 2>&1
  grep -E "launch:|Duration|DRAM Throughput|Achieved Occupancy" "$out/ncu_$shape.txt" | head -30
done
