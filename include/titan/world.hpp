#pragma once
// titan/world.hpp: joining the job (launcher environments, rendezvous) and process groups.
// Included by titan/dist.hpp, which adds DeviceMesh and the differentiable collectives.

#include <titan/detail/backends.hpp>
#include <titan/log.hpp>

#include <torch/arg.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <map>
#include <numeric>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace titan {

/// Where this process sits in the job, as read from the launcher's environment.
struct LaunchInfo {
  int rank = 0;              ///< global rank
  int world_size = 1;        ///< number of processes in the job
  int local_rank = 0;        ///< rank on this node (selects the GPU)
  int local_world_size = 1;  ///< processes on this node
  std::string master_addr = "127.0.0.1";  ///< host of the rendezvous store (rank 0)
  int master_port = 29500;   ///< port of the rendezvous store
  std::string launcher = "none";  ///< "torchrun", "slurm", "openmpi" or "none"
  /// torchrun's agent already serves the rendezvous store at master_addr:master_port
  /// (TORCHELASTIC_USE_AGENT_STORE=True): every rank, rank 0 included, connects as a client.
  bool agent_store = false;
  /// Which attempt this is when torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT): the
  /// group keys of each attempt live under their own store prefix, so a restarted worker never
  /// reads the dead attempt's addresses.
  int restart_count = 0;
};

/// Reads an environment variable; replaceable so the launcher parsing can be tested.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

/// The process environment as an EnvLookup.
inline EnvLookup process_env() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

