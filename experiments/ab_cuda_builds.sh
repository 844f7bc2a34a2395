#!/usr/bin/env bash
# Same-machine comparison of this checkout's CUDA kernel with an earlier commit's (GPU image):
#   bash experiments/ab_cuda_builds.sh BASE_COMMIT OUT_DIR [SWEEP_LAYOUTS, e.g. 7 or 7,5]
# Builds this checkout's kernel and runs its compiled tests; times its default tunings on the
# Mixtral, Qwen3 and attention shapes; times the kernel alone under ncu (against the bench's time
# per weight, what the call around it costs: XLA zeroing the split counters, launch gaps); builds
# and times the earlier commit's defaults; then sweeps this checkout's tunings (of SWEEP_LAYOUTS
# only, if given). Each step runs under a timeout (a kernel that hangs costs only its own step)
# and writes into OUT_DIR as it goes.
set -u
base=$1 out=$2 layouts=${3:-}
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
timeout 150 python3 -m experiments.bench_kernels --kernels=cuda --cuda_sweep ${layouts:+--cuda_layouts=$layouts} \
  --single=4096x14336,4096x4096 --ms=1,8 --grouped= --out="$out/sweep.json" > "$out/sweep.log" 2>&1
grep -E "cuda" "$out/sweep.log" | cut -c1-120
