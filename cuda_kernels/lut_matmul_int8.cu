// CUDA codebook (LUT) matmul with int8 numerics, as an XLA FFI custom call (wrapper:
// cuda_kernels/lut_matmul_int8.py; the numerics are defined by cqjax.lut_matmul's
// lut_matmul_int8_reference, the same as the CPU kernel's int8 path):
//
//   out [t, n] = (sc[e, n] * float(xq [t, k] . cq[e, n, code(e, n, kk)])) * sx[t]   (float32, then
//                out's dtype)
//
// where xq is x rounded to int8 per row (scale sx) and cq each row's 16 centroids rounded to int8
// (scale sc: absmax / 127); the dot products are exact in int32. Operands:
//   xq         int8  [t, k]
//   sx         float32 [t]
//   packed     uint8 [experts, n, k/2]   two codes a byte, low nibble first (cqjax/codebook.py)
//   centroids  float32 or bf16 [experts, n, 16]; rounded here, as int8_round (round half to
//              even), once a block into shared memory: no pass over every expert's codebooks in
//              XLA, only the rows a block multiplies
//   slots      int32 [3, s]              expert, first row, rows of each slot (rows 0: no work)
//   out        float32 or bf16 [t, n]; rows no slot covers are zero
//
// Why: the bf16 kernel (lut_matmul.cu) is bound by its decode at decode batch sizes (21 integer
// instructions per 8 codes, BENCHMARKS.md session 23). An int8 table is 16 bytes, so 8 codes
// decode in 11 instructions (two byte permutes and a select per 4 codes) into the A operand of
// mma.sync m16n8k32 (s8), which takes twice the inputs of the bf16 mma.
//
// Mapping: a block owns 16 output columns (the mma's rows: lane (g, t) decodes rows g and g + 8)
// and its W warps split K by 128-input chunks (warp w takes chunks w, w + W, ...). The mma's k
// order is free as long as A and B agree: lane t takes inputs [32 t, 32 t + 32) of each chunk
// (16 consecutive code bytes of each of its rows, one 16-byte load), 8 a k32 step, so the 32
// activations of each of its rows of x are consecutive too. Codes are loaded kDepth8 chunks
// ahead. The warps' int32 sums meet in shared memory (exact, so in any order). Prefill rows on
// Hopper take a second kernel, wg8_kernel (below): the same decode into wgmma's A operand.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "int8_output.cuh"
#include "launch_limits.cuh"
#include "lut_decode.cuh"
#include "wgmma.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cqjax_cuda;

constexpr int kChunk8 = 128;  // inputs a chunk: 16 code bytes a lane, four k32 steps
// Chunks of codes in flight per lane ahead of the decode: 2 with 16 warps, whose registers then fit
// two blocks an SM (32 warps; 3 chunks took one block), else 3.
template <int W>
constexpr int kDepth8 = W == 16 ? 2 : 3;
// Blocks an SM the registers are held to with one 8-row tile of x: 24 warps, or 32 with 16 warps
// a block (ptxas spills nothing there; left to itself it may take registers enough to cost a
// block). 0 leaves two tiles to ptxas (a bound of 1 would let it take more).
template <int W, int MT>
constexpr int kMinBlocks8 = MT != 1 ? 0 : W == 16 ? 2 : 768 / (W * 32);
constexpr int64_t kMaxK8 = 133143;  // |dot| <= k * 127 * 127 must fit in int32

