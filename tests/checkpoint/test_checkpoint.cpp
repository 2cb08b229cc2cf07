// titan/checkpoint.hpp: round trips, bitwise resume, async saves, rotation, corruption, with the
// tensors and models on titan_test::device(). Runs on 1, 2 and 4 ranks (titan.ranksN); resharding
// across world sizes and kill-during-save are separate ctest entries (checkpoint_driver.cpp, on
// the CPU).
#include "../support/multirank.hpp"
#include "../support/checkpoint_fixtures.hpp"

#include <titan/checkpoint.hpp>

#include <array>
#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

namespace {

using titan_ckpt::global_tensor;
using titan_test::device;
using titan_test::same_values;
using titan_test::world;

using titan_test::error_of;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

/// The specs' tensors sharded FSDP-style over all ranks (Shard(0) over "dp_shard"), on device().
titan::ShardedStateDict fsdp_tensors(const titan::DeviceMesh& mesh, bool zeros) {
  titan::ShardedStateDict tensors;
  int64_t index = 0;
  for (const auto& spec : titan_ckpt::specs()) {
    auto sharded = titan_ckpt::shard_of(global_tensor(index++, spec.shape, spec.dtype).to(device()),
                                        titan_ckpt::layout_for(spec, mesh));
    if (zeros) sharded.local.zero_();
    tensors.emplace_back(spec.name, sharded);
  }
  return tensors;
}

/// Gives every parameter of a module a layout: Shard(0) over one group (what FSDP reports).
class TestLayouts : public titan::ModuleHook, public titan::ParameterLayoutProvider {
 public:
  std::map<std::string, titan::TensorLayout> layouts;
  std::string name() const override { return "test_layouts"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    return next(inputs);
  }
  std::optional<titan::TensorLayout> layout_of(const std::string& name) const override {
    auto it = layouts.find(name);
    if (it == layouts.end()) return std::nullopt;
    return it->second;
  }
};

/// A two-layer MLP whose parameters are hand-sharded along dim 0 (FSDP-style) on device(): forward
/// all-gathers them (differentiably, so gradients are reduce-scattered into the shards).
struct ShardedMlpImpl : torch::nn::Module {
  ShardedMlpImpl(const titan::DeviceMesh& mesh, int64_t seed) : group(mesh.group("dp_shard")) {
    auto hook = std::make_shared<TestLayouts>();
    const std::vector<std::pair<std::string, std::vector<int64_t>>> shapes{
        {"w1", {12, 5}}, {"b1", {12}}, {"w2", {3, 12}}, {"b2", {3}}};
    for (const auto& [name, shape] : shapes) {
      titan::TensorLayout layout{shape, {{0, "dp_shard", group, {}}}};
      auto global = global_tensor(seed++, shape, torch::kFloat).mul(0.5).to(device());
      register_parameter(name, titan_ckpt::shard_of(global, layout).local.clone());
      hook->layouts[name] = layout;
    }
    titan::attach_hook(*this, hook);
  }
  torch::Tensor full(const std::string& name) {
    auto local = named_parameters(false)[name];
    auto global_rows = titan::parameter_layout(*this, name, local).global_shape[0];
    return titan::all_gather(local, group, 0, titan::chunk_sizes(global_rows, group->size()));
  }
  torch::Tensor forward(torch::Tensor x) {  // x [batch, 5]
    auto h = torch::relu(torch::addmm(full("b1"), x, full("w1").t()));  // [batch, 12]
    return torch::addmm(full("b2"), h, full("w2").t());                // [batch, 3]
  }
  titan::ProcessGroupPtr group;
};
TORCH_MODULE(ShardedMlp);

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const std::string& kind, std::vector<torch::Tensor> params) {
  if (kind == "AdamW") return std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(0.02).weight_decay(0.1));
  if (kind == "Adam") return std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(0.02).amsgrad(true));
  if (kind == "Adagrad") return std::make_unique<torch::optim::Adagrad>(params, torch::optim::AdagradOptions(0.05).lr_decay(0.01));
  if (kind == "RMSprop")
    return std::make_unique<torch::optim::RMSprop>(params, torch::optim::RMSpropOptions(0.01).momentum(0.9).centered(true));
  return std::make_unique<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true));
}

