#include "hf_bpe.hpp"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>

#include "byte_level_bpe.hpp"

namespace titan::examples {
namespace {

using json = nlohmann::json;

// The pattern of ByteLevel's own split (use_regex: true), as in the `tokenizers` library (GPT-2's).
constexpr const char* kByteLevelPattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// GPT-2's bytes_to_unicode: the code point standing for each byte in byte-level vocabularies.
const std::array<uint32_t, 256>& byte_code_points() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t extra = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : extra++;
    }
    return t;
  }();
  return table;
}

// The raw bytes a byte-level spelling stands for; false if a character is outside the alphabet.
bool byte_level_bytes(const std::string& spelling, std::string& out) {
  static const std::array<int16_t, 324> byte_of = [] {
    std::array<int16_t, 324> t{};
    t.fill(-1);
    for (int b = 0; b < 256; ++b) t[byte_code_points()[b]] = static_cast<int16_t>(b);
    return t;
  }();
  out.clear();
  auto data = reinterpret_cast<const utf8proc_uint8_t*>(spelling.data());
  for (utf8proc_ssize_t i = 0, n = static_cast<utf8proc_ssize_t>(spelling.size()); i < n;) {
    utf8proc_int32_t cp = -1;
    const utf8proc_ssize_t used = utf8proc_iterate(data + i, n - i, &cp);
    if (used <= 0 || cp < 0 || cp >= static_cast<utf8proc_int32_t>(byte_of.size()) || byte_of[cp] < 0) return false;
    out.push_back(static_cast<char>(byte_of[cp]));
    i += used;
  }
  return true;
}

// Unicode normalization form C of valid UTF-8 `text` (utf8proc).
std::string nfc(std::string_view text) {
  utf8proc_uint8_t* out = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                          static_cast<utf8proc_ssize_t>(text.size()), &out,
                                          static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) throw std::runtime_error(std::string("NFC normalization failed: ") + utf8proc_errmsg(n));
  std::string result(reinterpret_cast<const char*>(out), static_cast<size_t>(n));
  std::free(out);
  return result;
}

// A token named by tokenizer_config.json: null, "text" or {"content": "text", ...}.
std::optional<std::string> config_token(const json& config, const char* key) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  if (config[key].is_string()) return config[key].get<std::string>();
  if (config[key].is_object() && config[key].contains("content")) return config[key]["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

// One step of the pre-tokenizer: a Split by a pattern, or ByteLevel (the last step).
struct PreTokenizeStep {
  std::unique_ptr<bpe::RegexSplitter> split;  // Split, or ByteLevel's own split (use_regex); null: none
  bool byte_level = false;
  bool add_prefix_space = false;  // ByteLevel: a space before each piece that does not start with one
};

struct HfBpeTokenizer::Model {
  std::string path;
  bool nfc = false;
  std::vector<PreTokenizeStep> steps;
  bool ignore_merges = false;  // a piece that is a whole vocabulary entry is that token
  std::array<int64_t, 256> byte_ids{};
  std::unordered_map<std::string, int64_t> ids_by_bytes;  // vocabulary: raw bytes -> id
  // (left id << 32 | right id) -> (rank: the merge's place in the file, id of the merged token)
  std::unordered_map<uint64_t, std::pair<uint32_t, int64_t>> merges;
  std::unordered_map<std::string, int64_t> ids_by_spelling;  // the file's strings (vocabulary, added)
  std::vector<std::string> bytes_by_id;  // what decode writes for each id ("": no token has it)
  std::vector<std::string> added;     // added tokens, as written
  std::vector<int64_t> added_ids;      // [added]
  std::vector<bool> added_special;     // [added]: "special": true
  std::string added_first_bytes;       // the bytes added tokens start with

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("tokenizer.json '" + path + "': " + what);
  }
  /// `parent[key]`, or an error naming `where` it is missing.
  const json& field(const json& parent, const char* key, const std::string& where) const {
    if (!parent.is_object() || !parent.contains(key)) fail(std::string("no '") + key + "' in " + where);
    return parent[key];
  }
  /// The "type" of `node`, or an error naming `where`.
  std::string type_of(const json& node, const std::string& where) const {
    if (!node.is_object() || !node.contains("type") || !node["type"].is_string()) fail(where + " has no \"type\"");
    return node["type"].get<std::string>();
  }
  /// What decode writes for `id`.
  void set_bytes(int64_t id, const std::string& bytes) {
    if (id >= static_cast<int64_t>(bytes_by_id.size())) bytes_by_id.resize(static_cast<size_t>(id) + 1);
    bytes_by_id[static_cast<size_t>(id)] = bytes;
  }
  void read_model(const json& file);          // the vocabulary and merges
  void read_pre_tokenizer(const json& file);  // the normalizer, the pre-tokenizer steps, the decoder
  void read_added_tokens(const json& file);
};

