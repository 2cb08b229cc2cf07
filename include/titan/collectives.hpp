#pragma once
// titan/collectives.hpp: collectives over a ProcessGroup, differentiable and uneven-size aware.
//
//   forward                          backward
//   all_gather        (concat)       reduce_scatter (sum) of the gradient
//   reduce_scatter    (sum|avg)      all_gather of the gradient (scaled by 1/N for avg)
//   all_reduce        (sum|avg)      all_reduce (sum|avg) of the gradient
//   broadcast         (from src)     gradients summed onto src, zero elsewhere
//   all_to_all        (Shard a->b)   the inverse all-to-all
//   copy_to_group     (identity)     all_reduce (sum)            Megatron's f: into a split computation
//   reduce_from_group (all_reduce)   identity                    Megatron's g: out of it
//   gather_from_group (all_gather)   this rank's chunk           Shard(d) -> Replicate
//   scatter_to_group  (this chunk)   all_gather                  Replicate -> Shard(d)
//
// The backward is that of the sum of every rank's loss, which is what data and tensor parallel
// training differentiate. Uneven sizes along the gathered or scattered dimension are padded to the
// largest and trimmed again, so any split works. Not differentiable: dist_sum / dist_max of
// scalars (losses, norms, counters), all_gather_strings and all_ranks_or_none (fail together).
// Point-to-point: send_async / recv_async (pipeline stages), on every backend and device.

#include <titan/detail/autograd.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace titan {

/// How a reduction combines the ranks' tensors. Max has no gradient: the differentiable
/// collectives refuse it (use dist_max or the detail::*_raw functions).
enum class ReduceOp { Sum, Avg, Max };

/// Sizes of `n` rows split into `parts` the way torch.chunk (and FSDP2) split them: every part
/// ceil(n / parts) rows except the last non-empty one; trailing parts may be empty.
inline std::vector<int64_t> chunk_sizes(int64_t n, int64_t parts) {
  TORCH_CHECK(parts >= 1, "titan: chunk_sizes needs parts >= 1, got ", parts);
  TORCH_CHECK(n >= 0, "titan: chunk_sizes needs n >= 0, got ", n);
  const int64_t chunk = (n + parts - 1) / parts;
  std::vector<int64_t> sizes(static_cast<size_t>(parts));
  for (int64_t r = 0; r < parts; ++r) sizes[static_cast<size_t>(r)] = std::clamp<int64_t>(n - r * chunk, 0, chunk);
  return sizes;
}

/// Where part `index` starts when parts of `sizes` are laid end to end (the offset of a rank's
/// chunk given every rank's size).
inline int64_t chunk_offset(const std::vector<int64_t>& sizes, int64_t index) {
  TORCH_CHECK(index >= 0 && index <= static_cast<int64_t>(sizes.size()), "titan: chunk_offset: part ", index,
              " of ", sizes.size());
  int64_t offset = 0;
  for (int64_t r = 0; r < index; ++r) offset += sizes[static_cast<size_t>(r)];
  return offset;
}

