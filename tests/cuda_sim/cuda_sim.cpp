// cuda_sim runtime: blocks on a few OS threads, the threads of a block as ucontext fibers with a
// cooperative scheduler that releases barriers and warp collectives and reports deadlocks.
#include "cuda_sim.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDASIM_ASAN 1
#else
#define CUDASIM_ASAN 0
#endif

// A fiber switch that saves only what the ABI asks a callee to keep. (swapcontext makes a
// signal-mask syscall per switch, and AddressSanitizer's interceptor of it clears the shadow of
// the whole target stack every time: thousands of times slower for the millions of switches of
// a test run.) x86-64 System V; other architectures use ucontext.
#if defined(__x86_64__)
extern "C" void cudasim_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl cudasim_switch
.type cudasim_switch,@function
cudasim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cudasim_switch, .-cudasim_switch
.section .note.GNU-stack,"",@progbits
.text
)");
#define CUDASIM_ASM_SWITCH 1
#else
#define CUDASIM_ASM_SWITCH 0
#endif

namespace cudasim {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { Runnable, AtBarrier, InWarpOp, Done };

struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

// A saved execution context: the stack pointer cudasim_switch keeps, or a ucontext.
struct Context {
  ucontext_t uc;
  void* sp = nullptr;
};

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  State state = State::Runnable;
  dim3 tid;
  // Pending async copies: committed groups, then the open (uncommitted) one.
  std::vector<std::vector<AsyncCopy>> groups;
  std::vector<AsyncCopy> open;
  // Warp collective slot.
  const char* op = nullptr;
  unsigned mask = 0;
  Payload in{};
  Payload out{};
};

struct Block;
thread_local Block* tl_block = nullptr;
thread_local int tl_thread = -1;

struct Block {
  const char* name;
  dim3 grid, bdim, bidx;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int nthreads = 0;
  std::vector<Fiber>* fibers = nullptr;
  Context sched;
  std::string error;
  std::function<void()> body;
  // The scheduler's stack, as ASan reports it when a fiber first starts (for switching back).
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
};

std::string kernel_prefix(const Block& b) {
  return std::string("cuda_sim: kernel '") + b.name + "' block (" + std::to_string(b.bidx.x) + "," +
         std::to_string(b.bidx.y) + "," + std::to_string(b.bidx.z) + "): ";
}

