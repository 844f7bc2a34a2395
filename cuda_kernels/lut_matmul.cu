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
//   counters   int32 [s * n blocks]      zeros, aliased to the third result (one when K is not split)
//   out        bf16 [t, n]; rows no slot covers are zero
//   partials   float32 [splits, t, n]    scratch when K is split ([1, 1, 1] otherwise)
//
// With K split over `splits` blocks, each writes its float32 partial sums; the block that counts
// in last for its (slot, column block) adds all partials in split order and writes the bf16
// result: deterministic, and no second pass over the output.
//
// Tensor cores, weights as the A operand. mma.sync m16n8k16 takes 16 weight rows (output
// columns) as A and 8 rows of x as B, so a pass over 8 rows or fewer runs one mma per 16x16
// weight tile. A code byte holds the codes of two consecutive inputs, exactly one bf16x2 register
// of an A fragment; the decoded registers feed the mma directly (no weight tile is ever stored).
// The mma's k order is free as long as A and B agree: lane (g, t) takes the 16 consecutive code
// bytes 16t..16t+15 of each 128-input chunk of its rows g and g + 8 (16-byte loads) and the 32
// activations they multiply (16-byte loads).
//
// Decode in registers: each lane holds its two rows' 16 centroids as byte tables (lo bytes, hi
// bytes) and byte permutes select, mask and interleave them: 11 integer instructions per 4 codes,
// no shared memory and nothing to build before the first load. PRMT and LOP3 issue at half rate
// on Hopper, so this decode bounds the kernel near 2.75 ALU instructions a code (BENCHMARKS.md).
// `probe` is a timing probe with the same loads and mma and no decode (wrong results on purpose).
//
// (Measured and dropped, BENCHMARKS.md: 256-entry pair tables in shared memory, alone or for half
// of each word; x as the A operand; x staged in shared memory.)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kWarps = 4;    // column warps per block, 16 columns each: a block owns 64 columns
constexpr int kCols = kWarps * 16;
constexpr int kChunk = 128;  // inputs per full chunk (16 code bytes per lane, 64 per row)
constexpr int kDepth = 3;    // chunks of codes in flight per lane ahead of the decode

struct Problem {
  const uint16_t* x;
  const uint8_t* packed;
  const uint16_t* centroids;
  const int32_t* slots;  // [3, num_slots]
  int32_t* counters;     // [num_slots * column blocks]
  __nv_bfloat16* out;
  float* partials;
  int t, k, n, num_slots, splits, chunks_per_split;
};

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

// The four codes in bits 16..31 of w -> two bf16x2 registers, from a row's centroids held as byte
// tables cb = {lo bytes of centroids 0-3, 4-7, 8-11, 12-15, hi bytes of the same}.
__device__ __forceinline__ void decode_upper_half(uint32_t w, const uint32_t (&cb)[8], uint32_t& b0, uint32_t& b1) {
  const uint32_t sel = (w >> 16) & 0x7777u;  // code & 7 per nibble (bit 3 would switch prmt to sign mode)
  const uint32_t la = prmt(cb[0], cb[1], sel), lb = prmt(cb[2], cb[3], sel);
  const uint32_t ha = prmt(cb[4], cb[5], sel), hb = prmt(cb[6], cb[7], sel);
  // Byte i = 0xFF where code 4 + i has bit 3 set: sign-replicate the byte whose top bit it is.
  const uint32_t m = prmt(w << 4, w, 0xFBEAu);
  const uint32_t lo = (la & ~m) | (lb & m), hi = (ha & ~m) | (hb & m);
  b0 = prmt(lo, hi, 0x5140u);
  b1 = prmt(lo, hi, 0x7362u);
}

// Codes 4s..4s+3 of the word w -> the bf16x2 pairs of inputs (0, 1) and (2, 3) of those four.
template <bool kProbe>
__device__ __forceinline__ void decode(uint32_t w, int s, const uint32_t (&cb)[8], uint32_t& b0, uint32_t& b1) {
  if constexpr (kProbe) {
    const uint32_t h = w >> (16 * s);
    b0 = (h & 0xFF) * 0x00010001u, b1 = ((h >> 8) & 0xFF) * 0x00010001u;
  } else {
    decode_upper_half(s ? w : w << 16, cb, b0, b1);
  }
}

