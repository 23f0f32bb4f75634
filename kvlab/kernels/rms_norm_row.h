// One row's RMSNorm (Zhang & Sennrich 2019) with the model dtype T's roundings, shared by the RMSNorm
// ops (rms_norm.cpp) and the fused decode step (decode_step.cpp) so both round alike: float32 math,
// the normalised row rounded to T before the weight multiply and the product rounded to T, as HF's
// LlamaRMSNorm and torch's rms_norm do. The row and the output may hold T or float32.
#pragma once

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace kvlab {

// The sum of squares in order, one float at a time; the roundings and conversions eight lanes at a time
// (vec.h), as the scalar conversions cost most of a row in the fused decode step, where every thread
// normalises every row of the batch twice a layer.
template <typename T, typename In, typename Out>
inline void normalise_row(const In* row, const T* weight, Out* out, int64_t H, float eps) {
  float sum_squares = 0.f;
  for (int64_t i = 0; i < H; ++i) sum_squares += static_cast<float>(row[i]) * static_cast<float>(row[i]);
  const float inverse_rms = 1.f / std::sqrt(sum_squares / H + eps);
  const __m256 scale = _mm256_set1_ps(inverse_rms);
  int64_t i = 0;
  for (; i + 8 <= H; i += 8) {
    const __m256 normalised = round8<T>(_mm256_mul_ps(load8(row + i), scale));
    store8(out + i, round8<Out>(round8<T>(_mm256_mul_ps(normalised, load8(weight + i)))));
  }
  for (; i < H; ++i) {
    const T normalised = static_cast<T>(static_cast<float>(row[i]) * inverse_rms);
    const T scaled = static_cast<T>(static_cast<float>(normalised) * static_cast<float>(weight[i]));
    out[i] = static_cast<Out>(static_cast<float>(scaled));
  }
}

}  // namespace kvlab
