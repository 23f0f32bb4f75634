// The skinny GEMM's per-ISA entry points. Each variant lives in its own translation unit compiled
// with its own -m flags (build.py), and includes no torch header: an inline function of a shared
// header compiled once with AVX-512 could otherwise be the copy the linker keeps, and crash a CPU
// without it. skinny_gemm.cpp picks a variant at run time from what the CPU reports.
#pragma once

#include <cstdint>

namespace kvlab::skinny {

// How a kernel reads the weights at one input row (skinny_tile.h); which serves is measured
// (kvlab/kernels/calibrate.py): the variant's name alone, "<variant>/nt" or "<variant>/tiles".
enum class OneRow : uint8_t {
  kWalk,             // the weight rows one at a time, one sequential stream per thread
  kWalkNonTemporal,  // the same walk, each line requested non-temporal just ahead (PREFETCHNTA)
  kTiles,            // the register tiles, as at several input rows
};

// y (M, N) = x (M, K) @ w (N, K)^T for the weight rows [n_begin, n_end), float32 accumulation.
// x is float32, except for variants whose bf16 kernel reads bfloat16 inputs (x_is_bf16 below).
struct Problem {
  const void* x;
  const void* w;
  float* y;
  int64_t M, K, N;
  OneRow one_row = OneRow::kWalk;
};

using Kernel = void (*)(const Problem&, int64_t n_begin, int64_t n_end);

// Weight rows per block: the unit threads split, so each block's rows stay in L1/L2 while every
// tile of input rows passes over them.
constexpr int64_t kBlockRows = 8;

void avx2_f32(const Problem&, int64_t, int64_t);
void avx2_bf16(const Problem&, int64_t, int64_t);
void avx512_f32(const Problem&, int64_t, int64_t);
void avx512_bf16(const Problem&, int64_t, int64_t);
void avx512bf16_bf16(const Problem&, int64_t, int64_t);  // vdpbf16ps: x in bfloat16
void amx_bf16(const Problem&, int64_t, int64_t);         // TDPBF16PS tiles: x in bfloat16

// FLOPs of `iterations` rounds of the variant's multiply-add on registers, on the calling thread
// (skinny_peak.h): the arithmetic peak its kernels can approach.
using PeakLoop = double (*)(int64_t iterations);
double avx2_f32_peak(int64_t);          // 256-bit FMA; also what the AVX2 bf16 kernel runs (widened weights)
double avx512_f32_peak(int64_t);        // 512-bit FMA; also the AVX-512 widening bf16 kernel's
double avx512bf16_bf16_peak(int64_t);   // vdpbf16ps

}  // namespace kvlab::skinny
