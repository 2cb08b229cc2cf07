// titan/dist.hpp: launcher environments, DeviceMesh and the differentiable collectives.
// Runs on 1, 2 and 4 ranks; every collective and its backward runs on titan_test::device() and is
// compared with the same computation done on one process, on the CPU, from every rank's
// (reproducible) inputs.
#include "../support/multirank.hpp"

#include <functional>
#include <map>

using titan_test::device;
using titan_test::same_values;
using titan_test::world;

namespace {

/// A fake environment for read_launch_info.
titan::EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

using titan_test::error_of;

/// Rank r's input, on the CPU: reproducible on every rank.
torch::Tensor input_of(int r, std::vector<int64_t> shape) {
  auto gen = at::detail::createCPUGenerator(100 + static_cast<uint64_t>(r));
  return at::randn(shape, gen, torch::kFloat64);
}

/// The weight rank k multiplies its output with to form its loss.
torch::Tensor weight_of(int k, std::vector<int64_t> shape) {
  auto gen = at::detail::createCPUGenerator(1000 + static_cast<uint64_t>(k));
  return at::randn(shape, gen, torch::kFloat64);
}

/// Runs `real` on this rank's input on device() and backpropagates loss_k = sum(out * w_k); runs
/// `reference` on the CPU for every rank k from all inputs, backpropagates sum_k loss_k, and
/// compares this rank's output and input gradient.
void check_collective(const std::function<std::vector<int64_t>(int)>& shape_of,
                      const std::function<torch::Tensor(const torch::Tensor&)>& real,
                      const std::function<torch::Tensor(const std::vector<torch::Tensor>&, int)>& reference) {
  const int world_size = world()->world_size(), rank = world()->rank();
  auto x = input_of(rank, shape_of(rank)).to(device()).requires_grad_(true);
  auto out = real(x);
  CHECK(out.device() == device());
  auto w = weight_of(rank, out.sizes().vec()).to(device());
  (out * w).sum().backward();

  std::vector<torch::Tensor> all;
  for (int r = 0; r < world_size; ++r) all.push_back(input_of(r, shape_of(r)).requires_grad_(true));
  torch::Tensor total_loss = torch::zeros({}, torch::kFloat64), expected_out;
  for (int k = 0; k < world_size; ++k) {
    auto out_k = reference(all, k);
    if (k == rank) expected_out = out_k.detach();
    total_loss = total_loss + (out_k * weight_of(k, out_k.sizes().vec())).sum();
  }
  total_loss.backward();
  CHECK_CLOSE(out, expected_out, 1e-12);
  REQUIRE(x.grad().defined());
  CHECK(x.grad().device() == device());
  auto expected_grad = all[static_cast<size_t>(rank)].grad();
  if (!expected_grad.defined()) expected_grad = torch::zeros(x.sizes(), torch::kFloat64);
  CHECK_CLOSE(x.grad(), expected_grad, 1e-12);
}

}  // namespace

