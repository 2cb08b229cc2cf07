#pragma once
// titan/checkpoint/manager.hpp: CheckpointOptions and CheckpointManager, the checkpoints of a
// training run: interval, keep_latest_k rotation, async saves, resuming from the latest.

#include <titan/checkpoint/format.hpp>
#include <titan/checkpoint/load.hpp>
#include <titan/checkpoint/save.hpp>
#include <titan/checkpoint/state.hpp>
#include <titan/collectives.hpp>
#include <titan/detail/checkpoint_io.hpp>
#include <titan/detail/json.hpp>
#include <titan/detail/torch_internals.hpp>  // TITAN_HAS_GLOO, wait_for_stream
#include <titan/log.hpp>
#include <titan/safetensors.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace titan {

/// Options of CheckpointManager, with chained setters. How its loads read (progress callback,
/// threads, staging memory) is a LoadOptions, load(); io_threads, on_load_progress and
/// max_staging_bytes below are that LoadOptions' fields under their CheckpointOptions names.
struct CheckpointOptions {
  explicit CheckpointOptions(std::string folder) : folder_(std::move(folder)) {}
  /// Directory holding step-<N>/ checkpoints and the `latest` pointer.
  TORCH_ARG(std::string, folder);
  /// maybe_save saves when step % interval == 0.
  TORCH_ARG(int64_t, interval) = 500;
  /// Keep only the newest k complete checkpoints (0: keep all).
  TORCH_ARG(int64_t, keep_latest_k) = 0;
  /// Stage tensors to CPU memory and write them on a background thread.
  TORCH_ARG(bool, async) = false;
  /// Async: keep the host staging buffers between saves and copy into them (pinned memory for GPU
  /// tensors), so the training loop blocks for a copy only, not for allocating and first-touching
  /// a host copy of its whole state; costs that much host memory for the run. false: fresh
  /// buffers per save, freed after the write.
  TORCH_ARG(bool, reuse_staging) = true;
  /// The step load_latest loads instead of the newest (-1: the newest).
  TORCH_ARG(int64_t, load_step) = -1;
  /// Bytes per checksum block; a loader reads whole blocks around what it needs.
  TORCH_ARG(int64_t, block_bytes) = int64_t{1} << 20;
  /// Called with the path of every file a save has written and fsynced (progress, tests).
  TORCH_ARG(std::function<void(const std::string&)>, on_file_written);
  /// The options of load_latest and load (its io_threads also sets the threads of a save).
  TORCH_ARG(LoadOptions, load);

 public:
  /// Threads per rank writing a save's file and reading a load's (0: the cores, at most 4). Each
  /// writes or reads pieces of about 8 MiB and checksums what it wrote or read. load().io_threads().
  CheckpointOptions& io_threads(int threads) {
    load_.io_threads(threads);
    return *this;
  }
  const int& io_threads() const noexcept { return load_.io_threads(); }
  int& io_threads() noexcept { return load_.io_threads(); }
  /// Called after each tensor a load has read and checked (a progress display for long loads).
  /// load().on_progress().
  CheckpointOptions& on_load_progress(LoadProgressFn fn) {
    load_.on_progress(std::move(fn));
    return *this;
  }
  const LoadProgressFn& on_load_progress() const noexcept { return load_.on_progress(); }
  LoadProgressFn& on_load_progress() noexcept { return load_.on_progress(); }
  /// Host memory a load may use to stage this rank's tensors (0: as much as they take); see
  /// LoadOptions::max_staging_bytes. load().max_staging_bytes().
  CheckpointOptions& max_staging_bytes(int64_t bytes) {
    load_.max_staging_bytes(bytes);
    return *this;
  }
  const int64_t& max_staging_bytes() const noexcept { return load_.max_staging_bytes(); }
  int64_t& max_staging_bytes() noexcept { return load_.max_staging_bytes(); }
};

namespace detail {

/// A private host copy of `t` for a background write, in `reuse` when that is a host tensor of
/// t's shape and dtype (a previous save's buffer), else in a fresh one: pinned for a GPU tensor.
/// From a GPU the copy is non-blocking on the current stream, so the caller waits once for all
/// copies (wait_for_stream).
inline at::Tensor stage_on_host(const at::Tensor& t, const at::Tensor& reuse = {}) {
  at::Tensor host = reuse;
  if (!host.defined() || host.sizes() != t.sizes() || host.scalar_type() != t.scalar_type() || !host.is_contiguous() ||
      host.is_pinned() != !t.is_cpu())
    host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(!t.is_cpu()));
  host.copy_(t, /*non_blocking=*/!t.is_cpu());
  return host;
}

}  // namespace detail

