#!/usr/bin/env bash
# The Mosaic GPU codebook matmuls (pallas_kernels/lut_matmul_mgpu.py) on a Hopper GPU (device
# machine, from the repository root; one call, under 10 minutes): their compiled tests, then
# bench_kernels' timings of them beside the Pallas (Triton) and CUDA kernels and XLA's bf16 dot /
# ragged_dot in the same process, from decode to prefill rows (the CUDA library built first):
#   bash experiments/mosaic_check.sh OUT_DIR
# Session 63's probe of the kernels' tunings: python3 -m experiments.probe_mosaic_lut --configs=...
# Logs land in OUT_DIR as each part ends (a command stopped at its limit keeps what it measured).
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
quiet() { grep -vE "^[WIE][0-9]{4}|^\s*$|Warning|warnings.warn|plgpu\.|return \["; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -k "compiled or dispatch" tests/test_lut_matmul_mgpu.py \
  > "$out/tests.txt" 2>&1
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head; tail -n 1 "$out/tests.txt"
timeout 150 python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || tail -n 5 "$out/build.txt"
timeout 300 python3 -m experiments.bench_kernels --single=4096x14336,14336x4096,4096x4096 --ms=1,16,64,128,256,512,2048 \
  --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16,64,512 --kernels=pallas,cuda,mosaic \
  --out="$out/bench.json" 2>&1 | quiet | tee "$out/bench.txt"