// Saves the running context in `from` and continues `to`, whose stack is [bottom, bottom + size),
// telling ASan of the stack switch; `dying`: `from` never runs again.
void switch_context(Context& from, Context& to, const void* bottom, size_t size, bool dying) {
#if CUDASIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(dying ? nullptr : &fake, bottom, size);
#else
  (void)bottom;
  (void)size;
  (void)dying;
#endif
#if CUDASIM_ASM_SWITCH
  cudasim_switch(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Switches from the current fiber back to the scheduler.
void to_scheduler() {
  Block& b = *tl_block;
  Fiber& f = (*b.fibers)[tl_thread];
  switch_context(f.ctx, b.sched, b.sched_stack_bottom, b.sched_stack_size, f.state == State::Done);
}

void fiber_main() {
  Block& b = *tl_block;
#if CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  b.body();
  (*b.fibers)[tl_thread].state = State::Done;
  to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void resume(Block& b, int t) {
  Fiber& f = (*b.fibers)[t];
  tl_thread = t;
  switch_context(b.sched, f.ctx, f.stack, kStackBytes, false);
  tl_thread = -1;
}

std::string describe_waits(const Block& b) {
  std::string s;
  int shown = 0;
  for (int t = 0; t < b.nthreads && shown < 6; ++t) {
    const Fiber& f = (*b.fibers)[t];
    const char* what = f.state == State::Done ? "exited" : f.state == State::AtBarrier ? "waits at __syncthreads"
                                                                                       : f.op;
    if (t > 0 && (*b.fibers)[t - 1].state == f.state && (f.state != State::InWarpOp || (*b.fibers)[t - 1].op == f.op))
      continue;
    s += " thread " + std::to_string(t) + ": " + what + ";";
    ++shown;
  }
  return s;
}

// Runs one block to completion (or to an error, recorded in b.error).
void run_block(Block& b, Order order) {
  std::vector<Fiber>& fibers = *b.fibers;
  for (int t = 0; t < b.nthreads; ++t) {
    Fiber& f = fibers[t];
    f.state = State::Runnable;
    f.groups.clear();
    f.open.clear();
    f.op = nullptr;
    f.tid = dim3(t % b.bdim.x, t / b.bdim.x % b.bdim.y, t / (b.bdim.x * b.bdim.y));
#if CUDASIM_ASAN
    // A finished fiber's last frames (fiber_main, to_scheduler) never return, so their redzones
    // stay poisoned at the top of the stack the next block's fiber reuses: clear them. (Frames
    // of the kernel body return normally; a block that failed discards its worker's stacks.)
    __asan_unpoison_memory_region(static_cast<char*>(f.stack) + kStackBytes - 16384, 16384);
#endif
#if CUDASIM_ASM_SWITCH
    // What cudasim_switch pops: mxcsr and x87 control word, r15..r12, rbx, rbp, then the
    // return address (fiber_main) at a 16-byte aligned slot, as if fiber_main had been called.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t{15};
    uint64_t* slot = reinterpret_cast<uint64_t*>(top - 16);
    slot[1] = 0;
    slot[0] = reinterpret_cast<uint64_t>(&fiber_main);
    uint64_t* sp = slot - 7;
    for (int r = 1; r < 7; ++r) sp[r] = 0;
    const uint32_t csr[2] = {0x1F80u, 0x037Fu};
    std::memcpy(sp, csr, 8);
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = f.stack;
    f.ctx.uc.uc_stack.ss_size = kStackBytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_main, 0);
#endif
  }
  for (;;) {
    bool progressed = false;
    for (int i = 0; i < b.nthreads && b.error.empty(); ++i) {
      const int t = order == Order::Forward ? i : b.nthreads - 1 - i;
      if (fibers[t].state != State::Runnable) continue;
      resume(b, t);
      progressed = true;
    }
    if (!b.error.empty()) return;
    int done = 0, barrier = 0, warp = 0;
    for (const Fiber& f : fibers) {
      done += f.state == State::Done;
      barrier += f.state == State::AtBarrier;
      warp += f.state == State::InWarpOp;
    }
    if (done == b.nthreads) return;
    if (progressed) continue;
    if (barrier == b.nthreads) {
      for (Fiber& f : fibers) f.state = State::Runnable;
      continue;
    }
    if (done > 0 && barrier + done == b.nthreads)
      b.error = kernel_prefix(b) + "__syncthreads not reached by every thread:" + describe_waits(b);
    else
      b.error = kernel_prefix(b) + "deadlock: " + std::to_string(barrier) + " threads at __syncthreads, " +
                std::to_string(warp) + " in warp collectives whose lanes never all arrived, " +
                std::to_string(done) + " exited:" + describe_waits(b);
    return;
  }
}

struct Worker {
  std::vector<Fiber> fibers;
  ~Worker() {
    for (Fiber& f : fibers) {
      if (!f.stack) continue;
#if CUDASIM_ASAN
      // Frames that never returned leave poisoned shadow; the next mapping here (any allocator's)
      // must not inherit it.
      __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
      munmap(f.stack, kStackBytes);
    }
  }
  void ensure(int n) {
    if (static_cast<int>(fibers.size()) >= n) return;
    const size_t old = fibers.size();
    fibers.resize(n);
    for (size_t i = old; i < fibers.size(); ++i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda_sim: cannot map a fiber stack");
#if CUDASIM_ASAN
      __asan_unpoison_memory_region(p, kStackBytes);  // stale shadow of an earlier mapping
#endif
      fibers[i].stack = p;
    }
  }
};

Fiber& current(const char* what) {
  if (!tl_block || tl_thread < 0) {
    std::fprintf(stderr, "cuda_sim: %s called outside a kernel\n", what);
    std::abort();
  }
  return (*tl_block->fibers)[tl_thread];
}

}  // namespace

Config& config() {
  static Config c;
  return c;
}

const dim3& thread_idx() { return current("threadIdx").tid; }
const dim3& block_idx() { return (current("blockIdx"), tl_block->bidx); }
const dim3& block_dim() { return (current("blockDim"), tl_block->bdim); }
const dim3& grid_dim() { return (current("gridDim"), tl_block->grid); }
void* dynamic_smem() { return (current("dynamic shared memory"), tl_block->smem); }
unsigned lane_id() {
  const dim3& t = thread_idx();
  const dim3& d = tl_block->bdim;
  return static_cast<unsigned>((t.x + d.x * (t.y + d.y * t.z)) % 32);
}

void fail(const std::string& what) {
  Fiber& f = current("fail");
  Block& b = *tl_block;
  if (b.error.empty()) b.error = kernel_prefix(b) + "thread " + std::to_string(tl_thread) + ": " + what;
  f.state = State::InWarpOp;
  f.op = "failed";
  for (;;) to_scheduler();  // never resumed: the scheduler stops at the error
}

void syncthreads() {
  Fiber& f = current("__syncthreads");
  f.state = State::AtBarrier;
  to_scheduler();
}

void warp_collective(const char* what, unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                     const std::function<void(const Payload*, Payload*, unsigned)>& combine) {
  Fiber& f = current(what);
  Block& b = *tl_block;
  const int t = tl_thread, warp = t / 32, lane = t % 32;
  const int warp_base = warp * 32;
  const int warp_size = std::min(32, b.nthreads - warp_base);
  if (!(mask >> lane & 1u)) fail(std::string(what) + ": the calling lane " + std::to_string(lane) + " is not in its mask");
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && l >= warp_size)
      fail(std::string(what) + ": mask names lane " + std::to_string(l) + ", past the block's last thread");
  std::memcpy(f.in, in, in_bytes);
  f.op = what;
  f.mask = mask;
  f.state = State::InWarpOp;
  std::vector<Fiber>& fibers = *b.fibers;
  // Complete when every lane in the mask waits in the same collective with the same mask. A lane
  // waiting in another collective is not an error (independent thread scheduling lets lanes of
  // one warp wait in different collectives); if nothing can progress, the scheduler reports the
  // deadlock. The same collective with a different mask naming this lane is an error.
  bool complete = true;
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& o = fibers[warp_base + l];
    if (o.state != State::InWarpOp || std::strcmp(o.op, what) != 0) {
      complete = false;
    } else if (o.mask != mask && (o.mask >> lane & 1u)) {
      fail(std::string(what) + " (mask " + std::to_string(mask) + ") meets lane " + std::to_string(l) +
           " in the same collective with mask " + std::to_string(o.mask));
    } else if (o.mask != mask) {
      complete = false;
    }
  }
  if (complete) {
    Payload ins[32], outs[32];
    for (int l = 0; l < 32; ++l)
      if (mask >> l & 1u) std::memcpy(ins[l], fibers[warp_base + l].in, sizeof(Payload));
    combine(ins, outs, mask);
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& o = fibers[warp_base + l];
      std::memcpy(o.out, outs[l], sizeof(Payload));
      o.state = State::Runnable;
      o.op = nullptr;
    }
    // The caller continues at once; the other lanes run when the scheduler reaches them.
  } else {
    to_scheduler();
  }
  if (out_bytes) std::memcpy(out, f.out, out_bytes);
}

