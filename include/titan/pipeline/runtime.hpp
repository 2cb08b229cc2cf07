#pragma once
// titan/pipeline/runtime.hpp: running a schedule's table over the pipeline group: PipelineStage,
// PipelineOptions and Pipeline (point-to-point sends and receives, step, evaluate).

#include <titan/ac.hpp>
#include <titan/collectives.hpp>
#include <titan/fsdp.hpp>
#include <titan/pipeline/schedule.hpp>
#include <titan/pipeline/split_backward.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <torch/arg.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace titan {

/// One stage this rank runs: its index, its module (the pruned model, for FSDP's gradient sync
/// and the parameters of weight passes) and how to run it on a micro-batch's input (the first
/// stage's input is the micro-batch itself, the others' the previous stage's output).
struct PipelineStage {
  PipelineStage(int64_t index, std::shared_ptr<torch::nn::Module> module,
                std::function<at::Tensor(const at::Tensor&)> forward)
      : index(index), module(std::move(module)), forward(with_microbatch(std::move(forward))) {}
  /// A stage whose function also gets the index of the micro-batch it runs, for inputs every stage
  /// reads besides the activation (e.g. the documents of block-causal attention, which each rank
  /// holds for the whole step and narrows to the micro-batch).
  PipelineStage(int64_t index, std::shared_ptr<torch::nn::Module> module,
                std::function<at::Tensor(const at::Tensor& input, int64_t microbatch)> forward)
      : index(index), module(std::move(module)), forward(std::move(forward)) {}
  int64_t index;
  std::shared_ptr<torch::nn::Module> module;
  std::function<at::Tensor(const at::Tensor& input, int64_t microbatch)> forward;

 private:
  static std::function<at::Tensor(const at::Tensor&, int64_t)> with_microbatch(
      std::function<at::Tensor(const at::Tensor&)> forward) {
    if (!forward) return nullptr;
    return [forward = std::move(forward)](const at::Tensor& input, int64_t) { return forward(input); };
  }
};

/// The loss of micro-batch `microbatch` from the last stage's output: its mean loss, which the
/// schedule divides by the number of micro-batches before backpropagating it (PipelineOptions::
/// scale_grads, as torch.distributed.pipelining does), so the gradients are those of the step's
/// mean. With scale_grads(false) it is backpropagated as returned (a loss already scaled for the
/// whole step, e.g. token sum / global token count, which weighs micro-batches by their tokens).
using PipelineLossFn = std::function<at::Tensor(const at::Tensor& output, int64_t microbatch)>;

/// Where a rank's step time went (seconds of the last step).
struct PipelineStats {
  double step_seconds = 0;     ///< the whole step
  double compute_seconds = 0;  ///< inside passes (forward, loss, backward), sends issued
  double forward_seconds = 0;  ///< of which forward passes (with the loss)
  double backward_seconds = 0; ///< full backward passes (B)
  double input_seconds = 0;    ///< input-gradient passes (I)
  double weight_seconds = 0;   ///< weight-gradient passes (W)
  double wait_seconds = 0;     ///< waiting for activations and gradients from other ranks
  int64_t peak_live = 0;       ///< most micro-batches whose activations this rank held at once
};

/// Options of Pipeline, with chained setters.
struct PipelineOptions {
  /// The schedule.
  TORCH_ARG(PipelineScheduleKind, schedule) = PipelineScheduleKind::OneFOneB;
  /// Micro-batches per step (m): the first stage's step() gets exactly this many inputs.
  TORCH_ARG(int64_t, microbatches) = 1;
  /// Whether each micro-batch's loss is divided by the number of micro-batches before its
  /// backward (torch.distributed.pipelining's scale_grads): true, the loss function returns a
  /// micro-batch's mean loss; false, it returns the loss already scaled for the step. step()
  /// returns the losses as the loss function returned them either way.
  TORCH_ARG(bool, scale_grads) = true;
  /// Called after each action with the action (benchmarks sample memory here).
  TORCH_ARG(std::function<void(const PipelineAction&)>, after_action) = nullptr;
};

