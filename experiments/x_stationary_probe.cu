// Does the codebook matmul get faster when each warp keeps its activations and walks the rows?
// A stand-alone probe for cuda_kernels/lut_matmul.cu (BENCHMARKS.md, session 23).
//
// The kernel on main gives each warp 16 output rows and walks K: per 128-input chunk it reloads
// the activations it multiplies and chains 8 mma into one accumulator, and four K warps hand
// their sums over at the end. Here ("x-stationary") each warp owns C chunks of K for the whole
// launch: it loads their activations once into registers (the mma's B operand) and walks 16-row
// tiles, each tile a fresh accumulator written to shared memory; the block's warps (W of them,
// W * C chunks of K) are summed once at the end. A block takes tiles blockIdx.x, + gridDim.x, ...
// (a persistent grid: every SM the same number of tiles within one), blockIdx.y its K range.
// The decode (21 integer instructions per 8 codes, per-row byte tables of the centroids) and the
// A/B operand layout are main's layout 5. Modes: 0 the code loads alone, 1 loads + activations +
// mma without the decode, 2 the full product (checked against a CPU reference), 3 the full
// product on synthetic codes (no code loads: the compute alone).
//
//   nvcc -O3 -std=c++17 -arch=sm_90 experiments/x_stationary_probe.cu -o /tmp/xs && /tmp/xs
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../cuda_kernels/lut_decode.cuh"
#include "copy_bandwidth.cuh"

namespace {

using namespace cqjax_cuda;

constexpr int kChunk = 128;  // inputs per chunk: 64 code bytes of a row, 16 per lane (t4)

struct Args {
  const uint16_t* x;        // bf16 [t, k], t <= 8 NB
  const uint8_t* packed;    // [n, k/2], two codes a byte, low nibble first
  const uint32_t* tables;   // [n, 8]: lo bytes of centroids 0-3, 4-7, 8-11, 12-15, then hi bytes
  float* out;               // [splits, t, n] partial sums of each K range
  uint32_t* sink;
  int t, k, n, tiles, splits;
};

// The kernel's decode, or (mode 1) the code bytes passed through.
template <int kMode>
__device__ __forceinline__ void decode_or_pass(uint32_t w, const uint32_t (&cb)[8], uint32_t (&b)[4]) {
  if constexpr (kMode == 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) b[i] = ((w >> (8 * i)) & 0xFF) * 0x00010001u;
  } else {
    cqjax_cuda::decode_word(w, cb, b);
  }
}

