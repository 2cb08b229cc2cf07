// Tests of examples/common/chat.cpp: conversations rendered to tokens with the assistant mask, on
// the offline test tokenizers (data/cache, scripts/make_corpus.sh), and chat corpora through the
// data loader. Parity with the models' own chat templates: chat_parity.py.
#include "trainer_fixtures.hpp"

#include <common/chat.hpp>
#include <tokenizers/hf_bpe.hpp>
#include <tokenizers/sentencepiece.hpp>
#include <tokenizers/tiktoken.hpp>

#include <nlohmann/json.hpp>

#include <map>

namespace {

const fs::path kTokenizers = fs::path(TITAN_SOURCE_DIR) / "data/cache/tokenizers";

const Tokenizer& llama3_tokenizer() {
  static const TiktokenTokenizer tok((kTokenizers / "tiktoken/llama3_bpe_4k.model").string());
  return tok;
}
const Tokenizer& qwen_tokenizer() {
  static const HfBpeTokenizer tok((kTokenizers / "huggingface/qwen_bpe_4k/tokenizer.json").string());
  return tok;
}

const Tokenizer& spm_tokenizer() {
  static const SentencePieceTokenizer tok((kTokenizers / "sentencepiece/spm_bpe_3k.model").string());
  return tok;
}

/// The concatenation of `parts`.
std::vector<int64_t> joined(std::initializer_list<std::vector<int64_t>> parts) {
  std::vector<int64_t> out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

/// The text of the trained tokens of `t`, and of the others.
std::pair<std::string, std::string> split_text(const ChatTokens& t, const Tokenizer& tok) {
  std::vector<int64_t> trained, context;
  for (size_t i = 0; i < t.ids.size(); ++i) (t.trained[i] ? trained : context).push_back(t.ids[i]);
  return {tok.decode(trained), tok.decode(context)};
}

std::vector<ChatMessage> conversation(const std::string& json) { return chat_messages(nlohmann::json::parse(json)); }

}  // namespace

TEST_CASE("chat: messages are checked with the message and the problem named") {
  CHECK_ERROR_HAS(conversation("{}"), "\"messages\" is not a non-empty array");
  CHECK_ERROR_HAS(conversation("[]"), "\"messages\" is not a non-empty array");
  CHECK_ERROR_HAS(conversation(R"([{"role": "user", "content": "a"}, 3])"), "message 1 is not a JSON object");
  CHECK_ERROR_HAS(conversation(R"([{"content": "a"}])"), "message 0 has no string \"role\"");
  CHECK_ERROR_HAS(conversation(R"([{"role": "tool", "content": "a"}])"), "message 0 has the role \"tool\"",
                  "tool calls are not supported");
  CHECK_ERROR_HAS(conversation(R"([{"role": "user", "content": ["a"]}])"), "message 0 (user) has no string \"content\"");
  CHECK_ERROR_HAS(conversation(R"([{"role": "user", "content": "a", "reasoning_content": "r"}])"),
                  "message 0: \"reasoning_content\" must be a string of an assistant message");
  CHECK_ERROR_HAS(conversation(R"([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}])"),
                  "no assistant message");
  auto parsed = conversation(R"([{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": "b", "reasoning_content": "r"}])");
  REQUIRE(parsed.size() == 2);
  CHECK(parsed[1].reasoning == std::optional<std::string>("r"));
  CHECK_FALSE(parsed[0].reasoning.has_value());
}

TEST_CASE("chat: each format trains on the assistant turns and their end-of-turn token only") {
  const auto messages = conversation(R"([{"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello. "},
      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}])");
  {
    const auto& tok = llama3_tokenizer();
    auto t = render_chat(messages, ChatOptions().format("llama3"), tok);
    REQUIRE(t.ids.size() == t.trained.size());
    auto [trained, context] = split_text(t, tok);
    CHECK(trained == "Hello.<|eot_id|>Bye!<|eot_id|>");  // contents stripped, as the template's trim
    CHECK(context ==
          "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
          "\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|start_header_id|>user<|end_header_id|>"
          "\n\nBye<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    CHECK(t.ids.front() == tok.token_id("<|start_header_id|>"));  // no BOS: the loader adds it
  }
  {
    // llama3.1: the same turns after a system message that always opens with the dated preamble.
    const auto& tok = llama3_tokenizer();
    auto t = render_chat(messages, ChatOptions().format("llama3.1").date("06 Dec 2026"), tok);
    auto [trained, context] = split_text(t, tok);
    CHECK(trained == "Hello.<|eot_id|>Bye!<|eot_id|>");
    CHECK(context.rfind("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                        "Today Date: 06 Dec 2026\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>",
                        0) == 0);
    const auto no_system = std::vector<ChatMessage>(messages.begin() + 1, messages.end());
    CHECK(split_text(render_chat(no_system, ChatOptions().format("llama3.1"), tok), tok)
              .second.rfind("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                            "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user",
                            0) == 0);
  }
  {
    const auto& tok = qwen_tokenizer();
    auto t = render_chat(messages, ChatOptions().format("chatml"), tok);
    auto [trained, context] = split_text(t, tok);
    CHECK(trained == " Hello. <|im_end|>Bye!<|im_end|>");
    CHECK(context ==
          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
          "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n\n");
    // qwen3: the last turn gets an (empty) think block, the earlier one none.
    auto q = render_chat(messages, ChatOptions().format("qwen3"), tok);
    CHECK(split_text(q, tok).first == " Hello. <|im_end|><think>\n\n</think>\n\nBye!<|im_end|>");
  }
}

