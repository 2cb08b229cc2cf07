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

namespace titan::examples {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
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

torch::Dtype dtype_named(const std::string& name) {
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float16") return torch::kFloat16;
  return torch::kFloat32;
}

/// Writes the trained weights as a Hugging Face directory (config.json + safetensors) in
/// checkpoint.export_dtype: gathered on rank 0 into a CPU copy of the model, so rank 0 needs the
/// whole model in host memory once.
void export_model(const TransformerImpl& model, const TrainConfig& config, const titan::WorldPtr& world,
                  const std::string& dir) {
  auto state = titan::full_state_dict(model, world->group());  // every rank gathers; rank 0 keeps
  if (world->rank() != 0) return;
  Transformer copy(model.args, torch::kCPU);
  titan::load_full_state_dict(*copy, state);
  save_hf(*copy, dir, SaveHfOptions().dtype(dtype_named(config.checkpoint.export_dtype)));
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
  auto compute_loss = [&](const Batch& batch) {
    auto input = batch.input.to(world->device());    // [B, S]
    auto labels = batch.labels.to(world->device());  // [B, S]
    auto logits = titan::call(model, input);         // [B, S, V] (or [B, S, V / tp] with loss parallel)
    if (loss_parallel) return titan::loss_parallel_cross_entropy(logits.to(torch::kFloat32), labels, tp_group);
    return torch::nn::functional::cross_entropy(
        logits.flatten(0, 1).to(torch::kFloat32), labels.flatten(),
        torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
  };

  // Checkpoints: model and optimizer shards by name, the CPU RNG, the config and step, and each
  // rank's data position. Resumes automatically from the latest complete one.
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
                   .load_step(checkpoint.load_step));
    if (auto step = checkpoints->load_latest(state)) {
      start_step = *step;
      generator.set_state(state.tensors.front().second.local);
      auto data_state = state.rank_extra.find("data");
      if (data_state != state.rank_extra.end()) {
        loader.load_state(DataState::from_json(data_state->second));
      } else {
        log.warn("the checkpoint of step ", start_step, " was saved with another world size: the data order restarts");
      }
      log.info("resumed from the checkpoint of step ", start_step);
    }
  }
  auto save_checkpoint = [&](int64_t step, bool force) {
    if (!checkpoints) return;
    state.tensors.front().second.local.copy_(generator.get_state());
    state.extra["step"] = std::to_string(step);
    state.extra["config"] = to_toml(config);
    state.rank_extra["data"] = loader.state().to_json();
    if (checkpoints->maybe_save(step, state, force)) log.info("checkpoint of step ", step, " started");
  };

  NanGuard nan_guard(nan_policy_from_string(training.nan_policy));
  SignalFlag stop;
  int64_t step = start_step;
  while (step < training.steps) {
    ++step;
    const auto step_start = Clock::now();
    const double lr = schedule.apply(*optimizer, step, config.optimizer.lr);
    optimizer->zero_grad();
    double data_seconds = 0.0, loss_sum = 0.0;
    int64_t tokens = 0;
    for (int64_t micro = 0; micro < accumulation; ++micro) {
      const auto data_start = Clock::now();
      auto batch = loader.next();
      data_seconds += seconds_since(data_start);
      titan::set_requires_gradient_sync(*model, micro + 1 == accumulation);
      auto loss = compute_loss(batch);
      (loss / static_cast<double>(accumulation)).backward();
      loss_sum += loss.item<double>();
      tokens += batch.input.numel();
    }
    auto step_loss = torch::full({1}, loss_sum / static_cast<double>(accumulation), torch::kFloat64);
    step_loss = titan::detail::all_reduce_raw(step_loss.to(world->device()), *dp_group, titan::ReduceOp::Avg);
    const double loss_value = step_loss.item<double>();
    if (!nan_guard.check(step, loss_value)) {
      log.warn("step ", step, ": loss is ", loss_value, ", the step is skipped (", nan_guard.skipped(), " so far)");
      optimizer->zero_grad();
      continue;
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
    if (auto line = metrics.record(stats)) log.info(*line);

    if (val_loader && step % data.val_freq == 0) {
      torch::NoGradGuard no_grad;
      auto result = evaluate(*val_loader, data.val_steps, compute_loss, dp_group);
      log.info("step ", step, " validation: loss ", result.loss, ", perplexity ", result.perplexity, " over ",
               result.tokens, " tokens");
      metrics.record_scalars(step, {{"val/loss", result.loss}, {"val/perplexity", result.perplexity}});
    }
    const bool stopping = stop.any_rank(world->group());
    save_checkpoint(step, stopping || step == training.steps);
    if (stopping) {
      log.info("signal received: stopped after step ", step, checkpoints ? " (checkpoint saved)" : "");
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
