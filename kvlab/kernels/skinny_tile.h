// The skinny GEMM's register tiling, written once over an ISA "traits" type (one per variant TU).
// Included only by the variant translation units, inside an anonymous namespace: every variant gets
// its own internal copy compiled with its own flags (see skinny_variants.h for why that matters).
//
// Layout is dot-product form, as llama.cpp's vec_dot and the weight's natural (N, K) layout want:
// a tile of MR input rows x NR weight rows keeps MR * NR vector accumulators in registers; per
// step along K it loads NR weight vectors and MR input vectors once each and issues MR * NR FMAs
// (oneDNN and BLIS block their microkernels the same way, with the weight panel walked once).
// At one input row (batch-1 decode: memory-bound) the weight rows are walked one at a time instead
// (one_row below).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "reduce4.h"
#include "skinny_variants.h"

namespace {

using kvlab::skinny::kBlockRows;
using kvlab::skinny::Problem;

// The tile's rows two blocks on, into L2, fetched while this block computes: each step along K
// requests the step's share of those rows' bytes, in address order. A weight row is short (576 bf16 =
// 18 cache lines) and a tile walks NR of them at once, too many short streams for the hardware
// prefetcher to ramp up on before each ends; requested in address order, the lines run through
// memory as one stream, which it follows. (Two blocks ahead into L2 measured a little faster than
// one block into L1 on a Sapphire Rapids VM. Against one request per row at the same column, in
// one process alternating the two, SmolLM2 decode steps were 2.6% (float32) and 4% (bfloat16)
// shorter by the median of 8-14 generations each; the bf16 widening kernel also stops requesting
// each line twice.)
// Returns where the next step's share begins.
template <class T, int NR>
inline const char* prefetch_step(const char* ahead) {
  constexpr int kStepBytes = NR * T::kStep * static_cast<int>(sizeof(typename T::W));
#pragma GCC unroll 16
  for (int line = 0; line < (kStepBytes + 63) / 64; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T1);
  return ahead + kStepBytes;
}

template <class T, int MR, int NR>
inline void tile(const typename T::X* x, const typename T::W* w, float* y, int64_t K, int64_t N) {
  typename T::Acc acc[MR][NR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) acc[m][r] = T::zero();
  int64_t k = 0;
  const char* ahead = reinterpret_cast<const char*>(w + 2 * kBlockRows * K);
  for (; k + T::kStep <= K; k += T::kStep) {
    typename T::WV wv[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = T::load_w(w + r * K + k);
    ahead = prefetch_step<T, NR>(ahead);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const typename T::XV xv = T::load_x(x + m * K + k);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[m][r] = T::fma(acc[m][r], wv[r], xv);
    }
  }
  if (k < K) {  // the K tail: partial vectors, zero-filled past the row's end
    const int rest = static_cast<int>(K - k);
    typename T::WV wv[NR];
#pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) wv[r] = T::load_w_tail(w + r * K + k, rest);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const typename T::XV xv = T::load_x_tail(x + m * K + k, rest);
#pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) acc[m][r] = T::fma(acc[m][r], wv[r], xv);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < NR; r += 4) reduce_up_to4<T>(&acc[m][r], NR - r < 4 ? NR - r : 4, y + m * N + r);
}

// MR input rows against NB weight rows, as tiles of the widest NR the variant's registers allow.
template <class T, int MR, int NB>
inline void rows_against_block(const typename T::X* x, const typename T::W* w, float* y, int64_t K, int64_t N) {
  constexpr int NR = T::template weight_rows<MR>() < NB ? T::template weight_rows<MR>() : NB;
  static_assert(NB % NR == 0, "a block splits into whole tiles");
#pragma GCC unroll 8
  for (int r = 0; r < NB; r += NR) tile<T, MR, NR>(x, w + r * K, y + r, K, N);
}

// Every input row against NB weight rows, which stay in cache while the input tiles pass over them.
template <class T, int NB>
inline void block(const typename T::X* x, const typename T::W* w, float* y, int64_t M, int64_t K, int64_t N) {
  constexpr int MR = T::kTileInputRows;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) rows_against_block<T, MR, NB>(x + m * K, w, y + m * N, K, N);
  if constexpr (MR > 2) {
    if (m + 2 <= M) {
      rows_against_block<T, 2, NB>(x + m * K, w, y + m * N, K, N);
      m += 2;
    }
  }
  if (m < M) rows_against_block<T, 1, NB>(x + m * K, w, y + m * N, K, N);
  // MR > 4 would leave up to MR - 1 rows here; the variants keep MR <= 4 so one 2 and one 1 suffice.
  static_assert(MR <= 4, "remainder handling covers MR <= 4");
}

// One input row: each weight row in turn, start to end, with four accumulators along K (every fourth
// vector), so a thread reads its share of the rows as one sequential stream, which the hardware
// prefetcher follows by itself. A tile of NR rows instead walks NR short streams side by side, which
// needs the software prefetch above. On a 2-core Zen 4 EPYC, over SmolLM2's 121 matrices called one
// by one, the row-at-a-time walk read 54 GB/s where the 8-row tiles read 39 (float32, a fast memory
// spell; bf16 about +10%), and decode steps were 19% shorter in both dtypes. Requests 2-8 KiB ahead
// into L2 made this walk slower, by up to 30% (the tiles without theirs: 21 GB/s against 28).
//
// kNonTemporal ("<variant>/nt"): each line is also requested with PREFETCHNTA two lines ahead of its
// load. A decode step streams every weight through the caches, which then evict everything else the
// process touches between steps (the K/V cache, activations, the interpreter's and torch's code and
// data), so the host work around each step runs from memory. The non-temporal hint asks the CPU to
// keep the line out of the outer caches (AMD's optimization guides: a PREFETCHNTA that misses L2 is
// not evicted into L2 later; Zen's L3 is filled only by L2 evictions). Measured on a 2-core Zen 4 EPYC
// (bf16 SmolLM2, kvlab.generate at prompt 128, alternated per generation in one process): TPOT 5.65
// against 6.26 ms in a fast memory spell, 7.52 against 8.28 in a slow one (float32 14.91 against
// 15.53); with requests four lines ahead, the host time between steps had fallen from ~410 to ~270 us
// and the steps by ~3%. PREFETCHT0 at the same distance made it slower, and distances past 4 lines
// lost the effect. Whether a CPU keeps its caches this way is measured (kvlab/kernels/calibrate.py).
// The sums' order differs from the tiles' (each output is still computed one way, whatever the split).
template <class T, bool kNonTemporal>
inline void one_row(const typename T::X* x, const typename T::W* w, float* y, int64_t K, int64_t n_begin,
                    int64_t n_end) {
  constexpr int kLane = T::kStep;
  constexpr int kAhead = 128;  // bytes: two lines past the load
  // Every line of the walk is requested: each step along K asks for its own bytes' lines, kAhead on.
  const auto request = [](const typename T::W* at, int bytes) {
    if constexpr (kNonTemporal) {
      const char* ahead = reinterpret_cast<const char*>(at) + kAhead;
#pragma GCC unroll 4
      for (int offset = 0; offset < bytes; offset += 64) _mm_prefetch(ahead + offset, _MM_HINT_NTA);
    }
  };
  constexpr int kVectorBytes = kLane * static_cast<int>(sizeof(typename T::W));
  typename T::Acc sums[4];  // four rows' folded accumulators, reduced together
  int pending = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const typename T::W* row = w + n * K;
    typename T::Acc acc[4] = {T::zero(), T::zero(), T::zero(), T::zero()};
    int64_t k = 0;
    for (; k + 4 * kLane <= K; k += 4 * kLane) {
      request(row + k, 4 * kVectorBytes);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j)
        acc[j] = T::fma(acc[j], T::load_w(row + k + j * kLane), T::load_x(x + k + j * kLane));
    }
    for (int j = 0; k + kLane <= K; k += kLane, ++j) {
      request(row + k, kVectorBytes);
      acc[j] = T::fma(acc[j], T::load_w(row + k), T::load_x(x + k));
    }
    if (k < K) {  // the K tail: partial vectors, zero-filled past the row's end
      const int rest = static_cast<int>(K - k);
      request(row + k, 1);
      acc[3] = T::fma(acc[3], T::load_w_tail(row + k, rest), T::load_x_tail(x + k, rest));
    }
    sums[pending++] = T::add(T::add(acc[0], acc[1]), T::add(acc[2], acc[3]));
    if (pending == 4) {
      T::reduce4(sums, y + n - 3);
      pending = 0;
    }
  }
  if (pending) reduce_up_to4<T>(sums, pending, y + n_end - pending);
}

