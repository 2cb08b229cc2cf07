// bench_moe: what a mixture-of-experts layer costs on this machine, one table.
//   1. GroupedExperts forward + backward with at::_grouped_mm against the per-expert loop, on the
//      same rows (tokens x top_k, sorted by expert, counts from a real router), and against the
//      same FLOPs as dense GEMMs (every row through one expert's weights): TFLOP/s of each.
//   2. The whole MoE layer (router, dispatch, experts, combine; forward + backward) at expert
//      parallelism 1 and at the world size (run under titan_launch --nproc N): median step time,
//      the rows and bytes each rank sends to other ranks per step (dispatch and combine, forward
//      and backward), and the load (max/mean tokens per expert) of the router.
// Every rank draws its own tokens; the EP 1 row is the same layer with every expert on every rank
// (what the data-parallel ranks would compute without expert parallelism).
//
//   titan_launch --nproc 2 -- bench_moe [--device cpu|cuda] [--tokens 2048] [--dim 256]
//                                       [--hidden 512] [--experts 8] [--top-k 2] [--steps 5]
#include <titan/expert_parallel.hpp>
#include <titan/moe.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <string>
#include <vector>

#include "bench_args.hpp"
#include "bench_measure.hpp"

namespace {

using titan_bench::int_arg;
using titan_bench::median_ms;
using titan_bench::text_arg;

}  // namespace

int main(int argc, char** argv) {
  auto world = titan::init_distributed();
  const torch::Device device = world->device().is_cuda() ? world->device()
                                                         : torch::Device(text_arg(argc, argv, "--device", "cpu"));
  const int64_t tokens = int_arg(argc, argv, "--tokens", 2048), dim = int_arg(argc, argv, "--dim", 256),
                hidden = int_arg(argc, argv, "--hidden", 512), experts = int_arg(argc, argv, "--experts", 8),
                top_k = int_arg(argc, argv, "--top-k", 2);
  const int steps = static_cast<int>(int_arg(argc, argv, "--steps", 5));
  const auto dtype = device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  const bool print = world->rank() == 0;
  torch::manual_seed(1 + world->rank());
  const auto routing = titan::MoeOptions().num_experts(experts).top_k(top_k);

  if (print) {
    std::printf("bench_moe on %s (%s), %d rank(s): %ld tokens per rank, dim %ld, expert width %ld, %ld experts, "
                "top-%ld\n",
                device.str().c_str(), c10::toString(dtype), world->world_size(), tokens, dim, hidden, experts, top_k);
    std::printf("%-34s %12s %12s %14s %12s %9s\n", "case", "ms (median)", "vs baseline", "sent rows/rank",
                "sent MB/rank", "TFLOP/s");
  }

  // 1. The experts alone: grouped GEMM against the loop, on one router's assignments.
  {
    titan::MoE layer(dim, hidden, routing, options);
    for (auto& p : layer->parameters()) p.data().normal_(0, 0.02);
    auto x = torch::randn({tokens, dim}, options);  // [T, dim]
    const auto d = titan::dispatch_tokens(titan::route_tokens(layer->gate->forward(x).detach(), routing), routing);
    auto rows = x.index_select(0, d.token).detach().requires_grad_(true);  // [T k, dim] sorted by expert
    auto dy = torch::randn({rows.size(0), dim}, options);
    // 3 GEMMs of [N, dim] x [dim, hidden] forward, twice that backward.
    const double flops = 18.0 * static_cast<double>(rows.size(0) * dim * hidden);
    auto row = [&](const char* name, double ms, double baseline_ms) {
      if (print)
        std::printf("%-34s %12.3f %11.2fx %14s %12s %9.3f\n", name, ms, baseline_ms / ms, "-", "-", flops / ms / 1e9);
    };
    auto& e = *layer->experts;
    const auto w1 = e.w1[0].detach().requires_grad_(true), w2 = e.w2[0].detach().requires_grad_(true),
               w3 = e.w3[0].detach().requires_grad_(true);  // one expert's [hidden, dim], [dim, hidden]
    const double dense_ms = median_ms(device, steps, [&] {
      at::linear(at::silu(at::linear(rows, w1)) * at::linear(rows, w3), w2).backward(dy);
    });
    row("experts' FLOPs as dense mm", dense_ms, dense_ms);
    for (const bool grouped : {false, true}) {
      e.grouped_mm = grouped;
      const bool runs_grouped = e.runs_grouped(rows);
      const double ms = median_ms(device, steps, [&] { e.forward(rows, d.counts).backward(dy); });
      row(grouped ? (runs_grouped ? "experts: _grouped_mm" : "experts: _grouped_mm (unavailable: loop)")
                  : "experts: per-expert loop",
          ms, dense_ms);
    }
  }

  // 2. The layer at EP 1 and EP = world size.
  double ep1_ms = 0;
  for (const int64_t ep : {int64_t{1}, static_cast<int64_t>(world->world_size())}) {
    titan::MoE layer(dim, hidden, routing, options);
    torch::manual_seed(7);  // the same weights on every rank
    for (auto& p : layer->parameters()) p.data().normal_(0, 0.02);
    torch::manual_seed(11 + world->rank());
    if (ep > 1) titan::apply_expert_parallel(layer, "experts", world->group());
    auto x = torch::randn({tokens, dim}, options).requires_grad_(true);
    auto dy = torch::randn({tokens, dim}, options);
    const double ms = median_ms(device, steps, [&] { titan::call(layer, x).backward(dy); });
    // Rows this rank sends to other ranks per step: its assignments to their experts, out and
    // back, forward and backward (4 transfers of [rows, dim]).
    auto loads = titan::moe_loads(layer, /*reset=*/true);
    const auto counts = loads.front().tokens.view({ep, experts / ep}).sum(1);  // [ep]: per destination rank
    const int64_t kept = ep > 1 ? counts[world->rank()].item<int64_t>() : counts.sum().item<int64_t>();
    const double per_step = static_cast<double>(counts.sum().item<int64_t>() - kept) / static_cast<double>(steps + 1);
    const double sent_rows = 4.0 * per_step;
    const double max_over_mean = titan::dist_max(loads.front().max_over_mean, world->group());
    const double worst_ms = titan::dist_max(ms, world->group());
    if (ep == 1) ep1_ms = worst_ms;
    if (print) {
      const std::string name = "layer fwd+bwd, EP " + std::to_string(ep) + " (load " +
                               std::to_string(max_over_mean).substr(0, 4) + ")";
      std::printf("%-34s %12.3f %11.2fx %14.0f %12.3f %9s\n", name.c_str(), worst_ms, ep1_ms / worst_ms, sent_rows,
                  sent_rows * static_cast<double>(dim) * static_cast<double>(c10::elementSize(dtype)) / 1e6, "-");
    }
    if (world->world_size() == 1) break;
  }
  world->shutdown();
  return 0;
}
