// Codebook (lookup-table) matmul on the CPU as XLA FFI handlers.
//
//   out[m, n] = sum_k x[m, k] * centroids[n, k / group, code[n, k]]
//
// Weights stay packed (cqjax/codebook.py: per output row n, the row's codes as a little-endian
// bit stream, 4-bit = low nibble first; one table of 2^bits centroids per group of inputs).
// Decode-to-register: with AVX-512 (F, BW, VBMI) and codes of 1-4 bits, a group's (up to) 16 centroids sit in one
// zmm register and `vpermps` turns 16 codes into 16 weights, which meet up to 4 activation rows in
// FMAs while they are in registers; the f32 weights never exist in memory. bf16 activations (M >= 8,
// AVX512-BF16) decode 32 codes with `vpermw` and take `vdpbf16ps` dot products, twice the f32 FMA
// rate. Wider codes, groups that are not multiples of 16 and CPUs without AVX-512 decode a row into
// a per-thread buffer (allocated once per call, outside the hot loop) and take vectorised dot
// products. Threads split the output rows.
//
// Opt-in int8 path (attribute int8 = 1; 4-bit codes, groups of 64k, AVX512-VNNI + VBMI): each
// activation row is rounded to int8 with its own absmax scale and each group's 16 centroids to
// int8 with theirs; `vpermb` decodes 64 codes into 64 int8 weights and `vpdpbusd` takes 64
// products per instruction (activations offset by +128 to the unsigned operand, the offset
// removed with the weights' sum). Other shapes and CPUs take the float paths.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "nanobind/nanobind.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace nb = nanobind;

namespace {

struct Problem {
  const float* x;         // [m, k] (f32 activations), or null when xb is set
  const uint16_t* xb;     // [m, k] bf16 activations, for the bf16 dot-product path
  const uint8_t* xu8;     // [m, k] int8 activations + 128, for the int8 path (else null)
  const float* xscale;    // [m] their scales
  const uint8_t* packed;  // [n, row_bytes]
  const float* cent;      // [n, groups, 2^bits]
  float* out;             // [m, n]
  int64_t m, k, n, row_bytes, groups;
  int bits;
};

// Code i of a little-endian bit stream (bits <= 8 spans at most two bytes).
inline uint32_t CodeAt(const uint8_t* p, int64_t i, int bits, int64_t row_bytes) {
  const int64_t off = i * bits;
  const int64_t byte = off >> 3;
  uint32_t v = p[byte];
  if ((off & 7) + bits > 8 && byte + 1 < row_bytes) v |= uint32_t(p[byte + 1]) << 8;
  return (v >> (off & 7)) & ((1u << bits) - 1);
}

// Portable path: decode the row into `w`, then one dot product per activation row.
__attribute__((target_clones("avx512f", "avx2", "default")))
float Dot(const float* a, const float* b, int64_t k) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < k; ++i) s += a[i] * b[i];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

void RowsGeneric(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> w(p.k);
  const int64_t g = p.k / p.groups, c = int64_t(1) << p.bits;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = p.packed + n * p.row_bytes;
    const float* table = p.cent + n * p.groups * c;
    for (int64_t i = 0; i < p.k; ++i) w[i] = table[(i / g) * c + CodeAt(row, i, p.bits, p.row_bytes)];
    for (int64_t m = 0; m < p.m; ++m) p.out[m * p.n + n] = Dot(p.x + m * p.k, w.data(), p.k);
  }
}

// 16 codes of 1-4 bits starting at code i (a multiple of 16, so at a byte boundary) -> 16 weights
// from the (up to) 16-entry table. `vpmultishiftqb` moves code j's bits to the bottom of dword j
// straight from the broadcast 64-bit word; `vpermps` reads only an index's low 4 bits, so for
// 4-bit codes the neighbours' bits above need no masking.
template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline __m512 Decode16(const uint8_t* row, int64_t i,
                                                                              int64_t row_bytes, __m512 table) {
  const int64_t byte = i * BITS / 8;
  uint64_t v = 0;
  if (BITS == 4 || byte + 8 <= row_bytes) {  // 4 bits: the 8 bytes are always inside the row
    std::memcpy(&v, row + byte, 8);
  } else {
    for (int64_t j = 0; j < row_bytes - byte; ++j) v |= uint64_t(row[byte + j]) << (8 * j);  // never past the row
  }
  constexpr auto ctrl = [](int q) { return static_cast<long long>(uint64_t(2 * q * BITS) | uint64_t((2 * q + 1) * BITS) << 32); };
  const __m512i control = _mm512_set_epi64(ctrl(7), ctrl(6), ctrl(5), ctrl(4), ctrl(3), ctrl(2), ctrl(1), ctrl(0));
  __m512i idx = _mm512_multishift_epi64_epi8(control, _mm512_set1_epi64(static_cast<long long>(v)));
  if constexpr (BITS < 4) idx = _mm512_and_si512(idx, _mm512_set1_epi32((1 << BITS) - 1));
  return _mm512_permutexvar_ps(idx, table);
}

