// Skinny GEMM for CPU decode: y (M, N) = x (M, K) @ w (N, K)^T for a handful of rows M (a decode
// batch), w in float32 or bfloat16, float32 accumulation. At small M the product is bound by
// streaming w from memory, so each weight row is read once, in order, and applied to up to four
// rows of x while it sits in registers. Why torch's kernels fall short here: kvlab/kernels/cpu.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>

#include "vec.h"

namespace {

using kvlab::horizontal_sum;
using kvlab::load8;

// y[c * N] = dot(x[c], w) for the C rows of x, one weight row w. The k loop is unrolled U times
// so C * U independent accumulator chains hide the FMA latency (C * U = 8 of the 16 registers).
template <typename W, int C, int U>
void row_times_inputs(const float* x, const W* w, float* y, int64_t K, int64_t N) {
  __m256 acc[C][U];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[c][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    __m256 wv[U];
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) wv[u] = load8(w + k + 8 * u);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) acc[c][u] = _mm256_fmadd_ps(wv[u], load8(x + c * K + k + 8 * u), acc[c][u]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    __m256 total = acc[c][0];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[c][u]);
    float sum = horizontal_sum(total);
    for (int64_t j = k; j < K; ++j) sum += static_cast<float>(w[j]) * x[c * K + j];
    y[c * N] = sum;
  }
}

template <typename W>
void skinny_gemm(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  // Threads split the rows of w, so each streams its own share of the weight exactly once.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const W* row = w + n * K;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) row_times_inputs<W, 4, 2>(x + m * K, row, y + m * N + n, K, N);
      for (; m + 2 <= M; m += 2) row_times_inputs<W, 2, 4>(x + m * K, row, y + m * N + n, K, N);
      for (; m < M; ++m) row_times_inputs<W, 1, 8>(x + m * K, row, y + m * N + n, K, N);
    }
  });
}

// x (M, K) and weight (N, K) in one dtype, bias (N,) or none -> (M, N) in that dtype. The few rows of
// x are widened to float32 once; the float32 result is rounded once, after the bias.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x (M, K) and weight (N, K)");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x has ", x.size(1), " columns, weight has ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "skinny_linear: x and weight must share a dtype");
  TORCH_CHECK(weight.is_contiguous(), "skinny_linear: weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x32.options());
  const float* xp = x32.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  switch (weight.scalar_type()) {
    case at::kFloat:
      skinny_gemm(xp, weight.const_data_ptr<float>(), yp, M, K, N);
      break;
    case at::kBFloat16:
      skinny_gemm(xp, weight.const_data_ptr<at::BFloat16>(), yp, M, K, N);
      break;
    default:
      TORCH_CHECK(false, "skinny_linear: float32 or bfloat16 only, got ", weight.scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "skinny_linear: bias must be (N,)");
    y.add_(*bias);
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) { m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
