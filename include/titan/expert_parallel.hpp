#pragma once
// titan/expert_parallel.hpp: expert parallelism: each rank of an `ep` group holds E / ep of a MoE
// layer's experts, and every token assignment travels to the rank of its expert and back by
// all-to-all (torchtitan's ExpertParallel, GShard's dispatch and combine).
//
//   GroupedExperts' forward(rows [N, dim] sorted by expert, counts [E]) on rank r of ep ranks:
//     1. counts                -> all-to-all -> received[s][l]: rank s's rows for local expert l
//     2. rows (by expert)      -> all-to-all -> rows from every rank, by source rank then expert
//     3. regrouped by local expert, the local experts compute [M, dim] (the inner hooks, e.g.
//        FSDP over the data-parallel ranks, then the module's forward on its E / ep experts)
//     4. back in source order  -> all-to-all -> [N, dim], each row where it came from
//   The row exchanges are differentiable (their backward is the reverse all-to-all); the counts
//   are read on the host (one synchronisation per layer and pass, as torchtitan's).
//
// The experts' stacked weights w1, w2, w3 [E, ...] are sharded along dim 0 in place (Shard(0)
// over the group, for state dicts and checkpoints); the router (gate) and the shared experts stay
// replicated and are data parallel. An expert's gradient sums every ep rank's tokens, so it is
// divided by ExpertParallelOptions::gradient_divide_factor, by default the ep degree: with the
// data-parallel mean of every other gradient over all ranks (FSDP over dp × ep for the replicated
// parameters, over dp alone for the experts), every gradient is then the mean over all ranks'
// tokens (torchtitan sets FSDP's gradient divide factor for the same reason). Ranks of a
// sequence-parallel region borrowed for ep hold parts of one sequence, whose gradients add up
// instead: the factor counts only the ep ranks with separate losses (ep / tp when ep spans the tp
// ranks). A gradient reduction (FSDP, HSDP, a sequence-parallel sum) over ranks that hold
// different experts is an error.
//
// Expert tensor parallelism (MoeTensorParallel, torchtitan's ETP = TP) splits each expert itself
// over the tp ranks instead: w1 and w3 by rows of the hidden width, w2 by its columns. Every tp
// rank then routes the whole sequence (the layer's input all-gathered), computes its slice of
// every chosen expert and returns partial sums (reduce-scattered back to the sequence shards).
// Expert parallelism over other ranks (data- or context-parallel) composes with it: apply it after
// the tensor-parallel plan, and it adds its Shard(0) level to the experts' tp layouts.

#include <titan/collectives.hpp>
#include <titan/hooks.hpp>
#include <titan/moe.hpp>
#include <titan/sharding.hpp>
#include <titan/tensor_parallel.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace titan {

namespace detail {

/// Rows [N, dim] cut into `send` row counts per rank -> the rows every rank sent here, `receive`
/// counts per rank, concatenated; differentiable (the backward sends the gradients back).
inline at::Tensor exchange_rows(const at::Tensor& rows, const ProcessGroupPtr& group, const std::vector<int64_t>& send,
                                const std::vector<int64_t>& receive) {
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = all_to_all_raw(rows.contiguous(), *group, 0, send, 0, receive);  // [Σ receive, dim]
  }
  return with_backward(rows, std::move(out), "titan::ExpertAllToAllBackward",
                       [group, send, receive](torch::autograd::variable_list&& grads) {
                         return one(all_to_all_raw(grads[0].contiguous(), *group, 0, receive, 0, send));
                       });
}

}  // namespace detail

/// How apply_expert_parallel shards the experts (chained setters).
class ExpertParallelOptions {
 public:
  /// The name of the group's mesh dimension in the experts' layouts (state dicts, checkpoints).
  ExpertParallelOptions& mesh_dim(std::string name) {
    TORCH_CHECK(!name.empty(), "titan::ExpertParallelOptions: mesh_dim must not be empty");
    mesh_dim_ = std::move(name);
    return *this;
  }
  /// What the experts' gradients are divided by; unset: the ep degree. An expert's gradient sums
  /// the tokens of every ep rank; the factor is the number of those ranks whose losses are
  /// averaged (data- or context-parallel ranks). Ranks that hold parts of one sequence under
  /// sequence parallelism share one loss: with ep spanning tp such ranks, ep / tp (below 1 when
  /// ep < tp: the expert FSDP group then averages over tp / ep ranks whose parts add up).
  ExpertParallelOptions& gradient_divide_factor(double factor) {
    TORCH_CHECK(factor > 0, "titan::ExpertParallelOptions: gradient_divide_factor must be positive, got ", factor);
    gradient_divide_factor_ = factor;
    return *this;
  }
  const std::string& mesh_dim() const { return mesh_dim_; }
  const std::optional<double>& gradient_divide_factor() const { return gradient_divide_factor_; }

