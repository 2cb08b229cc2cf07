// titan/float8.hpp: float8 linear layers against torchao 0.18 (make_reference.py: forward and the
// three gradients of each recipe, bitwise), float8 all-gather under fully_shard against float8
// without FSDP (bitwise, with and without precomputed scales; the gathered bytes counted), tensor
// parallel and activation checkpointing against the plain float8 layer, and the errors. The
// groups are the world (titan.ranks1/2/4). On CUDA in a build with titan's kernels (the GPU kit),
// the casts run titan::float8_cast's and titan::float8_cast_transpose's kernels from the first case
// on.
#include "../fused/fused_testing.hpp"
#include "../support/multirank.hpp"
#include "../support/op_events.hpp"

#include <titan/ac.hpp>
#include <titan/float8.hpp>
#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>

#include <cstdlib>
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using titan::Float8Options;
using titan::Float8Recipe;
using titan_test::device;
using titan_test::error_of;
using titan_test::same_values;
using titan_test::world;
using torch::Tensor;

/// Two float8-capable linear layers and a 1-D gain (a parameter FSDP gathers in high precision).
struct MlpImpl : torch::nn::Module {
  MlpImpl(int64_t dim, int64_t hidden) {
    w1 = register_module("w1", torch::nn::Linear(torch::nn::LinearOptions(dim, hidden).bias(false)));
    w2 = register_module("w2", torch::nn::Linear(torch::nn::LinearOptions(hidden, dim).bias(false)));
    gain = register_parameter("gain", torch::ones({dim}) + 0.1 * torch::randn({dim}));
  }
  Tensor forward(const Tensor& x) {  // x: [B, S, dim]
    return titan::call(w2, torch::relu(titan::call(w1, x))) * gain;  // [B, S, dim]
  }
  torch::nn::Linear w1{nullptr}, w2{nullptr};
  Tensor gain;
};
TORCH_MODULE(Mlp);

/// A fresh Mlp on device() with weights from `seed` (the same on every rank).
Mlp make_mlp(uint64_t seed, int64_t dim = 64, int64_t hidden = 128) {
  torch::manual_seed(seed);
  Mlp model(dim, hidden);
  model->to(device());
  return model;
}

/// Each step's loss and the final parameters (gathered) of `steps` SGD steps on the same data on
/// every rank; `after_step` runs after each optimizer step.
struct Run {
  std::vector<Tensor> losses;
  torch::OrderedDict<std::string, Tensor> params;
};
Run train(Mlp& model, int steps, const std::function<void()>& after_step = {}) {
  torch::optim::SGD optimizer(model->parameters(), 0.5);
  Run run;
  torch::manual_seed(11);
  for (int step = 0; step < steps; ++step) {
    auto x = torch::randn({2, 8, 64}).to(device());  // [B, S, dim], the same on every rank
    x.select(2, 3).mul_(20);                         // outliers on one feature
    auto target = torch::randn({2, 8, 64}).to(device());
    auto loss = torch::mse_loss(titan::call(model, x).to(torch::kFloat), target);  // (bf16 compute: cast back)
    optimizer.zero_grad();
    loss.backward();
    optimizer.step();
    if (after_step) after_step();
    run.losses.push_back(loss.detach().cpu());
  }
  run.params = titan::full_state_dict(model, world()->group(), titan::FullStateDictOptions().cpu_offload(true));
  return run;
}

void check_same_run(const Run& a, const Run& b, double tol, const std::string& what) {
  CAPTURE(what);
  REQUIRE(a.losses.size() == b.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) {
    CAPTURE(i);
    CHECK_CLOSE(a.losses[i], b.losses[i], tol);
  }
  for (const auto& item : a.params) {
    CAPTURE(item.key());
    CHECK_CLOSE(item.value(), b.params[item.key()], tol);
  }
}

std::string reference_path() {
  const char* path = std::getenv("TITAN_FLOAT8_REFERENCE");
  REQUIRE_MESSAGE(path != nullptr, "TITAN_FLOAT8_REFERENCE is not set: run the suite with ctest (the fixture ",
                  "float8.reference writes it with tests/float8/make_reference.py)");
  return path;
}

}  // namespace

