#pragma once
// Llama 3's tokenizer: tiktoken-style byte-level BPE read from Meta's tokenizer.model (one
// "<base64 token bytes> <rank>" line per token), pre-tokenized by Llama 3's split regex (PCRE2),
// merged by rank exactly as tiktoken does, with Llama 3's special tokens appended after the ranks.
// See docs/tokenizers.md.

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer.hpp"

namespace titan::examples {

namespace bpe {
class RegexSplitter;
}

/// Llama 3's pre-tokenization pattern (meta-llama/llama3, tokenizer.py `pat_str`).
inline constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

/// The special tokens Meta appends after the BPE ranks, as named in Llama 3.1 / 3.2 / 3.3's
/// tokenizer.json (Llama 3 has the same ids for begin/end of text, headers and end of turn): the
/// first `n` of <|begin_of_text|>, <|end_of_text|>, <|reserved_special_token_0|>,
/// <|reserved_special_token_1|>, <|finetune_right_pad_id|>, <|reserved_special_token_2|>,
/// <|start_header_id|>, <|end_header_id|>, <|eom_id|>, <|eot_id|>, <|python_tag|>, then
/// <|reserved_special_token_3|>, ... up to `n` in all (n = 256: the last is ..._247|>).
std::vector<std::string> llama3_special_tokens(int64_t n);

/// Options of TiktokenTokenizer (chained setters).
struct TiktokenOptions {
  /// Number of special tokens appended after the ranks (Meta's num_reserved_special_tokens: 256).
  TiktokenOptions& num_special_tokens(int64_t n) {
    num_special_tokens_ = n;
    return *this;
  }
  int64_t num_special_tokens() const { return num_special_tokens_; }
  /// Pre-tokenization regex (PCRE2 syntax, matched in UTF + UCP mode).
  TiktokenOptions& pattern(std::string p) {
    pattern_ = std::move(p);
    return *this;
  }
  const std::string& pattern() const { return pattern_; }

 private:
  int64_t num_special_tokens_ = 256;
  std::string pattern_ = kLlama3Pattern;
};

/// Byte-level BPE with tiktoken's merge rule: in each pre-tokenized piece, repeatedly merge the
/// adjacent pair whose concatenation has the lowest rank (leftmost on ties).
///
/// Input that is not valid UTF-8 is first repaired the way Python's bytes.decode("utf-8",
/// "replace") does it: each maximal invalid subsequence becomes U+FFFD (bytes EF BF BD). decode()
/// returns the raw bytes of the tokens (which may end inside a character).
class TiktokenTokenizer final : public Tokenizer {
 public:
  /// Reads the ranks file at `path`: line i (0-based) is "<base64 of the token bytes> i".
  explicit TiktokenTokenizer(const std::string& path, TiktokenOptions options = {});
  ~TiktokenTokenizer() override;

  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const override;
  /// encode() with a choice of how special-token text in `text` is treated.
  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos, SpecialTokens special) const;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override;
  int64_t bos_id() const override { return bos_id_; }
  int64_t eos_id() const override { return eos_id_; }
  /// <|finetune_right_pad_id|> as in Llama 3.1; -1 with fewer than 5 special tokens.
  int64_t pad_id() const override { return pad_id_; }

  /// Number of BPE tokens in the file (the first special token's id).
  int64_t num_base_tokens() const { return static_cast<int64_t>(tokens_.size()); }
  /// Id of special token `token` (for example "<|eot_id|>"); std::invalid_argument if none.
  int64_t token_id(std::string_view token) const override;

 private:
  void encode_ordinary(std::string_view text, std::vector<int64_t>& out) const;
  void byte_pair_merge(std::string_view piece, std::vector<int64_t>& out) const;
  uint32_t rank_of(std::string_view bytes) const;

  std::vector<std::string> tokens_;                        // rank -> token bytes
  std::unordered_map<std::string_view, uint32_t> ranks_;  // token bytes (views of tokens_) -> rank
  std::vector<std::string> specials_;                      // special id - num_base_tokens -> text
  std::unordered_map<std::string, int64_t> special_ids_;
  std::string special_first_bytes_;                        // the bytes special tokens start with
  std::unique_ptr<bpe::RegexSplitter> splitter_;
  int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
};

}  // namespace titan::examples
