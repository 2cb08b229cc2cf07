#pragma once
// titan/context_parallel.hpp: context parallelism: every sequence sharded across the ranks of a
// `cp` group, through attention too.
//
// FSDP and TP shard parameters and heads; activations still grow with the sequence. With context
// parallelism each of the cp ranks holds 1/cp of every sequence (its tokens, labels and RoPE
// positions, so every activation), and attention, the one operation that mixes positions, reads
// the other ranks' keys and values:
//
//   layout (load-balanced for causal attention, as PyTorch's context parallel): the sequence is
//   cut into 2·cp chunks and rank r holds chunks r and 2·cp−1−r, so every rank does the same
//   causal work:
//
//     cp = 2, 8 tokens   chunks [0 1][2 3][4 5][6 7]   rank 0 holds [0 1 6 7], rank 1 [2 3 4 5]
//
//   attention: each rank keeps its queries and attends to every rank's key/value chunks, one
//   (query chunk, key chunk) pair at a time: a pair wholly visible runs the fused kernel as is, a
//   pair on the causal diagonal runs it causal, a pair cut by the causal or sliding-window border
//   runs it with a mask, a pair wholly invisible is skipped. The pairs' partial results are merged
//   by their log-sum-exp (out = Σ out_i · exp(lse_i − lse), lse = log Σ exp lse_i). The backward
//   runs the kernel's backward per pair with the merged output and log-sum-exp, which gives each
//   pair's exact share of dQ, dK and dV.
//
//   rotate methods: RotateMethod::P2P (ring attention): the key/value chunks travel around the
//   ring (send to rank r+1, receive from r−1), the next transfer overlapping the current pair's
//   kernel; in the backward the dK/dV accumulators travel with them and arrive at their owner
//   after cp steps. RotateMethod::AllGather: one all-gather of K and V, then every pair locally;
//   the backward reduce-scatters dK/dV. All-gather moves the same bytes in one collective and wins
//   at small cp; the ring holds only two chunks' K/V at a time.
//
// Kernels: ATen's attention kernels that return the log-sum-exp: the CPU flash kernel (masks and
// grouped-query attention natively) and, on CUDA, the memory-efficient kernel (masks as an
// additive bias; grouped-query attention by repeating K/V per pair). GQA/MQA: K/V keep their own
// head count on the wire.
//
// The seam in model code is the attention core, `titan::call(core, q, k, v)` (q [B, Hq, S, hd],
// k and v [B, Hkv, S, hd], the local tokens in this layout), or `titan::call(core, q, k, v,
// documents)` for packed rows whose documents attend only within themselves (block-causal;
// documents [B, S] integers, each local token's document in its row); apply_context_parallel
// attaches a hook to it that computes context_parallel_attention instead. The caller shards
// inputs, labels, RoPE positions and documents with ContextParallelLayout.

#include <titan/collectives.hpp>
#include <titan/detail/enum_names.hpp>
#include <titan/hooks.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <limits>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace titan {

/// How keys and values reach the other ranks of the context-parallel group.
enum class RotateMethod { AllGather, P2P };

/// The rotate methods' names: "allgather", "p2p" (the trainer's
/// `parallelism.context_parallel_rotate_method` values).
inline const detail::EnumNames<RotateMethod, 2>& rotate_method_names() {
  static const detail::EnumNames<RotateMethod, 2> names{{{RotateMethod::AllGather, "allgather"},
                                                         {RotateMethod::P2P, "p2p"}}};
  return names;
}

/// "allgather" or "p2p".
inline std::string rotate_method_name(RotateMethod method) {
  return detail::enum_name(rotate_method_names(), method);
}

/// Parses "allgather" or "p2p"; anything else is an error naming the value.
inline RotateMethod parse_rotate_method(const std::string& name) {
  return detail::parse_enum(rotate_method_names(), name, "titan: unknown context-parallel rotate method");
}

/// A run of consecutive global positions held by one rank: positions [start, start + length) at
/// offset `offset` of its local sequence.
struct SequenceSegment {
  int64_t start = 0;
  int64_t length = 0;
  int64_t offset = 0;
};

/// Which positions of a sequence each rank of a context-parallel group holds: load-balanced
/// (chunks r and 2·cp−1−r of 2·cp) or contiguous (chunk r of cp).
class ContextParallelLayout {
 public:
  ContextParallelLayout(int64_t degree, int64_t rank, bool load_balance = true)
      : degree_(degree), rank_(rank), load_balance_(load_balance) {
    TORCH_CHECK(degree >= 1, "titan::ContextParallelLayout: degree must be >= 1, got ", degree);
    TORCH_CHECK(rank >= 0 && rank < degree, "titan::ContextParallelLayout: rank ", rank, " is not below the degree ",
                degree);
  }

  int64_t degree() const { return degree_; }
  int64_t rank() const { return rank_; }
  bool load_balance() const { return load_balance_; }
  /// Pieces the sequence is cut into: 2·cp load-balanced, else cp.
  int64_t chunks() const { return load_balance_ && degree_ > 1 ? 2 * degree_ : degree_; }

  /// Checks that a sequence of `seq` tokens splits into chunks() equal chunks.
  void check_length(int64_t seq) const {
    TORCH_CHECK(seq > 0 && seq % chunks() == 0, "titan context parallel: sequence length ", seq,
                " does not split into ", chunks(), " equal chunks (context-parallel degree ", degree_,
                load_balance_ && degree_ > 1 ? ", load-balanced: 2 chunks per rank" : "",
                "); make the sequence length a multiple of ", chunks());
  }

