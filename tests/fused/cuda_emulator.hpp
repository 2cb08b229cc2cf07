#pragma once
// A CPU emulator of the part of CUDA that titan's kernels use, so that the kernels of
// include/titan/fused/cuda/*.cuh run in CI, where there is no GPU: included first, with
// TITAN_CUDA_EMULATION defined, it lets g++ compile the kernels as host code
// (titan/fused/cuda/runtime.cuh takes its launch, device guard and multiprocessor count from here).
//
// A launch runs its blocks one after another, each on a new host thread whose fibers (ucontext)
// are the block's threads, each running until it reaches __syncthreads, a warp shuffle or its end.
// `__shared__` variables are function-local thread_local statics: each block's own, zeroed (not
// what the last block or launch left, which could hide a race). Threads and blocks run in the
// order the caller picks (ascending, descending or shuffled): a kernel whose results depend on it
// has a race. A failed CUDA_KERNEL_ASSERT, a __syncthreads that not every thread of the block
// reaches, a full-warp shuffle with exited lanes and a misaligned pack access end the launch with
// an error naming the block and thread, as a device-side error would. Only what the kernels use
// is emulated: 1-3D grids and blocks of at most 1024 threads, __syncthreads, __shfl_down_sync over
// full warps, __stwb of a uint4, the fp32 math functions.
// Not emulated: atomics, dynamic shared memory, streams, other warp intrinsics.
#ifdef __CUDACC__
#error "cuda_emulator.hpp compiles CUDA kernels as host code: include it from g++, not nvcc"
#endif
#define TITAN_CUDA_EMULATOR_INCLUDED 1

#include <c10/core/Device.h>
#include <c10/macros/Macros.h>

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// CUDA's function and variable qualifiers as host code: kernels become plain functions, and
// __shared__ variables thread_local statics: one per kernel instantiation and block.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

/// A launch's grid or block shape, or a thread's index in it.
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// CUDA's built-in variables: the running thread's indices and its launch's shape.
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
inline constexpr int warpSize = 32;

/// CUDA's 16-byte vector of four 32-bit words, and its (write-back) store.
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline void __stwb(uint4* p, uint4 value) { *p = value; }

