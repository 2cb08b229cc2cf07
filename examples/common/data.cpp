#include "data.hpp"

#include "chat.hpp"

#include <titan/collectives.hpp>
#include <titan/tasks.hpp>

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <exception>
#include <memory>
#include <random>
#include <thread>

namespace titan::examples {
namespace fs = std::filesystem;

std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty()) {
    return "Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n" +
           instruction + "\n\n### Response:\n";
  }
  return "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
         instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

namespace {

constexpr char kIndexMagic[8] = {'T', 'I', 'T', 'A', 'N', 'I', 'D', 'X'};
constexpr uint64_t kIndexVersion = 2;  // 2: the context bit in the tokens, no prompt lengths
constexpr int64_t kIgnore = -100;

uint64_t fnv1a(const std::string& text) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char ch : text) {
    hash ^= ch;
    hash *= 1099511628211ull;
  }
  return hash;
}

/// Everything the cached tokens depend on, hashed: the corpus file (path, size, mtime), how it
/// is read, and the tokenizer (ids of a probe text, special ids, the caller's id).
std::string cache_key(const CorpusOptions& options, const Tokenizer& tokenizer) {
  auto path = fs::absolute(options.path()).lexically_normal().string();
  struct stat info {};
  TORCH_CHECK(::stat(options.path().c_str(), &info) == 0, "data: cannot read the corpus file '", options.path(),
              "': ", std::strerror(errno));
  std::string key = "v" + std::to_string(kIndexVersion) + "|" + path + "|" + std::to_string(info.st_size) + "|" +
                    std::to_string(info.st_mtim.tv_sec) + "." + std::to_string(info.st_mtim.tv_nsec) + "|" +
                    options.kind() + "|" + options.text_field() + "|" + std::to_string(options.skip_malformed()) +
                    "|" + options.tokenizer_id() + "|" + std::to_string(tokenizer.vocab_size()) + "|" +
                    std::to_string(tokenizer.bos_id()) + "|" + std::to_string(tokenizer.eos_id()) + "|";
  for (auto id : tokenizer.encode("The quick brown fox, 1234567890: jumps!\n\tÜber ĳ", false, false))
    key += std::to_string(id) + ",";
  if (options.kind() == "alpaca") key += alpaca_prompt("{i}", "{x}");
  if (options.kind() == "chat") {
    key += options.chat().format() + "|" + options.chat().system() + "|" + options.chat().date() + "|";
    // The format's tokens for a probe conversation (its template text, the tokenizer's special ids).
    ChatTokens probe;
    try {
      probe = render_chat({{"user", "{u}", std::nullopt}, {"assistant", "{a}", std::nullopt}}, options.chat(), tokenizer);
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, "data: the chat corpus '", options.path(), "' cannot be rendered: ", e.what());
    }
    for (size_t i = 0; i < probe.ids.size(); ++i) key += std::to_string(probe.ids[i]) + (probe.trained[i] ? "t," : ",");
  }
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(fnv1a(key)));
  return hex;
}

/// Rank-0 progress lines while tokenizing: percentage of bytes, throughput, documents.
class Progress {
 public:
  Progress(std::string path, uint64_t total_bytes, bool enabled, double interval_s)
      : path_(std::move(path)), total_(total_bytes), enabled_(enabled), interval_(interval_s) {}

