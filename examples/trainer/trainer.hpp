#pragma once
// The training job of every registered model family (examples/models/registry.hpp), as a class
// whose steps are seams: copy this folder and override what your job does differently.
//
//   int main(int argc, char** argv) { return titan::examples::train_main(argc, argv); }
//
//   struct MyTrainer : titan::examples::Trainer {         // or: subclass instead of copying
//     using Trainer::Trainer;
//     void build_data() override { ... }                   // e.g. another corpus
//     torch::Tensor loss_sum(const Batch& batch, double grad_scale) override { ... }   // e.g. another loss
//   };
//   MyTrainer trainer(parse_config_args(argc, argv));
//   trainer.train();                                       // builds first (build()), then trains
//
// build() runs the named steps in order: build_world joins the job (torchrun, Slurm, mpirun or
// one process) and builds the mesh; build_tokenizer; build_model looks up model.name in the
// registry, builds the model on the meta device, keeps this rank's pipeline stages (PP),
// parallelizes them with the family's function (TP, CP, AC, FSDP), materializes and initializes
// the local shards; build_optimizer; build_data; build_pipelines (PP); build_metrics; and
// build_checkpoints, which resumes from the latest checkpoint. train() then runs the steps:
// gradient accumulation, clipping, the LR schedule, validation, metrics (line, metrics.jsonl,
// TensorBoard), NaN/Inf guard, SIGINT / SIGTERM stop at a step boundary, checkpoints (interval,
// final, on a signal) and the final Hugging Face export.

#include "../common/config.hpp"
#include "../common/data.hpp"
#include "../common/guard.hpp"
#include "../common/metrics.hpp"
#include "../common/optim.hpp"
#include "../common/parallelism.hpp"
#include "../common/profiling.hpp"
#include "../models/registry.hpp"
#include "../tokenizers/tokenizer.hpp"

#include <titan/checkpoint.hpp>
#include <titan/context_parallel.hpp>
#include <titan/dist.hpp>
#include <titan/moe.hpp>
#include <titan/pipeline.hpp>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace titan::examples {

/// The random generators as one checkpoint component ("rng"): the CPU generator's state and, on a
/// GPU run, the device generator's (each the same on every rank). A checkpoint without a device
/// state (saved on CPU) leaves the device generator as seeded; a device state resumed on a CPU run
/// is ignored.
class GeneratorState : public titan::Stateful {
 public:
  explicit GeneratorState(at::Generator cpu, std::optional<at::Generator> device = std::nullopt)
      : cpu_(std::move(cpu)), device_(std::move(device)) {}
  titan::ComponentState state() const override;
  void load_state(const titan::ComponentState& state) override;

 private:
  mutable at::Generator cpu_;                    ///< handles (locking a mutex is not const)
  mutable std::optional<at::Generator> device_;
};

/// One training job of a registered model family (model.name).
class Trainer {
 public:
  /// Keeps `config`; nothing is built or joined before build().
  explicit Trainer(TrainConfig config);
  virtual ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Builds the job: build_world, build_tokenizer, build_model, build_optimizer, build_data,
  /// build_pipelines, build_metrics, build_checkpoints (which resumes from the latest checkpoint),
  /// each a virtual step a subclass may replace. Once; train() calls it when it has not run.
  void build();

