// The CPU code paths: one per instruction set, each with its register tiles sized to its register
// file, picked once per call by the active path.
//
// Paths (best first): avx512bf16 (AVX-512 plus the vdpbf16ps dot product for bfloat16 keys),
// avx512 (x86-64-v4: 32 zmm registers), avx2 (x86-64-v3, AVX2 + FMA + F16C: 16 ymm registers)
// and baseline (whatever the compiler targets by default: SSE2 on x86-64, NEON on aarch64).
// The active path is the best one the CPU has, unless SNAPKV_CPU_ISA (read when snapkv_ext is
// imported) or snapkv_ext.set_cpu_isa() forces another; a path the CPU lacks is refused.
//
// A kernel is written once as a template over a path's traits (`Isa::vec`, tile sizes) and
// instantiated per path inside a function compiled for that instruction set
// (SNAPKV_CPU_VARIANTS below), so its always-inline helpers and `#pragma omp simd` loops compile
// to that path's vectors. GCC's target_clones is not used: it compiles one tile for every ISA
// (a 32-accumulator AVX-512 tile spills on AVX2's 16 registers) and cannot be forced.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace snapkv {
namespace cpu {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// The path the CPU kernels use now.
Isa active_isa();
// Name of a path ("baseline", "avx2", "avx512", "avx512bf16").
const char* isa_name(Isa isa);
// The paths this CPU can run, best first.
std::vector<Isa> available_isas();
// Forces a path by name ("" or "auto": the best available). Throws std::invalid_argument for an
// unknown name and std::runtime_error for a path this CPU lacks (with the CPU's paths named).
void set_isa(const std::string& name);

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define SNAPKV_CPU_X86 1
#define SNAPKV_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define SNAPKV_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define SNAPKV_TARGET_AVX512BF16 __attribute__((target("arch=x86-64-v4,avx512bf16")))
#endif

// Per-path traits: the vector type the kernels compute in and the logits register tile
// (kKeys keys x kRowVecs vectors of window rows = kKeys * kRowVecs accumulators, plus kRowVecs
// query vectors and one broadcast key element in registers). kBlasLogits: window_scores computes
// its logits blocks with the BLAS torch ships instead of the tile (the portable path: MKL or
// OpenBLAS pick the CPU's best kernel, which SSE2 code without FMA cannot match; measured in
// benchmarks/RESULTS.md section 15). kBlasAttention: ragged_attention's float32 logits and value
// products go through that BLAS too (the same reason).
struct Baseline {
  static constexpr Isa kIsa = Isa::Baseline;
  static constexpr bool kBlasLogits = true;
  static constexpr bool kBlasAttention = true;
#if defined(__aarch64__)
  static constexpr int kLanes = 4, kKeys = 8, kRowVecs = 2;  // NEON: 32 registers of 128 bits
#else
  // SSE2: 16 xmm, no FMA (a product temp each) and a two-instruction broadcast: 2 keys x 4 vectors
  // (8 accumulators) spends one broadcast per 4 products.
  static constexpr int kLanes = 4, kKeys = 2, kRowVecs = 4;
#endif
  typedef float vec __attribute__((vector_size(16)));
};
struct Avx2 {
  static constexpr Isa kIsa = Isa::Avx2;
  static constexpr bool kBlasLogits = false;
  static constexpr bool kBlasAttention = false;
  static constexpr int kLanes = 8, kKeys = 6, kRowVecs = 2;  // 12 accumulators + 3 of 16 ymm
  typedef float vec __attribute__((vector_size(32)));
};
struct Avx512 {
  static constexpr Isa kIsa = Isa::Avx512;
  static constexpr bool kBlasLogits = false;
  static constexpr bool kBlasAttention = false;
  static constexpr int kLanes = 16, kKeys = 8, kRowVecs = 2;  // 16 accumulators + 3 of 32 zmm
  typedef float vec __attribute__((vector_size(64)));
};
struct Avx512Bf16 : Avx512 {
  static constexpr Isa kIsa = Isa::Avx512Bf16;
};

// Lanes of a path's float vector (16 avx512*, 8 avx2, 4 baseline): for host code that lays out
// data for a kernel (read the path once with active_isa() and pass the same one to NAME_for).
int isa_lanes(Isa isa);
// Whether a path's kernels take ragged_attention's float32 products from the BLAS (kBlasAttention).
bool isa_blas_attention(Isa isa);

// Defines `RET NAME PARAMS`, which runs `IMPL<Traits> ARGS` compiled for the active path, and
// `NAME_for(isa)`, the function compiled for a given path (a host that lays out data for one path
// calls that path's kernel). IMPL and everything it calls in its hot loops must be always-inline
// (a helper that is not inlined is compiled for the baseline).
#ifdef SNAPKV_CPU_X86
#define SNAPKV_CPU_VARIANTS(RET, NAME, IMPL, PARAMS, ARGS)                                        \
  static RET NAME##_baseline PARAMS { return IMPL<::snapkv::cpu::Baseline> ARGS; }               \
  SNAPKV_TARGET_AVX2 static RET NAME##_avx2 PARAMS { return IMPL<::snapkv::cpu::Avx2> ARGS; }   \
  SNAPKV_TARGET_AVX512 static RET NAME##_avx512 PARAMS { return IMPL<::snapkv::cpu::Avx512> ARGS; } \
  SNAPKV_TARGET_AVX512BF16 static RET NAME##_avx512bf16 PARAMS {                                 \
    return IMPL<::snapkv::cpu::Avx512Bf16> ARGS;                                                 \
  }                                                                                               \
  [[maybe_unused]] static RET(*NAME##_for(::snapkv::cpu::Isa isa)) PARAMS {                      \
    switch (isa) {                                                                                \
      case ::snapkv::cpu::Isa::Avx512Bf16: return &NAME##_avx512bf16;                             \
      case ::snapkv::cpu::Isa::Avx512: return &NAME##_avx512;                                     \
      case ::snapkv::cpu::Isa::Avx2: return &NAME##_avx2;                                         \
      default: return &NAME##_baseline;                                                           \
    }                                                                                             \
  }                                                                                               \
  [[maybe_unused]] static RET NAME PARAMS { return NAME##_for(::snapkv::cpu::active_isa()) ARGS; }
#else
#define SNAPKV_CPU_VARIANTS(RET, NAME, IMPL, PARAMS, ARGS)                                     \
  static RET NAME##_baseline PARAMS { return IMPL<::snapkv::cpu::Baseline> ARGS; }            \
  [[maybe_unused]] static RET(*NAME##_for(::snapkv::cpu::Isa)) PARAMS { return &NAME##_baseline; } \
  [[maybe_unused]] static RET NAME PARAMS { return NAME##_baseline ARGS; }
#endif

}  // namespace cpu
}  // namespace snapkv
