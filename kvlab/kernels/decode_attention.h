// One decode query group's attention over its paged context, shared by the paged-attention op and
// the fused decode step. The G = H / KH query heads that share a kv head (GQA) are handled together,
// so each cached key and value row is loaded once for all of them. Two passes: scores for every
// position, a max-subtracted softmax, then the weighted sum of the values; exact, and the scores
// of even an 8k context (G x 8k floats) stay in L2. Float32 math over a float32 or bf16 cache.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace kvlab {

// e^x for 8 lanes: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2 (ln2 split in two
// parts, Cody & Waite 1980, so r keeps its low bits), e^r by its degree-6 Taylor polynomial
// (truncation error below 2e-7 relative on that interval), 2^n built in the exponent field.
// Inputs are clamped to float32's normal range, so a very negative score gives ~1e-38, not 0.
inline __m256 exp8(__m256 x) {
  // min/max return their second operand when either is NaN: x goes second, so a NaN score stays NaN.
  x = _mm256_max_ps(_mm256_set1_ps(-87.33f), _mm256_min_ps(_mm256_set1_ps(88.37f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// The largest of s[0..n), n >= 1. Four independent vector maxima: std::max_element compiles to one
// scalar compare per score in a single dependency chain, which cost 15% of the attention kernel.
inline float max_of(const float* s, int64_t n) {
  __m256 top[4];
  for (auto& t : top) t = _mm256_set1_ps(s[0]);
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) top[j] = _mm256_max_ps(top[j], _mm256_loadu_ps(s + i + 8 * j));
  float result = horizontal_max(_mm256_max_ps(_mm256_max_ps(top[0], top[1]), _mm256_max_ps(top[2], top[3])));
  for (; i < n; ++i) result = std::max(result, s[i]);
  return result;  // a NaN score may be dropped here; exp8 keeps it NaN, and the softmax with it
}

// s[i] = e^(s[i] - max) for i < n; returns the sum of the new values.
inline float exp_shifted_sum(float* s, int64_t n, float max) {
  const __m256 shift = _mm256_set1_ps(max);
  __m256 sums = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), shift));
    _mm256_storeu_ps(s + i, e);
    sums = _mm256_add_ps(sums, e);
  }
  float sum = horizontal_sum(sums);
  if (i < n) {  // the tail through a padded copy, so every value takes the same polynomial
    alignas(32) float rest[8] = {max, max, max, max, max, max, max, max};
    std::copy(s + i, s + n, rest);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(rest), shift));
    _mm256_store_ps(rest, e);
    for (int64_t j = 0; j < n - i; ++j) sum += (s[i + j] = rest[j]);
  }
  return sum;
}

// Requests the n elements at row into L2, a cache line at a time.
template <typename T>
inline void prefetch_to_l2(const T* row, int64_t n) {
  for (int64_t d = 0; d < n; d += 64 / static_cast<int64_t>(sizeof(T)))
    _mm_prefetch(reinterpret_cast<const char*>(row + d), _MM_HINT_T1);
}

// Register-blocked inner loops (AVX2: 16 vector registers). Scores: NG heads at once, so each key
// vector is loaded and widened once for all of them. Values: NG heads x NV vectors of dimensions
// accumulate in registers over all positions (no accumulator load and store per position); a head
// dimension wider than NV vectors, or more than NG heads, takes further passes over the share's
// value rows, which the first pass left in L1/L2.
template <int NG, typename T>
inline void score_heads(const float* q, int64_t D, const T* key, float* scores, int64_t stride) {
  __m256 acc[NG];
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) acc[g] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 k = load8(key + d);
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), k, acc[g]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) scores[g * stride] = horizontal_sum(acc[g]);
}

// Scores of four positions at once for NG <= 3 heads: the 4 x NG accumulators fill 12 of AVX2's 16
// registers (the NG query vectors and one key vector the rest), and one transposing reduction per
// head (three horizontal adds) yields its four scores together; reducing every score on its own
// cost about as much as its products (head_dim 64 is only 8 vectors).
template <int NG, typename T>
inline void score_heads_x4(const float* q, int64_t D, const T* const* keys, float* scores, int64_t stride) {
  __m256 acc[NG][4];
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[NG];
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) qv[g] = _mm256_loadu_ps(q + g * D + d);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 k = load8(keys[j] + d);
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) acc[g][j] = _mm256_fmadd_ps(qv[g], k, acc[g][j]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) {
    // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]; twice over the four
    // accumulators leaves each one's two half-sums in lanes j and j + 4.
    const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]), _mm256_hadd_ps(acc[g][2], acc[g][3]));
    _mm_storeu_ps(scores + g * stride,
                  _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1)));
  }
}

// Where a paged cache keeps its rows: (num_blocks, block_size, KH, D), read through a block table.
template <typename T>
struct PagedContext {
  const T* keys;
  const T* values;
  const int32_t* table;  // this request's block ids
  int64_t length;        // positions 0..length-1 are attended
  int64_t block_size, kv_heads, head_dim;

