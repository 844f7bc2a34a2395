#!/usr/bin/env bash
# The bit-plane kernel on a GPU (device machine, from the repository root): build, the compiled
# tests of the bit-plane, int8 and profile_cuda_lut files, per_warp traced at the decode shapes
# (one row of each Mixtral expert shape, Mixtral and Qwen3 grouped at batch 1), and the benchmark
# beside the int8 kernel:
#   bash experiments/bitplane_check.sh OUT_DIR
set -u
out=$1
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m cuda_kernels.build --verbose > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
timeout 220 python3 -m pytest -q -x tests/test_cuda_lut_matmul_bitplane.py tests/test_cuda_lut_matmul_int8.py \
  tests/test_profile_cuda_lut.py > "$out/tests_cuda.txt" 2>&1
grep -E "^FAILED|^E  " "$out/tests_cuda.txt" | head -20
tail -n 1 "$out/tests_cuda.txt"
for args in "--experts=1 --top_k=1 --shape=4096x14336" "--experts=1 --top_k=1 --shape=14336x4096" \
            "--experts=8 --top_k=2 --shape=4096x14336" "--experts=128 --top_k=8 --shape=2048x768"; do
  timeout 60 python3 -m experiments.profile_cuda_lut --bitplane $args --ms=1 --tunings=default,1,2,4,8,16 \
    --trace=10 >> "$out/traces.txt" 2>&1
done
grep -E "launch:|bitplane_kernel|taking|Error" "$out/traces.txt" | cut -c1-150
timeout 200 python3 -m experiments.bench_kernels --kernels=int8,bitplane --single=4096x14336,14336x4096,4096x4096 \
  --ms=1,2 --grouped=all --batches=1,4 --out="$out/bench.json" > "$out/bench.log" 2>&1
grep -E "int8|bitplane|copy" "$out/bench.log" | cut -c1-170
