// Quantized weights on the CPU (kvlab/quant/formats.py's layout, quant_variants.h):
//   quant_linear      y = x @ dequantize(w)^T (+ bias) for decode-sized x, streaming the packed codes
//                     once and dequantizing in registers (quant_tile.h, one translation unit per ISA);
//   quant_dequantize  the float32 rows of w (all, or the selected ones): an embedding lookup, and the
//                     tile-at-a-time dequantization a prefill's float GEMM takes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "quant_variants.h"
#include "skinny_dispatch.h"
#include "vec.h"

namespace {

namespace qt = kvlab::quant;

struct Format {
  int64_t N, K, Kp, G, group_size;
  int bits;
};

Format check_format(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                    int64_t bits, int64_t group_size, int64_t in_features) {
  TORCH_CHECK(data.device().is_cpu() && scales.device().is_cpu(), "quantized weights: CPU tensors only");
  TORCH_CHECK(bits == 4 || bits == 8, "quantized weights: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(in_features > 0 && group_size > 0, "quantized weights: K and group_size must be positive");
  TORCH_CHECK(group_size == in_features || group_size % qt::kBlockColumns == 0,
              "quantized weights: group_size must be K or a multiple of 32, got ", group_size);
  const int64_t Kp = (in_features + qt::kBlockColumns - 1) / qt::kBlockColumns * qt::kBlockColumns;
  const int64_t G = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kHalf && scales.is_contiguous(),
              "quantized weights: scales must be contiguous float16 (N, G)");
  const int64_t N = scales.size(0);
  TORCH_CHECK(scales.size(1) == G, "quantized weights: ", scales.size(1), " scale groups, expected ", G);
  TORCH_CHECK(data.dim() == 2 && data.size(0) == N && data.is_contiguous(), "quantized weights: data must be contiguous (N, ...)");
  if (bits == 8) {
    TORCH_CHECK(data.scalar_type() == at::kChar && data.size(1) == in_features, "int8 weights: data must be int8 (N, K)");
    TORCH_CHECK(!offsets.has_value(), "int8 weights are symmetric: no offsets");
  } else {
    TORCH_CHECK(data.scalar_type() == at::kByte && data.size(1) == Kp / 2, "int4 weights: data must be uint8 (N, ", Kp / 2, ")");
  }
  if (offsets.has_value())
    TORCH_CHECK(offsets->sizes() == scales.sizes() && offsets->scalar_type() == at::kHalf && offsets->is_contiguous(),
                "quantized weights: offsets must be contiguous float16 shaped like scales");
  return {N, in_features, Kp, G, group_size, static_cast<int>(bits)};
}

bool cpu_runs(const char* name) {
  const std::vector<std::string> names = kvlab::skinny::skinny_variants();
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Asked once per process: every call picks its kernel by name.
bool has_avx512() {
  static const bool supported = cpu_runs("avx512");
  return supported;
}

bool has_vnni() {
  static const bool supported = has_avx512() && __builtin_cpu_supports("avx512vnni");
  return supported;
}

std::vector<std::string> quant_variants() {
  std::vector<std::string> names;
  if (has_vnni()) {
    names.emplace_back("avx512vnni-x16");
    names.emplace_back("avx512vnni");
  }
  if (has_avx512()) names.emplace_back("avx512");
  names.emplace_back("avx2");
  return names;
}

}  // namespace

namespace kvlab::quant {

Kernel find_kernel(const std::string& name) {
  if (name == "avx512vnni-x16") {
    TORCH_CHECK(has_vnni(), "quant_linear: variant 'avx512vnni-x16' needs instructions this CPU lacks");
    return avx512vnni_x16;
  }
  if (name == "avx512vnni") {
    TORCH_CHECK(has_vnni(), "quant_linear: variant 'avx512vnni' needs instructions this CPU lacks");
    return avx512vnni;
  }
  if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "quant_linear: variant 'avx512' needs instructions this CPU lacks");
    return avx512;
  }
  TORCH_CHECK(name == "avx2", "quant_linear: unknown variant '", name, "' (avx512vnni-x16, avx512vnni, avx512 or avx2)");
  return avx2;
}

}  // namespace kvlab::quant