void pipeline_memcpy_async(void* dst, const void* src, size_t bytes) {
  Fiber& f = current("__pipeline_memcpy_async");
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("__pipeline_memcpy_async size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<uintptr_t>(dst) % bytes || reinterpret_cast<uintptr_t>(src) % bytes)
    fail("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes needs addresses aligned to its size");
  Block& b = *tl_block;
  if (static_cast<unsigned char*>(dst) < b.smem || static_cast<unsigned char*>(dst) + bytes > b.smem + b.smem_bytes)
    fail("__pipeline_memcpy_async destination outside the block's dynamic shared memory");
  // Read the source now (as the copy engine may), write the destination when the group is waited.
  f.open.push_back(AsyncCopy{dst, src, bytes});
}

void pipeline_commit() {
  Fiber& f = current("__pipeline_commit");
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void pipeline_wait_prior(size_t prior) {
  Fiber& f = current("__pipeline_wait_prior");
  while (f.groups.size() > prior) {
    for (const AsyncCopy& c : f.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    f.groups.erase(f.groups.begin());
  }
}

void launch(const char* name, dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  const long long nthreads = static_cast<long long>(block.x) * block.y * block.z;
  const long long nblocks = static_cast<long long>(grid.x) * grid.y * grid.z;
  auto bad = [&](const std::string& why) {
    throw std::runtime_error(std::string("cuda_sim: launch of kernel '") + name + "': " + why);
  };
  if (nthreads < 1 || nthreads > 1024) bad("block of " + std::to_string(nthreads) + " threads (1..1024)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    bad("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) + ")");
  if (smem_bytes > static_cast<size_t>(config().max_smem_optin))
    bad(std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than the device's " +
        std::to_string(config().max_smem_optin));
  if (nblocks == 0) return;
  const Order order = config().order;
  const int nworkers = static_cast<int>(std::max<long long>(1, std::min<long long>(config().workers, nblocks)));
  std::atomic<long long> next{0};
  std::mutex err_mu;
  std::string first_error;
  auto work = [&]() {
    Worker w;
    w.ensure(static_cast<int>(nthreads));
    for (;;) {
      const long long i = next.fetch_add(1);
      if (i >= nblocks) return;
      {
        std::lock_guard<std::mutex> g(err_mu);
        if (!first_error.empty()) return;
      }
      Block b;
      b.name = name;
      b.grid = grid;
      b.bdim = block;
      b.bidx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                    static_cast<unsigned>(i / (static_cast<long long>(grid.x) * grid.y)));
      b.nthreads = static_cast<int>(nthreads);
      b.fibers = &w.fibers;
      b.body = body;
      b.smem_bytes = smem_bytes;
      // Exactly the launch's bytes (AddressSanitizer sees past the end), NaN-pattern garbage.
      // 128-byte aligned like the hardware's shared window (a kernel may rely on what it declares).
      void* mem = nullptr;
      if (smem_bytes && posix_memalign(&mem, 128, smem_bytes) != 0) mem = nullptr;
      b.smem = static_cast<unsigned char*>(mem);
      if (b.smem) std::memset(b.smem, 0xFF, smem_bytes);
      tl_block = &b;
      run_block(b, order);
      tl_block = nullptr;
      std::free(b.smem);
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> g(err_mu);
        if (first_error.empty()) first_error = b.error;
        return;
      }
    }
  };
  if (nworkers == 1) {
    work();
  } else {
    std::vector<std::thread> ts;
    for (int i = 0; i < nworkers; ++i) ts.emplace_back(work);
    for (auto& t : ts) t.join();
  }
  if (!first_error.empty()) throw std::runtime_error(first_error);
}

}  // namespace cudasim

