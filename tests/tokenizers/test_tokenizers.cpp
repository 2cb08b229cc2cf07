// Tokenizer tests. Suite "parity": token ids and decoded bytes of the C++ tokenizers against the
// Python tiktoken / tokenizers / sentencepiece reference (tests/tokenizers/make_reference.py writes the JSON
// named by TITAN_TOKENIZER_REFERENCE). Other cases: file errors, special-token layout, options.

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "tokenizers/hf_bpe.hpp"
#include "tokenizers/sentencepiece.hpp"
#include "tokenizers/tiktoken.hpp"
#include "tokenizers/tokenizer.hpp"

namespace fs = std::filesystem;
using titan::examples::HfBpeTokenizer;
using titan::examples::HfTokenizerOptions;
using titan::examples::load_tokenizer;
using titan::examples::SentencePieceTokenizer;
using titan::examples::SpecialTokens;
using titan::examples::TiktokenOptions;
using titan::examples::TiktokenTokenizer;

namespace {

const nlohmann::json& reference() {
  static const nlohmann::json json = [] {
    const char* path = std::getenv("TITAN_TOKENIZER_REFERENCE");
    REQUIRE_MESSAGE(path != nullptr, "TITAN_TOKENIZER_REFERENCE must name make_reference.py's JSON");
    std::ifstream in(path);
    REQUIRE_MESSAGE(in.good(), "cannot read ", path, " (run the tokenizers.reference test first)");
    return nlohmann::json::parse(in);
  }();
  return json;
}

std::string tiktoken_model() { return reference()["tiktoken"]["model"].get<std::string>(); }
std::string sentencepiece_model() { return reference()["sentencepiece"]["model"].get<std::string>(); }

std::string from_hex(const std::string& hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::string to_hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out.push_back(digits[c >> 4]);
    out.push_back(digits[c & 15]);
  }
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

// A file in a fresh temporary folder holding `content`.
std::string temp_file(const std::string& name, const std::string& content) {
  const fs::path dir = fs::temp_directory_path() / ("titan_tokenizers_test_" + std::to_string(::getpid()));
  const fs::path path = dir / name;
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary) << content;
  return path.string();
}

// Checks ids and decoded bytes of every reference case of `kind` against `tokenizer`; a mismatch
// reports the case and the first differing position.
template <typename Encode>
void check_cases(const titan::examples::Tokenizer& tokenizer, const nlohmann::json& cases, Encode encode) {
  REQUIRE(cases.size() > 10);
  for (const auto& c : cases) {
    const std::string name = c["name"].get<std::string>();
    const std::string text = from_hex(c["text_hex"].get<std::string>());
    const auto expected = c["ids"].get<std::vector<int64_t>>();
    const std::vector<int64_t> actual = encode(text, c);
    size_t first = 0;
    while (first < expected.size() && first < actual.size() && expected[first] == actual[first]) ++first;
    if (first < expected.size() || first < actual.size()) {
      std::ostringstream os;
      os << "case '" << name << "': first mismatch at index " << first << " of " << expected.size()
         << " expected / " << actual.size() << " actual ids: expected "
         << (first < expected.size() ? std::to_string(expected[first]) : "<end>") << ", got "
         << (first < actual.size() ? std::to_string(actual[first]) : "<end>");
      FAIL_CHECK(os.str());
      continue;
    }
    CHECK_MESSAGE(to_hex(tokenizer.decode(expected)) == c["decoded_hex"].get<std::string>(), "case '", name,
                  "': decoded bytes differ");
  }
}

}  // namespace

