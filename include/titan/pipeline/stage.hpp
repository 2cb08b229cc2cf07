#pragma once
// titan/pipeline/stage.hpp: stages from an unchanged model: cutting it by module names
// (PipelineSplit), pruning a rank's copy to its stage, and one view over a rank's stages.

#include <titan/hooks.hpp>
#include <titan/sharding.hpp>
#include <titan/tensor_parallel.hpp>

#include <torch/arg.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace titan {

/// How a model is cut into stages, by module names relative to the model: `first` modules run
/// before the layers and go to the first stage, the children of the `layers` container are cut
/// into consecutive runs (at `split_points`, or evenly), `last` modules go to the last stage.
struct PipelineSplit {
  /// Modules of the first stage that run before the layers (e.g. {"tok_embeddings"}).
  TORCH_ARG(std::vector<std::string>, first) = {};
  /// The container (ModuleList, ModuleDict or any module) whose children are the layers, in order.
  TORCH_ARG(std::string, layers) = "layers";
  /// Modules of the last stage that run after the layers (e.g. {"norm", "output"}).
  TORCH_ARG(std::vector<std::string>, last) = {};
  /// Layer names where stages 1, 2, ... begin (torchtitan's pipeline_parallel_split_points, e.g.
  /// {"layers.4"}): one fewer than the stages. Empty: the layers are split evenly (the first
  /// stages take one more when they do not divide).
  TORCH_ARG(std::vector<std::string>, split_points) = {};
};

namespace detail {

inline torch::nn::Module& submodule(torch::nn::Module& root, const std::string& name, const char* what) {
  torch::nn::Module* m = &root;
  std::string path;
  for (const auto& part : split_dots(name)) {
    const auto& children = child_dict(*m);
    const auto* found = children.find(part);
    TORCH_CHECK(found != nullptr, "titan pipeline: the model has no module '", name, "' (", what, "); '",
                path.empty() ? std::string("<root>") : path, "' has children ", [&] {
                  std::string list;
                  for (const auto& c : children) list += (list.empty() ? "" : ", ") + c.key();
                  return list.empty() ? std::string("none") : list;
                }());
    path += (path.empty() ? "" : ".") + part;
    m = found->get();
  }
  return *m;
}

}  // namespace detail

/// The module names each of `num_stages` stages keeps: stage 0 the `first` modules and its layers,
/// the last stage its layers and the `last` modules. A split that leaves a stage without layers,
/// an unknown or out-of-order split point, or a parameter of the model outside every stage is an
/// error naming it.
inline std::vector<std::vector<std::string>> pipeline_stage_modules(torch::nn::Module& model,
                                                                    const PipelineSplit& split, int64_t num_stages) {
  TORCH_CHECK(num_stages >= 1, "titan pipeline: the number of stages must be >= 1, got ", num_stages);
  auto& container = detail::submodule(model, split.layers(), "PipelineSplit::layers");
  std::vector<std::string> layers;
  for (const auto& child : detail::child_dict(container))
    if (child.key() != detail::kHookSlotName) layers.push_back(split.layers() + "." + child.key());
  const auto count = static_cast<int64_t>(layers.size());
  std::vector<int64_t> begins;  // first layer index of each stage
  if (split.split_points().empty()) {
    TORCH_CHECK(count >= num_stages, "titan pipeline: ", count, " layers cannot fill ", num_stages,
                " stages: a stage would be empty (use fewer stages or stages per rank)");
    for (int64_t s = 0, at = 0; s < num_stages; ++s) {
      begins.push_back(at);
      at += count / num_stages + (s < count % num_stages ? 1 : 0);
    }
  } else {
    TORCH_CHECK(static_cast<int64_t>(split.split_points().size()) == num_stages - 1, "titan pipeline: ",
                split.split_points().size(), " split points make ", split.split_points().size() + 1,
                " stages but the pipeline has ", num_stages, " (pipeline degree x stages per rank)");
    begins.push_back(0);
    for (const auto& point : split.split_points()) {
      auto it = std::find(layers.begin(), layers.end(), point);
      TORCH_CHECK(it != layers.end(), "titan pipeline: split point '", point, "' is not a layer; layers are '",
                  layers.front(), "' ... '", layers.back(), "'");
      const auto at = static_cast<int64_t>(it - layers.begin());
      TORCH_CHECK(at > begins.back(), "titan pipeline: split point '", point, "' leaves stage ", begins.size() - 1,
                  " without layers (split points must be increasing layer names after the first)");
      begins.push_back(at);
    }
  }
  begins.push_back(count);
  std::vector<std::vector<std::string>> stages(static_cast<size_t>(num_stages));
  for (int64_t s = 0; s < num_stages; ++s) {
    auto& names = stages[static_cast<size_t>(s)];
    if (s == 0) names = split.first();
    for (int64_t l = begins[static_cast<size_t>(s)]; l < begins[static_cast<size_t>(s) + 1]; ++l)
      names.push_back(layers[static_cast<size_t>(l)]);
    if (s == num_stages - 1) names.insert(names.end(), split.last().begin(), split.last().end());
  }
  for (const auto& name : split.first()) detail::submodule(model, name, "PipelineSplit::first");
  for (const auto& name : split.last()) detail::submodule(model, name, "PipelineSplit::last");
  // Every parameter must belong to one stage: a module kept nowhere would lose its weights.
  for (const auto& item : model.named_parameters(true)) {
    bool owned = false;
    for (const auto& names : stages)
      for (const auto& n : names) owned = owned || item.key().rfind(n + ".", 0) == 0;
    TORCH_CHECK(owned, "titan pipeline: parameter '", item.key(), "' is in no stage: add its module to ",
                "PipelineSplit::first or ::last (or the layers)");
  }
  return stages;
}

