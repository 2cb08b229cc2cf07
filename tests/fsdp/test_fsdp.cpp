// titan/fsdp.hpp: per-parameter sharding, checked against single-process training of the same
// global batch (computed on every rank locally), both on titan_test::device(). Runs at 1, 2 and 4
// ranks.
#include "../support/multirank.hpp"

#include <titan/fsdp.hpp>
#include <titan/fused/adamw.hpp>
#include <titan/fused/linear.hpp>
#include <titan/meta.hpp>

#include "../support/op_events.hpp"

#include <ATen/ops/_fused_adamw.h>

#include <functional>
#include <map>
#include <unordered_map>

namespace {

using titan_test::device;
using titan_test::same_values;
using torch::Tensor;

// ---------------------------------------------------------------------------------------------
// Models. Sizes 5, 7 and 13 are not divisible by 2 or 4: every shard split is uneven somewhere.

Tensor init_param(std::vector<int64_t> shape, torch::Device device, double scale, double shift = 0.0) {
  if (device.is_meta()) return torch::empty(shape, torch::TensorOptions().device(device));
  return torch::randn(shape) * scale + shift;
}

/// A residual MLP block with its own parameters (so it can be built on the meta device).
struct BlockImpl : torch::nn::Module {
  BlockImpl(int64_t dim, int64_t hidden, torch::Device device) {
    norm = register_parameter("norm", init_param({dim}, device, 0.1, 1.0));
    up = register_parameter("up", init_param({hidden, dim}, device, 0.3));
    up_bias = register_parameter("up_bias", init_param({hidden}, device, 0.1));
    down = register_parameter("down", init_param({dim, hidden}, device, 0.3));
  }
  Tensor forward(const Tensor& x) {  // x: [B, dim]
    auto h = torch::tanh(torch::nn::functional::linear(x * norm, up, up_bias));  // [B, hidden]
    return x + torch::matmul(h, down.t());                                        // [B, dim]
  }
  Tensor norm, up, up_bias, down;
};
TORCH_MODULE(Block);

/// input [B, 5] -> embed -> depth blocks -> head [B, 3].
struct MlpImpl : torch::nn::Module {
  explicit MlpImpl(torch::Device device = torch::kCPU, int64_t dim = 7, int64_t hidden = 13, int64_t depth = 3) {
    embed = register_parameter("embed", init_param({dim, 5}, device, 0.4));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < depth; ++i) layers->push_back(Block(dim, hidden, device));
    head = register_parameter("head", init_param({3, dim}, device, 0.3));
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::matmul(x, embed.t());
    for (const auto& layer : *layers) h = titan::call(layer->as<BlockImpl>(), h);
    return torch::matmul(h, head.t());
  }
  Tensor embed, head;
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(Mlp);

/// input [B, 2, 6, 6] -> conv(3) -> conv(5) -> linear(13) -> linear(4), library modules only;
/// conv2 and head have no bias (an undefined entry in their parameter dictionaries).
struct CnnImpl : torch::nn::Module {
  CnnImpl() {
    conv1 = register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(2, 3, 3).padding(1)));
    conv2 = register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 5, 3).bias(false)));
    fc = register_module("fc", torch::nn::Linear(5 * 4 * 4, 13));
    head = register_module("head", torch::nn::Linear(torch::nn::LinearOptions(13, 4).bias(false)));
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::tanh(titan::call(conv1, x));     // [B, 3, 6, 6]
    h = torch::tanh(titan::call(conv2, h));           // [B, 5, 4, 4]
    h = torch::tanh(titan::call(fc, h.flatten(1)));   // [B, 13]
    return head->forward(h);                          // [B, 4]
  }
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::Linear fc{nullptr}, head{nullptr};
};
TORCH_MODULE(Cnn);

// ---------------------------------------------------------------------------------------------
// Harness.

const titan::World& world() { return *titan_test::world(); }

titan::DeviceMesh shard_mesh() {
  return titan::DeviceMesh(titan_test::world(), {"dp_shard"}, {world().world_size()});
}

void shard_mlp(Mlp& model, const titan::DeviceMesh& mesh, titan::FsdpOptions options = {}) {
  for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh, options);
  titan::fully_shard(model, mesh, options);
}

void shard_cnn(Cnn& model, const titan::DeviceMesh& mesh, titan::FsdpOptions options = {}) {
  titan::fully_shard(model->conv1, mesh, options);
  titan::fully_shard(model->conv2, mesh, options);
  titan::fully_shard(model->fc, mesh, options);
  titan::fully_shard(model, mesh, options);
}

/// A `Model` with the weights of seed 0 (drawn on the CPU), on device(): every run of a comparison
/// starts from the same ones.
template <typename Model>
Model seeded() {
  torch::manual_seed(0);
  Model model;
  model->to(device());
  return model;
}

/// This rank's rows of a global batch (every rank holds an equal slice).
Tensor local_rows(const Tensor& global) {
  const int64_t n = world().world_size();
  REQUIRE(global.size(0) % n == 0);
  const int64_t rows = global.size(0) / n;
  return global.narrow(0, world().rank() * rows, rows);
}

/// Global batches for `steps` steps, on device(): inputs [steps, B, ...] and targets [steps, B, out].
struct Data {
  Tensor inputs, targets;
};
Data make_data(std::vector<int64_t> input_shape, int64_t out, int64_t steps, int64_t batch = 8) {
  torch::manual_seed(1234);
  std::vector<int64_t> shape{steps, batch};
  shape.insert(shape.end(), input_shape.begin(), input_shape.end());
  auto inputs = torch::randn(shape);
  auto targets = torch::randn({steps, batch, out});
  return Data{inputs.to(device()), targets.to(device())};
}

/// The loss of a model output for inputs x and targets y.
using LossFn = std::function<Tensor(const Tensor& out, const Tensor& x, const Tensor& y)>;
Tensor mse(const Tensor& out, const Tensor&, const Tensor& y) { return torch::mse_loss(out.to(torch::kFloat), y); }

