#pragma once
// titan/detail/json.hpp: a small, strict JSON reader and writer (RFC 8259) for safetensors headers,
// model.safetensors.index.json, Hugging Face config.json and checkpoint metadata.
//
//   auto v = titan::json::parse(text, "config.json");      // errors name the source and byte offset
//   int64_t layers = v.at("num_hidden_layers").as_int();
//   titan::json::Value out = titan::json::Object{};
//   out["weight_map"]["tok_embeddings.weight"] = "model-00001-of-00002.safetensors";
//   std::string text = titan::json::dump(out, 2);
//   titan::json::save("index.json", out);  auto back = titan::json::load("index.json");
//
// Strict means: no comments, no trailing commas, no NaN/Infinity, no duplicate object keys, no
// control characters inside strings, nothing but whitespace after the value. Objects keep their
// insertion order (dump writes them back in that order). Numbers written without a fraction or
// exponent that fit in int64 are kept exactly as integers (safetensors byte offsets); others are
// doubles. Depends on the standard library and c10 (TORCH_CHECK) only.

#include <c10/util/Exception.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace titan::json {

class Value;
/// A JSON array.
using Array = std::vector<Value>;
/// A JSON object: key/value pairs in insertion order (keys are unique).
using Object = std::vector<std::pair<std::string, Value>>;

/// One JSON value: null, bool, integer, double, string, array or object.
class Value {
 public:
  /// The kinds of value; Int and Double are both JSON numbers.
  enum class Type { Null, Bool, Int, Double, String, Array, Object };

  Value() = default;
  Value(std::nullptr_t) {}
  Value(bool b) : data_(b) {}
  Value(int i) : data_(static_cast<int64_t>(i)) {}
  Value(int64_t i) : data_(i) {}
  Value(uint64_t i) : data_(static_cast<int64_t>(i)) {
    TORCH_CHECK(i <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "json: integer ", i, " too large");
  }
  Value(double d) : data_(d) { TORCH_CHECK(std::isfinite(d), "json: cannot represent non-finite number ", d); }
  Value(std::string s) : data_(std::move(s)) {}
  Value(const char* s) : data_(std::string(s)) {}
  Value(Array a) : data_(std::move(a)) {}
  Value(Object o) : data_(std::move(o)) {}

  /// The kind of value held.
  Type type() const { return static_cast<Type>(data_.index()); }
  bool is_null() const { return type() == Type::Null; }
  bool is_bool() const { return type() == Type::Bool; }
  /// True for integers and doubles.
  bool is_number() const { return type() == Type::Int || type() == Type::Double; }
  bool is_int() const { return type() == Type::Int; }
  bool is_string() const { return type() == Type::String; }
  bool is_array() const { return type() == Type::Array; }
  bool is_object() const { return type() == Type::Object; }

  /// The kind as a word, for messages ("string", "object", ...).
  const char* type_name() const {
    static const char* names[] = {"null", "bool", "integer", "number", "string", "array", "object"};
    return names[data_.index()];
  }

  bool as_bool() const { return get<bool>("a bool"); }
  /// The integer; a double with an integral value is accepted (e.g. 1e4 or 10000.0).
  int64_t as_int() const {
    if (const auto* d = std::get_if<double>(&data_)) {
      TORCH_CHECK(std::floor(*d) == *d && std::fabs(*d) < 9.2e18, "json: expected an integer, got ", *d);
      return static_cast<int64_t>(*d);
    }
    return get<int64_t>("an integer");
  }
  /// The number as a double (integers are converted).
  double as_double() const {
    if (const auto* i = std::get_if<int64_t>(&data_)) return static_cast<double>(*i);
    return get<double>("a number");
  }
  const std::string& as_string() const { return get<std::string>("a string"); }
  const Array& as_array() const { return get<Array>("an array"); }
  Array& as_array() { return get<Array>("an array"); }
  const Object& as_object() const { return get<Object>("an object"); }
  Object& as_object() { return get<Object>("an object"); }