  /// The segments rank `rank` holds of a sequence of `seq` tokens, in local order.
  std::vector<SequenceSegment> segments(int64_t seq, int64_t rank) const {
    check_length(seq);
    const int64_t chunk = seq / chunks();
    if (chunks() == degree_) return {SequenceSegment{rank * chunk, chunk, 0}};
    return {SequenceSegment{rank * chunk, chunk, 0}, SequenceSegment{(chunks() - 1 - rank) * chunk, chunk, chunk}};
  }
  std::vector<SequenceSegment> segments(int64_t seq) const { return segments(seq, rank_); }

  /// This rank's part of `x`, whose dimension `dim` is the whole sequence (inputs, labels, masks).
  at::Tensor shard(const at::Tensor& x, int64_t dim) const {
    const int64_t d = dim < 0 ? dim + x.dim() : dim;
    TORCH_CHECK(d >= 0 && d < x.dim(), "titan::ContextParallelLayout::shard: dim ", dim, " is out of range for a ",
                x.dim(), "-dimensional tensor");
    std::vector<at::Tensor> parts;
    for (const auto& s : segments(x.size(d))) parts.push_back(x.narrow(d, s.start, s.length));
    return parts.size() == 1 ? parts.front() : at::cat(parts, d);
  }

  /// The global positions of this rank's tokens of a sequence of `seq` tokens ([seq / cp] long).
  at::Tensor positions(int64_t seq, const at::TensorOptions& options = {}) const {
    return shard(at::arange(seq, options.dtype(at::kLong)), 0);
  }

  /// The whole sequence from every rank's part along `dim` (an all-gather over `group`, the
  /// layout's cp ranks; differentiable: the gradient goes back to this rank's part).
  at::Tensor unshard(const at::Tensor& local, const ProcessGroupPtr& group, int64_t dim) const {
    TORCH_CHECK(group && group->size() == degree_ && group->rank() == rank_, "titan::ContextParallelLayout::unshard:",
                " the group must be the layout's ", degree_, " ranks with this rank at ", rank_);
    const int64_t d = dim < 0 ? dim + local.dim() : dim;
    // rank-major: rank j's local tokens at j * local (every rank holds as many: no size exchange)
    auto gathered = all_gather(local, group, d, std::vector<int64_t>(static_cast<size_t>(degree_), local.size(d)));
    const int64_t n = local.size(d), seq = n * degree_;
    std::vector<at::Tensor> pieces(static_cast<size_t>(chunks()));
    for (int64_t j = 0; j < degree_; ++j)
      for (const auto& s : segments(seq, j))
        pieces[static_cast<size_t>(s.start / s.length)] = gathered.narrow(d, j * n + s.offset, s.length);
    return at::cat(pieces, d);
  }

 private:
  int64_t degree_, rank_;
  bool load_balance_;
};

/// How context_parallel_attention attends (chained setters).
class ContextParallelOptions {
 public:
  /// RotateMethod::AllGather (default, as torchtitan's) or P2P (ring).
  ContextParallelOptions& rotate_method(RotateMethod m) { rotate_method_ = m; return *this; }
  /// Causal attention (default) or full.
  ContextParallelOptions& causal(bool on) { causal_ = on; return *this; }
  /// A query attends to the `w` latest positions up to its own (0: no window; Mistral's).
  ContextParallelOptions& sliding_window(int64_t w) {
    TORCH_CHECK(w >= 0, "titan::ContextParallelOptions: sliding_window must be >= 0, got ", w);
    sliding_window_ = w;
    return *this;
  }
  /// The load-balanced layout (default) or contiguous chunks; must match how the inputs were
  /// sharded (ContextParallelLayout).
  ContextParallelOptions& load_balance(bool on) { load_balance_ = on; return *this; }
  /// Softmax scale (default 1 / sqrt(head dim)).
  ContextParallelOptions& scale(std::optional<double> s) { scale_ = s; return *this; }
  /// Whether the model's first call checks that it was given this rank's positions in the layout
  /// and tokens that are not a contiguous slice of the batch (apply_context_parallel; default
  /// on). Off for positions of another kind, e.g. restarting at each packed document.
  ContextParallelOptions& check_inputs(bool on) { check_inputs_ = on; return *this; }

  RotateMethod rotate_method() const { return rotate_method_; }
  bool causal() const { return causal_; }
  int64_t sliding_window() const { return sliding_window_; }
  bool load_balance() const { return load_balance_; }
  std::optional<double> scale() const { return scale_; }
  bool check_inputs() const { return check_inputs_; }

 private:
  RotateMethod rotate_method_ = RotateMethod::AllGather;
  bool causal_ = true;
  int64_t sliding_window_ = 0;
  bool load_balance_ = true;
  std::optional<double> scale_;
  bool check_inputs_ = true;
};

