// A whole decode step of a Llama-architecture model (Llama, SmolLM2, Mistral-style GQA) in one op:
// for each layer RMSNorm -> q/k/v -> RoPE -> K/V into the paged cache -> attention -> o_proj ->
// residual + RMSNorm -> SiLU(gate) * up -> down -> residual, then the final norm.
//
// Why one op: at batch 1 a step reads every weight once, so it should cost the weight bytes over the
// memory bandwidth. Issued as ~12 torch ops per layer, it also pays each op's dispatch and each
// parallel region's wake-up and join (~10 us apiece, 30 layers): 4-6 ms per step on a 2-core
// machine, a third of a bf16 step of SmolLM2. Here the threads enter one OpenMP region per step and
// meet at six barriers per layer, as llama.cpp's graph compute does. Each thread keeps its own
// copy of the residual stream and normalises it itself (a few hundred values): the norms need no
// barrier, and every thread computes the same values in the same order.
//
// The matmuls are the skinny GEMM's kernels (skinny_tile.h), or the quantized GEMM's (quant_tile.h) for
// a quantized model's matrices (read packed, dequantized in registers), with the threads splitting weight rows;
// attention is decode_attention.h, split by (request, kv head). Values are rounded to the model's
// dtype where the op-by-op forward (kvlab/models/llama.py) rounds them, so both give the same
// tokens; activations stay in float32 between those points.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <utility>
#include <string>
#include <vector>

#include "decode_attention.h"
#include "paged_checks.h"
#include "quant_variants.h"
#include "rms_norm_row.h"
#include "skinny_dispatch.h"

namespace {

namespace sk = kvlab::skinny;
namespace qt = kvlab::quant;

template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// A float32 activation and, for a GEMM whose kernel reads bf16 inputs (vdpbf16ps), its bf16 copy.
struct Activation {
  float* f;
  c10::BFloat16* b;  // null unless the kernel reads bf16
};

// A weight matrix (out, in): in the model's dtype, or quantized (kvlab/quant/formats.py's layout:
// codes, float16 scales and offsets per group) when `scales` is set.
struct Matrix {
  const void* w;
  const uint16_t* scales = nullptr;
  const uint16_t* offsets = nullptr;
  int64_t group_size = 0;
  int bits = 0;
};

// The kernels a step's matmuls run, and this thread's room for a quantized GEMM's per-group input sums.
struct Gemm {
  sk::Kernel dense;
  sk::OneRow one_row;
  qt::Kernel quantized;
  std::vector<float>* group_sums;
};

// y[:, lo:hi] = x @ w[lo:hi]^T. `xf` is x in float32 (what the quantized kernel reads), `xk` x as the
// dense kernel reads it (its bf16 copy for vdpbf16ps, else xf).
void multiply(const Gemm& gemm, const Matrix& w, const float* xf, const void* xk, int64_t M, int64_t K, int64_t N,
              float* y, int64_t lo, int64_t hi) {
  if (w.scales == nullptr) {
    gemm.dense(sk::Problem{xk, w.w, y, M, K, N, gemm.one_row}, lo, hi);
    return;
  }
  // Each thread sums its own copy of the few input values per group (the offsets' share of the product,
  // quant_tile.h): cheaper than a barrier. K is a multiple of 32 here, so x needs no padding.
  // int8 is symmetric: no offsets, so no sums (the kernel skips the term).
  const int64_t G = (K + w.group_size - 1) / w.group_size;
  std::vector<float>& sums = *gemm.group_sums;
  sums.assign(M * G, 0.0f);
  if (w.bits == 4)
    for (int64_t m = 0; m < M; ++m) kvlab::group_sums(xf + m * K, K, w.group_size, sums.data() + m * G);
  gemm.quantized(qt::Problem{xf, w.w, w.scales, w.offsets, sums.data(), y, M, K, K, N, w.group_size, G, w.bits}, lo,
                 hi);
}

struct Part {
  Matrix w;
  int64_t rows;
  float* y;  // (M, rows)
};

// Thread tid's rows [lo, hi) of `rows` weight rows: whole kBlockRows blocks, as equal as they come.
std::pair<int64_t, int64_t> row_share(int64_t rows, int tid, int threads) {
  const int64_t blocks = (rows + sk::kBlockRows - 1) / sk::kBlockRows;
  return {std::min(rows, blocks * tid / threads * sk::kBlockRows),
          std::min(rows, blocks * (tid + 1) / threads * sk::kBlockRows)};
}

// This thread's share of y = x @ [parts]^T: the parts' rows are split as one concatenated matrix,
// in whole kBlockRows blocks, so each thread streams an equal slice of the weights exactly once.
template <int kParts>
void gemm_share(const Gemm& gemm, const float* xf, const void* xk, int64_t M, int64_t K, const Part (&parts)[kParts],
                int tid, int threads) {
  int64_t total = 0;
  for (const Part& p : parts) total += p.rows;
  const auto [lo, hi] = row_share(total, tid, threads);
  int64_t offset = 0;
  for (const Part& p : parts) {
    const int64_t begin = std::max(lo, offset) - offset, end = std::min(hi, offset + p.rows) - offset;
    if (begin < end) multiply(gemm, p.w, xf, xk, M, K, p.rows, p.y, begin, end);
    offset += p.rows;
  }
}


void to_bf16(const float* in, c10::BFloat16* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) kvlab::store8(out + i, kvlab::round_bf16(_mm256_loadu_ps(in + i)));
  for (; i < n; ++i) out[i] = static_cast<c10::BFloat16>(in[i]);
}

