#include "config.hpp"
#include "chat.hpp"
#include "strings.hpp"

#include <titan/context_parallel.hpp>
#include <titan/float8.hpp>
#include <titan/pipeline/schedule.hpp>

#include <c10/util/Exception.h>
#include <toml++/toml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <variant>

namespace titan::examples {
namespace {

/// One key of the configuration: where it lives in TrainConfig and what values it takes.
struct Field {
  std::string section;
  std::string key;
  std::variant<int64_t*, double*, bool*, std::string*> target;
  std::vector<std::string> choices = {};  // strings only; empty = any
  double min = -INFINITY;                 // numbers only
  double max = INFINITY;
  bool integer_as_string = false;         // a string key that also takes a TOML integer

  std::string name() const { return section + "." + key; }
};

Field choice(std::string s, std::string k, std::string* t, std::vector<std::string> c) {
  return Field{std::move(s), std::move(k), t, std::move(c)};
}
Field text(std::string s, std::string k, std::string* t) { return Field{std::move(s), std::move(k), t}; }
Field flag(std::string s, std::string k, bool* t) { return Field{std::move(s), std::move(k), t}; }
Field integer(std::string s, std::string k, int64_t* t, double lo, double hi = INFINITY) {
  return Field{std::move(s), std::move(k), t, {}, lo, hi};
}
Field real(std::string s, std::string k, double* t, double lo, double hi = INFINITY) {
  return Field{std::move(s), std::move(k), t, {}, lo, hi};
}

/// The names of a titan enum's table (titan::schedule_names() and the like): the key's choices.
template <typename Table>
std::vector<std::string> names_in(const Table& table) {
  std::vector<std::string> names;
  for (const auto& entry : table) names.emplace_back(entry.second);
  return names;
}

/// The fields of `c`, pointing into it, in printing order.
std::vector<Field> fields_of(TrainConfig& c) {
  const std::vector<std::string> dtypes{"float32", "bfloat16"};
  Field ac_option = text("activation_checkpoint", "selective_ac_option", &c.activation_checkpoint.selective_ac_option);
  ac_option.integer_as_string = true;
  return {
      text("job", "dump_folder", &c.job.dump_folder),
      text("job", "description", &c.job.description),
      text("model", "name", &c.model.name),  // a registered model: checked by model_spec_of (models/registry.hpp)
      text("model", "flavor", &c.model.flavor),
      integer("model", "n_layers", &c.model.n_layers, 0),
      text("model", "tokenizer_path", &c.model.tokenizer_path),
      choice("model", "tokenizer_kind", &c.model.tokenizer_kind, {"tiktoken", "huggingface", "sentencepiece"}),
      choice("model", "attn_mask_type", &c.model.attn_mask_type, {"causal", "block_causal"}),
      flag("model", "fused_projections", &c.model.fused_projections),
      choice("optimizer", "name", &c.optimizer.name, {"AdamW"}),
      real("optimizer", "lr", &c.optimizer.lr, 0.0),
      real("optimizer", "eps", &c.optimizer.eps, 0.0),
      real("optimizer", "beta1", &c.optimizer.beta1, 0.0, 1.0),
      real("optimizer", "beta2", &c.optimizer.beta2, 0.0, 1.0),
      real("optimizer", "weight_decay", &c.optimizer.weight_decay, 0.0),
      flag("optimizer", "no_decay_norms_and_biases", &c.optimizer.no_decay_norms_and_biases),
      integer("lr_scheduler", "warmup_steps", &c.lr_scheduler.warmup_steps, 0),
      real("lr_scheduler", "decay_ratio", &c.lr_scheduler.decay_ratio, -1.0, 1.0),
      choice("lr_scheduler", "decay_type", &c.lr_scheduler.decay_type, {"linear", "sqrt", "cosine", "constant"}),
      real("lr_scheduler", "min_lr_ratio", &c.lr_scheduler.min_lr_ratio, 0.0, 1.0),
      integer("training", "batch_size", &c.training.batch_size, 1),
      integer("training", "global_batch_size", &c.training.global_batch_size, -1),
      integer("training", "seq_len", &c.training.seq_len, 1),
      integer("training", "steps", &c.training.steps, 1),
      integer("training", "stop_at_step", &c.training.stop_at_step, -1),
      real("training", "max_norm", &c.training.max_norm, -INFINITY),
      integer("training", "seed", &c.training.seed, 0),
      choice("training", "mixed_precision_param", &c.training.mixed_precision_param, dtypes),
      choice("training", "mixed_precision_reduce", &c.training.mixed_precision_reduce, dtypes),
      choice("training", "nan_policy", &c.training.nan_policy, {"stop", "skip"}),
      choice("training", "fused_kernels", &c.training.fused_kernels, {"aten", "cuda"}),
      flag("training", "deterministic", &c.training.deterministic),
      flag("training", "deterministic_warn_only", &c.training.deterministic_warn_only),
      integer("parallelism", "data_parallel_shard_degree", &c.parallelism.data_parallel_shard_degree, -1),
      integer("parallelism", "data_parallel_replicate_degree", &c.parallelism.data_parallel_replicate_degree, 1),
      integer("parallelism", "tensor_parallel_degree", &c.parallelism.tensor_parallel_degree, 1),
      flag("parallelism", "enable_sequence_parallel", &c.parallelism.enable_sequence_parallel),
      flag("parallelism", "enable_loss_parallel", &c.parallelism.enable_loss_parallel),
      flag("parallelism", "reshard_after_forward", &c.parallelism.reshard_after_forward),
      integer("parallelism", "pipeline_parallel_degree", &c.parallelism.pipeline_parallel_degree, 1),
      choice("parallelism", "pipeline_parallel_schedule", &c.parallelism.pipeline_parallel_schedule,
             names_in(titan::schedule_names())),
      integer("parallelism", "pipeline_parallel_microbatch_size", &c.parallelism.pipeline_parallel_microbatch_size, 1),
      text("parallelism", "pipeline_parallel_split_points", &c.parallelism.pipeline_parallel_split_points),
      integer("parallelism", "context_parallel_degree", &c.parallelism.context_parallel_degree, 1),
      choice("parallelism", "context_parallel_rotate_method", &c.parallelism.context_parallel_rotate_method,
             names_in(titan::rotate_method_names())),
      integer("parallelism", "expert_parallel_degree", &c.parallelism.expert_parallel_degree, 1),
      integer("parallelism", "expert_tensor_parallel_degree", &c.parallelism.expert_tensor_parallel_degree, 1),
      flag("float8", "enable", &c.float8.enable),
      choice("float8", "recipe_name", &c.float8.recipe_name, names_in(titan::float8_recipe_names())),
      text("float8", "filter_fqns", &c.float8.filter_fqns),
      flag("float8", "enable_fsdp_float8_all_gather", &c.float8.enable_fsdp_float8_all_gather),
      flag("float8", "precompute_float8_dynamic_scale_for_fsdp", &c.float8.precompute_float8_dynamic_scale_for_fsdp),
      flag("float8", "emulate", &c.float8.emulate),
      integer("moe", "top_k", &c.moe.top_k, 0),
      choice("moe", "score_func", &c.moe.score_func, {"flavor", "softmax", "sigmoid"}),
      real("moe", "aux_loss_coef", &c.moe.aux_loss_coef, 0.0),
      real("moe", "load_balance_coeff", &c.moe.load_balance_coeff, 0.0),
      real("moe", "capacity_factor", &c.moe.capacity_factor, 0.0),
      flag("checkpoint", "enable", &c.checkpoint.enable),
      text("checkpoint", "folder", &c.checkpoint.folder),
      integer("checkpoint", "interval", &c.checkpoint.interval, 1),
      integer("checkpoint", "keep_latest_k", &c.checkpoint.keep_latest_k, 0),
      choice("checkpoint", "async_mode", &c.checkpoint.async_mode, {"disabled", "async"}),
      integer("checkpoint", "load_step", &c.checkpoint.load_step, -1),
      text("checkpoint", "initial_load_path", &c.checkpoint.initial_load_path),
      flag("checkpoint", "initial_load_in_hf", &c.checkpoint.initial_load_in_hf),
      choice("checkpoint", "export_dtype", &c.checkpoint.export_dtype, {"float32", "bfloat16", "float16"}),
      choice("activation_checkpoint", "mode", &c.activation_checkpoint.mode, {"none", "full", "selective"}),
      ac_option,
      integer("metrics", "log_freq", &c.metrics.log_freq, 1),
      flag("metrics", "enable_tensorboard", &c.metrics.enable_tensorboard),
      text("metrics", "save_tb_folder", &c.metrics.save_tb_folder),
      flag("metrics", "enable_jsonl", &c.metrics.enable_jsonl),
      real("metrics", "peak_flops", &c.metrics.peak_flops, 0.0),
      flag("profiling", "enable_profiling", &c.profiling.enable_profiling),
      text("profiling", "save_traces_folder", &c.profiling.save_traces_folder),
      integer("profiling", "profile_freq", &c.profiling.profile_freq, 1),
      choice("data", "kind", &c.data.kind, {"text", "jsonl", "alpaca", "chat"}),
      text("data", "path", &c.data.path),
      text("data", "text_field", &c.data.text_field),
      text("data", "val_path", &c.data.val_path),
      integer("data", "val_freq", &c.data.val_freq, 0),
      integer("data", "val_steps", &c.data.val_steps, 1),
      flag("data", "skip_malformed", &c.data.skip_malformed),
      choice("data", "prompt_template", &c.data.prompt_template, {"alpaca"}),
      choice("data", "chat_format", &c.data.chat_format, chat_formats()),
      text("data", "chat_system", &c.data.chat_system),
      text("data", "chat_date", &c.data.chat_date),
      flag("data", "pack", &c.data.pack),
      text("data", "cache_dir", &c.data.cache_dir),
      integer("data", "tokenize_threads", &c.data.tokenize_threads, 0),
  };
}

std::vector<std::string> sections_of(const std::vector<Field>& fields) {
  std::vector<std::string> out;
  for (const auto& f : fields)
    if (std::find(out.begin(), out.end(), f.section) == out.end()) out.push_back(f.section);
  return out;
}

std::vector<std::string> keys_in(const std::vector<Field>& fields, const std::string& section) {
  std::vector<std::string> out;
  for (const auto& f : fields)
    if (f.section == section) out.push_back(f.key);
  return out;
}

/// The field named "section.key"; an unknown name fails with the closest valid one.
Field& find_field(std::vector<Field>& fields, const std::string& name, const std::string& source) {
  for (auto& f : fields)
    if (f.name() == name) return f;
  auto dot = name.find('.');
  auto sections = sections_of(fields);
  if (dot == std::string::npos) {
    std::vector<std::string> all;
    for (const auto& f : fields) all.push_back(f.name());
    TORCH_CHECK(false, source, ": '", name, "' is not a config key (keys are section.key); did you mean '",
                closest_match(name, all), "'?");
  }
  auto section = name.substr(0, dot);
  TORCH_CHECK(std::find(sections.begin(), sections.end(), section) != sections.end(), source,
              ": unknown section [", section, "]; did you mean [", closest_match(section, sections),
              "]? Sections: ", join(sections));
  auto keys = keys_in(fields, section);
  TORCH_CHECK(false, source, ": unknown key '", name, "'; did you mean '", section, ".",
              closest_match(name.substr(dot + 1), keys), "'? Keys of [", section, "]: ", join(keys));
}

std::string type_name(const Field& f) {
  struct {
    std::string operator()(int64_t*) const { return "an integer"; }
    std::string operator()(double*) const { return "a number"; }
    std::string operator()(bool*) const { return "true or false"; }
    std::string operator()(std::string*) const { return "a string"; }
  } name;
  auto out = std::visit(name, f.target);
  if (f.integer_as_string) out += " or an integer";
  return out;
}

int64_t parse_int(const std::string& text, const Field& f, const std::string& source) {
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK(!text.empty() && *end == '\0' && errno == 0, source, ": ", f.name(), " = '", text,
              "' is not an integer");
  return value;
}

double parse_double(const std::string& text, const Field& f, const std::string& source) {
  errno = 0;
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  TORCH_CHECK(!text.empty() && *end == '\0' && errno == 0, source, ": ", f.name(), " = '", text,
              "' is not a number");
  return value;
}

/// Sets `f` from a TOML node, checking the TOML type.
void set_from_node(const Field& f, const toml::node& node, const std::string& source) {
  auto wrong = [&]() {
    std::ostringstream got;
    got << node.type();
    TORCH_CHECK(false, source, ": ", f.name(), " must be ", type_name(f), ", got a TOML ", got.str());
  };
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, int64_t>) {
          if (!node.is_integer()) wrong();
          *target = node.as_integer()->get();
        } else if constexpr (std::is_same_v<T, double>) {
          if (node.is_floating_point()) *target = node.as_floating_point()->get();
          else if (node.is_integer()) *target = static_cast<double>(node.as_integer()->get());
          else wrong();
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!node.is_boolean()) wrong();
          *target = node.as_boolean()->get();
        } else {
          if (node.is_string()) *target = node.as_string()->get();
          else if (f.integer_as_string && node.is_integer()) *target = std::to_string(node.as_integer()->get());
          else wrong();
        }
      },
      f.target);
}

