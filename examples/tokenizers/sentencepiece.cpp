#include "sentencepiece.hpp"

#include <sentencepiece_processor.h>

#include <stdexcept>

namespace titan::examples {

SentencePieceTokenizer::SentencePieceTokenizer(const std::string& path)
    : processor_(std::make_unique<sentencepiece::SentencePieceProcessor>()), path_(path) {
  const auto status = processor_->Load(path);
  if (!status.ok()) {
    throw std::runtime_error("sentencepiece model '" + path + "' cannot be loaded: " + status.ToString());
  }
}

SentencePieceTokenizer::~SentencePieceTokenizer() = default;

std::vector<int64_t> SentencePieceTokenizer::encode(std::string_view text, bool bos, bool eos) const {
  if ((bos && bos_id() < 0) || (eos && eos_id() < 0)) {
    throw std::invalid_argument("sentencepiece model '" + path_ + "' has no BOS / EOS piece but one was asked for");
  }
  std::vector<int> pieces;
  const auto status = processor_->Encode(text, &pieces);
  if (!status.ok()) throw std::runtime_error("sentencepiece model '" + path_ + "': " + status.ToString());
  std::vector<int64_t> ids;
  ids.reserve(pieces.size() + 2);
  if (bos) ids.push_back(bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (eos) ids.push_back(eos_id());
  return ids;
}

std::vector<int> SentencePieceTokenizer::pieces_of(const std::vector<int64_t>& ids) const {
  std::vector<int> pieces;
  pieces.reserve(ids.size());
  for (const int64_t id : ids) {
    if (id < 0 || id >= vocab_size()) {
      throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                              std::to_string(vocab_size()) + ")");
    }
    pieces.push_back(static_cast<int>(id));
  }
  return pieces;
}

std::string SentencePieceTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text;
  const auto status = processor_->Decode(pieces_of(ids), &text);
  if (!status.ok()) throw std::runtime_error("sentencepiece model '" + path_ + "': " + status.ToString());
  return text;
}

std::vector<size_t> SentencePieceTokenizer::decoded_starts(const std::vector<int64_t>& ids) const {
  // Each piece's begin in the decoded text (the byte pieces of a character all begin where it does).
  const auto decoded = processor_->DecodeIdsAsImmutableProto(pieces_of(ids));
  if (decoded.pieces_size() != ids.size())
    throw std::runtime_error("sentencepiece model '" + path_ + "': decoding " + std::to_string(ids.size()) +
                             " ids gave " + std::to_string(decoded.pieces_size()) + " pieces");
  std::vector<size_t> starts;
  starts.reserve(ids.size());
  for (const auto& piece : decoded.pieces()) starts.push_back(piece.begin());
  return starts;
}

int64_t SentencePieceTokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int64_t SentencePieceTokenizer::bos_id() const { return processor_->bos_id(); }
int64_t SentencePieceTokenizer::eos_id() const { return processor_->eos_id(); }
int64_t SentencePieceTokenizer::pad_id() const { return processor_->pad_id(); }

int64_t SentencePieceTokenizer::token_id(std::string_view token) const {
  const int id = processor_->PieceToId(token);  // the unknown piece's id when there is none
  if (id == processor_->unk_id() && processor_->IdToPiece(id) != token)
    throw std::invalid_argument("'" + std::string(token) + "' is not a piece of the sentencepiece model '" + path_ + "'");
  return id;
}

}  // namespace titan::examples