template <int W, int C, int D, int NB, int kMode>
__global__ void __launch_bounds__(W * 32) xs_gemv(Args a) {
  extern __shared__ float4 red[];  // [W][tiles a block][NB][32 lanes]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int split = blockIdx.y, chunks = a.k / kChunk, chunk0 = (split * W + warp) * C;
  const size_t row_bytes = a.k / 2;
  const int mine = blockIdx.x < a.tiles ? (a.tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int max_tiles = (a.tiles + gridDim.x - 1) / gridDim.x;

  // Lane (g, t4) of chunk c holds token 8 b + g's inputs 32 t4 .. 32 t4 + 31 of the chunk as 16
  // bf16x2 words: the B operand (token tile b) of every tile's mma, loaded once.
  uint32_t xb[NB][C][16];
  bool live[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    live[c] = chunk0 + c < chunks;
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const int tok = 8 * b + g;
      const uint4* xp = reinterpret_cast<const uint4*>(a.x + static_cast<size_t>(min(tok, a.t - 1)) * a.k +
                                                       min(chunk0 + c, chunks - 1) * kChunk + 32 * t4);
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint4 u = tok < a.t && live[c] ? __ldg(xp + v) : make_uint4(0, 0, 0, 0);
        xb[b][c][4 * v] = u.x, xb[b][c][4 * v + 1] = u.y, xb[b][c][4 * v + 2] = u.z, xb[b][c][4 * v + 3] = u.w;
      }
    }
  }
  const auto codes = [&](int i, int h, int c) {
    const int tile = blockIdx.x + i * gridDim.x;
    return a.packed + static_cast<size_t>(tile * 16 + g + 8 * h) * row_bytes + (chunk0 + c) * (kChunk / 2) + 16 * t4;
  };
  uint4 ring[D][2][C];
  if constexpr (kMode != 3) {
#pragma unroll
    for (int d = 0; d < D; ++d)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < C; ++c)
          if (d < mine && live[c]) ring[d][h][c] = load_stream(codes(d, h, c));
  }
  uint32_t sink = 0;
  for (int i0 = 0; i0 < mine; i0 += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const int i = i0 + d;
      if (i >= mine) break;
      const int tile = blockIdx.x + i * gridDim.x;
      uint4 q[2][C];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if constexpr (kMode == 3) {
            const uint32_t s = (tile * 0x9E3779B9u) ^ (lane * 0x85EBCA6Bu) ^ c;
            q[h][c] = make_uint4(s, s * 3u, s * 5u + h, s * 7u);
          } else {
            q[h][c] = ring[d][h][c];
            if (i + D < mine && live[c]) ring[d][h][c] = load_stream(codes(i + D, h, c));
          }
        }
      if constexpr (kMode == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int c = 0; c < C; ++c) sink ^= q[h][c].x ^ q[h][c].y ^ q[h][c].z ^ q[h][c].w;
        continue;
      }
      uint32_t cb[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4* tp = reinterpret_cast<const uint4*>(a.tables + static_cast<size_t>(tile * 16 + g + 8 * h) * 8);
        const uint4 u = __ldg(tp), v = __ldg(tp + 1);
        cb[h][0] = u.x, cb[h][1] = u.y, cb[h][2] = u.z, cb[h][3] = u.w;
        cb[h][4] = v.x, cb[h][5] = v.y, cb[h][6] = v.z, cb[h][7] = v.w;
      }
      float acc[NB][4] = {};
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (!live[c]) continue;
        const uint32_t wg[4] = {q[0][c].x, q[0][c].y, q[0][c].z, q[0][c].w};
        const uint32_t wh[4] = {q[1][c].x, q[1][c].y, q[1][c].z, q[1][c].w};
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          uint32_t ag[4], ah[4];
          decode_or_pass<kMode>(wg[wi], cb[0], ag);
          decode_or_pass<kMode>(wh[wi], cb[1], ah);
#pragma unroll
          for (int b = 0; b < NB; ++b) {
            mma(acc[b], ag[0], ah[0], ag[1], ah[1], xb[b][c][4 * wi], xb[b][c][4 * wi + 1]);
            mma(acc[b], ag[2], ah[2], ag[3], ah[3], xb[b][c][4 * wi + 2], xb[b][c][4 * wi + 3]);
          }
        }
      }
#pragma unroll
      for (int b = 0; b < NB; ++b)
        red[((warp * max_tiles + i) * NB + b) * 32 + lane] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
    }
  }
  if constexpr (kMode == 0) {
    if (sink == 0x12345678u) a.sink[0] = sink;
    return;
  }
  __syncthreads();
  // Sum the W warps' K ranges: element e = (tile i, token tile b, lane, j) -> row g + 8 (j >> 1),
  // token 8 b + 2 t4 + (j & 1).
  const float* r = reinterpret_cast<const float*>(red);
  constexpr int kTile = NB * 128;  // floats a tile
  for (int e = threadIdx.x; e < mine * kTile; e += W * 32) {
    const int i = e / kTile, b = (e >> 7) % NB, l = (e >> 2) & 31, j = e & 3;
    const int tok = 8 * b + 2 * (l & 3) + (j & 1), row = (blockIdx.x + i * gridDim.x) * 16 + (l >> 2) + 8 * (j >> 1);
    if (tok >= a.t) continue;
    float s = 0.f;
#pragma unroll 4
    for (int w = 0; w < W; ++w) s += r[(w * max_tiles + i) * kTile + e % kTile];
    a.out[(static_cast<size_t>(split) * a.t + tok) * a.n + row] = s;
  }
}

float bf16_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

struct Problem {
  int k, n, t;
  std::vector<uint8_t*> packed;  // 8 weights, together twice the L2 or more
  uint32_t* tables;              // shared by the 8 weights (32 bytes a row: L2-resident either way)
  uint16_t* x;
  float* out;
  uint32_t* sink;
  std::vector<uint8_t> host_codes;
  std::vector<uint16_t> host_cent, host_x;
  std::vector<double> want;  // [t, n]: the CPU reference of the product
  double scale = 0;          // its largest magnitude
};