  void update(uint64_t bytes, int64_t tokens, int64_t documents, bool last = false) {
    if (!enabled_) return;
    auto now = Clock::now();
    if (!last && std::chrono::duration<double>(now - last_print_).count() < interval_) return;
    last_print_ = now;
    double elapsed = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    char line[400];
    std::snprintf(line, sizeof(line),
                  "[data] tokenizing %s: %5.1f%% of %.1f MB, %.2f MB/s, %.0f tokens/s, %lld documents%s\n",
                  path_.c_str(), total_ ? 100.0 * static_cast<double>(bytes) / static_cast<double>(total_) : 100.0,
                  static_cast<double>(total_) / 1e6, static_cast<double>(bytes) / 1e6 / elapsed,
                  static_cast<double>(tokens) / elapsed, static_cast<long long>(documents),
                  last ? " (done)" : "");
    std::cerr << line << std::flush;
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string path_;
  uint64_t total_;
  bool enabled_;
  double interval_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_print_ = Clock::now();
};

/// A unit of tokenizing work read from the corpus: a document ("text") or a line ("jsonl",
/// "alpaca", "chat", with its number counted from the start of the reader's range, for error messages).
struct CorpusItem {
  std::string text;
  int64_t line = 0;
};

/// The tokens of consecutive items, in order (as cached: each id with TokenCorpus::kContextBit).
struct TokenizedBatch {
  std::vector<uint32_t> tokens;
  std::vector<int64_t> lengths;  // [documents]
  int64_t skipped = 0;
};

/// Where `line` of a range starting at byte `begin` of the corpus is, as "path:N" (counts the
/// lines before the range only when asked: an error message).
std::string corpus_line(const std::string& path, int64_t begin, int64_t line) {
  int64_t before = 0;
  if (begin > 0) {
    std::ifstream in(path, std::ios::binary);
    std::vector<char> chunk(size_t{1} << 20);
    for (int64_t left = begin; left > 0 && in;) {
      in.read(chunk.data(), static_cast<std::streamsize>(std::min<int64_t>(left, static_cast<int64_t>(chunk.size()))));
      before += std::count(chunk.data(), chunk.data() + in.gcount(), '\n');
      left -= in.gcount();
    }
  }
  return path + ":" + std::to_string(before + line);
}

/// Tokenizes `items` (the documents or lines of one batch) into `out`.
void tokenize_items(const CorpusOptions& options, const Tokenizer& tokenizer, int64_t range_begin,
                    const std::vector<CorpusItem>& items, TokenizedBatch& out) {
  // A document's tokens; `context(i)` is true for a token the model is not trained to write.
  auto add_document = [&](const std::vector<int64_t>& ids, const std::function<bool(size_t)>& context) {
    for (size_t i = 0; i < ids.size(); ++i) {
      TORCH_CHECK(ids[i] >= 0 && ids[i] < TokenCorpus::kContextBit, "data: the tokenizer produced the id ", ids[i],
                  ", outside the cache's range [0, 2^31)");
      out.tokens.push_back(static_cast<uint32_t>(ids[i]) | (context(i) ? TokenCorpus::kContextBit : 0u));
    }
    out.lengths.push_back(static_cast<int64_t>(ids.size()));
  };
  const auto all_trained = [](size_t) { return false; };
  const auto& kind = options.kind();
  for (const auto& item : items) {
    if (kind == "text") {
      if (item.text.find_first_not_of(" \t\r\n") != std::string::npos)
        add_document(tokenizer.encode(item.text, false, false), all_trained);
      continue;
    }
    // One JSON object per line; `problem` is empty when the line is usable.
    std::string problem;
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(item.text);
    } catch (const nlohmann::json::parse_error& e) {
      problem = std::string("invalid JSON (") + e.what() + ")";
    }
    auto string_field = [&](const std::string& name, bool required, std::string& value) {
      if (!problem.empty()) return;
      if (!record.is_object()) {
        problem = "not a JSON object";
      } else if (!record.contains(name)) {
        if (required) problem = "no field \"" + name + "\"";
      } else if (!record[name].is_string()) {
        problem = "field \"" + name + "\" is not a string";
      } else {
        value = record[name].get<std::string>();
      }
    };
    std::string text, instruction, input, output;
    ChatTokens chat;
    if (kind == "jsonl") {
      string_field(options.text_field(), true, text);
    } else if (kind == "chat") {
      if (problem.empty() && !record.is_object()) problem = "not a JSON object";
      if (problem.empty() && !record.contains("messages")) problem = "no field \"messages\"";
      if (problem.empty()) {
        try {
          chat = render_chat(chat_messages(record["messages"]), options.chat(), tokenizer);
        } catch (const std::invalid_argument& e) {
          problem = e.what();
        }
      }
    } else {
      string_field("instruction", true, instruction);
      string_field("input", false, input);
      string_field("output", true, output);
    }
    if (!problem.empty()) {
      TORCH_CHECK(options.skip_malformed(), "data: ", corpus_line(options.path(), range_begin, item.line),
                  ": malformed ", kind, " line: ", problem, " (set data.skip_malformed = true to skip such lines)");
      ++out.skipped;
    } else if (kind == "jsonl") {
      add_document(tokenizer.encode(text, false, false), all_trained);
    } else if (kind == "chat") {
      add_document(chat.ids, [&](size_t i) { return !chat.trained[i]; });
    } else {
      const auto prompt = tokenizer.encode(alpaca_prompt(instruction, input), false, false);
      auto ids = prompt;
      const auto response = tokenizer.encode(output, false, false);
      ids.insert(ids.end(), response.begin(), response.end());
      add_document(ids, [&](size_t i) { return i < prompt.size(); });
    }
  }
}

