// Device helpers of the bit-plane decode (lut_matmul_bitplane.cu), shared with the stand-alone
// probe experiments/probe_bitplane_lut.cu. A row's int8 codebook over 4-bit codes is a sum over
// the subsets S of the code's bits (alpha: its Moebius transform), x is split into its
// two's-complement bit-planes, and one binary mma counts the 16 subset masks of 256 codes
// against the 8 planes (lut_matmul_bitplane.cu says more). Lane (g, t) of a warp: mma rows g and
// g + 8 are the subsets S = g and g + 8, k = 32 t + i of each 128-code half, B column g is plane
// g, and D holds the counts of (S, plane) = (g or g + 8, 2t or 2t + 1).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace cqjax_cuda {

// D += popc(A AND B) over 256 bits: mma.sync m16n8k256, b1 operands, s32 accumulators.
__device__ __forceinline__ void bmma(uint32_t (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                     uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(smem))),
               "l"(gmem));
}

// A 16-byte group of 32 nibble codes (word j, nibble i: code 8j + i) -> its four bit-planes, in
// place: a 4 x 4 bit transpose within each nibble (four delta swaps). Plane p's bit 4i + j is code
// bit p of nibble i of word j, the order of k that x's planes follow.
__device__ __forceinline__ void nibbles_to_planes(uint4& u) {
  uint32_t d;
  d = ((u.x >> 1) ^ u.y) & 0x55555555u, u.x ^= d << 1, u.y ^= d;
  d = ((u.z >> 1) ^ u.w) & 0x55555555u, u.z ^= d << 1, u.w ^= d;
  d = ((u.x >> 2) ^ u.z) & 0x33333333u, u.x ^= d << 2, u.z ^= d;
  d = ((u.y >> 2) ^ u.w) & 0x33333333u, u.y ^= d << 2, u.w ^= d;
}

// The Moebius transform over the bits of lane & 15 of a codebook's entries held one a lane (v, in
// each half-warp): alpha[lane & 15], a subset with bit b minus the one without it, bits 1, 2, 4, 8
// in turn, as bitplane_layout computes it (int: exact; float: the affine numerics' float32).
template <typename T>
__device__ __forceinline__ T moebius_over_lanes(T v, int lane) {
#pragma unroll
  for (int bit = 1; bit < 16; bit <<= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, bit);
    if (lane & bit) v -= o;
  }
  return v;
}

// A codebook's entry lane & 15 (c, in each half-warp) -> alpha[lane & 15] (returned) and the
// codebook's scale (s): the entries rounded to int8 as cqjax.lut_matmul.int8_round (absmax *
// f32(1/127), then rint(c * (1 / scale)), the division IEEE-rounded), then Moebius-transformed
// over their bits.
__device__ __forceinline__ int codebook_moebius(float c, int lane, float& s) {
  float amax = fabsf(c);
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  s = amax > 0.f ? __fmul_rn(amax, 1.f / 127.f) : 1.f;
  return moebius_over_lanes(__float2int_rn(__fmul_rn(c, __fdiv_rn(1.f, s))), lane);
}

// codebook_moebius's alpha[g] and alpha[g + 8] of this lane (one row of x: subsets in A). Returns
// the codebook's scale.
__device__ __forceinline__ float codebook_alpha(float c, int lane, uint32_t& alpha_g, uint32_t& alpha_g8) {
  float s;
  const int alpha = codebook_moebius(c, lane, s);
  const int g = lane >> 2;
  alpha_g = __shfl_sync(0xffffffffu, alpha, g), alpha_g8 = __shfl_sync(0xffffffffu, alpha, g + 8);
  return s;
}

