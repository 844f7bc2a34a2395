// CUDA codebook (LUT) matmul for 4-bit codes with one 16-entry codebook per output row, as an
// XLA FFI custom call (cuda_kernels/lut_matmul.py is its wrapper; the jnp reference is
// cqjax.lut_matmul.lut_matmul_reference).
//
//   out [t, n] = x [t, k] (bf16) @ W [k, n],  W[kk, nn] = centroids[e(row), nn, code(e, nn, kk)]
//
// One launch serves a single weight (one slot: expert 0, all rows) and stacked experts (the
// ragged_dot contract: rows sorted by expert, one slot per non-empty expert). Operands:
//   x          bf16  [t, k]
//   packed     uint8 [experts, n, k/2]   two codes a byte, low nibble first (cqjax/codebook.py)
//   centroids  bf16  [experts, n, 16]
//   slots      int32 [3, s]              expert, first row, rows of each slot (rows 0: no work)
//   counters   int32 [s, n blocks]       zeros, aliased to the third result when K is split (layout 7: 16-column blocks)
//   out        bf16 [t, n]; rows no slot covers are zero
//   partials   float32 [splits, t, n]    scratch when K is split ([1, 1, 1] otherwise)
//
// With K split over `splits` blocks, each writes its float32 partial sums; the block that counts
// in last for its (slot, column block) adds all partials in split order and writes the bf16
// result: deterministic, and no second pass over the output.
//
// Decode (`layout` attribute). A code byte holds the two codes of inputs 2j and 2j+1, which is
// exactly one bf16x2 register of a tensor-core B fragment, and the decoded registers feed
// mma.sync m16n8k16 directly (no weight tile is ever stored). The mma's k order is free as long
// as A and B agree: lane (g, t) takes the 16 consecutive code bytes 16t..16t+15 of each
// 128-input chunk of its row (one 16-byte load) and the 32 activations they multiply, so both
// operands are read with 16-byte loads.
//   4: registers only. Each lane holds its row's 16 centroids as byte tables (lo bytes, hi
//      bytes), and byte permutes select, mask and interleave them: about 12 integer instructions
//      per 4 codes, no shared memory, nothing to build before the first load.
//   3: half of each code word through 256-entry tables of bf16x2 pairs in shared memory (1 KB a
//      row, rows of a tile interleaved so row g owns banks g + 8 (e % 4)), the other half by the
//      register decode, so the shared-memory and integer pipes share the work.
//   5: layout 4's decode with the operands swapped: the decoded weights are the mma's A operand
//      (rows g and g + 8 of a pair of n-tiles) and x its B operand (8 rows a tile), so a pass over
//      8 rows or fewer runs half the mma, and neither operand needs a register shuffle.
//   6: layout 3's decode with layout 5's operands.
//   7: layout 5's decode and operands with the loop turned around: each warp keeps one chunk of
//      x in registers and walks 16-column tiles (xs_kernel below); the default where it measured
//      ahead (lut_matmul.py: default_tuning).
//   2: a timing probe: layout 4's loads and tensor-core work with no decode (wrong results).
// (Layouts 0 and 1, tables alone, lost to 3 at every shape measured: BENCHMARKS.md.)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "launch_limits.cuh"
#include "lut_decode.cuh"
#include "wgmma.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cqjax_cuda;

constexpr int kWarps = 4;   // column warps per block: a block owns 4 * 8 * nt columns
constexpr int kChunk = 128;  // inputs per full chunk (16 code bytes per lane, 64 per row)
constexpr int kDepth = 3;    // chunks of codes in flight per lane ahead of the decode

struct Problem {
  const uint16_t* x;
  const uint8_t* packed;
  const uint16_t* centroids;
  const int32_t* slots;  // [3, num_slots]
  int32_t* counters;     // [num_slots, column blocks]
  __nv_bfloat16* out;
  float* partials;
  int t, k, n, num_slots, splits, chunks_per_split;
  int stage_rows;  // rows of x each block copies to shared memory per pass (0: read x from global)
  int stage_stride;  // elements between staged rows (the block's K range plus 8)
  int group;         // layout 7: tiles whose sums a block adds at a time (a multiple of kXsDepth; set by launch_xs)
};

// The four codes in bits 16..31 of w -> two bf16x2 registers. The mask sign-replicates the byte
// whose top bit is bit 3 of code 4 + i.
__device__ __forceinline__ void decode_upper_half(uint32_t w, const uint32_t (&cb)[8], uint32_t& b0, uint32_t& b1) {
  decode_four((w >> 16) & 0x7777u, prmt(w << 4, w, 0xFBEAu), cb, b0, b1);
}

// Four codes -> two bf16x2 B registers. Layout 3 looks the first two bytes up in its pair tables
// (tab: the lane's row, entry e at word 8 e), layout 4 decodes both halves in registers, the probe
// passes the code bits through.
template <int kLayout>
__device__ __forceinline__ void decode(uint32_t w, int s, const uint32_t* tab, const uint32_t (&cb)[8], uint32_t& b0,
                                       uint32_t& b1) {
  if constexpr (kLayout == 4 || kLayout == 5) {
    decode_upper_half(s ? w : w << 16, cb, b0, b1);
  } else if constexpr (kLayout == 3 || kLayout == 6) {
    if (s) {
      decode_upper_half(w, cb, b0, b1);
    } else {
      b0 = tab[(w & 0xFF) << 3], b1 = tab[((w >> 8) & 0xFF) << 3];
    }
  } else {
    const uint32_t h = w >> (16 * s);
    b0 = (h & 0xFF) * 0x00010001u, b1 = ((h >> 8) & 0xFF) * 0x00010001u;
  }
}

