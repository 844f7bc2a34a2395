#!/usr/bin/env bash
# The bit-plane kernel on a GPU (device machine, from the repository root), in two steps that fit
# the device's 10-minute calls: `test` builds, runs the compiled tests of the bit-plane and
# profile_cuda_lut files and benchmarks the kernel on weights as stored and laid out ahead beside
# the int8 kernel; `trace` (after `test`, on the same machine) traces per_warp at the decode shapes
# (one row of each Mixtral expert shape, Mixtral grouped at batch 1), both weight forms; `ncu` (the
# library built first if absent) profiles the laid-out kernel's stalls, occupancy and hottest SASS,
# `ncu_full` one launch with every ncu section (memory and L2 traffic, scheduler, warp states):
#   bash experiments/bitplane_check.sh OUT_DIR test|trace|ncu|ncu_full
set -u
out=$1 step=$2
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if [ "$step" = ncu ]; then  # the laid-out kernel under ncu at one row of 4096x14336 and Mixtral's batch 1
  [ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || exit 1
  stalls=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard wait \
    math_pipe_throttle barrier not_selected lg_throttle mio_throttle no_instruction dispatch_stall selected branch_resolving)
  for spec in "one_row --experts=1 --top_k=1 --shape=4096x14336" "mixtral_b1 --experts=8 --top_k=2 --shape=4096x14336"; do
    name=ncu_${spec%% *} args=${spec#* }
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 ncu --clock-control none -k regex:bitplane_kernel -c 2 \
      --metrics "${stalls}smsp__inst_executed.sum,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__registers_per_thread,launch__grid_size" \
      --section SourceCounters -f -o "$out/$name" python3 -m experiments.profile_cuda_lut --bitplane --laid_out $args \
      --ms=1 > "$out/${name}_run.txt" 2>&1
    ncu -i "$out/$name.ncu-rep" --page details > "$out/$name.txt" 2>&1
    ncu -i "$out/$name.ncu-rep" --page source --print-source sass --csv > "$out/${name}_source.csv" 2>&1
    grep -E "smsp__|sm__|gpu__time|dram__|launch__" "$out/$name.txt" | tr -s ' ' | sed "s/^/$name /"
    python3 -m experiments.ncu_source_summary "$out/${name}_source.csv" --top 8 | sed "s/^/$name /"
  done
  exit 0
fi
if [ "$step" = ncu_full ]; then  # every ncu section of one laid-out launch at one row of 4096x14336
  [ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || exit 1
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 300 ncu --clock-control none -k regex:bitplane_kernel -s 2 -c 1 \
    --set full -f -o "$out/ncu_full" python3 -m experiments.profile_cuda_lut --bitplane --laid_out --experts=1 \
    --top_k=1 --shape=4096x14336 --ms=1 > "$out/ncu_full_run.txt" 2>&1
  ncu -i "$out/ncu_full.ncu-rep" --page details > "$out/ncu_full.txt" 2>&1
  grep -E "^  Section:|Throughput|Busy|Hit Rate|Bandwidth|Eligible|Active Warps|Issued Warp|Occupancy|Duration" \
    "$out/ncu_full.txt" | tr -s ' ' | head -60
  exit 0
fi
if [ "$step" = trace ]; then
  for form in "" --laid_out; do
    for args in "--experts=1 --top_k=1 --shape=4096x14336" "--experts=1 --top_k=1 --shape=14336x4096" \
                "--experts=8 --top_k=2 --shape=4096x14336"; do
      timeout 80 python3 -m experiments.profile_cuda_lut --bitplane $form $args --ms=1 --tunings=default,1,2,4,8 \
        --trace=10 >> "$out/traces$form.txt" 2>&1
    done
  done
  grep -E "launch:|bitplane_kernel|taking|Error" "$out"/traces*.txt | cut -c1-150
  exit 0
fi
python3 -m cuda_kernels.build --verbose > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
timeout 240 python3 -m pytest -q tests/test_cuda_lut_matmul_bitplane.py tests/test_profile_cuda_lut.py \
  > "$out/tests_cuda.txt" 2>&1
grep -E "^FAILED|^E  " "$out/tests_cuda.txt" | head -20
tail -n 1 "$out/tests_cuda.txt"
timeout 260 python3 -m experiments.bench_kernels --kernels=int8,bitplane,bitplane_laid_out --single=4096x14336,14336x4096,4096x4096 \
  --ms=1,2 --grouped=all --batches=1,4 --out="$out/bench.json" > "$out/bench.log" 2>&1
grep -E "int8|bitplane|copy" "$out/bench.log" | cut -c1-170