/// Trains steps [first, last] under a decaying learning rate; returns each step's loss on this rank.
std::vector<float> train(ShardedMlp& model, torch::optim::Optimizer& optimizer, int first, int last) {
  return titan_ckpt::train_steps(model, optimizer, first, last, world()->rank(), 1000,
                                 [](int step) { return 0.02 * (1.0 - 0.03 * step); });
}

}  // namespace

TEST_CASE("checkpoint: CRC-32 is zlib's") {
  const std::string text = "123456789";
  CHECK(titan::detail::crc32(text.data(), text.size()) == 0xCBF43926U);  // the standard check value
  std::string long_text(1000, '\0');
  for (size_t i = 0; i < long_text.size(); ++i) long_text[i] = static_cast<char>(i * 7 + 3);
  uint32_t whole = titan::detail::crc32(long_text.data(), long_text.size());
  uint32_t part = titan::detail::crc32(long_text.data(), 333);
  CHECK(titan::detail::crc32(long_text.data() + 333, long_text.size() - 333, part) == whole);
  // The carry-less-multiplication path (64 bytes and more, where the CPU has it) against the
  // definition, bit by bit: every length up to 700 at unaligned starts, continued CRCs, 1 MiB.
  const auto bitwise = [](const uint8_t* p, size_t n, uint32_t crc) {
    crc = ~crc;
    for (size_t i = 0; i < n; ++i) {
      crc ^= p[i];
      for (int k = 0; k < 8; ++k) crc = (crc & 1U) ? (crc >> 1) ^ 0xEDB88320U : crc >> 1;
    }
    return ~crc;
  };
  std::vector<uint8_t> bytes(size_t{1} << 20);
  uint32_t state = 12345;
  for (auto& b : bytes) b = static_cast<uint8_t>((state = state * 1103515245U + 12345U) >> 16);
  int wrong = 0;
  for (size_t n = 0; n <= 700; ++n)
    for (size_t start : {0, 1, 7, 13})
      for (uint32_t crc : {0U, 0xDEADBEEFU})
        wrong += titan::detail::crc32(bytes.data() + start, n, crc) != bitwise(bytes.data() + start, n, crc);
  CHECK(wrong == 0);
  CHECK(titan::detail::crc32(bytes.data(), bytes.size()) == bitwise(bytes.data(), bytes.size(), 0));
  CHECK(titan::detail::crc32(bytes.data() + 5, bytes.size() - 21, 77) == bitwise(bytes.data() + 5, bytes.size() - 21, 77));
}

