#include "trainer.hpp"

#include <titan/float8.hpp>
#include <titan/fsdp.hpp>
#include <titan/fused.hpp>
#ifdef TITAN_CUDA_KERNELS
#include <titan/fused/cuda/kernels.hpp>
#endif
#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>

#include <ATen/Context.h>
#include <c10/util/ScopeExit.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sstream>

namespace titan::examples {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// Peak FLOP/s of `device` for MFU: metrics.peak_flops when set, else by the GPU's name (0, MFU
/// "n/a", on CPU and unknown GPUs).
double device_peak_flops(const c10::Device& device, double configured) {
  if (configured > 0) return configured;
#if TITAN_HAS_NCCL
  if (device.is_cuda()) return peak_flops_of(at::cuda::getDeviceProperties(device.index())->name);
#endif
  return 0.0;
}

/// torchtitan's debug.deterministic, set before the first CUDA call: ATen's deterministic kernels
/// only (an error, or with `warn_only` a warning, naming an operator that has none; uninitialized
/// memory filled with NaN so that a read of it shows), cuDNN's deterministic algorithms without
/// autotuning, and cuBLAS's fixed workspace (read when its first handle is made) unless the
/// environment sets it already.
void use_deterministic_algorithms(bool warn_only) {
  setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  auto& context = at::globalContext();
  context.setDeterministicAlgorithms(true, warn_only);
  context.setDeterministicCuDNN(true);
  context.setBenchmarkCuDNN(false);
}

/// `batch` on `device`: through pinned memory without waiting for the device (a copy from
/// pageable memory would wait for every kernel queued before it).
torch::Tensor to_device(const torch::Tensor& batch, const c10::Device& device) {
  if (!device.is_cuda()) return batch.to(device);
  return batch.pin_memory().to(device, /*non_blocking=*/true);
}

/// Rank 0's progress lines while a checkpoint loads: every 5 seconds and when it is done.
titan::LoadProgressFn load_progress_printer(const titan::WorldPtr& world, const std::string& what) {
  if (world->rank() != 0) return nullptr;
  const auto start = Clock::now();
  auto last = std::make_shared<Clock::time_point>(start);
  return [world, what, start, last](int64_t done, int64_t total, int64_t bytes) {
    if (done != total && seconds_since(*last) < 5.0) return;
    *last = Clock::now();
    const double seconds = std::max(seconds_since(start), 1e-9), megabytes = static_cast<double>(bytes) / 1e6;
    world->logger().info("loading ", what, ": ", done, "/", total, " tensors, ", megabytes, " MB of this rank's in ",
                         seconds, " s (", megabytes / seconds, " MB/s)", done == total ? " (done)" : "");
  };
}

/// What a pipeline stage holds, e.g. "layers.4-layers.7 + norm, output": its children, the
/// layer container's first and last layer.
std::string stage_contents(torch::nn::Module& stage, const titan::PipelineSplit& split) {
  std::vector<std::string> parts;
  for (const auto& child : stage.named_children()) {
    if (child.key() != split.layers()) {
      parts.push_back(child.key());
      continue;
    }
    const auto layers = child.value()->named_children();
    if (!layers.is_empty())
      parts.insert(parts.begin(), split.layers() + "." + layers.keys().front() + "-" + layers.keys().back());
  }
  return c10::Join(", ", parts);
}

torch::Dtype dtype_named(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  return torch::kFloat32;
}

}  // namespace

titan::ComponentState GeneratorState::state() const {
  auto read = [](at::Generator& generator) {
    std::lock_guard<std::mutex> lock(generator.mutex());
    return titan::replicated(generator.get_state());
  };
  titan::ComponentState state{{}, {{"state", read(cpu_)}}};
  if (device_) state.tensors.emplace_back("device_state", read(*device_));
  return state;
}

void GeneratorState::load_state(const titan::ComponentState& state) {
  auto find = [&](const char* name) {
    return std::find_if(state.tensors.begin(), state.tensors.end(), [&](const auto& item) { return item.first == name; });
  };
  auto cpu = find("state");
  TORCH_CHECK(cpu != state.tensors.end(), "rng: the saved generator state has no 'state' tensor");
  {
    std::lock_guard<std::mutex> lock(cpu_.mutex());
    cpu_.set_state(cpu->second.local);
  }
  auto device = find("device_state");
  if (device_ && device != state.tensors.end()) {
    std::lock_guard<std::mutex> lock(device_->mutex());
    device_->set_state(device->second.local);
  }
}

Trainer::Trainer(TrainConfig config) : config_(std::move(config)) {}

Trainer::~Trainer() = default;