/// The first position at or after `position` where a document starts: after a line "\f" for
/// "text", after a newline for the line formats (0 and the file size are boundaries). Ranks cut the
/// corpus at such positions, where the single-threaded reader holds no partial document.
int64_t next_document_boundary(const std::string& path, const std::string& kind, int64_t size, int64_t position) {
  if (position <= 0) return 0;
  if (position >= size) return size;
  const std::string marker = kind == "text" ? "\n\f\n" : "\n";
  const int64_t m = static_cast<int64_t>(marker.size());
  int64_t window_begin = std::max<int64_t>(0, position - m);  // a marker found from here ends at or after `position`
  std::ifstream in(path, std::ios::binary);
  in.seekg(window_begin);
  std::string window;
  std::vector<char> chunk(size_t{1} << 20);
  while (true) {
    in.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    window.append(chunk.data(), static_cast<size_t>(in.gcount()));
    auto found = window.find(marker);
    if (found != std::string::npos) return window_begin + static_cast<int64_t>(found) + m;
    if (!in) return size;
    window_begin += static_cast<int64_t>(window.size()) - (m - 1);  // keep a possible marker's start
    window.erase(0, window.size() - static_cast<size_t>(m - 1));
  }
}

/// Reads the items of [begin, end) (both document boundaries) in batches of about `batch_bytes`.
class RangeReader {
 public:
  RangeReader(const CorpusOptions& options, int64_t begin, int64_t end)
      : in_(options.path(), std::ios::binary), text_(options.kind() == "text"), position_(begin), end_(end) {
    TORCH_CHECK(in_, "data: cannot open the corpus file '", options.path(), "'");
    in_.seekg(begin);
  }
  /// The next batch (empty at the end of the range).
  std::vector<CorpusItem> next(int64_t batch_bytes) {
    std::vector<CorpusItem> items;
    int64_t bytes = 0;
    while (bytes < batch_bytes && position_ < end_ && std::getline(in_, line_)) {
      position_ += static_cast<int64_t>(line_.size()) + 1;  // (past the end on a last line without newline)
      ++line_number_;
      bytes += static_cast<int64_t>(line_.size()) + 1;
      if (!text_) {
        if (line_.find_first_not_of(" \t\r") != std::string::npos) items.push_back(CorpusItem{line_, line_number_});
      } else if (line_ == "\f") {
        finish_document(items);
      } else {
        document_.text += line_;
        document_.text += '\n';
      }
    }
    TORCH_CHECK(!in_.bad(), "data: reading the corpus failed");
    if (text_ && (position_ >= end_ || !in_)) finish_document(items);  // the range's last document
    return items;
  }
  /// Whether the range (or the file) is read to its end.
  bool done() const { return position_ >= end_ || !in_; }
  /// The byte after the last line read.
  int64_t position() const { return position_; }

 private:
  void finish_document(std::vector<CorpusItem>& items) {
    if (!document_.text.empty() && document_.text.back() == '\n') document_.text.pop_back();
    if (!document_.text.empty()) items.push_back(std::move(document_));
    document_ = CorpusItem{};
  }
  std::ifstream in_;
  bool text_;
  int64_t position_, end_;
  int64_t line_number_ = 0;
  std::string line_;
  CorpusItem document_;
};

/// What one rank tokenized of its range: documents' lengths, malformed lines skipped; the tokens
/// are in the part's file.
struct PartIndex {
  std::vector<int64_t> lengths;
  int64_t skipped = 0;
};

