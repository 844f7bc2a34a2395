// CUDA codebook (LUT) matmul with int8 numerics, or the affine numerics of fake-quantized x (xs
// below), on binary tensor cores, as an XLA FFI custom call (wrapper:
// cuda_kernels/lut_matmul_bitplane.py). With int8 numerics it computes the integer dot products of
// cqjax.lut_matmul's lut_matmul_int8_reference (x rounded to int8 per row, each row's 16 centroids
// rounded to int8) and scales them as it does:
//
//   dots [t, n] (int32) = xq [t, k] . cq[e, n, code(e, n, kk)]   (exact);  y = (sc * dots) * sx
//
// Operands:
//   xpl        uint32 [t, k/256, 8, 8]  x's two's-complement bit-planes (x rounded to int8 per row in
//              XLA, int8_round, which can share them between the products of one x): per 256-input
//              chunk, plane j's 8 words; word w's bit 4i + j' holds input 32 w + 8 j' + i (the
//              order of k the codes' planes come out in, below), and words t and t + 4 lie side
//              by side at 2t (t < 4: what one lane reads, in one 8-byte load)
//   xs         float32 [t]              x's scales; or [t, 8], each row's plane coefficients: the affine
//              numerics, where x's planes are integer codes q (fake quantization's, cqjax.act_quant),
//              x = sum_j xs[j] plane_j (a plane of ones carries the offset), and the centroids count
//              as they are (float32 alpha, below, and float32 sums: y = x . c up to float32 rounding)
//   packed     uint8 [experts, n, k/2]  two codes a byte, low nibble first (cqjax/codebook.py)
//   centroids  float32 or bf16 [experts, n, 16]; rounded here as int8_round (round half to even;
//              affine: not rounded)
//              -- or, laid out ahead (bitplane_layout in the wrapper), int32 [experts, n, 16]: each
//              row's alpha as int16 (words 0-7), its scale's float32 bits (word 8), zeros, with
//              packed already in bit-planes (each 16-byte group transposed as below); affine:
//              uint32 [experts, n, 16], the float32 bits of alpha
//   slots      int32 [3, s]             expert, first row, rows of each slot (rows 0: no work)
//   per_warp   (attribute) output columns a warp walks; 0: chosen here
// Results, by the number of K ranges (splits = ceil(k / 4096)):
//   splits 1:  out float32 or bf16 [t, n] = (sc * float(dot)) * sx (x's dtype); rows no slot covers
//              are zero; scales float32 [0] (unused)
//   splits 2+: out int32 [splits, t, n], each K range's dot, and scales float32 [t, n] (sc of each
//              row and column), which the wrapper adds and scales (rows no slot covers: not written);
//              affine: out float32 [splits, t, n], each K range's part of y, scales [0]
//
// Why: the byte-permute decodes of lut_matmul.cu and the Pallas kernels spend about 5
// instructions a code a lane and are bound by instruction issue at decode (BENCHMARKS.md
// session 49). Here a row's int8 centroids over 4-bit codes are written as a sum over the subsets
// S of the code's bits, cq[c] = sum over S within c of alpha[S] (alpha: the Moebius transform, 16
// integers a row), and x by its bit-planes (weights 2^j, -128 for the sign plane), so that
//   dot = sum_S sum_j alpha[S] w_j popc(mask_S & plane_j),
// mask_S being the AND of the code bit-planes in S. One mma.sync m16n8k256 b1 (AND, then
// popcount: an sm_80+ instruction, which ran at the bf16 mma's rate on the H100, BENCHMARKS.md
// session 50) gives all 16 x 8 counts of 256 codes: A = the 16 subset masks, B = x's 8 planes.
// The masks cost 8 LOP3 a lane per 256 codes.
//
// Mapping: a warp walks per_warp output columns (rows of the weight; a block's warps interleave) of
// its slot's expert over a K range of kChunks chunks (blockIdx.y), holding x's planes of that range
// for one row of x in registers. Each column's codes (and codebook) are copied by cp.async into a
// two-stage ring in shared memory, one column ahead. Unless laid out ahead (kLaidOut), the warp
// turns each stage's nibbles into bit-planes in place (a 4 x 4 bit transpose within each nibble of
// a 16-byte group: plane p's bit 4i + j is code bit p of nibble i of word j) and rounds and
// transforms the codebook across lanes. A slot of one row issues one mma a chunk. Lane (g, t): mma
// rows g and g + 8 are the subsets S = g and g + 8, B column g is plane g, and D holds the counts
// of (S, plane) = (g or g + 8, 2t or 2t + 1). A slot of several rows swaps the operands: A's rows
// g and g + 8 are plane g of two rows of x (read from global memory a chunk at a time), B column g
// is subset g, then g + 8 (two mma), so each chunk's masks are built once for up to kRowsA rows.
// The warp's sum of a (row of x, column) is exact (all arithmetic wraps mod 2^32, and the true dot
// fits in int32), and one lane writes it: no atomics, so nothing needs zeroing first.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "bitplane_decode.cuh"
#include "int8_output.cuh"
#include "launch_limits.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cqjax_cuda;

