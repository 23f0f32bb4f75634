// Quantized skinny GEMM on 16-bit integer dot products (AVX512-VNNI vpdpwssd: 32 int16 x int16
// products summed two at a time into 16 int32 lanes, one instruction). Each input row is rounded to
// int16 once per call, with one scale per span of columns (below), so the weights never become floats:
// an int8 code widens to int16 with one vpmovsxbw per 32 weights, an int4 byte pair's nibbles with a
// vpmovzxbw, one and and one shift per 64, and one instruction multiplies and adds 32 of them. The float
// variants (quant_tile.h) convert every weight to float32 and spend 3-4 instructions per 16 weights.
// On two cores of a Zen 4 EPYC, with the weights in cache, this kernel ran 1.6-1.9x faster than the
// float AVX-512 one (int8 83-101 vs 52-56 G weights/s); streaming from memory it ran int4-g128
// faster (a SmolLM2 decode step 3.6 vs 4.3 ms) but int8 3-10% slower, so the calibration
// (calibrate.measure_quant) chooses per format.
//
// Why 16 bits for the inputs (llama.cpp and the avx512vnni variant round them to 8): the rounding error
// of x is then at most absmax / 65,534 of its span, about 2^-8 of int8's: products stay within ~1e-4
// of the exact ones (int8 inputs: ~1e-2), below any weight format's own error. The int32 sums cannot
// overflow: |x code| <= 32,767 and |q| <= 127 make a product at most 4.2e6, and a lane adds at most 16
// of them per span of 256 columns.
//
// A span is a run of columns inside one weight group that shares one input scale: the group itself when
// it has at most 256 columns (int4-g128: the weight's and the input's scales fold into one multiply per
// group), else 256 columns (per-channel int8). Per span the int32 lanes become float32 once, scaled by
// weight scale x input scale (one FMA per tile accumulator per span). int4 codes count as q - 8, as the
// float variants centre them, by taking 8 x the inputs' sums off the lanes in exact integers; offsets
// (asymmetric int4) take the rounded inputs' per-group sums. The result is the product of the
// dequantized weights and the rounded inputs up to float32 summation (the tests' reference). int4
// with groups of 32 (a 64-column vector would straddle two groups) takes the float AVX-512 variant.
#include <immintrin.h>

#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "quant_variants.h"
#include "skinny_avx512_reduce.h"

namespace {

using kvlab::quant::kBlockRows;
using kvlab::quant::Problem;

inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

constexpr int64_t kMaxSpan = 256;

// Columns per vector step: 32 int8 codes (one zmm of int16), or 32 int4 bytes = 64 columns (two).
template <int BITS>
constexpr int64_t kStep = BITS == 4 ? 64 : 32;

// The inputs as the kernel multiplies them: per row, int16 codes over whole steps (zero past K), and
// per span the scale that turns a code back into x. int4 steps hold their 64 columns in the order the
// nibbles unpack (see weight_vectors): block A's 0-15, block B's 0-15, then A's 16-31, B's 16-31.
struct Inputs {
  std::vector<int16_t> codes;
  std::vector<float> scales;
  std::vector<float> group_sums;  // int4: (M, groups) the rounded inputs' sum over each group
  std::vector<int32_t> centre;    // int4: (M, spans, 16) 8 x each lane's sum of codes (see tile)
  int64_t row_codes = 0, spans = 0, span = 0;
};

// Where column k's code sits in its row (k a multiple of 16: the 16 columns from k stay together).
template <int BITS>
int64_t input_position(int64_t k) {
  if constexpr (BITS == 8) {
    return k;
  } else {
    const int64_t j = k % 32, block = (k % 64) / 32;
    return k / 64 * 64 + (j < 16 ? 0 : 32) + block * 16;
  }
}

// Per span: scale = absmax / 32,767, code = x / scale rounded to nearest even (vcvtps2dq), 16 at a
// time. x is zero-padded to whole 32-column blocks (Problem::x), and spans are whole blocks but for
// the last, which may end at K inside one: its vectors run on to Kp and read zeros there.
template <int BITS>
void quantize_inputs(const Problem& p, int64_t span, Inputs& in) {
  in.span = span;
  in.spans = (p.K + span - 1) / span;
  in.row_codes = (p.K + kStep<BITS> - 1) / kStep<BITS> * kStep<BITS>;
  in.codes.assign(p.M * in.row_codes, 0);
  in.scales.resize(p.M * in.spans);
  if (BITS == 4) {
    in.group_sums.assign(p.M * p.groups, 0.0f);
    in.centre.resize(p.M * in.spans * 16);
  }
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.Kp;
    int16_t* codes = in.codes.data() + m * in.row_codes;
    for (int64_t s = 0; s < in.spans; ++s) {
      const int64_t begin = s * span, end = std::min(p.Kp, begin + span);
      // x * 0 is NaN exactly where x is inf or NaN (max_ps would drop a NaN): such a span's scale is
      // NaN, so the row's outputs are too, as the float variants' would be.
      __m512 high = _mm512_setzero_ps(), finite = _mm512_setzero_ps();
      for (int64_t k = begin; k < end; k += 16) {
        const __m512 v = _mm512_loadu_ps(x + k);
        high = _mm512_max_ps(high, _mm512_abs_ps(v));
        finite = _mm512_add_ps(finite, _mm512_mul_ps(v, _mm512_setzero_ps()));
      }
      const bool ok = _mm512_reduce_add_ps(finite) == 0.0f;
      const float absmax = _mm512_reduce_max_ps(high);
      const __m512 inverse = _mm512_set1_ps(ok && absmax > 0.0f ? 32767.0f / absmax : 0.0f);
      const float scale = ok ? absmax / 32767.0f : std::numeric_limits<float>::quiet_NaN();
      in.scales[m * in.spans + s] = scale;
      for (int64_t k = begin; k < end; k += 16) {
        const __m512i code = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inverse));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + input_position<BITS>(k)), _mm512_cvtsepi32_epi16(code));
      }
      if constexpr (BITS == 4) {
        // The lanes vpdpwssd adds each code pair into (words 2i and 2i + 1 of both vectors of a step),
        // over whole steps: a step's codes are in nibble order (input_position).
        __m512i lanes = _mm512_setzero_si512();
        for (int64_t k = begin; k < std::min(in.row_codes, begin + span); k += 32)
          lanes = _mm512_add_epi32(lanes, _mm512_madd_epi16(_mm512_loadu_si512(codes + k), _mm512_set1_epi16(1)));
        _mm512_storeu_si512(in.centre.data() + (m * in.spans + s) * 16, _mm512_slli_epi32(lanes, 3));
        in.group_sums[m * p.groups + begin / p.group_size] += scale * static_cast<float>(_mm512_reduce_add_epi32(lanes));
      }
    }
  }
}

