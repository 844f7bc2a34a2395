// The two CPU algorithms the CPU kernel issue asks to compare, at M = 1 on 4096x14336 4-bit codes
// with one 16-entry codebook per output row (the packed format of cqjax/codebook.py):
//
//   decode  decode-to-register: `vpmultishiftqb` + `vpermps` turn 16 codes into 16 f32 weights,
//           one FMA with the activations (what cpu_kernels/lut_matmul.cc does);
//   lut     accumulate by code (the paper's LUT formulation for per-row codebooks): per row,
//           16 bins S_j = sum of x_k over the inputs whose code is j, then y = sum_j c_j S_j.
//           With AVX-512: per 16 codes, 16 compares and 16 masked adds into 16 bin registers.
//           (T-MAC's shared activation tables need codebooks shared across rows; here each row
//           has its own, so the bins are the LUT method that applies.)
//
// Built and run by experiments/lut_vs_decode_cpu.py; prints the median ms of each over repeats,
// both on the machine's threads, and checks both against a scalar reference.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

namespace {

constexpr int64_t K = 4096, N = 14336, BYTES = K / 2;

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) inline __m512i Codes16(const uint8_t* row, int64_t i) {
  uint64_t v;
  std::memcpy(&v, row + i / 2, 8);
  constexpr auto ctrl = [](int q) { return static_cast<long long>(uint64_t(8 * q) | uint64_t(8 * q + 4) << 32); };
  const __m512i control = _mm512_set_epi64(ctrl(7), ctrl(6), ctrl(5), ctrl(4), ctrl(3), ctrl(2), ctrl(1), ctrl(0));
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(control, _mm512_set1_epi64(static_cast<long long>(v))),
                          _mm512_set1_epi32(15));
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void Decode(const uint8_t* codes, const float* cent,
                                                                      const float* x, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * BYTES;
    const __m512 table = _mm512_loadu_ps(cent + n * 16);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < K; i += 64)
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_fmadd_ps(_mm512_permutexvar_ps(Codes16(row, i + 16 * u), table),
                                 _mm512_loadu_ps(x + i + 16 * u), acc[u]);
    y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi"))) void Lut(const uint8_t* codes, const float* cent,
                                                                   const float* x, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * BYTES;
    __m512 bins[16];
    for (int j = 0; j < 16; ++j) bins[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < K; i += 16) {
      const __m512i idx = Codes16(row, i);
      const __m512 xv = _mm512_loadu_ps(x + i);
      for (int j = 0; j < 16; ++j)
        bins[j] = _mm512_mask_add_ps(bins[j], _mm512_cmpeq_epi32_mask(idx, _mm512_set1_epi32(j)), bins[j], xv);
    }
    float s = 0;
    for (int j = 0; j < 16; ++j) s += cent[n * 16 + j] * _mm512_reduce_add_ps(bins[j]);
    y[n] = s;
  }
}

template <typename F>
double MedianMs(F f, const uint8_t* codes, const float* cent, const float* x, float* y, int repeats) {
  const int64_t threads = std::max(1u, std::thread::hardware_concurrency());
  std::vector<double> ms;
  for (int r = 0; r < repeats + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    const int64_t step = (N + threads - 1) / threads;
    for (int64_t t = 1; t < threads; ++t) pool.emplace_back(f, codes, cent, x, y, t * step, std::min(N, (t + 1) * step));
    f(codes, cent, x, y, 0, std::min(N, step));
    for (auto& th : pool) th.join();
    if (r) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::vector<uint8_t> codes(N * BYTES);
  std::vector<float> cent(N * 16), x(K), y1(N), y2(N);
  for (auto& c : codes) c = rng() & 0xFF;
  std::normal_distribution<float> normal;
  for (auto& c : cent) c = normal(rng);
  for (auto& v : x) v = normal(rng);
  double err1 = 0, err2 = 0, scale = 0;
  Decode(codes.data(), cent.data(), x.data(), y1.data(), 0, N);
  Lut(codes.data(), cent.data(), x.data(), y2.data(), 0, N);
  for (int64_t n = 0; n < N; n += 97) {  // scalar reference on a sample of rows
    double ref = 0;
    for (int64_t k = 0; k < K; ++k) ref += double(x[k]) * cent[n * 16 + ((codes[n * BYTES + k / 2] >> (4 * (k & 1))) & 15)];
    err1 = std::max(err1, std::fabs(y1[n] - ref));
    err2 = std::max(err2, std::fabs(y2[n] - ref));
    scale = std::max(scale, std::fabs(ref));
  }
  const double t_decode = MedianMs(Decode, codes.data(), cent.data(), x.data(), y1.data(), 10);
  const double t_lut = MedianMs(Lut, codes.data(), cent.data(), x.data(), y2.data(), 10);
  std::printf("{\"m\": 1, \"k\": %ld, \"n\": %ld, \"threads\": %u, \"decode_ms\": %.4f, \"lut_ms\": %.4f, "
              "\"decode_max_rel_err\": %.2e, \"lut_max_rel_err\": %.2e}\n",
              long(K), long(N), std::thread::hardware_concurrency(), t_decode, t_lut, err1 / scale, err2 / scale);
  return 0;
}