  /// Runs steps from the resumed one to training.steps (stopping early at training.stop_at_step
  /// or on SIGINT / SIGTERM, with a checkpoint), validating every data.val_freq steps, then
  /// exports the model when it reached the last step. The host reads the device only at sync
  /// steps (logging, validation, checkpoint and last steps): see sync_host.
  virtual void train();
  /// One optimizer step over this rank's share of the global batch: the micro-batches through
  /// forward_backward (or, with pipeline parallelism, through the pipeline's schedule), clipping,
  /// and the optimizer (skipped on the device when the gradient norm is not finite). No host sync:
  /// loss, norm and skip flag add to the interval's device sums. False when the global batch has
  /// no label token (nothing ran).
  virtual bool train_step(int64_t step);
  /// Forward and backward of one micro-batch with the loss multiplied by `scale`; returns the sum
  /// of its label tokens' cross-entropies (unscaled, detached, on the device).
  virtual torch::Tensor forward_backward(const Batch& batch, double scale);
  /// The sum of the cross-entropies of a micro-batch's label tokens (labels -100 are ignored): the
  /// model's forward and token_loss_sum. Without pipeline parallelism only. `grad_scale`: see
  /// token_loss_sum.
  virtual torch::Tensor loss_sum(const Batch& batch, double grad_scale = 1.0);
  /// The sum of the cross-entropies of the label tokens of `labels` [B, S] under `logits` [B, S, V]
  /// (loss parallel on vocabulary-sharded logits). `grad_scale` is the factor the sum is multiplied
  /// by before backward (titan::CrossEntropyOptions::grad_scale: the logits' gradient, written in
  /// the forward, then needs no pass of its own in the backward); any factor stays correct.
  virtual torch::Tensor token_loss_sum(const torch::Tensor& logits, const torch::Tensor& labels,
                                       double grad_scale = 1.0);
  /// Validation at `step`: data.val_steps batches of the validation set, logged and recorded.
  virtual void validate(int64_t step);
  /// With pipeline parallelism: `batches` (a step's rows on this rank, or a validation batch) cut
  /// into `pipeline`'s micro-batches and run by its schedule (with backward when `train`), each
  /// micro-batch's token-loss sum times `scale` backpropagated. Returns the sum of the label
  /// tokens' cross-entropies (unscaled, on the device) on the ranks of the last stage, else 0.
  virtual torch::Tensor run_pipeline(titan::Pipeline& pipeline, const std::vector<Batch>& batches, double scale,
                                     bool train);

  const TrainConfig& config() const { return config_; }
  /// The job's ranks (after build_world).
  const titan::WorldPtr& world() const { return world_; }
  /// This rank's model as checkpoints and the optimizer see it: the whole model, its pipeline
  /// stage, or a view of its stages (titan::pipeline_stages_view). After build_model.
  torch::nn::Module& model();

 protected:
  /// Joins the job (titan::init_distributed), registers titan's CUDA kernels when
  /// training.fused_kernels asks, saves the resolved config, builds the mesh and the context
  /// parallel layout.
  virtual void build_world();
  /// Loads model.tokenizer_path.
  virtual void build_tokenizer();
  /// The model of the registered spec model.name: built on meta, this rank's pipeline stages kept,
  /// parallelized, materialized on the device and initialized from training.seed.
  virtual void build_model();
  /// AdamW over the model's parameters (checked against FSDP's sharded ones) and the LR schedule.
  virtual void build_optimizer();
  /// The training and validation loaders over this rank's data-parallel share, and the gradient
  /// accumulation steps.
  virtual void build_data();
  /// With pipeline parallelism: the training and validation pipelines over this rank's stages.
  virtual void build_pipelines();
  /// Metrics (line, JSONL, TensorBoard; MFU from the spec's FLOPs), the profiler, the host group
  /// and the NaN guard.
  virtual void build_metrics();
  /// The checkpoint components and manager; resumes from the latest checkpoint, else loads
  /// checkpoint.initial_load_path.
  virtual void build_checkpoints();

  /// Waits for the device's work and reads the interval's sums: applies the NaN policy and, at a
  /// logging step, reduces the loss over the data-parallel ranks and writes the metrics line.
  void sync_host(int64_t step, bool log);
  /// A MoE model's tokens per expert and dropped assignments per layer since the counts were last
  /// emptied, summed over the ranks of this pipeline stage.
  std::vector<titan::MoeLoad> expert_loads();
  /// Logs and records (moe/... scalars) the loads expert_loads() read at `step`, and the interval's
  /// mean auxiliary loss.
  void log_experts(int64_t step, double aux_loss);
  /// Saves a checkpoint of `step` when the interval says so, or always with `force`.
  void save_checkpoint(int64_t step, bool force);
  /// Writes the trained weights as a Hugging Face folder under job.dump_folder/export.
  void export_model();
  /// Starts from checkpoint.initial_load_path: a Hugging Face folder (the spec's load_hf, each
  /// stage reading only its slices) or the model part of a titan checkpoint.
  void load_initial_weights();
  /// The forward of `stage` on `input`, with this rank's token positions under context parallelism
  /// and the rows' `documents` [B, S] for block-causal attention (model.attn_mask_type).
  torch::Tensor run_stage(CausalLM& stage, const torch::Tensor& input, const torch::Tensor& documents = {});
  /// The documents of `batches` ([rows, S], concatenated, on the device) when model.attn_mask_type
  /// is "block_causal", else undefined.
  torch::Tensor documents_of(const std::vector<Batch>& batches) const;
  /// With context parallelism: this rank's part of `batch` along the sequence, its label tokens
  /// counted again; else `batch`.
  Batch shard_sequence(const Batch& batch) const;

