// Tests of the example trainers' shared pieces (examples/common): config, data, optimizer,
// metrics and run guards. Cases in the "multirank" suite run under 2 ranks (trainer.ranks2); the
// others in one process (trainer.unit). The cases marked skip are run by the Python scripts next
// to this file (trainer.optim_parity, trainer.tensorboard), which prepare their inputs. Models,
// losses, optimizer steps, memory figures and the trainer itself run on titan_test::device().
#include "multirank.hpp"

#include <common/config.hpp>
#include <common/data.hpp>
#include <common/guard.hpp>
#include <common/metrics.hpp>
#include <common/optim.hpp>
#include <common/parallelism.hpp>
#include <models/registry.hpp>
#include <trainer/trainer.hpp>
#include <titan/safetensors.hpp>

#include "op_events.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <thread>

namespace fs = std::filesystem;
using namespace titan::examples;
using titan_test::device;

namespace {

/// Removes `dir` and everything in it (titan's nftw-based helper: libtorch.so exports its own
/// std::filesystem::remove_all, which crashes on non-empty folders).
void remove_tree(const fs::path& dir) { titan::detail::remove_tree(dir.string()); }

/// This process's scratch folder, removed when the process ends.
const fs::path& scratch_root() {
  static const struct Root {
    fs::path path = fs::temp_directory_path() / ("titan_trainer_" + std::to_string(::getpid()));
    ~Root() {
      remove_tree(path);
    }
  } root;
  return root.path;
}

/// A fresh folder for one test case.
fs::path scratch(const std::string& name) {
  auto dir = scratch_root() / name;
  remove_tree(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

std::string read_file(const fs::path& path) {
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
  explicit ByteTokenizer(int64_t pad = 0) : pad_(pad) {}
  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const override {
    std::vector<int64_t> ids;
    if (bos) ids.push_back(1);
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
  int64_t bos_id() const override { return 1; }
  int64_t eos_id() const override { return 2; }
  int64_t pad_id() const override { return pad_; }

 private:
  int64_t pad_;
};

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.contiguous().to(torch::kLong);
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

/// The reference packed stream of `docs` ([BOS prompt body EOS] each) and which positions are targets.
struct Stream {
  std::vector<int64_t> tokens;
  std::vector<bool> target;
};
Stream reference_stream(const std::vector<std::pair<std::string, std::string>>& docs) {
  ByteTokenizer tok;
  Stream s;
  for (const auto& [prompt, body] : docs) {
    s.tokens.push_back(1);
    s.target.push_back(false);
    for (auto id : tok.encode(prompt, false, false)) {
      s.tokens.push_back(id);
      s.target.push_back(false);
    }
    for (auto id : tok.encode(body, false, false)) {
      s.tokens.push_back(id);
      s.target.push_back(true);
    }
    s.tokens.push_back(2);
    s.target.push_back(true);
  }
  return s;
}

/// The expected (input, labels) of packed window `w`.
std::pair<std::vector<int64_t>, std::vector<int64_t>> reference_window(const Stream& s, int64_t w, int64_t seq) {
  std::vector<int64_t> input, labels;
  for (int64_t i = 0; i < seq; ++i) {
    input.push_back(s.tokens[w * (seq + 1) + i]);
    auto p = w * (seq + 1) + i + 1;
    labels.push_back(s.target[p] ? s.tokens[p] : -100);
  }
  return {input, labels};
}

const std::vector<std::string> kDocs = {
    "The first document talks about packing.",
    "Second: short.",
    "A third document, somewhat longer than the others, so that windows cross document boundaries.",
    "Fourth and last one!",
};

fs::path write_text_corpus(const fs::path& dir, const std::vector<std::string>& docs) {
  std::string text;
  for (const auto& d : docs) text += d + "\n\f\n";
  write_file(dir / "corpus.txt", text);
  return dir / "corpus.txt";
}

/// A corpus of `n` documents of varied lengths (lines, blank lines inside) in `kind`'s format
/// ("text", "jsonl" with a malformed line every 37th, "alpaca" with and without input).
std::string varied_corpus(const std::string& kind, int n) {
  std::mt19937 rng(5);
  const std::vector<std::string> words = {"alpha", "beta", "gamma", "delta", "tokens", "cache", "thread", "rank", "x"};
  auto sentence = [&] {
    std::string text;
    for (int w = 0, count = 1 + static_cast<int>(rng() % 12); w < count; ++w) text += (w ? " " : "") + words[rng() % words.size()];
    return text;
  };
  std::string out;
  for (int d = 0; d < n; ++d) {
    std::string doc = sentence();
    for (int l = 0, lines = static_cast<int>(rng() % 6); l < lines; ++l) doc += (rng() % 4 == 0 ? "\n\n" : "\n") + sentence();
    if (kind == "text") {
      out += doc + "\n\f\n";
    } else if (kind == "jsonl") {
      out += nlohmann::json{{"text", doc}}.dump() + "\n" + (d % 37 == 5 ? "{\"text\": 5}\n\n" : "");
    } else {
      out += nlohmann::json{{"instruction", sentence()}, {"input", d % 3 ? sentence() : ""}, {"output", doc}}.dump() + "\n";
    }
  }
  return out;
}

/// The cache file with `extension` (".tokens", ".lock") next to a corpus's .index.
std::string cache_file(const TokenCorpus& corpus, const std::string& extension) {
  const auto& index = corpus.index_path();
  return index.substr(0, index.size() - std::string(".index").size()) + extension;
}

std::shared_ptr<const TokenCorpus> open_corpus(const fs::path& file, const fs::path& dir, const std::string& kind = "text",
                                               bool skip = false) {
  return TokenCorpus::open(
      CorpusOptions().path(file.string()).kind(kind).cache_dir((dir / "cache").string()).skip_malformed(skip).show_progress(false),
      ByteTokenizer());
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Config

TEST_CASE("config: to_toml reads back to the same config") {
  auto dir = scratch("config_roundtrip");
  TrainConfig c;
  c.job.description = "quotes \" and \\ backslash\tand tab";
  c.optimizer.lr = 3e-4;
  c.optimizer.eps = 1e-8;
  c.optimizer.weight_decay = 0.1;
  c.training.steps = 17;
  c.training.max_norm = 0.0;
  c.lr_scheduler.decay_type = "cosine";
  c.lr_scheduler.min_lr_ratio = 1.0 / 3.0;
  c.activation_checkpoint.selective_ac_option = "op";
  c.data.pack = false;
  c.data.tokenize_threads = 3;
  save_config(c, (dir / "sub" / "saved.toml").string());
  auto back = load_config_file((dir / "sub" / "saved.toml").string());
  CHECK(to_toml(back) == to_toml(c));
  CHECK(back.optimizer.lr == c.optimizer.lr);
  CHECK(back.lr_scheduler.min_lr_ratio == c.lr_scheduler.min_lr_ratio);
  CHECK(back.job.description == c.job.description);
  CHECK(back.data.pack == false);
  CHECK(back.data.tokenize_threads == 3);
  CHECK(config_keys().size() == 77);
}

TEST_CASE("config: unknown sections and keys suggest the closest valid one") {
  auto dir = scratch("config_unknown");
  write_file(dir / "a.toml", "[training]\nstepz = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "a.toml").string()), "a.toml", "training.stepz", "training.steps");
  write_file(dir / "b.toml", "[trainig]\nsteps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "b.toml").string()), "b.toml", "[trainig]", "did you mean [training]");
  write_file(dir / "c.toml", "steps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "c.toml").string()), "c.toml", "'steps' must be a [section] table");
  write_file(dir / "d.toml", "[training\nsteps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "d.toml").string()), "d.toml", "TOML syntax error", "line 1");
  // A missing file is a missing file, not a syntax error.
  CHECK_ERROR_HAS(load_config_file((dir / "missing.toml").string()), "missing.toml: no such file");
  CHECK_ERROR_HAS(load_config_file(dir.string()), "is not a file");
  CHECK(closest_match("warmup_step", {"warmup_steps", "decay_type", "min_lr_ratio"}) == "warmup_steps");
}

TEST_CASE("config: wrong types and out-of-range values name the key and what is valid") {
  auto dir = scratch("config_values");
  write_file(dir / "t.toml", "[training]\nsteps = \"ten\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "t.toml").string()), "t.toml", "training.steps must be an integer",
                  "string");
  write_file(dir / "r.toml", "[optimizer]\nlr = -1\n");
  CHECK_ERROR_HAS(load_config_file((dir / "r.toml").string()), "r.toml", "optimizer.lr = -1", "out of range", ">= 0");
  write_file(dir / "b.toml", "[optimizer]\nbeta2 = 1.5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "b.toml").string()), "optimizer.beta2", "in [0.0, 1.0]");
  write_file(dir / "c.toml", "[lr_scheduler]\ndecay_type = \"exp\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "c.toml").string()), "lr_scheduler.decay_type = 'exp'",
                  "linear, cosine, constant");
  write_file(dir / "s.toml", "[activation_checkpoint]\nselective_ac_option = \"sometimes\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "s.toml").string()), "selective_ac_option", "\"op\" or a positive integer");
  write_file(dir / "g.toml", "[training]\nbatch_size = 8\nglobal_batch_size = 4\n");
  CHECK_ERROR_HAS(load_config_file((dir / "g.toml").string()), "training.global_batch_size = 4");
  write_file(dir / "p.toml", "[training]\nsteps = 10\nstop_at_step = 11\n");
  CHECK_ERROR_HAS(load_config_file((dir / "p.toml").string()), "p.toml", "training.stop_at_step = 11",
                  "[1, training.steps = 10]");
  write_file(dir / "h.toml", "[checkpoint]\ninitial_load_in_hf = true\n");
  CHECK_ERROR_HAS(load_config_file((dir / "h.toml").string()), "h.toml", "checkpoint.initial_load_in_hf",
                  "needs checkpoint.initial_load_path");
  // Integers are fine for floats and for selective_ac_option.
  write_file(dir / "ok.toml", "[optimizer]\nlr = 1\n[activation_checkpoint]\nselective_ac_option = 3\n");
  auto ok = load_config_file((dir / "ok.toml").string());
  CHECK(ok.optimizer.lr == 1.0);
  CHECK(ok.activation_checkpoint.selective_ac_option == "3");
}

TEST_CASE("config: command-line overrides in both forms, after the file") {
  auto dir = scratch("config_cli");
  auto file = (dir / "base.toml").string();
  write_file(file, "[training]\nsteps = 100\nseed = 3\n[model]\nname = \"llama2\"\n");
  std::vector<const char*> argv{"prog",          "--training.steps", "7", "--config", file.c_str(),
                                "--optimizer.lr=0.5", "--metrics.enable_tensorboard", "true",
                                "--activation_checkpoint.selective_ac_option=op"};
  auto c = parse_config_args(static_cast<int>(argv.size()), argv.data());
  CHECK(c.training.steps == 7);  // the override wins although it came first
  CHECK(c.training.seed == 3);
  CHECK(c.model.name == "llama2");
  CHECK(c.optimizer.lr == 0.5);
  CHECK(c.metrics.enable_tensorboard);
  CHECK(c.activation_checkpoint.selective_ac_option == "op");

  std::vector<const char*> bad_key{"prog", "--training.sed", "1"};
  CHECK_ERROR_HAS(parse_config_args(3, bad_key.data()), "command line", "training.sed", "training.seed");
  std::vector<const char*> bad_int{"prog", "--training.steps=many"};
  CHECK_ERROR_HAS(parse_config_args(2, bad_int.data()), "training.steps = 'many' is not an integer");
  std::vector<const char*> bad_bool{"prog", "--data.pack", "yes"};
  CHECK_ERROR_HAS(parse_config_args(3, bad_bool.data()), "data.pack = 'yes' must be true or false");
  std::vector<const char*> missing{"prog", "--training.steps"};
  CHECK_ERROR_HAS(parse_config_args(2, missing.data()), "--training.steps needs a value");
  std::vector<const char*> twice{"prog", "--config", "a", "--config=b"};
  CHECK_ERROR_HAS(parse_config_args(4, twice.data()), "--config given twice");
}

TEST_CASE("config: every example config validates") {
  int count = 0;
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(fs::path(TITAN_SOURCE_DIR) / "examples" / "configs")) {
    if (entry.path().extension() != ".toml") continue;
    INFO("config ", entry.path().string());
    auto c = load_config_file(entry.path().string());
    CHECK(!c.model.tokenizer_path.empty());
    CHECK(!c.data.path.empty());
    CHECK_NOTHROW(model_spec_of(c));  // a registered model and flavor
    // The batch settings divide at the data-parallel degree the file asks for (or 1 when inferred).
    int64_t dp = std::max<int64_t>(1, c.parallelism.data_parallel_shard_degree) *
                 c.parallelism.data_parallel_replicate_degree;
    CHECK(gradient_accumulation_steps(c.training.global_batch_size, c.training.batch_size, dp) >= 1);
    names.insert(entry.path().filename().string());
    ++count;
  }
  for (const char* expected : {"llama3_debug.toml", "llama2_debug.toml", "mistral_debug.toml", "llama3_debug_alpaca.toml",
                               "llama2_7b.toml", "llama2_13b.toml", "llama2_70b.toml", "llama3_8b.toml",
                               "llama3_70b.toml", "llama3_405b.toml", "mistral_7b.toml"})
    CHECK_MESSAGE(names.count(expected) == 1, expected, " is missing");
  CHECK(count >= 11);
}

TEST_CASE("config: config_changes lists the keys a resumed run changed, with both values") {
  TrainConfig saved;
  saved.training.stop_at_step = 10;
  const auto text = to_toml(saved);
  CHECK(config_changes(text, saved).empty());
  TrainConfig now = saved;
  now.training.stop_at_step = -1;
  now.parallelism.context_parallel_degree = 2;
  CHECK(config_changes(text, now) ==
        std::vector<std::string>{"training.stop_at_step: 10 -> -1", "parallelism.context_parallel_degree: 1 -> 2"});
  const auto unreadable = config_changes("[training\nsteps = 1", now);
  REQUIRE(unreadable.size() == 1);
  CHECK(unreadable[0].find("not TOML") != std::string::npos);
  const auto unknown = config_changes("[training]\nstepz = 1\n", now);
  REQUIRE(unknown.size() == 1);
  CHECK(unknown[0].find("training.stepz") != std::string::npos);
}

TEST_CASE("config: context parallel degree in the mesh; the sequence length must split into 2 cp chunks") {
  ParallelismConfig p;
  p.context_parallel_degree = 2;
  auto dims = ParallelDims::from_config(p, 4);  // dp_shard inferred: 2
  CHECK(dims.cp == 2);
  CHECK(dims.dp_shard == 2);
  CHECK(dims.dp() == 2);
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 3), doctest::Contains("context_parallel_degree (2)"));
  TrainConfig c;
  c.parallelism.context_parallel_degree = 2;
  c.training.seq_len = 30;
  CHECK_ERROR_HAS(validate(c), "training.seq_len = 30 must be a multiple of 2 x parallelism.context_parallel_degree = 4");
  c.training.seq_len = 32;
  validate(c);
  apply_override(c, "parallelism.context_parallel_rotate_method", "ring", "command line");
  CHECK_ERROR_HAS(validate(c), "context_parallel_rotate_method = 'ring'", "allgather, p2p");
}

TEST_CASE("config: model.fused_projections with float8 is an error naming both keys") {
  TrainConfig c;
  apply_override(c, "model.fused_projections", "true", "command line");
  validate(c);
  c.float8.enable = true;
  CHECK_ERROR_HAS(validate(c), "model.fused_projections = true and float8.enable = true do not combine",
                  "turn one off");
}

TEST_CASE("config: float8 options that do not go together are errors naming both keys") {
  TrainConfig c;
  c.float8.enable = true;
  apply_override(c, "float8.recipe_name", "rowwise", "command line");
  apply_override(c, "float8.enable_fsdp_float8_all_gather", "true", "command line");
  CHECK_ERROR_HAS(validate(c), "float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = \"tensorwise\"",
                  "not \"rowwise\"");
  c.float8.recipe_name = "tensorwise";
  validate(c);
  c.float8.enable_fsdp_float8_all_gather = false;
  c.float8.precompute_float8_dynamic_scale_for_fsdp = true;
  CHECK_ERROR_HAS(validate(c), "precompute_float8_dynamic_scale_for_fsdp = true needs",
                  "float8.enable_fsdp_float8_all_gather = true");
  apply_override(c, "float8.recipe_name", "rowwize", "command line");
  CHECK_ERROR_HAS(validate(c), "float8.recipe_name = 'rowwize'", "tensorwise, rowwise, rowwise_with_gw_hp");
}

TEST_CASE("config: pipeline parallel degrees, schedules and split points are checked with the keys named") {
  ParallelismConfig p;
  p.pipeline_parallel_degree = 2;
  p.tensor_parallel_degree = 2;
  auto dims = ParallelDims::from_config(p, 8);  // dp_shard inferred
  CHECK(dims.pp == 2);
  CHECK(dims.dp_shard == 2);
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 6),
                    doctest::Contains("pipeline_parallel_degree (2) x data_parallel_replicate_degree (1) x "
                                      "context_parallel_degree (1) x tensor_parallel_degree (2) = 4 does not divide "
                                      "the world size 6"));
  p.data_parallel_shard_degree = 3;
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 8), doctest::Contains("= 12 but the job has 8 ranks"));

  // Stages per rank: from the split points, or 2 for an interleaved schedule without them.
  ParallelismConfig q;
  q.pipeline_parallel_degree = 2;
  CHECK(pipeline_stages_per_rank(q) == 1);
  q.pipeline_parallel_schedule = "Interleaved1F1B";
  CHECK(pipeline_stages_per_rank(q) == 2);
  q.pipeline_parallel_split_points = "layers.1, layers.2,layers.3 ";
  CHECK(model_registry().at("llama3").pipeline_split(q).split_points() ==
        std::vector<std::string>{"layers.1", "layers.2", "layers.3"});
  CHECK(pipeline_stages_per_rank(q) == 2);
  q.pipeline_parallel_split_points = "layers.2";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("1 split points make 2 stages, 1 per rank, but schedule Interleaved1F1B runs "
                                      "at least 2 per rank (4 stages: 3 split points)"));
  q.pipeline_parallel_schedule = "1F1B";
  q.pipeline_parallel_split_points = "layers.1,layers.2";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("2 split points make 3 stages, which pipeline_parallel_degree 2 ranks cannot "
                                      "hold equally"));
  q.pipeline_parallel_split_points = "layers.1,layers.2,layers.3";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("3 split points make 4 stages but schedule 1F1B runs one stage per rank"));
}

