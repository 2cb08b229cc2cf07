// Tests of examples/common/optim.cpp: AdamW groups, FusedAdamW, the LR schedule, gradient
// accumulation; the parity case is run by optim_parity.py.
#include "trainer_fixtures.hpp"

#include <common/optim.hpp>

#include <nlohmann/json.hpp>


namespace {

/// A small model with weights, biases and a norm (the names decide the weight-decay groups).
struct TinyMLP : torch::nn::Module {
  TinyMLP(int64_t in, int64_t hidden, int64_t out) {
    fc1 = register_module("fc1", torch::nn::Linear(in, hidden));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden})));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, out));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(norm(fc1(x)))); }  // [N, in] -> [N, out]
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};

}  // namespace

TEST_CASE("optim: AdamW groups exclude norms, biases and 1-D parameters from weight decay") {
  CHECK(is_no_decay("layers.0.attention_norm.weight", torch::zeros({4, 4})));
  CHECK(is_no_decay("fc1.bias", torch::zeros({4, 4})));
  CHECK(is_no_decay("scale", torch::zeros({4})));
  CHECK_FALSE(is_no_decay("layers.0.attention.wq.weight", torch::zeros({4, 4})));
  CHECK_FALSE(is_no_decay("tok_embeddings.weight", torch::zeros({4, 4})));
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig().lr(0.01).weight_decay(0.2).beta2(0.99));
  REQUIRE(opt->param_groups().size() == 2);
  CHECK(opt->param_groups()[0].params().size() == 2);  // fc1.weight, fc2.weight
  CHECK(opt->param_groups()[0].params()[0].is_same(model->fc1->weight));
  CHECK(opt->param_groups()[1].params().size() == 4);
  auto& decayed = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options());
  auto& exempt = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options());
  CHECK(decayed.weight_decay() == 0.2);
  CHECK(exempt.weight_decay() == 0.0);
  CHECK(std::get<1>(exempt.betas()) == 0.99);
  auto all = make_adamw(model->named_parameters(), AdamWConfig().no_decay_norms_and_biases(false));
  CHECK(all->param_groups().size() == 1);
  CHECK(all->param_groups()[0].params().size() == 6);
}

TEST_CASE("optim: LR schedule warms up linearly, then decays to the minimum at the last step") {
  LRSchedule cosine(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_type("cosine").min_lr_ratio(0.1));
  CHECK(cosine.factor(1) == doctest::Approx(1.0 / 3.0));
  CHECK(cosine.factor(2) == doctest::Approx(2.0 / 3.0));
  CHECK(cosine.factor(3) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 8))));
  CHECK(cosine.factor(6) == doctest::Approx(0.55));
  CHECK(cosine.factor(10) == doctest::Approx(0.1));
  LRSchedule linear(LRScheduleOptions().warmup_steps(0).total_steps(4).decay_type("linear"));
  CHECK(linear.factor(1) == doctest::Approx(0.75));
  CHECK(linear.factor(4) == doctest::Approx(0.0));
  LRSchedule constant(LRScheduleOptions().warmup_steps(3).total_steps(4).decay_type("constant").min_lr_ratio(0.5));
  CHECK(constant.factor(3) == doctest::Approx(0.75));
  CHECK(constant.factor(4) == 1.0);
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig());
  CHECK(cosine.apply(*opt, 6, 2e-3) == doctest::Approx(1.1e-3));
  for (auto& g : opt->param_groups()) CHECK(g.options().get_lr() == doctest::Approx(1.1e-3));
  CHECK_ERROR_HAS(cosine.factor(0), "count from 1");
  CHECK_ERROR_HAS(LRSchedule(LRScheduleOptions().decay_type("step")), "'step'", "linear, sqrt, cosine, constant");
}