// Multiplies one chunk of inputs [k0, k0 + 32 * kWords): lane t4 holds code words q[j][0..kWords)
// (bytes 4*kWords*t4 ... of the chunk's row bytes) for its row of each n-tile j, and reads the
// 8*kWords activations of each of its rows that those codes multiply.
template <int MT, int NT, int kWords, int kLayout>
__device__ __forceinline__ void chunk(float (&acc)[MT][NT][4], const uint32_t (&q)[NT][kWords],
                                      const uint16_t* const (&xr)[MT][2], const bool (&ok)[MT][2],
                                      const uint32_t* const (&tab)[NT], const uint32_t (&cb)[NT][8], int k0,
                                      int t4, bool wide) {
#pragma unroll
  for (int s2 = 0; s2 < kWords; ++s2) {
    uint4 a[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        a[mt][h] = ok[mt][h] ? *reinterpret_cast<const uint4*>(xr[mt][h] + k0 + 8 * kWords * t4 + 8 * s2)
                             : make_uint4(0, 0, 0, 0);  // generic load: x staged in shared memory or global
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      if constexpr (kLayout >= 5) {
        // Weights as the mma's A operand (rows g and g + 8 of each pair of n-tiles), the rows of x
        // as its B operand (8 per tile): no register shuffles, half the mma at 8 rows or fewer.
#pragma unroll
        for (int jp = 0; jp < NT / 2; ++jp) {
          uint32_t p0, p1, q0, q1;
          decode<kLayout>(q[2 * jp][s2], s, tab[2 * jp], cb[2 * jp], p0, p1);
          decode<kLayout>(q[2 * jp + 1][s2], s, tab[2 * jp + 1], cb[2 * jp + 1], q0, q1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              if (h == 1 && !wide) continue;
              const uint32_t x0 = s ? a[mt][h].z : a[mt][h].x, x1 = s ? a[mt][h].w : a[mt][h].y;
              mma(acc[mt][h * (NT / 2) + jp], p0, q0, p1, q1, x0, x1);
            }
        }
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t b0, b1;
          decode<kLayout>(q[j][s2], s, tab[j], cb[j], b0, b1);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint32_t a0 = s ? a[mt][0].z : a[mt][0].x, a2 = s ? a[mt][0].w : a[mt][0].y;
            const uint32_t a1 = s ? a[mt][1].z : a[mt][1].x, a3 = s ? a[mt][1].w : a[mt][1].y;
            mma(acc[mt][j], a0, a1, a2, a3, b0, b1);
          }
        }
      }
    }
  }
}

// Rows past the last slot's (grouped: rows outside every group) are zero: columns col_of(0 ..
// cols - 1) of them, by the calling block. One call a block: the slot sizes are read once (a
// store to out may alias them, so a second call would wait for them again).
template <typename ColOf>
__device__ void zero_uncovered_rows(const Problem& p, int cols, ColOf col_of) {
  int covered = 0;
  for (int i = 0; i < p.num_slots; ++i) covered += p.slots[2 * p.num_slots + i];
  for (int i = threadIdx.x; i < (p.t - covered) * cols; i += blockDim.x) {
    const int col = col_of(i % cols);
    if (col < p.n) p.out[static_cast<size_t>(covered + i / cols) * p.n + col] = __float2bfloat16_rn(0.f);
  }
}

// A block's sum for out[at]: the result (K not split) or this split's partial.
__device__ __forceinline__ void store_sum(const Problem& p, int split, size_t at, float v) {
  if (p.splits == 1) p.out[at] = __float2bfloat16_rn(v);
  else p.partials[static_cast<size_t>(split) * p.t * p.n + at] = v;
}

// Split K: whether this block is the last of its `counter`'s splits to finish (all threads get the
// answer); its partials are visible device-wide before it counts in, the others' after.
__device__ bool last_to_finish(const Problem& p, int counter) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + counter, 1) == p.splits - 1;
  __syncthreads();
  __threadfence();
  return is_last;
}

// out[at[b]] = the partials at at[b] added in split order, where ok[b] (deterministic; read from
// L2, written this launch). The loads of all kBatch positions are in flight together: taken one
// position at a time, each waited on L2 before the next, and a 128-row block's sums (layout 8)
// took as long as its product.
template <int kBatch>
__device__ void store_split_sums(const Problem& p, const size_t (&at)[kBatch], const bool (&ok)[kBatch]) {
  const size_t plane = static_cast<size_t>(p.t) * p.n;
  float sum[kBatch] = {};
  for (int sp = 0; sp < p.splits; ++sp)
#pragma unroll
    for (int b = 0; b < kBatch; ++b)
      if (ok[b]) sum[b] += __ldcg(p.partials + sp * plane + at[b]);
#pragma unroll
  for (int b = 0; b < kBatch; ++b)
    if (ok[b]) p.out[at[b]] = __float2bfloat16_rn(sum[b]);
}

// Split K, layouts with one counter per column block (blockIdx.x) of `cols` columns from n0: the
// last of the block's splits to finish adds the partials of the slot's rows in split order.
__device__ void finish_column_block(const Problem& p, int slot, int row0, int rows, int n0, int cols) {
  if (p.splits == 1 || !last_to_finish(p, slot * gridDim.x + blockIdx.x)) return;
  constexpr int kBatch = 8;
  for (int i0 = threadIdx.x; i0 < rows * cols; i0 += kBatch * blockDim.x) {
    size_t at[kBatch];
    bool ok[kBatch];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = i0 + b * blockDim.x, col = n0 + i % cols;
      ok[b] = i < rows * cols && col < p.n;
      at[b] = static_cast<size_t>(row0 + i / cols) * p.n + col;
    }
    store_split_sums(p, at, ok);
  }
}

// Shared memory of one block: layout 3's pair tables and staged centroids, the K warps' fragment
// hand-over, then (sized at launch) the staged rows of x.
template <int NT, int kLayout>
__host__ __device__ constexpr int table_words() {
  return kLayout == 3 || kLayout == 6 ? kWarps * NT * 8 * (256 + 8) : 0;
}
template <int MT, int NT, int kLayout, int KG>
__host__ __device__ constexpr int smem_bytes() {
  return table_words<NT, kLayout>() * 4 + (KG - 1) * kWarps * MT * NT * 4 * 32 * 4;
}

