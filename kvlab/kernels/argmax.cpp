// Greedy decoding's argmax over each row of logits: the first index of the row's largest value, as
// torch.max(dim=-1).indices returns it (a NaN counts as the largest, the first one wins). torch's
// index-returning reduction is scalar on CPU: 55-90 us for one 49,152-entry row, 0.5-0.7 ms for 16 rows on
// a 2-core Sapphire Rapids VM, where this op takes 7 us and 50 us.
//
// One pass keeps the largest value of each block of kBlock entries and remembers the first block whose
// maximum is strictly larger than every earlier one; a second pass over that block alone finds the
// first position holding the value. NaNs are counted in the same pass and handled by a scalar scan.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace {

constexpr int64_t kBlock = 256;  // a multiple of the 8 lanes

inline float value_at(const float* row, int64_t i) { return row[i]; }
inline float value_at(const c10::BFloat16* row, int64_t i) { return static_cast<float>(row[i]); }

// 8 consecutive values of the row as float32.
inline __m256 load8(const float* row, int64_t i) { return _mm256_loadu_ps(row + i); }
inline __m256 load8(const c10::BFloat16* row, int64_t i) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

template <typename T>
int64_t first_argmax(const T* row, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_begin = 0;
  bool any_nan = false;
  int64_t begin = 0;
  for (; begin + kBlock <= n; begin += kBlock) {
    __m256 block_max = load8(row, begin);
    __m256 unordered = _mm256_cmp_ps(block_max, block_max, _CMP_UNORD_Q);
    for (int64_t i = begin + 8; i < begin + kBlock; i += 8) {
      const __m256 v = load8(row, i);
      block_max = _mm256_max_ps(block_max, v);
      unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    any_nan |= _mm256_movemask_ps(unordered) != 0;
    const float m = horizontal_max(block_max);
    if (m > best) {
      best = m;
      best_begin = begin;
    }
  }
  for (int64_t i = begin; i < n; ++i) {  // the tail, scalar
    const float v = value_at(row, i);
    any_nan |= std::isnan(v);
    if (v > best) {
      best = v;
      best_begin = i;
    }
  }
  if (any_nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(value_at(row, i))) return i;
  }
  // The winning block (or tail position) holds `best`; a row of -inf only is won by position 0.
  for (int64_t i = best_begin; i < n; ++i)
    if (value_at(row, i) == best) return i;
  return 0;
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu() && logits.size(1) >= 1,
              "argmax_rows: logits must be a contiguous CPU (rows, vocab) tensor with vocab >= 1");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "argmax_rows: float32 or bfloat16 only, got ", logits.scalar_type());
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* index = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (logits.scalar_type() == at::kFloat)
        index[r] = first_argmax(logits.const_data_ptr<float>() + r * n, n);
      else
        index[r] = first_argmax(logits.const_data_ptr<c10::BFloat16>() + r * n, n);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
