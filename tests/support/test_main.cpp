// Main of titan's doctest executables. Joins the job started by titan_launch (or runs as a
// single process), with one intra-op thread per rank, then runs the test cases on every rank.
// The suites run on the CPU with Gloo, also on a GPU machine, unless TITAN_DEVICE says otherwise.
#define DOCTEST_CONFIG_IMPLEMENT
#include "multirank.hpp"

#include <cstdlib>

namespace titan_test {

titan::WorldPtr& world_slot() {
  static titan::WorldPtr world;
  return world;
}

const titan::WorldPtr& world() { return world_slot(); }

}  // namespace titan_test

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  if (std::getenv("TITAN_DEVICE") == nullptr) setenv("TITAN_DEVICE", "cpu", 1);
  if (std::getenv("TITAN_BACKEND") == nullptr) setenv("TITAN_BACKEND", "gloo", 1);
  titan_test::world_slot() = titan::init_distributed(titan::DistOptions().timeout(std::chrono::seconds(120)));
  doctest::Context context(argc, argv);
  int failures = context.run();
  titan_test::world_slot()->shutdown();
  titan_test::world_slot().reset();
  return failures;
}
