#!/usr/bin/env bash
# The Mosaic GPU probe (experiments/probe_mosaic_lut.py) on a Hopper GPU (device machine, from the
# repository root; one call, about 5 minutes): its compiled tests, then its timings against bf16
# dot / ragged_dot and the Pallas (Triton) kernels in the same process (single products at
# M = 1, 16, 128, grouped Mixtral and Qwen3 experts at batches 1 and 16), then codebooks over
# column groups of 128 inputs at M = 1, 16:
#   bash experiments/mosaic_check.sh OUT_DIR
# Logs land in OUT_DIR as each part ends (a command stopped at its limit keeps what it measured).
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
quiet() { grep -vE "^[WIE][0-9]{4}|^\s*$|UserWarning|warnings.warn"; }
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_probe_mosaic_lut.py > "$out/tests.txt" 2>&1
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head; tail -n 1 "$out/tests.txt"
timeout 240 python3 -m experiments.probe_mosaic_lut 2>&1 | quiet | tee "$out/probe.txt"
timeout 90 python3 -m experiments.probe_mosaic_lut --shapes=4096x14336 --ms=1,16 --grouped= --group_size=128 \
  --configs="select:64,128,2,1;prmt:64,128,2,1;prmt:64,128,4,1" 2>&1 | quiet | tee "$out/probe_groups.txt"