constexpr int kChunk = 256;    // inputs a chunk: one mma
constexpr int kChunks = 16;    // chunks a warp's K range (x's planes in 32 registers)
constexpr int kWarps = 4;      // warps a block, each walking per_warp output columns
constexpr int kStages = 2;     // the ring: the column multiplied, and the next one in flight
constexpr int kRowsA = 4;      // rows of x a column multiplied at once (two mma of two rows) in multi-row slots
constexpr int kStageU4 = kChunks * 8 + 4;  // 16-byte pieces a stage: codes, then up to 64 codebook bytes
constexpr int64_t kMaxK = 133143;          // |dot| <= k * 127 * 127 must fit in int32
constexpr int64_t kMaxPerWarp = 64;        // output columns a warp may be asked to walk (MAX_PER_WARP)

struct Problem {
  const uint32_t* xpl;
  const float* xs;        // int8: x's scales sx [t]; affine: each row's plane coefficients [t, 8]
  const uint8_t* packed;
  const void* centroids;  // float32 or bf16 (cent_bf16), or codebooks laid out ahead (int32; affine: uint32)
  const int32_t* slots;   // [3, num_slots]
  void* out;              // splits 1: [t, n] float32 or bf16 (out_bf16); else int32 [splits, t, n]
  float* scales;          // splits 2+: [t, n]
  int t, k, n, num_slots, splits;
  int per_warp;  // output columns a warp walks: few enough that the blocks fill the GPU (0: launch chooses)
  bool cent_bf16, out_bf16;
};

// The warp's (row, column) result: y = (s * dot) * sx in the output's dtype, or with K split this
// K range's dot (and, from the first range, the codebook scale s).
__device__ __forceinline__ void write(const Problem& p, int row, int col, uint32_t dot_bits, float s) {
  const int dot = static_cast<int>(dot_bits);
  const size_t at = static_cast<size_t>(row) * p.n + col;
  if (p.splits > 1) {
    static_cast<int32_t*>(p.out)[static_cast<size_t>(blockIdx.y) * p.t * p.n + at] = dot;
    if (blockIdx.y == 0) p.scales[at] = s;
    return;
  }
  store_float(p.out, p.out_bf16, at, scaled_dot(s, dot, p.xs[row]));
}

// The affine numerics' (row, column) result y, or with K split this K range's part of it (no
// codebook scale).
__device__ __forceinline__ void write(const Problem& p, int row, int col, float y, float) {
  const size_t at = static_cast<size_t>(row) * p.n + col;
  if (p.splits > 1) static_cast<float*>(p.out)[static_cast<size_t>(blockIdx.y) * p.t * p.n + at] = y;
  else store_float(p.out, p.out_bf16, at, y);
}

// A subset's alpha: the integer Moebius transform of the int8-rounded codebook, or with the
// affine numerics the float32 one of the codebook itself.
template <bool kAffine>
using Alpha = std::conditional_t<kAffine, float, uint32_t>;

// Alpha of subset q of a column's codebook (a warp-uniform call): laid out, from the stage's int16
// (affine: float32) words; as stored, from the lane holding it (codebook_moebius's alpha_lane).
template <bool kLaidOut, bool kAffine>
__device__ __forceinline__ Alpha<kAffine> subset_alpha(const uint4* stage, Alpha<kAffine> alpha_lane, int q) {
  const void* codebook = stage + kChunks * 8;
  if constexpr (kLaidOut && kAffine) return static_cast<const float*>(codebook)[q];
  else if constexpr (kLaidOut) return static_cast<uint32_t>(static_cast<const int16_t*>(codebook)[q]);
  else return __shfl_sync(0xffffffffu, alpha_lane, q);
}

