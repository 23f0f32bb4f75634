// A variant's arithmetic peak on one thread: its multiply-add instruction on registers only, with more
// independent accumulators than the instruction's latency x issue rate (4-6 cycles x 1-2 per cycle on
// the CPUs here), so nothing but the arithmetic units bounds the loop. The kernel bench's arithmetic
// floor uses it beside torch's square matmul, which reaches less (a library's matmul is not a peak).
// Included only by the variant translation units, inside an anonymous namespace (skinny_variants.h).
#pragma once

#include <cstdint>

namespace {

constexpr int kPeakChains = 12;

// Op: Acc (the accumulator's vector type), In (the operands'), start(j) (chain j's first value: distinct,
// or the compiler merges identical chains into one), operand(index), madd(acc, a, b),
// sum(acc) (a float the loop's result reduces to), kFlops (per madd, all lanes).
template <class Op>
double multiply_add_flops(int64_t iterations) {
  typename Op::Acc acc[kPeakChains];
#pragma GCC unroll 16
  for (int j = 0; j < kPeakChains; ++j) acc[j] = Op::start(j);
  typename Op::In a = Op::operand(0), b = Op::operand(1);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < kPeakChains; ++j) acc[j] = Op::madd(acc[j], a, b);
    // The operands pass through an empty asm statement, so the compiler can neither fold the loop
    // nor hoist its arithmetic: every iteration issues kPeakChains multiply-adds.
    __asm__ volatile("" : "+x"(a), "+x"(b));
  }
  float total = 0.f;
  for (int j = 0; j < kPeakChains; ++j) total += Op::sum(acc[j]);
  volatile float sink = total;  // the accumulators' values are used
  (void)sink;
  return static_cast<double>(iterations) * kPeakChains * Op::kFlops;
}

}  // namespace
