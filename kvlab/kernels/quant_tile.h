// The quantized skinny GEMM's register tiling, written once over an ISA traits type (quant_avx2.cpp,
// quant_avx512.cpp include it inside their own anonymous namespace, as skinny_tile.h is used).
//
// The same dot-product tile as the float skinny GEMM (skinny_tile.h): MR input rows x NR weight rows of
// float32 accumulators. The weights are streamed once in their packed form and dequantized in
// registers, one 32-column block at a time: an int4 block is one 16-byte load, split into low and
// high nibbles, widened to float32 and put through q * scale + offset with the block's group scale;
// then every input row of the tile takes it in MR FMAs. Float32 accumulation throughout, so the
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

// One weight row's block of 32 columns, as the traits' dequantize reads it: the int4 block's 16 bytes
// (always whole: rows are padded to whole blocks), or 32 int8 codes (copied, zero-filled, where the
// row ends inside the block: int8 rows are not padded).
struct RawBlock {
  const uint8_t* bytes;
  uint8_t tail[kBlockColumns];
};

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

template <class T, int MR, int NR, int BITS, bool OFFSETS>
inline void tile(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int kVectors = kBlockColumns / T::kLanes;
  typename T::V acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = T::zero();
  RawBlock raw[NR];
  for (int64_t g = 0; g < p.groups; ++g) {
    // Scalars, broadcast where used (an FMA's memory operand): NR scale and offset vectors would
    // take registers the accumulators need.
    float scale[NR], offset[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      const int64_t at = (n0 + r) * p.groups + g;
      scale[r] = half_to_float(p.scales[at]);
      // int8 is symmetric (offset unused); symmetric int4 stores q + 8.
      offset[r] = OFFSETS ? half_to_float(p.offsets[at]) : (BITS == 4 ? -8.0f * scale[r] : 0.0f);
    }
    const int64_t begin = g * p.group_size;
    const int64_t end = begin + p.group_size < p.K ? begin + p.group_size : p.K;
    for (int64_t c = begin; c < end; c += kBlockColumns) {
      const uint8_t* bytes[NR];
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        bytes[r] = block_bytes<BITS>(p, n0 + r, c, raw[r]);
        // Two blocks ahead in the same row: rows are short (576 columns = 288 int4 bytes), too short
        // for the hardware prefetcher to ramp up on each of the tile's NR streams.
        _mm_prefetch(reinterpret_cast<const char*>(bytes[r]) + 2 * kBlockColumns, _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) {
        typename T::V w[NR];
#pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) w[r] = T::template dequantize<BITS>(bytes[r], v, scale[r], offset[r]);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const typename T::V xv = T::load(p.x + (m0 + m) * p.Kp + c + v * T::kLanes);
#pragma GCC unroll 16
          for (int r = 0; r < NR; ++r) acc[m][r] = T::fma(acc[m][r], w[r], xv);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    float* out = p.y + (m0 + m) * p.N + n0;
    int r = 0;
#pragma GCC unroll 4
    for (; r + 4 <= NR; r += 4) T::reduce4(&acc[m][r], out + r);
    if (r < NR) {  // 1-3 left: the same reduction, padded, so a sum does not depend on the tiling
      typename T::V rest[4];
      float sums[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) rest[j] = acc[m][r + (j < NR - r ? j : 0)];
      T::reduce4(rest, sums);
      for (int j = 0; r + j < NR; ++j) out[r + j] = sums[j];
    }
  }
}

template <class T, int MR, int NB, int BITS, bool OFFSETS>
inline void rows_against_block(const Problem& p, int64_t m0, int64_t n0) {
  constexpr int NR = T::template weight_rows<MR>() < NB ? T::template weight_rows<MR>() : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<T, MR, NR, BITS, OFFSETS>(p, m0, n0 + r);
}

template <class T, int NB, int BITS, bool OFFSETS>
inline void block(const Problem& p, int64_t n0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_against_block<T, 4, NB, BITS, OFFSETS>(p, m, n0);
  if (m + 2 <= p.M) {
    rows_against_block<T, 2, NB, BITS, OFFSETS>(p, m, n0);
    m += 2;
  }
  if (m < p.M) rows_against_block<T, 1, NB, BITS, OFFSETS>(p, m, n0);
}

template <class T, int BITS, bool OFFSETS>
void run_format(const Problem& p, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<T, kBlockRows, BITS, OFFSETS>(p, n);
  for (; n < n_end; ++n) block<T, 1, BITS, OFFSETS>(p, n);
}

template <class T>
void run(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.bits == 8) return run_format<T, 8, false>(p, n_begin, n_end);
  if (p.offsets != nullptr) return run_format<T, 4, true>(p, n_begin, n_end);
  run_format<T, 4, false>(p, n_begin, n_end);
}

}  // namespace
