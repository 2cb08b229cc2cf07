// A rank that dies must not hang the others: rank 1 joins the job and exits with code 3; rank 0
// then enters an all-reduce, which must fail (not hang) within the timeout. Rank 0 exits 0 when it
// saw that error in time, 1 otherwise. Run by ctest as
//   titan_launch --nproc 2 --expect-codes 0,3 -- peer_failure
#include <titan/dist.hpp>

#include <chrono>
#include <cstdio>
#include <thread>

int main() {
  const auto timeout = std::chrono::seconds(20);
  auto world = titan::init_distributed(titan::DistOptions().timeout(timeout));
  if (world->rank() == 1) {
    std::fprintf(stderr, "rank 1: failing on purpose\n");
    std::_Exit(3);  // dies without shutting down, as a crashed process would
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const auto start = std::chrono::steady_clock::now();
  try {
    titan::all_reduce(torch::ones({1024}), world->group());
  } catch (const std::exception& e) {
    auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    std::fprintf(stderr, "rank 0: the all-reduce failed after %lld ms as expected: %.200s\n",
                 static_cast<long long>(waited.count()), e.what());
    std::_Exit(waited < timeout + std::chrono::seconds(10) ? 0 : 1);
  }
  std::fprintf(stderr, "rank 0: the all-reduce succeeded although rank 1 is gone\n");
  std::_Exit(1);
}