// A tile's MT x U f32 accumulators: cleared, then each row's U partial sums added into out[m0 + t, n].
template <int MT, int U>
__attribute__((target("avx512f"))) inline void ZeroTile(__m512 (&acc)[MT][U]) {
  for (int t = 0; t < MT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm512_setzero_ps();
}

template <int MT, int U>
__attribute__((target("avx512f"))) inline void StoreTile(__m512 (&acc)[MT][U], const Problem& p, int64_t n, int64_t m0) {
  for (int t = 0; t < MT; ++t) {
    __m512 s = acc[t][0];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[t][u]);
    p.out[(m0 + t) * p.n + n] = _mm512_reduce_add_ps(s);
  }
}

// MT activation rows at a time with U chunks of 16 codes in flight: U = 4 keeps four FMA chains
// busy at M = 1; with 8 rows, U = 2 still gives 16 chains and stays within the 32 registers.
template <int BITS, int MT, int U = (MT >= 8 ? 2 : 4)>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void RowsAvx512Tile(const Problem& p, int64_t n, int64_t m0) {
  const int64_t g = p.k / p.groups;
  const uint8_t* row = p.packed + n * p.row_bytes;
  __m512 acc[MT][U];
  ZeroTile<MT, U>(acc);
  for (int64_t gi = 0; gi < p.groups; ++gi) {
    const __m512 table = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (1 << BITS)) - 1),
                                               p.cent + (n * p.groups + gi) * (1 << BITS));
    int64_t i = gi * g;
    const int64_t end = i + g;
    for (; i + 16 * U <= end; i += 16 * U) {
      __m512 w[U];
      for (int u = 0; u < U; ++u) w[u] = Decode16<BITS>(row, i + 16 * u, p.row_bytes, table);
      for (int t = 0; t < MT; ++t) {
        const float* xr = p.x + (m0 + t) * p.k + i;
        for (int u = 0; u < U; ++u) acc[t][u] = _mm512_fmadd_ps(w[u], _mm512_loadu_ps(xr + 16 * u), acc[t][u]);
      }
    }
    for (; i < end; i += 16) {
      const __m512 w = Decode16<BITS>(row, i, p.row_bytes, table);
      for (int t = 0; t < MT; ++t)
        acc[t][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p.x + (m0 + t) * p.k + i), acc[t][0]);
    }
  }
  StoreTile<MT, U>(acc, p, n, m0);
}

template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void RowsAvx512(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= p.m; m += 8) RowsAvx512Tile<BITS, 8>(p, n, m);
    for (; m + 4 <= p.m; m += 4) RowsAvx512Tile<BITS, 4>(p, n, m);
    for (; m + 2 <= p.m; m += 2) RowsAvx512Tile<BITS, 2>(p, n, m);
    for (; m < p.m; ++m) RowsAvx512Tile<BITS, 1>(p, n, m);
  }
}

bool UseAvx512(const Problem& p) {
  static const bool cpu = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vbmi");
  return cpu && p.bits <= 4 && (p.k / p.groups) % 16 == 0;
}

// bf16 activations: `vpermw` decodes 32 codes into 32 bf16 weights (the group's centroids rounded
// to bf16, as a bf16 model's weights are) and `vdpbf16ps` takes 32 products per instruction into
// f32 accumulators: twice the f32 FMA rate, which is what bounds the kernel once M grows. Below 8
// rows the kernel is bound by decoding and the f32 path (on the widened rows) is faster.
bool UseBf16Dot(const Problem& p) {
  static const bool cpu = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return cpu && p.xb != nullptr && p.m >= 8 && p.bits == 4 && (p.k / p.groups) % 32 == 0;
}

