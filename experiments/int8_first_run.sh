#!/usr/bin/env bash
# The int8 CUDA kernel's first run on a GPU (device machine, from the repository root): build (no
# ptxas C75), its compiled tests, the bf16 CUDA kernel's compiled tests (both share the library),
# then the int8 kernel beside the bf16 CUDA kernel and XLA at the decode shapes, every int8 tuning
# tried on single weights:
#   bash experiments/int8_first_run.sh OUT_DIR
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m cuda_kernels.build --verbose > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
echo "C75 warnings: $(grep -c C75 "$out/build.txt")"
timeout 200 python3 -m pytest -q -x tests/test_cuda_lut_matmul_int8.py > "$out/tests_int8.txt" 2>&1
tail -n 20 "$out/tests_int8.txt"
timeout 150 python3 -m pytest -q tests/test_cuda_kernels.py > "$out/tests_cuda.txt" 2>&1
tail -n 1 "$out/tests_cuda.txt"
timeout 330 python3 -m experiments.bench_kernels --kernels=cuda,int8 --int8_sweep --single=4096x14336,14336x4096 \
  --ms=1,4,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16 --out="$out/bench.json" > "$out/bench.log" 2>&1
grep -E "copy|int8|cuda" "$out/bench.log" | cut -c1-230