TEST_SUITE("parity") {
  TEST_CASE("tiktoken ids and decoding match Python tiktoken") {
    const auto& ref = reference()["tiktoken"];
    const TiktokenTokenizer tok(tiktoken_model(),
                                TiktokenOptions().num_special_tokens(ref["num_special_tokens"].get<int64_t>()));
    check_cases(tok, ref["cases"], [&](const std::string& text, const nlohmann::json& c) {
      const auto special = c["special"] == "allow" ? SpecialTokens::kAllow : SpecialTokens::kAsText;
      return tok.encode(text, c["bos"].get<bool>(), c["eos"].get<bool>(), special);
    });
  }

  TEST_CASE("huggingface ids and decoding match Python tokenizers (Qwen and GPT-2 layouts)") {
    REQUIRE(reference()["huggingface"].size() == 2);
    for (const auto& ref : reference()["huggingface"]) {
      CAPTURE(ref["name"].get<std::string>());
      const HfBpeTokenizer tok(ref["model"].get<std::string>());
      CHECK(tok.bos_id() == ref["bos_id"].get<int64_t>());
      CHECK(tok.eos_id() == ref["eos_id"].get<int64_t>());
      CHECK(tok.pad_id() == ref["pad_id"].get<int64_t>());
      CHECK(tok.vocab_size() == ref["vocab_size"].get<int64_t>());
      check_cases(tok, ref["cases"], [&](const std::string& text, const nlohmann::json& c) {
        const auto special = c["special"] == "allow" ? SpecialTokens::kAllow : SpecialTokens::kAsText;
        return tok.encode(text, c["bos"].get<bool>(), c["eos"].get<bool>(), special);
      });
    }
  }

  TEST_CASE("sentencepiece ids and decoding match Python sentencepiece") {
    const auto& ref = reference()["sentencepiece"];
    const SentencePieceTokenizer tok(sentencepiece_model());
    CHECK(tok.bos_id() == ref["bos_id"].get<int64_t>());
    CHECK(tok.eos_id() == ref["eos_id"].get<int64_t>());
    CHECK(tok.pad_id() == ref["pad_id"].get<int64_t>());
    CHECK(tok.vocab_size() == ref["vocab_size"].get<int64_t>());
    check_cases(tok, ref["cases"], [&](const std::string& text, const nlohmann::json& c) {
      return tok.encode(text, c["bos"].get<bool>(), c["eos"].get<bool>());
    });
  }

  TEST_CASE("decoded_starts: each token starts where the decoding of the tokens before it ends") {
    // On every reference text and tokenizer: starts[k] == decode(ids[0..k)).size() wherever that
    // prefix decodes to a prefix of decode(ids) and does not end in U+FFFD (inside a character cut
    // into byte tokens, which starts where the character does, the prefix decodes to a repair).
    const auto& ref = reference();
    std::vector<std::unique_ptr<titan::examples::Tokenizer>> tokenizers;
    tokenizers.push_back(std::make_unique<TiktokenTokenizer>(
        tiktoken_model(), TiktokenOptions().num_special_tokens(ref["tiktoken"]["num_special_tokens"].get<int64_t>())));
    for (const auto& hf : ref["huggingface"])
      tokenizers.push_back(std::make_unique<HfBpeTokenizer>(hf["model"].get<std::string>()));
    tokenizers.push_back(std::make_unique<SentencePieceTokenizer>(sentencepiece_model()));
    const std::string replacement = "\xEF\xBF\xBD";
    for (const auto& tok : tokenizers) {
      size_t checked = 0;
      for (const auto& c : ref["sentencepiece"]["cases"]) {
        const auto ids = tok->encode(from_hex(c["text_hex"].get<std::string>()), false, false);
        if (ids.size() > 1500) continue;  // the check is quadratic
        CAPTURE(c["name"].get<std::string>());
        const std::string decoded = tok->decode(ids);
        const auto starts = tok->decoded_starts(ids);
        REQUIRE(starts.size() == ids.size());
        for (size_t k = 0; k < ids.size(); ++k) {
          CHECK(starts[k] <= decoded.size());
          if (k > 0) CHECK(starts[k] >= starts[k - 1]);
          const std::string prefix = tok->decode(std::vector<int64_t>(ids.begin(), ids.begin() + k));
          const bool repaired = prefix.size() >= 3 && prefix.compare(prefix.size() - 3, 3, replacement) == 0;
          if (decoded.compare(0, prefix.size(), prefix) != 0 || repaired) continue;
          CHECK(starts[k] == prefix.size());
          ++checked;
        }
      }
      CHECK(checked > 2000);
    }
  }
}

TEST_CASE("load_tokenizer: unknown kind and missing files name what was wrong") {
  CHECK_THROWS_WITH_AS(load_tokenizer(tiktoken_model(), "bpe"),
                       doctest::Contains("unknown tokenizer kind 'bpe'"), std::invalid_argument);
  for (const char* kind : {"tiktoken", "huggingface", "sentencepiece"}) {
    CHECK_THROWS_WITH_AS(load_tokenizer("/nonexistent/tokenizer.model", kind),
                         doctest::Contains("'/nonexistent/tokenizer.model' does not exist"), std::runtime_error);
  }
  CHECK(load_tokenizer(tiktoken_model(), "tiktoken")->vocab_size() == 4000 + 256);
  CHECK(load_tokenizer(sentencepiece_model(), "sentencepiece")->vocab_size() == 3000);
}