// 32 four-bit codes (16 bytes) -> 32 bf16 weights from the 16-entry bf16 table.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline __m512i Decode32Bf16(const uint8_t* p, __m512i table) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m256i codes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(lo, hi)),
                                                _mm_unpackhi_epi8(lo, hi), 1);
  return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(codes), table);
}

// MT activation rows, U chunks of 32 codes in flight (MT * U accumulators in registers).
template <int MT, int U = 2>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void RowsBf16Tile(const Problem& p, int64_t n, int64_t m0) {
  const int64_t g = p.k / p.groups;
  const uint8_t* row = p.packed + n * p.row_bytes;
  __m512 acc[MT][U];
  ZeroTile<MT, U>(acc);
  auto step = [&](int64_t i, int u, __m512i table) __attribute__((target("avx512f,avx512bw,avx512bf16"))) {
    const __m512i w = Decode32Bf16(row + i / 2, table);
    for (int t = 0; t < MT; ++t) {
      const __m512i xv = _mm512_loadu_si512(p.xb + (m0 + t) * p.k + i);
      acc[t][u] = _mm512_dpbf16_ps(acc[t][u], reinterpret_cast<const __m512bh&>(xv), reinterpret_cast<const __m512bh&>(w));
    }
  };
  for (int64_t gi = 0; gi < p.groups; ++gi) {
    const __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(p.cent + (n * p.groups + gi) * 16));
    const __m512i table = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(half));
    int64_t i = gi * g;
    const int64_t end = i + g;
    for (; i + 32 * U <= end; i += 32 * U)
      for (int u = 0; u < U; ++u) step(i + 32 * u, u, table);
    for (; i < end; i += 32) step(i, 0, table);
  }
  StoreTile<MT, U>(acc, p, n, m0);
}

// Output rows n0..n1, activation rows in tiles of 8, then 4, then 1 (the bf16 and int8 paths).
template <void (*Tile8)(const Problem&, int64_t, int64_t), void (*Tile4)(const Problem&, int64_t, int64_t),
          void (*Tile1)(const Problem&, int64_t, int64_t)>
void RowsByTiles(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + 8 <= p.m; m += 8) Tile8(p, n, m);
    for (; m + 4 <= p.m; m += 4) Tile4(p, n, m);
    for (; m < p.m; ++m) Tile1(p, n, m);
  }
}

constexpr auto RowsBf16 = RowsByTiles<RowsBf16Tile<8>, RowsBf16Tile<4>, RowsBf16Tile<1>>;

bool Int8Cpu() {
  static const bool cpu = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512vnni");
  return cpu;
}

bool UseInt8(const Problem& p) {
  return Int8Cpu() && p.xu8 != nullptr && p.bits == 4 && (p.k / p.groups) % 64 == 0;
}

// Symmetric int8 rounding of n values as cqjax.lut_matmul.int8_round: scale = absmax * f32(1/127)
// (1 for all zeros), q = rint(v * (1 / scale)) (multiplies, as XLA compiles the reference).
inline float Int8Scale(const float* v, int64_t n) {
  constexpr float kInv127 = 1.0f / 127.0f;
  float amax = 0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(v[i]));
  return amax > 0 ? amax * kInv127 : 1.0f;
}

// 64 four-bit codes (32 bytes) -> 64 int8 weights from the 16-entry int8 table (low 16 bytes).
__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline __m512i Decode64Int8(const uint8_t* p, __m512i table) {
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i idx = _mm512_or_si512(_mm512_and_si512(b, _mm512_set1_epi16(0x000F)),
                                      _mm512_and_si512(_mm512_slli_epi16(b, 4), _mm512_set1_epi16(0x0F00)));
  return _mm512_permutexvar_epi8(idx, table);
}