TEST_CASE("float8: each recipe's output and gradients equal torchao's float8 linear bitwise") {
  titan_test::fused_kernels_registered();  // the CUDA cases below: titan's cast kernel against torchao
  titan::safetensors::File reference(reference_path());
  for (auto recipe : {Float8Recipe::Tensorwise, Float8Recipe::Rowwise, Float8Recipe::RowwiseWithGwHp}) {
    for (auto [dtype_name, dtype] : {std::pair{"float32", torch::kFloat32}, std::pair{"bfloat16", torch::kBFloat16}}) {
      const std::string prefix = titan::float8_recipe_name(recipe) + "." + dtype_name + ".";
      CAPTURE(prefix);
      auto read = [&](const std::string& name) { return reference.read(prefix + name); };
      const bool bias = reference.contains(prefix + "bias");
      torch::nn::Linear layer(torch::nn::LinearOptions(64, 48).bias(bias));
      layer->to(dtype);
      {
        torch::NoGradGuard no_grad;
        layer->weight.copy_(read("weight"));
        if (bias) layer->bias.copy_(read("bias"));
      }
      auto converted = titan::convert_to_float8_training(layer, Float8Options().recipe(recipe));
      CHECK(converted == std::vector<std::string>{""});
      // torchao's scale of x, from titan's amax and amax_to_scale.
      const auto& casts = titan::Float8Casts::of(recipe);
      auto amax = recipe == Float8Recipe::Tensorwise ? read("x").abs().max() : read("x").abs().amax({-1}, true);
      CHECK(same_values(titan::detail::amax_to_scale(amax, at::kFloat8_e4m3fn, casts.round_scales_to_power_of_2),
                        read("scale.x")));
      auto x = read("x").requires_grad_(true);  // [2, 8, 64] on the CPU: the reference's device
      auto y = titan::call(layer, x);           // [2, 8, 48]
      y.backward(read("dy"));
      CHECK((y.scalar_type() == dtype));
      CHECK(same_values(y, read("y")));
      CHECK(same_values(x.grad(), read("dx")));
      CHECK(same_values(layer->weight.grad(), read("dweight")));
      if (bias) CHECK(same_values(layer->bias.grad(), read("dbias")));

      if (device().is_cuda()) {  // CUDA's _scaled_mm kernels (rowwise too): the same casts, another
        torch::nn::Linear gpu(torch::nn::LinearOptions(64, 48).bias(bias));  // accumulation order
        gpu->to(device(), dtype);
        {
          torch::NoGradGuard no_grad;
          gpu->weight.copy_(read("weight"));
          if (bias) gpu->bias.copy_(read("bias"));
        }
        titan::convert_to_float8_training(gpu, Float8Options().recipe(recipe));
        auto xg = read("x").to(device()).requires_grad_(true);
        auto yg = titan::call(gpu, xg);
        yg.backward(read("dy").to(device()));
        // Relative to each tensor's largest value: bf16 outputs round at 2^-8.
        auto near = [](const Tensor& a, const Tensor& b) {
          return titan_test::max_abs_diff(a, b) <= 1e-2 * b.abs().max().item<double>();
        };
        CHECK(near(yg, read("y")));
        CHECK(near(xg.grad(), read("dx")));
        CHECK(near(gpu->weight.grad(), read("dweight")));
      }
    }
  }
}

TEST_CASE("float8: scales and casts") {
  using titan::detail::amax_to_scale;
  auto amax = torch::tensor({448.0f, 100.0f, 0.0f, 1e-3f});
  auto scale = amax_to_scale(amax, at::kFloat8_e4m3fn, false);  // 448 / amax, amax >= 1e-12
  CHECK(scale[0].item<float>() == 1.0f);
  CHECK(scale[1].item<float>() == static_cast<float>(448.0 / 100.0));
  CHECK(scale[2].item<float>() == static_cast<float>(448.0 / 1e-12));
  auto pow2 = amax_to_scale(amax, at::kFloat8_e4m3fn, true);  // rounded down to 2^k
  CHECK(pow2[1].item<float>() == 4.0f);
  CHECK(pow2[3].item<float>() == 262144.0f);  // 448000 -> 2^18
  CHECK(amax_to_scale(torch::tensor(57344.0f), at::kFloat8_e5m2, false).item<float>() == 1.0f);
  // Saturation: values beyond the range clamp to +-max instead of becoming NaN.
  auto cast = titan::detail::cast_with_scale(torch::tensor({1000.0f, -1000.0f, 1.0f}), torch::tensor(1.0f),
                                             at::kFloat8_e4m3fn);
  CHECK(same_values(cast.to(torch::kFloat), torch::tensor({448.0f, -448.0f, 1.0f})));
}

