// Tests of examples/trainer/trainer.cpp: the training loop, its build steps and seams, the rng
// component, host syncs, profiling. Models, losses and optimizer steps run on titan_test::device().
#include "trainer_fixtures.hpp"

#include <trainer/trainer.hpp>

#include "op_events.hpp"

#include <nlohmann/json.hpp>

#include <map>
#include <set>


namespace {

/// The trainer's own .item() calls (aten::item or aten::_local_scalar_dense not inside another
/// operator: a CPU kernel reading its scalar arguments does not count) per training step, each
/// charged to the step whose train_step ran last (the events' tag).
std::map<int64_t, int> items_per_step(const titan_test::OpEvents& observer) {
  std::map<int64_t, int> counts;
  for (const auto& e : observer.events())
    if (e.depth == 0 && (e.name == "aten::item" || e.name == "aten::_local_scalar_dense")) ++counts[e.tag];
  return counts;
}

struct ProbeTrainer : Trainer {
  using Trainer::Trainer;
  titan_test::OpEvents* events = nullptr;  // tagged with the step
  bool train_step(int64_t step) override {
    if (events != nullptr) events->tag(step);
    return Trainer::train_step(step);
  }
};

}  // namespace

TEST_CASE("trainer: the rng component restores the CPU and the device generator") {
  // On a GPU run, a fresh generator of the GPU; on the CPU a second CPU generator stands in for it.
  auto device_generator = [](uint64_t seed) {
    if (titan_test::device().is_cpu()) return at::detail::createCPUGenerator(seed);
    auto generator = at::globalContext()
                         .getAcceleratorHooksInterface(titan_test::device().type())
                         .getNewGenerator(titan_test::device().index());
    generator.set_current_seed(seed);
    return generator;
  };
  auto cpu = at::detail::createCPUGenerator(1), device = device_generator(2);
  CHECK(device.device() == titan_test::device());
  GeneratorState rng(cpu, device);
  const auto saved = rng.state();
  REQUIRE(saved.tensors.size() == 2);
  auto draw = [](at::Generator& g) { return torch::rand({4}, g, torch::TensorOptions().device(g.device())); };
  const auto cpu_next = draw(cpu), device_next = draw(device);
  rng.load_state(saved);
  CHECK(torch::equal(draw(cpu), cpu_next));
  CHECK(torch::equal(draw(device), device_next));
  // A checkpoint saved on CPU (no device state) leaves the device generator alone.
  GeneratorState cpu_only(at::detail::createCPUGenerator(3));
  const auto before = draw(device);
  rng.load_state(cpu_only.state());
  CHECK_FALSE(torch::equal(draw(device), before));  // not rewound
  titan::ComponentState empty;
  CHECK_ERROR_HAS(rng.load_state(empty), "no 'state' tensor");
}


TEST_CASE("trainer: the host reads the device only at sync steps (logging, checkpoint, last)") {
  auto dir = scratch("trainer_sync");
  auto config = tiny_run(dir, {"--training.steps", "7", "--metrics.log_freq", "3", "--checkpoint.interval", "5",
                               "--checkpoint.keep_latest_k", "1"});
  titan_test::OpEvents observer;
  ProbeTrainer trainer(std::move(config));
  trainer.events = &observer;
  trainer.build();
  CHECK(trainer.world()->device() == device());  // the test main exported TITAN_DEVICE
  trainer.train();
  const auto counts = items_per_step(observer);
  // Sync steps: 1, 3, 6 (log_freq 3), 5 (checkpoint) and 7 (last); between them, none.
  for (int64_t step = 1; step <= 7; ++step) {
    CAPTURE(step);
    const bool sync = step == 1 || step % 3 == 0 || step == 5 || step == 7;
    const int items = counts.count(step) ? counts.at(step) : 0;
    if (sync) {
      CHECK(items > 0);
    } else {
      CHECK(items == 0);
    }
  }
  std::ifstream jsonl(dir / "run" / "metrics.jsonl");
  std::vector<int64_t> logged;
  for (std::string text; std::getline(jsonl, text);) {
    auto record = nlohmann::json::parse(text);
    CHECK(std::isfinite(record["loss"].get<double>()));
    logged.push_back(record["step"].get<int64_t>());
  }
  CHECK(logged == std::vector<int64_t>{1, 3, 6});
}

TEST_CASE("trainer: model.n_layers builds that many blocks of the flavor's shape") {
  auto dir = scratch("trainer_n_layers");
  Trainer trainer(tiny_run(dir, {"--training.steps", "1", "--checkpoint.enable", "false", "--model.n_layers", "1"}));
  trainer.build();
  const auto children = trainer.model().named_children();
  REQUIRE(children.contains("layers"));
  CHECK(children["layers"]->children().size() == 1);  // the debug flavor has 4
  CHECK(trainer.model().named_parameters().contains("layers.0.attention.wq.weight"));
  CHECK(!trainer.model().named_parameters().contains("layers.1.attention.wq.weight"));
}

TEST_CASE("trainer: model.name llama3.1 trains, with Llama 3.1's RoPE scaling") {
  auto rope_cos = [](const std::string& name) {
    Trainer trainer(tiny_run(scratch("trainer_model_" + name),
                             {"--training.steps", "1", "--checkpoint.enable", "false", "--model.name", name}));
    trainer.train();
    return trainer.model().named_buffers()["rope_cos"].clone();  // [seq, head_dim / 2]
  };
  const auto plain = rope_cos("llama3"), scaled = rope_cos("llama3.1");
  CHECK(titan_test::same_values(plain[0], scaled[0]));           // position 0: no rotation either way
  CHECK_FALSE(titan_test::same_values(plain[5], scaled[5]));     // the low frequencies are divided by 8
  CHECK(titan_test::same_values(plain.select(1, 0), scaled.select(1, 0)));  // the highest one is kept
}

TEST_CASE("trainer: profiling writes a Chrome trace of every profile_freq-th step") {
  auto dir = scratch("trainer_profiling");
  Trainer trainer(tiny_run(dir, {"--training.steps", "5", "--metrics.log_freq", "5", "--checkpoint.enable", "false",
                                 "--profiling.enable_profiling", "true", "--profiling.profile_freq", "2",
                                 "--profiling.save_traces_folder", "traces"}));
  trainer.train();
  const auto rank = std::to_string(trainer.world()->rank());
  for (int64_t step = 1; step <= 5; ++step) {
    CAPTURE(step);
    const auto trace = dir / "run" / "traces" / ("iteration_" + std::to_string(step)) / ("rank" + rank + "_trace.json");
    REQUIRE(fs::exists(trace) == (step % 2 == 0));
    if (step % 2 != 0) continue;
    std::ifstream file(trace);
    const auto json = nlohmann::json::parse(file);
    // The step's operators with their shapes: the model's matrix products among them.
    std::set<std::string> names;
    bool shapes = false;
    for (const auto& event : json.at("traceEvents")) {
      if (!event.contains("name")) continue;
      names.insert(event["name"].get<std::string>());
      shapes = shapes || (event.contains("args") && event["args"].contains("Input Dims"));
    }
    CHECK(names.count("aten::mm") == 1);
    CHECK(names.count("titan::swiglu_forward") == 1);
    CHECK(names.count("titan::rope_forward") == 1);
    CHECK(shapes);
  }
}
