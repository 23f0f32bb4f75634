// Quantized skinny GEMM, AVX2 + FMA + F16C: the base variant. 8 lanes: a 32-column block is four
// vectors (int4: low nibbles of bytes 0-7, 8-15, then the high nibbles; int8: 8 codes each).
#include <immintrin.h>

#include <cstdint>

#include "quant_tile.h"

namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kInt4Zero = 0;  // codes<4> returns q as stored
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 2 : 4; }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float s) { return _mm256_set1_ps(s); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V fma(V acc, V w, V x) { return _mm256_fmadd_ps(w, x, acc); }
  static void reduce4(const V* acc, float* out) { reduce4_store(acc[0], acc[1], acc[2], acc[3], out); }

  // Vector v (0-3) of a block, columns [8 v, 8 v + 8): the codes as float32.
  template <int BITS>
  static V codes(const uint8_t* bytes, int v) {
    if constexpr (BITS == 4) {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
      __m128i nibbles = _mm_and_si128(v < 2 ? packed : _mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
      if (v & 1) nibbles = _mm_srli_si128(nibbles, 8);
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles));
    } else {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * v));
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
    }
  }
};

}  // namespace

namespace kvlab::quant {
void avx2(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx2>(p, n_begin, n_end); }
}  // namespace kvlab::quant
