// Tests of examples/common/metrics.cpp: the metrics line, metrics.jsonl, TensorBoard (read back
// by check_tensorboard.py), peak memory and peak FLOP/s.
#include "trainer_fixtures.hpp"

#include <common/metrics.hpp>

#include <nlohmann/json.hpp>


TEST_CASE("metrics: CRC-32C check value and TFRecord mask") {
  const std::string check = "123456789";
  CHECK(crc32c(check.data(), check.size()) == 0xE3069283u);  // the published CRC-32C check value
  uint32_t crc = 0xE3069283u;
  CHECK(masked_crc32c(check.data(), check.size()) == ((crc >> 15) | (crc << 17)) + 0xa282ead8u);
  CHECK(crc32c("", 0) == 0u);
}

TEST_CASE("metrics: TensorBoard scalars written from a spec" * doctest::skip()) {
  // Run by check_tensorboard.py, which reads the events back with tensorboard's EventAccumulator.
  const char* spec = std::getenv("TITAN_TRAINER_TB_SPEC");
  const char* dir = std::getenv("TITAN_TRAINER_TB_DIR");
  REQUIRE_MESSAGE((spec && dir), "set TITAN_TRAINER_TB_SPEC and TITAN_TRAINER_TB_DIR (check_tensorboard.py does)");
  TensorBoardWriter writer(dir);
  for (const auto& s : nlohmann::json::parse(read_file(spec))) {
    double value = s["value"].is_string() ? std::nan("") : s["value"].get<double>();
    writer.add_scalar(s["tag"].get<std::string>(), value, s["step"].get<int64_t>(), s["wall_time"].get<double>());
  }
  writer.flush();
  CHECK(fs::file_size(writer.path()) > 0);
}

TEST_CASE("metrics: the logger writes each interval as a line, metrics.jsonl and TensorBoard") {
  auto dir = scratch("metrics_logger");
  MetricsLogger logger(MetricsOptions()
                           .log_freq(2)
                           .jsonl_path((dir / "m" / "metrics.jsonl").string())
                           .tensorboard_dir((dir / "tb").string())
                           .flops_per_token(6e3)
                           .peak_flops(1e9)
                           .device(device()));
  const auto live = torch::ones({1 << 20}, device());  // 4 MiB: a GPU's peak active memory is not 0
  CHECK(logger.is_log_step(1));
  CHECK(logger.is_log_step(2));
  CHECK_FALSE(logger.is_log_step(3));
  CHECK(logger.is_log_step(4));
  auto interval = [](int64_t step, int64_t steps, double loss) {
    IntervalStats stats;
    stats.step = step;
    stats.steps = steps;
    stats.loss = loss;
    stats.grad_norm = 1.75;
    stats.lr = 1e-3 * static_cast<double>(step);
    stats.tokens = 1000 * steps;
    stats.seconds = 0.5 * static_cast<double>(steps);
    stats.data_seconds = 0.1 * static_cast<double>(steps);
    return stats;
  };
  logger.record(interval(1, 1, 2.0));
  auto line = logger.record(interval(4, 3, 4.5));
  CHECK(line.find("loss   4.5000") != std::string::npos);
  CHECK(line.find("tok/s/rank      2000") != std::string::npos);  // 3000 tokens in 1.5 s
  CHECK(line.find("mfu 1.2%") != std::string::npos);              // 2000 tok/s x 6e3 / 1e9
  CHECK(line.find("step 0.500 s") != std::string::npos);
  CHECK(line.find("skipped") == std::string::npos);
  CHECK((line.find(" (reserved ") != std::string::npos) == !device().is_cpu());  // the allocator's reserved bytes
  std::ifstream jsonl(dir / "m" / "metrics.jsonl");
  std::vector<nlohmann::json> records;
  for (std::string text; std::getline(jsonl, text);) records.push_back(nlohmann::json::parse(text));
  REQUIRE(records.size() == 2);
  CHECK(records[1]["step"] == 4);
  CHECK(records[1]["loss"].get<double>() == doctest::Approx(4.5));
  CHECK(records[1]["perplexity"].get<double>() == doctest::Approx(std::exp(4.5)));
  CHECK(records[1]["grad_norm"].get<double>() == doctest::Approx(1.75));
  CHECK(records[1]["lr"].get<double>() == doctest::Approx(4e-3));
  CHECK(records[1]["mfu_percent"].get<double>() == doctest::Approx(1.2));
  CHECK(records[1]["step_seconds"].get<double>() == doctest::Approx(0.5));
  CHECK(records[1]["data_seconds"].get<double>() == doctest::Approx(0.1));
  CHECK(records[1]["skipped_steps"].get<double>() == 0.0);
  CHECK(records[1]["peak_memory_gib"].get<double>() > 0.0);
  // A GPU's caching allocator also reports what it reserved (at least the active bytes); the CPU's RSS does not.
  CHECK(records[1].contains("peak_reserved_gib") == !device().is_cpu());
  if (!device().is_cpu())
    CHECK(records[1]["peak_reserved_gib"].get<double>() >= records[1]["peak_memory_gib"].get<double>());
  int event_files = 0;
  for (const auto& entry : fs::directory_iterator(dir / "tb"))
    event_files += entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  CHECK(event_files == 1);
  // Tensor parallel: a replica's tokens are shared by its ranks, for tokens/s and MFU alike.
  MetricsLogger tp(MetricsOptions().flops_per_token(6e3).peak_flops(1e9).ranks_per_replica(2).enabled(false));
  auto skipped = interval(4, 3, 4.5);
  skipped.skipped = 2;
  auto tp_line = tp.record(skipped);
  CHECK(tp_line.find("tok/s/rank      1000") != std::string::npos);
  CHECK(tp_line.find("mfu 0.6%") != std::string::npos);
  CHECK(tp_line.find("| skipped 2") != std::string::npos);
  MetricsLogger cpu(MetricsOptions().log_freq(1));
  CHECK(cpu.record(interval(1, 1, 2.0)).find("mfu n/a") != std::string::npos);
  CHECK_ERROR_HAS(cpu.record(interval(1, 0, 2.0)), "at least one step");
}