TEST_CASE("checkpoint: sharded tensors and extra state round-trip") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  auto dir = titan_ckpt::shared_dir(world(), "roundtrip");
  std::vector<std::array<int64_t, 3>> progress;  // (tensors done, total, bytes) per call
  titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir).interval(10).block_bytes(16).on_load_progress(
                                                [&](int64_t done, int64_t total, int64_t bytes) {
                                                  progress.push_back({done, total, bytes});
                                                }));
  titan::TrainState nothing;
  CHECK_FALSE(manager.load_latest(nothing).has_value());  // a fresh run

  titan::TrainState saved;
  saved.tensors = fsdp_tensors(mesh, /*zeros=*/false);
  saved.extra = {{"lr_scheduler", "{\"step\": 20}"}, {"config", "dim = 8\n"}};
  saved.rank_extra = {{"data_position", std::to_string(100 + world()->rank())}};
  CHECK_FALSE(manager.maybe_save(15, saved));
  CHECK(manager.maybe_save(20, saved));
  CHECK(std::filesystem::exists(dir + "/step-20/metadata.json"));
  CHECK_FALSE(std::filesystem::exists(dir + "/.tmp-step-20"));
  std::ifstream latest(dir + "/latest");
  std::string pointer;
  latest >> pointer;
  CHECK(pointer == "step-20");

  titan::TrainState loaded;
  loaded.tensors = fsdp_tensors(mesh, /*zeros=*/true);
  auto step = manager.load_latest(loaded);
  REQUIRE(step.has_value());
  CHECK(*step == 20);
  for (size_t i = 0; i < saved.tensors.size(); ++i) {
    INFO(saved.tensors[i].first);
    CHECK(torch::equal(loaded.tensors[i].second.local, saved.tensors[i].second.local));
  }
  CHECK(loaded.extra == saved.extra);
  CHECK(loaded.rank_extra == saved.rank_extra);
  // Progress: once per tensor, counting up to every tensor and this rank's bytes.
  REQUIRE(progress.size() == saved.tensors.size());
  int64_t local_bytes = 0;
  for (const auto& [name, tensor] : saved.tensors) local_bytes += static_cast<int64_t>(tensor.local.nbytes());
  for (size_t i = 0; i < progress.size(); ++i) {
    CHECK(progress[i][0] == static_cast<int64_t>(i + 1));
    CHECK(progress[i][1] == static_cast<int64_t>(saved.tensors.size()));
  }
  CHECK(progress.back()[2] == local_bytes);

  // The same load with bounded staging (groups of at most 48 bytes, 3 threads): the same tensors.
  titan::TrainState bounded;
  bounded.tensors = fsdp_tensors(mesh, /*zeros=*/true);
  titan::load_checkpoint(dir + "/step-20", bounded, world()->group(),
                         titan::LoadOptions().max_staging_bytes(48).io_threads(3));
  for (size_t i = 0; i < saved.tensors.size(); ++i) {
    INFO(saved.tensors[i].first);
    CHECK(torch::equal(bounded.tensors[i].second.local, saved.tensors[i].second.local));
  }

  // Every tensor is saved once, a replicated one by one rank only.
  auto meta = titan::read_checkpoint_metadata(dir + "/step-20");
  CHECK(meta.world_size == world()->world_size());
  REQUIRE(meta.find("extra.scale") != nullptr);
  CHECK(meta.find("extra.scale")->shards.size() == 1);
  CHECK(meta.find("extra.layers.0.wq")->placement == "Shard(0)@dp_shard");
  CHECK(meta.find("extra.layers.0.wq")->shards.size() == static_cast<size_t>(std::min(world()->world_size(), 10)));
}

TEST_CASE("checkpoint: training resumes bitwise (AdamW, Adam amsgrad, SGD momentum, Adagrad, RMSprop), keyed by name") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  for (std::string kind : {"AdamW", "Adam", "SGD", "Adagrad", "RMSprop"}) {
    INFO(kind);
    ShardedMlp straight(mesh, 0);
    auto straight_optimizer = make_optimizer(kind, straight->parameters());
    auto expected = train(straight, *straight_optimizer, 1, 10);

    auto dir = titan_ckpt::shared_dir(world(), "resume_" + kind);
    std::vector<float> first_half;
    {
      ShardedMlp model(mesh, 0);
      auto optimizer = make_optimizer(kind, model->parameters());
      first_half = train(model, *optimizer, 1, 5);
      titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir).interval(5));
      titan::TrainState state;
      state.model = model.get();
      state.optimizer = optimizer.get();
      state.extra["step"] = "5";
      CHECK(manager.maybe_save(5, state));
    }
    // A fresh model with other values and a fresh optimizer over the parameters in another order.
    ShardedMlp resumed(mesh, 50);
    auto params = resumed->parameters();
    std::reverse(params.begin(), params.end());
    auto optimizer = make_optimizer(kind, params);
    titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir));
    titan::TrainState state;
    state.model = resumed.get();
    state.optimizer = optimizer.get();
    REQUIRE(manager.load_latest(state) == std::optional<int64_t>(5));
    CHECK(state.extra.at("step") == "5");
    CHECK(optimizer->param_groups()[0].options().get_lr() == 0.02 * (1.0 - 0.03 * 5));
    auto second_half = train(resumed, *optimizer, 6, 10);

    first_half.insert(first_half.end(), second_half.begin(), second_half.end());
    CHECK(first_half == expected);  // bitwise
    auto a = straight->named_parameters();
    auto b = resumed->named_parameters();
    for (const auto& item : a) {
      INFO(item.key());
      CHECK(torch::equal(item.value(), b[item.key()]));
    }
  }
}