// kLaidOut: packed is in bit-planes and the codebooks hold alpha and the scale (bitplane_layout),
// so a column costs neither the transpose nor the rounding. kAffine: the affine numerics (x's
// planes weighted by each row's coefficients, float alpha). kPairs (affine only): x's planes past 4
// are zero, and plane 4 ones or weighed 0 (pairs_rows), so that a slot of two rows costs one row's
// mma. Its own instantiation: compiled into the others, the pair path made their one-row slots
// 3-13 % slower on the H100, inlined or not (BENCHMARKS.md sessions 60-61).
template <bool kLaidOut, bool kAffine, bool kPairs>
// 7 blocks an SM, as the one-row path alone allows (72 registers): the multi-row path would take
// 96, and capped it spills a few bytes instead.
__global__ void __launch_bounds__(kWarps * 32, 7) bitplane_kernel(Problem p) {
  __shared__ uint4 ring[kWarps][kStages][kStageU4];
  const int lane = threadIdx.x & 31, t = lane & 3, warp = threadIdx.x >> 5;
  const int block_col0 = blockIdx.x * kWarps * p.per_warp, col_end = min(p.n, block_col0 + kWarps * p.per_warp);
  if (blockIdx.z == 0 && p.splits == 1)  // with K split the wrapper zeroes them
    zero_rows_past_slots(p.out, p.out_bf16, p.slots, p.num_slots, p.t, p.n, block_col0, col_end - block_col0);
  const int expert = p.slots[blockIdx.z], start = p.slots[p.num_slots + blockIdx.z];
  const int count = p.slots[2 * p.num_slots + blockIdx.z];
  const int chunks = p.k / kChunk, c0 = blockIdx.y * kChunks, here = min(kChunks, chunks - c0);
  const int col0 = block_col0 + warp;
  if (count == 0 || col0 >= col_end) return;  // an expert without rows costs a block exit
  const int cent_u4 = kLaidOut ? (kAffine ? 4 : 3) : p.cent_bf16 ? 2 : 4;
  uint4(*stages)[kStageU4] = ring[warp];
  const auto issue = [&](int col, int stage) {
    if (col >= col_end) return;
    const size_t row = static_cast<size_t>(expert) * p.n + col;
    const uint8_t* codes = p.packed + row * (p.k / 2) + static_cast<size_t>(c0) * (kChunk / 2);
    for (int i = lane; i < here * 8; i += 32) cp_async16(&stages[stage][i], codes + 16 * i);
    if (lane < cent_u4)
      cp_async16(&stages[stage][kChunks * 8 + lane],
                 static_cast<const uint8_t*>(p.centroids) + row * (p.cent_bf16 ? 32 : 64) + 16 * lane);
  };
  const SubsetLane sub(lane);
  // f(whole) with whole a std::bool_constant: true for a K range of all kChunks chunks (every range
  // but a last, shorter one), whose chunk loops then run with no test a chunk.
  const auto by_range = [&](const auto& f) {
    if (here == kChunks) f(std::true_type());
    else f(std::false_type());
  };
  // The warp's columns through the ring: column(col, stage, s, alpha_lane) multiplies one, given its
  // codebook's scale s (and as stored, alpha of subset lane & 15).
  const auto walk = [&](const auto& column) {
    issue(col0, 0);
    asm volatile("cp.async.commit_group;");
    int i = 0;
    for (int col = col0; col < col_end; col += kWarps, ++i) {
      issue(col + kWarps, (i + 1) % kStages);  // into the stage read last step
      asm volatile("cp.async.commit_group;");
      asm volatile("cp.async.wait_group 1;");  // this column's copies have landed
      __syncwarp();
      uint4* b = stages[i % kStages];
      float s = 1.f;  // int8: the codebook's scale
      Alpha<kAffine> alpha_lane{};  // as stored: alpha of subset lane & 15
      if constexpr (kLaidOut) {
        if constexpr (!kAffine) s = reinterpret_cast<const float*>(b + kChunks * 8)[8];
      } else {
        for (int q = lane; q < here * 8; q += 32) nibbles_to_planes(b[q]);
        const float c = p.cent_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(b + kChunks * 8)[lane & 15])
                                    : reinterpret_cast<const float*>(b + kChunks * 8)[lane & 15];
        if constexpr (kAffine) alpha_lane = moebius_over_lanes(c, lane);
        else alpha_lane = static_cast<uint32_t>(codebook_moebius(c, lane, s));
        __syncwarp();
      }
      column(col, b, s, alpha_lane);
      __syncwarp();  // every lane is done with this stage before it is copied into again
    }
  };
  static_assert(kAffine || !kPairs, "slots pair up under the affine numerics only");
  if constexpr (kPairs) {
    if (count == 2) {  // two rows of at most 4 planes: B's 8 columns hold both, as one row's 8
      uint32_t xb[kChunks][2];
      const int h = t >> 1;  // the row of this lane's D columns 2t and 2t + 1 (planes 2 (t & 1), + 1)
      load_x_planes(xb, p.xpl + static_cast<size_t>(start + (lane >> 4)) * chunks * 64, c0, here, lane, (lane >> 2) & 3);
      const float* coef = p.xs + (start + h) * 8;
      const float coef0 = coef[2 * (t & 1)], coef1 = coef[2 * (t & 1) + 1], ones = coef[4];
      walk([&](int col, const uint4* b, float, float alpha_lane) {
        const float alpha_g = subset_alpha<kLaidOut, true>(b, alpha_lane, lane >> 2);
        const float alpha_g8 = subset_alpha<kLaidOut, true>(b, alpha_lane, (lane >> 2) + 8);
        uint32_t d[4] = {0u, 0u, 0u, 0u}, ones_g = 0u, ones_g8 = 0u;
        by_range([&](auto whole) {
#pragma unroll
          for (int cc = 0; cc < kChunks; ++cc)
            if (decltype(whole)::value || cc < here)  // warp-uniform test
              sub.multiply_counting(d, ones_g, ones_g8, b[cc * 8 + t], b[cc * 8 + t + 4], xb[cc][0], xb[cc][1]);
        });
        // Each row's sum over its lanes (t's low bit and g), and the codebook summed over the
        // codes (sum_S alpha[S] count(S), the weight of plane 4: the offset of W4A4's codes)
        float part = sub.dot(d, alpha_g, alpha_g8, coef0, coef1);
        for (int o = 16; o > 2; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        part += __shfl_xor_sync(0xffffffffu, part, 1);
        const float total = warp_sum(alpha_g * static_cast<float>(ones_g) + alpha_g8 * static_cast<float>(ones_g8));
        if ((lane & ~2) == 0) write(p, start + h, col, part + ones * total, 0.f);
      });
      return;
    }
  }
  if (count == 1) {  // decode's one row a slot: x's planes stay in registers, subsets in A
    uint32_t xb[kChunks][2];
    load_x_planes(xb, p.xpl + static_cast<size_t>(start) * chunks * 64, c0, here, lane, lane >> 2);
    Alpha<kAffine> coef0, coef1;  // the weights of planes 2t and 2t + 1 (affine: the row's coefficients)
    if constexpr (kAffine) coef0 = p.xs[start * 8 + 2 * t], coef1 = p.xs[start * 8 + 2 * t + 1];
    else coef0 = sub.w0, coef1 = sub.w1;
    walk([&](int col, const uint4* b, float s, Alpha<kAffine> alpha_lane) {
      const auto alpha_g = subset_alpha<kLaidOut, kAffine>(b, alpha_lane, lane >> 2);
      const auto alpha_g8 = subset_alpha<kLaidOut, kAffine>(b, alpha_lane, (lane >> 2) + 8);
      uint32_t d[4] = {0u, 0u, 0u, 0u};
      by_range([&](auto whole) {
#pragma unroll
        for (int cc = 0; cc < kChunks; ++cc)
          if (decltype(whole)::value || cc < here)  // warp-uniform test
            sub.multiply(d, b[cc * 8 + t], b[cc * 8 + t + 4], xb[cc][0], xb[cc][1]);
      });
      const auto part = warp_sum(sub.dot(d, alpha_g, alpha_g8, coef0, coef1));
      if (lane == 0) write(p, start, col, part, s);
    });
    return;
  }
  // Several rows a slot: rows of x in A, two a mma, so that each chunk's subset masks are built
  // once for up to kRowsA rows (x's words read from global memory, where L1 keeps them for the
  // warp's next columns). A row past the slot's stands in as its last row, unwritten.
  const int end = start + count;
  walk([&](int col, const uint4* b, float s, Alpha<kAffine> alpha_lane) {
    const auto alpha = [&](int q) { return subset_alpha<kLaidOut, kAffine>(b, alpha_lane, q); };
    const Alpha<kAffine> a[4] = {alpha(2 * t), alpha(2 * t + 1), alpha(2 * t + 8), alpha(2 * t + 9)};
    // The weight of plane g of a row of x (affine: that row's coefficient).
    const auto plane_g = [&](int row) -> Alpha<kAffine> {
      if constexpr (kAffine) return p.xs[row * 8 + (lane >> 2)];
      else return plane_weight(lane >> 2);
    };
    const auto rows = [&](int r, auto row_pairs_c, auto whole_c) {
      constexpr int kRowPairs = decltype(row_pairs_c)::value;
      constexpr bool kWhole = decltype(whole_c)::value;
      // x's words t and t + 4 of plane g of each row: base + off[q] + 64 cc, side by side
      const uint32_t* base = p.xpl + (static_cast<size_t>(r) * chunks + c0) * 64 + (lane >> 2) * 8 + 2 * t;
      int off[2 * kRowPairs];
#pragma unroll
      for (int q = 0; q < 2 * kRowPairs; ++q) off[q] = (min(r + q, end - 1) - r) * chunks * 64;
      uint32_t e[kRowPairs][4] = {}, f[kRowPairs][4] = {};
#pragma unroll 1  // not all 16: x's words loaded ahead would take the single-row path's registers
      for (int cc = 0; cc < kChunks; ++cc) {
        if (!kWhole && cc >= here) break;
        uint32_t m[4];
        sub.masks(m, b[cc * 8 + t], b[cc * 8 + t + 4]);
#pragma unroll
        for (int q = 0; q < kRowPairs; ++q) {
          const uint2 x0 = __ldg(reinterpret_cast<const uint2*>(base + off[2 * q] + cc * 64));
          const uint2 x1 = __ldg(reinterpret_cast<const uint2*>(base + off[2 * q + 1] + cc * 64));
          multiply_rows(e[q], f[q], m, x0.x, x1.x, x0.y, x1.y);
        }
      }
#pragma unroll
      for (int q = 0; q < 2 * kRowPairs; ++q) {
        const auto part = warp_sum(dot_rows(e[q / 2], f[q / 2], a, q % 2, plane_g(min(r + q, end - 1))));
        if (lane == 0 && r + q < end) write(p, r + q, col, part, s);
      }
    };
    using Two = std::integral_constant<int, 2>;
    using One = std::integral_constant<int, 1>;
    for (int r = start; r < end; r += kRowsA)
      by_range([&](auto whole) {
        if (end - r > 2) rows(r, Two(), whole);
        else rows(r, One(), whole);
      });
  });
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("cqjax CUDA lut_matmul_bitplane: " + what);
}