TEST_CASE("config: the sections become the options of data, optimizer and metrics") {
  TrainConfig c;
  c.job.dump_folder = "/runs/x";
  c.model.tokenizer_path = "tok.model";
  c.data.kind = "jsonl";
  c.data.path = "train.jsonl";
  c.data.val_path = "valid.jsonl";
  c.data.text_field = "body";
  c.data.pack = false;
  c.training.batch_size = 3;
  c.training.seq_len = 64;
  c.training.seed = 9;
  c.training.steps = 77;
  c.optimizer.lr = 1e-3;
  c.optimizer.beta2 = 0.99;
  c.lr_scheduler.warmup_steps = 5;
  c.lr_scheduler.decay_type = "cosine";
  c.metrics.enable_tensorboard = true;
  auto corpus = corpus_options(c, false);
  CHECK(corpus.path() == "train.jsonl");
  CHECK(corpus.text_field() == "body");
  CHECK(corpus.cache_dir() == "/runs/x/token_cache");
  CHECK(corpus.tokenizer_id() == "tiktoken:tok.model");
  CHECK(corpus_options(c, true).path() == "valid.jsonl");
  c.data.cache_dir = "/cache";
  CHECK(corpus_options(c, true).cache_dir() == "/cache");
  auto train = loader_options(c, 1, 2, false);
  CHECK((train.batch_size() == 3 && train.seq_len() == 64 && train.seed() == 9 && !train.pack() && train.shuffle()));
  CHECK((train.dp_rank() == 1 && train.dp_size() == 2));
  CHECK_FALSE(loader_options(c, 1, 2, true).shuffle());
  auto adamw = adamw_config(c);
  CHECK((adamw.lr() == 1e-3 && adamw.beta2() == 0.99 && adamw.weight_decay() == 0.1));
  auto schedule = lr_schedule_options(c);
  CHECK((schedule.total_steps() == 77 && schedule.warmup_steps() == 5 && schedule.decay_type() == "cosine"));
  auto metrics = metrics_options(c, 0);
  CHECK(metrics.jsonl_path() == "/runs/x/metrics.jsonl");
  CHECK(metrics.tensorboard_dir() == "/runs/x/tb");
  CHECK(metrics.enabled());
  CHECK_FALSE(metrics_options(c, 1).enabled());
  c.data.val_path = "";
  CHECK_ERROR_HAS(corpus_options(c, true), "data.val_path is empty");
}

