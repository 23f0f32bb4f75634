// The quantized skinny GEMM's per-ISA entry points (quant_avx2.cpp, quant_avx512.cpp), kept free of
// torch headers for the reason skinny_variants.h gives. The layout they read is kvlab/quant/formats.py's:
//   w[n, k] = q[n, k] * scale[n, g] + offset[n, g],  g = k / group_size,
// int8 codes (N, K) signed; int4 codes packed (N, Kp / 2), Kp = K rounded up to 32, byte j of each
// 32-column block holding column j (low nibble) and column j + 16 (high nibble); scales and offsets
// float16 (N, G). Symmetric int4 has no offsets (offset = -8 * scale); int8 never has any.
#pragma once

#include <cstdint>
#include <string>

namespace kvlab::quant {

constexpr int64_t kBlockColumns = 32;  // columns per int4 block; group sizes are multiples of it
constexpr int64_t kBlockRows = 8;      // weight rows per unit of thread work

struct Problem {
  const float* x;  // (M, Kp) float32, zero past column K: no kernel needs a K tail for x
  const void* data;
  const uint16_t* scales;   // float16 bits (N, G)
  const uint16_t* offsets;  // float16 bits (N, G), or null
  const float* xsum;        // (M, G): each input row's sum over each group's columns
  float* y;                 // (M, N)
  int64_t M, K, Kp, N, group_size, groups;
  int bits;
  // Integer-dot-product variants only (quant_avx512vnni.cpp): x quantized to int8 per 32-column block
  // and laid out per 64-column chunk as the chunk's weight bytes are (see quantize_inputs in
  // quant_gemm.cpp), each lane's input scale, and for int8 weights each lane's -128 * (sum of the
  // lane's four codes), which undoes the +128 that makes the weights unsigned for vpdpbusd.
  const int8_t* xq = nullptr;        // (M, chunks, 64)
  const float* xscale = nullptr;     // (M, chunks, 16)
  const int32_t* xcorrection = nullptr;  // (M, chunks, 16), int8 weights only
  const int32_t* chunk_groups = nullptr;  // (chunks, 2): the weight group of each chunk's blocks (-1: past K)
  int64_t chunks = 0;
};

using Kernel = void (*)(const Problem&, int64_t n_begin, int64_t n_end);

void avx2(const Problem&, int64_t, int64_t);
void avx512(const Problem&, int64_t, int64_t);
void avx512vnni(const Problem&, int64_t, int64_t);  // int8 inputs: reads xq / xscale / xcorrection
void avx512vnni_x16(const Problem&, int64_t, int64_t);  // rounds x to int16 itself (quant_avx512_x16.cpp)

// The variant called `name` (quant_gemm.cpp); a clear error if it is unknown or this CPU lacks it.
Kernel find_kernel(const std::string& name);

}  // namespace kvlab::quant