namespace detail {

inline c10d::ReduceOp c10d_op(ReduceOp op) {
  return op == ReduceOp::Max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;  // Avg: a sum, then a division
}

inline int64_t max_of(const std::vector<int64_t>& sizes) { return *std::max_element(sizes.begin(), sizes.end()); }

inline void check_sizes(const std::vector<int64_t>& sizes, const ProcessGroup& group, const char* what) {
  TORCH_CHECK(static_cast<int>(sizes.size()) == group.size(), "titan: ", what, " got ", sizes.size(),
              " sizes for a group of ", group.size(), " ranks");
  for (auto s : sizes) TORCH_CHECK(s >= 0, "titan: ", what, " got a negative size ", s);
}

/// Sizes of `x` along `dim` on every rank (one small all-gather, and a host read that waits for
/// the device: the hot paths avoid it by knowing the sizes).
inline std::vector<int64_t> exchange_sizes(const at::Tensor& x, const ProcessGroup& group, int64_t dim) {
  RECORD_USER_SCOPE("titan::exchange_sizes");
  auto mine = at::full({1}, x.size(dim), x.options().dtype(at::kLong));
  auto all = at::empty({group.size()}, mine.options());
  group.backend()->_allgather_base(all, mine)->wait();
  auto cpu = all.cpu();
  return std::vector<int64_t>(cpu.data_ptr<int64_t>(), cpu.data_ptr<int64_t>() + group.size());
}

/// Concatenation along `dim` of every rank's `x` (rank r's has sizes[r] rows along dim). No autograd.
inline at::Tensor all_gather_raw(const at::Tensor& x, const ProcessGroup& group, int64_t dim,
                                 const std::vector<int64_t>& sizes) {
  const int world = group.size();
  if (world == 1) return x;
  const int64_t rows = max_of(sizes);
  auto local = x.movedim(dim, 0).contiguous();  // [sizes[rank], ...rest]
  if (local.size(0) < rows) {
    auto shape = local.sizes().vec();
    shape[0] = rows;
    auto padded = at::zeros(shape, local.options());
    if (local.size(0) > 0) padded.narrow(0, 0, local.size(0)).copy_(local);
    local = std::move(padded);  // [rows, ...rest]
  }
  auto shape = local.sizes().vec();
  shape[0] = rows * world;
  auto gathered = at::empty(shape, local.options());  // [world * rows, ...rest]
  group.backend()->_allgather_base(gathered, local)->wait();
  bool even = std::all_of(sizes.begin(), sizes.end(), [&](int64_t s) { return s == rows; });
  at::Tensor out = gathered;
  if (!even) {
    std::vector<at::Tensor> pieces;
    for (int r = 0; r < world; ++r) pieces.push_back(gathered.narrow(0, r * rows, sizes[static_cast<size_t>(r)]));
    out = at::cat(pieces, 0);  // [sum(sizes), ...rest]
  }
  return out.movedim(0, dim);
}

/// This rank's part (sizes[rank] rows along `dim`) of the reduction of every rank's `x`. No autograd.
inline at::Tensor reduce_scatter_raw(const at::Tensor& x, const ProcessGroup& group, int64_t dim, ReduceOp op,
                                     const std::vector<int64_t>& sizes) {
  const int world = group.size();
  if (world == 1) return x;
  int64_t total = 0;
  for (auto s : sizes) total += s;
  TORCH_CHECK(x.size(dim) == total, "titan: reduce_scatter of a tensor with ", x.size(dim),
              " rows along dim ", dim, " into parts summing to ", total);
  const int64_t rows = max_of(sizes);
  auto full = x.movedim(dim, 0).contiguous();  // [total, ...rest]
  bool even = std::all_of(sizes.begin(), sizes.end(), [&](int64_t s) { return s == rows; });
  if (!even) {
    auto shape = full.sizes().vec();
    shape[0] = rows * world;
    auto padded = at::zeros(shape, full.options());  // [world * rows, ...rest]
    int64_t offset = 0;
    for (int r = 0; r < world; ++r) {
      auto n = sizes[static_cast<size_t>(r)];
      if (n > 0) padded.narrow(0, r * rows, n).copy_(full.narrow(0, offset, n));
      offset += n;
    }
    full = std::move(padded);
  }
  auto shape = full.sizes().vec();
  shape[0] = rows;
  auto out = at::empty(shape, full.options());  // [rows, ...rest]
  c10d::ReduceScatterOptions options;
  options.reduceOp = c10d_op(op);
  group.backend()->_reduce_scatter_base(out, full, options)->wait();
  if (op == ReduceOp::Avg) out.div_(world);
  return out.narrow(0, 0, sizes[static_cast<size_t>(group.rank())]).movedim(0, dim);
}

/// Reduces every rank's `x` (contiguous) into `x` itself: the sum (mean, maximum). No autograd.
inline void all_reduce_raw_(at::Tensor& x, const ProcessGroup& group, ReduceOp op) {
  if (group.size() == 1) return;
  TORCH_CHECK(x.is_contiguous(), "titan: all_reduce_raw_ needs a contiguous tensor, got strides ", x.strides());
  std::vector<at::Tensor> buffer{x};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d_op(op);
  group.backend()->allreduce(buffer, options)->wait();
  if (op == ReduceOp::Avg) x.div_(group.size());
}

/// The sum (mean, maximum) of every rank's `x`, in a new tensor (`x` itself on one rank). No autograd.
inline at::Tensor all_reduce_raw(const at::Tensor& x, const ProcessGroup& group, ReduceOp op) {
  if (group.size() == 1) return x;
  auto out = x.contiguous().clone();
  all_reduce_raw_(out, group, op);
  return out;
}

/// Rank `src`'s `x` on every rank. No autograd.
inline at::Tensor broadcast_raw(const at::Tensor& x, const ProcessGroup& group, int src) {
  if (group.size() == 1) return x;
  std::vector<at::Tensor> buffer{x.contiguous().clone()};
  c10d::BroadcastOptions options;
  options.rootRank = src;
  group.backend()->broadcast(buffer, options)->wait();
  return buffer[0];
}

inline int64_t wrap_dim(int64_t dim, const at::Tensor& x) {
  int64_t rank = x.dim();
  TORCH_CHECK(dim >= -rank && dim < rank, "titan: dim ", dim, " is out of range for a tensor of rank ", rank);
  return dim < 0 ? dim + rank : dim;
}

inline void check_group(const ProcessGroupPtr& group, const char* what) {
  TORCH_CHECK(group, "titan: ", what, " called with a null process group (is this rank outside the group?)");
}

inline void check_differentiable(ReduceOp op, const char* what) {
  TORCH_CHECK(op != ReduceOp::Max, "titan: ", what, " with ReduceOp::Max has no gradient; use titan::dist_max for ",
              "values, or detail::all_reduce_raw");
}

inline torch::autograd::variable_list one(at::Tensor grad) { return torch::autograd::variable_list{std::move(grad)}; }

/// All-to-all: splits `x` along `split_dim` into `split_sizes` (one piece per rank) and sends piece
/// j to rank j; returns the pieces received from every rank, concatenated along `cat_dim` (rank
/// i's has cat_sizes[i] rows there and split_sizes[this rank] along split_dim). No autograd.
inline at::Tensor all_to_all_raw(const at::Tensor& x, const ProcessGroup& group, int64_t split_dim,
                                 const std::vector<int64_t>& split_sizes, int64_t cat_dim,
                                 const std::vector<int64_t>& cat_sizes) {
  const int n = group.size(), me = group.rank();
  std::vector<at::Tensor> pieces;  // this rank's piece for each rank, flattened
  std::vector<int64_t> send_counts, receive_counts;
  auto received_shape = [&](int source) {
    auto shape = x.sizes().vec();
    shape[static_cast<size_t>(split_dim)] = split_sizes[static_cast<size_t>(me)];
    shape[static_cast<size_t>(cat_dim)] = cat_sizes[static_cast<size_t>(source)];
    return shape;
  };
  for (int r = 0; r < n; ++r) {
    pieces.push_back(
        x.narrow(split_dim, chunk_offset(split_sizes, r), split_sizes[static_cast<size_t>(r)]).contiguous().view(-1));
    send_counts.push_back(pieces.back().numel());
    receive_counts.push_back(c10::multiply_integers(received_shape(r)));
  }
  auto input = at::cat(pieces);  // [sum of send_counts]
  auto output = at::empty({c10::sum_integers(receive_counts)}, x.options());
  // Copies: backends may move the count vectors into their work object.
  std::vector<int64_t> output_counts = receive_counts, input_counts = send_counts;
  group.backend()->alltoall_base(output, input, output_counts, input_counts)->wait();
  std::vector<at::Tensor> received;
  for (int r = 0; r < n; ++r)
    received.push_back(
        output.narrow(0, chunk_offset(receive_counts, r), receive_counts[static_cast<size_t>(r)]).view(received_shape(r)));
  return at::cat(received, cat_dim);
}

inline at::Tensor with_backward(const at::Tensor& input, at::Tensor output, const char* name, BackwardFn backward) {
  torch::autograd::variable_list outputs{std::move(output)};
  connect_backward({input}, outputs, name, std::move(backward));
  return outputs[0];
}

}  // namespace detail

