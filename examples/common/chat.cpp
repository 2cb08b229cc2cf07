#include "chat.hpp"

#include "strings.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <stdexcept>
#include <string_view>
#include <utility>

namespace titan::examples {
namespace {

/// A stretch of the rendered conversation: text, or one special token written by its text.
struct Piece {
  std::string text;
  bool special = false;
  bool trained = false;
};

/// The code point starting at `text[at]` and its length in bytes (a malformed byte is itself).
std::pair<char32_t, size_t> code_point(std::string_view text, size_t at) {
  const auto byte = static_cast<unsigned char>(text[at]);
  const size_t length = byte < 0x80 ? 1 : (byte >> 5) == 0x6 ? 2 : (byte >> 4) == 0xE ? 3 : (byte >> 3) == 0x1E ? 4 : 1;
  if (length == 1 || at + length > text.size()) return {byte, 1};
  char32_t value = byte & (0x7F >> length);
  for (size_t k = 1; k < length; ++k) value = (value << 6) | (static_cast<unsigned char>(text[at + k]) & 0x3F);
  return {value, length};
}

/// Python's str.isspace(), which jinja's `trim` filter strips.
bool python_space(char32_t c) {
  return (c >= 0x9 && c <= 0xD) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/// `text` without leading and trailing Python whitespace (jinja's `trim`).
std::string python_strip(std::string_view text) {
  size_t begin = 0, end = 0;
  bool seen = false;
  for (size_t at = 0; at < text.size();) {
    auto [c, length] = code_point(text, at);
    if (!python_space(c)) {
      if (!seen) begin = at;
      seen = true;
      end = at + length;
    }
    at += length;
  }
  return seen ? std::string(text.substr(begin, end - begin)) : std::string();
}

/// `text` without the newlines at its start (`front`) and / or end (`back`): Python's strip('\n').
std::string strip_newlines(std::string_view text, bool front, bool back) {
  size_t begin = 0, end = text.size();
  while (front && begin < end && text[begin] == '\n') ++begin;
  while (back && end > begin && text[end - 1] == '\n') --end;
  return std::string(text.substr(begin, end - begin));
}

/// Builds a conversation's pieces.
class Pieces {
 public:
  Pieces& special(std::string text, bool trained = false) {
    pieces_.push_back(Piece{std::move(text), true, trained});
    return *this;
  }
  /// Text right after text of the same kind extends it: a run's pieces then alternate between
  /// trained and not, and only their borders need locating.
  Pieces& text(std::string text, bool trained = false) {
    if (text.empty()) return *this;
    if (!pieces_.empty() && !pieces_.back().special && pieces_.back().trained == trained)
      pieces_.back().text += text;
    else
      pieces_.push_back(Piece{std::move(text), false, trained});
    return *this;
  }
  std::vector<Piece> take() { return std::move(pieces_); }

 private:
  std::vector<Piece> pieces_;
};

/// Whether the conversation opens with a system message (the templates treat that one apart).
bool opens_with_system(const std::vector<ChatMessage>& messages) {
  return !messages.empty() && messages.front().role == "system";
}

/// One Llama 3 message: <|start_header_id|>{role}<|end_header_id|>\n\n{body}<|eot_id|>, the body
/// and <|eot_id|> trained for the assistant.
void llama3_turn(Pieces& out, const std::string& role, std::string body) {
  const bool assistant = role == "assistant";
  out.special("<|start_header_id|>").text(role).special("<|end_header_id|>").text("\n\n");
  out.text(std::move(body), assistant).special("<|eot_id|>", assistant);
}

/// Meta-Llama-3-8B-Instruct's template.
std::vector<Piece> llama3(const std::vector<ChatMessage>& messages) {
  Pieces out;
  for (const auto& message : messages) llama3_turn(out, message.role, python_strip(message.content));
  return out.take();
}

/// Llama 3.1-3.3 Instruct's template (without tools): a system message always, opening with the
/// knowledge cutoff and `date`, then the first system message's content stripped; the others as
/// Llama 3's.
std::vector<Piece> llama31(const std::vector<ChatMessage>& messages, const std::string& date) {
  const bool has_system = opens_with_system(messages);
  Pieces out;
  llama3_turn(out, "system",
              "Cutting Knowledge Date: December 2023\nToday Date: " + date + "\n\n" +
                  (has_system ? python_strip(messages[0].content) : std::string()));
  for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i)
    llama3_turn(out, messages[i].role, python_strip(messages[i].content));
  return out.take();
}

/// One ChatML turn: <|im_start|>{role}\n{body}<|im_end|>\n, the body and <|im_end|> trained for
/// the assistant.
void chatml_turn(Pieces& out, const std::string& role, std::string body) {
  const bool assistant = role == "assistant";
  out.special("<|im_start|>").text(role + "\n").text(std::move(body), assistant);
  out.special("<|im_end|>", assistant).text("\n");
}

/// Qwen2.5-Instruct's template (without tools; the default system message is the caller's).
std::vector<Piece> chatml(const std::vector<ChatMessage>& messages) {
  Pieces out;
  for (const auto& message : messages) chatml_turn(out, message.role, message.content);
  return out.take();
}

/// Qwen3's template (without tools).
std::vector<Piece> qwen3(const std::vector<ChatMessage>& messages) {
  const int64_t count = static_cast<int64_t>(messages.size());
  int64_t last_query = count - 1;  // the last user message that is not a wrapped tool response
  for (int64_t i = count - 1; i >= 0; --i) {
    const auto& content = messages[i].content;
    if (messages[i].role == "user" && !(starts_with(content, "<tool_response>") && ends_with(content, "</tool_response>"))) {
      last_query = i;
      break;
    }
  }
  Pieces out;
  for (int64_t i = 0; i < count; ++i) {
    const auto& message = messages[i];
    if (message.role != "assistant") {
      chatml_turn(out, message.role, message.content);
      continue;
    }
    std::string content = message.content, reasoning;
    if (message.reasoning) {
      reasoning = *message.reasoning;
    } else if (auto close = content.find("</think>"); close != std::string::npos) {
      // content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n'), and the rest
      std::string before = strip_newlines(std::string_view(content).substr(0, close), false, true);
      auto open = before.rfind("<think>");
      reasoning = strip_newlines(open == std::string::npos ? before : before.substr(open + 7), true, false);
      content = strip_newlines(std::string_view(content).substr(content.rfind("</think>") + 8), true, false);
    }
    if (i > last_query && (i == count - 1 || !reasoning.empty())) {
      chatml_turn(out, message.role,
                  "<think>\n" + strip_newlines(reasoning, true, true) + "\n</think>\n\n" +
                      strip_newlines(content, true, false));
    } else {
      chatml_turn(out, message.role, content);
    }
  }
  return out.take();
}

/// Llama 2's and Mistral's templates raise unless the messages, after a first system message where
/// the format has one, are user and assistant messages in turn, starting with the user.
void check_turns(const std::vector<ChatMessage>& messages, const std::string& format, bool system_first) {
  const size_t first = system_first && opens_with_system(messages) ? 1 : 0;
  for (size_t i = first; i < messages.size(); ++i) {
    const std::string expected = (i - first) % 2 == 0 ? "user" : "assistant";
    if (messages[i].role != expected)
      throw std::invalid_argument("message " + std::to_string(i) + " is a " + messages[i].role + " message where the " +
                                  format + " chat format expects " + expected + " (its template takes " +
                                  (system_first ? "an optional first system message, then " : "") +
                                  "user and assistant messages in turn)");
  }
}

/// Llama-2-chat's template (meta-llama/Llama-2-13b-chat-hf): <s>[INST] {user, stripped} [/INST]
/// {answer, stripped} </s> per exchange, a first system message inside the first [INST] as
/// <<SYS>>\n{system}\n<</SYS>>\n\n. The first <s> is the data loader's BOS.
std::vector<Piece> llama2(const std::vector<ChatMessage>& messages) {
  const bool has_system = opens_with_system(messages);
  const size_t first = has_system ? 1 : 0;
  Pieces out;
  for (size_t i = first; i < messages.size(); ++i) {
    const auto& message = messages[i];
    if (message.role == "user") {
      if (i != first) out.special("<s>");
      const std::string content = i == first && has_system
                                      ? "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + message.content
                                      : message.content;
      out.text("[INST] " + python_strip(content) + " [/INST]");
    } else {
      out.text(" " + python_strip(message.content) + " ", true).special("</s>", true);
    }
  }
  return out.take();
}

/// Mixtral-8x7B-Instruct-v0.1's template: <s>[INST] {user} [/INST]{answer}</s> per exchange, the
/// contents as written, no system message. The <s> is the data loader's BOS.
std::vector<Piece> mistral(const std::vector<ChatMessage>& messages) {
  Pieces out;
  for (const auto& message : messages) {
    if (message.role == "user")
      out.text("[INST] " + message.content + " [/INST]");
    else
      out.text(message.content, true).special("</s>", true);
  }
  return out.take();
}

/// render_chat's formats in order, each with the pieces of a conversation in it: the one list of
/// the format names (data.chat_format's choices, the unknown format's error).
using Renderer = std::vector<Piece> (*)(const std::vector<ChatMessage>&, const ChatOptions&);
const std::vector<std::pair<std::string, Renderer>>& renderers() {
  using Messages = std::vector<ChatMessage>;
  static const std::vector<std::pair<std::string, Renderer>> table = {
      {"llama3", [](const Messages& m, const ChatOptions&) { return llama3(m); }},
      {"llama3.1", [](const Messages& m, const ChatOptions& o) { return llama31(m, o.date()); }},
      {"chatml", [](const Messages& m, const ChatOptions&) { return chatml(m); }},
      {"qwen3", [](const Messages& m, const ChatOptions&) { return qwen3(m); }},
      {"llama2", [](const Messages& m, const ChatOptions&) { return llama2(m); }},
      {"mistral", [](const Messages& m, const ChatOptions&) { return mistral(m); }},
  };
  return table;
}

}  // namespace

const std::vector<std::string>& chat_formats() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    for (const auto& entry : renderers()) out.push_back(entry.first);
    return out;
  }();
  return names;
}