TEST_CASE("float8: only linear layers outside filter_fqns with dimensions divisible by 16 are converted") {
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(64, 128), torch::nn::ReLU(), torch::nn::Linear(128, 40),
                              torch::nn::Linear(40, 64), torch::nn::Linear(64, 64));
  auto converted = titan::convert_to_float8_training(model, Float8Options().filter_fqns({"4"}));
  CHECK(converted == std::vector<std::string>{"0"});  // 2: 40 outputs, 3: 40 inputs, 4: filtered
  CHECK(titan::find_hook<titan::Float8LinearHook>(*model[0]) != nullptr);
  CHECK(titan::find_hook<titan::Float8LinearHook>(*model[2]) == nullptr);
  CHECK(titan::hooks_of(*model[4]).empty());
  // A layer with a hook already (here: float8 itself) cannot be converted (again).
  CHECK(error_of([&] { titan::convert_to_float8_training(model); }).find("already has hooks") != std::string::npos);
}

TEST_CASE("float8: errors name what is wrong") {
  CHECK(error_of([] { titan::parse_float8_recipe("rowwize"); }).find("unknown recipe 'rowwize'") != std::string::npos);
  CHECK(titan::parse_float8_recipe("rowwise_with_gw_hp") == Float8Recipe::RowwiseWithGwHp);
  torch::nn::Linear layer(64, 32);
  CHECK(error_of([&] {
          titan::convert_to_float8_training(
              layer, Float8Options().recipe(Float8Recipe::Rowwise).enable_fsdp_float8_all_gather(true));
        }).find("enable_fsdp_float8_all_gather needs the tensorwise recipe") != std::string::npos);
  titan::convert_to_float8_training(layer);
  CHECK(error_of([&] { titan::call(layer, torch::randn({4, 48})); }).find("expected the last dimension 64") !=
        std::string::npos);
  CHECK(error_of([&] { titan::call(layer, torch::ones({4, 64}, torch::kLong)); }).find("Long input") !=
        std::string::npos);
  // Nothing to convert (every width off the multiples of 16): an error, not a silent high-precision run.
  torch::nn::Sequential narrow(torch::nn::Linear(200, 200), torch::nn::Linear(200, 40));
  CHECK(error_of([&] { titan::convert_to_float8_training(narrow); })
            .find("no linear layer to convert, so the model would train in high precision only: 2 linear layer(s) "
                  "have a weight dimension that is not a multiple of 16, which float8 matmuls need ('0' [200, 200], "
                  "...)") != std::string::npos);
  CHECK(error_of([&] {
          titan::convert_to_float8_training(layer, Float8Options().is_linear(titan::is_module<torch::nn::LayerNormImpl>));
        })
            .find("Float8Options::is_linear accepts none outside filter_fqns") != std::string::npos);
  // Converting after another parallelism (here activation checkpointing; fully_shard alike) is an order error.
  torch::nn::Sequential wrapped(torch::nn::Linear(64, 64));
  titan::checkpoint_wrapper(*wrapped);
  CHECK(error_of([&] { titan::convert_to_float8_training(wrapped); })
            .find("'<root>' already has checkpoint_wrapper attached. Convert to float8 first") != std::string::npos);
  // A custom linear module that is not one: no 2-D weight.
  torch::nn::Sequential odd(torch::nn::LayerNorm(torch::nn::LayerNormOptions({64})));
  auto options = Float8Options().is_linear(titan::is_module<torch::nn::LayerNormImpl>);
  CHECK(error_of([&] { titan::convert_to_float8_training(odd, options); }).find("no 2-D parameter 'weight'") !=
        std::string::npos);
}