/// Concatenates every rank's `x` along `dim`. `sizes[r]` is rank r's size along `dim`; when empty,
/// the sizes are exchanged first (one extra small collective). Backward: reduce-scatter (sum).
inline at::Tensor all_gather(const at::Tensor& x, const ProcessGroupPtr& group, int64_t dim = 0,
                             std::vector<int64_t> sizes = {}) {
  detail::check_group(group, "all_gather");
  dim = detail::wrap_dim(dim, x);
  if (group->size() == 1) return x;
  if (sizes.empty()) sizes = detail::exchange_sizes(x, *group, dim);
  detail::check_sizes(sizes, *group, "all_gather");
  TORCH_CHECK(sizes[static_cast<size_t>(group->rank())] == x.size(dim), "titan: all_gather: this rank's size along dim ",
              dim, " is ", x.size(dim), " but sizes says ", sizes[static_cast<size_t>(group->rank())]);
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::all_gather_raw(x, *group, dim, sizes);
  }
  return detail::with_backward(x, std::move(out), "titan::AllGatherBackward",
                               [group, dim, sizes](torch::autograd::variable_list&& grads) {
                                 return torch::autograd::variable_list{
                                     detail::reduce_scatter_raw(grads[0], *group, dim, ReduceOp::Sum, sizes)};
                               });
}