// res += y, rounded as the op-by-op forward rounds: y as its op returns it, the sum as the residual holds it.
template <typename T>
void add_rounded(float* res, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 sum = _mm256_add_ps(_mm256_loadu_ps(res + i), kvlab::round8<T>(_mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(res + i, kvlab::round8<T>(sum));
  }
  for (; i < n; ++i) res[i] = round_to<T>(res[i] + round_to<T>(y[i]));
}

// h = SiLU(gate) * up (Ramachandran et al. 2017: x * sigmoid(x)), with the model dtype's roundings of
// the op-by-op forward: gate and up as their matmul returns them, SiLU's output, the product.
template <typename T>
void silu_mul(const float* gate, const float* up, float* h, int64_t n) {
  const auto round = [](__m256 v) { return kvlab::round8<T>(v); };
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 g = round(_mm256_loadu_ps(gate + j)), u = round(_mm256_loadu_ps(up + j));
    const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, kvlab::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(h + j, round(_mm256_mul_ps(round(_mm256_mul_ps(g, sigmoid)), u)));
  }
  for (; j < n; ++j) {
    const float g = round_to<T>(gate[j]), u = round_to<T>(up[j]);
    h[j] = round_to<T>(round_to<T>(g / (1.f + std::exp(-g))) * u);
  }
}

struct Shapes {
  int64_t M, hidden, H, KH, D, I, rotary_half, layers;
  float eps, scale;
};

struct LayerWeights {
  Matrix q, k, v, o, gate, up, down;
  const void *input_norm, *post_norm;
};

struct LayerCache {
  void *keys, *values;
  int64_t block_size;
  const int64_t* slots;     // (M,) flat slot of each row's new token
  const int32_t* seq_lens;  // (M,) context length including the new token
  const int32_t* tables;    // (M, width)
  int64_t width;
};

// The step's inputs, looked up inside the op: row ids[m] of the embedding table and row positions[m]
// of the RoPE tables. Gathered in Python they were three indexing ops per token, ~0.2 ms on a cold
// cache (every step streams the weights through all of them), 3% of a bf16 SmolLM2 token.
template <typename T>
struct StepInputs {
  const int64_t* ids;        // (M,)
  const int64_t* positions;  // (M,)
  const T* embedding;        // (vocab, hidden)
  const T* cos;              // (positions, rotary_half)
  const T* sin;
};

// The LM head, when the step ends in logits: a (vocab, hidden) matrix in the model's dtype.
struct Head {
  const void* w = nullptr;
  int64_t vocab = 0;
};

