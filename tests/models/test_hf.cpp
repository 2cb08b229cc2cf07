// Hugging Face interop and parity with transformers (suite "parity": needs make_reference.py's
// output, found through $TITAN_MODELS_REFERENCE; ctest's models.reference fixture makes it). The
// models run on titan_test::device(); the references are transformers' CPU results.
#include "support.hpp"

#include "models/llama/state_dict_adapter.hpp"

#include <titan/meta.hpp>
#include <titan/safetensors.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>

#include <sys/wait.h>

using namespace models_test;
using namespace titan::examples;
namespace st = titan::safetensors;

namespace {

std::string reference_dir() {
  const char* dir = std::getenv("TITAN_MODELS_REFERENCE");
  REQUIRE_MESSAGE(dir != nullptr, "set TITAN_MODELS_REFERENCE (ctest's models.reference fixture does)");
  return dir;
}

/// A model built on meta, materialised on device() and loaded from the checkpoint at `dir`; its
/// MoE layers keep the auxiliary loss's statistics when `aux_loss`.
Transformer load_model(const std::string& dir, const std::string& weights = "", bool aux_loss = false) {
  auto args = read_hf_config(dir);
  if (args.is_moe()) args.moe(titan::MoeOptions(args.moe()).aux_loss(aux_loss));
  Transformer model(args, torch::kMeta);
  titan::to_empty(*model, device());
  load_hf(*model, weights.empty() ? dir : weights);
  return model;
}

/// Runs check_export.py on an export; returns its exit status.
int check_export(const std::string& export_dir, const std::string& reference, const std::string& architecture) {
  const std::string command = std::string("\"") + TITAN_PYTHON + "\" \"" + TITAN_MODELS_TEST_DIR +
                              "/check_export.py\" \"" + export_dir + "\" \"" + reference + "\" " + architecture;
  int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

// Names and a row permutation: CPU tensors.
TEST_CASE("hf: name mapping both ways") {
  CHECK(to_hf_name("tok_embeddings.weight") == "model.embed_tokens.weight");
  CHECK(to_hf_name("layers.3.attention.wk.bias") == "model.layers.3.self_attn.k_proj.bias");
  CHECK(from_hf_name("model.layers.0.self_attn.q_proj.bias") == "layers.0.attention.wq.bias");
  CHECK(to_hf_name("layers.12.attention.wq.weight") == "model.layers.12.self_attn.q_proj.weight");
  CHECK(to_hf_name("layers.0.feed_forward.w1.weight") == "model.layers.0.mlp.gate_proj.weight");
  CHECK(to_hf_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight");
  CHECK(to_hf_name("layers.0.feed_forward.w3.weight") == "model.layers.0.mlp.up_proj.weight");
  CHECK(to_hf_name("layers.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight");
  CHECK(to_hf_name("output.weight") == "lm_head.weight");
  Transformer model(ModelArgs().dim(32).n_layers(2).n_heads(2).n_kv_heads(1).vocab_size(10).max_seq_len(8), torch::kMeta);
  for (const auto& item : model->named_parameters()) CHECK(from_hf_name(to_hf_name(item.key())) == item.key());
  CHECK_CONTAINS(error_of([] { to_hf_name("layers.x.attention.wq.weight"); }), "'layers.x.attention.wq.weight' is not");
  CHECK_CONTAINS(error_of([] { from_hf_name("model.layers.0.self_attn.o_proj.bias"); }), "is not a parameter");
  // The q/k permutation is a bijection on rows within each head.
  auto args = ModelArgs().dim(32).n_heads(2).n_kv_heads(1);
  auto w = torch::arange(32 * 3, torch::kFloat).reshape({32, 3});
  auto hf = to_hf_tensor("layers.0.attention.wq.weight", w, args);
  CHECK(torch::equal(hf[1], w[2]));   // HF row 1 = (pair 1, first) = Meta row 2
  CHECK(torch::equal(hf[8], w[1]));   // HF row hd/2 = (pair 0, second) = Meta row 1
  CHECK(torch::equal(hf[16], w[16])); // second head starts at the same row
  CHECK(torch::equal(from_hf_tensor("model.layers.0.self_attn.q_proj.weight", hf, args), w));
  CHECK(torch::equal(to_hf_tensor("layers.0.attention.wv.weight", w, args), w));
  // The q/k norm weights [head_dim] take the same permutation as one head's rows.
  auto norm = torch::arange(16, torch::kFloat);
  auto hf_norm = to_hf_tensor("layers.0.attention.q_norm.weight", norm, args);
  CHECK(hf_norm[1].item<float>() == 2.0f);
  CHECK(torch::equal(from_hf_tensor("model.layers.0.self_attn.q_norm.weight", hf_norm, args), norm));

  // Mixture-of-experts families: the router by the family's block name, the stacked experts as
  // one tensor per expert.
  auto mixtral = ModelArgs().dim(32).n_heads(2).n_kv_heads(1).moe_hidden_dim(8).moe(titan::MoeOptions().num_experts(3));
  auto qwen3 = ModelArgs(mixtral).qk_norm(true);
  CHECK(to_hf_name("layers.1.moe.gate.weight", mixtral) == "model.layers.1.block_sparse_moe.gate.weight");
  CHECK(to_hf_name("layers.1.moe.gate.weight", qwen3) == "model.layers.1.mlp.gate.weight");
  const std::vector<std::string> mixtral_w1 = {"model.layers.1.block_sparse_moe.experts.0.w1.weight",
                                               "model.layers.1.block_sparse_moe.experts.1.w1.weight",
                                               "model.layers.1.block_sparse_moe.experts.2.w1.weight"};
  CHECK(hf_names("layers.1.moe.experts.w1", mixtral) == mixtral_w1);
  CHECK(hf_names("layers.0.moe.experts.w2", qwen3)[2] == "model.layers.0.mlp.experts.2.down_proj.weight");
  CHECK(hf_names("layers.0.moe.experts.w3", qwen3)[0] == "model.layers.0.mlp.experts.0.up_proj.weight");
  CHECK(hf_names("layers.0.attention.wq.weight", qwen3).size() == 1);
  CHECK(from_hf_name("model.layers.4.block_sparse_moe.experts.7.w2.weight") == "layers.4.moe.experts.w2");
  CHECK(from_hf_name("model.layers.4.mlp.experts.7.gate_proj.weight") == "layers.4.moe.experts.w1");
  CHECK(from_hf_name("model.layers.4.mlp.gate.weight") == "layers.4.moe.gate.weight");
  CHECK(from_hf_name("model.layers.4.mlp.gate_proj.weight") == "layers.4.feed_forward.w1.weight");
  CHECK_CONTAINS(error_of([&] { to_hf_name("layers.0.moe.experts.w1", mixtral); }), "one tensor per expert (hf_names)");
  CHECK_CONTAINS(error_of([] { from_hf_name("model.layers.0.mlp.experts.x.up_proj.weight"); }), "is not a parameter");
  for (const auto& args_case : {mixtral, qwen3}) {
    Transformer moe_model(ModelArgs(args_case).n_layers(2).vocab_size(10).max_seq_len(8), torch::kMeta);
    for (const auto& item : moe_model->named_parameters())
      for (const auto& hf_name : hf_names(item.key(), args_case)) CHECK(from_hf_name(hf_name) == item.key());
  }
}

TEST_CASE("parity: logits, loss and gradients match transformers" * doctest::test_suite("parity")) {
  const auto root = reference_dir();
  for (const std::string name : {"llama2", "llama31", "mistral", "mixtral", "qwen3_moe", "qwen3", "llama32", "qwen2"}) {
    CAPTURE(name);
    const std::string dir = root + "/" + name;
    st::File ref(dir + "/reference.safetensors");
    const bool aux = ref.contains("aux_loss");  // Mixtral's loss adds router_aux_loss_coef x the aux loss
    auto model = load_model(dir, "", aux);
    auto ids = ref.read("input_ids").to(device());
    CHECK(max_abs_diff(rope_frequencies(model->args), ref.read("inv_freq")) <= 1e-12);

    auto logits = titan::call(model, ids);
    auto loss = causal_lm_loss(logits, ids);
    if (aux) {
      auto aux_loss = titan::moe_aux_loss(model);
      CHECK(std::abs(aux_loss.item<double>() - ref.read("aux_loss").item<double>()) <= 1e-6);
      loss = loss + 0.1 * aux_loss;  // make_reference.py's router_aux_loss_coef
    }
    if (model->args.is_moe()) {  // the reference's routers leave the last expert without tokens
      for (const auto& load : titan::moe_loads(model)) {
        CAPTURE(load.layer);
        CHECK(load.tokens[-1].item<int64_t>() == 0);
        CHECK(load.tokens.sum().item<int64_t>() == ids.numel() * model->args.moe().top_k());
      }
    }
    loss.backward();
    double logits_diff = max_abs_diff(logits, ref.read("logits"));
    double loss_diff = std::abs(loss.item<double>() - ref.read("loss").item<double>());
    MESSAGE(name, ": max |logits| ", ref.read("logits").abs().max().item<double>(), ", logits diff ", logits_diff,
            ", loss ", loss.item<double>(), " diff ", loss_diff);
    CHECK(logits_diff <= 1e-5);
    // 1e-6 is 2 float32 ulps at these losses (~5.5, ulp 4.8e-7). A GPU sums the cross-entropy in
    // another order than the CPU: 4 ulps of the reference loss there.
    const float ref_loss = ref.read("loss").item<float>();
    CHECK(loss_diff <= (device().is_cpu() ? 1e-6 : 4.0 * (std::nextafter(ref_loss, INFINITY) - ref_loss)));
    double worst = 0;
    for (const auto& item : model->named_parameters()) {
      const auto names = hf_names(item.key(), model->args);
      auto grad = to_hf_tensor(item.key(), item.value().grad(), model->args);
      for (size_t j = 0; j < names.size(); ++j) {
        CAPTURE(names[j]);
        auto expected = ref.read("grad." + names[j]);
        auto part = names.size() > 1 ? grad[static_cast<int64_t>(j)] : grad;  // expert j's, or the whole
        // Relative to the gradient's scale: fp32 sums over 2 x S positions in different orders.
        double rel = max_abs_diff(part, expected) / std::max(expected.abs().max().item<double>(), 1e-3);
        worst = std::max(worst, rel);
        CHECK(rel <= 1e-5);
        if (names.size() > 1 && j + 1 == names.size()) CHECK(part.abs().max().item<double>() == 0.0);  // no tokens
      }
    }
    MESSAGE(name, ": worst gradient diff relative to its max ", worst);
  }
}

TEST_CASE("parity: sharded checkpoints and per-parameter rectangles" * doctest::test_suite("parity")) {
  const std::string dir = reference_dir() + "/llama31";
  auto whole = load_model(dir);
  auto sharded = load_model(dir, dir + "/sharded");
  REQUIRE(st::Reader(dir + "/sharded").files().size() > 1);
  for (const auto& item : sharded->named_parameters())
    CHECK(torch::equal(item.value(), whole->named_parameters()[item.key()]));

  // A model whose q/k/embedding parameters hold only a block (as tensor or FSDP sharding leaves
  // them), read by rectangles that cut through heads.
  Transformer part(read_hf_config(dir), device());
  std::map<std::string, titan::TensorBox> boxes = {
      {"layers.0.attention.wq.weight", {{5, 3}, {20, 40}}},
      {"layers.1.attention.wk.weight", {{9, 0}, {13, 64}}},
      {"tok_embeddings.weight", {{100, 0}, {51, 64}}},
  };
  for (auto& [name, box] : boxes) part->named_parameters()[name].set_data(torch::empty(box.sizes, device()));
  load_hf(*part, dir, LoadHfOptions().box([&](const std::string& name, const torch::Tensor& param) {
    auto it = boxes.find(name);
    return it != boxes.end() ? it->second : titan::TensorBox{std::vector<int64_t>(param.dim(), 0), param.sizes().vec()};
  }));
  for (const auto& [name, box] : boxes) {
    CAPTURE(name);
    auto expected = whole->named_parameters()[name].narrow(0, box.offsets[0], box.sizes[0]).narrow(1, box.offsets[1], box.sizes[1]);
    CHECK(torch::equal(part->named_parameters()[name], expected));
  }
}

TEST_CASE("parity: exported checkpoints load in transformers with the same logits" * doctest::test_suite("parity")) {
  const auto root = reference_dir();
  const auto out = scratch_dir("export");
  const std::map<std::string, const char*> architectures = {{"llama2", "LlamaForCausalLM"},
                                                             {"llama31", "LlamaForCausalLM"},
                                                             {"mistral", "MistralForCausalLM"},
                                                             {"mixtral", "MixtralForCausalLM"},
                                                             {"qwen3_moe", "Qwen3MoeForCausalLM"},
                                                             {"qwen3", "Qwen3ForCausalLM"},
                                                             {"llama32", "LlamaForCausalLM"},
                                                             {"qwen2", "Qwen2ForCausalLM"}};
  for (const auto& [name, architecture] : architectures) {
    CAPTURE(name);
    const std::string dir = root + "/" + name;
    auto model = load_model(dir);
    const std::string export_dir = out + "/" + name;
    // The Llama 3.1 and Mixtral exports are sharded (index + several files; Mixtral's experts of
    // one stacked weight across files).
    const bool sharded = name == "llama31" || name == "mixtral";
    save_hf(*model, export_dir, SaveHfOptions().max_shard_bytes(sharded ? 100000 : 0));
    CHECK(std::filesystem::exists(export_dir + "/config.json"));
    CHECK(std::filesystem::exists(export_dir + "/" + (sharded ? st::kIndexName : st::kSingleName)));
    auto exported_args = read_hf_config(export_dir);
    CHECK(parameter_count(exported_args) == parameter_count(model->args));
    CHECK(exported_args.rope_scaling().enabled() == model->args.rope_scaling().enabled());
    CHECK(exported_args.sliding_window() == model->args.sliding_window());
    CHECK(exported_args.moe_hidden_dim() == model->args.moe_hidden_dim());
    CHECK(exported_args.qk_norm() == model->args.qk_norm());
    CHECK(check_export(export_dir, dir + "/reference.safetensors", architecture) == 0);
    // And back into titan: identical parameters.
    auto again = load_model(export_dir);
    for (const auto& item : again->named_parameters())
      CHECK(torch::equal(item.value(), model->named_parameters()[item.key()]));
  }
  // bfloat16 export: weights stored as BF16, config says so.
  auto model = load_model(root + "/llama2");
  save_hf(*model, out + "/bf16", SaveHfOptions().dtype(torch::kBFloat16));
  CHECK((st::File(out + "/bf16/model.safetensors").info("lm_head.weight").dtype == torch::kBFloat16));
  CHECK_CONTAINS(read_bytes(out + "/bf16/config.json"), "\"torch_dtype\": \"bfloat16\"");
}

// File format: CPU tensors.
TEST_CASE("parity: safetensors written by the Python package read back exactly" * doctest::test_suite("parity")) {
  st::File file(reference_dir() + "/dtypes.safetensors");
  auto base = torch::arange(-6, 6, torch::kDouble).reshape({3, 4});
  for (const auto& [name, type] : st::dtype_table()) {
    if (!file.contains(name)) continue;
    CAPTURE(name);
    auto t = file.read(name);
    CHECK((t.scalar_type() == type));
    auto expected = name == "U8" ? torch::arange(12, torch::kByte).reshape({3, 4})
                  : name == "BOOL" ? base.gt(0) : base.to(type);
    CHECK(torch::equal(t, expected));
  }
  CHECK(file.tensors().size() == 10);
}

TEST_CASE("parity: checkpoints that do not match the config give clear errors" * doctest::test_suite("parity")) {
  const std::string dir = reference_dir() + "/llama2";
  auto args = read_hf_config(dir);
  {
    Transformer deeper(ModelArgs(args).n_layers(3), device());
    auto message = error_of([&] { load_hf(*deeper, dir); });
    CHECK_CONTAINS(message, "has no tensor 'model.layers.2.self_attn.q_proj.weight' for parameter 'layers.2.attention.wq.weight'");
  }
  {
    Transformer shallower(ModelArgs(args).n_layers(1), device());
    auto message = error_of([&] { load_hf(*shallower, dir); });
    CHECK_CONTAINS(message, "tensors the model has no parameter for");
    CHECK_CONTAINS(message, "model.layers.1.");
  }
  {
    Transformer wider(ModelArgs(args).ffn_hidden_dim(192), device());
    auto message = error_of([&] { load_hf(*wider, dir); });
    CHECK_CONTAINS(message, "tensor 'model.layers.0.mlp.gate_proj.weight' in ");
    CHECK_CONTAINS(message, "model.safetensors has shape [160, 64] but parameter 'layers.0.feed_forward.w1.weight' has shape [192, 64]");
  }
  // A truncated checkpoint file.
  const auto bad = scratch_dir("truncated_ckpt");
  std::filesystem::copy_file(dir + "/config.json", bad + "/config.json");
  auto bytes = read_bytes(dir + "/model.safetensors");
  write_bytes(bad + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
  Transformer model(args, device());
  auto message = error_of([&] { load_hf(*model, bad); });
  CHECK_CONTAINS(message, bad + "/model.safetensors");
  CHECK_CONTAINS(message, "out of range");
  // Unsupported configs.
  write_bytes(bad + "/config.json", R"({"model_type": "llama", "tie_word_embeddings": 1})");
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "config.json: \"tie_word_embeddings\" must be true or false, got 1");
  write_bytes(bad + "/config.json", R"({"model_type": "gpt2"})");
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "model_type \"gpt2\" is not supported");
  write_bytes(bad + "/config.json", R"({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 8, "max_position_embeddings": 16,
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})");
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "rope type \"yarn\" is not supported");
  write_bytes(bad + "/config.json", R"({"model_type": "llama", "hidden_size": 64})");
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "config.json: missing \"num_hidden_layers\"");
  // Mixture-of-experts configs and checkpoints.
  const std::string qwen3 = reference_dir() + "/qwen3_moe";
  auto qwen3_config = read_bytes(qwen3 + "/config.json");
  auto with = [&](const std::string& key, const std::string& value) {
    const auto at = qwen3_config.find("\"" + key + "\"");
    REQUIRE(at != std::string::npos);
    const auto end = qwen3_config.find_first_of(",}", qwen3_config.find(':', at));
    return qwen3_config.substr(0, at) + "\"" + key + "\": " + value + qwen3_config.substr(end);
  };
  write_bytes(bad + "/config.json", with("decoder_sparse_step", "2"));
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "decoder_sparse_step = 2 is not supported");
  write_bytes(bad + "/config.json", with("num_local_experts", "\"eight\""));  // transformers 5's name
  CHECK_CONTAINS(error_of([&] { read_hf_config(bad); }), "\"num_local_experts\" must be an integer, got \"eight\"");
  {
    auto args = read_hf_config(qwen3);
    CHECK(args.qk_norm());
    CHECK(args.effective_head_dim() == 24);
    CHECK(args.moe().num_experts() == 8);
    CHECK_FALSE(args.moe().route_norm());
    Transformer more_experts(ModelArgs(args).moe(titan::MoeOptions(args.moe()).num_experts(9)), device());
    CHECK_CONTAINS(error_of([&] { load_hf(*more_experts, qwen3); }),
                   "'model.layers.0.mlp.gate.weight' in " + qwen3 +
                       "/model.safetensors has shape [8, 64] but parameter 'layers.0.moe.gate.weight' has shape [9, 64]");
    Transformer wider(ModelArgs(args).moe_hidden_dim(40), device());
    CHECK_CONTAINS(error_of([&] { load_hf(*wider, qwen3); }),
                   "has shape [48, 64] but parameter 'layers.0.moe.experts.w1' has per-expert shape [40, 64]");
  }
}