template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni"))) void RowsInt8Tile(const Problem& p, int64_t n, int64_t m0) {
  const int64_t g = p.k / p.groups;
  const uint8_t* row = p.packed + n * p.row_bytes;
  const __m512i ones = _mm512_set1_epi8(1);
  float res[MT] = {0};
  for (int64_t gi = 0; gi < p.groups; ++gi) {
    const float* c = p.cent + (n * p.groups + gi) * 16;
    const float sc = Int8Scale(c, 16), inv = 1.0f / sc;
    alignas(64) int8_t tab[64] = {0};
    for (int j = 0; j < 16; ++j) tab[j] = static_cast<int8_t>(std::nearbyint(c[j] * inv));
    const __m512i table = _mm512_load_si512(tab);
    __m512i acc[MT], sumw = _mm512_setzero_si512();
    for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_si512();
    for (int64_t i = gi * g; i < (gi + 1) * g; i += 64) {
      const __m512i w = Decode64Int8(row + i / 2, table);
      sumw = _mm512_dpbusd_epi32(sumw, ones, w);
      for (int t = 0; t < MT; ++t)
        acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_loadu_si512(p.xu8 + (m0 + t) * p.k + i), w);
    }
    const int32_t offset = 128 * _mm512_reduce_add_epi32(sumw);
    for (int t = 0; t < MT; ++t) res[t] += sc * static_cast<float>(_mm512_reduce_add_epi32(acc[t]) - offset);
  }
  for (int t = 0; t < MT; ++t) p.out[(m0 + t) * p.n + n] = res[t] * p.xscale[m0 + t];
}

constexpr auto RowsInt8 = RowsByTiles<RowsInt8Tile<8>, RowsInt8Tile<4>, RowsInt8Tile<1>>;

// Splits the output rows over threads when the work pays for starting them.
void Run(const Problem& p) {
  if (p.m == 0 || p.n == 0) return;
  static void (*const avx512[])(const Problem&, int64_t, int64_t) = {
      nullptr, RowsAvx512<1>, RowsAvx512<2>, RowsAvx512<3>, RowsAvx512<4>};
  auto rows = UseInt8(p) ? RowsInt8 : UseBf16Dot(p) ? RowsBf16 : UseAvx512(p) ? avx512[p.bits] : RowsGeneric;
  const int64_t work = p.n * p.k * std::max<int64_t>(p.m, 4);
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>({hw, p.n / 16 + 1, work / (1 << 20) + 1});
  if (threads <= 1) return rows(p, 0, p.n);
  std::vector<std::thread> pool;
  const int64_t step = (p.n + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back(rows, std::cref(p), std::min(p.n, t * step), std::min(p.n, (t + 1) * step));
  rows(p, 0, std::min(p.n, step));
  for (auto& th : pool) th.join();
}

ffi::Error CheckWeight(int64_t k, int64_t row_bytes, int64_t groups, int64_t c, int64_t bits) {
  if (bits < 1 || bits > 8) return ffi::Error::InvalidArgument("bits must be in [1, 8]");
  if (row_bytes != (k * bits + 7) / 8)
    return ffi::Error::InvalidArgument("packed row has " + std::to_string(row_bytes) + " bytes, expected " +
                                       std::to_string((k * bits + 7) / 8));
  if (c != (int64_t(1) << bits)) return ffi::Error::InvalidArgument("centroid table size is not 2^bits");
  if (groups < 1 || k % groups) return ffi::Error::InvalidArgument("groups do not divide d_in");
  return ffi::Error::Success();
}

// The activations as the row loops read them: f32 as given; bf16 widened to f32 once per call
// (never inside the loops) and also kept for the bf16 dot-product path.
struct Activations {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  std::vector<float> widened;
  std::vector<uint8_t> u8;     // int8 path: round(x / scale) + 128 per row
  std::vector<float> scale;    // int8 path: per-row scale
};

// Rows of k activations rounded to int8 (offset to unsigned) with their per-row scales.
void QuantizeActivations(Activations& a, int64_t m, int64_t k) {
  a.u8.resize(m * k);
  a.scale.resize(m);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = a.f32 + r * k;
    const float s = Int8Scale(xr, k), inv = 1.0f / s;
    a.scale[r] = s;
    for (int64_t i = 0; i < k; ++i)
      a.u8[r * k + i] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(xr[i] * inv)) + 128);
  }
}

