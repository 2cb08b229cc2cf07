#pragma once
// Training data of the example trainers: tokenized-once corpora, packed or padded batches,
// deterministic shuffling, data-parallel sharding, resumable state, and validation.
//
// API summary
//   auto corpus = TokenCorpus::open(CorpusOptions().path(p).kind("text").cache_dir(d), tokenizer, group);
//       // tokenizes the corpus once (rank 0 of `group`, with a progress line), caches it as
//       // <cache_dir>/<name>.<key>.tokens + .index, key = hash(path, size, mtime, kind, field, tokenizer)
//   DataLoader loader(corpus, tokenizer, LoaderOptions().batch_size(8).seq_len(2048).seed(0)
//                                           .dp_rank(r).dp_size(n));
//   Batch b = loader.next();             // b.input [B, S] int64, b.labels [B, S] int64 (-100 = ignored)
//                                        // b.documents [B, S] int64 (each token's document in its row)
//   DataState at = loader.position();  loader.seek(at);      // resume the same stream
//   train_state.add("data", loader);                      // or checkpoint it as a titan::Stateful
//   ValidationResult v = evaluate(val_loader, steps, [&](const Batch& b) { return mean_loss; }, group);
//   std::string p = alpaca_prompt(instruction, input);   // the Alpaca prompt template
//   corpus_options(cfg, /*validation=*/false), loader_options(cfg, dp_rank, dp_size, false)
//       // the options a TrainConfig's [data] / [training] / [model] sections ask for
//
// Corpus formats (CorpusOptions::kind):
//   "text"   plain UTF-8; a line holding only a form feed ("\f") ends a document (a file without
//            one is one document)
//   "jsonl"  one JSON object per line; the document is the string field `text_field`
//   "alpaca" one {"instruction", "input" (optional), "output"} object per line; the sample is the
//            Alpaca prompt followed by the output, and only the output (and EOS) is trained on
//   "chat"   one {"messages": [{"role", "content"}, ...]} object per line (system / user /
//            assistant), rendered in CorpusOptions::chat's format (chat.hpp); only the assistant
//            turns are trained on (not the EOS that ends the document)
//   Blank lines are skipped. A malformed line fails with file:line, or is skipped and counted when
//   skip_malformed is set.
//
// Samples: every document becomes [BOS] tokens [EOS] (tokens [EOS] with a tokenizer that has no
// BOS, as Qwen's). Packed (LoaderOptions::pack), these are
// concatenated and cut into windows of seq_len + 1 tokens (input = window[0:S], labels =
// window[1:S+1]); the last partial window is dropped. Unpacked, each document is one row, cut to
// seq_len + 1 tokens or padded (input pad_id, or EOS when the tokenizer has none; labels -100).
// Labels are -100 where the target is a BOS token, an Alpaca prompt token, or a chat token outside
// the assistant turns (and a chat document's EOS).
//
// Order and sharding: each epoch visits every sample once in the order of a permutation drawn
// from (seed, epoch) with std::mt19937_64 (identical on every platform); shuffle(false) keeps file
// order. The ranks walk that order together: a cursor p (samples of the epoch already taken over
// all ranks) gives data-parallel rank r of N the sample at p + r, then p advances by N; a new
// epoch starts when fewer than N samples remain. A step of global batch G therefore takes samples
// [p, p + G) whatever N is. The state (epoch, cursor) plus the checked identity (seed, samples)
// restores the exact stream, also on another number of ranks (a checkpoint resumed on a
// different world size sees the same global batches, until an epoch's last N - 1 samples, where
// the cut depends on N); there is no other RNG state.

#include "../tokenizers/tokenizer.hpp"
#include "chat.hpp"
#include "config.hpp"

#include <titan/checkpoint/stateful.hpp>
#include <titan/world.hpp>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace titan::examples {

/// The Alpaca prompt (with or without the "### Input:" part when `input` is empty); the
/// response follows it directly.
std::string alpaca_prompt(const std::string& instruction, const std::string& input);