template <typename T>
void decode_layers(const Shapes& s, const std::vector<LayerWeights>& weights, const std::vector<LayerCache>& caches,
                   const T* final_norm, const StepInputs<T>& inputs, const Head& head, T* out,
                   const sk::Choice& choice, qt::Kernel quantized) {
  const sk::Variant& variant = choice.variant;
  constexpr bool kHalf = std::is_same_v<T, c10::BFloat16>;
  const sk::Kernel kernel = kHalf ? variant.bf16 : variant.f32;
  const bool bf16_inputs = kHalf && variant.bf16_reads_bf16_inputs;
  const int64_t M = s.M, hidden = s.hidden, H = s.H, KH = s.KH, D = s.D, I = s.I, G = H / KH;
  const int64_t q_size = H * D, kv_size = KH * D;
  int64_t max_len = 1;
  for (const LayerCache& c : caches)
    for (int64_t m = 0; m < M; ++m) max_len = std::max<int64_t>(max_len, c.seq_lens[m]);

  const int threads = std::max(1, at::get_num_threads());
  // Attention is split into shares of each (request, kv head) context, an equal number per thread.
  const int64_t items = M * KH;
  const int64_t shares = kvlab::context_shares(items, threads, max_len);
  const int64_t units = items * shares, share_len = (max_len + shares - 1) / shares + 1;
  // Shared between threads (each writes a disjoint part between two barriers).
  std::vector<float> q(M * q_size), k(M * kv_size), v(M * kv_size), o(M * hidden);
  std::vector<float> gate(M * I), up(M * I), h(M * I), down(M * hidden);
  std::vector<float> part_acc(units * G * D), part_max(units * G), part_sum(units * G);
  std::vector<c10::BFloat16> h_b(bf16_inputs ? M * I : 0);
  // float32 writes `out` directly; bf16 rounds each thread's share of this into `out`. Left uninitialised:
  // at 16 rows zeroing it (3 MiB) was 2% of a step.
  const std::unique_ptr<float[]> logits(head.w != nullptr && kHalf ? new float[M * head.vocab] : nullptr);
  // Private per thread: the residual stream, its normalised copy, the attention output, scratch.
  std::vector<std::vector<float>> residual(threads), normed(threads), attention(threads), scratch(threads),
      group_sums(threads);
  std::vector<std::vector<c10::BFloat16>> normed_b(threads), attention_b(threads);

#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float>& res = residual[tid];
    std::vector<float>& x = normed[tid];
    std::vector<float>& attn = attention[tid];
    std::vector<c10::BFloat16>& attn_b = attention_b[tid];
    res.resize(M * hidden);
    x.resize(M * hidden);
    attn.resize(M * q_size);
    scratch[tid].resize(G * share_len + G * D);
    if (bf16_inputs) {
      normed_b[tid].resize(M * hidden);
      attn_b.resize(M * q_size);
    }
    const Gemm gemm{kernel, choice.one_row, quantized, &group_sums[tid]};
    float* scores = scratch[tid].data();
    float* q_group = scores + G * share_len;
    for (int64_t m = 0; m < M; ++m) {
      const T* row = inputs.embedding + inputs.ids[m] * hidden;
      for (int64_t i = 0; i < hidden; ++i) res[m * hidden + i] = static_cast<float>(row[i]);
    }
    const auto normalise = [&](const void* norm_weight) {
      for (int64_t m = 0; m < M; ++m)
        kvlab::normalise_row(res.data() + m * hidden, static_cast<const T*>(norm_weight), x.data() + m * hidden,
                             hidden, s.eps);
      if (bf16_inputs) to_bf16(x.data(), normed_b[tid].data(), M * hidden);
    };
    // RoPE of one head of request m, rounded as kvlab/kernels/rotary.cpp rounds.
    const auto rotate = [&](const float* in, int64_t m, float* rotated) {
      const T* c_row = inputs.cos + inputs.positions[m] * s.rotary_half;
      const T* s_row = inputs.sin + inputs.positions[m] * s.rotary_half;
      for (int64_t i = 0; i < D; ++i) rotated[i] = round_to<T>(in[i]);
      for (int64_t i = 0; i < s.rotary_half; ++i) {
        const float a = rotated[i], b = rotated[i + s.rotary_half];
        const float ci = static_cast<float>(c_row[i]), si = static_cast<float>(s_row[i]);
        rotated[i] = round_to<T>(a * ci - b * si);
        rotated[i + s.rotary_half] = round_to<T>(b * ci + a * si);
      }
    };
    const auto input = [&](const float* f, const c10::BFloat16* b) -> const void* { return bf16_inputs ? static_cast<const void*>(b) : f; };
    // A sublayer's output is rounded as the op it replaces returns it, then added.
    const auto add_to_residual = [&](const float* y) { add_rounded<T>(res.data(), y, M * hidden); };
    normalise(weights[0].input_norm);

    for (int64_t l = 0; l < s.layers; ++l) {
      const LayerWeights& w = weights[l];
      const LayerCache& c = caches[l];
      const Part qkv[3] = {{w.q, q_size, q.data()}, {w.k, kv_size, k.data()}, {w.v, kv_size, v.data()}};
      gemm_share(gemm, x.data(), input(x.data(), normed_b[tid].data()), M, hidden, qkv, tid, nt);
#pragma omp barrier
      // The new tokens' keys (rotated) and values into their slots, per (request, kv head).
      for (int64_t item = tid; item < items; item += nt) {
        const int64_t m = item / KH, kh = item % KH;
        float key[512];
        rotate(k.data() + m * kv_size + kh * D, m, key);
        T* key_slot = static_cast<T*>(c.keys) + (c.slots[m] * KH + kh) * D;
        T* value_slot = static_cast<T*>(c.values) + (c.slots[m] * KH + kh) * D;
        const float* value = v.data() + m * kv_size + kh * D;
        for (int64_t i = 0; i < D; ++i) {
          key_slot[i] = static_cast<T>(key[i]);
          value_slot[i] = static_cast<T>(value[i]);
        }
      }
#pragma omp barrier
      // Attention in shares of (request, kv head, stretch of the context), an equal number per thread.
      for (int64_t unit = units * tid / nt; unit < units * (tid + 1) / nt; ++unit) {
        const int64_t item = unit / shares, share = unit % shares;
        const int64_t m = item / KH, kh = item % KH, L = c.seq_lens[m];
        for (int64_t g = 0; g < G; ++g) {
          rotate(q.data() + m * q_size + (kh * G + g) * D, m, q_group + g * D);
          for (int64_t i = 0; i < D; ++i) q_group[g * D + i] *= s.scale;
        }
        const kvlab::PagedContext<T> context{static_cast<const T*>(c.keys), static_cast<const T*>(c.values),
                                             c.tables + m * c.width, L, c.block_size, KH, D};
        kvlab::attend_share(context, kh, q_group, G, L * share / shares, L * (share + 1) / shares, scores,
                            part_acc.data() + unit * G * D, part_max.data() + unit * G, part_sum.data() + unit * G);
      }
#pragma omp barrier
      // Every thread merges all shares into its own copy of the attention output (a few thousand
      // multiply-adds), which its o_proj share then reads: no barrier between the two.
      for (int64_t item = 0; item < items; ++item) {
        const int64_t first = item * shares;  // the item's shares are units first .. first + shares - 1
        float* a = attn.data() + (item / KH) * q_size + (item % KH) * G * D;
        kvlab::merge_shares(shares, G, D, part_acc.data() + first * G * D, part_max.data() + first * G,
                            part_sum.data() + first * G, a);
        for (int64_t i = 0; i < G * D; ++i) a[i] = round_to<T>(a[i]);
      }
      if (bf16_inputs) to_bf16(attn.data(), attn_b.data(), M * q_size);
      const Part o_part[1] = {{w.o, hidden, o.data()}};
      gemm_share(gemm, attn.data(), input(attn.data(), attn_b.data()), M, q_size, o_part, tid, nt);
#pragma omp barrier
      add_to_residual(o.data());
      normalise(w.post_norm);
      // SiLU(gate) * up over this thread's intermediate columns: gate and up rows are split alike,
      // so the product needs no barrier between the two matmuls.
      {
        const auto [lo, hi] = row_share(I, tid, nt);
        const void* xin = input(x.data(), normed_b[tid].data());
        if (lo < hi) {
          multiply(gemm, w.gate, x.data(), xin, M, hidden, I, gate.data(), lo, hi);
          multiply(gemm, w.up, x.data(), xin, M, hidden, I, up.data(), lo, hi);
        }
        for (int64_t m = 0; m < M; ++m) {
          silu_mul<T>(gate.data() + m * I + lo, up.data() + m * I + lo, h.data() + m * I + lo, hi - lo);
          if (bf16_inputs) to_bf16(h.data() + m * I + lo, h_b.data() + m * I + lo, hi - lo);
        }
      }
#pragma omp barrier
      const Part down_part[1] = {{w.down, hidden, down.data()}};
      gemm_share(gemm, h.data(), input(h.data(), h_b.data()), M, I, down_part, tid, nt);
#pragma omp barrier
      add_to_residual(down.data());
      normalise(l + 1 < s.layers ? weights[l + 1].input_norm : static_cast<const void*>(final_norm));
    }
    if (head.w == nullptr) {
      if (tid == 0)
        for (int64_t i = 0; i < M * hidden; ++i) out[i] = static_cast<T>(x[i]);
    } else {
      // The LM head on the final-normed hidden (which every thread holds), its rows split like the
      // layers' matmuls: no barrier, and no second parallel region or op call per step. Logits are
      // rounded to the model's dtype, as the op-by-op forward's matmul returns them.
      float* y = kHalf ? logits.get() : reinterpret_cast<float*>(out);
      const Part head_part[1] = {{Matrix{head.w}, head.vocab, y}};
      gemm_share(gemm, x.data(), input(x.data(), normed_b[tid].data()), M, hidden, head_part, tid, nt);
      if constexpr (kHalf) {
        const auto [lo, hi] = row_share(head.vocab, tid, nt);
        for (int64_t m = 0; m < M; ++m) to_bf16(y + m * head.vocab + lo, out + m * head.vocab + lo, hi - lo);
      }
    }
  }
}

