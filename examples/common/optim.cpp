#include "optim.hpp"

#include <titan/fused/adamw.hpp>

#include <ATen/ops/_fused_adamw.h>

#include <cmath>
#include <map>
#include <optional>
#include <tuple>
#include <utility>

namespace titan::examples {

bool is_no_decay(const std::string& name, const torch::Tensor& parameter) {
  if (parameter.dim() < 2) return true;
  size_t begin = 0;
  std::string last;
  while (begin <= name.size()) {
    size_t end = name.find('.', begin);
    if (end == std::string::npos) end = name.size();
    last = name.substr(begin, end - begin);
    if (last.find("norm") != std::string::npos) return true;
    begin = end + 1;
  }
  return last == "bias";
}

std::unique_ptr<FusedAdamW> make_adamw(const torch::OrderedDict<std::string, torch::Tensor>& parameters,
                                                const AdamWConfig& config) {
  TORCH_CHECK(config.lr() >= 0 && config.eps() >= 0 && config.weight_decay() >= 0, "optimizer: lr (", config.lr(),
              "), eps (", config.eps(), ") and weight_decay (", config.weight_decay(), ") must be >= 0");
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& item : parameters) {
    if (!item.value().requires_grad()) continue;
    bool exempt = config.no_decay_norms_and_biases() && is_no_decay(item.key(), item.value());
    (exempt ? no_decay : decay).push_back(item.value());
  }
  TORCH_CHECK(!decay.empty() || !no_decay.empty(), "optimizer: the model has no trainable parameters");
  auto options = [&](double weight_decay) {
    auto o = std::make_unique<torch::optim::AdamWOptions>(config.lr());
    o->betas({config.beta1(), config.beta2()}).eps(config.eps()).weight_decay(weight_decay);
    return o;
  };
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) groups.emplace_back(decay, options(config.weight_decay()));
  if (!no_decay.empty()) groups.emplace_back(no_decay, options(0.0));
  return std::make_unique<FusedAdamW>(groups, torch::optim::AdamWOptions(config.lr()));
}

std::unordered_map<const c10::TensorImpl*, FusedAdamW::ComputeCopy> FusedAdamW::compute_copies() const {
  std::unordered_map<const c10::TensorImpl*, ComputeCopy> copy_of;
  for (const auto& group : param_groups())
    if (static_cast<const torch::optim::AdamWOptions&>(group.options()).amsgrad()) return copy_of;  // ATen's kernel only
  for (const auto& unit : units_)
    for (const auto& c : unit->compute_copies())
      copy_of.emplace(c.shard.unsafeGetTensorImpl(), ComputeCopy{c.copy, unit.get()});
  return copy_of;
}

