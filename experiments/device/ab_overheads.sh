#!/usr/bin/env bash
# Same-machine A/B of this checkout's CUDA kernel against an earlier commit's, plus the kernel's own
# time under ncu (GPU image): bash experiments/device/ab_overheads.sh BASE_COMMIT OUT_DIR
# The bench's time per weight (a jitted loop over 8+ weights, XLA's graph) against ncu's duration of
# the kernel alone says what the call around the kernel costs. Each step writes into OUT_DIR as it goes.
set -u
base=$1 out=$2
shapes=(--single=4096x14336,14336x4096,4096x4096 --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,4,16)
python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { cat "$out/build.txt"; exit 1; }
timeout 200 python3 -m pytest -q tests/test_cuda_kernels.py > "$out/tests.txt" 2>&1; tail -n 3 "$out/tests.txt"
timeout 150 python3 -m experiments.bench_kernels --kernels=cuda "${shapes[@]}" --out="$out/new.json" > "$out/new.log" 2>&1
grep -E "cuda|ragged|copy" "$out/new.log"
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 ncu --clock-control none -k regex:"xs_kernel|lut_matmul_kernel" \
  --metrics gpu__time_duration.sum python3 -m experiments.profile_cuda_lut --shape=4096x14336 --ms=1,16 \
  --tunings=default,default > "$out/ncu.txt" 2>&1
grep -E "launch:|gpu__time" "$out/ncu.txt"
rm -rf /tmp/base && mkdir -p /tmp/base && git archive "$base" | tar -x -C /tmp/base && (cd /tmp/base && python3 -m cuda_kernels.build > /dev/null 2>&1 \
  && timeout 150 python3 -m experiments.bench_kernels --kernels=cuda "${shapes[@]}" --out="$out/base.json" > "$out/base.log" 2>&1)
grep -E "cuda|ragged" "$out/base.log"
# Layout 7's candidates (with and without clusters) in one run, this checkout's build.
timeout 150 python3 -m experiments.bench_kernels --kernels=cuda --cuda_sweep \
  --cuda_layouts=7 --single=4096x14336,4096x4096 --ms=1,8 --grouped= --out="$out/sweep.json" > "$out/sweep.log" 2>&1
grep -E "cuda" "$out/sweep.log" | cut -c1-120
