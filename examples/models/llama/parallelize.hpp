#pragma once
// Parallelizing the Llama-family Transformer (Llama 2, Llama 3 / 3.1, Mistral), torchtitan's way:
// float8 conversion of the linear layers (float8.enable), then tensor parallel, then context
// parallel, then activation checkpointing, then FSDP, each a small step over the unchanged model
// built on the meta device (torchtitan's models/llama3/parallelize.py).
//
//   ParallelDims dims = ParallelDims::from_config(config.parallelism, world->world_size());
//   titan::DeviceMesh mesh = dims.build_mesh(world);
//   Transformer model(args, torch::kMeta);
//   parallelize_llama(*model, mesh, dims, config);
//   titan::to_empty(*model, world->device());
//   init_weights(*model, seed);
//
// The tensor-parallel plan is a table, like torchtitan's: module names follow the model
// (tok_embeddings, layers.N.attention.wq, ..., norm, output); the model infers its local head
// counts from tensor shapes (view(b, s, -1, head_dim)), so sharding wq/wk/wv/wo by whole heads is
// all it needs.
//
//   auto plan = llama_tp_plan(tp_dims(model->args), mesh.size("tp"),
//                             TpPlanOptions().sequence_parallel(true).loss_parallel(true));
//   titan::parallelize_module(model, mesh["tp"], plan);
//
// Layouts along a block with sequence parallel (S = sequence, activations [batch, S, dim]):
//   tok_embeddings (vocab-parallel)          -> Shard(1)
//   attention_norm (SequenceParallel)        Shard(1) -> Shard(1)
//   attention (PrepareModuleInput)           Shard(1) -> ReplicatePartialGrad (one all-gather;
//                                            backward: one reduce-scatter of the summed gradients)
//     wq, wk, wv (Colwise)                   ReplicatePartialGrad -> Shard(-1) (local heads)
//     wo (Rowwise)                           Shard(-1) -> Shard(1) (reduce-scatter)
//   ffn_norm, feed_forward: the same with w1, w3 Colwise and w2 Rowwise
//   norm (SequenceParallel)                  Shard(1) -> Shard(1)
//   output (Colwise)                         Shard(1) -> Shard(-1) (vocab-sharded, for loss parallel)
//                                                     or Replicate (gathered logits)
//   output tied to tok_embeddings            PrepareModuleInput Shard(1) -> ReplicatePartialGrad; it
//     (TiedLinear)                           multiplies by the vocabulary shard: Shard(-1) logits
// Without sequence parallel, the norms are left alone, every Shard(1) above is Replicate, and the
// attention and feed-forward inputs' gradients are all-reduced once each.

#include "../../common/parallelism.hpp"
#include "model.hpp"

#include <titan/expert_parallel.hpp>
#include <titan/pipeline.hpp>
#include <titan/tensor_parallel.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace titan::examples {

/// The sizes a Llama-style Transformer shards over the TP degree.
struct TransformerTpDims {
  TORCH_ARG(int64_t, dim) = 0;         ///< model width (wq/wk/wv/wo, w1/w2/w3 in/out)
  TORCH_ARG(int64_t, n_heads) = 0;     ///< attention (query) heads
  TORCH_ARG(int64_t, n_kv_heads) = 0;  ///< key/value heads (GQA; equal to n_heads without it)
  TORCH_ARG(int64_t, hidden_dim) = 0;  ///< feed-forward hidden width (w1/w3 out, w2 in)
  TORCH_ARG(int64_t, vocab_size) = 0;  ///< embedding rows and output features
  TORCH_ARG(bool, moe) = false;        ///< blocks hold a MoE (layers.N.moe) instead of feed_forward
  TORCH_ARG(int64_t, moe_hidden_dim) = 0;  ///< each expert's hidden width (split by expert tensor parallel)
  TORCH_ARG(bool, qk_norm) = false;    ///< attention holds q_norm / k_norm (Qwen3)
  TORCH_ARG(bool, tie_embeddings) = false;  ///< output is a TiedLinear reading tok_embeddings' weight
};