namespace detail {

inline int parse_env_int(const EnvLookup& env, const std::string& name, int min_value) {
  auto text = env(name);
  TORCH_CHECK(text.has_value(), "titan: environment variable ", name, " is not set");
  size_t used = 0;
  long value = 0;
  try {
    value = std::stol(*text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  TORCH_CHECK(used == text->size() && !text->empty(), "titan: environment variable ", name, "='", *text,
              "' is not an integer");
  TORCH_CHECK(value >= min_value, "titan: environment variable ", name, "=", value, " must be >= ",
              min_value);
  return static_cast<int>(value);
}

/// The first host of a Slurm node list: "gpu[003-005,9],cpu1" -> "gpu003". `name` is the
/// variable it came from, for errors.
inline std::string first_slurm_host(const std::string& nodelist, const std::string& name = "SLURM_JOB_NODELIST") {
  std::string host;
  size_t i = 0;
  while (i < nodelist.size() && nodelist[i] != ',' && nodelist[i] != '[') host += nodelist[i++];
  if (i < nodelist.size() && nodelist[i] == '[') {
    ++i;
    while (i < nodelist.size() && nodelist[i] != '-' && nodelist[i] != ',' && nodelist[i] != ']')
      host += nodelist[i++];
  }
  TORCH_CHECK(!host.empty(), "titan: cannot read a host name from ", name, "='", nodelist, "'");
  return host;
}

/// The tasks on node `node` (0-based) of a Slurm tasks-per-node list: "2(x3),1" is 2, 2, 2, 1;
/// `name` is the variable it came from, for errors.
inline int slurm_tasks_on_node(const std::string& list, int node, const std::string& name) {
  auto bad = [&] { TORCH_CHECK(false, "titan: cannot read ", name, "='", list, "' (expected e.g. 8(x2),4)"); };
  int first = 0;  // the first node of the current item
  size_t i = 0;
  while (i < list.size()) {
    size_t used = 0;
    int tasks = 0, repeat = 1;
    try {
      tasks = std::stoi(list.substr(i), &used);
    } catch (const std::exception&) {
      bad();
    }
    i += used;
    if (list.compare(i, 2, "(x") == 0) {
      i += 2;
      try {
        repeat = std::stoi(list.substr(i), &used);
      } catch (const std::exception&) {
        bad();
      }
      i += used;
      if (i >= list.size() || list[i] != ')') bad();
      ++i;
    }
    if (tasks < 1 || repeat < 1) bad();
    if (node < first + repeat) return tasks;
    first += repeat;
    if (i < list.size() && list[i++] != ',') bad();
  }
  TORCH_CHECK(false, "titan: ", name, "='", list, "' lists ", first, " node(s), but this is node ", node,
              " (SLURM_NODEID)");
}

}  // namespace detail

/// Reads rank, world size and rendezvous address from torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
/// MASTER_ADDR, MASTER_PORT), Open MPI (OMPI_COMM_WORLD_*), Slurm (SLURM_PROCID, SLURM_LOCALID,
/// the job step's SLURM_STEP_NUM_TASKS, first host of SLURM_STEP_NODELIST and this node's entry of
/// SLURM_STEP_TASKS_PER_NODE, falling back to the job's SLURM_NTASKS, SLURM_JOB_NODELIST and
/// SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE), or none of them (a single process).
/// MASTER_ADDR / MASTER_PORT override the Slurm and Open MPI defaults. Errors name the variable.
inline LaunchInfo read_launch_info(const EnvLookup& env = process_env()) {
  using detail::parse_env_int;
  LaunchInfo info;
  if (env("RANK") || env("WORLD_SIZE")) {
    info.launcher = "torchrun";
    info.rank = parse_env_int(env, "RANK", 0);
    info.world_size = parse_env_int(env, "WORLD_SIZE", 1);
    info.local_rank = env("LOCAL_RANK") ? parse_env_int(env, "LOCAL_RANK", 0) : info.rank;
    info.local_world_size =
        env("LOCAL_WORLD_SIZE") ? parse_env_int(env, "LOCAL_WORLD_SIZE", 1) : info.world_size;
    if (info.world_size > 1) {
      TORCH_CHECK(env("MASTER_ADDR"), "titan: RANK and WORLD_SIZE are set but MASTER_ADDR is not");
      TORCH_CHECK(env("MASTER_PORT"), "titan: RANK and WORLD_SIZE are set but MASTER_PORT is not");
    }
    // As torch.distributed's _create_c10d_store: the elastic agent hosts the store.
    info.agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    if (env("TORCHELASTIC_RESTART_COUNT")) info.restart_count = parse_env_int(env, "TORCHELASTIC_RESTART_COUNT", 0);
  } else if (env("OMPI_COMM_WORLD_RANK")) {
    // Before Slurm: mpirun inside a Slurm job starts its ranks with the job's SLURM_* inherited.
    info.launcher = "openmpi";
    info.rank = parse_env_int(env, "OMPI_COMM_WORLD_RANK", 0);
    info.world_size = parse_env_int(env, "OMPI_COMM_WORLD_SIZE", 1);
    info.local_rank = parse_env_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0);
    info.local_world_size = env("OMPI_COMM_WORLD_LOCAL_SIZE")
                                ? parse_env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
                                : info.world_size;
    TORCH_CHECK(env("MASTER_ADDR") || info.world_size == 1,
                "titan: under mpirun, export MASTER_ADDR (rank 0's host), e.g. mpirun -x MASTER_ADDR=host0");
  } else if (env("SLURM_PROCID")) {
    info.launcher = "slurm";
    // A job step's own variables first: srun inside an allocation may run on some of its nodes
    // and tasks (salloc -N 2, then srun -N 1 -w node2): rank 0 is on the step's first node.
    const char* ntasks = env("SLURM_STEP_NUM_TASKS") ? "SLURM_STEP_NUM_TASKS" : "SLURM_NTASKS";
    info.rank = parse_env_int(env, "SLURM_PROCID", 0);
    info.world_size = parse_env_int(env, ntasks, 1);
    info.local_rank = parse_env_int(env, "SLURM_LOCALID", 0);
    // srun gives each task SLURM_STEP_ID; the batch script itself has none but sees the job's
    // SLURM_NTASKS, and would wait for ranks nobody starts.
    TORCH_CHECK(info.world_size == 1 || env("SLURM_STEP_ID") || env("SLURM_STEPID"), "titan: ", ntasks, "=",
                info.world_size, " but this process is not a task of a job step (no SLURM_STEP_ID): it is the ",
                "batch script itself, and nothing starts the other ", info.world_size - 1, " rank(s). Launch the ",
                "ranks with srun inside the script (srun titan_train ...), as examples/slurm/multinode.sbatch does");
    // Ranks on this node: the step's list (a step may run fewer tasks per node than the job's
    // --ntasks-per-node), else SLURM_NTASKS_PER_NODE (set only with --ntasks-per-node), else the
    // job's list ("8(x2)").
    auto tasks_on_this_node = [&](const char* list) {
      return detail::slurm_tasks_on_node(*env(list), parse_env_int(env, "SLURM_NODEID", 0), list);
    };
    if (env("SLURM_STEP_TASKS_PER_NODE") && env("SLURM_NODEID"))
      info.local_world_size = tasks_on_this_node("SLURM_STEP_TASKS_PER_NODE");
    else if (env("SLURM_NTASKS_PER_NODE"))
      info.local_world_size = parse_env_int(env, "SLURM_NTASKS_PER_NODE", 1);
    else if (env("SLURM_TASKS_PER_NODE") && env("SLURM_NODEID"))
      info.local_world_size = tasks_on_this_node("SLURM_TASKS_PER_NODE");
    else
      info.local_world_size = info.world_size;
    if (!env("MASTER_ADDR")) {
      const char* nodes = nullptr;
      for (const char* name : {"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"})
        if (!nodes && env(name)) nodes = name;
      TORCH_CHECK(nodes || info.world_size == 1, "titan: under Slurm, set MASTER_ADDR or SLURM_STEP_NODELIST / ",
                  "SLURM_JOB_NODELIST to find rank 0's host");
      if (nodes) info.master_addr = detail::first_slurm_host(*env(nodes), nodes);
    }
  }
  if (auto addr = env("MASTER_ADDR")) info.master_addr = *addr;
  if (auto port = env("MASTER_PORT")) info.master_port = detail::parse_env_int(env, "MASTER_PORT", 1);
  TORCH_CHECK(info.master_port <= 65535, "titan: MASTER_PORT=", info.master_port, " is not a port number");
  TORCH_CHECK(info.rank < info.world_size, "titan: rank ", info.rank, " (from ", info.launcher,
              ") is not below the world size ", info.world_size);
  TORCH_CHECK(info.local_rank < info.local_world_size || info.launcher == "slurm",
              "titan: local rank ", info.local_rank, " is not below the local world size ",
              info.local_world_size);
  return info;
}

/// A communicator over some ranks of the job: a c10d backend plus this rank's place in it.
/// Groups of one rank carry no backend: their collectives are identities.
class ProcessGroup {
 public:
  ProcessGroup(c10::intrusive_ptr<c10d::Backend> backend, std::vector<int> global_ranks, int rank,
               c10::Device device)
      : backend_(std::move(backend)), global_ranks_(std::move(global_ranks)), rank_(rank), device_(device) {}

