// AVX2 helpers shared by the CPU kernels: 8-lane float32 loads from float32 or bfloat16 memory, sums, maxima.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace kvlab {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  // A bfloat16 is the upper half of a float32: widen each lane to 32 bits and shift it up.
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// sums[g] = the sum of x over columns [g * group_size, (g + 1) * group_size) of its K (the last group
// may be short): a quantized GEMM's per-group input sums (quant_tile.h). One definition, so that the
// op (quant_gemm.cpp) and the fused decode step sum in the same order and agree to the bit.
inline void group_sums(const float* x, int64_t K, int64_t group_size, float* sums) {
  for (int64_t begin = 0, g = 0; begin < K; begin += group_size, ++g) {
    const int64_t end = std::min(K, begin + group_size);
    __m256 acc = _mm256_setzero_ps();
    int64_t k = begin;
    for (; k + 8 <= end; k += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + k));
    float sum = horizontal_sum(acc);
    for (; k < end; ++k) sum += x[k];
    sums[g] = sum;
  }
}

}  // namespace kvlab
