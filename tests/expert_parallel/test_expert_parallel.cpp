// titan/expert_parallel.hpp: a MoE layer whose experts are spread over the ranks (each holding
// E / ep) against the whole layer on one process: every rank's outputs and input gradients, the
// experts' gradients summed over every rank's tokens, the router's per rank; with at::_grouped_mm
// and with the per-expert loop; under FSDP (experts over dp, the router over dp x ep); over ranks
// holding parts of one sequence (the router under SequenceParallel); expert tensor parallelism
// (each expert split over tp, with EP 2 at 4 ranks); the sharded weights' layouts; errors. The expert-parallel group is the world (ep = 1, 2, 4 under
// titan.ranks1/2/4), or 2 of it under FSDP.
#include "../support/multirank.hpp"

#include <titan/expert_parallel.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>
#include <titan/moe.hpp>
#include <titan/tensor_parallel.hpp>

#include <algorithm>
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
            .find("but its gradient is also reduced (FSDP, HSDP or a sequence-parallel sum) with rank") !=
        std::string::npos);
}

TEST_CASE("expert parallel over ranks holding parts of one sequence: gradient_divide_factor(1), the router under "
          "SequenceParallel, every gradient the whole token set's") {
  // As when ep borrows the tensor-parallel ranks of a sequence-parallel region: the ranks' tokens
  // are parts of one sequence with one loss, so the experts' gradients add up over the ranks
  // (divided by 1, not ep) and the router's are summed by SequenceParallel.
  const auto& group = world()->group();
  const int64_t ranks = group->size(), rank = group->rank(), local = kExperts / ranks;
  auto reference = seeded_layer(true);
  auto layer = seeded_layer(true);
  titan::DeviceMesh mesh(world(), {"tp"}, {ranks});
  titan::parallelize_module(layer, mesh["tp"],
                            titan::ParallelizePlan().add("gate", titan::SequenceParallel().sequence_dim(0)));
  titan::apply_expert_parallel(layer, "experts", mesh.group("tp"),
                               titan::ExpertParallelOptions().mesh_dim("tp").gradient_divide_factor(1));
  for (int64_t s = 0; s < ranks; ++s) {  // the whole token set: one loss over every rank's part
    auto [x, dy] = batch_of(s);
    titan::call(reference, x).backward(dy);
  }
  auto [x, dy] = batch_of(rank);
  titan::call(layer, x).backward(dy);
  for (const auto& [mine, whole] : {std::pair{layer->experts->w1, reference->experts->w1},
                                    std::pair{layer->experts->w2, reference->experts->w2},
                                    std::pair{layer->experts->w3, reference->experts->w3}})
    CHECK_CLOSE(mine.grad(), whole.grad().narrow(0, rank * local, local), 1e-5);
  CHECK_CLOSE(layer->gate->weight.grad(), reference->gate->weight.grad(), 1e-5);
  // The typed query: the experts' gradients are reduced over the ep ranks (the all-to-all), the
  // router's over the tp ranks (SequenceParallel).
  const std::vector<int> everyone = group->global_ranks();
  CHECK(titan::gradient_reduction_ranks(*layer, layer->experts->w1) == (ranks > 1 ? everyone : std::vector<int>{}));
  CHECK(titan::gradient_reduction_ranks(*layer, layer->gate->weight) == (ranks > 1 ? everyone : std::vector<int>{}));
  titan::verify_calls(layer);
}

TEST_CASE("expert parallel: a sequence-parallel sum of the experts' gradients over the ep ranks is an error") {
  const int64_t ranks = world()->world_size();
  if (ranks < 2) return;
  auto layer = seeded_layer(true);
  titan::DeviceMesh mesh(world(), {"tp"}, {ranks});
  // SequenceParallel over the experts too (e.g. on the whole MoE layer), while ep spans the same
  // ranks, which hold other experts: their gradients would be summed with other experts'.
  titan::parallelize_module(layer, mesh["tp"],
                            titan::ParallelizePlan().add("experts", titan::SequenceParallel().sequence_dim(0)));
  titan::apply_expert_parallel(layer, "experts", mesh.group("tp"));
  const auto error = error_of([&] { titan::call(layer, batch_of(world()->rank()).first); });
  CHECK(error.find("'experts.w1' is sharded over the expert-parallel ranks") != std::string::npos);
  CHECK(error.find("a sequence-parallel sum") != std::string::npos);
  CHECK(error.find("give SequenceParallel the router (moe.gate), not the whole MoE layer") != std::string::npos);
}

