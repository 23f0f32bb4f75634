// Skinny GEMM, AVX-512 (F + BW for the 16-bit masked loads of a bfloat16 K tail). Compiled with its
// own -m flags (build.py), run only where the CPU reports them. 32 vector registers: tiles of
// 4 input rows x 4 weight rows (16 accumulators), 16 lanes per step; tails by masked loads.
// bfloat16 weights are widened by a shift (a bf16 is a float32's upper half) and meet float32 inputs;
// at one input row a 512-bit load of 32 weights is split into its even and odd elements instead.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "skinny_peak.h"
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
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
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

struct Halves {
  __m512 even, odd;
};

// 32 bf16 weights from one 512-bit load as two float32 vectors, without widening each lane: a 32-bit
// lane holds elements 2i (low half) and 2i + 1 (high half); shifted left 16 bits, the lane is element
// 2i as a float32; masked to its high half, element 2i + 1. The input meets them split alike
// (split_pairs), so a step costs one load, two integer ops and two FMAs per 32 weights, where widening
// costs two loads, two cross-lane zero-extensions, two shifts and two FMAs.
inline Halves split_bf16(__m512i v) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}

struct Avx512Bf16Halves : Avx512Base {
  using W = uint16_t;
  using WV = Halves;
  using XV = Halves;
  static constexpr int kStep = 32;
  static WV load_w(const uint16_t* p) { return split_bf16(_mm512_loadu_si512(p)); }
  static WV load_w_tail(const uint16_t* p, int n) {
    return split_bf16(_mm512_maskz_loadu_epi16(static_cast<__mmask32>((uint64_t{1} << n) - 1u), p));
  }
  // x as split_pairs leaves it: a step's 16 even-indexed elements, then its 16 odd-indexed ones (a
  // short last step of n: its (n + 1) / 2 even-indexed ones, then its n / 2 odd-indexed ones).
  static XV load_x(const float* p) { return {_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16)}; }
  static XV load_x_tail(const float* p, int n) {
    const int evens = (n + 1) / 2;
    return {_mm512_maskz_loadu_ps(tail_mask(evens), p), _mm512_maskz_loadu_ps(tail_mask(n / 2), p + evens)};
  }
  static Acc fma(Acc acc, WV w, XV x) { return _mm512_fmadd_ps(w.odd, x.odd, _mm512_fmadd_ps(w.even, x.even, acc)); }
};

// One input row of K with each step of 32 columns reordered into its even-indexed, then its
// odd-indexed elements: the order in which split_bf16 yields the weights.
void split_pairs(const float* x, int64_t K, float* out) {
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t n = std::min<int64_t>(32, K - k), evens = (n + 1) / 2;
    for (int64_t i = 0; i < n; ++i) out[k + (i % 2 ? evens + i / 2 : i / 2)] = x[k + i];
  }
}

}  // namespace

namespace kvlab::skinny {
double avx512_f32_peak(int64_t iterations) { return multiply_add_flops<Avx512F32>(iterations); }
void avx512_f32(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512F32>(p, n_begin, n_end); }
void avx512_bf16(const Problem& p, int64_t n_begin, int64_t n_end) {
  // At one row each widened weight vector feeds one FMA, and the widening's cross-lane zero-extension
  // bounds the loop (weights in L3 on a Zen 4 EPYC: 55-72 GB/s widened, 67-89 split); from two rows on
  // it is shared by the rows, and the widening tiles keep more weight rows in registers.
  if (p.M != 1) return run<Avx512Bf16>(p, n_begin, n_end);
  // Each caller (a thread's share of the rows) splits its own copy of the one input row.
  thread_local std::vector<float> split;
  split.resize(p.K);
  split_pairs(static_cast<const float*>(p.x), p.K, split.data());
  run<Avx512Bf16Halves>(Problem{split.data(), p.w, p.y, p.M, p.K, p.N, p.one_row}, n_begin, n_end);
}
}  // namespace kvlab::skinny
