# session 58 A/Bs, one machine. $1: b4 (batch-4 dispatch) or xp (x_planes old/new)
set -u
R=/tmp/r58; mkdir -p $R
save() { tar czf $OUT/r58_$1.tgz -C /tmp r58; }
[ -f cuda_kernels/_lut_matmul_cuda.so ] || python3 -m cuda_kernels.build > $R/build.txt 2>&1 || { tail $R/build.txt; exit 3; }
D="python3 -m experiments.bench_kernels --decode --decode_arch=mixtral-layers --single= --grouped="
F=cqjax/lut_matmul.py; cp $F /tmp/F.orig
B=cuda_kernels/lut_matmul_bitplane.py; cp $B /tmp/B.new
if [ "$1" = b4 ]; then
  for r in 1 2; do
    cp /tmp/F.orig $F
    $D --decode_batches=4 --decode_settings=codebook_w4 --out $R/b4_main_$r.json > $R/b4_main_$r.txt 2>&1; tail -1 $R/b4_main_$r.txt; save b4
    sed -i 's/rows = cuda.rows_per_slot(x.shape\[0\], packed.shape\[0\]) if grouped/rows = max(cuda.rows_per_slot(x.shape[0], packed.shape[0]), 2 if x.shape[0] >= packed.shape[0] else 1) if grouped/' $F
    grep -c "2 if x.shape" $F
    $D --decode_batches=4 --decode_settings=codebook_w4 --out $R/b4_cand_$r.json > $R/b4_cand_$r.txt 2>&1; tail -1 $R/b4_cand_$r.txt; save b4
  done
  cp /tmp/F.orig $F
else
  for r in 1 2; do
    cp /tmp/B.new $B
    $D --decode_batches=1 --decode_act_bits=4 --decode_settings=codebook_w4 --out $R/xp_new_$r.json > $R/xp_new_$r.txt 2>&1; tail -1 $R/xp_new_$r.txt; save xp
    cp runs/old_bitplane.py $B
    $D --decode_batches=1 --decode_act_bits=4 --decode_settings=codebook_w4 --out $R/xp_old_$r.json > $R/xp_old_$r.txt 2>&1; tail -1 $R/xp_old_$r.txt; save xp
  done
  cp /tmp/B.new $B
fi
