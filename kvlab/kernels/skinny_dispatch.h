// The skinny GEMM's run-time dispatch, shared by the torch ops that call its kernels directly
// (skinny_gemm.cpp, decode_step.cpp). Compiled only with the base (AVX2) flags: it names the
// per-ISA entry points of skinny_variants.h but runs none of them unless the CPU has it.
#pragma once

#include <string>
#include <vector>

#include "skinny_variants.h"

namespace kvlab::skinny {

struct Variant {
  const char* name;
  bool (*supported)();
  Kernel f32;
  Kernel bf16;
  bool bf16_reads_bf16_inputs;  // vdpbf16ps multiplies bf16 by bf16; the others widen x to float32
  PeakLoop f32_peak;  // the multiply-add its float32 kernel issues (skinny_peak.h)
  PeakLoop bf16_peak;  // and its bf16 kernel's (AMX: its vdpbf16ps fallback's; the tiles are not probed)
};

// The variant called `name`; a clear error if it is unknown or this CPU lacks its instructions.
const Variant& find_variant(const std::string& name);

// A variant as the ops name it: "<variant>" (at one input row, the row-at-a-time walk),
// "<variant>/nt" (the walk with non-temporal requests) or "<variant>/tiles" (the register tiles).
struct Choice {
  const Variant& variant;
  OneRow one_row;
};
Choice parse_variant(const std::string& name);

// The variants this CPU runs, best first.
std::vector<std::string> skinny_variants();

}  // namespace kvlab::skinny