void HfBpeTokenizer::Model::read_model(const json& file) {
  // The model: byte-level BPE with merges.
  const json& model = field(file, "model", "the file");
  if (type_of(model, "model") != "BPE")
    fail("model.type is '" + type_of(model, "model") + "'; titan reads byte-level BPE models (\"BPE\") only");
  if (model.value("byte_fallback", false)) fail("model.byte_fallback is true; titan reads byte-level BPE only");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      fail(std::string("model.") + key + " is set; titan's BPE has none");
  }
  if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0)
    fail("model.dropout is set; titan's BPE is deterministic");
  ignore_merges = model.value("ignore_merges", false);
  const json& vocab = field(model, "vocab", "model");
  if (!vocab.is_object() || vocab.empty()) fail("model.vocab is not a non-empty object");
  std::string bytes;
  for (const auto& [spelling, id_json] : vocab.items()) {
    if (!id_json.is_number_integer() || id_json.get<int64_t>() < 0)
      fail("model.vocab['" + spelling + "'] is not a non-negative integer id");
    const int64_t id = id_json.get<int64_t>();
    if (!byte_level_bytes(spelling, bytes))
      fail("model.vocab token '" + spelling + "' is not spelled in the byte-level alphabet (GPT-2's bytes_to_unicode)");
    ids_by_spelling[spelling] = id;
    ids_by_bytes[bytes] = id;
    set_bytes(id, bytes);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = ids_by_bytes.find(std::string(1, static_cast<char>(b)));
    if (it == ids_by_bytes.end())
      fail("model.vocab has no token for byte " + std::to_string(b) + " (byte-level BPE needs all 256)");
    byte_ids[static_cast<size_t>(b)] = it->second;
  }
  const json& merge_list = field(model, "merges", "model");
  if (!merge_list.is_array()) fail("model.merges is not an array");
  if (merge_list.size() >= bpe::kNoRank) fail("model.merges has too many entries");
  for (size_t rank = 0; rank < merge_list.size(); ++rank) {
    const json& merge = merge_list[rank];
    std::string left, right;
    if (merge.is_string()) {
      const std::string text = merge.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        fail("model.merges[" + std::to_string(rank) + "] '" + text + "' is not two tokens separated by a space");
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else {
      fail("model.merges[" + std::to_string(rank) + "] is neither \"left right\" nor [left, right]");
    }
    const auto id_of = [&](const std::string& token) {
      auto it = ids_by_spelling.find(token);
      if (it == ids_by_spelling.end())
        fail("model.merges[" + std::to_string(rank) + "] names '" + token + "', which is not in model.vocab");
      return it->second;
    };
    const uint64_t key = static_cast<uint64_t>(id_of(left)) << 32 | static_cast<uint64_t>(id_of(right));
    merges.emplace(key, std::make_pair(static_cast<uint32_t>(rank), id_of(left + right)));  // the first wins
  }
}

void HfBpeTokenizer::Model::read_pre_tokenizer(const json& file) {
  // The normalizer: none or NFC.
  if (file.contains("normalizer") && !file["normalizer"].is_null()) {
    const std::string type = type_of(file["normalizer"], "normalizer");
    if (type != "NFC") fail("normalizer.type is '" + type + "'; titan reads NFC or no normalizer");
    nfc = true;
  }

  // The pre-tokenizer: Split steps (isolated matches) and a ByteLevel step, last.
  if (!file.contains("pre_tokenizer") || file["pre_tokenizer"].is_null())
    fail("no pre_tokenizer; titan reads byte-level BPE, whose pre_tokenizer is or ends with ByteLevel");
  const json& pre = file["pre_tokenizer"];
  std::vector<json> step_json;
  if (type_of(pre, "pre_tokenizer") == "Sequence") {
    for (const auto& step : field(pre, "pretokenizers", "pre_tokenizer")) step_json.push_back(step);
  } else {
    step_json.push_back(pre);
  }
  for (size_t i = 0; i < step_json.size(); ++i) {
    const std::string where = "pre_tokenizer step " + std::to_string(i);
    const std::string type = type_of(step_json[i], where);
    PreTokenizeStep step;
    if (type == "Split") {
      const json& pattern = field(step_json[i], "pattern", where);
      std::string regex;
      if (pattern.contains("Regex")) {
        regex = pattern["Regex"].get<std::string>();
      } else if (pattern.contains("String")) {
        regex = "\\Q" + pattern["String"].get<std::string>() + "\\E";
      } else {
        fail(where + ": a Split pattern is {\"Regex\": ...} or {\"String\": ...}");
      }
      if (step_json[i].value("behavior", "") != "Isolated" || step_json[i].value("invert", false))
        fail(where + ": titan reads Split with behavior \"Isolated\" and invert false only");
      step.split = std::make_unique<bpe::RegexSplitter>(regex, "tokenizer.json '" + path + "' " + where);
    } else if (type == "ByteLevel") {
      if (i + 1 != step_json.size()) fail(where + ": ByteLevel must be the last pre-tokenizer step");
      step.byte_level = true;
      step.add_prefix_space = step_json[i].value("add_prefix_space", true);
      if (step_json[i].value("use_regex", true))
        step.split = std::make_unique<bpe::RegexSplitter>(kByteLevelPattern, "tokenizer.json '" + path + "' " + where);
    } else {
      fail(where + " is '" + type + "'; titan reads Split and ByteLevel steps");
    }
    steps.push_back(std::move(step));
  }
  if (steps.empty() || !steps.back().byte_level)
    fail("the pre_tokenizer does not end with ByteLevel; titan reads byte-level BPE only");
  if (file.contains("decoder") && !file["decoder"].is_null() && type_of(file["decoder"], "decoder") != "ByteLevel")
    fail("decoder.type is '" + type_of(file["decoder"], "decoder") + "'; byte-level BPE decodes with ByteLevel");
}

