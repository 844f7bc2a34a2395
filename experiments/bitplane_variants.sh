#!/usr/bin/env bash
# Bit-plane kernel patches measured side by side on one GPU (device machine, from the repository
# root): each variant is a copy of this tree with a '+'-joined stack of experiments/*.patch applied
# ('-' for none: traced at the default tuning only), built and traced at the decode shapes with
# weights laid out ahead; `test` also runs the compiled bit-plane tests in the last variant.
#   bash experiments/bitplane_variants.sh OUT_DIR TUNINGS VARIANT... [test]
# VARIANT_MS sets the rows (grouped: the batches) traced, default 1.
#   e.g. VARIANT_MS=1,4,16 bash experiments/bitplane_variants.sh out default - PATCH test
set -u
out=$(realpath -m "$1") tunings=$2; shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
variants=()
for v in "$@"; do [ "$v" = test ] && break; variants+=("$v"); done
# Every variant copied, patched and built at once (a build takes about a minute on one core).
for v in "${variants[@]}"; do
  name=${v//+/_} dir=/tmp/variant_${v//+/_}
  rm -rf "$dir" && mkdir -p "$dir" && tar -c --exclude=./.git --exclude=./.venv --exclude=./cuda_kernels/_lut_matmul_cuda.so . | tar -x -C "$dir"
  if [ "$v" != - ]; then
    for p in ${v//+/ }; do (cd "$dir" && patch -s -p1 < "experiments/$p.patch") || exit 1; done
  fi
  (cd "$dir" && PYTHONPATH=$dir python3 -m cuda_kernels.build > "$out/build_$name.txt" 2>&1) &
done
wait
last=""
for v in "${variants[@]}"; do
  name=${v//+/_} dir=/tmp/variant_${v//+/_} last=$dir
  [ -f "$dir/cuda_kernels/_lut_matmul_cuda.so" ] || { tail -20 "$out/build_$name.txt"; exit 1; }
  for args in "--experts=1 --top_k=1 --shape=4096x14336" "--experts=1 --top_k=1 --shape=14336x4096" \
              "--experts=8 --top_k=2 --shape=4096x14336" "--experts=128 --top_k=8 --shape=2048x768"; do
    (cd "$dir" && PYTHONPATH=$dir timeout 80 python3 -m experiments.profile_cuda_lut --bitplane --laid_out $args \
      --ms="${VARIANT_MS:-1}" --tunings="$([ "$v" = - ] && echo default || echo "$tunings")" --trace=10 >> "$out/traces_$name.txt" 2>&1)
  done
  echo "== $v"; grep -E "launch:|bitplane_kernel|Error" "$out/traces_$name.txt" | cut -c1-120
done
if [ "${!#}" = test ]; then
  (cd "$last" && PYTHONPATH=$last timeout 200 python3 -m pytest -q tests/test_cuda_lut_matmul_bitplane.py \
    > "$out/tests_${last#/tmp/variant_}.txt" 2>&1)
  grep -E "^FAILED|^E  " "$out"/tests_*.txt | head -20; tail -n 1 "$out"/tests_*.txt
fi
