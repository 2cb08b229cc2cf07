// A rank that dies must not hang the others. Run by ctest as
//   titan_launch --nproc 2 --expect-codes 0,3 -- peer_failure [pipeline]
// Default: rank 1 joins the job and exits with code 3; rank 0 then enters an all-reduce, which
// must fail (not hang) within the timeout.
// "pipeline": both ranks run a 2-stage 1F1B pipeline; the loss of micro-batch 1 throws on rank 1
// (the last stage), which ends its process with code 3 as a trainer does on an error; rank 0,
// waiting for that micro-batch's gradient, must fail with an error naming the stage and peer.
// Rank 0 exits 0 when it saw that error in time, 1 otherwise.
#include <titan/dist.hpp>
#include <titan/pipeline.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

namespace {

/// Two linear stages: [2, 4] -> [2, 4] -> loss.
std::string run_pipeline(const titan::WorldPtr& world) {
  const int64_t rank = world->rank();
  auto stage = std::make_shared<torch::nn::Module>("stage");
  torch::nn::Linear linear = stage->register_module("linear", torch::nn::Linear(4, 4));
  titan::Pipeline pipeline(world->group(),
                           {titan::PipelineStage(rank, stage, [linear](const at::Tensor& x) mutable { return linear->forward(x); })},
                           titan::PipelineOptions().microbatches(4));
  std::vector<at::Tensor> inputs(4, torch::ones({2, 4}));
  auto loss = [](const at::Tensor& output, int64_t mb) {
    TORCH_CHECK(mb < 1, "the loss of micro-batch ", mb, " failed on purpose");
    return output.sum();
  };
  try {
    pipeline.step(inputs, loss);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  const bool pipeline = argc > 1 && std::strcmp(argv[1], "pipeline") == 0;
  const auto timeout = std::chrono::seconds(20);
  auto world = titan::init_distributed(titan::DistOptions().timeout(timeout));
  const auto start = std::chrono::steady_clock::now();
  std::string error;
  if (pipeline) {
    error = run_pipeline(world);
    if (world->rank() == 1) {
      std::fprintf(stderr, "rank 1: %s\n", error.c_str());
      std::_Exit(error.find("failed on purpose") != std::string::npos ? 3 : 1);  // a trainer exits on errors
    }
  } else {
    if (world->rank() == 1) {
      std::fprintf(stderr, "rank 1: failing on purpose\n");
      std::_Exit(3);  // dies without shutting down, as a crashed process would
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    try {
      titan::all_reduce(torch::ones({1024}), world->group());
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
  if (error.empty()) {
    std::fprintf(stderr, "rank 0: no error although rank 1 is gone\n");
    std::_Exit(1);
  }
  std::fprintf(stderr, "rank 0: failed after %lld ms as expected: %.300s\n", static_cast<long long>(waited.count()),
               error.c_str());
  const bool named = !pipeline || error.find("gradient from stage 1 (pipeline rank 1) failed (did that rank fail?)") != std::string::npos;
  std::_Exit(waited < timeout + std::chrono::seconds(10) && named ? 0 : 1);
}
