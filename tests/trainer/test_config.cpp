// Tests of examples/common/config.cpp: TOML and command-line parsing, validation, to_toml.
#include "trainer_fixtures.hpp"

#include <common/optim.hpp>
#include <common/metrics.hpp>
#include <common/parallelism.hpp>
#include <models/llama/model.hpp>
#include <models/registry.hpp>

#include <set>


TEST_CASE("config: to_toml reads back to the same config") {
  auto dir = scratch("config_roundtrip");
  TrainConfig c;
  c.job.description = "quotes \" and \\ backslash\tand tab";
  c.optimizer.lr = 3e-4;
  c.optimizer.eps = 1e-8;
  c.optimizer.weight_decay = 0.1;
  c.training.steps = 17;
  c.training.max_norm = 0.0;
  c.lr_scheduler.decay_type = "cosine";
  c.lr_scheduler.min_lr_ratio = 1.0 / 3.0;
  c.activation_checkpoint.selective_ac_option = "op";
  c.data.pack = false;
  c.data.tokenize_threads = 3;
  c.parallelism.expert_tensor_parallel_degree = 2;
  c.data.kind = "chat";
  c.data.chat_format = "llama3.1";
  c.data.chat_system = "You are \"terse\".\nAnswer in one line.";
  c.data.chat_date = "06 Dec 2026";
  save_config(c, (dir / "sub" / "saved.toml").string());
  auto back = load_config_file((dir / "sub" / "saved.toml").string());
  CHECK(to_toml(back) == to_toml(c));
  CHECK(back.optimizer.lr == c.optimizer.lr);
  CHECK(back.lr_scheduler.min_lr_ratio == c.lr_scheduler.min_lr_ratio);
  CHECK(back.job.description == c.job.description);
  CHECK(back.data.pack == false);
  CHECK(back.data.tokenize_threads == 3);
  CHECK(back.parallelism.expert_tensor_parallel_degree == 2);
  CHECK(back.data.chat_format == "llama3.1");
  CHECK(back.data.chat_system == c.data.chat_system);
  CHECK(back.data.chat_date == "06 Dec 2026");
  CHECK(config_keys().size() == 91);
}