/// Sets `f` from its command-line text.
void set_from_text(const Field& f, const std::string& text, const std::string& source) {
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, int64_t>) {
          *target = parse_int(text, f, source);
        } else if constexpr (std::is_same_v<T, double>) {
          *target = parse_double(text, f, source);
        } else if constexpr (std::is_same_v<T, bool>) {
          TORCH_CHECK(text == "true" || text == "false" || text == "1" || text == "0", source, ": ", f.name(),
                      " = '", text, "' must be true or false");
          *target = text == "true" || text == "1";
        } else {
          *target = text;
        }
      },
      f.target);
}

/// A TOML string literal.
std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += static_cast<char>(ch);
    } else if (ch < 0x20 || ch == 0x7f) {
      char buffer[8];
      std::snprintf(buffer, sizeof(buffer), "\\u%04x", ch);
      out += buffer;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out + "\"";
}

/// The shortest decimal form that reads back as the same double, always a TOML float.
std::string format_double(double v) {
  char buffer[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", precision, v);
    if (std::strtod(buffer, nullptr) == v) break;
  }
  std::string out = buffer;
  if (out.find_first_of(".en") == std::string::npos) out += ".0";
  return out;
}

void check_field(const Field& f, const std::string& source) {
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, std::string>) {
          TORCH_CHECK(f.choices.empty() || std::find(f.choices.begin(), f.choices.end(), *target) != f.choices.end(),
                      source, ": ", f.name(), " = '", *target, "' is not one of: ", join(f.choices));
        } else if constexpr (!std::is_same_v<T, bool>) {
          double value = static_cast<double>(*target);
          std::string expected = std::isinf(f.max) ? (std::isinf(f.min) ? std::string("a finite number")
                                                                          : ">= " + format_double(f.min))
                                                   : "in [" + format_double(f.min) + ", " + format_double(f.max) + "]";
          TORCH_CHECK(std::isfinite(value) && value >= f.min && value <= f.max, source, ": ", f.name(), " = ",
                      *target, " is out of range; expected ", expected);
        }
      },
      f.target);
}