namespace detail {

/// One kernel call: query segment `query` of the local tokens against key rows
/// [key_offset, key_offset + key_length) of a rank's keys, which hold positions
/// [key_start, key_start + key_length) (for Explicit and Causal pairs; joined Mask::None pairs
/// may span several key segments).
struct AttentionPair {
  enum class Mask { None, Causal, Explicit };
  size_t query = 0;
  int64_t key_offset = 0, key_start = 0, key_length = 0;
  Mask mask = Mask::None;
};

/// Which pairs of `queries` (this rank's segments) and `keys` (a key rank's) the options need,
/// each with its mask kind. Adjacent wholly visible key segments are joined into one call. With
/// `documents` (a block-causal mask from the rows' documents) every pair needed is Explicit.
inline std::vector<AttentionPair> attention_pairs(const std::vector<SequenceSegment>& queries,
                                                  const std::vector<SequenceSegment>& keys,
                                                  const ContextParallelOptions& options, bool documents = false) {
  const int64_t window = options.sliding_window();
  std::vector<AttentionPair> pairs;
  for (size_t qi = 0; qi < queries.size(); ++qi) {
    const auto& q = queries[qi];
    const int64_t q_first = q.start, q_last = q.start + q.length - 1;
    for (const auto& k : keys) {
      const int64_t k_first = k.start, k_last = k.start + k.length - 1;
      const bool none_causal = options.causal() && k_first > q_last;
      const bool none_window = window > 0 && q_first - k_last >= window;
      if (none_causal || none_window) continue;
      const bool all_causal = !options.causal() || k_last <= q_first;
      const bool all_window = window == 0 || q_last - k_first < window;
      AttentionPair pair{qi, k.offset, k.start, k.length, AttentionPair::Mask::Explicit};
      if (documents)
        pair.mask = AttentionPair::Mask::Explicit;
      else if (all_causal && all_window)
        pair.mask = AttentionPair::Mask::None;
      else if (options.causal() && all_window && k.start == q.start && k.length == q.length)
        pair.mask = AttentionPair::Mask::Causal;  // the diagonal: the kernel's own causal mask
      if (!pairs.empty()) {
        auto& last = pairs.back();
        if (pair.mask == AttentionPair::Mask::None && last.query == qi && last.mask == AttentionPair::Mask::None &&
            last.key_offset + last.key_length == pair.key_offset) {
          last.key_length += pair.key_length;  // one call over both (no mask: their positions do not matter)
          continue;
        }
      }
      pairs.push_back(pair);
    }
  }
  return pairs;
}

/// The mask of an Explicit pair: an additive mask (0 or −inf, `dtype`) and which query rows see
/// any key: [Lq, Lk] and [Lq], or with `documents` ([B, S], every position's document in its row)
/// [B, 1, Lq, Lk] and [B, 1, Lq], a query seeing only the keys of its own document.
inline std::pair<at::Tensor, at::Tensor> pair_mask(const SequenceSegment& query, const AttentionPair& pair,
                                                   const ContextParallelOptions& options, at::ScalarType dtype,
                                                   c10::Device device, const at::Tensor& documents = {}) {
  const auto longs = at::TensorOptions().dtype(at::kLong).device(device);
  auto q_pos = at::arange(query.start, query.start + query.length, longs).unsqueeze(1);  // [Lq, 1]
  auto k_pos = at::arange(pair.key_start, pair.key_start + pair.key_length, longs).unsqueeze(0);  // [1, Lk]
  auto distance = q_pos - k_pos;                                                                   // [Lq, Lk]
  auto visible = options.causal() ? distance.ge(0) : at::ones_like(distance, at::kBool);
  if (options.sliding_window() > 0) visible = visible.logical_and(distance.lt(options.sliding_window()));
  if (documents.defined()) {
    auto q_doc = documents.narrow(1, query.start, query.length).unsqueeze(2);        // [B, Lq, 1]
    auto k_doc = documents.narrow(1, pair.key_start, pair.key_length).unsqueeze(1);  // [B, 1, Lk]
    visible = visible.logical_and(q_doc.eq(k_doc)).unsqueeze(1);                     // [B, 1, Lq, Lk]
  }
  auto additive = at::zeros(visible.sizes(), at::TensorOptions().dtype(dtype).device(device))
                      .masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  return {additive, visible.any(-1)};
}

/// CUDA's memory-efficient kernel takes equal head counts and an additive bias whose rows are
/// 16-element aligned: K/V repeated per query head group, the [Lq, Lk] or [B, 1, Lq, Lk] mask
/// padded and expanded.
inline at::Tensor repeat_heads(const at::Tensor& kv, int64_t heads) {
  return kv.size(1) == heads ? kv : kv.repeat_interleave(heads / kv.size(1), 1);  // [B, Hq, Lk, D]
}
inline at::Tensor cuda_bias(const at::Tensor& mask, const at::Tensor& q) {
  if (!mask.defined()) return mask;
  auto sizes = mask.sizes().vec();
  const int64_t lk = sizes.back();
  sizes.back() = (lk + 15) / 16 * 16;
  auto storage = at::zeros(sizes, mask.options());
  storage.narrow(-1, 0, lk).copy_(mask);
  return storage.narrow(-1, 0, lk).expand({q.size(0), q.size(1), q.size(2), lk});  // [B, Hq, Lq, Lk]
}

/// The kernel on one pair: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D] -> out [B, Hq, Lq, D] (q's
/// dtype) and lse [B, Hq, Lq] (float, double for double inputs; −inf on rows that see nothing).
inline std::pair<at::Tensor, at::Tensor> pair_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttentionPair& pair, const at::Tensor& mask,
                                                      const at::Tensor& rows_visible, std::optional<double> scale) {
  const bool causal = pair.mask == AttentionPair::Mask::Causal;
  at::Tensor out, lse;
  if (q.is_cpu()) {
    std::optional<at::Tensor> m;
    if (mask.defined()) m = mask;
    std::tie(out, lse) = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, m, scale);
  } else {
    TORCH_CHECK(q.is_cuda(), "titan context parallel: attention on ", q.device(), " is not supported (CPU or CUDA)");
    std::optional<at::Tensor> bias;
    if (mask.defined()) bias = cuda_bias(mask, q);
    auto result = at::_scaled_dot_product_efficient_attention(q, repeat_heads(k, q.size(1)), repeat_heads(v, q.size(1)),
                                                              bias, true, 0.0, causal, scale);
    out = std::get<0>(result);
    lse = std::get<1>(result).narrow(2, 0, q.size(2));  // the kernel pads rows to 32
  }
  if (rows_visible.defined())  // the kernels leave a row that sees no key at lse 0, out 0; [Lq] or [B, 1, Lq]
    lse = lse.masked_fill(rows_visible.logical_not(), -std::numeric_limits<double>::infinity());
  return {out, lse};
}