TEST_CASE("config: unknown sections and keys suggest the closest valid one") {
  auto dir = scratch("config_unknown");
  write_file(dir / "a.toml", "[training]\nstepz = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "a.toml").string()), "a.toml", "training.stepz", "training.steps");
  write_file(dir / "b.toml", "[trainig]\nsteps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "b.toml").string()), "b.toml", "[trainig]", "did you mean [training]");
  write_file(dir / "c.toml", "steps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "c.toml").string()), "c.toml", "'steps' must be a [section] table");
  write_file(dir / "d.toml", "[training\nsteps = 5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "d.toml").string()), "d.toml", "TOML syntax error", "line 1");
  // A missing file is a missing file, not a syntax error.
  CHECK_ERROR_HAS(load_config_file((dir / "missing.toml").string()), "missing.toml: no such file");
  CHECK_ERROR_HAS(load_config_file(dir.string()), "is not a file");
  CHECK(closest_match("warmup_step", {"warmup_steps", "decay_type", "min_lr_ratio"}) == "warmup_steps");
}

TEST_CASE("config: wrong types and out-of-range values name the key and what is valid") {
  auto dir = scratch("config_values");
  write_file(dir / "t.toml", "[training]\nsteps = \"ten\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "t.toml").string()), "t.toml", "training.steps must be an integer",
                  "string");
  write_file(dir / "r.toml", "[optimizer]\nlr = -1\n");
  CHECK_ERROR_HAS(load_config_file((dir / "r.toml").string()), "r.toml", "optimizer.lr = -1", "out of range", ">= 0");
  write_file(dir / "b.toml", "[optimizer]\nbeta2 = 1.5\n");
  CHECK_ERROR_HAS(load_config_file((dir / "b.toml").string()), "optimizer.beta2", "in [0.0, 1.0]");
  write_file(dir / "c.toml", "[lr_scheduler]\ndecay_type = \"exp\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "c.toml").string()), "lr_scheduler.decay_type = 'exp'",
                  "linear, sqrt, cosine, constant");
  write_file(dir / "s.toml", "[activation_checkpoint]\nselective_ac_option = \"sometimes\"\n");
  CHECK_ERROR_HAS(load_config_file((dir / "s.toml").string()), "selective_ac_option", "\"op\" or a positive integer");
  write_file(dir / "g.toml", "[training]\nbatch_size = 8\nglobal_batch_size = 4\n");
  CHECK_ERROR_HAS(load_config_file((dir / "g.toml").string()), "training.global_batch_size = 4");
  write_file(dir / "p.toml", "[training]\nsteps = 10\nstop_at_step = 11\n");
  CHECK_ERROR_HAS(load_config_file((dir / "p.toml").string()), "p.toml", "training.stop_at_step = 11",
                  "[1, training.steps = 10]");
  write_file(dir / "h.toml", "[checkpoint]\ninitial_load_in_hf = true\n");
  CHECK_ERROR_HAS(load_config_file((dir / "h.toml").string()), "h.toml", "checkpoint.initial_load_in_hf",
                  "needs checkpoint.initial_load_path");
  // Integers are fine for floats and for selective_ac_option.
  write_file(dir / "ok.toml", "[optimizer]\nlr = 1\n[activation_checkpoint]\nselective_ac_option = 3\n");
  auto ok = load_config_file((dir / "ok.toml").string());
  CHECK(ok.optimizer.lr == 1.0);
  CHECK(ok.activation_checkpoint.selective_ac_option == "3");
}

TEST_CASE("config: command-line overrides in both forms, after the file") {
  auto dir = scratch("config_cli");
  auto file = (dir / "base.toml").string();
  write_file(file, "[training]\nsteps = 100\nseed = 3\n[model]\nname = \"llama2\"\n");
  std::vector<const char*> argv{"prog",          "--training.steps", "7", "--config", file.c_str(),
                                "--optimizer.lr=0.5", "--metrics.enable_tensorboard", "true",
                                "--activation_checkpoint.selective_ac_option=op"};
  auto c = parse_config_args(static_cast<int>(argv.size()), argv.data());
  CHECK(c.training.steps == 7);  // the override wins although it came first
  CHECK(c.training.seed == 3);
  CHECK(c.model.name == "llama2");
  CHECK(c.optimizer.lr == 0.5);
  CHECK(c.metrics.enable_tensorboard);
  CHECK(c.activation_checkpoint.selective_ac_option == "op");

  std::vector<const char*> bad_key{"prog", "--training.sed", "1"};
  CHECK_ERROR_HAS(parse_config_args(3, bad_key.data()), "command line", "training.sed", "training.seed");
  std::vector<const char*> bad_int{"prog", "--training.steps=many"};
  CHECK_ERROR_HAS(parse_config_args(2, bad_int.data()), "training.steps = 'many' is not an integer");
  std::vector<const char*> bad_bool{"prog", "--data.pack", "yes"};
  CHECK_ERROR_HAS(parse_config_args(3, bad_bool.data()), "data.pack = 'yes' must be true or false");
  std::vector<const char*> missing{"prog", "--training.steps"};
  CHECK_ERROR_HAS(parse_config_args(2, missing.data()), "--training.steps needs a value");
  std::vector<const char*> twice{"prog", "--config", "a", "--config=b"};
  CHECK_ERROR_HAS(parse_config_args(4, twice.data()), "--config given twice");
}

TEST_CASE("config: every example config validates") {
  int count = 0;
  std::set<std::string> names;
  for (const auto& entry : fs::directory_iterator(fs::path(TITAN_SOURCE_DIR) / "examples" / "configs")) {
    if (entry.path().extension() != ".toml") continue;
    INFO("config ", entry.path().string());
    auto c = load_config_file(entry.path().string());
    CHECK(!c.model.tokenizer_path.empty());
    CHECK(!c.data.path.empty());
    CHECK_NOTHROW(model_spec_of(c));  // a registered model and flavor
    // The batch settings divide at the data-parallel degree the file asks for (or 1 when inferred).
    int64_t dp = std::max<int64_t>(1, c.parallelism.data_parallel_shard_degree) *
                 c.parallelism.data_parallel_replicate_degree;
    CHECK(gradient_accumulation_steps(c.training.global_batch_size, c.training.batch_size, dp) >= 1);
    names.insert(entry.path().filename().string());
    ++count;
  }
  for (const char* expected : {"llama3_debug.toml", "llama2_debug.toml", "mistral_debug.toml", "llama3_debug_alpaca.toml",
                               "llama2_7b.toml", "llama2_13b.toml", "llama2_70b.toml", "llama3_8b.toml",
                               "llama3_70b.toml", "llama3_405b.toml", "mistral_7b.toml", "mixtral_debug.toml",
                               "mixtral_8x7b.toml", "qwen3_moe_debug.toml", "qwen3_30b_a3b.toml", "qwen3_debug.toml",
                               "qwen3_8b.toml", "qwen3_debug_chat.toml"})
    CHECK_MESSAGE(names.count(expected) == 1, expected, " is missing");
  CHECK(count >= 18);
}

TEST_CASE("config: config_changes lists the keys a resumed run changed, with both values") {
  TrainConfig saved;
  saved.training.stop_at_step = 10;
  const auto text = to_toml(saved);
  CHECK(config_changes(text, saved).empty());
  TrainConfig now = saved;
  now.training.stop_at_step = -1;
  now.parallelism.context_parallel_degree = 2;
  CHECK(config_changes(text, now) ==
        std::vector<std::string>{"training.stop_at_step: 10 -> -1", "parallelism.context_parallel_degree: 1 -> 2"});
  const auto unreadable = config_changes("[training\nsteps = 1", now);
  REQUIRE(unreadable.size() == 1);
  CHECK(unreadable[0].find("not TOML") != std::string::npos);
  const auto unknown = config_changes("[training]\nstepz = 1\n", now);
  REQUIRE(unknown.size() == 1);
  CHECK(unknown[0].find("training.stepz") != std::string::npos);
}

TEST_CASE("config: context parallel degree in the mesh; the sequence length must split into 2 cp chunks") {
  ParallelismConfig p;
  p.context_parallel_degree = 2;
  auto dims = ParallelDims::from_config(p, 4);  // dp_shard inferred: 2
  CHECK(dims.cp == 2);
  CHECK(dims.dp_shard == 2);
  CHECK(dims.dp() == 2);
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 3), doctest::Contains("context_parallel_degree (2)"));
  TrainConfig c;
  c.parallelism.context_parallel_degree = 2;
  c.training.seq_len = 30;
  CHECK_ERROR_HAS(validate(c), "training.seq_len = 30 must be a multiple of 2 x parallelism.context_parallel_degree = 4");
  c.training.seq_len = 32;
  validate(c);
  apply_override(c, "parallelism.context_parallel_rotate_method", "ring", "command line");
  CHECK_ERROR_HAS(validate(c), "context_parallel_rotate_method = 'ring'", "allgather, p2p");
}

TEST_CASE("config: the [moe] keys reach a MoE model's layers and are errors where they cannot apply") {
  TrainConfig c;
  c.model.name = "qwen3_moe";
  apply_override(c, "moe.top_k", "3", "command line");
  apply_override(c, "moe.score_func", "sigmoid", "command line");
  apply_override(c, "moe.capacity_factor", "1.25", "command line");
  apply_override(c, "moe.load_balance_coeff", "0.001", "command line");
  validate(c);
  const auto model = model_spec_of(c).build(c, 100, torch::kMeta);
  auto* block = dynamic_cast<TransformerImpl&>(*model).layers[1]->as<TransformerBlockImpl>();
  const auto& options = block->moe->options();
  CHECK(options.top_k() == 3);
  CHECK(options.score() == titan::RouterScore::Sigmoid);
  CHECK(options.capacity_factor() == 1.25);
  CHECK(options.expert_bias());
  CHECK_FALSE(options.aux_loss());
  TrainConfig bad = c;
  apply_override(bad, "moe.score_func", "tanh", "command line");
  CHECK_ERROR_HAS(validate(bad), "moe.score_func", "softmax, sigmoid");
  c.model.name = "llama3";
  CHECK_ERROR_HAS(model_spec_of(c).build(c, 100, torch::kMeta), "needs a mixture-of-experts model", "llama3 has dense");
  TrainConfig pipelined;
  pipelined.parallelism.pipeline_parallel_degree = 2;
  apply_override(pipelined, "moe.aux_loss_coef", "0.02", "command line");
  CHECK_ERROR_HAS(validate(pipelined), "moe.aux_loss_coef = 0.02 needs pipeline_parallel_degree = 1",
                  "moe.load_balance_coeff");
}

TEST_CASE("config: lr_scheduler.decay_ratio is the decaying fraction of training.steps, after warmup") {
  TrainConfig c;
  c.training.steps = 10;
  c.lr_scheduler.warmup_steps = 2;
  CHECK(lr_schedule_options(c).decay_steps() == -1);  // every step after warmup
  apply_override(c, "lr_scheduler.decay_ratio", "0.3", "command line");
  validate(c);
  CHECK(lr_schedule_options(c).decay_steps() == 3);
  TrainConfig negative = c;
  negative.lr_scheduler.decay_ratio = -0.5;
  CHECK_ERROR_HAS(validate(negative), "lr_scheduler.decay_ratio = -0.5 must be in [0, 1], or -1");
  TrainConfig overlapping = c;
  apply_override(overlapping, "lr_scheduler.decay_ratio", "0.9", "command line");
  CHECK_ERROR_HAS(validate(overlapping), "decays the last 9 of the 10 steps (training.steps)",
                  "overlaps the 2 warmup steps");
}

TEST_CASE("config: training.deterministic_warn_only needs training.deterministic") {
  TrainConfig c;
  apply_override(c, "training.deterministic_warn_only", "true", "command line");
  CHECK_ERROR_HAS(validate(c), "training.deterministic_warn_only = true needs training.deterministic = true");
  apply_override(c, "training.deterministic", "true", "command line");
  validate(c);
  CHECK(c.training.deterministic);
}

TEST_CASE("config: block-causal attention combines with every parallelism; an unknown mask type names the choices") {
  TrainConfig c;
  apply_override(c, "model.attn_mask_type", "block_causal", "command line");
  validate(c);
  for (const char* key : {"parallelism.pipeline_parallel_degree", "parallelism.context_parallel_degree",
                          "parallelism.tensor_parallel_degree"}) {
    TrainConfig parallel = c;
    apply_override(parallel, key, "2", "command line");
    validate(parallel);
  }
  apply_override(c, "model.attn_mask_type", "document", "command line");
  CHECK_ERROR_HAS(validate(c), "model.attn_mask_type", "causal, block_causal");
}

TEST_CASE("config: float8 options that do not go together are errors naming both keys") {
  TrainConfig c;
  c.float8.enable = true;
  apply_override(c, "float8.recipe_name", "rowwise", "command line");
  apply_override(c, "float8.enable_fsdp_float8_all_gather", "true", "command line");
  CHECK_ERROR_HAS(validate(c), "float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = \"tensorwise\"",
                  "not \"rowwise\"");
  c.float8.recipe_name = "tensorwise";
  validate(c);
  c.float8.enable_fsdp_float8_all_gather = false;
  c.float8.precompute_float8_dynamic_scale_for_fsdp = true;
  CHECK_ERROR_HAS(validate(c), "precompute_float8_dynamic_scale_for_fsdp = true needs",
                  "float8.enable_fsdp_float8_all_gather = true");
  apply_override(c, "float8.recipe_name", "rowwize", "command line");
  CHECK_ERROR_HAS(validate(c), "float8.recipe_name = 'rowwize'", "tensorwise, rowwise, rowwise_with_gw_hp");
}

TEST_CASE("config: pipeline parallel degrees, schedules and split points are checked with the keys named") {
  ParallelismConfig p;
  p.pipeline_parallel_degree = 2;
  p.tensor_parallel_degree = 2;
  auto dims = ParallelDims::from_config(p, 8);  // dp_shard inferred
  CHECK(dims.pp == 2);
  CHECK(dims.dp_shard == 2);
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 6),
                    doctest::Contains("pipeline_parallel_degree (2) x data_parallel_replicate_degree (1) x "
                                      "context_parallel_degree (1) x tensor_parallel_degree (2) = 4 does not divide "
                                      "the world size 6"));
  p.data_parallel_shard_degree = 3;
  CHECK_THROWS_WITH(ParallelDims::from_config(p, 8), doctest::Contains("= 12 but the job has 8 ranks"));

  // Stages per rank: from the split points, or 2 for an interleaved schedule without them.
  ParallelismConfig q;
  q.pipeline_parallel_degree = 2;
  CHECK(pipeline_stages_per_rank(q) == 1);
  q.pipeline_parallel_schedule = "Interleaved1F1B";
  CHECK(pipeline_stages_per_rank(q) == 2);
  q.pipeline_parallel_split_points = "layers.1, layers.2,layers.3 ";
  CHECK(model_registry().at("llama3").pipeline_split(q).split_points() ==
        std::vector<std::string>{"layers.1", "layers.2", "layers.3"});
  CHECK(pipeline_stages_per_rank(q) == 2);
  q.pipeline_parallel_split_points = "layers.2";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("1 split points make 2 stages, 1 per rank, but schedule Interleaved1F1B runs "
                                      "at least 2 per rank (4 stages: 3 split points)"));
  q.pipeline_parallel_schedule = "1F1B";
  q.pipeline_parallel_split_points = "layers.1,layers.2";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("2 split points make 3 stages, which pipeline_parallel_degree 2 ranks cannot "
                                      "hold equally"));
  q.pipeline_parallel_split_points = "layers.1,layers.2,layers.3";
  CHECK_THROWS_WITH(pipeline_stages_per_rank(q),
                    doctest::Contains("3 split points make 4 stages but schedule 1F1B runs one stage per rank"));
}

