// Can a codebook matmul decode with binary tensor-core instructions instead of byte permutes? A
// stand-alone probe of a bit-plane kernel for one row of int8 activations (the int8 numerics of
// cqjax.lut_matmul.lut_matmul_int8_reference: x and each row's 16 centroids rounded to int8,
// exact integer dot products).
//
// The idea: a row's int8 centroids cq[c] over 4-bit codes c are a sum over the subsets S of the
// code's bits, cq[c] = sum over S within c of alpha[S] (alpha: the Moebius transform of cq, 16
// integers a row). So dot = sum_k x[k] cq[code_k] = sum_S alpha[S] sum_k [S within code_k] x[k],
// and with x's two's-complement bit-planes x[k] = sum_j w_j bit_j(x[k]) (w_j = 2^j, w_7 = -128),
// dot = sum_S sum_j alpha[S] w_j D[S][j], D[S][j] = popc(mask_S & plane_j). One mma.sync
// m16n8k256 b1 (AND, then popcount) gives all 16 x 8 counts D for 256 codes: A = the 16 subset
// masks of the row's code bits (each an AND of up to four bit-planes of the codes), B = x's eight
// bit-planes. The decode is then 8 LOP3 a lane per 256 codes, where the byte-permute decode takes
// about 5 instructions a code a lane (BENCHMARKS.md session 49). On the H100 the b1 mma issues at
// the bf16 mma's rate (experiments/probe_mma_rates.cu, BENCHMARKS.md session 50).
//
// Three kernels. bitplane_kernel and bitplane_ring read codes stored bit-planar (per row and
// 256-code chunk, word w (codes 32w..32w+31, code 32w+i at bit i) of planes 0-3 as one 16-byte
// group, 128 bytes a chunk: the nibble format's bytes, reordered) and alpha precomputed;
// bitplane_nibble reads the nibble format and bf16 codebooks as cqjax stores them. A warp walks
// rows; for its K range of kKc chunks it holds x's planes in registers (the mma's B fragment),
// reads 2 x 16 bytes a lane a chunk (8 lanes of a warp read the same bytes), builds 4 masks, issues
// one mma, and adds its row's sum into an int32 output with atomicAdd (exact, so order-free; sums
// wrap mod 2^32, and the true dot fits in int32). Each is checked against a host reference (two of
// the weight sets) and timed over 8 weight sets in one launch (more than twice the 50 MB L2): per
// weight, the median of 21 launches, and GB/s against the copy rate measured in the same run.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 experiments/probe_bitplane_lut.cu -o /tmp/bitplane && /tmp/bitplane [K N [ROWS]]
// (ROWS: rows a warp walks, default 16.)
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../cuda_kernels/bitplane_decode.cuh"
#include "copy_bandwidth.cuh"

namespace {

using namespace cqjax_cuda;

constexpr int kChunk = 256, kWarps = 4, kSets = 8;

struct Args {
  const uint4* planes;    // [sets][n][chunks][8 words] of uint4 (planes 0-3)
  const uint32_t* xpl;    // [chunks][8 planes][8 words], words t and t + 4 side by side at 2t
  const uint32_t* alpha;  // [sets][n][16]
  int* out;               // [sets][n], zeroed
  int n, chunks;
};

// Lane (g, t): mma rows g and g + 8 are the subsets S = g and g + 8 (bit b of S: code bit b in the
// mask), k = 32 t + i of each 128-code half; B column g is x's plane g; D[S][j] at rows g, g + 8,
// columns 2t, 2t + 1. kKc: chunks of K a warp holds x's planes for (blockIdx.y: which). A row's
// planes are loaded into registers at the row's start. (Loading the next row's while this one
// multiplies, in a second buffer, took 195 registers and ran at half the speed; capping the
// registers for more blocks an SM spilled: BENCHMARKS.md session 50.)
template <int kKc>
__global__ void __launch_bounds__(kWarps * 32) bitplane_kernel(Args a) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int c0 = blockIdx.y * kKc, set = blockIdx.z;
  uint32_t xb[kKc][2];
  load_x_planes(xb, a.xpl, c0, a.chunks - c0, lane, lane >> 2);
  const SubsetLane sub(lane);
  const int warps = gridDim.x * kWarps;
  auto load = [&](int row, uint4 (&b)[kKc][2]) {
    const uint4* p = a.planes + ((static_cast<size_t>(set) * a.n + row) * a.chunks + c0) * 8;
#pragma unroll
    for (int c = 0; c < kKc; ++c)
      if (c0 + c < a.chunks) b[c][0] = __ldg(p + c * 8 + t), b[c][1] = __ldg(p + c * 8 + t + 4);  // warp-uniform test
  };
  auto multiply = [&](int row, const uint4 (&b)[kKc][2]) {
    const size_t r = static_cast<size_t>(set) * a.n + row;
    uint32_t d[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int c = 0; c < kKc; ++c) {
      if (c0 + c < a.chunks) sub.multiply(d, b[c][0], b[c][1], xb[c][0], xb[c][1]);
    }
    const uint32_t part = warp_sum(sub.dot(d, a.alpha[r * 16 + g], a.alpha[r * 16 + g + 8]));
    if (lane == 0) atomicAdd(a.out + r, static_cast<int>(part));
  };
  uint4 buf[kKc][2];
  for (int row = blockIdx.x * kWarps + (threadIdx.x >> 5); row < a.n; row += warps) load(row, buf), multiply(row, buf);
}

