#!/usr/bin/env bash
# A/B of a change on one machine (a device call): runs a bench_kernels command on this tree (main)
# and with PATCH applied (cand), in turn, ROUNDS times each, so that the machine's drift falls on
# both sides. Each run's output goes to /tmp/NAME/{main,cand}_ROUND.{txt,json} (the command gets
# `--out` appended) and /tmp/NAME is tarred to $OUT/NAME.tgz after every run, so a call cut off by
# the device's time limit still returns what ran. The tree is restored on exit.
#   bash experiments/ab_patch.sh NAME PATCH ROUNDS python3 -m experiments.bench_kernels --decode ...
# PATCH: `git diff` output (applied with git apply, else patch -p1). Builds the CUDA library first
# where it is missing.
set -u
[ $# -ge 4 ] || { echo "usage: $0 NAME PATCH ROUNDS COMMAND..." >&2; exit 2; }
name=$1 patch=$2 rounds=$3; shift 3
[ -f "$patch" ] || { echo "ab_patch: no patch file $patch" >&2; exit 2; }
if command -v git > /dev/null; then
  apply() { git apply "$@" "$patch"; }; check() { git apply --check "$patch"; }
else
  apply() { patch -s -p1 "$@" < "$patch"; }; check() { patch -s -p1 --dry-run < "$patch" > /dev/null; }
fi
R=/tmp/$name; mkdir -p "$R"
if [ ! -f cuda_kernels/_lut_matmul_cuda.so ]; then
  python3 -m cuda_kernels.build > "$R/build.txt" 2>&1 || { tail "$R/build.txt"; exit 3; }
fi
check || { echo "ab_patch: $patch does not apply" >&2; exit 2; }
applied=0
trap '[ $applied = 1 ] && apply -R' EXIT
for r in $(seq "$rounds"); do
  for side in main cand; do
    if [ $side = cand ]; then apply && applied=1; fi
    "$@" --out "$R/${side}_$r.json" > "$R/${side}_$r.txt" 2>&1
    echo "$side $r: $(grep -h '^decode' "$R/${side}_$r.txt" | tr '\n' ' ')"
    if [ $side = cand ]; then apply -R && applied=0; fi
    [ -n "${OUT:-}" ] && tar czf "$OUT/$name.tgz" -C /tmp "$name"
  done
done