torch::nn::Module& Trainer::model() {
  TORCH_CHECK(model_, "Trainer::model: the model is built by build() (or train())");
  return *model_;
}

void Trainer::build() {
  TORCH_CHECK(!built_, "Trainer::build: the job is already built");
  built_ = true;
  build_world();
  build_tokenizer();
  build_model();
  build_optimizer();
  build_data();
  build_pipelines();
  build_metrics();
  build_checkpoints();
}

void Trainer::build_world() {
  if (config_.training.deterministic) use_deterministic_algorithms(config_.training.deterministic_warn_only);
  world_ = titan::init_distributed();
  const auto& log = world_->logger();
  const auto& launch = world_->launch_info();
  log.info(config_.job.description, " | ", world_->world_size(), " ranks, ", world_->backend_name(), " on ",
           world_->device().str(), " | launcher ", launch.launcher, ", local rank ", launch.local_rank, " of ",
           launch.local_world_size,
           world_->world_size() > 1 ? " | rendezvous " + launch.master_addr + ":" + std::to_string(launch.master_port) : "");
  log.info("resolved config:\n", to_toml(config_));
  if (config_.training.deterministic)
    log.info("deterministic algorithms: on (", config_.training.deterministic_warn_only ? "a warning" : "an error",
             " for an operator without a deterministic kernel; CUBLAS_WORKSPACE_CONFIG ",
             std::getenv("CUBLAS_WORKSPACE_CONFIG"), ")");
  if (config_.training.fused_kernels == "cuda") {
#ifdef TITAN_CUDA_KERNELS
    titan::cuda::register_kernels();
    log.info("fused operators: titan's CUDA kernels on CUDA tensors (not yet run on a GPU: see docs/fused.md)");
#else
    TORCH_CHECK(false, "training.fused_kernels = \"cuda\": this build has no titan::cuda_kernels (CMake found no ",
                "CUDA compiler, or LibTorch is a CPU build); use \"aten\"");
#endif
  }
  if (world_->rank() == 0) save_config(config_, (std::filesystem::path(config_.job.dump_folder) / "config.toml").string());

  dims_ = ParallelDims::from_config(config_.parallelism, world_->world_size());
  mesh_ = std::make_unique<titan::DeviceMesh>(dims_.build_mesh(world_));
  log.info("mesh: pp=", dims_.pp, " dp_replicate=", dims_.dp_replicate, " dp_shard=", dims_.dp_shard, " cp=", dims_.cp,
           " tp=", dims_.tp);
  if (dims_.cp > 1) {
    cp_layout_.emplace(dims_.cp, mesh_->coordinate("cp"));
    positions_ = cp_layout_->positions(config_.training.seq_len, torch::TensorOptions().device(world_->device()));
  }
}

void Trainer::build_tokenizer() {
  tokenizer_ = load_tokenizer(config_.model.tokenizer_path, config_.model.tokenizer_kind);
}