/// 1 / sqrt(x) (CUDA's rsqrtf is within 2 ulp of it).
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace titan_emulation {

/// The order in which a launch runs its blocks, and each block its threads.
enum class Order { ascending, descending, shuffled };

namespace detail {

enum class State { runnable, at_syncthreads, at_shuffle, exited };

struct Thread {
  ucontext_t context;
  dim3 index;
  State state = State::exited;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping of the fiber's stack
};

// Per thread: the kernels' frames take a few KiB (more with AddressSanitizer, whose swapcontext
// clears the shadow of the whole stack at every switch: a larger stack costs time).
inline constexpr size_t kStackBytes = size_t{64} << 10;

/// The launch being emulated: its blocks' threads and the scheduler's context.
struct Launch {
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t scheduler;
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
  unsigned current = 0;
  std::function<void()> body;
  std::vector<std::array<unsigned char, 16>> lanes;  // each thread's value in a warp shuffle
  std::string error;
};

inline Launch* active = nullptr;
inline Order order = Order::ascending;
inline unsigned seed = 0;
inline int64_t multiprocessor_count = 2;

inline std::string describe(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

/// Leaves the running thread for the scheduler (for good when `exiting`), as AddressSanitizer
/// needs to be told when the stack changes.
inline void to_scheduler(bool exiting) {
  Launch& l = *active;
  Thread& t = l.threads[l.current];
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(exiting ? nullptr : &t.fake_stack, l.scheduler_stack, l.scheduler_stack_bytes);
#endif
  swapcontext(&t.context, &l.scheduler);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(t.fake_stack, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  (void)exiting;
}

/// Ends the launch with `message`, naming the running thread; never returns to the kernel.
[[noreturn]] inline void fail(const std::string& message) {
  Launch& l = *active;
  if (l.error.empty()) l.error = message + " in block " + describe(blockIdx) + ", thread " + describe(threadIdx);
  l.threads[l.current].state = State::exited;
  to_scheduler(true);
  std::abort();  // not reached: an ended thread is never resumed
}

/// Waits at a barrier until the scheduler releases it.
inline void wait(State barrier) {
  active->threads[active->current].state = barrier;
  to_scheduler(false);
}

inline void thread_main() {
  Launch& l = *active;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &l.scheduler_stack, &l.scheduler_stack_bytes);
#endif
  l.body();
  l.threads[l.current].state = State::exited;
  to_scheduler(true);
}

/// 0 .. n-1 in the emulator's order; `salt` varies the shuffle.
inline std::vector<unsigned> sequence(unsigned n, unsigned salt) {
  std::vector<unsigned> s(n);
  std::iota(s.begin(), s.end(), 0u);
  if (order == Order::descending) std::reverse(s.begin(), s.end());
  if (order == Order::shuffled) std::shuffle(s.begin(), s.end(), std::mt19937(seed * 7919u + salt));
  return s;
}

/// Releases the threads waiting at a barrier every thread it concerns has reached: the block's
/// __syncthreads, or a warp's shuffle. Records an error when none can be released.
inline void release(Launch& l, unsigned alive) {
  const auto n = static_cast<unsigned>(l.threads.size());
  const auto at = [&](State s) {
    return static_cast<unsigned>(
        std::count_if(l.threads.begin(), l.threads.end(), [&](const Thread& t) { return t.state == s; }));
  };
  const unsigned syncing = at(State::at_syncthreads);
  if (syncing == alive && syncing == n) {
    for (auto& t : l.threads) t.state = State::runnable;
    return;
  }
  bool released = false;
  for (unsigned first = 0; first < n; first += 32) {
    const unsigned last = std::min(n, first + 32);
    unsigned shuffling = 0, exited = 0;
    for (unsigned i = first; i < last; ++i) {
      shuffling += l.threads[i].state == State::at_shuffle;
      exited += l.threads[i].state == State::exited;
    }
    if (shuffling == 0 || shuffling + exited != last - first) continue;
    if (exited > 0) {
      l.error = "__shfl_down_sync over the full warp " + std::to_string(first / 32) + " of block " +
                describe(blockIdx) + " while " + std::to_string(exited) + " of its lanes have exited";
      return;
    }
    for (unsigned i = first; i < last; ++i) l.threads[i].state = State::runnable;
    released = true;
  }
  if (released) return;
  l.error = "threads of block " + describe(blockIdx) + " wait at barriers that are never complete: " +
            std::to_string(syncing) + " at __syncthreads, " + std::to_string(at(State::at_shuffle)) +
            " at a warp shuffle, " + std::to_string(n - alive) + " exited, of " + std::to_string(n);
}

/// Makes `t` thread `index` of a block, to start at the kernel on `stack` (a function of its own:
/// getcontext returns twice, which its caller's loop variables must not see).
[[gnu::noinline]] inline void start_thread(Thread& t, dim3 index, char* stack) {
  t.index = index;
  t.state = State::runnable;
  t.fake_stack = nullptr;
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = stack;
  t.context.uc_stack.ss_size = kStackBytes;
  t.context.uc_link = nullptr;
  makecontext(&t.context, thread_main, 0);
}

/// Runs block blockIdx of the launch to its end (or to the launch's error).
inline void run_block(Launch& l, unsigned salt) {
  const auto n = static_cast<unsigned>(l.threads.size());
  for (unsigned i = 0; i < n; ++i)
    start_thread(l.threads[i], dim3(i % blockDim.x, i / blockDim.x % blockDim.y, i / (blockDim.x * blockDim.y)),
                 l.stacks[i].get());
  const auto threads = sequence(n, salt);
  unsigned alive = n;
  while (alive > 0 && l.error.empty()) {
    bool ran = false;
    for (unsigned i : threads) {
      Thread& t = l.threads[i];
      if (t.state != State::runnable) continue;
      l.current = i;
      threadIdx = t.index;
      void* fake_stack = nullptr;
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_start_switch_fiber(&fake_stack, l.stacks[i].get(), kStackBytes);
#endif
      swapcontext(&l.scheduler, &t.context);
#if defined(__SANITIZE_ADDRESS__)
      __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
      (void)fake_stack;
      ran = true;
      alive -= t.state == State::exited;
      if (!l.error.empty()) return;
    }
    if (!ran && alive > 0) release(l, alive);
  }
}

/// Runs `body` as every thread of a grid x block launch; throws the launch's error.
inline void run(dim3 grid, dim3 block, std::function<void()> body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535)
    throw std::runtime_error("CUDA emulator: invalid configuration argument: grid " + describe(grid) + ", block " +
                             describe(block));
  if (active != nullptr) throw std::runtime_error("CUDA emulator: a launch from inside a kernel");
  Launch l;
  l.body = std::move(body);
  l.threads.resize(threads);
  l.lanes.resize(threads);
  for (uint64_t i = 0; i < threads; ++i) l.stacks.emplace_back(new char[kStackBytes]);
  gridDim = grid;
  blockDim = block;
  active = &l;
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned b : sequence(blocks, 0x9e3779b9u)) {
    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
    std::thread([&] { run_block(l, b); }).join();  // a new thread: the block's own zeroed __shared__
    if (!l.error.empty()) break;
  }
  active = nullptr;
  if (!l.error.empty()) throw std::runtime_error("CUDA emulator: " + l.error);
}

}  // namespace detail