/// Trains with AdamW on `inputs[s]` (all rows, or the rows this rank holds when `distributed`),
/// split into `micro_batches` micro-steps; returns the global loss of each step (averaged over
/// ranks when `distributed`).
template <typename Model>
std::vector<double> train(Model& model, const Data& data, bool distributed, int64_t micro_batches = 1,
                          const LossFn& loss_fn = mse, double lr = 1e-2) {
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.1));
  std::vector<double> losses;
  for (int64_t s = 0; s < data.inputs.size(0); ++s) {
    auto x = distributed ? local_rows(data.inputs[s]) : data.inputs[s];
    auto y = distributed ? local_rows(data.targets[s]) : data.targets[s];
    optimizer.zero_grad();
    double total = 0.0;
    const int64_t micro = x.size(0) / micro_batches;
    for (int64_t m = 0; m < micro_batches; ++m) {
      if (distributed) titan::set_requires_gradient_sync(*model, m == micro_batches - 1);
      auto xm = x.narrow(0, m * micro, micro), ym = y.narrow(0, m * micro, micro);
      Tensor loss = loss_fn(titan::call(model, xm), xm, ym) / static_cast<double>(micro_batches);
      loss.backward();
      total += loss.item<double>();
    }
    if (distributed) {
      auto t = titan::all_reduce(torch::tensor({total}, torch::TensorOptions().dtype(torch::kDouble).device(device())),
                                 world().group(), titan::ReduceOp::Avg);
      total = t.item<double>();
    }
    losses.push_back(total);
    optimizer.step();
  }
  return losses;
}

void check_losses(const std::vector<double>& got, const std::vector<double>& want, double tol) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i)
    CHECK_MESSAGE(std::abs(got[i] - want[i]) <= tol, "step ", i, ": loss ", got[i], " vs ", want[i]);
}

/// Largest difference between the gathered parameters of `sharded` and those of `reference`.
double max_param_diff(const torch::nn::Module& sharded, const torch::nn::Module& reference) {
  auto full = titan::full_state_dict(sharded, world().group(), titan::FullStateDictOptions().rank0_only(false));
  double worst = 0.0;
  for (const auto& item : reference.named_parameters()) {
    const Tensor* got = full.find(item.key());
    REQUIRE_MESSAGE(got != nullptr, "missing ", item.key());
    worst = std::max(worst, titan_test::max_abs_diff(*got, item.value()));
  }
  return worst;
}

/// Every parameter's gradient, gathered to the global shape.
std::map<std::string, Tensor> full_grads(const torch::nn::Module& model) {
  std::map<std::string, Tensor> grads;
  for (auto [name, sharded] : titan::sharded_parameters(model)) {
    sharded.local = sharded.local.grad();
    REQUIRE_MESSAGE(sharded.local.defined(), "no gradient for ", name);
    grads[name] = titan::gather_full(sharded);
  }
  return grads;
}

/// sqrt(sum of squared differences) between the sharded model's gradients and the reference's.
double grad_error(const torch::nn::Module& model, const torch::nn::Module& reference) {
  auto grads = full_grads(model);
  double sum = 0.0;
  for (const auto& item : reference.named_parameters())
    sum += (grads.at(item.key()).to(torch::kDouble) - item.value().grad().to(torch::kDouble)).pow(2).sum().item<double>();
  return std::sqrt(sum);
}

/// One forward and backward of the whole global batch (reference) or this rank's slice.
template <typename Model>
void forward_backward(Model& model, const Data& data, bool distributed) {
  auto x = distributed ? local_rows(data.inputs[0]) : data.inputs[0];
  auto y = distributed ? local_rows(data.targets[0]) : data.targets[0];
  torch::mse_loss(titan::call(model, x).to(torch::kFloat), y).backward();
}

}  // namespace

TEST_CASE("fsdp: dictionary entries become dim-0 chunks, members are freed, layouts give offsets") {
  const int n = world().world_size(), rank = world().rank();
  auto reference = seeded<Mlp>();
  auto model = seeded<Mlp>();
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);

  auto names = model->named_parameters().keys();
  CHECK(names == reference->named_parameters().keys());  // names unchanged
  for (const auto& [name, sharded] : titan::sharded_parameters(*model)) {
    const auto& full = reference->named_parameters()[name];
    CHECK(sharded.layout.global_shape == full.sizes().vec());
    CHECK(sharded.layout.placement() == "Shard(0)@dp_shard");
    auto rows = titan::chunk_sizes(full.size(0), n);
    CHECK(sharded.local.size(0) == rows[static_cast<size_t>(rank)]);
    int64_t offset = 0;
    for (int r = 0; r < rank; ++r) offset += rows[static_cast<size_t>(r)];
    CHECK(sharded.box().offsets[0] == offset);
    CHECK(torch::equal(sharded.local, full.narrow(0, offset, sharded.local.size(0))));
  }
  // The member (the tensor forward reads) is the unsharded parameter, without memory until
  // gathered: one zero element expanded to its shape.
  auto* block = model->layers[0]->as<BlockImpl>();
  CHECK(block->up.sizes() == torch::IntArrayRef({13, 7}));
  CHECK(block->up.storage().nbytes() == block->up.element_size());
  CHECK(block->up.stride(0) == 0);
  CHECK(titan::memory_usage(*model).unsharded_bytes == 0);
  // Sharding twice is refused.
  CHECK_THROWS_WITH(titan::fully_shard(model, mesh), doctest::Contains("already sharded"));
  // Forward without gradients matches the reference and frees everything again.
  auto x = torch::randn({4, 5}).to(device());
  {
    torch::NoGradGuard no_grad;
    CHECK_CLOSE(titan::call(model, x), reference->forward(x), 1e-6);
  }
  CHECK(titan::memory_usage(*model).unsharded_bytes == 0);
}