// Median microseconds of one launch: 4 passes over the 8 weights captured in one CUDA graph
// (no launch gaps between kernels, as in XLA's command buffers), 9 replays.
template <typename Launch>
float time_graph(const Problem& p, Launch launch) {
  cudaStream_t s;
  cudaStreamCreate(&s);
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal);
  for (int pass = 0; pass < 4; ++pass)
    for (uint8_t* w : p.packed) launch(w, s);
  cudaStreamEndCapture(s, &graph);
  cudaGraphInstantiate(&exec, graph, 0);
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  cudaGraphLaunch(exec, s);
  std::vector<float> times;
  for (int rep = 0; rep < 9; ++rep) {
    cudaEventRecord(a, s);
    cudaGraphLaunch(exec, s);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    times.push_back(ms * 1e3f / (4 * p.packed.size()));
  }
  cudaGraphExecDestroy(exec), cudaGraphDestroy(graph), cudaStreamDestroy(s);
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// Largest error of the first weight's product against the CPU reference, relative to its largest
// magnitude (mode 2 only).
double check(const Problem& p, int splits) {
  std::vector<float> got(static_cast<size_t>(splits) * p.t * p.n);
  cudaMemcpy(got.data(), p.out, got.size() * 4, cudaMemcpyDeviceToHost);
  double worst = 0;
  for (int tok = 0; tok < p.t; ++tok)
    for (int row = 0; row < p.n; ++row) {
      double s = 0;
      for (int sp = 0; sp < splits; ++sp) s += got[(static_cast<size_t>(sp) * p.t + tok) * p.n + row];
      worst = std::max(worst, std::fabs(s - p.want[static_cast<size_t>(tok) * p.n + row]));
    }
  return worst / p.scale;
}

template <int W, int C, int D, int NB, int kMode>
void run(const Problem& p, int blocks_per_sm_cap) {
  auto kernel = xs_gemv<W, C, D, NB, kMode>;
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int tiles = p.n / 16, chunks = p.k / kChunk, splits = (chunks + W * C - 1) / (W * C);
  // Persistent grid: as many blocks as fit (at most the cap an SM), spread over the K splits.
  int grid_x = std::min(tiles, std::max(1, sms * blocks_per_sm_cap / splits));
  size_t smem = static_cast<size_t>(W) * ((tiles + grid_x - 1) / grid_x) * NB * 32 * 16;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  int fit = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, W * 32, smem);
  if (fit < blocks_per_sm_cap) {
    grid_x = std::min(tiles, std::max(1, sms * std::max(fit, 1) / splits));
    smem = static_cast<size_t>(W) * ((tiles + grid_x - 1) / grid_x) * NB * 32 * 16;
  }
  cudaFuncAttributes attr;
  cudaFuncGetAttributes(&attr, kernel);
  const dim3 grid(grid_x, splits);
  const auto launch = [&](const uint8_t* w, cudaStream_t s) {
    Args a{p.x, w, p.tables, p.out, p.sink, p.t, p.k, p.n, tiles, splits};
    kernel<<<grid, W * 32, smem, s>>>(a);
  };
  cudaMemset(p.out, 0, static_cast<size_t>(splits) * p.t * p.n * 4);
  launch(p.packed[0], 0);
  cudaDeviceSynchronize();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::printf("W=%d C=%d D=%d mode=%d: %s\n", W, C, D, kMode, cudaGetErrorString(err));
    return;
  }
  const char* err_text = "";
  char buf[32];
  if (kMode == 2) {
    std::snprintf(buf, sizeof buf, "rel.err %.1e", check(p, splits));
    err_text = buf;
  }
  const float us = time_graph(p, launch);
  const double bytes = static_cast<double>(p.n) * p.k / 2;
  static const char* names[] = {"loads alone", "no decode", "full", "compute alone"};
  std::printf("k=%5d n=%5d M=%2d W=%2d C=%d D=%d grid=%4dx%d (%d/SM fit, %3d regs) %-13s %7.2f us %5.0f GB/s %s\n",
              p.k, p.n, p.t, W, C, D, grid_x, splits, fit, attr.numRegs, names[kMode], us, bytes / us / 1e3,
              err_text);
  std::fflush(stdout);
}

template <int W, int C, int D, int NB = 1>
void modes(const Problem& p, int cap) {
  run<W, C, D, NB, 0>(p, cap);
  run<W, C, D, NB, 1>(p, cap);
  run<W, C, D, NB, 2>(p, cap);
  run<W, C, D, NB, 3>(p, cap);
}