void Trainer::build_model() {
  const auto& log = world_->logger();
  spec_ = &model_spec_of(config_);
  // Build on meta, keep this rank's pipeline stages, parallelize, then allocate and initialize
  // only what this rank holds. Parameter names stay the whole model's.
  stages_per_rank_ = dims_.pp > 1 ? pipeline_stages_per_rank(config_.parallelism) : 1;
  const int64_t pp_rank = mesh_->coordinate("pp");
  std::vector<std::shared_ptr<torch::nn::Module>> parts;
  for (int64_t v = 0; v < stages_per_rank_; ++v) {
    auto stage = spec_->build(config_, tokenizer_->vocab_size(), torch::kMeta);
    if (v == 0) facts_ = spec_->facts(*stage, config_.training.seq_len);  // before pruning: the whole model
    if (dims_.pp > 1) {
      const int64_t index = pp_rank + v * dims_.pp;
      const auto split = spec_->pipeline_split(config_.parallelism);
      titan::keep_pipeline_stage(*stage, split, dims_.pp * stages_per_rank_, index);
      log.info("pipeline stage ", index, " (rank ", world_->rank(), "): ", stage_contents(*stage, split));
    }
    spec_->parallelize(*stage, *mesh_, dims_, config_);
    titan::to_empty(*stage, world_->device());
    spec_->init_weights(*stage, static_cast<uint64_t>(config_.training.seed));
    stages_.push_back(stage);
    parts.push_back(stage);
  }
  model_ = parts.size() == 1 ? parts.front() : titan::pipeline_stages_view(parts);
  if (config_.float8.enable) {
    int64_t converted = 0;
    for (const auto& part : parts)
      for (const auto& module : part->modules()) converted += titan::find_hook<titan::Float8LinearHook>(*module) ? 1 : 0;
    log.info("float8: ", converted, " linear layers (", config_.float8.recipe_name, " scaling",
             config_.float8.enable_fsdp_float8_all_gather ? ", float8 FSDP all-gather" : "",
             config_.float8.emulate ? ", emulated" : "", "); left in high precision: ",
             config_.float8.filter_fqns.empty() ? "none" : config_.float8.filter_fqns);
  }
  log.info(config_.model.name, " ", config_.model.flavor, ": ", facts_.parameters, " parameters, ",
           facts_.flops_per_token / 1e9, " GFLOP per token");
  if (!titan::moe_loads(model_).empty()) {
    // The ranks of this pipeline stage whose token counts sum to the step's (expert bias, logs):
    // without the tp ranks where they route the same tokens.
    const bool sequence_parallel = config_.parallelism.enable_sequence_parallel;
    moe_group_ = mesh_->flatten(dims_.token_routing_dims(sequence_parallel), "moe_stage").group("moe_stage");
    // Each micro-batch's auxiliary loss weighs 1 / accumulation; where the router's gradients are
    // summed over tp (sequence parallel: each rank's part of the sequence; expert tensor parallel:
    // each rank's whole-sequence loss, the same on every tp rank), 1 / tp of it on each.
    const bool router_summed = dims_.tp > 1 && (sequence_parallel || dims_.etp > 1);
    aux_loss_weight_ = config_.moe.aux_loss_coef / (router_summed ? static_cast<double>(dims_.tp) : 1.0);
    log.info("mixture of experts: expert_parallel_degree ", dims_.ep,
             dims_.ep > 1 ? " (ranks from tp " + std::to_string(dims_.ep_from_tp()) + ", cp " +
                                std::to_string(dims_.ep_from_cp()) + ", dp_shard " +
                                std::to_string(dims_.ep_from_dp_shard()) + ")"
                          : std::string(),
             dims_.etp > 1 ? ", each expert split over " + std::to_string(dims_.etp) + " tp ranks" : std::string(),
             ", aux_loss_coef ", config_.moe.aux_loss_coef,
             ", load_balance_coeff ", config_.moe.load_balance_coeff, ", capacity_factor ",
             config_.moe.capacity_factor, config_.moe.capacity_factor > 0 ? "" : " (dropless)");
  }
}

void Trainer::build_optimizer() {
  optimizer_ = make_adamw(model_->named_parameters(), adamw_config(config_));
  const auto units = titan::fsdp_units(model_);
  const auto kept = std::count_if(units.begin(), units.end(), [](const auto& u) { return u->keeps_compute_copy(); });
  if (kept > 0) {
    optimizer_->write_compute_copies(units);
    world_->logger().info("optimizer: AdamW writes the bf16 copy of ", kept, " one-rank FSDP unit(s) in its step ",
                          "(titan::adamw_copy_; FSDP casts neither weights nor gradients)");
  }
  for (const auto& stage : stages_) titan::verify_optimizer(*optimizer_, stage);
  schedule_ = std::make_unique<LRSchedule>(lr_schedule_options(config_));
}

void Trainer::build_data() {
  const auto& training = config_.training;
  accumulation_ = gradient_accumulation_steps(training.global_batch_size, training.batch_size, dims_.dp());
  const int64_t dp_rank = mesh_->coordinate("dp");
  loader_ = std::make_unique<DataLoader>(TokenCorpus::open(corpus_options(config_, false), *tokenizer_, world_->group()),
                                         *tokenizer_, loader_options(config_, dp_rank, dims_.dp(), false));
  if (!config_.data.val_path.empty() && config_.data.val_freq > 0) {
    val_loader_ = std::make_unique<DataLoader>(
        TokenCorpus::open(corpus_options(config_, true), *tokenizer_, world_->group()), *tokenizer_,
        loader_options(config_, dp_rank, dims_.dp(), true));
  }
  world_->logger().info("data: ", loader_->samples_per_epoch(), " samples of ", training.seq_len,
                        " tokens per epoch; ", accumulation_, " micro-batches of ", training.batch_size,
                        " per rank per step");
}

void Trainer::build_metrics() {
  auto metrics = metrics_options(config_, world_->rank());
  metrics_ = std::make_unique<MetricsLogger>(metrics.flops_per_token(facts_.flops_per_token)
                                                 .peak_flops(device_peak_flops(world_->device(), metrics.peak_flops()))
                                                 .ranks_per_replica(dims_.tp * dims_.pp)
                                                 .device(world_->device()));
  if (config_.profiling.enable_profiling)
    profiler_ = std::make_unique<StepProfiler>(config_.profiling, config_.job.dump_folder, world_->rank(),
                                               world_->device());
  // Host values (label-token counts, the stop flag) travel on the CPU: no device sync.
  host_group_ = TITAN_HAS_GLOO ? world_->new_group(world_->group()->global_ranks(), "host",
                                                   titan::GroupOptions().backend("gloo").device(c10::kCPU))
                               : world_->group();
  loss_parallel_ = dims_.tp > 1 && config_.parallelism.enable_loss_parallel;
  nan_guard_ = std::make_unique<NanGuard>(nan_policy_from_string(config_.training.nan_policy));
}