namespace {

/// A counter and a table as a checkpoint component: a value and a tensor sharded over the ranks.
struct Counter : titan::Stateful {
  explicit Counter(const titan::DeviceMesh& mesh) : layout{{10, 2}, {{0, "dp_shard", mesh.group("dp_shard"), {}}}} {
    table = torch::zeros(layout.local_shape(), device());
  }
  titan::ComponentState state() const override {
    return titan::ComponentState{{{"count", std::to_string(count)}}, {{"table", titan::make_sharded("table", table, layout)}}};
  }
  void load_state(const titan::ComponentState& state) override {
    count = std::stoll(state.values.at("count"));
    table.copy_(state.tensors.at(0).second.local);
  }
  titan::TensorLayout layout;
  int64_t count = 0;
  torch::Tensor table;
};

}  // namespace

TEST_CASE("checkpoint: components are saved and restored by name; a missing one is an error") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  auto dir = titan_ckpt::shared_dir(world(), "components");
  {
    Counter counter(mesh), other(mesh);
    counter.count = 42;
    counter.table.fill_(world()->rank() + 1.0);
    other.count = 7;
    titan::TrainState state;
    state.add("counter", counter).add("other", other);
    CHECK_THROWS_WITH(state.add("counter", other), doctest::Contains("a component named 'counter' is already registered"));
    CHECK_THROWS_WITH(state.add("bad.name", other), doctest::Contains("must be letters, digits and '_'"));
    titan::CheckpointManager(world(), titan::CheckpointOptions(dir)).save(1, state);
  }
  // Registered in the other order: found by name, not by position.
  Counter counter(mesh), other(mesh);
  titan::TrainState state;
  state.add("other", other).add("counter", counter);
  titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir));
  REQUIRE(manager.load_latest(state) == std::optional<int64_t>(1));
  CHECK(counter.count == 42);
  CHECK(other.count == 7);
  CHECK(counter.table.eq(world()->rank() + 1.0).all().item<bool>());
  CHECK(state.extra.empty());  // titan's own entries are not handed back as extra state
  // A component the checkpoint does not hold fails the load, with nothing overwritten.
  Counter fresh(mesh), absent(mesh);
  titan::TrainState more;
  more.add("counter", fresh).add("absent", absent);
  CHECK_THROWS_WITH(manager.load_latest(more), doctest::Contains("holds no state of component 'absent'"));
  CHECK(fresh.count == 0);
}

