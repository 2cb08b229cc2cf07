#pragma once
// titan/safetensors.hpp: read and write the safetensors format (https://github.com/huggingface/safetensors)
// and Hugging Face's sharded checkpoints (model.safetensors.index.json).
//
// File layout: 8 bytes little-endian N, then N bytes of JSON header
//   {"__metadata__": {"k": "v"}, "name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, ...}
// then the data section; data_offsets are [begin, end) byte offsets into it, tensors are row-major.
//
//   titan::safetensors::File file("model.safetensors");            // memory-mapped, header validated
//   at::Tensor w = file.read("output.weight");                      // a CPU copy
//   at::Tensor rows = file.read_slice("output.weight", {128, 0}, {64, 4096});  // only those bytes
//   titan::safetensors::save("out.safetensors", {{"w", w}}, {{"format", "pt"}});
//
//   titan::safetensors::Reader ckpt("hf_dir");   // model.safetensors or model.safetensors.index.json
//   titan::safetensors::save_sharded("out_dir", tensors, SaveOptions().max_shard_bytes(5 << 30));
//       // tensors: NamedTensors, or LazyTensors made file by file (bounded memory for big exports)
//
// Reading maps the file with mmap and copies out only the requested rectangle, so per-rank loading
// of a sharded parameter touches only the pages of its block. Every error names the file, and the
// tensor where one is involved. Depends on LibTorch and POSIX only.

#include <titan/detail/checkpoint_io.hpp>
#include <titan/detail/json.hpp>

#include <ATen/ATen.h>
#include <torch/arg.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace titan::safetensors {

/// The safetensors dtype names and their ATen types.
inline const std::vector<std::pair<std::string, at::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, at::ScalarType>> table = {
      {"F64", at::kDouble},   {"F32", at::kFloat},  {"F16", at::kHalf},  {"BF16", at::kBFloat16},
      {"I64", at::kLong},     {"I32", at::kInt},    {"I16", at::kShort}, {"I8", at::kChar},
      {"U8", at::kByte},      {"BOOL", at::kBool},  {"F8_E4M3", at::kFloat8_e4m3fn},
      {"F8_E5M2", at::kFloat8_e5m2}};
  return table;
}

/// The ATen type of safetensors dtype `name` ("F32", "BF16", ...); `where` prefixes the error.
inline at::ScalarType dtype_from_name(const std::string& name, const std::string& where) {
  for (const auto& [n, t] : dtype_table())
    if (n == name) return t;
  std::string known;
  for (const auto& entry : dtype_table()) known += (known.empty() ? "" : ", ") + entry.first;
  TORCH_CHECK(false, where, ": unknown dtype \"", name, "\" (supported: ", known, ")");
}

/// The safetensors name of ATen type `type`; an error for types the format cannot hold.
inline std::string dtype_name(at::ScalarType type) {
  for (const auto& [n, t] : dtype_table())
    if (t == type) return n;
  TORCH_CHECK(false, "safetensors: dtype ", type, " cannot be stored in safetensors");
}