void Trainer::build_checkpoints() {
  const auto& log = world_->logger();
  // Checkpoints: model and optimizer shards by name, and the components by name (all valid on any
  // number of ranks). Resumes automatically from the latest complete one.
  std::optional<at::Generator> device_generator;
  if (world_->device().is_cuda()) device_generator = at::globalContext().defaultGenerator(world_->device());
  rng_ = std::make_unique<GeneratorState>(at::detail::getDefaultCPUGenerator(), device_generator);
  state_.model = model_.get();
  state_.optimizer = optimizer_.get();
  state_.add("data", *loader_).add("rng", *rng_).add("lr_schedule", *schedule_);
  const auto& checkpoint = config_.checkpoint;
  if (checkpoint.enable) {
    checkpoints_ = std::make_unique<titan::CheckpointManager>(
        world_, titan::CheckpointOptions((std::filesystem::path(config_.job.dump_folder) / checkpoint.folder).string())
                    .interval(checkpoint.interval)
                    .keep_latest_k(checkpoint.keep_latest_k)
                    .async(checkpoint.async_mode == "async")
                    .load_step(checkpoint.load_step)
                    .on_load_progress(load_progress_printer(world_, "the checkpoint")));
    if (auto step = checkpoints_->load_latest(state_)) {
      start_step_ = *step;
      log.info("resumed from the checkpoint of step ", start_step_);
      // Auto-resume picks up whatever the folder holds: say when it was trained otherwise.
      if (auto saved = state_.extra.find("config"); saved != state_.extra.end()) {
        const auto changes = config_changes(saved->second, config_);
        if (!changes.empty())
          log.warn("the checkpoint of step ", start_step_, " was saved with another config (", changes.size(),
                   " key(s) differ): ", c10::Join(", ", changes));
      }
    }
  }
  if (start_step_ == 0 && !checkpoint.initial_load_path.empty()) load_initial_weights();
}

void Trainer::load_initial_weights() {
  const auto& path = config_.checkpoint.initial_load_path;
  TORCH_CHECK(std::filesystem::is_directory(path), "checkpoint.initial_load_path = '", path, "' is not a folder (",
              config_.checkpoint.initial_load_in_hf ? "expected a Hugging Face model folder with config.json"
                                                    : "expected a titan checkpoint folder such as <folder>/step-1000",
              ")");
  if (config_.checkpoint.initial_load_in_hf) {
    for (auto& stage : stages_) spec_->load_hf(*stage, path);
  } else {
    titan::TrainState weights;
    weights.model = model_.get();
    titan::load_checkpoint(path, weights, world_->group(),
                           titan::LoadOptions().on_progress(load_progress_printer(world_, path)));
  }
  world_->logger().info("initial weights loaded from ", path,
                        config_.checkpoint.initial_load_in_hf ? " (Hugging Face)" : "");
}

void Trainer::build_pipelines() {
  if (dims_.pp == 1) return;
  const auto& parallelism = config_.parallelism;
  const int64_t size = parallelism.pipeline_parallel_microbatch_size;
  auto microbatches = [size](int64_t samples, const char* what) {
    TORCH_CHECK(samples % size == 0, "parallelism.pipeline_parallel_microbatch_size = ", size, " does not divide the ",
                samples, " samples of ", what);
    return samples / size;
  };
  std::vector<titan::PipelineStage> stages;
  for (int64_t v = 0; v < stages_per_rank_; ++v) {
    auto stage = stages_[static_cast<size_t>(v)];
    // Every stage reads its micro-batch's rows of the step's documents (block-causal attention).
    auto forward = [this, stage](const torch::Tensor& input, int64_t mb) {
      if (!pipeline_documents_.defined()) return run_stage(*stage, input);
      const int64_t rows = input.size(0);
      return run_stage(*stage, input, pipeline_documents_.narrow(0, mb * rows, rows));  // [rows / m, S]
    };
    stages.emplace_back(mesh_->coordinate("pp") + v * dims_.pp, stage, forward);
  }
  const auto schedule = titan::parse_schedule(parallelism.pipeline_parallel_schedule);
  const int64_t per_step = accumulation_ * config_.training.batch_size;
  pipeline_ = std::make_unique<titan::Pipeline>(
      mesh_->group("pp"), stages,
      titan::PipelineOptions().schedule(schedule).scale_grads(false).microbatches(
          microbatches(per_step, "a step on each data-parallel rank (training.global_batch_size / data-parallel degree)")));
  if (val_loader_) {
    eval_pipeline_ = std::make_unique<titan::Pipeline>(
        mesh_->group("pp"), stages,
        titan::PipelineOptions().schedule(schedule).scale_grads(false).microbatches(
            microbatches(config_.training.batch_size, "a validation batch (training.batch_size)")));
  }
  world_->logger().info("pipeline: ", dims_.pp, " ranks x ", stages_per_rank_, " stage(s), schedule ",
                        parallelism.pipeline_parallel_schedule, ", ", pipeline_->schedule().microbatches,
                        " micro-batches of ", size, " samples per step");
}

