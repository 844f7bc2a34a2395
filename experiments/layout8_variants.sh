#!/usr/bin/env bash
# Layout 8 (Hopper prefill) at other stage counts, each built from a copy of this checkout with
# kWgStages set and two blocks an SM asked of ptxas (one and two warpgroups a block), then checked
# by the compiled prefill tests and swept at the Mixtral expert shapes (GPU image):
#   bash experiments/layout8_variants.sh OUT_DIR STAGES...      e.g. OUT_DIR 5 4
# Fewer stages free shared memory for a second block an SM (8 stages of 128 rows: 164 KB).
set -u
out=$1
shift
for stages in "$@"; do
  dir=/tmp/layout8-stages$stages
  rm -rf "$dir" && mkdir -p "$dir" && tar --exclude=.git -cf - . | tar -xf - -C "$dir"
  sed -i -e "s/kWgStages = [0-9]*;/kWgStages = $stages;/" \
    -e "s/__launch_bounds__(128 \* WG) wg_kernel/__launch_bounds__(128 * WG, WG == 4 ? 1 : 2) wg_kernel/" \
    "$dir/cuda_kernels/lut_matmul.cu"
  grep -c "kWgStages = $stages;" "$dir/cuda_kernels/lut_matmul.cu" > /dev/null || { echo "stages $stages: sed missed"; exit 1; }
  (cd "$dir" && python3 -m cuda_kernels.build --verbose > "$out/build_stages$stages.txt" 2>&1) || { tail -20 "$out/build_stages$stages.txt"; continue; }
  echo "stages $stages: C75 warnings $(grep -c C75 "$out/build_stages$stages.txt")"
  (cd "$dir" && timeout 120 python3 -m pytest -q tests/test_cuda_kernels.py -k "prefill or tunings_compute or run" \
    > "$out/tests_stages$stages.txt" 2>&1; tail -n 1 "$out/tests_stages$stages.txt")
  (cd "$dir" && timeout 200 python3 -m experiments.bench_kernels --kernels=cuda --cuda_sweep --cuda_layouts=8 \
    --single=4096x14336,14336x4096 --ms=64,128 --grouped= --out="$out/sweep_stages$stages.json" > "$out/sweep_stages$stages.log" 2>&1)
  grep -E "M=" "$out/sweep_stages$stages.log" | cut -c1-60,100-
done
