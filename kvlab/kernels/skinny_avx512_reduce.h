// The AVX-512 skinny GEMM variants' four-at-a-time output reduction: each 16-lane accumulator is
// folded to 8 lanes, then skinny_tile.h's transposing reduction sums four of them at once. Included
// only by translation units compiled with AVX-512 flags (skinny_avx512.cpp, skinny_avx512bf16.cpp),
// after reduce4.h (skinny_tile.h includes it).
#pragma once

#include <immintrin.h>

#include "reduce4.h"

namespace {

// AVX512F's 256-bit extract (the float form of the extract needs AVX512DQ).
inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

inline void reduce4_zmm(const __m512* acc, float* out) {
  reduce4_store(fold(acc[0]), fold(acc[1]), fold(acc[2]), fold(acc[3]), out);
}

// For reduce_up_to4 where no variant traits type is at hand (the integer quantized kernels).
struct Zmm {
  static void reduce4(const __m512* acc, float* out) { reduce4_zmm(acc, out); }
};

}  // namespace