/// Tokenizes the documents of [begin, end) into `tokens_path` on `threads` threads: batches of
/// text (1/16 of a thread's share, 4 KB to 1 MB), `threads` x 2 at a time, tokenized in parallel
/// while the next ones are read, written in order (so the result is the single-threaded one).
PartIndex tokenize_range(const CorpusOptions& options, const Tokenizer& tokenizer, int64_t begin, int64_t end,
                         const std::string& tokens_path, int threads, const std::string& what) {
  std::ofstream out(tokens_path, std::ios::binary);
  TORCH_CHECK(out, "data: cannot write the token cache '", tokens_path, "'");
  RangeReader reader(options, begin, end);
  const int64_t batch_bytes = std::clamp<int64_t>((end - begin) / (threads * 16), 4096, int64_t{1} << 20);
  const size_t wave_size = static_cast<size_t>(threads) * 2;
  auto read_wave = [&] {
    std::vector<std::vector<CorpusItem>> wave;
    while (wave.size() < wave_size) {
      auto items = reader.next(batch_bytes);
      if (items.empty() && reader.done()) break;
      wave.push_back(std::move(items));
    }
    return wave;
  };
  PartIndex part;
  int64_t tokens = 0;
  Progress progress(what, static_cast<uint64_t>(end - begin), options.show_progress(), options.progress_interval_s());
  auto wave = read_wave();
  while (!wave.empty()) {
    std::vector<std::vector<CorpusItem>> next;
    std::exception_ptr read_error;
    std::thread read_ahead([&] {  // reads the next wave while this one is tokenized
      try {
        next = read_wave();
      } catch (...) {
        read_error = std::current_exception();
      }
    });
    std::vector<TokenizedBatch> done(wave.size());
    std::exception_ptr tokenize_error;
    try {
      titan::run_tasks(threads, wave.size(),
                       [&](size_t i) { tokenize_items(options, tokenizer, begin, wave[i], done[i]); });
    } catch (...) {
      tokenize_error = std::current_exception();
    }
    read_ahead.join();
    if (tokenize_error) std::rethrow_exception(tokenize_error);
    if (read_error) std::rethrow_exception(read_error);
    for (auto& batch : done) {
      out.write(reinterpret_cast<const char*>(batch.tokens.data()), static_cast<std::streamsize>(batch.tokens.size() * 4));
      tokens += static_cast<int64_t>(batch.tokens.size());
      part.lengths.insert(part.lengths.end(), batch.lengths.begin(), batch.lengths.end());
      part.skipped += batch.skipped;
    }
    progress.update(static_cast<uint64_t>(std::min(reader.position(), end) - begin), tokens,
                    static_cast<int64_t>(part.lengths.size()));
    wave = std::move(next);
  }
  progress.update(static_cast<uint64_t>(end - begin), tokens, static_cast<int64_t>(part.lengths.size()), true);
  out.close();
  TORCH_CHECK(out.good(), "data: writing the token cache '", tokens_path, "' failed");
  return part;
}

/// Writes the index of a cache whose tokens are `tokens` (as a temporary file, renamed).
void write_index(const std::string& index_path, const std::string& tmp_suffix, const std::vector<int64_t>& offsets,
                 int64_t skipped) {
  auto tmp_index = index_path + tmp_suffix;
  std::ofstream index(tmp_index, std::ios::binary);
  uint64_t header[4] = {kIndexVersion, offsets.size() - 1, static_cast<uint64_t>(offsets.back()),
                        static_cast<uint64_t>(skipped)};
  index.write(kIndexMagic, sizeof(kIndexMagic));
  index.write(reinterpret_cast<const char*>(header), sizeof(header));
  index.write(reinterpret_cast<const char*>(offsets.data()), static_cast<std::streamsize>(offsets.size() * 8));
  index.close();
  TORCH_CHECK(index.good(), "data: writing the token index '", tmp_index, "' failed");
  fs::rename(tmp_index, index_path);
}

/// The lock that makes one process per cache build it (flock: released when the process ends,
/// however it ends). Waits, saying so, while another process holds it.
class CacheLock {
 public:
  explicit CacheLock(const std::string& path) {
    fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    TORCH_CHECK(fd_ >= 0, "data: cannot open the token cache lock '", path, "': ", std::strerror(errno));
    if (::flock(fd_, LOCK_EX | LOCK_NB) == 0) return;
    TORCH_CHECK(errno == EWOULDBLOCK, "data: cannot lock '", path, "': ", std::strerror(errno));
    std::cerr << "[data] another process is building this token cache; waiting for it (lock " << path << ")\n"
              << std::flush;
    while (::flock(fd_, LOCK_EX) != 0)
      TORCH_CHECK(errno == EINTR, "data: cannot lock '", path, "': ", std::strerror(errno));
  }
  ~CacheLock() { ::close(fd_); }
  CacheLock(const CacheLock&) = delete;
  CacheLock& operator=(const CacheLock&) = delete;

 private:
  int fd_ = -1;
};