TEST_CASE("tiktoken file errors give file:line") {
  const std::string all_bytes = [] {
    std::string ranks;
    for (int b = 0; b < 256; ++b) {
      // base64 of one byte: two significant characters then "==".
      const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
      ranks += std::string{alphabet[b >> 2], alphabet[(b & 3) << 4], '=', '='} + " " + std::to_string(b) + "\n";
    }
    return ranks;
  }();
  CHECK(TiktokenTokenizer(temp_file("ok.model", all_bytes)).num_base_tokens() == 256);

  struct Bad {
    const char* name;
    std::string content;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {"fields.model", all_bytes + "QUI=\n", "line 257: expected '<base64 token> <rank>', got 'QUI='"},
      {"three.model", "QQ== 0 1\n", "line 1: expected '<base64 token> <rank>'"},
      {"base64.model", all_bytes + "@@@= 256\n", "line 257: '@@@=' is not valid base64"},
      {"noncanonical.model", "QR== 0\n", "line 1: 'QR==' is not valid base64"},
      {"rank.model", "\nQQ== 1\n", "line 2: rank 1 where 0 was expected"},
      {"negative.model", "QQ== -1\n", "line 1: rank '-1' is not a non-negative integer"},
      {"duplicate.model", all_bytes + "\nQQ== 256\n", "line 258: token of rank 256 repeats rank 65's bytes"},
      {"empty.model", "\n\n", "has no tokens"},
      {"bytes.model", "QQ== 0\nQg== 1\n", "has no token for byte 0"},
  };
  for (const auto& b : bad) {
    const std::string path = temp_file(b.name, b.content);
    CHECK_THROWS_WITH_AS(TiktokenTokenizer{path}, doctest::Contains(("tiktoken file '" + path + "' " + b.message).c_str()),
                         std::runtime_error);
    CHECK_THROWS_WITH_AS(load_tokenizer(path, "tiktoken"), doctest::Contains(b.message.c_str()), std::runtime_error);
  }
  CHECK_THROWS_WITH_AS(TiktokenTokenizer(temp_file("ok.model", all_bytes), TiktokenOptions().pattern("(unclosed")),
                       doctest::Contains("ok.model': pattern does not compile"), std::invalid_argument);
}