/// The dims of a model's arguments (ModelArgs or anything with the same accessors).
template <typename Args>
TransformerTpDims tp_dims(const Args& args) {
  return TransformerTpDims()
      .dim(args.dim())
      .n_heads(args.n_heads())
      .n_kv_heads(args.n_kv_heads())
      .hidden_dim(args.hidden_dim())
      .vocab_size(args.vocab_size())
      .moe(args.is_moe())
      .moe_hidden_dim(args.moe_hidden_dim())
      .qk_norm(args.qk_norm())
      .tie_embeddings(args.tie_embeddings());
}

/// How the plan lays out activations.
struct TpPlanOptions {
  /// Shard the norms' activations on the sequence (SequenceParallel) between blocks.
  TORCH_ARG(bool, sequence_parallel) = true;
  /// Leave the logits vocabulary-sharded for titan::loss_parallel_cross_entropy; otherwise gather them.
  TORCH_ARG(bool, loss_parallel) = true;
  /// The MoE layers' experts are expert-parallel over ranks that include these tp ranks (ep
  /// borrows tp): sequence parallel then sums only the router's gradients over tp, since the tp
  /// ranks hold different experts.
  TORCH_ARG(bool, experts_over_tp) = false;
  /// Split each expert over the tp ranks (titan::MoeTensorParallel on the MoE layers, torchtitan's
  /// ETP = TP): every tp rank routes the whole sequence and computes its slice of each expert.
  TORCH_ARG(bool, expert_tensor_parallel) = false;
  /// Attention is called with the tokens' documents too (block-causal attention, CausalLM::forward's
  /// documents): (x, rope_cos, rope_sin, documents).
  TORCH_ARG(bool, document_mask) = false;
};