void HfBpeTokenizer::Model::read_added_tokens(const json& file) {
  // Added tokens: matched in the text before everything else, decoded as written.
  if (file.contains("added_tokens") && !file["added_tokens"].is_null()) {
    for (const auto& token : file["added_tokens"]) {
      const std::string content = field(token, "content", "an added token").get<std::string>();
      const int64_t id = field(token, "id", "an added token").get<int64_t>();
      for (const char* key : {"single_word", "lstrip", "rstrip"}) {
        if (token.value(key, false)) fail("added token '" + content + "' has " + key + " set; titan matches added tokens exactly");
      }
      if (content.empty() || id < 0) fail("added token '" + content + "' has an empty content or a negative id");
      added.push_back(content);
      added_ids.push_back(id);
      added_special.push_back(token.value("special", false));
      ids_by_spelling[content] = id;
      set_bytes(id, content);
      if (added_first_bytes.find(content[0]) == std::string::npos) added_first_bytes += content[0];
    }
  }
}

HfBpeTokenizer::HfBpeTokenizer(const std::string& path, HfTokenizerOptions options) : model_(std::make_unique<Model>()) {
  Model& m = *model_;
  m.path = path;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("tokenizer.json '" + path + "' cannot be opened");
  json file;
  try {
    file = json::parse(in);
  } catch (const json::exception& e) {
    m.fail(std::string("not valid JSON: ") + e.what());
  }
  m.read_model(file);
  m.read_pre_tokenizer(file);
  m.read_added_tokens(file);
  vocab_size_ = static_cast<int64_t>(m.bytes_by_id.size());  // one past the largest id

  // BOS, EOS and padding: the options, else tokenizer_config.json in the same folder.
  const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  json config = json::object();
  if (!(options.bos_token() && options.eos_token() && options.pad_token())) {
    std::ifstream config_in(config_path);
    if (config_in) {
      try {
        config = json::parse(config_in);
      } catch (const json::exception& e) {
        throw std::runtime_error("tokenizer_config.json '" + config_path.string() + "': not valid JSON: " + e.what());
      }
    }
  }
  const auto resolve = [&](const std::optional<std::string>& given, const char* key) -> int64_t {
    const std::optional<std::string> name = given ? (given->empty() ? std::nullopt : given) : config_token(config, key);
    if (!name) return -1;
    auto it = m.ids_by_spelling.find(*name);
    if (it == m.ids_by_spelling.end())
      m.fail(std::string(key) + " '" + *name + "' (from " + (given ? "the options" : config_path.string()) +
             ") is neither an added token nor in model.vocab");
    return it->second;
  };
  bos_id_ = resolve(options.bos_token(), "bos_token");
  eos_id_ = resolve(options.eos_token(), "eos_token");
  pad_id_ = resolve(options.pad_token(), "pad_token");
  if (eos_id_ < 0)
    m.fail("no end-of-sequence token: neither HfTokenizerOptions::eos_token nor eos_token in '" +
           config_path.string() + "' names one");
}

HfBpeTokenizer::~HfBpeTokenizer() = default;

int64_t HfBpeTokenizer::token_id(std::string_view token) const {
  auto it = model_->ids_by_spelling.find(std::string(token));
  if (it == model_->ids_by_spelling.end())
    throw std::invalid_argument("'" + std::string(token) + "' is not a token of '" + model_->path + "'");
  return it->second;
}