void check_weight(const at::Tensor& w, int64_t rows, int64_t cols, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, "decode_step: ", name, " must be (", rows, ", ",
              cols, "), got ", w.sizes());
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu() && w.scalar_type() == dtype, "decode_step: ", name,
              " must be a contiguous CPU tensor in the model's dtype");
}

// A quantized matrix (rows, cols) as kvlab/quant/formats.py lays it out: int8 codes (rows, cols) or int4
// codes packed two per byte (rows, cols / 2), float16 scales (and offsets) per group of columns.
Matrix quantized_matrix(const at::Tensor& data, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                        int64_t group_size, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(cols % qt::kBlockColumns == 0, "decode_step: quantized ", name, " needs a multiple of 32 columns");
  TORCH_CHECK(group_size > 0 && (group_size == cols || group_size % qt::kBlockColumns == 0),
              "decode_step: quantized ", name, "'s group size must be its columns or a multiple of 32");
  const int bits = data.scalar_type() == at::kChar ? 8 : 4;
  TORCH_CHECK(data.scalar_type() == at::kChar || data.scalar_type() == at::kByte, "decode_step: quantized ", name,
              " codes must be int8 (8 bits) or uint8 (4 bits, packed)");
  TORCH_CHECK(data.dim() == 2 && data.size(0) == rows && data.size(1) == (bits == 8 ? cols : cols / 2) &&
                  data.is_contiguous() && data.device().is_cpu(),
              "decode_step: quantized ", name, " codes must be contiguous (", rows, ", ", bits == 8 ? cols : cols / 2,
              "), got ", data.sizes());
  const int64_t G = (cols + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == rows && scales.size(1) == G && scales.is_contiguous() &&
                  scales.scalar_type() == at::kHalf,
              "decode_step: quantized ", name, " scales must be contiguous float16 (", rows, ", ", G, ")");
  TORCH_CHECK(!offsets.has_value() || bits == 4, "decode_step: int8 ", name, " is symmetric: no offsets");
  if (offsets.has_value())
    TORCH_CHECK(offsets->sizes() == scales.sizes() && offsets->is_contiguous() && offsets->scalar_type() == at::kHalf,
                "decode_step: quantized ", name, " offsets must be shaped like its scales, float16");
  return Matrix{data.const_data_ptr(), reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::Half>()),
                offsets.has_value() ? reinterpret_cast<const uint16_t*>(offsets->const_data_ptr<at::Half>()) : nullptr,
                group_size, bits};
}