/// Runs one rank's stages of a pipeline over `group` (the "pp" mesh dimension) with a schedule.
class Pipeline {
 public:
  /// `stages`: this rank's stages in order, stage indices r, r + p, ... (r = group rank, p = its
  /// size). Checks the stage counts of all ranks agree (a collective over `group`).
  Pipeline(ProcessGroupPtr group, std::vector<PipelineStage> stages, PipelineOptions options)
      : group_(std::move(group)), stages_(std::move(stages)), options_(std::move(options)) {
    TORCH_CHECK(group_, "titan::Pipeline: this rank is not in the pipeline group");
    TORCH_CHECK(!stages_.empty(), "titan::Pipeline: this rank has no stage");
    const int64_t p = group_->size(), r = group_->rank(), v = static_cast<int64_t>(stages_.size());
    for (int64_t i = 0; i < v; ++i) {
      const auto& stage = stages_[static_cast<size_t>(i)];
      TORCH_CHECK(stage.index == r + i * p, "titan::Pipeline: stage ", i, " of pipeline rank ", r, " has index ",
                  stage.index, "; expected ", r + i * p, " (stage s runs on rank s % ", p, ", in increasing order)");
      TORCH_CHECK(stage.module && stage.forward, "titan::Pipeline: stage ", stage.index, " has no module or forward");
    }
    if (p > 1) {
      auto counts = at::full({2}, v, at::TensorOptions().dtype(at::kLong).device(group_->device()));  // [2]
      counts[1] = -v;
      counts = detail::all_reduce_raw(counts, *group_, ReduceOp::Max).cpu();
      TORCH_CHECK(counts[0].item<int64_t>() == v && -counts[1].item<int64_t>() == v, "titan::Pipeline: ranks hold ",
                  "different numbers of stages (this rank ", v, ", others between ", -counts[1].item<int64_t>(),
                  " and ", counts[0].item<int64_t>(), ")");
    }
    schedule_ = make_pipeline_schedule(options_.schedule(), p, options_.microbatches(), v);
    simulate_schedule(schedule_);  // complete and deadlock-free
    if (options_.schedule() == PipelineScheduleKind::ZeroBubbleH1) {
      for (const auto& stage : stages_) {
        const bool wrapped = !detail::hooks_in_subtree<FsdpHook>(*stage.module).empty() ||
                             !detail::hooks_in_subtree<CheckpointHook>(*stage.module).empty();
        TORCH_CHECK(!wrapped, "titan::Pipeline: schedule ZBH1 splits backward into input and weight passes, which ",
                    "fully_shard and activation checkpointing do not support yet (stage ", stage.index, " uses ",
                    "them); use 1F1B or Interleaved1F1B");
      }
    }
  }

  const PipelineSchedule& schedule() const { return schedule_; }
  const PipelineStats& stats() const { return stats_; }
  int64_t num_stages() const { return schedule_.num_stages(); }
  /// Whether this rank runs stage 0 (it feeds the micro-batches).
  bool has_first_stage() const { return stages_.front().index == 0; }
  /// Whether this rank runs the last stage (it computes the losses).
  bool has_last_stage() const { return stages_.back().index == num_stages() - 1; }

  /// Forward and backward of every micro-batch by the schedule. `microbatches`: the inputs, one
  /// per micro-batch (read on the rank of the first stage only). Returns the micro-batches'
  /// losses (detached) on the rank of the last stage, else nothing. Parameter gradients
  /// accumulate; FSDP reduces them only in each stage's last backward.
  std::vector<at::Tensor> step(const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn) {
    return run(schedule_.actions[static_cast<size_t>(group_->rank())], microbatches, loss_fn, true);
  }

  /// Forward only (no gradients), e.g. for validation: returns the losses as step does.
  std::vector<at::Tensor> evaluate(const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn) {
    std::vector<PipelineAction> forwards;
    for (const auto& a : schedule_.actions[static_cast<size_t>(group_->rank())])
      if (a.kind == PipelineAction::Kind::Forward) forwards.push_back(a);
    at::NoGradGuard no_grad;
    return run(forwards, microbatches, loss_fn, false);
  }