TEST_CASE("chat: llama2 and mistral write [INST] exchanges with SentencePiece and train on the answers") {
  const auto& tok = spm_tokenizer();
  const auto encoded = [&](const char* text) { return tok.encode(text, false, false); };
  const std::vector<int64_t> bos{tok.bos_id()}, eos{tok.eos_id()};
  const auto messages = conversation(R"([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": " Hello. "},
      {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye!"}])");
  std::vector<ChatMessage> with_system = messages;
  with_system.insert(with_system.begin(), ChatMessage{"system", "Be brief.", std::nullopt});
  {
    // Contents stripped (the first user message with the system block before it, so its leading
    // space stays); the space after [/INST] and the one before </s> belong to the answer; the first
    // <s> is the loader's. SentencePiece splits at spaces, so each part encodes on its own.
    auto t = render_chat(with_system, ChatOptions().format("llama2"), tok);
    REQUIRE(t.ids.size() == t.trained.size());
    std::vector<int64_t> trained, context;
    for (size_t i = 0; i < t.ids.size(); ++i) (t.trained[i] ? trained : context).push_back(t.ids[i]);
    CHECK(context == joined({encoded("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST]"), bos, encoded("[INST] Bye [/INST]")}));
    CHECK(trained == joined({encoded("Hello. "), eos, encoded("Bye! "), eos}));
    CHECK(t.ids == joined({encoded("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. "), eos, bos,
                           encoded("[INST] Bye [/INST] Bye! "), eos}));
    // The default system message takes the place of a missing one.
    CHECK(render_chat(messages, ChatOptions().format("llama2").system("Be brief."), tok).ids == t.ids);
  }
  {
    // Contents as written, the answer right after [/INST], no system message.
    auto t = render_chat(messages, ChatOptions().format("mistral"), tok);
    auto [trained, context] = split_text(t, tok);
    CHECK(trained == "Hello. Bye!");  // SentencePiece decodes </s> to nothing and drops the first space
    CHECK(context == "[INST]  Hi  [/INST] [INST] Bye [/INST]");  // the second run's dummy prefix
    CHECK(t.ids.back() == tok.eos_id());
    CHECK(t.trained.back());
  }
  // What their templates refuse.
  CHECK_ERROR_HAS(render_chat(with_system, ChatOptions().format("mistral"), tok),
                  "message 0 is a system message where the mistral chat format expects user");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("mistral").system("s"), tok),
                  "the mistral chat format has no system message", "data.chat_system");
  CHECK_ERROR_HAS(render_chat(conversation(R"([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                                {"role": "assistant", "content": "c"}])"),
                              ChatOptions().format("llama2"), tok),
                  "message 1 is a user message where the llama2 chat format expects assistant",
                  "an optional first system message");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("llama3"), tok),
                  "the llama3 chat format needs the special token <|start_header_id|>");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("llama2"), llama3_tokenizer()),
                  "the llama2 chat format needs the special token </s>");
}

TEST_CASE("chat: a default system message opens conversations without one") {
  const auto& tok = qwen_tokenizer();
  const auto plain = conversation(R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])");
  const auto own = conversation(R"([{"role": "system", "content": "mine"}, {"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}])");
  const auto options = ChatOptions().format("chatml").system("You are a test.");
  CHECK(split_text(render_chat(plain, options, tok), tok).second.rfind("<|im_start|>system\nYou are a test.<|im_end|>", 0) == 0);
  CHECK(split_text(render_chat(own, options, tok), tok).second.rfind("<|im_start|>system\nmine<|im_end|>", 0) == 0);
  CHECK(split_text(render_chat(plain, ChatOptions().format("chatml"), tok), tok).second.rfind("<|im_start|>user", 0) == 0);
}

TEST_CASE("chat: a format the tokenizer cannot write, an unknown format and stray reasoning are errors") {
  const auto messages = conversation(R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("llama3"), qwen_tokenizer()),
                  "the llama3 chat format needs the special token <|start_header_id|>", "is not a token of");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("chatml"), llama3_tokenizer()),
                  "the chatml chat format needs the special token <|im_start|>");
  CHECK_ERROR_HAS(render_chat(messages, ChatOptions().format("vicuna"), qwen_tokenizer()), "unknown chat format 'vicuna'",
                  "llama3, llama3.1, chatml, qwen3, llama2, mistral");
  const auto reasoning = conversation(
      R"([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"}])");
  CHECK_ERROR_HAS(render_chat(reasoning, ChatOptions().format("chatml"), qwen_tokenizer()),
                  "\"reasoning_content\", which only the qwen3 chat format renders");
}

