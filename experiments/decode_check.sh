#!/usr/bin/env bash
# Where a decode step's time goes on a GPU (device machine, from the repository root; one call of
# under 10 min each): build, the expert slots' compiled test, the kernels of one decode step of the
# small architecture from jax.profiler (bf16 and 4-bit under each kernel setting) and decode
# tokens/s against bf16 in the same run; then the expert slots (XLA against the one-warp kernel)
# and a grouped call's kernels (no ncu). With `fused` the same step and decode with q/k/v and
# gate/up fused in both models (cqjax.fuse_projections) instead of the slots and the grouped call:
#   bash experiments/decode_check.sh OUT_DIR [fused]
set -u
out=$1
fused=${2:+--fused}
tag=${2:+_fused}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -m cuda_kernels.build > "$out/build.txt" 2>&1 || { tail -30 "$out/build.txt"; exit 1; }
timeout 240 python3 -m experiments.profile_decode_step --batches=1,16 --trace_tokens=16 --top=10 $fused \
  --out="$out/decode_step$tag.json" > "$out/decode_step$tag.log" 2>&1
grep -vE "^[WIE][0-9]{4}" "$out/decode_step$tag.log" | cut -c1-160
timeout 150 python3 -m experiments.bench_kernels --single= --grouped= --decode $fused \
  --out="$out/decode$tag.json" > "$out/decode$tag.log" 2>&1
grep "decode small" "$out/decode$tag.log"
[ -n "$fused" ] && exit 0
timeout 60 python3 -m pytest -q tests/test_cuda_expert_slots.py 2>&1 | tail -n 1
timeout 60 python3 -m experiments.bench_expert_slots --out="$out/slots.json" 2>&1 | grep -E "^experts=" | cut -c1-200
timeout 60 python3 -m experiments.profile_cuda_lut --int8 --shape=2048x768 --experts=128 --top_k=8 --ms=1,16 --trace=20 \
  2>&1 | grep -vE "^[WIE][0-9]{4}" | cut -c1-160
