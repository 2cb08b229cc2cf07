#pragma once
// The example trainers' configuration: torchtitan-like TOML sections in typed structs.
//
// API summary
//   TrainConfig cfg = parse_config_args(argc, argv);   // --config file.toml, then --section.key value
//                                                      // or --section.key=value overrides; validated
//   TrainConfig cfg = load_config_file(path);          // one TOML file, validated
//   apply_override(cfg, "training.steps", "20", "command line");  // one override (string value)
//   validate(cfg);                                     // ranges and choices of every key (also done above)
//   std::string text = to_toml(cfg);                   // the resolved config, parseable again
//   save_config(cfg, path);                            // to_toml into a file
//   config_keys();                                     // every "section.key" known
// Errors (c10::Error) name the source (file or "command line"), the key, the value and what is
// valid; an unknown key or section suggests the closest valid one.
//
// No LibTorch tensors here; the TOML parser (toml++) stays inside config.cpp.

#include <cstdint>
#include <string>
#include <vector>

namespace titan::examples {

/// [job]: where outputs go.
struct JobConfig {
  std::string dump_folder = "./outputs";  ///< root of checkpoints, metrics, TensorBoard files
  std::string description = "titan example training job";  ///< free text, printed at start
};

/// [model]: which model and tokenizer.
struct ModelConfig {
  std::string name = "llama3";           ///< a registered model (models/registry.hpp): "llama3", "mistral", ...
  std::string flavor = "debug";          ///< size: "debug", "7B", "8B", "13B", "70B", "405B"
  int64_t n_layers = 0;                  ///< 0: the flavor's; else that many blocks of the flavor's shape
  std::string tokenizer_path = "";       ///< tokenizer.model file
  std::string tokenizer_kind = "tiktoken";  ///< "tiktoken" (Llama 3), "huggingface" (tokenizer.json: Qwen3) or "sentencepiece" (Llama 2, Mistral)
  /// wq|wk|wv and w1|w3 as one GEMM each (titan::linear_fused); parameters and checkpoints unchanged
  bool fused_projections = false;
  /// "causal": every token attends to the earlier tokens of its row; "block_causal": only to those
  /// of its own document in a packed row (torchtitan's attn_mask_type; an explicit attention mask).
  std::string attn_mask_type = "causal";
};

/// [optimizer]: AdamW with decoupled weight decay.
struct OptimizerConfig {
  std::string name = "AdamW";  ///< only "AdamW"
  double lr = 8e-4;            ///< peak learning rate
  double eps = 1e-8;           ///< Adam epsilon
  double beta1 = 0.9;          ///< first-moment decay
  double beta2 = 0.95;         ///< second-moment decay
  double weight_decay = 0.1;   ///< decoupled weight decay of the decayed group
  bool no_decay_norms_and_biases = true;  ///< norms, biases and 1-D parameters get no weight decay
};

/// [lr_scheduler]: linear warmup, then (after a stable phase with decay_ratio: warmup-stable-decay)
/// decay to lr * min_lr_ratio at the last step.
struct LRSchedulerConfig {
  int64_t warmup_steps = 200;         ///< steps of linear warmup
  /// The fraction of training.steps that decays, at the end (WSD: the steps between warmup and
  /// decay keep optimizer.lr); -1 = every step after warmup decays
  double decay_ratio = -1;
  std::string decay_type = "linear";  ///< "linear", "sqrt", "cosine" or "constant"
  double min_lr_ratio = 0.0;          ///< final lr as a fraction of optimizer.lr, in [0, 1]
};

/// [training]: batch, steps and numerics.
struct TrainingConfig {
  int64_t batch_size = 8;          ///< local micro-batch (sequences per rank per forward)
  int64_t global_batch_size = -1;  ///< sequences per optimizer step over all ranks; -1 = batch_size * dp
  int64_t seq_len = 2048;          ///< tokens per sequence
  int64_t steps = 10000;           ///< optimizer steps (the LR schedule ends here)
  int64_t stop_at_step = -1;       ///< end this run after this step, saving a checkpoint as on SIGTERM
                                   ///< (-1 = run to `steps`); for time-limited jobs
  double max_norm = 1.0;           ///< gradient clipping by global norm; <= 0 disables it
  int64_t seed = 0;                ///< seed of weights and data order
  std::string mixed_precision_param = "bfloat16";  ///< "float32" or "bfloat16" compute dtype
  std::string mixed_precision_reduce = "float32";  ///< "float32" or "bfloat16" gradient reduction
  std::string nan_policy = "stop";  ///< on a NaN/Inf loss: "stop" the run or "skip" the step
  /// titan's fused operators (the loss: titan::cross_entropy): "aten" (their ATen implementation,
  /// every device) or "cuda" (titan::cuda_kernels on CUDA tensors; not yet run on a GPU, see
  /// docs/fused.md; needs a build that found CUDA)
  std::string fused_kernels = "aten";
  /// Deterministic algorithms only (torchtitan's debug.deterministic): every operator's
  /// deterministic kernel, or an error naming one that has none (a warning with
  /// deterministic_warn_only); cuDNN without autotuning; cuBLAS's fixed workspace. The same bits on
  /// every run of one machine; slower on GPUs
  bool deterministic = false;
  bool deterministic_warn_only = false;
};

/// [parallelism]: the device mesh.
struct ParallelismConfig {
  int64_t data_parallel_shard_degree = -1;     ///< FSDP degree; -1 = what the other degrees leave
  int64_t data_parallel_replicate_degree = 1;  ///< DDP-style replicas (HSDP)
  int64_t tensor_parallel_degree = 1;          ///< tensor parallel degree
  bool enable_sequence_parallel = true;        ///< shard norms/dropout activations along the sequence
  bool enable_loss_parallel = true;            ///< cross-entropy on vocabulary-sharded logits
  bool reshard_after_forward = true;           ///< FSDP frees gathered weights after forward (not with PP)
  int64_t pipeline_parallel_degree = 1;        ///< pipeline stages' ranks (pp)
  std::string pipeline_parallel_schedule = "1F1B";  ///< "GPipe", "1F1B", "Interleaved1F1B" or "ZBH1"
  int64_t pipeline_parallel_microbatch_size = 1;    ///< samples per pipeline micro-batch
  /// Comma-separated layer names where stages 1, 2, ... begin (e.g. "layers.4,layers.8"); empty:
  /// an even split into pp stages (2 per rank for Interleaved1F1B).
  std::string pipeline_parallel_split_points = "";
  /// Ranks sharing each sequence (cp): tokens, labels and attention sharded along the sequence
  /// (load-balanced; training.seq_len a multiple of 2 cp). FSDP shards over dp_shard x cp.
  int64_t context_parallel_degree = 1;
  std::string context_parallel_rotate_method = "allgather";  ///< how K/V reach the cp ranks: "allgather" or "p2p" (ring)
  /// Ranks sharing out each MoE layer's experts (ep), E / ep each, tokens sent to them by
  /// all-to-all; borrowed from the tensor-parallel ranks first, then the context-parallel, then the
  /// data-parallel shard ranks (torchtitan's ETP = 1; it must divide dp_shard x cp x tp). 1: none.
  int64_t expert_parallel_degree = 1;
  /// 1: each MoE layer's experts whole on a rank (ep borrows the tp ranks); tensor_parallel_degree:
  /// each expert split over the tp ranks (torchtitan's ETP = TP; ep then borrows cp and dp_shard).
  int64_t expert_tensor_parallel_degree = 1;
};

/// [moe]: training mixture-of-experts models (mixtral, qwen3_moe; titan/moe.hpp).
struct MoeConfig {
  int64_t top_k = 0;                    ///< experts per token; 0: the flavor's (Mixtral 2, Qwen3-MoE 8)
  std::string score_func = "flavor";    ///< router scores: "flavor" (its own: softmax), "softmax" or "sigmoid"
  /// Weight of the auxiliary load-balancing loss added to each micro-batch's loss (Mixtral's
  /// router_aux_loss_coef, 0.02); 0: none. Not with pipeline parallelism or an activation-
  /// checkpointed MoE layer (errors say so).
  double aux_loss_coef = 0.0;
  /// Rate of the auxiliary-loss-free expert bias, updated after each optimizer step from the step's
  /// token counts (DeepSeek-V3; torchtitan's load_balance_coeff, 1e-3); 0: no bias.
  double load_balance_coeff = 0.0;
  /// Each expert takes at most capacity_factor x its even share of a forward's assignments, the
  /// others are dropped (by score); 0: dropless.
  double capacity_factor = 0.0;
};

/// [float8]: float8 linear layers (torchao's Float8Linear; titan/float8.hpp).
struct Float8Config {
  bool enable = false;                    ///< compute the linear layers' matmuls in float8
  std::string recipe_name = "tensorwise";  ///< "tensorwise", "rowwise" or "rowwise_with_gw_hp"
  /// Comma-separated substrings of module names left in high precision ("output": the vocabulary
  /// projection, as torchtitan). Layers with a dimension not divisible by 16 are skipped too.
  std::string filter_fqns = "output";
  bool enable_fsdp_float8_all_gather = false;            ///< FSDP all-gathers the weights in float8 (tensorwise)
  bool precompute_float8_dynamic_scale_for_fsdp = false;  ///< one amax all-reduce per step for all weights
  bool emulate = false;  ///< multiply dequantized values in fp32 instead of _scaled_mm (testing)
};

/// [checkpoint]: distributed checkpoints.
struct CheckpointConfig {
  bool enable = false;                 ///< save checkpoints
  std::string folder = "checkpoint";   ///< under job.dump_folder
  int64_t interval = 500;              ///< steps between saves
  int64_t keep_latest_k = 0;           ///< keep this many newest (0 = all)
  std::string async_mode = "disabled";  ///< "disabled" or "async"
  int64_t load_step = -1;              ///< step to resume from; -1 = the latest
  std::string initial_load_path = "";  ///< weights to start from when there is nothing to resume:
                                       ///< a titan checkpoint step folder, or a Hugging Face folder
  bool initial_load_in_hf = false;     ///< initial_load_path is a Hugging Face (transformers) folder
  std::string export_dtype = "float32";  ///< "float32", "bfloat16" or "float16" for the final export
};

/// [activation_checkpoint]: recomputation in backward.
struct ActivationCheckpointConfig {
  std::string mode = "selective";         ///< "none", "full" or "selective"
  std::string selective_ac_option = "2";  ///< "op" or a positive integer k (every k-th block)
};

/// [metrics]: logging.
struct MetricsConfig {
  int64_t log_freq = 10;                ///< steps between metric lines
  bool enable_tensorboard = false;      ///< write TensorBoard event files (rank 0)
  std::string save_tb_folder = "tb";    ///< under job.dump_folder
  bool enable_jsonl = true;             ///< write metrics.jsonl under job.dump_folder (rank 0)
  double peak_flops = 0.0;              ///< device peak FLOP/s for MFU; 0: by the GPU's name
};

/// [profiling]: PyTorch profiler (Kineto) traces of chosen steps, torchtitan's keys.
struct ProfilingConfig {
  bool enable_profiling = false;                     ///< record every profile_freq-th step
  std::string save_traces_folder = "profile_trace";  ///< under job.dump_folder: iteration_<step>/rank<r>_trace.json
  int64_t profile_freq = 10;                         ///< steps profile_freq, 2 profile_freq, ... are recorded
};

/// [data]: corpus, packing and validation.
struct DataConfig {
  std::string kind = "text";        ///< "text", "jsonl", "alpaca" or "chat"
  std::string path = "";            ///< training corpus
  std::string text_field = "text";  ///< field of a JSONL record holding the document
  std::string val_path = "";        ///< validation corpus ("" = no validation)
  int64_t val_freq = 0;             ///< steps between validations (0 = never)
  int64_t val_steps = 10;           ///< batches per validation
  bool skip_malformed = false;      ///< skip (and count) malformed JSONL lines instead of failing
  std::string prompt_template = "alpaca";  ///< instruction template; only "alpaca"
  std::string chat_format = "llama3";  ///< "chat": the chat format (chat_formats(), chat.hpp)
  std::string chat_system = "";        ///< "chat": system message of a conversation without one
  std::string chat_date = "26 Jul 2024";  ///< "chat", llama3.1: the system message's "Today Date"
  bool pack = true;                 ///< pack documents into seq_len windows (else one per row, padded)
  std::string cache_dir = "";       ///< token cache folder ("" = <job.dump_folder>/token_cache)
  int64_t tokenize_threads = 0;     ///< threads per rank building the token cache (0 = the cores, at most 4)
};

/// The whole configuration of a training run.
struct TrainConfig {
  JobConfig job;
  ModelConfig model;
  OptimizerConfig optimizer;
  LRSchedulerConfig lr_scheduler;
  TrainingConfig training;
  ParallelismConfig parallelism;
  Float8Config float8;
  MoeConfig moe;
  CheckpointConfig checkpoint;
  ActivationCheckpointConfig activation_checkpoint;
  MetricsConfig metrics;
  ProfilingConfig profiling;
  DataConfig data;
};

/// Reads one TOML file over the defaults and validates the result.
TrainConfig load_config_file(const std::string& path);

/// `--config file` (at most once, applied first) and `--section.key value` / `--section.key=value`
/// overrides in order, then validation. argv[0] is the program. `--help` is not handled here.
TrainConfig parse_config_args(int argc, const char* const* argv);

/// Sets `key` ("section.key") from its text form; `source` names where it came from in errors.
void apply_override(TrainConfig& config, const std::string& key, const std::string& value,
                    const std::string& source);

/// Checks every value's range and choices; errors name `source`, the key and what is valid.
void validate(const TrainConfig& config, const std::string& source = "config");
/// The last steps of training.steps that lr_scheduler.decay_ratio decays (rounded); -1 when the
/// ratio is -1 (every step after warmup decays).
int64_t lr_decay_steps(const TrainConfig& config);

/// The configuration as TOML, every key, in section order; load_config_file reads it back.
std::string to_toml(const TrainConfig& config);

/// The non-empty, trimmed items of a comma-separated list ("layers.2, layers.4" or "output").
std::vector<std::string> comma_list(const std::string& text);
/// What differs between the config saved as `saved_toml` (to_toml's text, e.g. a checkpoint's)
/// and `config`: one "section.key: old -> new" per changed key, or one line saying why the saved
/// text could not be read.
std::vector<std::string> config_changes(const std::string& saved_toml, const TrainConfig& config);

/// Writes to_toml(config) to `path` (parent folders are created).
void save_config(const TrainConfig& config, const std::string& path);

/// Every known key as "section.key", in printing order.
std::vector<std::string> config_keys();

/// The candidate closest to `word` by edit distance ("" when `candidates` is empty).
std::string closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace titan::examples
