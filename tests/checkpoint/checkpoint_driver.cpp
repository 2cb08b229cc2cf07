// checkpoint_driver: the checkpoint tests that span several jobs (see CMakeLists.txt).
//
//   checkpoint_driver save DIR MESH    save the reproducible tensors sharded on MESH as step 1
//   checkpoint_driver load DIR MESH    load DIR's latest checkpoint sharded on MESH, compare exactly
//   checkpoint_driver fsdp-save DIR    train an FSDP model 3 steps (AdamW), save it, and write its
//                                      gathered parameters and moments to DIR/reference.safetensors
//   checkpoint_driver fsdp-load DIR    load it into a fresh FSDP model on this world, compare exactly
//   checkpoint_driver kill DIR         a save killed (SIGKILL) midway leaves the previous one intact
//
// MESH is "fsdp" (Shard(0) over dp_shard = all ranks) or "fsdp_tp" (dp_shard x tp = world/2 x 2).
// Exits 0 on success, 1 with a message on failure.
#include "../support/checkpoint_fixtures.hpp"

#include <titan/safetensors.hpp>

#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <iostream>

extern char** environ;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::cerr << "FAILED: " << what << std::endl;
  }
}

titan::DeviceMesh make_mesh(const titan::WorldPtr& world, const std::string& kind) {
  if (kind == "fsdp") return titan::DeviceMesh(world, {"dp_shard"}, {world->world_size()});
  TORCH_CHECK(kind == "fsdp_tp", "checkpoint_driver: unknown mesh '", kind, "' (fsdp or fsdp_tp)");
  return titan::DeviceMesh(world, {"dp_shard", "tp"}, {-1, 2});
}

/// The specs' tensors on `mesh`: their global values' blocks, or zeros of the blocks' shapes.
titan::TrainState make_state(const titan::DeviceMesh& mesh, bool zeros) {
  titan::TrainState state;
  int64_t index = 0;
  for (const auto& spec : titan_ckpt::specs()) {
    auto sharded = titan_ckpt::shard_of(titan_ckpt::global_tensor(index++, spec.shape, spec.dtype),
                                        titan_ckpt::layout_for(spec, mesh));
    if (zeros) sharded.local = torch::zeros_like(sharded.local);
    state.tensors.emplace_back(spec.name, sharded);
  }
  return state;
}

/// Compares every loaded block with the same block of the global tensor.
void check_state(const titan::TrainState& loaded, const titan::DeviceMesh& mesh, const std::string& what) {
  auto expected = make_state(mesh, false);
  for (size_t i = 0; i < expected.tensors.size(); ++i) {
    const auto& name = expected.tensors[i].first;
    expect(torch::equal(loaded.tensors[i].second.local, expected.tensors[i].second.local),
           what + ": tensor " + name + " differs from the global tensor's block");
  }
}

int save(const titan::WorldPtr& world, const std::string& dir, const std::string& kind) {
  auto mesh = make_mesh(world, kind);
  if (world->rank() == 0) titan::detail::remove_tree(dir);
  world->group()->barrier();
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir).block_bytes(32));
  auto state = make_state(mesh, false);
  state.extra["mesh"] = kind;
  state.rank_extra["rank"] = std::to_string(world->rank());
  manager.save(1, state);
  return 0;
}

int load(const titan::WorldPtr& world, const std::string& dir, const std::string& kind) {
  auto mesh = make_mesh(world, kind);
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir));
  auto state = make_state(mesh, true);
  auto step = manager.load_latest(state);
  expect(step == std::optional<int64_t>(1), "load_latest found step 1");
  check_state(state, mesh, "load on " + kind + " x " + std::to_string(world->world_size()));
  auto meta = titan::read_checkpoint_metadata(dir + "/step-1");
  expect(state.extra.count("mesh") == 1, "extra state survives");
  // Per-rank state comes back only on the same world size.
  expect(state.rank_extra.empty() == (meta.world_size != world->world_size()), "rank_extra only on the same world size");
  return 0;
}

/// Every parameter of `model` and its AdamW moments, gathered to global tensors (a collective).
titan::safetensors::NamedTensors gathered_state(titan_ckpt::Net& model, torch::optim::AdamW& optimizer) {
  titan::safetensors::NamedTensors result;
  for (const auto& [name, sharded] : titan::sharded_parameters(*model)) {
    result.emplace_back(name, titan::gather_full(sharded));
    auto& state = static_cast<torch::optim::AdamWParamState&>(
        *optimizer.state().at(sharded.local.unsafeGetTensorImpl()));
    result.emplace_back(name + ".exp_avg", titan::gather_full({state.exp_avg(), sharded.layout, sharded.blocks}));
    result.emplace_back(name + ".exp_avg_sq", titan::gather_full({state.exp_avg_sq(), sharded.layout, sharded.blocks}));
    result.emplace_back(name + ".step", torch::scalar_tensor(state.step(), torch::kLong));
  }
  return result;
}

int fsdp_save(const titan::WorldPtr& world, const std::string& dir) {
  titan::DeviceMesh mesh(world, {"dp_shard"}, {world->world_size()});
  if (world->rank() == 0) titan::detail::remove_tree(dir);
  world->group()->barrier();
  titan_ckpt::Net model(mesh, 1);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.05));
  titan_ckpt::train_net(model, optimizer, 1, 3, world->rank());
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir));
  titan::TrainState state;
  state.model = model.get();
  state.optimizer = &optimizer;
  manager.save(3, state);
  auto reference = gathered_state(model, optimizer);
  if (world->rank() == 0) titan::safetensors::save(dir + "/reference.safetensors", reference);
  return 0;
}