TEST_CASE("chat: a chat corpus trains on the assistant turns, not on the template or the EOS") {
  auto dir = scratch("data_chat");
  const auto& tok = llama3_tokenizer();
  const std::string first = R"({"messages": [{"role": "user", "content": "Define abaca."}, )"
                            R"({"role": "assistant", "content": "A plant."}]})";
  const std::string second = R"({"messages": [{"role": "system", "content": "Short."}, )"
                             R"({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})";
  write_file(dir / "c.jsonl", first + "\n" + second + "\n");
  auto options = CorpusOptions().path((dir / "c.jsonl").string()).kind("chat").cache_dir((dir / "cache").string())
                     .chat(ChatOptions().format("llama3")).show_progress(false);
  auto corpus = TokenCorpus::open(options, tok);
  REQUIRE(corpus->num_documents() == 2);
  CHECK_FALSE(corpus->trains_eos());
  const auto expected = render_chat(chat_messages(nlohmann::json::parse(first)["messages"]), ChatOptions(), tok);
  REQUIRE(corpus->document_length(0) == static_cast<int64_t>(expected.ids.size()));
  for (int64_t k = 0; k < corpus->document_length(0); ++k) {
    CHECK(corpus->token(0, k) == expected.ids[k]);
    CHECK(corpus->trained(0, k) == expected.trained[k]);
  }
  // Packed: the labels are the trained tokens ("A plant.<|eot_id|>", "Hello!<|eot_id|>") only.
  DataLoader loader(corpus, tok, LoaderOptions().batch_size(1).seq_len(64).shuffle(false).pack(false));
  std::string trained;
  for (int step = 0; step < 2; ++step) {
    auto batch = loader.next();
    auto labels = batch.labels.contiguous();
    std::vector<int64_t> ids;
    for (int64_t i = 0; i < labels.numel(); ++i)
      if (labels.data_ptr<int64_t>()[i] != -100) ids.push_back(labels.data_ptr<int64_t>()[i]);
    CHECK(batch.input[0][0].item<int64_t>() == tok.bos_id());
    trained += tok.decode(ids);
  }
  CHECK(trained == "A plant.<|eot_id|>Hello!<|eot_id|>");

  // A malformed conversation names its line; skip_malformed counts it.
  write_file(dir / "bad.jsonl", first + "\n" + R"({"messages": [{"role": "user", "content": "only a question"}]})" + "\n");
  auto bad = CorpusOptions(options).path((dir / "bad.jsonl").string());
  CHECK_ERROR_HAS(TokenCorpus::open(bad, tok), "bad.jsonl:2", "malformed chat line", "no assistant message",
                  "data.skip_malformed");
  CHECK(TokenCorpus::open(bad.skip_malformed(true), tok)->skipped_lines() == 1);
  // A tokenizer without the format's tokens is refused before any line is read.
  CHECK_ERROR_HAS(TokenCorpus::open(CorpusOptions(options).chat(ChatOptions().format("chatml")), tok),
                  "the chat corpus", "c.jsonl", "cannot be rendered", "<|im_start|>");
}

TEST_CASE("chat: parity with the models' chat templates" * doctest::skip()) {
  // Run by chat_parity.py, which renders the conversations with the official templates
  // (transformers), tokenizes them with tiktoken / tokenizers and names the reference here.
  const char* path = std::getenv("TITAN_CHAT_REFERENCE");
  REQUIRE_MESSAGE(path != nullptr, "set TITAN_CHAT_REFERENCE (chat_parity.py does)");
  auto reference = nlohmann::json::parse(read_file(path));
  std::map<std::string, std::unique_ptr<Tokenizer>> tokenizers;
  int cases = 0, refused = 0;
  for (const auto& c : reference["cases"]) {
    INFO(c["name"].get<std::string>());
    const auto tokenizer_path = c["tokenizer_path"].get<std::string>();
    auto& tok = tokenizers[tokenizer_path];
    if (!tok) tok = load_tokenizer(tokenizer_path, c["tokenizer_kind"].get<std::string>());
    auto options = ChatOptions().format(c["format"].get<std::string>()).system(c["system"].get<std::string>());
    if (c.contains("date_string")) options.date(c["date_string"].get<std::string>());
    ++cases;
    if (c.contains("refused")) {  // the template raised: render_chat refuses the conversation too
      INFO("the template said: " << c["refused"].get<std::string>());
      CHECK_THROWS_AS(render_chat(chat_messages(c["messages"]), options, *tok), std::invalid_argument);
      ++refused;
      continue;
    }
    INFO("rendered by the template: " << c["rendered"].get<std::string>());
    auto t = render_chat(chat_messages(c["messages"]), options, *tok);
    CHECK(t.ids == c["ids"].get<std::vector<int64_t>>());
    CHECK(t.trained == c["trained"].get<std::vector<bool>>());
  }
  CHECK(cases >= 81);  // 11 conversations in 7 formats (llama3.1 with two dates) and 4 more in qwen3
  CHECK(refused >= 7);  // llama2: 3 out of turn; mistral: those and 1 opening with a system message
}