// What a tile reads of the rounded inputs: plain pointers, so the inner loop holds them in registers.
struct InputsView {
  const int16_t* codes;
  const float* scales;
  const float* group_sums;
  const int32_t* centre;
  int64_t row_codes, spans, span;
};

// 32 weight bytes of a row as int16 vectors. int8: 32 codes, sign-extended. int4: two 32-column blocks
// A, B; byte j of a block holds column j (low nibble) and j + 16 (high). Zero-extended to words, the
// low nibbles are A 0-15 then B 0-15, the high ones (a shift, no mask: the upper byte is zero) A 16-31,
// B 16-31. `keep`: the bytes that belong to the row (all but at a row's last step).
template <int BITS, bool MASKED>
inline void weight_vectors(const uint8_t* src, uint32_t keep, __m512i& first, __m512i& second) {
  const __m256i bytes = MASKED ? _mm256_maskz_loadu_epi8(keep, src) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  if constexpr (BITS == 8) {
    first = _mm512_cvtepi8_epi16(bytes);
  } else {
    const __m512i words = _mm512_cvtepu8_epi16(bytes);
    first = _mm512_and_si512(words, _mm512_set1_epi16(0x0F));
    second = _mm512_srli_epi16(words, 4);
  }
}

// dot[m][r] += the int16 products of steps [c_begin, c_end) (kStep columns each, 32 weight bytes).
template <int MR, int NR, int BITS, bool MASKED>
inline void accumulate(const uint8_t* const* rows, const char*& ahead, const int16_t* x, int64_t row_codes, int64_t c_begin,
                       int64_t c_end, uint32_t keep, __m512i (&dot)[MR][NR]) {
  for (int64_t c = c_begin; c < c_end; c += kStep<BITS>) {
    const int64_t at = BITS == 4 ? c / 2 : c;
    __m512i first[NR], second[NR];
    // The tile's rows two row blocks on, into L2, in address order at the rate this loop reads
    // (quant_tile.h and skinny_tile.h say why: one stream the prefetcher can follow).
#pragma GCC unroll 8
    for (int line = 0; line < NR / 2; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
    ahead += NR * 32;
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) weight_vectors<BITS, MASKED>(rows[r] + at, keep, first[r], second[r]);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const int16_t* xm = x + m * row_codes + c;
      const __m512i x_first = _mm512_loadu_si512(xm);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_dpwssd_epi32(dot[m][r], first[r], x_first);
      if constexpr (BITS == 4) {
        const __m512i x_second = _mm512_loadu_si512(xm + 32);
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_dpwssd_epi32(dot[m][r], second[r], x_second);
      }
    }
  }
}