/// Saves, loads and rotates checkpoints of one training run in options.folder(). Every rank of
/// the world constructs it (it makes its own process group) and calls its methods in the same order.
class CheckpointManager {
 public:
  CheckpointManager(const WorldPtr& world, CheckpointOptions options) : options_(std::move(options)) {
    TORCH_CHECK(world, "titan: CheckpointManager needs a World");
    TORCH_CHECK(!options_.folder().empty(), "titan: CheckpointOptions::folder is empty");
    TORCH_CHECK(options_.interval() >= 1, "titan: CheckpointOptions::interval must be >= 1, got ", options_.interval());
    TORCH_CHECK(options_.keep_latest_k() >= 0, "titan: CheckpointOptions::keep_latest_k must be >= 0, got ",
                options_.keep_latest_k());
    TORCH_CHECK(options_.block_bytes() >= 8, "titan: CheckpointOptions::block_bytes must be >= 8, got ",
                options_.block_bytes());
    detail::check_load_options(options_.load(), "CheckpointOptions");
    // A communicator of its own (a saver thread's collectives never meet training's), on Gloo and
    // the CPU when titan has Gloo: a background thread then never issues NCCL work, and only
    // small strings go through it.
    GroupOptions group;
    group.shared(false);
    if (TITAN_HAS_GLOO) group.backend("gloo").device(c10::Device(c10::kCPU));
    group_ = world->new_group(world->group()->global_ranks(), "checkpoint", group);
    logger_ = world->logger();
    rank_ = world->rank();
  }
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;
  /// Waits for an unfinished save (its error is logged, not thrown).
  ~CheckpointManager() {
    try {
      wait();
    } catch (const std::exception& e) {
      logger_.error("checkpoint save failed: ", e.what());
    }
  }

  const CheckpointOptions& options() const { return options_; }

  /// Saves when `step` is a multiple of the interval, or when `force` (e.g. the last step or a
  /// SIGTERM). Returns whether a save was started.
  bool maybe_save(int64_t step, const TrainState& state, bool force = false) {
    if (!force && step % options_.interval() != 0) return false;
    save(step, state);
    return true;
  }

  /// Saves `state` as step `step` (a collective). Sync mode returns when the checkpoint is
  /// complete on disk; async mode returns once the state is copied to CPU memory and writes it in
  /// the background (a save still in flight is waited for first).
  void save(int64_t step, const TrainState& state) {
    wait();
    TORCH_CHECK(step >= 0, "titan checkpoint: step must be >= 0, got ", step);
    const std::string folder = options_.folder();
    const std::string tmp = folder + "/.tmp-" + detail::step_dir_name(step);
    if (rank_ == 0) {
      std::filesystem::create_directories(folder);
      detail::remove_tree(tmp);  // debris of a crashed save of the same step
      std::filesystem::create_directories(tmp);
    }
    auto job = std::make_shared<Job>();
    job->step = step;
    const auto components = detail::component_states(state);
    job->extra = detail::state_extra(state, components);
    std::vector<c10::Device> staged_devices;  // devices whose streams carry staging copies
    std::vector<at::Tensor> staging;           // this save's host buffers, in entry order
    for (auto& [name, tensor] : detail::state_tensors(state, components)) {
      at::NoGradGuard no_grad;
      for (size_t k = 0; k < tensor.blocks.size(); ++k) {
        const auto& block = tensor.blocks[k];
        auto local = block.view_of(tensor.local.detach());
        // Async: a private host copy (pinned, non-blocking from a GPU; one wait below for all).
        at::Tensor data;  // [box.sizes], contiguous, on the host
        if (options_.async()) {
          const size_t i = staging.size();
          data = detail::stage_on_host(local, i < staging_.size() ? staging_[i] : at::Tensor());
          staging.push_back(data);
          if (!local.is_cpu() && std::find(staged_devices.begin(), staged_devices.end(), local.device()) == staged_devices.end())
            staged_devices.push_back(local.device());
        } else {
          data = local.cpu().contiguous();  // a blocking copy: nothing to wait for
        }
        const std::string key = tensor.blocks.size() == 1 ? name : name + "#" + std::to_string(k);
        job->entries.push_back(detail::SaveEntry{name, key, data, safetensors::dtype_name(data.scalar_type()),
                                                 tensor.layout.global_shape, tensor.layout.placement(), block.box});
      }
    }
    for (const auto& device : staged_devices) detail::wait_for_stream(device);  // the one sync of the staging
    staging_ = options_.reuse_staging() ? std::move(staging) : std::vector<at::Tensor>();
    // The plan exchange is also the barrier after which the temporary directory exists.
    job->plans = all_gather_strings(group_, detail::plan_json(job->entries, state.rank_extra));
    if (!options_.async()) {
      write(*job);
      return;
    }
    writing_ = true;
    in_flight_ = std::thread([this, job] {
      detail::lower_thread_priority();  // the writers yield the cores to training
      try {
        write(*job);
      } catch (...) {
        error_ = std::current_exception();
      }
      writing_ = false;
    });
  }

