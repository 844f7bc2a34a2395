// Hopper (sm_90a) helpers of the CUDA codebook matmul's prefill kernel (lut_matmul.cu, layout 8):
// cp.async staging, the fences between it and the tensor cores, the shared-memory matrix
// descriptor, and wgmma.mma_async with the A operand in registers (the same per-warp fragment as
// mma.sync m16n8k16's A: rows g and g + 8, k pairs 2 t and 2 t + 8) and B in shared memory,
// K-major in the 128-byte swizzle (and the int8 prefill kernel's s8 variant, lut_matmul_int8.cu).
// The operand lists are written out for each N used (bf16: 64 and 128 rows of x; s8: 32, 64, 128),
// their accumulators through the CQJAX_D_* macros.
// The cp.async stage ring both kernels run (ring_start, ring_next).
// And `pin`, which keeps loop-invariant addresses in registers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cqjax_cuda {

// 16 bytes from global to shared memory, bypassing L1; zeros where !valid (no bytes read).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(static_cast<uint32_t>(__cvta_generic_to_shared(smem))), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(kPending) : "memory"); }

// Shared-memory writes by the threads (cp.async included) made visible to the tensor cores' reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// A ring of shared-memory stages [s_begin, s_end) filled by cp.async kAhead stages ahead of the
// one multiplied, with two buffers more than kAhead (the wgmma of the last two stages may still
// read theirs). load_stage(s) issues this thread's copies of stage s. ring_start: the first
// kAhead stages' copies (a commit group each, empty past s_end, so the waits count alike).
template <int kAhead, typename Load>
__device__ __forceinline__ void ring_start(int s_begin, int s_end, Load&& load_stage) {
#pragma unroll
  for (int i = 0; i < kAhead; ++i) {
    if (s_begin + i < s_end) load_stage(s_begin + i);
    cp_async_commit();
  }
}

// Stage s in shared memory, visible to the tensor cores, for every thread of the block; then the
// copies of stage s + kAhead into the buffer stage s - 2 left.
template <int kAhead, typename Load>
__device__ __forceinline__ void ring_next(int s, int s_end, Load&& load_stage) {
  cp_async_wait<kAhead - 1>();  // this thread's copies of stage s
  fence_proxy_async();
  __syncthreads();  // everyone's; and stage s - 2's buffer is no longer read
  if (s + kAhead < s_end) load_stage(s + kAhead);
  cp_async_commit();
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(kPending) : "memory"); }