template <int MR, int NR, int BITS>
inline void tile(const Problem& p, const InputsView in, int64_t m0, int64_t n0) {
  __m512 total[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) total[m][r] = _mm512_setzero_ps();
  float offset_sum[MR][NR] = {};
  const int64_t row_bytes = BITS == 4 ? p.Kp / 2 : p.K;
  const uint8_t* rows[NR];
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) rows[r] = static_cast<const uint8_t*>(p.data) + (n0 + r) * row_bytes;
  const char* ahead = reinterpret_cast<const char*>(rows[0] + 2 * kBlockRows * row_bytes);
  // Steps that read 32 whole bytes of every row; the row's last step may read fewer (masked).
  const int64_t whole_end = (BITS == 4 ? 2 * row_bytes : row_bytes) / kStep<BITS> * kStep<BITS>;
  const int64_t tail_bytes = row_bytes - (BITS == 4 ? whole_end / 2 : whole_end);
  const int16_t* x = in.codes + m0 * in.row_codes;
  for (int64_t s = 0; s < in.spans; ++s) {
    const int64_t begin = s * in.span, end = std::min(p.K, begin + in.span);
    __m512i dot[MR][NR];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) dot[m][r] = _mm512_setzero_si512();
    const int64_t span_whole_end = std::min(end, whole_end);
    accumulate<MR, NR, BITS, false>(rows, ahead, x, in.row_codes, begin, span_whole_end, ~uint32_t{0}, dot);
    if (end > whole_end && tail_bytes > 0)
      accumulate<MR, NR, BITS, true>(rows, ahead, x, in.row_codes, whole_end, whole_end + 1,
                                     (uint32_t{1} << tail_bytes) - 1, dot);
    const int64_t g = begin / p.group_size;
    const bool group_ends = end == p.K || end % p.group_size == 0;
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const float scale = half_to_float(p.scales[(n0 + r) * p.groups + g]);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const int64_t at = (m0 + m) * in.spans + s;
        // int4 codes are stored unsigned (q in 0..15); the products count them as q - 8 by taking 8 x
        // the inputs' sum off each lane, in exact integers: the sum is then centred as the float
        // variants' (quant_tile.h), with no large term for the offset to cancel in float32.
        __m512i centred = dot[m][r];
        if constexpr (BITS == 4) centred = _mm512_sub_epi32(centred, _mm512_loadu_si512(in.centre + at * 16));
        const __m512 both = _mm512_set1_ps(scale * in.scales[at]);
        total[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), both, total[m][r]);
      }
      // w = (q - 8) * scale + (offset + 8 * scale); symmetric int4 has offset -8 * scale: nothing to
      // add. Once per group, at its last span.
      if (BITS == 4 && p.offsets != nullptr && group_ends) {
        const float offset = half_to_float(p.offsets[(n0 + r) * p.groups + g]) + 8.0f * scale;
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) offset_sum[m][r] += offset * in.group_sums[(m0 + m) * p.groups + g];
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float sums[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r += 4) reduce_up_to4<Zmm>(&total[m][r], NR - r < 4 ? NR - r : 4, sums + r);
    float* out = p.y + (m0 + m) * p.N + n0;
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) out[j] = sums[j] + offset_sum[m][j];
  }
}

template <int MR, int NB, int BITS>
inline void rows_against_block(const Problem& p, const InputsView in, int64_t m0, int64_t n0) {
  constexpr int kRows = MR >= 4 ? 4 : 8;
  constexpr int NR = kRows < NB ? kRows : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<MR, NR, BITS>(p, in, m0, n0 + r);
}

template <int NB, int BITS>
inline void block(const Problem& p, const InputsView in, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_against_block<4, NB, BITS>(p, in, m, n0);
  if (m + 2 <= p.M) {
    rows_against_block<2, NB, BITS>(p, in, m, n0);
    m += 2;
  }
  if (m < p.M) rows_against_block<1, NB, BITS>(p, in, m, n0);
}

template <int BITS>
void run_bits(const Problem& p, int64_t n_begin, int64_t n_end) {
  // Every thread rounds the few input rows itself (M x K values against its N_share x K weights):
  // cheaper than a barrier, and the op and the fused decode step both hand over float inputs.
  thread_local Inputs in;
  const int64_t span = p.groups == 1 ? kMaxSpan : std::gcd(p.group_size, kMaxSpan);
  quantize_inputs<BITS>(p, span, in);
  const InputsView view{in.codes.data(), in.scales.data(), in.group_sums.data(), in.centre.data(),
                        in.row_codes,   in.spans,         in.span};
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<kBlockRows, BITS>(p, view, n);
  for (; n < n_end; ++n) block<1, BITS>(p, view, n);
}

}  // namespace

namespace kvlab::quant {
void avx512vnni_x16(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.bits == 8) return run_bits<8>(p, n_begin, n_end);
  if (p.groups > 1 && p.group_size % 64 != 0) return avx512(p, n_begin, n_end);
  run_bits<4>(p, n_begin, n_end);
}
}  // namespace kvlab::quant