// ------------------------------------------------------------------------------------------------
// Data: corpora, tokens and batches are CPU tensors (the trainer moves each batch to its device).

TEST_CASE("data: text corpus is tokenized once and cached by path, size, mtime and tokenizer") {
  auto dir = scratch("data_cache");
  auto file = write_text_corpus(dir, kDocs);
  auto first = open_corpus(file, dir);
  CHECK_FALSE(first->from_cache());
  REQUIRE(first->num_documents() == 4);
  ByteTokenizer tok;
  int64_t total = 0;
  for (int64_t d = 0; d < 4; ++d) {
    std::vector<int64_t> ids(first->document(d), first->document(d) + first->document_length(d));
    CHECK(tok.decode(ids) == kDocs[d]);
    CHECK(first->prompt_length(d) == 0);
    total += static_cast<int64_t>(kDocs[d].size());
  }
  CHECK(first->num_tokens() == total);
  auto again = open_corpus(file, dir);
  CHECK(again->from_cache());
  CHECK(again->index_path() == first->index_path());
  // A different tokenizer (other special ids) gets its own cache.
  auto other = TokenCorpus::open(CorpusOptions().path(file.string()).cache_dir((dir / "cache").string()).show_progress(false),
                                 ByteTokenizer(-1));
  CHECK(other->index_path() == first->index_path());  // pad id does not change the tokens
  auto docs = kDocs;
  docs.push_back("A fifth document appears.");
  write_text_corpus(dir, docs);
  auto changed = open_corpus(file, dir);
  CHECK_FALSE(changed->from_cache());
  CHECK(changed->index_path() != first->index_path());
  CHECK(changed->num_documents() == 5);
}

TEST_CASE("data: JSONL field, malformed lines fail with file:line or are skipped and counted") {
  auto dir = scratch("data_jsonl");
  write_file(dir / "c.jsonl", "{\"body\": \"one\"}\n\n{\"body\": \"two\", \"x\": 1}\n{\"body\": 3}\n{\"body\": \"four\"}\n");
  auto open_with = [&](const std::string& field, bool skip) {
    return TokenCorpus::open(CorpusOptions()
                                 .path((dir / "c.jsonl").string())
                                 .kind("jsonl")
                                 .text_field(field)
                                 .skip_malformed(skip)
                                 .cache_dir((dir / "cache").string())
                                 .show_progress(false),
                             ByteTokenizer());
  };
  CHECK_ERROR_HAS(open_with("body", false), "c.jsonl:4", "field \"body\" is not a string", "data.skip_malformed");
  CHECK_ERROR_HAS(open_with("text", false), "c.jsonl:1", "no field \"text\"");
  for (const auto& entry : fs::directory_iterator(dir / "cache"))  // failed builds leave nothing
    CHECK_MESSAGE(entry.path().string().find(".tmp") == std::string::npos, entry.path().string());
  auto skipped = open_with("body", true);
  CHECK(skipped->num_documents() == 3);
  CHECK(skipped->skipped_lines() == 1);
  CHECK(open_with("body", true)->skipped_lines() == 1);  // also when read from the cache
  write_file(dir / "bad.jsonl", "{\"text\": \"ok\"}\n{not json\n");
  CHECK_ERROR_HAS(open_corpus(dir / "bad.jsonl", dir, "jsonl"), "bad.jsonl:2", "invalid JSON");
}

TEST_CASE("data: tokenizing on several threads gives the single-threaded cache byte for byte") {
  for (const std::string kind : {"text", "jsonl", "alpaca"}) {
    CAPTURE(kind);
    auto dir = scratch("data_threads_" + kind);
    const auto file = dir / ("corpus." + kind);
    write_file(file, varied_corpus(kind, 400));
    auto build = [&](int threads) {
      return TokenCorpus::open(CorpusOptions()
                                   .path(file.string())
                                   .kind(kind)
                                   .skip_malformed(true)
                                   .cache_dir((dir / ("cache" + std::to_string(threads))).string())
                                   .threads(threads)
                                   .show_progress(false),
                               ByteTokenizer());
    };
    auto one = build(1), three = build(3);  // 3 threads: ~20 batches of 4 KB in several waves
    CHECK(one->num_documents() == 400);
    CHECK(three->skipped_lines() == (kind == "jsonl" ? 11 : 0));
    CHECK(read_file(three->index_path()) == read_file(one->index_path()));
    CHECK(read_file(cache_file(*three, ".tokens")) == read_file(cache_file(*one, ".tokens")));
  }
}