ffi::Error failed(cudaError_t err) {
  return ffi::Error::Internal(std::string("cqjax CUDA lut_matmul_bitplane: ") + cudaGetErrorString(err));
}

// Launches bitplane_kernel<kLaidOut, kAffine, kPairs> on p, choosing p.per_warp where it is 0:
// the fewest columns a warp (up to 16) that let every block be resident at once by registers (the
// ring overlaps a warp's columns; fewer would reload x's planes for less work).
template <bool kLaidOut, bool kAffine, bool kPairs = false>
ffi::Error launch(cudaStream_t stream, Problem p) {
  LaunchLimits lim;
  cudaError_t err = launch_limits<bitplane_kernel<kLaidOut, kAffine, kPairs>>(kWarps * 32, lim);
  if (err != cudaSuccess) return failed(err);
  const int64_t warps_in_flight = static_cast<int64_t>(lim.sms) * lim.fit * kWarps;
  const int64_t work = static_cast<int64_t>(p.n) * p.splits * p.num_slots;
  if (p.per_warp == 0)
    p.per_warp = static_cast<int>(std::clamp<int64_t>((work + warps_in_flight - 1) / warps_in_flight, 1, 16));
  const dim3 grid((p.n + kWarps * p.per_warp - 1) / (kWarps * p.per_warp), p.splits, p.num_slots);
  bitplane_kernel<kLaidOut, kAffine, kPairs><<<grid, kWarps * 32, 0, stream>>>(p);
  err = cudaGetLastError();
  return err == cudaSuccess ? ffi::Error::Success() : failed(err);
}