/// Builds the cache `tokens_path` / `index_path` with every rank of `group` (or this process
/// alone) tokenizing a share of the corpus cut at document boundaries on `threads` threads each;
/// rank 0 then joins the parts in order. Every rank fails if one does, leaving no files.
void build_cache(const CorpusOptions& options, const Tokenizer& tokenizer, const std::string& tokens_path,
                 const std::string& index_path, const ProcessGroupPtr& group, const std::string& job_id) {
  const int rank = group ? group->rank() : 0, ranks = group ? group->size() : 1;
  const int64_t size = static_cast<int64_t>(fs::file_size(options.path()));
  const int64_t begin = next_document_boundary(options.path(), options.kind(), size, size * rank / ranks);
  const int64_t end = next_document_boundary(options.path(), options.kind(), size, size * (rank + 1) / ranks);
  const int threads = titan::io_threads_or_default(options.threads());
  auto part_path = [&](int r) { return tokens_path + ".part" + std::to_string(r) + ".tmp" + job_id; };
  auto remove_parts = [&] {
    std::error_code ignored;
    fs::remove(part_path(rank), ignored);
    fs::remove(part_path(rank) + ".index", ignored);
  };
  // Every rank, or this process alone, fails when one fails (with that rank's message).
  auto on_every_rank = [&](const std::function<void()>& work) {
    if (group) {
      titan::all_ranks_or_none(group, work);
    } else {
      work();
    }
  };
  try {
    on_every_rank([&] {
      const std::string what = options.path() + (ranks > 1 ? " (rank " + std::to_string(rank) + "'s share)" : "");
      // Progress lines from rank 0 only (its share stands for the others').
      PartIndex part = tokenize_range(CorpusOptions(options).show_progress(options.show_progress() && rank == 0),
                                      tokenizer, begin, end, part_path(rank), threads, what);
      std::ofstream index(part_path(rank) + ".index", std::ios::binary);
      const uint64_t documents = part.lengths.size();
      index.write(reinterpret_cast<const char*>(&documents), 8);
      index.write(reinterpret_cast<const char*>(&part.skipped), 8);
      index.write(reinterpret_cast<const char*>(part.lengths.data()), static_cast<std::streamsize>(documents * 8));
      index.close();
      TORCH_CHECK(index.good(), "data: writing '", part_path(rank), ".index' failed");
    });
    on_every_rank([&] {
      if (rank != 0) return;
      try {
        // Join the parts: tokens appended in rank order, document offsets shifted.
        const std::string tmp_tokens = tokens_path + ".tmp" + job_id;
        std::ofstream out(tmp_tokens, std::ios::binary);
        TORCH_CHECK(out, "data: cannot write the token cache '", tmp_tokens, "'");
        std::vector<int64_t> offsets{0};
        int64_t skipped = 0;
        for (int r = 0; r < ranks; ++r) {
          std::ifstream index(part_path(r) + ".index", std::ios::binary);
          uint64_t documents = 0;
          int64_t part_skipped = 0;
          index.read(reinterpret_cast<char*>(&documents), 8);
          index.read(reinterpret_cast<char*>(&part_skipped), 8);
          std::vector<int64_t> lengths(documents);
          index.read(reinterpret_cast<char*>(lengths.data()), static_cast<std::streamsize>(documents * 8));
          TORCH_CHECK(index, "data: the part index '", part_path(r), ".index' is truncated");
          for (auto n : lengths) offsets.push_back(offsets.back() + n);
          skipped += part_skipped;
          std::ifstream tokens(part_path(r), std::ios::binary);
          if (fs::file_size(part_path(r)) > 0) out << tokens.rdbuf();
        }
        out.close();
        TORCH_CHECK(out.good(), "data: writing the token cache '", tmp_tokens, "' failed");
        TORCH_CHECK(offsets.size() > 1, "data: the corpus '", options.path(), "' holds no documents");
        fs::rename(tmp_tokens, tokens_path);
        write_index(index_path, ".tmp" + job_id, offsets, skipped);
      } catch (...) {
        std::error_code ignored;
        fs::remove(tokens_path + ".tmp" + job_id, ignored);
        fs::remove(index_path + ".tmp" + job_id, ignored);
        throw;
      }
    });
  } catch (...) {
    remove_parts();
    throw;
  }
  remove_parts();
}

}  // namespace