TEST_CASE("huggingface: tokens, options and file errors name the file and the field") {
  const std::string qwen = reference()["huggingface"][0]["model"].get<std::string>();
  const HfBpeTokenizer tok(qwen);
  CHECK(tok.bos_id() == -1);  // Qwen's layout: no BOS
  CHECK(tok.eos_id() == tok.token_id("<|endoftext|>"));
  CHECK_THROWS_WITH_AS(tok.encode("x", true, false), doctest::Contains("has no BOS token"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(tok.encode("a<|im_end|>", false, false, SpecialTokens::kReject),
                       doctest::Contains("contains the special token <|im_end|> at byte 1"), std::invalid_argument);
  // Non-special added tokens match in every mode; special ones only when allowed.
  const auto think = tok.encode("<think>x", false, false);
  CHECK(think.front() == tok.token_id("<think>"));
  CHECK(tok.encode("<|im_end|>", false, false, SpecialTokens::kAllow) == std::vector<int64_t>{tok.token_id("<|im_end|>")});
  CHECK(tok.encode("<|im_end|>", false, false).size() > 1);
  CHECK_THROWS_WITH_AS(tok.token_id("<|nope|>"), doctest::Contains("is not a token of"), std::invalid_argument);
  CHECK_THROWS_WITH_AS(tok.decode({tok.vocab_size()}), doctest::Contains("is not in the vocabulary"), std::out_of_range);
  const HfBpeTokenizer with_bos(qwen, HfTokenizerOptions().bos_token("<|im_start|>").pad_token(""));
  CHECK(with_bos.bos_id() == tok.token_id("<|im_start|>"));
  CHECK(with_bos.pad_id() == -1);
  CHECK(load_tokenizer(qwen, "huggingface")->eos_id() == tok.eos_id());

  // A tokenizer.json edited into what titan does not read: each error names the file and field.
  const nlohmann::json good = nlohmann::json::parse(read_file(qwen));
  struct Bad {
    const char* name;
    std::function<void(nlohmann::json&)> edit;
    const char* message;
  };
  const std::vector<Bad> bad = {
      {"wordpiece", [](auto& j) { j["model"]["type"] = "WordPiece"; }, "model.type is 'WordPiece'"},
      {"fallback", [](auto& j) { j["model"]["byte_fallback"] = true; }, "model.byte_fallback is true"},
      {"nfkc", [](auto& j) { j["normalizer"] = {{"type", "NFKC"}}; }, "normalizer.type is 'NFKC'"},
      {"metaspace", [](auto& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}}; }, "pre_tokenizer step 0 is 'Metaspace'"},
      {"no_byte_level", [](auto& j) { j["pre_tokenizer"]["pretokenizers"].erase(1); }, "the pre_tokenizer does not end with ByteLevel"},
      {"removed", [](auto& j) { j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed"; },
       "pre_tokenizer step 0: titan reads Split with behavior \"Isolated\""},
      {"merge", [](auto& j) { j["model"]["merges"][0] = "zzzq y"; }, "model.merges[0] names 'zzzq'"},
      {"lstrip", [](auto& j) { j["added_tokens"][0]["lstrip"] = true; }, "added token '<|endoftext|>' has lstrip set"},
      {"byte", [](auto& j) { j["model"]["vocab"].erase("!"); }, "model.vocab has no token for byte 33"},
  };
  for (const auto& b : bad) {
    nlohmann::json edited = good;
    b.edit(edited);
    const std::string path = temp_file(std::string(b.name) + "_tokenizer.json", edited.dump());
    CHECK_THROWS_WITH_AS(HfBpeTokenizer(path, HfTokenizerOptions().eos_token("<|endoftext|>")),
                         doctest::Contains(("tokenizer.json '" + path + "': " + b.message).c_str()), std::runtime_error);
  }
  const std::string not_json = temp_file("broken_tokenizer.json", "{\"model\": ");
  CHECK_THROWS_WITH_AS(HfBpeTokenizer(not_json, HfTokenizerOptions().eos_token("x")), doctest::Contains("not valid JSON"),
                       std::runtime_error);
  // No tokenizer_config.json beside it and no eos_token option: no way to end a document.
  const std::string alone = temp_file("alone/tokenizer.json", good.dump());
  CHECK_THROWS_WITH_AS(HfBpeTokenizer{alone}, doctest::Contains("no end-of-sequence token"), std::runtime_error);
  CHECK_THROWS_WITH_AS(HfBpeTokenizer(alone, HfTokenizerOptions().eos_token("<|nope|>")),
                       doctest::Contains("eos_token '<|nope|>' (from the options) is neither an added token nor in model.vocab"),
                       std::runtime_error);
}

TEST_CASE("sentencepiece file errors name the file") {
  const std::string path = temp_file("garbage.model", "this is not a serialized ModelProto");
  CHECK_THROWS_WITH_AS(SentencePieceTokenizer{path}, doctest::Contains(("sentencepiece model '" + path + "' cannot be loaded").c_str()),
                       std::runtime_error);
  CHECK_THROWS_WITH_AS(load_tokenizer(path, "sentencepiece"), doctest::Contains("cannot be loaded"), std::runtime_error);
}

TEST_CASE("tiktoken special tokens follow Meta's Llama 3 layout") {
  const TiktokenTokenizer tok(tiktoken_model());
  const int64_t base = tok.num_base_tokens();
  CHECK(base == 4000);
  CHECK(tok.vocab_size() == base + 256);
  // The offsets of Llama 3's tokenizer.model (128000 base tokens): 128000, 128001, 128004, ...
  CHECK(tok.bos_id() == base + 0);
  CHECK(tok.token_id("<|begin_of_text|>") == base + 0);
  CHECK(tok.eos_id() == base + 1);
  CHECK(tok.pad_id() == base + 4);
  CHECK(tok.token_id("<|finetune_right_pad_id|>") == base + 4);
  CHECK(tok.token_id("<|start_header_id|>") == base + 6);
  CHECK(tok.token_id("<|end_header_id|>") == base + 7);
  CHECK(tok.token_id("<|eom_id|>") == base + 8);
  CHECK(tok.token_id("<|eot_id|>") == base + 9);
  CHECK(tok.token_id("<|python_tag|>") == base + 10);
  CHECK(tok.token_id("<|reserved_special_token_3|>") == base + 11);
  CHECK(tok.token_id("<|reserved_special_token_247|>") == base + 255);
  CHECK_THROWS_WITH_AS(tok.token_id("<|reserved_special_token_248|>"), doctest::Contains("not a special token"),
                       std::invalid_argument);
  CHECK(tok.decode({base + 9, base + 6}) == "<|eot_id|><|start_header_id|>");
  CHECK_THROWS_WITH_AS(tok.decode({base + 256}), doctest::Contains("outside the vocabulary [0, 4256)"),
                       std::out_of_range);
  CHECK_THROWS_AS(tok.decode({-1}), std::out_of_range);

  const TiktokenTokenizer few(tiktoken_model(), TiktokenOptions().num_special_tokens(2));
  CHECK(few.vocab_size() == base + 2);
  CHECK(few.eos_id() == base + 1);
  CHECK(few.pad_id() == -1);
  const TiktokenTokenizer none(tiktoken_model(), TiktokenOptions().num_special_tokens(0));
  CHECK_THROWS_WITH_AS(none.encode("x", true, false), doctest::Contains("no <|begin_of_text|>"), std::invalid_argument);
}

TEST_CASE("tiktoken special-token text: as text, allowed or rejected") {
  const TiktokenTokenizer tok(tiktoken_model());
  const std::string text = "Hi<|eot_id|>";
  const auto as_text = tok.encode(text, false, false);
  CHECK(as_text == tok.encode(text, false, false, SpecialTokens::kAsText));
  CHECK(tok.decode(as_text) == text);
  CHECK(std::find(as_text.begin(), as_text.end(), tok.token_id("<|eot_id|>")) == as_text.end());
  auto allowed = tok.encode(text, true, true, SpecialTokens::kAllow);
  CHECK(allowed.size() == tok.encode("Hi", false, false).size() + 3);
  CHECK(allowed[allowed.size() - 2] == tok.token_id("<|eot_id|>"));
  CHECK(allowed.front() == tok.bos_id());
  CHECK(allowed.back() == tok.eos_id());
  CHECK_THROWS_WITH_AS(tok.encode(text, false, false, SpecialTokens::kReject),
                       doctest::Contains("contains the special token <|eot_id|> at byte 2"), std::invalid_argument);
  CHECK(tok.encode("no specials <|here", false, false, SpecialTokens::kReject) ==
        tok.encode("no specials <|here", false, false));
}

TEST_CASE("round trips and invalid UTF-8") {
  const std::string sample = read_file(std::string(TITAN_TOKENIZERS_TEST_DIR) + "/multilingual_sample.txt");
  REQUIRE(sample.size() > 500);
  const TiktokenTokenizer tik(tiktoken_model());
  CHECK(tik.decode(tik.encode(sample, false, false)) == sample);
  const SentencePieceTokenizer spm(sentencepiece_model());
  CHECK(spm.decode(spm.encode(sample, false, false)) == sample);
  // Each maximal invalid subpart becomes one U+FFFD before tokenization.
  CHECK(tik.decode(tik.encode("a\xE2\x82" "b\xFF", false, false)) == "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
  CHECK(tik.encode("\xF0\x9F\x99", false, false) == tik.encode("\xEF\xBF\xBD", false, false));
  CHECK(tik.encode("", true, true) == std::vector<int64_t>{tik.bos_id(), tik.eos_id()});
  CHECK(spm.encode("", true, true) == std::vector<int64_t>{spm.bos_id(), spm.eos_id()});
}

TEST_CASE("encode is safe to call from several threads") {
  const std::string sample = read_file(std::string(TITAN_TOKENIZERS_TEST_DIR) + "/multilingual_sample.txt");
  const auto tik = load_tokenizer(tiktoken_model(), "tiktoken");
  const auto spm = load_tokenizer(sentencepiece_model(), "sentencepiece");
  const auto tik_ids = tik->encode(sample, true, true);
  const auto spm_ids = spm->encode(sample, true, true);
  std::vector<int> same(4, 0);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < same.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 20; ++i) {
        same[t] += tik->encode(sample, true, true) == tik_ids && spm->encode(sample, true, true) == spm_ids;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(same == std::vector<int>(4, 20));
}
