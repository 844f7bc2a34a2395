set -u
R=/tmp/r58; mkdir -p $R
save() { tar czf $OUT/r58_$1.tgz -C /tmp r58; }
[ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > $R/build.txt 2>&1 || { tail $R/build.txt; exit 3; }
D="python3 -m experiments.bench_kernels --decode --decode_arch=mixtral-layers --single= --grouped= --decode_batches=2 --decode_act_bits=4 --decode_settings=codebook_w4"
F=cuda_kernels/lut_matmul_bitplane.py; cp $F /tmp/F.orig
for r in 1 2; do
  cp /tmp/F.orig $F
  $D --out $R/w4a4b2_main_$r.json > $R/w4a4b2_main_$r.txt 2>&1; grep "^decode" $R/w4a4b2_main_$r.txt; save c
  sed -i 's/one_row = t == 1 if experts is None else 4 \* t <= experts/one_row = t == 1 if experts is None else 2 * t <= experts/' $F
  grep -c "2 \* t <= experts" $F
  $D --out $R/w4a4b2_cand_$r.json > $R/w4a4b2_cand_$r.txt 2>&1; grep "^decode" $R/w4a4b2_cand_$r.txt; save c
done
cp /tmp/F.orig $F