torch::Tensor Trainer::run_stage(CausalLM& stage, const torch::Tensor& input, const torch::Tensor& documents) {
  if (documents.defined()) return titan::call(stage, input, positions_, documents);  // positions_: cp > 1 only
  return positions_.defined() ? titan::call(stage, input, positions_) : titan::call(stage, input);
}

Batch Trainer::shard_sequence(const Batch& batch) const {
  if (!cp_layout_) return batch;
  Batch local;  // [B, S / cp] each
  local.input = cp_layout_->shard(batch.input, 1);
  local.labels = cp_layout_->shard(batch.labels, 1);
  local.num_label_tokens = local.labels.ne(-100).sum().item<int64_t>();  // host tensors: no device sync
  if (batch.documents.defined()) local.documents = cp_layout_->shard(batch.documents, 1);
  return local;
}

torch::Tensor Trainer::loss_sum(const Batch& batch, double grad_scale) {
  auto input = to_device(batch.input, world_->device());    // [B, S] (S / cp with context parallelism)
  auto labels = to_device(batch.labels, world_->device());  // [B, S]
  return token_loss_sum(run_stage(*stages_.front(), input, documents_of({batch})), labels, grad_scale);
}

torch::Tensor Trainer::documents_of(const std::vector<Batch>& batches) const {
  if (config_.model.attn_mask_type != "block_causal") return {};
  std::vector<torch::Tensor> documents;
  for (const auto& batch : batches) {
    TORCH_CHECK(batch.documents.defined(), "model.attn_mask_type = \"block_causal\": a batch has no documents ",
                "(Batch::documents, which DataLoader::next fills)");
    documents.push_back(batch.documents);
  }
  return to_device(torch::cat(documents), world_->device());  // [rows, S]
}

torch::Tensor Trainer::token_loss_sum(const torch::Tensor& logits, const torch::Tensor& labels, double grad_scale) {
  // logits [B, S, V] (or [B, S, V / tp] with loss parallel), labels [B, S]
  if (loss_parallel_) {
    return titan::loss_parallel_cross_entropy(logits.to(torch::kFloat32), labels, mesh_->group("tp"), -100,
                                              at::Reduction::Sum, facts_.vocab_size);
  }
  // Computed in fp32 a chunk of rows at a time, the logits' gradient (times grad_scale) written
  // during the forward.
  return titan::cross_entropy(
      logits, labels,
      titan::CrossEntropyOptions().ignore_index(-100).reduction(at::Reduction::Sum).grad_scale(grad_scale));
}

torch::Tensor Trainer::run_pipeline(titan::Pipeline& pipeline, const std::vector<Batch>& batches, double scale,
                                    bool train) {
  std::vector<torch::Tensor> inputs, labels;
  for (const auto& batch : batches) {
    inputs.push_back(batch.input);
    labels.push_back(batch.labels);
  }
  auto input = to_device(torch::cat(inputs), world_->device());    // [rows, S]
  auto label = to_device(torch::cat(labels), world_->device());    // [rows, S]
  pipeline_documents_ = documents_of(batches);                     // [rows, S] or undefined
  const int64_t count = pipeline.schedule().microbatches, rows = input.size(0) / count;
  std::vector<torch::Tensor> microbatches;
  if (pipeline.has_first_stage())
    for (int64_t mb = 0; mb < count; ++mb) microbatches.push_back(input.narrow(0, mb * rows, rows));  // [rows / m, S]
  auto sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(world_->device()));  // []
  auto loss_fn = [&](const torch::Tensor& logits, int64_t mb) {
    auto tokens = token_loss_sum(logits, label.narrow(0, mb * rows, rows), scale);  // []
    sum += tokens.detach().to(torch::kDouble);
    return tokens * scale;
  };
  if (train)
    pipeline.step(microbatches, loss_fn);
  else
    pipeline.evaluate(microbatches, loss_fn);
  pipeline_documents_ = torch::Tensor();
  return sum;
}

