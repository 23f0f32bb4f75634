// Quantized skinny GEMM on integer dot products (AVX512-VNNI vpdpbusd: 64 byte products summed four at
// a time into 16 int32 lanes, one instruction). The input rows are quantized to int8 once per call, per
// 32-column block with their own scale (the activation format llama.cpp pairs with its Q4 / Q8 weight
// blocks), so one instruction multiplies 64 weights where the float path needs four to eight: the
// weights stream at the memory's speed with arithmetic to spare. Each 64-column chunk (two blocks, A and
// B) of a weight row is one zmm of unsigned bytes:
//   int4: 32 packed bytes -> low nibbles (A 0-15, B 0-15) | high nibbles (A 16-31, B 16-31);
//   int8: 64 codes + 128 (unsigned), the +128 undone by the lane's precomputed -128 * sum(x codes).
// The op (quant_gemm.cpp) lays the input bytes out in the same order, so lanes 0-3 and 8-11 hold block
// A's products for int4 (0-7 for int8) and the rest block B's; a lane's int32 sum is scaled by its
// block's input scale times its group's weight scale in one FMA. Offsets (q * scale + offset) take the
// per-group sums of the quantized inputs, as in the float path (quant_tile.h).
#include <immintrin.h>

#include <cstdint>

#include "quant_variants.h"
#include "skinny_avx512_reduce.h"

namespace {

using kvlab::quant::kBlockColumns;
using kvlab::quant::kBlockRows;
using kvlab::quant::Problem;

constexpr int64_t kChunk = 2 * kBlockColumns;

inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

// The weight bytes of chunk c of row n, as vpdpbusd's unsigned operand.
template <int BITS>
inline __m512i weight_chunk(const Problem& p, int64_t n, int64_t c) {
  const auto* base = static_cast<const uint8_t*>(p.data);
  if constexpr (BITS == 4) {
    const int64_t row_bytes = p.Kp / 2, at = c * (kChunk / 2);
    const uint8_t* src = base + n * row_bytes + at;
    // The last chunk may hold one block only (Kp / 32 odd): read its 16 bytes, not the next row's.
    const __mmask32 keep = at + 32 <= row_bytes ? ~__mmask32{0} : __mmask32{0xFFFF};
    const __m256i packed = _mm256_maskz_loadu_epi8(keep, src);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i low = _mm256_and_si256(packed, mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  } else {
    const int64_t at = c * kChunk;
    const __mmask64 keep = at + kChunk <= p.K ? ~__mmask64{0} : (__mmask64{1} << (p.K - at)) - 1;
    const __m512i codes = _mm512_maskz_loadu_epi8(keep, base + n * p.K + at);
    // Past K the codes read 0 and become 128; the inputs there are 0, so they add nothing.
    return _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
}

// Lanes of block B within a chunk: int4 lanes 4-7 and 12-15 (see the file comment), int8 lanes 8-15.
template <int BITS>
constexpr __mmask16 kBlockBLanes = BITS == 4 ? 0xF0F0 : 0xFF00;

// Each lane's weight scale for chunk c of row n: block A's group scale or block B's.
template <int BITS>
inline __m512 weight_scales(const Problem& p, int64_t n, int64_t c) {
  const int64_t column = c * kChunk;
  const uint16_t* scales = p.scales + n * p.groups;
  const float a = half_to_float(scales[column / p.group_size]);
  const int64_t b_column = column + kBlockColumns;
  const float b = b_column < p.K ? half_to_float(scales[b_column / p.group_size]) : 0.0f;
  return _mm512_mask_blend_ps(kBlockBLanes<BITS>, _mm512_set1_ps(a), _mm512_set1_ps(b));
}

template <int MR, int NR, int BITS>
inline void tile(const Problem& p, int64_t m0, int64_t n0) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t c = 0; c < p.chunks; ++c) {
    __m512i w[NR];
    __m512 scale[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      w[r] = weight_chunk<BITS>(p, n0 + r, c);
      scale[r] = weight_scales<BITS>(p, n0 + r, c);
      const auto* next = static_cast<const uint8_t*>(p.data) + (n0 + r) * (BITS == 4 ? p.Kp / 2 : p.K) +
                         (c + 2) * (BITS == 4 ? kChunk / 2 : kChunk);
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T0);
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const int64_t at = (m0 + m) * p.chunks + c;
      const __m512i x = _mm512_loadu_si512(p.xq + at * kChunk);
      const __m512 x_scale = _mm512_loadu_ps(p.xscale + at * 16);
      const __m512i start = BITS == 8 ? _mm512_loadu_si512(p.xcorrection + at * 16) : _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, w[r], x);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(x_scale, scale[r]), acc[m][r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float sums[NR + 3];
    int r = 0;
#pragma GCC unroll 4
    for (; r + 4 <= NR; r += 4) reduce4_zmm(&acc[m][r], sums + r);
    if (r < NR) {  // 1-3 left: the same reduction, padded, so a sum does not depend on the tiling
      __m512 rest[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) rest[j] = acc[m][r + (j < NR - r ? j : 0)];
      reduce4_zmm(rest, sums + r);
    }
    float* out = p.y + (m0 + m) * p.N + n0;
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      float offset_sum = 0.0f;
      if (BITS == 4) {
        const int64_t at = (n0 + j) * p.groups;
        for (int64_t g = 0; g < p.groups; ++g) {
          const float scale = half_to_float(p.scales[at + g]);
          const float offset = p.offsets != nullptr ? half_to_float(p.offsets[at + g]) : -8.0f * scale;
          offset_sum += offset * p.xsum[(m0 + m) * p.groups + g];
        }
      }
      out[j] = sums[j] + offset_sum;
    }
  }
}

template <int MR, int NB, int BITS>
inline void rows_against_block(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int kRows = MR >= 4 ? 4 : 8;
  constexpr int NR = kRows < NB ? kRows : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<MR, NR, BITS>(p, m0, n0 + r);
}

template <int NB, int BITS>
inline void block(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_against_block<4, NB, BITS>(p, m, n0);
  if (m + 2 <= p.M) {
    rows_against_block<2, NB, BITS>(p, m, n0);
    m += 2;
  }
  if (m < p.M) rows_against_block<1, NB, BITS>(p, m, n0);
}

template <int BITS>
void run_format(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<kBlockRows, BITS>(p, n);
  for (; n < n_end; ++n) block<1, BITS>(p, n);
}

}  // namespace

namespace kvlab::quant {
void avx512vnni(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.bits == 8) return run_format<8>(p, n_begin, n_end);
  run_format<4>(p, n_begin, n_end);
}
}  // namespace kvlab::quant