namespace {

// The input rows as the integer-dot-product kernel reads them (quant_avx512vnni.cpp): int8 codes per
// 32-column block with a scale of the block's absmax / 127, in each 64-column chunk's lane order (int4:
// block A's columns 0-15, B's 0-15, A's 16-31, B's 16-31, the order of the unpacked nibbles; int8: A
// then B), each lane's scale, each lane's -128 * (sum of its four codes) for int8 weights, and per
// weight group the sum of the dequantized codes (the offsets' share).
struct QuantizedInputs {
  at::Tensor codes, scales, correction, group_sums, chunk_groups;
  int64_t chunks;
};

QuantizedInputs quantize_inputs(const at::Tensor& xin, const Format& f) {
  const int64_t M = xin.size(0), chunks = (f.Kp + 2 * qt::kBlockColumns - 1) / (2 * qt::kBlockColumns);
  QuantizedInputs q{at::zeros({M, chunks, 64}, xin.options().dtype(at::kChar)),
                    at::zeros({M, chunks, 16}, xin.options()), at::zeros({M, chunks, 16}, xin.options().dtype(at::kInt)),
                    at::zeros({M, f.G}, xin.options()), at::empty({chunks, 2}, xin.options().dtype(at::kInt)),
                    chunks};
  int32_t* groups = q.chunk_groups.mutable_data_ptr<int32_t>();
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t a = 2 * c * qt::kBlockColumns, b = a + qt::kBlockColumns;
    groups[2 * c] = static_cast<int32_t>(a / f.group_size);
    groups[2 * c + 1] = b < f.K ? static_cast<int32_t>(b / f.group_size) : -1;
  }
  const float* x = xin.const_data_ptr<float>();
  auto* codes = q.codes.mutable_data_ptr<int8_t>();
  float* scales = q.scales.mutable_data_ptr<float>();
  int32_t* correction = q.correction.mutable_data_ptr<int32_t>();
  float* group_sums = q.group_sums.mutable_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < f.Kp / qt::kBlockColumns; ++b) {
      const float* block = x + m * f.Kp + b * qt::kBlockColumns;
      float absmax = 0.0f;
      bool finite = true;
      for (int j = 0; j < qt::kBlockColumns; ++j) {
        absmax = std::max(absmax, std::fabs(block[j]));
        finite = finite && std::isfinite(block[j]);
      }
      // A block holding inf or NaN gets a NaN scale, so the row's outputs are NaN as the float
      // variants' would be (std::max drops a NaN, and a NaN cast to int8 is undefined).
      const float scale = finite ? absmax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      const float inverse = finite && absmax > 0.0f ? 127.0f / absmax : 0.0f;
      const int64_t chunk = b / 2, half = b % 2, at = m * chunks + chunk;
      for (int lane = 0; lane < 16; ++lane) {
        const bool in_b = f.bits == 4 ? (lane / 4) % 2 == 1 : lane >= 8;
        if (in_b == (half == 1)) scales[at * 16 + lane] = scale;
      }
      for (int j = 0; j < qt::kBlockColumns; ++j) {
        const int8_t code = static_cast<int8_t>(std::clamp(std::nearbyint(block[j] * inverse), -127.0f, 127.0f));
        const int64_t position = f.bits == 4 ? (j < 16 ? 0 : 32) + half * 16 + j % 16 : half * 32 + j;
        codes[at * 64 + position] = code;
        if (f.bits == 8) correction[at * 16 + position / 4] -= 128 * code;
        const int64_t column = b * qt::kBlockColumns + j;
        if (column < f.K) group_sums[m * f.G + column / f.group_size] += scale * code;
      }
    }
  }
  return q;
}

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales,
                        const std::optional<at::Tensor>& offsets, int64_t bits, int64_t group_size,
                        int64_t in_features, const std::optional<at::Tensor>& bias, c10::string_view variant) {
  const Format f = check_format(data, scales, offsets, bits, group_size, in_features);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == f.K, "quant_linear: x must be a CPU (M, ", f.K, ") tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "quant_linear: x must be float32, bfloat16 or float16");
  if (bias.has_value()) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == f.N, "quant_linear: bias must be (N,)");
  const std::string name(variant);
  qt::Kernel kernel = qt::find_kernel(name);
  // The integer kernel keeps a tile row's group scales on the stack (at most 64 groups: K up to 2,048
  // at group 32); a matrix with more groups takes the float AVX-512 kernel.
  bool integer_inputs = name == "avx512vnni";
  if (integer_inputs && f.G > 64) {
    kernel = qt::avx512;
    integer_inputs = false;
  }
  const int64_t M = x.size(0);
  // The few input rows once, as float32 padded with zeros to whole blocks: the kernels then read
  // whole vectors of x everywhere, and a padded weight column meets a zero.
  at::Tensor xin;
  if (f.K == f.Kp && x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xin = x;  // already whole blocks of float32: no copy
  } else {
    xin = at::zeros({M, f.Kp}, x.options().dtype(at::kFloat));
    xin.narrow(1, 0, f.K).copy_(x);
  }
  // Per group, the sum of each input row's values: the offsets' share of the product (quant_tile.h).
  // int8 has no offsets; the integer kernel takes the sums of its rounded inputs (quantize_inputs).
  at::Tensor xsum = at::zeros({M, f.G}, xin.options());
  if (f.bits == 4 && !integer_inputs) {
    const float* xs = xin.const_data_ptr<float>();
    float* sums = xsum.mutable_data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) kvlab::group_sums(xs + m * f.Kp, f.K, f.group_size, sums + m * f.G);
  }
  at::Tensor y = at::empty({M, f.N}, x.options().dtype(at::kFloat));
  const QuantizedInputs quantized = integer_inputs ? quantize_inputs(xin, f) : QuantizedInputs{};
  qt::Problem problem{
      xin.const_data_ptr<float>(),
      data.const_data_ptr(),
      reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::Half>()),
      offsets.has_value() ? reinterpret_cast<const uint16_t*>(offsets->const_data_ptr<at::Half>()) : nullptr,
      (integer_inputs ? quantized.group_sums : xsum).const_data_ptr<float>(),
      y.mutable_data_ptr<float>(),
      M, f.K, f.Kp, f.N, f.group_size, f.G, f.bits};
  if (integer_inputs) {
    problem.xq = quantized.codes.const_data_ptr<int8_t>();
    problem.xscale = quantized.scales.const_data_ptr<float>();
    problem.xcorrection = quantized.correction.const_data_ptr<int32_t>();
    problem.chunk_groups = quantized.chunk_groups.const_data_ptr<int32_t>();
    problem.chunks = quantized.chunks;
  }
  // Threads split the weight rows in whole blocks, each chunk at least 32 KiB of codes.
  const int64_t blocks = (f.N + qt::kBlockRows - 1) / qt::kBlockRows;
  const int64_t block_bytes = qt::kBlockRows * (f.bits == 8 ? f.K : f.Kp / 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(1, block_bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    kernel(problem, begin * qt::kBlockRows, std::min(f.N, end * qt::kBlockRows));
  });
  if (bias.has_value()) y.add_(*bias);
  return y.to(x.scalar_type());
}