void check_vector(const at::Tensor& w, int64_t n, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n && w.is_contiguous() && w.scalar_type() == dtype, "decode_step: ", name,
              " must be a contiguous (", n, ",) tensor in the model's dtype");
}

}  // namespace

// What a step's weights and caches were checked against: the checks read the metadata of ~300
// tensors, cold on every step (the step itself streams the weights through every cache), so they run
// on a model's first step and again only when the step's shapes change.
struct StepShape {
  at::ScalarType dtype;
  int64_t hidden, H, KH, D;
  bool operator==(const StepShape& o) const {
    return dtype == o.dtype && hidden == o.hidden && H == o.H && KH == o.KH && D == o.D;
  }
};

// A model's per-layer step weights, handed to C++ once per model (a torch custom class): each step then
// passes one object where it passed nine lists of a tensor per layer and, for a quantized model, three
// lists of seven entries per layer. Converting those lists from Python cost 50 us per step in float32
// and 160 us in int8 (SmolLM2, 2-core Sapphire Rapids), 2% of an int8 token.
struct StepWeights : torch::CustomClassHolder {
  std::vector<at::Tensor> input_norms, q, k, v, o, post_norms, gate, up, down;
  c10::List<std::optional<at::Tensor>> scales, offsets;  // 7 per layer (q ... down), or empty: all dense
  std::vector<int64_t> group_sizes;
  std::mutex mutex;  // guards the two below (an engine and a generate call may share a model)
  std::optional<StepShape> checked;
  std::vector<LayerWeights> layers;  // the checked matrices and norms, for `checked`