void apply_table(TrainConfig& config, const toml::table& root, const std::string& source) {
  auto fields = fields_of(config);
  auto sections = sections_of(fields);
  for (auto&& [section_key, section_node] : root) {
    std::string section(section_key.str());
    TORCH_CHECK(section_node.is_table(), source, ": '", section,
                "' must be a [section] table; sections: ", join(sections));
    TORCH_CHECK(std::find(sections.begin(), sections.end(), section) != sections.end(), source,
                ": unknown section [", section, "]; did you mean [", closest_match(section, sections),
                "]? Sections: ", join(sections));
    for (auto&& [key, node] : *section_node.as_table()) {
      const Field& f = find_field(fields, section + "." + std::string(key.str()), source);
      set_from_node(f, node, source);
    }
  }
}

}  // namespace

std::string closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& candidate : candidates) {
    // Levenshtein distance, one row at a time.
    std::vector<size_t> row(candidate.size() + 1);
    for (size_t j = 0; j <= candidate.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= word.size(); ++i) {
      size_t diagonal = row[0];
      row[0] = i;
      for (size_t j = 1; j <= candidate.size(); ++j) {
        size_t above = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (word[i - 1] == candidate[j - 1] ? 0 : 1)});
        diagonal = above;
      }
    }
    if (row.back() < best_distance) {
      best_distance = row.back();
      best = candidate;
    }
  }
  return best;
}