TEST_CASE("data: a job waits while another holds the cache's lock, then reads the cache it built") {
  auto dir = scratch("data_lock");
  const auto file = write_text_corpus(dir, kDocs);
  const auto first = open_corpus(file, dir);
  const std::string index = first->index_path(), tokens = cache_file(*first, ".tokens");
  const std::string lock = cache_file(*first, ".lock");
  const std::string saved_index = read_file(index), saved_tokens = read_file(tokens);
  fs::remove(index);
  fs::remove(tokens);
  // Another process is building: it holds the lock (flock conflicts across open files, also in
  // one process).
  int fd = ::open(lock.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_EX) == 0);
  std::atomic<bool> opened{false};
  std::shared_ptr<const TokenCorpus> second;
  std::thread job([&] {
    second = open_corpus(file, dir);
    opened = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK_FALSE(opened);  // waits as long as the lock is held
  write_file(index, saved_index);  // the other process finishes its cache, then unlocks
  write_file(tokens, saved_tokens);
  ::flock(fd, LOCK_UN);
  ::close(fd);
  job.join();
  REQUIRE(second);
  CHECK(second->from_cache());  // read, not built a second time
  CHECK(second->num_documents() == 4);
}

TEST_CASE("data: packed windows follow the BOS/EOS stream, in file order without shuffle") {
  auto dir = scratch("data_pack");
  auto corpus = open_corpus(write_text_corpus(dir, kDocs), dir);
  std::vector<std::pair<std::string, std::string>> docs;
  for (const auto& d : kDocs) docs.emplace_back("", d);
  auto stream = reference_stream(docs);
  const int64_t seq = 16;
  DataLoader loader(corpus, ByteTokenizer(), LoaderOptions().batch_size(3).seq_len(seq).shuffle(false));
  const int64_t windows = static_cast<int64_t>(stream.tokens.size()) / (seq + 1);
  REQUIRE(loader.samples_per_epoch() == windows);
  for (int64_t w = 0; w < windows + 3; ++w) {  // past the epoch end: epoch 1 starts at window 0 again
    auto batch = loader.next();
    CHECK(batch.input.sizes() == torch::IntArrayRef{3, seq});
    CHECK(batch.labels.dtype() == torch::kLong);
    for (int64_t r = 0; r < 3; ++r) {
      auto expected = reference_window(stream, (w * 3 + r) % windows, seq);
      CHECK(to_vector(batch.input[r]) == expected.first);
      CHECK(to_vector(batch.labels[r]) == expected.second);
    }
    CHECK(batch.num_label_tokens == batch.labels.ne(-100).sum().item<int64_t>());
  }
}

TEST_CASE("data: shuffling is a seeded permutation per epoch; ranks take disjoint strided shares") {
  auto dir = scratch("data_shuffle");
  std::vector<std::string> docs;
  for (int i = 0; i < 40; ++i) docs.push_back("document number " + std::to_string(i) + " with some words");
  auto corpus = open_corpus(write_text_corpus(dir, docs), dir);
  const int64_t seq = 8;
  auto epoch_rows = [&](LoaderOptions options, int64_t epochs) {
    DataLoader loader(corpus, ByteTokenizer(), options.batch_size(1).seq_len(seq));
    std::vector<std::vector<int64_t>> rows;
    for (int64_t i = 0; i < loader.samples_per_rank() * epochs; ++i) rows.push_back(to_vector(loader.next().input[0]));
    return rows;
  };
  auto plain = epoch_rows(LoaderOptions().shuffle(false), 1);
  auto shuffled = epoch_rows(LoaderOptions().seed(5), 2);
  const auto n = plain.size();
  REQUIRE(n > 20);
  std::vector<std::vector<int64_t>> epoch0(shuffled.begin(), shuffled.begin() + n), epoch1(shuffled.begin() + n, shuffled.end());
  CHECK(epoch0 != plain);
  CHECK(epoch0 != epoch1);
  auto sorted = [](std::vector<std::vector<int64_t>> v) {
    std::sort(v.begin(), v.end());
    return v;
  };
  CHECK(sorted(epoch0) == sorted(plain));
  CHECK(sorted(epoch1) == sorted(plain));
  CHECK(epoch_rows(LoaderOptions().seed(5), 2) == shuffled);
  CHECK(epoch_rows(LoaderOptions().seed(6), 1) != epoch0);

  // Two ranks: rank r takes positions r, r + 2, ... of the same permutation.
  auto rank0 = epoch_rows(LoaderOptions().seed(5).dp_size(2).dp_rank(0), 1);
  auto rank1 = epoch_rows(LoaderOptions().seed(5).dp_size(2).dp_rank(1), 1);
  REQUIRE(rank0.size() == n / 2);
  for (size_t i = 0; i < n / 2; ++i) {
    CHECK(rank0[i] == epoch0[2 * i]);
    CHECK(rank1[i] == epoch0[2 * i + 1]);
  }
  CHECK_ERROR_HAS(DataLoader(corpus, ByteTokenizer(), LoaderOptions().seq_len(100000)), "fewer than the 1");
}

TEST_CASE("data: the saved state resumes the exact stream, across epochs") {
  auto dir = scratch("data_resume");
  std::vector<std::string> docs;
  for (int i = 0; i < 12; ++i) docs.push_back("resumable document " + std::to_string(i));
  auto corpus = open_corpus(write_text_corpus(dir, docs), dir);
  auto options = LoaderOptions().batch_size(2).seq_len(8).seed(11).dp_size(2).dp_rank(1);
  DataLoader a(corpus, ByteTokenizer(), options);
  const int64_t per_epoch_batches = a.samples_per_rank() / 2;
  for (int64_t i = 0; i < per_epoch_batches + 1; ++i) a.next();
  auto saved = a.position().to_json();
  std::vector<torch::Tensor> expected;
  for (int i = 0; i < per_epoch_batches + 2; ++i) expected.push_back(a.next().labels);

  DataLoader b(corpus, ByteTokenizer(), options);
  auto state = DataState::from_json(saved);
  CHECK(state.epoch >= 1);
  CHECK(DataState::from_map(state.to_map()) == state);
  b.seek(state);
  for (const auto& e : expected) CHECK(torch::equal(b.next().labels, e));
  // As a checkpoint component (titan::Stateful): the position as {"position": its JSON}.
  DataLoader c(corpus, ByteTokenizer(), options);
  c.load_state(titan::ComponentState{{{"position", saved}}, {}});
  CHECK(c.state().values.at("position") == saved);
  CHECK(torch::equal(c.next().labels, expected.front()));
  CHECK_ERROR_HAS(c.load_state(titan::ComponentState{}), "no 'position'");

  DataLoader other_seed(corpus, ByteTokenizer(), LoaderOptions(options).seed(12));
  CHECK_ERROR_HAS(other_seed.seek(state), "seed 11", "training.seed = 12");
  CHECK_ERROR_HAS(DataState::from_json("{\"epoch\": 1}"), "no 'position'");
}

TEST_CASE("data: a state saved by 2 ranks continues the same global order on 1 or 3 ranks") {
  auto dir = scratch("data_reshard");
  std::vector<std::string> docs;
  for (int i = 0; i < 30; ++i) docs.push_back("resharded document " + std::to_string(i));
  auto corpus = open_corpus(write_text_corpus(dir, docs), dir);
  auto options = LoaderOptions().batch_size(1).seq_len(8).seed(3);
  DataLoader single(corpus, ByteTokenizer(), options);
  std::vector<torch::Tensor> global;  // the order of epoch 0 as one rank sees it
  for (int64_t i = 0; i < single.samples_per_epoch(); ++i) global.push_back(single.next().input);
  REQUIRE(global.size() >= 12);

  // Two ranks take 3 rows each: samples 0..5 of the order.
  DataLoader rank0(corpus, ByteTokenizer(), LoaderOptions(options).dp_size(2).dp_rank(0));
  DataLoader rank1(corpus, ByteTokenizer(), LoaderOptions(options).dp_size(2).dp_rank(1));
  for (int i = 0; i < 3; ++i) {
    CHECK(torch::equal(rank0.next().input, global[2 * i]));
    CHECK(torch::equal(rank1.next().input, global[2 * i + 1]));
  }
  CHECK(rank0.position() == rank1.position());
  const auto saved = rank0.position();
  CHECK(saved.position == 6);
  for (int64_t ranks : {1, 3}) {
    CAPTURE(ranks);
    for (int64_t r = 0; r < ranks; ++r) {
      DataLoader resumed(corpus, ByteTokenizer(), LoaderOptions(options).dp_size(ranks).dp_rank(r));
      resumed.seek(saved);
      CHECK(torch::equal(resumed.next().input, global[6 + r]));
      CHECK(torch::equal(resumed.next().input, global[6 + ranks + r]));
    }
  }
}

TEST_CASE("data: Alpaca samples train on the response only, padded or packed") {
  auto dir = scratch("data_alpaca");
  struct Example {
    std::string instruction, input, output;
  };
  std::vector<Example> examples = {{"Define the word.", "abaca", "A plant."},
                                   {"Say hello.", "", "Hello!"},
                                   {"Give a longer answer, please.", "x", "This answer is long enough to be cut."}};
  std::string text;
  for (const auto& e : examples) {
    nlohmann::json j{{"instruction", e.instruction}, {"output", e.output}};
    if (!e.input.empty()) j["input"] = e.input;
    text += j.dump() + "\n";
  }
  write_file(dir / "a.jsonl", text);
  CHECK(alpaca_prompt("Say hello.", "").find("### Input:") == std::string::npos);
  CHECK(alpaca_prompt("Define.", "abaca").find("### Input:\nabaca\n\n### Response:\n") != std::string::npos);
  auto corpus = open_corpus(dir / "a.jsonl", dir, "alpaca");
  REQUIRE(corpus->num_documents() == 3);
  ByteTokenizer tok;
  std::vector<std::pair<std::string, std::string>> docs;
  for (const auto& e : examples) docs.emplace_back(alpaca_prompt(e.instruction, e.input), e.output);
  CHECK(corpus->prompt_length(0) == static_cast<int64_t>(docs[0].first.size()));

  // Padded: one example per row; padding and prompt are ignored in the labels.
  const int64_t seq = static_cast<int64_t>(docs[1].first.size() + docs[1].second.size()) + 10;
  for (int64_t pad : {0, -1}) {
    DataLoader padded(corpus, ByteTokenizer(pad), LoaderOptions().batch_size(3).seq_len(seq).shuffle(false).pack(false));
    auto batch = padded.next();
    auto row = to_vector(batch.input[1]), labels = to_vector(batch.labels[1]);
    auto stream = reference_stream({docs[1]});
    for (int64_t i = 0; i < seq; ++i) {
      bool inside = i + 1 < static_cast<int64_t>(stream.tokens.size());
      CHECK(row[i] == (i < static_cast<int64_t>(stream.tokens.size()) ? stream.tokens[i] : (pad >= 0 ? pad : 2)));
      CHECK(labels[i] == (inside && stream.target[i + 1] ? stream.tokens[i + 1] : -100));
    }
    std::vector<int64_t> trained;
    for (auto id : labels)
      if (id != -100) trained.push_back(id);
    CHECK(tok.decode(trained) == "Hello!");
    CHECK(trained.back() == 2);  // EOS is a target
    // The long example is cut to seq + 1 tokens.
    CHECK(to_vector(batch.input[2])[seq - 1] == reference_stream({docs[2]}).tokens[seq - 1]);
  }

  // Packed: the same stream as the reference, with prompt targets ignored.
  DataLoader packed(corpus, ByteTokenizer(), LoaderOptions().batch_size(1).seq_len(32).shuffle(false));
  auto stream = reference_stream(docs);
  for (int64_t w = 0; w < packed.samples_per_epoch(); ++w) {
    auto batch = packed.next();
    auto expected = reference_window(stream, w, 32);
    CHECK(to_vector(batch.input[0]) == expected.first);
    CHECK(to_vector(batch.labels[0]) == expected.second);
  }
}

TEST_CASE("data: evaluate weights each batch's loss by its label tokens") {
  auto dir = scratch("data_eval");
  auto corpus = open_corpus(write_text_corpus(dir, kDocs), dir);
  auto options = LoaderOptions().batch_size(2).seq_len(12).shuffle(false).pack(false);
  DataLoader loader(corpus, ByteTokenizer(), options);
  // A stand-in loss that differs per batch, on the device: the mean label id / 100 over non-ignored labels.
  auto loss_fn = [](const Batch& b) {
    auto labels = b.labels.to(device());
    auto mask = labels.ne(-100);
    return (labels.masked_select(mask).to(torch::kDouble).sum() / mask.sum() / 100.0).to(torch::kFloat);
  };
  loader.next();  // evaluate starts from the beginning anyway
  auto result = evaluate(loader, 5, loss_fn);
  CHECK(result.batches == 2);  // 4 documents / batch 2: capped at one epoch
  DataLoader fresh(corpus, ByteTokenizer(), options);
  double sum = 0, count = 0;
  for (int i = 0; i < 2; ++i) {
    auto b = fresh.next();
    auto mask = b.labels.ne(-100);
    sum += b.labels.masked_select(mask).to(torch::kDouble).sum().item<double>() / 100.0;
    count += static_cast<double>(mask.sum().item<int64_t>());
  }
  CHECK(result.tokens == static_cast<int64_t>(count));
  CHECK(result.loss == doctest::Approx(sum / count).epsilon(1e-6));
  CHECK(result.perplexity == doctest::Approx(std::exp(sum / count)).epsilon(1e-6));
  CHECK(loader.position().position == 0);
}

// ------------------------------------------------------------------------------------------------
// Optimizer

namespace {

/// A small model with weights, biases and a norm (the names decide the weight-decay groups).
struct TinyMLP : torch::nn::Module {
  TinyMLP(int64_t in, int64_t hidden, int64_t out) {
    fc1 = register_module("fc1", torch::nn::Linear(in, hidden));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({hidden})));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, out));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(norm(fc1(x)))); }  // [N, in] -> [N, out]
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};

}  // namespace

