#include "registry.hpp"

#include <c10/util/StringUtil.h>

#include <algorithm>

namespace titan::examples {

// The built-in families. A new family: its folder, its sources in models/CMakeLists.txt, and one
// line each below (the declaration and the call).
void register_llama(ModelRegistry& registry);  // llama/spec.cpp: llama2, llama3, llama3.1, mistral, mixtral, qwen3_moe

ModelRegistry& ModelRegistry::add(ModelSpec spec) {
  TORCH_CHECK(!spec.name.empty(), "ModelRegistry::add: the spec has no name");
  const std::pair<const char*, bool> functions[] = {
      {"build", static_cast<bool>(spec.build)},           {"parallelize", static_cast<bool>(spec.parallelize)},
      {"pipeline_split", static_cast<bool>(spec.pipeline_split)}, {"init_weights", static_cast<bool>(spec.init_weights)},
      {"facts", static_cast<bool>(spec.facts)},           {"load_hf", static_cast<bool>(spec.load_hf)},
      {"save_hf", static_cast<bool>(spec.save_hf)}};
  for (const auto& [what, set] : functions)
    TORCH_CHECK(set, "ModelRegistry::add: model '", spec.name, "' has no ", what, " function (every one is required)");
  TORCH_CHECK(!spec.flavors.empty(), "ModelRegistry::add: model '", spec.name, "' lists no flavor");
  TORCH_CHECK(!contains(spec.name), "ModelRegistry::add: model '", spec.name, "' is already registered");
  auto name = spec.name;
  specs_.emplace(std::move(name), std::move(spec));
  return *this;
}

const ModelSpec& ModelRegistry::at(const std::string& name) const {
  auto it = specs_.find(name);
  TORCH_CHECK(it != specs_.end(), "model.name = '", name, "' is not a registered model (expected one of: ",
              c10::Join(", ", names()), ")");
  return it->second;
}

std::vector<std::string> ModelRegistry::names() const {
  std::vector<std::string> names;
  for (const auto& item : specs_) names.push_back(item.first);
  return names;
}

ModelRegistry& model_registry() {
  static ModelRegistry registry = [] {
    ModelRegistry builtin;
    register_llama(builtin);
    return builtin;
  }();
  return registry;
}

const ModelSpec& model_spec_of(const TrainConfig& config) {
  const auto& spec = model_registry().at(config.model.name);
  const auto& flavors = spec.flavors;
  TORCH_CHECK(std::find(flavors.begin(), flavors.end(), config.model.flavor) != flavors.end(), "model.flavor = '",
              config.model.flavor, "' is not a flavor of ", spec.name, " (expected one of: ", c10::Join(", ", flavors), ")");
  return spec;
}

}  // namespace titan::examples