TEST_CASE("expert tensor parallel: every expert split over the tp ranks (with EP 2 at 4 ranks) equals the whole "
          "layer: outputs, input and weight gradients, gathered weights") {
  // tp ranks hold parts of one sequence (sequence parallel, Shard(1)); with ep 2, each ep rank its
  // own sequence, and the experts are shared out over ep on top of their tp slices.
  const int64_t ranks = world()->world_size();
  const int64_t ep = ranks >= 4 ? 2 : 1, tp = ranks / ep;
  titan::DeviceMesh mesh(world(), {"ep", "tp"}, {ep, tp});
  const int64_t e = mesh.coordinate("ep"), t = mesh.coordinate("tp");
  auto sequence = [](int64_t which) {  // [2, 8, dim] and its output gradient
    auto gen = at::make_generator<at::CPUGeneratorImpl>(200 + which);
    auto x = torch::randn({2, 8, kDim}, gen, torch::kFloat);
    auto dy = torch::randn({2, 8, kDim}, gen, torch::kFloat);
    return std::pair{x.to(device()), dy.to(device())};
  };
  auto reference = seeded_layer(true);
  auto layer = seeded_layer(true);
  titan::parallelize_module(layer, mesh["tp"], titan::ParallelizePlan().add("", titan::MoeTensorParallel()));
  if (ep > 1) titan::apply_expert_parallel(layer, "experts", mesh.group("ep"));
  const std::vector<int64_t> w1_shape{kExperts / ep, kHidden / tp, kDim}, w2_shape{kExperts / ep, kDim, kHidden / tp};
  CHECK(layer->experts->w1.sizes().vec() == w1_shape);
  CHECK(layer->experts->w2.sizes().vec() == w2_shape);
  Tensor expected, expected_dx;
  for (int64_t s = 0; s < ep; ++s) {  // the whole layer over every ep rank's sequence: gradients summed
    auto [x, dy] = sequence(s);
    x.requires_grad_(true);
    auto y = titan::call(reference, x);
    y.backward(dy);
    if (s == e) std::tie(expected, expected_dx) = std::pair{y.detach(), x.grad()};
  }
  auto [whole_x, whole_dy] = sequence(e);
  auto x = whole_x.chunk(tp, 1)[t].clone().requires_grad_(true);  // [2, 8 / tp, dim]
  auto y = titan::call(layer, x);
  y.backward(whole_dy.chunk(tp, 1)[t]);
  CHECK_CLOSE(y, expected.chunk(tp, 1)[t], 1e-5);
  CHECK_CLOSE(x.grad(), expected_dx.chunk(tp, 1)[t], 1e-5);
  // Each rank's slice of its experts: w1 / w3 rows and w2 columns of the hidden width, the gradient
  // over every ep rank's tokens divided by ep (their mean, as without tensor parallelism).
  const int64_t local = kExperts / ep, slice = kHidden / tp;
  auto mine_of = [&](const Tensor& whole, int64_t hidden_dim) {
    return whole.narrow(0, e * local, local).narrow(hidden_dim, t * slice, slice) / static_cast<double>(ep);
  };
  CHECK_CLOSE(layer->experts->w1.grad(), mine_of(reference->experts->w1.grad(), 1), 1e-5);
  CHECK_CLOSE(layer->experts->w3.grad(), mine_of(reference->experts->w3.grad(), 1), 1e-5);
  CHECK_CLOSE(layer->experts->w2.grad(), mine_of(reference->experts->w2.grad(), 2), 1e-5);
  // The router: summed over tp by the style, over ep here (its data-parallel reduction); the tp
  // ranks' partial sums add in another order than the whole layer's: 1e-5 relative to its largest.
  auto gate = layer->gate->weight.grad();
  if (ep > 1) gate = titan::detail::all_reduce_raw(gate.contiguous(), *mesh.group("ep"), titan::ReduceOp::Sum);
  const auto& whole_gate = reference->gate->weight.grad();
  CHECK_CLOSE(gate, whole_gate, 1e-5 * std::max(1.0, whole_gate.abs().max().item<double>()));
  CHECK(titan::gradient_reduction_ranks(*layer, layer->gate->weight) ==
        (tp > 1 ? mesh.group("tp")->global_ranks() : std::vector<int>{}));
  // The experts' layouts compose tp's Shard(1 or 2) with ep's Shard(0): gathered, the whole layer's.
  for (const auto& [name, tensor] : titan::sharded_parameters(*layer))
    CHECK_CLOSE(titan::gather_full(tensor), reference->named_parameters()[name], 0.0);
  titan::verify_calls(layer);
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