  int rank() const { return rank_; }                                ///< rank inside this group
  int size() const { return static_cast<int>(global_ranks_.size()); }  ///< ranks in this group
  const std::vector<int>& global_ranks() const { return global_ranks_; }  ///< members, by global rank
  c10::Device device() const { return device_; }                   ///< where this rank's tensors live
  /// The c10d backend (nullptr for a group of one).
  const c10::intrusive_ptr<c10d::Backend>& backend() const { return backend_; }

  /// Blocks until every member reaches it.
  void barrier() const {
    if (size() > 1) backend_->barrier()->wait();
  }

 private:
  c10::intrusive_ptr<c10d::Backend> backend_;
  std::vector<int> global_ranks_;
  int rank_;
  c10::Device device_;
};

using ProcessGroupPtr = std::shared_ptr<const ProcessGroup>;

/// Options of World::new_group, with chained setters.
struct GroupOptions {
  /// Serve the group with the communicator of an earlier one with the same members, backend and
  /// device: mesh dimensions often span the same ranks (world, dp_shard and dp on a 1-D FSDP
  /// job), and each NCCL communicator costs GPU memory and setup time. false: a communicator of
  /// its own, e.g. for collectives issued from another thread (background checkpoint saves).
  TORCH_ARG(bool, shared) = true;
  /// "gloo" or "nccl"; empty: the world's backend.
  TORCH_ARG(std::string, backend) = "";
  /// Where the group's tensors live; unset: the world's device.
  TORCH_ARG(std::optional<c10::Device>, device) = std::nullopt;
};

/// Options of init_distributed, with chained setters. The environment variables TITAN_DEVICE,
/// TITAN_BACKEND and TITAN_SHARE_GPUS=1 set device, backend and share_gpus where the code left
/// them at their defaults (titan_launch sets TITAN_DEVICE=cpu and TITAN_BACKEND=gloo).
struct DistOptions {
  /// "auto" (NCCL when the device is CUDA, else Gloo), "gloo" or "nccl".
  TORCH_ARG(std::string, backend) = "auto";
  /// "auto" (cuda:LOCAL_RANK when CUDA is available, else cpu), "cpu" or "cuda". Each rank binds
  /// its GPU (c10::cuda::set_device) before any group is made. "meta" (one process only): shapes
  /// without storage, nothing computed, e.g. to trace a whole training step for a cost model
  /// (bench/gpu_cost); FSDP then accepts parameters left on the meta device.
  TORCH_ARG(std::string, device) = "auto";
  /// Let more ranks than GPUs run on a node, round robin (Gloo only: tests, debugging). Without
  /// it that is an error naming both counts.
  TORCH_ARG(bool, share_gpus) = false;
  /// Rendezvous and collective timeout: a peer that died makes the others fail after this.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(10);
  /// Worker threads of each Gloo group.
  TORCH_ARG(int, gloo_threads) = 2;
  /// Print info messages from every rank, not only rank 0.
  TORCH_ARG(bool, log_all_ranks) = false;
};

/// The job: the rendezvous store, the world group and the means to make sub-groups.
/// Owned by the caller (init_distributed returns a shared_ptr); shut down explicitly or on destruction.
class World {
 public:
  World(LaunchInfo info, DistOptions options) : info_(std::move(info)), options_(std::move(options)) {
    choose_device_and_backend();
    logger_ = Logger(info_.rank, info_.world_size, options_.log_all_ranks());
    if (info_.world_size > 1) {
      c10d::TCPStoreOptions store_options;
      store_options.port = static_cast<std::uint16_t>(info_.master_port);
      store_options.isServer = info_.rank == 0 && !info_.agent_store;
      store_options.numWorkers = static_cast<size_t>(info_.world_size);
      store_options.timeout = options_.timeout();
      try {
        store_ = c10::make_intrusive<c10d::TCPStore>(info_.master_addr, store_options);
      } catch (const std::exception& e) {
        TORCH_CHECK(false, "titan: rank ", info_.rank, " could not rendezvous at ", info_.master_addr, ":",
                    info_.master_port, " within ", options_.timeout().count(), " ms: ", e.what());
      }
      // An elastic restart may meet the same store: each attempt's keys live apart.
      store_ = c10::make_intrusive<c10d::PrefixStore>("titan/attempt_" + std::to_string(info_.restart_count), store_);
    }
    std::vector<int> all(static_cast<size_t>(info_.world_size));
    std::iota(all.begin(), all.end(), 0);  // ranks 0 .. world_size - 1
    world_group_ = new_group(all, "world");
  }

