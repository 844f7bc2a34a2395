#!/usr/bin/env bash
# Same-machine comparison of this checkout's CUDA kernel with an earlier commit's (GPU image):
#   bash experiments/ab_cuda_builds.sh BASE_COMMIT OUT_DIR
# Builds both, runs this checkout's compiled tests, then the default tunings of both (and this
# checkout's sweep) on the Mixtral and Qwen3 shapes; every step writes into OUT_DIR as it goes.
set -u
base=$1 out=$2 repo=$PWD
shapes=(--single=4096x14336,14336x4096 --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768 --batches=1,16)
python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { cat "$out/build.txt"; exit 1; }
python3 -m pytest -q tests/test_cuda_kernels.py > "$out/tests.txt" 2>&1; tail -n 2 "$out/tests.txt"
python3 -m experiments.bench_kernels --kernels=cuda --cuda_sweep "${shapes[@]}" --out="$out/new.json" > "$out/new.log" 2>&1
grep -E "cuda|ragged" "$out/new.log"
mkdir -p /tmp/base && git archive "$base" | tar -x -C /tmp/base && cd /tmp/base && python3 -m cuda_kernels.build > /dev/null 2>&1 \
  && python3 -m experiments.bench_kernels --kernels=cuda "${shapes[@]}" --out="$out/base.json" > "$out/base.log" 2>&1
grep -E "cuda|ragged" "$out/base.log"
cd "$repo"