/// What corpus to read and where to cache its tokens.
struct CorpusOptions {
  TORCH_ARG(std::string, path);                 ///< the corpus file
  TORCH_ARG(std::string, kind) = "text";        ///< "text", "jsonl", "alpaca" or "chat"
  TORCH_ARG(std::string, text_field) = "text";  ///< JSONL field of the document ("jsonl")
  TORCH_ARG(ChatOptions, chat);                 ///< the chat format ("chat")
  TORCH_ARG(bool, skip_malformed) = false;      ///< skip and count malformed JSONL lines
  TORCH_ARG(std::string, cache_dir) = "token_cache";  ///< where .tokens / .index files go
  TORCH_ARG(std::string, tokenizer_id) = "";    ///< extra text for the cache key (e.g. tokenizer path)
  TORCH_ARG(bool, show_progress) = true;        ///< print progress lines while tokenizing
  TORCH_ARG(double, progress_interval_s) = 5.0;  ///< seconds between progress lines
  TORCH_ARG(int, threads) = 0;  ///< tokenizing threads per rank (0: the cores, at most 4)
};

/// A tokenized corpus: each document's token ids (memory-mapped from the cache) without BOS/EOS.
class TokenCorpus {
 public:
  /// Set in a cached token whose id is context, not a target (an Alpaca prompt, a chat template's
  /// text outside the assistant turns); ids are below it.
  static constexpr uint32_t kContextBit = 1u << 31;

  /// Opens the cached tokens of `options.path`, tokenizing it first when the cache is missing or
  /// stale: every rank of `group` tokenizes a share of the corpus (cut at document boundaries) on
  /// `options.threads` threads, and rank 0 joins the shares; the cache is the single-threaded one,
  /// byte for byte. A lock file makes one job per machine build a cache while others wait.
  static std::shared_ptr<const TokenCorpus> open(const CorpusOptions& options, const Tokenizer& tokenizer,
                                                 const ProcessGroupPtr& group = nullptr);
  ~TokenCorpus();
  TokenCorpus(const TokenCorpus&) = delete;
  TokenCorpus& operator=(const TokenCorpus&) = delete;

  int64_t num_documents() const { return static_cast<int64_t>(offsets_.size()) - 1; }
  int64_t num_tokens() const { return offsets_.back(); }  ///< without BOS/EOS
  int64_t document_length(int64_t d) const { return offsets_[d + 1] - offsets_[d]; }
  /// Token `k` of document `d`.
  int64_t token(int64_t d, int64_t k) const { return tokens_[offsets_[d] + k] & ~kContextBit; }
  /// Whether token `k` of document `d` is trained on as a target (not prompt or template text).
  bool trained(int64_t d, int64_t k) const { return (tokens_[offsets_[d] + k] & kContextBit) == 0; }
  /// Whether the EOS that ends each document is trained on (all kinds but "chat").
  bool trains_eos() const { return trains_eos_; }
  int64_t skipped_lines() const { return skipped_lines_; }  ///< malformed lines skipped when tokenizing
  bool from_cache() const { return from_cache_; }  ///< true when the cache existed (nothing tokenized)
  const std::string& index_path() const { return index_path_; }  ///< the .index file

 private:
  TokenCorpus() = default;
  std::vector<int64_t> offsets_;  // [documents + 1]
  bool trains_eos_ = true;
  const uint32_t* tokens_ = nullptr;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  int64_t skipped_lines_ = 0;
  bool from_cache_ = false;
  std::string index_path_;
};

/// How batches are cut, ordered and sharded.
struct LoaderOptions {
  TORCH_ARG(int64_t, batch_size) = 1;   ///< rows per batch (local micro-batch)
  TORCH_ARG(int64_t, seq_len) = 2048;   ///< tokens per row
  TORCH_ARG(bool, pack) = true;         ///< pack documents into windows (else one padded row each)
  TORCH_ARG(bool, shuffle) = true;      ///< permute samples every epoch (else file order)
  TORCH_ARG(int64_t, seed) = 0;         ///< seed of the permutations
  TORCH_ARG(int64_t, dp_rank) = 0;      ///< this rank's data-parallel index
  TORCH_ARG(int64_t, dp_size) = 1;      ///< data-parallel degree
};

/// One micro-batch.
struct Batch {
  torch::Tensor input;   ///< [B, S] int64 token ids
  torch::Tensor labels;  ///< [B, S] int64 next-token ids, -100 where ignored
  int64_t num_label_tokens = 0;  ///< labels that are not -100
  /// [B, S] int64: the document of each input token in its row (0, 1, ...; padding after a
  /// document is one more), for block-causal attention (CausalLM::forward's documents)
  torch::Tensor documents;
};