 private:
  using Kind = PipelineAction::Kind;
  using Clock = std::chrono::steady_clock;
  static constexpr int64_t kMetaSize = 8;  // dtype, ndim, up to 6 sizes

  /// A micro-batch's state on one stage between its forward and backward.
  struct Slot {
    at::Tensor input, output, grad;  // output: the loss on the last stage
    std::optional<detail::WeightPass> weights;  // zero-bubble: prepared by the input pass
  };

  const PipelineStage& local(int64_t stage) const {
    return stages_[static_cast<size_t>(stage / group_->size())];
  }
  uint32_t tag(int64_t stage, int64_t mb, bool grad) const {
    return static_cast<uint32_t>((stage * schedule_.microbatches + mb) * 2 + (grad ? 1 : 0));
  }
  uint32_t meta_tag(int64_t stage) const {
    return static_cast<uint32_t>((num_stages() * schedule_.microbatches + stage) * 2);
  }
  int peer(int64_t stage) const { return static_cast<int>(schedule_.rank_of(stage)); }

  void send(const at::Tensor& tensor, int64_t to_stage, uint32_t t) {
    if (peer(to_stage) == group_->rank()) {  // the next stage is this rank's (one pipeline rank)
      local_[t] = tensor.detach().contiguous();
      return;
    }
    sends_.push_back(send_async(*group_, tensor, peer(to_stage), t));
  }

  /// Posts the receive of `t` from `from_stage` into a new tensor of `shape` and `options`.
  void post_recv(uint32_t t, int64_t from_stage, const std::vector<int64_t>& shape, const at::TensorOptions& options) {
    if (recvs_.count(t) || local_.count(t)) return;
    if (peer(from_stage) == group_->rank()) return;  // arrives through local_
    recvs_[t] = recv_async(*group_, shape, options, peer(from_stage), t);
  }