torch::Tensor Trainer::forward_backward(const Batch& batch, double scale) {
  auto loss = loss_sum(batch, scale);  // []
  auto objective = loss * scale;       // []
  if (aux_loss_weight_ > 0) {          // this micro-batch's load-balancing loss, a mean over micro-batches
    auto aux = titan::moe_aux_loss(*stages_.front());  // []
    interval_.aux_loss += aux.detach().to(torch::kDouble) / static_cast<double>(accumulation_);
    objective = objective + aux * (aux_loss_weight_ / static_cast<double>(accumulation_));
  }
  objective.backward();
  return loss.detach();
}

bool Trainer::train_step(int64_t step) {
  if (interval_.steps == 0) {
    auto zero = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(world_->device()));
    interval_.loss = zero.clone();
    interval_.grad_norm = zero.clone();
    interval_.skipped = zero.clone();
    interval_.aux_loss = zero.clone();
    interval_.first_step = step;
  }
  const double lr = schedule_->apply(*optimizer_, step, config_.optimizer.lr);
  optimizer_->zero_grad();
  const auto data_start = Clock::now();
  std::vector<Batch> micro_batches;  // this rank's share of the global batch
  double label_tokens = 0.0;
  int64_t tokens = 0;
  for (int64_t micro = 0; micro < accumulation_; ++micro) {
    micro_batches.push_back(shard_sequence(loader_->next()));
    label_tokens += static_cast<double>(micro_batches.back().num_label_tokens);
    tokens += micro_batches.back().input.numel();
  }
  interval_.data_seconds += seconds_since(data_start);
  // The loss is the mean over the label tokens of the whole global batch, so every token weighs
  // the same however the batch is split into ranks and micro-batches (padding and prompt tokens
  // vary per sample). Gradients are averaged over the dp x cp ranks (FSDP's), hence the factor
  // dp x cp. The count is a host value summed on the CPU group; the tp and pp ranks of a replica
  // read the same tokens, the cp ranks each their part of the sequence.
  const double global_tokens =
      titan::dist_sum(label_tokens, host_group_) / static_cast<double>(dims_.tp * dims_.pp);
  if (global_tokens == 0.0) {
    world_->logger().warn("step ", step,
                          ": the global batch has no label tokens (all prompt or padding); the step is skipped");
    return false;
  }
  const double scale = static_cast<double>(dims_.dp() * dims_.cp) / global_tokens;
  auto loss_sum_here = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(world_->device()));  // []
  if (pipeline_) {
    loss_sum_here += run_pipeline(*pipeline_, micro_batches, scale, true);  // the last stage's share, else 0
  } else {
    for (int64_t micro = 0; micro < accumulation_; ++micro) {
      titan::set_requires_gradient_sync(model_, micro + 1 == accumulation_);
      loss_sum_here += forward_backward(micro_batches[static_cast<size_t>(micro)], scale);
    }
  }
  auto norm = titan::grad_norm(model_, world_->group(), dims_.pp > 1 ? mesh_->group("pp") : nullptr);  // [] fp64
  // Clipping scales the gradients inside the optimizer's kernel (no pass of its own over them). A
  // non-finite norm (NaN/Inf loss or gradients on any rank: the norm is global) skips the update
  // on the device; the host learns of it at the next sync step.
  if (config_.training.max_norm > 0)
    optimizer_->scale_grads(titan::clip_coefficient(norm, config_.training.max_norm));
  auto not_finite = norm.isfinite().logical_not();  // []
  optimizer_->skip_if(not_finite.to(torch::kFloat).reshape({1}));
  optimizer_->step();
  if (config_.float8.precompute_float8_dynamic_scale_for_fsdp)  // the next all-gathers' scales, one all-reduce
    for (const auto& stage : stages_) titan::precompute_float8_dynamic_scale_for_fsdp(stage);

  if (moe_group_) {
    if (metrics_->is_log_step(step)) moe_loads_ = expert_loads();  // before the bias update empties the counts
    if (config_.moe.load_balance_coeff > 0)
      for (const auto& stage : stages_) titan::update_expert_bias(stage, moe_group_, config_.moe.load_balance_coeff);
  }
  interval_.loss += loss_sum_here / global_tokens;
  interval_.grad_norm += torch::where(not_finite, torch::zeros_like(norm), norm);
  interval_.skipped += not_finite;
  interval_.steps += 1;
  interval_.tokens += tokens;
  interval_.lr = lr;
  return true;
}

