// cuda_sim: runs CUDA kernel bodies, unmodified, on the CPU, for tests.
//
// The kernel headers of csrc/cuda/ include this file instead of the CUDA headers when built with
// -DSNAPKV_CUDA_SIM by the host compiler. A launch runs every block of the grid; the threads of a
// block run as fibers (POSIX ucontext) scheduled cooperatively: a thread runs until it reaches a
// barrier (__syncthreads), a warp collective (shuffles, ballot, WMMA) or its end. So:
//   - a missing __syncthreads shows: the first thread runs on and reads shared memory that the
//     others have not written yet, which holds NaN-pattern garbage (0xFF bytes) set before every
//     block;
//   - dynamic shared memory is a fresh heap block of exactly the launch's byte count, so
//     AddressSanitizer reports any access past it; static `__shared__` declarations are refused
//     at compile time (the kernels take all shared memory from the launch's byte count);
//   - a barrier or warp collective that not every thread it names reaches fails the launch with
//     the kernel's name (no hang); a shuffle reading a lane outside its mask fails too;
//   - the threads of a block run in increasing or decreasing order (Order), so a test can check
//     that both orders give bit-identical outputs (a race shows as a difference);
//   - WMMA fragments map their elements to lanes in a scrambled order (a fixed permutation per
//     fragment type), so code relying on a mapping the API does not promise computes garbage;
//     TF32 matrix products drop the 13 low mantissa bits of their inputs as the hardware does;
//   - __pipeline_memcpy_async copies are deferred until __pipeline_wait_prior releases their
//     group: reading early reads garbage.
// Blocks run on a few OS threads at once (global atomics are real atomics).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace cudasim {

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class Order { Forward, Reverse };

// How launches run: thread order inside a block, how many OS threads run blocks at once, and the
// SM count host code sees (launch plans that size their grid by it can be pushed to many CTAs).
struct Config {
  Order order = Order::Forward;
  int workers = 2;
  int sm_count = 132;
  int max_smem_optin = 227 * 1024;  // H100: cudaDevAttrMaxSharedMemoryPerBlockOptin
};
Config& config();