/// Reduces every rank's `x` and leaves rank r the r-th part along `dim`, of `sizes[r]` rows
/// (default: chunk_sizes of the dimension). Backward: all-gather (scaled by 1/N for Avg).
inline at::Tensor reduce_scatter(const at::Tensor& x, const ProcessGroupPtr& group, int64_t dim = 0,
                                 ReduceOp op = ReduceOp::Sum, std::vector<int64_t> sizes = {}) {
  detail::check_group(group, "reduce_scatter");
  detail::check_differentiable(op, "reduce_scatter");
  dim = detail::wrap_dim(dim, x);
  if (group->size() == 1) return x;
  if (sizes.empty()) sizes = chunk_sizes(x.size(dim), group->size());
  detail::check_sizes(sizes, *group, "reduce_scatter");
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::reduce_scatter_raw(x, *group, dim, op, sizes);
  }
  return detail::with_backward(x, std::move(out), "titan::ReduceScatterBackward",
                               [group, dim, op, sizes](torch::autograd::variable_list&& grads) {
                                 auto grad = detail::all_gather_raw(grads[0], *group, dim, sizes);
                                 if (op == ReduceOp::Avg) grad = grad / group->size();
                                 return torch::autograd::variable_list{grad};
                               });
}

/// The sum (or mean) of every rank's `x`, on every rank. Backward: the same all-reduce of the gradient.
inline at::Tensor all_reduce(const at::Tensor& x, const ProcessGroupPtr& group, ReduceOp op = ReduceOp::Sum) {
  detail::check_group(group, "all_reduce");
  detail::check_differentiable(op, "all_reduce");
  if (group->size() == 1) return x;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::all_reduce_raw(x, *group, op);
  }
  return detail::with_backward(x, std::move(out), "titan::AllReduceBackward",
                               [group, op](torch::autograd::variable_list&& grads) {
                                 return torch::autograd::variable_list{detail::all_reduce_raw(grads[0], *group, op)};
                               });
}

