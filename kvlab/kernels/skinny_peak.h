// A variant's arithmetic peak on one thread: its kernels' own multiply-add (the traits' T::fma, as
// skinny_tile.h issues it) on registers only, with more independent accumulators than the instruction's
// latency x issue rate (4-6 cycles x 1-2 per cycle on the CPUs here), so nothing but the arithmetic units
// bounds the loop. The kernel bench's arithmetic floor uses it beside torch's square matmul, which
// reaches less (a library's matmul is not a peak).
// Included only by the variant translation units, inside an anonymous namespace (skinny_variants.h).
#pragma once

#include <cstdint>

namespace {

constexpr int kPeakChains = 12;

// FLOPs of `iterations` rounds of kPeakChains T::fma on registers: 2 x T::kStep per instruction (each
// of its kStep input elements multiplied and added).
template <class T>
double multiply_add_flops(int64_t iterations) {
  const typename T::W weights[T::kStep] = {};
  const typename T::X inputs[T::kStep] = {};
  typename T::WV w = T::load_w(weights);
  typename T::XV x = T::load_x(inputs);
  typename T::Acc acc[kPeakChains];
#pragma GCC unroll 16
  for (int j = 0; j < kPeakChains; ++j) {
    acc[j] = T::zero();
    // Opaque to the compiler: identical chains would otherwise be merged into one.
    __asm__ volatile("" : "+x"(acc[j]));
  }
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kPeakChains; ++j) acc[j] = T::fma(acc[j], w, x);
    // The operands pass through an empty asm statement, so the compiler can neither fold the loop
    // nor hoist its arithmetic: every iteration issues kPeakChains multiply-adds.
    __asm__ volatile("" : "+x"(w), "+x"(x));
  }
#pragma GCC unroll 16
  for (int j = 0; j < kPeakChains; ++j) __asm__ volatile("" : : "x"(acc[j]));  // the results are used
  return static_cast<double>(iterations) * kPeakChains * 2 * T::kStep;
}

}  // namespace
