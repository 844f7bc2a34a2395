// The output of the int8-numerics kernels (lut_matmul_int8.cu, lut_matmul_bitplane.cu):
// y = (sc * dot) * sx written in float32 or bf16, and rows no expert slot covers zeroed
// (`jax.lax.ragged_dot`'s contract); and the FFI check of those float operands.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace cqjax_cuda {

// Whether an FFI operand or result is of the float dtypes these kernels read and write.
inline bool float_or_bf16(xla::ffi::DataType t) {
  return t == xla::ffi::DataType::F32 || t == xla::ffi::DataType::BF16;
}

// y = (sc * float(dot)) * sx in float32, the order of cqjax.lut_matmul.lut_matmul_int8_reference.
__device__ __forceinline__ float scaled_dot(float sc, int dot, float sx) {
  return __fmul_rn(__fmul_rn(sc, __int2float_rn(dot)), sx);
}

// out[at] = v, out float32 or bf16 (float32 -> bf16 rounds to nearest even, as XLA's convert).
__device__ __forceinline__ void store_float(void* out, bool bf16, size_t at, float v) {
  if (bf16)
    static_cast<__nv_bfloat16*>(out)[at] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(out)[at] = v;
}

// Zero, by the block's threads, out [t, n]'s rows past those the slots cover (slots int32 [3,
// num_slots], rows in the third row) in columns n0 .. n0 + cols - 1 (those below n).
__device__ inline void zero_rows_past_slots(void* out, bool bf16, const int32_t* slots, int num_slots, int t, int n, int n0,
                                     int cols) {
  int covered = 0;
  for (int i = 0; i < num_slots; ++i) covered += slots[2 * num_slots + i];
  cols = min(cols, n - n0);
  for (int i = threadIdx.x; i < (t - covered) * cols; i += blockDim.x)
    store_float(out, bf16, static_cast<size_t>(covered + i / cols) * n + n0 + i % cols, 0.f);
}

}  // namespace cqjax_cuda