ffi::Error ReadActivations(ffi::AnyBuffer x, Activations& a) {
  if (x.element_type() == ffi::DataType::F32) {
    a.f32 = static_cast<const float*>(x.untyped_data());
  } else if (x.element_type() == ffi::DataType::BF16) {
    a.bf16 = static_cast<const uint16_t*>(x.untyped_data());
    a.widened.resize(x.element_count());
    for (size_t i = 0; i < a.widened.size(); ++i) {
      const uint32_t bits = uint32_t(a.bf16[i]) << 16;
      std::memcpy(&a.widened[i], &bits, 4);
    }
    a.f32 = a.widened.data();
  } else {
    return ffi::Error::InvalidArgument("x must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error LutMatmulImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> cent,
                         ffi::ResultBuffer<ffi::F32> out, int32_t bits, int32_t int8) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), cd = cent.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || pd.size() != 2 || cd.size() != 3 || od.size() != 2)
    return ffi::Error::InvalidArgument("lut_matmul: expected x [m,k], packed [n,bytes], centroids [n,groups,c]");
  if (cd[0] != pd[0] || od[0] != xd[0] || od[1] != pd[0])
    return ffi::Error::InvalidArgument("lut_matmul: inconsistent shapes");
  if (auto e = CheckWeight(xd[1], pd[1], cd[1], cd[2], bits); e.failure()) return e;
  Problem p{nullptr, nullptr, nullptr, nullptr, packed.typed_data(), cent.typed_data(), out->typed_data(), xd[0],
            xd[1], pd[0], pd[1], cd[1], bits};
  Activations a;
  if (auto e = ReadActivations(x, a); e.failure()) return e;
  p.x = a.f32;
  p.xb = a.bf16;
  if (int8) {
    QuantizeActivations(a, xd[0], xd[1]);
    p.xu8 = a.u8.data();
    p.xscale = a.scale.data();
  }
  Run(p);
  return ffi::Error::Success();
}

// Rows of x sorted by expert, group_sizes[e] of them for expert e (the ragged_dot contract);
// an expert with no rows costs nothing, rows past the last group are zero.
ffi::Error GroupedLutMatmulImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> packed, ffi::Buffer<ffi::F32> cent,
                                ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out, int32_t bits,
                                int32_t int8) {
  const auto xd = x.dimensions(), pd = packed.dimensions(), cd = cent.dimensions(), od = out->dimensions();
  const auto gd = group_sizes.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || cd.size() != 4 || gd.size() != 1 || od.size() != 2)
    return ffi::Error::InvalidArgument(
        "grouped_lut_matmul: expected x [t,k], packed [e,n,bytes], centroids [e,n,groups,c], group_sizes [e]");
  const int64_t e = pd[0], n = pd[1], t = xd[0], k = xd[1];
  if (cd[0] != e || cd[1] != n || gd[0] != e || od[0] != t || od[1] != n)
    return ffi::Error::InvalidArgument("grouped_lut_matmul: inconsistent shapes");
  if (auto err = CheckWeight(k, pd[2], cd[2], cd[3], bits); err.failure()) return err;
  const int32_t* sizes = group_sizes.typed_data();
  int64_t total = 0;
  for (int64_t i = 0; i < e; ++i) {
    if (sizes[i] < 0) return ffi::Error::InvalidArgument("grouped_lut_matmul: negative group size");
    total += sizes[i];
  }
  if (total > t) return ffi::Error::InvalidArgument("grouped_lut_matmul: group sizes add up to more rows than x has");
  Activations a;
  if (auto err = ReadActivations(x, a); err.failure()) return err;
  if (int8) QuantizeActivations(a, t, k);
  float* o = out->typed_data();
  int64_t start = 0;
  for (int64_t i = 0; i < e; ++i) {
    Run(Problem{a.f32 ? a.f32 + start * k : nullptr, a.bf16 ? a.bf16 + start * k : nullptr,
                int8 ? a.u8.data() + start * k : nullptr, int8 ? a.scale.data() + start : nullptr,
                packed.typed_data() + i * n * pd[2], cent.typed_data() + i * n * cd[2] * cd[3], o + start * n,
                sizes[i], k, n, pd[2], cd[2], bits});
    start += sizes[i];
  }
  std::fill(o + total * n, o + t * n, 0.0f);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LutMatmul, LutMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("int8"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupedLutMatmul, GroupedLutMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("bits")
                                  .Attr<int32_t>("int8"));

NB_MODULE(_lut_matmul, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["cqjax_lut_matmul"] = nb::capsule(reinterpret_cast<void*>(LutMatmul));
    d["cqjax_grouped_lut_matmul"] = nb::capsule(reinterpret_cast<void*>(GroupedLutMatmul));
    return d;
  });
  m.def("int8_cpu", &Int8Cpu);  // whether this CPU has the int8 path's instructions (AVX512-VNNI, VBMI)
}