// KG warps per column warp split the block's chunks among them (warp w takes chunks w, w + KG,
// ...; with layout 3 they share the column warp's tables): more loads in flight per SM; their
// sums meet in shared memory at the end.
template <int MT, int NT, int kLayout, int KG>
__global__ void __launch_bounds__(kWarps * KG * 32) lut_matmul_kernel(Problem p) {
  constexpr int kCols = kWarps * NT * 8;
  constexpr int kThreads = kWarps * KG * 32;
  extern __shared__ uint4 smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);  // layout 3: [kCols / 8][256][8] bf16x2 pairs
  float* red = reinterpret_cast<float*>(table + table_words<NT, kLayout>());
  uint16_t* stage = reinterpret_cast<uint16_t*>(red + (KG - 1) * kWarps * MT * NT * 4 * 32);
  const int slot = blockIdx.z, split = blockIdx.y, n0 = blockIdx.x * kCols;
  const int rows = p.slots[2 * p.num_slots + slot];
  if (split == 0 && slot == 0) zero_uncovered_rows(p, kCols, [&](int c) { return n0 + c; });
  if (rows == 0) return;
  const int expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = (threadIdx.x >> 5) & (kWarps - 1), wk = threadIdx.x >> 7, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2;
  const uint16_t* cent = p.centroids + static_cast<size_t>(expert) * p.n * 16;
  const uint8_t* wrow[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j)
    wrow[j] = p.packed + (static_cast<size_t>(expert) * p.n + min(n0 + (warp * NT + j) * 8 + g, p.n - 1)) * row_bytes;

  // The first kDepth chunks of codes (this warp's: c_begin + wk, + KG, ...) are requested before
  // anything else, so their memory latency overlaps the set-up; every row block reads the same.
  const int full = p.k / kChunk;
  const int c_begin = split * p.chunks_per_split, c_end = min(full, c_begin + p.chunks_per_split);
  constexpr int kStep = KG;
  uint4 ring[kDepth][NT];
  const auto prologue = [&] {
#pragma unroll
    for (int i = 0; i < kDepth; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        if (c_begin + wk + i * kStep < c_end)
          ring[i][j] = load_stream(wrow[j] + (c_begin + wk + i * kStep) * (kChunk / 2) + 16 * t4);
  };
  prologue();

  const uint32_t* tab[NT] = {};
  if constexpr (kLayout == 3 || kLayout == 6) {
    // Pair tables: entry e = (hi << 4 | lo) = {centroid[lo], centroid[hi]}. Word `task` is entry
    // e = (task >> 3) & 255 of row 8 (task >> 11) + (task & 7): consecutive threads store
    // consecutive words, from the block's centroids staged once.
    uint16_t* staged = reinterpret_cast<uint16_t*>(table + kCols * 256);
    for (int i = threadIdx.x; i < kCols * 16; i += kThreads)
      staged[i] = cent[static_cast<size_t>(min(n0 + i / 16, p.n - 1)) * 16 + i % 16];
    __syncthreads();
    for (int task = threadIdx.x; task < kCols * 256; task += kThreads) {
      const int r = (task >> 11) * 8 + (task & 7), e = (task >> 3) & 255;
      table[task] = staged[r * 16 + (e & 15)] | (static_cast<uint32_t>(staged[r * 16 + (e >> 4)]) << 16);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int r = (warp * NT + j) * 8 + g;
      tab[j] = table + (r >> 3) * 2048 + (r & 7);
    }
  }
  uint32_t cb[NT][8] = {};
  if constexpr (kLayout >= 3) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4* c = reinterpret_cast<const uint4*>(cent + static_cast<size_t>(min(n0 + (warp * NT + j) * 8 + g, p.n - 1)) * 16);
      byte_tables(__ldg(c), __ldg(c + 1), cb[j]);
    }
  }
  const int tail_words = split == p.splits - 1 && wk == 0 ? (p.k % kChunk) / 32 : 0;

  // The block's K range: its chunks, and the tail for the last split.
  const int kb = min(c_begin, full) * kChunk, ke = split == p.splits - 1 ? p.k : max(kb, c_end * kChunk);
  for (int rb = 0; rb < rows; rb += 16 * MT) {
    if (p.stage_rows > 0) {
      // This pass's rows of x over the block's K range, copied once into shared memory so that the
      // K loop reads activations at shared-memory latency instead of L2's.
      if (rb > 0) __syncthreads();  // every warp is done with the previous pass's rows
      const int srows = min(rows - rb, p.stage_rows), vecs = (ke - kb) / 8;
      for (int i = threadIdx.x; i < srows * vecs; i += kThreads) {
        const int r = i / vecs, v = i % vecs;
        *reinterpret_cast<uint4*>(stage + r * p.stage_stride + 8 * v) =
            __ldg(reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(row0 + rb + r) * p.k + kb + 8 * v));
      }
      __syncthreads();
    }
    const uint16_t* xr[MT][2];
    bool ok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = rb + mt * 16 + g + 8 * h;
        ok[mt][h] = rr < rows;
        // Indexed by absolute k in both cases.
        xr[mt][h] = p.stage_rows > 0 ? stage + (min(rr, rows - 1) - rb) * p.stage_stride - kb
                                     : p.x + static_cast<size_t>(row0 + min(rr, rows - 1)) * p.k;
      }
    // Layout 5 with 8 rows or fewer in the pass (MT 1) skips the second 8-row tile of x.
    const bool wide = MT > 1 || rows - rb > 8;
    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][j][i] = 0.f;

    // Full chunks, kDepth of them loaded ahead of the one being decoded.
    for (int c = c_begin + wk; c < c_end; c += kDepth * kStep) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int cc = c + i * kStep;
        if (cc < c_end) {
          uint32_t q[NT][4];
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            q[j][0] = ring[i][j].x, q[j][1] = ring[i][j].y, q[j][2] = ring[i][j].z, q[j][3] = ring[i][j].w;
            if (cc + kDepth * kStep < c_end)
              ring[i][j] = load_stream(wrow[j] + (cc + kDepth * kStep) * (kChunk / 2) + 16 * t4);
          }
          chunk<MT, NT, 4, kLayout>(acc, q, xr, ok, tab, cb, cc * kChunk, t4, wide);
        }
      }
    }
    if (rb + 16 * MT < rows) prologue();  // the next row block's first chunks, during this one's tail
    // The last split also takes the 32-input chunks past the last full one.
    for (int w = 0; w < tail_words; ++w) {
      const int k0 = full * kChunk + 32 * w;
      uint32_t q[NT][1];
#pragma unroll
      for (int j = 0; j < NT; ++j) q[j][0] = __ldg(reinterpret_cast<const uint32_t*>(wrow[j] + k0 / 2 + 4 * t4));
      chunk<MT, NT, 1, kLayout>(acc, q, xr, ok, tab, cb, k0, t4, wide);
    }

    if constexpr (KG > 1) {
      // Warps 1..KG-1 of each column warp hand their fragments to warp 0 through shared memory.
      float* mine = red + ((wk - 1) * kWarps + warp) * (MT * NT * 4 * 32) + lane;
      if (wk > 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) mine[((mt * NT + j) * 4 + i) * 32] = acc[mt][j][i];
      }
      __syncthreads();
      if (wk == 0) {
        for (int o = 1; o < KG; ++o) {
          const float* theirs = red + ((o - 1) * kWarps + warp) * (MT * NT * 4 * 32) + lane;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[mt][j][i] += theirs[((mt * NT + j) * 4 + i) * 32];
        }
      }
      __syncthreads();  // the buffer is free for the next row block
      if (wk > 0) continue;
    }
    if constexpr (kLayout >= 5) {
      // Fragment: acc[mt][h * NT / 2 + jp] = columns (g, g + 8) of n-tiles 2 jp, 2 jp + 1 x rows
      // (2 t4, 2 t4 + 1) of x's 8-row tile h.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int jp = 0; jp < NT / 2; ++jp)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int r = rb + mt * 16 + h * 8 + 2 * t4 + (i & 1);
              const int col = n0 + (warp * NT + 2 * jp + (i >> 1)) * 8 + g;
              if (r >= rows || col >= p.n) continue;
              const float v = acc[mt][h * (NT / 2) + jp][i];
              const size_t at = static_cast<size_t>(row0 + r) * p.n + col;
              store_sum(p, split, at, v);
            }
    } else {
      // Fragment: acc[mt][j] = rows (g, g + 8) x columns (2 t4, 2 t4 + 1) of the 16x8 tile.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!ok[mt][h]) continue;
          const size_t row = row0 + rb + mt * 16 + g + 8 * h;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const int col = n0 + (warp * NT + j) * 8 + 2 * t4;
            const float v0 = acc[mt][j][2 * h], v1 = acc[mt][j][2 * h + 1];
            if (p.splits == 1) {
              __nv_bfloat16* o = p.out + row * p.n + col;
              if (col + 1 < p.n && (p.n % 2) == 0) {
                *reinterpret_cast<__nv_bfloat162*>(o) = __floats2bfloat162_rn(v0, v1);
              } else {
                if (col < p.n) o[0] = __float2bfloat16_rn(v0);
                if (col + 1 < p.n) o[1] = __float2bfloat16_rn(v1);
              }
            } else {
              float* o = p.partials + (static_cast<size_t>(split) * p.t + row) * p.n + col;
              if (col + 1 < p.n && (p.n % 2) == 0) {
                *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
              } else {
                if (col < p.n) o[0] = v0;
                if (col + 1 < p.n) o[1] = v1;
              }
            }
          }
        }
    }
  }
  finish_column_block(p, slot, row0, rows, n0, kCols);
}