/// The kernel's backward on one pair, given the merged `out` and `lse` of the query rows:
/// returns this pair's share of (dq, dk, dv).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_backward(const at::Tensor& grad, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& out, const at::Tensor& lse,
                                                                    const AttentionPair& pair, const at::Tensor& mask,
                                                                    std::optional<double> scale) {
  const bool causal = pair.mask == AttentionPair::Mask::Causal;
  if (q.is_cpu()) {
    std::optional<at::Tensor> m;
    if (mask.defined()) m = mask;
    return at::_scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, causal, m, scale);
  }
  const int64_t groups = q.size(1) / k.size(1), rows = q.size(2), padded_rows = (rows + 31) / 32 * 32;
  auto lse_padded = at::constant_pad_nd(lse.to(at::kFloat), {0, padded_rows - rows}, 0);  // [B, Hq, pad32(Lq)]
  auto unused = at::empty({0}, at::TensorOptions().dtype(at::kLong).device(q.device()));  // no dropout
  auto [dq, dk, dv, dbias] = at::_scaled_dot_product_efficient_attention_backward(
      grad, q, repeat_heads(k, q.size(1)), repeat_heads(v, q.size(1)), cuda_bias(mask, q), out, lse_padded, unused, unused, 0.0, {true, true, true, false}, causal, scale);
  if (groups > 1) {
    dk = dk.view({k.size(0), k.size(1), groups, k.size(2), k.size(3)}).sum(2);
    dv = dv.view({v.size(0), v.size(1), groups, v.size(2), v.size(3)}).sum(2);
  }
  return {dq, dk, dv};
}

/// The merged attention of this rank's query segments so far.
struct MergedAttention {
  std::vector<at::Tensor> out;  // per query segment [B, Hq, Lq, D], accumulation dtype
  std::vector<at::Tensor> lse;  // per query segment [B, Hq, Lq]
};

/// Attends this rank's queries `q` (segments `queries`) to keys `k`, values `v` of a rank holding
/// segments `keys`, merging into `merged`; `documents`: the whole rows' [B, S] or undefined.
inline void attend(const at::Tensor& q, const std::vector<SequenceSegment>& queries, const at::Tensor& k,
                   const at::Tensor& v, const std::vector<SequenceSegment>& keys,
                   const ContextParallelOptions& options, const at::Tensor& documents, MergedAttention& merged) {
  for (const auto& pair : attention_pairs(queries, keys, options, documents.defined())) {
    const auto& segment = queries[pair.query];
    at::Tensor mask, rows;
    if (pair.mask == AttentionPair::Mask::Explicit)
      std::tie(mask, rows) = pair_mask(segment, pair, options, q.scalar_type(), q.device(), documents);
    auto [out, lse] = pair_forward(q.narrow(2, segment.offset, segment.length),
                                   k.narrow(2, pair.key_offset, pair.key_length),
                                   v.narrow(2, pair.key_offset, pair.key_length), pair, mask, rows, options.scale());
    auto& acc_out = merged.out[pair.query];
    auto& acc_lse = merged.lse[pair.query];
    if (!acc_out.defined()) {
      acc_out = out.to(lse.scalar_type());
      acc_lse = lse;
      continue;
    }
    auto total = at::logaddexp(acc_lse, lse);             // [B, Hq, Lq]
    auto base = total.masked_fill(total.isneginf(), 0);  // rows seeing nothing yet keep weight 0
    acc_out = acc_out * (acc_lse - base).exp().unsqueeze(-1) + out.to(acc_out.scalar_type()) *
                                                                  (lse - base).exp().unsqueeze(-1);
    acc_lse = total;
  }
}

/// Accumulates the gradients of this rank's queries against keys `k`, values `v` (segments
/// `keys`) into `dq`, `dk`, `dv` (accumulation dtype); `documents` as attend's.
inline void attend_backward(const at::Tensor& grad, const at::Tensor& q, const std::vector<SequenceSegment>& queries,
                            const at::Tensor& k, const at::Tensor& v, const std::vector<SequenceSegment>& keys,
                            const at::Tensor& out, const std::vector<at::Tensor>& lse,
                            const ContextParallelOptions& options, const at::Tensor& documents, at::Tensor& dq,
                            at::Tensor& dk, at::Tensor& dv) {
  for (const auto& pair : attention_pairs(queries, keys, options, documents.defined())) {
    const auto& segment = queries[pair.query];
    at::Tensor mask, rows;
    if (pair.mask == AttentionPair::Mask::Explicit)
      std::tie(mask, rows) = pair_mask(segment, pair, options, q.scalar_type(), q.device(), documents);
    auto rows_of = [&](const at::Tensor& t) { return t.narrow(2, segment.offset, segment.length); };
    auto keys_of = [&](const at::Tensor& t) { return t.narrow(2, pair.key_offset, pair.key_length); };
    auto [gq, gk, gv] = pair_backward(rows_of(grad), rows_of(q), keys_of(k), keys_of(v), rows_of(out),
                                      lse[pair.query], pair, mask, options.scale());
    rows_of(dq).add_(gq);
    keys_of(dk).add_(gk);
    keys_of(dv).add_(gv);
  }
}

/// Sends `tensors` to the next rank of the ring and receives as many of the same shapes from the
/// previous one (posted together; NCCL as one group, so neighbours exchanging do not deadlock).
class RingShift {
 public:
  RingShift(const ProcessGroup& group, const std::vector<at::Tensor>& tensors, uint32_t tag) {
    const int n = group.size(), next = (group.rank() + 1) % n, prev = (group.rank() + n - 1) % n;
    const bool coalesce = group.backend()->getBackendName() == "nccl";
    if (coalesce) group.backend()->startCoalescing();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto t = tag + static_cast<uint32_t>(i);
      receives_.push_back(recv_async(group, tensors[i].sizes(), tensors[i].options(), prev, t));
      sends_.push_back(send_async(group, tensors[i], next, t));
    }
    if (coalesce) group_work_ = group.backend()->endCoalescing();
  }

  /// Waits for both directions; returns the received tensors.
  std::vector<at::Tensor> wait() {
    if (group_work_) group_work_->wait();
    std::vector<at::Tensor> received;
    for (auto& r : receives_) received.push_back(r.wait());
    for (auto& s : sends_) s.wait();
    return received;
  }

 private:
  std::vector<PendingTransfer> receives_, sends_;
  c10::intrusive_ptr<c10d::Work> group_work_;
};

