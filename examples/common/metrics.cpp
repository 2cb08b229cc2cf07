#include "metrics.hpp"

#include <titan/world.hpp>  // TITAN_HAS_NCCL: CUDA headers and libraries are there

#if TITAN_HAS_NCCL
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <nlohmann/json.hpp>

#include <unistd.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>

namespace titan::examples {
namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli
    table[i] = c;
  }
  return table;
}

// Protocol buffer wire format, just what Event and Summary need.
void put_varint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out += static_cast<char>((value & 0x7f) | 0x80);
    value >>= 7;
  }
  out += static_cast<char>(value);
}
void put_tag(std::string& out, int field, int wire_type) { put_varint(out, static_cast<uint64_t>(field << 3 | wire_type)); }
void put_bytes(std::string& out, int field, const std::string& bytes) {
  put_tag(out, field, 2);
  put_varint(out, bytes.size());
  out += bytes;
}
template <typename T>
void put_fixed(std::string& out, int field, T value) {  // little-endian fixed32 / fixed64
  put_tag(out, field, sizeof(T) == 8 ? 1 : 5);
  char raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  out.append(raw, sizeof(T));
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

/// Event{wall_time = 1, step = 2, then field `field` as bytes}: file_version (3) or summary (5).
std::string event(double wall_time, int64_t step, int field, const std::string& payload) {
  std::string out;
  put_fixed(out, 1, wall_time);
  put_tag(out, 2, 0);
  put_varint(out, static_cast<uint64_t>(step));
  put_bytes(out, field, payload);
  return out;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const auto table = crc32c_table();
  const auto* bytes = static_cast<const unsigned char*>(data);
  uint32_t crc = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ bytes[i]) & 0xff] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  uint32_t crc = crc32c(data, size);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

TensorBoardWriter::TensorBoardWriter(const std::string& folder) {
  std::filesystem::create_directories(folder);
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  path_ = (std::filesystem::path(folder) / ("events.out.tfevents." + std::to_string(static_cast<int64_t>(now_seconds())) +
                                            "." + host + "." + std::to_string(::getpid())))
              .string();
  file_.open(path_, std::ios::binary);
  TORCH_CHECK(file_, "metrics: cannot write the TensorBoard file ", path_);
  write_record(event(now_seconds(), 0, 3, "brain.Event:2"));
  flush();
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step, std::optional<double> wall_time) {
  std::string summary_value;  // Summary.Value{tag = 1, simple_value = 2 (float)}
  put_bytes(summary_value, 1, tag);
  put_fixed(summary_value, 2, static_cast<float>(value));
  std::string summary;  // Summary{repeated Value value = 1}
  put_bytes(summary, 1, summary_value);
  write_record(event(wall_time.value_or(now_seconds()), step, 5, summary));
}

void TensorBoardWriter::write_record(const std::string& event) {
  // TFRecord: uint64 length, masked crc of length, data, masked crc of data (little-endian).
  uint64_t length = event.size();
  uint32_t length_crc = masked_crc32c(&length, sizeof(length));
  uint32_t data_crc = masked_crc32c(event.data(), event.size());
  file_.write(reinterpret_cast<const char*>(&length), sizeof(length));
  file_.write(reinterpret_cast<const char*>(&length_crc), sizeof(length_crc));
  file_.write(event.data(), static_cast<std::streamsize>(event.size()));
  file_.write(reinterpret_cast<const char*>(&data_crc), sizeof(data_crc));
  TORCH_CHECK(file_.good(), "metrics: writing ", path_, " failed");
}

void TensorBoardWriter::flush() { file_.flush(); }

PeakMemory peak_memory(const c10::Device& device) {
  PeakMemory peak;
  if (device.is_cuda()) {
#if TITAN_HAS_NCCL
    using c10::CachingAllocator::StatType;
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    peak.active = stats.active_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
    peak.reserved = stats.reserved_bytes[static_cast<size_t>(StatType::AGGREGATE)].peak;
    peak.alloc_retries = stats.num_alloc_retries;
#endif
    return peak;
  }
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) peak.active = std::stoll(line.substr(6)) * 1024;  // "VmHWM:  1234 kB"
  return peak;
}

void reset_peak_memory(const c10::Device& device) {
  if (device.is_cuda()) {
#if TITAN_HAS_NCCL
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
    return;
  }
  std::ofstream clear_refs("/proc/self/clear_refs");
  clear_refs << "5";  // resets VmHWM to the current RSS (Linux >= 4.0); a refusal keeps the peak
}