std::shared_ptr<const TokenCorpus> TokenCorpus::open(const CorpusOptions& options, const Tokenizer& tokenizer,
                                                     const ProcessGroupPtr& group) {
  TORCH_CHECK(options.kind() == "text" || options.kind() == "jsonl" || options.kind() == "alpaca" ||
                  options.kind() == "chat",
              "data: corpus kind '", options.kind(), "' is not one of: text, jsonl, alpaca, chat");
  TORCH_CHECK(!options.path().empty(), "data: no corpus path given (data.path)");
  auto key = cache_key(options, tokenizer);
  fs::create_directories(options.cache_dir());
  auto base = (fs::path(options.cache_dir()) / (fs::path(options.path()).filename().string() + "." + key)).string();
  auto tokens_path = base + ".tokens", index_path = base + ".index";

  // One build per cache on this machine: rank 0 holds the lock while the job builds (another job
  // or rank 0 of a second run waits for it, then finds the cache).
  const bool leader = !group || group->rank() == 0;
  std::unique_ptr<CacheLock> lock;
  if (leader) lock = std::make_unique<CacheLock>(base + ".lock");
  bool cached = leader && fs::exists(index_path);
  std::string job_id = std::to_string(::getpid());  // rank 0's: names the parts of this build
  if (group) {
    auto answers = titan::all_gather_strings(group, cached ? "cached " + job_id : "build " + job_id);
    cached = answers.front().rfind("cached", 0) == 0;
    job_id = answers.front().substr(answers.front().find(' ') + 1);
  }
  if (!cached) build_cache(options, tokenizer, tokens_path, index_path, group, job_id);
  lock.reset();

  std::shared_ptr<TokenCorpus> corpus(new TokenCorpus());
  corpus->from_cache_ = cached;
  corpus->index_path_ = index_path;
  std::ifstream index(index_path, std::ios::binary);
  TORCH_CHECK(index, "data: cannot open the token index '", index_path, "'");
  char magic[8];
  uint64_t header[4];
  index.read(magic, sizeof(magic));
  index.read(reinterpret_cast<char*>(header), sizeof(header));
  TORCH_CHECK(index && std::memcmp(magic, kIndexMagic, 8) == 0 && header[0] == kIndexVersion, "data: '", index_path,
              "' is not a version ", kIndexVersion, " token index; delete it to rebuild");
  corpus->offsets_.resize(header[1] + 1);
  corpus->trains_eos_ = options.kind() != "chat";
  corpus->skipped_lines_ = static_cast<int64_t>(header[3]);
  index.read(reinterpret_cast<char*>(corpus->offsets_.data()), static_cast<std::streamsize>((header[1] + 1) * 8));
  TORCH_CHECK(index && static_cast<uint64_t>(corpus->offsets_.back()) == header[2], "data: the token index '",
              index_path, "' is truncated; delete it to rebuild");

  uint64_t bytes = header[2] * 4;
  TORCH_CHECK(fs::exists(tokens_path) && fs::file_size(tokens_path) == bytes, "data: the token file '", tokens_path,
              "' does not match its index (expected ", bytes, " bytes); delete both to rebuild");
  if (bytes > 0) {
    int fd = ::open(tokens_path.c_str(), O_RDONLY);
    TORCH_CHECK(fd >= 0, "data: cannot open '", tokens_path, "': ", std::strerror(errno));
    void* mapping = ::mmap(nullptr, bytes, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    TORCH_CHECK(mapping != MAP_FAILED, "data: cannot map '", tokens_path, "': ", std::strerror(errno));
    corpus->mapping_ = mapping;
    corpus->mapping_bytes_ = bytes;
    corpus->tokens_ = static_cast<const uint32_t*>(mapping);
  }
  return corpus;
}

TokenCorpus::~TokenCorpus() {
  if (mapping_) ::munmap(mapping_, mapping_bytes_);
}

std::map<std::string, int64_t> DataState::to_map() const {
  return {{"epoch", epoch}, {"position", position}, {"seed", seed}, {"samples", samples}, {"dp_size", dp_size}};
}

DataState DataState::from_map(const std::map<std::string, int64_t>& values) {
  auto get = [&](const char* name) {
    auto it = values.find(name);
    TORCH_CHECK(it != values.end(), "data: the saved data state has no '", name, "'");
    return it->second;
  };
  DataState state;
  state.epoch = get("epoch");
  state.position = get("position");
  state.seed = get("seed");
  state.samples = get("samples");
  state.dp_size = get("dp_size");
  return state;
}

std::string DataState::to_json() const { return nlohmann::json(to_map()).dump(); }

DataState DataState::from_json(const std::string& text) {
  nlohmann::json parsed;
  try {
    parsed = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "data: the saved data state is not valid JSON: ", e.what());
  }
  TORCH_CHECK(parsed.is_object(), "data: the saved data state is not a JSON object: ", text);
  std::map<std::string, int64_t> values;
  for (auto& [key, value] : parsed.items()) {
    TORCH_CHECK(value.is_number_integer(), "data: the saved data state's '", key, "' is not an integer");
    values[key] = value.get<int64_t>();
  }
  return from_map(values);
}

