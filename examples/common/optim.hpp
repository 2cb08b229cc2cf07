#pragma once
// Optimization pieces of the example trainers: AdamW with two parameter groups, the learning-rate
// schedule and gradient accumulation. (The global gradient norm over sharded parameters is the
// library's titan::grad_norm; FusedAdamW applies the clipping inside its step.)
//
// API summary
//   auto opt = make_adamw(model->named_parameters(), AdamWConfig().lr(3e-4).weight_decay(0.1));
//       // a FusedAdamW; group 0: decayed, group 1: no weight decay (norms, biases, 1-D; see is_no_decay)
//   opt->skip_if(norm.isfinite().logical_not().to(torch::kFloat).reshape({1}));  // device-side skip
//   opt->scale_grads(titan::clip_coefficient(norm, max_norm));                  // clipping, in the step
//   opt->write_compute_copies(titan::fsdp_units(model));   // one-rank FSDP: the bf16 copy, in the step
//   LRSchedule schedule(LRScheduleOptions().warmup_steps(2).total_steps(100).decay_type("cosine"));
//   double lr = schedule.apply(*opt, step, base_lr);     // step = 1, 2, ... (the optimizer step
//                                                        // about to run); sets every group's lr
//   train_state.add("lr_schedule", schedule);            // checkpointed: the last step applied
//   int64_t k = gradient_accumulation_steps(global_batch, local_batch, dp_degree);
//   adamw_config(cfg), lr_schedule_options(cfg)   // from a TrainConfig

#include "config.hpp"

#include <titan/checkpoint/stateful.hpp>
#include <titan/fsdp/unit.hpp>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace titan::examples {

/// AdamW hyperparameters (mirrors [optimizer]).
struct AdamWConfig {
  TORCH_ARG(double, lr) = 8e-4;
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.95;
  TORCH_ARG(double, eps) = 1e-8;
  TORCH_ARG(double, weight_decay) = 0.1;
  /// Put norms, biases and 1-D parameters in a group without weight decay.
  TORCH_ARG(bool, no_decay_norms_and_biases) = true;
};

/// True for parameters that get no weight decay: a name part containing "norm" (RMSNorm,
/// LayerNorm weights: "layers.0.attention_norm.weight"), a last part "bias", or fewer than 2
/// dimensions (FSDP shards keep their dimensions, so sharded weights are judged right).
bool is_no_decay(const std::string& name, const torch::Tensor& parameter);

/// torch::optim::AdamW whose step runs ATen's fused AdamW kernel (at::_fused_adamw_, on CPU and
/// CUDA: one pass over the tensors of each device and dtype) instead of LibTorch's loop of eight
/// kernels per parameter. Same math as torch.optim.AdamW and the same state (AdamWParamState), so
/// checkpoints and titan::memory_usage see a plain AdamW.
///
/// skip_if(flag) makes the next step() a no-op on the device wherever `flag` (a 1-element float
/// tensor, e.g. "the gradient norm is not finite") is nonzero, without a host sync; the step count
/// still advances (a skipped step shifts Adam's bias correction by one step, which is negligible).
///
/// scale_grads(coefficient) multiplies the gradients by `coefficient` inside the next step's kernel
/// (gradient clipping: titan::clip_coefficient of titan::grad_norm) instead of a separate pass over
/// them: the kernel divides by its grad_scale, 1 / coefficient, and writes the scaled gradients
/// back, as titan::clip_grad_norm_ would leave them (within an ulp: a division by the reciprocal
/// instead of a product).
///
/// write_compute_copies(units) hands it the FSDP units that keep their compute copy
/// (FsdpOptions::keep_compute_copy, one rank): their parameters are stepped by titan::adamw_copy_,
/// which reads the bf16 gradients as FSDP left them and writes the bf16 copy the next forward
/// computes with (the same values as a cast); each unit is then told which copies were written
/// (FsdpHook::compute_copies_written). Other parameters, and all of them with amsgrad, take ATen's
/// kernel (gradients of another dtype than their parameter are cast first, and not written back
/// scaled).
class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  torch::Tensor step(LossClosure closure = nullptr) override;
  /// Skip the next step where `found_inf` (1 element, float32) is nonzero.
  void skip_if(torch::Tensor found_inf) { found_inf_ = std::move(found_inf); }
  /// Multiply the gradients by `coefficient` (1 element, positive) in the next step.
  void scale_grads(torch::Tensor coefficient) { coefficient_ = std::move(coefficient); }
  /// Write the compute copies of these FSDP units in each step (titan::fsdp_units(model); units
  /// that keep none are passed over, each step).
  void write_compute_copies(std::vector<std::shared_ptr<titan::FsdpHook>> units) { units_ = std::move(units); }

 private:
  /// A parameter's compute copy and the unit that keeps it.
  struct ComputeCopy {
    torch::Tensor copy;
    titan::FsdpHook* unit;
  };
  /// The compute copy of each parameter of the units that keep one now, by TensorImpl (none with
  /// amsgrad, which titan::adamw_copy_ does not do).
  std::unordered_map<const c10::TensorImpl*, ComputeCopy> compute_copies() const;

  torch::Tensor found_inf_;
  torch::Tensor coefficient_;
  std::vector<std::shared_ptr<titan::FsdpHook>> units_;
};