  StepWeights(std::vector<at::Tensor> input_norms, std::vector<at::Tensor> q, std::vector<at::Tensor> k,
              std::vector<at::Tensor> v, std::vector<at::Tensor> o, std::vector<at::Tensor> post_norms,
              std::vector<at::Tensor> gate, std::vector<at::Tensor> up, std::vector<at::Tensor> down,
              c10::List<std::optional<at::Tensor>> scales, c10::List<std::optional<at::Tensor>> offsets,
              std::vector<int64_t> group_sizes)
      : input_norms(std::move(input_norms)), q(std::move(q)), k(std::move(k)), v(std::move(v)), o(std::move(o)),
        post_norms(std::move(post_norms)), gate(std::move(gate)), up(std::move(up)), down(std::move(down)),
        scales(std::move(scales)), offsets(std::move(offsets)), group_sizes(std::move(group_sizes)) {}

  // The layers' matrices and norms, checked against `shape` (on the first step of that shape).
  std::vector<LayerWeights> checked_layers(const StepShape& shape) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!(checked && *checked == shape)) {
      layers = check_layers(shape);
      checked = shape;
    }
    return layers;
  }

 private:
  std::vector<LayerWeights> check_layers(const StepShape& shape) const {
    const int64_t L = static_cast<int64_t>(q.size());
    TORCH_CHECK(L >= 1, "decode_step: no layers");
    for (const at::TensorList list : {at::TensorList(input_norms), at::TensorList(k), at::TensorList(v),
                                      at::TensorList(o), at::TensorList(post_norms), at::TensorList(gate),
                                      at::TensorList(up), at::TensorList(down)})
      TORCH_CHECK(static_cast<int64_t>(list.size()) == L, "decode_step: every per-layer list needs ", L, " entries");
    const bool quantized = !scales.empty();
    if (quantized)
      TORCH_CHECK(static_cast<int64_t>(scales.size()) == 7 * L && static_cast<int64_t>(offsets.size()) == 7 * L &&
                      static_cast<int64_t>(group_sizes.size()) == 7 * L,
                  "decode_step: a quantized model needs 7 scales, offsets and group sizes per layer");
    const int64_t hidden = shape.hidden, H = shape.H, KH = shape.KH, D = shape.D, I = gate[0].size(0);
    std::vector<LayerWeights> checked_layers;
    for (int64_t l = 0; l < L; ++l) {
      // Matrix j of layer l (q, k, v, o, gate, up, down), (rows, cols): dense or quantized.
      const auto matrix = [&](int j, const at::Tensor& w, int64_t rows, int64_t cols, const char* name) -> Matrix {
        const std::optional<at::Tensor> s = quantized ? scales.get(7 * l + j) : std::nullopt;
        if (!s.has_value()) {
          check_weight(w, rows, cols, shape.dtype, name);
          return Matrix{w.const_data_ptr()};
        }
        return quantized_matrix(w, *s, offsets.get(7 * l + j), group_sizes[7 * l + j], rows, cols, name);
      };
      const Matrix mq = matrix(0, q[l], H * D, hidden, "q"), mk = matrix(1, k[l], KH * D, hidden, "k"),
                   mv = matrix(2, v[l], KH * D, hidden, "v"), mo = matrix(3, o[l], hidden, H * D, "o"),
                   mgate = matrix(4, gate[l], I, hidden, "gate"), mup = matrix(5, up[l], I, hidden, "up"),
                   mdown = matrix(6, down[l], hidden, I, "down");
      check_vector(input_norms[l], hidden, shape.dtype, "input_norm");
      check_vector(post_norms[l], hidden, shape.dtype, "post_norm");
      checked_layers.push_back({mq, mk, mv, mo, mgate, mup, mdown, input_norms[l].const_data_ptr(),
                                post_norms[l].const_data_ptr()});
    }
    return checked_layers;
  }
};

// A forward's per-layer K/V caches, handed over once per cache set like StepWeights: passed as two
// lists, torch's Python op call walks every element of them on each step (checking for fake script
// objects, ~20 us) once any argument is a script object. The op writes into these caches: eager
// inference only (no autograd, no functionalization sees the writes). Checked on their first step.
struct StepCaches : torch::CustomClassHolder {
  std::vector<at::Tensor> keys, values;
  std::mutex mutex;
  std::optional<StepShape> checked;

  StepCaches(std::vector<at::Tensor> keys, std::vector<at::Tensor> values)
      : keys(std::move(keys)), values(std::move(values)) {}

  void check(const StepShape& shape) {
    std::lock_guard<std::mutex> lock(mutex);
    if (checked && *checked == shape) return;
    TORCH_CHECK(keys.size() == values.size(), "decode_step: as many key caches as value caches");
    for (size_t l = 0; l < keys.size(); ++l) {
      const at::Tensor& kc = keys[l];
      const at::Tensor& vc = values[l];
      TORCH_CHECK(kc.dim() == 4 && kc.size(2) == shape.KH && kc.size(3) == shape.D && kc.sizes() == vc.sizes(),
                  "decode_step: layer ", l, "'s caches must be (num_blocks, block_size, ", shape.KH, ", ", shape.D, ")");
      TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == shape.dtype &&
                      vc.scalar_type() == shape.dtype && kc.device().is_cpu() && vc.device().is_cpu(),
                  "decode_step: caches must be contiguous CPU tensors in the model's dtype");
    }
    checked = shape;
  }
};

