#include "state_dict_adapter.hpp"

#include "../../common/strings.hpp"

#include <titan/collectives.hpp>
#include <titan/safetensors.hpp>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <set>
#include <utility>
#include <vector>

namespace titan::examples {

namespace {

/// Per-layer name pairs: titan suffix after "layers.<i>." and transformers suffix after
/// "model.layers.<i>.".
const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> names = {
      {"attention.wq.weight", "self_attn.q_proj.weight"},
      {"attention.wk.weight", "self_attn.k_proj.weight"},
      {"attention.wv.weight", "self_attn.v_proj.weight"},
      {"attention.wo.weight", "self_attn.o_proj.weight"},
      {"attention.wq.bias", "self_attn.q_proj.bias"},
      {"attention.wk.bias", "self_attn.k_proj.bias"},
      {"attention.wv.bias", "self_attn.v_proj.bias"},
      {"feed_forward.w1.weight", "mlp.gate_proj.weight"},
      {"feed_forward.w2.weight", "mlp.down_proj.weight"},
      {"feed_forward.w3.weight", "mlp.up_proj.weight"},
      {"attention_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"attention.q_norm.weight", "self_attn.q_norm.weight"},
      {"attention.k_norm.weight", "self_attn.k_norm.weight"},
  };
  return names;
}

/// How a mixture-of-experts family names its MoE tensors in Hugging Face checkpoints (on disk:
/// transformers 5 fuses the experts only when it loads them).
struct MoeNaming {
  const char* model_type;  ///< config.json's model_type
  const char* block;       ///< the MoE block under model.layers.<i>.
  const char* w1;          ///< expert j's gate projection under <block>.experts.<j>.
  const char* w2;          ///< its down projection
  const char* w3;          ///< its up projection
};
constexpr MoeNaming kMixtral{"mixtral", "block_sparse_moe", "w1.weight", "w2.weight", "w3.weight"};
constexpr MoeNaming kQwen3Moe{"qwen3_moe", "mlp", "gate_proj.weight", "down_proj.weight", "up_proj.weight"};

/// The naming of the MoE family `args` describes: Qwen3-MoE's has q/k norms, Mixtral's not.
const MoeNaming& moe_naming(const ModelArgs& args) { return args.qk_norm() ? kQwen3Moe : kMixtral; }

/// The routed experts' stacked weight of titan name suffix `rest` ("moe.experts.w1"): 1, 2 or 3;
/// else 0.
int expert_weight(const std::string& rest) {
  for (int w : {1, 2, 3})
    if (rest == "moe.experts.w" + std::to_string(w)) return w;
  return 0;
}

const char* expert_suffix(const MoeNaming& naming, int w) { return w == 1 ? naming.w1 : w == 2 ? naming.w2 : naming.w3; }

bool is_index(const std::string& text) {
  return !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
}

/// The titan suffix (after "layers.<i>.") of a Hugging Face MoE suffix (after "model.layers.<i>.")
/// of either family, or "" when it is none.
std::string from_hf_moe_suffix(const std::string& rest) {
  for (const MoeNaming* naming : {&kMixtral, &kQwen3Moe}) {
    const std::string block = std::string(naming->block) + ".";
    if (rest.rfind(block, 0) != 0) continue;
    const auto tail = rest.substr(block.size());
    if (tail == "gate.weight") return "moe.gate.weight";
    if (tail.rfind("experts.", 0) != 0) continue;
    const auto dot = tail.find('.', 8);
    if (dot == std::string::npos || !is_index(tail.substr(8, dot - 8))) continue;
    for (int w : {1, 2, 3})
      if (tail.substr(dot + 1) == expert_suffix(*naming, w)) return "moe.experts.w" + std::to_string(w);
  }
  return "";
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
/// (`args` names a MoE family's tensors; a routed expert weight has one name per expert: hf_names).
std::string translate(const std::string& name, bool to_hf, const ModelArgs& args) {
  for (const auto& [titan_name, hf_name] : top_names())
    if (name == (to_hf ? titan_name : hf_name)) return to_hf ? hf_name : titan_name;
  const std::string from_prefix = to_hf ? "layers." : "model.layers.";
  const std::string to_prefix = to_hf ? "model.layers." : "layers.";
  if (name.rfind(from_prefix, 0) == 0) {
    auto dot = name.find('.', from_prefix.size());
    auto index = name.substr(from_prefix.size(), dot == std::string::npos ? 0 : dot - from_prefix.size());
    if (is_index(index)) {
      auto rest = name.substr(dot + 1);
      for (const auto& [titan_suffix, hf_suffix] : layer_names())
        if (rest == (to_hf ? titan_suffix : hf_suffix)) return to_prefix + index + "." + (to_hf ? hf_suffix : titan_suffix);
      if (!to_hf)
        if (const auto moe = from_hf_moe_suffix(rest); !moe.empty()) return to_prefix + index + "." + moe;
      if (to_hf && args.is_moe() && rest == "moe.gate.weight")
        return to_prefix + index + "." + moe_naming(args).block + ".gate.weight";
      TORCH_CHECK(!to_hf || !expert_weight(rest), "to_hf_name: '", name, "' stacks every expert's weight: ",
                  "Hugging Face names one tensor per expert (hf_names)");
    }
  }
  TORCH_CHECK(false, to_hf ? "to_hf_name" : "from_hf_name", ": '", name, "' is not a parameter of a ",
              to_hf ? "titan Transformer" : "Llama / Mistral / Mixtral / Qwen2 / Qwen3 / Qwen3-MoE causal LM");
}

/// Hugging Face's names of `name`'s expert weights: expert j's for j in [0, E).
std::vector<std::string> expert_names(const std::string& name, int w, const ModelArgs& args) {
  const auto layer = name.substr(0, name.find(".moe."));  // "layers.<i>"
  const auto& naming = moe_naming(args);
  std::vector<std::string> names;
  for (int64_t j = 0; j < args.moe().num_experts(); ++j)
    names.push_back("model." + layer + "." + naming.block + ".experts." + std::to_string(j) + "." +
                    expert_suffix(naming, w));
  return names;
}

/// Query/key heads of `name` (titan name) when its rows are RoPE-permuted, else 0. The q/k norm
/// weights [head_dim] act on the permuted rows of one head; the q/k biases are rows of wq/wk.
int64_t rotary_heads(const std::string& name, const ModelArgs& args) {
  if (ends_with(name, "attention.wq.weight") || ends_with(name, "attention.wq.bias")) return args.n_heads();
  if (ends_with(name, "attention.wk.weight") || ends_with(name, "attention.wk.bias")) return args.n_kv_heads();
  if (ends_with(name, "attention.q_norm.weight") || ends_with(name, "attention.k_norm.weight")) return 1;
  return 0;
}

/// Rows of `heads` heads [heads * hd, cols] from one pairing to the other: Meta's (2p, 2p+1) to
/// Hugging Face's (p, p + hd/2) when `to_hf`, else back.
torch::Tensor permute_rows(const torch::Tensor& w, int64_t heads, int64_t head_dim, bool to_hf) {
  const int64_t cols = w.dim() == 2 ? w.size(1) : 1;  // a norm weight [head_dim]: one column
  auto split = to_hf ? w.reshape({heads, head_dim / 2, 2, cols}) : w.reshape({heads, 2, head_dim / 2, cols});
  return split.transpose(1, 2).reshape(w.sizes());
}

/// The full shape of parameter `name` of a model with `args`.
std::vector<int64_t> global_shape(const std::string& name, const ModelArgs& args) {
  const int64_t d = args.dim(), q = args.n_heads() * args.effective_head_dim(),
                kv = args.n_kv_heads() * args.effective_head_dim(), f = args.hidden_dim();
  if (name == "tok_embeddings.weight" || name == "output.weight") return {args.vocab_size(), d};
  if (ends_with(name, "q_norm.weight") || ends_with(name, "k_norm.weight")) return {args.effective_head_dim()};
  if (ends_with(name, "norm.weight")) return {d};
  const int64_t experts = args.moe().num_experts(), h = args.moe_hidden_dim();
  if (ends_with(name, "moe.gate.weight")) return {experts, d};
  if (ends_with(name, "moe.experts.w1") || ends_with(name, "moe.experts.w3")) return {experts, h, d};
  if (ends_with(name, "moe.experts.w2")) return {experts, d, h};
  if (ends_with(name, "attention.wq.weight")) return {q, d};
  if (ends_with(name, "attention.wk.weight") || ends_with(name, "attention.wv.weight")) return {kv, d};
  if (ends_with(name, "attention.wq.bias")) return {q};
  if (ends_with(name, "attention.wk.bias") || ends_with(name, "attention.wv.bias")) return {kv};
  if (ends_with(name, "attention.wo.weight")) return {d, q};
  if (ends_with(name, "feed_forward.w1.weight") || ends_with(name, "feed_forward.w3.weight")) return {f, d};
  if (ends_with(name, "feed_forward.w2.weight")) return {d, f};
  TORCH_CHECK(false, "load_hf: unexpected parameter '", name, "'");
}

std::string config_file(const std::string& path) {
  return std::filesystem::is_directory(path) ? path + "/config.json" : path;
}

/// The config.json of a model with `args` whose weights are stored as `dtype`.
nlohmann::ordered_json hf_config(const ModelArgs& args, torch::Dtype dtype) {
  const bool mistral = args.sliding_window() > 0 && !args.is_moe();
  const bool qwen3_moe = args.is_moe() && args.qk_norm(), mixtral = args.is_moe() && !qwen3_moe;
  const bool qwen3 = !args.is_moe() && args.qk_norm(), qwen2 = !args.is_moe() && args.qkv_bias();
  nlohmann::ordered_json c;
  c["architectures"] = {qwen3_moe ? "Qwen3MoeForCausalLM"
                        : mixtral ? "MixtralForCausalLM"
                        : qwen3   ? "Qwen3ForCausalLM"
                        : qwen2   ? "Qwen2ForCausalLM"
                        : mistral ? "MistralForCausalLM"
                                  : "LlamaForCausalLM"};
  c["model_type"] = args.is_moe() ? moe_naming(args).model_type
                    : qwen3       ? "qwen3"
                    : qwen2       ? "qwen2"
                    : mistral     ? "mistral"
                                  : "llama";
  c["hidden_size"] = args.dim();
  c["intermediate_size"] = mixtral ? args.moe_hidden_dim() : args.hidden_dim();
  if (mixtral) {
    c["num_local_experts"] = args.moe().num_experts();
    c["num_experts_per_tok"] = args.moe().top_k();
    c["router_jitter_noise"] = 0.0;
    c["sliding_window"] = args.sliding_window() > 0 ? nlohmann::ordered_json(args.sliding_window()) : nullptr;
  }
  if (qwen3 || qwen2) c["use_sliding_window"] = false;
  if (qwen3_moe) {
    c["moe_intermediate_size"] = args.moe_hidden_dim();
    c["num_experts"] = args.moe().num_experts();
    c["num_experts_per_tok"] = args.moe().top_k();
    c["norm_topk_prob"] = args.moe().route_norm();
    c["decoder_sparse_step"] = 1;
    c["mlp_only_layers"] = nlohmann::ordered_json::array();
    c["use_sliding_window"] = false;
  }
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
    c["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", s.factor()},
                         {"low_freq_factor", s.low_freq_factor()},
                         {"high_freq_factor", s.high_freq_factor()},
                         {"original_max_position_embeddings", s.original_max_position_embeddings()}};
  } else {
    c["rope_scaling"] = nullptr;
  }
  if (mistral) c["sliding_window"] = args.sliding_window();
  c["hidden_act"] = "silu";
  if (!qwen2) c["attention_bias"] = false;  // Qwen2's config has no such key: its q/k/v biases are fixed
  if (!mistral && !qwen2 && !args.is_moe()) c["mlp_bias"] = false;
  c["tie_word_embeddings"] = args.tie_embeddings();
  c["initializer_range"] = 0.02;
  c["torch_dtype"] = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : "float32";
  return c;
}

/// Typed reads of a config.json object whose errors name the file and key.
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& object, std::string file) : object_(object), file_(std::move(file)) {}
  /// The value of `key`, or nullptr when it is absent or null.
  const nlohmann::json* find(const char* key) const {
    auto it = object_.find(key);
    return it == object_.end() || it->is_null() ? nullptr : &*it;
  }
  const nlohmann::json& get(const char* key) const {
    const auto* v = find(key);
    TORCH_CHECK(v != nullptr, file_, ": missing \"", key, "\"");
    return *v;
  }
  int64_t integer(const char* key) const { return integer_of(get(key), key); }
  double number(const char* key) const { return number_of(get(key), key); }
  std::string text(const char* key) const { return text_of(get(key), key); }
  int64_t integer_of(const nlohmann::json& v, const char* key) const {
    TORCH_CHECK(v.is_number_integer(), file_, ": \"", key, "\" must be an integer, got ", v.dump());
    return v.get<int64_t>();
  }
  double number_of(const nlohmann::json& v, const char* key) const {
    TORCH_CHECK(v.is_number(), file_, ": \"", key, "\" must be a number, got ", v.dump());
    return v.get<double>();
  }
  std::string text_of(const nlohmann::json& v, const char* key) const {
    TORCH_CHECK(v.is_string(), file_, ": \"", key, "\" must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  bool flag_of(const nlohmann::json& v, const char* key) const {
    TORCH_CHECK(v.is_boolean(), file_, ": \"", key, "\" must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  const std::string& file() const { return file_; }

 private:
  const nlohmann::json& object_;
  std::string file_;
};

}  // namespace

std::string to_hf_name(const std::string& name, const ModelArgs& args) { return translate(name, /*to_hf=*/true, args); }
std::string from_hf_name(const std::string& hf_name) { return translate(hf_name, /*to_hf=*/false, ModelArgs()); }

std::vector<std::string> hf_names(const std::string& name, const ModelArgs& args) {
  const auto dot = name.find(".moe.");
  if (args.is_moe() && dot != std::string::npos)
    if (int w = expert_weight(name.substr(dot + 1))) return expert_names(name, w, args);
  return {to_hf_name(name, args)};
}

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
  std::ifstream in(file);
  TORCH_CHECK(in, file, ": cannot open the model's config (expected a Hugging Face config.json)");
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    TORCH_CHECK(false, file, ": not valid JSON: ", e.what());
  }
  TORCH_CHECK(root.is_object(), file, ": expected a JSON object");
  const ConfigReader config(root, file);

  const std::string model_type = config.text("model_type");
  const bool mixtral = model_type == kMixtral.model_type, qwen3_moe = model_type == kQwen3Moe.model_type;
  const bool qwen3 = model_type == "qwen3", qwen2 = model_type == "qwen2";
  TORCH_CHECK(model_type == "llama" || model_type == "mistral" || mixtral || qwen2 || qwen3 || qwen3_moe, file,
              ": model_type \"", model_type, "\" is not supported (expected \"llama\", \"mistral\", \"mixtral\", ",
              "\"qwen2\", \"qwen3\" or \"qwen3_moe\")");
  if (const auto* act = config.find("hidden_act"))
    TORCH_CHECK(config.text_of(*act, "hidden_act") == "silu", file, ": hidden_act \"", act->get<std::string>(),
                "\" is not supported (silu)");
  for (const char* key : {"attention_bias", "mlp_bias"})
    if (const auto* bias = config.find(key))
      TORCH_CHECK(!config.flag_of(*bias, key), file, ": ", key, " = true is not supported");

  ModelArgs args;
  // Untied when the key is absent: the default of transformers' Llama, Mistral, Mixtral and Qwen3 configs.
  if (const auto* tied = config.find("tie_word_embeddings"))
    args.tie_embeddings(config.flag_of(*tied, "tie_word_embeddings"));
  args.dim(config.integer("hidden_size"))
      .n_layers(config.integer("num_hidden_layers"))
      .n_heads(config.integer("num_attention_heads"))
      .vocab_size(config.integer("vocab_size"))
      .ffn_hidden_dim(config.integer("intermediate_size"))
      .max_seq_len(config.integer("max_position_embeddings"));
  args.n_kv_heads(config.find("num_key_value_heads") ? config.integer("num_key_value_heads") : args.n_heads());
  if (config.find("head_dim")) args.head_dim(config.integer("head_dim"));
  if (config.find("rms_norm_eps")) args.norm_eps(config.number("rms_norm_eps"));
  if ((model_type == "mistral" || mixtral) && config.find("sliding_window"))
    args.sliding_window(config.integer("sliding_window"));
  if (mixtral) {
    if (const auto* jitter = config.find("router_jitter_noise"))
      TORCH_CHECK(config.number_of(*jitter, "router_jitter_noise") == 0, file, ": router_jitter_noise = ",
                  jitter->dump(), " is not supported (0: the router's logits as computed)");
    args.moe_hidden_dim(config.integer("intermediate_size"))
        .moe(titan::MoeOptions().num_experts(config.integer("num_local_experts")).top_k(
            config.integer("num_experts_per_tok")));
  }
  if (qwen2) args.qkv_bias(true);  // Qwen2's q_proj, k_proj and v_proj always have biases
  if (qwen2 || qwen3 || qwen3_moe) {
    if (const auto* window = config.find("use_sliding_window"))
      TORCH_CHECK(!config.flag_of(*window, "use_sliding_window"), file, ": use_sliding_window = true is not supported");
    if (!qwen2) args.qk_norm(true);
  }
  if (qwen3_moe) {
    if (const auto* step = config.find("decoder_sparse_step"))
      TORCH_CHECK(config.integer_of(*step, "decoder_sparse_step") == 1, file, ": decoder_sparse_step = ",
                  step->dump(), " is not supported (1: every block is a mixture of experts)");
    if (const auto* dense = config.find("mlp_only_layers"))
      TORCH_CHECK(dense->is_array() && dense->empty(), file, ": mlp_only_layers = ", dense->dump(),
                  " is not supported ([]: every block is a mixture of experts)");
    const bool norm = config.find("norm_topk_prob") ? config.flag_of(config.get("norm_topk_prob"), "norm_topk_prob")
                                                    : false;  // transformers' default
    // The hub's configs say num_experts; transformers 5 writes its alias num_local_experts.
    const char* experts = config.find("num_experts") ? "num_experts" : "num_local_experts";
    args.moe_hidden_dim(config.integer("moe_intermediate_size"))
        .moe(titan::MoeOptions()
                 .num_experts(config.integer(experts))
                 .top_k(config.integer("num_experts_per_tok"))
                 .route_norm(norm));
  }

  // transformers < 5 writes rope_theta + rope_scaling; 5 writes rope_parameters holding both.
  const auto* rope = config.find("rope_parameters");
  if (rope == nullptr) rope = config.find("rope_scaling");
  if (config.find("rope_theta")) args.rope_theta(config.number("rope_theta"));
  if (rope != nullptr) {
    TORCH_CHECK(rope->is_object(), file, ": rope parameters must be an object");
    const ConfigReader parameters(*rope, file);
    if (parameters.find("rope_theta")) args.rope_theta(parameters.number("rope_theta"));
    const char* type_key = parameters.find("rope_type") ? "rope_type" : "type";
    const std::string rope_type = parameters.find(type_key) ? parameters.text(type_key) : "default";
    if (rope_type == "llama3") {
      auto field = [&](const char* key) {
        TORCH_CHECK(parameters.find(key), file, ": llama3 rope scaling needs \"", key, "\"");
        return parameters.number(key);
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

void load_hf(TransformerImpl& model, const std::string& path, const LoadHfOptions& options) {
  torch::NoGradGuard no_grad;
  titan::safetensors::Reader reader(path);
  const auto& args = model.args;
  const int64_t hd = args.effective_head_dim();
  std::set<std::string> used;
  // Checks that the checkpoint holds `hf_name` with `shape`, the shape of `name` (of one of its
  // experts' when `expert`).
  auto check_tensor = [&](const std::string& hf_name, const std::string& name, const std::vector<int64_t>& shape,
                          bool expert) {
    TORCH_CHECK(reader.contains(hf_name), "load_hf: checkpoint ", path, " has no tensor '", hf_name,
                "' for parameter '", name, "'");
    used.insert(hf_name);
    const auto& info = reader.info(hf_name);
    TORCH_CHECK(info.shape == shape, "load_hf: tensor '", hf_name, "' in ", reader.file_of(hf_name).path(),
                " has shape ", c10::IntArrayRef(info.shape), " but parameter '", name, "' has ",
                expert ? "per-expert shape " : "shape ", c10::IntArrayRef(shape), " (config and checkpoint disagree)");
  };
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    torch::Tensor param = item.value();
    const auto names = hf_names(name, args);
    const auto shape = global_shape(name, args);
    auto box = options.box() ? options.box()(name, param) : titan::parameter_layout(model, name, param).local_box();
    TORCH_CHECK(box.sizes == param.sizes().vec(), "load_hf: the rectangle of parameter '", name, "' has sizes ",
                c10::IntArrayRef(box.sizes), " but the parameter has shape ", param.sizes());
    const bool experts_stacked = names.size() > 1;  // one Hugging Face tensor per expert, stacked along dim 0 here
    for (const auto& hf_name : names)
      check_tensor(hf_name, name, experts_stacked ? std::vector<int64_t>(shape.begin() + 1, shape.end()) : shape,
                   experts_stacked);
    torch::Tensor block;
    if (experts_stacked) {
      const std::vector<int64_t> offsets(box.offsets.begin() + 1, box.offsets.end());
      const std::vector<int64_t> sizes(box.sizes.begin() + 1, box.sizes.end());
      std::vector<torch::Tensor> experts;
      for (int64_t j = box.offsets[0]; j < box.offsets[0] + box.sizes[0]; ++j)
        experts.push_back(reader.read_slice(names[static_cast<size_t>(j)], offsets, sizes));  // [sizes...]
      block = experts.empty() ? torch::empty(box.sizes) : torch::stack(experts);           // [box.sizes]
    } else if (int64_t heads = rotary_heads(name, args); heads > 0 && box.sizes[0] > 0) {
      // Read the whole heads the rows fall in, un-permute them, then keep the rows asked for.
      const int64_t first = box.offsets[0] / hd, last = (box.offsets[0] + box.sizes[0] + hd - 1) / hd;
      auto offsets = box.offsets, sizes = box.sizes;
      offsets[0] = first * hd;
      sizes[0] = (last - first) * hd;
      auto rows = reader.read_slice(names[0], offsets, sizes);  // [whole heads' rows, ...]
      block = permute_rows(rows, last - first, hd, /*to_hf=*/false).narrow(0, box.offsets[0] - first * hd, box.sizes[0]);
    } else {
      block = reader.read_slice(names[0], box.offsets, box.sizes);
    }
    param.copy_(block);
  }
  // Tensors of the whole model that a pipeline stage does not hold are expected; others are not.
  std::set<std::string> known;
  for (const auto& item : Transformer(args, torch::kMeta)->named_parameters())
    for (auto& hf_name : hf_names(item.key(), args)) known.insert(std::move(hf_name));
  // A tied model's file may hold lm_head.weight too; transformers ignores it and so does this.
  if (args.tie_embeddings()) known.insert("lm_head.weight");
  std::vector<std::string> unused;
  for (const auto& name : reader.names()) {
    // rotary_emb.inv_freq: a buffer older transformers versions saved.
    if (!known.count(name) && !ends_with(name, "rotary_emb.inv_freq")) unused.push_back(name);
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

void save_hf(const torch::nn::Module& model, const ModelArgs& args, const std::string& dir,
             const SaveHfOptions& options, const titan::ProcessGroupPtr& group,
             const titan::ProcessGroupPtr& pipeline_group) {
  torch::NoGradGuard no_grad;
  const bool writer = !group || group->rank() == 0;
  const bool pipelined = pipeline_group && pipeline_group->size() > 1;
  TORCH_CHECK(!pipelined || group, "save_hf: a pipeline stage needs the group of every rank to export the model");
  const torch::Dtype stored = options.dtype() ? *options.dtype() : args.dtype();
  std::map<std::string, titan::ShardedTensor> local;
  std::vector<std::string> order;  // parameter names in the whole model's order
  for (auto& [name, sharded] : titan::sharded_parameters(model)) {
    local.emplace(name, sharded);
    if (!pipelined) order.push_back(name);
  }
  // With pipeline parallelism each stage holds some parameters: the lowest rank holding one sends
  // it (gathered by its stage's ranks) to rank 0.
  std::map<std::string, int> lead;
  if (pipelined) {
    std::string mine;
    for (const auto& [name, sharded] : local) mine += name + "\n";
    const auto all = titan::all_gather_strings(group, mine);
    for (size_t r = 0; r < all.size(); ++r) {
      std::stringstream lines(all[r]);
      for (std::string name; std::getline(lines, name);) lead.emplace(name, static_cast<int>(r));
    }
    for (const auto& item : Transformer(args, torch::kMeta)->named_parameters()) {
      TORCH_CHECK(lead.count(item.key()), "save_hf: no pipeline stage holds parameter '", item.key(), "'");
      order.push_back(item.key());
    }
  }
  std::vector<titan::safetensors::LazyTensor> tensors;
  for (size_t index = 0; index < order.size(); ++index) {
    const auto& name = order[index];
    const auto held = local.find(name);
    const auto global = global_shape(name, args);
    const auto dtype = options.dtype() ? *options.dtype() : held != local.end() ? held->second.local.scalar_type()
                                                                                  : args.dtype();
    int64_t numel = 1;
    for (auto size : global) numel *= size;
    // Gathered (a collective of the parameter's groups) only when its file is written.
    auto fetch = [&, name, index, global, dtype, held]() -> torch::Tensor {
      torch::Tensor full;
      if (held != local.end()) {
        const auto& sharded = held->second;
        const bool whole = sharded.local.sizes().vec() == sharded.layout.global_shape;
        TORCH_CHECK(group || whole, "save_hf: parameter '", name, "' is sharded (", sharded.layout.placement(),
                    "); pass the process group so that it is gathered");
        full = whole ? sharded.local.detach() : titan::gather_full(sharded);
      }
      if (pipelined && lead.at(name) != 0) {
        const auto tag = static_cast<uint32_t>(index);
        if (group->rank() == lead.at(name)) {
          titan::send_async(*group, full.to(args.dtype()), 0, tag).wait();
        } else if (writer) {
          const auto options = torch::TensorOptions().dtype(args.dtype()).device(group->device());
          full = titan::recv_async(*group, global, options, lead.at(name), tag).wait();
        }
      }
      if (!writer) return torch::Tensor();
      return to_hf_tensor(name, full, args).to(dtype);
    };
    if (!pipelined && held == local.end()) continue;
    const auto names = hf_names(name, args);
    if (names.size() == 1) {
      tensors.push_back({names[0], numel * static_cast<int64_t>(c10::elementSize(dtype)), std::move(fetch)});
      continue;
    }
    // Routed experts: Hugging Face's tensor j is row j of the stacked weight, gathered once (at
    // expert 0, on every rank) and released after the last expert.
    struct Gathered {
      bool done = false;
      torch::Tensor full;  ///< [E, ...] on the writer
    };
    auto gathered = std::make_shared<Gathered>();
    const int64_t experts = static_cast<int64_t>(names.size());
    for (int64_t j = 0; j < experts; ++j) {
      auto make = [gathered, fetch, j, last = j + 1 == experts]() -> torch::Tensor {
        if (!gathered->done) {
          gathered->full = fetch();
          gathered->done = true;
        }
        auto expert = gathered->full.defined() ? gathered->full[j] : torch::Tensor();  // [...] a view
        if (last) *gathered = Gathered{};
        return expert;
      };
      tensors.push_back({names[static_cast<size_t>(j)],
                         numel / experts * static_cast<int64_t>(c10::elementSize(dtype)), std::move(make)});
    }
  }
  if (!writer) {
    for (const auto& tensor : tensors) tensor.make();  // the writer's gathers, in the writer's order
    return;
  }
  std::filesystem::create_directories(dir);
  titan::safetensors::save_sharded(dir, tensors,
                                   titan::safetensors::SaveOptions().max_shard_bytes(options.max_shard_bytes()).metadata(
                                       {{"format", "pt"}}));
  std::ofstream config(dir + "/config.json");
  config << hf_config(args, stored).dump(2) << "\n";
  TORCH_CHECK(config.flush(), "save_hf: cannot write ", dir, "/config.json");
}

void save_hf(const TransformerImpl& model, const std::string& dir, const SaveHfOptions& options,
             const titan::ProcessGroupPtr& group) {
  save_hf(model, model.args, dir, options, group, nullptr);
}

}  // namespace titan::examples
