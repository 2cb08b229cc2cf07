#pragma once
// titan/detail/tasks.hpp: the thread pool of titan's file I/O (titan/tasks.hpp makes it public):
// an index-claiming loop on a few threads, and how many threads file I/O takes. Standard library only.

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace titan {
namespace detail {

/// Threads per rank for checkpoint and safetensors file I/O when the options say 0: the cores,
/// at most 4 (beyond that a single device rarely writes faster, and ranks share the cores).
inline int default_io_threads() {
  return static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1U, 4U));
}

/// `threads` when positive, else default_io_threads().
inline int io_threads_or_default(int threads) { return threads > 0 ? threads : default_io_threads(); }

/// Runs task(0) ... task(count - 1) on up to `threads` threads (the caller's included), each
/// taking the next index. After the first error no new task starts; it is rethrown once all
/// threads have stopped.
inline void run_tasks(int threads, size_t count, const std::function<void(size_t)>& task) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (size_t i = next++; i < count && !failed; i = next++) {
      try {
        task(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
  };
  const size_t helpers = std::min(count, static_cast<size_t>(std::max(threads, 1))) - (count > 0 ? 1 : 0);
  std::vector<std::thread> pool;
  pool.reserve(helpers);
  for (size_t t = 0; t < helpers; ++t) pool.emplace_back(work);
  work();
  for (auto& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace detail
}  // namespace titan
