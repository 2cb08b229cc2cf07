#pragma once
// Helpers shared by the test_models sources: scratch directories, raw files, error checks.
#include "../support/multirank.hpp"

#include <doctest/doctest.h>
#include <titan/detail/checkpoint_io.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

namespace models_test {

/// Removes `path` and everything below it (titan's nftw-based helper: the libtorch wheel exports
/// its own std::filesystem::remove_all, which crashes on non-empty directories).
using titan::detail::remove_tree;

/// A fresh empty directory under $TITAN_MODELS_SCRATCH (or the system temp dir).
inline std::string scratch_dir(const std::string& name) {
  const char* root = std::getenv("TITAN_MODELS_SCRATCH");
  std::filesystem::path dir = std::filesystem::path(root ? root : std::filesystem::temp_directory_path().string()) /
                              ("titan_models_" + name);
  remove_tree(dir.string());
  std::filesystem::create_directories(dir);
  return dir.string();
}

/// Writes `bytes` to `path`.
inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(out.good());
}

/// The contents of `path`.
inline std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// A safetensors file made by hand: 8-byte length, `header`, `data`.
inline std::string raw_safetensors(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + data;
}

using titan_test::device;
using titan_test::error_of;
using titan_test::max_abs_diff;
using titan_test::same_values;

/// Checks that `text` contains `part`, printing both otherwise.
#define CHECK_CONTAINS(text, part)                                                                  \
  do {                                                                                              \
    std::string models_text_ = (text);                                                              \
    CHECK_MESSAGE(models_text_.find(part) != std::string::npos, "'", models_text_, "' lacks '", part, "'"); \
  } while (0)

}  // namespace models_test
