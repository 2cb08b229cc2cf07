#include "tokenizer.hpp"

#include <fstream>
#include <stdexcept>

#include "sentencepiece.hpp"
#include "tiktoken.hpp"

namespace titan::examples {

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, const std::string& kind) {
  if (kind != "tiktoken" && kind != "sentencepiece") {
    throw std::invalid_argument("unknown tokenizer kind '" + kind + "' for '" + path +
                                "' (expected \"tiktoken\" for Llama 3 or \"sentencepiece\" for Llama 2 / Mistral)");
  }
  if (!std::ifstream(path)) {
    throw std::runtime_error(kind + " tokenizer file '" + path + "' does not exist or cannot be read");
  }
  if (kind == "tiktoken") return std::make_unique<TiktokenTokenizer>(path);
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace titan::examples