// Multiplies one chunk of inputs [k0, k0 + 32 * kWords): lane t4 holds code words q[j][0..kWords)
// (bytes 4*kWords*t4 ... of the chunk's row bytes) of its rows g (j = 0) and g + 8 (j = 1), and
// reads the 8*kWords activations of each of its rows of x that those codes multiply.
// acc[mt][h] accumulates columns (g, g + 8) x rows (2 t4, 2 t4 + 1) of x's 8-row tile (mt, h).
template <int MT, int kWords, bool kProbe>
__device__ __forceinline__ void chunk(float (&acc)[MT][2][4], const uint32_t (&q)[2][kWords],
                                      const uint16_t* const (&xr)[MT][2], const bool (&ok)[MT][2],
                                      const uint32_t (&cb)[2][8], int k0, int t4, bool wide) {
#pragma unroll
  for (int s2 = 0; s2 < kWords; ++s2) {
    uint4 a[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        a[mt][h] = ok[mt][h] ? __ldg(reinterpret_cast<const uint4*>(xr[mt][h] + k0 + 8 * kWords * t4 + 8 * s2))
                             : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      uint32_t p0, p1, q0, q1;
      decode<kProbe>(q[0][s2], s, cb[0], p0, p1);
      decode<kProbe>(q[1][s2], s, cb[1], q0, q1);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && !wide) continue;
          const uint32_t x0 = s ? a[mt][h].z : a[mt][h].x, x1 = s ? a[mt][h].w : a[mt][h].y;
          mma(acc[mt][h], p0, q0, p1, q1, x0, x1);
        }
    }
  }
}