void apply_override(TrainConfig& config, const std::string& key, const std::string& value, const std::string& source) {
  auto fields = fields_of(config);
  set_from_text(find_field(fields, key, source), value, source);
}

int64_t lr_decay_steps(const TrainConfig& config) {
  const double ratio = config.lr_scheduler.decay_ratio;
  return ratio < 0 ? -1 : std::llround(ratio * static_cast<double>(config.training.steps));
}

void validate(const TrainConfig& config, const std::string& source) {
  auto fields = fields_of(const_cast<TrainConfig&>(config));  // read only
  for (const auto& f : fields) check_field(f, source);
  const auto& t = config.training;
  TORCH_CHECK(t.global_batch_size == -1 || t.global_batch_size >= t.batch_size, source,
              ": training.global_batch_size = ", t.global_batch_size, " must be -1 (batch_size times the data ",
              "parallel degree) or at least training.batch_size = ", t.batch_size);
  TORCH_CHECK(t.stop_at_step == -1 || (t.stop_at_step >= 1 && t.stop_at_step <= t.steps), source,
              ": training.stop_at_step = ", t.stop_at_step, " must be -1 (run to the end) or in [1, training.steps = ",
              t.steps, "]");
  TORCH_CHECK(!config.checkpoint.initial_load_in_hf || !config.checkpoint.initial_load_path.empty(), source,
              ": checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_path (the Hugging Face folder)");
  const auto& option = config.activation_checkpoint.selective_ac_option;
  bool positive_integer = !option.empty() && option.size() < 10 &&
                          std::all_of(option.begin(), option.end(), [](char ch) { return ch >= '0' && ch <= '9'; }) &&
                          std::stol(option) > 0;
  TORCH_CHECK(option == "op" || positive_integer, source, ": activation_checkpoint.selective_ac_option = '", option,
              "' must be \"op\" or a positive integer");
  const auto& p = config.parallelism;
  TORCH_CHECK(p.data_parallel_shard_degree == -1 || p.data_parallel_shard_degree >= 1, source,
              ": parallelism.data_parallel_shard_degree = ", p.data_parallel_shard_degree,
              " must be -1 (inferred) or >= 1");
  const int64_t cp_chunks = p.context_parallel_degree > 1 ? 2 * p.context_parallel_degree : 1;
  TORCH_CHECK(t.seq_len % cp_chunks == 0, source, ": training.seq_len = ", t.seq_len, " must be a multiple of 2 x ",
              "parallelism.context_parallel_degree = ", cp_chunks, " (each context-parallel rank holds two equal ",
              "chunks of every sequence)");
  const auto& lr = config.lr_scheduler;
  TORCH_CHECK(lr.decay_ratio == -1 || lr.decay_ratio >= 0, source, ": lr_scheduler.decay_ratio = ", lr.decay_ratio,
              " must be in [0, 1], or -1 (every step after warmup decays)");
  const int64_t decay_steps = lr_decay_steps(config);
  TORCH_CHECK(decay_steps < 0 || lr.warmup_steps + decay_steps <= t.steps, source, ": lr_scheduler.decay_ratio = ",
              lr.decay_ratio, " decays the last ", decay_steps, " of the ", t.steps, " steps (training.steps), which ",
              "overlaps the ", lr.warmup_steps, " warmup steps: lower decay_ratio or warmup_steps");
  TORCH_CHECK(t.deterministic || !t.deterministic_warn_only, source, ": training.deterministic_warn_only = true ",
              "needs training.deterministic = true (it turns the error for an operator without a deterministic ",
              "kernel into a warning)");
  TORCH_CHECK(config.moe.aux_loss_coef == 0 || p.pipeline_parallel_degree == 1, source, ": moe.aux_loss_coef = ",
              config.moe.aux_loss_coef, " needs pipeline_parallel_degree = 1 (the auxiliary loss spans every layer's ",
              "tokens; with pipeline parallelism balance the experts with moe.load_balance_coeff)");
  const auto& f = config.float8;
  TORCH_CHECK(!f.enable_fsdp_float8_all_gather || f.recipe_name == "tensorwise", source,
              ": float8.enable_fsdp_float8_all_gather = true needs float8.recipe_name = \"tensorwise\" (one scale per ",
              "weight), not \"", f.recipe_name, "\"");
  TORCH_CHECK(!f.precompute_float8_dynamic_scale_for_fsdp || f.enable_fsdp_float8_all_gather, source,
              ": float8.precompute_float8_dynamic_scale_for_fsdp = true needs ",
              "float8.enable_fsdp_float8_all_gather = true (it precomputes the scales of the float8 all-gather)");
}

