#include "train.hpp"

#include "../common/config.hpp"
#include "../common/data.hpp"
#include "../common/guard.hpp"
#include "../common/metrics.hpp"
#include "../common/optim.hpp"
#include "../models/hf.hpp"
#include "../models/transformer.hpp"
#include "../tokenizers/tokenizer.hpp"
#include "parallelize.hpp"

#include <titan/checkpoint.hpp>
#include <titan/dist.hpp>
#include <titan/fsdp.hpp>
#include <titan/meta.hpp>
#include <titan/tensor_parallel.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>

namespace titan::examples {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

/// The sum of the one-element float64 `value` over `group`.
double sum_over(const torch::Tensor& value, const titan::ProcessGroupPtr& group) {
  return titan::detail::all_reduce_raw(value.to(group->device()), *group, titan::ReduceOp::Sum).item<double>();
}

/// Dense bf16 peak FLOP/s of the device for MFU; 0 (MFU "n/a") where no nominal peak applies.
double peak_flops(const c10::Device& device) {
#if TITAN_HAS_NCCL
  if (device.is_cuda()) {
    const std::string name = at::cuda::getDeviceProperties(device.index())->name;
    if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos) return 989e12;
    if (name.find("A100") != std::string::npos) return 312e12;
  }
#endif
  return 0.0;
}

std::string join(const std::vector<std::string>& items) {
  std::string text;
  for (const auto& item : items) text += (text.empty() ? "" : ", ") + item;
  return text;
}

