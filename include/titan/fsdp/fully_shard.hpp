#pragma once
// titan/fsdp/fully_shard.hpp: the public entry points: fully_shard (sharding a module's parameters
// into a unit) and the functions over a model's units (FSDP2's _fully_shard.py).

#include <titan/collectives.hpp>
#include <titan/detail/torch_internals.hpp>
#include <titan/fsdp/options.hpp>
#include <titan/fsdp/param.hpp>
#include <titan/fsdp/unit.hpp>
#include <titan/hooks.hpp>
#include <titan/mesh.hpp>
#include <titan/sharding.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace titan {

namespace detail {

/// Parameters of `module` not owned by a unit below it, with their dotted names relative to it.
inline void collect_unit_parameters(torch::nn::Module& module, const std::string& prefix,
                                    std::vector<std::tuple<std::string, torch::nn::Module*, std::string>>& out) {
  for (auto& item : parameter_dict(module)) {
    // An undefined entry is a parameter the module does without (Linear's bias with bias(false)).
    if (item.value().defined()) out.emplace_back(prefix + item.key(), &module, item.key());
  }
  for (const auto& child : module.named_children()) {
    if (child.key() == kHookSlotName || find_hook<FsdpHook>(*child.value())) continue;
    collect_unit_parameters(*child.value(), prefix + child.key() + ".", out);
  }
}

}  // namespace detail

/// Shards `module`'s parameters (those no unit below it owns) along dim 0 across the mesh's shard
/// dimension and attaches the FSDP hook run by titan::call. `mesh` is 1-D (shard dim, e.g.
/// mesh["dp_shard"]) or 2-D for HSDP (replicate dim, shard dim: mesh.slice({"dp_replicate",
/// "dp_shard"})): gradients are reduce-scattered over the shard dim, then all-reduced over the
/// replicate dim. Apply it bottom-up (blocks, then the root). `module` may be a module, a
/// ModuleHolder or a pointer to one. Returns the unit's hook. (Longer than most: it checks every
/// parameter before changing any, so that a refused call leaves the model intact, then shards.)
template <typename M>
std::shared_ptr<FsdpHook> fully_shard(M&& module_like, const DeviceMesh& mesh, FsdpOptions options = {}) {
  torch::nn::Module& module = detail::module_ref(module_like);
  TORCH_CHECK(mesh.ndim() == 1 || mesh.ndim() == 2, "titan::fully_shard: the mesh must be 1-D (shard) or 2-D ",
              "(replicate, shard) but has ", mesh.ndim(), " dimensions");
  TORCH_CHECK(!find_hook<FsdpHook>(module), "titan::fully_shard: module '", module.name(), "' is already sharded");
  const std::string shard_dim = mesh.dim_names().back();
  ProcessGroupPtr shard_group = mesh.group(shard_dim);
  ProcessGroupPtr replicate_group = mesh.ndim() == 2 ? mesh.group(mesh.dim_names().front()) : nullptr;
  TORCH_CHECK(shard_group, "titan::fully_shard: this rank is not in the mesh's '", shard_dim, "' group");
  if (auto pt = options.param_dtype())
    TORCH_CHECK(at::isFloatingType(*pt), "titan::fully_shard: param_dtype must be floating point, got ", *pt);

  // Parameters already managed by units below: a tie to one of them cannot be sharded twice.
  std::unordered_map<c10::TensorImpl*, std::string> below;
  module.apply([&below](torch::nn::Module& m) {
    if (auto hook = find_hook<FsdpHook>(m))
      for (const auto& p : hook->params()) below.emplace(p.unsharded.unsafeGetTensorImpl(), p.names.front());
  });

  std::vector<std::tuple<std::string, torch::nn::Module*, std::string>> entries;
  detail::collect_unit_parameters(module, "", entries);
  TORCH_CHECK(!entries.empty(), "titan::fully_shard: module '", module.name(),
              "' has no parameters of its own (all belong to units below it)");
  // Check every entry before changing anything, so a refused call leaves the model intact.
  for (auto& [name, owner, key] : entries) {
    const at::Tensor& tensor = detail::parameter_dict(*owner)[key];
    auto tied = below.find(tensor.unsafeGetTensorImpl());
    TORCH_CHECK(tied == below.end(), "titan::fully_shard: parameter '", name, "' of '", module.name(),
                "' is the same tensor as '", tied == below.end() ? "" : tied->second,
                "' of a unit already sharded below it; tied (shared) parameters must belong to one unit");
    TORCH_CHECK(tensor.is_meta() || tensor.storage().nbytes() >= static_cast<size_t>(tensor.numel()) * tensor.element_size(),
                "titan::fully_shard: parameter '", name, "' of '", module.name(), "' has no memory: it is the ",
                "unsharded parameter of another fully_shard unit; tied (shared) parameters must belong to one unit");
    TORCH_CHECK(tensor.dim() >= 1, "titan::fully_shard: parameter '", name, "' is 0-dimensional; FSDP shards dim 0 ",
                "(give it shape [1])");
    // One flat buffer per unit carries every parameter: they need one dtype to gather in.
    const auto& [first_name, first_owner, first_key] = entries.front();
    const auto first_dtype = detail::parameter_dict(*first_owner)[first_key].scalar_type();
    TORCH_CHECK(options.param_dtype() || tensor.scalar_type() == first_dtype, "titan::fully_shard: parameter '", name,
                "' of '", module.name(), "' is ", tensor.scalar_type(), " but '", first_name, "' is ", first_dtype,
                "; one unit gathers its parameters in one dtype: convert them to one dtype, set ",
                "FsdpOptions().param_dtype(...), or shard them in separate units");
  }
  std::vector<FsdpHook::Param> params;
  std::unordered_map<c10::TensorImpl*, size_t> index;
  const int world = shard_group->size();
  const int rank = shard_group->rank();
  for (auto& [name, owner, key] : entries) {
    at::Tensor tensor = detail::parameter_dict(*owner)[key];
    auto* impl = tensor.unsafeGetTensorImpl();
    if (auto it = index.find(impl); it != index.end()) {  // tied inside this unit: one shard for both
      params[it->second].names.push_back(name);
      params[it->second].owners.emplace_back(owner, key);
      continue;
    }
    FsdpHook::Param p;
    p.names = {name};
    p.owners = {{owner, key}};
    p.layout = parameter_layout(module, name, tensor).with_level(ShardLevel{0, shard_dim, shard_group, {}});
    p.shape = tensor.sizes().vec();
    p.rows = chunk_sizes(p.shape[0], world);
    p.padded_rows = p.rows.front();
    p.row_numel = p.shape[0] == 0 ? 0 : tensor.numel() / p.shape[0];
    const int64_t offset = chunk_offset(p.rows, rank);
    {
      at::NoGradGuard no_grad;
      at::Tensor local = tensor.narrow(0, offset, p.rows[static_cast<size_t>(rank)]);
      p.sharded = tensor.is_meta() ? at::empty(local.sizes(), tensor.options()) : local.clone(at::MemoryFormat::Contiguous);
      p.sharded.set_requires_grad(tensor.requires_grad());
      // The member handle becomes the unsharded parameter (FsdpHook points it at the placeholder
      // until the first all-gather fills the unit's storage).
      tensor.mutable_grad() = at::Tensor();
      p.unsharded = tensor;
      p.custom_gather = detail::custom_gather(*owner, key);
    }
    index.emplace(impl, params.size());
    params.push_back(std::move(p));
  }
  for (const auto& p : params)
    for (const auto& [owner, key] : p.owners) detail::parameter_dict(*owner)[key] = p.sharded;
  auto hook = std::make_shared<FsdpHook>(std::move(params), std::move(shard_group), std::move(replicate_group),
                                         std::move(options), module.name());
  attach_hook(module, hook);
  detail::visit_modules(module, "", [&hook](const std::string& path, torch::nn::Module& m) {
    if (auto unit = path.empty() ? nullptr : find_hook<FsdpHook>(m)) unit->set_enclosing(hook, path);
  });
  return hook;
}