/// One tensor's entry in a safetensors header.
struct TensorInfo {
  std::string name;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< byte offset of the first element in the data section
  uint64_t end = 0;    ///< one past the last byte
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

namespace detail {

/// A read-only memory mapping of a whole file, unmapped on destruction.
class Mapping {
 public:
  explicit Mapping(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    TORCH_CHECK(fd >= 0, "safetensors: cannot open ", path, ": ", std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int err = errno;
      ::close(fd);
      TORCH_CHECK(false, "safetensors: cannot stat ", path, ": ", std::strerror(err));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      int err = errno;
      ::close(fd);
      TORCH_CHECK(p != MAP_FAILED, "safetensors: cannot map ", path, ": ", std::strerror(err));
      data_ = static_cast<const uint8_t*>(p);
    } else {
      ::close(fd);
    }
  }
  ~Mapping() {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  /// Asks the kernel to read [offset, offset + bytes) ahead, in large requests, before the pages
  /// are touched (a cold copy out of the mapping otherwise reads page fault by page fault).
  void prefetch(size_t offset, size_t bytes) const {
    if (data_ == nullptr || bytes == 0) return;
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    const size_t begin = offset / page * page;
    (void)::madvise(const_cast<uint8_t*>(data_) + begin, std::min(size_, offset + bytes) - begin, MADV_WILLNEED);
  }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

inline std::vector<int64_t> int_list(const json::Value& v, const std::string& where, const char* field) {
  TORCH_CHECK(v.is_array(), where, ": \"", field, "\" must be an array of integers, got ", v.type_name());
  std::vector<int64_t> out;
  for (const auto& e : v.as_array()) {
    TORCH_CHECK(e.is_int() && e.as_int() >= 0, where, ": \"", field, "\" must hold non-negative integers");
    out.push_back(e.as_int());
  }
  return out;
}

}  // namespace detail

/// A safetensors file opened for reading (memory-mapped). The header is validated on open:
/// truncated files, a header length beyond the file size, malformed JSON, unknown dtypes, offsets
/// outside the data section or disagreeing with the shape, and overlapping tensors are errors
/// naming the file (and tensor).
class File {
 public:
  /// Opens and validates `path`.
  explicit File(std::string path) : path_(std::move(path)), map_(std::make_unique<detail::Mapping>(path_)) {
    const size_t size = map_->size();
    TORCH_CHECK(size >= 8, "safetensors: ", path_, " is truncated: ", size,
                " bytes, less than the 8-byte header length");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | map_->data()[i];
    TORCH_CHECK(n <= size - 8, "safetensors: ", path_, ": header length ", n, " goes beyond the file size ", size,
                " (truncated file?)");
    data_offset_ = 8 + n;
    const std::string where = "safetensors: " + path_;
    auto header = json::parse(std::string_view(reinterpret_cast<const char*>(map_->data()) + 8, n), where + " header");
    TORCH_CHECK(header.is_object(), where, ": header must be a JSON object");
    const uint64_t data_size = size - data_offset_;
    for (const auto& [name, entry] : header.as_object()) {
      if (name == "__metadata__") {
        TORCH_CHECK(entry.is_object(), where, ": __metadata__ must be an object of strings");
        for (const auto& [k, v] : entry.as_object()) {
          TORCH_CHECK(v.is_string(), where, ": __metadata__ value of \"", k, "\" must be a string");
          metadata_[k] = v.as_string();
        }
        continue;
      }
      const std::string tensor_where = where + ", tensor '" + name + "'";
      TORCH_CHECK(entry.is_object(), tensor_where, ": entry must be an object");
      TensorInfo info;
      info.name = name;
      const auto* dtype = entry.find("dtype");
      TORCH_CHECK(dtype && dtype->is_string(), tensor_where, ": missing string \"dtype\"");
      info.dtype = dtype_from_name(dtype->as_string(), tensor_where);
      const auto* shape = entry.find("shape");
      TORCH_CHECK(shape, tensor_where, ": missing \"shape\"");
      info.shape = detail::int_list(*shape, tensor_where, "shape");
      const auto* offsets = entry.find("data_offsets");
      TORCH_CHECK(offsets, tensor_where, ": missing \"data_offsets\"");
      auto range = detail::int_list(*offsets, tensor_where, "data_offsets");
      TORCH_CHECK(range.size() == 2 && range[0] <= range[1], tensor_where,
                  ": \"data_offsets\" must be [begin, end] with begin <= end");
      info.begin = static_cast<uint64_t>(range[0]);
      info.end = static_cast<uint64_t>(range[1]);
      TORCH_CHECK(info.end <= data_size, tensor_where, ": data_offsets [", info.begin, ", ", info.end,
                  "] out of range: the data section has ", data_size, " bytes (truncated file?)");
      const uint64_t expected = static_cast<uint64_t>(info.numel()) * at::elementSize(info.dtype);
      TORCH_CHECK(info.end - info.begin == expected, tensor_where, ": data_offsets span ", info.end - info.begin,
                  " bytes but shape ", c10::IntArrayRef(info.shape), " of ", dtype->as_string(), " needs ", expected);
      index_[name] = infos_.size();
      infos_.push_back(std::move(info));
    }
    std::vector<const TensorInfo*> by_offset;
    for (const auto& info : infos_) by_offset.push_back(&info);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (size_t i = 1; i < by_offset.size(); ++i)
      TORCH_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end, where, ": tensors '", by_offset[i - 1]->name,
                  "' and '", by_offset[i]->name, "' overlap");
  }