/// The model of `config`, on the meta device: a debug flavor takes its vocabulary from the
/// tokenizer; a real one must cover it.
ModelArgs model_args_for(const TrainConfig& config, const Tokenizer& tokenizer) {
  auto args = model_args(config.model.name, config.model.flavor);
  if (config.model.flavor == "debug") {
    args.vocab_size(tokenizer.vocab_size());
  } else {
    TORCH_CHECK(tokenizer.vocab_size() <= args.vocab_size(), "model: the tokenizer '", config.model.tokenizer_path,
                "' has ", tokenizer.vocab_size(), " ids but ", config.model.name, " ", config.model.flavor,
                " has a vocabulary of ", args.vocab_size());
  }
  args.max_seq_len(config.training.seq_len);
  return args;
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

/// Fails unless the Hugging Face model at `path` has the architecture of `args` (the shapes are
/// checked again per tensor by load_hf).
void check_hf_architecture(const ModelArgs& args, const std::string& path) {
  const auto hf = read_hf_config(path);
  auto check = [&](const char* what, double ours, double theirs) {
    TORCH_CHECK(ours == theirs, "checkpoint.initial_load_path: the Hugging Face model '", path, "' has ", what, " = ",
                theirs, " but the configured model has ", ours, " (check model.name / model.flavor)");
  };
  check("hidden size (dim)", args.dim(), hf.dim());
  check("layers", args.n_layers(), hf.n_layers());
  check("attention heads", args.n_heads(), hf.n_heads());
  check("key/value heads", args.n_kv_heads(), hf.n_kv_heads());
  check("vocabulary size", args.vocab_size(), hf.vocab_size());
  check("rope_theta", args.rope_theta(), hf.rope_theta());
  check("rms_norm_eps", args.norm_eps(), hf.norm_eps());
  check("sliding_window", args.sliding_window(), hf.sliding_window());
}

/// Starts from checkpoint.initial_load_path (when there was nothing to resume): a Hugging Face
/// folder, each rank reading only its slices, or the model part of a titan checkpoint.
void load_initial_weights(TransformerImpl& model, const TrainConfig& config, const titan::WorldPtr& world) {
  const auto& path = config.checkpoint.initial_load_path;
  TORCH_CHECK(std::filesystem::is_directory(path), "checkpoint.initial_load_path = '", path, "' is not a folder (",
              config.checkpoint.initial_load_in_hf ? "expected a Hugging Face model folder with config.json"
                                                   : "expected a titan checkpoint folder such as <folder>/step-1000",
              ")");
  if (config.checkpoint.initial_load_in_hf) {
    check_hf_architecture(model.args, path);
    load_hf(model, path);
  } else {
    titan::TrainState weights;
    weights.model = &model;
    titan::load_checkpoint(path, weights, world->group(), load_progress_printer(world, path));
  }
  world->logger().info("initial weights loaded from ", path, config.checkpoint.initial_load_in_hf ? " (Hugging Face)" : "");
}

torch::Dtype dtype_named(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  return torch::kFloat32;
}

/// Writes the trained weights as a Hugging Face directory (config.json + safetensors files of at
/// most 5 GiB + index) in checkpoint.export_dtype. Every rank takes part: parameters are gathered
/// one at a time while rank 0 writes them file by file, so no rank holds the whole model.
void export_model(const TransformerImpl& model, const TrainConfig& config, const titan::WorldPtr& world,
                  const std::string& dir) {
  save_hf(model, dir, SaveHfOptions().dtype(dtype_named(config.checkpoint.export_dtype)).max_shard_bytes(5LL << 30),
          world->group());
  world->logger().info("exported the model (", config.checkpoint.export_dtype, ") to ", dir);
}

void train(const TrainConfig& config) {
  auto world = titan::init_distributed();
  const auto& log = world->logger();
  const std::filesystem::path dump(config.job.dump_folder);
  log.info(config.job.description, " | ", world->world_size(), " ranks, ", world->backend_name(), " on ",
           world->device().str());
  log.info("resolved config:\n", to_toml(config));
  if (world->rank() == 0) save_config(config, (dump / "config.toml").string());

  const auto dims = ParallelDims::from_config(config.parallelism, world->world_size());
  auto mesh = dims.build_mesh(world);
  log.info("mesh: dp_replicate=", dims.dp_replicate, " dp_shard=", dims.dp_shard, " tp=", dims.tp);

  auto tokenizer = load_tokenizer(config.model.tokenizer_path, config.model.tokenizer_kind);
  const auto args = model_args_for(config, *tokenizer);
  const auto& training = config.training;

  // Build on meta, parallelize, then allocate and initialize only what this rank holds.
  Transformer model(args, torch::kMeta);
  parallelize_llama(*model, mesh, dims, config);
  titan::to_empty(*model, world->device());
  init_weights(*model, static_cast<uint64_t>(training.seed));
  const double flops = flops_per_token(args, training.seq_len);
  log.info(config.model.name, " ", config.model.flavor, ": ", parameter_count(args), " parameters, ",
           flops / 1e9, " GFLOP per token");

  auto optimizer = make_adamw(model->named_parameters(), adamw_config(config));
  const LRSchedule schedule(lr_schedule_options(config));
  const int64_t accumulation = gradient_accumulation_steps(training.global_batch_size, training.batch_size, dims.dp());

  const auto& data = config.data;
  const auto& dp_group = mesh.group("dp");
  const int64_t dp_rank = mesh.coordinate("dp");
  DataLoader loader(TokenCorpus::open(corpus_options(config, false), *tokenizer, world->group()), *tokenizer,
                    loader_options(config, dp_rank, dims.dp(), false));
  std::unique_ptr<DataLoader> val_loader;
  if (!data.val_path.empty() && data.val_freq > 0) {
    val_loader = std::make_unique<DataLoader>(TokenCorpus::open(corpus_options(config, true), *tokenizer, world->group()),
                                              *tokenizer, loader_options(config, dp_rank, dims.dp(), true));
  }
  log.info("data: ", loader.samples_per_epoch(), " samples of ", training.seq_len, " tokens per epoch; ",
           accumulation, " micro-batches of ", training.batch_size, " per rank per step");

  MetricsLogger metrics(metrics_options(config, world->rank())
                            .flops_per_token(flops)
                            .peak_flops(peak_flops(world->device()))
                            .device(world->device()));

  const bool loss_parallel = dims.tp > 1 && config.parallelism.enable_loss_parallel;
  const auto& tp_group = mesh.group("tp");
  // The sum of the cross-entropies of a micro-batch's label tokens (labels -100 are ignored).
  auto token_loss_sum = [&](const Batch& batch) {
    auto input = batch.input.to(world->device());    // [B, S]
    auto labels = batch.labels.to(world->device());  // [B, S]
    auto logits = titan::call(model, input);         // [B, S, V] (or [B, S, V / tp] with loss parallel)
    if (loss_parallel) {
      return titan::loss_parallel_cross_entropy(logits.to(torch::kFloat32), labels, tp_group, -100, at::Reduction::Sum);
    }
    return torch::nn::functional::cross_entropy(
        logits.flatten(0, 1).to(torch::kFloat32), labels.flatten(),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100).reduction(torch::kSum));
  };
  auto mean_loss = [&](const Batch& batch) {  // for validation
    return token_loss_sum(batch) / static_cast<double>(std::max<int64_t>(batch.num_label_tokens, 1));
  };

  // Checkpoints: model and optimizer shards by name, the CPU RNG, the config and step, and the
  // data position (the same on every rank, valid on any number of ranks). Resumes automatically
  // from the latest complete one.
  at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle sharing the global CPU generator
  titan::TrainState state;
  state.model = model.get();
  state.optimizer = optimizer.get();
  state.tensors.emplace_back("cpu_rng_state", titan::replicated(generator.get_state()));
  std::unique_ptr<titan::CheckpointManager> checkpoints;
  int64_t start_step = 0;
  const auto& checkpoint = config.checkpoint;
  if (checkpoint.enable) {
    checkpoints = std::make_unique<titan::CheckpointManager>(
        world, titan::CheckpointOptions((dump / checkpoint.folder).string())
                   .interval(checkpoint.interval)
                   .keep_latest_k(checkpoint.keep_latest_k)
                   .async(checkpoint.async_mode == "async")
                   .load_step(checkpoint.load_step)
                   .on_load_progress(load_progress_printer(world, "the checkpoint")));
    if (auto step = checkpoints->load_latest(state)) {
      start_step = *step;
      generator.set_state(state.tensors.front().second.local);
      auto data_state = state.extra.find("data");
      TORCH_CHECK(data_state != state.extra.end(), "the checkpoint of step ", start_step, " in ",
                  checkpoints->options().folder(), " has no data loader state ('data' in its extra state)");
      loader.load_state(DataState::from_json(data_state->second));
      log.info("resumed from the checkpoint of step ", start_step);
    }
  }
  if (start_step == 0 && !checkpoint.initial_load_path.empty()) load_initial_weights(*model, config, world);
  auto save_checkpoint = [&](int64_t step, bool force) {
    if (!checkpoints) return;
    state.tensors.front().second.local.copy_(generator.get_state());
    state.extra["step"] = std::to_string(step);
    state.extra["config"] = to_toml(config);
    state.extra["data"] = loader.state().to_json();
    if (checkpoints->maybe_save(step, state, force)) log.info("checkpoint of step ", step, " started");
  };

  NanGuard nan_guard(nan_policy_from_string(training.nan_policy));
  // One optimizer step; nullopt when it is skipped (no label tokens, or a NaN loss with
  // nan_policy "skip"), in which case the parameters are unchanged.
  auto train_step = [&](int64_t step) -> std::optional<StepStats> {
    const auto step_start = Clock::now();
    const double lr = schedule.apply(*optimizer, step, config.optimizer.lr);
    optimizer->zero_grad();
    const auto data_start = Clock::now();
    std::vector<Batch> micro_batches;  // this rank's share of the global batch
    double label_tokens = 0.0;
    int64_t tokens = 0;
    for (int64_t micro = 0; micro < accumulation; ++micro) {
      micro_batches.push_back(loader.next());
      label_tokens += static_cast<double>(micro_batches.back().num_label_tokens);
      tokens += micro_batches.back().input.numel();
    }
    const double data_seconds = seconds_since(data_start);
    // The loss is the mean over the label tokens of the whole global batch, so every token weighs
    // the same however the batch is split into ranks and micro-batches (padding and prompt tokens
    // vary per sample). Gradients are averaged over the dp ranks, hence the factor dp.
    auto totals = torch::tensor({label_tokens}, torch::kFloat64);
    const double global_tokens = sum_over(totals, dp_group);
    if (global_tokens == 0.0) {
      log.warn("step ", step, ": the global batch has no label tokens (all prompt or padding); the step is skipped");
      return std::nullopt;
    }
    double loss_sum = 0.0;
    for (int64_t micro = 0; micro < accumulation; ++micro) {
      titan::set_requires_gradient_sync(*model, micro + 1 == accumulation);
      auto loss = token_loss_sum(micro_batches[micro]);
      (loss * (static_cast<double>(dims.dp()) / global_tokens)).backward();
      loss_sum += loss.item<double>();
    }
    const double loss_value = sum_over(torch::tensor({loss_sum}, torch::kFloat64), dp_group) / global_tokens;
    if (!nan_guard.check(step, loss_value)) {
      log.warn("step ", step, ": loss is ", loss_value, ", the step is skipped (", nan_guard.skipped(), " so far)");
      optimizer->zero_grad();
      return std::nullopt;
    }
    const double grad_norm = clip_grad_norm_by_layout(*model, training.max_norm, mesh.group("shard_tp"));
    optimizer->step();

    StepStats stats;
    stats.step = step;
    stats.loss = loss_value;
    stats.grad_norm = grad_norm;
    stats.lr = lr;
    stats.tokens = tokens;
    stats.step_seconds = seconds_since(step_start);
    stats.data_seconds = data_seconds;
    return stats;
  };

  SignalFlag stop;
  int64_t step = start_step;
  while (step < training.steps) {
    ++step;
    if (auto stats = train_step(step)) {
      if (auto line = metrics.record(*stats)) log.info(*line);
    }

    if (val_loader && step % data.val_freq == 0) {
      torch::NoGradGuard no_grad;
      auto result = evaluate(*val_loader, data.val_steps, mean_loss, dp_group);
      log.info("step ", step, " validation: loss ", result.loss, ", perplexity ", result.perplexity, " over ",
               result.tokens, " tokens");
      metrics.record_scalars(step, {{"val/loss", result.loss}, {"val/perplexity", result.perplexity}});
    }
    const bool signalled = stop.any_rank(world->group());
    const bool stopping = signalled || step == training.stop_at_step;
    save_checkpoint(step, stopping || step == training.steps);
    if (stopping) {
      log.info(signalled ? "signal received" : "training.stop_at_step reached", ": stopped after step ", step,
               checkpoints ? " (checkpoint saved)" : "");
      break;
    }
  }
  if (checkpoints) {
    checkpoints->wait();
    if (step == training.steps) export_model(*model, config, world, (dump / "export").string());
  }
  world->shutdown();
}

}  // namespace

int train_main(int argc, char** argv, const std::vector<std::string>& families) {
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::printf("usage: %s --config FILE.toml [--section.key VALUE | --section.key=VALUE ...]\nkeys: %s\n", argv[0],
                  join(config_keys()).c_str());
      return 0;
    }
  }
  TrainConfig config;
  try {
    config = parse_config_args(argc, argv);
    TORCH_CHECK(std::find(families.begin(), families.end(), config.model.name) != families.end(), "model.name = '",
                config.model.name, "' is not trained by ", argv[0], " (expected one of: ", join(families), ")");
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "config error: %s\n", e.what_without_backtrace());
    return 2;
  }
  try {
    train(config);
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