// Layout 7, x-stationary (BENCHMARKS.md, session 23). Each warp owns one 128-input chunk of K for
// the whole launch: it holds the activations of that chunk in registers (the mma's B operand, NB
// tiles of 8 rows of x) and walks 16-row tiles of the weight, a fresh accumulator per tile stored
// to shared memory; the block's W warps (W chunks) are summed in warp order every kXsGroup tiles
// (shared memory independent of the tiles a block takes) or in as few groups as shared memory
// holds at the same residency (sum_once: at best once, at the end). Block
// (bx, split, slot) takes tiles bx, bx + gridDim.x, ... of its slot's weight over chunks
// [W split, W split + W), and the launch sizes gridDim.x so that all blocks are resident and each
// takes the same number of tiles within one. Against layout 5, which walks K for fixed rows, this
// removes the activation loads from the K loop, the serial chain of mma into one accumulator and
// the warps' hand-over after it. Decode and operand roles are layout 5's; the byte tables of the
// block's rows are built once in shared memory; codes stream kXsDepth tiles ahead.
constexpr int kXsDepth = 2, kXsGroup = 4;  // tiles of codes in flight; tiles summed at a time (or all)

template <int W, int NB>
__host__ __device__ constexpr int xs_sum_bytes(int group) {
  return W * group * NB * 32 * 16;  // the warps' sums of a group of tiles
}

