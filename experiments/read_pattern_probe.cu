// What read structure streams 4-bit codes at the copy bandwidth? A stand-alone probe for the CUDA
// codebook matmul (cuda_kernels/lut_matmul.cu): it reads a [rows, k/2] code matrix the way that
// kernel does (lane (g, t4) of a column warp: 16 bytes of rows g and g + 8 at chunk offset 16 t4,
// chunks interleaved over KG warps, `depth` chunks in flight in registers) or with each warp's
// chunk contiguous (a tiled layout: 512 bytes a load instruction), at one 512-thread block an SM
// (shared memory reserved, as the kernel's 117 registers do) or as many as fit, and prints GB/s.
// No decode, no mma: only the loads and an XOR so that they are not removed.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 experiments/read_pattern_probe.cu -o /tmp/read_probe && /tmp/read_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../cuda_kernels/lut_decode.cuh"
#include "copy_bandwidth.cuh"

namespace {

using namespace cqjax_cuda;

constexpr int kWarps = 4, KG = 4, kThreads = kWarps * KG * 32, kChunkBytes = 64;

// kTiled false: packed [n, k/2] row-major (the kernel's format); true: per 16-row column warp and
// chunk, 16 rows x 64 bytes contiguous (row g at 64 g), so a warp's load of rows g (or g + 8) reads
// 512 contiguous bytes.
template <int kDepth, bool kTiled>
__global__ void __launch_bounds__(kThreads) read_codes(const uint8_t* packed, int n, int k, uint32_t* sink) {
  const int n0 = blockIdx.x * 64, warp = (threadIdx.x >> 5) & 3, wk = threadIdx.x >> 7, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3, chunks = k / 128;
  const size_t row_bytes = k / 2;
  const uint8_t* at[2];
  for (int j = 0; j < 2; ++j) {
    const int row = n0 + warp * 16 + 8 * j + g;
    at[j] = kTiled ? packed + (static_cast<size_t>(n0 + warp * 16) * row_bytes) + (8 * j + g) * kChunkBytes + 16 * t4
                   : packed + static_cast<size_t>(row) * row_bytes + 16 * t4;
  }
  const size_t step = kTiled ? 16 * kChunkBytes : kChunkBytes;  // bytes from one chunk to the next
  uint4 ring[kDepth][2];
#pragma unroll
  for (int i = 0; i < kDepth; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      if (wk + i * KG < chunks) ring[i][j] = load_stream(at[j] + (wk + i * KG) * step);
  uint32_t acc = 0;
  for (int c = wk; c < chunks; c += kDepth * KG) {
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
      const int cc = c + i * KG;
      if (cc < chunks) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          acc ^= ring[i][j].x ^ ring[i][j].y ^ ring[i][j].z ^ ring[i][j].w;
          if (cc + kDepth * KG < chunks) ring[i][j] = load_stream(at[j] + (cc + kDepth * KG) * step);
        }
      }
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads; almost never written
}

template <int kDepth, bool kTiled>
float run(const std::vector<uint8_t*>& bufs, int n, int k, uint32_t* sink, int reserve_smem) {
  auto kernel = read_codes<kDepth, kTiled>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, reserve_smem);
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  std::vector<float> times;
  for (int rep = 0; rep < 7; ++rep) {
    cudaEventRecord(a);
    for (int it = 0; it < 4; ++it)
      for (uint8_t* p : bufs) kernel<<<n / 64, kThreads, reserve_smem>>>(p, n, k, sink);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    times.push_back(ms * 1e3f / (4 * bufs.size()));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

template <int kDepth>
void row(const std::vector<uint8_t*>& bufs, int n, int k, uint32_t* sink) {
  const double bytes = static_cast<double>(n) * k / 2;
  for (int tiled = 0; tiled < 2; ++tiled)
    for (int smem : {0, 120 * 1024}) {
      const float us = tiled ? run<kDepth, true>(bufs, n, k, sink, smem) : run<kDepth, false>(bufs, n, k, sink, smem);
      std::printf("k=%5d n=%5d depth=%d %-9s %-16s %7.1f us %6.0f GB/s\n", k, n, kDepth, tiled ? "tiled" : "row-major",
                  smem ? "1 block an SM" : "blocks as fit", us, bytes / us / 1e3);
    }
}

}  // namespace

int main() {
  uint32_t* sink;
  cudaMalloc(&sink, 4);
  for (auto [k, n] : {std::pair{4096, 14336}, std::pair{14336, 4096}}) {
    std::vector<uint8_t*> bufs(8);
    for (auto& p : bufs) cudaMalloc(&p, static_cast<size_t>(n) * k / 2), cudaMemset(p, 1, static_cast<size_t>(n) * k / 2);
    row<1>(bufs, n, k, sink);
    row<3>(bufs, n, k, sink);
    row<6>(bufs, n, k, sink);
    for (auto p : bufs) cudaFree(p);
  }
  print_copy_bandwidth();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) std::printf("error: %s\n", cudaGetErrorString(err));
  return err != cudaSuccess;
}
