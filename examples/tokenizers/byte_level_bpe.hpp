#pragma once
// The machinery the byte-level BPE tokenizers share (tiktoken.cpp: Llama 3's tokenizer.model;
// hf_bpe.cpp: Hugging Face tokenizer.json): repairing invalid UTF-8, splitting text with a PCRE2
// pattern, and BPE's merge loop. Internal to titan_tokenizers.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace titan::examples::bpe {

/// No merge: the rank of a pair that never merges.
inline constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();

/// `text`, or a copy in `storage` with each maximal invalid UTF-8 subpart replaced by U+FFFD, as
/// Python's bytes.decode("utf-8", "replace") does.
std::string_view repair_utf8(std::string_view text, std::string& storage);

/// A PCRE2 pattern (UTF + UCP mode, JIT-compiled where PCRE2 can) that splits valid UTF-8 text.
class RegexSplitter {
 public:
  /// Compiles `pattern`; `owner` names the tokenizer (and file) in errors.
  RegexSplitter(const std::string& pattern, std::string owner);
  ~RegexSplitter();
  RegexSplitter(const RegexSplitter&) = delete;
  RegexSplitter& operator=(const RegexSplitter&) = delete;

  /// Calls `match` with each non-empty match of valid UTF-8 `text`, left to right (an empty match
  /// steps over one character). Safe to call from several threads.
  void for_each_match(std::string_view text, const std::function<void(std::string_view)>& match) const;

 private:
  struct Code;
  std::unique_ptr<Code> code_;
  std::string owner_;
};

/// BPE's merge loop over parts 0..n-1 in a row: while some adjacent pair has a rank, merge the pair
/// of lowest rank (the leftmost on ties) into its left part. `rank(left, right, after)` is the rank
/// of merging part `left` with the part `right` after it (`after`: the part after `right`, n at the
/// end), kNoRank where they never merge; `merged(left, right)` is told each merge. A heap of
/// (rank, part) makes it O(n log n) in the parts (a long run of spaces is one piece). Returns
/// `next`, the part after each surviving part: visit them as `for (k = 0; k < n; k = next[k])`.
template <typename Rank, typename Merged>
std::vector<size_t> merge_lowest_rank_first(size_t n, Rank rank, Merged merged) {
  std::vector<size_t> next(n), prev(n);  // neighbouring parts; next == n: last part, prev == n: first
  for (size_t k = 0; k < n; ++k) {
    next[k] = k + 1;
    prev[k] = k == 0 ? n : k - 1;
  }
  std::vector<uint32_t> pair_rank(n, kNoRank);  // rank of part k merged with part next[k]
  using Candidate = std::pair<uint32_t, size_t>;  // (rank, part): the smallest is merged first
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
  const auto update = [&](size_t k) {
    const size_t right = next[k];
    pair_rank[k] = right == n ? kNoRank : rank(k, right, next[right]);
    if (pair_rank[k] != kNoRank) heap.emplace(pair_rank[k], k);
  };
  for (size_t k = 0; k < n; ++k) update(k);
  std::vector<bool> absorbed(n, false);  // part k was merged into its left neighbour
  while (!heap.empty()) {
    const auto [r, k] = heap.top();
    heap.pop();
    // Stale entries: a part that no longer exists or whose pair changed. (A pair at k with an
    // unchanged rank is the same merge: a rank names one merge.)
    if (absorbed[k] || pair_rank[k] != r) continue;
    const size_t right = next[k];
    merged(k, right);
    absorbed[right] = true;
    next[k] = next[right];
    if (next[k] != n) prev[next[k]] = k;
    update(k);
    if (prev[k] != n) update(prev[k]);
  }
  return next;
}

/// Cuts `text` at the tokens of `tokens` it holds (added or special tokens), leftmost first and the
/// longest where several start at one place; `first_bytes`: the bytes they start with.
/// `take(k, at)` says whether token k found at byte `at` is cut out (false: it stays text; it may
/// also throw); `on_text(segment)` gets the text before, between and after the cuts, `on_token(k)`
/// each cut token.
template <typename Take, typename OnText, typename OnToken>
void split_at_tokens(std::string_view text, const std::vector<std::string>& tokens, std::string_view first_bytes,
                     Take take, OnText on_text, OnToken on_token) {
  size_t done = 0;
  for (size_t at = text.find_first_of(first_bytes); at != std::string_view::npos;
       at = text.find_first_of(first_bytes, at)) {
    size_t found = tokens.size();
    for (size_t k = 0; k < tokens.size(); ++k) {
      if (text.compare(at, tokens[k].size(), tokens[k]) == 0 &&
          (found == tokens.size() || tokens[k].size() > tokens[found].size()))
        found = k;
    }
    if (found == tokens.size() || !take(found, at)) {
      ++at;
      continue;
    }
    on_text(text.substr(done, at - done));
    on_token(found);
    at += tokens[found].size();
    done = at;
  }
  on_text(text.substr(done));
}

}  // namespace titan::examples::bpe