/// The fully_shard units in `module`'s subtree (a module, a ModuleHolder or a pointer to one),
/// `module`'s own first, in pre-order.
template <typename M>
std::vector<std::shared_ptr<FsdpHook>> fsdp_units(const M& module) {
  return detail::hooks_in_subtree<FsdpHook>(detail::module_ref(module));
}

/// Turns gradient reduction on or off for every unit in `module`'s subtree (off: gradient
/// accumulation micro-steps keep the unsharded gradients; the next synced backward reduces them).
/// `module` may be a module, a ModuleHolder or a pointer to one.
template <typename M>
void set_requires_gradient_sync(const M& module, bool sync) {
  for (const auto& hook : fsdp_units(module)) hook->set_requires_gradient_sync(sync);
}

/// Sets FsdpHook::set_reshard_after_backward on every unit in `module`'s subtree (off: the
/// micro-batches of a pipeline step share one all-gather; see titan/pipeline.hpp).
template <typename M>
void set_reshard_after_backward(const M& module, bool reshard) {
  for (const auto& hook : fsdp_units(module)) hook->set_reshard_after_backward(reshard);
}

/// Frees the unsharded parameters of every unit in `module`'s subtree (a module, a ModuleHolder
/// or a pointer to one).
template <typename M>
void reshard(const M& module) {
  for (const auto& hook : fsdp_units(module)) hook->reshard();
}

/// Checks that `optimizer` updates `model`'s parameters as fully_shard left them (`model`: a
/// module, a ModuleHolder or a pointer to one). An optimizer built before fully_shard holds the
/// unsharded tensors fully_shard took out of the parameter dictionary: their gradients are freed
/// after each reduction, so it would never change the model. The error names the parameter.
template <typename M>
void verify_optimizer(const torch::optim::Optimizer& optimizer, const M& model) {
  const torch::nn::Module& root = detail::module_ref(model);
  std::unordered_map<const c10::TensorImpl*, std::string> unsharded;  // -> the parameter's name
  detail::visit_modules(root, "", [&unsharded](const std::string& path, const torch::nn::Module& m) {
    if (auto unit = find_hook<FsdpHook>(m))
      for (const auto& p : unit->params())
        unsharded.emplace(p.unsharded.unsafeGetTensorImpl(), (path.empty() ? "" : path + ".") + p.names.front());
  });
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) {
      auto it = unsharded.find(param.unsafeGetTensorImpl());
      TORCH_CHECK(it == unsharded.end(), "titan::verify_optimizer: the optimizer holds parameter '", it->second,
                  "' of '", root.name(), "' as it was before fully_shard (the unsharded tensor, whose gradient FSDP ",
                  "frees after reducing it), so it would never update the model: build the optimizer after ",
                  "fully_shard, from model->parameters()");
    }
  }
}

}  // namespace titan
