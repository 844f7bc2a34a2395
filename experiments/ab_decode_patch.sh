#!/usr/bin/env bash
# Same-machine comparison of decoding with this checkout against the same tree with a patch applied
# (GPU image, from the repository root; each part well under the device's 10 minutes a command):
#   bash experiments/ab_decode_patch.sh PATCH[,PATCH...] OUT_DIR [PARTS]
# (several patches are applied in order). Both trees get the CUDA library, built here first if absent,
# and built again in the patched tree where a patch changes cuda_kernels' CUDA sources.
# PARTS, a comma list (default tests,decode):
#   tests    the patched tree's compiled tests (AB_TESTS, default tests/test_pallas_kernels.py)
#   decode   both trees, alternately AB_ROUNDS times (default 1): one decode step's launches and its
#            kernels per token from jax.profiler (experiments.profile_decode_step; AB_PROFILE=0
#            leaves it out), then decode tokens/s against bf16 (bench_kernels --decode), for
#            AB_SETTINGS (default codebook_w4: the default kernels; at the small architecture's
#            shapes those are Pallas' whether or not the CUDA library is built, cqjax.lut_matmul),
#            AB_ARCH (default small; qwen3-layers, mixtral-layers), AB_BATCHES (default 1,16) and
#            AB_ACT_BITS (default 0; 4: W4A4) in AB_ACT_SCOPE (default official; full)
#   kernels  both trees: the kernels AB_KERNELS (bench_kernels --kernels, default pallas) alone,
#            each against XLA in its own run: single weights AB_SINGLE (default
#            4096x14336,14336x4096; empty: none) at M = AB_MS (default 1,16,128), grouped AB_GROUPED
#            (default Mixtral's experts and both Qwen3 products) at batches AB_KERNEL_BATCHES
#            (default 1,16)
#   sweeps   both trees: block shapes beside the defaults (for a patch to a path no default takes):
#            the Mixtral single weights at M = AB_SWEEP_MS (default 2,4), and AB_GROUPED at batches
#            AB_SWEEP_BATCHES (default 4,16) (bench_kernels --sweep, --grouped_sweep)
#   ncu      both trees under ncu: the Pallas kernel once at AB_NCU_SHAPE (default 4096x14336)
#            for AB_NCU_M rows (default 1), default tuning (experiments.profile_cuda_lut --pallas;
#            AB_NCU_FLAGS adds to it, e.g. --experts=8 --top_k=2): time, DRAM throughput, occupancy,
#            stall reasons per issued instruction, each pipe's busy cycles and instructions, and the
#            source page (stall samples per SASS instruction; experiments/ncu_source_summary); the
#            first AB_NCU_LINES (default 80) nonzero metric lines of each tree printed
# Results (JSON a part, tree and round; the patched tests' log) land in OUT_DIR/ab_decode.tar.gz,
# written again after every step (the device tool returns only a few files, and a command stopped
# at its time limit keeps what it measured); the summary on stdout.
set -u
patches=() && for p in ${1//,/ }; do patches+=("$(realpath "$p")"); done
dest=$(realpath "$2") parts=${3:-tests,decode}
settings=${AB_SETTINGS:-codebook_w4}
arch=${AB_ARCH:-small} batches=${AB_BATCHES:-1,16} act_bits=${AB_ACT_BITS:-0} act_scope=${AB_ACT_SCOPE:-official}
out=/tmp/ab_decode
rm -rf /tmp/ab_decode_patched "$out" && mkdir -p "$dest" "$out" /tmp/ab_decode_patched
save() { tar -czf "$dest/ab_decode.tar.gz.tmp" -C /tmp ab_decode && mv "$dest/ab_decode.tar.gz.tmp" "$dest/ab_decode.tar.gz"; }
export PYTHONUNBUFFERED=1
[ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { tail "$out/build.txt"; exit 1; }
tar --exclude=.git --exclude=.venv -c . | tar -x -C /tmp/ab_decode_patched || exit 1
for p in "${patches[@]}"; do (cd /tmp/ab_decode_patched && patch -p1 -s < "$p") || { echo "$p does not apply"; exit 1; }; done
if grep -qE '^\+\+\+ b/cuda_kernels/.*\.(cu|cuh)' "${patches[@]}"; then
  (cd /tmp/ab_decode_patched && python3 -m cuda_kernels.build > "$out/build_patched.txt" 2>&1) || { tail "$out/build_patched.txt"; exit 1; }
fi
declare -A tree=([base]=$PWD [patched]=/tmp/ab_decode_patched)
quiet() { grep -vE "^[WIE][0-9]{4}|^\s*$" | cut -c1-170; }
if [[ ,$parts, == *,tests,* ]]; then
  (cd /tmp/ab_decode_patched && PYTHONPATH=$PWD timeout 300 python3 -m pytest -q -p no:cacheprovider \
    ${AB_TESTS:-tests/test_pallas_kernels.py} > "$out/tests_patched.txt" 2>&1)
  grep -E "^(FAILED|ERROR)" "$out/tests_patched.txt" | head; tail -n 1 "$out/tests_patched.txt"
  save
fi
if [[ ,$parts, == *,decode,* ]]; then
  for round in $(seq "${AB_ROUNDS:-1}"); do for name in base patched; do
    echo "== $name (round $round)"
    [ "${AB_PROFILE:-1}" = 0 ] || (cd "${tree[$name]}" && PYTHONPATH=$PWD timeout 150 python3 -m \
      experiments.profile_decode_step --arch="$arch" --batches="$batches" --act_bits="$act_bits" --act_scope="$act_scope" --trace_tokens=16 \
      --top=6 --settings="$settings" --out="$out/decode_step_${name}_$round.json" 2>&1 | quiet)
    (cd "${tree[$name]}" && PYTHONPATH=$PWD timeout 240 python3 -m experiments.bench_kernels --single= --grouped= \
      --decode --decode_arch="$arch" --decode_batches="$batches" --decode_act_bits="$act_bits" \
      --decode_act_scope="$act_scope" --decode_settings="$settings" --out="$out/decode_${name}_$round.json" 2>&1 | grep "^decode")
    save
  done; done
fi
bench_both() {  # PART PATTERN ARGS...: bench_kernels ARGS in both trees, lines matching PATTERN shown
  local part=$1 pattern=$2 name
  shift 2
  for name in base patched; do
    echo "== $name"
    (cd "${tree[$name]}" && PYTHONPATH=$PWD timeout 270 python3 -m experiments.bench_kernels "$@" \
      --out="$out/${part}_$name.json" 2>&1 | grep -E "$pattern" | cut -c1-400)
    save
  done
}
grouped=${AB_GROUPED:-mixtral-4096x14336,qwen3-2048x768,qwen3-768x2048}
if [[ ,$parts, == *,kernels,* ]]; then
  kernels=${AB_KERNELS:-pallas}
  bench_both kernels "${kernels//,/|}|ragged|copy" --kernels="$kernels" --single=${AB_SINGLE-4096x14336,14336x4096} \
    --ms=${AB_MS:-1,16,128} --grouped="$grouped" --batches=${AB_KERNEL_BATCHES:-1,16}
fi
if [[ ,$parts, == *,sweeps,* ]]; then
  bench_both sweeps "tunings|M=" --kernels=pallas --single= --sweep --sweep_ms=${AB_SWEEP_MS:-2,4} --grouped_sweep \
    --batches=${AB_SWEEP_BATCHES:-4,16} --grouped="$grouped"
fi
if [[ ,$parts, == *,ncu,* ]]; then
  stalls=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard wait \
    math_pipe_throttle barrier not_selected lg_throttle mio_throttle no_instruction dispatch_stall selected branch_resolving)
  pipes='regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active,regex:sm__inst_executed_pipe_[a-z_]*\.sum$'
  for name in base patched; do
    (cd "${tree[$name]}" && PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" timeout 200 ncu --clock-control none \
      -k regex:cqjax_ --section SpeedOfLight --section Occupancy --section ComputeWorkloadAnalysis \
      --section InstructionStats --section MemoryWorkloadAnalysis --section SourceCounters -f -o "$out/ncu_$name" \
      --metrics "${stalls}smsp__inst_executed.sum,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,$pipes" \
      python3 -m experiments.profile_cuda_lut --pallas --shape="${AB_NCU_SHAPE:-4096x14336}" --ms="${AB_NCU_M:-1}" \
      ${AB_NCU_FLAGS:-} > "$out/ncu_run_$name.txt" 2>&1)
    ncu -i "$out/ncu_$name.ncu-rep" --page details > "$out/ncu_$name.txt" 2>&1
    ncu -i "$out/ncu_$name.ncu-rep" --page source --print-source sass --csv > "$out/ncu_source_$name.csv" 2>&1
    grep -E "cqjax|smsp__|sm__|gpu__time|dram__|Duration|Throughput|Block Limit Registers|Achieved Occupancy|Active Cycles" \
      "$out/ncu_$name.txt" | grep -vE " 0$| 0\.00$" | tr -s ' ' | sed "s/^/$name /" | head -${AB_NCU_LINES:-80}
    PYTHONPATH=$PWD python3 -m experiments.ncu_source_summary "$out/ncu_source_$name.csv" --top 8 | sed "s/^/$name /"
    save
  done
fi
