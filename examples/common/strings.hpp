#pragma once
// Small string helpers the example code shares (C++17 has no starts_with / ends_with).

#include <string>
#include <string_view>
#include <vector>

namespace titan::examples {

/// Whether `text` begins with `prefix`.
inline bool starts_with(std::string_view text, std::string_view prefix) {
  return text.substr(0, prefix.size()) == prefix;
}

/// Whether `text` ends with `suffix`.
inline bool ends_with(std::string_view text, std::string_view suffix) {
  return text.size() >= suffix.size() && text.substr(text.size() - suffix.size()) == suffix;
}

/// `words` joined by `separator` ("a, b, c"): the list of choices an error message names.
inline std::string join(const std::vector<std::string>& words, const char* separator = ", ") {
  std::string out;
  for (size_t i = 0; i < words.size(); ++i) out += (i ? separator : "") + words[i];
  return out;
}

}  // namespace titan::examples
