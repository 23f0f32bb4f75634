// The quantized skinny GEMM's register tiling, written once over an ISA traits type (quant_avx2.cpp,
// quant_avx512.cpp include it inside their own anonymous namespace, as skinny_tile.h is used).
//
// The same dot-product tile as the float skinny GEMM (skinny_tile.h): MR input rows x NR weight rows of
// float32 accumulators. The weights are streamed once in their packed form and dequantized in
// registers, one 32-column block at a time: an int4 block is one 16-byte load, split into low and
// high nibbles and widened to float32; every input row of the tile takes it in MR FMAs, and the
// group's scale and offset are applied once per group (below), not per weight. Float32 accumulation throughout, so the
// result differs from the dequantized float32 matmul only by summation order.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_variants.h"
#include "reduce4.h"

namespace {

using kvlab::quant::kBlockColumns;
using kvlab::quant::kBlockRows;
using kvlab::quant::Problem;

inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

// Room for an int8 row's last, partial block of 32 codes, copied and zero-filled (int8 rows are not
// padded; int4 rows are, so their blocks are always read in place).
struct RawBlock {
  uint8_t tail[kBlockColumns];
};

template <int BITS>
inline int64_t row_stride(const Problem& p) {
  return BITS == 4 ? p.Kp / 2 : p.K;
}

template <int BITS>
inline const uint8_t* block_bytes(const Problem& p, int64_t row, int64_t column, RawBlock& raw) {
  const auto* base = static_cast<const uint8_t*>(p.data);
  if constexpr (BITS == 4) {
    return base + row * (p.Kp / 2) + column / 2;
  } else {
    const uint8_t* start = base + row * p.K + column;
    if (column + kBlockColumns <= p.K) return start;
    std::memset(raw.tail, 0, sizeof raw.tail);
    std::memcpy(raw.tail, start, p.K - column);
    return raw.tail;
  }
}

// The scales stay out of the inner loop: per group, x . q accumulates over the raw codes, and
//   sum_k x_k w_k = sum_g scale_g * (x . q)_g + offset_g * (sum of x over group g)
// (the second sum is the op's per-group input sums, Problem::xsum). With one group per row (per
// channel) the scale multiplies the finished sum once; with several, each group's partial sums are
// folded in with one FMA, and the tile holds twice the accumulators (GROUPED halves its weight rows).
template <class T, int MR, int NR, int BITS, bool GROUPED>
inline void tile(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int kVectors = kBlockColumns / T::kLanes;
  typename T::V total[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) total[m][r] = T::zero();
  float offset_sum[MR][NR] = {};
  // Codes read centred on their zero need no offset term when none is stored, which saves a scalar
  // multiply-add per group, row and input row: int8 (always symmetric), and symmetric int4 (q + 8
  // stored) where the traits read it as q - 8 (T::kInt4Zero == 8).
  const bool centred = p.offsets == nullptr && (BITS == 8 || T::kInt4Zero == 8);
  RawBlock raw[NR];
  const char* ahead = reinterpret_cast<const char*>(p.data) + (n0 + 2 * kBlockRows) * row_stride<BITS>(p);
  for (int64_t g = 0; g < p.groups; ++g) {
    typename T::V part_storage[GROUPED ? MR : 1][GROUPED ? NR : 1];
    auto& part = [&]() -> auto& {
      if constexpr (GROUPED) return part_storage;
      else return total;
    }();
    if constexpr (GROUPED) {
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) part[m][r] = T::zero();
    }
    const int64_t begin = g * p.group_size;
    const int64_t end = begin + p.group_size < p.K ? begin + p.group_size : p.K;
    for (int64_t c = begin; c < end; c += kBlockColumns) {
      const uint8_t* bytes[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) bytes[r] = block_bytes<BITS>(p, n0 + r, c, raw[r]);
      // The tile's rows two row blocks on, into L2, in address order, as skinny_tile.h does (its
      // prefetch_step says why). One request per row at the same column instead: over SmolLM2's
      // matrices, alternated in one process on a 2-core Sapphire Rapids VM, decode steps 6% (int8)
      // and 10% (int4-g128) longer by the median of 14 generations each; the op streamed 4-17% less.
      constexpr int kStepBytes = NR * kBlockColumns * BITS / 8;
#pragma GCC unroll 8
      for (int line = 0; line < (kStepBytes + 63) / 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
      ahead += kStepBytes;
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        typename T::V q[NR];
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) q[r] = T::template codes<BITS>(bytes[r], v);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const typename T::V xv = T::load(p.x + (m0 + m) * p.Kp + c + v * T::kLanes);
#pragma GCC unroll 16
          for (int r = 0; r < NR; ++r) part[m][r] = T::fma(part[m][r], q[r], xv);
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * p.groups + g;
      const float scale = half_to_float(p.scales[at]);
      if constexpr (GROUPED) {
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) total[m][r] = T::fma(total[m][r], part[m][r], T::set1(scale));
      }
      if (centred) continue;
      // int4 only from here (int8 is centred): symmetric int4 stores q + 8, so its offset is -8 * scale;
      // codes read as q - kInt4Zero carry kInt4Zero * scale of it.
      const float offset = (p.offsets != nullptr ? half_to_float(p.offsets[at]) : -8.0f * scale) + T::kInt4Zero * scale;
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) offset_sum[m][r] += offset * p.xsum[(m0 + m) * p.groups + g];
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float sums[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; r += 4) reduce_up_to4<T>(&total[m][r], NR - r < 4 ? NR - r : 4, sums + r);
    float* out = p.y + (m0 + m) * p.N + n0;
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) {
      const float scaled = GROUPED ? sums[j] : sums[j] * half_to_float(p.scales[(n0 + j) * p.groups]);
      out[j] = scaled + offset_sum[m][j];
    }
  }
}

template <class T, int MR, int NB, int BITS, bool GROUPED>
inline void rows_against_block(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int kRows = T::template weight_rows<MR>() / (GROUPED && MR > 1 ? 2 : 1);
  constexpr int NR = kRows < NB ? kRows : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<T, MR, NR, BITS, GROUPED>(p, m0, n0 + r);
}

template <class T, int NB, int BITS, bool GROUPED>
inline void block(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_against_block<T, 4, NB, BITS, GROUPED>(p, m, n0);
  if (m + 2 <= p.M) {
    rows_against_block<T, 2, NB, BITS, GROUPED>(p, m, n0);
    m += 2;
  }
  if (m < p.M) rows_against_block<T, 1, NB, BITS, GROUPED>(p, m, n0);
}

template <class T, int BITS, bool GROUPED>
void run_format(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<T, kBlockRows, BITS, GROUPED>(p, n);
  for (; n < n_end; ++n) block<T, 1, BITS, GROUPED>(p, n);
}

template <class T>
void run(const Problem& p, int64_t n_begin, int64_t n_end) {
  const bool grouped = p.groups > 1;
  if (p.bits == 8) return grouped ? run_format<T, 8, true>(p, n_begin, n_end) : run_format<T, 8, false>(p, n_begin, n_end);
  grouped ? run_format<T, 4, true>(p, n_begin, n_end) : run_format<T, 4, false>(p, n_begin, n_end);
}

}  // namespace