ffi::Error LutMatmulBitplaneImpl(cudaStream_t stream, ffi::Buffer<ffi::U32> xpl, ffi::Buffer<ffi::F32> xs,
                                 ffi::Buffer<ffi::U8> packed, ffi::AnyBuffer centroids, ffi::Buffer<ffi::S32> slots,
                                 ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> scales,
                                 int64_t per_warp_asked, bool pairs) {
  const auto xd = xpl.dimensions(), pd = packed.dimensions(), cd = centroids.dimensions(), sd = slots.dimensions();
  if (xd.size() != 4 || pd.size() != 3 || cd.size() != 3 || sd.size() != 2 || sd[0] != 3)
    return invalid("expected x planes [t, k/256, 8, 8], packed [e, n, k/2], centroids [e, n, 16], slots [3, s]");
  const auto xsd = xs.dimensions();
  const bool affine = xsd.size() == 2;
  const bool laid_out = centroids.element_type() == (affine ? ffi::DataType::U32 : ffi::DataType::S32);
  const int64_t t = xd[0], k = 2 * pd[2], e = pd[0], n = pd[1];
  if (k % kChunk != 0 || k > kMaxK || xd[1] != k / kChunk || xd[2] != 8 || xd[3] != 8 || cd[0] != e || cd[1] != n ||
      cd[2] != 16 || xsd.size() < 1 || xsd.size() > 2 || xsd[0] != t || (affine && xsd[1] != 8))
    return invalid("operand shapes disagree (k a multiple of 256 up to 133143, one 16-entry codebook a row, x's "
                   "scales [t] or plane coefficients [t, 8])");
  if (!laid_out && !float_or_bf16(centroids.element_type()))
    return invalid("centroids must be float32 or bf16, or laid out by bitplane_layout for these numerics (int32; "
                   "affine: uint32)");
  const int64_t splits = (k / kChunk + kChunks - 1) / kChunks;
  const auto od = out->dimensions(), scd = scales->dimensions();
  const bool out_ok =
      splits == 1 ? od.size() == 2 && od[0] == t && od[1] == n && float_or_bf16(out->element_type())
      : affine    ? od.size() == 3 && od[0] == splits && od[1] == t && od[2] == n &&
                     out->element_type() == ffi::DataType::F32
                  : od.size() == 3 && od[0] == splits && od[1] == t && od[2] == n &&
                     out->element_type() == ffi::DataType::S32 && scd.size() == 2 && scd[0] == t && scd[1] == n;
  if (!out_ok)
    return invalid("the result must be float32 or bf16 [t, n] (k up to 4096), else [ceil(k / 4096), t, n]: int32 "
                   "with float32 scales [t, n], or float32 with plane coefficients");
  if (t == 0 || n == 0 || sd[1] == 0) return ffi::Error::Success();
  if (per_warp_asked < 0 || per_warp_asked > kMaxPerWarp) return invalid("per_warp must be 0 (chosen here) to 64");
  const Problem p{xpl.typed_data(), xs.typed_data(), packed.typed_data(), centroids.untyped_data(),
                  slots.typed_data(), out->untyped_data(), scales->typed_data(), static_cast<int>(t),
                  static_cast<int>(k), static_cast<int>(n), static_cast<int>(sd[1]), static_cast<int>(splits),
                  static_cast<int>(per_warp_asked), centroids.element_type() == ffi::DataType::BF16,
                  out->element_type() == ffi::DataType::BF16};
  if (affine && pairs) return laid_out ? launch<true, true, true>(stream, p) : launch<false, true, true>(stream, p);
  if (affine) return laid_out ? launch<true, true>(stream, p) : launch<false, true>(stream, p);
  return laid_out ? launch<true, false>(stream, p) : launch<false, false>(stream, p);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CqjaxLutMatmulBitplaneCuda, LutMatmulBitplaneImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("per_warp")
                                  .Attr<bool>("pairs"),
                              {ffi::Traits::kCmdBufferCompatible});