TEST_CASE("fsdp: MLP training equals single-process training of the global batch") {
  auto data = make_data({5}, 3, 5);
  auto reference = seeded<Mlp>();
  auto want = train(reference, data, false);
  auto mesh = shard_mesh();
  for (bool reshard : {true, false}) {
    CAPTURE(reshard);
    auto model = seeded<Mlp>();
    shard_mlp(model, mesh, titan::FsdpOptions().reshard_after_forward(reshard));
    auto got = train(model, data, true);
    check_losses(got, want, 1e-5);
    double diff = max_param_diff(*model, *reference);
    MESSAGE("MLP fp32 reshard_after_forward=", reshard, " ranks=", world().world_size(), " max param diff ", diff);
    CHECK(diff <= 1e-5);
    // Overlap: after the first step every block's all-gather was started ahead of its use
    // (forward prefetch; with resharding also backward prefetch).
    auto stats = titan::find_hook<titan::FsdpHook>(*model->layers[1])->stats();
    CHECK(stats.prefetches >= (reshard ? 2 : 1) * (5 - 1));
    CHECK(stats.reduce_scatters == 5);
    CHECK(titan::memory_usage(*model).unsharded_bytes == 0);  // all resharded after backward
  }
}

TEST_CASE("fsdp: CNN of library modules (Conv2d, Linear, some without bias) trains like the reference") {
  auto data = make_data({2, 6, 6}, 4, 5);
  auto reference = seeded<Cnn>();
  auto want = train(reference, data, false);
  auto model = seeded<Cnn>();
  auto mesh = shard_mesh();
  shard_cnn(model, mesh);
  auto got = train(model, data, true);
  check_losses(got, want, 1e-5);
  double diff = max_param_diff(*model, *reference);
  MESSAGE("CNN fp32 ranks=", world().world_size(), " max param diff ", diff);
  CHECK(diff <= 1e-5);
}

TEST_CASE("fsdp: a model built on the meta device, sharded, then to_empty and loaded") {
  auto data = make_data({5}, 3, 5);
  auto reference = seeded<Mlp>();
  auto initial = titan::full_state_dict(*reference, world().group(), titan::FullStateDictOptions().rank0_only(false));
  auto want = train(reference, data, false);

  Mlp model(torch::kMeta);
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);
  CHECK(model->parameters()[0].is_meta());
  CHECK_THROWS_WITH(titan::call(model, data.inputs[0]), doctest::Contains("meta device"));
  titan::to_empty(*model, device());
  titan::load_full_state_dict(*model, initial);
  auto mem = titan::memory_usage(*model);
  CHECK(mem.unsharded_bytes == 0);
  auto got = train(model, data, true);
  check_losses(got, want, 1e-5);
  CHECK(max_param_diff(*model, *reference) <= 1e-5);
}

TEST_CASE("fsdp: on a meta world the model stays on meta and a whole step runs without storage") {
  // DistOptions::device("meta") is how a step is traced at any size (bench/gpu_cost): FSDP takes
  // the meta parameters, gathers (casting to bf16), reshards (storage resized on meta) and reduces.
  auto meta_world = titan::init_distributed(titan::DistOptions().device("meta"),
                                            [](const std::string&) -> std::optional<std::string> { return {}; });
  REQUIRE(meta_world->device().is_meta());
  titan::DeviceMesh mesh(meta_world, {"dp_shard"}, {1});
  Mlp model(torch::kMeta, 64, 96, 2);
  shard_mlp(model, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16).reshard_after_forward(true));
  auto x = torch::empty({4, 5}, torch::TensorOptions().device(torch::kMeta));
  auto out = titan::call(model, x);
  CHECK(out.is_meta());
  CHECK((out.sizes().vec() == std::vector<int64_t>{4, 3}));
  CHECK((out.scalar_type() == torch::kBFloat16));
  out.sum().backward();
  for (const auto& [name, sharded] : titan::sharded_parameters(*model)) {
    CAPTURE(name);
    REQUIRE(sharded.local.grad().defined());
    CHECK(sharded.local.grad().is_meta());
    CHECK((sharded.local.grad().sizes() == sharded.local.sizes()));
    CHECK((sharded.local.grad().scalar_type() == torch::kFloat));  // fp32 shards, fp32 reduction
  }
  // Several ranks cannot share a meta world: refused before any rendezvous.
  auto two = [](const std::string& name) -> std::optional<std::string> {
    static const std::map<std::string, std::string> vars = {{"RANK", "0"},        {"WORLD_SIZE", "2"},
                                                            {"LOCAL_RANK", "0"},  {"LOCAL_WORLD_SIZE", "2"},
                                                            {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "1"}};
    auto it = vars.find(name);
    return it == vars.end() ? std::nullopt : std::optional<std::string>(it->second);
  };
  CHECK(titan_test::error_of([&] { titan::init_distributed(titan::DistOptions().device("meta"), two); })
            .find("DistOptions::device 'meta' is for one process, but the job has 2 ranks") != std::string::npos);
}

namespace {
/// x * weight + table: records the dtypes of the tensors forward receives.
struct DtypeProbeImpl : torch::nn::Module {
  DtypeProbeImpl() { weight = register_parameter("weight", torch::ones({4})); }
  Tensor forward(const Tensor& x, const Tensor& table) {
    seen = {x.scalar_type(), table.scalar_type()};
    return x * weight + table.to(x.scalar_type());
  }
  Tensor weight;
  std::vector<at::ScalarType> seen;
};
TORCH_MODULE(DtypeProbe);
}  // namespace

