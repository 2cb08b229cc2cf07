#pragma once
// titan/checkpoint/save.hpp: save planning (each rank's plan of its blocks, which rank writes each
// distinct block) and writing a rank's checksummed safetensors file and its shard records.

#include <titan/checkpoint/format.hpp>
#include <titan/detail/checkpoint_io.hpp>
#include <titan/detail/json.hpp>
#include <titan/safetensors.hpp>
#include <titan/sharding.hpp>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace titan {
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

}  // namespace detail
}  // namespace titan