TEST_CASE("float8: verify_calls reports converted layers that never ran in float8") {
  torch::nn::Sequential model(torch::nn::Linear(64, 64), torch::nn::Linear(64, 64));
  titan::convert_to_float8_training(model);
  const auto x = torch::randn({4, 64});
  model->forward(x);  // Sequential calls its layers with ->forward: the float8 hooks never run
  const auto idle = error_of([&] { titan::verify_calls(model); });
  CHECK(idle.find("titan float8: 2 of the 2 linear layers of") != std::string::npos);
  CHECK(idle.find("converted to float8 never ran in float8 ('0', '1')") != std::string::npos);
  titan::call(model[0]->as<torch::nn::Linear>(), x);
  CHECK(error_of([&] { titan::verify_calls(model); }).find("'1' has float8 linear (tensorwise) attached but was never "
                                                           "called through titan::call") != std::string::npos);
  titan::call(model[1]->as<torch::nn::Linear>(), x);
  CHECK_NOTHROW(titan::verify_calls(model));
}

TEST_CASE("float8: activation checkpointing recomputes the float8 layers exactly") {
  auto plain = make_mlp(3);
  titan::convert_to_float8_training(plain);
  auto checkpointed = make_mlp(3);
  titan::convert_to_float8_training(checkpointed);
  titan::checkpoint_wrapper(*checkpointed);
  auto per_op = make_mlp(3);
  titan::convert_to_float8_training(per_op);
  titan::checkpoint_wrapper(*per_op, titan::CheckpointWrapperOptions().policy(std::make_shared<titan::OpSavePolicy>()));
  auto a = train(plain, 3);
  check_same_run(train(checkpointed, 3), a, 0.0, "full AC");
  check_same_run(train(per_op, 3), a, 0.0, "per-operator AC");
}

namespace {

/// Three linear layers reading one input (q, k, v), called one by one or through titan::call_fused.
struct ProjectionsImpl : torch::nn::Module {
  explicit ProjectionsImpl(bool fused) : fused(fused) {
    a = register_module("a", torch::nn::Linear(torch::nn::LinearOptions(64, 48).bias(false)));
    b = register_module("b", torch::nn::Linear(torch::nn::LinearOptions(64, 32).bias(true)));
    c = register_module("c", torch::nn::Linear(torch::nn::LinearOptions(64, 32).bias(false)));
  }
  Tensor forward(const Tensor& x) {  // x: [B, S, 64] -> [B, S, 112]
    if (!fused) return torch::cat({titan::call(a, x), titan::call(b, x), titan::call(c, x)}, -1);
    auto parts = titan::call_fused({a.get(), b.get(), c.get()}, {x}, [](const titan::TensorList&) -> titan::TensorList {
      throw std::logic_error("the float8 hooks compute fused layers themselves");
    });
    return torch::cat(parts, -1);
  }
  bool fused;
  torch::nn::Linear a{nullptr}, b{nullptr}, c{nullptr};
};
TORCH_MODULE(Projections);

/// How many float8 casts and amaxes (the reductions their scales come from) `events` hold.
std::pair<int, int> casts_and_amaxes(const std::vector<titan_test::OpEvents::Event>& events) {
  int casts = 0, amaxes = 0;
  for (const auto& e : events) {
    casts += e.name == "titan::float8_cast" || e.name == "titan::float8_cast_transpose";
    const bool amax = e.name == "aten::max" || e.name == "aten::amax" || e.name == "aten::linalg_vector_norm";
    amaxes += amax && e.parent != "aten::max" && e.parent != "aten::amax" && e.parent != "aten::linalg_vector_norm";
  }
  return {casts, amaxes};
}

/// How many copies of tensors (aten::clone) `events` (of one thread) hold outside titan's float8
/// casts and the matmuls: a float8 operand copied into the layout _scaled_mm takes, where the cast
/// could have written it, or a high-precision one copied for its amax. The ATen implementation of
/// the casts copies into the layouts asked for, ATen's CPU _scaled_mm makes its operands
/// contiguous: those are the operators' own.
int copies_by_the_layers(const std::vector<titan_test::OpEvents::Event>& events) {
  const auto is_owner = [](const std::string& name) {
    return name.rfind("titan::float8_cast", 0) == 0 || name == "aten::_scaled_mm";
  };
  int copies = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].name != "aten::clone") continue;
    bool owned = false;
    int depth = events[i].depth;
    for (size_t j = i; j-- > 0 && depth > 0;) {  // the enclosing scopes: each the last one a level up
      if (events[j].depth != depth - 1) continue;
      depth = events[j].depth;
      owned = owned || is_owner(events[j].name);
    }
    copies += !owned;
  }
  return copies;
}

}  // namespace

