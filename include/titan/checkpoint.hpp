#pragma once
// titan/checkpoint.hpp: distributed checkpoints that reshard on load (titan's take on PyTorch DCP).
//
//   titan::CheckpointManager ckpt(world, titan::CheckpointOptions("runs/ckpt").interval(500)
//                                            .keep_latest_k(3).async(true));
//   titan::TrainState state;  state.model = model.get();  state.optimizer = &optimizer;
//   state.add("data", loader);                                  // any titan::Stateful, by name
//   if (auto step = ckpt.load_latest(state)) start = *step;   // resumes on any mesh
//   for (step = start + 1; ...) { train(); ckpt.maybe_save(step, state); }
//   ckpt.wait();
//
// A checkpoint is a directory <folder>/step-<N>/ holding one safetensors file per rank that owns
// data (rank-<r>.safetensors: only that rank's shards, a replicated tensor once) and metadata.json,
// written last by rank 0: per tensor its global shape, dtype, placement and every shard's offsets,
// sizes, file, byte range and CRC-32 per block. A loader computes its own rectangle of each tensor
// (TensorLayout::local_box) and reads only the blocks of the saved shards that overlap it, so a
// checkpoint saved on one mesh loads on any other. docs/checkpoint.md specifies the format.
//
// Safety: files go to <folder>/.tmp-step-<N>/ and are fsynced; after every rank is done rank 0
// writes metadata.json, renames the directory into place and atomically updates <folder>/latest.
// A crash mid-save leaves earlier checkpoints intact. Loading validates every tensor (names,
// shapes, dtypes, files, sizes, checksums) on every rank before it overwrites anything.

#include <titan/collectives.hpp>
#include <titan/detail/checkpoint_io.hpp>
#include <titan/detail/json.hpp>
#include <titan/detail/optimizer_state.hpp>
#include <titan/safetensors.hpp>
#include <titan/sharding.hpp>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace titan {

/// Version of the checkpoint format written by this header (metadata.json "version").
inline constexpr int64_t kCheckpointVersion = 1;

/// One saved block of a tensor: where it sits in the global tensor and in which file.
struct ShardRecord {
  std::vector<int64_t> offsets;  ///< start of the block in the global tensor, per dimension
  std::vector<int64_t> sizes;    ///< extent of the block, per dimension
  std::string file;              ///< file name inside the checkpoint directory
  std::string key;               ///< the block's name in that safetensors file
  int64_t begin = 0;             ///< first byte of the block's row-major data in `file`
  int64_t end = 0;               ///< one past its last byte
  std::vector<uint32_t> crc32;   ///< CRC-32 of each block_bytes-sized piece of [begin, end)
};

/// Everything saved about one tensor.
struct TensorRecord {
  std::string name;
  std::string dtype;                  ///< safetensors dtype name ("F32", "BF16", ...)
  std::vector<int64_t> shape;         ///< global shape
  std::string placement;              ///< TensorLayout::placement() of the saving rank
  std::vector<ShardRecord> shards;    ///< disjoint blocks covering the tensor
};

/// The contents of metadata.json.
struct CheckpointMetadata {
  int64_t version = kCheckpointVersion;
  int64_t step = 0;
  int64_t world_size = 1;                              ///< ranks that saved it
  int64_t block_bytes = 0;                             ///< checksum granularity
  std::vector<TensorRecord> tensors;                   ///< in save order
  std::map<std::string, std::string> extra;            ///< rank 0's extra state
  std::vector<std::map<std::string, std::string>> rank_extra;  ///< each saving rank's own state

  /// The record of tensor `name`, or nullptr.
  const TensorRecord* find(const std::string& name) const {
    for (const auto& tensor : tensors)
      if (tensor.name == name) return &tensor;
    return nullptr;
  }
};

/// The state of a checkpointed component: small strings, the same on every rank (rank 0's are
/// saved), and tensors with their layouts (replicated or sharded).
struct ComponentState {
  std::map<std::string, std::string> values;
  ShardedStateDict tensors;
};

