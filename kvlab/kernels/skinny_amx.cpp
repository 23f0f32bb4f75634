// Skinny GEMM for bfloat16 weights with Intel AMX (AMX-TILE + AMX-BF16, Sapphire Rapids and later).
// TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 bf16 tile into 16 x 16 float32 in one
// instruction (Intel 64 and IA-32 Architectures Software Developer's Manual, "TDPBF16PS"): 8192
// multiply-adds, 256 times a vdpbf16ps. At 1 input row the vector kernel already streams the weights
// as fast as memory allows; at 8-32 rows its FMAs become the bound, and AMX keeps those rows
// memory-bound too.
//
// Which product goes in which tile: TDPBF16PS wants its first operand (A) as plain rows and its
// second (B) in "VNNI" pair layout, B[k/2][2 n + k%2] (Intel Architecture Instruction Set Extensions
// Programming Reference, chapter "Intel AMX"). Computed as y^T = W x^T, the weights are A and load
// straight from their (N, K) layout with the row stride K * 2 bytes: 16 weight rows x 32 k per tile,
// no repacking. The input rows are B: B[kp][2 m + j] = x[m][2 kp + j], i.e. the 32-bit bf16 pairs of
// x transposed, packed once per call. C[n][m] is then y[m][n], written back transposed.
//
// Per 32-wide step along K, up to two A tiles (32 weight rows) meet up to two B tiles (32 input
// rows), into up to four C tiles: the 8 tiles of palette 1. What AMX cannot take -- a K that is not
// a multiple of 32 (the last tile would read past the weight row's end), and fewer than 16 weight
// rows left in [n_begin, n_end) -- goes to the AVX512-BF16 kernel, which reads the same bf16 inputs.
//
// Each call configures the tiles itself and releases them at the end (TILERELEASE): the kernel is
// also called from inside the fused decode step's OpenMP region, and released tiles are back in
// their initial state, so the kernel saves no tile data on a context switch.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "skinny_variants.h"

namespace {

using kvlab::skinny::Problem;

constexpr int kStep = 32;       // bf16 per tile row (64 bytes), the K of one TDPBF16PS
constexpr int kTileRows = 16;   // rows of every tile here; also the input rows of one B tile
constexpr int kTileWords = kTileRows * kTileRows;  // 32-bit words in a 16 x 64-byte tile
constexpr int kMaxInputRows = 2 * kTileRows;       // input rows per pass over the weights

// Tile numbers, written as literals below because gcc's tile intrinsics paste them into the asm
// text: tmm4/tmm5 are A0/A1 (weight rows n..n+15 / n+16..n+31), tmm6/tmm7 are B0/B1 (input rows
// 0..15 / 16..31 of the pass), and C = A x B accumulates in tmm0 (A0 B0), tmm1 (A1 B0), tmm2 (A0 B1)
// and tmm3 (A1 B1).

// The 64-byte operand of LDTILECFG, palette 1 (Intel SDM, "LDTILECFG"): per tile its rows and bytes
// per row. Tiles left at zero are unconfigured, and using one faults.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The weight rows are fetched into L2 this many rows (one 32-row group) ahead of the tile loads. A
// tile load touches 16 rows at once, each moving on by one cache line per step, too many short
// streams for the hardware prefetcher to follow from one row's start (as skinny_tile.h found for the
// vector kernels). Over SmolLM2-135M's matrices on a 2-core Sapphire Rapids VM, 32 rows ahead beat
// none by 3-15% (1, 16 and 32 input rows); 16, 48, 64 or 128 rows ahead were no better.
constexpr int64_t kPrefetchRows = 32;

void configure(int rows0, int rows1) {
  TileConfig config;
  std::memset(&config, 0, sizeof(config));
  config.palette = 1;
  const auto set = [&](int tile, int colsb) {
    config.rows[tile] = kTileRows;
    config.colsb[tile] = static_cast<uint16_t>(colsb);
  };
  set(4, kStep * 2);
  set(5, kStep * 2);
  set(6, rows0 * 4);  // one 32-bit bf16 pair per input row
  set(0, rows0 * 4);
  set(1, rows0 * 4);
  if (rows1 > 0) {
    set(7, rows1 * 4);
    set(2, rows1 * 4);
    set(3, rows1 * 4);
  }
  _tile_loadconfig(&config);
}

// This thread's packed input rows: per step, one 16 x 16-word B tile per 16 input rows.
struct Packed {
  std::unique_ptr<uint32_t[]> storage;
  int64_t capacity = 0;
  uint32_t* data = nullptr;  // 64-byte aligned inside storage