std::vector<std::string> comma_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream list(text);
  for (std::string item; std::getline(list, item, ',');) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) items.push_back(item);
  }
  return items;
}

TrainConfig load_config_file(const std::string& path) {
  TrainConfig config;
  std::error_code error;
  TORCH_CHECK(std::filesystem::is_regular_file(path, error), "config ", path, ": ",
              std::filesystem::exists(path, error) ? "is not a file" : "no such file",
              " (pass a TOML file such as examples/configs/llama3_debug.toml to --config)");
  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    TORCH_CHECK(false, "config ", path, ": TOML syntax error at ", where.str(), ": ", e.description());
  }
  apply_table(config, root, "config " + path);
  validate(config, "config " + path);
  return config;
}

TrainConfig parse_config_args(int argc, const char* const* argv) {
  std::vector<std::pair<std::string, std::string>> overrides;
  std::string file;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    TORCH_CHECK(arg.rfind("--", 0) == 0 && arg.size() > 2, "command line: expected --config FILE or ",
                "--section.key VALUE, got '", arg, "'");
    arg = arg.substr(2);
    std::string value;
    auto equals = arg.find('=');
    if (equals != std::string::npos) {
      value = arg.substr(equals + 1);
      arg = arg.substr(0, equals);
    } else {
      TORCH_CHECK(i + 1 < argc, "command line: --", arg, " needs a value");
      value = argv[++i];
    }
    if (arg == "config" || arg == "job.config_file") {
      TORCH_CHECK(file.empty(), "command line: --config given twice ('", file, "' and '", value, "')");
      file = value;
    } else {
      overrides.emplace_back(arg, value);
    }
  }
  TrainConfig config = file.empty() ? TrainConfig{} : load_config_file(file);
  for (const auto& [key, value] : overrides) apply_override(config, key, value, "command line --" + key);
  validate(config, file.empty() ? "command line" : "config " + file + " with command-line overrides");
  return config;
}