Problem make_problem(int k, int n, int t, std::mt19937& rng) {
  Problem p{k, n, t};
  const size_t bytes = static_cast<size_t>(n) * k / 2;
  p.host_codes.resize(bytes);
  for (auto& b : p.host_codes) b = static_cast<uint8_t>(rng());
  std::normal_distribution<float> normal;
  p.host_cent.resize(static_cast<size_t>(n) * 16);
  for (auto& c : p.host_cent) c = float_to_bf16(0.02f * normal(rng));
  p.host_x.resize(static_cast<size_t>(t) * k);
  for (auto& v : p.host_x) v = float_to_bf16(normal(rng));
  std::vector<uint32_t> tables(static_cast<size_t>(n) * 8);
  for (int row = 0; row < n; ++row)
    for (int q = 0; q < 4; ++q) {
      uint32_t lo = 0, hi = 0;
      for (int b = 0; b < 4; ++b) {
        const uint16_t c = p.host_cent[static_cast<size_t>(row) * 16 + 4 * q + b];
        lo |= static_cast<uint32_t>(c & 0xFF) << (8 * b), hi |= static_cast<uint32_t>(c >> 8) << (8 * b);
      }
      tables[static_cast<size_t>(row) * 8 + q] = lo, tables[static_cast<size_t>(row) * 8 + 4 + q] = hi;
    }
  p.want.assign(static_cast<size_t>(t) * n, 0.0);
  std::vector<float> xf(p.host_x.size()), cf(16);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16_to_float(p.host_x[i]);
  for (int row = 0; row < n; ++row) {
    for (int e = 0; e < 16; ++e) cf[e] = bf16_to_float(p.host_cent[static_cast<size_t>(row) * 16 + e]);
    const uint8_t* c = p.host_codes.data() + static_cast<size_t>(row) * k / 2;
    for (int tok = 0; tok < t; ++tok) {
      const float* xr = xf.data() + static_cast<size_t>(tok) * k;
      double s = 0;
      for (int kk = 0; kk < k; kk += 2) s += xr[kk] * cf[c[kk / 2] & 15] + xr[kk + 1] * cf[c[kk / 2] >> 4];
      p.want[static_cast<size_t>(tok) * n + row] = s;
      p.scale = std::max(p.scale, std::fabs(s));
    }
  }
  p.packed.resize(8);
  for (auto& w : p.packed) {
    cudaMalloc(&w, bytes);
    cudaMemcpy(w, p.host_codes.data(), bytes, cudaMemcpyHostToDevice);
  }
  cudaMalloc(&p.tables, tables.size() * 4);
  cudaMemcpy(p.tables, tables.data(), tables.size() * 4, cudaMemcpyHostToDevice);
  cudaMalloc(&p.x, p.host_x.size() * 2);
  cudaMemcpy(p.x, p.host_x.data(), p.host_x.size() * 2, cudaMemcpyHostToDevice);
  cudaMalloc(&p.out, static_cast<size_t>(64) * t * n * 4);
  cudaMalloc(&p.sink, 4);
  return p;
}

void free_problem(Problem& p) {
  for (auto w : p.packed) cudaFree(w);
  cudaFree(p.tables), cudaFree(p.x), cudaFree(p.out), cudaFree(p.sink);
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  for (auto [k, n] : {std::pair{4096, 14336}, std::pair{14336, 4096}}) {
    for (int t : {1, 8, 16}) {
      Problem p = make_problem(k, n, t, rng);
      if (t <= 8) {
        modes<16, 2, 2>(p, 1);
        modes<16, 1, 2>(p, 1);
        modes<16, 1, 4>(p, 1);
        modes<8, 2, 2>(p, 2);
        modes<8, 1, 4>(p, 2);
        modes<32, 1, 2>(p, 1);
        modes<8, 4, 1>(p, 2);
      } else {
        modes<16, 1, 2, 2>(p, 1);
        modes<16, 1, 4, 2>(p, 1);
        modes<8, 1, 4, 2>(p, 2);
        modes<8, 2, 2, 2>(p, 2);
        modes<16, 2, 2, 2>(p, 1);
      }
      free_problem(p);
    }
  }
  print_copy_bandwidth();
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) std::printf("error: %s\n", cudaGetErrorString(err));
  return err != cudaSuccess;
}
