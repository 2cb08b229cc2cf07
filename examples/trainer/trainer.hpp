#pragma once
// The training job shared by the example trainers (examples/llama, examples/mistral), as a class
// whose steps are seams: copy this folder and override what your job does differently.
//
//   int main(int argc, char** argv) { return titan::examples::train_main(argc, argv, {"llama2", "llama3", "llama3.1"}); }
//
//   struct MyTrainer : titan::examples::Trainer {         // or: subclass instead of copying
//     using Trainer::Trainer;
//     torch::Tensor loss_sum(const Batch& batch, double grad_scale) override { ... }   // e.g. another loss
//   };
//
// The constructor joins the job (torchrun, Slurm, mpirun or one process), builds the model on the
// meta device, keeps this rank's pipeline stages (PP), parallelizes them (TP, CP, AC, FSDP),
// materializes and initializes the local shards,
// builds the optimizer, data, metrics and checkpoints, and resumes from the latest checkpoint.
// train() then runs the steps: gradient accumulation, clipping, the LR schedule, validation,
// metrics (line, metrics.jsonl, TensorBoard), NaN/Inf guard, SIGINT / SIGTERM stop at a step
// boundary, checkpoints (interval, final, on a signal) and the final Hugging Face export.

#include "../common/config.hpp"
#include "../common/data.hpp"
#include "../common/guard.hpp"
#include "../common/metrics.hpp"
#include "../common/optim.hpp"
#include "../common/parallelism.hpp"
#include "../common/profiling.hpp"
#include "../models/llama/model.hpp"
#include "../tokenizers/tokenizer.hpp"

#include <titan/checkpoint.hpp>
#include <titan/context_parallel.hpp>
#include <titan/dist.hpp>
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

/// One training job of a Llama-family model (Llama 2, Llama 3 / 3.1, Mistral).
class Trainer {
 public:
  /// Builds the whole job from `config` and resumes from the latest checkpoint, if any.
  explicit Trainer(TrainConfig config);
  virtual ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

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
  const titan::WorldPtr& world() const { return world_; }
  /// This rank's model as checkpoints and the optimizer see it: the whole model, its pipeline
  /// stage, or a view of its stages (titan::pipeline_stages_view).
  torch::nn::Module& model() { return *model_; }

 protected:
  /// Waits for the device's work and reads the interval's sums: applies the NaN policy and, at a
  /// logging step, reduces the loss over the data-parallel ranks and writes the metrics line.
  void sync_host(int64_t step, bool log);
  /// Saves a checkpoint of `step` when the interval says so, or always with `force`.
  void save_checkpoint(int64_t step, bool force);
  /// Writes the trained weights as a Hugging Face folder under job.dump_folder/export.
  void export_model();
  /// Builds the training and validation pipelines over this rank's stages (pipeline parallelism).
  void make_pipelines(int64_t stages_per_rank);
  /// The forward of `stage` on `input`, with this rank's RoPE positions under context parallelism.
  torch::Tensor run_stage(Transformer& stage, const torch::Tensor& input);
  /// With context parallelism: this rank's part of `batch` along the sequence, its label tokens
  /// counted again; else `batch`.
  Batch shard_sequence(const Batch& batch) const;

  TrainConfig config_;
  titan::WorldPtr world_;
  ParallelDims dims_;
  std::unique_ptr<titan::DeviceMesh> mesh_;
  std::unique_ptr<Tokenizer> tokenizer_;
  ModelArgs args_;
  std::vector<Transformer> stages_;              ///< the whole model, or this rank's pipeline stages
  std::shared_ptr<torch::nn::Module> model_;     ///< stages_[0], or a view of several stages
  std::unique_ptr<titan::Pipeline> pipeline_;       ///< with pipeline parallelism: training steps
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
  /// Sums over the current logging interval. The tensors stay on the device until sync_host.
  struct Interval {
    torch::Tensor loss;       ///< [] fp64: this rank's share of each step's mean loss, summed
    torch::Tensor grad_norm;  ///< [] fp64: the finite global gradient norms, summed
    torch::Tensor skipped;    ///< [] fp64: steps whose norm was not finite (update skipped)
    int64_t first_step = 0, steps = 0, tokens = 0;
    double lr = 0.0, seconds = 0.0, data_seconds = 0.0;
  } interval_;
  std::chrono::steady_clock::time_point clock_;  ///< when the current stretch of step time began
  int64_t start_step_ = 0;   ///< the step resumed from (0 for a fresh run)
  bool loss_parallel_ = false;
  bool verified_ = false;    ///< titan::verify_calls ran after the first step
};

/// Runs a training job; returns the process exit code (0 on success, 2 for a bad config, 1 on
/// other errors). `families` are the model.name values this trainer accepts.
int train_main(int argc, char** argv, const std::vector<std::string>& families);

}  // namespace titan::examples
