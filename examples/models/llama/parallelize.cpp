#include "parallelize.hpp"

#include <titan/ac.hpp>
#include <titan/fsdp.hpp>
#include <titan/tensor_parallel.hpp>

namespace titan::examples {

void parallelize_llama(TransformerImpl& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                       const TrainConfig& config) {
  const auto& parallelism = config.parallelism;
  if (dims.tp > 1) {
    auto plan = llama_tp_plan(tp_dims(model.args), dims.tp,
                              TpPlanOptions()
                                  .sequence_parallel(parallelism.enable_sequence_parallel)
                                  .loss_parallel(parallelism.enable_loss_parallel));
    titan::parallelize_module(model, mesh["tp"], plan);
  }
  titan::apply_activation_checkpointing(model.layers, activation_checkpoint_options(config));
  if (!needs_fsdp(dims, config)) return;
  const auto fsdp_mesh = dims.fsdp_mesh(mesh);
  const auto options = fsdp_options(config);
  for (const auto& layer : *model.layers) titan::fully_shard(*layer, fsdp_mesh, options);
  titan::fully_shard(model, fsdp_mesh, options);
}

}  // namespace titan::examples