template <int W, int NB>
__global__ void __launch_bounds__(W * 32) xs_kernel(Problem p) {
  extern __shared__ uint4 smem[];
  const int slot = blockIdx.z, split = blockIdx.y, tiles = (p.n + 15) / 16;
  const int mine = (tiles - 1 - static_cast<int>(blockIdx.x)) / gridDim.x + 1;  // gridDim.x <= tiles
  const auto tile_of = [&](int i) { return static_cast<int>(blockIdx.x + i * gridDim.x); };
  const int rows = p.slots[2 * p.num_slots + slot], expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2;
  // The lane's inputs [k0, k0 + 32): k is a multiple of 32, so a lane has all 32 or none; a warp
  // with none skips the mma (warp-uniform), a lane with none multiplies zero codes by zero x.
  const int k0 = (split * W + warp) * kChunk + 32 * t4;
  const bool live = k0 < p.k, warp_live = (split * W + warp) * kChunk < p.k;
  const uint8_t* codes = p.packed + static_cast<size_t>(expert) * p.n * row_bytes + k0 / 2;
  const auto load = [&](int i, int h) {
    return load_stream(codes + static_cast<size_t>(min(tile_of(i) * 16 + g + 8 * h, p.n - 1)) * row_bytes);
  };
  uint4 ring[kXsDepth][2] = {};
  const auto prologue = [&] {
#pragma unroll
    for (int d = 0; d < kXsDepth; ++d)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (live && d < mine) ring[d][h] = load(d, h);
  };
  if (rows > 0) prologue();  // the first tiles' codes are requested before the set-up
  if (split == 0 && slot == 0)
    zero_uncovered_rows(p, mine * 16, [&](int c) { return tile_of(c / 16) * 16 + c % 16; });
  if (rows == 0) return;

  // Lane (g, t4) holds row 8 b + g of a pass's rows of x over its 32 inputs: 16 bf16x2 words; the
  // first pass's are requested before the set-up too.
  uint32_t xb[NB][16];
  const auto load_x = [&](int rb) {
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      const int r = rb + 8 * b + g;
      const uint4* xp = reinterpret_cast<const uint4*>(p.x + static_cast<size_t>(row0 + min(r, rows - 1)) * p.k + min(k0, p.k - 32));
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint4 u = live && r < rows ? __ldg(xp + v) : make_uint4(0, 0, 0, 0);
        xb[b][4 * v] = u.x, xb[b][4 * v + 1] = u.y, xb[b][4 * v + 2] = u.z, xb[b][4 * v + 3] = u.w;
      }
    }
  };
  load_x(0);

  const int group = p.group;
  float4* sums = reinterpret_cast<float4*>(smem);                                    // [W][group][NB][32 lanes]
  uint32_t* tables = reinterpret_cast<uint32_t*>(smem) + xs_sum_bytes<W, NB>(group) / 4;  // [mine * 16 rows][8]
  const uint16_t* cent = p.centroids + static_cast<size_t>(expert) * p.n * 16;
  for (int r = threadIdx.x; r < mine * 16; r += W * 32) {
    const uint4* c = reinterpret_cast<const uint4*>(cent + static_cast<size_t>(min(tile_of(r / 16) * 16 + r % 16, p.n - 1)) * 16);
    uint32_t cb[8];
    byte_tables(__ldg(c), __ldg(c + 1), cb);
    uint4* at = reinterpret_cast<uint4*>(tables + r * 8);
    at[0] = make_uint4(cb[0], cb[1], cb[2], cb[3]), at[1] = make_uint4(cb[4], cb[5], cb[6], cb[7]);
  }
  __syncthreads();

  for (int rb = 0; rb < rows; rb += 8 * NB) {
    if (rb > 0) load_x(rb);
    const bool wide = NB > 1 && rows - rb > 8;
    // Groups of tiles: each warp stores its sums of the group, the block adds them in warp order
    // and writes the group's columns, then the next group (the code loads run on across). A group
    // of all the block's tiles leaves the warps unsynchronised until the end.
    for (int i0 = 0; i0 < mine; i0 += group) {
      for (int d0 = 0; d0 < group && i0 + d0 < mine; d0 += kXsDepth)
#pragma unroll
      for (int dd = 0; dd < kXsDepth; ++dd) {
        const int d = d0 + dd, i = i0 + d;
        if (i >= mine) break;
        uint4 (&slot_codes)[2] = ring[dd];  // i % kXsDepth: groups are whole multiples of the depth
        uint32_t q[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          q[h][0] = slot_codes[h].x, q[h][1] = slot_codes[h].y, q[h][2] = slot_codes[h].z, q[h][3] = slot_codes[h].w;
          if (live && i + kXsDepth < mine) slot_codes[h] = load(i + kXsDepth, h);
        }
        float acc[NB][4] = {};
        if (warp_live) {
          uint32_t cb[2][8];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint4* at = reinterpret_cast<const uint4*>(tables + (i * 16 + g + 8 * h) * 8);
            const uint4 u = at[0], v = at[1];
            cb[h][0] = u.x, cb[h][1] = u.y, cb[h][2] = u.z, cb[h][3] = u.w;
            cb[h][4] = v.x, cb[h][5] = v.y, cb[h][6] = v.z, cb[h][7] = v.w;
          }
          // Word wi of row g (h = 0) or g + 8 holds the codes of inputs k0 + 8 wi ... k0 + 8 wi + 7:
          // two k16 steps whose B registers are x words 4 wi ... 4 wi + 3.
#pragma unroll
          for (int wi = 0; wi < 4; ++wi) {
            uint32_t ag[4], ah[4];
            decode_word(q[0][wi], cb[0], ag);
            decode_word(q[1][wi], cb[1], ah);
#pragma unroll
            for (int b = 0; b < NB; ++b) {
              if (b == 1 && !wide) continue;
              mma(acc[b], ag[0], ah[0], ag[1], ah[1], xb[b][4 * wi], xb[b][4 * wi + 1]);
              mma(acc[b], ag[2], ah[2], ag[3], ah[3], xb[b][4 * wi + 2], xb[b][4 * wi + 3]);
            }
          }
        }
#pragma unroll
        for (int b = 0; b < NB; ++b)
          sums[((warp * group + d) * NB + b) * 32 + lane] = make_float4(acc[b][0], acc[b][1], acc[b][2], acc[b][3]);
      }
      if (i0 + group >= mine && rb + 8 * NB < rows) prologue();  // the next pass's first codes
      __syncthreads();
      // Element e = (tile d of the group, x tile b, lane l, j) is column g + 8 (j >> 1) of the tile
      // and row 8 b + 2 t4 + (j & 1) of the pass (the mma's D fragment).
      const float* f = reinterpret_cast<const float*>(sums);
      constexpr int kTile = NB * 128;
      for (int e = threadIdx.x; e < min(group, mine - i0) * kTile; e += W * 32) {
        const int d = e / kTile, b = (e >> 7) % NB, l = (e >> 2) & 31, j = e & 3;
        const int r = rb + 8 * b + 2 * (l & 3) + (j & 1), col = tile_of(i0 + d) * 16 + (l >> 2) + 8 * (j >> 1);
        if (r >= rows || col >= p.n) continue;
        float sum = 0.f;
        for (int w = 0; w < W; ++w) sum += f[(w * group + d) * kTile + e % kTile];
        store_sum(p, split, static_cast<size_t>(row0 + r) * p.n + col, sum);
      }
      __syncthreads();  // the sums are read before the next group writes them
    }
  }

  // Split K: the last of the splits of this block's tiles to finish adds the partials in split order.
  if (p.splits == 1 || !last_to_finish(p, slot * tiles + blockIdx.x)) return;
  for (int e = threadIdx.x; e < mine * 16 * rows; e += W * 32) {
    const int i = e / (16 * rows), r = (e / 16) % rows, col = tile_of(i) * 16 + e % 16;
    const size_t at[1] = {static_cast<size_t>(row0 + r) * p.n + col};
    const bool ok[1] = {col < p.n};
    store_split_sums(p, at, ok);
  }
}