// KG warps per column warp split the block's chunks among them (warp w takes chunks w, w + KG,
// ...): more loads in flight per SM; their sums meet in shared memory at the end.
template <int MT, int KG, bool kProbe>
__global__ void __launch_bounds__(kWarps * KG * 32) lut_matmul_kernel(Problem p) {
  constexpr int kThreads = kWarps * KG * 32;
  __shared__ float red[KG > 1 ? (KG - 1) * kWarps * MT * 8 * 32 : 1];  // the K warps' fragment hand-over
  const int slot = blockIdx.z, split = blockIdx.y, n0 = blockIdx.x * kCols;
  const int rows = p.slots[2 * p.num_slots + slot];
  if (split == 0 && slot == 0) {
    // Rows past the last slot's (grouped: rows outside every group) are zero.
    int covered = 0;
    for (int i = 0; i < p.num_slots; ++i) covered += p.slots[2 * p.num_slots + i];
    for (int i = threadIdx.x; i < (p.t - covered) * kCols; i += kThreads) {
      const int col = n0 + i % kCols;
      if (col < p.n) p.out[static_cast<size_t>(covered + i / kCols) * p.n + col] = __float2bfloat16_rn(0.f);
    }
  }
  if (rows == 0) return;
  const int expert = p.slots[slot], row0 = p.slots[p.num_slots + slot];
  const int warp = (threadIdx.x >> 5) & (kWarps - 1), wk = threadIdx.x >> 7, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const size_t row_bytes = p.k / 2;
  // The lane's weight rows (output columns): g and g + 8 of its column warp's 16.
  int wcol[2];
  const uint8_t* wrow[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    wcol[j] = min(n0 + warp * 16 + 8 * j + g, p.n - 1);
    wrow[j] = p.packed + (static_cast<size_t>(expert) * p.n + wcol[j]) * row_bytes;
  }

  // The first kDepth chunks of codes (this warp's: c_begin + wk, + KG, ...) are requested before
  // anything else, so their memory latency overlaps the set-up; every row block reads the same.
  const int full = p.k / kChunk;
  const int c_begin = split * p.chunks_per_split, c_end = min(full, c_begin + p.chunks_per_split);
  uint4 ring[kDepth][2];
  const auto prologue = [&] {
#pragma unroll
    for (int i = 0; i < kDepth; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        if (c_begin + wk + i * KG < c_end)
          ring[i][j] = load_stream(wrow[j] + (c_begin + wk + i * KG) * (kChunk / 2) + 16 * t4);
  };
  prologue();

  uint32_t cb[2][8];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const uint4* c = reinterpret_cast<const uint4*>(p.centroids + (static_cast<size_t>(expert) * p.n + wcol[j]) * 16);
    const uint4 u = __ldg(c), v = __ldg(c + 1);
    cb[j][0] = prmt(u.x, u.y, 0x6420u), cb[j][1] = prmt(u.z, u.w, 0x6420u);
    cb[j][2] = prmt(v.x, v.y, 0x6420u), cb[j][3] = prmt(v.z, v.w, 0x6420u);
    cb[j][4] = prmt(u.x, u.y, 0x7531u), cb[j][5] = prmt(u.z, u.w, 0x7531u);
    cb[j][6] = prmt(v.x, v.y, 0x7531u), cb[j][7] = prmt(v.z, v.w, 0x7531u);
  }
  const int tail_words = split == p.splits - 1 && wk == 0 ? (p.k % kChunk) / 32 : 0;

  for (int rb = 0; rb < rows; rb += 16 * MT) {
    const uint16_t* xr[MT][2];
    bool ok[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int rr = rb + mt * 16 + g + 8 * h;
        ok[mt][h] = rr < rows;
        xr[mt][h] = p.x + static_cast<size_t>(row0 + min(rr, rows - 1)) * p.k;
      }
    const bool wide = MT > 1 || rows - rb > 8;  // one row tile: skip its second 8 rows if empty
    float acc[MT][2][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mt][h][i] = 0.f;

    // Full chunks, kDepth of them loaded ahead of the one being decoded.
    for (int c = c_begin + wk; c < c_end; c += kDepth * KG) {
#pragma unroll
      for (int i = 0; i < kDepth; ++i) {
        const int cc = c + i * KG;
        if (cc < c_end) {
          uint32_t q[2][4];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            q[j][0] = ring[i][j].x, q[j][1] = ring[i][j].y, q[j][2] = ring[i][j].z, q[j][3] = ring[i][j].w;
            if (cc + kDepth * KG < c_end)
              ring[i][j] = load_stream(wrow[j] + (cc + kDepth * KG) * (kChunk / 2) + 16 * t4);
          }
          chunk<MT, 4, kProbe>(acc, q, xr, ok, cb, cc * kChunk, t4, wide);
        }
      }
    }
    if (rb + 16 * MT < rows) prologue();  // the next row block's first chunks, during this one's tail
    // The last split also takes the 32-input chunks past the last full one.
    for (int w = 0; w < tail_words; ++w) {
      const int k0 = full * kChunk + 32 * w;
      uint32_t q[2][1];
#pragma unroll
      for (int j = 0; j < 2; ++j) q[j][0] = __ldg(reinterpret_cast<const uint32_t*>(wrow[j] + k0 / 2 + 4 * t4));
      chunk<MT, 1, kProbe>(acc, q, xr, ok, cb, k0, t4, wide);
    }

    if constexpr (KG > 1) {
      // Warps 1..KG-1 of each column warp hand their fragments to warp 0 through shared memory.
      float* mine = red + ((wk - 1) * kWarps + warp) * (MT * 8 * 32) + lane;
      if (wk > 0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i) mine[((mt * 2 + h) * 4 + i) * 32] = acc[mt][h][i];
      }
      __syncthreads();
      if (wk == 0) {
        for (int o = 1; o < KG; ++o) {
          const float* theirs = red + ((o - 1) * kWarps + warp) * (MT * 8 * 32) + lane;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[mt][h][i] += theirs[((mt * 2 + h) * 4 + i) * 32];
        }
      }
      __syncthreads();  // the buffer is free for the next row block
      if (wk > 0) continue;
    }
    // Fragment: acc[mt][h][i] = column 8 (i >> 1) + g of the column warp's 16, row 2 t4 + (i & 1)
    // of x's 8-row tile (mt, h).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = rb + mt * 16 + h * 8 + 2 * t4 + (i & 1);
          const int col = n0 + warp * 16 + 8 * (i >> 1) + g;
          if (r >= rows || col >= p.n) continue;
          const size_t at = static_cast<size_t>(row0 + r) * p.n + col;
          if (p.splits == 1) p.out[at] = __float2bfloat16_rn(acc[mt][h][i]);
          else p.partials[static_cast<size_t>(split) * p.t * p.n + at] = acc[mt][h][i];
        }
  }
  if (p.splits == 1) return;

  // Split K: the last of the column block's splits to finish adds the partials in split order.
  __shared__ int is_last;
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.counters + slot * gridDim.x + blockIdx.x, 1) == p.splits - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const size_t plane = static_cast<size_t>(p.t) * p.n;
  for (int i = threadIdx.x; i < rows * kCols; i += kThreads) {
    const int col = n0 + i % kCols;
    if (col >= p.n) continue;
    const size_t at = static_cast<size_t>(row0 + i / kCols) * p.n + col;
    float sum = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) sum += __ldcg(p.partials + sp * plane + at);  // L2: written this launch
    p.out[at] = __float2bfloat16_rn(sum);
  }
}