TEST_CASE("fsdp: cast_forward_inputs(false) leaves a unit's floating inputs in their dtype") {
  auto mesh = shard_mesh();
  for (bool cast : {true, false}) {
    CAPTURE(cast);
    DtypeProbe probe;
    probe->to(device());
    titan::fully_shard(probe, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16).cast_forward_inputs(cast));
    auto x = torch::ones({2, 4}, device()).to(torch::kBFloat16), table = torch::ones({2, 4}, device());
    auto out = titan::call(probe, x, table);
    CHECK((out.scalar_type() == torch::kBFloat16));
    CHECK((probe->seen == std::vector<at::ScalarType>{torch::kBFloat16, cast ? torch::kBFloat16 : torch::kFloat}));
  }
}

TEST_CASE("fsdp: bf16 parameters; fp32 reduction is closer to fp32 than bf16 reduction") {
  auto data = make_data({5}, 3, 5);
  auto reference = seeded<Mlp>();
  forward_backward(reference, data, false);
  auto mesh = shard_mesh();
  double errors[2];
  for (int i = 0; i < 2; ++i) {
    auto reduce = i == 0 ? torch::kFloat : torch::kBFloat16;
    auto model = seeded<Mlp>();
    shard_mlp(model, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16).reduce_dtype(reduce));
    forward_backward(model, data, true);
    CHECK((model->parameters()[0].scalar_type() == torch::kFloat));  // fp32 master weights
    CHECK((model->parameters()[0].grad().scalar_type() == torch::kFloat));
    errors[i] = grad_error(*model, *reference);
  }
  MESSAGE("bf16 params, ranks=", world().world_size(), ": gradient error (L2) with fp32 reduce ", errors[0],
          ", with bf16 reduce ", errors[1]);
  CHECK(errors[0] < 0.05);  // bf16 compute: ~3 significant digits
  if (world().world_size() == 1) {
    CHECK(errors[0] == errors[1]);  // nothing is summed: both only round the same bf16 gradient
  } else {
    CHECK(errors[0] < errors[1]);
  }

  // Training: losses follow the fp32 reference within bf16 precision (documented in docs/fsdp.md).
  auto fp32 = seeded<Mlp>();
  auto want = train(fp32, data, false);
  auto model = seeded<Mlp>();
  shard_mlp(model, mesh, titan::FsdpOptions().param_dtype(torch::kBFloat16).reduce_dtype(torch::kFloat));
  auto got = train(model, data, true);
  check_losses(got, want, 2e-2 * want[0]);
  double diff = max_param_diff(*model, *fp32);
  MESSAGE("bf16 params / fp32 reduce, 5 AdamW steps: max param diff ", diff);
  CHECK(diff <= 5 * 1e-2);  // AdamW moves a weight by <= ~lr (1e-2) per step, whatever the gradient noise
}

TEST_CASE("fsdp: gradient accumulation without sync equals one large batch") {
  auto data = make_data({5}, 3, 5);
  auto reference = seeded<Mlp>();
  auto want = train(reference, data, false);
  auto model = seeded<Mlp>();
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);
  auto got = train(model, data, true, /*micro_batches=*/2);
  check_losses(got, want, 1e-5);
  CHECK(max_param_diff(*model, *reference) <= 1e-5);
  // One reduction per step: the first micro-step only accumulated locally.
  CHECK(titan::find_hook<titan::FsdpHook>(*model->layers[0])->stats().reduce_scatters == 5);
}

TEST_CASE("fsdp: HSDP (replicate x shard) equals FSDP and the reference") {
  const int n = world().world_size();
  auto data = make_data({5}, 3, 5);
  auto reference = seeded<Mlp>();
  auto want = train(reference, data, false);
  // 4 ranks: 2 x 2; 2 ranks: 2 replicas of 1 shard; 1 rank: 1 x 1.
  const int64_t replicate = n == 4 ? 2 : n;
  titan::DeviceMesh mesh(titan_test::world(), {"dp_replicate", "dp_shard"}, {replicate, n / replicate});
  auto hsdp = seeded<Mlp>();
  shard_mlp(hsdp, mesh);
  auto got = train(hsdp, data, true);
  auto fsdp = seeded<Mlp>();
  shard_mlp(fsdp, shard_mesh());
  auto flat = train(fsdp, data, true);
  check_losses(got, want, 1e-5);
  check_losses(got, flat, 1e-5);
  double diff = max_param_diff(*hsdp, *reference);
  MESSAGE("HSDP ", replicate, "x", n / replicate, ": max param diff ", diff);
  CHECK(diff <= 1e-5);
  auto sharded = titan::sharded_parameters(*hsdp);
  CHECK(sharded.front().second.layout.placement() == "Shard(0)@dp_shard");
}

/// One matrix used twice (like tied input and output embeddings), registered under two names.
struct TiedImpl : torch::nn::Module {
  TiedImpl() {
    weight = torch::randn({6, 5}) * 0.4;
    register_parameter("in_proj", weight);
    register_parameter("out_proj", weight);
    bias = register_parameter("bias", torch::randn({5}) * 0.1);
  }
  Tensor forward(const Tensor& x) {                        // x: [B, 6]
    auto h = torch::tanh(torch::matmul(x, weight) + bias);  // [B, 5]
    return torch::matmul(h, weight.t());                    // [B, 6]
  }
  Tensor weight, bias;
};
TORCH_MODULE(Tied);

