#pragma once
// titan/checkpoint/load.hpp: load planning and load_checkpoint with its LoadOptions: collect and
// validate the targets, stage only the saved blocks overlapping this rank's (checked), then apply.

#include <titan/checkpoint/format.hpp>
#include <titan/checkpoint/state.hpp>
#include <titan/checkpoint/stateful.hpp>
#include <titan/collectives.hpp>
#include <titan/detail/checkpoint_io.hpp>
#include <titan/detail/optimizer_state.hpp>
#include <titan/detail/tasks.hpp>
#include <titan/safetensors.hpp>
#include <titan/sharding.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <fcntl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace titan {

/// Progress of a load: tensors staged so far, of how many, and the bytes staged so far (this rank).
using LoadProgressFn = std::function<void(int64_t tensors_done, int64_t tensors_total, int64_t bytes_done)>;

/// Options of load_checkpoint, with chained setters.
struct LoadOptions {
  /// Called after each tensor the load has read and checked.
  TORCH_ARG(LoadProgressFn, on_progress);
  /// Threads per rank reading (0: the cores, at most 4).
  TORCH_ARG(int, io_threads) = 0;
  /// Host memory the load may use to stage this rank's tensors (0: as much as they take, one extra
  /// copy of this rank's state). When the tensors need more, the load reads twice: a first pass
  /// checks every block's checksum on every rank and keeps nothing, then groups of tensors of at
  /// most this many bytes (or one larger tensor) are staged and copied into place one group after
  /// the other. Nothing is overwritten before all checksums passed; the files must not change
  /// during the load (the second pass checks the checksums again and fails if they did, with the
  /// groups before applied).
  TORCH_ARG(int64_t, max_staging_bytes) = 0;
};

namespace detail {

/// Checks the fields of a LoadOptions; `owner` names the options in the errors (LoadOptions, or
/// CheckpointOptions, which holds one).
inline void check_load_options(const LoadOptions& options, const char* owner) {
  TORCH_CHECK(options.io_threads() >= 0, "titan: ", owner, "::io_threads must be >= 0 (0: automatic), got ",
              options.io_threads());
  TORCH_CHECK(options.max_staging_bytes() >= 0, "titan: ", owner, "::max_staging_bytes must be >= 0 (0: no limit), ",
              "got ", options.max_staging_bytes());
}

/// A block to load: what it must match and where its staged value goes once everything is valid.
struct LoadTarget {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  TensorBox box;
  std::function<void(const at::Tensor&)> apply;  ///< receives the staged CPU tensor [box.sizes]
  at::Tensor staged;

