#include "hf.hpp"

#include <titan/fsdp.hpp>
#include <titan/safetensors.hpp>

#include <filesystem>
#include <set>
#include <utility>
#include <vector>

namespace titan::examples {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// Per-layer name pairs: titan suffix after "layers.<i>." and transformers suffix after
/// "model.layers.<i>.".
const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"attention.wq.weight", "self_attn.q_proj.weight"},
      {"attention.wk.weight", "self_attn.k_proj.weight"},
      {"attention.wv.weight", "self_attn.v_proj.weight"},
      {"attention.wo.weight", "self_attn.o_proj.weight"},
      {"feed_forward.w1.weight", "mlp.gate_proj.weight"},
      {"feed_forward.w2.weight", "mlp.down_proj.weight"},
      {"feed_forward.w3.weight", "mlp.up_proj.weight"},
      {"attention_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
  };
  return names;
}

const std::vector<std::pair<std::string, std::string>>& top_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"tok_embeddings.weight", "model.embed_tokens.weight"},
      {"norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"},
  };
  return names;
}

/// Translates `name` between the two schemes: `from_prefix` + "<i>." + suffix -> `to_prefix` ...
std::string translate(const std::string& name, bool to_hf) {
  for (const auto& [titan_name, hf_name] : top_names())
    if (name == (to_hf ? titan_name : hf_name)) return to_hf ? hf_name : titan_name;
  const std::string from_prefix = to_hf ? "layers." : "model.layers.";
  const std::string to_prefix = to_hf ? "model.layers." : "layers.";
  if (name.rfind(from_prefix, 0) == 0) {
    auto dot = name.find('.', from_prefix.size());
    auto index = name.substr(from_prefix.size(), dot == std::string::npos ? 0 : dot - from_prefix.size());
    bool numeric = !index.empty() && index.find_first_not_of("0123456789") == std::string::npos;
    if (numeric) {
      auto rest = name.substr(dot + 1);
      for (const auto& [titan_suffix, hf_suffix] : layer_names())
        if (rest == (to_hf ? titan_suffix : hf_suffix)) return to_prefix + index + "." + (to_hf ? hf_suffix : titan_suffix);
    }
  }
  TORCH_CHECK(false, to_hf ? "to_hf_name" : "from_hf_name", ": '", name, "' is not a parameter of a ",
              to_hf ? "titan Transformer" : "LlamaForCausalLM / MistralForCausalLM");
}

/// Query/key heads of `name` (titan name) when its rows are RoPE-permuted, else 0.
int64_t rotary_heads(const std::string& name, const ModelArgs& args) {
  if (ends_with(name, "attention.wq.weight")) return args.n_heads();
  if (ends_with(name, "attention.wk.weight")) return args.n_kv_heads();
  return 0;
}

/// Rows of `heads` heads [heads * hd, cols] from one pairing to the other: Meta's (2p, 2p+1) to
/// Hugging Face's (p, p + hd/2) when `to_hf`, else back.
torch::Tensor permute_rows(const torch::Tensor& w, int64_t heads, int64_t head_dim, bool to_hf) {
  const int64_t cols = w.size(1);
  auto split = to_hf ? w.view({heads, head_dim / 2, 2, cols}) : w.view({heads, 2, head_dim / 2, cols});
  return split.transpose(1, 2).reshape({heads * head_dim, cols});
}

/// The full shape of parameter `name` of a model with `args`.
std::vector<int64_t> global_shape(const std::string& name, const ModelArgs& args) {
  const int64_t d = args.dim(), q = args.n_heads() * args.effective_head_dim(),
                kv = args.n_kv_heads() * args.effective_head_dim(), f = args.hidden_dim();
  if (name == "tok_embeddings.weight" || name == "output.weight") return {args.vocab_size(), d};
  if (ends_with(name, "norm.weight")) return {d};
  if (ends_with(name, "attention.wq.weight")) return {q, d};
  if (ends_with(name, "attention.wk.weight") || ends_with(name, "attention.wv.weight")) return {kv, d};
  if (ends_with(name, "attention.wo.weight")) return {d, q};
  if (ends_with(name, "feed_forward.w1.weight") || ends_with(name, "feed_forward.w3.weight")) return {f, d};
  if (ends_with(name, "feed_forward.w2.weight")) return {d, f};
  TORCH_CHECK(false, "load_hf: unexpected parameter '", name, "'");
}