  /// Whether an async save is still being written (wait() has not returned for it yet).
  bool saving() const { return writing_; }

  /// Blocks until the save in flight (if any) is complete; rethrows its error.
  void wait() {
    if (in_flight_.joinable()) in_flight_.join();
    if (error_) {
      auto error = error_;
      error_ = nullptr;
      std::rethrow_exception(error);
    }
  }

  /// Steps of the complete checkpoints in the folder, ascending.
  std::vector<int64_t> complete_steps() const {
    std::vector<int64_t> steps;
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(options_.folder(), ec)) {
      const auto name = entry.path().filename().string();
      if (name.rfind("step-", 0) != 0 || !std::filesystem::exists(entry.path() / "metadata.json")) continue;
      try {
        size_t used = 0;
        int64_t step = std::stoll(name.substr(5), &used);
        if (used == name.size() - 5) steps.push_back(step);
      } catch (const std::exception&) {
      }
    }
    std::sort(steps.begin(), steps.end());
    return steps;
  }

  /// The step of the newest complete checkpoint: the `latest` pointer when it names a complete
  /// one, else the highest complete step; nullopt when there is none.
  std::optional<int64_t> latest_step() const {
    std::ifstream in(options_.folder() + "/latest");
    std::string name;
    if (in >> name && name.rfind("step-", 0) == 0 &&
        std::filesystem::exists(options_.folder() + "/" + name + "/metadata.json")) {
      try {
        return std::stoll(name.substr(5));
      } catch (const std::exception&) {
      }
    }
    auto steps = complete_steps();
    if (steps.empty()) return std::nullopt;
    return steps.back();
  }

  /// Loads options.load_step() if set, else the latest checkpoint, into `state` (a collective).
  /// Returns the loaded step, or nullopt when the folder has no checkpoint (a fresh run).
  std::optional<int64_t> load_latest(TrainState& state) {
    if (options_.load_step() >= 0) return load(options_.load_step(), state);
    wait();
    auto step = latest_step();
    // Every rank must agree (a shared file system may show rank 0's rename late).
    auto answers = all_gather_strings(group_, step ? std::to_string(*step) : "none");
    for (const auto& answer : answers)
      TORCH_CHECK(answer == answers.front(), "titan checkpoint: ranks disagree on the latest checkpoint in '",
                  options_.folder(), "' (", answers.front(), " vs ", answer, ")");
    if (!step) return std::nullopt;
    return load(*step, state);
  }

  /// Loads step `step` into `state` (a collective); errors if it is not a complete checkpoint.
  std::optional<int64_t> load(int64_t step, TrainState& state) {
    wait();
    auto meta = load_checkpoint(options_.folder() + "/" + detail::step_dir_name(step), state, group_, options_.load());
    logger_.info("loaded checkpoint step ", meta.step, " (saved on ", meta.world_size, " ranks) from ",
                 options_.folder());
    return meta.step;
  }

 private:
  struct Job {
    int64_t step = 0;
    std::vector<detail::SaveEntry> entries;
    std::vector<std::string> plans;
    std::map<std::string, std::string> extra;
  };

  /// Writes this rank's file; rank 0 then writes the metadata, renames the directory into place,
  /// updates `latest` and removes old checkpoints. Ends with a barrier.
  void write(const Job& job) {
    const std::string folder = options_.folder();
    const std::string tmp = folder + "/.tmp-" + detail::step_dir_name(job.step);
    const std::string file = "rank-" + std::to_string(rank_) + ".safetensors";
    std::vector<std::pair<std::string, ShardRecord>> mine;
    std::vector<detail::PlannedTensor> tensors;
    all_ranks_or_none(group_, [&] {
      tensors = detail::resolve_plans(job.plans);
      std::map<std::string, const detail::PlannedTensor*> by_name;
      for (const auto& tensor : tensors) by_name[tensor.name] = &tensor;
      std::vector<const detail::SaveEntry*> to_write;
      for (const auto& entry : job.entries) {
        for (const auto& block : by_name.at(entry.name)->blocks)
          if (block.rank == rank_ && block.box.offsets == entry.box.offsets) to_write.push_back(&entry);
      }
      if (!to_write.empty()) {
        auto records = detail::write_shard_file(tmp, file, to_write, options_.block_bytes(),
                                                detail::io_threads_or_default(options_.io_threads()));
        detail::sync_directory(tmp);
        for (size_t i = 0; i < records.size(); ++i) mine.emplace_back(to_write[i]->name, std::move(records[i]));
        if (options_.on_file_written()) options_.on_file_written()(tmp + "/" + file);
      }
    });
    auto all_records = all_gather_strings(group_, json::dump(detail::records_json(mine)));
    if (rank_ == 0) {
      all_ranks_or_none(group_, [&] { finish(job, tensors, all_records); });
    } else {
      all_ranks_or_none(group_, [] {});
    }
  }

  /// Rank 0: metadata.json (last file), rename into place, `latest`, rotation.
  void finish(const Job& job, const std::vector<detail::PlannedTensor>& tensors,
              const std::vector<std::string>& all_records) {
    const std::string folder = options_.folder();
    const std::string tmp = folder + "/.tmp-" + detail::step_dir_name(job.step);
    CheckpointMetadata meta;
    meta.step = job.step;
    meta.world_size = static_cast<int64_t>(all_records.size());
    meta.block_bytes = options_.block_bytes();
    meta.extra = job.extra;
    std::map<std::string, size_t> index;
    for (const auto& tensor : tensors) {
      index[tensor.name] = meta.tensors.size();
      meta.tensors.push_back(TensorRecord{tensor.name, tensor.dtype, tensor.shape, tensor.placement, {}});
    }
    for (const auto& plan : job.plans)
      meta.rank_extra.push_back(detail::read_string_map(json::parse(plan).at("rank_extra")));
    for (size_t r = 0; r < all_records.size(); ++r) {
      auto records = json::parse(all_records[r], "checkpoint records of rank " + std::to_string(r));
      for (const auto& v : records.as_array())
        meta.tensors[index.at(v.at("name").as_string())].shards.push_back(
            detail::read_shard_record(v.at("shard"), v.at("name").as_string()));
    }
    detail::write_file_atomically(tmp, "metadata.json", json::dump(detail::metadata_json(meta), 1));
    if (options_.on_file_written()) options_.on_file_written()(tmp + "/metadata.json");
    const std::string final_dir = folder + "/" + detail::step_dir_name(job.step);
    detail::remove_tree(final_dir);  // an older save of the same step (a rerun)
    std::filesystem::rename(tmp, final_dir);
    detail::sync_directory(folder);
    detail::write_file_atomically(folder, "latest", detail::step_dir_name(job.step) + "\n");
    if (options_.keep_latest_k() > 0) {
      auto steps = complete_steps();
      const auto keep = static_cast<size_t>(options_.keep_latest_k());
      for (size_t i = 0; i + keep < steps.size(); ++i)
        if (steps[i] != job.step) detail::remove_tree(folder + "/" + detail::step_dir_name(steps[i]));
    }
    logger_.info("saved checkpoint step ", job.step, " to ", final_dir);
  }

  CheckpointOptions options_;
  ProcessGroupPtr group_;
  Logger logger_;
  int rank_ = 0;
  std::vector<at::Tensor> staging_;  ///< the last async save's host buffers (reuse_staging)
  std::thread in_flight_;
  std::atomic<bool> writing_{false};
  std::exception_ptr error_;
};

}  // namespace titan