TEST_CASE("checkpoint: an async save writes the staged copy while training goes on") {
  for (bool reuse : {true, false}) {
    CAPTURE(reuse);  // reuse: saves 2 and 3 copy into the host buffers of the save before
    titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
    auto dir = titan_ckpt::shared_dir(world(), reuse ? "async_reuse" : "async_fresh");
    titan::CheckpointManager manager(
        world(), titan::CheckpointOptions(dir).async(true).reuse_staging(reuse).interval(1).keep_latest_k(2));
    titan::TrainState state;
    state.tensors = fsdp_tensors(mesh, false);
    std::map<int64_t, std::vector<torch::Tensor>> saved;  // step -> the tensors as save() saw them
    auto save = [&](int64_t step) {
      for (const auto& [name, tensor] : state.tensors) saved[step].push_back(tensor.local.clone());
      manager.save(step, state);
    };
    save(1);
    for (auto& [name, tensor] : state.tensors) tensor.local.add_(1);  // training modifies the tensors at once
    save(2);  // waits for step 1, then stages step 2
    for (auto& [name, tensor] : state.tensors) tensor.local.add_(1);
    save(3);
    for (auto& [name, tensor] : state.tensors) tensor.local.add_(1);  // while step 3 is written
    manager.wait();
    CHECK(manager.complete_steps() == std::vector<int64_t>{2, 3});  // keep_latest_k = 2

    for (int64_t step : {2, 3}) {
      titan::TrainState loaded;
      loaded.tensors = fsdp_tensors(mesh, true);
      CHECK(manager.load(step, loaded) == std::optional<int64_t>(step));
      for (size_t i = 0; i < state.tensors.size(); ++i) {
        INFO(state.tensors[i].first, " step ", step);
        CHECK(torch::equal(loaded.tensors[i].second.local, saved[step][i]));
      }
    }
  }
}

TEST_CASE("checkpoint: async staging copies into host memory, pinned for a GPU tensor, reusing a fitting buffer") {
  auto stage = [](const torch::Tensor& t, const torch::Tensor& reuse) {
    auto host = titan::detail::stage_on_host(t, reuse);
    if (!t.is_cpu()) titan::detail::wait_for_stream(t.device());  // the copy from a GPU is non-blocking
    return host;
  };
  const auto t = global_tensor(3, {5, 7}, torch::kFloat).to(device());
  const auto staged = stage(t, {});
  CHECK(staged.is_cpu());
  CHECK(staged.is_pinned() == !t.is_cpu());
  CHECK(same_values(staged, t));
  // The next save copies into the same buffer; another shape or dtype gets a fresh one.
  const auto again = stage(t * 2, staged);
  CHECK(again.data_ptr() == staged.data_ptr());
  CHECK(same_values(again, t * 2));
  CHECK(stage(t.narrow(0, 0, 2), staged).data_ptr() != staged.data_ptr());
  CHECK(stage(t.to(torch::kDouble), staged).data_ptr() != staged.data_ptr());
  // Pageable host memory fits a CPU tensor only: a GPU tensor is staged in pinned memory.
  const auto pageable = torch::empty({5, 7});
  const auto into_pageable = stage(t, pageable);
  CHECK((into_pageable.data_ptr() == pageable.data_ptr()) == t.is_cpu());
  CHECK(into_pageable.is_pinned() == !t.is_cpu());
  CHECK(same_values(into_pageable, t));
}

