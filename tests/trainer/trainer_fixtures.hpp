#pragma once
// Fixtures of the example trainer's tests (tests/trainer/test_*.cpp): scratch folders, files, a
// byte tokenizer, a small text corpus, and tiny_run, a config for a few quick trainer steps.
#include "multirank.hpp"

#include <common/config.hpp>
#include <common/data.hpp>
#include <tokenizers/tokenizer.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace titan::examples;
using titan_test::device;

namespace {

/// Removes `dir` and everything in it (titan's nftw-based helper: libtorch.so exports its own
/// std::filesystem::remove_all, which crashes on non-empty folders).
inline void remove_tree(const fs::path& dir) { titan::detail::remove_tree(dir.string()); }

/// This process's scratch folder, removed when the process ends.
inline const fs::path& scratch_root() {
  static const struct Root {
    fs::path path = fs::temp_directory_path() / ("titan_trainer_" + std::to_string(::getpid()));
    ~Root() {
      remove_tree(path);
    }
  } root;
  return root.path;
}

/// A fresh folder for one test case.
inline fs::path scratch(const std::string& name) {
  auto dir = scratch_root() / name;
  remove_tree(dir);
  fs::create_directories(dir);
  return dir;
}

inline void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

inline std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

using titan_test::error_of;

#define CHECK_ERROR_HAS(expr, ...)                                                        \
  do {                                                                                    \
    std::string message_ = error_of([&]() { (void)(expr); });                             \
    CHECK_MESSAGE(!message_.empty(), #expr " did not throw");                             \
    for (const char* part_ : {__VA_ARGS__})                                               \
      CHECK_MESSAGE(message_.find(part_) != std::string::npos, "'", std::string(part_), "' missing from: ", message_); \
  } while (0)

/// Bytes as tokens: id = byte + 3; BOS 1, EOS 2, padding 0 (or none).
class ByteTokenizer : public Tokenizer {
 public:
  /// `bos` -1: a tokenizer without BOS, as Qwen's.
  explicit ByteTokenizer(int64_t pad = 0, int64_t bos = 1) : pad_(pad), bos_(bos) {}
  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const override {
    std::vector<int64_t> ids;
    if (bos) ids.push_back(bos_);
    for (unsigned char ch : text) ids.push_back(ch + 3);
    if (eos) ids.push_back(2);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    std::string text;
    for (auto id : ids)
      if (id >= 3) text += static_cast<char>(id - 3);
    return text;
  }
  int64_t vocab_size() const override { return 259; }
  int64_t bos_id() const override { return bos_; }
  int64_t eos_id() const override { return 2; }
  int64_t pad_id() const override { return pad_; }
  int64_t token_id(std::string_view token) const override {
    throw std::invalid_argument("ByteTokenizer has no token '" + std::string(token) + "'");
  }

 private:
  int64_t pad_, bos_;
};

inline const std::vector<std::string> kDocs = {
    "The first document talks about packing.",
    "Second: short.",
    "A third document, somewhat longer than the others, so that windows cross document boundaries.",
    "Fourth and last one!",
};

inline fs::path write_text_corpus(const fs::path& dir, const std::vector<std::string>& docs) {
  std::string text;
  for (const auto& d : docs) text += d + "\n\f\n";
  write_file(dir / "corpus.txt", text);
  return dir / "corpus.txt";
}

/// A trainer config for a few quick steps in `dir`: the debug Llama 3 with a byte tokenizer, a
/// 40-document corpus, seq 16, 2 micro-batches of 2, no validation, then `extra` overrides.
inline TrainConfig tiny_run(const fs::path& dir, const std::vector<std::string>& extra) {
  {
    std::ofstream tokenizer(dir / "bytes.tiktoken");  // one token per byte: ranks 0..255
    const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int b = 0; b < 256; ++b) {
      const unsigned v = static_cast<unsigned>(b);
      tokenizer << alphabet[v >> 2] << alphabet[(v & 3) << 4] << "== " << b << "\n";
    }
  }
  std::vector<std::string> docs;
  for (int i = 0; i < 40; ++i) docs.push_back(kDocs[static_cast<size_t>(i) % kDocs.size()] + " #" + std::to_string(i));
  const auto corpus = write_text_corpus(dir, docs);
  const std::string config_path = std::string(TITAN_SOURCE_DIR) + "/examples/configs/llama3_debug.toml";
  std::vector<std::string> args = {
      "train", "--config", config_path, "--job.dump_folder", (dir / "run").string(),
      "--model.tokenizer_path", (dir / "bytes.tiktoken").string(), "--data.path", corpus.string(),
      "--data.val_path", "", "--data.cache_dir", (dir / "cache").string(), "--training.seq_len", "16",
      "--training.batch_size", "2", "--training.global_batch_size", "4", "--lr_scheduler.warmup_steps", "1",
      "--metrics.enable_tensorboard", "false"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<const char*> argv;
  for (const auto& arg : args) argv.push_back(arg.c_str());
  return parse_config_args(static_cast<int>(argv.size()), argv.data());
}

}  // namespace