// Row r of the codes -> out (K floats): q * scale + offset, group by group, 8 columns at a time (a
// prefill dequantizes every weight it multiplies: a scalar loop here cost more than the GEMM).
void dequantize_row(const Format& f, const uint8_t* codes, const at::Half* scales, const at::Half* offsets, float* out) {
  for (int64_t g = 0; g < f.G; ++g) {
    const float s = static_cast<float>(scales[g]);
    const float o = offsets != nullptr ? static_cast<float>(offsets[g]) : (f.bits == 4 ? -8.0f * s : 0.0f);
    const __m256 scale = _mm256_set1_ps(s), offset = _mm256_set1_ps(o);
    const int64_t begin = g * f.group_size, end = std::min(f.K, (g + 1) * f.group_size);
    int64_t k = begin;
    if (f.bits == 8) {
      const auto* q = reinterpret_cast<const int8_t*>(codes);
      for (; k + 8 <= end; k += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
        _mm256_storeu_ps(out + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale, offset));
      }
      for (; k < end; ++k) out[k] = static_cast<float>(q[k]) * s + o;
    } else {
      // Whole 32-column blocks (groups are whole blocks but for the last, which may end inside one):
      // byte j of a block holds column j (low nibble) and column j + 16 (high nibble).
      for (; k + qt::kBlockColumns <= end; k += qt::kBlockColumns) {
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k / 2));
        const __m128i low = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
        const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
        for (int half = 0; half < 2; ++half) {
          const __m128i nibbles = half == 0 ? low : high;
          const __m256 first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(nibbles));
          const __m256 second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(nibbles, 8)));
          _mm256_storeu_ps(out + k + 16 * half, _mm256_fmadd_ps(first, scale, offset));
          _mm256_storeu_ps(out + k + 16 * half + 8, _mm256_fmadd_ps(second, scale, offset));
        }
      }
      for (; k < end; ++k) {
        const int64_t block = k / qt::kBlockColumns, j = k % qt::kBlockColumns;
        const uint8_t byte = codes[block * (qt::kBlockColumns / 2) + (j & 15)];
        out[k] = static_cast<float>(j < 16 ? (byte & 0x0F) : (byte >> 4)) * s + o;
      }
    }
  }
}

