// titan/expert_parallel.hpp: a MoE layer whose experts are spread over the ranks (each holding
// E / ep) against the whole layer on one process: every rank's outputs and input gradients, the
// experts' gradients summed over every rank's tokens, the router's per rank; with at::_grouped_mm
// and with the per-expert loop; under FSDP (experts over dp, the router over dp x ep); the sharded
// weights' layouts; errors. The expert-parallel group is the world (ep = 1, 2, 4 under
// titan.ranks1/2/4), or 2 of it under FSDP.
#include "../support/multirank.hpp"

#include <titan/expert_parallel.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>
#include <titan/moe.hpp>

#include <string>

namespace {

using titan::MoeOptions;
using titan_test::device;
using titan_test::error_of;
using titan_test::world;
using torch::Tensor;

constexpr int64_t kDim = 16, kHidden = 32, kExperts = 8;

titan::MoE seeded_layer(bool grouped) {
  torch::manual_seed(12);
  titan::MoE layer(kDim, kHidden, MoeOptions().num_experts(kExperts).top_k(2).grouped_mm(grouped));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) p.normal_(0, 0.4);
  }
  layer->to(device());
  return layer;
}

/// Rank `rank`'s tokens [6, dim] and output gradient [6, dim] (drawn on the CPU: any device).
std::pair<Tensor, Tensor> batch_of(int64_t rank) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + rank);
  auto x = torch::randn({6, kDim}, gen, torch::kFloat);
  auto dy = torch::randn({6, kDim}, gen, torch::kFloat);
  return {x.to(device()), dy.to(device())};
}

Tensor summed_over_ranks(const Tensor& t) {
  return titan::detail::all_reduce_raw(t.contiguous(), *world()->group(), titan::ReduceOp::Sum);
}

}  // namespace

TEST_CASE("expert parallel: each rank's outputs equal the whole layer's; expert gradients sum every rank's tokens") {
  const auto& group = world()->group();
  const int64_t ranks = group->size(), rank = group->rank(), local = kExperts / ranks;
  for (bool grouped : {true, false}) {
    CAPTURE(grouped);
    auto reference = seeded_layer(grouped);
    auto layer = seeded_layer(grouped);
    CHECK(titan::apply_expert_parallel(layer, "experts", group) == 1);
    CHECK(layer->experts->w1.size(0) == local);
    // The whole layer on one process, over every rank's batch: its gradients sum them.
    Tensor expected, expected_dx;
    for (int64_t s = 0; s < ranks; ++s) {
      auto [x, dy] = batch_of(s);
      x.requires_grad_(true);
      auto y = titan::call(reference, x);
      y.backward(dy);
      if (s == rank) {
        expected = y.detach();
        expected_dx = x.grad();
      }
    }
    auto [x, dy] = batch_of(rank);
    x.requires_grad_(true);
    auto y = titan::call(layer, x);
    y.backward(dy);
    CHECK_CLOSE(y, expected, 1e-5);
    CHECK_CLOSE(x.grad(), expected_dx, 1e-5);
    // An expert's gradient: every rank's tokens, divided by the ep degree (the mean over ranks).
    for (const auto& [mine, whole] : {std::pair{layer->experts->w1, reference->experts->w1},
                                      std::pair{layer->experts->w2, reference->experts->w2},
                                      std::pair{layer->experts->w3, reference->experts->w3}})
      CHECK_CLOSE(mine.grad(), whole.grad().narrow(0, rank * local, local) / static_cast<double>(ranks), 1e-5);
    // The router is replicated: its gradient here is this rank's tokens'; summed, the whole batch's.
    CHECK_CLOSE(summed_over_ranks(layer->gate->weight.grad()), reference->gate->weight.grad(), 1e-5);
    // The sharded weights report Shard(0) over the group: gathered, the whole layer's.
    for (const auto& [name, tensor] : titan::sharded_parameters(*layer))
      CHECK_CLOSE(titan::gather_full(tensor), reference->named_parameters()[name], 0.0);
  }
}

TEST_CASE("expert parallel x FSDP: experts over dp, the gate over dp x ep, every gradient the mean over ranks") {
  const int64_t ranks = world()->world_size();
  if (ranks < 2) return;
  titan::DeviceMesh mesh(world(), {"dp", "ep"}, {ranks / 2, 2});
  mesh.flatten({"dp", "ep"}, "dp_ep");
  auto reference = seeded_layer(true);
  auto layer = seeded_layer(true);
  titan::apply_expert_parallel(layer, "experts", mesh.group("ep"));
  titan::fully_shard(layer->experts, mesh["dp"]);  // the ranks holding the same experts
  titan::fully_shard(layer, mesh["dp_ep"]);        // the gate: every rank
  for (int64_t s = 0; s < ranks; ++s) {  // the whole layer: the mean of every rank's loss
    auto [x, dy] = batch_of(s);
    titan::call(reference, x).backward(dy / static_cast<double>(ranks));
  }
  auto [x, dy] = batch_of(world()->rank());
  titan::call(layer, x).backward(dy);
  for (const auto& [name, tensor] : titan::sharded_parameters(*layer)) {
    INFO("gradient of ", name, " (", tensor.layout.placement(), ")");
    REQUIRE(tensor.local.grad().defined());
    titan::ShardedTensor grad{tensor.local.grad(), tensor.layout, tensor.blocks};
    CHECK_CLOSE(titan::gather_full(grad), reference->named_parameters()[name].grad(), 1e-5);
  }
}

TEST_CASE("expert parallel: FSDP over ranks that hold other experts is an error at the first forward") {
  const int64_t ranks = world()->world_size();
  if (ranks < 2) return;
  auto layer = seeded_layer(true);
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {ranks});
  titan::apply_expert_parallel(layer, "experts", world()->group());
  titan::fully_shard(layer, mesh);  // the experts too, over the expert-parallel ranks: wrong
  CHECK(error_of([&] { titan::call(layer, batch_of(world()->rank()).first); })
            .find("'experts.w1' is sharded over the expert-parallel ranks, but its gradient is reduced with rank") !=
        std::string::npos);
}

TEST_CASE("expert parallel: what it cannot shard is an error naming it") {
  titan::MoE layer(kDim, kHidden, MoeOptions().num_experts(kExperts));
  CHECK(error_of([&] { titan::apply_expert_parallel(layer, "gate", world()->group()); })
            .find("'gate' matches 'gate' but is not a titan::GroupedExperts") != std::string::npos);
  CHECK(error_of([&] { titan::apply_expert_parallel(layer, "expert", world()->group()); })
            .find("no module matches 'expert'") != std::string::npos);
  if (world()->world_size() > 1) {
    titan::MoE odd(kDim, kHidden, MoeOptions().num_experts(3));
    CHECK(error_of([&] { titan::apply_expert_parallel(odd, "experts", world()->group()); })
              .find("has 3 experts, which the " + std::to_string(world()->world_size()) +
                    " expert-parallel ranks cannot share evenly") != std::string::npos);
  }
}