/// A part of the training state besides the model and optimizer that checkpoints save and restore
/// by name: a data loader, a random generator, an LR schedule (titan::TrainState::add).
class Stateful {
 public:
  virtual ~Stateful() = default;
  /// The state to save. A load overwrites the local tensors of a fresh state() and hands it to
  /// load_state, so they must have the saved shapes.
  virtual ComponentState state() const = 0;
  /// Restores a state that state() produced.
  virtual void load_state(const ComponentState& state) = 0;
};

/// What a checkpoint saves and restores. Loading fills these in place (the model's parameters and
/// buffers, the optimizer's state, the components, `tensors`, `extra` and `rank_extra`).
struct TrainState {
  /// Parameters (with their layouts from titan::sharded_parameters) and buffers (replicated),
  /// saved as "model.<name>".
  torch::nn::Module* model = nullptr;
  /// A LibTorch AdamW, Adam, SGD, Adagrad or RMSprop over parameters of `model`; its per-parameter
  /// state is saved by parameter name ("optim.<name>.exp_avg", ...), sharded like the parameter,
  /// plus each group's learning rate.
  torch::optim::Optimizer* optimizer = nullptr;
  /// Named components (add()): tensors saved as "component.<name>.<key>", values in the
  /// metadata's extra state. A load fails if the checkpoint lacks a registered component.
  std::vector<std::pair<std::string, Stateful*>> components;
  /// More tensors to save as "extra.<name>". On load their local tensors are overwritten, so they
  /// must already have the right shape.
  ShardedStateDict tensors;
  /// Small global state as strings (step, resolved config): rank 0's copy is saved.
  std::map<std::string, std::string> extra;
  /// This rank's own state. On load it is the saved state of the same rank when the world size is
  /// unchanged, else empty (read all of them from the metadata).
  std::map<std::string, std::string> rank_extra;

  /// Registers `component` under `name` (letters, digits and '_'; unique). It must outlive the
  /// saves and loads of this TrainState.
  TrainState& add(const std::string& name, Stateful& component) {
    auto plain = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    TORCH_CHECK(!name.empty() && std::all_of(name.begin(), name.end(), plain), "titan::TrainState::add: component ",
                "name '", name, "' must be letters, digits and '_'");
    for (const auto& [other, _] : components)
      TORCH_CHECK(other != name, "titan::TrainState::add: a component named '", name, "' is already registered");
    components.emplace_back(name, &component);
    return *this;
  }
};

/// Progress of a load: tensors staged so far, of how many, and the bytes staged so far (this rank).
using LoadProgressFn = std::function<void(int64_t tensors_done, int64_t tensors_total, int64_t bytes_done)>;

/// Options of CheckpointManager, with chained setters.
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
  /// Threads per rank writing a save's file and reading a load's (0: the cores, at most 4). Each
  /// writes or reads pieces of about 8 MiB and checksums what it wrote or read.
  TORCH_ARG(int, io_threads) = 0;
  /// Called with the path of every file a save has written and fsynced (progress, tests).
  TORCH_ARG(std::function<void(const std::string&)>, on_file_written);
  /// Called after each tensor a load has read and checked (a progress display for long loads).
  TORCH_ARG(LoadProgressFn, on_load_progress);
  /// Host memory a load may use to stage this rank's tensors (0: as much as they take); see
  /// LoadOptions::max_staging_bytes.
  TORCH_ARG(int64_t, max_staging_bytes) = 0;
};

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

/// A block to save: its tensor's name, its key in the rank's file, this rank's contiguous CPU copy
/// of it and its place in the global tensor.
struct SaveEntry {
  std::string name;
  std::string key;  ///< the tensor's name, with "#<k>" for the k-th block of a fused layout
  at::Tensor data;  ///< [box.sizes], contiguous, CPU
  std::string dtype;
  std::vector<int64_t> shape;
  std::string placement;
  TensorBox box;
};

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

inline std::string step_dir_name(int64_t step) { return "step-" + std::to_string(step); }

inline json::Value int_array(const std::vector<int64_t>& values) {
  json::Value array = json::Array{};
  for (auto v : values) array.push_back(v);
  return array;
}

inline std::vector<int64_t> read_int_array(const json::Value& value) {
  std::vector<int64_t> result;
  for (const auto& v : value.as_array()) result.push_back(v.as_int());
  return result;
}