// The row-at-a-time walk reloads the input row for every weight row, which stays in L1 beside the
// streaming weights while it is short (up to 2,048 float32 values). Over matrices of 320 MiB on the
// Zen 4 EPYC, K = 576-2,048 read as fast or faster row at a time than by tiles, K = 4,096 (16 KiB of
// float32 input) mostly slower, K = 8,192 (bf16 weights, float32 input) 23-26 GB/s against 51-59.
constexpr int64_t kOneRowMaxInputBytes = 8 << 10;

template <class T>
void run(const Problem& p, int64_t n_begin, int64_t n_end) {
  const auto* x = static_cast<const typename T::X*>(p.x);
  const auto* w = static_cast<const typename T::W*>(p.w);
  if (p.M == 1 && p.one_row != kvlab::skinny::OneRow::kTiles &&
      p.K * static_cast<int64_t>(sizeof(typename T::X)) <= kOneRowMaxInputBytes) {
    if (p.one_row == kvlab::skinny::OneRow::kWalkNonTemporal) return one_row<T, true>(x, w, p.y, p.K, n_begin, n_end);
    return one_row<T, false>(x, w, p.y, p.K, n_begin, n_end);
  }
  const int64_t K = p.K, N = p.N;
  int64_t n = n_begin;
  for (; n + kBlockRows <= n_end; n += kBlockRows) block<T, kBlockRows>(x, w + n * K, p.y + n, p.M, K, N);
  for (; n < n_end; ++n) block<T, 1>(x, w + n * K, p.y + n, p.M, K, N);
}

}  // namespace
