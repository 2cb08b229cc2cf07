#pragma once
// Llama 2 / Mistral tokenizer: a SentencePiece model (tokenizer.model, a serialized ModelProto)
// run by libsentencepiece. See docs/tokenizers.md.

#include <cstddef>
#include <memory>
#include <string>

#include "tokenizer.hpp"

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace titan::examples {

/// SentencePiece model; BOS / EOS / pad ids are those the model was trained with (-1 when absent).
/// Input that is not valid UTF-8 is handled by SentencePiece's normalizer (each malformed byte
/// becomes U+FFFD).
class SentencePieceTokenizer final : public Tokenizer {
 public:
  /// Loads the model at `path`; std::runtime_error naming the file when it cannot.
  explicit SentencePieceTokenizer(const std::string& path);
  ~SentencePieceTokenizer() override;

  std::vector<int64_t> encode(std::string_view text, bool bos, bool eos) const override;
  std::string decode(const std::vector<int64_t>& ids) const override;
  int64_t vocab_size() const override;
  int64_t bos_id() const override;
  int64_t eos_id() const override;
  int64_t pad_id() const override;
  /// The id of piece `token` (for example "<s>"); std::invalid_argument if the model has none.
  int64_t token_id(std::string_view token) const override;
  /// From SentencePiece's decoding of `ids` as a whole: the first piece's dummy-prefix space is
  /// not written, and the byte pieces of one character start where the character does.
  std::vector<size_t> decoded_starts(const std::vector<int64_t>& ids) const override;

 private:
  /// `ids` as SentencePiece's ids; std::out_of_range naming an id outside the vocabulary.
  std::vector<int> pieces_of(const std::vector<int64_t>& ids) const;

  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  std::string path_;
};

}  // namespace titan::examples