struct Int8Problem {
  const int8_t* x;
  const float* sx;
  const uint8_t* packed;
  const void* centroids;  // float32 or bf16 (cent_bf16)
  const int32_t* slots;   // [3, num_slots]
  void* out;              // float32 or bf16 (out_bf16)
  int t, k, n, num_slots;
  int x_stride;  // x's row length: k, or k padded to whole 128-input stages (wg8_kernel)
  int splits;    // wg8_kernel: K split this many ways, each split's int32 sums in out [splits, t, n]
  bool cent_bf16, out_bf16;
};

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The eight codes of w (code i in bits 4i .. 4i + 3) -> their int8 centroids from a row's table
// (entry j in byte j): lo holds codes 0-3, hi codes 4-7. prmt indexes 8 bytes with bits 0-2 of
// each selector nibble (bit 3 would switch it to sign mode), so entries 0-7 and 8-15 are looked up
// separately and bit 3 of each code picks one: the mask sign-replicates the byte whose top bit is
// that bit (as decode_word of lut_decode.cuh).
__device__ __forceinline__ void decode8_s8(uint32_t w, const uint4& tab, uint32_t& lo, uint32_t& hi) {
  const uint32_t w4 = w << 4, sel = w & 0x77777777u, sel_hi = sel >> 16;
  const uint32_t m_lo = prmt(w4, w, 0xD9C8u), m_hi = prmt(w4, w, 0xFBEAu);
  lo = (prmt(tab.x, tab.y, sel) & ~m_lo) | (prmt(tab.z, tab.w, sel) & m_lo);
  hi = (prmt(tab.x, tab.y, sel_hi) & ~m_hi) | (prmt(tab.z, tab.w, sel_hi) & m_hi);
}

// Rounds the codebooks of a block's R columns (n0 + r of this expert; past n, column n - 1) to
// int8 in shared memory, 16 threads a column, as cqjax.lut_matmul.int8_round: scale = absmax *
// f32(1/127) (1 where absmax is 0), entries rint(c * (1 / scale)), the division IEEE-rounded.
// T threads: with more entries than threads, each loads all its entries before rounding any, so
// the block waits on one round trip to memory, not on one a round (the wgmma kernel's blocks have 8).
template <int R, int T>
__device__ __forceinline__ void round_tables(const Int8Problem& p, int expert, int n0, int8_t (&tab)[R][16],
                                             float (&scale)[R]) {
  static_assert(T > R * 16 ? T % (R * 16) == 0 : R * 16 % T == 0, "whole warps a round");
  const auto load = [&](int i) {
    const size_t at = (static_cast<size_t>(expert) * p.n + min(n0 + i / 16, p.n - 1)) * 16 + i % 16;
    return p.cent_bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p.centroids)[at])
                       : static_cast<const float*>(p.centroids)[at];
  };
  const auto round = [&](int i, float c) {
    float amax = fabsf(c);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = amax > 0.f ? __fmul_rn(amax, 1.f / 127.f) : 1.f;
    tab[i / 16][i % 16] = static_cast<int8_t>(__float2int_rn(__fmul_rn(c, __fdiv_rn(1.f, s))));
    if (i % 16 == 0) scale[i / 16] = s;
  };
  constexpr int kRounds = R * 16 / T;
  if constexpr (kRounds <= 1) {
    if (threadIdx.x < R * 16) round(threadIdx.x, load(threadIdx.x));  // whole warps idle past R * 16
  } else {
    float c[kRounds];
#pragma unroll
    for (int u = 0; u < kRounds; ++u) c[u] = load(threadIdx.x + u * T);
#pragma unroll
    for (int u = 0; u < kRounds; ++u) round(threadIdx.x + u * T, c[u]);
  }
}