std::string config_file(const std::string& path) {
  return std::filesystem::is_directory(path) ? path + "/config.json" : path;
}

}  // namespace

std::string to_hf_name(const std::string& name) { return translate(name, /*to_hf=*/true); }
std::string from_hf_name(const std::string& hf_name) { return translate(hf_name, /*to_hf=*/false); }

torch::Tensor to_hf_tensor(const std::string& name, const torch::Tensor& tensor, const ModelArgs& args) {
  int64_t heads = rotary_heads(name, args);
  return heads ? permute_rows(tensor, heads, args.effective_head_dim(), /*to_hf=*/true) : tensor;
}

torch::Tensor from_hf_tensor(const std::string& hf_name, const torch::Tensor& tensor, const ModelArgs& args) {
  const std::string name = from_hf_name(hf_name);
  int64_t heads = rotary_heads(name, args);
  return heads ? permute_rows(tensor, heads, args.effective_head_dim(), /*to_hf=*/false) : tensor;
}

ModelArgs read_hf_config(const std::string& path) {
  const std::string file = config_file(path);
  auto config = titan::json::load(file);
  TORCH_CHECK(config.is_object(), file, ": expected a JSON object");
  auto get = [&](const char* key) -> const titan::json::Value& {
    const auto* v = config.find(key);
    TORCH_CHECK(v != nullptr && !v->is_null(), file, ": missing \"", key, "\"");
    return *v;
  };
  auto get_or_null = [&](const char* key) -> const titan::json::Value* {
    const auto* v = config.find(key);
    return v != nullptr && !v->is_null() ? v : nullptr;
  };
  auto int_of = [&](const char* key) {
    const auto& v = get(key);
    TORCH_CHECK(v.is_number(), file, ": \"", key, "\" must be a number, got ", v.type_name());
    return v.as_int();
  };

  const std::string model_type = get("model_type").as_string();
  TORCH_CHECK(model_type == "llama" || model_type == "mistral", file, ": model_type \"", model_type,
              "\" is not supported (expected \"llama\" or \"mistral\")");
  if (const auto* tied = get_or_null("tie_word_embeddings"))
    TORCH_CHECK(!tied->as_bool(), file, ": tie_word_embeddings = true is not supported (output is untied)");
  if (const auto* act = get_or_null("hidden_act"))
    TORCH_CHECK(act->as_string() == "silu", file, ": hidden_act \"", act->as_string(), "\" is not supported (silu)");
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (const auto* bias = get_or_null(key)) TORCH_CHECK(!bias->as_bool(), file, ": ", key, " = true is not supported");

  ModelArgs args;
  args.dim(int_of("hidden_size"))
      .n_layers(int_of("num_hidden_layers"))
      .n_heads(int_of("num_attention_heads"))
      .vocab_size(int_of("vocab_size"))
      .ffn_hidden_dim(int_of("intermediate_size"))
      .max_seq_len(int_of("max_position_embeddings"));
  args.n_kv_heads(get_or_null("num_key_value_heads") ? int_of("num_key_value_heads") : args.n_heads());
  if (get_or_null("head_dim")) args.head_dim(int_of("head_dim"));
  if (const auto* eps = get_or_null("rms_norm_eps")) args.norm_eps(eps->as_double());
  if (model_type == "mistral" && get_or_null("sliding_window")) args.sliding_window(int_of("sliding_window"));

  // transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters holding both.
  const auto* rope = get_or_null("rope_parameters");
  if (rope == nullptr) rope = get_or_null("rope_scaling");
  if (const auto* theta = get_or_null("rope_theta")) args.rope_theta(theta->as_double());
  if (rope != nullptr) {
    TORCH_CHECK(rope->is_object(), file, ": rope parameters must be an object");
    if (const auto* theta = rope->find("rope_theta")) args.rope_theta(theta->as_double());
    const auto* type = rope->find("rope_type");
    if (type == nullptr) type = rope->find("type");
    const std::string rope_type = type ? type->as_string() : "default";
    if (rope_type == "llama3") {
      auto field = [&](const char* key) {
        const auto* v = rope->find(key);
        TORCH_CHECK(v != nullptr, file, ": llama3 rope scaling needs \"", key, "\"");
        return v->as_double();
      };
      args.rope_scaling(RopeScaling()
                            .enabled(true)
                            .factor(field("factor"))
                            .low_freq_factor(field("low_freq_factor"))
                            .high_freq_factor(field("high_freq_factor"))
                            .original_max_position_embeddings(
                                static_cast<int64_t>(field("original_max_position_embeddings"))));
    } else {
      TORCH_CHECK(rope_type == "default", file, ": rope type \"", rope_type,
                  "\" is not supported (\"default\" or \"llama3\")");
    }
  }
  args.validate();
  return args;
}

