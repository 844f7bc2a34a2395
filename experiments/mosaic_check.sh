#!/usr/bin/env bash
# The Mosaic GPU codebook matmuls (pallas_kernels/lut_matmul_mgpu.py) on a Hopper GPU (device
# machine, from the repository root; one call, about 5 minutes): their compiled tests, then their
# default tunings timed against bf16 dot / ragged_dot and the Pallas (Triton) kernels in the same
# process (experiments/probe_mosaic_lut.py): single products of 64 to 2048 rows, grouped Mixtral and
# Qwen3 experts at prefill batches of 512 and 2048 tokens (session 63's decode rows: --ms=1,16):
#   bash experiments/mosaic_check.sh OUT_DIR
# Logs land in OUT_DIR as each part ends (a command stopped at its limit keeps what it measured).
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
quiet() { grep -vE "^[WIE][0-9]{4}|^\s*$|Warning|warnings.warn|plgpu\.|return \["; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"
timeout 100 python3 -m pytest -q -p no:cacheprovider -k compiled tests/test_lut_matmul_mgpu.py > "$out/tests.txt" 2>&1
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head; tail -n 1 "$out/tests.txt"
timeout 100 python3 -m experiments.probe_mosaic_lut --shapes=4096x14336,14336x4096 --ms=64,256,2048 --grouped= \
  --configs="default" 2>&1 | quiet | tee "$out/probe_single.txt"
timeout 80 python3 -m experiments.probe_mosaic_lut --shapes= --grouped=8x2x4096x14336,128x8x2048x768 \
  --batches=512,2048 --configs="default" 2>&1 | quiet | tee "$out/probe_grouped.txt"