TEST_CASE("config: the sections become the options of data, optimizer and metrics") {
  TrainConfig c;
  c.job.dump_folder = "/runs/x";
  c.model.tokenizer_path = "tok.model";
  c.data.kind = "jsonl";
  c.data.path = "train.jsonl";
  c.data.val_path = "valid.jsonl";
  c.data.text_field = "body";
  c.data.pack = false;
  c.training.batch_size = 3;
  c.training.seq_len = 64;
  c.training.seed = 9;
  c.training.steps = 77;
  c.optimizer.lr = 1e-3;
  c.optimizer.beta2 = 0.99;
  c.lr_scheduler.warmup_steps = 5;
  c.lr_scheduler.decay_type = "cosine";
  c.metrics.enable_tensorboard = true;
  auto corpus = corpus_options(c, false);
  CHECK(corpus.path() == "train.jsonl");
  CHECK(corpus.text_field() == "body");
  CHECK(corpus.cache_dir() == "/runs/x/token_cache");
  CHECK(corpus.tokenizer_id() == "tiktoken:tok.model");
  CHECK(corpus_options(c, true).path() == "valid.jsonl");
  c.data.cache_dir = "/cache";
  CHECK(corpus_options(c, true).cache_dir() == "/cache");
  auto train = loader_options(c, 1, 2, false);
  CHECK((train.batch_size() == 3 && train.seq_len() == 64 && train.seed() == 9 && !train.pack() && train.shuffle()));
  CHECK((train.dp_rank() == 1 && train.dp_size() == 2));
  CHECK_FALSE(loader_options(c, 1, 2, true).shuffle());
  auto adamw = adamw_config(c);
  CHECK((adamw.lr() == 1e-3 && adamw.beta2() == 0.99 && adamw.weight_decay() == 0.1));
  auto schedule = lr_schedule_options(c);
  CHECK((schedule.total_steps() == 77 && schedule.warmup_steps() == 5 && schedule.decay_type() == "cosine"));
  auto metrics = metrics_options(c, 0);
  CHECK(metrics.jsonl_path() == "/runs/x/metrics.jsonl");
  CHECK(metrics.tensorboard_dir() == "/runs/x/tb");
  CHECK(metrics.enabled());
  CHECK_FALSE(metrics_options(c, 1).enabled());
  c.data.val_path = "";
  CHECK_ERROR_HAS(corpus_options(c, true), "data.val_path is empty");
}