titan::json::Value hf_config(const ModelArgs& args, torch::Dtype dtype) {
  const bool mistral = args.sliding_window() > 0;
  titan::json::Value c = titan::json::Object{};
  c["architectures"] = titan::json::Array{mistral ? "MistralForCausalLM" : "LlamaForCausalLM"};
  c["model_type"] = mistral ? "mistral" : "llama";
  c["hidden_size"] = args.dim();
  c["intermediate_size"] = args.hidden_dim();
  c["num_hidden_layers"] = args.n_layers();
  c["num_attention_heads"] = args.n_heads();
  c["num_key_value_heads"] = args.n_kv_heads();
  c["head_dim"] = args.effective_head_dim();
  c["vocab_size"] = args.vocab_size();
  c["max_position_embeddings"] = args.max_seq_len();
  c["rms_norm_eps"] = args.norm_eps();
  c["rope_theta"] = args.rope_theta();
  if (args.rope_scaling().enabled()) {
    const auto& s = args.rope_scaling();
    titan::json::Value scaling = titan::json::Object{};
    scaling["rope_type"] = "llama3";
    scaling["factor"] = s.factor();
    scaling["low_freq_factor"] = s.low_freq_factor();
    scaling["high_freq_factor"] = s.high_freq_factor();
    scaling["original_max_position_embeddings"] = s.original_max_position_embeddings();
    c["rope_scaling"] = std::move(scaling);
  } else {
    c["rope_scaling"] = nullptr;
  }
  if (mistral) c["sliding_window"] = args.sliding_window();
  c["hidden_act"] = "silu";
  c["attention_bias"] = false;
  if (!mistral) c["mlp_bias"] = false;
  c["tie_word_embeddings"] = false;
  c["initializer_range"] = 0.02;
  c["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : "float32";
  return c;
}

void load_hf(TransformerImpl& model, const std::string& path, const LoadHfOptions& options) {
  torch::NoGradGuard no_grad;
  titan::safetensors::Reader reader(path);
  const auto& args = model.args;
  const int64_t hd = args.effective_head_dim();
  std::set<std::string> used;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor param = item.value();
    const std::string hf_name = to_hf_name(name);
    TORCH_CHECK(reader.contains(hf_name), "load_hf: checkpoint ", path, " has no tensor '", hf_name,
                "' for parameter '", name, "'");
    used.insert(hf_name);
    const auto& info = reader.info(hf_name);
    const auto shape = global_shape(name, args);
    TORCH_CHECK(info.shape == shape, "load_hf: tensor '", hf_name, "' in ", reader.file_of(hf_name).path(),
                " has shape ", c10::IntArrayRef(info.shape), " but parameter '", name, "' has shape ",
                c10::IntArrayRef(shape), " (config and checkpoint disagree)");
    auto box = options.box() ? options.box()(name, param) : titan::parameter_layout(model, name, param).local_box();
    TORCH_CHECK(box.sizes == param.sizes().vec(), "load_hf: the rectangle of parameter '", name, "' has sizes ",
                c10::IntArrayRef(box.sizes), " but the parameter has shape ", param.sizes());
    torch::Tensor block;
    if (int64_t heads = rotary_heads(name, args); heads > 0 && box.sizes[0] > 0) {
      // Read the whole heads the rows fall in, un-permute them, then keep the rows asked for.
      const int64_t first = box.offsets[0] / hd, last = (box.offsets[0] + box.sizes[0] + hd - 1) / hd;
      auto rows = reader.read_slice(hf_name, {first * hd, box.offsets[1]}, {(last - first) * hd, box.sizes[1]});
      block = permute_rows(rows, last - first, hd, /*to_hf=*/false).narrow(0, box.offsets[0] - first * hd, box.sizes[0]);
    } else {
      block = reader.read_slice(hf_name, box.offsets, box.sizes);
    }
    param.copy_(block);
  }
  std::vector<std::string> unused;
  for (const auto& name : reader.names()) {
    // rotary_emb.inv_freq: a buffer older transformers versions saved.
    if (!used.count(name) && !ends_with(name, "rotary_emb.inv_freq")) unused.push_back(name);
  }
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 5; ++i) list += (i ? ", '" : "'") + unused[i] + "'";
    TORCH_CHECK(false, "load_hf: checkpoint ", path, " holds ", unused.size(),
                " tensors the model has no parameter for (config and checkpoint disagree): ", list,
                unused.size() > 5 ? ", ..." : "");
  }
  model.reset_rope_tables();  // not in the checkpoint (the model may come from to_empty)
}