/// Rank `src`'s `x` (rank within the group) on every rank; `x` must have the same shape everywhere.
/// Backward: the gradients of all ranks summed onto `src`, zero on the others.
inline at::Tensor broadcast(const at::Tensor& x, const ProcessGroupPtr& group, int src = 0) {
  detail::check_group(group, "broadcast");
  TORCH_CHECK(src >= 0 && src < group->size(), "titan: broadcast source ", src, " is outside the group of ",
              group->size());
  if (group->size() == 1) return x;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::broadcast_raw(x, *group, src);
  }
  return detail::with_backward(x, std::move(out), "titan::BroadcastBackward",
                               [group, src](torch::autograd::variable_list&& grads) {
                                 auto total = detail::all_reduce_raw(grads[0], *group, ReduceOp::Sum);
                                 if (group->rank() != src) total = at::zeros_like(total);
                                 return torch::autograd::variable_list{total};
                               });
}

/// Replicate -> Replicate feeding a computation that is split over the group (a column-parallel
/// layer; Megatron's f): forward identity, backward all-reduce (sum) of the partial input gradients.
inline at::Tensor copy_to_group(const at::Tensor& x, const ProcessGroupPtr& group) {
  detail::check_group(group, "copy_to_group");
  if (group->size() == 1) return x;
  return detail::with_backward(x, x.detach(), "titan::CopyToGroupBackward",
                               [group](torch::autograd::variable_list&& grads) {
                                 return detail::one(detail::all_reduce_raw(grads[0], *group, ReduceOp::Sum));
                               });
}

/// Partial sums -> Replicate (after a row-parallel layer; Megatron's g): forward all-reduce (sum),
/// backward identity (the gradient of a replicated output is already whole on every rank).
inline at::Tensor reduce_from_group(const at::Tensor& x, const ProcessGroupPtr& group) {
  detail::check_group(group, "reduce_from_group");
  if (group->size() == 1) return x;
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::all_reduce_raw(x, *group, ReduceOp::Sum);
  }
  return detail::with_backward(x, std::move(out), "titan::ReduceFromGroupBackward",
                               [](torch::autograd::variable_list&& grads) { return detail::one(grads[0]); });
}

/// Shard(dim) -> Replicate: forward all-gather along `dim` (rank r holds sizes[r] rows; empty:
/// exchanged), backward this rank's rows of the whole gradient (no communication).
inline at::Tensor gather_from_group(const at::Tensor& x, const ProcessGroupPtr& group, int64_t dim,
                                    std::vector<int64_t> sizes = {}) {
  detail::check_group(group, "gather_from_group");
  dim = detail::wrap_dim(dim, x);
  if (group->size() == 1) return x;
  if (sizes.empty()) sizes = detail::exchange_sizes(x, *group, dim);
  detail::check_sizes(sizes, *group, "gather_from_group");
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::all_gather_raw(x, *group, dim, sizes);
  }
  const int64_t offset = chunk_offset(sizes, group->rank());
  const int64_t rows = sizes[static_cast<size_t>(group->rank())];
  return detail::with_backward(x, std::move(out), "titan::GatherFromGroupBackward",
                               [dim, offset, rows](torch::autograd::variable_list&& grads) {
                                 return detail::one(grads[0].narrow(dim, offset, rows).contiguous());
                               });
}

/// Replicate -> Shard(dim): forward this rank's chunk (torch.chunk sizes) of `dim`, backward
/// all-gather of the chunks' gradients into the whole gradient.
inline at::Tensor scatter_to_group(const at::Tensor& x, const ProcessGroupPtr& group, int64_t dim) {
  detail::check_group(group, "scatter_to_group");
  dim = detail::wrap_dim(dim, x);
  if (group->size() == 1) return x;
  auto sizes = chunk_sizes(x.size(dim), group->size());
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = x.narrow(dim, chunk_offset(sizes, group->rank()), sizes[static_cast<size_t>(group->rank())]).contiguous();
  }
  return detail::with_backward(x, std::move(out), "titan::ScatterToGroupBackward",
                               [group, dim, sizes](torch::autograd::variable_list&& grads) {
                                 return detail::one(detail::all_gather_raw(grads[0], *group, dim, sizes));
                               });
}

