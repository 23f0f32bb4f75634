// Quantized skinny GEMM, AVX-512 (F + BW + VL) with F16C for the float16 scales. Compiled with its own
// -m flags (build.py), run only where the CPU reports them. 16 lanes: a 32-column block is two vectors;
// int4 nibbles widen with vpmovzxbd, int8 codes with vpmovsxbd.
#include <immintrin.h>

#include <cstdint>

#include "quant_tile.h"
#include "skinny_avx512_reduce.h"

namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 4 : 8; }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float s) { return _mm512_set1_ps(s); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
  static void reduce4(const V* acc, float* out) { reduce4_zmm(acc, out); }

  // Vector v (0 or 1) of a block, columns [16 v, 16 v + 16): the codes as float32.
  template <int BITS>
  static V codes(const uint8_t* bytes, int v) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + (BITS == 8 ? 16 * v : 0)));
    if constexpr (BITS == 4) {
      const __m128i nibbles = _mm_and_si128(v == 0 ? packed : _mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
      return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nibbles));
    } else {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(packed));
    }
  }
};

}  // namespace

namespace kvlab::quant {
void avx512(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512>(p, n_begin, n_end); }
}  // namespace kvlab::quant