TEST_CASE("fsdp: tied parameters are shared inside a unit and refused across units") {
  auto mesh = shard_mesh();
  {
    auto data = make_data({6}, 6, 1);
    torch::manual_seed(0);
    Tied reference;
    reference->to(device());
    forward_backward(reference, data, false);
    torch::manual_seed(0);
    Tied model;
    model->to(device());
    auto hook = titan::fully_shard(model, mesh);
    CHECK(hook->params().size() == 2);  // one shard for both names
    CHECK(model->named_parameters()["in_proj"].is_same(model->named_parameters()["out_proj"]));
    forward_backward(model, data, true);
    auto grads = full_grads(*model);
    CHECK_CLOSE(grads.at("in_proj"), reference->weight.grad(), 1e-6);
    CHECK_CLOSE(grads.at("bias"), reference->bias.grad(), 1e-6);
  }
  {
    // Sibling units: the second unit finds the first's unsharded parameter.
    auto model = seeded<Mlp>();
    auto* first = model->layers[0]->as<BlockImpl>();
    auto* second = model->layers[1]->as<BlockImpl>();
    second->down = first->down;
    titan::detail::parameter_dict(*second)["down"] = first->down;
    titan::fully_shard(model->layers[0], mesh);
    CHECK_THROWS_WITH(titan::fully_shard(model->layers[1], mesh), doctest::Contains("tied"));
  }
  {
    // A parent unit holding a child unit's parameter.
    auto model = seeded<Mlp>();
    titan::detail::parameter_dict(*model)["head"] = model->layers[0]->as<BlockImpl>()->norm;
    titan::fully_shard(model->layers[0], mesh);
    CHECK_THROWS_WITH(titan::fully_shard(model, mesh), doctest::Contains("tied"));
  }
}

TEST_CASE("fsdp: per-rank parameter, gradient and optimizer memory is ~1/N of the model") {
  const int n = world().world_size();
  torch::manual_seed(0);
  Mlp model(torch::kCPU, /*dim=*/64, /*hidden=*/256, /*depth=*/2);
  model->to(device());
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);
  torch::optim::AdamW optimizer(model->parameters());
  auto x = torch::randn({8, 5}).to(device());
  torch::mse_loss(titan::call(model, local_rows(x)), torch::zeros({8 / n, 3}, device())).backward();
  optimizer.step();
  auto mem = titan::memory_usage(*model, &optimizer);
  const double ideal = static_cast<double>(mem.global_param_bytes) / n;
  MESSAGE("ranks=", n, ": params ", mem.param_bytes, " B, grads ", mem.grad_bytes, " B, AdamW state ",
          mem.optimizer_state_bytes, " B per rank; model ", mem.global_param_bytes, " B");
  // Uneven chunks: rank 0 holds at most one extra row per parameter (here < 3% of the model).
  CHECK(mem.param_bytes >= 0.97 * ideal);
  CHECK(mem.param_bytes <= 1.03 * ideal);
  CHECK(mem.grad_bytes == mem.param_bytes);
  CHECK(mem.optimizer_state_bytes == 2 * mem.param_bytes);
  CHECK(mem.unsharded_bytes == 0);
}

TEST_CASE("fsdp: full_state_dict on rank 0 only") {
  auto reference = seeded<Mlp>();
  auto model = seeded<Mlp>();
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);
  auto full = titan::full_state_dict(*model, world().group());
  if (world().rank() == 0) {
    REQUIRE(full.size() == reference->named_parameters().size());
    for (const auto& item : reference->named_parameters()) CHECK(same_values(full[item.key()], item.value()));
  } else {
    CHECK(full.is_empty());
  }
}

namespace {

/// Stands in for tensor parallelism: reports that `weight` is this rank's column block (Shard(1)
/// over "tp") of a global [5, 6] matrix.
struct ColumnShardLayout : titan::ModuleHook, titan::ParameterLayoutProvider {
  explicit ColumnShardLayout(titan::ProcessGroupPtr tp) : tp(std::move(tp)) {}
  std::string name() const override { return "column_shard"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    return next(inputs);
  }
  std::optional<titan::TensorLayout> layout_of(const std::string& relative_name) const override {
    if (relative_name != "weight") return std::nullopt;
    return titan::TensorLayout{{5, 6}, {titan::ShardLevel{1, "tp", tp, {}}}};
  }
  titan::ProcessGroupPtr tp;
};

}  // namespace

TEST_CASE("fsdp: layouts compose with an inner hook's (TP-like Shard(1), then FSDP Shard(0))") {
  const int n = world().world_size();
  const int64_t dp = n >= 2 ? 2 : 1;
  titan::DeviceMesh mesh(titan_test::world(), {"dp_shard", "tp"}, {dp, n / dp});
  torch::manual_seed(0);
  auto global = torch::randn({5, 6});
  auto tp = mesh.group("tp");
  auto cols = titan::chunk_sizes(6, tp->size());
  int64_t col0 = 0;
  for (int r = 0; r < tp->rank(); ++r) col0 += cols[static_cast<size_t>(r)];
  torch::nn::Linear linear(6, 5);
  linear->to(device());
  {
    torch::NoGradGuard no_grad;
    linear->weight.set_data(global.narrow(1, col0, cols[static_cast<size_t>(tp->rank())]).to(device()));
  }
  // As in torchtitan: TP on the projection, FSDP on the block holding it.
  titan::attach_hook(*linear, std::make_shared<ColumnShardLayout>(tp));
  torch::nn::Sequential block(linear);
  titan::fully_shard(block, mesh["dp_shard"]);

  auto sharded = titan::sharded_parameters(*block);
  REQUIRE(sharded.front().first == "0.weight");
  const auto& weight = sharded.front().second;
  CHECK(weight.layout.placement() == "Shard(1)@tp,Shard(0)@dp_shard");
  auto rows = titan::chunk_sizes(5, dp);
  int64_t row0 = 0;
  for (int r = 0; r < mesh.coordinate("dp_shard"); ++r) row0 += rows[static_cast<size_t>(r)];
  CHECK((weight.box().offsets == std::vector<int64_t>{row0, col0}));
  CHECK(same_values(weight.local, global.narrow(0, row0, weight.box().sizes[0]).narrow(1, col0, weight.box().sizes[1])));
  auto full = titan::full_state_dict(*block, world().group(), titan::FullStateDictOptions().rank0_only(false));
  CHECK(same_values(full["0.weight"], global));
}