/// Shard(from_dim) -> Shard(to_dim) (e.g. sequence-sharded to head-sharded activations): one
/// all-to-all. Rank r sends chunk j of to_dim (torch.chunk sizes) of its local tensor to rank j and
/// concatenates what it receives along from_dim (rank r's size there is from_sizes[r]; empty:
/// exchanged). Backward: the inverse all-to-all of the gradient.
inline at::Tensor all_to_all(const at::Tensor& x, const ProcessGroupPtr& group, int64_t from_dim, int64_t to_dim,
                             std::vector<int64_t> from_sizes = {}) {
  detail::check_group(group, "all_to_all");
  from_dim = detail::wrap_dim(from_dim, x);
  to_dim = detail::wrap_dim(to_dim, x);
  TORCH_CHECK(from_dim != to_dim, "titan: all_to_all needs two different dimensions, got ", from_dim, " twice");
  if (group->size() == 1) return x;
  if (from_sizes.empty()) from_sizes = detail::exchange_sizes(x, *group, from_dim);
  detail::check_sizes(from_sizes, *group, "all_to_all");
  auto to_sizes = chunk_sizes(x.size(to_dim), group->size());
  at::Tensor out;
  {
    at::NoGradGuard no_grad;
    out = detail::all_to_all_raw(x, *group, to_dim, to_sizes, from_dim, from_sizes);
  }
  return detail::with_backward(
      x, std::move(out), "titan::AllToAllBackward",
      [group, from_dim, to_dim, from_sizes, to_sizes](torch::autograd::variable_list&& grads) {
        return detail::one(detail::all_to_all_raw(grads[0].contiguous(), *group, from_dim, from_sizes, to_dim, to_sizes));
      });
}

namespace detail {
inline double reduce_scalar(double value, const ProcessGroupPtr& group, ReduceOp op, const char* what) {
  check_group(group, what);
  if (group->size() == 1) return value;
  auto buffer = at::full({1}, value, at::TensorOptions().dtype(at::kDouble).device(group->device()));
  return all_reduce_raw(buffer, *group, op).item<double>();
}
}  // namespace detail

/// The sum of `value` over the ranks of `group` (e.g. a loss or a token count), on every rank.
inline double dist_sum(double value, const ProcessGroupPtr& group) {
  return detail::reduce_scalar(value, group, ReduceOp::Sum, "dist_sum");
}

/// The maximum of `value` over the ranks of `group`, on every rank.
inline double dist_max(double value, const ProcessGroupPtr& group) {
  return detail::reduce_scalar(value, group, ReduceOp::Max, "dist_max");
}

/// Every rank's `text`, in rank order (a collective over `group`; `{text}` for one rank).
inline std::vector<std::string> all_gather_strings(const ProcessGroupPtr& group, const std::string& text) {
  detail::check_group(group, "all_gather_strings");
  if (group->size() == 1) return {text};
  at::NoGradGuard no_grad;
  auto bytes = at::empty({static_cast<int64_t>(text.size())}, at::kByte);  // [len]
  if (!text.empty()) std::memcpy(bytes.data_ptr(), text.data(), text.size());
  bytes = bytes.to(group->device());
  auto sizes = detail::exchange_sizes(bytes, *group, 0);
  auto all = detail::all_gather_raw(bytes, *group, 0, sizes).cpu().contiguous();  // [sum(sizes)]
  std::vector<std::string> result;
  for (size_t r = 0; r < sizes.size(); ++r) {
    const auto* begin = static_cast<const char*>(all.data_ptr()) + chunk_offset(sizes, static_cast<int64_t>(r));
    result.emplace_back(begin, static_cast<size_t>(sizes[r]));
  }
  return result;
}