TEST_CASE("read_launch_info reads torchrun, Slurm, Open MPI and no launcher") {
  auto none = titan::read_launch_info(env_of({}));
  CHECK(none.launcher == "none");
  CHECK(none.world_size == 1);
  CHECK(none.rank == 0);

  auto torchrun = titan::read_launch_info(env_of({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                                                  {"LOCAL_WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"},
                                                  {"MASTER_PORT", "1234"}}));
  CHECK(torchrun.launcher == "torchrun");
  CHECK(torchrun.rank == 3);
  CHECK(torchrun.world_size == 8);
  CHECK(torchrun.local_rank == 1);
  CHECK(torchrun.master_addr == "node0");
  CHECK(torchrun.master_port == 1234);
  CHECK_FALSE(torchrun.agent_store);
  // torchrun's agent hosting the store: every rank, rank 0 too, connects as a client.
  auto agent = titan::read_launch_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"},
                                               {"MASTER_PORT", "1234"}, {"TORCHELASTIC_USE_AGENT_STORE", "True"}}));
  CHECK(agent.agent_store);
  CHECK(agent.restart_count == 0);
  auto restarted = titan::read_launch_info(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "node0"},
                                                   {"MASTER_PORT", "1234"}, {"TORCHELASTIC_RESTART_COUNT", "2"}}));
  CHECK(restarted.restart_count == 2);

  auto slurm = titan::read_launch_info(env_of({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "16"}, {"SLURM_STEP_ID", "0"},
                                               {"SLURM_LOCALID", "1"}, {"SLURM_JOB_NODELIST", "gpu[003-006,9],cpu1"}}));
  CHECK(slurm.launcher == "slurm");
  CHECK(slurm.rank == 5);
  CHECK(slurm.world_size == 16);
  CHECK(slurm.local_rank == 1);
  CHECK(slurm.master_addr == "gpu003");
  CHECK(slurm.local_world_size == 16);  // no per-node variable: every rank on one node
  CHECK(titan::detail::first_slurm_host("node7") == "node7");
  // Ranks per node as a real Slurm gives them (tests/slurm): SLURM_NTASKS_PER_NODE only with
  // --ntasks-per-node, else this node's entry of the (step's) tasks-per-node list.
  auto on_node = [&](const char* node, const char* list) {
    return titan::read_launch_info(env_of({{"SLURM_PROCID", "4"}, {"SLURM_NTASKS", "7"}, {"SLURM_LOCALID", "0"}, {"SLURM_STEP_ID", "0"},
                                           {"SLURM_JOB_NODELIST", "n[1-3]"}, {"SLURM_NODEID", node},
                                           {"SLURM_TASKS_PER_NODE", list}}))
        .local_world_size;
  };
  CHECK(on_node("0", "3(x2),1") == 3);
  CHECK(on_node("1", "3(x2),1") == 3);
  CHECK(on_node("2", "3(x2),1") == 1);
  CHECK(on_node("1", "4,2,1") == 2);
  auto step = titan::read_launch_info(env_of({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "1"}, {"SLURM_STEP_ID", "0"},
                                              {"SLURM_JOB_NODELIST", "n1"}, {"SLURM_NODEID", "0"},
                                              {"SLURM_TASKS_PER_NODE", "8"}, {"SLURM_STEP_TASKS_PER_NODE", "2"}}));
  CHECK(step.local_world_size == 2);  // the step's tasks, not the allocation's
  auto given = titan::read_launch_info(env_of({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "1"}, {"SLURM_STEP_ID", "0"},
                                               {"SLURM_JOB_NODELIST", "n1"}, {"SLURM_NODEID", "0"},
                                               {"SLURM_TASKS_PER_NODE", "2(x2)"}, {"SLURM_NTASKS_PER_NODE", "2"}}));
  CHECK(given.local_world_size == 2);
  CHECK(error_of([&] { on_node("0", "3(x"); }).find("SLURM_TASKS_PER_NODE='3(x'") != std::string::npos);
  CHECK(error_of([&] { on_node("3", "3(x2),1"); }).find("lists 3 node(s), but this is node 3") != std::string::npos);
  CHECK(titan::detail::first_slurm_host("a-b[10,12]") == "a-b10");
  // A step on some of the allocation's nodes, as the cluster of tests/slurm sets it for
  // `salloc -N 2 -n 4` then `srun -N 1 -n 2 -w titan-node2`: rank 0 is on the step's node.
  auto sub_step = titan::read_launch_info(env_of({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "1"},
                                                  {"SLURM_STEP_ID", "0"}, {"SLURM_JOB_NODELIST", "titan-node[1-2]"},
                                                  {"SLURM_NODELIST", "titan-node[1-2]"}, {"SLURM_STEP_NODELIST", "titan-node2"},
                                                  {"SLURM_STEP_NUM_TASKS", "2"}, {"SLURM_NODEID", "0"},
                                                  {"SLURM_STEP_TASKS_PER_NODE", "2"}, {"SLURM_TASKS_PER_NODE", "2"},
                                                  {"SLURM_NTASKS_PER_NODE", "4"}}));
  CHECK(sub_step.master_addr == "titan-node2");
  CHECK(sub_step.world_size == 2);
  CHECK(sub_step.local_world_size == 2);  // the step's 2, not the job's --ntasks-per-node 4
  // mpirun inside a Slurm job: its ranks inherit the job's SLURM_* but are Open MPI's.
  auto mpi_in_slurm = titan::read_launch_info(env_of({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                                                      {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}, {"MASTER_ADDR", "h0"},
                                                      {"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_STEP_ID", "0"},
                                                      {"SLURM_JOB_NODELIST", "h[0-1]"}}));
  CHECK(mpi_in_slurm.launcher == "openmpi");
  CHECK(mpi_in_slurm.rank == 3);
  CHECK(mpi_in_slurm.world_size == 4);
  // The batch script itself (no step), with one task: a single process.
  CHECK(titan::read_launch_info(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"SLURM_LOCALID", "0"}})).world_size == 1);

  auto mpi = titan::read_launch_info(env_of({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                                             {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}, {"MASTER_ADDR", "10.0.0.1"},
                                             {"MASTER_PORT", "29600"}}));
  CHECK(mpi.launcher == "openmpi");
  CHECK(mpi.rank == 2);
  CHECK(mpi.world_size == 4);
  CHECK(mpi.master_port == 29600);
}