  /// The file's path as given.
  const std::string& path() const { return path_; }
  /// The tensors' entries in header order.
  const std::vector<TensorInfo>& tensors() const { return infos_; }
  /// The string map stored under "__metadata__" (empty if none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// True if the file holds tensor `name`.
  bool contains(const std::string& name) const { return index_.count(name) != 0; }

  /// The entry of tensor `name`; an error naming the file if it is absent.
  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    TORCH_CHECK(it != index_.end(), "safetensors: ", path_, " has no tensor '", name, "'");
    return infos_[it->second];
  }

  /// A CPU copy of tensor `name`.
  at::Tensor read(const std::string& name) const {
    const auto& i = info(name);
    return read_slice(name, std::vector<int64_t>(i.shape.size(), 0), i.shape);
  }

  /// A CPU copy of the rectangle [offsets, offsets + sizes) of tensor `name`; only the bytes of
  /// the rectangle are read from the file.
  at::Tensor read_slice(const std::string& name, c10::IntArrayRef offsets, c10::IntArrayRef sizes) const {
    const auto& i = info(name);
    TORCH_CHECK(offsets.size() == i.shape.size() && sizes.size() == i.shape.size(), "safetensors: ", path_,
                ", tensor '", name, "': a slice of a ", i.shape.size(), "-d tensor needs ", i.shape.size(),
                " offsets and sizes, got ", offsets.size(), " and ", sizes.size());
    for (size_t d = 0; d < i.shape.size(); ++d)
      TORCH_CHECK(offsets[d] >= 0 && sizes[d] >= 0 && offsets[d] + sizes[d] <= i.shape[d], "safetensors: ", path_,
                  ", tensor '", name, "': slice offsets ", offsets, " sizes ", sizes, " outside shape ",
                  c10::IntArrayRef(i.shape));
    auto options = at::TensorOptions().dtype(i.dtype);
    if (i.numel() == 0) return at::empty(sizes, options);
    const uint8_t* bytes = map_->data() + data_offset_ + i.begin;
    // The bytes between the slice's first and last element (all of them for a whole tensor).
    int64_t first = 0, last = 0, stride = 1;
    for (size_t d = i.shape.size(); d-- > 0;) {
      first += offsets[d] * stride;
      last += (offsets[d] + std::max<int64_t>(sizes[d], 1) - 1) * stride;
      stride *= i.shape[d];
    }
    const int64_t element = static_cast<int64_t>(at::elementSize(i.dtype));
    map_->prefetch(data_offset_ + i.begin + first * element, static_cast<size_t>((last - first + 1) * element));
    at::Tensor whole;
    if (reinterpret_cast<uintptr_t>(bytes) % at::elementSize(i.dtype) == 0) {
      // A view of the mapped bytes; only narrowed elements are copied out below.
      whole = at::from_blob(const_cast<uint8_t*>(bytes), i.shape, options);
    } else {  // misaligned for the element type (an unpadded header): copy the tensor's bytes first
      whole = at::empty(i.shape, options);
      std::memcpy(whole.data_ptr(), bytes, i.end - i.begin);
    }
    at::Tensor view = whole;
    for (size_t d = 0; d < i.shape.size(); ++d)
      view = view.narrow(static_cast<int64_t>(d), offsets[d], sizes[d]);
    return view.clone(at::MemoryFormat::Contiguous);
  }