std::vector<ChatMessage> chat_messages(const nlohmann::json& messages) {
  if (!messages.is_array() || messages.empty())
    throw std::invalid_argument("\"messages\" is not a non-empty array of {\"role\", \"content\"} objects");
  std::vector<ChatMessage> out;
  bool assistant = false;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& message = messages[i];
    const std::string where = "message " + std::to_string(i);
    if (!message.is_object()) throw std::invalid_argument(where + " is not a JSON object");
    if (!message.contains("role") || !message["role"].is_string())
      throw std::invalid_argument(where + " has no string \"role\"");
    ChatMessage parsed;
    parsed.role = message["role"].get<std::string>();
    if (parsed.role != "system" && parsed.role != "user" && parsed.role != "assistant")
      throw std::invalid_argument(where + " has the role \"" + parsed.role +
                                  "\"; expected \"system\", \"user\" or \"assistant\" (tool calls are not supported)");
    if (!message.contains("content") || !message["content"].is_string())
      throw std::invalid_argument(where + " (" + parsed.role + ") has no string \"content\"");
    parsed.content = message["content"].get<std::string>();
    if (message.contains("reasoning_content") && !message["reasoning_content"].is_null()) {
      if (parsed.role != "assistant" || !message["reasoning_content"].is_string())
        throw std::invalid_argument(where + ": \"reasoning_content\" must be a string of an assistant message");
      parsed.reasoning = message["reasoning_content"].get<std::string>();
    }
    assistant = assistant || parsed.role == "assistant";
    out.push_back(std::move(parsed));
  }
  if (!assistant) throw std::invalid_argument("no assistant message (nothing to train on)");
  return out;
}