// ---- warp votes and the rest of the CUDA surface ----
namespace {
template <class F>
unsigned vote(const char* what, unsigned mask, int pred, F reduce) {
  unsigned p = pred ? 1u : 0u, out = 0;
  cudasim::warp_collective(what, mask, &p, sizeof(p), &out, sizeof(out),
                           [&](const cudasim::Payload* ins, cudasim::Payload* outs, unsigned m) {
                             unsigned ballot = 0;
                             for (int l = 0; l < 32; ++l) {
                               if (!(m >> l & 1u)) continue;
                               unsigned v;
                               std::memcpy(&v, ins[l], sizeof(v));
                               if (v) ballot |= 1u << l;
                             }
                             const unsigned r = reduce(ballot, m);
                             for (int l = 0; l < 32; ++l)
                               if (m >> l & 1u) std::memcpy(outs[l], &r, sizeof(r));
                           });
  return out;
}
}  // namespace

unsigned __ballot_sync(unsigned mask, int pred) {
  return vote("__ballot_sync", mask, pred, [](unsigned b, unsigned) { return b; });
}
int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(vote("__any_sync", mask, pred, [](unsigned b, unsigned) { return b ? 1u : 0u; }));
}
int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(vote("__all_sync", mask, pred, [](unsigned b, unsigned m) { return b == m ? 1u : 0u; }));
}
void __syncwarp(unsigned mask) { vote("__syncwarp", mask, 0, [](unsigned, unsigned) { return 0u; }); }

float atomicAdd(float* p, float v) {
  uint32_t o = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_RELAXED), n;
  for (;;) {
    float f;
    std::memcpy(&f, &o, 4);
    const float nf = f + v;
    std::memcpy(&n, &nf, 4);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &o, n, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return f;
  }
}

namespace nvcuda {
namespace wmma {
namespace detail {
const int* scramble(int kind, int rows, int cols) {
  static std::mutex mu;
  static std::vector<std::pair<long, std::unique_ptr<int[]>>> cache;
  const long key = (static_cast<long>(kind) << 20) | (rows << 10) | cols;
  std::lock_guard<std::mutex> g(mu);
  for (auto& e : cache)
    if (e.first == key) return e.second.get();
  const int n = rows * cols;
  std::unique_ptr<int[]> perm(new int[n]);
  for (int i = 0; i < n; ++i) perm[i] = i;
  std::mt19937 rng(static_cast<unsigned>(0x5eed + key));
  std::shuffle(perm.get(), perm.get() + n, rng);
  cache.emplace_back(key, std::move(perm));
  return cache.back().second.get();
}
}  // namespace detail
}  // namespace wmma
}  // namespace nvcuda
