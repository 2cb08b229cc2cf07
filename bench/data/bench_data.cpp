// bench_data: corpus preparation (tokenizing a corpus into the token cache, TokenCorpus::open) in
// MB/s and tokens/s on 1 and 2 threads, on the offline pretraining corpus and on a generated text
// file of --generated-mb MB (default 1000) made of that corpus's documents, each copy numbered.
// The tokenizer is the test tiktoken BPE (4k vocabulary, Llama 3's pre-tokenizer).
//
//   bench_data [--corpus PATH] [--tokenizer PATH] [--generated-mb N] [--threads 1,2] [--dir DIR]
#include <common/data.hpp>
#include <tokenizers/tokenizer.hpp>
#include <titan/detail/checkpoint_io.hpp>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using titan::examples::CorpusOptions;
using titan::examples::TokenCorpus;

namespace {

/// Writes `megabytes` MB of text documents ("\f"-separated) made of `source`'s, each copy numbered.
void generate_corpus(const std::string& source, const std::string& path, int64_t megabytes) {
  std::ifstream in(source, std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> documents;
  for (size_t start = 0; start < text.size();) {
    auto end = text.find("\n\f\n", start);
    documents.push_back(text.substr(start, end == std::string::npos ? std::string::npos : end - start));
    start = end == std::string::npos ? text.size() : end + 3;
  }
  std::ofstream out(path, std::ios::binary);
  int64_t written = 0, copy = 0;
  while (written < megabytes * 1000000) {
    for (const auto& doc : documents) {
      std::string numbered = "Copy " + std::to_string(copy++) + ".\n" + doc + "\n\f\n";
      out << numbered;
      written += static_cast<int64_t>(numbered.size());
      if (written >= megabytes * 1000000) break;
    }
  }
  TORCH_CHECK(out.good(), "bench_data: cannot write '", path, "'");
}

}  // namespace

int main(int argc, char** argv) {
  std::string corpus = std::string(TITAN_SOURCE_DIR) + "/data/cache/pretrain/python_docs.txt";
  std::string tokenizer_path = std::string(TITAN_SOURCE_DIR) + "/data/cache/tokenizers/tiktoken/llama3_bpe_4k.model";
  std::string dir = (fs::temp_directory_path() / "titan_bench_data").string();
  int64_t generated_mb = 1000;
  std::vector<int> thread_counts = {1, 2};
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--corpus") corpus = value;
    else if (flag == "--tokenizer") tokenizer_path = value;
    else if (flag == "--generated-mb") generated_mb = std::stoll(value);
    else if (flag == "--dir") dir = value;
    else if (flag == "--threads") {
      thread_counts.clear();
      std::stringstream list(value);
      for (std::string item; std::getline(list, item, ',');) thread_counts.push_back(std::stoi(item));
    } else {
      std::cerr << "usage: bench_data [--corpus PATH] [--tokenizer PATH] [--generated-mb N] [--threads 1,2] [--dir DIR]\n";
      return 2;
    }
  }
  TORCH_CHECK(fs::exists(corpus), "bench_data: no corpus '", corpus, "' (run scripts/make_corpus.sh)");
  auto tokenizer = titan::examples::load_tokenizer(tokenizer_path, "tiktoken");
  titan::detail::remove_tree(dir);
  fs::create_directories(dir);
  std::vector<std::pair<std::string, std::string>> corpora = {{"pretraining corpus", corpus}};
  if (generated_mb > 0) {
    const std::string generated = dir + "/generated.txt";
    generate_corpus(corpus, generated, generated_mb);
    corpora.emplace_back("generated text", generated);
  }

  std::printf("| corpus | MB | threads | seconds | MB/s | tokens/s | speed-up |\n|---|---|---|---|---|---|---|\n");
  for (const auto& [name, path] : corpora) {
    const double megabytes = static_cast<double>(fs::file_size(path)) / 1e6;
    double first = 0;
    for (int threads : thread_counts) {
      const std::string cache = dir + "/cache_" + std::to_string(threads);
      titan::detail::remove_tree(cache);
      const auto start = std::chrono::steady_clock::now();
      auto tokens = TokenCorpus::open(
          CorpusOptions().path(path).kind("text").cache_dir(cache).threads(threads).show_progress(false), *tokenizer);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (first == 0) first = seconds;
      std::printf("| %s | %.1f | %d | %.2f | %.1f | %.0f | %.2fx |\n", name.c_str(), megabytes, threads, seconds,
                  megabytes / seconds, static_cast<double>(tokens->num_tokens()) / seconds, first / seconds);
      std::fflush(stdout);
      titan::detail::remove_tree(cache);
    }
  }
  titan::detail::remove_tree(dir);
  return 0;
}
