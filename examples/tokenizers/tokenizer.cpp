#include "tokenizer.hpp"

#include <fstream>
#include <stdexcept>

#include "hf_bpe.hpp"
#include "sentencepiece.hpp"
#include "tiktoken.hpp"

namespace titan::examples {

std::vector<size_t> Tokenizer::decoded_starts(const std::vector<int64_t>& ids) const {
  std::vector<size_t> starts;
  starts.reserve(ids.size());
  size_t at = 0;
  for (const int64_t id : ids) {
    starts.push_back(at);
    at += decode({id}).size();
  }
  return starts;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path, const std::string& kind) {
  if (kind != "tiktoken" && kind != "huggingface" && kind != "sentencepiece") {
    throw std::invalid_argument("unknown tokenizer kind '" + kind + "' for '" + path +
                                "' (expected \"tiktoken\" for Llama 3's tokenizer.model, \"huggingface\" for a "
                                "byte-level BPE tokenizer.json such as Qwen3's, or \"sentencepiece\" for Llama 2 / Mistral)");
  }
  if (!std::ifstream(path)) {
    throw std::runtime_error(kind + " tokenizer file '" + path + "' does not exist or cannot be read");
  }
  if (kind == "tiktoken") return std::make_unique<TiktokenTokenizer>(path);
  if (kind == "huggingface") return std::make_unique<HfBpeTokenizer>(path);
  return std::make_unique<SentencePieceTokenizer>(path);
}

}  // namespace titan::examples
