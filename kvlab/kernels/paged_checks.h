// Checks of what a paged-attention kernel is about to dereference. The kernels read through block
// tables unchecked, so a bad length or block id would read (or, via a stale table, leak) memory
// outside the caches; each op validates its metadata here first, with the op's name in the error.
#pragma once

#include <ATen/ATen.h>

namespace kvlab {

// seq_lens (B,) int32 and block_tables (B, width) int32 against a cache of num_blocks x block_size.
inline void check_paged_metadata(const char* op, const at::Tensor& seq_lens, const at::Tensor& block_tables,
                                 int64_t num_blocks, int64_t block_size) {
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, op,
              ": block_tables and seq_lens must be int32");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() && block_tables.dim() == 2 &&
                  seq_lens.dim() == 1 && block_tables.size(0) == seq_lens.size(0),
              op, ": contiguous block_tables (B, width) and seq_lens (B,)");
  const int64_t B = seq_lens.size(0), width = block_tables.size(1);
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  for (int64_t r = 0; r < B; ++r) {
    TORCH_CHECK(lens[r] >= 1, op, ": seq_lens[", r, "] = ", lens[r], " but every request needs >= 1 token");
    TORCH_CHECK(lens[r] <= width * block_size, op, ": seq_lens[", r, "] = ", lens[r],
                " exceeds its block table's capacity of ", width, " blocks x ", block_size, " = ",
                width * block_size, " tokens");
    for (int64_t b = 0; b < (lens[r] + block_size - 1) / block_size; ++b) {
      const int32_t id = tables[r * width + b];
      TORCH_CHECK(id >= 0 && id < num_blocks, op, ": block_tables[", r, ", ", b, "] = ", id,
                  " is outside the cache's blocks [0, ", num_blocks, ")");
    }
  }
}

}  // namespace kvlab
