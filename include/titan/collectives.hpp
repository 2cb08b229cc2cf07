#pragma once
// titan/collectives.hpp: collectives over a ProcessGroup, differentiable and uneven-size aware.
//
//   forward                      backward
//   all_gather     (concat)      reduce_scatter (sum) of the gradient
//   reduce_scatter (sum|avg)     all_gather of the gradient (scaled by 1/N for avg)
//   all_reduce     (sum|avg)     all_reduce (sum|avg) of the gradient
//   broadcast      (from src)    gradients summed onto src, zero elsewhere
//
// The backward is that of the sum of every rank's loss, which is what data and tensor parallel
// training differentiate. Uneven sizes along the gathered or scattered dimension are padded to the
// largest and trimmed again, so any split works.

#include <titan/detail/autograd.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

namespace titan {

/// How a reduction combines the ranks' tensors.
enum class ReduceOp { Sum, Avg };

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

namespace detail {

inline int64_t max_of(const std::vector<int64_t>& sizes) { return *std::max_element(sizes.begin(), sizes.end()); }

inline void check_sizes(const std::vector<int64_t>& sizes, const ProcessGroup& group, const char* what) {
  TORCH_CHECK(static_cast<int>(sizes.size()) == group.size(), "titan: ", what, " got ", sizes.size(),
              " sizes for a group of ", group.size(), " ranks");
  for (auto s : sizes) TORCH_CHECK(s >= 0, "titan: ", what, " got a negative size ", s);
}

/// Sizes of `x` along `dim` on every rank (one small all-gather).
inline std::vector<int64_t> exchange_sizes(const at::Tensor& x, const ProcessGroup& group, int64_t dim) {
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
  group.backend()->_reduce_scatter_base(out, full)->wait();
  if (op == ReduceOp::Avg) out.div_(world);
  return out.narrow(0, 0, sizes[static_cast<size_t>(group.rank())]).movedim(0, dim);
}

/// The sum (or mean) of every rank's `x`. No autograd.
inline at::Tensor all_reduce_raw(const at::Tensor& x, const ProcessGroup& group, ReduceOp op) {
  if (group.size() == 1) return x;
  std::vector<at::Tensor> buffer{x.contiguous().clone()};
  group.backend()->allreduce(buffer)->wait();
  if (op == ReduceOp::Avg) buffer[0].div_(group.size());
  return buffer[0];
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

}  // namespace titan
