// Greedy decoding's argmax over each row of logits: the first index of the row's largest value, as
// torch.max(dim=-1).indices returns it (a NaN counts as the largest, the first one wins).
//
// One pass keeps the largest value of each block of kBlock entries and remembers the first block whose
// maximum is strictly larger than every earlier one; a second pass over that block alone finds the
// first position holding the value. NaNs are counted in the same pass and handled by a scalar scan.
//
// The threads split the columns, not the rows: the LM head's GEMM that wrote the logits split its
// output columns between the threads the same way, so each thread reads the half in its own cache.
// Read by one thread, the half another core just wrote costs more than the scan: on a 2-core Sapphire
// Rapids VM one fresh 49,152-entry row took ~100 us that way (torch's max(dim=-1), a scalar chain
// per row, ~200 us) and ~11 us when already in the reading core's cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using kvlab::horizontal_max;
using kvlab::load8;

constexpr int64_t kBlock = 256;  // a multiple of the 8 lanes

inline float value_at(const float* row, int64_t i) { return row[i]; }
inline float value_at(const c10::BFloat16* row, int64_t i) { return static_cast<float>(row[i]); }

// The first position of the largest value of row[0, n), that value, and whether the range holds a NaN
// (then `index` is the first NaN's).
struct Candidate {
  int64_t index;
  float value;
  bool nan;
};

template <typename T>
Candidate first_argmax(const T* row, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t best_begin = 0;
  bool any_nan = false;
  int64_t begin = 0;
  for (; begin + kBlock <= n; begin += kBlock) {
    __m256 block_max = load8(row + begin);
    __m256 unordered = _mm256_cmp_ps(block_max, block_max, _CMP_UNORD_Q);
    for (int64_t i = begin + 8; i < begin + kBlock; i += 8) {
      const __m256 v = load8(row + i);
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
      if (std::isnan(value_at(row, i))) return {i, value_at(row, i), true};
  }
  // The winning block (or tail position) holds `best`; a range of -inf only is won by its first position.
  for (int64_t i = best_begin; i < n; ++i)
    if (value_at(row, i) == best) return {i, best, false};
  return {0, best, false};
}

// The row's answer from its parts' candidates, in column order: the first NaN, else the largest value,
// the earliest part on a tie.
int64_t combine(const Candidate* parts, int64_t count) {
  Candidate best = parts[0];
  for (int64_t p = 0; p < count && !best.nan; ++p)
    if (parts[p].nan || parts[p].value > best.value) best = parts[p];
  return best.index;
}

constexpr int64_t kSplitMin = 16384;  // entries per part below which one thread scans the whole row

template <typename T>
void argmax_into(const T* logits, int64_t rows, int64_t n, int64_t* index) {
  const int64_t units = (n + 7) / 8;  // the GEMM's 8-column blocks, split the same way
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kSplitMin));
  std::vector<Candidate> candidates(rows * parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t lo = std::min(n, units * p / parts * 8), hi = std::min(n, units * (p + 1) / parts * 8);
      for (int64_t r = 0; r < rows; ++r) {
        Candidate c = first_argmax(logits + r * n + lo, hi - lo);
        c.index += lo;
        candidates[r * parts + p] = c;
      }
    }
  });
  for (int64_t r = 0; r < rows; ++r) index[r] = combine(candidates.data() + r * parts, parts);
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu() && logits.size(1) >= 1,
              "argmax_rows: logits must be a contiguous CPU (rows, vocab) tensor with vocab >= 1");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "argmax_rows: float32 or bfloat16 only, got ", logits.scalar_type());
  const int64_t rows = logits.size(0), n = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (logits.scalar_type() == at::kFloat)
    argmax_into(logits.const_data_ptr<float>(), rows, n, out.mutable_data_ptr<int64_t>());
  else
    argmax_into(logits.const_data_ptr<c10::BFloat16>(), rows, n, out.mutable_data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) { m.def("argmax_rows(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