// Runs `body` as the kernel `name` over grid x block threads with `smem_bytes` of dynamic shared
// memory. Throws std::runtime_error naming the kernel on a deadlock, a bad collective or a bad
// launch configuration.
void launch(const char* name, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

// ---- what a running thread sees ----
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_smem();
void syncthreads();
[[noreturn]] void fail(const std::string& what);

// A warp collective: every lane named in `mask` deposits `in` (up to 64 bytes); once all have
// arrived, `combine(ins, outs, mask)` runs once for the warp and each lane gets its `out`.
using Payload = unsigned char[64];
void warp_collective(const char* what, unsigned mask, const void* in, size_t in_bytes, void* out,
                     size_t out_bytes,
                     const std::function<void(const Payload* ins, Payload* outs, unsigned mask)>& combine);
unsigned lane_id();

// ---- deferred async copies (cuda_pipeline_primitives.h) ----
void pipeline_memcpy_async(void* dst, const void* src, size_t bytes);
void pipeline_commit();
void pipeline_wait_prior(size_t prior);

// ---- shuffles ----
template <typename T>
T shfl(const char* what, unsigned mask, T v, int mode, int arg, int width) {
  static_assert(sizeof(T) <= 64 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
  T out;
  warp_collective(what, mask, &v, sizeof(T), &out, sizeof(T), [&](const Payload* ins, Payload* outs, unsigned m) {
    for (int lane = 0; lane < 32; ++lane) {
      if (!(m >> lane & 1u)) continue;
      const int base = lane / width * width;
      int src = lane;
      if (mode == 0) src = base + (arg % width);                                   // __shfl_sync
      else if (mode == 1) src = lane - arg >= base ? lane - arg : lane;             // __shfl_up_sync
      else if (mode == 2) src = lane + arg < base + width ? lane + arg : lane;      // __shfl_down_sync
      else src = base + ((lane - base) ^ arg) % width;                              // __shfl_xor_sync
      if (!(m >> src & 1u))
        fail(std::string(what) + ": lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
             ", which is not in the mask");
      std::memcpy(outs[lane], ins[src], sizeof(T));
    }
  });
  return out;
}

}  // namespace cudasim

// ---- the CUDA names kernel code uses ----
using cudasim::dim3;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static_assert(false, "cuda_sim: take shared memory from the launch (dynamic smem)");
#define threadIdx (::cudasim::thread_idx())
#define blockIdx (::cudasim::block_idx())
#define blockDim (::cudasim::block_dim())
#define gridDim (::cudasim::grid_dim())

inline void __syncthreads() { cudasim::syncthreads(); }
template <typename T> T __shfl_sync(unsigned m, T v, int src, int width = 32) { return cudasim::shfl("__shfl_sync", m, v, 0, src, width); }
template <typename T> T __shfl_up_sync(unsigned m, T v, unsigned d, int width = 32) { return cudasim::shfl("__shfl_up_sync", m, v, 1, static_cast<int>(d), width); }
template <typename T> T __shfl_down_sync(unsigned m, T v, unsigned d, int width = 32) { return cudasim::shfl("__shfl_down_sync", m, v, 2, static_cast<int>(d), width); }
template <typename T> T __shfl_xor_sync(unsigned m, T v, int lm, int width = 32) { return cudasim::shfl("__shfl_xor_sync", m, v, 3, lm, width); }
unsigned __ballot_sync(unsigned mask, int pred);
int __any_sync(unsigned mask, int pred);
int __all_sync(unsigned mask, int pred);
void __syncwarp(unsigned mask = 0xffffffffu);

// Atomics: real atomics (blocks run on several OS threads).
template <typename T> T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
template <typename T> T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
template <typename T> T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (old > v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
  return old;
}
float atomicAdd(float* p, float v);
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline float __expf(float x) { return std::exp(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t bytes) { cudasim::pipeline_memcpy_async(dst, src, bytes); }
inline void __pipeline_commit() { cudasim::pipeline_commit(); }
inline void __pipeline_wait_prior(size_t prior) { cudasim::pipeline_wait_prior(prior); }

// 16-bit float types the kernels hand to WMMA: the c10 types (same bits as __half/__nv_bfloat16).
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;

// ---- nvcuda::wmma ----
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}

// The hardware drops the 13 low mantissa bits of TF32 inputs; conversion rounds to nearest.
inline float tf32_truncate(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u &= 0xffffe000u;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float __float_to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // ties away from zero
  std::memcpy(&x, &u, 4);
  return x;
}

namespace detail {
// The scrambled element -> (row, col) map of a fragment kind: element e of lane l holds matrix
// position perm[l * per_lane + e]. A fixed pseudo-random permutation per kind and shape.
const int* scramble(int kind, int rows, int cols);
template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };
template <class Use> constexpr int kind_of() {
  return std::is_same<Use, matrix_a>::value ? 0 : std::is_same<Use, matrix_b>::value ? 1 : 2;
}
template <class Use, int M, int N, int K> constexpr int rows_of() {
  return std::is_same<Use, matrix_a>::value ? M : std::is_same<Use, matrix_b>::value ? K : M;
}
template <class Use, int M, int N, int K> constexpr int cols_of() {
  return std::is_same<Use, matrix_a>::value ? K : std::is_same<Use, matrix_b>::value ? N : N;
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int kRows = detail::rows_of<Use, M, N, K>();
  static constexpr int kCols = detail::cols_of<Use, M, N, K>();
  static constexpr int num_elements = kRows * kCols / 32;
  using element_type = typename detail::storage<T>::type;
  element_type x[num_elements];
  static const int* perm() { return detail::scramble(detail::kind_of<Use>() * 8 + (std::is_same<Layout, col_major>::value ? 1 : 0), kRows, kCols); }
};

namespace detail {
// The API's rules for a matrix in memory: a 256-bit aligned pointer, ldm a multiple of 16 bytes.
template <class P>
void check_matrix(const char* what, const P* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    cudasim::fail(std::string(what) + ": the matrix pointer is not 256-bit aligned");
  if ((ldm * sizeof(P)) % 16 != 0)
    cudasim::fail(std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of 16 bytes");
}
// Runs `fn(lane, frag_of_lane)` for the 32 lanes of the warp once all of them have arrived.
template <class Frag, class Fn>
void warp_each(const char* what, Frag& f, Fn&& fn) {
  Frag* mine = &f;
  cudasim::warp_collective(what, 0xffffffffu, &mine, sizeof(mine), nullptr, 0,
                           [&](const cudasim::Payload* ins, cudasim::Payload*, unsigned) {
                             for (int lane = 0; lane < 32; ++lane) {
                               Frag* fl;
                               std::memcpy(&fl, ins[lane], sizeof(fl));
                               fn(lane, *fl);
                             }
                           });
}
template <class T> float to_float(T v) { return static_cast<float>(v); }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool col = std::is_same<Layout, col_major>::value;
  const int* perm = F::perm();
  detail::check_matrix("wmma::load_matrix_sync", p, ldm);
  detail::warp_each("wmma::load_matrix_sync", f, [&](int lane, F& fl) {
    for (int e = 0; e < F::num_elements; ++e) {
      const int pos = perm[lane * F::num_elements + e], r = pos / F::kCols, c = pos % F::kCols;
      fl.x[e] = static_cast<typename F::element_type>(p[col ? c * ldm + r : r * ldm + c]);
    }
  });
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  const int* perm = F::perm();
  detail::check_matrix("wmma::store_matrix_sync", p, ldm);
  detail::warp_each("wmma::store_matrix_sync", const_cast<F&>(f), [&](int lane, F& fl) {
    for (int e = 0; e < F::num_elements; ++e) {
      const int pos = perm[lane * F::num_elements + e], r = pos / F::kCols, c = pos % F::kCols;
      p[layout == mem_col_major ? c * ldm + r : r * ldm + c] = fl.x[e];
    }
  });
}

template <class Use, int M, int N, int K, class T, class L, class V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, V v) {
  for (auto& e : f.x) e = static_cast<typename fragment<Use, M, N, K, T, L>::element_type>(v);
}

// d = a * b + c for the whole warp, in fp32 (products of 16-bit or TF32 inputs are exact in fp32).
template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  using FA = fragment<matrix_a, M, N, K, T, LA>;
  using FB = fragment<matrix_b, M, N, K, T, LB>;
  using FC = fragment<accumulator, M, N, K, float>;
  struct Ptrs {
    FC* d;
    const FA* a;
    const FB* b;
    const FC* c;
  } mine{&d, &a, &b, &c};
  constexpr bool tf32 = std::is_same<T, precision::tf32>::value;
  cudasim::warp_collective("wmma::mma_sync", 0xffffffffu, &mine, sizeof(mine), nullptr, 0,
                           [&](const cudasim::Payload* ins, cudasim::Payload*, unsigned) {
    float A[M][K], Bm[K][N], C[M][N];
    Ptrs p[32];
    for (int lane = 0; lane < 32; ++lane) std::memcpy(&p[lane], ins[lane], sizeof(Ptrs));
    for (int lane = 0; lane < 32; ++lane) {
      for (int e = 0; e < FA::num_elements; ++e) {
        const int pos = FA::perm()[lane * FA::num_elements + e];
        float v = detail::to_float(p[lane].a->x[e]);
        A[pos / K][pos % K] = tf32 ? tf32_truncate(v) : v;
      }
      for (int e = 0; e < FB::num_elements; ++e) {
        const int pos = FB::perm()[lane * FB::num_elements + e];
        float v = detail::to_float(p[lane].b->x[e]);
        Bm[pos / N][pos % N] = tf32 ? tf32_truncate(v) : v;
      }
      for (int e = 0; e < FC::num_elements; ++e) {
        const int pos = FC::perm()[lane * FC::num_elements + e];
        C[pos / N][pos % N] = p[lane].c->x[e];
      }
    }
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = C[i][j];
        for (int k = 0; k < K; ++k) acc += A[i][k] * Bm[k][j];
        C[i][j] = acc;
      }
    for (int lane = 0; lane < 32; ++lane)
      for (int e = 0; e < FC::num_elements; ++e) {
        const int pos = FC::perm()[lane * FC::num_elements + e];
        p[lane].d->x[e] = C[pos / N][pos % N];
      }
  });
}

}  // namespace wmma
}  // namespace nvcuda