template <int W, int NB>
cudaError_t launch_xs(cudaStream_t stream, Problem p, bool sum_once) {
  LaunchLimits lim;
  const cudaError_t err = launch_limits<xs_kernel<W, NB>>(W * 32, lim);
  if (err != cudaSuccess) return err;
  // Persistent: the most blocks an SM holds (by registers, and by shared memory for the byte
  // tables of the tiles each then takes) times the SMs, spread over the splits and slots, at most
  // one block a tile. Where even one block an SM cannot hold its tables, as many blocks as it
  // takes (in waves). Then, if asked, groups of tiles as long as keep as many blocks an SM (at
  // best one group of all a block's tiles: the warps meet once, at the end).
  const int tiles = (p.n + 15) / 16, others = p.splits * p.num_slots, table_bytes = 16 * 8 * 4;
  const auto smem_for = [&](int g) { return xs_sum_bytes<W, NB>(p.group) + (tiles + g - 1) / g * table_bytes; };
  const auto fits = [&](int g, int per_sm) {
    return smem_for(g) <= lim.smem && per_sm * (smem_for(g) + 1024) <= lim.sm_smem;  // 1 KB a block reserved
  };
  p.group = kXsGroup;
  int grid_x = 0, per_sm = max(lim.fit, 1);
  for (; per_sm >= 1; --per_sm) {
    const int g = min(tiles, max(1, lim.sms * per_sm / others));
    if (fits(g, per_sm)) {
      grid_x = g;
      break;
    }
  }
  if (grid_x == 0) {
    grid_x = min(tiles, (tiles + 255) / 256);  // 256 tiles' tables: 128 KB
  } else if (sum_once) {  // the longest group up to all the block's tiles, in whole depths, that fits
    const int mine = (tiles + grid_x - 1) / grid_x;
    for (p.group = (mine + kXsDepth - 1) / kXsDepth * kXsDepth; p.group > kXsGroup && !fits(grid_x, per_sm);)
      p.group -= kXsDepth;
  }
  xs_kernel<W, NB><<<dim3(grid_x, p.splits, p.num_slots), W * 32, smem_for(grid_x), stream>>>(p);
  return cudaGetLastError();
}

// Layout 8, prefill on Hopper (sm_90a). A block of WG warpgroups owns 64 WG output columns (16 a
// warp) and multiplies N = 64 or 128 rows of x at a time with wgmma: the decoded weights are the
// A operand, in registers (each weight decoded once per N rows), x the B operand, read by the
// tensor cores from shared memory (one copy for the block's warpgroups). Stages of 64 inputs
// (x's N rows of 128 bytes in the 128-byte swizzle, and the block's rows of codes) are copied with
// cp.async six stages ahead of the one multiplied. A lane's codes are in the mma's k order
// (pairs 2 t and 2 t + 8 of each k16 step), so each lane reads its rows' 16-byte words and keeps
// byte t of each (gather_bytes), then decodes as layouts 5 and 7: two k16 steps a word, whose
// wgmma run while the next word is decoded. Rows of x past the slot's are zeros in shared memory;
// K may end in a 32-input stage; split K as in layout 5 (counters per column block).
constexpr int kWgInputs = 64, kWgStages = 8;  // 6 stages ahead: the codes come from memory, ~1 µs away

template <int N, int WG>
__host__ __device__ constexpr int wg_stage_bytes() {
  return N * kWgInputs * 2 + 64 * WG * kWgInputs / 2;  // x's rows, then the block's rows of codes
}

