#include "tiktoken.hpp"

#include <algorithm>
#include <array>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <utility>

#include "byte_level_bpe.hpp"

namespace titan::examples {
namespace {

using bpe::kNoRank;

[[noreturn]] void file_error(const std::string& path, size_t line, const std::string& what) {
  std::ostringstream os;
  os << "tiktoken file '" << path << "' line " << line << ": " << what;
  throw std::runtime_error(os.str());
}

// Standard base64 (RFC 4648, with '=' padding) of one ranks-file token; false when malformed.
bool base64_decode(std::string_view in, std::string& out) {
  static const std::array<int8_t, 256> table = [] {
    std::array<int8_t, 256> t{};
    t.fill(-1);
    const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i) t[static_cast<unsigned char>(alphabet[i])] = static_cast<int8_t>(i);
    return t;
  }();
  out.clear();
  if (in.empty() || in.size() % 4 != 0) return false;
  size_t padding = 0;
  while (padding < 2 && in[in.size() - 1 - padding] == '=') ++padding;
  const size_t data = in.size() - padding;
  uint32_t acc = 0;
  int bits = 0;
  for (size_t i = 0; i < data; ++i) {
    const int8_t v = table[static_cast<unsigned char>(in[i])];
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((acc >> bits) & 0xFF));
    }
  }
  // The bits left over must be zero (canonical encoding).
  return (acc & ((1u << bits) - 1)) == 0;
}

}  // namespace

std::vector<std::string> llama3_special_tokens(int64_t n) {
  if (n < 0) throw std::invalid_argument("llama3_special_tokens: n must be >= 0, got " + std::to_string(n));
  std::vector<std::string> tokens = {
      "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
      "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
      "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"};
  const int64_t named = static_cast<int64_t>(tokens.size());
  tokens.resize(static_cast<size_t>(std::min(n, named)));
  for (int64_t i = named; i < n; ++i) {
    tokens.push_back("<|reserved_special_token_" + std::to_string(3 + i - named) + "|>");
  }
  return tokens;
}

TiktokenTokenizer::TiktokenTokenizer(const std::string& path, TiktokenOptions options)
    : splitter_(std::make_unique<bpe::RegexSplitter>(options.pattern(), "tiktoken tokenizer '" + path + "'")) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("tiktoken file '" + path + "' cannot be opened");
  std::string line, bytes;
  size_t line_number = 0;
  std::vector<size_t> token_lines;  // line of each rank, for errors found after reading
  while (std::getline(in, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;  // like tiktoken's load_tiktoken_bpe
    const size_t space = line.find(' ');
    if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos) {
      file_error(path, line_number, "expected '<base64 token> <rank>', got '" + line + "'");
    }
    const std::string_view rank_text = std::string_view(line).substr(space + 1);
    if (rank_text.empty() || rank_text.size() > 10 ||
        !std::all_of(rank_text.begin(), rank_text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      file_error(path, line_number, "rank '" + std::string(rank_text) + "' is not a non-negative integer");
    }
    const uint64_t rank = std::stoull(std::string(rank_text));
    if (rank != tokens_.size()) {
      file_error(path, line_number, "rank " + std::to_string(rank) + " where " + std::to_string(tokens_.size()) +
                                        " was expected (ranks must be 0, 1, 2, ... in order)");
    }
    if (!base64_decode(std::string_view(line).substr(0, space), bytes)) {
      file_error(path, line_number, "'" + line.substr(0, space) + "' is not valid base64");
    }
    tokens_.push_back(bytes);
    token_lines.push_back(line_number);
  }
  if (tokens_.empty()) throw std::runtime_error("tiktoken file '" + path + "' has no tokens");
  if (tokens_.size() >= kNoRank) throw std::runtime_error("tiktoken file '" + path + "' has too many tokens");
  ranks_.reserve(tokens_.size());
  for (size_t r = 0; r < tokens_.size(); ++r) {
    if (!ranks_.emplace(tokens_[r], static_cast<uint32_t>(r)).second) {
      file_error(path, token_lines[r], "token of rank " + std::to_string(r) + " repeats rank " +
                                  std::to_string(ranks_.at(tokens_[r])) + "'s bytes");
    }
  }
  for (int b = 0; b < 256; ++b) {
    if (!ranks_.count(std::string_view(std::string(1, static_cast<char>(b))))) {
      throw std::runtime_error("tiktoken file '" + path + "' has no token for byte " + std::to_string(b) +
                               " (byte-level BPE needs all 256)");
    }
  }

  specials_ = llama3_special_tokens(options.num_special_tokens());
  for (size_t i = 0; i < specials_.size(); ++i) {
    special_ids_.emplace(specials_[i], num_base_tokens() + static_cast<int64_t>(i));
    if (special_first_bytes_.find(specials_[i][0]) == std::string::npos) special_first_bytes_ += specials_[i][0];
  }
  const auto id_or_none = [&](const char* name) {
    auto it = special_ids_.find(name);
    return it == special_ids_.end() ? int64_t{-1} : it->second;
  };
  bos_id_ = id_or_none("<|begin_of_text|>");
  eos_id_ = id_or_none("<|end_of_text|>");
  pad_id_ = id_or_none("<|finetune_right_pad_id|>");
}