// BPE on one pre-tokenized piece (raw bytes): its bytes' tokens, merged pair by pair in the order
// of model.merges, as the `tokenizers` library's Word::merge_all does.
void HfBpeTokenizer::encode_piece(std::string_view piece, std::vector<int64_t>& out) const {
  const Model& m = *model_;
  if (piece.empty()) return;
  if (m.ignore_merges) {
    auto it = m.ids_by_bytes.find(std::string(piece));
    if (it != m.ids_by_bytes.end()) {
      out.push_back(it->second);
      return;
    }
  }
  std::vector<int64_t> ids(piece.size());  // [n]: the token of each part
  for (size_t k = 0; k < piece.size(); ++k) ids[k] = m.byte_ids[static_cast<unsigned char>(piece[k])];
  const auto merge_of = [&](size_t left, size_t right) {
    return m.merges.find(static_cast<uint64_t>(ids[left]) << 32 | static_cast<uint64_t>(ids[right]));
  };
  const auto next = bpe::merge_lowest_rank_first(
      piece.size(),
      [&](size_t left, size_t right, size_t) {
        auto it = merge_of(left, right);
        return it == m.merges.end() ? bpe::kNoRank : it->second.first;
      },
      [&](size_t left, size_t right) { ids[left] = merge_of(left, right)->second.second; });
  for (size_t k = 0; k < piece.size(); k = next[k]) out.push_back(ids[k]);
}

// Normalizes and pre-tokenizes text between added tokens, then BPE-encodes each piece.
void HfBpeTokenizer::encode_segment(std::string_view text, std::vector<int64_t>& out) const {
  const Model& m = *model_;
  if (text.empty()) return;
  std::vector<std::string> pieces{m.nfc ? nfc(text) : std::string(text)};
  for (const auto& step : m.steps) {
    std::vector<std::string> next;
    for (auto& piece : pieces) {
      if (step.add_prefix_space && !piece.empty() && piece.front() != ' ') piece.insert(piece.begin(), ' ');
      if (!step.split) {
        next.push_back(std::move(piece));
        continue;
      }
      // Split "Isolated": each match is a piece, and so is the text between matches.
      size_t done = 0;
      step.split->for_each_match(piece, [&](std::string_view match) {
        const size_t begin = static_cast<size_t>(match.data() - piece.data());
        if (begin > done) next.emplace_back(piece, done, begin - done);
        next.emplace_back(match);
        done = begin + match.size();
      });
      if (done < piece.size()) next.emplace_back(piece, done, std::string::npos);
    }
    pieces = std::move(next);
  }
  for (const auto& piece : pieces) encode_piece(piece, out);
}

std::vector<int64_t> HfBpeTokenizer::encode(std::string_view text, bool bos, bool eos) const {
  return encode(text, bos, eos, SpecialTokens::kAsText);
}

std::vector<int64_t> HfBpeTokenizer::encode(std::string_view raw, bool bos, bool eos, SpecialTokens special) const {
  const Model& m = *model_;
  if ((bos && bos_id_ < 0) || (eos && eos_id_ < 0))
    throw std::invalid_argument("tokenizer.json '" + m.path + "' has no " + (bos && bos_id_ < 0 ? "BOS" : "EOS") +
                                " token but one was asked for");
  std::string repaired;
  const std::string_view text = bpe::repair_utf8(raw, repaired);
  std::vector<int64_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (bos) ids.push_back(bos_id_);
  // Added tokens, leftmost first and the longest where several start at one place (the
  // `tokenizers` library's leftmost-longest match); special ones only when allowed: read as text
  // they stay part of the text around them, as in `tokenizers`.
  bpe::split_at_tokens(
      text, m.added, m.added_first_bytes,
      [&](size_t k, size_t at) {
        if (!m.added_special[k]) return true;
        if (special == SpecialTokens::kReject)
          throw std::invalid_argument("text contains the special token " + m.added[k] + " at byte " +
                                      std::to_string(at) + " (encode it with SpecialTokens::kAllow or kAsText)");
        return special == SpecialTokens::kAllow;
      },
      [&](std::string_view segment) { encode_segment(segment, ids); }, [&](size_t k) { ids.push_back(m.added_ids[k]); });
  if (eos) ids.push_back(eos_id_);
  return ids;
}

std::string HfBpeTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text;
  for (const int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(model_->bytes_by_id.size()) ||
        model_->bytes_by_id[static_cast<size_t>(id)].empty())  // no token has this id
      throw std::out_of_range("token id " + std::to_string(id) + " is not in the vocabulary of '" + model_->path + "'");
    text += model_->bytes_by_id[static_cast<size_t>(id)];
  }
  return text;
}

}  // namespace titan::examples