  TrainConfig config_;
  titan::WorldPtr world_;
  ParallelDims dims_;
  std::unique_ptr<titan::DeviceMesh> mesh_;
  std::unique_ptr<Tokenizer> tokenizer_;
  const ModelSpec* spec_ = nullptr;              ///< model.name's family (the registry owns it)
  ModelFacts facts_;                             ///< the whole model's parameters, FLOPs, vocabulary
  int64_t stages_per_rank_ = 1;                  ///< pipeline stages on this rank
  std::vector<std::shared_ptr<CausalLM>> stages_;  ///< the whole model, or this rank's pipeline stages
  std::shared_ptr<torch::nn::Module> model_;     ///< stages_[0], or a view of several stages
  std::unique_ptr<titan::Pipeline> pipeline_;       ///< with pipeline parallelism: training steps
  torch::Tensor pipeline_documents_;  ///< [rows, S]: the running pipeline step's documents (block-causal)
  std::unique_ptr<titan::Pipeline> eval_pipeline_;  ///< and validation (training.batch_size samples)
  std::unique_ptr<FusedAdamW> optimizer_;
  std::unique_ptr<LRSchedule> schedule_;
  int64_t accumulation_ = 1;  ///< micro-batches per optimizer step on each rank
  std::unique_ptr<DataLoader> loader_, val_loader_;
  std::unique_ptr<MetricsLogger> metrics_;
  std::unique_ptr<StepProfiler> profiler_;  ///< with profiling.enable_profiling
  std::unique_ptr<GeneratorState> rng_;
  std::unique_ptr<NanGuard> nan_guard_;
  titan::TrainState state_;  ///< model, optimizer and components by name: "data", "rng", "lr_schedule"
  std::unique_ptr<titan::CheckpointManager> checkpoints_;
  std::optional<titan::ContextParallelLayout> cp_layout_;  ///< with context parallelism
  torch::Tensor positions_;  ///< [seq_len / cp] this rank's token positions (undefined without CP)
  titan::ProcessGroupPtr host_group_;  ///< every rank, Gloo on the CPU: host values, no device sync
  titan::ProcessGroupPtr moe_group_;   ///< a MoE model's: the ranks of this pipeline stage (else null)
  double aux_loss_weight_ = 0.0;       ///< factor of each micro-batch's MoE auxiliary loss (0: none)
  std::vector<titan::MoeLoad> moe_loads_;  ///< the loads read at the last logging step
  /// Sums over the current logging interval. The tensors stay on the device until sync_host.
  struct Interval {
    torch::Tensor loss;       ///< [] fp64: this rank's share of each step's mean loss, summed
    torch::Tensor grad_norm;  ///< [] fp64: the finite global gradient norms, summed
    torch::Tensor skipped;    ///< [] fp64: steps whose norm was not finite (update skipped)
    torch::Tensor aux_loss;   ///< [] fp64: each step's mean MoE auxiliary loss on this rank, summed
    int64_t first_step = 0, steps = 0, tokens = 0;
    double lr = 0.0, seconds = 0.0, data_seconds = 0.0;
  } interval_;
  std::chrono::steady_clock::time_point clock_;  ///< when the current stretch of step time began
  int64_t start_step_ = 0;   ///< the step resumed from (0 for a fresh run)
  bool loss_parallel_ = false;
  bool verified_ = false;    ///< the first step was verified (titan::verify_calls; a Pipeline its own stages)
  bool built_ = false;       ///< build() ran
};

/// Runs a training job of any registered model; returns the process exit code (0 on success, 2
/// for a bad config, 1 on other errors).
int train_main(int argc, char** argv);

}  // namespace titan::examples
