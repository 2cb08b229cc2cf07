#include "parallelize.hpp"

#include <titan/ac.hpp>
#include <titan/context_parallel.hpp>
#include <titan/expert_parallel.hpp>
#include <titan/float8.hpp>
#include <titan/fsdp.hpp>
#include <titan/pipeline.hpp>
#include <titan/tensor_parallel.hpp>

#include <algorithm>
#include <set>
#include <string>
#include <vector>

namespace titan::examples {

namespace {

/// With model.fused_projections a block computes q, k and v (gate and up) in one call
/// (titan::call_fused), whose layers must all run in float8 or all stay in high precision.
void check_fused_float8(const TransformerImpl& model, const std::vector<std::string>& converted) {
  static const std::vector<std::vector<std::string>> groups{{"wq", "wk", "wv"}, {"w1", "w3"}};
  const std::set<std::string> in_float8(converted.begin(), converted.end());
  const auto modules = model.named_modules();
  for (const auto& name : converted) {
    const auto dot = name.rfind('.');
    const std::string parent = name.substr(0, dot + 1), leaf = name.substr(dot + 1);
    for (const auto& group : groups) {
      if (std::find(group.begin(), group.end(), leaf) == group.end()) continue;
      for (const auto& sibling : group)
        TORCH_CHECK(!modules.contains(parent + sibling) || in_float8.count(parent + sibling),
                    "model.fused_projections = true computes ", parent, c10::Join("|", group), " in one call, but ",
                    "float8 converts '", name, "' and leaves '", parent + sibling, "' in high precision ",
                    "(float8.filter_fqns, or a dimension that is not a multiple of 16): convert all of them or ",
                    "none, or set model.fused_projections = false");
    }
  }
}

}  // namespace

void parallelize_llama(TransformerImpl& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                       const TrainConfig& config) {
  const auto& parallelism = config.parallelism;
  if (config.float8.enable) {  // first: the float8 hooks sit innermost, under TP's
    const auto converted = titan::convert_to_float8_training(
        model, titan::Float8Options()
                   .recipe(titan::parse_float8_recipe(config.float8.recipe_name))
                   .filter_fqns(comma_list(config.float8.filter_fqns))
                   .enable_fsdp_float8_all_gather(config.float8.enable_fsdp_float8_all_gather)
                   .emulate(config.float8.emulate)
                   .is_linear(titan::is_module<LinearImpl>));
    if (model.args.fused_projections()) check_fused_float8(model, converted);
  }
  if (dims.tp > 1) {
    auto plan = llama_tp_plan(tp_dims(model.args), dims.tp,
                              TpPlanOptions()
                                  .sequence_parallel(parallelism.enable_sequence_parallel)
                                  .loss_parallel(parallelism.enable_loss_parallel)
                                  .experts_over_tp(dims.ep_from_tp() > 1)
                                  .expert_tensor_parallel(dims.etp > 1)
                                  .document_mask(config.model.attn_mask_type == "block_causal"));
    titan::parallelize_module(model, mesh["tp"], titan::plan_for_stage(plan, model));  // a stage: its entries
  }
  TORCH_CHECK(dims.ep == 1 || model.args.is_moe(), "parallelism.expert_parallel_degree = ", dims.ep, " needs a ",
              "mixture-of-experts model (model.name mixtral or qwen3_moe); this one has dense blocks");
  TORCH_CHECK(dims.etp == 1 || model.args.is_moe(), "parallelism.expert_tensor_parallel_degree = ", dims.etp,
              " needs a mixture-of-experts model (model.name mixtral or qwen3_moe); this one has dense blocks");
  if (dims.ep > 1 && model.layers->size() > 0)  // a stage holds some of the layers
    titan::apply_expert_parallel(model, "layers.*.moe.experts", mesh.group("ep"),
                                 titan::ExpertParallelOptions().gradient_divide_factor(
                                     dims.expert_gradient_divide_factor(parallelism.enable_sequence_parallel)));
  if (dims.cp > 1) {  // the attention cores attend across the cp ranks' parts of each sequence
    titan::apply_context_parallel(
        model, "layers.*.attention.core", mesh.group("cp"),
        titan::ContextParallelOptions()
            .rotate_method(titan::parse_rotate_method(parallelism.context_parallel_rotate_method))
            .sliding_window(model.args.sliding_window()));
  }
  titan::apply_activation_checkpointing(model.layers, activation_checkpoint_options(config));
  if (!needs_fsdp(dims, config)) return;
  const auto fsdp_mesh = dims.fsdp_mesh(mesh);
  auto options = fsdp_options(config);
  // One rank (FSDP only for bf16 compute): resharding frees nothing another rank needs, and the
  // backward's gather would only cast the same shards again. Kept gathered, each unit casts its
  // parameters once per step (torchtitan trains one GPU without FSDP, casting at every use).
  if (fsdp_mesh.size() == 1) options.reshard_after_forward(false);
  // A block's hidden states arrive in the compute dtype (from the embedding's unit or the previous
  // stage); its RoPE tables stay fp32, as torchtitan's complex freqs_cis (FSDP2 casts no complex).
  auto block_options = titan::FsdpOptions(options).cast_forward_inputs(false);
  const auto expert_mesh = dims.expert_fsdp_mesh(mesh);
  for (const auto& layer : model.layers->children()) {
    // The experts first, over the ranks that hold the same experts: a unit of their own.
    if (auto* block = layer->as<TransformerBlockImpl>(); block->moe && dims.ep > 1)
      titan::fully_shard(*block->moe->experts, expert_mesh, block_options);
    titan::fully_shard(*layer, fsdp_mesh, block_options);
  }
  // The root unit holds what no block does; a middle pipeline stage holds only blocks.
  const auto children = model.named_children();
  if (children.contains("tok_embeddings") || children.contains("output")) titan::fully_shard(model, fsdp_mesh, options);
}

titan::PipelineSplit llama_pipeline_split(const ParallelismConfig& parallelism) {
  const auto points = comma_list(parallelism.pipeline_parallel_split_points);
  return titan::PipelineSplit().first({"tok_embeddings"}).layers("layers").last({"norm", "output"}).split_points(points);
}

}  // namespace titan::examples