torch::Tensor FusedAdamW::step(LossClosure closure) {
  torch::NoGradGuard no_grad;
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode enable_grad(true);
    loss = closure();
  }
  const torch::Tensor found_inf = std::exchange(found_inf_, torch::Tensor());
  // ATen's kernel divides the gradients by grad_scale: the reciprocal of the clipping factor.
  const torch::Tensor coefficient = std::exchange(coefficient_, torch::Tensor());
  const torch::Tensor inverse = coefficient.defined() ? coefficient.reciprocal() : torch::Tensor();
  const auto copy_of = compute_copies();
  std::unordered_map<titan::FsdpHook*, std::vector<torch::Tensor>> written;  // the shards whose copies it writes
  for (auto& group : param_groups()) {
    const auto& options = static_cast<const torch::optim::AdamWOptions&>(group.options());
    // The kernels take lists of one device and dtype (titan::adamw_copy_'s CUDA kernel: also one
    // gradient and one copy dtype); the step count as a float tensor on that device (one per
    // distinct count, made by a fill: no host-to-device copy).
    struct Lists {
      std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, copies;
    };
    using Copied = std::optional<std::pair<c10::ScalarType, c10::ScalarType>>;  // gradient and copy dtypes
    std::map<std::tuple<std::string, c10::ScalarType, Copied>, Lists> lists;
    std::map<std::pair<std::string, int64_t>, torch::Tensor> step_tensors;
    for (auto& param : group.params()) {
      if (!param.grad().defined()) continue;
      TORCH_CHECK(!param.grad().is_sparse(), "FusedAdamW does not support sparse gradients");
      auto& slot = state_[param.unsafeGetTensorImpl()];
      if (!slot) {
        auto fresh = std::make_unique<torch::optim::AdamWParamState>();
        fresh->step(0);
        fresh->exp_avg(torch::zeros_like(param, torch::MemoryFormat::Preserve));
        fresh->exp_avg_sq(torch::zeros_like(param, torch::MemoryFormat::Preserve));
        if (options.amsgrad()) fresh->max_exp_avg_sq(torch::zeros_like(param, torch::MemoryFormat::Preserve));
        slot = std::move(fresh);
      }
      auto& state = static_cast<torch::optim::AdamWParamState&>(*slot);
      state.step(state.step() + 1);
      const std::string device = param.device().str();
      auto& count = step_tensors[{device, state.step()}];
      if (!count.defined())
        count = torch::full({}, static_cast<double>(state.step()), param.options().dtype(torch::kFloat));
      const auto copy = copy_of.find(param.unsafeGetTensorImpl());
      const bool copied = copy != copy_of.end();
      auto& l = lists[{device, param.scalar_type(),
                       copied ? Copied({param.grad().scalar_type(), copy->second.copy.scalar_type()}) : std::nullopt}];
      l.params.push_back(param);
      // ATen's kernel takes gradients of the parameter's dtype (a kept compute-dtype gradient is
      // widened); titan::adamw_copy_ reads them as they are.
      l.grads.push_back(copied || param.grad().scalar_type() == param.scalar_type() ? param.grad()
                                                                                     : param.grad().to(param.scalar_type()));
      l.exp_avgs.push_back(state.exp_avg());
      l.exp_avg_sqs.push_back(state.exp_avg_sq());
      if (options.amsgrad()) l.max_exp_avg_sqs.push_back(state.max_exp_avg_sq());
      l.steps.push_back(count);
      if (copied) {
        l.copies.push_back(copy->second.copy);
        written[copy->second.unit].push_back(param);
      }
    }
    for (auto& [key, l] : lists) {
      const auto device = l.params.front().device();
      std::optional<torch::Tensor> skip, grad_scale;
      if (found_inf.defined()) skip = found_inf.to(device, torch::kFloat).reshape({1});
      if (inverse.defined()) grad_scale = inverse.to(device, torch::kFloat).reshape({1});
      if (!l.copies.empty()) {
        titan::adamw_copy_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.copies, l.steps,
                           titan::AdamWCopyOptions()
                               .lr(options.lr())
                               .beta1(std::get<0>(options.betas()))
                               .beta2(std::get<1>(options.betas()))
                               .weight_decay(options.weight_decay())
                               .eps(options.eps()),
                           grad_scale, skip);
        continue;
      }
      at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.max_exp_avg_sqs, l.steps, options.lr(),
                        std::get<0>(options.betas()), std::get<1>(options.betas()), options.weight_decay(),
                        options.eps(), options.amsgrad(), /*maximize=*/false, grad_scale, skip);
    }
  }
  for (const auto& [unit, shards] : written) unit->compute_copies_written(shards);
  return loss;
}

LRSchedule::LRSchedule(LRScheduleOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  TORCH_CHECK(o.decay_type() == "linear" || o.decay_type() == "sqrt" || o.decay_type() == "cosine" ||
                  o.decay_type() == "constant",
              "lr_scheduler.decay_type = '", o.decay_type(), "' is not one of: linear, sqrt, cosine, constant");
  TORCH_CHECK(o.warmup_steps() >= 0 && o.total_steps() >= 1, "lr_scheduler: warmup_steps (", o.warmup_steps(),
              ") must be >= 0 and the total steps (", o.total_steps(), ") >= 1");
  TORCH_CHECK(o.decay_steps() == -1 || (o.decay_steps() >= 0 && o.warmup_steps() + o.decay_steps() <= o.total_steps()),
              "lr_scheduler: ", o.decay_steps(), " decay steps (decay_ratio) after ", o.warmup_steps(),
              " warmup steps do not fit in the ", o.total_steps(), " steps (training.steps): lower decay_ratio or ",
              "warmup_steps");
  TORCH_CHECK(o.min_lr_ratio() >= 0 && o.min_lr_ratio() <= 1, "lr_scheduler.min_lr_ratio = ", o.min_lr_ratio(),
              " must be in [0, 1]");
}