TEST_CASE("read_launch_info rejects missing and inconsistent variables, naming them") {
  CHECK(error_of([] { titan::read_launch_info(env_of({{"RANK", "0"}})); }).find("WORLD_SIZE") != std::string::npos);
  CHECK(error_of([] {
          titan::read_launch_info(env_of({{"RANK", "4"}, {"WORLD_SIZE", "4"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}}));
        }).find("not below the world size 4") != std::string::npos);
  CHECK(error_of([] { titan::read_launch_info(env_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}})); })
            .find("RANK='x' is not an integer") != std::string::npos);
  CHECK(error_of([] { titan::read_launch_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "1"}})); })
            .find("MASTER_ADDR") != std::string::npos);
  CHECK(error_of([] {
          titan::read_launch_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}));
        }).find("70000") != std::string::npos);
  CHECK(error_of([] {
          titan::read_launch_info(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}, {"SLURM_STEP_ID", "0"}}));
        }).find("SLURM_JOB_NODELIST") != std::string::npos);
  // The batch script of `sbatch -N 2 -n 4` running the trainer without srun, as the cluster of
  // tests/slurm sets it: an error instead of a rank 0 waiting for three ranks nobody starts.
  auto batch = error_of([] {
    titan::read_launch_info(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "0"}, {"SLURM_NODEID", "0"},
                                    {"SLURM_JOB_NODELIST", "titan-node[1-2]"}, {"SLURM_TASKS_PER_NODE", "2(x2)"}}));
  });
  CHECK(batch.find("SLURM_NTASKS=4 but this process is not a task of a job step") != std::string::npos);
  CHECK(batch.find("srun") != std::string::npos);
  CHECK(error_of([] {
          titan::read_launch_info(env_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}, {"SLURM_STEP_ID", "0"},
                                          {"SLURM_STEP_NODELIST", ",n2"}}));
        }).find("SLURM_STEP_NODELIST=',n2'") != std::string::npos);
  CHECK(error_of([] { titan::init_distributed(titan::DistOptions().backend("mpi"), env_of({})); })
            .find("'mpi'") != std::string::npos);
}

TEST_CASE("device choice: one GPU per rank, sharing only with Gloo and on request, no silent CPU fallback") {
  using titan::detail::cuda_device_for;
  CHECK(cuda_device_for(3, 8, 8, false, "nccl") == 3);
  CHECK(error_of([] { cuda_device_for(3, 8, 4, false, "nccl"); }).find("8 ranks run on this node") != std::string::npos);
  CHECK(error_of([] { cuda_device_for(3, 8, 4, false, "nccl"); }).find("only 4 GPU(s) are visible") != std::string::npos);
  CHECK(error_of([] { cuda_device_for(1, 2, 1, true, "nccl"); }).find("which NCCL cannot do") != std::string::npos);
  CHECK(cuda_device_for(1, 2, 1, true, "gloo") == 0);   // two ranks on one GPU through Gloo
  CHECK(cuda_device_for(5, 8, 4, true, "gloo") == 1);
  CHECK(error_of([] { cuda_device_for(0, 1, 0, false, "nccl"); }).find("no CUDA device is visible") != std::string::npos);
  using titan::detail::check_cuda_support;
  CHECK(error_of([] { check_cuda_support(false, 2, "auto"); })
            .find("2 GPU(s) are visible but titan was compiled without CUDA support") != std::string::npos);
  CHECK_NOTHROW(check_cuda_support(false, 2, "cpu"));
  CHECK_NOTHROW(check_cuda_support(false, 0, "auto"));
  CHECK_NOTHROW(check_cuda_support(true, 2, "auto"));
  // The environment sets what the code left to "auto"; an explicit choice wins.
  if (titan::detail::cuda_device_count() == 0) {
    CHECK(error_of([] { titan::init_distributed({}, env_of({{"TITAN_DEVICE", "cuda"}})); })
              .find("no CUDA device is visible") != std::string::npos);
    auto cpu = titan::init_distributed(titan::DistOptions().device("cpu"), env_of({{"TITAN_DEVICE", "cuda"}}));
    CHECK(cpu->device().is_cpu());
    CHECK(cpu->backend_name() == "gloo");
  }
  CHECK(error_of([] { titan::init_distributed({}, env_of({{"TITAN_BACKEND", "mpi"}})); }).find("'mpi'") !=
        std::string::npos);
}