TEST_CASE("optim: AdamW groups exclude norms, biases and 1-D parameters from weight decay") {
  CHECK(is_no_decay("layers.0.attention_norm.weight", torch::zeros({4, 4})));
  CHECK(is_no_decay("fc1.bias", torch::zeros({4, 4})));
  CHECK(is_no_decay("scale", torch::zeros({4})));
  CHECK_FALSE(is_no_decay("layers.0.attention.wq.weight", torch::zeros({4, 4})));
  CHECK_FALSE(is_no_decay("tok_embeddings.weight", torch::zeros({4, 4})));
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig().lr(0.01).weight_decay(0.2).beta2(0.99));
  REQUIRE(opt->param_groups().size() == 2);
  CHECK(opt->param_groups()[0].params().size() == 2);  // fc1.weight, fc2.weight
  CHECK(opt->param_groups()[0].params()[0].is_same(model->fc1->weight));
  CHECK(opt->param_groups()[1].params().size() == 4);
  auto& decayed = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[0].options());
  auto& exempt = static_cast<torch::optim::AdamWOptions&>(opt->param_groups()[1].options());
  CHECK(decayed.weight_decay() == 0.2);
  CHECK(exempt.weight_decay() == 0.0);
  CHECK(std::get<1>(exempt.betas()) == 0.99);
  auto all = make_adamw(model->named_parameters(), AdamWConfig().no_decay_norms_and_biases(false));
  CHECK(all->param_groups().size() == 1);
  CHECK(all->param_groups()[0].params().size() == 6);
}

TEST_CASE("optim: LR schedule warms up linearly, then decays to the minimum at the last step") {
  LRSchedule cosine(LRScheduleOptions().warmup_steps(2).total_steps(10).decay_type("cosine").min_lr_ratio(0.1));
  CHECK(cosine.factor(1) == doctest::Approx(1.0 / 3.0));
  CHECK(cosine.factor(2) == doctest::Approx(2.0 / 3.0));
  CHECK(cosine.factor(3) == doctest::Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI / 8))));
  CHECK(cosine.factor(6) == doctest::Approx(0.55));
  CHECK(cosine.factor(10) == doctest::Approx(0.1));
  LRSchedule linear(LRScheduleOptions().warmup_steps(0).total_steps(4).decay_type("linear"));
  CHECK(linear.factor(1) == doctest::Approx(0.75));
  CHECK(linear.factor(4) == doctest::Approx(0.0));
  LRSchedule constant(LRScheduleOptions().warmup_steps(3).total_steps(4).decay_type("constant").min_lr_ratio(0.5));
  CHECK(constant.factor(3) == doctest::Approx(0.75));
  CHECK(constant.factor(4) == 1.0);
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig());
  CHECK(cosine.apply(*opt, 6, 2e-3) == doctest::Approx(1.1e-3));
  for (auto& g : opt->param_groups()) CHECK(g.options().get_lr() == doctest::Approx(1.1e-3));
  CHECK_ERROR_HAS(cosine.factor(0), "count from 1");
  CHECK_ERROR_HAS(LRSchedule(LRScheduleOptions().decay_type("step")), "'step'", "linear, cosine, constant");
}

TEST_CASE("optim: the LR schedule is a checkpoint component holding the last step it applied") {
  auto model = std::make_shared<TinyMLP>(3, 4, 2);
  auto opt = make_adamw(model->named_parameters(), AdamWConfig());
  LRSchedule schedule(LRScheduleOptions().warmup_steps(2).total_steps(10));
  CHECK(schedule.last_step() == 0);
  schedule.apply(*opt, 7, 1e-3);
  auto saved = schedule.state();
  CHECK(saved.values.at("last_step") == "7");
  LRSchedule resumed(LRScheduleOptions().warmup_steps(2).total_steps(10));
  resumed.load_state(saved);
  CHECK(resumed.last_step() == 7);
  CHECK_ERROR_HAS(resumed.load_state(titan::ComponentState{{{"last_step", "x"}}, {}}), "'x' is not a step number");
  CHECK_ERROR_HAS(resumed.load_state(titan::ComponentState{}), "no 'last_step'");
}

TEST_CASE("optim: gradient accumulation steps come from the global batch") {
  CHECK(gradient_accumulation_steps(32, 4, 2) == 4);
  CHECK(gradient_accumulation_steps(-1, 4, 2) == 1);
  CHECK(gradient_accumulation_steps(8, 4, 2) == 1);
  CHECK_ERROR_HAS(gradient_accumulation_steps(30, 4, 2), "training.global_batch_size = 30", "4 x 2 = 8");
}

