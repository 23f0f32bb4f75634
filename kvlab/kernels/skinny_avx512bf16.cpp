// Skinny GEMM for bfloat16 weights with AVX512-BF16: vdpbf16ps (_mm512_dpbf16_ps) multiplies 32
// bf16 pairs of weight and input and adds each pair's sum into 16 float32 lanes, so one instruction
// does the work of two float32 FMAs with no widening of the weights (Intel's "BF16 dot product",
// Cooper Lake / Sapphire Rapids, AMD Zen 4). Inputs are read as bfloat16, as the model holds them.
// Products of two bf16 values are exact in float32; the instruction rounds to nearest even and
// treats denormals as zero, a difference far below bf16's own precision.
#include <immintrin.h>

#include <cstdint>

#include "skinny_peak.h"
#include "skinny_tile.h"
#include "skinny_avx512_reduce.h"

namespace {

inline __mmask32 tail_mask(int n) { return static_cast<__mmask32>((uint64_t{1} << n) - 1u); }

inline __m512bh as_pairs(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

struct Avx512Bf16Dot {
  using X = uint16_t;
  using W = uint16_t;
  using Acc = __m512;
  using XV = __m512bh;
  using WV = __m512bh;
  static constexpr int kStep = 32;
  static constexpr int kTileInputRows = 4;
  template <int MR>
  static constexpr int weight_rows() { return MR >= 4 ? 4 : 8; }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
  static Acc zero() { return _mm512_setzero_ps(); }
  static WV load_w(const uint16_t* p) { return as_pairs(_mm512_loadu_si512(p)); }
  static WV load_w_tail(const uint16_t* p, int n) { return as_pairs(_mm512_maskz_loadu_epi16(tail_mask(n), p)); }
  static XV load_x(const uint16_t* p) { return load_w(p); }
  static XV load_x_tail(const uint16_t* p, int n) { return load_w_tail(p, n); }
  static Acc fma(Acc acc, WV w, XV x) { return _mm512_dpbf16_ps(acc, w, x); }
  static void reduce4(const Acc* acc, float* out) { reduce4_zmm(acc, out); }
};

}  // namespace

namespace kvlab::skinny {
double avx512bf16_bf16_peak(int64_t iterations) { return multiply_add_flops<Avx512Bf16Dot>(iterations); }
void avx512bf16_bf16(const Problem& p, int64_t n_begin, int64_t n_end) { run<Avx512Bf16Dot>(p, n_begin, n_end); }
}  // namespace kvlab::skinny