/// torchtitan's Llama tensor-parallel plan for `tp` ranks, for the Transformer of model.hpp (Llama 2,
/// Llama 3 and Mistral share its module names and forward signatures; attention is called with
/// (x, rope_cos, rope_sin), and the documents with TpPlanOptions::document_mask). Fails with the
/// offending value when a size does not divide by `tp` (heads are sharded whole, so n_heads and
/// n_kv_heads must divide).
/// A MoE block's layer is token-wise: with sequence parallel it runs on this rank's part of the
/// sequence (SequenceParallel: its gradients summed over the tp ranks; only its router's with
/// experts_over_tp), without it on the whole replicated sequence; its experts are not split by tp
/// (expert parallelism shares them out), unless expert_tensor_parallel splits each of them
/// (MoeTensorParallel: the layer's input gathered, its output reduce-scattered). Q/k norms act on
/// this rank's heads (dim 2), their gradients summed likewise.
inline titan::ParallelizePlan llama_tp_plan(const TransformerTpDims& dims, int64_t tp,
                                            const TpPlanOptions& options = TpPlanOptions()) {
  TORCH_CHECK(tp >= 1, "llama_tp_plan: the tensor-parallel degree must be >= 1, got ", tp);
  std::vector<std::pair<const char*, int64_t>> sizes = {
      {"n_heads", dims.n_heads()}, {"n_kv_heads", dims.n_kv_heads()}, {"dim", dims.dim()}};
  if (!dims.moe()) sizes.emplace_back("hidden_dim", dims.hidden_dim());
  if (dims.moe() && options.expert_tensor_parallel()) sizes.emplace_back("moe_hidden_dim", dims.moe_hidden_dim());
  sizes.emplace_back("vocab_size", dims.vocab_size());
  for (const auto& [name, value] : sizes) {
    TORCH_CHECK(value > 0, "llama_tp_plan: ", name, " must be set (> 0), got ", value);
    TORCH_CHECK(value % tp == 0, "llama_tp_plan: cannot shard the model over tensor-parallel degree ", tp, ": ", name,
                "=", value, " is not divisible by ", tp);
  }
  using titan::Replicate;
  using titan::ReplicatePartialGrad;
  using titan::Shard;
  const bool sp = options.sequence_parallel();
  // Layout of the residual stream between blocks.
  const titan::Placement stream = sp ? Shard(1) : Replicate();
  // The attention and feed-forward inputs are gathered (sequence parallel) once per block, and
  // the gradients of the column-parallel layers sharing them (q, k, v; w1, w3) are summed locally
  // and reduced once, as DTensor's Partial gradients are in torchtitan.
  auto block_input = [&](int64_t tensor_arguments) {
    std::vector<std::optional<titan::Placement>> from(static_cast<size_t>(tensor_arguments), std::nullopt);
    std::vector<std::optional<titan::Placement>> to = from;
    from[0] = stream;
    to[0] = ReplicatePartialGrad();
    return titan::PrepareModuleInput().input_layouts(from).desired_input_layouts(to);
  };
  const auto shared_input = titan::ColwiseParallel().input_layout(ReplicatePartialGrad());

  titan::ParallelizePlan plan;
  plan.add("tok_embeddings",
           titan::RowwiseParallel().embedding(true).input_layout(Replicate()).output_layout(stream));
  if (sp) {
    plan.add("norm", titan::SequenceParallel())
        .add("layers.*.attention_norm", titan::SequenceParallel())
        .add("layers.*.ffn_norm", titan::SequenceParallel());
  }
  if (dims.tie_embeddings()) {
    // The tied output multiplies by tok_embeddings' vocabulary shard, as a column-parallel layer
    // would by its own: its input is gathered (the partial gradients reduced once) and its logits
    // stay vocabulary-sharded.
    TORCH_CHECK(options.loss_parallel(), "llama_tp_plan: a model whose output is tied to the embedding computes ",
                "vocabulary-sharded logits under tensor parallelism: enable loss parallel ",
                "(TpPlanOptions::loss_parallel, the trainer's parallelism.enable_loss_parallel = true)");
    plan.add("output", block_input(1));
  } else {
    plan.add("output", titan::ColwiseParallel()
                           .input_layout(stream)
                           .output_layout(options.loss_parallel() ? Shard(-1) : Replicate()));
  }
  // (x, rope_cos, rope_sin[, documents])
  plan.add("layers.*.attention", block_input(options.document_mask() ? 4 : 3))
      .add("layers.*.attention.wq", shared_input)
      .add("layers.*.attention.wk", shared_input)
      .add("layers.*.attention.wv", shared_input)
      .add("layers.*.attention.wo", titan::RowwiseParallel().output_layout(stream));
  if (dims.qk_norm()) {
    plan.add("layers.*.attention.q_norm", titan::SequenceParallel().sequence_dim(2))  // [B, S, H / tp, hd]
        .add("layers.*.attention.k_norm", titan::SequenceParallel().sequence_dim(2));
  }
  if (!dims.moe()) {
    plan.add("layers.*.feed_forward", block_input(1))
        .add("layers.*.feed_forward.w1", shared_input)
        .add("layers.*.feed_forward.w3", shared_input)
        .add("layers.*.feed_forward.w2", titan::RowwiseParallel().output_layout(stream));
  } else if (options.expert_tensor_parallel()) {
    plan.add("layers.*.moe", titan::MoeTensorParallel().layout(stream));
  } else if (sp && options.experts_over_tp()) {
    plan.add("layers.*.moe.gate", titan::SequenceParallel().sequence_dim(0));  // [local tokens, dim]
  } else if (sp) {
    plan.add("layers.*.moe", titan::SequenceParallel());
  }
  return plan;
}

/// How the Transformer is cut into pipeline stages: tok_embeddings in the first, norm and output in
/// the last, the layers evenly or at parallelism.pipeline_parallel_split_points (comma-separated).
titan::PipelineSplit llama_pipeline_split(const ParallelismConfig& parallelism);

/// Applies float8 training to the linear layers (when float8.enable; first, so its hooks sit
/// innermost), tensor parallelism (when dims.tp > 1; the plan above with config.parallelism's sequence
/// and loss parallel), context parallelism (when dims.cp > 1: the attention cores, rotate method
/// and the model's sliding window from the config), activation checkpointing
/// (config.activation_checkpoint) and FSDP (when data or context parallelism or bf16 compute asks
/// for it: every block, then the root, over dp_shard x cp; on one rank the units stay gathered from
/// forward to backward) to `model`, in that order. In a MoE model, expert parallelism (dims.ep > 1:
/// layers.*.moe.experts over "ep", which may span the tp and cp ranks) comes with tensor
/// parallelism, and each block's experts are an FSDP unit of their own over the ranks outside ep
/// that hold the same experts (expert_fsdp_mesh). The model may still be on the meta device, and
/// may be a pipeline stage (the plan's entries for modules it does not hold are left out).
void parallelize_llama(TransformerImpl& model, const titan::DeviceMesh& mesh, const ParallelDims& dims,
                       const TrainConfig& config);

}  // namespace titan::examples