 private:
  std::string mesh_dim_ = "ep";
  std::optional<double> gradient_divide_factor_;
};

/// The hook apply_expert_parallel attaches to a GroupedExperts module: its weights hold this
/// rank's experts, and its forward sends each row to its expert's rank and brings the result back.
class ExpertParallelHook : public ModuleHook, public ParameterLayoutProvider {
 public:
  ExpertParallelHook(ProcessGroupPtr group, ExpertParallelOptions options, int64_t num_experts)
      : group_(std::move(group)), options_(std::move(options)), num_experts_(num_experts) {}

  std::string name() const override { return "expert_parallel"; }
  HookKind kind() const override { return HookKind::TensorParallel; }

  std::optional<TensorLayout> layout_of(const std::string& relative_name) const override {
    auto it = layouts_.find(relative_name);
    if (it == layouts_.end()) return std::nullopt;
    return it->second;
  }

  /// Keeps this rank's experts of `module`'s w1, w2 and w3 (dim 0), in place, their gradients
  /// divided by the gradient divide factor (see the top of this header).
  void shard(GroupedExpertsImpl& module, const std::string& path) {
    module_ = &module;
    path_ = path;
    const int64_t ranks = group_->size();
    const double factor = options_.gradient_divide_factor().value_or(static_cast<double>(ranks));
    for (const char* key : {"w1", "w2", "w3"}) {
      auto parameter = module.named_parameters(/*recurse=*/false)[key];
      TensorLayout layout = parameter_layout(module, key, parameter);  // expert tensor parallelism's, or whole
      layout.levels.push_back(ShardLevel{0, options_.mesh_dim(), group_, {}});
      if (ranks > 1) {
        at::NoGradGuard no_grad;
        const int64_t local = num_experts_ / ranks;
        parameter.set_data(parameter.narrow(0, group_->rank() * local, local).contiguous());  // [E / ep, ...]
        parameter.mutable_grad() = at::Tensor();
      }
      if (parameter.requires_grad() && factor != 1.0)
        parameter.register_hook([factor](const at::Tensor& grad) { return grad / factor; });
      layouts_[key] = std::move(layout);
    }
  }

  /// The experts' gradients sum the tokens of every ep rank (the all-to-all's backward): the ep
  /// group is their reduction, e.g. for context parallelism's check when ep borrows the cp ranks.
  std::vector<int> gradient_reduction_ranks(const at::Tensor& param) const override {
    if (module_ == nullptr || group_->size() == 1) return {};
    for (const auto& item : module_->named_parameters(/*recurse=*/false))
      if (item.value().is_same(param)) return group_->global_ranks();
    return {};
  }