DataLoader::DataLoader(std::shared_ptr<const TokenCorpus> corpus, const Tokenizer& tokenizer, LoaderOptions options)
    : corpus_(std::move(corpus)), options_(std::move(options)) {
  TORCH_CHECK(corpus_, "data: DataLoader needs a corpus");
  TORCH_CHECK(options_.batch_size() >= 1 && options_.seq_len() >= 1, "data: batch_size and seq_len must be >= 1");
  TORCH_CHECK(options_.dp_size() >= 1 && options_.dp_rank() >= 0 && options_.dp_rank() < options_.dp_size(),
              "data: dp_rank ", options_.dp_rank(), " is not in [0, dp_size = ", options_.dp_size(), ")");
  bos_ = tokenizer.bos_id();
  eos_ = tokenizer.eos_id();
  pad_ = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : eos_;
  TORCH_CHECK(eos_ >= 0, "data: the tokenizer has no end-of-sequence token, which ends every document");
  bos_slots_ = bos_ >= 0 ? 1 : 0;  // Qwen's tokenizers have no BOS: documents are only EOS-separated
  const int64_t documents = corpus_->num_documents();
  starts_.resize(static_cast<size_t>(documents + 1));
  for (int64_t d = 0; d <= documents; ++d)
    starts_[d] = (d ? starts_[d - 1] + bos_slots_ + corpus_->document_length(d - 1) + 1 : 0);
  samples_ = options_.pack() ? starts_.back() / (options_.seq_len() + 1) : documents;
  TORCH_CHECK(samples_ / options_.dp_size() >= 1, "data: the corpus gives ", samples_, " samples of ",
              options_.seq_len() + 1, " tokens per epoch, fewer than the ", options_.dp_size(),
              " data-parallel ranks; use a larger corpus or a shorter seq_len");
}

int64_t DataLoader::sample_at(int64_t epoch, int64_t index) const {
  if (!options_.shuffle()) return index;
  if (order_epoch_ != epoch) {
    order_.resize(static_cast<size_t>(samples_));
    for (int64_t i = 0; i < samples_; ++i) order_[i] = i;
    // Fisher-Yates with raw mt19937_64 draws (std distributions differ between libraries).
    std::mt19937_64 rng(static_cast<uint64_t>(options_.seed()) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(epoch));
    for (int64_t i = samples_ - 1; i > 0; --i) std::swap(order_[i], order_[rng() % static_cast<uint64_t>(i + 1)]);
    order_epoch_ = epoch;
  }
  return order_[index];
}

void DataLoader::fill_row(int64_t sample, int64_t* input, int64_t* labels, int64_t* documents) const {
  const int64_t length = options_.seq_len() + 1;
  // The packed stream is [BOS doc_0 EOS][BOS doc_1 EOS]... (no BOS where the tokenizer has none);
  // `begin` is where this row starts in it.
  int64_t begin = options_.pack() ? sample * length : starts_[sample];
  int64_t end = options_.pack() ? begin + length : std::min(starts_[sample + 1], begin + length);
  int64_t d = std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1;
  const int64_t first_document = d;
  for (int64_t p = begin, i = 0; i < length; ++p, ++i) {
    int64_t token = pad_;
    bool target = false;
    if (p < end) {
      while (p >= starts_[d + 1]) ++d;
      const int64_t k = p - starts_[d] + 1 - bos_slots_;  // 0 = BOS, 1..len = tokens, len + 1 = EOS
      const int64_t len = corpus_->document_length(d);
      if (k == 0) {
        token = bos_;  // never a target
      } else if (k == len + 1) {
        token = eos_;
        target = corpus_->trains_eos();
      } else {
        token = corpus_->token(d, k - 1);
        target = corpus_->trained(d, k - 1);
      }
    }
    if (i < length - 1) {
      input[i] = token;
      documents[i] = (p < end ? d : d + 1) - first_document;  // padding: one more
    }
    if (i > 0) labels[i - 1] = target ? token : kIgnore;
  }
}

Batch DataLoader::next() {
  const int64_t rows = options_.batch_size(), seq = options_.seq_len();
  Batch batch;
  batch.input = torch::empty({rows, seq}, torch::kLong);   // [B, S]
  batch.labels = torch::empty({rows, seq}, torch::kLong);  // [B, S]
  batch.documents = torch::empty({rows, seq}, torch::kLong);  // [B, S]
  for (int64_t r = 0; r < rows; ++r) {
    if (position_ + options_.dp_size() > samples_) {
      ++epoch_;
      position_ = 0;
    }
    const int64_t sample = sample_at(epoch_, position_ + options_.dp_rank());
    position_ += options_.dp_size();
    fill_row(sample, batch.input.data_ptr<int64_t>() + r * seq, batch.labels.data_ptr<int64_t>() + r * seq,
             batch.documents.data_ptr<int64_t>() + r * seq);
  }
  const int64_t* labels = batch.labels.data_ptr<int64_t>();
  batch.num_label_tokens = std::count_if(labels, labels + rows * seq, [](int64_t label) { return label != kIgnore; });
  return batch;
}