TEST_CASE("groups with the same members share one communicator, unless asked for their own") {
  const int n = world()->world_size();
  const size_t before = world()->communicator_count();
  // A 1-D FSDP job: world, dp_shard and the flattened dp span the same ranks.
  titan::DeviceMesh mesh(world(), {"dp_replicate", "dp_shard"}, {1, n});
  mesh.flatten({"dp_replicate", "dp_shard"}, "dp");
  CHECK(mesh.group("dp_shard") == world()->group());
  CHECK(mesh.group("dp") == world()->group());
  CHECK(world()->communicator_count() == before);  // dp_replicate has one rank: no communicator either
  auto own = world()->new_group([&] {
    std::vector<int> all(static_cast<size_t>(n));
    for (int r = 0; r < n; ++r) all[static_cast<size_t>(r)] = r;
    return all;
  }(), "own", titan::GroupOptions().shared(false));
  CHECK(own != world()->group());
  CHECK(world()->communicator_count() == before + (n > 1 ? 1 : 0));
  // The dedicated group works on its own.
  CHECK(titan::dist_sum(1.0, own) == static_cast<double>(n));
}

TEST_CASE("chunk_sizes splits like torch.chunk") {
  CHECK(titan::chunk_sizes(10, 4) == std::vector<int64_t>{3, 3, 3, 1});
  CHECK(titan::chunk_sizes(5, 4) == std::vector<int64_t>{2, 2, 1, 0});
  CHECK(titan::chunk_sizes(8, 2) == std::vector<int64_t>{4, 4});
  CHECK(titan::chunk_sizes(1, 3) == std::vector<int64_t>{1, 0, 0});
  CHECK(titan::chunk_sizes(0, 2) == std::vector<int64_t>{0, 0});
  CHECK(titan::chunk_offset({3, 3, 3, 1}, 0) == 0);
  CHECK(titan::chunk_offset({3, 3, 3, 1}, 3) == 9);
  CHECK(titan::chunk_offset({3, 3, 3, 1}, 4) == 10);
}

TEST_CASE("dist_sum, dist_max and ReduceOp::Max reduce scalars and tensors over a group") {
  const auto& group = world()->group();
  const int n = world()->world_size(), rank = world()->rank();
  CHECK(titan::dist_sum(rank + 1.5, group) == doctest::Approx(n * (n + 1) / 2.0 + 0.5 * n));
  CHECK(titan::dist_max(rank == 0 ? 7.25 : -rank, group) == 7.25);
  CHECK(titan::dist_max(-1.0 - rank, group) == -1.0);
  auto values = torch::tensor({static_cast<double>(rank), static_cast<double>(-rank)}).to(device());
  CHECK(same_values(titan::detail::all_reduce_raw(values, *group, titan::ReduceOp::Max),
                    torch::tensor({static_cast<double>(n - 1), 0.0})));
  // Max has no gradient: the differentiable collectives refuse it.
  CHECK(error_of([&] { titan::all_reduce(values, group, titan::ReduceOp::Max); }).find("has no gradient") !=
        std::string::npos);
  CHECK(error_of([&] { titan::dist_sum(1.0, nullptr); }).find("null process group") != std::string::npos);
}

TEST_CASE("all_gather_strings gives every rank's text in rank order, empty ones included") {
  const auto& group = world()->group();
  const int rank = world()->rank();
  auto texts = titan::all_gather_strings(group, rank % 2 == 0 ? std::string(static_cast<size_t>(rank) * 3, 'x') : "odd");
  REQUIRE(static_cast<int>(texts.size()) == world()->world_size());
  for (int r = 0; r < world()->world_size(); ++r)
    CHECK(texts[static_cast<size_t>(r)] == (r % 2 == 0 ? std::string(static_cast<size_t>(r) * 3, 'x') : "odd"));
}

