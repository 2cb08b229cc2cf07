#pragma once
// titan/detail/enum_names.hpp: an enum's names as one {value, name} table, from which its name(),
// its parser and the parser's error (listing every name) all come.
//
//   inline const auto& rotate_method_names() {
//     static const detail::EnumNames<RotateMethod, 2> names{{{RotateMethod::AllGather, "allgather"}, ...}};
//     return names;
//   }
//   detail::enum_name(rotate_method_names(), RotateMethod::P2P);                  // "p2p"
//   detail::parse_enum(rotate_method_names(), "ring", "titan: unknown rotate method");
//     // error: titan: unknown rotate method 'ring' (expected one of: allgather, p2p)

#include <c10/util/Exception.h>

#include <array>
#include <string>
#include <utility>

namespace titan::detail {

/// Every value of enum E with its name, in the order the error messages list them.
template <typename E, size_t N>
using EnumNames = std::array<std::pair<E, const char*>, N>;

/// The names of `table`, comma-separated.
template <typename E, size_t N>
std::string enum_choices(const EnumNames<E, N>& table) {
  std::string text;
  for (const auto& entry : table) text += (text.empty() ? "" : ", ") + std::string(entry.second);
  return text;
}

/// The name of `value` in `table`.
template <typename E, size_t N>
std::string enum_name(const EnumNames<E, N>& table, E value) {
  for (const auto& [entry, name] : table)
    if (entry == value) return name;
  TORCH_CHECK(false, "titan: enum value ", static_cast<int>(value), " is missing from its name table");
}

/// The value named `name` in `table`; otherwise an error "`what` '`name`' (expected one of: ...)".
template <typename E, size_t N>
E parse_enum(const EnumNames<E, N>& table, const std::string& name, const char* what) {
  for (const auto& [value, entry] : table)
    if (name == entry) return value;
  TORCH_CHECK(false, what, " '", name, "' (expected one of: ", enum_choices(table), ")");
}

}  // namespace titan::detail