template <int N, int WG>
__global__ void __launch_bounds__(128 * WG) wg_kernel(Problem p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kAhead = kWgStages - 2;  // a stage's buffer is rewritten once no wgmma reads it
  constexpr int kThreads = 128 * WG, kCols = 64 * WG, kXBytes = N * kWgInputs * 2;
  extern __shared__ __align__(128) uint8_t wsm_[];
  uint8_t* const wsm = wsm_ + ((1024 - (static_cast<uint32_t>(__cvta_generic_to_shared(wsm_)) & 1023)) & 1023);  // swizzle tiles
  const int slot = blockIdx.z, split = blockIdx.y, n0 = blockIdx.x * kCols;
  if (split == 0 && slot == 0) zero_uncovered_rows(p, kCols, [&](int c) { return n0 + c; });
  const int rows = p.slots[2 * p.num_slots + slot];
  if (rows == 0) return;
  const int expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2;
  const uint8_t* codes = p.packed + static_cast<size_t>(expert) * p.n * row_bytes;
  const int stages = (p.k + kWgInputs - 1) / kWgInputs;
  const int s_begin = min(stages, split * p.chunks_per_split), s_end = min(stages, s_begin + p.chunks_per_split);

  uint32_t cb[2][8];  // byte tables of the lane's weight rows 16 warp + g and + 8 of the block
  const uint16_t* cent = p.centroids + static_cast<size_t>(expert) * p.n * 16;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint4* c = reinterpret_cast<const uint4*>(cent + static_cast<size_t>(min(n0 + 16 * warp + g + 8 * h, p.n - 1)) * 16);
    byte_tables(__ldg(c), __ldg(c + 1), cb[h]);
  }
  uint32_t sel = t4 | (t4 + 4) << 4;
  pin(sel);

  // Stage s of the pass over rows [rb, rb + N): x's rows (128 bytes each, chunk c of row r at
  // chunk c ^ (r % 8): 8 consecutive threads fill one row), then the codes, 32 bytes a row. A
  // thread's copies move by the same offsets each stage, so their addresses are set once a pass
  // (x) or once (codes) and a stage only adds its K offset: the address arithmetic was half the
  // instructions of a stage.
  constexpr int kXCopies = N * 8 / kThreads;  // a thread's 16-byte chunks of x a stage (rows kThreads / 8 apart)
  static_assert(kXCopies >= 1 && kXCopies <= 32 && kXCopies * kThreads == N * 8, "x's chunks shared evenly (x_valid: 32 bits)");
  const int xc = threadIdx.x & 7, xr = threadIdx.x >> 3;
  uint32_t x_dst = 128 * xr + 16 * (xc ^ (xr & 7));  // + j kThreads 16 for copy j: kThreads / 8 rows, a multiple of 8
  const uint16_t* x_src[kXCopies];
  uint32_t x_valid = 0;  // bit j: copy j's row is one of the slot's
  const int code_row = threadIdx.x >> 1, code_half = threadIdx.x & 1;  // kThreads = 2 kCols
  const uint8_t* code_src = codes + static_cast<size_t>(min(n0 + code_row, p.n - 1)) * row_bytes + 16 * code_half;
  uint32_t code_dst = kXBytes + 32 * code_row + 16 * code_half, word_at = kXBytes + 32 * (16 * warp + g);
  pin(x_dst), pin(code_src), pin(code_dst), pin(word_at);
  const auto stage_buffer = [&](int s) { return wsm + static_cast<unsigned>(s) % kWgStages * wg_stage_bytes<N, WG>(); };
  const auto load_stage = [&](int s) {
    uint8_t* buf = stage_buffer(s);
    const int k0 = s * kWgInputs, kin = min(kWgInputs, p.k - k0);
    if (8 * xc < kin) {
#pragma unroll
      for (int j = 0; j < kXCopies; ++j) cp_async16(buf + x_dst + 16 * kThreads * j, x_src[j] + k0, (x_valid >> j) & 1);
    }
    if (32 * code_half < kin) cp_async16(buf + code_dst, code_src + k0 / 2, true);
  };

  for (int rb = 0; rb < rows; rb += N) {
    if (rb > 0) __syncthreads();  // every warp is done with the previous pass's buffers
    x_valid = 0;
#pragma unroll
    for (int j = 0; j < kXCopies; ++j) {
      const int r = rb + xr + kThreads / 8 * j;
      x_src[j] = p.x + static_cast<size_t>(row0 + min(r, rows - 1)) * p.k + 8 * xc;
      pin(x_src[j]);
      x_valid |= static_cast<uint32_t>(r < rows) << j;
    }
    ring_start<kAhead>(s_begin, s_end, load_stage);
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
    uint32_t a[2][8] = {};  // the A registers of two k16 steps (one code word), for two words
    for (int s = s_begin; s < s_end; ++s) {
      ring_next<kAhead>(s, s_end, load_stage);
      const uint8_t* buf = stage_buffer(s);
      const uint32_t xs = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
      const bool both = p.k - s * kWgInputs >= kWgInputs;  // else a 32-input end: word 0 only
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        if (m == 1 && !both) {  // K's end: word 0's wgmma retired before leaving (else ptxas, seeing
          wgmma_wait<0>();      // a[0] rewritten while it may run, serializes every wgmma: C7513)
          break;
        }
        // Word m decoded into a[m] while the wgmma of the previous word (a[1 - m]) run; a[m]'s
        // earlier wgmma completed at the last wait.
        uint32_t ag[4], ah[4];
        const uint8_t* word = buf + word_at + 16 * m;
        decode_word(gather_bytes(*reinterpret_cast<const uint4*>(word), sel), cb[0], ag);
        decode_word(gather_bytes(*reinterpret_cast<const uint4*>(word + 256), sel), cb[1], ah);
#pragma unroll
        for (int q = 0; q < 2; ++q)
          a[m][4 * q] = ag[2 * q], a[m][4 * q + 1] = ah[2 * q], a[m][4 * q + 2] = ag[2 * q + 1], a[m][4 * q + 3] = ah[2 * q + 1];
        wgmma_fence();
#pragma unroll
        for (int q = 0; q < 2; ++q) {  // k16 step 2 m + q: bytes 32 (2 m + q) ... of each row
          const uint32_t (&aq)[4] = *reinterpret_cast<const uint32_t(*)[4]>(&a[m][4 * q]);
          wgmma<N>(acc, aq, wgmma_desc_sw128(xs + 32 * (2 * m + q)));
        }
        wgmma_commit();
        wgmma_wait<1>();  // the previous word's wgmma are done
        wgmma_keep(a[1 - m]);
      }
    }
    wgmma_wait<0>();
    cp_async_wait<0>();
    for_each_d<N>(warp, lane, [&](int i, int c, int x_row) {
      const int r = rb + x_row, col = n0 + c;
      if (r < rows && col < p.n) store_sum(p, split, static_cast<size_t>(row0 + r) * p.n + col, acc[i]);
    });
  }
  finish_column_block(p, slot, row0, rows, n0, kCols);
#endif
}

template <int N, int WG>
cudaError_t launch_wg(cudaStream_t stream, Problem p) {
  LaunchLimits lim;
  const cudaError_t err = launch_limits<wg_kernel<N, WG>>(128 * WG, lim);
  if (err != cudaSuccess) return err;
  if (lim.major != 9) return cudaErrorNotSupported;  // wgmma: built for sm_90a only
  const int stages = (p.k + kWgInputs - 1) / kWgInputs;
  p.chunks_per_split = (stages + p.splits - 1) / p.splits;
  const dim3 grid((p.n + 64 * WG - 1) / (64 * WG), p.splits, p.num_slots);
  wg_kernel<N, WG><<<grid, 128 * WG, kWgStages * wg_stage_bytes<N, WG>() + 1024, stream>>>(p);  // + alignment
  return cudaGetLastError();
}

template <int MT, int NT, int kLayout, int KG>
cudaError_t launch(cudaStream_t stream, Problem p, bool stage) {
  constexpr int kCols = kWarps * NT * 8;
  LaunchLimits lim;
  const cudaError_t err = launch_limits<lut_matmul_kernel<MT, NT, kLayout, KG>>(kWarps * KG * 32, lim);
  if (err != cudaSuccess) return err;
  // Stage x where the pass's rows over the block's K range fit beside the rest.
  int smem = smem_bytes<MT, NT, kLayout, KG>();
  const int stride = p.chunks_per_split * kChunk + p.k % kChunk + 8, rows = min(p.t, 16 * MT);
  const bool fits = stage && smem + rows * stride * 2 <= lim.smem;
  p.stage_rows = fits ? rows : 0;
  p.stage_stride = stride;
  smem += fits ? rows * stride * 2 : 0;
  const dim3 grid((p.n + kCols - 1) / kCols, p.splits, p.num_slots);
  lut_matmul_kernel<MT, NT, kLayout, KG><<<grid, kWarps * KG * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("cqjax CUDA lut_matmul: " + what);
}

