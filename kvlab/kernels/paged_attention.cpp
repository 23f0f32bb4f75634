// Paged decode attention for CPU: each request's one new query token attends to its whole context,
// read in place through its block table (no gather into a padded batch), in float32 math over a
// float32 or bfloat16 cache. Work is split by (request, kv head), and a long context also along its
// positions; each item is one GQA group (decode_attention.h: the group's heads share every K/V load;
// vectorised exp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "decode_attention.h"
#include "paged_checks.h"

namespace {

// Work below this many multiply-adds per thread runs on one thread: waking the others costs more.
constexpr int64_t kMinWork = int64_t{1} << 18;

template <typename T>
void decode_attention(const T* query, const T* key_cache, const T* value_cache, const int32_t* block_tables,
                      const int32_t* seq_lens, T* out, int64_t num_reqs, int64_t H, int64_t KH, int64_t D,
                      int64_t block_size, int64_t table_width, float scale) {
  const int64_t G = H / KH, items = num_reqs * KH;
  int64_t max_len = 1;
  for (int64_t r = 0; r < num_reqs; ++r) max_len = std::max<int64_t>(max_len, seq_lens[r]);
  // Few long contexts (one request's 3 kv heads on 2 threads) are split along the sequence
  // (flash-decoding), so every thread gets the same share of the work; a share is at least kMinWork.
  const int64_t shares = kvlab::context_shares(items, at::get_num_threads(), max_len, kMinWork / (G * D));
  const int64_t units = items * shares;
  const auto context = [&](int64_t r) {
    return kvlab::PagedContext<T>{key_cache, value_cache, block_tables + r * table_width, seq_lens[r],
                                  block_size, KH, D};
  };
  const auto write = [&](int64_t item, const float* o_in) {
    T* o = out + ((item / KH) * H + (item % KH) * G) * D;  // the group's G heads are adjacent
    for (int64_t i = 0; i < G * D; ++i) o[i] = static_cast<T>(o_in[i]);
  };
  std::vector<float> part_acc(shares > 1 ? units * G * D : 0), part_max(shares > 1 ? units * G : 0),
      part_sum(shares > 1 ? units * G : 0);
  const int64_t units_per_thread = std::max<int64_t>(1, kMinWork / (max_len / shares * G * D));
  at::parallel_for(0, units, units_per_thread, [&](int64_t begin, int64_t end) {
    std::vector<float> q(G * D), acc(G * D), scores(G * ((max_len + shares - 1) / shares + 1));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / shares, share = unit % shares, r = item / KH, kh = item % KH, L = seq_lens[r];
      const T* q_in = query + (r * H + kh * G) * D;
      for (int64_t i = 0; i < G * D; ++i) q[i] = static_cast<float>(q_in[i]) * scale;
      if (shares == 1) {
        kvlab::attend_group(context(r), kh, q.data(), G, scores.data(), acc.data());
        write(item, acc.data());
      } else {
        kvlab::attend_share(context(r), kh, q.data(), G, L * share / shares, L * (share + 1) / shares,
                            scores.data(), part_acc.data() + unit * G * D, part_max.data() + unit * G,
                            part_sum.data() + unit * G);
      }
    }
  });
  if (shares == 1) return;
  // The merge is a few thousand multiply-adds per item: on this thread, no second parallel region.
  std::vector<float> merged(G * D);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t first = item * shares;  // the item's shares are units first .. first + shares - 1
    kvlab::merge_shares(shares, G, D, part_acc.data() + first * G * D, part_max.data() + first * G,
                        part_sum.data() + first * G, merged.data());
    write(item, merged.data());
  }
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& key_cache,
                                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "paged_decode_attention: query (B, H, D), caches (NB, BS, KH, D)");
  TORCH_CHECK(key_cache.sizes() == value_cache.sizes(), "paged_decode_attention: key and value caches differ in shape");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && key_cache.scalar_type() == value_cache.scalar_type(),
              "paged_decode_attention: query and caches must share a dtype");
  TORCH_CHECK(query.is_contiguous() && key_cache.is_contiguous() && value_cache.is_contiguous(),
              "paged_decode_attention: contiguous inputs only");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t BS = key_cache.size(1), KH = key_cache.size(2);
  TORCH_CHECK(key_cache.size(3) == D && D >= 8 && D % 8 == 0,
              "paged_decode_attention: head_dim must match and be a multiple of 8");
  TORCH_CHECK(KH >= 1 && H >= 1 && H % KH == 0 && H / KH <= 64,
              "paged_decode_attention: query heads must be a multiple (at most 64) of kv heads");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode_attention: one table and length per request");
  kvlab::check_paged_metadata("paged_decode_attention", seq_lens, block_tables, key_cache.size(0), BS);
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