/// How this rank meets every rank's keys and values: by all-gathering them, or by passing them
/// around the ring one step at a time (PyTorch's _AllGatherRotater and _RingRotater).
class KvRotater {
 public:
  /// `owner`: whose part of the sequence k and v [B, Hkv, S/cp, D] hold.
  using Visit = std::function<void(int64_t owner, const at::Tensor& k, const at::Tensor& v)>;
  /// The same, with zeroed accumulators dk and dv [B, Hkv, S/cp, D] of the owner's gradients.
  using VisitGrads = std::function<void(int64_t owner, const at::Tensor& k, const at::Tensor& v, at::Tensor& dk,
                                        at::Tensor& dv)>;
  virtual ~KvRotater() = default;
  /// Calls `visit` once for every rank's k and v (this rank's are `k`, `v`).
  virtual void for_each(const at::Tensor& k, const at::Tensor& v, const Visit& visit) = 0;
  /// Calls `visit` once for every rank's k and v with accumulators of dtype `acc`, and returns
  /// this rank's dk and dv: what every rank accumulated for it, summed.
  virtual std::pair<at::Tensor, at::Tensor> for_each_with_grads(const at::Tensor& k, const at::Tensor& v,
                                                                at::ScalarType acc, const VisitGrads& visit) = 0;
};

/// All ranks' k and v gathered at once (one all-gather each way; the dk, dv of every owner
/// reduce-scattered back).
class AllGatherRotater : public KvRotater {
 public:
  AllGatherRotater(const ProcessGroup& group, int64_t rows)
      : group_(group), rows_(rows), even_(static_cast<size_t>(group.size()), rows) {}

  void for_each(const at::Tensor& k, const at::Tensor& v, const Visit& visit) override {
    auto k_all = all_gather_raw(k, group_, 2, even_), v_all = all_gather_raw(v, group_, 2, even_);  // [B, Hkv, S, D]
    for (int64_t j = 0; j < group_.size(); ++j) visit(j, part(k_all, j), part(v_all, j));
  }

  std::pair<at::Tensor, at::Tensor> for_each_with_grads(const at::Tensor& k, const at::Tensor& v, at::ScalarType acc,
                                                        const VisitGrads& visit) override {
    auto k_all = all_gather_raw(k, group_, 2, even_), v_all = all_gather_raw(v, group_, 2, even_);  // [B, Hkv, S, D]
    auto dk_all = at::zeros(k_all.sizes(), k_all.options().dtype(acc));
    auto dv_all = at::zeros(v_all.sizes(), v_all.options().dtype(acc));
    for (int64_t j = 0; j < group_.size(); ++j) {
      auto dk_j = part(dk_all, j), dv_j = part(dv_all, j);
      visit(j, part(k_all, j), part(v_all, j), dk_j, dv_j);
    }
    return {reduce_scatter_raw(dk_all, group_, 2, ReduceOp::Sum, even_),
            reduce_scatter_raw(dv_all, group_, 2, ReduceOp::Sum, even_)};
  }

 private:
  at::Tensor part(const at::Tensor& all, int64_t j) const { return all.narrow(2, j * rows_, rows_); }

  const ProcessGroup& group_;
  int64_t rows_;
  std::vector<int64_t> even_;
};

/// k and v passed to the next rank of the ring while this rank attends to the ones it holds; in
/// backward the dk, dv accumulators travel with them and are back at their owner after n steps.
class RingRotater : public KvRotater {
 public:
  explicit RingRotater(const ProcessGroup& group) : group_(group) {}

  void for_each(const at::Tensor& k, const at::Tensor& v, const Visit& visit) override {
    const int64_t n = group_.size(), rank = group_.rank();
    at::Tensor k_cur = k, v_cur = v;
    for (int64_t step = 0; step < n; ++step) {
      std::optional<RingShift> shift;
      if (step + 1 < n) shift.emplace(group_, std::vector<at::Tensor>{k_cur, v_cur}, static_cast<uint32_t>(2 * step));
      visit((rank - step + n) % n, k_cur, v_cur);
      if (shift) {
        auto next = shift->wait();
        k_cur = next[0];
        v_cur = next[1];
      }
    }
  }

  std::pair<at::Tensor, at::Tensor> for_each_with_grads(const at::Tensor& k, const at::Tensor& v, at::ScalarType acc,
                                                        const VisitGrads& visit) override {
    const int64_t n = group_.size(), rank = group_.rank();
    // Step t holds owner (rank − t)'s K/V and dK/dV accumulators; both move to rank + 1.
    at::Tensor k_cur = k, v_cur = v;
    std::optional<RingShift> grads_in;
    for (int64_t step = 0; step < n; ++step) {
      std::optional<RingShift> kv_in;
      if (step + 1 < n) kv_in.emplace(group_, std::vector<at::Tensor>{k_cur, v_cur}, static_cast<uint32_t>(2 * step));
      auto dk_part = at::zeros(k.sizes(), k.options().dtype(acc));
      auto dv_part = at::zeros(v.sizes(), v.options().dtype(acc));
      visit((rank - step + n) % n, k_cur, v_cur, dk_part, dv_part);
      if (grads_in) {  // the accumulators of this owner from the ranks before
        auto received = grads_in->wait();
        dk_part.add_(received[0]);
        dv_part.add_(received[1]);
      }
      grads_in.emplace(group_, std::vector<at::Tensor>{dk_part, dv_part}, static_cast<uint32_t>(2 * n + 2 * step));
      if (kv_in) {
        auto next = kv_in->wait();
        k_cur = next[0];
        v_cur = next[1];
      }
    }
    auto own = grads_in->wait();  // after n steps every accumulator is back at its owner
    return {own[0], own[1]};
  }