  World(const World&) = delete;
  World& operator=(const World&) = delete;
  ~World() { shutdown(); }

  int rank() const { return info_.rank; }
  int world_size() const { return info_.world_size; }
  int local_rank() const { return info_.local_rank; }
  const LaunchInfo& launch_info() const { return info_; }
  const DistOptions& options() const { return options_; }
  c10::Device device() const { return device_; }     ///< this rank's compute device
  const std::string& backend_name() const { return backend_name_; }  ///< "gloo" or "nccl"
  const Logger& logger() const { return logger_; }
  const ProcessGroupPtr& group() const { return world_group_; }  ///< all ranks

  /// A group over `global_ranks` (sorted, distinct). Every rank of the job calls this with the
  /// same arguments in the same order; `tag` names the group's key space in the store.
  /// Ranks outside the group get nullptr. A shared group (the default) is the earlier group with
  /// the same members, backend and device, if there is one.
  ProcessGroupPtr new_group(std::vector<int> global_ranks, const std::string& tag, const GroupOptions& group = {}) {
    TORCH_CHECK(!global_ranks.empty(), "titan: new_group('", tag, "') needs at least one rank");
    for (size_t i = 0; i < global_ranks.size(); ++i) {
      TORCH_CHECK(global_ranks[i] >= 0 && global_ranks[i] < info_.world_size, "titan: new_group('", tag,
                  "'): rank ", global_ranks[i], " is outside the world of ", info_.world_size);
      TORCH_CHECK(i == 0 || global_ranks[i] > global_ranks[i - 1], "titan: new_group('", tag,
                  "'): ranks must be sorted and distinct");
    }
    const std::string backend_name = group.backend().empty() ? backend_name_ : group.backend();
    TORCH_CHECK(backend_name == "gloo" || backend_name == "nccl", "titan: new_group('", tag, "'): unknown backend '",
                backend_name, "' (expected 'gloo' or 'nccl')");
    const c10::Device device = group.device().value_or(device_);
    // Every rank counts every call, members or not, so that members agree on the store prefix.
    int group_id = group_counter_++;
    auto it = std::find(global_ranks.begin(), global_ranks.end(), info_.rank);
    if (it == global_ranks.end()) return nullptr;
    std::string key = backend_name + "@" + device.str() + ":";
    for (int r : global_ranks) key += std::to_string(r) + ",";
    if (group.shared()) {
      if (auto found = shared_groups_.find(key); found != shared_groups_.end()) return found->second;
    }
    int group_rank = static_cast<int>(it - global_ranks.begin());
    c10::intrusive_ptr<c10d::Backend> backend;
    if (global_ranks.size() > 1) {
      auto prefix = "titan/" + std::to_string(group_id) + "/" + tag;
      auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, store_);
      backend = detail::make_backend(backend_name, store, group_rank, static_cast<int>(global_ranks.size()),
                                     options_.timeout(), options_.gloo_threads(), info_.master_addr, device);
      backends_.push_back(backend);
    }
    auto made = std::make_shared<const ProcessGroup>(std::move(backend), std::move(global_ranks), group_rank, device);
    if (group.shared()) shared_groups_.emplace(std::move(key), made);
    return made;
  }