namespace detail {

/// Attached by keep_pipeline_stage to each module it removes: a forward that still reaches one (a
/// loop over a ModuleList's own vector, which keeps the removed layers) fails naming it.
class PrunedModuleHook : public ModuleHook {
 public:
  PrunedModuleHook(std::string module, int64_t stage, int64_t owner)
      : module_(std::move(module)), stage_(stage), owner_(owner) {}
  std::string name() const override { return "removed by keep_pipeline_stage"; }
  at::Tensor forward(torch::nn::Module&, const TensorList&, const ForwardFn&) override {
    TORCH_CHECK(false, "titan pipeline: module '", module_, "' ran in stage ", stage_, ", but ",
                owner_ >= 0 ? "stage " + std::to_string(owner_) + " holds it" : std::string("no stage holds it"),
                " (keep_pipeline_stage removed it from this stage's model; a ModuleList's own vector still lists ",
                "removed layers). Iterate the container's children(), which are this stage's layers: ",
                "for (const auto& layer : layers->children()) h = titan::call(*layer->as<Block>(), h)");
  }

 private:
  std::string module_;
  int64_t stage_, owner_;
};

}  // namespace detail

/// Removes from `model` every submodule stage `stage` of `num_stages` does not keep
/// (pipeline_stage_modules), so its parameters are never materialised; the kept ones keep their
/// names. Buffers of the root stay on every stage. A removed module that the forward still calls
/// through titan::call (a loop over a ModuleList's own vector) is an error naming it and the stage
/// that holds it. Call it on the model built on the meta device, before parallelizing it.
inline void keep_pipeline_stage(torch::nn::Module& model, const PipelineSplit& split, int64_t num_stages,
                                int64_t stage) {
  TORCH_CHECK(stage >= 0 && stage < num_stages, "titan pipeline: stage ", stage, " is not in [0, ", num_stages, ")");
  const auto stages = pipeline_stage_modules(model, split, num_stages);
  const auto& keep = stages[static_cast<size_t>(stage)];
  auto owner_of = [&stages](const std::string& name) {  // the stage holding `name` (or part of it), or -1
    for (size_t s = 0; s < stages.size(); ++s)
      for (const auto& k : stages[s])
        if (k == name || k.rfind(name + ".", 0) == 0) return static_cast<int64_t>(s);
    return int64_t{-1};
  };
  std::function<void(torch::nn::Module&, const std::string&)> prune = [&](torch::nn::Module& m,
                                                                          const std::string& path) {
    std::vector<std::string> drop;
    for (const auto& child : detail::child_dict(m)) {
      const std::string name = path.empty() ? child.key() : path + "." + child.key();
      bool kept = false, above = false;
      for (const auto& k : keep) {
        kept = kept || k == name;
        above = above || k.rfind(name + ".", 0) == 0;
      }
      if (above && !kept) prune(*child.value(), name);
      if (!above && !kept) {
        attach_hook(*child.value(), std::make_shared<detail::PrunedModuleHook>(name, stage, owner_of(name)));
        drop.push_back(child.key());
      }
    }
    for (const auto& key : drop) m.unregister_module(key);
  };
  prune(model, "");
}

