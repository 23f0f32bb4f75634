// AVX2 helpers shared by the CPU kernels: 8-lane float32 loads from float32 or bfloat16 memory, sums, maxima.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace kvlab {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {
  // A bfloat16 is the upper half of a float32: widen each lane to 32 bits and shift it up.
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

// Rounds 8 float32 lanes to bfloat16 precision (nearest even), as a float32 -> bf16 -> float32 trip.
inline __m256 round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
  return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// 8 lanes rounded to T's precision: a float32 -> T -> float32 trip.
template <typename T>
inline __m256 round8(__m256 v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return round_bf16(v);
  else return v;
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// Stores 8 lanes already rounded to bfloat16 precision (round_bf16): their upper halves.
inline void store8(c10::BFloat16* p, __m256 rounded) {
  const __m256i upper = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(upper), _mm256_extracti128_si256(upper, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
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