at::Tensor quant_dequantize(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                            int64_t bits, int64_t group_size, int64_t in_features, const std::optional<at::Tensor>& rows,
                            const std::optional<at::Tensor>& out_buffer) {
  const Format f = check_format(data, scales, offsets, bits, group_size, in_features);
  at::Tensor index;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong || rows->scalar_type() == at::kInt,
                "quant_dequantize: rows must be int64 or int32 indices");
    index = rows->to(at::kLong).contiguous().view({-1});
    if (index.numel() > 0) {
      TORCH_CHECK(index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < f.N,
                  "quant_dequantize: row index out of range [0, ", f.N, ")");
    }
  } else {
    index = at::arange(f.N, data.options().dtype(at::kLong));
  }
  const int64_t R = index.numel();
  at::Tensor out;
  if (out_buffer.has_value()) {
    TORCH_CHECK(out_buffer->scalar_type() == at::kFloat && out_buffer->is_contiguous() && out_buffer->device().is_cpu() &&
                    out_buffer->sizes() == at::IntArrayRef({R, f.K}),
                "quant_dequantize: out must be a contiguous float32 CPU tensor (", R, ", ", f.K, ")");
    out = *out_buffer;
  } else {
    out = at::empty({R, f.K}, scales.options().dtype(at::kFloat));
  }
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const auto* codes = static_cast<const uint8_t*>(data.const_data_ptr());
  const int64_t row_bytes = f.bits == 8 ? f.K : f.Kp / 2;
  const at::Half* scale = scales.const_data_ptr<at::Half>();
  const at::Half* offset = offsets.has_value() ? offsets->const_data_ptr<at::Half>() : nullptr;
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = idx[i];
      dequantize_row(f, codes + r * row_bytes, scale + r * f.G, offset ? offset + r * f.G : nullptr, dst + i * f.K);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) {
  m.def(
      "quant_linear(Tensor x, Tensor data, Tensor scales, Tensor? offsets, int bits, int group_size, "
      "int in_features, Tensor? bias, str variant) -> Tensor");
  m.def(
      "quant_dequantize(Tensor data, Tensor scales, Tensor? offsets, int bits, int group_size, "
      "int in_features, Tensor? rows, Tensor(a!)? out=None) -> Tensor");
  m.def("quant_variants() -> str[]", &quant_variants);
}

TORCH_LIBRARY_IMPL(kvlab, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
}