// The same product with each warp's rows (their planes and alpha) copied into a shared-memory ring
// by cp.async, kStages - 1 rows ahead of the one it multiplies: bytes in flight no longer cost
// registers (in bitplane_kernel eight lanes hold the same 16 bytes), and a lane copies distinct
// bytes.
template <int kKc, int kStages>
__global__ void __launch_bounds__(kWarps * 32) bitplane_ring(Args a) {
  constexpr int kStage = kKc * 8 + 4;  // uint4s a stage: the row's chunks, then its 16 alpha
  extern __shared__ uint4 smem[];       // [kWarps][kStages][kStage]
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, warp = threadIdx.x >> 5;
  const int c0 = blockIdx.y * kKc, set = blockIdx.z, here = min(kKc, a.chunks - c0);
  uint4* ring = smem + warp * kStages * kStage;
  uint32_t xb[kKc][2];
  load_x_planes(xb, a.xpl, c0, here, lane, lane >> 2);
  const SubsetLane sub(lane);
  const int first = blockIdx.x * kWarps + warp, warps = gridDim.x * kWarps;
  auto issue = [&](int row, int stage) {
    if (row >= a.n) return;
    const uint4* p = a.planes + ((static_cast<size_t>(set) * a.n + row) * a.chunks + c0) * 8;
    for (int i = lane; i < here * 8; i += 32) cp_async16(ring + stage * kStage + i, p + i);
    if (lane < 4) cp_async16(ring + stage * kStage + kKc * 8 + lane, a.alpha + (static_cast<size_t>(set) * a.n + row) * 16 + 4 * lane);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    issue(first + s * warps, s);
    asm volatile("cp.async.commit_group;");
  }
  int i = 0;
  for (int row = first; row < a.n; row += warps, ++i) {
    issue(row + (kStages - 1) * warps, (i + kStages - 1) % kStages);  // the stage read last step
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1));  // this row's copies have landed
    __syncwarp();
    const uint4* b = ring + (i % kStages) * kStage;
    const uint32_t* alpha = reinterpret_cast<const uint32_t*>(b + kKc * 8);
    const size_t r = static_cast<size_t>(set) * a.n + row;
    uint32_t d[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int c = 0; c < kKc; ++c) {
      if (c < here) sub.multiply(d, b[c * 8 + t], b[c * 8 + t + 4], xb[c][0], xb[c][1]);  // warp-uniform test
    }
    const uint32_t part = warp_sum(sub.dot(d, alpha[g], alpha[g + 8]));
    if (lane == 0) atomicAdd(a.out + r, static_cast<int>(part));
    __syncwarp();  // every lane is done with this stage before it is copied into again
  }
}