 private:
  std::string path_;
  std::unique_ptr<detail::Mapping> map_;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> infos_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// Named tensors in a chosen order, as written to a file.
using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;
/// String metadata stored under "__metadata__".
using Metadata = std::map<std::string, std::string>;

namespace detail {

/// The bytes a safetensors file of `tensors` (in this order) starts with: the header's length and
/// the JSON header, padded with spaces to a multiple of 8 bytes so that every tensor starts 8-byte
/// aligned when the offsets are.
inline std::string file_header(const std::string& path, const NamedTensors& tensors, const Metadata& metadata) {
  json::Value header = json::Object{};
  if (!metadata.empty()) {
    json::Value meta = json::Object{};
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(!name.empty() && name != "__metadata__", "safetensors: ", path, ": invalid tensor name '", name, "'");
    TORCH_CHECK(!header.contains(name), "safetensors: ", path, ": duplicate tensor name '", name, "'");
    TORCH_CHECK(tensor.defined(), "safetensors: ", path, ": tensor '", name, "' is undefined");
    json::Value entry = json::Object{};
    entry["dtype"] = dtype_name(tensor.scalar_type());
    json::Value shape = json::Array{};
    for (auto s : tensor.sizes()) shape.push_back(s);
    entry["shape"] = std::move(shape);
    uint64_t bytes = static_cast<uint64_t>(tensor.numel()) * tensor.element_size();
    entry["data_offsets"] = json::Array{json::Value(offset), json::Value(offset + bytes)};
    offset += bytes;
    header[name] = std::move(entry);
  }
  std::string text = json::dump(header);
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(static_cast<uint64_t>(text.size()) >> (8 * i));
  return bytes + text;
}

/// Writes the safetensors file `path` (created or truncated) of `host_tensors` (CPU, contiguous):
/// the header, then every tensor's bytes on up to `io_threads` threads (titan::detail::write_spans;
/// span k is tensor k, `piece_bytes` per piece). Returns the file offset of the first tensor's
/// bytes. fsyncs the file when `durable`.
inline int64_t write_file(const std::string& path, const NamedTensors& host_tensors, const Metadata& metadata,
                          int io_threads, int64_t piece_bytes, const titan::detail::PieceFn& on_piece, bool durable) {
  const std::string header = file_header(path, host_tensors, metadata);
  titan::detail::PosixFile file(path, O_WRONLY | O_CREAT | O_TRUNC);
  file.write_at(header.data(), header.size(), 0);
  std::vector<titan::detail::WriteSpan> spans;
  int64_t offset = static_cast<int64_t>(header.size());
  for (const auto& [name, tensor] : host_tensors) {
    TORCH_CHECK(tensor.is_cpu() && tensor.is_contiguous(), "safetensors: ", path, ": tensor '", name,
                "' must be a contiguous CPU tensor here");
    const int64_t size = static_cast<int64_t>(tensor.nbytes());
    spans.push_back(titan::detail::WriteSpan{static_cast<const uint8_t*>(tensor.data_ptr()), size, offset});
    offset += size;
  }
  titan::detail::write_spans(file, spans, io_threads, piece_bytes, on_piece);
  if (durable) file.sync();
  return static_cast<int64_t>(header.size());
}

}  // namespace detail

/// Writes `tensors` (any device; written row-major) to `path` with `metadata`, on `io_threads`
/// threads (0: titan::default_io_threads()). Tensors on other devices are first copied to
/// CPU memory (all of them: save_sharded bounds that to one file). The file is written as
/// `path`.tmp and renamed, so a reader never sees a half-written file.
inline void save(const std::string& path, const NamedTensors& tensors, const Metadata& metadata = {}, int io_threads = 0) {
  NamedTensors host;
  for (const auto& [name, tensor] : tensors)
    host.emplace_back(name, tensor.defined() ? tensor.detach().to(at::kCPU).contiguous() : tensor);
  const std::string tmp = path + ".tmp";
  try {
    detail::write_file(tmp, host, metadata, titan::detail::io_threads_or_default(io_threads),
                       titan::detail::kIoPieceBytes, {}, /*durable=*/false);
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "safetensors: cannot rename ", tmp, " to ", path, ": ",
              std::strerror(errno));
}

/// The name of the index file of a sharded checkpoint.
inline constexpr const char* kIndexName = "model.safetensors.index.json";
/// The name of the single file of an unsharded checkpoint directory.
inline constexpr const char* kSingleName = "model.safetensors";

namespace detail {
inline bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
inline bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}
}  // namespace detail

/// A checkpoint made of one or more safetensors files: a .safetensors file, or a directory holding
/// model.safetensors or model.safetensors.index.json (whose "weight_map" names each tensor's file).
class Reader {
 public:
  /// Opens every file of the checkpoint at `path` and checks the index against them.
  explicit Reader(const std::string& path) : path_(path) {
    if (!detail::is_directory(path)) {
      add_single(path);
      return;
    }
    const std::string index = path + "/" + kIndexName;
    if (!detail::exists(index)) {
      const std::string single = path + "/" + kSingleName;
      TORCH_CHECK(detail::exists(single), "safetensors: ", path, " has neither ", kIndexName, " nor ", kSingleName);
      add_single(single);
      return;
    }
    auto index_json = json::load(index);
    TORCH_CHECK(index_json.is_object() && index_json.contains("weight_map") && index_json.at("weight_map").is_object(),
                index,
                ": expected an object with a \"weight_map\" object");
    std::map<std::string, size_t> opened;
    for (const auto& [name, file] : index_json.at("weight_map").as_object()) {
      TORCH_CHECK(file.is_string(), index, ": weight_map entry of '", name, "' must be a file name");
      auto it = opened.find(file.as_string());
      if (it == opened.end()) {
        const std::string file_path = path + "/" + file.as_string();
        TORCH_CHECK(detail::exists(file_path), index, ": tensor '", name, "' is mapped to ", file.as_string(),
                    ", which does not exist in ", path);
        add_file(file_path);
        it = opened.emplace(file.as_string(), files_.size() - 1).first;
      }
      TORCH_CHECK(files_[it->second]->contains(name), index, ": tensor '", name, "' is mapped to ",
                  files_[it->second]->path(), ", which does not hold it");
      where_[name] = it->second;
    }
  }