TiktokenTokenizer::~TiktokenTokenizer() = default;

int64_t TiktokenTokenizer::vocab_size() const {
  return num_base_tokens() + static_cast<int64_t>(specials_.size());
}

int64_t TiktokenTokenizer::token_id(std::string_view token) const {
  auto it = special_ids_.find(std::string(token));
  if (it == special_ids_.end()) {
    throw std::invalid_argument("'" + std::string(token) + "' is not a special token of this tokenizer (it has " +
                                std::to_string(specials_.size()) + ")");
  }
  return it->second;
}

uint32_t TiktokenTokenizer::rank_of(std::string_view bytes) const {
  auto it = ranks_.find(bytes);
  return it == ranks_.end() ? kNoRank : it->second;
}

// tiktoken's merge rule: while some adjacent pair of parts concatenates to a token, merge the pair
// of lowest rank, the leftmost one on ties. Part k starts at byte k while it exists.
void TiktokenTokenizer::byte_pair_merge(std::string_view piece, std::vector<int64_t>& out) const {
  const size_t n = piece.size();
  const auto next = bpe::merge_lowest_rank_first(
      n, [&](size_t left, size_t, size_t after) { return rank_of(piece.substr(left, after - left)); },
      [](size_t, size_t) {});
  for (size_t k = 0; k < n; k = next[k]) out.push_back(rank_of(piece.substr(k, next[k] - k)));
}

// Pre-tokenizes valid UTF-8 `text` with the pattern and BPE-encodes each match, like tiktoken's
// encode_ordinary (text that no match covers is skipped, as there; Llama 3's pattern covers all).
void TiktokenTokenizer::encode_ordinary(std::string_view text, std::vector<int64_t>& out) const {
  splitter_->for_each_match(text, [&](std::string_view piece) {
    const uint32_t whole = rank_of(piece);
    if (whole != kNoRank) {
      out.push_back(whole);
    } else {
      byte_pair_merge(piece, out);
    }
  });
}

std::vector<int64_t> TiktokenTokenizer::encode(std::string_view text, bool bos, bool eos) const {
  return encode(text, bos, eos, SpecialTokens::kAsText);
}

std::vector<int64_t> TiktokenTokenizer::encode(std::string_view raw, bool bos, bool eos,
                                               SpecialTokens special) const {
  if ((bos && bos_id_ < 0) || (eos && eos_id_ < 0)) {
    throw std::invalid_argument("this tiktoken tokenizer has no <|begin_of_text|> / <|end_of_text|> (" +
                                std::to_string(specials_.size()) + " special tokens) but BOS / EOS were asked for");
  }
  std::string repaired;
  const std::string_view text = bpe::repair_utf8(raw, repaired);
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (bos) ids.push_back(bos_id_);
  const auto ordinary = [&](std::string_view segment) { encode_ordinary(segment, ids); };
  if (special == SpecialTokens::kAsText) {
    ordinary(text);
  } else {
    bpe::split_at_tokens(
        text, specials_, special_first_bytes_,
        [&](size_t k, size_t at) {
          if (special == SpecialTokens::kReject)
            throw std::invalid_argument("text contains the special token " + specials_[k] + " at byte " +
                                        std::to_string(at) + " (encode it with SpecialTokens::kAllow or kAsText)");
          return true;
        },
        ordinary, [&](size_t k) { ids.push_back(num_base_tokens() + static_cast<int64_t>(k)); });
  }
  if (eos) ids.push_back(eos_id_);
  return ids;
}

std::string TiktokenTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text;
  for (const int64_t id : ids) {
    if (id >= 0 && id < num_base_tokens()) {
      text += tokens_[static_cast<size_t>(id)];
    } else if (id >= num_base_tokens() && id < vocab_size()) {
      text += specials_[static_cast<size_t>(id - num_base_tokens())];
    } else {
      throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                              std::to_string(vocab_size()) + ")");
    }
  }
  return text;
}

}  // namespace titan::examples