struct NibbleArgs {
  const uint4* packed;     // [sets][n][chunks][8]: the nibble format (code 2i in byte i's low bits)
  const uint4* centroids;  // [sets][n][2]: 16 bf16 a row
  const uint32_t* xpl;     // [chunks][8 planes][8 words at 2 (w % 4) + w / 4], word w bit 4i + j: x[32w + 8j + i]
  int* out;                // [sets][n], zeroed
  int n, chunks;
};

// bitplane_ring on the nibble format and bf16 codebooks as they are stored: each stage is turned
// into bit-planes in shared memory by the warp (a 4x4 bit transpose within each nibble of a 16-byte
// group, four delta swaps: plane p's bit 4i + j is code bit p of nibble i of word j, an order of k
// that x's planes follow), and each row's codebook is rounded to int8 (absmax / 127, as
// lut_matmul_int8.cu rounds it) and Moebius-transformed across lanes.
template <int kKc, int kStages>
__global__ void __launch_bounds__(kWarps * 32) bitplane_nibble(NibbleArgs a) {
  constexpr int kStage = kKc * 8 + 2;  // uint4s a stage: the row's codes, then its 16 bf16 centroids
  extern __shared__ uint4 smem[];
  const int lane = threadIdx.x & 31, t = lane & 3, warp = threadIdx.x >> 5;
  const int c0 = blockIdx.y * kKc, set = blockIdx.z, here = min(kKc, a.chunks - c0);
  uint4* ring = smem + warp * kStages * kStage;
  uint32_t xb[kKc][2];
  load_x_planes(xb, a.xpl, c0, here, lane, lane >> 2);
  const SubsetLane sub(lane);
  const int first = blockIdx.x * kWarps + warp, warps = gridDim.x * kWarps;
  auto issue = [&](int row, int stage) {
    if (row >= a.n) return;
    const size_t r = static_cast<size_t>(set) * a.n + row;
    const uint4* p = a.packed + (r * a.chunks + c0) * 8;
    for (int i = lane; i < here * 8; i += 32) cp_async16(ring + stage * kStage + i, p + i);
    if (lane < 2) cp_async16(ring + stage * kStage + kKc * 8 + lane, a.centroids + r * 2 + lane);
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    issue(first + s * warps, s);
    asm volatile("cp.async.commit_group;");
  }
  int i = 0;
  for (int row = first; row < a.n; row += warps, ++i) {
    issue(row + (kStages - 1) * warps, (i + kStages - 1) % kStages);
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(kStages - 1));
    __syncwarp();
    uint4* b = ring + (i % kStages) * kStage;
    for (int q = lane; q < here * 8; q += 32) nibbles_to_planes(b[q]);
    // The row's codebook, entry lane & 15: rounded to int8, then alpha by the Moebius transform.
    const uint16_t bits = reinterpret_cast<const uint16_t*>(b + kKc * 8)[lane & 15];
    uint32_t alpha_g, alpha_g8;
    codebook_alpha(__uint_as_float(static_cast<uint32_t>(bits) << 16), lane, alpha_g, alpha_g8);
    __syncwarp();
    const size_t r = static_cast<size_t>(set) * a.n + row;
    uint32_t d[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int c = 0; c < kKc; ++c) {
      if (c < here) sub.multiply(d, b[c * 8 + t], b[c * 8 + t + 4], xb[c][0], xb[c][1]);  // warp-uniform test
    }
    const uint32_t part = warp_sum(sub.dot(d, alpha_g, alpha_g8));
    if (lane == 0) atomicAdd(a.out + r, static_cast<int>(part));
    __syncwarp();
  }
}

}  // namespace