// The CPU's figure is the RSS high-water mark (VmHWM), a GPU's the caching allocator's peak active bytes.
TEST_CASE("metrics: peak memory is the device's high-water mark, reset per interval") {
  const auto on = device();
  reset_peak_memory(on);
  const auto before = peak_memory(on);
  if (on.is_cpu()) {
    CHECK(before.active > 0);  // VmHWM
    CHECK(before.reserved == -1);
  } else {
    CHECK(before.active >= 0);  // peak active bytes: what live tensors hold (maybe nothing)
    CHECK(before.reserved >= before.active);
  }
  {
    auto big = torch::ones({256 * 1024 * 1024 / 4}, torch::TensorOptions().device(on));  // 256 MiB of float, touched
    CHECK(big.sum().item<double>() > 0);
    const auto during = peak_memory(on);
    CHECK(during.active >= before.active + (200 << 20));
    CHECK((during.reserved >= during.active) == !on.is_cpu());
  }
  // Freed: the next interval's peak starts from what the process holds now.
  reset_peak_memory(on);
  CHECK(peak_memory(on).active < before.active + (200 << 20));
}

TEST_CASE("metrics: peak FLOP/s by GPU name") {
  CHECK(peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12);
  CHECK(peak_flops_of("NVIDIA H100 PCIe") == 756e12);
  CHECK(peak_flops_of("NVIDIA H100 NVL") == 835e12);
  CHECK(peak_flops_of("NVIDIA H200") == 989e12);
  CHECK(peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12);
  CHECK(peak_flops_of("NVIDIA B200") == 2250e12);
  CHECK(peak_flops_of("NVIDIA L40S") == 362e12);
  CHECK(peak_flops_of("Some Other GPU") == 0.0);
  TrainConfig config;
  config.metrics.peak_flops = 4e14;
  CHECK(metrics_options(config, 0).peak_flops() == 4e14);  // the config overrides the table
}
