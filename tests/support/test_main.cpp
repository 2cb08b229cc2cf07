// Main of titan's doctest executables. Joins the job started by titan_launch (or runs as a
// single process: a world of one), with one intra-op thread per rank, then runs the test cases on
// every rank. The environment picks where they run:
//   TITAN_TEST_DEVICE  "cpu" (the default, also on a GPU machine) or "cuda" (this rank's GPU; more
//                      ranks than GPUs share them round robin, which titan allows with Gloo only)
//   TITAN_BACKEND      "gloo" (the default; on the CPU or over CUDA tensors) or "nccl"
// TITAN_DEVICE, TITAN_BACKEND and TITAN_SHARE_GPUS are exported to match (titan_launch's
// TITAN_DEVICE=cpu included), so that a World the code under test makes (the trainer's) agrees.
#define DOCTEST_CONFIG_IMPLEMENT
#include "multirank.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace titan_test {

titan::WorldPtr& world_slot() {
  static titan::WorldPtr world;
  return world;
}

const titan::WorldPtr& world() { return world_slot(); }

namespace {

/// The value of environment variable `name`, or `fallback` when it is unset or empty.
std::string env_or(const char* name, const char* fallback) {
  const char* value = std::getenv(name);
  return value == nullptr || *value == '\0' ? fallback : value;
}

/// The World's options from TITAN_TEST_DEVICE and TITAN_BACKEND (see the top of this file).
titan::DistOptions options_from_env() {
  const std::string device = env_or("TITAN_TEST_DEVICE", "cpu");
  TORCH_CHECK(device == "cpu" || device == "cuda", "TITAN_TEST_DEVICE='", device,
              "' is not a test device: use 'cpu' (the default) or 'cuda' (each rank's GPU)");
  const std::string backend = env_or("TITAN_BACKEND", "gloo");
  setenv("TITAN_DEVICE", device.c_str(), 1);
  setenv("TITAN_BACKEND", backend.c_str(), 1);
  setenv("TITAN_SHARE_GPUS", "1", 1);
  return titan::DistOptions().device(device).backend(backend).share_gpus(true).timeout(std::chrono::seconds(120));
}

}  // namespace
}  // namespace titan_test

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  // The suites compare float32 results with float32 references: no TF32 matmuls or convolutions.
  at::globalContext().setAllowTF32CuBLAS(false);
  at::globalContext().setAllowTF32CuDNN(false);
  try {
    titan_test::world_slot() = titan::init_distributed(titan_test::options_from_env());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "%s: %s\n", argv[0], e.what_without_backtrace());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[0], e.what());
    return 2;
  }
  doctest::Context context(argc, argv);
  int failures = context.run();
  titan_test::world_slot()->shutdown();
  titan_test::world_slot().reset();
  return failures;
}