TEST_CASE("the world group spans every rank, on the device and backend the test main exported") {
  const auto& group = world()->group();
  CHECK(group->size() == world()->world_size());
  CHECK(group->rank() == world()->rank());
  CHECK(group->device() == device());
  // TITAN_DEVICE is "cpu" or "cuda" (the device is then "cuda:<index>").
  CHECK(device().str().rfind(std::getenv("TITAN_DEVICE"), 0) == 0);
  CHECK(world()->backend_name() == std::getenv("TITAN_BACKEND"));
  group->barrier();
}

TEST_CASE("DeviceMesh lays ranks out row-major with one group per dimension") {
  const int world_size = world()->world_size(), rank = world()->rank();
  titan::DeviceMesh flat(world(), {"dp"}, {world_size});
  CHECK(flat.size() == world_size);
  CHECK(flat.coordinate("dp") == rank);

  titan::DeviceMesh inferred(world(), {"dp_shard", "tp"}, {-1, 1});
  CHECK(inferred.size("dp_shard") == world_size);
  CHECK(inferred.size("tp") == 1);
  CHECK(inferred.group("tp")->backend().get() == nullptr);

  if (world_size == 4) {
    titan::DeviceMesh mesh(world(), {"dp_replicate", "dp_shard"}, {2, 2});
    CHECK(mesh.coordinate("dp_replicate") == rank / 2);
    CHECK(mesh.coordinate("dp_shard") == rank % 2);
    CHECK(mesh.group("dp_shard")->global_ranks() == std::vector<int>{rank / 2 * 2, rank / 2 * 2 + 1});
    CHECK(mesh.group("dp_replicate")->global_ranks() == std::vector<int>{rank % 2, rank % 2 + 2});
    auto tp = mesh["dp_shard"];
    CHECK(tp.ndim() == 1);
    CHECK(tp.size() == 2);
    auto dp = mesh.flatten({"dp_replicate", "dp_shard"}, "dp");
    CHECK(dp.size() == 4);
    CHECK(mesh.group("dp")->rank() == rank);
    // A collective on each sub-group sums exactly its members.
    auto shard_sum = titan::all_reduce(torch::full({1}, double(rank), device()), mesh.group("dp_shard"));
    CHECK(shard_sum.item<double>() == double(rank / 2 * 2 + rank / 2 * 2 + 1));
    auto replicate_sum = titan::all_reduce(torch::full({1}, double(rank), device()), mesh.group("dp_replicate"));
    CHECK(replicate_sum.item<double>() == double(rank % 2 + rank % 2 + 2));
  }
}

TEST_CASE("DeviceMesh rejects sizes that do not match the world, naming them") {
  const int world_size = world()->world_size();
  auto message = error_of([&] { titan::DeviceMesh(world(), {"dp", "tp"}, {world_size, 3}); });
  CHECK(message.find("(dp=" + std::to_string(world_size) + ", tp=3)") != std::string::npos);
  CHECK(message.find("the world has " + std::to_string(world_size)) != std::string::npos);
  CHECK(error_of([&] { titan::DeviceMesh(world(), {"dp", "dp"}, {world_size, 1}); }).find("repeated") != std::string::npos);
  CHECK(error_of([&] { titan::DeviceMesh(world(), {"dp", "tp"}, {-1, 0}); }).find("'tp' has size 0") != std::string::npos);
  if (world_size == 2 || world_size == 4) {
    CHECK(error_of([&] { titan::DeviceMesh(world(), {"dp", "tp"}, {-1, 3}); }).find("not divisible by 3") != std::string::npos);
  }
  titan::DeviceMesh mesh(world(), {"dp"}, {world_size});
  CHECK(error_of([&] { mesh.group("tp"); }).find("no dimension 'tp'") != std::string::npos);
}