  /// No other gradient reduction of the experts' weights (FSDP, HSDP, a sequence-parallel sum) may
  /// include another rank of the expert-parallel group: those ranks hold other experts.
  void verify_model(const torch::nn::Module& root) const override {
    detail::visit_modules(root, "", [&root](const std::string&, const torch::nn::Module& m) {
      const auto ep = find_hook<ExpertParallelHook>(m);
      if (!ep || !ep->module_) return;
      const auto& peers = ep->group_->global_ranks();
      const int me = peers[static_cast<size_t>(ep->group_->rank())];
      for (const auto& item : ep->module_->named_parameters(/*recurse=*/false))
        for (int rank : titan::gradient_reduction_ranks(root, item.value(), ep.get()))
          TORCH_CHECK(rank == me || std::find(peers.begin(), peers.end(), rank) == peers.end(),
                      "titan expert parallel: '", ep->path_, ".", item.key(), "' is sharded over the expert-parallel ",
                      "ranks ", c10::IntArrayRef(std::vector<int64_t>(peers.begin(), peers.end())), ", but its ",
                      "gradient is also reduced (FSDP, HSDP or a sequence-parallel sum) with rank ", rank, ", which ",
                      "holds other experts. Shard the experts with fully_shard over the ranks that hold the same ",
                      "experts (torchtitan's efsdp: the data-parallel ranks outside ep), the rest of the model over ",
                      "dp x ep; under tensor parallelism with ep spanning the tp ranks, give SequenceParallel the ",
                      "router (moe.gate), not the whole MoE layer");
    });
  }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(inputs.size() == 2, "titan expert parallel: '", module.name(), "' must be called as ",
                "titan::call(experts, rows, counts); it got ", inputs.size(), " tensors");
    const auto& rows = inputs[0];    // [N, dim], sorted by expert
    const auto& counts = inputs[1];  // [E] int64
    TORCH_CHECK(counts.dim() == 1 && counts.size(0) == num_experts_, "titan expert parallel: expected counts [",
                num_experts_, "] (every expert of the layer), got ", counts.sizes());
    const int64_t ranks = group_->size(), local = num_experts_ / ranks;
    if (ranks == 1) return next(inputs);
    // 1. How many rows each rank sends to each of this rank's experts: received [ep, E / ep].
    const auto sent_counts = counts.to(at::kLong).contiguous();  // [E]: to rank s go experts s·local ...
    const std::vector<int64_t> ones(static_cast<size_t>(ranks), 1);
    const auto received =
        detail::all_to_all_raw(sent_counts.view({ranks, local}), *group_, 0, ones, 0, ones);  // [ep, E / ep]
    const auto host = at::cat({sent_counts, received.view({-1})}).to(at::kCPU);  // [2E]: one device-to-host copy
    const auto* sent = host.data_ptr<int64_t>();  // [E]
    const auto* r = sent + num_experts_;          // [ep, E / ep]
    std::vector<int64_t> send(static_cast<size_t>(ranks), 0), receive(static_cast<size_t>(ranks), 0);
    for (int64_t s = 0; s < ranks; ++s)
      for (int64_t l = 0; l < local; ++l) {
        send[static_cast<size_t>(s)] += sent[s * local + l];
        receive[static_cast<size_t>(s)] += r[s * local + l];
      }
    // 2. The rows to their experts' ranks: [M, dim], by source rank then local expert.
    const auto arrived = detail::exchange_rows(rows, group_, send, receive);
    // 3. Regrouped by local expert (for expert l: source 0's run, source 1's, ...).
    std::vector<int64_t> order, local_counts(static_cast<size_t>(local), 0);
    std::vector<int64_t> start(static_cast<size_t>(ranks * local));  // first row of run (s, l) in `arrived`
    for (int64_t run = 0, row = 0; run < ranks * local; ++run) {
      start[static_cast<size_t>(run)] = row;
      row += r[run];
    }
    for (int64_t l = 0; l < local; ++l)
      for (int64_t s = 0; s < ranks; ++s) {
        const int64_t n = r[s * local + l], first = start[static_cast<size_t>(s * local + l)];
        for (int64_t i = 0; i < n; ++i) order.push_back(first + i);
        local_counts[static_cast<size_t>(l)] += n;
      }
    const auto index = at::tensor(order, at::TensorOptions().dtype(at::kLong)).to(rows.device());  // [M]
    const auto grouped = arrived.index_select(0, index);                                           // [M, dim]
    const auto computed = next({grouped, at::tensor(local_counts, counts.options().dtype(at::kLong))});  // [M, dim]
    // 4. Back in arrival order, then to the ranks the rows came from.
    const auto returned = at::zeros_like(computed).index_copy(0, index, computed);  // [M, dim]
    return detail::exchange_rows(returned, group_, receive, send);                   // [N, dim]
  }

  const ProcessGroupPtr& group() const { return group_; }

 private:
  ProcessGroupPtr group_;
  ExpertParallelOptions options_;
  int64_t num_experts_;
  std::map<std::string, TensorLayout> layouts_;
  const GroupedExpertsImpl* module_ = nullptr;  ///< the sharded module (it owns this hook)
  std::string path_;                            ///< its name, for messages
};

namespace detail {

/// The hook MoeTensorParallel puts on a MoE layer's experts (and shared experts): their SwiGLU
/// weights split along the hidden width over the tp ranks (w1 and w3 along `hidden_dim`, w2 along
/// `hidden_dim` + 1), reported as layouts; forward computes this rank's slice, a partial sum.
class HiddenSliceParallel : public ParallelStyle {
 public:
  explicit HiddenSliceParallel(int64_t hidden_dim = 1) : hidden_dim_(hidden_dim) {}
  std::string name() const override { return "expert tensor parallel (hidden slices)"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    auto hook = std::make_shared<HiddenSliceParallel>(*this);
    hook->bind(module, path, group, mesh_dim);
    hook->shard_parameter(module, "w1", hidden_dim_);
    hook->shard_parameter(module, "w3", hidden_dim_);
    hook->shard_parameter(module, "w2", hidden_dim_ + 1);
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    return next(inputs);  // replicated rows in, this rank's partial sums out (MoeTensorParallel reduces)
  }

 private:
  int64_t hidden_dim_;  ///< the hidden width's dim in w1 / w3 (1 in stacked [E, hidden, dim], 0 in [hidden, dim])
};

}  // namespace detail

/// Expert tensor parallelism for a titan::MoE layer (torchtitan's ETP = TP; see the top of this
/// header), a tensor-parallel style for the layer's plan entry (e.g. "layers.*.moe"):
///   input   layout() -> all-gathered: every tp rank routes the whole sequence; its gradient, the
///           ranks' partial sums, reduce-scattered back
///   gate    replicated, its gradient summed over the tp ranks (each holds a partial sum)
///   experts w1, w3 [E, hidden / tp, dim] and w2 [E, dim, hidden / tp] (shared experts alike)
///   output  the ranks' partial sums -> reduce-scattered to layout() (all-reduced for Replicate())
class MoeTensorParallel : public ParallelStyle {
 public:
  /// The layout of the layer's input and output: Shard(1) with sequence parallel, else Replicate().
  TORCH_ARG(Placement, layout) = Shard(1);

