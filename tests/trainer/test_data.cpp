// Tests of examples/common/data.cpp: corpora, their token cache, packed and padded batches,
// sharding over ranks, resumable state, evaluation. Corpora, tokens and batches are CPU tensors.
#include "trainer_fixtures.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/file.h>

#include <atomic>
#include <chrono>
#include <random>
#include <set>
#include <thread>

namespace {

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.contiguous().to(torch::kLong);
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

/// The reference packed stream of `docs` ([BOS prompt body EOS] each) and which positions are targets.
struct Stream {
  std::vector<int64_t> tokens;
  std::vector<bool> target;
  std::vector<int64_t> document;  // the document each token belongs to
};
Stream reference_stream(const std::vector<std::pair<std::string, std::string>>& docs, bool bos = true) {
  ByteTokenizer tok;
  Stream s;
  int64_t index = 0;
  for (const auto& [prompt, body] : docs) {
    if (bos) {
      s.tokens.push_back(1);
      s.target.push_back(false);
    }
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
    s.document.resize(s.tokens.size(), index++);
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


TEST_CASE("data: text corpus is tokenized once and cached by path, size, mtime and tokenizer") {
  auto dir = scratch("data_cache");
  auto file = write_text_corpus(dir, kDocs);
  auto first = open_corpus(file, dir);
  CHECK_FALSE(first->from_cache());
  REQUIRE(first->num_documents() == 4);
  ByteTokenizer tok;
  int64_t total = 0;
  for (int64_t d = 0; d < 4; ++d) {
    std::vector<int64_t> ids;
    for (int64_t k = 0; k < first->document_length(d); ++k) {
      ids.push_back(first->token(d, k));
      CHECK(first->trained(d, k));
    }
    CHECK(tok.decode(ids) == kDocs[d]);
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
  for (const bool bos : {true, false}) {  // without BOS (Qwen's tokenizers) each document is tokens + EOS
    CAPTURE(bos);
    auto stream = reference_stream(docs, bos);
    const int64_t seq = 16;
    DataLoader loader(corpus, ByteTokenizer(0, bos ? 1 : -1), LoaderOptions().batch_size(3).seq_len(seq).shuffle(false));
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
        // Each input token's document, counted from the window's first.
        const int64_t start = ((w * 3 + r) % windows) * (seq + 1);
        std::vector<int64_t> documents;
        for (int64_t i = 0; i < seq; ++i) documents.push_back(stream.document[start + i] - stream.document[start]);
        CHECK(to_vector(batch.documents[r]) == documents);
      }
      CHECK(batch.num_label_tokens == batch.labels.ne(-100).sum().item<int64_t>());
    }
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
  for (int64_t k = 0; k < corpus->document_length(0); ++k)  // ByteTokenizer: one token per byte
    CHECK(corpus->trained(0, k) == (k >= static_cast<int64_t>(docs[0].first.size())));
  CHECK(corpus->trains_eos());

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
    // One document, then the padding as the next.
    const auto documents = to_vector(batch.documents[1]);
    for (int64_t i = 0; i < seq; ++i)
      CHECK(documents[i] == (i < static_cast<int64_t>(stream.tokens.size()) ? 0 : 1));
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
}
