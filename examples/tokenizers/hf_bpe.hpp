#pragma once
// Byte-level BPE read from a Hugging Face tokenizer.json (the layouts of Qwen2 / Qwen3 and GPT-2):
// NFC or no normalizer, pre-tokenization by Split patterns and / or ByteLevel, merges applied pair
// by pair in their file order as the `tokenizers` library does, and the added tokens matched in the
// text. BOS / EOS / padding come from tokenizer_config.json next to it (or from the options). See
// docs/tokenizers.md.

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer.hpp"

namespace titan::examples {

/// Options of HfBpeTokenizer (chained setters). A token named here overrides tokenizer_config.json's.
struct HfTokenizerOptions {
  /// The beginning-of-sequence token ("" : none, as Qwen's).
  HfTokenizerOptions& bos_token(std::string t) {
    bos_token_ = std::move(t);
    return *this;
  }
  /// The end-of-sequence token, which ends every document (e.g. "<|endoftext|>").
  HfTokenizerOptions& eos_token(std::string t) {
    eos_token_ = std::move(t);
    return *this;
  }
  /// The padding token ("" : none; padding then uses EOS).
  HfTokenizerOptions& pad_token(std::string t) {
    pad_token_ = std::move(t);
    return *this;
  }
  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }
  const std::optional<std::string>& pad_token() const { return pad_token_; }

 private:
  std::optional<std::string> bos_token_, eos_token_, pad_token_;
};

/// A Hugging Face byte-level BPE tokenizer (tokenizer.json, model type "BPE").
///
/// encode(text, bos, eos) treats special added tokens (those with "special": true, such as
/// "<|im_end|>") as ordinary text and matches the other added tokens (such as Qwen3's "<think>"),
/// as the `tokenizers` library does with encode_special_tokens = true; SpecialTokens::kAllow
/// matches every added token (its default encode). Invalid UTF-8 is repaired as TiktokenTokenizer
/// does. Anything in the file titan does not implement (another model type or normalizer, byte
/// fallback, a Split behaviour other than "Isolated") is an error naming the file and the field.
class HfBpeTokenizer final : public Tokenizer {
 public:
  /// Reads `path` (a tokenizer.json) and, unless the options name all three tokens,
  /// tokenizer_config.json in the same folder.
  explicit HfBpeTokenizer(const std::string& path, HfTokenizerOptions options = {});
  ~HfBpeTokenizer() override;

  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const override;
  /// encode() with a choice of how special added tokens in `text` are treated (kAsText: as text;
  /// kAllow: as their ids; kReject: std::invalid_argument). Non-special added tokens always match.
  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos, SpecialTokens special) const;
  std::string decode(const std::vector<int64_t>& ids) const override;
  /// One more than the largest id of the vocabulary and the added tokens.
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t bos_id() const override { return bos_id_; }
  int64_t eos_id() const override { return eos_id_; }
  int64_t pad_id() const override { return pad_id_; }
  /// The id of `token` (a vocabulary entry in the file's byte-level spelling, or an added token);
  /// std::invalid_argument if there is none.
  int64_t token_id(std::string_view token) const override;

 private:
  struct Model;
  void encode_segment(std::string_view text, std::vector<int64_t>& out) const;
  void encode_piece(std::string_view piece, std::vector<int64_t>& out) const;

  std::unique_ptr<Model> model_;
  int64_t vocab_size_ = 0;
  int64_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1;
};

}  // namespace titan::examples
