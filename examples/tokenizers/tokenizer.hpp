#pragma once
// The tokenizer interface the example trainers use. Implementations: Llama 3's tiktoken-style BPE
// (tiktoken.hpp), Hugging Face byte-level BPE from tokenizer.json for Qwen3 and others (hf_bpe.hpp)
// and SentencePiece for Llama 2 / Mistral (sentencepiece.hpp). No LibTorch here.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace titan::examples {

/// How a byte-level BPE tokenizer's encode treats special-token text such as "<|eot_id|>" in its
/// input (TiktokenTokenizer, HfBpeTokenizer).
enum class SpecialTokens {
  kAsText,  ///< encoded as ordinary text (Meta's Tokenizer.encode default)
  kAllow,   ///< replaced by the special token's id (tiktoken allowed_special="all")
  kReject,  ///< std::invalid_argument (tiktoken's default disallowed_special="all")
};

/// Text to token ids and back.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// Token ids of `text`, with the BOS / EOS ids around it when asked.
  virtual std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const = 0;
  /// The text of `ids`.
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  /// Number of ids (the model's vocabulary must be at least this).
  virtual int64_t vocab_size() const = 0;
  virtual int64_t bos_id() const = 0;  ///< beginning of sequence
  virtual int64_t eos_id() const = 0;  ///< end of sequence (also ends each document when packing)
  virtual int64_t pad_id() const = 0;  ///< padding; -1 when the model has none
  /// The id of the whole token written `token` (a special or added token such as "<|eot_id|>" or
  /// "<|im_start|>"); std::invalid_argument when the tokenizer has no such token.
  virtual int64_t token_id(std::string_view token) const = 0;
  /// [ids.size()] where each token's text starts in decode(ids), in bytes. The default serves
  /// tokenizers whose decode writes each token's bytes in turn (byte-level BPE); one that decodes
  /// in context (SentencePiece drops the first piece's dummy-prefix space) overrides it.
  virtual std::vector<size_t> decoded_starts(const std::vector<int64_t>& ids) const;
};

/// Loads the tokenizer at `path`: kind "tiktoken" (Llama 3 tokenizer.model), "huggingface" (a
/// byte-level BPE tokenizer.json, e.g. Qwen3's) or "sentencepiece" (Llama 2 / Mistral
/// tokenizer.model). Errors name the file and what was wrong.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, const std::string& kind);

}  // namespace titan::examples