 private:
  const ProcessGroup& group_;
};

/// The rotater of `method` over `group` for `rows` local tokens (one rank: all-gather, a no-op).
inline std::unique_ptr<KvRotater> make_rotater(RotateMethod method, const ProcessGroup& group, int64_t rows) {
  if (method == RotateMethod::AllGather || group.size() == 1) return std::make_unique<AllGatherRotater>(group, rows);
  return std::make_unique<RingRotater>(group);
}

inline at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "titan::context_parallel_attention: q, k and v must be ",
              "[batch, heads, local seq, head dim], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "titan::context_parallel_attention: k ", k.sizes(), " and v ", v.sizes(),
              " differ in shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "titan::context_parallel_attention: q ", q.sizes(), " and k ", k.sizes(),
              " must agree in batch, local sequence and head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "titan::context_parallel_attention: ", q.size(1),
              " query heads are not a multiple of ", k.size(1), " key/value heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "titan::context_parallel_attention: q, k and v must share a dtype");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(!q.is_cuda() || dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "titan::context_parallel_attention on CUDA takes float32, float16 or bfloat16, got ", dtype,
              " (its memory-efficient attention kernel); float64 runs on the CPU");
}

}  // namespace detail

/// Attention of this rank's tokens (q [B, Hq, S/cp, D], k and v [B, Hkv, S/cp, D], in the
/// options' layout over `group`) against the whole sequence; returns [B, Hq, S/cp, D].
/// `documents` ([B, S/cp] integers, this rank's tokens' documents in their rows, sharded as the
/// tokens; optional): a query attends only to keys of its own document (block-causal, packed
/// rows), on top of the options' causal mask and window. Differentiable in q, k and v. Every rank
/// of `group` must call it with the same shapes, and with documents or without.
inline at::Tensor context_parallel_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const ProcessGroupPtr& group, const ContextParallelOptions& options = {},
                                             const at::Tensor& documents = {}) {
  RECORD_USER_SCOPE("titan::context_parallel_attention");
  TORCH_CHECK(group, "titan::context_parallel_attention: null process group");
  detail::check_attention_inputs(q, k, v);
  const int64_t n = group->size(), seq = q.size(2) * n;
  const ContextParallelLayout layout(n, group->rank(), options.load_balance());
  const auto queries = layout.segments(seq);
  at::Tensor whole_documents;  // [B, S]: every position's document, in sequence order
  if (documents.defined()) {
    TORCH_CHECK(documents.dim() == 2 && documents.size(0) == q.size(0) && documents.size(1) == q.size(2) &&
                    !documents.is_floating_point() && documents.scalar_type() != at::kBool,
                "titan::context_parallel_attention: documents must be integers [batch, local seq] = [", q.size(0),
                ", ", q.size(2), "] (each local token's document in its row), got ", documents.scalar_type(), " ",
                documents.sizes());
    at::NoGradGuard no_grad;
    whole_documents = layout.unshard(documents.to(q.device(), at::kLong).contiguous(), group, 1);
  }
  const auto acc = detail::accumulation_dtype(q.scalar_type());
  // The group outlives the rotater: the backward node below holds the group's pointer.
  std::shared_ptr<detail::KvRotater> rotater = detail::make_rotater(options.rotate_method(), *group, q.size(2));

  auto qc = q.detach().contiguous(), kc = k.detach().contiguous(), vc = v.detach().contiguous();
  detail::MergedAttention merged{std::vector<at::Tensor>(queries.size()), std::vector<at::Tensor>(queries.size())};
  {
    at::NoGradGuard no_grad;
    rotater->for_each(kc, vc, [&](int64_t owner, const at::Tensor& k_owner, const at::Tensor& v_owner) {
      detail::attend(qc, queries, k_owner, v_owner, layout.segments(seq, owner), options, whole_documents, merged);
    });
  }
  std::vector<at::Tensor> parts;
  for (size_t i = 0; i < queries.size(); ++i) {
    TORCH_CHECK(merged.out[i].defined(), "titan::context_parallel_attention: query segment at position ",
                queries[i].start, " attends to no key (a sliding window of 0 under a non-causal mask?)");
    parts.push_back(merged.out[i].to(q.scalar_type()));
  }
  auto out = parts.size() == 1 ? parts.front() : at::cat(parts, 2);  // [B, Hq, S/cp, D]

  torch::autograd::variable_list outputs{out};
  detail::connect_backward(
      {q, k, v}, outputs, "titan::ContextParallelAttentionBackward",
      // `out` detached: the node must not own its own output (a reference cycle).
      [group, rotater, options, layout, queries, qc, kc, vc, whole_documents, out = out.detach(), lse = merged.lse,
       seq, acc](torch::autograd::variable_list&& grads) -> torch::autograd::variable_list {
        RECORD_USER_SCOPE("titan::context_parallel_attention_backward");
        auto grad = grads[0].contiguous();  // [B, Hq, S/cp, D]
        auto dq = at::zeros(qc.sizes(), qc.options().dtype(acc));
        auto [dk, dv] = rotater->for_each_with_grads(
            kc, vc, acc,
            [&](int64_t owner, const at::Tensor& k_owner, const at::Tensor& v_owner, at::Tensor& dk_owner,
                at::Tensor& dv_owner) {
              detail::attend_backward(grad, qc, queries, k_owner, v_owner, layout.segments(seq, owner), out, lse,
                                      options, whole_documents, dq, dk_owner, dv_owner);
            });
        return {dq.to(qc.scalar_type()), dk.to(kc.scalar_type()), dv.to(vc.scalar_type())};
      });
  return outputs[0];
}