TEST_CASE("all_gather and its backward, even and uneven, along dim 0 and 1") {
  auto group = world()->group();
  const int world_size = world()->world_size();
  auto gather_ref = [](int64_t dim) {
    return [dim](const std::vector<torch::Tensor>& all, int) { return torch::cat(all, dim); };
  };
  check_collective([](int) { return std::vector<int64_t>{3, 5}; },
                   [&](const torch::Tensor& x) { return titan::all_gather(x, group, 0); }, gather_ref(0));
  check_collective([](int) { return std::vector<int64_t>{3, 5}; },
                   [&](const torch::Tensor& x) { return titan::all_gather(x, group, 1); }, gather_ref(1));
  // Uneven: rank r has r + 1 rows, the last rank none when there are several ranks.
  auto uneven = [world_size](int r) {
    return std::vector<int64_t>{r == world_size - 1 && world_size > 1 ? 0 : r + 1, 4};
  };
  check_collective(uneven, [&](const torch::Tensor& x) { return titan::all_gather(x, group, 0); }, gather_ref(0));
  std::vector<int64_t> sizes;
  for (int r = 0; r < world_size; ++r) sizes.push_back(uneven(r)[0]);
  check_collective(uneven, [&](const torch::Tensor& x) { return titan::all_gather(x, group, 0, sizes); },
                   gather_ref(0));
  check_collective([&](int r) { return std::vector<int64_t>{2, uneven(r)[0]}; },
                   [&](const torch::Tensor& x) { return titan::all_gather(x, group, -1); }, gather_ref(1));
  // Empty on every rank.
  check_collective([](int) { return std::vector<int64_t>{0, 4}; },
                   [&](const torch::Tensor& x) { return titan::all_gather(x, group, 0); }, gather_ref(0));
}

TEST_CASE("reduce_scatter (sum and avg) and its backward, even and uneven") {
  auto group = world()->group();
  const int world_size = world()->world_size();
  for (auto op : {titan::ReduceOp::Sum, titan::ReduceOp::Avg}) {
    for (int64_t rows : {int64_t(4 * world_size), int64_t(4 * world_size + 3), int64_t(1)}) {
      auto sizes = titan::chunk_sizes(rows, world_size);
      auto reference = [&](const std::vector<torch::Tensor>& all, int k) {
        auto total = all[0];
        for (size_t j = 1; j < all.size(); ++j) total = total + all[j];
        if (op == titan::ReduceOp::Avg) total = total / world_size;
        int64_t offset = 0;
        for (int r = 0; r < k; ++r) offset += sizes[static_cast<size_t>(r)];
        return total.narrow(1, offset, sizes[static_cast<size_t>(k)]);
      };
      check_collective([&](int) { return std::vector<int64_t>{2, rows}; },
                       [&](const torch::Tensor& x) { return titan::reduce_scatter(x, group, 1, op); }, reference);
    }
  }
}

TEST_CASE("all_reduce (sum and avg) and broadcast, with their backward") {
  auto group = world()->group();
  const int world_size = world()->world_size();
  for (auto op : {titan::ReduceOp::Sum, titan::ReduceOp::Avg}) {
    check_collective([](int) { return std::vector<int64_t>{3, 2}; },
                     [&](const torch::Tensor& x) { return titan::all_reduce(x, group, op); },
                     [&](const std::vector<torch::Tensor>& all, int) {
                       auto total = all[0];
                       for (size_t j = 1; j < all.size(); ++j) total = total + all[j];
                       return op == titan::ReduceOp::Avg ? total / world_size : total;
                     });
  }
  const int src = world_size - 1;
  check_collective([](int) { return std::vector<int64_t>{5}; },
                   [&](const torch::Tensor& x) { return titan::broadcast(x, group, src); },
                   [&](const std::vector<torch::Tensor>& all, int) { return all[static_cast<size_t>(src)] * 1.0; });
}

TEST_CASE("all_to_all and its backward, uneven, with empty pieces, sizes exchanged or given") {
  auto group = world()->group();
  const int world_size = world()->world_size();
  // Shard(from) -> Shard(to): every rank's piece concatenated along `from`, rank k's chunk of `to`.
  auto reference = [world_size](int64_t from, int64_t to) {
    return [=](const std::vector<torch::Tensor>& all, int k) {
      auto sizes = titan::chunk_sizes(all[0].size(to), world_size);
      return torch::cat(all, from).narrow(to, titan::chunk_offset(sizes, k), sizes[static_cast<size_t>(k)]);
    };
  };
  // 5 rows over the ranks (at 4 ranks 2, 2, 1, 0: the last rank sends nothing), 7 columns to split
  // (2, 2, 2, 1).
  std::vector<int64_t> rows = titan::chunk_sizes(5, world_size);
  auto shape = [&](int r) { return std::vector<int64_t>{rows[static_cast<size_t>(r)], 7, 2}; };
  check_collective(shape, [&](const torch::Tensor& x) { return titan::all_to_all(x, group, 0, 1); }, reference(0, 1));
  check_collective(shape, [&](const torch::Tensor& x) { return titan::all_to_all(x, group, 0, 1, rows); },
                   reference(0, 1));
  // The other way round: 3 rows to split (at 4 ranks 1, 1, 1, 0: the last rank receives nothing).
  check_collective([](int r) { return std::vector<int64_t>{3, r + 1}; },
                   [&](const torch::Tensor& x) { return titan::all_to_all(x, group, -1, 0); }, reference(1, 0));
}