__device__ __forceinline__ void store(const Int8Problem& p, int row, int col, float v) {
  store_float(p.out, p.out_bf16, static_cast<size_t>(row) * p.n + col, v);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One 128-input chunk c: the lane's code words qa (row g) and qb (row g + 8), 8 codes a word, and
// the 32 activations of each of its MT rows of x that they multiply (zeros where the row is not
// the slot's or the lane has no inputs in a partial last chunk). x is loaded here, not with the
// codes ahead: a register ring for it measured no faster at M = 1 and slower at M = 16 (its
// registers cost occupancy; BENCHMARKS.md session 29).
template <int MT>
__device__ __forceinline__ void chunk_s8(int (&acc)[MT][4], const uint4& qa, const uint4& qb, const uint4& tab_a,
                                         const uint4& tab_b, const int8_t* const (&xr)[MT], const bool (&xok)[MT],
                                         int c) {
  uint4 xv[MT][2];
#pragma unroll
  for (int i = 0; i < MT; ++i) {
    const uint4* src = reinterpret_cast<const uint4*>(xr[i] + static_cast<size_t>(c) * kChunk8);
    xv[i][0] = xok[i] ? __ldg(src) : make_uint4(0, 0, 0, 0);
    xv[i][1] = xok[i] ? __ldg(src + 1) : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // k32 step j: the lane's inputs 8 j .. 8 j + 7
    uint32_t a0, a1, a2, a3;
    decode8_s8(word(qa, j), tab_a, a0, a2);
    decode8_s8(word(qb, j), tab_b, a1, a3);
#pragma unroll
    for (int i = 0; i < MT; ++i)
      mma_s8(acc[i], a0, a1, a2, a3, word(xv[i][j / 2], 2 * (j % 2)), word(xv[i][j / 2], 2 * (j % 2) + 1));
  }
}

template <int W, int MT>
__global__ void __launch_bounds__(W * 32, kMinBlocks8<W, MT>) int8_kernel(Int8Problem p) {
  __shared__ int sums[W][MT * 4][32];
  __shared__ __align__(16) int8_t tab[16][16];
  __shared__ float scale[16];
  const int slot = blockIdx.y, col_tiles = (p.n + 15) / 16;
  // This block's 16-column tiles: blockIdx.x, blockIdx.x + gridDim.x, ... (one unless persistent).
  const int my_tiles = (col_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x;
  const auto tile_n0 = [&](int q) { return (blockIdx.x + q * gridDim.x) * 16; };
  if (slot == 0)
    for (int q = 0; q < my_tiles; ++q)
      zero_rows_past_slots(p.out, p.out_bf16, p.slots, p.num_slots, p.t, p.n, tile_n0(q), 16);
  const int rows = p.slots[2 * p.num_slots + slot];
  if (rows == 0) return;
  const int expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2;
  const int chunks = (p.k + kChunk8 - 1) / kChunk8, mine = (chunks - warp + W - 1) / W;
  const int passes = (rows + 8 * MT - 1) / (8 * MT);
  // k is a multiple of 32, so a lane has all 32 inputs of a chunk or none (partial last chunk).
  const auto has_inputs = [&](int c) { return 32 * t4 < p.k - c * kChunk8; };

  // The code loads run kDepth8 chunks ahead through one ring over the block's (tile, pass, chunk)
  // sequence, so the next tile's first codes are in flight while this one's sums are reduced
  // (the point of a persistent grid). Load cursor: tile lt, pass lp, chunk index li; code_a /
  // code_b are the lane's rows g and g + 8 of tile lt (columns past n decode row n - 1, unstored).
  int lt = 0, lp = 0, li = 0;
  const uint8_t *code_a, *code_b;
  const auto aim = [&](int q) {
    const size_t base = static_cast<size_t>(expert) * p.n;
    code_a = p.packed + (base + min(tile_n0(q) + g, p.n - 1)) * row_bytes + 16 * t4;
    code_b = p.packed + (base + min(tile_n0(q) + g + 8, p.n - 1)) * row_bytes + 16 * t4;
  };
  aim(0);
  const auto issue = [&](uint4& a, uint4& b) {
    const int c = warp + li * W;
    const bool ok = mine > 0 && lt < my_tiles && has_inputs(c);
    a = ok ? load_stream(code_a + static_cast<size_t>(c) * (kChunk8 / 2)) : make_uint4(0, 0, 0, 0);
    b = ok ? load_stream(code_b + static_cast<size_t>(c) * (kChunk8 / 2)) : make_uint4(0, 0, 0, 0);
    if (mine > 0 && ++li == mine) {
      li = 0;
      if (++lp == passes) {
        lp = 0;
        if (++lt < my_tiles) aim(lt);
      }
    }
  };
  uint4 qa[kDepth8<W>], qb[kDepth8<W>];
#pragma unroll
  for (int j = 0; j < kDepth8<W>; ++j) issue(qa[j], qb[j]);

  for (int q = 0; q < my_tiles; ++q) {
    const int n0 = tile_n0(q);
    round_tables<16, W * 32>(p, expert, n0, tab, scale);  // while this tile's first codes are on their way
    __syncthreads();
    const uint4 tab_a = reinterpret_cast<const uint4*>(tab)[g], tab_b = reinterpret_cast<const uint4*>(tab)[g + 8];
    for (int r0 = 0; r0 < rows; r0 += 8 * MT) {
      const int8_t* xr[MT];
      bool xok[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int r = r0 + 8 * i + g;
        xok[i] = r < rows;
        xr[i] = p.x + static_cast<size_t>(row0 + min(r, rows - 1)) * p.k + 32 * t4;
      }
      int acc[MT][4] = {};
      for (int i = 0; i < mine; ++i) {
        const int c = warp + i * W;
        const uint4 a = qa[0], b = qb[0];
#pragma unroll
        for (int j = 0; j + 1 < kDepth8<W>; ++j) qa[j] = qa[j + 1], qb[j] = qb[j + 1];
        issue(qa[kDepth8<W> - 1], qb[kDepth8<W> - 1]);
        bool ok[MT];
#pragma unroll
        for (int r = 0; r < MT; ++r) ok[r] = xok[r] && has_inputs(c);
        chunk_s8<MT>(acc, a, b, tab_a, tab_b, xr, ok, c);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sums[warp][4 * i + e][lane] = acc[i][e];
      __syncthreads();
      // D fragment: register e of tile i holds (column g + 8 (e / 2), row 2 t + e % 2) of lane (g, t).
      for (int v = threadIdx.x; v < MT * 4 * 32; v += W * 32) {
        const int reg = v / 32, l = v % 32, e = reg % 4;
        int dot = 0;
#pragma unroll
        for (int w = 0; w < W; ++w) dot += sums[w][reg][l];
        const int c = (l >> 2) + 8 * (e >> 1), r = r0 + 8 * (reg / 4) + 2 * (l & 3) + (e & 1);
        if (r < rows && n0 + c < p.n)
          store(p, row0 + r, n0 + c, scaled_dot(scale[c], dot, p.sx[row0 + r]));
      }
      __syncthreads();  // sums and scales are read before the next pass or tile writes them
    }
  }
}

// Prefill on Hopper (sm_90a): a block of WG (1 or 2) warpgroups owns 64 WG output columns (16 a
// warp) and N = 32, 64 or 128 rows of x (blockIdx.y), and multiplies them with wgmma: each warp's
// decoded int8 weights are the A operand, in registers, decoded once for the N rows; x the B
// operand, read by the tensor cores from shared memory, one copy for the block's warpgroups (every
// column block reads all of x: more warpgroups a block, fewer bytes of x from L2 a code byte).
// Stages of 128 inputs (x's N rows of 128 bytes in the 128-byte swizzle, then the block's 64 WG
// rows of 64 code bytes) are copied with cp.async kWg8Ahead stages ahead of the one multiplied.
// x comes permuted within each 128 inputs (cuda_kernels/lut_matmul_int8.py: wg_order) so that
// lane t's A operands of all four k32 steps are the codes of inputs [32 t, 32 t + 32) of the
// stage, one 16-byte word of each of its two rows, decoded as the decode kernel does; x is
// zero-padded to whole stages, so a K tail needs no care (its codes, zero-filled, meet zeros).
// The sums are exact, so K may be split (p.splits, single weights: blockIdx.y = row block *
// splits + split) with each split's int32 sums written to out [splits, t, n] for XLA to add and
// scale: no counters, no order to keep.
constexpr int kWg8Inputs = 128;

template <int N, int WG>
__host__ __device__ constexpr int wg8_stage_bytes() {
  return N * kWg8Inputs + 64 * WG * kWg8Inputs / 2;  // x's rows, then the block's rows of codes
}

// Stages in the ring: 6 (4 copied ahead); 4 for 128-row blocks, whose 20-24 KiB stages would
// otherwise leave one block an SM.
template <int N>
__host__ __device__ constexpr int wg8_stages() {
  return N > 64 ? 4 : 6;
}

// Blocks an SM the registers are held to: two of two 128-row warpgroups (their rings fit two).
template <int N, int WG>
__host__ __device__ constexpr int wg8_min_blocks() {
  return N > 64 && WG > 1 ? 2 : 1;
}

template <int N, int WG>
__global__ void __launch_bounds__(128 * WG, wg8_min_blocks<N, WG>()) wg8_kernel(Int8Problem p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kWg8Stages = wg8_stages<N>(), kWg8Ahead = kWg8Stages - 2;  // a stage's buffer is rewritten once no wgmma reads it
  constexpr int kCols = 64 * WG, kXRows = 16 * WG;  // x's rows a round of copies (kXRows / 8 whole swizzle groups)
  constexpr int kXBytes = N * kWg8Inputs, kXCopies = N / kXRows;  // a thread's 16-byte chunks of x a stage
  static_assert(kXCopies >= 1 && kXCopies * kXRows == N, "x's chunks shared evenly");
  extern __shared__ __align__(128) uint8_t wsm_[];
  uint8_t* const wsm = wsm_ + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(wsm_)) & 1023)) & 1023);  // swizzle tiles
  __shared__ __align__(16) int8_t tab[kCols][16];
  __shared__ float scale[kCols];
  const int slot = blockIdx.z, n0 = blockIdx.x * kCols, split = blockIdx.y % p.splits, row_block = blockIdx.y / p.splits;
  if (slot == 0 && blockIdx.y == 0 && p.splits == 1)
    zero_rows_past_slots(p.out, p.out_bf16, p.slots, p.num_slots, p.t, p.n, n0, kCols);
  const int rows = p.slots[2 * p.num_slots + slot];
  if (row_block * N >= rows) return;
  const int expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2, x_stride = p.x_stride;
  const int stages = (p.k + kWg8Inputs - 1) / kWg8Inputs, per_split = (stages + p.splits - 1) / p.splits;
  const int s_begin = min(stages, split * per_split), s_end = min(stages, s_begin + per_split);
  round_tables<kCols, 128 * WG>(p, expert, n0, tab, scale);
  __syncthreads();
  const uint4 tab_a = reinterpret_cast<const uint4*>(tab)[16 * warp + g], tab_b = reinterpret_cast<const uint4*>(tab)[16 * warp + g + 8];

  // Stage s: x's rows rb + xr + kXRows j (chunk c of row r at chunk c ^ (r % 8) of its 128 bytes; rows
  // past the slot's zero-filled), then code row n0 + thread / 2, 32 bytes a thread. A thread's
  // copies move by the same offsets each stage, so their addresses are set once a pass.
  const int xc = threadIdx.x & 7, xr = threadIdx.x >> 3;
  const uint32_t x_dst = 128 * xr + 16 * (xc ^ (xr & 7));  // + 128 kXRows j for copy j (the same swizzle)
  const int code_row = threadIdx.x >> 1, code_half = threadIdx.x & 1;
  const uint8_t* code_src = p.packed + (static_cast<size_t>(expert) * p.n + min(n0 + code_row, p.n - 1)) * row_bytes + 32 * code_half;
  const uint32_t code_dst = kXBytes + 64 * code_row + 32 * code_half, word_at = kXBytes + 64 * (16 * warp + g) + 16 * t4;
  pin(code_src);
  const auto stage_buffer = [&](int s) { return wsm + static_cast<unsigned>(s) % kWg8Stages * wg8_stage_bytes<N, WG>(); };

  // Passes over the block's row blocks (one unless the grid has fewer row blocks than a slot's
  // rows need: grouped experts' slots are sized on the device).
  for (int rb = row_block * N; rb < rows; rb += gridDim.y / p.splits * N) {
    if (rb != row_block * N) __syncthreads();  // every warp is done with the previous pass's buffers
    const int8_t* x_src = p.x + static_cast<size_t>(row0 + min(rb + xr, rows - 1)) * x_stride + 16 * xc;
    uint32_t x_valid = 0;  // bit j: copy j's row is one of the slot's
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) x_valid |= static_cast<uint32_t>(rb + xr + kXRows * j < rows) << j;
    pin(x_src);
    const auto load_stage = [&](int s) {
      uint8_t* buf = stage_buffer(s);
      const int k0 = s * kWg8Inputs, kin = min(kWg8Inputs, p.k - k0);
#pragma unroll
      for (int j = 0; j < kXCopies; ++j)
        cp_async16(buf + x_dst + 128 * kXRows * j, x_src + kXRows * j * x_stride + k0, (x_valid >> j) & 1);
#pragma unroll
      for (int h = 0; h < 2; ++h)  // 16 bytes: 32 inputs, all of the row's or none (k: a multiple of 32)
        cp_async16(buf + code_dst + 16 * h, code_src + k0 / 2 + 16 * h, 64 * code_half + 32 * h < kin);
    };
    ring_start<kWg8Ahead>(s_begin, s_end, load_stage);
    int acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0;
    uint32_t a[2][4];  // the A registers of two k32 steps: one decoded while the other's wgmma runs
    for (int s = s_begin; s < s_end; ++s) {
      ring_next<kWg8Ahead>(s, s_end, load_stage);
      const uint8_t* buf = stage_buffer(s);
      const uint32_t xs = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
      const uint4 qa = *reinterpret_cast<const uint4*>(buf + word_at), qb = *reinterpret_cast<const uint4*>(buf + word_at + 512);
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // k32 step j: bytes 32 j ... of x's rows, word j of the lane's codes
        uint32_t (&aj)[4] = a[j & 1];
        decode8_s8(word(qa, j), tab_a, aj[0], aj[2]);
        decode8_s8(word(qb, j), tab_b, aj[1], aj[3]);
        wgmma_fence();
        wgmma_s8<N>(acc, aj, wgmma_desc_sw128(xs + 32 * j));
        wgmma_commit();
        wgmma_wait<1>();  // the previous step's wgmma is done: its A registers may be rewritten
        wgmma_keep(a[(j + 1) & 1]);
      }
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    for_each_d<N>(warp, lane, [&](int i, int c, int x_row) {
      const int r = rb + x_row;
      if (r >= rows || n0 + c >= p.n) return;
      if (p.splits > 1)
        static_cast<int*>(p.out)[(static_cast<size_t>(split) * p.t + row0 + r) * p.n + n0 + c] = acc[i];
      else
        store(p, row0 + r, n0 + c, scaled_dot(scale[c], acc[i], p.sx[row0 + r]));
    });
  }