TEST_CASE("optim: parity with PyTorch AdamW, warmup + cosine and clip_grad_norm_" * doctest::skip()) {
  // Run by optim_parity.py, which writes the reference (initial weights, data, and what PyTorch
  // computed) and names it in TITAN_TRAINER_PARITY. Twice: clipping by titan::clip_grad_norm_ before
  // the step, and (the trainer's way) titan::grad_norm + clip_coefficient applied inside the step.
  const char* path = std::getenv("TITAN_TRAINER_PARITY");
  REQUIRE_MESSAGE(path != nullptr, "set TITAN_TRAINER_PARITY (optim_parity.py does)");
  auto ref = nlohmann::json::parse(read_file(path));
  auto tensor = [](const nlohmann::json& j) {  // on device()
    auto values = j["data"].get<std::vector<double>>();
    return torch::tensor(values, torch::kDouble).to(device(), torch::kFloat).reshape(j["shape"].get<std::vector<int64_t>>());
  };
  const auto& cfg = ref["config"];
  const double max_norm = cfg["max_norm"].get<double>();
  for (const bool in_step : {false, true}) {
    INFO((in_step ? "clipping inside FusedAdamW's step (scale_grads)" : "clip_grad_norm_ before the step"));
    auto model =
        std::make_shared<TinyMLP>(cfg["in"].get<int64_t>(), cfg["hidden"].get<int64_t>(), cfg["out"].get<int64_t>());
    model->to(device());
    {
      torch::NoGradGuard no_grad;
      for (auto& item : model->named_parameters()) item.value().copy_(tensor(ref["initial"][item.key()]));
    }
    auto opt = make_adamw(model->named_parameters(), AdamWConfig()
                                                         .lr(cfg["lr"].get<double>())
                                                         .beta1(cfg["beta1"].get<double>())
                                                         .beta2(cfg["beta2"].get<double>())
                                                         .eps(cfg["eps"].get<double>())
                                                         .weight_decay(cfg["weight_decay"].get<double>()));
    const int64_t steps = cfg["steps"].get<int64_t>();
    LRSchedule schedule(LRScheduleOptions()
                            .warmup_steps(cfg["warmup_steps"].get<int64_t>())
                            .total_steps(steps)
                            .decay_type(cfg["decay_type"].get<std::string>())
                            .min_lr_ratio(cfg["min_lr_ratio"].get<double>()));
    int64_t clipped = 0;
    for (int64_t s = 1; s <= steps; ++s) {
      const auto& batch = ref["batches"][s - 1];
      double lr = schedule.apply(*opt, s, cfg["lr"].get<double>());
      opt->zero_grad();
      auto logits = model->forward(tensor(batch["x"]));  // [N, out]
      auto loss = torch::nn::functional::cross_entropy(logits, tensor(batch["y"]).to(torch::kLong));
      loss.backward();
      torch::Tensor norm;
      if (in_step) {
        norm = titan::grad_norm(model, titan_test::world()->group());
        opt->scale_grads(titan::clip_coefficient(norm, max_norm));
      } else {
        norm = titan::clip_grad_norm_(model, max_norm, titan_test::world()->group());
      }
      opt->step();
      clipped += norm.item<double>() > max_norm;
      INFO("step ", s);
      CHECK(loss.item<double>() == doctest::Approx(ref["losses"][s - 1].get<double>()).epsilon(1e-6));
      CHECK(lr == doctest::Approx(ref["lrs"][s - 1].get<double>()).epsilon(1e-12));
      CHECK(norm.item<double>() == doctest::Approx(ref["grad_norms"][s - 1].get<double>()).epsilon(1e-5));
    }
    CHECK_MESSAGE(clipped > 0, "the reference never clips: raise its learning rate or lower max_norm");
    for (auto& item : model->named_parameters()) {
      INFO("parameter ", item.key());
      CHECK_CLOSE(item.value(), tensor(ref["final"][item.key()]), 1e-6);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Metrics

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

// ------------------------------------------------------------------------------------------------
// Guards

TEST_CASE("guard: non-finite steps stop the run naming them, or are skipped") {
  NanGuard stop(nan_policy_from_string("stop"));
  stop.check(1, 10, 0);
  CHECK_ERROR_HAS(stop.check(11, 20, 2), "2 step(s) of steps 11-20", "nan_policy");
  NanGuard skip(nan_policy_from_string("skip"));
  skip.check(11, 20, 2);
  CHECK_ERROR_HAS(nan_policy_from_string("ignore"), "'ignore'", "stop, skip");
}

TEST_CASE("optim: FusedAdamW equals LibTorch's AdamW loop, and skip_if leaves everything as it was") {
  torch::manual_seed(3);
  auto make = [] {
    torch::manual_seed(5);
    return std::make_shared<TinyMLP>(6, 16, 5);
  };
  auto fused_model = make(), loop_model = make();
  fused_model->to(device());
  loop_model->to(device());
  auto fused = make_adamw(fused_model->named_parameters(), AdamWConfig().lr(1e-2));
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (const auto& group : fused->param_groups()) {
    std::vector<torch::Tensor> params;
    for (const auto& p : group.params()) {
      for (const auto& item : fused_model->named_parameters())
        if (item.value().is_same(p)) params.push_back(loop_model->named_parameters()[item.key()]);
    }
    groups.emplace_back(params, group.options().clone());
  }
  torch::optim::AdamW loop(groups, torch::optim::AdamWOptions(1e-2));
  auto x = torch::randn({8, 6}).to(device());
  auto y = torch::randint(0, 5, {8}).to(device());
  auto step = [&](torch::nn::Module& model, torch::optim::Optimizer& optimizer, bool scale_nan) {
    optimizer.zero_grad();
    auto logits = static_cast<TinyMLP&>(model).forward(x);
    auto loss = torch::nn::functional::cross_entropy(logits, y) * (scale_nan ? NAN : 1.0);
    loss.backward();
    optimizer.step();
  };
  for (int s = 0; s < 4; ++s) {
    step(*fused_model, *fused, false);
    step(*loop_model, loop, false);
  }
  for (const auto& item : fused_model->named_parameters()) {
    INFO(item.key());
    CHECK_CLOSE(item.value(), loop_model->named_parameters()[item.key()], 1e-6);
  }
  // A skipped step: NaN gradients, found_inf set; parameters and moments are unchanged.
  std::map<std::string, torch::Tensor> params, moments;
  for (const auto& item : fused_model->named_parameters()) {
    params[item.key()] = item.value().detach().clone();
    auto& state = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(item.value().unsafeGetTensorImpl()));
    moments[item.key()] = state.exp_avg_sq().clone();
  }
  fused->skip_if(torch::ones({1}, device()));
  step(*fused_model, *fused, true);
  for (const auto& item : fused_model->named_parameters()) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), params[item.key()]));
    auto& state = static_cast<torch::optim::AdamWParamState&>(*fused->state().at(item.value().unsafeGetTensorImpl()));
    CHECK(torch::equal(state.exp_avg_sq(), moments[item.key()]));
    CHECK(state.step() == 5);  // the count advances (documented)
  }
  // The flag holds for one step only.
  step(*fused_model, *fused, false);
  CHECK_FALSE(torch::equal(fused_model->named_parameters()[0].value(), params[fused_model->named_parameters()[0].key()]));
}

TEST_CASE("guard: SIGINT/SIGTERM set the flag instead of ending the process") {
  {
    SignalFlag flag;
    CHECK_FALSE(flag.requested());
    CHECK_ERROR_HAS(SignalFlag(), "another SignalFlag");
    std::raise(SIGTERM);
    CHECK(flag.requested());
    CHECK(flag.signal_number() == SIGTERM);
    CHECK(flag.any_rank(nullptr));
  }
  SignalFlag again;
  CHECK_FALSE(again.requested());
  std::raise(SIGINT);
  CHECK(again.signal_number() == SIGINT);
}

// ------------------------------------------------------------------------------------------------
// The training loop

namespace {

/// The trainer's own .item() calls (aten::item or aten::_local_scalar_dense not inside another
/// operator: a CPU kernel reading its scalar arguments does not count) per training step, each
/// charged to the step whose train_step ran last (the events' tag).
std::map<int64_t, int> items_per_step(const titan_test::OpEvents& observer) {
  std::map<int64_t, int> counts;
  for (const auto& e : observer.events())
    if (e.depth == 0 && (e.name == "aten::item" || e.name == "aten::_local_scalar_dense")) ++counts[e.tag];
  return counts;
}

struct ProbeTrainer : Trainer {
  using Trainer::Trainer;
  titan_test::OpEvents* events = nullptr;  // tagged with the step
  bool train_step(int64_t step) override {
    if (events != nullptr) events->tag(step);
    return Trainer::train_step(step);
  }
};

}  // namespace

TEST_CASE("trainer: the rng component restores the CPU and the device generator") {
  // On a GPU run, a fresh generator of the GPU; on the CPU a second CPU generator stands in for it.
  auto device_generator = [](uint64_t seed) {
    if (titan_test::device().is_cpu()) return at::detail::createCPUGenerator(seed);
    auto generator = at::globalContext()
                         .getAcceleratorHooksInterface(titan_test::device().type())
                         .getNewGenerator(titan_test::device().index());
    generator.set_current_seed(seed);
    return generator;
  };
  auto cpu = at::detail::createCPUGenerator(1), device = device_generator(2);
  CHECK(device.device() == titan_test::device());
  GeneratorState rng(cpu, device);
  const auto saved = rng.state();
  REQUIRE(saved.tensors.size() == 2);
  auto draw = [](at::Generator& g) { return torch::rand({4}, g, torch::TensorOptions().device(g.device())); };
  const auto cpu_next = draw(cpu), device_next = draw(device);
  rng.load_state(saved);
  CHECK(torch::equal(draw(cpu), cpu_next));
  CHECK(torch::equal(draw(device), device_next));
  // A checkpoint saved on CPU (no device state) leaves the device generator alone.
  GeneratorState cpu_only(at::detail::createCPUGenerator(3));
  const auto before = draw(device);
  rng.load_state(cpu_only.state());
  CHECK_FALSE(torch::equal(draw(device), before));  // not rewound
  titan::ComponentState empty;
  CHECK_ERROR_HAS(rng.load_state(empty), "no 'state' tensor");
}