int fsdp_load(const titan::WorldPtr& world, const std::string& dir) {
  titan::DeviceMesh mesh(world, {"dp_shard"}, {world->world_size()});
  titan_ckpt::Net model(mesh, 2);
  torch::optim::AdamW optimizer(model->parameters(), torch::optim::AdamWOptions(0.01).weight_decay(0.05));
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir));
  titan::TrainState state;
  state.model = model.get();
  state.optimizer = &optimizer;
  expect(manager.load_latest(state) == std::optional<int64_t>(3), "load_latest found step 3");
  auto loaded = gathered_state(model, optimizer);
  if (world->rank() == 0) {
    titan::safetensors::File reference(dir + "/reference.safetensors");
    for (const auto& [name, tensor] : loaded)
      expect(torch::equal(tensor, reference.read(name)), "FSDP " + name + " equals the saving job's");
  }
  return 0;
}

/// Runs this program as `child DIR STEP FILE`: it saves step STEP and SIGKILLs itself once FILE
/// has been written. Returns the wait status.
int run_child(const std::string& dir, int64_t step, const std::string& kill_after) {
  std::vector<std::string> args{"/proc/self/exe", "child", dir, std::to_string(step), kill_after};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  TORCH_CHECK(posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) == 0, "spawn failed");
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

int child(const titan::WorldPtr& world, const std::string& dir, int64_t step, const std::string& kill_after) {
  titan::DeviceMesh mesh(world, {"dp_shard"}, {1});
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir).keep_latest_k(1).on_file_written([kill_after](const std::string& path) {
    if (std::filesystem::path(path).filename() == kill_after) ::kill(::getpid(), SIGKILL);
  }));
  auto state = make_state(mesh, false);
  for (auto& [name, tensor] : state.tensors) tensor.local.add_(step);  // distinguishable steps
  manager.save(step, state);
  return 0;
}

int kill_test(const titan::WorldPtr& world, const std::string& dir) {
  TORCH_CHECK(world->world_size() == 1, "checkpoint_driver kill runs as one process");
  titan::detail::remove_tree(dir);
  titan::DeviceMesh mesh(world, {"dp_shard"}, {1});
  titan::CheckpointManager manager(world, titan::CheckpointOptions(dir).keep_latest_k(1));
  auto state = make_state(mesh, false);
  for (auto& [name, tensor] : state.tensors) tensor.local.add_(1);
  manager.save(1, state);

  // Killed after its shard file, then after its metadata (but before the rename).
  for (std::string kill_after : {"rank-0.safetensors", "metadata.json"}) {
    int status = run_child(dir, 2, kill_after);
    expect(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
           "the child was killed by SIGKILL after " + kill_after + " (wait status " + std::to_string(status) + ")");
    expect(std::filesystem::exists(dir + "/.tmp-step-2/" + kill_after), "the killed save wrote " + kill_after);
    expect(!std::filesystem::exists(dir + "/step-2"), "no step-2 after a save killed after " + kill_after);
    expect(manager.latest_step() == std::optional<int64_t>(1), "latest is still step 1");
    expect(manager.complete_steps() == std::vector<int64_t>{1}, "step 1 was not rotated away");
    auto loaded = make_state(mesh, true);
    expect(manager.load_latest(loaded) == std::optional<int64_t>(1), "step 1 loads after the kill");
    for (size_t i = 0; i < loaded.tensors.size(); ++i)
      expect(torch::equal(loaded.tensors[i].second.local, state.tensors[i].second.local), "step 1 is intact");
  }
  // The next save of the same step clears the debris and completes; rotation then drops step 1.
  expect(WIFEXITED(run_child(dir, 2, "none")), "an uninterrupted child save succeeds");
  expect(manager.complete_steps() == std::vector<int64_t>{2}, "keep_latest_k(1) keeps only step 2");
  expect(!std::filesystem::exists(dir + "/.tmp-step-2"), "no debris left");
  auto loaded = make_state(mesh, true);
  expect(manager.load_latest(loaded) == std::optional<int64_t>(2), "step 2 loads");
  auto step2 = make_state(mesh, false);
  for (auto& [name, tensor] : step2.tensors) tensor.local.add_(2);  // as the child made them
  for (size_t i = 0; i < loaded.tensors.size(); ++i)
    expect(torch::equal(loaded.tensors[i].second.local, step2.tensors[i].second.local), "step 2's values");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  torch::set_num_threads(1);
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << "usage: checkpoint_driver save|load DIR MESH | fsdp-save|fsdp-load|kill DIR\n";
    return 2;
  }
  auto world = titan::init_distributed(titan::DistOptions().timeout(std::chrono::seconds(120)));
  try {
    if (args[0] == "save" && args.size() == 3) save(world, args[1], args[2]);
    else if (args[0] == "load" && args.size() == 3) load(world, args[1], args[2]);
    else if (args[0] == "kill" && args.size() == 2) kill_test(world, args[1]);
    else if (args[0] == "fsdp-save" && args.size() == 2) fsdp_save(world, args[1]);
    else if (args[0] == "fsdp-load" && args.size() == 2) fsdp_load(world, args[1]);
    else if (args[0] == "child" && args.size() == 4) child(world, args[1], std::stoll(args[2]), args[3]);
    else {
      std::cerr << "checkpoint_driver: bad arguments\n";
      return 2;
    }
  } catch (const std::exception& e) {
    std::cerr << "FAILED with an exception: " << e.what() << std::endl;
    return 1;
  }
  world->shutdown();
  if (failures == 0) std::cout << "checkpoint_driver " << args[0] << ": OK" << std::endl;
  return failures == 0 ? 0 : 1;
}