namespace {
/// A field's value as TOML text.
std::string value_text(const Field& f) {
  std::ostringstream out;
  std::visit(
      [&](auto* target) {
        using T = std::remove_pointer_t<decltype(target)>;
        if constexpr (std::is_same_v<T, int64_t>) out << *target;
        else if constexpr (std::is_same_v<T, double>) out << format_double(*target);
        else if constexpr (std::is_same_v<T, bool>) out << (*target ? "true" : "false");
        else out << quote(*target);
      },
      f.target);
  return out.str();
}
}  // namespace

std::string to_toml(const TrainConfig& config) {
  auto fields = fields_of(const_cast<TrainConfig&>(config));  // read only
  std::ostringstream out;
  std::string section;
  for (const auto& f : fields) {
    if (f.section != section) {
      out << (section.empty() ? "" : "\n") << "[" << f.section << "]\n";
      section = f.section;
    }
    out << f.key << " = " << value_text(f) << "\n";
  }
  return out.str();
}

std::vector<std::string> config_changes(const std::string& saved_toml, const TrainConfig& config) {
  TrainConfig saved;
  try {
    apply_table(saved, toml::parse(saved_toml), "the checkpoint's config");
  } catch (const toml::parse_error& e) {
    return {std::string("the checkpoint's saved config is not TOML (") + std::string(e.description()) + ")"};
  } catch (const c10::Error& e) {
    return {e.what_without_backtrace()};
  }
  auto before = fields_of(saved), now = fields_of(const_cast<TrainConfig&>(config));  // read only
  std::vector<std::string> changes;
  for (size_t i = 0; i < now.size(); ++i) {
    const auto was = value_text(before[i]), is = value_text(now[i]);
    if (was != is) changes.push_back(now[i].name() + ": " + was + " -> " + is);
  }
  return changes;
}

void save_config(const TrainConfig& config, const std::string& path) {
  auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent);
  std::ofstream file(path);
  TORCH_CHECK(file, "cannot write the config to ", path);
  file << to_toml(config);
  TORCH_CHECK(file.good(), "writing the config to ", path, " failed");
}

std::vector<std::string> config_keys() {
  TrainConfig scratch;
  std::vector<std::string> out;
  for (const auto& f : fields_of(scratch)) out.push_back(f.name());
  return out;
}

}  // namespace titan::examples