TEST_CASE("optim: warmup-stable-decay keeps the base lr until the last decay_steps, which decay (linear, sqrt)") {
  // 10 steps: warmup 1-2, stable 3-6, decay 7-10 (p = 1/4 .. 1).
  LRSchedule wsd(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_steps(4).min_lr_ratio(0.1));
  CHECK(wsd.factor(2) == doctest::Approx(2.0 / 3.0));
  for (int64_t step = 3; step <= 6; ++step) CHECK(wsd.factor(step) == 1.0);
  CHECK(wsd.factor(7) == doctest::Approx(0.1 + 0.9 * 0.75));
  CHECK(wsd.factor(10) == doctest::Approx(0.1));
  LRSchedule sqrt_decay(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_steps(4).decay_type("sqrt"));
  CHECK(sqrt_decay.factor(6) == 1.0);
  CHECK(sqrt_decay.factor(7) == doctest::Approx(0.5));
  CHECK(sqrt_decay.factor(8) == doctest::Approx(1.0 - std::sqrt(0.5)));
  CHECK(sqrt_decay.factor(10) == doctest::Approx(0.0));
  // Without decay_steps every step after warmup decays: the schedule of before, bitwise.
  LRSchedule plain(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_type("cosine").min_lr_ratio(0.1));
  LRSchedule all(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_steps(8).decay_type("cosine").min_lr_ratio(0.1));
  for (int64_t step = 1; step <= 10; ++step) CHECK(plain.factor(step) == all.factor(step));
  // No decay steps: the base lr to the end.
  CHECK(LRSchedule(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_steps(0)).factor(10) == 1.0);
  CHECK_ERROR_HAS(LRSchedule(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_steps(9)),
                  "9 decay steps (decay_ratio) after 2 warmup steps do not fit in the 10 steps");
}

TEST_CASE("optim: the LR schedule is a checkpoint component holding the last step it applied") {
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig());
  LRSchedule schedule(LRScheduleOptions().warmup_steps(2).total_steps(10));
  CHECK(schedule.last_step() == 0);
  schedule.apply(*opt, 7, 1e-3);
  auto saved = schedule.state();
  CHECK(saved.values.at("last_step") == "7");
  LRSchedule resumed(LRScheduleOptions().warmup_steps(2).total_steps(10));
  resumed.load_state(saved);
  CHECK(resumed.last_step() == 7);
  CHECK_ERROR_HAS(resumed.load_state(titan::ComponentState{{{"last_step", "x"}}, {}}), "'x' is not a step number");
  CHECK_ERROR_HAS(resumed.load_state(titan::ComponentState{}), "no 'last_step'");
}

TEST_CASE("optim: gradient accumulation steps come from the global batch") {
  CHECK(gradient_accumulation_steps(32, 4, 2) == 4);
  CHECK(gradient_accumulation_steps(-1, 4, 2) == 1);
  CHECK(gradient_accumulation_steps(8, 4, 2) == 1);
  CHECK_ERROR_HAS(gradient_accumulation_steps(30, 4, 2), "training.global_batch_size = 30", "4 x 2 = 8");
}

TEST_CASE("optim: parity with PyTorch AdamW, warmup + cosine and clip_grad_norm_" * doctest::skip()) {
  // Run by optim_parity.py, which writes the reference (initial weights, data, and what PyTorch
  // computed) and names it in TITAN_TRAINER_PARITY. Twice: clipping by titan::clip_grad_norm_ before
  // the step, and (the trainer's way) titan::grad_norm + clip_coefficient applied inside the step.
  const char* path = std::getenv("TITAN_TRAINER_PARITY");
  REQUIRE_MESSAGE(path != nullptr, "set TITAN_TRAINER_PARITY (optim_parity.py does)");
  auto ref = nlohmann::json::parse(read_file(path));
  auto tensor = [](const nlohmann::json& j) {  // on device()
    auto values = j["data"].get<std::vector<double>>();
    return torch::tensor(values, torch::kDouble).to(device(), torch::kFloat).reshape(j["shape"].get<std::vector<int64_t>>());
  };
  const auto& cfg = ref["config"];
  const double max_norm = cfg["max_norm"].get<double>();
  for (const bool in_step : {false, true}) {
    INFO((in_step ? "clipping inside FusedAdamW's step (scale_grads)" : "clip_grad_norm_ before the step"));
    auto model =
        std::make_shared<TinyMLP>(cfg["in"].get<int64_t>(), cfg["hidden"].get<int64_t>(), cfg["out"].get<int64_t>());
    model->to(device());
    {
      torch::NoGradGuard no_grad;
      for (auto& item : model->named_parameters()) item.value().copy_(tensor(ref["initial"][item.key()]));
    }
    auto opt = make_adamw(model->named_parameters(), AdamWConfig()
                                                         .lr(cfg["lr"].get<double>())
                                                         .beta1(cfg["beta1"].get<double>())
                                                         .beta2(cfg["beta2"].get<double>())
                                                         .eps(cfg["eps"].get<double>())
                                                         .weight_decay(cfg["weight_decay"].get<double>()));
    const int64_t steps = cfg["steps"].get<int64_t>();
    LRSchedule schedule(LRScheduleOptions()
                            .warmup_steps(cfg["warmup_steps"].get<int64_t>())
                            .total_steps(steps)
                            .decay_type(cfg["decay_type"].get<std::string>())
                            .min_lr_ratio(cfg["min_lr_ratio"].get<double>()));
    int64_t clipped = 0;
    for (int64_t s = 1; s <= steps; ++s) {
      const auto& batch = ref["batches"][s - 1];
      double lr = schedule.apply(*opt, s, cfg["lr"].get<double>());
      opt->zero_grad();
      auto logits = model->forward(tensor(batch["x"]));  // [N, out]
      auto loss = torch::nn::functional::cross_entropy(logits, tensor(batch["y"]).to(torch::kLong));
      loss.backward();
      torch::Tensor norm;
      if (in_step) {
        norm = titan::grad_norm(model, titan_test::world()->group());
        opt->scale_grads(titan::clip_coefficient(norm, max_norm));
      } else {
        norm = titan::clip_grad_norm_(model, max_norm, titan_test::world()->group());
      }
      opt->step();
      clipped += norm.item<double>() > max_norm;
      INFO("step ", s);
      CHECK(loss.item<double>() == doctest::Approx(ref["losses"][s - 1].get<double>()).epsilon(1e-6));
      CHECK(lr == doctest::Approx(ref["lrs"][s - 1].get<double>()).epsilon(1e-12));
      CHECK(norm.item<double>() == doctest::Approx(ref["grad_norms"][s - 1].get<double>()).epsilon(1e-5));
    }
    CHECK_MESSAGE(clipped > 0, "the reference never clips: raise its learning rate or lower max_norm");
    for (auto& item : model->named_parameters()) {
      INFO("parameter ", item.key());
      CHECK_CLOSE(item.value(), tensor(ref["final"][item.key()]), 1e-6);
    }
  }
}