DataState DataLoader::position() const {
  DataState state;
  state.epoch = epoch_;
  state.position = position_;
  state.seed = options_.seed();
  state.samples = samples_;
  state.dp_size = options_.dp_size();
  return state;
}

void DataLoader::seek(const DataState& state) {
  TORCH_CHECK(state.seed == options_.seed(), "data: the saved data state used seed ", state.seed,
              ", this run uses training.seed = ", options_.seed());
  TORCH_CHECK(state.samples == samples_, "data: the saved data state had ", state.samples,
              " samples per epoch, this corpus and seq_len give ", samples_,
              " (changed corpus, tokenizer, seq_len or packing?)");
  TORCH_CHECK(state.epoch >= 0 && state.position >= 0 && state.position <= samples_,
              "data: the saved data state's position ", state.position, " (epoch ", state.epoch,
              ") is outside [0, ", samples_, "]");
  epoch_ = state.epoch;
  position_ = state.position;
}

titan::ComponentState DataLoader::state() const { return titan::ComponentState{{{"position", position().to_json()}}, {}}; }

void DataLoader::load_state(const titan::ComponentState& state) {
  auto saved = state.values.find("position");
  TORCH_CHECK(saved != state.values.end(), "data: the saved data loader state has no 'position'");
  seek(DataState::from_json(saved->second));
}

void DataLoader::reset() {
  epoch_ = 0;
  position_ = 0;
}

CorpusOptions corpus_options(const TrainConfig& config, bool validation) {
  const auto& d = config.data;
  TORCH_CHECK(!validation || !d.val_path.empty(), "data: validation asked for but data.val_path is empty");
  auto cache = d.cache_dir.empty() ? (fs::path(config.job.dump_folder) / "token_cache").string() : d.cache_dir;
  return CorpusOptions()
      .path(validation ? d.val_path : d.path)
      .kind(d.kind)
      .text_field(d.text_field)
      .chat(ChatOptions().format(d.chat_format).system(d.chat_system).date(d.chat_date))
      .skip_malformed(d.skip_malformed)
      .cache_dir(cache)
      .threads(static_cast<int>(d.tokenize_threads))
      .tokenizer_id(config.model.tokenizer_kind + ":" + config.model.tokenizer_path);
}

LoaderOptions loader_options(const TrainConfig& config, int64_t dp_rank, int64_t dp_size, bool validation) {
  return LoaderOptions()
      .batch_size(config.training.batch_size)
      .seq_len(config.training.seq_len)
      .pack(config.data.pack)
      .shuffle(!validation)
      .seed(config.training.seed)
      .dp_rank(dp_rank)
      .dp_size(dp_size);
}

ValidationResult evaluate(DataLoader& loader, int64_t steps, const std::function<torch::Tensor(const Batch&)>& loss_fn,
                          const ProcessGroupPtr& group) {
  TORCH_CHECK(steps >= 1, "data: validation needs steps >= 1, got ", steps);
  loader.reset();
  ValidationResult result;
  result.batches = std::max<int64_t>(1, std::min(steps, loader.samples_per_rank() / loader.options().batch_size()));
  double loss_sum = 0.0, tokens = 0.0;
  for (int64_t i = 0; i < result.batches; ++i) {
    auto batch = loader.next();
    auto loss = loss_fn(batch).detach().to(torch::kDouble).cpu().item<double>();
    loss_sum += loss * static_cast<double>(batch.num_label_tokens);
    tokens += static_cast<double>(batch.num_label_tokens);
  }
  auto totals = torch::tensor({loss_sum, tokens}, torch::kDouble);
  if (group && group->size() > 1) totals = all_reduce(totals.to(group->device()), group).cpu();
  result.tokens = static_cast<int64_t>(totals[1].item<double>());
  TORCH_CHECK(result.tokens > 0, "data: the validation batches hold no label tokens");
  result.loss = totals[0].item<double>() / totals[1].item<double>();
  result.perplexity = std::exp(result.loss);
  loader.reset();
  return result;
}

}  // namespace titan::examples
