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

// Row n's bytes as the kernel walks them, and the lanes' mask for a chunk that holds one block only.
template <int BITS>
inline const uint8_t* row_bytes(const Problem& p, int64_t n) {
  return static_cast<const uint8_t*>(p.data) + n * (BITS == 4 ? p.Kp / 2 : p.K);
}

// The weight bytes of a chunk (`keep`: the bytes that belong to the row), as vpdpbusd's unsigned operand.
template <int BITS>
inline __m512i weight_chunk(const uint8_t* src, uint64_t keep) {
  if constexpr (BITS == 4) {
    const __m256i packed = _mm256_maskz_loadu_epi8(static_cast<__mmask32>(keep), src);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const __m256i low = _mm256_and_si256(packed, mask);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  } else {
    // Past K the codes read 0 and become 128; the inputs there are 0, so they add nothing.
    const __m512i codes = _mm512_maskz_loadu_epi8(static_cast<__mmask64>(keep), src);
    return _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
}

// Lanes of block B within a chunk: int4 lanes 4-7 and 12-15 (see the file comment), int8 lanes 8-15.
template <int BITS>
constexpr __mmask16 kBlockBLanes = BITS == 4 ? 0xF0F0 : 0xFF00;

constexpr int kMaxGroups = 64;  // scales held per tile row; more groups take the float path (quant_gemm.cpp)

// ONE_GROUP_PER_CHUNK: every chunk's two blocks share a weight group (group size a multiple of 64, or
// one group per row), so a lane-uniform broadcast scales the chunk; otherwise A's and B's are blended.
template <int MR, int NR, int BITS, bool ONE_GROUP_PER_CHUNK>
inline void tile(const Problem& p, int64_t m0, int64_t n0) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  float scales[NR][kMaxGroups];  // the rows' float16 scales, converted once per tile
#pragma GCC unroll 16
  for (int r = 0; r < NR; ++r) {
    rows[r] = row_bytes<BITS>(p, n0 + r);
    for (int64_t g = 0; g < p.groups; ++g) scales[r][g] = half_to_float(p.scales[(n0 + r) * p.groups + g]);
  }
  constexpr int64_t kChunkBytes = BITS == 4 ? kChunk / 2 : kChunk;
  const int64_t row_length = BITS == 4 ? p.Kp / 2 : p.K;
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t at = c * kChunkBytes;
    const uint64_t keep =
        at + kChunkBytes <= row_length ? ~uint64_t{0} : (uint64_t{1} << (row_length - at)) - 1;
    const int32_t group_a = p.chunk_groups[2 * c], group_b = p.chunk_groups[2 * c + 1];
    __m512i w[NR];
    __m512 scale[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      w[r] = weight_chunk<BITS>(rows[r] + at, keep);
      // The same bytes two row blocks on (see quant_tile.h): far enough ahead to hide the latency.
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + at + 2 * kBlockRows * row_length), _MM_HINT_T0);
      if constexpr (ONE_GROUP_PER_CHUNK) {
        scale[r] = _mm512_set1_ps(scales[r][group_a]);
      } else {
        const float b = group_b >= 0 ? scales[r][group_b] : 0.0f;
        scale[r] = _mm512_mask_blend_ps(kBlockBLanes<BITS>, _mm512_set1_ps(scales[r][group_a]), _mm512_set1_ps(b));
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const int64_t x_at = (m0 + m) * p.chunks + c;
      const __m512i x = _mm512_loadu_si512(p.xq + x_at * kChunk);
      const __m512 x_scale = _mm512_loadu_ps(p.xscale + x_at * 16);
      const __m512i start = BITS == 8 ? _mm512_loadu_si512(p.xcorrection + x_at * 16) : _mm512_setzero_si512();
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        const __m512i dot = _mm512_dpbusd_epi32(start, w[r], x);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(x_scale, scale[r]), acc[m][r]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float sums[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r += 4) reduce_up_to4<Zmm>(&acc[m][r], NR - r < 4 ? NR - r : 4, sums + r);
    float* out = p.y + (m0 + m) * p.N + n0;
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      float offset_sum = 0.0f;
      if (BITS == 4) {
        const float* xsum = p.xsum + (m0 + m) * p.groups;
        const uint16_t* offsets = p.offsets != nullptr ? p.offsets + (n0 + j) * p.groups : nullptr;
        for (int64_t g = 0; g < p.groups; ++g) {
          const float offset = offsets != nullptr ? half_to_float(offsets[g]) : -8.0f * scales[j][g];
          offset_sum += offset * xsum[g];
        }
      }
      out[j] = sums[j] + offset_sum;
    }
  }
}

template <int MR, int NB, int BITS, bool ONE>
inline void rows_against_block(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int kRows = MR >= 4 ? 4 : 8;
  constexpr int NR = kRows < NB ? kRows : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<MR, NR, BITS, ONE>(p, m0, n0 + r);
}

template <int NB, int BITS, bool ONE>
inline void block(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_against_block<4, NB, BITS, ONE>(p, m, n0);
  if (m + 2 <= p.M) {
    rows_against_block<2, NB, BITS, ONE>(p, m, n0);
    m += 2;
  }
  if (m < p.M) rows_against_block<1, NB, BITS, ONE>(p, m, n0);
}

template <int BITS, bool ONE>
void run_format(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<kBlockRows, BITS, ONE>(p, n);
  for (; n < n_end; ++n) block<1, BITS, ONE>(p, n);
}

template <int BITS>
void run_bits(const Problem& p, int64_t n_begin, int64_t n_end) {
  const bool one_group_per_chunk = p.groups == 1 || p.group_size % kChunk == 0;
  one_group_per_chunk ? run_format<BITS, true>(p, n_begin, n_end) : run_format<BITS, false>(p, n_begin, n_end);
}

}  // namespace

namespace kvlab::quant {
void avx512vnni(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.bits == 8) return run_bits<8>(p, n_begin, n_end);
  run_bits<4>(p, n_begin, n_end);
}
}  // namespace kvlab::quant