  int64_t offset(int64_t p, int64_t kh) const {
    return ((table[p / block_size] * block_size + p % block_size) * kv_heads + kh) * head_dim;
  }
};

// acc[g][d .. d + 8 NV) = sum over positions p of scores[g][p] v_p[d .. d + 8 NV), for NG heads;
// `ahead` > 0: the pass that first reads the rows requests each that many positions early.
template <int NG, int NV, typename T>
inline void weigh_values(const PagedContext<T>& ctx, const int64_t* rows, int64_t n, const float* scores, int64_t d,
                         float* acc, int64_t ahead) {
  const int64_t D = ctx.head_dim;
  __m256 sums[NG][NV];
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) sums[g][j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    if (ahead && i + ahead < n) {
      prefetch_to_l2(ctx.values + rows[i + ahead], D);
    }
    // The NG weights first, then one value vector at a time: 3 x 4 accumulators, 3 weights and one
    // vector fill AVX2's 16 registers exactly (holding all NV vectors spilled an accumulator).
    const T* value = ctx.values + rows[i] + d;
    __m256 weight[NG];
#pragma GCC unroll 4
    for (int g = 0; g < NG; ++g) weight[g] = _mm256_set1_ps(scores[g * n + i]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      const __m256 v = load8(value + 8 * j);
#pragma GCC unroll 4
      for (int g = 0; g < NG; ++g) sums[g][j] = _mm256_fmadd_ps(weight[g], v, sums[g][j]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(acc + g * D + d + 8 * j, sums[g][j]);
}

// A share of one group's attention: positions [begin, end) only, unnormalised, so shares of one
// context computed apart (e.g. by different threads) merge exactly (flash-decoding; Dao et al. 2023):
// for each head g, max[g] = max score, sum[g] = sum of e^(score - max[g]), acc (G x D) = sum of
// e^(score - max[g]) v. An empty share gives max -inf and sum 0. scores: scratch of G * (end - begin).
template <typename T>
void attend_share(const PagedContext<T>& ctx, int64_t kh, const float* q, int64_t G, int64_t begin, int64_t end,
                  float* scores, float* acc, float* max, float* sum) {
  const int64_t n = end - begin, D = ctx.head_dim;
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    max[g] = -std::numeric_limits<float>::infinity();
    sum[g] = 0.f;
  }
  if (n <= 0) return;
  // Where each position's row sits, resolved once for keys and values alike (a block-table lookup
  // with a division per position, done in every loop, cost more than the arithmetic).
  thread_local std::vector<int64_t> offsets;
  offsets.resize(n);
  const int64_t row_stride = ctx.kv_heads * D;
  for (int64_t p = begin; p < end;) {
    const int64_t in_block = p % ctx.block_size, run = std::min(end - p, ctx.block_size - in_block);
    int64_t offset = ctx.offset(p, kh);
    for (int64_t i = 0; i < run; ++i, offset += row_stride) offsets[p - begin + i] = offset;
    p += run;
  }
  const int64_t* rows = offsets.data();
  // Rows of one kv head sit KH * D apart and jump at block boundaries, which the hardware
  // prefetcher follows late; each row is requested kAhead positions before it is read, into L2
  // (prefetcht1): L2 keeps several times more misses in flight than L1, and from DRAM the wait
  // for them was the kernel's main cost. Measured on a Zen 4 EPYC (16 requests x 1,024 tokens,
  // each call over another cache than the last, as the layers of a decode step meet them):
  // 16 positions into L1 1.92 ms (float32) and 1.09 ms (bf16); 48 into L2 1.18 and 0.60 ms.
  constexpr int64_t kAhead = 48;
  const auto prefetch_row = [&](const T* row) { prefetch_to_l2(row, D); };
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row(ctx.keys + rows[i]);
  int64_t i = 0;
  // Four positions at a time where the heads split into groups of at most three without a remainder
  // group (G = 1, 2, 3, 6, 9, ...); other group sizes (4, 8) load each key once per four heads below.
  // The last 1-3 positions of a share go through the same kernel with the last key repeated, so a
  // position's score is the same float whatever share boundaries put it at (the fused decode step and
  // the paged-attention op split a context differently, and must agree).
  const bool by_four_positions = G <= 3 || G % 3 == 0;
  const auto score_four = [&](const T* const* keys, float* out, int64_t stride) {
    for (int64_t g = 0; g < G; g += 3) {
      float* at = out + g * stride;
      switch (std::min<int64_t>(3, G - g)) {
        case 3: score_heads_x4<3>(q + g * D, D, keys, at, stride); break;
        case 2: score_heads_x4<2>(q + g * D, D, keys, at, stride); break;
        default: score_heads_x4<1>(q + g * D, D, keys, at, stride);
      }
    }
  };
  for (; by_four_positions && i + 4 <= n; i += 4) {
    for (int64_t j = i + kAhead; j < std::min(n, i + kAhead + 4); ++j) prefetch_row(ctx.keys + rows[j]);
    const T* keys[4] = {ctx.keys + rows[i], ctx.keys + rows[i + 1], ctx.keys + rows[i + 2], ctx.keys + rows[i + 3]};
    score_four(keys, scores + i, n);
  }
  if (by_four_positions && i < n) {
    const T* keys[4];
    for (int64_t j = 0; j < 4; ++j) keys[j] = ctx.keys + rows[std::min(i + j, n - 1)];
    thread_local std::vector<float> tail;
    tail.resize(4 * G);  // G heads x 4 scores
    score_four(keys, tail.data(), 4);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = i; j < n; ++j) scores[g * n + j] = tail[g * 4 + (j - i)];
    i = n;
  }
  for (; i < n; ++i) {
    if (i + kAhead < n) prefetch_row(ctx.keys + rows[i + kAhead]);
    const T* key = ctx.keys + rows[i];
    for (int64_t g = 0; g < G; g += 4) {
      float* out = scores + g * n + i;
      switch (std::min<int64_t>(4, G - g)) {
        case 4: score_heads<4>(q + g * D, D, key, out, n); break;
        case 3: score_heads<3>(q + g * D, D, key, out, n); break;
        case 2: score_heads<2>(q + g * D, D, key, out, n); break;
        default: score_heads<1>(q + g * D, D, key, out, n);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* s = scores + g * n;
    max[g] = max_of(s, n);
    sum[g] = exp_shifted_sum(s, n, max[g]);
  }
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) prefetch_row(ctx.values + rows[i]);
  for (int64_t g = 0; g < G; g += 3) {
    for (int64_t d = 0; d < D; d += 32) {
      const int64_t heads = std::min<int64_t>(3, G - g), vectors = std::min<int64_t>(4, (D - d) / 8);
      const auto run = [&](auto ng, auto nv) {
        weigh_values<decltype(ng)::value, decltype(nv)::value>(ctx, rows, n, scores + g * n, d, acc + g * D,
                                                               g == 0 && d == 0 ? kAhead : 0);
      };
      using I1 = std::integral_constant<int, 1>;
      using I2 = std::integral_constant<int, 2>;
      using I3 = std::integral_constant<int, 3>;
      using I4 = std::integral_constant<int, 4>;
      const auto by_vectors = [&](auto ng) {
        switch (vectors) {
          case 4: run(ng, I4{}); break;
          case 3: run(ng, I3{}); break;
          case 2: run(ng, I2{}); break;
          default: run(ng, I1{});
        }
      };
      switch (heads) {
        case 3: by_vectors(I3{}); break;
        case 2: by_vectors(I2{}); break;
        default: by_vectors(I1{});
      }
    }
  }
}

// out (G x D) = the softmax-weighted values of one context's shares as attend_share gives them, laid
// out one after another (acc: shares x G x D, max and sum: shares x G), rescaled to their common
// maximum and normalised.
inline void merge_shares(int64_t shares, int64_t G, int64_t D, const float* acc, const float* max, const float* sum,
                         float* out) {
  for (int64_t g = 0; g < G; ++g) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < shares; ++c) top = std::max(top, max[c * G + g]);
    float total = 0.f;
    std::fill(out + g * D, out + (g + 1) * D, 0.f);
    for (int64_t c = 0; c < shares; ++c) {
      if (sum[c * G + g] == 0.f) continue;
      const float weight = std::exp(max[c * G + g] - top);
      total += weight * sum[c * G + g];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += weight * acc[(c * G + g) * D + d];
    }
    for (int64_t d = 0; d < D; ++d) out[g * D + d] /= total;
  }
}