void save_hf(const TransformerImpl& model, const std::string& dir, const SaveHfOptions& options,
             const titan::ProcessGroupPtr& group) {
  torch::NoGradGuard no_grad;
  const bool writer = !group || group->rank() == 0;
  const torch::Dtype stored = options.dtype() ? *options.dtype() : model.args.dtype();
  std::vector<titan::safetensors::LazyTensor> tensors;
  for (const auto& [name, sharded] : titan::sharded_parameters(model)) {
    const bool whole = sharded.box.sizes == sharded.layout.global_shape;
    TORCH_CHECK(group || whole, "save_hf: parameter '", name, "' is sharded (", sharded.layout.placement(),
                "); pass the process group so that it is gathered");
    const auto dtype = options.dtype() ? *options.dtype() : sharded.local.scalar_type();
    int64_t numel = 1;
    for (auto size : sharded.layout.global_shape) numel *= size;
    // Gathered (a collective of the parameter's groups) only when its file is written.
    auto make = [name = name, sharded = sharded, whole, dtype, &model] {
      auto full = whole ? sharded.local.detach() : titan::gather_full(sharded);
      return to_hf_tensor(name, full, model.args).to(dtype);
    };
    tensors.push_back({to_hf_name(name), numel * static_cast<int64_t>(c10::elementSize(dtype)), std::move(make)});
  }
  if (!writer) {
    for (const auto& tensor : tensors) tensor.make();  // the writer's gathers, in the writer's order
    return;
  }
  std::filesystem::create_directories(dir);
  titan::safetensors::save_sharded(dir, tensors,
                                   titan::safetensors::SaveOptions().max_shard_bytes(options.max_shard_bytes()).metadata(
                                       {{"format", "pt"}}));
  titan::json::save(dir + "/config.json", hf_config(model.args, stored));
}

}  // namespace titan::examples
