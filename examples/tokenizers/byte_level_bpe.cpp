#include "byte_level_bpe.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <stdexcept>

namespace titan::examples::bpe {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 when none starts there; `*consumed` is then the
// length of the maximal invalid subpart to replace by one U+FFFD (Unicode's "maximal subpart"
// practice, which Python's bytes.decode("utf-8", "replace") follows).
size_t utf8_sequence(std::string_view s, size_t i, size_t* consumed) {
  const auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char b = byte(i);
  if (b < 0x80) return 1;
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b >= 0xE0 && b <= 0xEF) {
    need = 2;
    if (b == 0xE0) lo = 0xA0;  // no overlong forms
    if (b == 0xED) hi = 0x9F;  // no surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    need = 3;
    if (b == 0xF0) lo = 0x90;  // no overlong forms
    if (b == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    *consumed = 1;
    return 0;
  }
  for (size_t k = 1; k <= need; ++k) {
    const bool ok = i + k < s.size() && byte(i + k) >= (k == 1 ? lo : 0x80) && byte(i + k) <= (k == 1 ? hi : 0xBF);
    if (!ok) {
      *consumed = k;
      return 0;
    }
  }
  return need + 1;
}

}  // namespace

std::string_view repair_utf8(std::string_view text, std::string& storage) {
  size_t i = 0, consumed = 0;
  while (i < text.size()) {
    const size_t n = utf8_sequence(text, i, &consumed);
    if (n == 0) break;
    i += n;
  }
  if (i == text.size()) return text;
  storage.assign(text.substr(0, i));
  while (i < text.size()) {
    const size_t n = utf8_sequence(text, i, &consumed);
    if (n == 0) {
      storage += "\xEF\xBF\xBD";
      i += consumed;
    } else {
      storage.append(text.substr(i, n));
      i += n;
    }
  }
  return storage;
}


struct RegexSplitter::Code {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Code() { pcre2_code_free(code); }
};

namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  pcre2_get_error_message(code, buffer, sizeof(buffer));
  return reinterpret_cast<const char*>(buffer);
}

}  // namespace

RegexSplitter::RegexSplitter(const std::string& pattern, std::string owner)
    : code_(std::make_unique<Code>()), owner_(std::move(owner)) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                              &error, &offset, nullptr);
  if (code_->code == nullptr) {
    throw std::invalid_argument(owner_ + ": pattern does not compile at offset " + std::to_string(offset) + ": " +
                                pcre2_message(error));
  }
  code_->jit = pcre2_jit_compile(code_->code, PCRE2_JIT_COMPLETE) == 0;
}

RegexSplitter::~RegexSplitter() = default;

void RegexSplitter::for_each_match(std::string_view text, const std::function<void(std::string_view)>& match) const {
  if (text.empty()) return;
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
      pcre2_match_data_create_from_pattern(code_->code, nullptr), &pcre2_match_data_free);
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start < text.size()) {
    const int rc = code_->jit ? pcre2_jit_match(code_->code, subject, text.size(), start, 0, data.get(), nullptr)
                              : pcre2_match(code_->code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, data.get(),
                                            nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) throw std::runtime_error(owner_ + ": pre-tokenization failed: " + pcre2_message(rc));
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data.get());
    const size_t begin = ovector[0], end = ovector[1];
    if (end == begin) {  // an empty match: step over one character
      size_t next = begin + 1;
      while (next < text.size() && (static_cast<unsigned char>(text[next]) & 0xC0) == 0x80) ++next;
      start = next;
      continue;
    }
    match(text.substr(begin, end - begin));
    start = end;
  }
}

}  // namespace titan::examples::bpe