/// A trainer config for a few quick steps in `dir`: the debug Llama 3 with a byte tokenizer, a
/// 40-document corpus, seq 16, 2 micro-batches of 2, no validation, then `extra` overrides.
TrainConfig tiny_run(const fs::path& dir, const std::vector<std::string>& extra) {
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

TEST_CASE("trainer: the host reads the device only at sync steps (logging, checkpoint, last)") {
  auto dir = scratch("trainer_sync");
  auto config = tiny_run(dir, {"--training.steps", "7", "--metrics.log_freq", "3", "--checkpoint.interval", "5",
                               "--checkpoint.keep_latest_k", "1"});
  titan_test::OpEvents observer;
  ProbeTrainer trainer(std::move(config));
  trainer.events = &observer;
  trainer.build();
  CHECK(trainer.world()->device() == device());  // the test main exported TITAN_DEVICE
  trainer.train();
  const auto counts = items_per_step(observer);
  // Sync steps: 1, 3, 6 (log_freq 3), 5 (checkpoint) and 7 (last); between them, none.
  for (int64_t step = 1; step <= 7; ++step) {
    CAPTURE(step);
    const bool sync = step == 1 || step % 3 == 0 || step == 5 || step == 7;
    const int items = counts.count(step) ? counts.at(step) : 0;
    if (sync) {
      CHECK(items > 0);
    } else {
      CHECK(items == 0);
    }
  }
  std::ifstream jsonl(dir / "run" / "metrics.jsonl");
  std::vector<int64_t> logged;
  for (std::string text; std::getline(jsonl, text);) {
    auto record = nlohmann::json::parse(text);
    CHECK(std::isfinite(record["loss"].get<double>()));
    logged.push_back(record["step"].get<int64_t>());
  }
  CHECK(logged == std::vector<int64_t>{1, 3, 6});
}

TEST_CASE("trainer: model.n_layers builds that many blocks of the flavor's shape") {
  auto dir = scratch("trainer_n_layers");
  Trainer trainer(tiny_run(dir, {"--training.steps", "1", "--checkpoint.enable", "false", "--model.n_layers", "1"}));
  trainer.build();
  const auto children = trainer.model().named_children();
  REQUIRE(children.contains("layers"));
  CHECK(children["layers"]->children().size() == 1);  // the debug flavor has 4
  CHECK(trainer.model().named_parameters().contains("layers.0.attention.wq.weight"));
  CHECK(!trainer.model().named_parameters().contains("layers.1.attention.wq.weight"));
}

TEST_CASE("trainer: model.name llama3.1 trains, with Llama 3.1's RoPE scaling") {
  auto rope_cos = [](const std::string& name) {
    Trainer trainer(tiny_run(scratch("trainer_model_" + name),
                             {"--training.steps", "1", "--checkpoint.enable", "false", "--model.name", name}));
    trainer.train();
    return trainer.model().named_buffers()["rope_cos"].clone();  // [seq, head_dim / 2]
  };
  const auto plain = rope_cos("llama3"), scaled = rope_cos("llama3.1");
  CHECK(titan_test::same_values(plain[0], scaled[0]));           // position 0: no rotation either way
  CHECK_FALSE(titan_test::same_values(plain[5], scaled[5]));     // the low frequencies are divided by 8
  CHECK(titan_test::same_values(plain.select(1, 0), scaled.select(1, 0)));  // the highest one is kept
}

// ------------------------------------------------------------------------------------------------
// The model registry

TEST_CASE("registry: the built-in families, and errors that list what is registered") {
  CHECK(model_registry().names() == std::vector<std::string>{"llama2", "llama3", "llama3.1", "mistral"});
  CHECK(model_registry().at("llama3.1").flavors == std::vector<std::string>{"1B", "405B", "70B", "8B", "debug"});
  TrainConfig config;
  config.model.name = "gpt2";
  CHECK_ERROR_HAS(model_spec_of(config), "model.name = 'gpt2' is not a registered model",
                  "llama2, llama3, llama3.1, mistral");
  config.model.name = "mistral";
  config.model.flavor = "8B";
  CHECK_ERROR_HAS(model_spec_of(config), "model.flavor = '8B' is not a flavor of mistral", "7B, debug");
  ModelRegistry registry;
  ModelSpec incomplete = model_registry().at("llama3");
  incomplete.name = "incomplete";
  incomplete.facts = nullptr;
  CHECK_ERROR_HAS(registry.add(incomplete), "model 'incomplete' has no facts function");
  registry.add(model_registry().at("llama3"));
  CHECK_ERROR_HAS(registry.add(model_registry().at("llama3")), "model 'llama3' is already registered");
}

namespace {

/// A family the trainer has never heard of: an embedding, residual tanh blocks and an output
/// layer, every submodule through titan::call.
struct ToyBlockImpl : torch::nn::Module {
  explicit ToyBlockImpl(int64_t dim, torch::Device device) {
    weight = register_parameter("weight", torch::empty({dim, dim}, torch::TensorOptions().device(device)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + torch::tanh(torch::matmul(x, weight.t())); }  // [B, S, dim]
  torch::Tensor weight;  // [dim, dim]
};
TORCH_MODULE(ToyBlock);

struct ToyOutputImpl : torch::nn::Module {
  ToyOutputImpl(int64_t dim, int64_t vocab, torch::Device device) {
    weight = register_parameter("weight", torch::empty({vocab, dim}, torch::TensorOptions().device(device)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return torch::matmul(x, weight.t()); }  // [B, S, vocab]
  torch::Tensor weight;  // [vocab, dim]
};
TORCH_MODULE(ToyOutput);

struct ToyLM : CausalLM {
  ToyLM(int64_t vocab, int64_t dim, int64_t n_layers, torch::Device device) : vocab(vocab) {
    embedding = register_parameter("embedding", torch::empty({vocab, dim}, torch::TensorOptions().device(device)));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < n_layers; ++i) layers->push_back(ToyBlock(dim, device));
    output = register_module("output", ToyOutput(dim, vocab, device));
  }
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& /*positions*/) override {
    auto h = torch::embedding(embedding, input);  // [B, S, dim]
    for (const auto& layer : *layers) h = titan::call(layer->as<ToyBlockImpl>(), h);
    return titan::call(output, h);  // [B, S, vocab]
  }
  int64_t vocab;
  torch::Tensor embedding;  // [vocab, dim]
  torch::nn::ModuleList layers{nullptr};
  ToyOutput output{nullptr};
};

/// Each parameter drawn whole from a generator seeded by (seed, its index), this rank's block
/// copied out: the values do not depend on sharding.
void init_toy(CausalLM& model, uint64_t seed) {
  torch::NoGradGuard no_grad;
  uint64_t index = 0;
  for (const auto& item : model.named_parameters()) {
    const auto layout = titan::parameter_layout(model, item.key(), item.value());
    auto generator = at::detail::createCPUGenerator(seed * 1000 + index++);
    auto global = torch::randn(layout.global_shape, generator) * 0.2;
    for (const auto& block : layout.local_blocks()) block.view_of(item.value()).copy_(block.view_of_global(global));
  }
}

ModelSpec toy_spec() {
  ModelSpec spec;
  spec.name = "toy";
  spec.flavors = {"debug"};
  spec.build = [](const TrainConfig& config, int64_t vocab, torch::Device device) {
    return std::make_shared<ToyLM>(vocab, 16, config.model.n_layers > 0 ? config.model.n_layers : 2, device);
  };
  spec.parallelize = [](CausalLM& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                        const TrainConfig& config) {
    TORCH_CHECK(dims.tp == 1 && dims.cp == 1, "toy: no tensor or context parallel plan");
    auto& toy = dynamic_cast<ToyLM&>(model);
    titan::apply_activation_checkpointing(toy.layers, activation_checkpoint_options(config));
    if (!needs_fsdp(dims, config)) return;
    for (const auto& layer : toy.layers->children()) titan::fully_shard(*layer, dims.fsdp_mesh(mesh), fsdp_options(config));
    titan::fully_shard(toy, dims.fsdp_mesh(mesh), fsdp_options(config));
  };
  spec.pipeline_split = [](const ParallelismConfig&) -> titan::PipelineSplit {
    TORCH_CHECK(false, "toy: no pipeline split");
  };
  spec.init_weights = init_toy;
  spec.facts = [](const CausalLM& model, int64_t) {
    int64_t parameters = 0;
    for (const auto& p : model.parameters()) parameters += p.numel();
    return ModelFacts{parameters, 6.0 * static_cast<double>(parameters), dynamic_cast<const ToyLM&>(model).vocab};
  };
  spec.load_hf = [](CausalLM& stage, const std::string& path) {
    titan::safetensors::File file(path + "/model.safetensors");
    torch::OrderedDict<std::string, at::Tensor> state;
    for (const auto& item : stage.named_parameters()) state.insert(item.key(), file.read(item.key()));
    titan::load_full_state_dict(stage, state);
  };
  spec.save_hf = [](const torch::nn::Module& model, const CausalLM&, const std::string& dir, const SaveHfOptions&,
                    const titan::ProcessGroupPtr& group, const titan::ProcessGroupPtr&) {
    const auto state = titan::full_state_dict(model, group, titan::FullStateDictOptions().rank0_only(true));
    if (group->rank() != 0) return;
    fs::create_directories(dir);
    titan::safetensors::NamedTensors tensors;
    for (const auto& item : state) tensors.emplace_back(item.key(), item.value());
    titan::safetensors::save(dir + "/model.safetensors", tensors);
  };
  return spec;
}

}  // namespace

TEST_CASE("registry: a family registered at run time trains through the unchanged trainer") {
  if (!model_registry().contains("toy")) model_registry().add(toy_spec());
  auto dir = scratch("trainer_toy");
  auto config = tiny_run(dir, {"--model.name", "toy", "--training.steps", "3", "--metrics.log_freq", "1",
                               "--checkpoint.interval", "3"});
  Trainer trainer(config);
  trainer.train();
  // The trainer built the toy (its parameter names), trained it and exported it through the spec.
  const auto params = trainer.model().named_parameters();
  REQUIRE(params.contains("layers.1.weight"));
  CHECK(fs::exists(dir / "run" / "export" / "model.safetensors"));
  CHECK(fs::exists(dir / "run" / "checkpoint" / "step-3"));
  std::ifstream jsonl(dir / "run" / "metrics.jsonl");
  std::vector<double> losses;
  for (std::string text; std::getline(jsonl, text);) losses.push_back(nlohmann::json::parse(text)["loss"].get<double>());
  REQUIRE(losses.size() == 3);

  // Step 1's loss is the mean cross entropy of a toy built and initialised here on the same
  // global batch (the loader's first two micro-batches), and the trained weights moved from it.
  auto tokenizer = load_tokenizer(config.model.tokenizer_path, config.model.tokenizer_kind);
  auto reference = std::static_pointer_cast<ToyLM>(toy_spec().build(config, tokenizer->vocab_size(), device()));
  init_toy(*reference, static_cast<uint64_t>(config.training.seed));
  DataLoader loader(TokenCorpus::open(corpus_options(config, false), *tokenizer), *tokenizer,
                    loader_options(config, 0, 1, false));
  double sum = 0.0, tokens = 0.0;
  for (int micro = 0; micro < 2; ++micro) {
    const auto batch = loader.next();
    auto logits = reference->forward(batch.input.to(device()), {});  // [B, S, vocab]
    sum += torch::nn::functional::cross_entropy(
               logits.flatten(0, 1), batch.labels.to(device()).flatten(),
               torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum))
               .item<double>();
    tokens += static_cast<double>(batch.num_label_tokens);
  }
  CHECK(losses[0] == doctest::Approx(sum / tokens).epsilon(1e-6));
  CHECK(losses[2] < losses[0]);
  CHECK_FALSE(torch::allclose(params["layers.1.weight"].cpu(), reference->layers[1]->as<ToyBlockImpl>()->weight.cpu()));
  // The export reads back into a fresh toy through the spec's Hugging Face adapter.
  auto exported = toy_spec().build(config, tokenizer->vocab_size(), torch::kCPU);
  toy_spec().load_hf(*exported, (dir / "run" / "export").string());
  CHECK(torch::equal(exported->named_parameters()["layers.1.weight"], params["layers.1.weight"].cpu()));
}

TEST_CASE("trainer: profiling writes a Chrome trace of every profile_freq-th step") {
  auto dir = scratch("trainer_profiling");
  Trainer trainer(tiny_run(dir, {"--training.steps", "5", "--metrics.log_freq", "5", "--checkpoint.enable", "false",
                                 "--profiling.enable_profiling", "true", "--profiling.profile_freq", "2",
                                 "--profiling.save_traces_folder", "traces"}));
  trainer.train();
  const auto rank = std::to_string(trainer.world()->rank());
  for (int64_t step = 1; step <= 5; ++step) {
    CAPTURE(step);
    const auto trace = dir / "run" / "traces" / ("iteration_" + std::to_string(step)) / ("rank" + rank + "_trace.json");
    REQUIRE(fs::exists(trace) == (step % 2 == 0));
    if (step % 2 != 0) continue;
    std::ifstream file(trace);
    const auto json = nlohmann::json::parse(file);
    // The step's operators with their shapes: the model's matrix products among them.
    std::set<std::string> names;
    bool shapes = false;
    for (const auto& event : json.at("traceEvents")) {
      if (!event.contains("name")) continue;
      names.insert(event["name"].get<std::string>());
      shapes = shapes || (event.contains("args") && event["args"].contains("Input Dims"));
    }
    CHECK(names.count("aten::mm") == 1);
    CHECK(names.count("titan::swiglu_forward") == 1);
    CHECK(names.count("titan::rope_forward") == 1);
    CHECK(shapes);
  }
}

// ------------------------------------------------------------------------------------------------
// Several ranks

TEST_SUITE("multirank") {
  TEST_CASE("multirank: the ranks tokenize a share each into one cache; validation reduces over ranks") {
    const auto& world = titan_test::world();
    const auto& group = world->group();
    auto port = std::getenv("MASTER_PORT") ? std::string(std::getenv("MASTER_PORT")) : std::string("single");
    auto dir = fs::temp_directory_path() / ("titan_trainer_ranks_" + port);
    if (group->rank() == 0) {
      remove_tree(dir);
      fs::create_directories(dir);
      write_text_corpus(dir, kDocs);
    }
    group->barrier();
    auto options = CorpusOptions().path((dir / "corpus.txt").string()).cache_dir((dir / "cache").string()).show_progress(false);
    auto corpus = TokenCorpus::open(options, ByteTokenizer(), group);
    CHECK(corpus->num_documents() == 4);
    CHECK_FALSE(corpus->from_cache());  // every rank tokenized its share
    CHECK(TokenCorpus::open(options, ByteTokenizer(), group)->from_cache());
    // The ranks' shares joined are the single-process cache, byte for byte (cut points fall inside
    // documents, which go to the rank where they start).
    for (const std::string kind : {"text", "jsonl"}) {
      CAPTURE(kind);
      const auto file = dir / ("varied." + kind);
      if (group->rank() == 0) write_file(file, varied_corpus(kind, 300));
      group->barrier();
      auto varied = CorpusOptions().path(file.string()).kind(kind).skip_malformed(true).show_progress(false);
      auto shared = TokenCorpus::open(CorpusOptions(varied).cache_dir((dir / "varied_cache").string()), ByteTokenizer(), group);
      CHECK(shared->num_documents() == 300);
      if (group->rank() == 0) {
        auto alone = TokenCorpus::open(CorpusOptions(varied).cache_dir((dir / "alone_cache").string()).threads(1), ByteTokenizer());
        CHECK(read_file(shared->index_path()) == read_file(alone->index_path()));
        CHECK(read_file(cache_file(*shared, ".tokens")) == read_file(cache_file(*alone, ".tokens")));
      }
      group->barrier();
    }
    auto loader_options = LoaderOptions().batch_size(1).seq_len(10).shuffle(false).dp_size(group->size());
    auto loss_fn = [](const Batch& b) {  // on the device, as a trainer's
      auto labels = b.labels.to(device());
      return labels.masked_select(labels.ne(-100)).to(torch::kDouble).mean();
    };
    DataLoader mine(corpus, ByteTokenizer(), LoaderOptions(loader_options).dp_rank(group->rank()));
    auto result = evaluate(mine, 3, loss_fn, group);
    double sum = 0, count = 0;
    for (int r = 0; r < group->size(); ++r) {  // every rank's share, computed here
      DataLoader theirs(corpus, ByteTokenizer(), LoaderOptions(loader_options).dp_rank(r));
      for (int64_t i = 0; i < result.batches; ++i) {
        auto b = theirs.next();
        sum += loss_fn(b).item<double>() * static_cast<double>(b.num_label_tokens);
        count += static_cast<double>(b.num_label_tokens);
      }
    }
    CHECK(result.tokens == static_cast<int64_t>(count));
    CHECK(result.loss == doctest::Approx(sum / count).epsilon(1e-9));
    group->barrier();
    if (group->rank() == 0) remove_tree(dir);
  }

  TEST_CASE("multirank: a signal on one rank stops every rank") {
    const auto& group = titan_test::world()->group();
    SignalFlag flag;
    CHECK_FALSE(flag.any_rank(group));
    if (group->rank() == group->size() - 1) std::raise(SIGINT);
    CHECK(flag.any_rank(group));
    CHECK(flag.requested() == (group->rank() == group->size() - 1));
  }
}