namespace {

// A (M,) int64 index tensor whose entries must lie in [0, bound).
const int64_t* checked_indices(const at::Tensor& t, int64_t M, int64_t bound, const char* name, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == M && t.scalar_type() == at::kLong && t.is_contiguous() && t.device().is_cpu(),
              "decode_step: ", name, " must be a contiguous CPU (M,) int64 tensor");
  const int64_t* values = t.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(values[m] >= 0 && values[m] < bound, "decode_step: ", name, "[", m, "] = ", values[m],
                " is outside ", what, " [0, ", bound, ")");
  return values;
}

// input_ids, positions (M,) int64: the new tokens and their positions; `embedding` (vocab, hidden) the
// table the ids index (a quantized model's caller passes the dequantized rows and ids 0..M-1); cos/sin
// (positions, rotary_dim / 2) the RoPE tables the positions index; `step_weights` per layer: the weights
// as the HF model holds them (q, k, v, o, gate, up, down: (out, in)) and the norms; `step_caches` per
// layer: the K/V caches (num_blocks, block_size, KH, D); per layer, or one entry all layers read:
// slot_mapping (M,) int64, seq_lens (M,) and block_tables (M, width) int32 (layers of a press may hold
// different slots). -> final-normed hidden (M, hidden), or with `lm_head` (vocab, hidden) the logits
// (M, vocab). `variant` names the skinny GEMM kernels (the calibration's choice).
// A quantized model's step weights hold its matrices' codes as q ... down, and per layer seven entries
// (q, k, v, o, gate, up, down) of scales, offsets and group sizes (a None scale: that matrix is dense);
// `quant_variant` names the quantized GEMM kernel (a float one: the integer variant rounds inputs per
// GEMM call).
at::Tensor decode_step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& embedding,
                       const at::Tensor& cos, const at::Tensor& sin,
                       const c10::intrusive_ptr<StepWeights>& step_weights, const at::Tensor& final_norm,
                       const c10::intrusive_ptr<StepCaches>& step_caches, at::TensorList slot_mappings,
                       at::TensorList seq_lens, at::TensorList block_tables, int64_t num_heads, double eps,
                       double scale, c10::string_view variant_name, c10::string_view quant_variant_name,
                       const std::optional<at::Tensor>& lm_head) {
  const sk::Choice choice = sk::parse_variant(std::string(variant_name));
  TORCH_CHECK(embedding.dim() == 2 && embedding.is_contiguous() && embedding.device().is_cpu(),
              "decode_step: embedding must be a contiguous CPU (vocab, hidden) tensor");
  const at::ScalarType dtype = embedding.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_step: float32 or bfloat16 only, got ", dtype);
  const int64_t M = input_ids.numel(), hidden = embedding.size(1);
  TORCH_CHECK(M >= 1, "decode_step: no tokens");
  const int64_t* ids = checked_indices(input_ids, M, embedding.size(0), "input_ids", "the embedding's rows");
  const at::TensorList key_caches = step_caches->keys, value_caches = step_caches->values;
  const int64_t L = static_cast<int64_t>(step_weights->q.size());
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(key_caches.size()) == L,
              "decode_step: one (key, value) cache per layer (", L, "), got ", key_caches.size());
  TORCH_CHECK(key_caches[0].dim() == 4, "decode_step: caches must be (num_blocks, block_size, kv_heads, head_dim)");
  const int64_t KH = key_caches[0].size(2), D = key_caches[0].size(3), H = num_heads;
  TORCH_CHECK(KH >= 1, "decode_step: the caches have no kv heads");
  TORCH_CHECK(H >= 1 && H % KH == 0 && H / KH <= 64, "decode_step: num_heads must be a multiple (at most 64) of the kv heads");
  TORCH_CHECK(D >= 8 && D % 8 == 0 && D <= 512, "decode_step: head_dim must be a multiple of 8, at most 512");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && 2 * cos.size(1) <= D && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.scalar_type() == dtype && sin.scalar_type() == dtype,
              "decode_step: cos and sin must be contiguous (positions, rotary_dim / 2) in the model's dtype");
  const int64_t* pos = checked_indices(positions, M, cos.size(0), "positions", "the RoPE tables' rows");
  check_vector(final_norm, hidden, dtype, "final_norm");
  const StepShape shape{dtype, hidden, H, KH, D};
  const std::vector<LayerWeights> weights = step_weights->checked_layers(shape);
  step_caches->check(shape);
  const int64_t I = step_weights->gate[0].size(0);
  const Shapes shapes{M, hidden, H, KH, D, I, cos.size(1), L, static_cast<float>(eps), static_cast<float>(scale)};
  qt::Kernel quant_kernel = nullptr;
  if (!step_weights->scales.empty()) {
    const std::string name(quant_variant_name);
    TORCH_CHECK(name != "avx512vnni", "decode_step: the quantized GEMM variant must be a float one, got ", name);
    quant_kernel = qt::find_kernel(name);
  }
  // The metadata: one entry per layer, or one that every layer reads (a cache without a press).
  const bool shared_metadata = slot_mappings.size() == 1;
  for (const at::TensorList list : {slot_mappings, seq_lens, block_tables})
    TORCH_CHECK(static_cast<int64_t>(list.size()) == (shared_metadata ? 1 : L),
                "decode_step: slot_mappings, seq_lens and block_tables need one entry, or one per layer (", L, ")");
  std::vector<LayerCache> caches;
  int64_t checked_num_blocks = -1, checked_block_size = -1;  // a shared entry is checked once per cache shape
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& kc = key_caches[l];
    const int64_t ml = shared_metadata ? 0 : l, NB = kc.size(0), BS = kc.size(1);
    const at::Tensor& slots = slot_mappings[ml];
    if (!shared_metadata || NB != checked_num_blocks || BS != checked_block_size) {
      TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M,
                  "decode_step: slot_mapping must be (M,) int64");
      TORCH_CHECK(seq_lens[ml].dim() == 1 && seq_lens[ml].numel() == M && block_tables[ml].size(0) == M,
                  "decode_step: seq_lens must be (M,) and block_tables (M, width)");
      kvlab::check_paged_metadata("decode_step", seq_lens[ml], block_tables[ml], NB, BS);
      const int64_t* slot = slots.const_data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m)
        TORCH_CHECK(slot[m] >= 0 && slot[m] < NB * BS, "decode_step: slot_mapping[", m, "] = ", slot[m],
                    " is outside the cache's ", NB * BS, " slots");
      checked_num_blocks = NB;
      checked_block_size = BS;
    }
    caches.push_back({kc.data_ptr(), value_caches[l].data_ptr(), BS, slots.const_data_ptr<int64_t>(),
                      seq_lens[ml].const_data_ptr<int32_t>(), block_tables[ml].const_data_ptr<int32_t>(),
                      block_tables[ml].size(1)});
  }
  Head head;
  if (lm_head.has_value()) {
    TORCH_CHECK(lm_head->dim() == 2 && lm_head->size(1) == hidden, "decode_step: lm_head must be (vocab, ", hidden,
                "), got ", lm_head->sizes());
    check_weight(*lm_head, lm_head->size(0), hidden, dtype, "lm_head");
    head = Head{lm_head->const_data_ptr(), lm_head->size(0)};
  }
  at::Tensor out = at::empty({M, head.w == nullptr ? hidden : head.vocab}, embedding.options());
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const StepInputs<T> inputs{ids, pos, embedding.const_data_ptr<T>(), cos.const_data_ptr<T>(), sin.const_data_ptr<T>()};
    decode_layers<T>(shapes, weights, caches, final_norm.const_data_ptr<T>(), inputs, head, out.mutable_data_ptr<T>(),
                     choice, quant_kernel);
  };
  if (dtype == at::kFloat)
    run(float{});
  else
    run(c10::BFloat16{});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvlab, m) {
  m.class_<StepWeights>("StepWeights")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       c10::List<std::optional<at::Tensor>>, c10::List<std::optional<at::Tensor>>,
                       std::vector<int64_t>>());
  m.class_<StepCaches>("StepCaches").def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>>());
  m.def("decode_step(Tensor input_ids, Tensor positions, Tensor embedding, Tensor cos, Tensor sin, __torch__.torch.classes.kvlab.StepWeights weights, "
        "Tensor final_norm, __torch__.torch.classes.kvlab.StepCaches caches, Tensor[] slot_mappings, "
        "Tensor[] seq_lens, Tensor[] block_tables, int num_heads, float eps, float scale, str variant, "
        "str quant_variant, Tensor? lm_head=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvlab, CPU, m) { m.impl("decode_step", &decode_step); }