/// Runs `work` on every rank, then fails on every rank if it failed on any (naming the first
/// failing rank's error), so that no rank goes on alone.
inline void all_ranks_or_none(const ProcessGroupPtr& group, const std::function<void()>& work) {
  std::string error;
  try {
    work();
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  auto errors = all_gather_strings(group, error);
  for (size_t r = 0; r < errors.size(); ++r) {
    if (errors[r].empty()) continue;
    auto message = c10::str(errors[r]);
    auto cut = message.find("\nException raised from");  // drop c10's C++ backtrace
    if (cut != std::string::npos) message.resize(cut);
    TORCH_CHECK(false, group->size() > 1 ? c10::str("(rank ", group->global_ranks()[r], ") ") : std::string(), message);
  }
}

/// A send or receive in flight (send_async, recv_async). wait() completes it and returns the
/// tensor, a received one on the device it was asked for.
class PendingTransfer {
 public:
  PendingTransfer() = default;
  PendingTransfer(c10::intrusive_ptr<c10d::Work> work, at::Tensor buffer, c10::Device device)
      : work_(std::move(work)), buffer_(std::move(buffer)), device_(device) {}

  at::Tensor wait() {
    if (work_) work_->wait();
    work_.reset();
    return buffer_.device() == device_ ? buffer_ : buffer_.to(device_);
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  at::Tensor buffer_;  // what travels: host memory where the backend needs it
  c10::Device device_{c10::kCPU};
};

namespace detail {
/// Gloo's collectives take CUDA tensors, but its send and recv hand the data pointer to the
/// socket (a device pointer fails in writev with "Bad address"): such transfers go through host
/// copies. NCCL moves device memory itself.
inline bool p2p_through_host(const ProcessGroup& group, c10::Device device) {
  return device.is_cuda() && group.backend() && group.backend()->getBackendName() != "nccl";
}

inline void check_peer(const ProcessGroup& group, int peer, const char* what) {
  TORCH_CHECK(group.size() > 1, "titan: ", what, " needs a group of more than one rank");
  TORCH_CHECK(peer >= 0 && peer < group.size() && peer != group.rank(), "titan: ", what, ": peer ", peer,
              " is not another rank of this group of ", group.size(), " (this rank is ", group.rank(), ")");
}
}  // namespace detail

/// Posts a send of `tensor` to group rank `peer` under `tag`; the peer's recv_async with the same
/// tag receives it. Keep the returned transfer until wait() (the data must stay alive).
inline PendingTransfer send_async(const ProcessGroup& group, const at::Tensor& tensor, int peer, uint32_t tag) {
  detail::check_peer(group, peer, "send_async");
  auto data = tensor.detach().contiguous();
  if (detail::p2p_through_host(group, data.device())) data = data.cpu();
  std::vector<at::Tensor> list{data};
  auto work = group.backend()->send(list, peer, static_cast<int>(tag));
  const auto device = data.device();
  return PendingTransfer(std::move(work), std::move(data), device);
}

/// Posts the receive from group rank `peer` of the tensor it sends under `tag`, of `shape` and
/// `options` (dtype and device of the result).
inline PendingTransfer recv_async(const ProcessGroup& group, at::IntArrayRef shape, const at::TensorOptions& options,
                                  int peer, uint32_t tag) {
  detail::check_peer(group, peer, "recv_async");
  const bool staged = detail::p2p_through_host(group, options.device());
  auto buffer = at::empty(shape, staged ? options.device(at::kCPU) : options);
  std::vector<at::Tensor> list{buffer};
  auto work = group.backend()->recv(list, peer, static_cast<int>(tag));
  return PendingTransfer(std::move(work), std::move(buffer), options.device());
}

}  // namespace titan
