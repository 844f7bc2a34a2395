set -u
R=/tmp/r58; mkdir -p $R
save() { tar czf $OUT/r58_$1.tgz -C /tmp r58; }
[ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > $R/build.txt 2>&1 || { tail $R/build.txt; exit 3; }
D="python3 -m experiments.bench_kernels --decode --decode_arch=mixtral-layers --single= --grouped= --decode_batches=2,3 --decode_settings=codebook_w4"
F=cqjax/lut_matmul.py; cp $F /tmp/F.orig
for r in 1 2; do
  cp /tmp/F.orig $F
  $D --out $R/b23_main_$r.json > $R/b23_main_$r.txt 2>&1; grep "^decode" $R/b23_main_$r.txt; save b23
  sed -i 's/rows = cuda.rows_per_slot(x.shape\[0\], packed.shape\[0\]) if grouped/rows = max(cuda.rows_per_slot(x.shape[0], packed.shape[0]), 2 if x.shape[0] >= 4 else 1) if grouped/' $F
  grep -c "2 if x.shape" $F
  $D --out $R/b23_cand_$r.json > $R/b23_cand_$r.txt 2>&1; grep "^decode" $R/b23_cand_$r.txt; save b23
done
cp /tmp/F.orig $F
