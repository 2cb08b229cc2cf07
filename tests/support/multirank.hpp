#pragma once
// Helpers shared by titan's doctest suites: the job's World, the device the cases run on and
// tensor comparisons.
#include <doctest/doctest.h>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <string>

namespace titan_test {

/// The job every test case of this executable runs in (one World for the whole process).
const titan::WorldPtr& world();

/// Where the cases put the modules, inputs and collectives under test: this rank's GPU when the
/// suite runs with TITAN_TEST_DEVICE=cuda, else the CPU (the world is made on that device; see
/// support/test_main.cpp).
inline c10::Device device() { return world()->device(); }

/// Largest absolute difference between two tensors of the same shape (as double), on any devices.
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  REQUIRE_MESSAGE(a.sizes() == b.sizes(), "shapes differ: ", a.sizes(), " vs ", b.sizes());
  if (a.numel() == 0) return 0.0;
  return (a.detach().to(torch::kDouble).cpu() - b.detach().to(torch::kDouble).cpu()).abs().max().item<double>();
}

/// Whether two tensors have the same shape and values (torch::equal of their CPU copies: either
/// may live on device()).
inline bool same_values(const torch::Tensor& a, const torch::Tensor& b) {
  return torch::equal(a.detach().cpu(), b.detach().cpu());
}

/// The message of the error `fn` throws (a c10::Error without its backtrace, else what()); a
/// failed check and "" when it throws nothing.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  }
  FAIL_CHECK("expected an error");
  return "";
}

}  // namespace titan_test

/// Checks that two tensors agree within `tol` (max abs difference), printing the difference.
#define CHECK_CLOSE(a, b, tol)                                                             \
  do {                                                                                      \
    double titan_diff_ = titan_test::max_abs_diff((a), (b));                                \
    CHECK_MESSAGE(titan_diff_ <= (tol), #a " vs " #b ": max abs diff ", titan_diff_, " > ", (tol)); \
  } while (0)
