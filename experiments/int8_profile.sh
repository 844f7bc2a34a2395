#!/usr/bin/env bash
# The int8 CUDA kernel on a GPU (device machine, from the repository root): build, its compiled
# tests, the decode-shape benchmark beside the bf16 CUDA kernel (every int8 tuning), then ncu on
# the kernel alone at M = 1 (duration, bandwidth, occupancy, stall reasons):
#   bash experiments/int8_profile.sh OUT_DIR
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m cuda_kernels.build --verbose > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "C75 warnings: $(grep -c C75 "$out/build.txt")"
timeout 200 python3 -m pytest -q tests/test_cuda_lut_matmul_int8.py > "$out/tests_int8.txt" 2>&1
grep -E "^FAILED|passed|failed" "$out/tests_int8.txt" | head
timeout 240 python3 -m experiments.bench_kernels --kernels=cuda,int8 --int8_sweep --single=4096x14336,14336x4096,2048x768,768x2048 \
  --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16 --out="$out/bench.json" > "$out/bench.log" 2>&1
grep -E "int8|cuda" "$out/bench.log" | cut -c1-200
for shape in 4096x14336 14336x4096; do
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --clock-control none -k regex:"int8_kernel|lut_matmul_kernel" \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
    python3 -m experiments.profile_cuda_lut --int8 --shape=$shape --ms=1 --tunings=4/1,8/1,16/1 > "$out/ncu_$shape.txt" 2>&1
  grep -E "launch:|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Waves Per SM|Stall" "$out/ncu_$shape.txt" | head -60
done