 public:
  std::string name() const override { return "tensor-parallel moe (expert tensor parallel)"; }

  void apply(torch::nn::Module& module, const std::string& path, const ProcessGroupPtr& group,
             const std::string& mesh_dim) const override {
    auto* moe = dynamic_cast<MoEImpl*>(&module);
    TORCH_CHECK(moe, "titan: MoeTensorParallel on '", path, "': the module is not a titan::MoE");
    TORCH_CHECK(!layout_.is_replicate_partial_grad(), "titan: MoeTensorParallel on '", path,
                "': layout must be Replicate() or Shard(d), got ", layout_.str());
    const int64_t hidden = moe->experts->w1.size(1);
    TORCH_CHECK(hidden % group->size() == 0, "titan: MoeTensorParallel on '", path, "': the experts' hidden width ",
                hidden, " does not split over the ", group->size(), " tensor-parallel ranks");
    auto hook = std::make_shared<MoeTensorParallel>(*this);
    hook->bind(module, path, group, mesh_dim);
    hook->sum_gradients_of(*moe->gate);  // each rank's: through its slices' partial outputs
    detail::HiddenSliceParallel(1).apply(*moe->experts, path + ".experts", group, mesh_dim);
    if (moe->shared_experts)
      detail::HiddenSliceParallel(0).apply(*moe->shared_experts, path + ".shared_experts", group, mesh_dim);
    attach_hook(module, hook);
  }

  at::Tensor forward(torch::nn::Module&, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(inputs.size() == 1, "titan: MoeTensorParallel on '", path_, "' expects one input, got ",
                inputs.size());
    const auto whole = detail::redistribute_tracked(inputs[0], layout_, ReplicatePartialGrad(), group_, extents_.get(),
                                                    path_);  // [batch, seq, dim] on every tp rank
    const auto partial = next({whole});                    // [batch, seq, dim]: this rank's hidden slices
    if (layout_.is_replicate()) return reduce_from_group(partial, group_);
    const int64_t dim = layout_.dim_for(partial.dim());
    if (extents_) extents_->record(partial.dim(), dim, partial.size(dim));
    return reduce_scatter(partial, group_, dim, ReduceOp::Sum);
  }
};

/// Shards the experts of every GroupedExperts module of `root` (a module, ModuleHolder,
/// shared_ptr or pointer) whose dotted name matches `pattern` (e.g. "layers.*.moe.experts") over
/// `group` (the "ep" mesh dimension): each rank keeps E / ep experts and attaches an
/// ExpertParallelHook. Apply it before activation checkpointing and fully_shard, as tensor
/// parallelism. Returns how many modules it sharded; none, a module that is not GroupedExperts, or
/// an expert count the group does not divide is an error naming it.
template <typename M>
int apply_expert_parallel(M&& root_like, const std::string& pattern, const ProcessGroupPtr& group,
                          const ExpertParallelOptions& options = ExpertParallelOptions()) {
  torch::nn::Module& root = detail::module_ref(root_like);
  TORCH_CHECK(group, "titan::apply_expert_parallel: this rank is not in the expert-parallel group");
  detail::check_hook_order(root, HookKind::TensorParallel, "titan::apply_expert_parallel");
  int sharded = 0;
  for (const auto& [name, module] : modules_matching(root, pattern)) {
    auto* experts = dynamic_cast<GroupedExpertsImpl*>(module);
    TORCH_CHECK(experts, "titan::apply_expert_parallel: '", name.empty() ? "<root>" : name, "' matches '", pattern,
                "' but is not a titan::GroupedExperts (expert parallelism shards the stacked experts of a MoE layer, ",
                "e.g. \"layers.*.moe.experts\")");
    TORCH_CHECK(!find_hook<ExpertParallelHook>(*experts), "titan::apply_expert_parallel: '", name,
                "' is already expert-parallel");
    const int64_t count = experts->w1.size(0);
    TORCH_CHECK(count % group->size() == 0, "titan::apply_expert_parallel: '", name, "' has ", count,
                " experts, which the ", group->size(), " expert-parallel ranks cannot share evenly; choose an ",
                "expert-parallel degree that divides ", count);
    auto hook = std::make_shared<ExpertParallelHook>(group, options, count);
    hook->shard(*experts, name);
    attach_hook(*experts, hook);
    ++sharded;
  }
  TORCH_CHECK(sharded > 0, "titan::apply_expert_parallel: no module matches '", pattern, "'; modules like it: ",
              detail::module_names_like(root, pattern));
  return sharded;
}

}  // namespace titan