template <int MT, int KG, bool kProbe>
cudaError_t launch(cudaStream_t stream, const Problem& p) {
  const dim3 grid((p.n + kCols - 1) / kCols, p.splits, p.num_slots);
  lut_matmul_kernel<MT, KG, kProbe><<<grid, kWarps * KG * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("cqjax CUDA lut_matmul: " + what);
}

ffi::Error LutMatmulImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Buffer<ffi::U8> packed, ffi::AnyBuffer centroids,
                         ffi::Buffer<ffi::S32> slots, ffi::Buffer<ffi::S32> counters, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> partials, ffi::Result<ffi::Buffer<ffi::S32>> counters_out,
                         int64_t splits, int64_t mt, int64_t kgroups, int64_t probe) {
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
  const int64_t blocks = (n + kCols - 1) / kCols;
  const int64_t count = splits > 1 ? sd[1] * blocks : 1;  // only split launches count blocks in
  if (counters.element_count() != count || counters_out->element_count() != count)
    return invalid("counters must be int32 zeros [slots * column blocks] (one when K is not split), aliased to the third result");
  if (t == 0 || n == 0 || sd[1] == 0) return ffi::Error::Success();
  const int64_t full = k / kChunk;
  Problem p{static_cast<const uint16_t*>(x.untyped_data()), packed.typed_data(),
            static_cast<const uint16_t*>(centroids.untyped_data()), slots.typed_data(), counters_out->typed_data(),
            static_cast<__nv_bfloat16*>(out->untyped_data()), partials->typed_data(),
            static_cast<int>(t), static_cast<int>(k), static_cast<int>(n), static_cast<int>(sd[1]),
            static_cast<int>(splits), static_cast<int>(full == 0 ? 0 : (full + splits - 1) / splits)};
  cudaError_t err;
  switch (probe * 100 + kgroups * 10 + mt) {
    case 41: err = launch<1, 4, false>(stream, p); break;
    case 42: err = launch<2, 4, false>(stream, p); break;
    case 11: err = launch<1, 1, false>(stream, p); break;
    case 141: err = launch<1, 4, true>(stream, p); break;
    default: return invalid("no kernel for this tuning (cuda_kernels/lut_matmul.py: KERNELS lists those built)");
  }
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
                                  .Attr<int64_t>("kgroups")
                                  .Attr<int64_t>("probe"),
                              {ffi::Traits::kCmdBufferCompatible});  // XLA may capture it in its CUDA graphs
