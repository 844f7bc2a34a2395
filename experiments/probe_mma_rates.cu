// How fast do the warp-level tensor-core instructions run on this GPU, per operand type? A
// stand-alone probe for a bit-plane decode (one binary mma of a weight row's 16 code-subset masks
// against x's 8 bit-planes covers 256 codes): that needs mma.sync's b1 AND+POPC form to be native,
// which the Hopper documents do not list among its tensor-core types. Each warp issues four
// independent chains of mma.sync (no memory in the loop); the probe prints each form's rate in
// tera-operations a second (2 M N K an instruction) and in instructions per SM per cycle.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 experiments/probe_mma_rates.cu -o /tmp/mma_rates && /tmp/mma_rates
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

namespace {

constexpr int kIters = 4096, kThreads = 128, kChains = 4;

struct B1 {  // m16n8k256, b1 x b1 -> s32, AND then popcount
  static constexpr const char* kName = "b1 m16n8k256 and.popc";
  static constexpr int M = 16, N = 8, K = 256;
  __device__ static void mma(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct S8 {  // m16n8k32, s8 x s8 -> s32
  static constexpr const char* kName = "s8 m16n8k32";
  static constexpr int M = 16, N = 8, K = 32;
  __device__ static void mma(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct S4 {  // m16n8k64, s4 x s4 -> s32
  static constexpr const char* kName = "s4 m16n8k64";
  static constexpr int M = 16, N = 8, K = 64;
  __device__ static void mma(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct Bf16 {  // m16n8k16, bf16 x bf16 -> f32 (accumulator bits carried as int: only the rate counts)
  static constexpr const char* kName = "bf16 m16n8k16";
  static constexpr int M = 16, N = 8, K = 16;
  __device__ static void mma(int (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <class Op>
__global__ void __launch_bounds__(kThreads) chains(uint32_t seed, int* sink) {
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = seed * (threadIdx.x + 7 * i + 1);
  for (int i = 0; i < 2; ++i) b[i] = seed ^ (threadIdx.x * 13 + i);
  int d[kChains][4] = {};
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) Op::mma(d[c], a, b);
  }
  int s = 0;
  for (int c = 0; c < kChains; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  if (s == 0x7fffffff) sink[threadIdx.x] = s;  // keeps the chains live
}

template <class Op>
void run(int sms, int clock_khz, int* sink) {
  const int blocks = sms * 8;
  chains<Op><<<blocks, kThreads>>>(1u, sink);  // warm-up
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  float best = 1e30f;
  for (int rep = 0; rep < 5; ++rep) {
    cudaEventRecord(start);
    chains<Op><<<blocks, kThreads>>>(rep + 2u, sink);
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    if (ms < best) best = ms;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::printf("%-24s failed: %s\n", Op::kName, cudaGetErrorString(err));
    return;
  }
  const double instr = double(blocks) * (kThreads / 32) * kIters * kChains;
  const double tops = instr * 2.0 * Op::M * Op::N * Op::K / (best * 1e-3) / 1e12;
  const double per_sm_cycle = instr / sms / (best * 1e-3 * clock_khz * 1e3);
  std::printf("%-24s %8.3f ms  %8.1f tera-ops/s  %6.3f mma a cycle an SM\n", Op::kName, best, tops, per_sm_cycle);
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  int clock_khz = 0;
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  std::printf("%s, %d SMs, %.2f GHz boost clock (the per-cycle rates assume it)\n", prop.name,
              prop.multiProcessorCount, clock_khz / 1e6);
  int* sink = nullptr;
  cudaMalloc(&sink, kThreads * sizeof(int));
  run<Bf16>(prop.multiProcessorCount, clock_khz, sink);
  run<S8>(prop.multiProcessorCount, clock_khz, sink);
  run<S4>(prop.multiProcessorCount, clock_khz, sink);
  run<B1>(prop.multiProcessorCount, clock_khz, sink);
  cudaFree(sink);
  return 0;
}
