// Paged decode attention for CPU: each request's one new query token attends to its whole context,
// read in place through its block table (no gather into a padded batch), in float32 math over a
// float32 or bfloat16 cache. Work is split by (request, kv head); the G = H / KH query heads that
// share a kv head (GQA) are handled together, so each cached key and value row is read once.
// Two passes per item: scores for all positions, softmax (max-subtracted), then the weighted sum of
// the values; exact, and the scores of even an 8k context (G x 8k floats) stay in L2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using kvlab::horizontal_sum;
using kvlab::load8;

template <typename T>
float dot(const float* q, const T* k, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
  return horizontal_sum(acc);
}

template <typename T>
void add_scaled(float* acc, float p, const T* v, int64_t D) {
  const __m256 weight = _mm256_set1_ps(p);
  for (int64_t d = 0; d < D; d += 8)
    _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(weight, load8(v + d), _mm256_loadu_ps(acc + d)));
}

template <typename T>
void decode_attention(const T* query, const T* key_cache, const T* value_cache, const int32_t* block_tables,
                      const int32_t* seq_lens, T* out, int64_t num_reqs, int64_t H, int64_t KH, int64_t D,
                      int64_t block_size, int64_t table_width, float scale) {
  const int64_t G = H / KH;
  int64_t max_len = 1;
  for (int64_t r = 0; r < num_reqs; ++r) max_len = std::max<int64_t>(max_len, seq_lens[r]);
  // Small steps (one short request) run on one thread: waking the others costs more than the work.
  const int64_t items_per_thread = std::max<int64_t>(1, (int64_t{1} << 18) / (max_len * G * D));
  at::parallel_for(0, num_reqs * KH, items_per_thread, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G * D), acc(G * D), scores, inverse_sums(G);
    std::vector<const T*> keys, values;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / KH, kh = item % KH, L = seq_lens[r];
      const int32_t* table = block_tables + r * table_width;
      const T* q_in = query + (r * H + kh * G) * D;  // the group's G heads are adjacent
      for (int64_t i = 0; i < G * D; ++i) q[i] = static_cast<float>(q_in[i]) * scale;
      // Where position p's key and value rows sit for this kv head, resolved through the table once.
      keys.resize(L);
      values.resize(L);
      for (int64_t p = 0; p < L; ++p) {
        const int64_t offset = ((table[p / block_size] * block_size + p % block_size) * KH + kh) * D;
        keys[p] = key_cache + offset;
        values[p] = value_cache + offset;
      }
      scores.resize(G * L);
      for (int64_t p = 0; p < L; ++p)
        for (int64_t g = 0; g < G; ++g) scores[g * L + p] = dot(q.data() + g * D, keys[p], D);
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * L;
        const float max = *std::max_element(s, s + L);
        float sum = 0.f;
        for (int64_t p = 0; p < L; ++p) sum += (s[p] = std::exp(s[p] - max));
        inverse_sums[g] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < L; ++p)
        for (int64_t g = 0; g < G; ++g) add_scaled(acc.data() + g * D, scores[g * L + p], values[p], D);
      T* o = out + (r * H + kh * G) * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) o[g * D + d] = static_cast<T>(acc[g * D + d] * inverse_sums[g]);
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "paged_decode_attention: query (B, H, D), caches (NB, BS, KH, D)");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "paged_decode_attention: key and value caches differ in shape");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "paged_decode_attention: query and caches must share a dtype");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "paged_decode_attention: contiguous inputs only");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables and seq_lens must be int32");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && D % 8 == 0, "paged_decode_attention: head_dim must match and be a multiple of 8");
  TORCH_CHECK(H % KH == 0, "paged_decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode_attention: one table and length per request");
  // The kernel reads through the tables unchecked, so a bad length or block id would read (or, via
  // a stale table, leak) memory outside the caches: validate what it is about to dereference.
  const int64_t NB = key_cache.size(0), width = block_tables.size(1);
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(lens[r] >= 1, "paged_decode_attention: seq_lens[", r, "] = ", lens[r], " but every request needs >= 1 token");
    TORCH_CHECK(lens[r] <= width * BS, "paged_decode_attention: seq_lens[", r, "] = ", lens[r],
                " exceeds its block table's capacity of ", width, " blocks x ", BS, " = ", width * BS, " tokens");
    for (int64_t b = 0; b < (lens[r] + BS - 1) / BS; ++b) {
      const int32_t id = tables[r * width + b];
      TORCH_CHECK(id >= 0 && id < NB, "paged_decode_attention: block_tables[", r, ", ", b, "] = ", id,
                  " is outside the cache's blocks [0, ", NB, ")");
    }
  }
  at::Tensor out = at::empty_like(query);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    decode_attention<T>(query.const_data_ptr<T>(), key_cache.const_data_ptr<T>(), value_cache.const_data_ptr<T>(),
                        block_tables.const_data_ptr<int32_t>(), seq_lens.const_data_ptr<int32_t>(),
                        out.mutable_data_ptr<T>(), B, H, KH, D, BS, block_tables.size(1), static_cast<float>(scale));
  };
  switch (query.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "paged_decode_attention: float32 or bfloat16 only, got ", query.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) {
  m.def("paged_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