#endif
}

// persistent: as many blocks a slot as fill the GPU once (its resident blocks shared among the
// slots), each looping over column tiles; else one block a tile.
template <int W, int MT>
cudaError_t launch_int8(cudaStream_t stream, const Int8Problem& p, bool persistent) {
  const int col_tiles = (p.n + 15) / 16;
  int grid_x = col_tiles;
  if (persistent) {
    LaunchLimits lim;
    const cudaError_t err = launch_limits<int8_kernel<W, MT>>(W * 32, lim);
    if (err != cudaSuccess) return err;
    grid_x = std::min(col_tiles, std::max(1, (lim.sms * lim.fit + p.num_slots - 1) / p.num_slots));
  }
  int8_kernel<W, MT><<<dim3(grid_x, p.num_slots), W * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

// The wgmma kernel: 64 WG columns a block, as many row blocks as the rows of an even share of the
// slots need (single weights: all; a block loops over any more of its slot's).
template <int N, int WG>
cudaError_t launch_wg8(cudaStream_t stream, const Int8Problem& p) {
  LaunchLimits lim;
  const cudaError_t err = launch_limits<wg8_kernel<N, WG>>(128 * WG, lim);
  if (err != cudaSuccess) return err;
  if (lim.major != 9) return cudaErrorNotSupported;  // wgmma: built for sm_90a only
  const int row_blocks = std::max(1, (p.t + p.num_slots * N - 1) / (p.num_slots * N));
  const dim3 grid((p.n + 64 * WG - 1) / (64 * WG), row_blocks * p.splits, p.num_slots);
  wg8_kernel<N, WG><<<grid, 128 * WG, wg8_stages<N>() * wg8_stage_bytes<N, WG>() + 1024, stream>>>(p);  // + alignment
  return cudaGetLastError();
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("cqjax CUDA lut_matmul_int8: " + what);
}

ffi::Error LutMatmulInt8Impl(cudaStream_t stream, ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::F32> sx,
                             ffi::Buffer<ffi::U8> packed, ffi::AnyBuffer centroids, ffi::Buffer<ffi::S32> slots,
                             ffi::Result<ffi::AnyBuffer> out, int64_t warps, int64_t mt, bool persistent,
                             bool wgmma) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), cd = centroids.dimensions(), sd = slots.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || cd.size() != 3 || sd.size() != 2 || sd[0] != 3)
    return invalid("expected x [t, k] (wgmma: k padded to a multiple of 128), packed [e, n, k/2], centroids [e, n, 16], slots [3, s]");
  const int64_t t = xd[0], k = 2 * pd[2], e = pd[0], n = pd[1];
  const int64_t x_stride = wgmma ? (k + kWg8Inputs - 1) / kWg8Inputs * kWg8Inputs : k;
  if (k % 32 != 0 || k > kMaxK8 || xd[1] != x_stride || cd[0] != e || cd[1] != n || cd[2] != 16)
    return invalid("operand shapes disagree (k a multiple of 32 up to 133143, one 16-entry codebook a row)");
  // An int32 output [splits, t, n]: the wgmma kernel's split-K sums of one weight (no scaling).
  const bool partial = out->element_type() == ffi::DataType::S32;
  if (!float_or_bf16(centroids.element_type()) || !(float_or_bf16(out->element_type()) || partial))
    return invalid("centroids and the output must be float32 or bf16 (int32 [splits, t, n]: split-K sums)");
  if (sx.element_count() != t) return invalid("the scales of x must be float32 [t]");
  const auto od = out->dimensions();
  if (partial ? od.size() != 3 || od[0] < 1 || od[1] != t || od[2] != n : od.size() != 2 || od[0] != t || od[1] != n)
    return invalid("output must be [t, n] (split-K sums: int32 [splits, t, n])");
  if (partial && (!wgmma || sd[1] != 1)) return invalid("split-K sums come from the wgmma kernel, for one weight");
  if (t == 0 || n == 0 || sd[1] == 0) return ffi::Error::Success();
  const Int8Problem p{x.typed_data(), sx.typed_data(), packed.typed_data(), centroids.untyped_data(),
                      slots.typed_data(), out->untyped_data(), static_cast<int>(t), static_cast<int>(k),
                      static_cast<int>(n), static_cast<int>(sd[1]), static_cast<int>(x_stride),
                      partial ? static_cast<int>(od[0]) : 1, centroids.element_type() == ffi::DataType::BF16,
                      out->element_type() == ffi::DataType::BF16};
  cudaError_t err;
  switch (wgmma ? 100000 + warps * 100 + mt : warps * 10 + mt) {
    case 100404: err = launch_wg8<32, 1>(stream, p); break;
    case 100408: err = launch_wg8<64, 1>(stream, p); break;
    case 100808: err = launch_wg8<64, 2>(stream, p); break;
    case 100416: err = launch_wg8<128, 1>(stream, p); break;
    case 100816: err = launch_wg8<128, 2>(stream, p); break;
    case 41: err = launch_int8<4, 1>(stream, p, persistent); break;
    case 42: err = launch_int8<4, 2>(stream, p, persistent); break;
    case 81: err = launch_int8<8, 1>(stream, p, persistent); break;
    case 82: err = launch_int8<8, 2>(stream, p, persistent); break;
    case 161: err = launch_int8<16, 1>(stream, p, persistent); break;
    case 162: err = launch_int8<16, 2>(stream, p, persistent); break;
    default: return invalid("no kernel for this tuning (cuda_kernels/lut_matmul_int8.py: KERNELS lists those built)");
  }
  if (wgmma && err == cudaErrorNotSupported) return invalid("the wgmma kernel needs a Hopper GPU (sm_90)");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("cqjax CUDA lut_matmul_int8: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxLutMatmulInt8Cuda, LutMatmulInt8Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("warps")
                                  .Attr<int64_t>("mt")
                                  .Attr<bool>("persistent")
                                  .Attr<bool>("wgmma"),
                              {ffi::Traits::kCmdBufferCompatible});