TEST_CASE("send_async / recv_async: a ring of transfers in any tag order, dtypes kept, on the device") {
  auto group = world()->group();
  const int n = world()->world_size(), rank = world()->rank();
  if (n == 1) {  // no peer: refused, naming the group size
    CHECK(error_of([&] { titan::send_async(*group, torch::ones({1}), 0, 0); }).find("more than one rank") !=
          std::string::npos);
    return;
  }
  const int next = (rank + 1) % n, prev = (rank + n - 1) % n;
  // Each rank sends a non-contiguous float64 block and a bfloat16 vector to the next rank; the
  // receives are posted in the opposite tag order to the sends.
  auto block = input_of(rank, {3, 4}).to(device()).t();        // [4, 3], non-contiguous
  auto vector = input_of(rank, {5}).to(device()).to(torch::kBFloat16);  // [5]
  auto second = titan::recv_async(*group, {5}, vector.options(), prev, 7);
  auto first = titan::recv_async(*group, {4, 3}, block.options(), prev, 3);
  auto sent_block = titan::send_async(*group, block, next, 3);
  auto sent_vector = titan::send_async(*group, vector, next, 7);
  auto got_block = first.wait(), got_vector = second.wait();
  sent_block.wait();
  sent_vector.wait();
  CHECK(got_block.device() == device());
  CHECK(got_vector.device() == device());
  CHECK((got_vector.scalar_type() == torch::kBFloat16));
  CHECK(same_values(got_block.cpu(), input_of(prev, {3, 4}).t()));
  CHECK(same_values(got_vector.cpu(), input_of(prev, {5}).to(torch::kBFloat16)));
  CHECK(error_of([&] { titan::send_async(*group, block, rank, 0); }).find("is not another rank") != std::string::npos);
  CHECK(error_of([&] { titan::recv_async(*group, {1}, block.options(), n, 0); }).find("peer " + std::to_string(n)) !=
        std::string::npos);
}

TEST_CASE("collectives keep float32 and reject bad arguments") {
  auto group = world()->group();
  auto x = torch::ones({2, 2}, device());
  auto gathered = titan::all_gather(x, group);
  CHECK((gathered.scalar_type() == torch::kFloat));
  CHECK(gathered.device() == device());
  CHECK(same_values(gathered, torch::ones({2 * world()->world_size(), 2})));
  CHECK(error_of([&] { titan::all_gather(x, group, 2); }).find("dim 2 is out of range") != std::string::npos);
  CHECK(error_of([&] { titan::all_gather(x, nullptr); }).find("null process group") != std::string::npos);
  if (world()->world_size() > 1) {
    std::vector<int64_t> wrong(static_cast<size_t>(world()->world_size()), 1);
    CHECK(error_of([&] { titan::all_gather(x, group, 0, wrong); }).find("sizes says 1") != std::string::npos);
  }
}

