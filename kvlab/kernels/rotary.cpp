// Rotary position embedding (Su et al. 2021) applied in place, "rotate half" layout as HF Llama and
// GPT-NeoX: for the first rotary_dim dims of each head, [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin].
// Works on a strided view (the q and k heads inside the fused QKV output), float32 math, one
// rounding per value. One call replaces the six torch ops of RotaryEmbedding.rotate_.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

template <typename T>
void rotate(T* x, const T* cos, const T* sin, int64_t tokens, int64_t heads, int64_t half, int64_t token_stride,
            int64_t head_stride, int64_t table_stride) {
  at::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, heads * half)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * table_stride;
      const T* s = sin + t * table_stride;
      for (int64_t h = 0; h < heads; ++h) {
        T* x1 = x + t * token_stride + h * head_stride;
        T* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(x1[i]), b = static_cast<float>(x2[i]);
          const float ci = static_cast<float>(c[i]), si = static_cast<float>(s[i]);
          x1[i] = static_cast<T>(a * ci - b * si);
          x2[i] = static_cast<T>(b * ci + a * si);
        }
      }
    }
  });
}

void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rotary_: x must be (T, heads, head_dim) with unit last stride");
  at::assert_no_internal_overlap(x);  // an expanded view would be rotated once per alias
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_: cos and sin must be contiguous (T, rotary_dim / 2)");
  TORCH_CHECK(cos.size(0) == x.size(0) && 2 * cos.size(1) <= x.size(2), "rotary_: tables do not fit x");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(),
              "rotary_: x and tables must share a dtype");
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    rotate<T>(x.mutable_data_ptr<T>(), cos.const_data_ptr<T>(), sin.const_data_ptr<T>(), x.size(0), x.size(1),
              cos.size(1), x.stride(0), x.stride(1), cos.size(1));
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else if (x.scalar_type() == at::kBFloat16) run(c10::BFloat16{});
  else TORCH_CHECK(false, "rotary_: float32 or bfloat16 only");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) { m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()"); }

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("rotary_", &rotary_); }