double LRSchedule::factor(int64_t step) const {
  const auto& o = options_;
  TORCH_CHECK(step >= 1, "lr_scheduler: steps count from 1, got ", step);
  if (step <= o.warmup_steps()) return static_cast<double>(step) / static_cast<double>(o.warmup_steps() + 1);
  const int64_t decay_steps = o.decay_steps() < 0 ? o.total_steps() - o.warmup_steps() : o.decay_steps();
  const int64_t stable_until = o.total_steps() - decay_steps;  // the last step at the base lr
  if (o.decay_type() == "constant" || step <= stable_until) return 1.0;
  double progress =
      static_cast<double>(step - stable_until) / static_cast<double>(std::max<int64_t>(1, decay_steps));
  progress = std::min(progress, 1.0);
  const double decay = o.decay_type() == "linear" ? 1.0 - progress
                       : o.decay_type() == "sqrt" ? 1.0 - std::sqrt(progress)
                                                  : 0.5 * (1.0 + std::cos(M_PI * progress));
  return o.min_lr_ratio() + (1.0 - o.min_lr_ratio()) * decay;
}

double LRSchedule::apply(torch::optim::Optimizer& optimizer, int64_t step, double base_lr) {
  double lr = base_lr * factor(step);
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
  last_step_ = step;
  return lr;
}

titan::ComponentState LRSchedule::state() const {
  return titan::ComponentState{{{"last_step", std::to_string(last_step_)}}, {}};
}

void LRSchedule::load_state(const titan::ComponentState& state) {
  auto saved = state.values.find("last_step");
  TORCH_CHECK(saved != state.values.end(), "lr_scheduler: the saved schedule state has no 'last_step'");
  size_t used = 0;
  int64_t step = -1;
  try {
    step = std::stoll(saved->second, &used);
  } catch (const std::exception&) {
  }
  TORCH_CHECK(used == saved->second.size() && step >= 0, "lr_scheduler: the saved last_step '", saved->second,
              "' is not a step number");
  last_step_ = step;
}

AdamWConfig adamw_config(const TrainConfig& config) {
  const auto& o = config.optimizer;
  TORCH_CHECK(o.name == "AdamW", "optimizer.name = '", o.name, "' is not one of: AdamW");
  return AdamWConfig()
      .lr(o.lr)
      .beta1(o.beta1)
      .beta2(o.beta2)
      .eps(o.eps)
      .weight_decay(o.weight_decay)
      .no_decay_norms_and_biases(o.no_decay_norms_and_biases);
}

LRScheduleOptions lr_schedule_options(const TrainConfig& config) {
  const auto& s = config.lr_scheduler;
  return LRScheduleOptions()
      .warmup_steps(s.warmup_steps)
      .total_steps(config.training.steps)
      .decay_steps(lr_decay_steps(config))
      .decay_type(s.decay_type)
      .min_lr_ratio(s.min_lr_ratio);
}

int64_t gradient_accumulation_steps(int64_t global_batch, int64_t local_batch, int64_t dp_degree) {
  TORCH_CHECK(local_batch >= 1 && dp_degree >= 1, "training.batch_size (", local_batch,
              ") and the data-parallel degree (", dp_degree, ") must be >= 1");
  if (global_batch <= 0) return 1;
  const int64_t per_step = local_batch * dp_degree;
  TORCH_CHECK(global_batch % per_step == 0, "training.global_batch_size = ", global_batch,
              " is not a multiple of training.batch_size x data-parallel degree = ", local_batch, " x ", dp_degree,
              " = ", per_step, "; choose a global batch of k x ", per_step);
  return global_batch / per_step;
}

}  // namespace titan::examples