/// Runs the next launches in `order` (a shuffle seeded by `seed`) until changed.
inline void set_order(Order order, unsigned seed = 0) {
  detail::order = order;
  detail::seed = seed;
}

}  // namespace titan_emulation

/// The block's threads wait here until all of them have arrived.
inline void __syncthreads() { titan_emulation::detail::wait(titan_emulation::detail::State::at_syncthreads); }

/// Lane l of a full warp gets `value` of lane l + delta (its own where that is past the warp's end).
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "a shuffled value is at most 16 bytes");
  namespace emulation = titan_emulation::detail;
  auto& l = *emulation::active;
  if (mask != 0xffffffffu || width != warpSize)
    emulation::fail("__shfl_down_sync with mask " + std::to_string(mask) + " and width " + std::to_string(width) +
                    ": the emulator has full warps only");
  const unsigned self = l.current, source = self + delta;
  std::memcpy(l.lanes[self].data(), &value, sizeof(T));
  emulation::wait(emulation::State::at_shuffle);
  T result = value;
  if (self % 32 + delta < 32 && source < l.threads.size()) std::memcpy(&result, l.lanes[source].data(), sizeof(T));
  emulation::wait(emulation::State::at_shuffle);  // every lane has read before any writes again
  return result;
}

// A failed device-side assertion ends the launch with an error, as CUDA's does.
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                                                             \
  if (C10_UNLIKELY(!(cond)))                                                                                 \
  titan_emulation::detail::fail(std::string("device-side assert `") + #cond + "` failed at " + __FILE__ + ":" + \
                                std::to_string(__LINE__))

namespace titan::cuda::detail {

/// The emulator has one device, the CPU: nothing to switch.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

/// The emulated GPU's multiprocessors: few, so that small tests take several grid-stride rounds.
inline int64_t multiprocessors() { return titan_emulation::detail::multiprocessor_count; }

/// A misaligned access is an error on a GPU ("misaligned address"); here too, not the x86 access
/// that would go through.
inline void check_aligned(const void* p, size_t alignment) {
  if (reinterpret_cast<uintptr_t>(p) % alignment != 0)
    titan_emulation::detail::fail("misaligned address: a " + std::to_string(alignment) + "-byte aligned access at " +
                                  std::to_string(reinterpret_cast<uintptr_t>(p)));
}

/// kernel<<<grid, block>>>(args...) in the emulator: every thread gets its own copy of the
/// arguments converted to the kernel's parameters, as on a GPU.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  titan_emulation::detail::run(grid, block, [&] { std::apply(kernel, params); });
}

}  // namespace titan::cuda::detail
