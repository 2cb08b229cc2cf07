#pragma once
// Shared by the checkpoint suite (test_titan) and checkpoint_driver: reproducible global tensors,
// hand-built layouts over a DeviceMesh, a small FSDP model and a directory every rank of a job
// agrees on.
#include <titan/checkpoint.hpp>
#include <titan/dist.hpp>
#include <titan/fsdp.hpp>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <string>
#include <unistd.h>
#include <vector>

namespace titan_ckpt {

/// A reproducible global tensor on the CPU: sin(0.37 * i + index) over the flat index i, cast to `dtype`.
/// tests/checkpoint/read_checkpoint.py computes the same values in Python.
inline torch::Tensor global_tensor(int64_t index, const std::vector<int64_t>& shape, torch::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  auto values = torch::arange(numel, torch::kDouble).mul(0.37).add(static_cast<double>(index)).sin();
  if (dtype == torch::kLong || dtype == torch::kInt) values = values.mul(1000).round();
  return values.to(dtype).reshape(shape);
}

/// This rank's piece of `global` under `layout` (its blocks, laid out as the layout says), on global's device.
inline titan::ShardedTensor shard_of(const torch::Tensor& global, const titan::TensorLayout& layout) {
  auto local = torch::empty(layout.local_shape(), global.options());
  for (const auto& block : layout.local_blocks()) block.view_of(local).copy_(block.view_of_global(global));
  return titan::make_sharded("test tensor", local, layout);
}

/// One tensor of the resharding set: its shape, dtype and how each mesh kind shards it.
struct Spec {
  std::string name;
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
  int tp_dim;  ///< dim sharded over "tp" in the FSDP x TP mesh (-1: not TP-sharded)
  std::vector<int64_t> tp_parts = {};  ///< fused parts along tp_dim (a [q|k|v] projection), or none
};

/// Tensors with uneven sizes, several dtypes and ranks, a scalar.
inline std::vector<Spec> specs() {
  return {{"layers.0.wq", {10, 6}, torch::kFloat, 0},       {"layers.0.wo", {6, 10}, torch::kFloat, 1},
          {"layers.0.norm", {7}, torch::kFloat, -1},        {"embed", {5, 3, 2}, torch::kBFloat16, 0},
          {"counts", {9}, torch::kLong, -1},                {"scale", {}, torch::kDouble, -1},
          {"wide", {3, 257}, torch::kHalf, 1},              {"layers.0.wqkv", {14, 3}, torch::kFloat, 0, {6, 4, 4}}};
}

/// The layout of `spec` on `mesh`: "dp_shard" alone (FSDP: Shard(0) over dp_shard, scalars
/// replicated), or "dp_shard" x "tp" (TP level first on tp_dim, then Shard(0) over dp_shard).
inline titan::TensorLayout layout_for(const Spec& spec, const titan::DeviceMesh& mesh) {
  titan::TensorLayout layout{spec.shape, {}};
  if (spec.shape.empty()) return layout;
  if (mesh.has_dim("tp") && spec.tp_dim >= 0)
    layout = layout.with_level({spec.tp_dim, "tp", mesh.group("tp"), spec.tp_parts});
  return layout.with_level({0, "dp_shard", mesh.group("dp_shard"), {}});
}

/// A directory shared by the ranks of this job (MASTER_PORT differs between jobs), emptied by
/// rank 0 before the others look at it.
inline std::string shared_dir(const titan::WorldPtr& world, const std::string& name) {
  const char* port = std::getenv("MASTER_PORT");
  auto root = std::filesystem::temp_directory_path() /
              ("titan_ckpt_" + (port ? std::string(port) : std::to_string(::getpid())));
  auto dir = (root / name).string();
  if (world->rank() == 0) {
    titan::detail::remove_tree(dir);
    std::filesystem::create_directories(dir);
  }
  world->group()->barrier();
  return dir;
}

/// x + fc2(tanh(fc1(x))): library modules only.
struct ResidualImpl : torch::nn::Module {
  ResidualImpl() {
    fc1 = register_module("fc1", torch::nn::Linear(6, 9));
    fc2 = register_module("fc2", torch::nn::Linear(9, 6));
  }
  torch::Tensor forward(const torch::Tensor& x) { return x + fc2(torch::tanh(fc1(x))); }  // [B, 6]
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(Residual);

/// [B, 5] -> embed -> 2 residual blocks -> head [B, 3], every block and the root FSDP units, on
/// the mesh's device.
struct NetImpl : torch::nn::Module {
  NetImpl(const titan::DeviceMesh& mesh, uint64_t seed) {
    torch::manual_seed(seed);  // the same initial values on every rank
    embed = register_module("embed", torch::nn::Linear(5, 6));
    blocks = register_module("blocks", torch::nn::ModuleList(Residual(), Residual()));
    head = register_module("head", torch::nn::Linear(6, 3));
    to(mesh.world()->device());
    for (const auto& block : *blocks) titan::fully_shard(block, mesh);
    titan::fully_shard(*this, mesh);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = embed(x);
    for (const auto& block : *blocks) h = titan::call(block->as<ResidualImpl>(), h);
    return head(h);
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  torch::nn::ModuleList blocks{nullptr};
};
TORCH_MODULE(Net);

/// Trains `model` (inputs [4, 5] -> outputs [4, 3], MSE) for steps [first, last] on this rank's
/// batches, drawn from `seed` + 10 * step + rank (targets from seed + 1000 + ...) and put on the
/// device of its parameters; `lr_of_step`, when given, sets every group's learning rate first.
/// Returns the losses.
template <typename Model>
std::vector<float> train_steps(Model& model, torch::optim::Optimizer& optimizer, int first, int last, int rank,
                               int seed, const std::function<double(int)>& lr_of_step = nullptr) {
  std::vector<float> losses;
  const auto device = model->parameters().front().device();
  for (int step = first; step <= last; ++step) {
    auto x = global_tensor(seed + 10 * step + rank, {4, 5}, torch::kFloat).to(device);
    auto y = global_tensor(seed + 1000 + 10 * step + rank, {4, 3}, torch::kFloat).to(device);
    if (lr_of_step)
      for (auto& group : optimizer.param_groups()) group.options().set_lr(lr_of_step(step));
    optimizer.zero_grad();
    torch::Tensor loss = torch::mse_loss(titan::call(model, x), y);
    loss.backward();
    optimizer.step();
    losses.push_back(loss.item<float>());
  }
  return losses;
}

/// train_steps of Net with the batches of seed 3000.
inline std::vector<float> train_net(Net& model, torch::optim::Optimizer& optimizer, int first, int last, int rank) {
  return train_steps(model, optimizer, first, last, rank, 3000);
}

}  // namespace titan_ckpt