inline json::Value string_map(const std::map<std::string, std::string>& values) {
  json::Value object = json::Object{};
  for (const auto& [k, v] : values) object[k] = v;
  return object;
}

inline std::map<std::string, std::string> read_string_map(const json::Value& value) {
  std::map<std::string, std::string> result;
  for (const auto& [k, v] : value.as_object()) result[k] = v.as_string();
  return result;
}

inline std::string box_text(const TensorBox& box) {
  return c10::str("offsets ", c10::IntArrayRef(box.offsets), " sizes ", c10::IntArrayRef(box.sizes));
}

inline constexpr const char* kComponentPrefix = "titan.component.";

/// Each component of `state` with its current state (state() is called once per save).
using ComponentStates = std::vector<std::pair<std::string, ComponentState>>;
inline ComponentStates component_states(const TrainState& state) {
  ComponentStates states;
  for (const auto& [name, stateful] : state.components) states.emplace_back(name, stateful->state());
  return states;
}

/// Parameters (with layouts) and buffers of `model`, optimizer state by parameter name, the
/// components' tensors and the extra tensors of `state`, as named sharded tensors.
inline std::vector<std::pair<std::string, ShardedTensor>> state_tensors(const TrainState& state,
                                                                       const ComponentStates& components = {}) {
  std::vector<std::pair<std::string, ShardedTensor>> result;
  std::unordered_map<const void*, std::pair<std::string, ShardedTensor>> by_impl;
  if (state.model != nullptr) {
    for (auto& [name, tensor] : sharded_parameters(*state.model)) {
      by_impl.emplace(tensor.local.unsafeGetTensorImpl(), std::make_pair(name, tensor));
      result.emplace_back("model." + name, tensor);
    }
    for (const auto& buffer : state.model->named_buffers(/*recurse=*/true))
      result.emplace_back("model." + buffer.key(), replicated(buffer.value()));
  }
  if (state.optimizer != nullptr) {
    TORCH_CHECK(state.model != nullptr, "titan checkpoint: TrainState has an optimizer but no model "
                "(optimizer state is saved by parameter name)");
    auto& optimizer = *state.optimizer;
    const auto& kind = optimizer_kind(optimizer, "titan checkpoint");
    for (const auto& group : optimizer.param_groups()) {
      for (const auto& param : group.params()) {
        auto found = by_impl.find(param.unsafeGetTensorImpl());
        TORCH_CHECK(found != by_impl.end(), "titan checkpoint: the optimizer holds a parameter of shape ",
                    param.sizes(), " that is not a parameter of the model (built before fully_shard? see ",
                    "titan::verify_optimizer)");
        const auto& [name, sharded] = found->second;
        auto it = optimizer.state().find(param.unsafeGetTensorImpl());
        if (it == optimizer.state().end()) continue;  // not stepped yet
        for (const auto& [key, tensor] : kind.tensors(*it->second))
          result.emplace_back("optim." + name + "." + key, ShardedTensor{tensor, sharded.layout, sharded.blocks});
        if (kind.has_step)
          result.emplace_back("optim." + name + ".step", replicated(at::scalar_tensor(kind.step(*it->second), at::kLong)));
      }
    }
  }
  for (const auto& [component, saved] : components)
    for (const auto& [key, tensor] : saved.tensors) result.emplace_back("component." + component + "." + key, tensor);
  for (const auto& [name, tensor] : state.tensors) result.emplace_back("extra." + name, tensor);
  return result;
}

/// A double as exact text ("%a") and back.
inline std::string exact_double(double value) {
  char text[64];
  std::snprintf(text, sizeof(text), "%a", value);
  return text;
}