// Keeps registers untouched up to here (the compiler sees them read): a wgmma reads its A
// registers until it completes, which the compiler does not know.
__device__ __forceinline__ void wgmma_keep(const uint32_t (&r)[8]) {
  asm volatile("" :: "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]), "r"(r[4]), "r"(r[5]), "r"(r[6]), "r"(r[7]));
}
__device__ __forceinline__ void wgmma_keep(const uint32_t (&r)[4]) {
  asm volatile("" :: "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]));
}

// Pins a value in a register where it is set: the compiler would rather recompute a loop's
// invariant address arithmetic at every use (layout 8's copies: ~25 instructions each) than keep it.
template <typename T>
__device__ __forceinline__ void pin(T*& p) { asm volatile("" : "+l"(p)); }
__device__ __forceinline__ void pin(uint32_t& v) { asm volatile("" : "+r"(v)); }

// Descriptor of a K-major B operand with 128-byte rows (64 bf16 along K) in the 128-byte swizzle:
// row r at r * 128 bytes of a 1024-byte aligned tile (8-row groups 1024 bytes apart), its 16-byte
// chunk c stored at chunk c ^ (r % 8), which spreads the tensor cores' reads over all banks.
// `addr` is the tile's start plus the k16 step's 32-byte offset along K (PTX ISA, "Matrix
// Descriptor Format": start and stride >> 4, leading offset unused, swizzle mode 1 in bits 62-63).
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | uint64_t{1} << 16 | uint64_t{1024 >> 4} << 32 | uint64_t{1} << 62;
}

// The accumulators of a wgmma: their asm text (its first 32 or 64 operands) and, 8 at a time, the
// operands d[b .. b + 7] of constraint `con` ("+f" or "+r").
#define CQJAX_D_TEXT32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CQJAX_D_TEXT64 CQJAX_D_TEXT32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define CQJAX_D_OPS8(con, b) \
  con(d[b]), con(d[b + 1]), con(d[b + 2]), con(d[b + 3]), con(d[b + 4]), con(d[b + 5]), con(d[b + 6]), con(d[b + 7])

// d [64 x N] += a [64 x 16] (registers, bf16) . B [16 x N] (descriptor, bf16), float32 accumulators:
// d[4 j + i] of warp w, lane (g, t) is row 16 w + g + 8 (i >> 1), column 8 j + 2 t + (i & 1).
__device__ __forceinline__ void wgmma_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      CQJAX_D_TEXT32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : CQJAX_D_OPS8("+f", 0), CQJAX_D_OPS8("+f", 8), CQJAX_D_OPS8("+f", 16), CQJAX_D_OPS8("+f", 24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      CQJAX_D_TEXT64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : CQJAX_D_OPS8("+f", 0), CQJAX_D_OPS8("+f", 8), CQJAX_D_OPS8("+f", 16), CQJAX_D_OPS8("+f", 24),
        CQJAX_D_OPS8("+f", 32), CQJAX_D_OPS8("+f", 40), CQJAX_D_OPS8("+f", 48), CQJAX_D_OPS8("+f", 56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

template <int N>
__device__ __forceinline__ void wgmma(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(N == 64 || N == 128, "wgmma.cuh writes out N = 64 and 128");
  if constexpr (N == 64) wgmma_n64(d, a, desc);
  else wgmma_n128(d, a, desc);
}

// Visits a warp's share of a wgmma's D fragment [64 x N] (the layout of every variant here):
// f(i, row, col) for register i of warp `warp` (of the block's warpgroups) and lane (g, t): row
// 16 warp + g + 8 ((i % 4) >> 1) of the block's weight rows, column 8 (i / 4) + 2 t + (i & 1) of
// its N rows of x.
template <int N, typename F>
__device__ __forceinline__ void for_each_d(int warp, int lane, F&& f) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) f(4 * j + i, 16 * warp + (lane >> 2) + 8 * (i >> 1), 8 * j + 2 * (lane & 3) + (i & 1));
}

// d [64 x N] += a [64 x 32] (registers, s8: mma.sync m16n8k32's A fragment per warp, rows g and
// g + 8, k 4 t ... 4 t + 3 and 16 + 4 t ...) . B [32 x N] (descriptor, s8, K-major: 32 bytes of
// each 128-byte row), exact int32 sums; d has the layout of the bf16 variants' (int32 for float).
__device__ __forceinline__ void wgmma_s8_n32(int (&d)[16], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
      "}, {%16, %17, %18, %19}, %20, p;\n}\n"
      : CQJAX_D_OPS8("+r", 0), CQJAX_D_OPS8("+r", 8)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_s8_n64(int (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8 {"
      CQJAX_D_TEXT32 "}, {%32, %33, %34, %35}, %36, p;\n}\n"
      : CQJAX_D_OPS8("+r", 0), CQJAX_D_OPS8("+r", 8), CQJAX_D_OPS8("+r", 16), CQJAX_D_OPS8("+r", 24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

__device__ __forceinline__ void wgmma_s8_n128(int (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      CQJAX_D_TEXT64 "}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : CQJAX_D_OPS8("+r", 0), CQJAX_D_OPS8("+r", 8), CQJAX_D_OPS8("+r", 16), CQJAX_D_OPS8("+r", 24),
        CQJAX_D_OPS8("+r", 32), CQJAX_D_OPS8("+r", 40), CQJAX_D_OPS8("+r", 48), CQJAX_D_OPS8("+r", 56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
}

template <int N>
__device__ __forceinline__ void wgmma_s8(int (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma.cuh writes out the s8 N = 32, 64 and 128");
  if constexpr (N == 32) wgmma_s8_n32(d, a, desc);
  else if constexpr (N == 64) wgmma_s8_n64(d, a, desc);
  else wgmma_s8_n128(d, a, desc);
}

#undef CQJAX_D_OPS8
#undef CQJAX_D_TEXT32
#undef CQJAX_D_TEXT64

}  // namespace cqjax_cuda