constexpr int64_t kMinShare = 32;  // positions: a shorter share costs more in its merge than it saves
constexpr int64_t kMaxShares = 16;

// Into how many shares (flash-decoding) each of `items` (request, kv head) contexts is split, so that
// every one of `threads` threads gets the same number of shares (e.g. 3 kv heads of one request on 2
// threads: 2 shares each, 3 per thread), none shorter than `min_share` positions (at least kMinShare).
inline int64_t context_shares(int64_t items, int64_t threads, int64_t max_len, int64_t min_share = kMinShare) {
  const int64_t balanced = threads / std::gcd(items, threads);
  return std::max<int64_t>(1, std::min<int64_t>({balanced, max_len / std::max(min_share, kMinShare), kMaxShares}));
}

// out (G x D) = softmax(q k^T) v over the whole context, for the G query heads q (G x D, already
// scaled) of kv head kh. scores: scratch of at least G * length floats.
template <typename T>
void attend_group(const PagedContext<T>& ctx, int64_t kh, const float* q, int64_t G, float* scores, float* out) {
  float max[64], sum[64];
  attend_share(ctx, kh, q, G, 0, ctx.length, scores, out, max, sum);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < ctx.head_dim; ++d) out[g * ctx.head_dim + d] /= sum[g];
}

}  // namespace kvlab