double peak_flops_of(const std::string& name) {
  auto has = [&](const char* part) { return name.find(part) != std::string::npos; };
  if (has("A100")) return 312e12;
  if (has("H100")) return has("NVL") ? 835e12 : has("PCIe") ? 756e12 : 989e12;  // else SXM
  if (has("H200")) return 989e12;
  if (has("B200")) return 2250e12;
  if (has("L40S")) return 362e12;
  return 0.0;
}

MetricsOptions metrics_options(const TrainConfig& config, int rank) {
  const auto& m = config.metrics;
  auto root = std::filesystem::path(config.job.dump_folder);
  return MetricsOptions()
      .log_freq(m.log_freq)
      .jsonl_path(m.enable_jsonl ? (root / "metrics.jsonl").string() : "")
      .tensorboard_dir(m.enable_tensorboard ? (root / m.save_tb_folder).string() : "")
      .peak_flops(m.peak_flops)
      .enabled(rank == 0);
}

MetricsLogger::MetricsLogger(MetricsOptions options) : options_(std::move(options)) {
  TORCH_CHECK(options_.log_freq() >= 1, "metrics.log_freq must be >= 1, got ", options_.log_freq());
  if (!options_.enabled()) return;
  if (!options_.jsonl_path().empty()) {
    auto parent = std::filesystem::path(options_.jsonl_path()).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent);
    jsonl_.open(options_.jsonl_path(), std::ios::app);
    TORCH_CHECK(jsonl_, "metrics: cannot write ", options_.jsonl_path());
  }
  if (!options_.tensorboard_dir().empty()) tensorboard_ = std::make_unique<TensorBoardWriter>(options_.tensorboard_dir());
}

std::string MetricsLogger::record(const IntervalStats& stats) {
  TORCH_CHECK(stats.steps >= 1, "metrics: an interval needs at least one step, got ", stats.steps);
  const double n = static_cast<double>(stats.steps);
  const double tokens_per_s = static_cast<double>(stats.tokens) / std::max(stats.seconds, 1e-12) /
                              static_cast<double>(std::max<int64_t>(options_.ranks_per_replica(), 1));
  std::map<std::string, double> values{
      {"loss", stats.loss},
      {"perplexity", std::exp(stats.loss)},
      {"lr", stats.lr},
      {"grad_norm", stats.grad_norm},
      {"tokens_per_second_per_rank", tokens_per_s},
      {"step_seconds", stats.seconds / n},
      {"data_seconds", stats.data_seconds / n},
      {"skipped_steps", static_cast<double>(stats.skipped)},
  };
  std::string mfu = "n/a";
  if (options_.peak_flops() > 0 && options_.flops_per_token() > 0) {
    values["mfu_percent"] = 100.0 * tokens_per_s * options_.flops_per_token() / options_.peak_flops();
    mfu = c10::str(std::round(values["mfu_percent"] * 100.0) / 100.0, "%");
  }
  const PeakMemory memory = peak_memory(options_.device());
  reset_peak_memory(options_.device());
  constexpr double gib = 1024.0 * 1024.0 * 1024.0;
  std::string memory_text = "n/a";
  if (memory.active >= 0) {
    values["peak_memory_gib"] = static_cast<double>(memory.active) / gib;
    memory_text = c10::str(std::round(values["peak_memory_gib"] * 100.0) / 100.0, " GiB");
  }
  if (memory.reserved >= 0) {
    values["peak_reserved_gib"] = static_cast<double>(memory.reserved) / gib;
    memory_text += c10::str(" (reserved ", std::round(values["peak_reserved_gib"] * 100.0) / 100.0, ")");
  }
  if (memory.alloc_retries >= 0) values["alloc_retries"] = static_cast<double>(memory.alloc_retries);
  char line[512];
  std::snprintf(line, sizeof(line),
                "step %6lld | loss %8.4f | ppl %10.2f | lr %.3e | grad_norm %8.4f | tok/s/rank %9.0f | mfu %s | "
                "mem %s | step %.3f s | data %.3f s%s",
                static_cast<long long>(stats.step), stats.loss, values["perplexity"], stats.lr, stats.grad_norm,
                tokens_per_s, mfu.c_str(), memory_text.c_str(), values["step_seconds"], values["data_seconds"],
                stats.skipped > 0 ? c10::str(" | skipped ", stats.skipped).c_str() : "");
  record_scalars(stats.step, values);
  return std::string(line);
}

void MetricsLogger::record_scalars(int64_t step, const std::map<std::string, double>& values) {
  if (!options_.enabled()) return;
  if (jsonl_.is_open()) {
    nlohmann::json record(values);
    record["step"] = step;
    jsonl_ << record.dump() << "\n" << std::flush;
  }
  if (tensorboard_) {
    for (const auto& [tag, value] : values) tensorboard_->add_scalar(tag, value, step);
    tensorboard_->flush();
  }
}

}  // namespace titan::examples