void Trainer::sync_host(int64_t step, bool log) {
  if (interval_.steps == 0) {
    interval_.seconds += seconds_since(clock_);
    return;
  }
  torch::Tensor loss = interval_.loss;
  double aux_loss = 0.0;  // the interval's mean auxiliary loss over the dp x cp ranks
  if (log) {  // the interval's loss collectives: over data and context parallel, and from the last pipeline stage
    loss = titan::all_reduce(loss.clone(), mesh_->group("dp_cp"));
    if (dims_.pp > 1) loss = titan::all_reduce(loss, mesh_->group("pp"));
    if (aux_loss_weight_ > 0)
      aux_loss = titan::all_reduce(interval_.aux_loss.clone(), mesh_->group("dp_cp")).item<double>() /
                 static_cast<double>(dims_.dp() * dims_.cp * interval_.steps);
  }
  auto host = torch::stack({loss, interval_.grad_norm, interval_.skipped}).cpu();  // [3]: waits for the device
  interval_.seconds += seconds_since(clock_);  // the steps' work is done now
  const double v[3] = {host[0].item<double>(), host[1].item<double>(), host[2].item<double>()};
  const auto skipped = static_cast<int64_t>(v[2]);
  nan_guard_->check(interval_.first_step, step, skipped);
  if (!log) return;
  IntervalStats stats;
  stats.step = step;
  stats.steps = interval_.steps;
  stats.loss = v[0] / static_cast<double>(interval_.steps);
  nan_guard_->check(interval_.first_step, step, std::isfinite(stats.loss) ? 0 : 1);
  stats.grad_norm = interval_.steps > skipped ? v[1] / static_cast<double>(interval_.steps - skipped) : 0.0;
  stats.lr = interval_.lr;
  stats.tokens = interval_.tokens;
  stats.seconds = interval_.seconds;
  stats.data_seconds = interval_.data_seconds;
  stats.skipped = skipped;
  world_->logger().info(metrics_->record(stats));
  if (moe_group_) log_experts(step, aux_loss);
  if (skipped > 0)
    world_->logger().warn("steps ", interval_.first_step, "-", step, ": ", skipped,
                          " step(s) with a non-finite gradient norm were skipped");
  interval_ = Interval();
}

std::vector<titan::MoeLoad> Trainer::expert_loads() {
  // With the expert bias the counts are left for its update, which empties them every step.
  const bool reset = config_.moe.load_balance_coeff == 0;
  std::vector<titan::MoeLoad> loads;
  for (const auto& stage : stages_)
    for (auto& load : titan::moe_loads(stage, reset, moe_group_)) loads.push_back(std::move(load));
  return loads;
}

void Trainer::log_experts(int64_t step, double aux_loss) {
  if (moe_loads_.empty()) return;
  const titan::MoeLoad* worst = &moe_loads_.front();
  double mean_load = 0.0;
  int64_t dropped = 0, assignments = 0;
  for (const auto& load : moe_loads_) {
    if (load.max_over_mean > worst->max_over_mean) worst = &load;
    mean_load += load.max_over_mean / static_cast<double>(moe_loads_.size());
    dropped += load.dropped;
    assignments += load.tokens.sum().item<int64_t>() + load.dropped;
  }
  const bool each_step = config_.moe.load_balance_coeff > 0;
  std::ostringstream line;
  line << "step " << step << " experts" << (each_step ? " (this step" : " (the interval")
       << (dims_.pp > 1 ? ", this pipeline stage's layers" : "") << "): max/mean load " << mean_load
       << " averaged over " << moe_loads_.size() << " layers, worst " << worst->max_over_mean << " ("
       << worst->layer << ", tokens per expert " << c10::Join(" ", std::vector<int64_t>(worst->tokens.data_ptr<int64_t>(),
                                                      worst->tokens.data_ptr<int64_t>() + worst->tokens.numel()))
       << "), dropped " << dropped << " of " << assignments << " assignments";
  if (aux_loss_weight_ > 0) line << ", aux loss " << aux_loss;
  world_->logger().info(line.str());
  std::map<std::string, double> scalars{{"moe/max_over_mean", mean_load},
                                        {"moe/max_over_mean_worst", worst->max_over_mean},
                                        {"moe/dropped", static_cast<double>(dropped)}};
  if (aux_loss_weight_ > 0) scalars["moe/aux_loss"] = aux_loss;
  for (const auto& load : moe_loads_) scalars["moe/max_over_mean/" + load.layer] = load.max_over_mean;
  metrics_->record_scalars(step, scalars);
  moe_loads_.clear();
}