/// Global extra state of `state`, plus the optimizer's kind and learning rates and the components'
/// values (under "titan.").
inline std::map<std::string, std::string> state_extra(const TrainState& state, const ComponentStates& components) {
  auto extra = state.extra;
  for (const auto& [key, value] : extra)
    TORCH_CHECK(key.rfind("titan.", 0) != 0, "titan checkpoint: extra state key '", key,
                "' starts with 'titan.', which is reserved");
  if (state.optimizer != nullptr) {
    extra["titan.optimizer"] = optimizer_kind(*state.optimizer, "titan checkpoint").name;
    const auto& groups = state.optimizer->param_groups();
    for (size_t i = 0; i < groups.size(); ++i)
      extra["titan.optimizer.lr." + std::to_string(i)] = exact_double(groups[i].options().get_lr());
  }
  for (const auto& [component, saved] : components) {
    extra[kComponentPrefix + component] = "";  // present even when it has no values
    for (const auto& [key, value] : saved.values) extra[kComponentPrefix + component + "." + key] = value;
  }
  return extra;
}

/// The JSON of this rank's save plan: which blocks of which tensors it holds.
inline std::string plan_json(const std::vector<SaveEntry>& entries, const std::map<std::string, std::string>& rank_extra) {
  json::Value plan = json::Object{};
  plan["tensors"] = json::Array{};
  for (const auto& e : entries) {
    json::Value t = json::Object{};
    t["name"] = e.name;
    t["dtype"] = e.dtype;
    t["shape"] = int_array(e.shape);
    t["placement"] = e.placement;
    t["offsets"] = int_array(e.box.offsets);
    t["sizes"] = int_array(e.box.sizes);
    plan["tensors"].push_back(std::move(t));
  }
  plan["rank_extra"] = string_map(rank_extra);
  return json::dump(plan);
}

/// One distinct block of a tensor and the rank that writes it.
struct PlannedBlock {
  int rank;
  TensorBox box;
};

/// A tensor as the ranks' plans describe it.
struct PlannedTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string placement;  ///< as announced by the first rank holding it
  std::vector<PlannedBlock> blocks;
};

inline bool boxes_overlap(const TensorBox& a, const TensorBox& b) {
  for (size_t d = 0; d < a.sizes.size(); ++d)
    if (std::max(a.offsets[d], b.offsets[d]) >= std::min(a.offsets[d] + a.sizes[d], b.offsets[d] + b.sizes[d]))
      return false;
  return true;
}

/// Checks every rank's plan and decides who writes what: each distinct non-empty block is written
/// by the lowest rank holding it. Returns the tensors in first-seen order.
inline std::vector<PlannedTensor> resolve_plans(const std::vector<std::string>& plans) {
  std::vector<PlannedTensor> tensors;
  std::map<std::string, size_t> index;
  for (size_t r = 0; r < plans.size(); ++r) {
    auto plan = json::parse(plans[r], "checkpoint plan of rank " + std::to_string(r));
    for (const auto& t : plan.at("tensors").as_array()) {
      const auto& name = t.at("name").as_string();
      PlannedTensor announced{name, t.at("dtype").as_string(), read_int_array(t.at("shape")),
                              t.at("placement").as_string(), {}};
      auto [it, inserted] = index.emplace(name, tensors.size());
      if (inserted) tensors.push_back(announced);
      auto& tensor = tensors[it->second];
      TORCH_CHECK(tensor.shape == announced.shape && tensor.dtype == announced.dtype, "titan checkpoint: tensor '",
                  name, "' is ", tensor.dtype, c10::IntArrayRef(tensor.shape), " on one rank but ", announced.dtype,
                  c10::IntArrayRef(announced.shape), " on rank ", r);
      PlannedBlock block{static_cast<int>(r), TensorBox{read_int_array(t.at("offsets")), read_int_array(t.at("sizes"))}};
      TORCH_CHECK(block.box.sizes.size() == tensor.shape.size() && block.box.offsets.size() == tensor.shape.size(),
                  "titan checkpoint: rank ", r, " holds a block of tensor '", name, "' of the wrong rank");
      if (block.box.numel() == 0) continue;
      auto& blocks = tensor.blocks;
      bool duplicate = false;
      for (const auto& other : blocks) {
        if (other.box.offsets == block.box.offsets && other.box.sizes == block.box.sizes) {
          TORCH_CHECK(other.rank != block.rank, "titan checkpoint: rank ", r, " saves tensor '", name, "' twice");
          duplicate = true;
          break;
        }
        TORCH_CHECK(!boxes_overlap(other.box, block.box), "titan checkpoint: tensor '", name, "': the block of rank ", r,
                    " (", box_text(block.box), ") overlaps that of rank ", other.rank, " (", box_text(other.box), ")");
      }
      if (!duplicate) blocks.push_back(std::move(block));
    }
  }
  for (const auto& tensor : tensors) {
    int64_t total = 1, covered = 0;
    for (auto s : tensor.shape) total *= s;
    for (const auto& b : tensor.blocks) covered += b.box.numel();
    TORCH_CHECK(covered == total, "titan checkpoint: the ranks' blocks of tensor '", tensor.name, "' cover ", covered,
                " of its ", total, " elements (is a shard level missing from its layout?)");
  }
  return tensors;
}