/// Replaces the forward of an attention core module, forward(q, k, v) or forward(q, k, v,
/// documents), by context_parallel_attention over its group (see apply_context_parallel).
class ContextParallelHook : public ModuleHook {
 public:
  /// `root`: the model apply_context_parallel was given, whose gradient reduction the first
  /// training forward checks.
  ContextParallelHook(ProcessGroupPtr group, ContextParallelOptions options, const torch::nn::Module& root)
      : group_(std::move(group)), options_(options), root_(&root) {}

  std::string name() const override { return "context_parallel " + rotate_method_name(options_.rotate_method()); }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    TORCH_CHECK(inputs.size() == 3 || inputs.size() == 4, "titan context parallel: module ", module.name(),
                " must be called as titan::call(core, q, k, v) or titan::call(core, q, k, v, documents) (3 or 4 ",
                "tensors); it got ", inputs.size());
    if (!reduction_checked_ && c10::GradMode::is_enabled()) {
      check_gradient_reduction();
      reduction_checked_ = true;
    }
    const at::Tensor documents = inputs.size() == 4 ? inputs[3] : at::Tensor();
    return context_parallel_attention(inputs[0], inputs[1], inputs[2], group_, options_, documents);
  }

  const ProcessGroupPtr& group() const { return group_; }
  const ContextParallelOptions& options() const { return options_; }

 private:
  /// Each cp rank's parameter gradients cover only its part of every sequence: they must be summed
  /// over the cp ranks (FSDP or HSDP over a mesh dimension that includes cp). A trainable parameter
  /// of the model without such a reduction (ModuleHook::gradient_reduction_ranks) is an error.
  void check_gradient_reduction() const {
    std::string missing;
    int count = 0;
    for (const auto& item : root_->named_parameters(/*recurse=*/true)) {
      if (!item.value().requires_grad()) continue;
      const auto reduced = titan::gradient_reduction_ranks(*root_, item.value());  // sorted
      const bool covered = std::all_of(group_->global_ranks().begin(), group_->global_ranks().end(), [&](int r) {
        return std::binary_search(reduced.begin(), reduced.end(), r);
      });
      if (!covered && count++ < 3) missing += (missing.empty() ? "'" : ", '") + item.key() + "'";
    }
    TORCH_CHECK(count == 0, "titan context parallel: ", count, " trainable parameter(s) of '", root_->name(), "' (",
                missing, count > 3 ? ", ..." : "", ") have no gradient reduction over the context-parallel ranks ",
                c10::IntArrayRef(std::vector<int64_t>(group_->global_ranks().begin(), group_->global_ranks().end())),
                ": each cp rank's gradients cover only its part of every sequence and must be summed. Apply ",
                "titan::fully_shard over a mesh dimension that includes cp, as torchtitan does: ",
                "mesh.flatten({\"dp_shard\", \"cp\"}, \"dp_shard_cp\") and fully_shard(..., mesh[\"dp_shard_cp\"])");
  }

  ProcessGroupPtr group_;
  ContextParallelOptions options_;
  const torch::nn::Module* root_;   ///< the model (it owns the hooked cores, so it outlives them)
  bool reduction_checked_ = false;  ///< check_gradient_reduction ran (at the first training forward)
};

namespace detail {

/// Attached by apply_context_parallel to the model it was given: its first call checks that the
/// caller passed this rank's positions in the layout, the model's second change under context
/// parallelism, and that its tokens are not a contiguous slice of the batch. Its inputs are
/// [B, S / cp] tokens or a pipeline stage's [B, S / cp, dim] activation first, then a positions
/// tensor ([S / cp] or [B, S / cp] integers).
class ContextParallelInputsHook : public ModuleHook {
 public:
  ContextParallelInputsHook(ProcessGroupPtr group, bool load_balance)
      : group_(std::move(group)), layout_(group_->size(), group_->rank(), load_balance) {}
  std::string name() const override { return "context_parallel inputs check"; }

  at::Tensor forward(torch::nn::Module& module, const TensorList& inputs, const ForwardFn& next) override {
    check_once(module, inputs);
    return next(inputs);
  }
  TensorList forward_outputs(torch::nn::Module& module, const TensorList& inputs,
                             const OutputsForwardFn& next) override {
    check_once(module, inputs);
    return next(inputs);
  }

 private:
  void check_once(const torch::nn::Module& module, const TensorList& inputs) {
    if (checked_) return;
    std::optional<at::Tensor> given;  // the first integer tensor after the tokens or activation
    for (size_t i = 1; i < inputs.size() && !given; ++i)
      if (inputs[i].defined() && !inputs[i].is_floating_point() && inputs[i].dim() >= 1) given = inputs[i];
    TORCH_CHECK(given, "titan context parallel: '", module.name(), "' (the model given to apply_context_parallel) ",
                "was called without this rank's positions (its tensors: ", describe(inputs), "). Each cp rank holds ",
                "tokens from two places of every sequence, so the model takes their positions for its RoPE or ",
                "position embeddings: titan::call(model, tokens, layout.positions(seq)) (docs/context_parallel.md, ",
                "'The seam in model code'; ContextParallelOptions().check_inputs(false) for positions of ",
                "another kind)");
    const int64_t local = given->size(-1);
    const auto expected = layout_.positions(local * layout_.degree(), given->options());  // [S / cp]
    TORCH_CHECK(given->to(at::kLong).reshape({-1, local}).eq(expected).all().item<bool>(),  // [rows, S / cp] vs [S / cp]
                "titan context parallel: the positions given to '", module.name(), "' (", head(*given),
                ") are not this rank's positions of a sequence of ", local * layout_.degree(), " tokens in the ",
                layout_.load_balance() ? "load-balanced" : "contiguous", " layout (rank ", layout_.rank(), " of ",
                layout_.degree(), ": ", head(expected), "): cut the batch with ContextParallelLayout::shard and take ",
                "the positions from ContextParallelLayout::positions, not contiguous slices (attention assumes the ",
                "layout)");
    check_tokens(module, inputs.front(), local);
    checked_ = true;
  }

