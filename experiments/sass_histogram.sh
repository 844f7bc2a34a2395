#!/usr/bin/env bash
# Opcode histogram of one CUDA kernel instantiation's SASS (run where cuobjdump exists: the GPU
# image): bash experiments/sass_histogram.sh cuda_kernels/_lut_matmul_cuda.so 'lut_matmul_kernelILi1ELi2ELi5ELi4E' (mt 1, nt 2, layout 5, kgroups 4)
set -euo pipefail
cuobjdump --dump-sass "$1" | awk -v pat="$2" '/Function :/{f = index($0, pat) > 0} f' \
  | grep -oE '^\s+/\*[0-9a-f]+\*/\s+(@!?U?P[0-9T] )?[A-Z0-9_.]+' | awk '{print $NF}' | sed 's/\..*//' \
  | sort | uniq -c | sort -rn | head -30