TEST_CASE("float8: layers fused by titan::call_fused cast their shared input once and equal the layers one by one") {
  if (world()->world_size() > 1) return;  // single-process: run once, in titan.ranks1
  for (auto recipe : {Float8Recipe::Tensorwise, Float8Recipe::Rowwise, Float8Recipe::RowwiseWithGwHp}) {
    CAPTURE(titan::float8_recipe_name(recipe));
    struct Pass {
      Tensor y, dx;
      std::vector<Tensor> grads;
      std::pair<int, int> forward, backward;  // (casts, amaxes)
      int copies = 0;                         // the layers make (copies_by_the_layers)
    };
    auto run = [&](bool fused) {
      torch::manual_seed(21);
      Projections model(fused);
      model->to(device());
      titan::convert_to_float8_training(model, Float8Options().recipe(recipe));
      auto x = (torch::randn({2, 8, 64}) * 3).to(device()).requires_grad_(true);  // [B, S, 64]
      auto dy = torch::randn({2, 8, 112}).to(device());
      Pass pass;
      {
        titan_test::OpEvents events;
        pass.y = titan::call(model, x);
        pass.forward = casts_and_amaxes(events.events());
        pass.copies += copies_by_the_layers(events.events());
      }
      {
        titan_test::OpEvents events;
        pass.y.backward(dy);
        pass.backward = casts_and_amaxes(events.events());
        pass.copies += copies_by_the_layers(events.events());
      }
      pass.dx = x.grad();
      for (const auto& p : model->parameters()) pass.grads.push_back(p.grad());
      CHECK_NOTHROW(titan::verify_calls(model));  // every converted layer ran in float8
      return pass;
    };
    const Pass plain = run(false), fused = run(true);
    CHECK(same_values(fused.y, plain.y));
    CHECK(same_values(fused.dx, plain.dx));
    REQUIRE(fused.grads.size() == plain.grads.size());
    for (size_t i = 0; i < plain.grads.size(); ++i) CHECK(same_values(fused.grads[i], plain.grads[i]));
    // Forward: x once instead of three times, each weight once.
    CHECK(plain.forward == std::make_pair(6, 6));
    CHECK(fused.forward == std::make_pair(4, 4));
    CHECK(fused.backward == plain.backward);
    // Each cast writes the layouts its matmuls take (dy both): the layers copy nothing.
    CHECK(plain.copies == 0);
    CHECK(fused.copies == 0);
    // Tensorwise, the backward reuses the forward's cast of x and W's amax: it casts dy and W, and
    // reduces dy only (rowwise: dy and W along N, dy and x along M; with gw_hp, dy and W only).
    const int layers = 3;
    if (recipe == Float8Recipe::Tensorwise) CHECK(plain.backward == std::make_pair(2 * layers, layers));
    if (recipe == Float8Recipe::Rowwise) CHECK(plain.backward == std::make_pair(4 * layers, 4 * layers));
    if (recipe == Float8Recipe::RowwiseWithGwHp) CHECK(plain.backward == std::make_pair(2 * layers, 2 * layers));
  }
}

TEST_CASE("float8: in a checkpointed region's recomputation, the layers keep W's cast for their backward") {
  if (world()->world_size() > 1) return;  // single-process: run once, in titan.ranks1
  // The float8 casts of one backward of the two-layer Mlp: without AC dy and W per layer (x's is
  // the forward's); checkpointed, the recomputation casts x and W and the backward only dy. The
  // layers copy nothing either way (W's kept cast is written in both layouts).
  auto backward_casts = [](const std::function<void(Mlp&)>& checkpoint) {
    auto model = make_mlp(3);
    titan::convert_to_float8_training(model);
    if (checkpoint) checkpoint(model);
    auto y = titan::call(model, torch::randn({2, 8, 64}).to(device()));
    titan_test::OpEvents events;
    y.pow(2).sum().backward();
    CHECK(copies_by_the_layers(events.events()) == 0);
    return casts_and_amaxes(events.events()).first;
  };
  CHECK(backward_casts({}) == 2 * 2);
  CHECK(backward_casts([](Mlp& m) { titan::checkpoint_wrapper(*m); }) == 2 * 3);
  CHECK(backward_casts([](Mlp& m) {
          titan::checkpoint_wrapper(*m, titan::CheckpointWrapperOptions().policy(std::make_shared<titan::OpSavePolicy>()));
        }) == 2 * 3);
}