TEST_CASE("checkpoint: corrupt, truncated, missing or mismatched checkpoints fail before overwriting") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  auto dir = titan_ckpt::shared_dir(world(), "corrupt");
  {
    titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir).block_bytes(64));
    titan::TrainState state;
    state.tensors = fsdp_tensors(mesh, false);
    manager.save(7, state);
  }
  const std::string good = dir + "/step-7";
  auto meta = titan::read_checkpoint_metadata(good);
  const auto& wq = meta.find("extra.layers.0.wq")->shards.front();
  REQUIRE(wq.file == "rank-0.safetensors");

  // Copies the good checkpoint to `name`, lets rank 0 damage it, loads it on every rank into
  // zeroed tensors and returns the error; the tensors must still be zero.
  auto load_damaged = [&](const std::string& name, const std::function<void(const std::string&)>& damage,
                          const std::function<void(titan::TrainState&)>& edit = nullptr) {
    const std::string copy = dir + "/" + name;
    if (world()->rank() == 0) {
      std::filesystem::copy(good, copy, std::filesystem::copy_options::recursive);
      if (damage) damage(copy);
    }
    world()->group()->barrier();
    titan::TrainState state;
    state.tensors = fsdp_tensors(mesh, true);
    if (edit) edit(state);
    auto error = error_of([&] { titan::load_checkpoint(copy, state, world()->group()); });
    // With bounded staging (groups of at most 64 bytes staged and applied one after the other)
    // every checksum is checked before the first group is applied: the same error.
    auto bounded_error = error_of([&] {
      titan::load_checkpoint(copy, state, world()->group(), titan::LoadOptions().max_staging_bytes(64).io_threads(3));
    });
    CHECK(bounded_error == error);
    for (const auto& [tensor_name, tensor] : state.tensors) {
      INFO(tensor_name);
      CHECK(tensor.local.count_nonzero().item<int64_t>() == 0);
    }
    return error;
  };

  SUBCASE("a flipped byte") {
    auto error = load_damaged("flipped", [&](const std::string& copy) {
      std::fstream file(copy + "/rank-0.safetensors", std::ios::in | std::ios::out | std::ios::binary);
      file.seekg(wq.begin + 3);
      char byte = 0;
      file.read(&byte, 1);
      byte = static_cast<char>(byte ^ 0x10);
      file.seekp(wq.begin + 3);
      file.write(&byte, 1);
    });
    INFO(error);
    CHECK(contains(error, "checksum mismatch"));
    CHECK(contains(error, "rank-0.safetensors"));
    CHECK(contains(error, "'extra.layers.0.wq'"));
  }
  SUBCASE("a truncated file") {
    auto error = load_damaged("truncated", [&](const std::string& copy) {
      std::filesystem::resize_file(copy + "/rank-0.safetensors", static_cast<uintmax_t>(wq.begin + 5));
    });
    INFO(error);
    CHECK(contains(error, "truncated"));
    CHECK(contains(error, "rank-0.safetensors"));
    CHECK(contains(error, "'extra.layers.0.wq'"));
  }
  SUBCASE("a missing file") {
    auto error = load_damaged("missing", [&](const std::string& copy) {
      std::filesystem::remove(copy + "/rank-0.safetensors");
    });
    INFO(error);
    CHECK(contains(error, "is missing"));
    CHECK(contains(error, "rank-0.safetensors"));
    CHECK(contains(error, "'extra.layers.0.wq'"));
  }
  SUBCASE("no metadata (an unfinished save)") {
    auto error = load_damaged("unfinished", [&](const std::string& copy) {
      std::filesystem::remove(copy + "/metadata.json");
    });
    INFO(error);
    CHECK(contains(error, "metadata.json' is missing"));
  }
  SUBCASE("another shape") {
    auto error = load_damaged("shape", nullptr, [&](titan::TrainState& state) {
      titan_ckpt::Spec spec{"layers.0.wo", {6, 11}, torch::kFloat, -1};
      state.tensors[1].second = titan_ckpt::shard_of(torch::zeros({6, 11}, device()), titan_ckpt::layout_for(spec, mesh));
    });
    INFO(error);
    CHECK(contains(error, "'extra.layers.0.wo' has global shape [6, 11]"));
    CHECK(contains(error, "saved it as [6, 10]"));
  }
  SUBCASE("another dtype") {
    auto error = load_damaged("dtype", nullptr, [&](titan::TrainState& state) {
      state.tensors[2].second =
          titan::replicated(torch::zeros({7}, torch::TensorOptions().dtype(torch::kDouble).device(device())));
    });
    INFO(error);
    CHECK(contains(error, "'extra.layers.0.norm' is Double but"));
  }
  SUBCASE("a tensor the checkpoint lacks") {
    auto error = load_damaged("name", nullptr, [&](titan::TrainState& state) {
      state.tensors.emplace_back("layers.9.wq", titan::replicated(torch::zeros({2}, device())));
    });
    INFO(error);
    CHECK(contains(error, "'extra.layers.9.wq' is not in"));
  }
}