  /// Communicators this rank created (groups of one rank have none; shared groups count once).
  size_t communicator_count() const { return backends_.size(); }

  /// Waits for all ranks, then releases every backend and the store. Idempotent.
  void shutdown() {
    if (shut_down_) return;
    shut_down_ = true;
    try {
      if (world_group_ && world_group_->size() > 1) world_group_->barrier();
    } catch (const std::exception& e) {
      logger_.warn("shutdown barrier failed: ", e.what());
    }
    for (auto& backend : backends_) backend->shutdown();
    backends_.clear();
    shared_groups_.clear();
    world_group_.reset();
    store_.reset();
  }

 private:
  /// The device (binding this rank's GPU) and the backend, from the options and what is visible.
  void choose_device_and_backend() {
    const auto& device = options_.device();
    const auto& backend = options_.backend();
    TORCH_CHECK(device == "auto" || device == "cpu" || device == "cuda" || device == "meta",
                "titan: DistOptions::device must be 'auto', 'cpu', 'cuda' or 'meta', got '", device, "'");
    TORCH_CHECK(backend == "auto" || backend == "gloo" || backend == "nccl",
                "titan: DistOptions::backend must be 'auto', 'gloo' or 'nccl', got '", backend, "'");
    if (device == "meta") {  // groups of one rank carry no backend: nothing is ever communicated
      TORCH_CHECK(info_.world_size == 1, "titan: DistOptions::device 'meta' is for one process, but the job has ",
                  info_.world_size, " ranks");
      device_ = c10::Device(c10::kMeta);
      backend_name_ = "gloo";
      return;
    }
    detail::check_cuda_support(TITAN_HAS_NCCL != 0, detail::visible_gpu_count(), device);
    const int visible = detail::cuda_device_count();
    const bool cuda = device == "cuda" || (device == "auto" && visible > 0);
    backend_name_ = backend != "auto" ? backend : cuda ? "nccl" : "gloo";
    if (!cuda) return;
    const int index = detail::cuda_device_for(info_.local_rank, info_.local_world_size, visible, options_.share_gpus(),
                                              backend_name_);
    device_ = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
#if TITAN_HAS_NCCL
    c10::cuda::set_device(device_.index());  // before any communicator: no collective guesses the GPU
#endif
  }

  LaunchInfo info_;
  DistOptions options_;
  c10::Device device_{c10::kCPU};
  std::string backend_name_;
  Logger logger_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::vector<c10::intrusive_ptr<c10d::Backend>> backends_;
  std::map<std::string, ProcessGroupPtr> shared_groups_;  ///< by backend, device and members
  ProcessGroupPtr world_group_;
  int group_counter_ = 0;
  bool shut_down_ = false;
};

using WorldPtr = std::shared_ptr<World>;

/// Joins the job described by the launcher's environment (see read_launch_info) and returns it.
/// With no launcher this is a world of one process and needs no network.
inline WorldPtr init_distributed(DistOptions options = {}, const EnvLookup& env = process_env()) {
  auto info = read_launch_info(env);
  if (auto all = env("TITAN_LOG_ALL_RANKS")) options.log_all_ranks(*all == "1");
  if (auto device = env("TITAN_DEVICE"); device && options.device() == "auto") options.device(*device);
  if (auto backend = env("TITAN_BACKEND"); backend && options.backend() == "auto") options.backend(*backend);
  if (auto share = env("TITAN_SHARE_GPUS")) options.share_gpus(options.share_gpus() || *share == "1");
  return std::make_shared<World>(std::move(info), std::move(options));
}

}  // namespace titan