namespace {

/// The Mlp's layout, but its forward calls the blocks with ->forward: the mistake a sharded unit
/// must not survive (its unsharded parameters have no memory outside titan::call).
struct BypassImpl : torch::nn::Module {
  BypassImpl() {
    torch::manual_seed(0);
    mlp = register_module("mlp", Mlp());
  }
  Tensor forward(const Tensor& x) {
    auto h = torch::matmul(x, mlp->embed.t());
    for (const auto& layer : *mlp->layers) h = layer->as<BlockImpl>()->forward(h);
    return torch::matmul(h, mlp->head.t());
  }
  Mlp mlp{nullptr};
};
TORCH_MODULE(Bypass);

}  // namespace

TEST_CASE("fsdp: a unit called with ->forward is an error naming it, not a read of freed memory") {
  Bypass model;
  model->to(device());
  auto mesh = shard_mesh();
  for (const auto& layer : *model->mlp->layers) titan::fully_shard(layer, mesh);
  titan::fully_shard(model, mesh);
  // The root's hook runs (titan::call), the blocks' do not: they compute with the placeholder
  // (zeros) their resharded parameters point at, and the root's call reports them.
  CHECK_THROWS_WITH(titan::call(model, torch::randn({2, 5}, device())),
                    doctest::Contains("'mlp.layers.0' has fully_shard attached; 'mlp.layers.1' has fully_shard attached; "
                                      "'mlp.layers.2' has fully_shard attached but were not called through titan::call"));
  // Resharded parameters hold no memory (their placeholders are not counted as unsharded).
  titan::reshard(model);
  CHECK(titan::memory_usage(model).unsharded_bytes == 0);
}

TEST_CASE("fsdp: verify_optimizer names a parameter the optimizer holds from before fully_shard") {
  auto model = seeded<Mlp>();
  torch::optim::AdamW early(model->parameters(), torch::optim::AdamWOptions(1e-2));  // too early
  shard_mlp(model, shard_mesh());
  CHECK_THROWS_WITH(titan::verify_optimizer(early, model),
                    doctest::Contains("holds parameter 'embed' of '(anonymous namespace)::MlpImpl' as it was before fully_shard"));
  torch::optim::AdamW built_after(model->parameters(), torch::optim::AdamWOptions(1e-2));
  CHECK_NOTHROW(titan::verify_optimizer(built_after, model));
}

TEST_CASE("fsdp: the first forward and verify_calls name trainable parameters no unit owns (the root not sharded)") {
  auto model = seeded<Mlp>();
  auto mesh = shard_mesh();
  for (const auto& layer : *model->layers) titan::fully_shard(layer, mesh);  // ... but not the root
  const auto unowned = doctest::Contains("2 trainable parameter(s) of '(anonymous namespace)::MlpImpl' belong to no "
                                         "fully_shard unit ('embed', 'head'): their gradients are never reduced");
  CHECK_THROWS_WITH(titan::call(model, local_rows(make_data({5}, 3, 1).inputs[0])), unowned);  // by itself
  CHECK_THROWS_WITH(titan::verify_calls(model), unowned);
  titan::fully_shard(model, mesh);
  titan::call(model, local_rows(make_data({5}, 3, 1).inputs[0]));
  CHECK_NOTHROW(titan::verify_calls(model));
}

TEST_CASE("fsdp: a root called as ->forward fails at its blocks' forward, not at a constant loss of zero reads") {
  const auto x = local_rows(make_data({5}, 3, 1).inputs[0]);
  const char* outside = "ran outside the forward of the unit enclosing it ('(anonymous namespace)::MlpImpl'): that "
                        "module was called as module->forward(...), which skips its fully_shard hook";
  auto model = seeded<Mlp>();
  shard_mlp(model, shard_mesh());
  CHECK_THROWS_WITH(model->forward(x), doctest::Contains((std::string("the unit of 'layers.0' ") + outside).c_str()));
  // Called right first, then as ->forward after a step: the root's parameters are resharded.
  auto later = seeded<Mlp>();
  shard_mlp(later, shard_mesh());
  titan::call(later, x).sum().backward();
  CHECK_THROWS_WITH(later->forward(x), doctest::Contains(outside));
  CHECK_NOTHROW(titan::call(later, x));
  // A unit called on its own, with no unit around it, is a root of its own as before.
  auto blocks_only = seeded<Mlp>();
  for (const auto& layer : *blocks_only->layers) titan::fully_shard(layer, shard_mesh());
  CHECK_NOTHROW(titan::call(blocks_only->layers[0]->as<BlockImpl>(), torch::randn({2, 7}, device())));
}

TEST_CASE("fsdp: state dicts and memory accept module holders") {
  auto model = seeded<Mlp>();
  shard_mlp(model, shard_mesh());
  auto from_holder = titan::full_state_dict(model, world().group(), titan::FullStateDictOptions().rank0_only(false));
  auto from_module = titan::full_state_dict(*model, world().group(), titan::FullStateDictOptions().rank0_only(false));
  for (const auto& item : from_module) CHECK(torch::equal(from_holder[item.key()], item.value()));
  titan::load_full_state_dict(model, from_holder);
  CHECK(titan::sharded_parameters(model).size() == titan::sharded_parameters(*model).size());
  CHECK(titan::memory_usage(model).param_bytes == titan::memory_usage(*model).param_bytes);
}

/// Per titan::fsdp profiler scope: how often it ran, and how many data-moving ATen ops ran
/// directly inside it.
struct ScopeCount {
  int entries = 0;
  int moves = 0;
};
std::map<std::string, ScopeCount> fsdp_scope_copies(const std::vector<titan_test::OpEvents::Event>& events) {
  auto moves_data = [](const std::string& op) {
    for (const char* word : {"copy", "cat", "clone", "fill", "zero", "add"})
      if (op.find(word) != std::string::npos) return true;
    return op == "aten::to";
  };
  std::map<std::string, ScopeCount> counts;
  for (const auto& e : events) {
    if (e.name.rfind("titan::fsdp::", 0) == 0) ++counts[e.name].entries;
    if (e.parent.rfind("titan::fsdp::", 0) == 0 && moves_data(e.name)) ++counts[e.parent].moves;
  }
  return counts;
}