/// Where a DataLoader stands; enough to continue the same stream after a restart.
/// Every data-parallel rank holds the same state.
struct DataState {
  int64_t epoch = 0;     ///< completed epochs
  int64_t position = 0;  ///< samples of this epoch already taken over all data-parallel ranks
  int64_t seed = 0;      ///< checked on restore
  int64_t samples = 0;   ///< samples per epoch over all ranks; checked on restore
  int64_t dp_size = 1;   ///< data-parallel degree of the saving run (a restore may use another)

  std::map<std::string, int64_t> to_map() const;  ///< keys: the member names
  static DataState from_map(const std::map<std::string, int64_t>& values);  ///< errors on missing keys
  std::string to_json() const;                     ///< a one-line JSON object of to_map
  static DataState from_json(const std::string& text);
  bool operator==(const DataState& other) const { return to_map() == other.to_map(); }
};

/// Endless batches from a TokenCorpus for one data-parallel rank. Checkpoints save it as a
/// component (titan::Stateful): its position, the same on every data-parallel rank.
class DataLoader : public titan::Stateful {
 public:
  /// Ids of BOS, EOS and padding come from `tokenizer`.
  DataLoader(std::shared_ptr<const TokenCorpus> corpus, const Tokenizer& tokenizer, LoaderOptions options);

  /// The next batch (rolls into the next epoch when this one is used up).
  Batch next();
  /// Samples of one epoch over all ranks (windows when packing, documents otherwise).
  int64_t samples_per_epoch() const { return samples_; }
  /// Samples of one epoch this rank takes: samples_per_epoch() / dp_size.
  int64_t samples_per_rank() const { return samples_ / options_.dp_size(); }
  const LoaderOptions& options() const { return options_; }
  /// Where the stream stands (every data-parallel rank holds the same position).
  DataState position() const;
  /// Continues from `state` (saved with any data-parallel degree); errors when it came from a
  /// different seed, corpus, tokenizer, seq_len or packing.
  void seek(const DataState& state);
  /// position() as a checkpoint component: {"position": its JSON}.
  titan::ComponentState state() const override;
  /// seek() to a position saved by state().
  void load_state(const titan::ComponentState& state) override;
  /// Back to the first sample of epoch 0 (validation does this every time).
  void reset();

 private:
  void fill_row(int64_t sample, int64_t* input, int64_t* labels, int64_t* documents) const;  // each [S]
  int64_t sample_at(int64_t epoch, int64_t index) const;  // index-th sample of epoch's order

  std::shared_ptr<const TokenCorpus> corpus_;
  LoaderOptions options_;
  int64_t bos_, eos_, pad_;
  int64_t bos_slots_ = 1;        // 1: each document starts with BOS; 0: the tokenizer has none
  std::vector<int64_t> starts_;  // [documents + 1] packed start of each document's [BOS doc EOS]
  int64_t samples_ = 0;
  int64_t epoch_ = 0;
  int64_t position_ = 0;  // samples of epoch_ taken over all ranks; this rank's next is position_ + dp_rank
  mutable int64_t order_epoch_ = -1;
  mutable std::vector<int64_t> order_;  // permutation of the current epoch
};

/// The corpus of `config.data` (val_path when `validation`): kind, field, skip_malformed, the cache
/// folder (data.cache_dir, or <job.dump_folder>/token_cache when empty) and the tokenizer's path
/// and kind in the cache key.
CorpusOptions corpus_options(const TrainConfig& config, bool validation);

/// Batches of `config.training` for data-parallel rank `dp_rank` of `dp_size`: batch_size,
/// seq_len, data.pack, seed; validation keeps file order (no shuffle).
LoaderOptions loader_options(const TrainConfig& config, int64_t dp_rank, int64_t dp_size, bool validation);

/// Mean validation loss (weighted by label tokens over all ranks) and its exponential.
struct ValidationResult {
  double loss = 0.0;
  double perplexity = 0.0;
  int64_t tokens = 0;   ///< label tokens over all ranks
  int64_t batches = 0;  ///< batches per rank
};

/// Runs `loss_fn` (mean cross-entropy over a batch's non-ignored labels, e.g. a model forward
/// under NoGradGuard) on up to `steps` batches of `loader` from its start (reset() first; fewer
/// when an epoch has fewer), and reduces over `group` (nullptr = this process alone).
ValidationResult evaluate(DataLoader& loader, int64_t steps, const std::function<torch::Tensor(const Batch&)>& loss_fn,
                          const ProcessGroupPtr& group = nullptr);

}  // namespace titan::examples