TEST_CASE("optim: FusedAdamW equals LibTorch's AdamW loop, and skip_if leaves everything as it was") {
  torch::manual_seed(3);
  auto make = [] {
    torch::manual_seed(5);
    return std::make_shared<TinyMLP>(6, 16, 5);
  };
  auto fused_model = make(), loop_model = make();
  fused_model->to(device());
  loop_model->to(device());
  auto fused = make_adamw(fused_model->named_parameters(), AdamWConfig().lr(1e-2));
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (const auto& group : fused->param_groups()) {
    std::vector<torch::Tensor> params;
    for (const auto& p : group.params()) {
      for (const auto& item : fused_model->named_parameters())
        if (item.value().is_same(p)) params.push_back(loop_model->named_parameters()[item.key()]);
    }
    groups.emplace_back(params, group.options().clone());
  }
  torch::optim::AdamW loop(groups, torch::optim::AdamWOptions(1e-2));
  auto x = torch::randn({8, 6}).to(device());
  auto y = torch::randint(0, 5, {8}).to(device());
  auto step = [&](torch::nn::Module& model, torch::optim::Optimizer& optimizer, bool scale_nan) {
    optimizer.zero_grad();
    auto logits = static_cast<TinyMLP&>(model).forward(x);
    auto loss = torch::nn::functional::cross_entropy(logits, y) * (scale_nan ? NAN : 1.0);
    loss.backward();
    optimizer.step();
  };
  for (int s = 0; s < 4; ++s) {
    step(*fused_model, *fused, false);
    step(*loop_model, loop, false);
  }
  for (const auto& item : fused_model->named_parameters()) {
    INFO(item.key());
    CHECK_CLOSE(item.value(), loop_model->named_parameters()[item.key()], 1e-6);
  }
  // A skipped step: NaN gradients, found_inf set; parameters and moments are unchanged.
  std::map<std::string, torch::Tensor> params, moments;
  for (const auto& item : fused_model->named_parameters()) {
    params[item.key()] = item.value().detach().clone();
    auto& state = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(item.value().unsafeGetTensorImpl()));
    moments[item.key()] = state.exp_avg_sq().clone();
  }
  fused->skip_if(torch::ones({1}, device()));
  step(*fused_model, *fused, true);
  for (const auto& item : fused_model->named_parameters()) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), params[item.key()]));
    auto& state = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(item.value().unsafeGetTensorImpl()));
    CHECK(torch::equal(state.exp_avg_sq(), moments[item.key()]));
    CHECK(state.step() == 5);  // the count advances (documented)
  }
  // The flag holds for one step only.
  step(*fused_model, *fused, false);
  CHECK_FALSE(torch::equal(fused_model->named_parameters()[0].value(), params[fused_model->named_parameters()[0].key()]));
}