TEST_CASE("TensorLayout composes shard levels into this rank's rectangle") {
  const int world_size = world()->world_size(), rank = world()->rank();
  titan::TensorLayout replicated{{7, 5}, {}};
  CHECK(replicated.local_box().sizes == std::vector<int64_t>{7, 5});
  CHECK(replicated.placement() == "Replicate");
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world_size});
  auto layout = replicated.with_level({0, "dp_shard", mesh.group("dp_shard"), {}});
  auto sizes = titan::chunk_sizes(7, world_size);
  int64_t offset = 0;
  for (int r = 0; r < rank; ++r) offset += sizes[static_cast<size_t>(r)];
  CHECK(layout.local_box().offsets == std::vector<int64_t>{offset, 0});
  CHECK(layout.local_box().sizes == std::vector<int64_t>{sizes[static_cast<size_t>(rank)], 5});
  CHECK(layout.placement() == "Shard(0)@dp_shard");
  if (world_size == 4) {
    // 2-D: Shard(0) over "tp" (2 ranks), then Shard(0) over "dp_shard" (2 ranks) of a 10-row tensor:
    // tp chunks [0,5) and [5,10); dp chunks of 5 rows are 3 + 2.
    titan::DeviceMesh mesh2(world(), {"dp_shard", "tp"}, {2, 2});
    titan::TensorLayout two_d{{10, 4}, {{0, "tp", mesh2.group("tp"), {}}, {0, "dp_shard", mesh2.group("dp_shard"), {}}}};
    int tp = mesh2.coordinate("tp"), dp = mesh2.coordinate("dp_shard");
    CHECK(two_d.local_box().offsets[0] == tp * 5 + dp * 3);
    CHECK(two_d.local_box().sizes[0] == (dp == 0 ? 3 : 2));
    CHECK(two_d.placement() == "Shard(0)@tp,Shard(0)@dp_shard");
  }
}

TEST_CASE("TensorLayout with a fused level gives a rectangle per part, and composes with an outer level") {
  const int world_size = world()->world_size(), rank = world()->rank();
  titan::DeviceMesh mesh(world(), {"tp"}, {world_size});
  // A [q | k | v] weight of 8 + 4 + 4 rows, each part split over every rank.
  titan::TensorLayout fused{{16, 3}, {{0, "tp", mesh.group("tp"), {8, 4, 4}}}};
  CHECK(fused.placement() == "Shard(0)[3 parts]@tp");
  auto blocks = fused.local_blocks();
  std::vector<int64_t> expected_rows;
  int64_t part_start = 0, local = 0;
  for (int64_t part : {8, 4, 4}) {
    auto sizes = titan::chunk_sizes(part, world_size);
    expected_rows.push_back(part_start + titan::chunk_offset(sizes, rank));
    part_start += part;
    local += sizes[static_cast<size_t>(rank)];
  }
  CHECK(fused.local_shape() == std::vector<int64_t>{local, 3});
  if (world_size == 1) {
    REQUIRE(blocks.size() == 1);  // adjacent parts merge into one rectangle
    CHECK(fused.local_box().sizes == std::vector<int64_t>{16, 3});
  } else {
    REQUIRE(blocks.size() == 3);
    for (size_t i = 0; i < 3; ++i) CHECK(blocks[i].box.offsets[0] == expected_rows[i]);
    CHECK(blocks[1].local_offsets[0] == blocks[0].box.sizes[0]);
    CHECK(error_of([&] { fused.local_box(); }).find("use local_blocks()") != std::string::npos);
  }
  // A level whose parts do not add up is named.
  titan::TensorLayout wrong{{16, 3}, {{0, "tp", mesh.group("tp"), {8, 4}}}};
  CHECK(error_of([&] { wrong.local_blocks(); }).find("summing to 12 but dimension 0 has 16") != std::string::npos);
  // The fused tensor gathers back (gather_full) and blocks round-trip (load_full_state_dict's copy).
  torch::manual_seed(5);
  auto global = torch::randn({16, 3});
  auto mine = torch::empty(fused.local_shape(), device());
  for (const auto& block : blocks) block.view_of(mine).copy_(block.view_of_global(global));
  CHECK(same_values(titan::gather_full(titan::make_sharded("q|k|v", mine, fused)), global));
  if (world_size == 4) {
    // FSDP's level on top of the fused TP level: Shard(0)[3 parts] over "tp" (2), Shard(0) over "dp_shard" (2).
    titan::DeviceMesh mesh2(world(), {"dp_shard", "tp"}, {2, 2});
    auto two_d = titan::TensorLayout{{16, 3}, {{0, "tp", mesh2.group("tp"), {8, 4, 4}}}}.with_level(
        {0, "dp_shard", mesh2.group("dp_shard"), {}});
    auto shape = two_d.local_shape();
    CHECK(shape == std::vector<int64_t>{4, 3});  // tp local 4 + 2 + 2 = 8 rows, half of them
    auto piece = torch::empty(shape, device());
    for (const auto& block : two_d.local_blocks()) block.view_of(piece).copy_(block.view_of_global(global));
    CHECK(same_values(titan::gather_full(titan::make_sharded("q|k|v", piece, two_d)), global));
  }
}