TEST_CASE("float8: fully_shard with float8 all-gather equals float8 without FSDP, and halves bf16's bytes") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  auto reference_model = make_mlp(5);
  titan::convert_to_float8_training(reference_model);
  const auto reference = train(reference_model, 4);

  for (bool precompute : {false, true}) {
    CAPTURE(precompute);
    // Built, converted and sharded on the meta device, then materialised (the trainer's order).
    auto model = make_mlp(5);
    const auto initial = titan::full_state_dict(model, world()->group(), titan::FullStateDictOptions().rank0_only(false));
    for (auto& param : model->parameters())  // as if built on meta: no storage
      titan::detail::repoint_tensor(param, at::empty(param.sizes(), param.options().device(torch::kMeta)));
    titan::convert_to_float8_training(model, Float8Options().enable_fsdp_float8_all_gather(true));
    auto w1_unit = titan::fully_shard(*model->w1, mesh);  // the float8 layer as its own unit
    titan::fully_shard(*model, mesh);                     // w2 in float8, the gain in fp32
    titan::to_empty(*model, device());
    titan::load_full_state_dict(model, initial);
    auto run = train(model, 4, [&] {
      if (precompute) titan::precompute_float8_dynamic_scale_for_fsdp(model);
    });
    // Every rank's batch is the same, so the averaged gradients are the reference's exactly.
    check_same_run(run, reference, 0.0, precompute ? "precomputed scales" : "scales per unit");
    CHECK(w1_unit->stats().all_gathers == 8);  // 4 steps: forward, and again for backward (not the root)
    if (world()->world_size() > 1) {
      CHECK(w1_unit->stats().all_gather_bytes == 8 * (128 * 64 / world()->world_size()));  // 1 byte per element
    }
  }

  if (world()->world_size() > 1) {  // the same unit gathering bf16 sends twice the bytes
    auto bf16 = make_mlp(5);
    auto unit = titan::fully_shard(*bf16->w1, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16));
    titan::fully_shard(*bf16, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16));
    train(bf16, 4);
    CHECK(unit->stats().all_gathers == 8);
    CHECK(unit->stats().all_gather_bytes == 8 * 2 * (128 * 64 / world()->world_size()));
  }
}

TEST_CASE("float8: tensor parallel layers equal the unsharded float8 layers") {
  const int tp = world()->world_size();
  titan::DeviceMesh mesh(world(), {"tp"}, {tp});
  for (auto recipe : {Float8Recipe::Tensorwise, Float8Recipe::Rowwise}) {
    CAPTURE(titan::float8_recipe_name(recipe));
    auto reference_model = make_mlp(7);
    titan::convert_to_float8_training(reference_model, Float8Options().recipe(recipe));
    const auto reference = train(reference_model, 3);

    auto model = make_mlp(7);
    titan::convert_to_float8_training(model, Float8Options().recipe(recipe));
    titan::parallelize_module(*model, mesh["tp"],
                              titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
    // The amaxes are reduced over the TP group: the same scales, so the same float8 values; only
    // the row-parallel sum's order differs (on CUDA, rowwise products of fp32 layers come back
    // through bf16 as in torchao, so the partial sums round there).
    const double tol = device().is_cuda() && recipe != Float8Recipe::Tensorwise ? 1e-2 : 2e-6;
    check_same_run(train(model, 3), reference, tol, "colwise w1, rowwise w2");
  }
  if (tp == 4) {  // FSDP 2 x TP 2 with float8 all-gather: amaxes reduced over both groups
    titan::DeviceMesh mesh2(world(), {"dp_shard", "tp"}, {2, 2});
    auto reference_model = make_mlp(9);
    titan::convert_to_float8_training(reference_model);
    const auto reference = train(reference_model, 3);
    auto model = make_mlp(9);
    titan::convert_to_float8_training(model, Float8Options().enable_fsdp_float8_all_gather(true));
    titan::parallelize_module(*model, mesh2["tp"],
                              titan::ParallelizePlan().add("w1", titan::ColwiseParallel()).add("w2", titan::RowwiseParallel()));
    titan::fully_shard(*model, mesh2["dp_shard"]);
    check_same_run(train(model, 3, [&] { titan::precompute_float8_dynamic_scale_for_fsdp(model); }), reference, 2e-6,
                   "FSDP 2 x TP 2");
  }
}
