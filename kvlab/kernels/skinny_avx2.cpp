// Skinny GEMM, AVX2 + FMA: the base variant every x86 CPU the kernels accept has. Compiled with
// -mavx2 -mfma only (build.py). 16 vector registers: tiles of 4 input rows x 2 weight rows (8
// accumulators, 2 weight vectors, the input vector folded into the FMA's memory operand).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "skinny_peak.h"
#include "skinny_tile.h"

namespace {

// Lanes [0, n) set: the mask _mm256_maskload_ps reads a K tail of n < 8 floats with.
inline __m256i tail_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// A bfloat16 is the upper half of a float32: widen each lane to 32 bits and shift it up.
inline __m256 widen_bf16(__m128i half) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16)); }

struct Avx2Base {
  using X = float;
  using Acc = __m256;
  using XV = __m256;
  using WV = __m256;
  static constexpr int kStep = 8;
  static constexpr int kTileInputRows = 4;
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 2 : (MR == 2 ? 4 : 8); }
  static Acc add(Acc a, Acc b) { return _mm256_add_ps(a, b); }
  static Acc zero() { return _mm256_setzero_ps(); }
  static XV load_x(const float* p) { return _mm256_loadu_ps(p); }
  static XV load_x_tail(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
  static Acc fma(Acc acc, WV w, XV x) { return _mm256_fmadd_ps(w, x, acc); }
  static void reduce4(const Acc* acc, float* out) { reduce4_store(acc[0], acc[1], acc[2], acc[3], out); }
};

struct Avx2F32 : Avx2Base {
  using W = float;
  static WV load_w(const float* p) { return _mm256_loadu_ps(p); }
  static WV load_w_tail(const float* p, int n) { return _mm256_maskload_ps(p, tail_mask(n)); }
};

struct Avx2Bf16 : Avx2Base {
  using W = uint16_t;
  static WV load_w(const uint16_t* p) { return widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static WV load_w_tail(const uint16_t* p, int n) {
    uint16_t padded[8] = {};  // AVX2 has no 16-bit masked load; a tail is once per weight row
    std::memcpy(padded, p, n * sizeof(uint16_t));
    return load_w(padded);
  }
};

}  // namespace

namespace kvlab::skinny {
double avx2_f32_peak(int64_t iterations) { return multiply_add_flops<Avx2F32>(iterations); }
void avx2_f32(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx2F32>(p, n_begin, n_end); }
void avx2_bf16(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx2Bf16>(p, n_begin, n_end); }
}  // namespace kvlab::skinny