  at::Tensor wait_recv(uint32_t t, int64_t stage, int64_t mb, const char* what) {
    if (auto it = local_.find(t); it != local_.end()) {
      auto out = it->second;
      local_.erase(it);
      return out;
    }
    auto it = recvs_.find(t);
    TORCH_CHECK(it != recvs_.end(), "titan::Pipeline: internal error: no receive posted for micro-batch ", mb, "'s ",
                what, " from stage ", stage);
    const auto start = Clock::now();
    at::Tensor out;
    try {
      out = it->second.wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "titan::Pipeline: receiving micro-batch ", mb, "'s ", what, " from stage ", stage,
                  " (pipeline rank ", peer(stage), ") failed (did that rank fail?): ", e.what());
    }
    stats_.wait_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    recvs_.erase(it);
    return out;
  }

  /// The activation shape stage `stage` sends this step (received once per step, before its
  /// first activation).
  const std::pair<std::vector<int64_t>, at::TensorOptions>& activation_meta(int64_t stage) {
    auto it = meta_.find(stage);
    if (it != meta_.end()) return it->second;
    const uint32_t t = meta_tag(stage);
    post_recv(t, stage, {kMetaSize}, at::TensorOptions().dtype(at::kLong).device(group_->device()));  // unless local
    const auto meta = wait_recv(t, stage, 0, "shape").cpu();  // [8]
    const auto* m = meta.data_ptr<int64_t>();
    std::vector<int64_t> shape(m + 2, m + 2 + m[1]);
    auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(m[0])).device(group_->device());
    return meta_.emplace(stage, std::make_pair(shape, options)).first->second;
  }

  /// Sends stage `stage`'s output of `mb` on (its shape first, once per step).
  void send_activation(int64_t stage, int64_t mb, const at::Tensor& output) {
    auto sent = sent_shape_.find(stage);
    if (sent == sent_shape_.end()) {
      TORCH_CHECK(output.dim() <= kMetaSize - 2, "titan::Pipeline: stage ", stage, " outputs a ", output.dim(),
                  "-dimensional tensor; at most ", kMetaSize - 2, " dimensions can be sent");
      auto meta = at::zeros({kMetaSize}, at::kLong);  // [8]
      meta[0] = static_cast<int64_t>(output.scalar_type());
      meta[1] = output.dim();
      for (int64_t d = 0; d < output.dim(); ++d) meta[2 + d] = output.size(d);
      send(meta.to(group_->device()), stage + 1, meta_tag(stage));
      sent_shape_[stage] = output.sizes().vec();
    } else {
      TORCH_CHECK(sent->second == output.sizes().vec(), "titan::Pipeline: stage ", stage, " output of micro-batch ",
                  mb, " has shape ", output.sizes(), " but micro-batch 0's was ", c10::IntArrayRef(sent->second),
                  "; every micro-batch of a step must have the same shape");
    }
    send(output, stage + 1, tag(stage, mb, false));
  }

  /// Posts the receive action `a` waits for: an activation (its shape received first, once per
  /// step, when `wait_for_shape`; else skipped while the shape is unknown) or a gradient.
  void post_inputs(const PipelineAction& a, bool wait_for_shape) {
    if (a.kind == Kind::Forward && a.stage > 0) {
      auto it = meta_.find(a.stage - 1);
      if (it == meta_.end() && !wait_for_shape) return;
      const auto& meta = it != meta_.end() ? it->second : activation_meta(a.stage - 1);
      post_recv(tag(a.stage - 1, a.microbatch, false), a.stage - 1, meta.first, meta.second);
    } else if ((a.kind == Kind::Backward || a.kind == Kind::BackwardInput) && a.stage + 1 < num_stages()) {
      auto it = slots_.find({a.stage, a.microbatch});
      if (it != slots_.end())
        post_recv(tag(a.stage, a.microbatch, true), a.stage + 1, it->second.output.sizes().vec(),
                  it->second.output.options());
    }
  }

  void forward(const PipelineAction& a, const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn,
               bool train, std::vector<at::Tensor>& losses) {
    const auto& stage = local(a.stage);
    at::Tensor input;
    if (a.stage == 0) {
      input = microbatches[static_cast<size_t>(a.microbatch)];
    } else {
      input = wait_recv(tag(a.stage - 1, a.microbatch, false), a.stage - 1, a.microbatch, "activation");
      if (train && input.is_floating_point()) input.requires_grad_(true);
    }
    const auto start = Clock::now();
    at::Tensor output = run_stage(stage, a, input);
    if (a.stage + 1 == num_stages()) {
      output = loss_fn(output, a.microbatch);
      TORCH_CHECK(output.numel() == 1, "titan::Pipeline: the loss function returned ", output.sizes(),
                  " for micro-batch ", a.microbatch, "; expected a scalar");
      losses[static_cast<size_t>(a.microbatch)] = output.detach();
      if (options_.scale_grads()) output = output / static_cast<double>(schedule_.microbatches);
    } else {
      send_activation(a.stage, a.microbatch, output);
    }
    if (train) {
      TORCH_CHECK(output.requires_grad(), "titan::Pipeline: the output of stage ", a.stage, " for micro-batch ",
                  a.microbatch, " does not require grad; nothing would train");
      slots_[{a.stage, a.microbatch}] = Slot{input, output, {}, std::nullopt};
      stats_.peak_live = std::max<int64_t>(stats_.peak_live, static_cast<int64_t>(slots_.size()));
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    stats_.forward_seconds += seconds;
    stats_.compute_seconds += seconds;
  }

  /// Runs `stage`'s function on `input`; an error gains a context line naming the stage, the
  /// micro-batch and the input, and keeps its type (c10::IndexError, c10::OutOfMemoryError, ...).
  at::Tensor run_stage(const PipelineStage& stage, const PipelineAction& a, const at::Tensor& input) {
    try {
      return stage.forward(input, a.microbatch);
    } catch (c10::Error& e) {
      const bool activation = a.stage > 0;
      e.add_context(c10::str(
          "titan::Pipeline: stage ", a.stage, " failed on micro-batch ", a.microbatch, ", whose input is ",
          activation ? "the activation of stage " + std::to_string(a.stage - 1) : std::string("the micro-batch"), " (",
          input.scalar_type(), " ", input.sizes(), ")",
          activation ? ". A stage that does not hold the model's first modules (e.g. the embedding) gets the "
                       "previous stage's output: the model's forward must skip the modules its stage does not "
                       "hold (docs/pipeline_parallel.md, 'Pipelining your own model')"
                     : ""));
      throw;
    }
  }

  void backward(const PipelineAction& a) {
    auto it = slots_.find({a.stage, a.microbatch});
    TORCH_CHECK(it != slots_.end(), "titan::Pipeline: internal error: ", a.text(), " before its forward");
    auto& slot = it->second;
    const bool last = a.stage + 1 == num_stages();
    if (a.kind != Kind::BackwardWeight && !last) {
      slot.grad = wait_recv(tag(a.stage, a.microbatch, true), a.stage + 1, a.microbatch, "gradient");
    }
    const auto start = Clock::now();
    const auto& stage = local(a.stage);
    torch::autograd::variable_list grads;
    if (!last) grads.push_back(slot.grad);
    const bool needs_input_grad = a.stage > 0 && slot.input.requires_grad();
    if (a.kind == Kind::Backward) {
      // FSDP reduces the gradients and frees the gathered parameters only in the stage's last
      // backward of the step: one all-gather and one reduce-scatter per unit and step.
      const bool last_of_stage = a.microbatch == last_backward_.at(a.stage);
      set_requires_gradient_sync(*stage.module, last_of_stage);
      set_reshard_after_backward(*stage.module, last_of_stage);
      torch::autograd::backward({slot.output}, grads);
      if (a.stage > 0) send_input_grad(a, needs_input_grad ? slot.input.grad() : at::Tensor(), slot.input);
      slots_.erase(it);
    } else if (a.kind == Kind::BackwardInput) {
      // The input gradient only, sent on at once; the branch points of the weight gradients keep
      // what they received (the first stage has no input gradient: its weight pass does it all).
      if (needs_input_grad) {
        slot.weights = detail::prepare_weight_pass(slot.output, slot.input, trainable(stage));
        auto g = torch::autograd::grad({slot.output}, {slot.input}, grads, /*retain_graph=*/true,
                                       /*create_graph=*/false, /*allow_unused=*/true);
        send_input_grad(a, g[0], slot.input);
      } else if (a.stage > 0) {
        send_input_grad(a, at::Tensor(), slot.input);
      }
    } else {
      if (slot.weights) {
        slot.weights->run();
      } else {  // the first stage, or a weight used twice: backward restricted to the parameters
        const auto params = trainable(stage);
        if (!params.empty()) torch::autograd::backward({slot.output}, grads, /*retain_graph=*/false, false, params);
      }
      slots_.erase(it);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    (a.kind == Kind::Backward ? stats_.backward_seconds
     : a.kind == Kind::BackwardInput ? stats_.input_seconds
                                     : stats_.weight_seconds) += seconds;
    stats_.compute_seconds += seconds;
  }

  static std::vector<at::Tensor> trainable(const PipelineStage& stage) {
    std::vector<at::Tensor> params;
    for (const auto& p : stage.module->parameters())
      if (p.requires_grad()) params.push_back(p);
    return params;
  }

  void send_input_grad(const PipelineAction& a, const at::Tensor& grad, const at::Tensor& input) {
    send(grad.defined() ? grad : at::zeros_like(input), a.stage - 1, tag(a.stage - 1, a.microbatch, true));
  }

  std::vector<at::Tensor> run(const std::vector<PipelineAction>& actions, const std::vector<at::Tensor>& microbatches,
                              const PipelineLossFn& loss_fn, bool train) {
    const int64_t m = schedule_.microbatches;
    if (has_first_stage())
      TORCH_CHECK(static_cast<int64_t>(microbatches.size()) == m, "titan::Pipeline: got ", microbatches.size(),
                  " micro-batch inputs; the pipeline was made for ", m, " (PipelineOptions::microbatches)");
    if (has_last_stage()) TORCH_CHECK(loss_fn, "titan::Pipeline: the rank of the last stage needs a loss function");
    const auto start = Clock::now();
    stats_ = PipelineStats{};
    meta_.clear();
    sent_shape_.clear();
    last_backward_.clear();
    for (const auto& a : actions)
      if (a.kind == Kind::Backward) last_backward_[a.stage] = a.microbatch;
    std::vector<at::Tensor> losses(has_last_stage() ? static_cast<size_t>(m) : 0);
    if (train) set_fsdp_step_mode(true);
    try {
      for (size_t k = 0; k < actions.size(); ++k) {
        // Receives are posted in the table's order (NCCL matches them by order, not tag): this
        // action's, then the next one's, so it is in flight while this one computes.
        const auto& a = actions[k];
        post_inputs(a, true);
        if (k + 1 < actions.size()) post_inputs(actions[k + 1], false);
        if (a.kind == Kind::Forward)
          forward(a, microbatches, loss_fn, train, losses);
        else
          backward(a);
        if (options_.after_action()) options_.after_action()(a);
      }
      for (auto& transfer : sends_) transfer.wait();
    } catch (...) {
      // The error goes to the caller, whose process is expected to end (as the example trainer
      // does): the neighbours waiting on this rank then fail as its connections close.
      set_fsdp_step_mode(false);
      clear();
      throw;
    }
    set_fsdp_step_mode(false);
    TORCH_CHECK(slots_.empty() && recvs_.empty() && local_.empty(), "titan::Pipeline: internal error: ",
                slots_.size(), " micro-batch states, ", recvs_.size(), " receives left after the step");
    clear();
    stats_.step_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    if (train && !verified_) verify_stages();
    return losses;
  }

  /// After the first training step (the pipeline owns the step): every hooked module of each stage
  /// ran through titan::call (a stage function calling its module with ->forward skips the root's
  /// hooks) and each hook kind's model-wide check holds (titan::verify_calls), naming the stage.
  void verify_stages() {
    verified_ = true;
    for (const auto& stage : stages_) {
      try {
        verify_calls(*stage.module);
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "titan::Pipeline: stage ", stage.index, " after the first step: ", e.what_without_backtrace(),
                    ". A stage function runs its module as titan::call(module, input)");
      }
    }
  }

  /// FSDP units of the stages keep their gathered parameters and unreduced gradients across the
  /// micro-batches of a step (`within`), or behave as usual.
  void set_fsdp_step_mode(bool within) {
    for (const auto& stage : stages_) {
      set_requires_gradient_sync(*stage.module, !within);
      set_reshard_after_backward(*stage.module, !within);
    }
  }

  void clear() {
    sends_.clear();
    recvs_.clear();
    local_.clear();
    slots_.clear();
  }

  ProcessGroupPtr group_;
  std::vector<PipelineStage> stages_;
  PipelineOptions options_;
  PipelineSchedule schedule_;
  PipelineStats stats_;
  std::map<std::pair<int64_t, int64_t>, Slot> slots_;  // (stage, micro-batch)
  std::map<uint32_t, PendingTransfer> recvs_;           // by tag
  std::map<uint32_t, at::Tensor> local_;                // stage-to-stage on this rank, by tag
  std::vector<PendingTransfer> sends_;
  std::map<int64_t, std::pair<std::vector<int64_t>, at::TensorOptions>> meta_;  // received shapes by stage
  std::map<int64_t, std::vector<int64_t>> sent_shape_;                         // sent shapes by stage
  std::map<int64_t, int64_t> last_backward_;                                   // stage -> its last B
  bool verified_ = false;                                                      // verify_stages ran
};

}  // namespace titan