ffi::Error LutMatmulImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> packed, ffi::AnyBuffer centroids,
                         ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> counters, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> partials, ffi::Result<ffi::Buffer<ffi::S32>> counters_out,
                         int64_t splits, int64_t mt, int64_t nt, int64_t layout, int64_t kgroups,
                         int64_t stage, int64_t sum_once) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), cd = centroids.dimensions(), sd = slots.dimensions();
  if (x.element_type() != ffi::BF16 || centroids.element_type() != ffi::BF16)
    return invalid("x and centroids must be bfloat16");
  if (xd.size() != 2 || pd.size() != 3 || cd.size() != 3 || sd.size() != 2 || sd[0] != 3)
    return invalid("expected x [t, k], packed [e, n, k/2], centroids [e, n, 16], slots [3, s]");
  const int64_t t = xd[0], k = xd[1], e = pd[0], n = pd[1];
  if (k % 32 != 0 || pd[2] != k / 2 || cd[0] != e || cd[1] != n || cd[2] != 16)
    return invalid("operand shapes disagree (k must be a multiple of 32, one 16-entry codebook per row)");
  if (splits < 1) return invalid("splits must be >= 1");
  const auto od = out->dimensions(), wd = partials->dimensions();
  if (out->element_type() != ffi::BF16 || od.size() != 2 || od[0] != t || od[1] != n)
    return invalid("output must be bf16 [t, n]");
  if (splits > 1 && (wd.size() != 3 || wd[0] != splits || wd[1] != t || wd[2] != n))
    return invalid("partials must be float32 [splits, t, n] when K is split");
  // Layout 7 splits K into blocks of kgroups chunks and counts splits in per 16-column tile.
  const int64_t chunks = (k + kChunk - 1) / kChunk;
  if (layout == 7 && splits != (chunks + kgroups - 1) / kgroups)
    return invalid("layout 7 takes splits = ceil(ceil(k / 128) / kgroups)");
  const int64_t cols = layout == 7 ? 16 : 32 * nt, blocks = (n + cols - 1) / cols;
  const int64_t count = splits > 1 ? sd[1] * blocks : 1;  // only split launches count blocks in
  if (counters.element_count() != count || counters_out->element_count() != count)
    return invalid("counters must be int32 zeros [slots * column blocks] (one, unused, when K is not split)");
  if (t == 0 || n == 0 || sd[1] == 0) return ffi::Error::Success();
  const int64_t full = k / kChunk;
  Problem p{static_cast<const uint16_t*>(x.untyped_data()), packed.typed_data(),
            static_cast<const uint16_t*>(centroids.untyped_data()), slots.typed_data(), counters_out->typed_data(),
            static_cast<__nv_bfloat16*>(out->untyped_data()), partials->typed_data(),
            static_cast<int>(t), static_cast<int>(k), static_cast<int>(n), static_cast<int>(sd[1]),
            static_cast<int>(splits), static_cast<int>(full == 0 ? 0 : (full + splits - 1) / splits), 0, 0, 0};
  cudaError_t err;
  switch (kgroups * 1000 + layout * 100 + mt * 10 + nt) {
    case 4712: err = launch_xs<4, 1>(stream, p, sum_once != 0); break;
    case 4722: err = launch_xs<4, 2>(stream, p, sum_once != 0); break;
    case 8712: err = launch_xs<8, 1>(stream, p, sum_once != 0); break;
    case 8722: err = launch_xs<8, 2>(stream, p, sum_once != 0); break;
    case 16712: err = launch_xs<16, 1>(stream, p, sum_once != 0); break;
    case 16722: err = launch_xs<16, 2>(stream, p, sum_once != 0); break;
    case 4212: err = launch<1, 2, 2, 4>(stream, p, stage != 0); break;
    case 4214: err = launch<1, 4, 2, 4>(stream, p, stage != 0); break;
    case 4311: err = launch<1, 1, 3, 4>(stream, p, stage != 0); break;
    case 4312: err = launch<1, 2, 3, 4>(stream, p, stage != 0); break;
    case 4314: err = launch<1, 4, 3, 4>(stream, p, stage != 0); break;
    case 4321: err = launch<2, 1, 3, 4>(stream, p, stage != 0); break;
    case 4322: err = launch<2, 2, 3, 4>(stream, p, stage != 0); break;
    case 4324: err = launch<2, 4, 3, 4>(stream, p, stage != 0); break;
    case 4411: err = launch<1, 1, 4, 4>(stream, p, stage != 0); break;
    case 4412: err = launch<1, 2, 4, 4>(stream, p, stage != 0); break;
    case 4414: err = launch<1, 4, 4, 4>(stream, p, stage != 0); break;
    case 4421: err = launch<2, 1, 4, 4>(stream, p, stage != 0); break;
    case 4422: err = launch<2, 2, 4, 4>(stream, p, stage != 0); break;
    case 4424: err = launch<2, 4, 4, 4>(stream, p, stage != 0); break;
    case 4441: err = launch<4, 1, 4, 4>(stream, p, stage != 0); break;
    case 4442: err = launch<4, 2, 4, 4>(stream, p, stage != 0); break;
    case 1411: err = launch<1, 1, 4, 1>(stream, p, stage != 0); break;
    case 1412: err = launch<1, 2, 4, 1>(stream, p, stage != 0); break;
    case 1414: err = launch<1, 4, 4, 1>(stream, p, stage != 0); break;
    case 4512: err = launch<1, 2, 5, 4>(stream, p, stage != 0); break;
    case 4522: err = launch<2, 2, 5, 4>(stream, p, stage != 0); break;
    case 4542: err = launch<4, 2, 5, 4>(stream, p, stage != 0); break;
    case 1512: err = launch<1, 2, 5, 1>(stream, p, stage != 0); break;
    case 4612: err = launch<1, 2, 6, 4>(stream, p, stage != 0); break;
    case 4622: err = launch<2, 2, 6, 4>(stream, p, stage != 0); break;
    case 1812: err = launch_wg<64, 1>(stream, p); break;
    case 1814: err = launch_wg<64, 2>(stream, p); break;
    case 1822: err = launch_wg<128, 1>(stream, p); break;
    case 1824: err = launch_wg<128, 2>(stream, p); break;
    case 1818: err = launch_wg<64, 4>(stream, p); break;
    case 1828: err = launch_wg<128, 4>(stream, p); break;
    default: return invalid("no kernel for this tuning (cuda_kernels/lut_matmul.py: KERNELS lists those built)");
  }
  if (layout == 8 && err == cudaErrorNotSupported) return invalid("layout 8 (wgmma) needs a Hopper GPU (sm_90)");
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("cqjax CUDA lut_matmul: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxLutMatmulCuda, LutMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("splits")
                                  .Attr<int64_t>("mt")
                                  .Attr<int64_t>("nt")
                                  .Attr<int64_t>("layout")
                                  .Attr<int64_t>("kgroups")
                                  .Attr<int64_t>("stage")
                                  .Attr<int64_t>("sum_once"),
                              {ffi::Traits::kCmdBufferCompatible});  // XLA may capture it in its CUDA graphs
