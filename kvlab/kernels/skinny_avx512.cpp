// Skinny GEMM, AVX-512 (F + BW for the 16-bit masked loads of a bfloat16 K tail). Compiled with its
// own -m flags (build.py), run only where the CPU reports them. 32 vector registers: tiles of
// 4 input rows x 4 weight rows (16 accumulators), 16 lanes per step; tails by masked loads.
// bfloat16 weights are widened by a shift (a bf16 is a float32's upper half) and meet float32 inputs.
#include <immintrin.h>

#include <cstdint>

#include "skinny_tile.h"
#include "skinny_avx512_reduce.h"

namespace {

inline __mmask16 tail_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512 widen_bf16(__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); }

struct Avx512Base {
  using X = float;
  using Acc = __m512;
  using XV = __m512;
  using WV = __m512;
  static constexpr int kStep = 16;
  static constexpr int kTileInputRows = 4;
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 4 : 8; }
  static Acc zero() { return _mm512_setzero_ps(); }
  static XV load_x(const float* p) { return _mm512_loadu_ps(p); }
  static XV load_x_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static Acc fma(Acc acc, WV w, XV x) { return _mm512_fmadd_ps(w, x, acc); }
  static void reduce4(const Acc* acc, float* out) { reduce4_zmm(acc, out); }
};

struct Avx512F32 : Avx512Base {
  using W = float;
  static WV load_w(const float* p) { return _mm512_loadu_ps(p); }
  static WV load_w_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
};

struct Avx512Bf16 : Avx512Base {
  using W = uint16_t;
  static WV load_w(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static WV load_w_tail(const uint16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(tail_mask(n), p)); }
};

}  // namespace

namespace kvlab::skinny {
void avx512_f32(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512F32>(p, n_begin, n_end); }
void avx512_bf16(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512Bf16>(p, n_begin, n_end); }
}  // namespace kvlab::skinny