  /// Bytes of its staged tensor.
  int64_t bytes() const { return box.numel() * static_cast<int64_t>(c10::elementSize(dtype)); }
};

/// Bytes of the block range [first, last] (block indices) of a shard of `size` bytes.
inline int64_t block_range_bytes(int64_t size, int64_t block_bytes, int64_t first, int64_t last) {
  return std::min(size, (last + 1) * block_bytes) - first * block_bytes;
}

/// Reads one block range [first, last] (block indices) of a shard into `buffer` (its
/// block_range_bytes) and checks their checksums.
inline void read_checked_blocks(const PosixFile& file, const std::string& path, const std::string& tensor,
                                const ShardRecord& shard, int64_t block_bytes, int64_t first, int64_t last,
                                uint8_t* buffer) {
  const int64_t size = shard.end - shard.begin;
  const int64_t from = first * block_bytes;
  TORCH_CHECK(file.read_at(buffer, static_cast<size_t>(block_range_bytes(size, block_bytes, first, last)),
                           shard.begin + from),
              "titan checkpoint: file '", path, "' ends inside tensor '", tensor, "' (bytes ", shard.begin, "..",
              shard.end, "): it is truncated");
  for (int64_t b = first; b <= last; ++b) {
    const int64_t lo = b * block_bytes - from;
    const int64_t n = std::min(block_bytes, size - b * block_bytes);
    TORCH_CHECK(static_cast<size_t>(b) < shard.crc32.size(), "titan checkpoint: tensor '", tensor, "' in '", path,
                "' has ", shard.crc32.size(), " checksums, too few for its ", size, " bytes");
    uint32_t crc = crc32(buffer + lo, static_cast<size_t>(n));
    TORCH_CHECK(crc == shard.crc32[static_cast<size_t>(b)], "titan checkpoint: checksum mismatch in file '", path,
                "' for tensor '", tensor, "' (shard ", box_text(TensorBox{shard.offsets, shard.sizes}), ", bytes ",
                shard.begin + b * block_bytes, "..", shard.begin + b * block_bytes + n, "): the checkpoint is corrupted");
  }
}

/// One positioned read of a load: checksum blocks [first_block, last_block] of a saved shard,
/// checked, into the staged tensor of its target.
struct ShardRead {
  LoadTarget* target = nullptr;
  const ShardRecord* shard = nullptr;
  const PosixFile* file = nullptr;
  std::string path;
  int64_t first_block = 0, last_block = 0;
  /// The shard is the target's box (a load into the layout that saved it): the blocks go straight
  /// into the staged tensor, at their own byte offset, and are checked there (no buffer, no copy).
  bool direct = false;
  /// Otherwise the overlap: its first element in the shard, its corner in the target's box, its
  /// sizes, and the shard's strides; the blocks go through a buffer and the overlap is copied.
  int64_t first = 0;
  std::vector<int64_t> corner, sizes, strides;
};

/// Appends the reads that fill `target.staged` from the saved shards overlapping its box, each
/// reading only the checksum blocks that hold overlapping bytes; a direct read is cut into pieces
/// of about `piece_bytes` so that threads share large tensors. Allocates nothing.
inline void plan_target_reads(LoadTarget& target, const TensorRecord& record, const std::string& dir,
                              int64_t block_bytes, int64_t piece_bytes,
                              std::map<std::string, std::unique_ptr<PosixFile>>& files, std::vector<ShardRead>& reads) {
  const size_t ndim = target.box.sizes.size();
  const int64_t element = static_cast<int64_t>(c10::elementSize(target.dtype));
  int64_t filled = 0;
  for (const auto& shard : record.shards) {
    TORCH_CHECK(shard.offsets.size() == ndim && shard.sizes.size() == ndim, "titan checkpoint: tensor '",
                target.name, "' has a shard of rank ", shard.sizes.size(), " in '", shard.file, "'");
    std::vector<int64_t> lo(ndim), hi(ndim), strides(ndim);
    bool empty = false;
    int64_t shard_numel = 1;
    for (size_t d = ndim; d-- > 0;) {
      lo[d] = std::max(shard.offsets[d], target.box.offsets[d]);
      hi[d] = std::min(shard.offsets[d] + shard.sizes[d], target.box.offsets[d] + target.box.sizes[d]);
      empty = empty || lo[d] >= hi[d];
      strides[d] = shard_numel;
      shard_numel *= shard.sizes[d];
    }
    if (empty || target.box.numel() == 0) continue;
    TORCH_CHECK(shard.end - shard.begin == shard_numel * element, "titan checkpoint: tensor '", target.name,
                "' has a shard of ", shard_numel, " elements but ", shard.end - shard.begin, " bytes in '", shard.file, "'");
    ShardRead read;
    read.target = &target;
    read.shard = &shard;
    read.path = dir + "/" + shard.file;
    auto& file = files[shard.file];
    if (!file) {
      TORCH_CHECK(std::filesystem::exists(read.path), "titan checkpoint: file '", read.path, "' (holding tensor '",
                  target.name, "') is missing");
      file = std::make_unique<PosixFile>(read.path, O_RDONLY);
    }
    TORCH_CHECK(file->size() >= shard.end, "titan checkpoint: file '", read.path, "' has ", file->size(),
                " bytes but tensor '", target.name, "' needs bytes up to ", shard.end, ": it is truncated");
    read.file = file.get();
    int64_t last = 0;  // element index within the shard
    read.sizes.resize(ndim);
    read.corner.resize(ndim);
    int64_t overlap = 1;
    for (size_t d = 0; d < ndim; ++d) {
      read.first += (lo[d] - shard.offsets[d]) * strides[d];
      last += (hi[d] - 1 - shard.offsets[d]) * strides[d];
      read.sizes[d] = hi[d] - lo[d];
      read.corner[d] = lo[d] - target.box.offsets[d];
      overlap *= read.sizes[d];
    }
    filled += overlap;
    read.strides = std::move(strides);
    read.first_block = read.first * element / block_bytes;
    read.last_block = ((last + 1) * element - 1) / block_bytes;
    if (shard.offsets == target.box.offsets && shard.sizes == target.box.sizes) {
      read.direct = true;
      const int64_t blocks_per_piece = std::max<int64_t>(1, piece_bytes / block_bytes);
      const int64_t last_block = read.last_block;
      for (int64_t b = 0; b <= last_block; b += blocks_per_piece) {
        read.first_block = b;
        read.last_block = std::min(last_block, b + blocks_per_piece - 1);
        reads.push_back(read);
      }
      continue;
    }
    reads.push_back(std::move(read));
  }
  TORCH_CHECK(filled == target.box.numel(), "titan checkpoint: the saved shards of tensor '", target.name, "' cover ",
              filled, " of the ", target.box.numel(), " elements this rank needs (", box_text(target.box), ")");
}

/// Performs one planned read (any thread: reads fill disjoint parts of their staged tensors).
/// Without `keep` it only checks the blocks' checksums (through a scratch buffer).
inline void run_shard_read(const ShardRead& read, int64_t block_bytes, bool keep) {
  LoadTarget& target = *read.target;
  const ShardRecord& shard = *read.shard;
  if (read.direct && keep) {
    read_checked_blocks(*read.file, read.path, target.name, shard, block_bytes, read.first_block, read.last_block,
                        static_cast<uint8_t*>(target.staged.data_ptr()) + read.first_block * block_bytes);
    return;
  }
  const int64_t element = static_cast<int64_t>(c10::elementSize(target.dtype));
  auto buffer = at::empty({block_range_bytes(shard.end - shard.begin, block_bytes, read.first_block, read.last_block)},
                          at::TensorOptions().dtype(at::kByte));  // [bytes of the blocks], not zeroed
  read_checked_blocks(*read.file, read.path, target.name, shard, block_bytes, read.first_block, read.last_block,
                      buffer.data_ptr<uint8_t>());
  if (!keep) return;
  auto source = at::from_blob(buffer.data_ptr<uint8_t>() + (read.first * element - read.first_block * block_bytes),
                              read.sizes, read.strides, at::TensorOptions().dtype(target.dtype));  // [overlap], shard strides
  auto destination = target.staged;
  for (size_t d = 0; d < read.sizes.size(); ++d)
    destination = destination.narrow(static_cast<int64_t>(d), read.corner[d], read.sizes[d]);
  destination.copy_(source);
}

/// What a load will write once every rank has validated and staged it.
struct LoadPlan {
  std::vector<LoadTarget> targets;  ///< one per block of every local tensor restored
  /// New optimizer states by parameter name (a parameter never stepped when saved has none).
  std::map<std::string, std::unique_ptr<torch::optim::OptimizerParamState>> optimizer_states;
  /// Each component with the fresh state its targets fill.
  std::vector<std::pair<Stateful*, ComponentState>> components;
};

/// Adds a target per block of `tensor`, each copying its staged value into `tensor.local`.
inline void add_block_targets(LoadPlan& plan, const std::string& name, const ShardedTensor& tensor) {
  for (const auto& block : tensor.blocks) {
    at::Tensor destination = block.view_of(tensor.local);
    plan.targets.push_back(LoadTarget{name, tensor.local.scalar_type(), tensor.layout.global_shape, block.box,
                                      [destination](const at::Tensor& value) mutable {
                                        at::NoGradGuard no_grad;
                                        destination.copy_(value);
                                      },
                                      {}});
  }
}

/// Collect: what `state` restores from checkpoint `dir` (metadata `meta`), as targets. Nothing in
/// `state` changes: model tensors are copied into by apply, optimizer states and component states
/// are fresh objects installed by apply.
inline LoadPlan collect_load_targets(const TrainState& state, const CheckpointMetadata& meta, const std::string& dir) {
  LoadPlan plan;
  if (state.model != nullptr) {
    for (const auto& [name, tensor] : state_tensors(TrainState{state.model, nullptr, {}, {}, {}, {}}))
      add_block_targets(plan, name, tensor);
  }
  if (state.optimizer != nullptr) {
    TORCH_CHECK(state.model != nullptr, "titan checkpoint: TrainState has an optimizer but no model");
    const auto& kind = optimizer_kind(*state.optimizer, "titan checkpoint");
    auto saved = meta.extra.find("titan.optimizer");
    TORCH_CHECK(saved != meta.extra.end(), "titan checkpoint: '", dir, "' holds no optimizer state");
    TORCH_CHECK(saved->second == kind.name, "titan checkpoint: '", dir, "' holds ", saved->second,
                " state but the optimizer is ", kind.name);
    std::unordered_map<const void*, std::pair<std::string, ShardedTensor>> params;  // by TensorImpl
    for (auto& [name, tensor] : sharded_parameters(*state.model))
      params.emplace(tensor.local.unsafeGetTensorImpl(), std::make_pair(name, tensor));
    for (const auto& param_group : state.optimizer->param_groups()) {
      for (const auto& param : param_group.params()) {
        auto found = params.find(param.unsafeGetTensorImpl());
        TORCH_CHECK(found != params.end(), "titan checkpoint: the optimizer holds a parameter that is not in the model");
        const auto& [name, sharded] = found->second;
        const std::string prefix = "optim." + name + ".";
        bool stepped = false;
        for (const auto& key : kind.keys) stepped = stepped || meta.find(prefix + key) != nullptr;
        if (!stepped) continue;  // never stepped when saved
        auto fresh = kind.make();
        auto* raw = fresh.get();
        plan.optimizer_states[name] = std::move(fresh);
        for (const auto& key : kind.keys) {
          if (!meta.find(prefix + key)) continue;  // an optional entry (amsgrad, momentum) that was off
          at::Tensor value = at::empty_like(param, at::MemoryFormat::Contiguous);  // filled block by block
          kind.set(*raw, key, value);
          add_block_targets(plan, prefix + key, ShardedTensor{value, sharded.layout, sharded.blocks});
        }
        if (kind.has_step) {
          plan.targets.push_back(LoadTarget{prefix + "step", at::kLong, {}, TensorBox{{}, {}},
                                            [raw, &kind](const at::Tensor& value) { kind.set_step(*raw, value.item<int64_t>()); },
                                            {}});
        }
      }
    }
    for (size_t i = 0; i < state.optimizer->param_groups().size(); ++i)
      TORCH_CHECK(meta.extra.count("titan.optimizer.lr." + std::to_string(i)), "titan checkpoint: '", dir,
                  "' has no learning rate for optimizer group ", i, " (the optimizer has ",
                  state.optimizer->param_groups().size(), " groups)");
  }
  for (const auto& [component, stateful] : state.components) {
    TORCH_CHECK(meta.extra.count(kComponentPrefix + component), "titan checkpoint: '", dir,
                "' holds no state of component '", component, "' (saved without it?)");
    ComponentState fresh = stateful->state();
    const std::string prefix = kComponentPrefix + component + ".";
    fresh.values.clear();
    for (auto it = meta.extra.lower_bound(prefix); it != meta.extra.end() && it->first.rfind(prefix, 0) == 0; ++it)
      fresh.values[it->first.substr(prefix.size())] = it->second;
    for (const auto& [key, tensor] : fresh.tensors) add_block_targets(plan, "component." + component + "." + key, tensor);
    plan.components.emplace_back(stateful, std::move(fresh));
  }
  for (const auto& [name, tensor] : state.tensors) add_block_targets(plan, "extra." + name, tensor);
  return plan;
}

/// Validate: every target is in the checkpoint with its global shape and dtype.
inline void validate_load_targets(const LoadPlan& plan, const CheckpointMetadata& meta, const std::string& dir) {
  for (const auto& target : plan.targets) {
    const auto* record = meta.find(target.name);
    TORCH_CHECK(record != nullptr, "titan checkpoint: tensor '", target.name, "' is not in '", dir, "' (it holds ",
                meta.tensors.size(), " tensors; a checkpoint of a different model?)");
    TORCH_CHECK(record->shape == target.shape, "titan checkpoint: tensor '", target.name, "' has global shape ",
                c10::IntArrayRef(target.shape), " but '", dir, "' saved it as ", c10::IntArrayRef(record->shape));
    auto saved_type = safetensors::dtype_from_name(record->dtype, "titan checkpoint: tensor '" + target.name + "'");
    TORCH_CHECK(saved_type == target.dtype, "titan checkpoint: tensor '", target.name, "' is ", target.dtype, " but '",
                dir, "' saved it as ", record->dtype);
  }
}

/// The checkpoint's model tensors this rank's model lacks, one per line.
inline std::string missing_model_tensors(const LoadPlan& plan, const TrainState& state, const CheckpointMetadata& meta) {
  if (state.model == nullptr) return "";
  std::unordered_set<std::string> wanted;
  for (const auto& target : plan.targets) wanted.insert(target.name);
  std::string missing;
  for (const auto& record : meta.tensors)
    if (record.name.rfind("model.", 0) == 0 && !wanted.count(record.name)) missing += record.name + "\n";
  return missing;
}

/// Fails on every rank when the checkpoint's model holds a tensor that no rank's model has (each
/// rank's `missing_model_tensors`; a pipeline stage lacks the other stages' tensors).
inline void check_model_holds_checkpoint(const std::vector<std::string>& missing, const std::string& dir) {
  std::map<std::string, size_t> lacking;  // tensor -> ranks lacking it
  for (const auto& lines : missing) {
    std::stringstream list(lines);
    for (std::string name; std::getline(list, name);) ++lacking[name];
  }
  for (const auto& [name, ranks] : lacking)
    TORCH_CHECK(ranks < missing.size(), "titan checkpoint: '", dir, "' holds tensor '", name,
                "' that the model does not have (a checkpoint of a different model?)");
}

/// Every read of a load, by target: the reads of target i are reads[first_read[i] .. first_read[i + 1]).
struct ReadPlan {
  std::map<std::string, std::unique_ptr<PosixFile>> files;
  std::vector<ShardRead> reads;
  std::vector<size_t> first_read;  // [targets + 1]
};

inline ReadPlan plan_reads(LoadPlan& plan, const CheckpointMetadata& meta, const std::string& dir) {
  ReadPlan reads;
  for (auto& target : plan.targets) {
    reads.first_read.push_back(reads.reads.size());
    plan_target_reads(target, *meta.find(target.name), dir, meta.block_bytes, kIoPieceBytes, reads.files, reads.reads);
  }
  reads.first_read.push_back(reads.reads.size());
  return reads;
}

/// Runs the reads of targets [begin, end) on `io_threads` threads (~8 MiB positioned reads, each
/// checked by the thread reading it): into their staged tensors, allocated here, when `keep`;
/// else only checking. `done(i)` is called once target i's reads are all done.
inline void run_target_reads(LoadPlan& plan, const ReadPlan& reads, size_t begin, size_t end, int64_t block_bytes,
                             int io_threads, bool keep, const std::function<void(size_t)>& done) {
  if (keep)
    for (size_t i = begin; i < end; ++i)
      plan.targets[i].staged = at::empty(plan.targets[i].box.sizes, at::TensorOptions().dtype(plan.targets[i].dtype));  // [box.sizes]
  std::vector<std::atomic<size_t>> remaining(end - begin);
  for (size_t i = begin; i < end; ++i) {
    remaining[i - begin] = reads.first_read[i + 1] - reads.first_read[i];
    if (remaining[i - begin] == 0) done(i);
  }
  const size_t first = reads.first_read[begin];
  run_tasks(io_threads, reads.first_read[end] - first, [&](size_t k) {
    const ShardRead& read = reads.reads[first + k];
    run_shard_read(read, block_bytes, keep);
    const auto i = static_cast<size_t>(read.target - plan.targets.data());
    if (--remaining[i - begin] == 0) done(i);
  });
}

/// Stage (every rank, before anything is overwritten): reads and checks every block each target
/// needs: into CPU staging tensors, or, when `bounded`, checking only (stage_and_apply_groups
/// reads again). Reports progress per target.
inline void stage_load_targets(LoadPlan& plan, const ReadPlan& reads, const CheckpointMetadata& meta, bool bounded,
                               const LoadOptions& options) {
  std::mutex progress_mutex;
  int64_t done = 0, bytes = 0;
  run_target_reads(plan, reads, 0, plan.targets.size(), meta.block_bytes, io_threads_or_default(options.io_threads()),
                   !bounded, [&](size_t i) {
                     if (!options.on_progress()) return;
                     std::lock_guard<std::mutex> lock(progress_mutex);
                     bytes += plan.targets[i].bytes();
                     options.on_progress()(++done, static_cast<int64_t>(plan.targets.size()), bytes);
                   });
}

/// Bytes of host staging all targets need at once.
inline int64_t staging_bytes(const LoadPlan& plan) {
  int64_t bytes = 0;
  for (const auto& target : plan.targets) bytes += target.bytes();
  return bytes;
}

/// After a checking-only stage: stages groups of consecutive targets of at most `max_bytes` (or
/// one larger target) and applies each group before staging the next.
inline void stage_and_apply_groups(LoadPlan& plan, const ReadPlan& reads, const CheckpointMetadata& meta,
                                   int64_t max_bytes, int io_threads) {
  for (size_t begin = 0; begin < plan.targets.size();) {
    size_t end = begin;
    int64_t bytes = 0;
    while (end < plan.targets.size()) {
      const int64_t next = plan.targets[end].bytes();
      if (end > begin && bytes + next > max_bytes) break;
      bytes += next;
      ++end;
    }
    run_target_reads(plan, reads, begin, end, meta.block_bytes, io_threads, /*keep=*/true, [](size_t) {});
    for (size_t i = begin; i < end; ++i) {
      plan.targets[i].apply(plan.targets[i].staged);
      plan.targets[i].staged = at::Tensor();
    }
    begin = end;
  }
}

/// Apply (every rank has staged everything): overwrites the model, installs the optimizer states
/// and learning rates, restores the components, and fills `state`'s extra and rank_extra.
/// `targets_applied`: stage_and_apply_groups has already copied the targets into place.
inline void apply_load(LoadPlan& plan, TrainState& state, const CheckpointMetadata& meta, const ProcessGroupPtr& group,
                       bool targets_applied) {
  if (!targets_applied)
    for (auto& target : plan.targets) target.apply(target.staged);
  if (state.optimizer != nullptr) {
    std::unordered_map<const void*, std::string> names;
    for (auto& [name, tensor] : sharded_parameters(*state.model)) names.emplace(tensor.local.unsafeGetTensorImpl(), name);
    auto& groups = state.optimizer->param_groups();
    for (size_t i = 0; i < groups.size(); ++i) {
      groups[i].options().set_lr(std::strtod(meta.extra.at("titan.optimizer.lr." + std::to_string(i)).c_str(), nullptr));
      for (const auto& param : groups[i].params()) {
        auto* key = param.unsafeGetTensorImpl();
        auto fresh = plan.optimizer_states.find(names.at(key));
        if (fresh == plan.optimizer_states.end()) {
          state.optimizer->state().erase(key);
        } else {
          state.optimizer->state()[key] = std::move(fresh->second);
        }
      }
    }
  }
  for (auto& [stateful, fresh] : plan.components) stateful->load_state(fresh);
  state.extra.clear();
  for (const auto& [key, value] : meta.extra)
    if (key.rfind("titan.", 0) != 0) state.extra[key] = value;
  const int rank = group->global_ranks()[static_cast<size_t>(group->rank())];
  state.rank_extra.clear();
  if (meta.world_size == group->size() && static_cast<size_t>(rank) < meta.rank_extra.size())
    state.rank_extra = meta.rank_extra[static_cast<size_t>(rank)];
}

}  // namespace detail