/// Writes this rank's blocks to `dir/file` as a safetensors file (fsynced) on `io_threads`
/// threads, each computing the checksums of the blocks it writes; returns their shard records
/// (offsets, sizes, byte range, block checksums) in the order of `entries`.
inline std::vector<ShardRecord> write_shard_file(const std::string& dir, const std::string& file,
                                                 const std::vector<const SaveEntry*>& entries, int64_t block_bytes,
                                                 int io_threads) {
  safetensors::NamedTensors named;
  std::vector<ShardRecord> records;
  for (const auto* e : entries) {
    named.emplace_back(e->key, e->data);
    const int64_t size = static_cast<int64_t>(e->data.nbytes());
    records.push_back(ShardRecord{e->box.offsets, e->box.sizes, file, e->key, 0, size, {}});
    records.back().crc32.resize(static_cast<size_t>((size + block_bytes - 1) / block_bytes));
  }
  // Pieces of whole checksum blocks, about kIoPieceBytes: each block's checksum is computed by the
  // thread writing it, just before the write, while its bytes are in the cache.
  const int64_t piece_bytes = block_bytes * std::max<int64_t>(1, kIoPieceBytes / block_bytes);
  const int64_t data_begin = safetensors::detail::write_file(
      dir + "/" + file, named, {{"format", "pt"}}, io_threads, piece_bytes,
      [&](size_t k, int64_t begin, const uint8_t* bytes, int64_t size) {
        auto& crcs = records[k].crc32;
        for (int64_t done = 0; done < size; done += block_bytes)
          crcs[static_cast<size_t>((begin + done) / block_bytes)] =
              crc32(bytes + done, static_cast<size_t>(std::min(block_bytes, size - done)));
      },
      /*durable=*/true);
  int64_t position = data_begin;  // the data section, in entry order, ends the file
  for (auto& record : records) {
    const int64_t size = record.end;
    record.begin = position;
    record.end = position + size;
    position += size;
  }
  return records;
}

inline json::Value shard_json(const ShardRecord& r) {
  json::Value v = json::Object{};
  v["offsets"] = int_array(r.offsets);
  v["sizes"] = int_array(r.sizes);
  v["file"] = r.file;
  v["key"] = r.key;
  v["begin"] = r.begin;
  v["end"] = r.end;
  v["crc32"] = json::Array{};
  for (auto c : r.crc32) v["crc32"].push_back(static_cast<int64_t>(c));
  return v;
}

/// A rank's written shards for rank 0: [{"name": ..., "shard": {...}}, ...].
inline json::Value records_json(const std::vector<std::pair<std::string, ShardRecord>>& records) {
  json::Value array = json::Array{};
  for (const auto& [name, r] : records) {
    json::Value v = json::Object{};
    v["name"] = name;
    v["shard"] = shard_json(r);
    array.push_back(std::move(v));
  }
  return array;
}

inline json::Value metadata_json(const CheckpointMetadata& meta) {
  json::Value root = json::Object{};
  root["format"] = "titan-checkpoint";
  root["version"] = meta.version;
  root["step"] = meta.step;
  root["world_size"] = meta.world_size;
  root["block_bytes"] = meta.block_bytes;
  root["checksum"] = "crc32";
  root["tensors"] = json::Array{};
  for (const auto& t : meta.tensors) {
    json::Value v = json::Object{};
    v["name"] = t.name;
    v["dtype"] = t.dtype;
    v["shape"] = int_array(t.shape);
    v["placement"] = t.placement;
    v["shards"] = json::Array{};
    for (const auto& s : t.shards) v["shards"].push_back(shard_json(s));
    root["tensors"].push_back(std::move(v));
  }
  root["extra"] = string_map(meta.extra);
  root["rank_extra"] = json::Array{};
  for (const auto& r : meta.rank_extra) root["rank_extra"].push_back(string_map(r));
  return root;
}