TEST_CASE("fsdp: one copy per unit into and out of each collective; on one rank only the casts") {
  const int n = world().world_size();
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    auto model = seeded<Mlp>();  // each block unit holds 4 parameters
    shard_mlp(model, shard_mesh(), bf16 ? titan::FsdpOptions().param_dtype(torch::kBFloat16) : titan::FsdpOptions());
    auto data = make_data({5}, 3, 1);
    titan_test::OpEvents observer;
    forward_backward(model, data, true);
    auto counts = fsdp_scope_copies(observer.events());
    for (const auto& [scope, count] : counts) MESSAGE(scope, ": ", count.entries, " runs, ", count.moves, " copies");
    if (n == 1 && !bf16) {
      // The unsharded parameters are the shards themselves: no buffer is filled.
      CHECK(counts.empty());
      continue;
    }
    // One rank in bf16: the fp32 shards cast into the unit's gathered storage, and the bf16
    // gradients cast back to the fp32 shards, one foreach copy per unit each way.
    const std::vector<std::string> scopes =
        n == 1 ? std::vector<std::string>{"titan::fsdp::all_gather_copy_out", "titan::fsdp::reduce_scatter_copy_in"}
               : std::vector<std::string>{"titan::fsdp::all_gather_copy_in", "titan::fsdp::all_gather_copy_out",
                                          "titan::fsdp::reduce_scatter_copy_in"};
    for (const auto& scope : scopes) {
      CAPTURE(scope);
      CHECK(counts[scope].entries >= 4);  // every unit, every time
      if (scope == "titan::fsdp::all_gather_copy_in" && world().rank() != 0) {
        CHECK(counts[scope].moves <= counts[scope].entries);  // a rank may hold no row of a small unit
      } else {
        CHECK(counts[scope].moves == counts[scope].entries);
      }
    }
  }
}

TEST_CASE("fsdp: sharded gradients are views of the reduction's output, or the gradient itself on one rank") {
  auto model = seeded<Mlp>();
  auto mesh = shard_mesh();
  shard_mlp(model, mesh);
  auto data = make_data({5}, 3, 1);
  forward_backward(model, data, true);
  auto* block = model->layers[0]->as<BlockImpl>();
  auto norm = block->named_parameters()["norm"].grad(), up = block->named_parameters()["up"].grad();
  REQUIRE(norm.defined());
  REQUIRE(up.defined());
  if (world().world_size() > 1) {
    // One buffer per unit holds all of its sharded gradients: no copy per parameter.
    CHECK(norm.storage().is_alias_of(up.storage()));
  } else {
    // Nothing to reduce: each gradient is its own tensor, moved from the unsharded parameter.
    CHECK_FALSE(norm.storage().is_alias_of(up.storage()));
  }
  CHECK(norm.is_contiguous());
  CHECK(up.is_contiguous());
}

namespace {

/// Three projections of one input, registered one after the other (rows divisible by 1, 2 and 4
/// ranks): computed by titan::linear_fused, recording whether the weights lay end to end in one
/// storage and whether the forward copied them (aten::cat).
struct ProjectionsImpl : torch::nn::Module {
  ProjectionsImpl() {
    a = register_parameter("a", torch::randn({8, 4}));
    b = register_parameter("b", torch::randn({4, 4}));
    c = register_parameter("c", torch::randn({8, 4}));
  }
  Tensor forward(const Tensor& x) {  // x [3, 4]
    adjacent = b.is_alias_of(a) && c.is_alias_of(a) && b.storage_offset() == a.storage_offset() + a.numel() &&
               c.storage_offset() == b.storage_offset() + b.numel();
    std::vector<Tensor> parts;
    {
      titan_test::OpEvents events;
      parts = titan::linear_fused(x, {a, b, c});
      for (const auto& e : events.events()) copied = copied || e.name == "aten::cat";
    }
    return torch::cat(parts, -1);  // [3, 20]
  }
  Tensor a, b, c;
  bool adjacent = false, copied = false;
};
TORCH_MODULE(Projections);

}  // namespace

TEST_CASE("fsdp: a unit's unsharded parameters lie end to end in one storage, so a fused GEMM copies none") {
  torch::manual_seed(5);
  Projections reference;
  reference->to(device());
  torch::manual_seed(5);
  Projections model;
  model->to(device());
  const auto x = torch::randn({3, 4}).to(device());
  titan::call(reference, x);
  CHECK_FALSE(reference->adjacent);  // separate tensors: copied into one matrix
  CHECK(reference->copied);
  // In fp64 (param_dtype): also one rank gathers into the unit's storage instead of computing with
  // the shards themselves.
  titan::fully_shard(model, shard_mesh(),
                     titan::FsdpOptions().reshard_after_forward(false).param_dtype(torch::kDouble));
  const auto out = titan::call(model, x);  // [3, 20] fp64
  CHECK(model->adjacent);
  CHECK_FALSE(model->copied);
  CHECK_CLOSE(out.to(torch::kFloat), titan::call(reference, x), 1e-5);
  // The unit's storage is counted once: every parameter, unpadded (the rows divide the ranks).
  CHECK(titan::memory_usage(*model).unsharded_bytes == 20 * 4 * static_cast<int64_t>(sizeof(double)));
  out.sum().backward();  // gradients reach each parameter's shard
  for (const auto& p : model->parameters()) CHECK(p.grad().defined());
}

namespace {

/// Every parameter's gradient of `model`, in its order.
std::vector<Tensor> grads_of(const std::vector<Tensor>& params) {
  std::vector<Tensor> grads;
  for (const auto& p : params) grads.push_back(p.grad());
  return grads;
}

}  // namespace

