// Quantized skinny GEMM, AVX-512 (F + BW + VL) with F16C for the float16 scales. Compiled with its own
// -m flags (build.py), run only where the CPU reports them. 16 lanes: a 32-column block is two vectors;
// int4 nibbles become floats through a 16-entry vpermps lookup, int8 codes widen with vpmovsxbd.
#include <immintrin.h>

#include <cstdint>

#include "quant_tile.h"
#include "skinny_avx512_reduce.h"

namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kInt4Zero = 8;  // codes<4> returns q - 8 (the lookup table is centred)
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 4 : 8; }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float s) { return _mm512_set1_ps(s); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V fma(V acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
  static void reduce4(const V* acc, float* out) { reduce4_zmm(acc, out); }

  // Vector v (0 or 1) of a block, columns [16 v, 16 v + 16): the codes as float32. int4: the block's
  // 16 bytes widen once to 16 dwords; vpermps reads only the low 4 bits of each index, so a lookup in
  // the table -8..7 converts the low nibbles as they are and the high ones after one shift, with no
  // masking and no int-to-float conversion (6 vector ops per 32 weights instead of 9), centred so that
  // symmetric int4 (q + 8 stored) needs no offset term (quant_tile.h).
  template <int BITS>
  static V codes(const uint8_t* bytes, int v) {
    if constexpr (BITS == 4) {
      const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
      const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      return _mm512_permutexvar_ps(v == 0 ? wide : _mm512_srli_epi32(wide, 4), table);
    } else {
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16 * v));
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(packed));
    }
  }
};

}  // namespace

namespace kvlab::quant {
void avx512(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512>(p, n_begin, n_end); }
}  // namespace kvlab::quant