/// The entries of `plan` that match a module of `stage_module` (a stage keeps only some of the
/// whole model's modules; parallelize_module rejects entries that match nothing).
inline ParallelizePlan plan_for_stage(const ParallelizePlan& plan, torch::nn::Module& stage_module) {
  ParallelizePlan kept;
  for (const auto& [pattern, style] : plan.entries())
    if (!modules_matching(stage_module, pattern).empty()) kept.add(pattern, style);
  return kept;
}

namespace detail {

/// The layouts of a stages view's parameters: each answered by the stage module holding it.
class StagesLayoutHook : public ModuleHook, public ParameterLayoutProvider {
 public:
  explicit StagesLayoutHook(std::vector<std::shared_ptr<torch::nn::Module>> stages) : stages_(std::move(stages)) {}
  std::string name() const override { return "pipeline stages view"; }
  at::Tensor forward(torch::nn::Module&, const TensorList&, const ForwardFn&) override {
    TORCH_CHECK(false, "titan::pipeline_stages_view: the view is for state (checkpoints, optimizers, clipping); ",
                "run the stages through titan::Pipeline");
  }
  std::optional<TensorLayout> layout_of(const std::string& name) const override {
    for (const auto& stage : stages_) {
      const auto params = stage->named_parameters(true);
      if (const auto* p = params.find(name)) return parameter_layout(*stage, name, *p);
    }
    return std::nullopt;
  }

 private:
  std::vector<std::shared_ptr<torch::nn::Module>> stages_;
};

/// Registers under `view` the children of `parts` (modules at the same path), merging the
/// containers several of them hold.
inline void merge_children(torch::nn::Module& view, const std::vector<torch::nn::Module*>& parts) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::shared_ptr<torch::nn::Module>>> holders;
  for (auto* part : parts) {
    for (const auto& child : child_dict(*part)) {
      if (child.key() == kHookSlotName) continue;
      if (!holders.count(child.key())) order.push_back(child.key());
      holders[child.key()].push_back(child.value());
    }
  }
  for (const auto& key : order) {
    const auto& same = holders[key];
    if (same.size() == 1) {
      view.register_module(key, same.front());
      continue;
    }
    std::vector<torch::nn::Module*> nested;
    for (const auto& m : same) {
      TORCH_CHECK(m->named_parameters(false).is_empty(), "titan::pipeline_stages_view: module '", key,
                  "' holds parameters of its own in several stages");
      nested.push_back(m.get());
    }
    auto merged = std::make_shared<torch::nn::Module>(key);
    merge_children(*merged, nested);
    view.register_module(key, merged);
  }
}

}  // namespace detail

/// One module presenting every stage this rank holds (interleaved schedules: several pruned
/// copies of the model) under the whole model's names, sharing their parameters: for a
/// checkpoint's TrainState::model, an optimizer, clip_grad_norm_ or an export. Buffers are the
/// first stage's. It cannot be called: run the stages through Pipeline.
inline std::shared_ptr<torch::nn::Module> pipeline_stages_view(
    const std::vector<std::shared_ptr<torch::nn::Module>>& stages) {
  TORCH_CHECK(!stages.empty(), "titan::pipeline_stages_view: no stages");
  auto view = std::make_shared<torch::nn::Module>("PipelineStages");
  std::vector<torch::nn::Module*> parts;
  for (const auto& stage : stages) parts.push_back(stage.get());
  detail::merge_children(*view, parts);
  for (const auto& item : stages.front()->named_buffers(false)) view->register_buffer(item.key(), item.value());
  attach_hook(*view, std::make_shared<detail::StagesLayoutHook>(stages));
  return view;
}

}  // namespace titan
