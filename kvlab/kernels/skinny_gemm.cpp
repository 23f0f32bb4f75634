// Skinny GEMM for CPU decode: y (M, N) = x (M, K) @ w (N, K)^T for a handful of rows M (a decode
// batch), w in float32 or bfloat16, float32 accumulation. At small M the product is bound by
// streaming w from memory, so each weight row is read once and applied to every row of x while it
// sits in registers or L1 (skinny_tile.h). This file is the torch op and the run-time dispatch; the
// arithmetic lives in one translation unit per ISA (skinny_avx2.cpp, skinny_avx512.cpp,
// skinny_avx512bf16.cpp, skinny_amx.cpp), each compiled with its own flags and called only where the
// CPU has them.
// Which variant (or torch) serves a (dtype, rows) is measured, not assumed: kvlab/kernels/calibrate.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "skinny_dispatch.h"

namespace kvlab::skinny {

namespace {

// __builtin_cpu_supports also checks that the OS saves the wider registers (XCR0), not only CPUID.
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_avx512() { return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"); }
bool has_avx512bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }

// AMX's tile data is an XSAVE state component that Linux hands out per process on request (the
// kernel's Documentation/arch/x86/xstate.rst, "Using dynamically enabled XSTATE features in user
// space applications"): until ARCH_REQ_XCOMP_PERM grants XFEATURE_XTILEDATA, the first tile
// instruction faults. Asked once per process, here, before any AMX kernel can run; the grant holds
// for every thread of the process. The AMX kernel falls back to AVX512-BF16 for what tiles cannot
// take, so it needs that too.
bool has_amx() {
  static const bool ready = [] {
    if (!has_avx512bf16() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16"))
      return false;
#ifdef __linux__
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return ready;
}

// Best first: the order in which variants are offered to the calibration.
const Variant kVariants[] = {
    {"amx", has_amx, avx512_f32, amx_bf16, true, avx512_f32_peak, avx512bf16_bf16_peak},  // float32: AVX-512
    {"avx512bf16", has_avx512bf16, avx512_f32, avx512bf16_bf16, true, avx512_f32_peak, avx512bf16_bf16_peak},
    {"avx512", has_avx512, avx512_f32, avx512_bf16, false, avx512_f32_peak, avx512_f32_peak},
    {"avx2", has_avx2, avx2_f32, avx2_bf16, false, avx2_f32_peak, avx2_f32_peak},
};

}  // namespace

const Variant& find_variant(const std::string& name) {
  for (const Variant& v : kVariants)
    if (name == v.name) {
      TORCH_CHECK(v.supported(), "skinny_linear: variant '", name, "' needs instructions this CPU lacks");
      return v;
    }
  TORCH_CHECK(false, "skinny_linear: unknown variant '", name, "' (amx, avx512bf16, avx512 or avx2)");
}

Choice parse_variant(const std::string& name) {
  const size_t slash = name.find('/');
  if (slash == std::string::npos) return {find_variant(name), OneRow::kWalk};
  const std::string option = name.substr(slash);
  TORCH_CHECK(option == "/nt" || option == "/tiles", "skinny_linear: unknown variant option '", option, "' in '",
              name, "' (/nt or /tiles)");
  return {find_variant(name.substr(0, slash)), option == "/nt" ? OneRow::kWalkNonTemporal : OneRow::kTiles};
}

std::vector<std::string> skinny_variants() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.supported()) names.emplace_back(v.name);
  return names;
}

}  // namespace kvlab::skinny

namespace {

namespace sk = kvlab::skinny;
using sk::find_variant;
using sk::Variant;
using sk::skinny_variants;

// x (M, K) and weight (N, K) in one dtype, bias (N,) or none -> (M, N) in that dtype. The float32
// result is rounded once, after the bias.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         c10::string_view variant_name) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "skinny_linear: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "skinny_linear: x (M, K) and weight (N, K)");
  TORCH_CHECK(x.size(1) == weight.size(1), "skinny_linear: x has ", x.size(1), " columns, weight has ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "skinny_linear: x and weight must share a dtype");
  TORCH_CHECK(weight.is_contiguous(), "skinny_linear: weight must be contiguous");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "skinny_linear: float32 or bfloat16 only, got ", weight.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "skinny_linear: bias must be (N,)");
  const sk::Choice choice = sk::parse_variant(std::string(variant_name));
  const Variant& variant = choice.variant;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  // The few rows of x are converted once per call (if at all), never per weight row.
  const at::Tensor xin = (bf16 && variant.bf16_reads_bf16_inputs) ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const sk::Problem problem{xin.const_data_ptr(), weight.const_data_ptr(), y.mutable_data_ptr<float>(), M, K, N,
                            choice.one_row};
  const sk::Kernel kernel = bf16 ? variant.bf16 : variant.f32;
  // Threads split the weight rows in whole blocks, so each streams its own share exactly once;
  // a chunk of at least 64 KiB of weights pays for waking a thread.
  const int64_t blocks = (N + sk::kBlockRows - 1) / sk::kBlockRows;
  const int64_t block_bytes = sk::kBlockRows * K * weight.element_size();
  const int64_t grain = std::max<int64_t>(1, (int64_t{64} << 10) / std::max<int64_t>(1, block_bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    kernel(problem, begin * sk::kBlockRows, std::min(N, end * sk::kBlockRows));
  });
  if (bias.has_value()) y.add_(*bias);
  return y.to(x.scalar_type());
}

// FLOP/s of the variant's multiply-add at `dtype` ("float32" or "bfloat16") on registers, every thread
// running `iterations` rounds of it at once: the arithmetic peak the variant's kernels can approach.
double skinny_peak_flops(c10::string_view variant_name, c10::string_view dtype, int64_t iterations) {
  TORCH_CHECK(iterations >= 1, "skinny_peak_flops: iterations must be >= 1, got ", iterations);
  TORCH_CHECK(dtype == "float32" || dtype == "bfloat16", "skinny_peak_flops: dtype float32 or bfloat16, got ",
              std::string(dtype));
  const Variant& variant = sk::parse_variant(std::string(variant_name)).variant;
  const sk::PeakLoop loop = dtype == "bfloat16" ? variant.bf16_peak : variant.f32_peak;
  const int64_t threads = at::get_num_threads();
  std::vector<double> flops(threads, 0.0);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) flops[t] = loop(iterations);
  });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double total = 0.0;
  for (double f : flops) total += f;
  return total / seconds;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) {
  m.def("skinny_linear(Tensor x, Tensor weight, Tensor? bias, str variant) -> Tensor");
  m.def("skinny_peak_flops(str variant, str dtype, int iterations) -> float", &skinny_peak_flops);
  m.def("skinny_variants() -> str[]", &skinny_variants);  // no tensor argument: one kernel for all
}

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