void Trainer::validate(int64_t step) {
  torch::NoGradGuard no_grad;
  // Evaluation mode: MoE layers then keep no training statistics (token counts, auxiliary loss).
  for (const auto& stage : stages_) stage->eval();
  const auto back_to_training = c10::make_scope_exit([this] {
    for (const auto& stage : stages_) stage->train();
  });
  auto mean_loss = [this](const Batch& batch) {  // over the whole batch: summed over the cp ranks' parts
    const auto tokens = static_cast<double>(std::max<int64_t>(batch.num_label_tokens, 1));
    const auto local = shard_sequence(batch);
    auto sum = eval_pipeline_ ? titan::all_reduce(run_pipeline(*eval_pipeline_, {local}, 1.0, false), mesh_->group("pp"))
                              : loss_sum(local);
    if (dims_.cp > 1) sum = titan::all_reduce(sum, mesh_->group("cp"));
    return sum / tokens;
  };
  auto result = evaluate(*val_loader_, config_.data.val_steps, mean_loss, mesh_->group("dp"));
  world_->logger().info("step ", step, " validation: loss ", result.loss, ", perplexity ", result.perplexity,
                        " over ", result.tokens, " tokens");
  metrics_->record_scalars(step, {{"val/loss", result.loss}, {"val/perplexity", result.perplexity}});
}

void Trainer::save_checkpoint(int64_t step, bool force) {
  if (!checkpoints_) return;
  state_.extra["step"] = std::to_string(step);
  state_.extra["config"] = to_toml(config_);
  if (checkpoints_->maybe_save(step, state_, force)) world_->logger().info("checkpoint of step ", step, " started");
}

void Trainer::export_model() {
  const auto dir = (std::filesystem::path(config_.job.dump_folder) / "export").string();
  const auto& dtype = config_.checkpoint.export_dtype;
  // Every rank takes part: parameters are gathered one at a time while rank 0 writes them file
  // by file (at most 5 GiB each), so no rank holds the whole model.
  spec_->save_hf(*model_, *stages_.front(), dir, SaveHfOptions().dtype(dtype_named(dtype)).max_shard_bytes(5LL << 30),
                 world_->group(), dims_.pp > 1 ? mesh_->group("pp") : nullptr);
  world_->logger().info("exported the model (", dtype, ") to ", dir);
}

void Trainer::train() {
  if (!built_) build();
  const auto& log = world_->logger();
  const auto& training = config_.training;
  SignalFlag stop;
  int64_t step = start_step_;
  clock_ = Clock::now();
  while (step < training.steps) {
    ++step;
    if (profiler_) profiler_->step_begins(step);
    train_step(step);
    if (profiler_) {
      const auto trace = profiler_->step_ends(step);
      if (!trace.empty()) log.info("profiling: step ", step, " -> ", trace);
    }
    if (!verified_) {  // after the first step: every hooked module went through titan::call
      if (!pipeline_)  // a Pipeline verifies its stages itself after its first step
        for (const auto& stage : stages_) titan::verify_calls(stage);
      verified_ = true;
    }
    // The host reads the device, and the ranks agree on a stop, only at sync steps: a signal is
    // acted on within metrics.log_freq steps, and a non-finite step is reported (nan_policy
    // "stop": the run fails) before any checkpoint could hold it.
    const bool log_step = metrics_->is_log_step(step);
    const bool val_step = val_loader_ && step % config_.data.val_freq == 0;
    const bool save_step = checkpoints_ && step % config_.checkpoint.interval == 0;
    const bool last_step = step == training.steps || step == training.stop_at_step;
    if (!(log_step || val_step || save_step || last_step)) continue;
    sync_host(step, log_step);
    if (val_step) validate(step);
    const bool signalled = stop.any_rank(host_group_);
    const bool stopping = signalled || step == training.stop_at_step;
    save_checkpoint(step, stopping || step == training.steps);
    clock_ = Clock::now();  // validation and saving are not step time
    if (stopping) {
      log.info(signalled ? "signal received" : "training.stop_at_step reached", ": stopped after step ", step,
               checkpoints_ ? " (checkpoint saved)" : "");
      break;
    }
  }
  if (checkpoints_) {
    checkpoints_->wait();
    if (step == training.steps) export_model();
  }
  world_->shutdown();
}

int train_main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::printf("usage: %s --config FILE.toml [--section.key VALUE | --section.key=VALUE ...]\nkeys: %s\n"
                  "models (model.name): %s\n",
                  argv[0], c10::Join(", ", config_keys()).c_str(), c10::Join(", ", model_registry().names()).c_str());
      return 0;
    }
  }
  TrainConfig config;
  try {
    config = parse_config_args(argc, argv);
    model_spec_of(config);  // a registered model and one of its flavors
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "config error: %s\n", e.what_without_backtrace());
    return 2;
  }
  try {
    Trainer(std::move(config)).train();
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what_without_backtrace());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}

}  // namespace titan::examples