  /// The path given to the constructor.
  const std::string& path() const { return path_; }
  /// Names of all tensors, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& entry : where_) out.push_back(entry.first);
    return out;
  }
  /// True if the checkpoint holds tensor `name`.
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  /// The file holding tensor `name`; an error naming the checkpoint if it is absent.
  const File& file_of(const std::string& name) const {
    auto it = where_.find(name);
    TORCH_CHECK(it != where_.end(), "safetensors: checkpoint ", path_, " has no tensor '", name, "'");
    return *files_[it->second];
  }
  /// The header entry of tensor `name`.
  const TensorInfo& info(const std::string& name) const { return file_of(name).info(name); }
  /// A CPU copy of tensor `name`.
  at::Tensor read(const std::string& name) const { return file_of(name).read(name); }
  /// A CPU copy of a rectangle of tensor `name` (see File::read_slice).
  at::Tensor read_slice(const std::string& name, c10::IntArrayRef offsets, c10::IntArrayRef sizes) const {
    return file_of(name).read_slice(name, offsets, sizes);
  }
  /// The files of the checkpoint.
  const std::vector<std::unique_ptr<File>>& files() const { return files_; }

 private:
  void add_file(const std::string& file) { files_.push_back(std::make_unique<File>(file)); }
  void add_single(const std::string& file) {
    add_file(file);
    for (const auto& info : files_[0]->tensors()) where_[info.name] = 0;
  }