  /// Tokens cut into contiguous slices of whole sequences while the layout is load-balanced (the
  /// positions may still come from the layout): caught when every rank's tokens are such a slice
  /// as a view of the batch (narrow, chunk, slice), whose rows then hold whole sequences of
  /// cp × S / cp tokens and which starts at the rank's contiguous offset. The ranks agree (one
  /// all-reduce over the cp group, on the first call) so that all fail or none, and one rank's
  /// tokens in a reused wider buffer are not taken for a cut. A copy of a contiguous slice cannot
  /// be told from layout.shard's output and trains on with the wrong tokens at each position.
  void check_tokens(const torch::nn::Module& module, const at::Tensor& tokens, int64_t local) const {
    if (!layout_.load_balance() || !tokens.defined() || tokens.is_floating_point()) return;  // alike on every rank
    const auto start = contiguous_cut_start(tokens, local);
    const auto cut_ranks = dist_sum(start ? 1.0 : 0.0, group_);
    TORCH_CHECK(cut_ranks < layout_.degree(), "titan context parallel: the tokens given to '", module.name(), "' (",
                tokens.scalar_type(), " ", tokens.sizes(), ") are tokens [", *start, ", ", *start + local,
                ") of sequences of ", local * layout_.degree(), " on rank ", layout_.rank(), ", a contiguous slice ",
                "of the batch (a view whose rows are whole sequences; every cp rank's tokens are such a slice), but ",
                "the load-balanced layout gives rank ", layout_.rank(), " of ", layout_.degree(), " the chunks ",
                layout_.rank(), " and ", layout_.chunks() - 1 - layout_.rank(), " of ", layout_.chunks(), ": cut ",
                "the batch with ContextParallelLayout::shard (layout.shard(batch, 1)), or use the contiguous layout ",
                "on both sides (ContextParallelOptions().load_balance(false), ContextParallelLayout(cp, rank, false))");
  }

  /// Where in its sequence `tokens` (a [..., S / cp] view) starts when it is this rank's
  /// contiguous slice of whole sequences; nullopt otherwise.
  std::optional<int64_t> contiguous_cut_start(const at::Tensor& tokens, int64_t local) const {
    if (tokens.dim() < 1 || tokens.size(-1) != local || tokens.stride(-1) != 1 || !tokens.has_storage())
      return std::nullopt;
    // Elements from one sequence to the next (one sequence: its storage); rows longer than the
    // sequence are a [B, S + 1] buffer of inputs and labels.
    const int64_t row = tokens.dim() >= 2 ? tokens.stride(-2)
                                          : static_cast<int64_t>(tokens.storage().nbytes()) / tokens.element_size();
    if (row < local * layout_.degree()) return std::nullopt;
    const int64_t start = tokens.dim() >= 2 ? tokens.storage_offset() % row : tokens.storage_offset();
    if (start != layout_.rank() * local) return std::nullopt;
    return start;
  }

  /// The first values of a positions tensor, for messages.
  static std::string head(const at::Tensor& positions) {
    const auto flat = positions.reshape({-1}).to(at::kLong).cpu();
    const auto shown = flat.narrow(0, 0, std::min<int64_t>(flat.numel(), 6));
    return c10::str(c10::IntArrayRef(shown.data_ptr<int64_t>(), shown.numel()), flat.numel() > 6 ? " ..." : "");
  }

  static std::string describe(const TensorList& inputs) {
    std::string text;
    for (const auto& t : inputs)
      text += (text.empty() ? "" : ", ") + (t.defined() ? c10::str(t.scalar_type(), " ", t.sizes()) : "undefined");
    return text.empty() ? "none" : text;
  }

  ProcessGroupPtr group_;  ///< the cp ranks
  ContextParallelLayout layout_;
  bool checked_ = false;  ///< the first call was checked
};

}  // namespace detail

/// Makes every submodule of `root` whose dotted name matches `pattern` (e.g.
/// "layers.*.attention.core") compute context-parallel attention over `group`. Those modules must
/// be attention cores called as titan::call(core, q, k, v) on local tokens (ContextParallelLayout
/// of `group` and the options' load_balance), or titan::call(core, q, k, v, documents) with the
/// local tokens' documents for block-causal attention. Returns how many modules it attached to; none is an
/// error naming the pattern. A group of one rank attaches nothing. Two checks make a half-applied
/// context parallelism an error: `root`'s first call through titan::call must be given this
/// rank's positions (ContextParallelLayout::positions, after the tokens or the stage's
/// activation) and tokens that are not a contiguous view of the batch, and the first forward with gradients checks that every trainable parameter of
/// `root` has its gradient reduced over the group's ranks (fully_shard over a mesh dimension
/// including cp); each error names the fix.
inline int apply_context_parallel(torch::nn::Module& root, const std::string& pattern, const ProcessGroupPtr& group,
                                  const ContextParallelOptions& options = {}) {
  TORCH_CHECK(group, "titan::apply_context_parallel: null process group");
  int attached = 0;
  auto hook = std::make_shared<ContextParallelHook>(group, options, root);
  for (const auto& [name, module] : modules_matching(root, pattern)) {
    if (name.empty()) continue;  // the root is the model, not an attention core
    if (group->size() > 1) attach_hook(*module, hook);
    ++attached;
  }
  TORCH_CHECK(attached > 0, "titan::apply_context_parallel: no module matches '", pattern, "'; modules like it: ",
              detail::module_names_like(root, pattern));
  if (group->size() > 1 && options.check_inputs())
    attach_hook(root, std::make_shared<detail::ContextParallelInputsHook>(group, options.load_balance()));
  return attached;
}

}  // namespace titan
