#!/usr/bin/env bash
# Same-machine comparison of the int8 CUDA kernel as checked out against the same tree with a patch
# applied (GPU image, from the repository root):
#   bash experiments/ab_int8_patch.sh PATCH OUT_DIR [ROUNDS]
# Builds both (the patched one with ptxas -v: registers, spills), runs the patched kernel's compiled
# tests, writes both SASS of int8_kernel<8, 1>, profiles both at AB_M rows on one weight (AB_SHAPE) under
# ncu (time, DRAM, instructions executed, stall reasons per issued instruction),
# then times both at the decode shapes, each against XLA in its own run, ROUNDS times alternately
# (default 1; the small Qwen3 shapes vary by 2x between runs of one build). ncu also writes the
# source page: samples of each stall reason per SASS instruction (where in the loop warps wait;
# experiments/ncu_source_summary.py prints the largest).
# Env: AB_SHAPE (ncu's weight, default 4096x14336), AB_M (its rows, default 1), AB_TUNING (its
# tuning as bench_kernels spells it, Int8Tuning.spec: 8/1p, 4/16w2; default: each tree's own),
# AB_BENCH_FLAGS (added to bench_kernels, later flags winning: --int8_sweep, --grouped= ...),
# AB_PATCHED_FLAGS (added to the patched tree's bench only: tunings only it has, e.g.
# --int8_tunings=4/8w2), AB_NCU_FLAGS (added to both trees' profile_cuda_lut, e.g. --experts=128
# --top_k=8: the grouped kernel), AB_PATCHED_NCU_FLAGS (the patched tree's only), AB_TESTS (the
# patched tree's compiled test files, default tests/test_cuda_lut_matmul_int8.py). Everything lands in OUT_DIR/ab_int8.tar.gz (the device tool
# returns only a few files) and the summary on stdout.
set -u
patch_file=$(realpath "$1") dest=$(realpath "$2") rounds=${3:-1}
out=$dest/ab_int8
mkdir -p "$out" /tmp/ab_patched
trap 'tar -czf "$dest/ab_int8.tar.gz" -C "$dest" ab_int8 && rm -rf "$out"' EXIT
export PYTHONUNBUFFERED=1
tar --exclude=.git -c . | tar -x -C /tmp/ab_patched && (cd /tmp/ab_patched && patch -p1 -s < "$patch_file") || exit 1
PYTHONPATH=$PWD python3 -m cuda_kernels.build > "$out/build_base.txt" 2>&1 &
(cd /tmp/ab_patched && PYTHONPATH=$PWD python3 -m cuda_kernels.build --verbose > "$out/build_patched.txt" 2>&1)
wait
echo "patched build: $(grep -c C75 "$out/build_patched.txt") C75 warnings, $(ls /tmp/ab_patched/cuda_kernels/*.so)"
(cd /tmp/ab_patched && PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -p no:cacheprovider ${AB_TESTS:-tests/test_cuda_lut_matmul_int8.py} \
  > "$out/tests_patched.txt" 2>&1); grep -E "^FAILED|passed|failed" "$out/tests_patched.txt" | head
stalls=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard wait \
  math_pipe_throttle barrier not_selected lg_throttle mio_throttle no_instruction dispatch_stall selected branch_resolving)
declare -A tree=([base]=$PWD [patched]=/tmp/ab_patched)
for name in base patched; do
  cuobjdump --dump-sass "${tree[$name]}/cuda_kernels/_lut_matmul_cuda.so" \
    | awk '/Function :/{f = index($0, "int8_kernelILi8ELi1E") > 0} f' > "$out/sass81_$name.txt"
  (cd "${tree[$name]}" && PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 100 ncu --clock-control none -k 'regex:(int8|wg8)_kernel' \
    --metrics "${stalls}smsp__inst_executed.sum,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed" \
    --section SourceCounters -f -o "$out/ncu_$name" \
    python3 -m experiments.profile_cuda_lut --int8 --shape="${AB_SHAPE:-4096x14336}" --ms="${AB_M:-1}" --tunings="${AB_TUNING:-default}" ${AB_NCU_FLAGS:-} \
    $([ $name = patched ] && echo "${AB_PATCHED_NCU_FLAGS:-}") > "$out/ncu_run_$name.txt" 2>&1)
  ncu -i "$out/ncu_$name.ncu-rep" --page details > "$out/ncu_$name.txt" 2>&1
  ncu -i "$out/ncu_$name.ncu-rep" --page source --print-source sass --csv > "$out/ncu_source_$name.csv" 2>&1
  grep -E "smsp__|gpu__time|dram__" "$out/ncu_$name.txt" | tr -s ' ' | sed "s/^/$name /"
  PYTHONPATH=$PWD python3 -m experiments.ncu_source_summary "$out/ncu_source_$name.csv" --top 6 | sed "s/^/$name /"
done
for round in $(seq "$rounds"); do
  for name in base patched; do
    (cd "${tree[$name]}" && PYTHONPATH=$PWD timeout 200 python3 -m experiments.bench_kernels --kernels=int8 --single=4096x14336,14336x4096 \
      --ms=1,16 --grouped=mixtral-4096x14336,qwen3-2048x768,qwen3-768x2048 --batches=1,16 ${AB_BENCH_FLAGS:-} \
      $([ $name = patched ] && echo "${AB_PATCHED_FLAGS:-}") --out="$out/bench_$name$round.json" \
      > "$out/bench_$name$round.log" 2>&1)
    grep -E "int8" "$out/bench_$name$round.log" | cut -c1-110 | sed "s/^/$name$round /"
  done
done
