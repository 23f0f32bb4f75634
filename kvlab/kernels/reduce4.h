// The four-at-a-time lane reduction the skinny GEMMs (float: skinny_tile.h; quantized: quant_tile.h and
// the integer variants) end their tiles with. Included inside no namespace of its own: each variant translation unit gets
// its own internal copy, compiled with its flags (skinny_variants.h says why that matters).
#pragma once

#include <immintrin.h>

namespace {

// out[0..3] = the lane sums of a, b, c, d: a transposing reduction (hadd(u, v) = [u0+u1, u2+u3, v0+v1,
// v2+v3 | the same for lanes 4-7], twice, leaves each vector's two half-sums in lanes j and j + 4),
// 5 instructions for four sums where one reduction per sum takes 5 each. With K only 18-48 vectors
// long, per-output reductions were a tenth of a tile's instructions.
inline void reduce4_store(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
}

// out[0..count) = the lane sums of acc[0..count), count 1-4, always through T::reduce4's four-way
// reduction (padded with repeats), so an output's value does not depend on how many were reduced with
// it: threads split the rows differently per call site (the op's parallel_for, the fused decode step),
// and a sum must not change with the split.
template <class T, class V>
inline void reduce_up_to4(const V* acc, int count, float* out) {
  if (count == 4) return T::reduce4(acc, out);
  V padded[4];
  float sums[4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) padded[j] = acc[j < count ? j : 0];
  T::reduce4(padded, sums);
  for (int j = 0; j < count; ++j) out[j] = sums[j];
}

}  // namespace