ChatTokens render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options,
                       const Tokenizer& tokenizer) {
  std::vector<ChatMessage> conversation;
  if (!options.system().empty() && !opens_with_system(messages))
    conversation.push_back(ChatMessage{"system", options.system(), std::nullopt});
  conversation.insert(conversation.end(), messages.begin(), messages.end());
  const auto& format = options.format();
  if (format != "qwen3") {
    for (const auto& message : conversation)
      if (message.reasoning)
        throw std::invalid_argument("an assistant message has \"reasoning_content\", which only the qwen3 chat format "
                                    "renders (this is " + format + ")");
  }
  if (format == "llama2") check_turns(conversation, format, true);
  if (format == "mistral") {
    if (!options.system().empty())
      throw std::invalid_argument("the mistral chat format has no system message (its template refuses one); "
                                  "leave the default system message (data.chat_system) empty");
    check_turns(conversation, format, false);
  }
  const auto& table = renderers();
  const auto renderer =
      std::find_if(table.begin(), table.end(), [&format](const auto& entry) { return entry.first == format; });
  if (renderer == table.end())
    throw std::invalid_argument("unknown chat format '" + format + "' (expected one of: " + join(chat_formats()) + ")");
  const std::vector<Piece> pieces = renderer->second(conversation, options);

  ChatTokens out;
  for (size_t i = 0; i < pieces.size();) {
    if (pieces[i].special) {
      int64_t id;
      try {
        id = tokenizer.token_id(pieces[i].text);
      } catch (const std::invalid_argument& e) {
        throw std::invalid_argument("the " + format + " chat format needs the special token " + pieces[i].text +
                                    ", which the tokenizer does not have (" + e.what() + ")");
      }
      out.ids.push_back(id);
      out.trained.push_back(pieces[i].trained);
      ++i;
      continue;
    }
    // A run of text between special tokens, tokenized whole (as the tokenizer splits the rendered
    // string); each token is trained as the piece its first byte comes from.
    std::string run;
    std::vector<size_t> piece_ends;  // decoded bytes up to the end of each piece but the run's last
    std::vector<bool> piece_trained;
    for (; i < pieces.size() && !pieces[i].special; ++i) {
      if (!run.empty()) piece_ends.push_back(tokenizer.decode(tokenizer.encode(run, false, false)).size());
      run += pieces[i].text;
      piece_trained.push_back(pieces[i].trained);
    }
    const auto ids = tokenizer.encode(run, false, false);
    const auto starts = tokenizer.decoded_starts(ids);
    size_t piece = 0;
    for (size_t k = 0; k < ids.size(); ++k) {
      while (piece < piece_ends.size() && starts[k] >= piece_ends[piece]) ++piece;
      out.ids.push_back(ids[k]);
      out.trained.push_back(piece_trained[piece]);
    }
  }
  return out;
}

}  // namespace titan::examples