  /// The member `key` of an object, or nullptr if absent.
  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : as_object())
      if (k == key) return &v;
    return nullptr;
  }
  /// True if this object has member `key`.
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  /// The member `key` of an object; a clear error if it is missing.
  const Value& at(std::string_view key) const {
    const Value* v = find(key);
    TORCH_CHECK(v != nullptr, "json: missing key \"", key, "\"");
    return *v;
  }
  /// The member `key`, inserted as null if absent; a null value becomes an empty object first.
  Value& operator[](std::string_view key) {
    if (is_null()) data_ = Object{};
    auto& object = as_object();
    for (auto& [k, v] : object)
      if (k == key) return v;
    object.emplace_back(std::string(key), Value());
    return object.back().second;
  }
  /// Appends to an array; a null value becomes an empty array first.
  void push_back(Value v) {
    if (is_null()) data_ = Array{};
    as_array().push_back(std::move(v));
  }
  /// Number of elements of an array or members of an object.
  size_t size() const { return is_array() ? as_array().size() : as_object().size(); }

 private:
  template <typename T>
  const T& get(const char* what) const {
    const T* p = std::get_if<T>(&data_);
    TORCH_CHECK(p != nullptr, "json: expected ", what, ", got ", type_name());
    return *p;
  }
  template <typename T>
  T& get(const char* what) {
    T* p = std::get_if<T>(&data_);
    TORCH_CHECK(p != nullptr, "json: expected ", what, ", got ", type_name());
    return *p;
  }

  std::variant<std::nullptr_t, bool, int64_t, double, std::string, Array, Object> data_{nullptr};
};

namespace detail {

class Parser {
 public:
  Parser(std::string_view text, const std::string& source) : text_(text), source_(source) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != text_.size()) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  static constexpr int kMaxDepth = 512;

  [[noreturn]] void fail(const std::string& what) const {
    TORCH_CHECK(false, source_, ": invalid JSON at byte ", pos_, ": ", what);
  }
  void skip_ws() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r'))
      ++pos_;
  }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  void expect(char c) {
    if (pos_ >= text_.size() || text_[pos_] != c) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  void literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal");
    pos_ += word.size();
  }

  Value parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 512 levels");
    if (pos_ >= text_.size()) fail("unexpected end of input");
    switch (text_[pos_]) {
      case '{': return parse_object(depth);
      case '[': return parse_array(depth);
      case '"': return Value(parse_string());
      case 't': literal("true"); return Value(true);
      case 'f': literal("false"); return Value(false);
      case 'n': literal("null"); return Value();
      default: return parse_number();
    }
  }

  Value parse_object(int depth) {
    expect('{');
    Object object;
    skip_ws();
    if (peek() == '}') {
      ++pos_;
      return Value(std::move(object));
    }
    while (true) {
      skip_ws();
      if (peek() != '"') fail("expected a string key");
      size_t key_pos = pos_;
      std::string key = parse_string();
      for (const auto& member : object)
        if (member.first == key) {
          pos_ = key_pos;
          fail("duplicate key \"" + key + "\"");
        }
      skip_ws();
      expect(':');
      skip_ws();
      object.emplace_back(std::move(key), parse_value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect('}');
      return Value(std::move(object));
    }
  }

  Value parse_array(int depth) {
    expect('[');
    Array array;
    skip_ws();
    if (peek() == ']') {
      ++pos_;
      return Value(std::move(array));
    }
    while (true) {
      skip_ws();
      array.push_back(parse_value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      expect(']');
      return Value(std::move(array));
    }
  }

  unsigned hex4() {
    if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      char c = text_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') code |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') code |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') code |= static_cast<unsigned>(c - 'A' + 10);
      else fail("invalid hex digit in \\u escape");
    }
    return code;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) fail("unterminated string");
      char c = text_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) {
        --pos_;
        fail("control character in string");
      }
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= text_.size()) fail("unterminated escape");
      char e = text_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (text_.substr(pos_, 2) != "\\u") fail("unpaired high surrogate");
            pos_ += 2;
            unsigned low = hex4();
            if (low < 0xDC00 || low > 0xDFFF) fail("invalid low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            fail("unpaired low surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default: --pos_; fail("invalid escape");
      }
    }
  }

  Value parse_number() {
    size_t start = pos_;
    auto digits = [&] {
      size_t from = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ - from;
    };
    if (peek() == '-') ++pos_;
    if (peek() == '0') {
      ++pos_;
    } else if (digits() == 0) {
      pos_ = start;
      fail("invalid value");
    }
    bool integral = true;
    if (peek() == '.') {
      ++pos_;
      integral = false;
      if (digits() == 0) fail("expected digits after '.'");
    }
    if (peek() == 'e' || peek() == 'E') {
      ++pos_;
      integral = false;
      if (peek() == '+' || peek() == '-') ++pos_;
      if (digits() == 0) fail("expected digits in exponent");
    }
    std::string token(text_.substr(start, pos_ - start));
    if (integral) {
      errno = 0;
      char* end = nullptr;
      long long v = std::strtoll(token.c_str(), &end, 10);
      if (errno == 0 && end == token.c_str() + token.size()) return Value(static_cast<int64_t>(v));
    }
    double d = std::strtod(token.c_str(), nullptr);
    if (!std::isfinite(d)) fail("number out of range: " + token);
    return Value(d);
  }

  std::string_view text_;
  const std::string& source_;
  size_t pos_ = 0;
};