/// Loads checkpoint directory `dir` into `state` on every rank of `group` (a collective): collect
/// the targets, validate them against the metadata, stage (read only the saved blocks overlapping
/// this rank's blocks, checking their checksums), and only when every rank got that far, apply.
/// A failure on any rank fails every rank with nothing overwritten. Returns the metadata.
inline CheckpointMetadata load_checkpoint(const std::string& dir, TrainState& state, const ProcessGroupPtr& group,
                                          const LoadOptions& options = LoadOptions()) {
  detail::check_load_options(options, "LoadOptions");
  CheckpointMetadata meta;
  detail::LoadPlan plan;
  detail::ReadPlan reads;
  bool bounded = false;
  std::string missing;
  all_ranks_or_none(group, [&] {
    meta = read_checkpoint_metadata(dir);
    plan = detail::collect_load_targets(state, meta, dir);
    detail::validate_load_targets(plan, meta, dir);
    missing = detail::missing_model_tensors(plan, state, meta);
  });
  detail::check_model_holds_checkpoint(all_gather_strings(group, missing), dir);
  all_ranks_or_none(group, [&] {
    reads = detail::plan_reads(plan, meta, dir);
    bounded = options.max_staging_bytes() > 0 && detail::staging_bytes(plan) > options.max_staging_bytes();
    detail::stage_load_targets(plan, reads, meta, bounded, options);
  });
  if (bounded)
    detail::stage_and_apply_groups(plan, reads, meta, options.max_staging_bytes(),
                                   detail::io_threads_or_default(options.io_threads()));
  detail::apply_load(plan, state, meta, group, /*targets_applied=*/bounded);
  return meta;
}

}  // namespace titan