// The per-lane constants of the subset masks and plane weights: n_b all ones where bit b is not
// in S = g (so that plane b drops out of the AND), w0 / w1 the weights of planes 2t and 2t + 1
// (2^j, -128 for the sign plane).
struct SubsetLane {
  uint32_t n0, n1, n2, w0, w1;
  __device__ __forceinline__ explicit SubsetLane(int lane) {
    const int g = lane >> 2, t = lane & 3;
    n0 = (g & 1) ? 0u : ~0u, n1 = (g & 2) ? 0u : ~0u, n2 = (g & 4) ? 0u : ~0u;
    w0 = 1u << (2 * t), w1 = t == 3 ? static_cast<uint32_t>(-128) : 1u << (2 * t + 1);
  }
  // A chunk's subset masks of this lane, from lo / hi the planes of codes 32t.. and 128 + 32t..
  // (words t and t + 4): m[0] / m[1] subset g over codes 32t.. / 128 + 32t.., m[2] / m[3] subset
  // g + 8.
  __device__ __forceinline__ void masks(uint32_t (&m)[4], const uint4& lo, const uint4& hi) const {
    m[0] = (lo.x | n0) & (lo.y | n1) & (lo.z | n2), m[1] = (hi.x | n0) & (hi.y | n1) & (hi.z | n2);
    m[2] = m[0] & lo.w, m[3] = m[1] & hi.w;
  }
  // One chunk of one row of x (subsets in A): b0 / b1 x's plane g at words t and t + 4.
  __device__ __forceinline__ void multiply(uint32_t (&d)[4], const uint4& lo, const uint4& hi, uint32_t b0,
                                           uint32_t b1) const {
    uint32_t m[4];
    masks(m, lo, hi);
    bmma(d, m[0], m[2], m[1], m[3], b0, b1);
  }
  // The same, and the lane's share of the chunk's count of each of its subsets (ones_g / ones_g8:
  // subset g / g + 8), the counts against a plane of ones that B has no column left for.
  __device__ __forceinline__ void multiply_counting(uint32_t (&d)[4], uint32_t& ones_g, uint32_t& ones_g8,
                                                    const uint4& lo, const uint4& hi, uint32_t b0, uint32_t b1) const {
    uint32_t m[4];
    masks(m, lo, hi);
    bmma(d, m[0], m[2], m[1], m[3], b0, b1);
    ones_g += __popc(m[0]) + __popc(m[1]), ones_g8 += __popc(m[2]) + __popc(m[3]);
  }
  // The lane's share of the row's dot product, c0 / c1 weighing planes 2t and 2t + 1: uint32 (all
  // sums wrap mod 2^32; the warp's total is exact), or float (the affine numerics: alpha and each
  // row's coefficients in float32, the counts exact in it).
  template <typename T>
  __device__ __forceinline__ T dot(const uint32_t (&d)[4], T alpha_g, T alpha_g8, T c0, T c1) const {
    const auto n = [](uint32_t v) { return static_cast<T>(v); };
    return alpha_g * (c0 * n(d[0]) + c1 * n(d[1])) + alpha_g8 * (c0 * n(d[2]) + c1 * n(d[3]));
  }
  // With the int8 planes' weights.
  __device__ __forceinline__ uint32_t dot(const uint32_t (&d)[4], uint32_t alpha_g, uint32_t alpha_g8) const {
    return dot(d, alpha_g, alpha_g8, w0, w1);
  }
};

// The weight of x's two's-complement plane g: 2^g, -128 for the sign plane.
__device__ __forceinline__ uint32_t plane_weight(int g) {
  return g == 7 ? static_cast<uint32_t>(-128) : 1u << g;
}

// Rows in A: A rows g and g + 8 are plane g of rows r0 and r1 of x (x0 / x1: words t and t + 4 of
// that plane), B column g is subset g (e) or g + 8 (f) of the codes, so that e[0..1] / e[2..3] count
// (plane g of r0 / r1, subsets 2t and 2t + 1), f the same for subsets 2t + 8 and 2t + 9.
__device__ __forceinline__ void multiply_rows(uint32_t (&e)[4], uint32_t (&f)[4], const uint32_t (&m)[4],
                                              uint32_t x0t, uint32_t x1t, uint32_t x0t4, uint32_t x1t4) {
  bmma(e, x0t, x1t, x0t4, x1t4, m[0], m[1]);
  bmma(f, x0t, x1t, x0t4, x1t4, m[2], m[3]);
}

// Rows in A: the lane's share of row r0's (h = 0) or r1's (h = 1) dot: cg, the weight of plane g
// (plane_weight; affine: the row's coefficient), times its counts weighted by alpha of subsets 2t,
// 2t + 1, 2t + 8, 2t + 9 (a[0..3]); uint32 or float as SubsetLane::dot.
template <typename T>
__device__ __forceinline__ T dot_rows(const uint32_t (&e)[4], const uint32_t (&f)[4], const T (&a)[4], int h, T cg) {
  const auto n = [](uint32_t v) { return static_cast<T>(v); };
  return cg * (a[0] * n(e[2 * h]) + a[1] * n(e[2 * h + 1]) + a[2] * n(f[2 * h]) + a[3] * n(f[2 * h + 1]));
}

// x's planes of this lane for chunks c0 .. c0 + K - 1 of one row (xpl_row: that row's [chunks, 8
// planes, 8 words], words t and t + 4 of a plane side by side at 2t): plane `plane`'s (B column
// g's: plane g, or in a pair of rows plane g & 3) words t and t + 4 (the mma's B fragment) in one
// 8-byte load; zeros from chunk `here` on.
template <int K>
__device__ __forceinline__ void load_x_planes(uint32_t (&xb)[K][2], const uint32_t* xpl_row, int c0, int here,
                                              int lane, int plane) {
  const int t = lane & 3;
#pragma unroll
  for (int c = 0; c < K; ++c) {
    const uint2 v = c < here ? *reinterpret_cast<const uint2*>(xpl_row + ((c0 + c) * 8 + plane) * 8 + 2 * t)
                             : make_uint2(0u, 0u);
    xb[c][0] = v.x, xb[c][1] = v.y;
  }
}

// The sum over the warp's lanes.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace cqjax_cuda