inline void dump_string(std::string& out, const std::string& s) {
  out += '"';
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          out += buf;
        } else {
          out += c;
        }
    }
  }
  out += '"';
}

/// The shortest decimal text that reads back as `d`, with ".0" added to integral values so the
/// value stays a float for readers that distinguish (Python's json).
inline std::string format_double(double d) {
  char buf[32];
  for (int precision = 15; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  std::string text(buf);
  if (text.find_first_of(".eEn") == std::string::npos) text += ".0";
  return text;
}

inline void dump_value(std::string& out, const Value& v, int indent, int level) {
  auto newline = [&](int lvl) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent * lvl), ' ');
  };
  switch (v.type()) {
    case Value::Type::Null: out += "null"; break;
    case Value::Type::Bool: out += v.as_bool() ? "true" : "false"; break;
    case Value::Type::Int: out += std::to_string(v.as_int()); break;
    case Value::Type::Double: out += format_double(v.as_double()); break;
    case Value::Type::String: dump_string(out, v.as_string()); break;
    case Value::Type::Array: {
      const auto& array = v.as_array();
      out += '[';
      for (size_t i = 0; i < array.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_value(out, array[i], indent, level + 1);
      }
      if (!array.empty()) newline(level);
      out += ']';
      break;
    }
    case Value::Type::Object: {
      const auto& object = v.as_object();
      out += '{';
      for (size_t i = 0; i < object.size(); ++i) {
        if (i) out += ',';
        newline(level + 1);
        dump_string(out, object[i].first);
        out += indent < 0 ? ":" : ": ";
        dump_value(out, object[i].second, indent, level + 1);
      }
      if (!object.empty()) newline(level);
      out += '}';
      break;
    }
  }
}

}  // namespace detail

/// Parses `text` as one JSON value. Errors read "<source>: invalid JSON at byte N: <what>".
inline Value parse(std::string_view text, const std::string& source = "JSON") {
  return detail::Parser(text, source).parse_document();
}

/// Writes `value` as JSON: compact when indent < 0, else pretty-printed with `indent` spaces.
inline std::string dump(const Value& value, int indent = -1) {
  std::string out;
  detail::dump_value(out, value, indent, 0);
  return out;
}

/// Reads and parses the JSON file at `path` (errors name the file).
inline Value load(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  TORCH_CHECK(f != nullptr, "json: cannot open ", path, ": ", std::strerror(errno));
  std::string text;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, n);
  bool failed = std::ferror(f) != 0;
  std::fclose(f);
  TORCH_CHECK(!failed, "json: cannot read ", path);
  return parse(text, path);
}

/// Writes `value` to the file at `path` (dump with `indent`, then a newline).
inline void save(const std::string& path, const Value& value, int indent = 2) {
  const std::string text = dump(value, indent) + "\n";
  std::FILE* f = std::fopen(path.c_str(), "wb");
  TORCH_CHECK(f != nullptr, "json: cannot create ", path, ": ", std::strerror(errno));
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = (std::fclose(f) == 0) && ok;
  TORCH_CHECK(ok, "json: cannot write ", path);
}

}  // namespace titan::json