  std::string path_;
  std::vector<std::unique_ptr<File>> files_;
  std::map<std::string, size_t> where_;
};

/// Options of save_sharded.
struct SaveOptions {
  /// Start a new file when the current one would exceed this many bytes of tensor data (a tensor
  /// larger than this gets a file of its own). 0 = everything in one file.
  TORCH_ARG(int64_t, max_shard_bytes) = 0;
  /// String metadata written into every file's "__metadata__".
  TORCH_ARG(Metadata, metadata) = {};
  /// Threads writing each file (0: titan::default_io_threads(), the cores up to 4).
  TORCH_ARG(int, io_threads) = 0;
};

/// A tensor that save_sharded makes only when it writes the file holding it: its name, the bytes
/// it will have, and a function returning it (e.g. gathering a sharded parameter).
struct LazyTensor {
  std::string name;
  int64_t bytes = 0;
  std::function<at::Tensor()> make;
};

/// Writes `tensors` into directory `dir` (which must exist) the way Hugging Face does: one
/// model.safetensors, or model-0000i-of-0000n.safetensors files plus model.safetensors.index.json
/// ({"metadata": {"total_size": bytes}, "weight_map": {name: file}}) when they need several files.
/// Each file's tensors are made (in order) just before it is written and released after, so at
/// most one file's tensors are in memory. Returns the file names written.
inline std::vector<std::string> save_sharded(const std::string& dir, const std::vector<LazyTensor>& tensors,
                                             const SaveOptions& options = {}) {
  TORCH_CHECK(detail::is_directory(dir), "safetensors: ", dir, " is not a directory");
  std::vector<std::vector<const LazyTensor*>> shards(1);
  int64_t shard_bytes = 0, total = 0;
  for (const auto& item : tensors) {
    if (options.max_shard_bytes() > 0 && !shards.back().empty() && shard_bytes + item.bytes > options.max_shard_bytes()) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&item);
    shard_bytes += item.bytes;
    total += item.bytes;
  }
  auto write_shard = [&](const std::string& path, const std::vector<const LazyTensor*>& shard) {
    NamedTensors made;
    for (const auto* item : shard) {
      made.emplace_back(item->name, item->make());
      const int64_t bytes = made.back().second.numel() * static_cast<int64_t>(made.back().second.element_size());
      TORCH_CHECK(bytes == item->bytes, "safetensors: ", path, ": tensor '", item->name, "' was announced as ",
                  item->bytes, " bytes but has ", bytes);
    }
    save(path, made, options.metadata(), options.io_threads());
  };
  if (shards.size() == 1) {
    write_shard(dir + "/" + kSingleName, shards[0]);
    std::remove((dir + "/" + kIndexName).c_str());  // a stale index would shadow the new file
    return {kSingleName};
  }
  std::vector<std::string> names;
  json::Value weight_map = json::Object{};
  for (size_t i = 0; i < shards.size(); ++i) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_shard(dir + "/" + name, shards[i]);
    for (const auto* item : shards[i]) weight_map[item->name] = name;
    names.emplace_back(name);
  }
  json::Value index = json::Object{};
  index["metadata"]["total_size"] = total;
  index["weight_map"] = std::move(weight_map);
  json::save(dir + "/" + kIndexName, index);
  return names;
}

/// save_sharded of tensors already in memory.
inline std::vector<std::string> save_sharded(const std::string& dir, const NamedTensors& tensors,
                                             const SaveOptions& options = {}) {
  std::vector<LazyTensor> lazy;
  for (const auto& [name, tensor] : tensors)
    lazy.push_back(LazyTensor{name, tensor.numel() * static_cast<int64_t>(tensor.element_size()),
                              [tensor] { return tensor; }});
  return save_sharded(dir, lazy, options);
}

}  // namespace titan::safetensors
