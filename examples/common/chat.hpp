#pragma once
// Conversations for instruction tuning: the chat formats of Llama 3 and 3.1-3.3 Instruct, Qwen2.5
// Instruct (ChatML), Qwen3, Llama 2 chat and Mistral Instruct, rendered straight to token ids with
// a mask of the tokens the model is trained to write (assistant turns), as the models' own chat
// templates lay them out.
//
// API summary
//   auto messages = chat_messages(json["messages"]);      // std::invalid_argument naming the problem
//   ChatTokens t = render_chat(messages, ChatOptions().format("qwen3"), tokenizer);
//   t.ids       // the template's tokens (without the tokenizer's BOS: the data loader adds it)
//   t.trained   // true for each assistant turn's text and its end-of-turn token
//
// Formats (ChatOptions::format), each the text its Hugging Face chat template writes for a
// conversation of system / user / assistant messages (no tools):
//   "llama3"  Meta-Llama-3-8B-Instruct: <|start_header_id|>{role}<|end_header_id|>\n\n{content,
//             stripped}<|eot_id|> per message
//   "llama3.1" Llama 3.1-3.3 Instruct (Llama-3.2-3B-Instruct's template): Llama 3's, with a
//             system message always written first: "Cutting Knowledge Date: December 2023\nToday
//             Date: {ChatOptions::date}\n\n" and the first system message's content, stripped
//             (3.1 and 3.3 write "26 Jul 2024", 3.2 today's date unless told one)
//   "chatml"  Qwen2.5-Instruct: <|im_start|>{role}\n{content}<|im_end|>\n per message (Qwen2.5's
//             template adds the system message "You are Qwen, created by Alibaba Cloud. You are a
//             helpful assistant." to a conversation without one: set ChatOptions::system to it)
//   "qwen3"   Qwen3: ChatML where the assistant turns after the last user message carry their
//             reasoning as <think>\n{reasoning}\n</think>\n\n (empty for the last turn without one),
//             earlier turns drop it; reasoning comes from "reasoning_content" or from a content of
//             the form "<think>...</think>..."
//   "llama2"  Llama-2-chat (meta-llama/Llama-2-13b-chat-hf): <s>[INST] {user, stripped} [/INST]
//             {answer, stripped} </s> per exchange; a first system message opens the first user
//             message as <<SYS>>\n{system}\n<</SYS>>\n\n
//   "mistral" Mixtral-8x7B-Instruct-v0.1: <s>[INST] {user} [/INST]{answer}</s> per exchange, no
//             system message
// llama2 and mistral take user and assistant messages in turn (after llama2's optional first
// system message), as their templates do; their <s> before the first [INST] is the loader's BOS.
// A conversation without a system message gets ChatOptions::system first, when set (any format).
// Trained: every assistant turn from its first token after the generation prompt (what the model
// writes once the template has written "<|im_start|>assistant\n", the header or "[/INST]") through
// its end-of-turn token. The template's text is tokenized run by run between special tokens, as the
// tokenizer does with the whole rendered string; special-token text inside a message stays text.

#include "../tokenizers/tokenizer.hpp"

#include <nlohmann/json_fwd.hpp>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace titan::examples {

/// One message of a conversation.
struct ChatMessage {
  std::string role;                      ///< "system", "user" or "assistant"
  std::string content;                   ///< its text
  std::optional<std::string> reasoning;  ///< "reasoning_content" of an assistant message (qwen3)
};

/// The messages of a JSON array of {"role", "content", "reasoning_content" (optional)} objects;
/// std::invalid_argument naming the message and what was wrong (an unknown role, a content that
/// is not a string, no assistant message).
std::vector<ChatMessage> chat_messages(const nlohmann::json& messages);

/// Which chat format, and the system message of a conversation that has none.
struct ChatOptions {
  TORCH_ARG(std::string, format) = "llama3";  ///< "llama3", "llama3.1", "chatml", "qwen3", "llama2" or "mistral"
  TORCH_ARG(std::string, system) = "";        ///< system message of a conversation without one ("": none)
  TORCH_ARG(std::string, date) = "26 Jul 2024";  ///< llama3.1's "Today Date" (the templates' default)
};

/// A rendered conversation.
struct ChatTokens {
  std::vector<int64_t> ids;   ///< token ids, without BOS
  std::vector<bool> trained;  ///< [ids.size()] true where the model is trained to write the token
};

/// The token ids of `messages` in `options.format()`, with the trained mask. The format's special
/// tokens must be whole tokens of `tokenizer` (std::invalid_argument naming the first missing one:
/// for example llama3's <|start_header_id|> in a SentencePiece tokenizer). Messages a format's
/// template refuses (llama2 and mistral: roles out of turn; mistral: a system message) are
/// std::invalid_argument naming the message.
ChatTokens render_chat(const std::vector<ChatMessage>& messages, const ChatOptions& options,
                       const Tokenizer& tokenizer);

/// The formats render_chat knows, in order: llama3, llama3.1, chatml, qwen3, llama2, mistral.
const std::vector<std::string>& chat_formats();

}  // namespace titan::examples