TEST_CASE("fsdp: keep_compute_copy: one rank keeps bf16 gradients and copy; adamw_copy_ equals the casts + AdamW") {
  auto mesh = shard_mesh();
  const auto options = titan::FsdpOptions().param_dtype(torch::kBFloat16).reduce_dtype(torch::kFloat);
  auto data = make_data({5}, 3, 4);
  auto cast = seeded<Mlp>(), kept = seeded<Mlp>();
  shard_mlp(cast, mesh, options);
  shard_mlp(kept, mesh, titan::FsdpOptions(options).keep_compute_copy(true));
  const auto units = titan::fsdp_units(kept);
  REQUIRE(units.size() == 4);
  if (world().world_size() > 1) {  // sharded: nothing to keep, the option has no effect
    forward_backward(kept, data, true);
    for (const auto& unit : units) {
      CHECK_FALSE(unit->keeps_compute_copy());
      CHECK(unit->compute_copies().empty());
    }
    CHECK((kept->parameters()[0].grad().scalar_type() == torch::kFloat));
    return;
  }
  for (const auto& unit : units) {
    REQUIRE(unit->keeps_compute_copy());
    CHECK(unit->compute_copies().empty());  // no storage before the first forward
  }
  // The same AdamW, clipping inside (grad_scale): ATen's kernel on the fp32 gradients of `cast`,
  // titan::adamw_copy_ on the gradients `kept` left in bf16, writing its copies.
  const auto a = cast->parameters(), b = kept->parameters();
  auto zeros = [](const std::vector<Tensor>& params) {
    std::vector<Tensor> z;
    for (const auto& p : params) z.push_back(torch::zeros_like(p));
    return z;
  };
  auto m_a = zeros(a), v_a = zeros(a), m_b = zeros(b), v_b = zeros(b);
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device());
  const auto scale = torch::full({1}, 1.5, f32);
  for (int64_t s = 0; s < 4; ++s) {
    CAPTURE(s);
    // Step 2 backpropagates two halves, each reduced: the kept bf16 gradient is widened to fp32
    // before the second is added, as the casts would have summed them.
    const int64_t micro = s == 1 ? 2 : 1, rows = 8 / micro;
    for (auto* model : {&cast, &kept})
      for (int64_t m = 0; m < micro; ++m)
        torch::mse_loss(titan::call(*model, data.inputs[s].narrow(0, m * rows, rows)).to(torch::kFloat),
                        data.targets[s].narrow(0, m * rows, rows))
            .backward();
    const auto g_a = grads_of(a), g_b = grads_of(b);
    for (size_t i = 0; i < a.size(); ++i) {
      CAPTURE(i);
      CHECK((g_b[i].scalar_type() == (micro == 1 ? torch::kBFloat16 : torch::kFloat)));
      CHECK(same_values(g_b[i].to(torch::kFloat), g_a[i]));
    }
    std::unordered_map<const c10::TensorImpl*, Tensor> copy_of;
    for (const auto& unit : units)
      for (const auto& c : unit->compute_copies()) copy_of.emplace(c.shard.unsafeGetTensorImpl(), c.copy);
    REQUIRE(copy_of.size() == b.size());
    std::vector<Tensor> copies;
    for (const auto& p : b) copies.push_back(copy_of.at(p.unsafeGetTensorImpl()));
    const std::vector<Tensor> steps(a.size(), torch::full({}, static_cast<double>(s + 1), f32));
    at::_fused_adamw_(a, g_a, m_a, v_a, {}, steps, 1e-2, 0.9, 0.95, 0.1, 1e-8, false, false, scale, std::nullopt);
    titan::adamw_copy_(b, g_b, m_b, v_b, copies, steps,
                       titan::AdamWCopyOptions().lr(1e-2).beta1(0.9).beta2(0.95).weight_decay(0.1).eps(1e-8), scale);
    for (const auto& unit : units) {
      std::vector<Tensor> written;
      for (const auto& c : unit->compute_copies()) written.push_back(c.shard);
      unit->compute_copies_written(written);
    }
    for (size_t i = 0; i < a.size(); ++i) {
      CAPTURE(i);
      CHECK(same_values(b[i], a[i]));
      CHECK(same_values(copies[i], a[i].to(torch::kBFloat16)));
    }
    for (const auto& p : a) p.mutable_grad() = Tensor();
    for (const auto& p : b) p.mutable_grad() = Tensor();
  }
  // Every unshard after the very first used the copy as the step (or the first cast) left it.
  for (const auto& unit : units) CHECK(unit->stats().copies_reused == unit->stats().all_gathers - 1);
  // A shard changed in place by anything but a step declaring its copy written is seen: its unit
  // casts again (here the embedding, changed while the head's copy is declared written).
  auto& root = *units.front();
  const int64_t reused = root.stats().copies_reused;
  {
    torch::NoGradGuard no_grad;
    a[0].mul_(0.5);  // embed, the root's
    b[0].mul_(0.5);
  }
  root.compute_copies_written({kept->named_parameters()["head"]});  // unchanged since the step wrote its copy
  CHECK(same_values(titan::call(kept, data.inputs[0]), titan::call(cast, data.inputs[0])));
  CHECK(root.stats().copies_reused == reused);
  CHECK_THROWS_WITH(root.compute_copies_written({a[0]}), doctest::Contains("none of its parameters"));
  titan::reshard(kept);
  // An optimizer that knows no copies (LibTorch's AdamW, reading the bf16 gradients widened by type
  // promotion) trains as with the casts; the shards it changes are cast again at each forward.
  auto plain = seeded<Mlp>(), reference = seeded<Mlp>();
  shard_mlp(plain, mesh, titan::FsdpOptions(options).keep_compute_copy(true));
  shard_mlp(reference, mesh, options);
  const auto want = train(reference, data, true);
  check_losses(train(plain, data, true), want, 1e-6 * want[0]);
  const double diff = max_param_diff(*plain, *reference);
  MESSAGE("keep_compute_copy with LibTorch's AdamW, 4 steps: max parameter difference ", diff);
  CHECK(diff <= 1e-6);
}
