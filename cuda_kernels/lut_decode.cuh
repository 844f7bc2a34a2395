// Device helpers of the CUDA codebook matmul (lut_matmul.cu), shared with the stand-alone probes
// of experiments/ (read_pattern_probe.cu, x_stationary_probe.cu), which build without XLA's
// headers: the streaming code load, the tensor-core product, and the register decode of 4-bit
// codes through a row's centroids held as byte tables.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cqjax_cuda {

__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                    uint32_t b0, uint32_t b1) {
  asm(  // not volatile: outputs only, so loads may be scheduled across it
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// Four codes -> two bf16x2 registers (inputs 0, 1 and 2, 3 of the four), from a row's centroids
// held as byte tables cb = {lo bytes of centroids 0-3, 4-7, 8-11, 12-15, hi bytes of the same}.
// sel: the codes & 7 in its low four nibbles (bit 3 would switch prmt to sign mode); m: byte i
// 0xFF where code i has bit 3 set.
__device__ __forceinline__ void decode_four(uint32_t sel, uint32_t m, const uint32_t (&cb)[8], uint32_t& b0,
                                            uint32_t& b1) {
  const uint32_t la = prmt(cb[0], cb[1], sel), lb = prmt(cb[2], cb[3], sel);
  const uint32_t ha = prmt(cb[4], cb[5], sel), hb = prmt(cb[6], cb[7], sel);
  const uint32_t lo = (la & ~m) | (lb & m), hi = (ha & ~m) | (hb & m);
  b0 = prmt(lo, hi, 0x5140u);
  b1 = prmt(lo, hi, 0x7362u);
}

// The eight codes of w -> b[0..3], the bf16x2 pairs of inputs (0, 1) ... (6, 7): 21 integer
// instructions. One shift serves both halves' masks: bit 3 of code i is the top bit of a byte of
// w (odd i) or of w << 4 (even i).
__device__ __forceinline__ void decode_word(uint32_t w, const uint32_t (&cb)[8], uint32_t (&b)[4]) {
  const uint32_t w4 = w << 4, sel = w & 0x77777777u;
  decode_four(sel, prmt(w4, w, 0xD9C8u), cb, b[0], b[1]);
  decode_four(sel >> 16, prmt(w4, w, 0xFBEAu), cb, b[2], b[3]);
}

// Byte t of each of the four words of u -> one word {u.x.t, u.y.t, u.z.t, u.w.t}; sel = t | (t + 4) << 4.
// (Gathers the codes of one lane's k pairs in the mma's own k order from a row's consecutive bytes.)
__device__ __forceinline__ uint32_t gather_bytes(uint4 u, uint32_t sel) {
  return prmt(prmt(u.x, u.y, sel), prmt(u.z, u.w, sel), 0x5410u);
}

// A row's 16 bf16 centroids -> its byte tables (decode_four's cb).
__device__ __forceinline__ void byte_tables(uint4 u, uint4 v, uint32_t (&cb)[8]) {
  cb[0] = prmt(u.x, u.y, 0x6420u), cb[1] = prmt(u.z, u.w, 0x6420u);
  cb[2] = prmt(v.x, v.y, 0x6420u), cb[3] = prmt(v.z, v.w, 0x6420u);
  cb[4] = prmt(u.x, u.y, 0x7531u), cb[5] = prmt(u.z, u.w, 0x7531u);
  cb[6] = prmt(v.x, v.y, 0x7531u), cb[7] = prmt(v.z, v.w, 0x7531u);
}

}  // namespace cqjax_cuda
