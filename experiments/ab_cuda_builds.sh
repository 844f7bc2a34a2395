#!/usr/bin/env bash
# Same-machine comparison of this checkout's CUDA kernel with an earlier commit's (GPU image):
#   bash experiments/ab_cuda_builds.sh BASE_COMMIT OUT_DIR
# Times this checkout's default tunings on the Mixtral and Qwen3 shapes, runs its compiled tests,
# times the earlier commit's defaults, then this checkout's tuning sweep. Each step runs under a
# timeout (a kernel that hangs costs only its own step) and writes into OUT_DIR as it goes.
set -u
base=$1 out=$2
shapes=(--single=4096x14336,14336x4096 --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16)
python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { cat "$out/build.txt"; exit 1; }
timeout 100 python3 -m experiments.bench_kernels --kernels=cuda "${shapes[@]}" --out="$out/new.json" > "$out/new.log" 2>&1
grep -E "cuda|ragged" "$out/new.log"
timeout 200 python3 -m pytest -q tests/test_cuda_kernels.py > "$out/tests.txt" 2>&1; tail -n 3 "$out/tests.txt"
mkdir -p /tmp/base && git archive "$base" | tar -x -C /tmp/base && (cd /tmp/base && python3 -m cuda_kernels.build > /dev/null 2>&1 \
  && timeout 100 python3 -m experiments.bench_kernels --kernels=cuda "${shapes[@]}" --out="$out/base.json" > "$out/base.log" 2>&1)
grep -E "cuda|ragged" "$out/base.log"
timeout 150 python3 -m experiments.bench_kernels --kernels=cuda --cuda_sweep --single=4096x14336,14336x4096 --ms=1,16 \
  --grouped= --out="$out/sweep.json" > "$out/sweep.log" 2>&1
grep -E "cuda" "$out/sweep.log"
