#pragma once
// Command-line options of the benchmarks: "--name value" pairs and bare "--flag"s.
#include <cstdint>
#include <cstring>
#include <string>

namespace titan_bench {

/// The value after `name` on the command line, else `fallback`.
inline std::string text_arg(int argc, char** argv, const char* name, const std::string& fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return argv[i + 1];
  return fallback;
}

/// The integer after `name` on the command line, else `fallback`.
inline int64_t int_arg(int argc, char** argv, const char* name, int64_t fallback) {
  const auto text = text_arg(argc, argv, name, "");
  return text.empty() ? fallback : std::stoll(text);
}

/// Whether `name` is on the command line.
inline bool has_flag(int argc, char** argv, const char* name) {
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return true;
  return false;
}

}  // namespace titan_bench
