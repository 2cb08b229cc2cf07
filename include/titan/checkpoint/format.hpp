#pragma once
// titan/checkpoint/format.hpp: the on-disk format: step-<N>/ directory names, the records of
// metadata.json (CheckpointMetadata), their JSON, and read_checkpoint_metadata.

#include <titan/detail/json.hpp>
#include <titan/sharding.hpp>

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
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

namespace detail {

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

}  // namespace titan