/// FusedAdamW over `parameters` with two groups: 0 = decayed, 1 = weight_decay 0 (empty
/// groups are left out, so a model without norms or biases has one). Without
/// no_decay_norms_and_biases, every parameter is in group 0.
std::unique_ptr<FusedAdamW> make_adamw(const torch::OrderedDict<std::string, torch::Tensor>& parameters,
                                                const AdamWConfig& config);

/// Learning-rate schedule options (mirrors [lr_scheduler] plus the step count).
struct LRScheduleOptions {
  TORCH_ARG(int64_t, warmup_steps) = 0;          ///< linear warmup length
  TORCH_ARG(int64_t, total_steps) = 1;           ///< training.steps
  /// The last steps that decay (warmup-stable-decay: the steps between keep the base lr); -1 =
  /// every step after warmup
  TORCH_ARG(int64_t, decay_steps) = -1;
  TORCH_ARG(std::string, decay_type) = "linear";  ///< "linear", "sqrt", "cosine" or "constant"
  TORCH_ARG(double, min_lr_ratio) = 0.0;         ///< factor reached at the last step
};

/// Linear warmup, a stable phase, then decay, as a factor of the base learning rate. With D
/// decay steps (total - warmup unless decay_steps is set) and step s = 1..total:
///   s <= warmup:         s / (warmup + 1)
///   s <= total - D:      1 (the stable phase: none unless decay_steps is set)
///   after:               p = (s - (total - D)) / D  (in (0, 1])
///                        min + (1 - min) * d(p), d = 1 - p (linear), 1 - sqrt(p) (sqrt),
///                        (1 + cos(pi p)) / 2 (cosine), 1 (constant)
/// so warmup never starts at lr 0 and the last step runs at min_lr_ratio (1 for constant).
/// Checkpoints save it as a component (titan::Stateful): the last step it applied.
class LRSchedule : public titan::Stateful {
 public:
  explicit LRSchedule(LRScheduleOptions options);
  /// The factor of step `step` (1-based optimizer step).
  double factor(int64_t step) const;
  /// Sets the lr of every parameter group of `optimizer` to base_lr * factor(step); returns it.
  double apply(torch::optim::Optimizer& optimizer, int64_t step, double base_lr);
  /// The step apply() last ran for (0 before the first).
  int64_t last_step() const { return last_step_; }
  const LRScheduleOptions& options() const { return options_; }
  /// {"last_step": ...}
  titan::ComponentState state() const override;
  void load_state(const titan::ComponentState& state) override;

 private:
  LRScheduleOptions options_;
  int64_t last_step_ = 0;
};

/// The [optimizer] section as AdamWConfig (errors when optimizer.name is not AdamW).
AdamWConfig adamw_config(const TrainConfig& config);
/// The [lr_scheduler] section with training.steps as the total.
LRScheduleOptions lr_schedule_options(const TrainConfig& config);

/// Micro-batches per optimizer step: global_batch / (local_batch * dp_degree); global_batch <= 0
/// means local_batch * dp_degree (no accumulation). Errors when it does not divide.
int64_t gradient_accumulation_steps(int64_t global_batch, int64_t local_batch, int64_t dp_degree);

}  // namespace titan::examples
