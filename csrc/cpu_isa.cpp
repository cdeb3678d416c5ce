// The active CPU path (cpu_isa.h): detection, forcing, names.
#include "cpu_isa.h"

#include <atomic>
#include <stdexcept>

namespace snapkv {
namespace cpu {
namespace {

bool cpu_has(Isa isa) {
#ifdef SNAPKV_CPU_X86
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Avx512Bf16: return __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16");
    case Isa::Avx512: return __builtin_cpu_supports("x86-64-v4");
    case Isa::Avx2: return __builtin_cpu_supports("x86-64-v3");
    default: return true;
  }
#else
  return isa == Isa::Baseline;
#endif
}

Isa best_isa() {
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2})
    if (cpu_has(isa)) return isa;
  return Isa::Baseline;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

}  // namespace

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

int isa_lanes(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return Avx512Bf16::kLanes;
    case Isa::Avx512: return Avx512::kLanes;
    case Isa::Avx2: return Avx2::kLanes;
    default: return Baseline::kLanes;
  }
}

bool isa_blas_attention(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return Avx512Bf16::kBlasAttention;
    case Isa::Avx512: return Avx512::kBlasAttention;
    case Isa::Avx2: return Avx2::kBlasAttention;
    default: return Baseline::kBlasAttention;
  }
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Baseline})
    if (cpu_has(isa)) out.push_back(isa);
  return out;
}

void set_isa(const std::string& name) {
  if (name.empty() || name == "auto") {
    active().store(static_cast<int>(best_isa()));
    return;
  }
  std::string known, have;
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Baseline}) {
    known += std::string(known.empty() ? "" : ", ") + isa_name(isa);
    if (name != isa_name(isa)) continue;
    if (!cpu_has(isa)) {
      for (Isa a : available_isas()) have += std::string(have.empty() ? "" : ", ") + isa_name(a);
      throw std::runtime_error("CPU path '" + name + "' needs instructions this CPU lacks; it can run: " + have);
    }
    active().store(static_cast<int>(isa));
    return;
  }
  throw std::invalid_argument("unknown CPU path '" + name + "': expected auto, " + known);
}

}  // namespace cpu
}  // namespace snapkv