/// A shard record; `tensor` is the default of "key" (absent in checkpoints of titan 0.1).
inline ShardRecord read_shard_record(const json::Value& v, const std::string& tensor) {
  const auto* key = v.find("key");
  ShardRecord r{read_int_array(v.at("offsets")), read_int_array(v.at("sizes")), v.at("file").as_string(),
                key ? key->as_string() : tensor, v.at("begin").as_int(), v.at("end").as_int(), {}};
  for (const auto& c : v.at("crc32").as_array()) r.crc32.push_back(static_cast<uint32_t>(c.as_int()));
  return r;
}

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

}  // namespace detail

/// Reads and checks `dir`/metadata.json; errors name the file.
inline CheckpointMetadata read_checkpoint_metadata(const std::string& dir) {
  const std::string path = dir + "/metadata.json";
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "titan checkpoint: '", path, "' is missing: '", dir, "' is not a complete checkpoint");
  std::stringstream text;
  text << in.rdbuf();
  CheckpointMetadata meta;
  try {
    auto root = json::parse(text.str(), path);
    TORCH_CHECK(root.at("format").as_string() == "titan-checkpoint", "format is '", root.at("format").as_string(),
                "', expected 'titan-checkpoint'");
    meta.version = root.at("version").as_int();
    TORCH_CHECK(meta.version == kCheckpointVersion, "version ", meta.version, " is not supported (this titan reads ",
                kCheckpointVersion, ")");
    TORCH_CHECK(root.at("checksum").as_string() == "crc32", "unknown checksum '", root.at("checksum").as_string(), "'");
    meta.step = root.at("step").as_int();
    meta.world_size = root.at("world_size").as_int();
    meta.block_bytes = root.at("block_bytes").as_int();
    TORCH_CHECK(meta.block_bytes > 0, "block_bytes must be positive");
    for (const auto& t : root.at("tensors").as_array()) {
      TensorRecord record{t.at("name").as_string(), t.at("dtype").as_string(), detail::read_int_array(t.at("shape")),
                          t.at("placement").as_string(), {}};
      for (const auto& s : t.at("shards").as_array()) record.shards.push_back(detail::read_shard_record(s, record.name));
      meta.tensors.push_back(std::move(record));
    }
    meta.extra = detail::read_string_map(root.at("extra"));
    for (const auto& r : root.at("rank_extra").as_array()) meta.rank_extra.push_back(detail::read_string_map(r));
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "titan checkpoint: bad metadata '", path, "': ", e.msg());
  }
  return meta;
}

namespace detail {

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
  TORCH_CHECK(options.io_threads() >= 0, "titan: LoadOptions::io_threads must be >= 0 (0: automatic), got ",
              options.io_threads());
  TORCH_CHECK(options.max_staging_bytes() >= 0, "titan: LoadOptions::max_staging_bytes must be >= 0 (0: no limit), got ",
              options.max_staging_bytes());
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

/// Blocks until the work queued so far on `device`'s current stream is done.
inline void wait_for_stream(const c10::Device& device) {
  c10::impl::VirtualGuardImpl guard(device.type());
  guard.getStream(device).synchronize();
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
    TORCH_CHECK(options_.io_threads() >= 0, "titan: CheckpointOptions::io_threads must be >= 0 (0: automatic), got ",
                options_.io_threads());
    TORCH_CHECK(options_.max_staging_bytes() >= 0, "titan: CheckpointOptions::max_staging_bytes must be >= 0 (0: no ",
                "limit), got ", options_.max_staging_bytes());
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
    auto meta = load_checkpoint(options_.folder() + "/" + detail::step_dir_name(step), state, group_,
                                LoadOptions()
                                    .on_progress(options_.on_load_progress())
                                    .io_threads(options_.io_threads())
                                    .max_staging_bytes(options_.max_staging_bytes()));
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