int main(int argc, char** argv) {
  const int k = argc > 2 ? std::atoi(argv[1]) : 4096, n = argc > 2 ? std::atoi(argv[2]) : 14336;
  const int rows_per_warp = argc > 3 ? std::atoi(argv[3]) : 16;
  if (k % kChunk) {
    std::printf("K must be a multiple of %d\n", kChunk);
    return 1;
  }
  const int chunks = k / kChunk;
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("%s; %dx%d, one row of int8 x, %d weight sets a launch\n", prop.name, k, n, kSets);
  print_copy_bandwidth();

  std::mt19937 rng(0);
  const size_t words = static_cast<size_t>(kSets) * n * chunks * 32;
  std::vector<uint32_t> planes(words);
  for (auto& w : planes) w = rng();
  std::vector<int8_t> x(k);
  for (auto& v : x) v = static_cast<int8_t>(static_cast<int>(rng() % 256) - 128);
  std::vector<uint32_t> xpl(static_cast<size_t>(chunks) * 64, 0u);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < 8; ++j)
      if ((static_cast<uint8_t>(x[i]) >> j) & 1) xpl[(i / kChunk * 8 + j) * 8 + i % kChunk / 32 % 4 * 2 + i % kChunk / 128] |= 1u << (i % 32);
  std::vector<int> cq(static_cast<size_t>(kSets) * n * 16);
  for (auto& v : cq) v = static_cast<int>(rng() % 255) - 127;
  std::vector<uint32_t> alpha(cq.size());
  for (size_t r = 0; r < cq.size() / 16; ++r)
    for (int s = 0; s < 16; ++s) {  // Moebius transform over the subsets of s
      int v = 0;
      for (int u = 0; u < 16; ++u)
        if ((u & s) == u) v += (__builtin_popcount(s ^ u) & 1 ? -1 : 1) * cq[r * 16 + u];
      alpha[r * 16 + s] = static_cast<uint32_t>(v);
    }

  uint4* d_planes;
  uint32_t *d_xpl, *d_alpha;
  int* d_out;
  cudaMalloc(&d_planes, words * 4), cudaMalloc(&d_xpl, xpl.size() * 4), cudaMalloc(&d_alpha, alpha.size() * 4);
  cudaMalloc(&d_out, static_cast<size_t>(kSets) * n * 4);
  cudaMemcpy(d_planes, planes.data(), words * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_xpl, xpl.data(), xpl.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_alpha, alpha.data(), alpha.size() * 4, cudaMemcpyHostToDevice);
  const Args args{d_planes, d_xpl, d_alpha, d_out, n, chunks};
  const size_t out_bytes = static_cast<size_t>(kSets) * n * 4;

  auto run = [&](const char* name, auto kernel, auto args, const std::vector<int>& table, int kc, int stages,
                 int stage_extra) -> long {
    const dim3 grid((n + kWarps * rows_per_warp - 1) / (kWarps * rows_per_warp), (chunks + kc - 1) / kc, kSets);
    const int smem = kWarps * stages * (kc * 8 + stage_extra) * 16;
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
    cudaMemset(d_out, 0, out_bytes);
    kernel<<<grid, kWarps * 32, smem>>>(args);
    std::vector<int> got(static_cast<size_t>(kSets) * n);
    cudaMemcpy(got.data(), d_out, out_bytes, cudaMemcpyDeviceToHost);
    if (cudaGetLastError() != cudaSuccess) {
      std::printf("launch failed\n");
      return 1L;
    }
    long bad = 0;
    for (int set : {0, kSets - 1})
      for (int row = 0; row < n; ++row) {
        const size_t r = static_cast<size_t>(set) * n + row;
        long long want = 0;
        for (int i = 0; i < k; ++i) {
          const uint32_t* w = &planes[((r * chunks + i / kChunk) * 8 + i % kChunk / 32) * 4];
          int code = 0;
          for (int p = 0; p < 4; ++p) code |= ((w[p] >> (i % 32)) & 1) << p;
          want += static_cast<long long>(x[i]) * table[r * 16 + code];
        }
        if (want != got[r] && bad++ < 5) std::printf("set %d row %d: got %d, want %lld\n", set, row, got[r], want);
      }
    std::printf("check: %ld of %d rows wrong\n", bad, 2 * n);

    cudaEvent_t start, stop;
    cudaEventCreate(&start), cudaEventCreate(&stop);
    std::vector<float> times;
    for (int rep = 0; rep < 21; ++rep) {
      cudaMemsetAsync(d_out, 0, out_bytes);
      cudaEventRecord(start);
      kernel<<<grid, kWarps * 32, smem>>>(args);
      cudaEventRecord(stop);
      cudaEventSynchronize(stop);
      float ms;
      cudaEventElapsedTime(&ms, start, stop);
      times.push_back(ms);
    }
    std::sort(times.begin(), times.end());
    const double us = times[times.size() / 2] * 1e3 / kSets, bytes = static_cast<double>(n) * (k / 2 + 64);
    std::printf("bit-plane kernel (%s): %.2f us a weight (median of 21 launches over %d sets), %.0f GB/s of codes and alpha\n",
                name, us, kSets, bytes / us / 1e3);
    return bad;
  };
  long bad = 0;
  // The nibble format of the same codes and bf16 codebooks (entries rounded to int8 in the kernel).
  std::vector<uint32_t> packed(words, 0u);
  for (size_t q = 0; q < words / 4; ++q)  // 32 codes: planar words q*4+p -> nibbles of words q*4+j
    for (int e = 0; e < 32; ++e) {
      uint32_t code = 0;
      for (int p = 0; p < 4; ++p) code |= ((planes[q * 4 + p] >> e) & 1u) << p;
      packed[q * 4 + e / 8] |= code << (4 * (e % 8));
    }
  std::vector<uint16_t> cbf(cq.size());
  for (auto& v : cbf) v = static_cast<uint16_t>((0x3c00 + rng() % 0x0800) | (rng() & 1 ? 0x8000 : 0));  // |c| in [2^-7, 2^9)
  std::vector<int> cq8(cq.size());
  for (size_t r = 0; r < cq.size() / 16; ++r) {  // lut_matmul_int8_reference's int8_round
    float amax = 0.f, c[16];
    for (int e = 0; e < 16; ++e) {
      const uint32_t u = static_cast<uint32_t>(cbf[r * 16 + e]) << 16;
      std::memcpy(&c[e], &u, 4);
      amax = std::max(amax, std::fabs(c[e]));
    }
    const float sc = amax > 0.f ? amax * (1.f / 127.f) : 1.f;
    for (int e = 0; e < 16; ++e) cq8[r * 16 + e] = static_cast<int>(std::nearbyint(c[e] * (1.f / sc)));
  }
  std::vector<uint32_t> xperm(xpl.size(), 0u);  // x's planes in the transposed order
  for (int i = 0; i < k; ++i) {
    const int w = i % kChunk / 32, j = i % 32 / 8, e = i % 8;
    for (int pl = 0; pl < 8; ++pl)
      if ((static_cast<uint8_t>(x[i]) >> pl) & 1) xperm[(i / kChunk * 8 + pl) * 8 + w] |= 1u << (4 * e + j);
  }
  uint4 *d_packed, *d_cent;
  uint32_t* d_xperm;
  cudaMalloc(&d_packed, words * 4), cudaMalloc(&d_cent, cbf.size() * 2), cudaMalloc(&d_xperm, xperm.size() * 4);
  cudaMemcpy(d_packed, packed.data(), words * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(d_cent, cbf.data(), cbf.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(d_xperm, xperm.data(), xperm.size() * 4, cudaMemcpyHostToDevice);
  const NibbleArgs nargs{d_packed, d_cent, d_xperm, d_out, n, chunks};
  bad += run("planar, 8 chunks a warp, registers", bitplane_kernel<8>, args, cq, 8, 0, 0);
  bad += run("planar, 8 chunks a warp, ring of 2", bitplane_ring<8, 2>, args, cq, 8, 2, 4);
  bad += run("planar, 16 chunks a warp, ring of 3", bitplane_ring<16, 3>, args, cq, 16, 3, 4);
  bad += run("nibbles, 8 chunks a warp, ring of 2", bitplane_nibble<8, 2>, nargs, cq8, 8, 2, 2);
  bad += run("nibbles, 8 chunks a warp, ring of 3", bitplane_nibble<8, 3>, nargs, cq8, 8, 3, 2);
  bad += run("nibbles, 16 chunks a warp, ring of 2", bitplane_nibble<16, 2>, nargs, cq8, 16, 2, 2);
  bad += run("nibbles, 16 chunks a warp, ring of 3", bitplane_nibble<16, 3>, nargs, cq8, 16, 3, 2);
  return bad != 0;
}