  uint32_t* reserve(int64_t words) {
    if (words > capacity) {
      storage.reset(new uint32_t[words + 16]);
      capacity = words;
      const auto address = reinterpret_cast<uintptr_t>(storage.get());
      data = reinterpret_cast<uint32_t*>((address + 63) & ~uintptr_t{63});
    }
    return data;
  }
};

// B for input rows [m0, m0 + rows): tile (s, b) holds, in its row kp, the pair x[m0 + 16 b + j][32 s
// + 2 kp, +1] as word j. Rows past `rows` are left unwritten: the tile's colsb stops before them.
void pack(const uint16_t* x, int64_t K, int64_t m0, int rows, uint32_t* packed) {
  const int64_t steps = K / kStep;
  for (int m = 0; m < rows; ++m) {
    uint32_t row_pairs[kTileRows];
    const uint16_t* row = x + (m0 + m) * K;
    uint32_t* tile_column = packed + (m / kTileRows) * kTileWords + m % kTileRows;
    for (int64_t s = 0; s < steps; ++s) {
      std::memcpy(row_pairs, row + s * kStep, sizeof(row_pairs));
      uint32_t* out = tile_column + s * 2 * kTileWords;
#pragma GCC unroll 16
      for (int kp = 0; kp < kTileRows; ++kp) out[kp * kTileRows] = row_pairs[kp];
    }
  }
}

// C (16 weight rows x `rows` input rows, as stored by TILESTORED) into y's rows [m0, m0 + rows) at
// the columns [n, n + 16).
inline void write_back(const float* c, float* y, int64_t N, int64_t m0, int rows, int64_t n) {
  for (int m = 0; m < rows; ++m) {
    float* out = y + (m0 + m) * N + n;
#pragma GCC unroll 16
    for (int r = 0; r < kTileRows; ++r) out[r] = c[r * kTileRows + m];
  }
}

// 16 * kA weight rows from w against the packed input rows (B0, and B1 when kTwoB), all of K.
template <int kA, bool kTwoB>
inline void weight_rows(const uint16_t* w, int64_t K, const uint32_t* packed, float* y, int64_t N,
                        int64_t m0, int rows0, int rows1, int64_t n, const uint16_t* w_end) {
  _tile_zero(0);
  if constexpr (kA == 2) _tile_zero(1);
  if constexpr (kTwoB) {
    _tile_zero(2);
    if constexpr (kA == 2) _tile_zero(3);
  }
  const int64_t stride = K * 2;
  const int64_t steps = K / kStep;
  const uint16_t* ahead = w + kPrefetchRows * K;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t k = s * kStep;
    const uint32_t* b = packed + s * 2 * kTileWords;
    if (ahead < w_end) {
#pragma GCC unroll 32
      for (int r = 0; r < kA * kTileRows; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * K + k), _MM_HINT_T1);
    }
    _tile_loadd(4, w + k, stride);
    if constexpr (kA == 2) _tile_loadd(5, w + kTileRows * K + k, stride);
    _tile_loadd(6, b, kTileRows * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kA == 2) _tile_dpbf16ps(1, 5, 6);
    if constexpr (kTwoB) {
      _tile_loadd(7, b + kTileWords, kTileRows * 4);
      _tile_dpbf16ps(2, 4, 7);
      if constexpr (kA == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float c[kTileWords];
  _tile_stored(0, c, kTileRows * 4);
  write_back(c, y, N, m0, rows0, n);
  if constexpr (kA == 2) {
    _tile_stored(1, c, kTileRows * 4);
    write_back(c, y, N, m0, rows0, n + kTileRows);
  }
  if constexpr (kTwoB) {
    _tile_stored(2, c, kTileRows * 4);
    write_back(c, y, N, m0 + kTileRows, rows1, n);
    if constexpr (kA == 2) {
      _tile_stored(3, c, kTileRows * 4);
      write_back(c, y, N, m0 + kTileRows, rows1, n + kTileRows);
    }
  }
}

// Weight rows [n_begin, n_end) in whole 16-row tiles against input rows [m0, m0 + rows0 + rows1);
// returns where the whole tiles end.
template <bool kTwoB>
int64_t pass(const Problem& p, const uint32_t* packed, int64_t m0, int rows0, int rows1, int64_t n_begin,
             int64_t n_end) {
  const auto* w = static_cast<const uint16_t*>(p.w);
  const uint16_t* w_end = w + n_end * p.K;
  int64_t n = n_begin;
  for (; n + 2 * kTileRows <= n_end; n += 2 * kTileRows)
    weight_rows<2, kTwoB>(w + n * p.K, p.K, packed, p.y, p.N, m0, rows0, rows1, n, w_end);
  if (n + kTileRows <= n_end) {
    weight_rows<1, kTwoB>(w + n * p.K, p.K, packed, p.y, p.N, m0, rows0, rows1, n, w_end);
    n += kTileRows;
  }
  return n;
}

}  // namespace

namespace kvlab::skinny {

void amx_bf16(const Problem& p, int64_t n_begin, int64_t n_end) {
  if (p.K % kStep != 0 || n_end - n_begin < kTileRows) {
    avx512bf16_bf16(p, n_begin, n_end);
    return;
  }
  thread_local Packed packed;
  const auto* x = static_cast<const uint16_t*>(p.x);
  uint32_t* b = packed.reserve(p.K / kStep * 2 * kTileWords);
  int64_t tiled_end = n_begin;
  for (int64_t m0 = 0; m0 < p.M; m0 += kMaxInputRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxInputRows, p.M - m0));
    const int rows0 = std::min(rows, kTileRows), rows1 = rows - rows0;
    pack(x, p.K, m0, rows, b);
    configure(rows0, rows1);
    tiled_end = rows1 > 0 ? pass<true>(p, b, m0, rows0, rows1, n_begin, n_end)
                          : pass<false>(p, b, m0, rows0, rows1, n_begin, n_end);
  }
  _tile_release();
  if (tiled_end < n_end) avx512bf16_bf16(p, tiled_end, n_end);
}

}  // namespace kvlab::skinny
