// The example Transformer: flavors, parameter counts, names, meta build, attention against a
// naive reference, causality / sliding window, init_weights, titan::call coverage. Real models run
// on titan_test::device().
#include "support.hpp"

#include "models/llama/model.hpp"

#include <titan/hooks.hpp>
#include <titan/meta.hpp>

#include <cmath>
#include <map>

using namespace models_test;
using namespace titan::examples;

namespace {

ModelArgs tiny_args() {
  return ModelArgs().dim(64).n_layers(2).n_heads(4).n_kv_heads(2).vocab_size(97).multiple_of(32).max_seq_len(64);
}

/// Attention written the naive way (complex RoPE as Meta's reference, explicit masked softmax), on
/// x's device.
torch::Tensor naive_attention(AttentionImpl& a, const torch::Tensor& x, const ModelArgs& args) {
  const int64_t B = x.size(0), S = x.size(1), H = args.n_heads(), KV = args.n_kv_heads(), hd = args.effective_head_dim();
  const auto on = x.options();
  auto rope = [&](const torch::Tensor& t) {
    auto angles = torch::outer(torch::arange(S, on.dtype(torch::kFloat)), rope_frequencies(args).to(x.device()));
    auto freqs = torch::polar(torch::ones_like(angles), angles).view({1, S, 1, hd / 2});
    auto c = torch::view_as_complex(t.reshape({B, S, -1, hd / 2, 2}).contiguous());
    return torch::view_as_real(c * freqs).flatten(3);
  };
  auto q = rope(torch::matmul(x, a.wq->weight.t()).view({B, S, H, hd}));
  auto k = rope(torch::matmul(x, a.wk->weight.t()).view({B, S, KV, hd}));
  auto v = torch::matmul(x, a.wv->weight.t()).view({B, S, KV, hd});
  auto group = torch::arange(H, on.dtype(torch::kLong)).div(H / KV, "floor");
  k = k.index_select(2, group);
  v = v.index_select(2, group);
  auto scores = torch::einsum("bqhd,bkhd->bhqk", {q, k}) / std::sqrt(static_cast<double>(hd));
  auto positions = torch::arange(S, on.dtype(torch::kLong));
  auto i = positions.unsqueeze(1), j = positions.unsqueeze(0);
  auto allowed = j.le(i);
  if (args.sliding_window() > 0) allowed = allowed.logical_and((i - j).lt(args.sliding_window()));
  scores = scores.masked_fill(allowed.logical_not(), -INFINITY);
  auto out = torch::einsum("bhqk,bkhd->bqhd", {scores.softmax(-1), v}).reshape({B, S, H * hd});
  return torch::matmul(out, a.wo->weight.t());
}

/// Counts titan::call invocations per module.
class CountingHook : public titan::ModuleHook {
 public:
  explicit CountingHook(std::map<std::string, int>& counts, std::string key) : counts_(counts), key_(std::move(key)) {}
  std::string name() const override { return "count"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    ++counts_[key_];
    return next(inputs);
  }
  titan::TensorList forward_outputs(torch::nn::Module&, const titan::TensorList& inputs,
                                    const titan::OutputsForwardFn& next) override {  // ffn_norm: (h, its norm)
    ++counts_[key_];
    return next(inputs);
  }

 private:
  std::map<std::string, int>& counts_;
  std::string key_;
};

}  // namespace

TEST_CASE("model: flavors have the published shapes and parameter counts") {
  struct Expected {
    const char* family;
    const char* flavor;
    int64_t hidden;
    int64_t params;
  };
  // Published parameter counts (Meta model cards, transformers' num_parameters()).
  for (auto e : {Expected{"llama2", "7B", 11008, 6738415616LL}, Expected{"llama2", "13B", 13824, 13015864320LL},
                 Expected{"llama2", "70B", 28672, 68976648192LL}, Expected{"llama3", "8B", 14336, 8030261248LL},
                 // Llama 3.2 1B: 1,235,814,400 with the output tied to the embedding; untied here.
                 Expected{"llama3", "1B", 8192, 1235814400LL + 128256LL * 2048},
                 Expected{"llama3", "70B", 28672, 70553706496LL}, Expected{"llama3.1", "405B", 53248, 405853388800LL},
                 Expected{"mistral", "7B", 14336, 7241732096LL},
                 // Qwen3 dense: transformers' Qwen3ForCausalLM built on meta from the hub's config.json.
                 Expected{"qwen3", "8B", 12288, 8190735360LL}, Expected{"qwen3", "14B", 17408, 14768307200LL},
                 Expected{"qwen3", "32B", 25600, 32762123264LL},
                 // Tied outputs (counted once): Qwen3 0.6B, 1.7B, 4B and Llama 3.2 1B, 3B (transformers'
                 // models on meta; Llama 3.2 1B is Meta's 1,235,814,400 above).
                 Expected{"qwen3", "0.6B", 3072, 596049920LL}, Expected{"qwen3", "1.7B", 6144, 1720574976LL},
                 Expected{"qwen3", "4B", 9728, 4022468096LL}, Expected{"llama3.2", "1B", 8192, 1235814400LL},
                 Expected{"llama3.2", "3B", 8192, 3212749824LL},
                 // Qwen2.5 (q/k/v biases; tied up to 3B): transformers' Qwen2ForCausalLM on meta.
                 Expected{"qwen2.5", "0.5B", 4864, 494032768LL}, Expected{"qwen2.5", "1.5B", 8960, 1543714304LL},
                 Expected{"qwen2.5", "3B", 11008, 3085938688LL}, Expected{"qwen2.5", "7B", 18944, 7615616512LL},
                 Expected{"qwen2.5", "14B", 13824, 14770033664LL}, Expected{"qwen2.5", "32B", 27648, 32763876352LL},
                 Expected{"qwen2.5", "72B", 29568, 72706203648LL}}) {
    CAPTURE(e.family);
    CAPTURE(e.flavor);
    auto args = model_args(e.family, e.flavor);
    CHECK(args.hidden_dim() == e.hidden);
    CHECK(parameter_count(args) == e.params);
  }
  CHECK(model_args("llama3.1", "8B").rope_scaling().enabled());
  CHECK(model_args("llama3.1", "8B").rope_theta() == 500000.0);
  CHECK_FALSE(model_args("llama3", "8B").rope_scaling().enabled());
  CHECK(model_args("mistral", "7B").sliding_window() == 4096);
  // Mixture-of-experts flavors: transformers' num_parameters() of Mixtral-8x7B, Mixtral-8x22B and
  // Qwen3-30B-A3B and Qwen3-235B-A22B, and the parameters one token uses (top_k experts: 12.9B,
  // 39.2B, 3.3B, 22.2B "active").
  struct MoeExpected {
    const char* family;
    const char* flavor;
    int64_t experts, top_k, expert_hidden, params, active;
  };
  for (auto e : {MoeExpected{"mixtral", "8x7B", 8, 2, 14336, 46702792704LL, 12879925248LL},
                 MoeExpected{"mixtral", "8x22B", 8, 2, 16384, 140630071296LL, 39161468928LL},
                 MoeExpected{"qwen3_moe", "30B-A3B", 128, 8, 768, 30532122624LL, 3353032704LL},
                 MoeExpected{"qwen3_moe", "235B-A22B", 128, 8, 1536, 235093634560LL, 22190763520LL}}) {
    CAPTURE(e.flavor);
    auto args = model_args(e.family, e.flavor);
    CHECK(args.is_moe());
    CHECK(args.moe().num_experts() == e.experts);
    CHECK(args.moe().top_k() == e.top_k);
    CHECK(args.moe_hidden_dim() == e.expert_hidden);
    CHECK(parameter_count(args) == e.params);
    CHECK(parameter_count(args, true, /*active_only=*/true) == e.active);
  }
  CHECK(model_args("qwen3_moe", "30B-A3B").qk_norm());
  CHECK(model_args("qwen3_moe", "30B-A3B").effective_head_dim() == 128);
  CHECK(model_args("qwen3", "8B").qk_norm());
  CHECK(model_args("qwen3", "32B").effective_head_dim() == 128);  // 64 heads of 128 in a width of 5120
  CHECK_FALSE(model_args("qwen3", "8B").is_moe());
  CHECK(model_args("qwen3", "4B").tie_embeddings());
  CHECK_FALSE(model_args("qwen3", "8B").tie_embeddings());
  CHECK(model_args("llama3.2", "1B").rope_scaling().factor() == 32);
  // A tied output's matmul is counted in the FLOPs once more than its parameter.
  const auto tied = model_args("llama3.2", "1B"), untied = model_args("llama3", "1B");
  CHECK(flops_per_token(tied, 2048) == flops_per_token(untied, 2048));
  CHECK_CONTAINS(error_of([] { ModelArgs().moe_hidden_dim(8).moe(titan::MoeOptions().num_experts(4).top_k(5)).validate(); }),
                 "top_k must be in [1, 4]");
  for (const auto& name : model_flavors()) CHECK_NOTHROW(model_args(name.substr(0, name.find('/')), name.substr(name.find('/') + 1)).validate());
  CHECK_CONTAINS(error_of([] { model_args("llama4", "8B"); }), "unknown model family 'llama4'");
  CHECK_CONTAINS(error_of([] { model_args("llama3", "9B"); }), "unknown flavor '9B' of llama3");
  CHECK_CONTAINS(error_of([] { ModelArgs().n_heads(32).n_kv_heads(5).validate(); }), "n_kv_heads 5 must divide");

  // 6 N + 12 L H Q T with N the non-embedding parameters.
  auto debug = model_args("llama3", "debug");
  const double n = static_cast<double>(parameter_count(debug) - debug.vocab_size() * debug.dim());
  CHECK(flops_per_token(debug, 128) == doctest::Approx(6 * n + 12.0 * 4 * 8 * 32 * 128));
  // A MoE model's FLOPs count the experts a token goes through, not all of them.
  auto moe = model_args("mixtral", "8x7B");
  const double active = static_cast<double>(parameter_count(moe, false, true));
  CHECK(flops_per_token(moe, 4096) == doctest::Approx(6 * active + 12.0 * 32 * 32 * 128 * 4096));
}

TEST_CASE("model: Llama 3 70B builds on the meta device without allocating") {
  Transformer model(model_args("llama3", "70B"), torch::kMeta);
  int64_t total = 0;
  for (const auto& p : model->parameters()) {
    CHECK(p.is_meta());
    total += p.numel();
  }
  CHECK(total == parameter_count(model->args));
  CHECK(static_cast<double>(total) == doctest::Approx(70.6e9).epsilon(0.001));
  CHECK(model->layers->size() == 80);
  CHECK(model->rope_cos.is_meta());
}

TEST_CASE("model: parameter names are torchtitan's") {
  Transformer model(tiny_args(), torch::kMeta);
  std::vector<std::string> names;
  for (const auto& item : model->named_parameters()) names.push_back(item.key());
  std::vector<std::string> expected = {"tok_embeddings.weight"};
  for (int i = 0; i < 2; ++i)
    for (const char* suffix : {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                               "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                               "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"})
      expected.push_back("layers." + std::to_string(i) + "." + suffix);
  expected.push_back("norm.weight");
  expected.push_back("output.weight");
  CHECK(names == expected);
  CHECK(model->named_parameters()["layers.1.attention.wk.weight"].sizes() == torch::IntArrayRef({32, 64}));
  CHECK(model->named_parameters()["layers.0.feed_forward.w1.weight"].sizes() == torch::IntArrayRef({192, 64}));
  CHECK(model->named_buffers().size() == 2);
}

TEST_CASE("model: fused projections keep the parameters and compute the unfused model's logits and gradients") {
  auto run = [](bool fused) {
    Transformer model(tiny_args().fused_projections(fused), device());
    init_weights(*model, 3);
    const auto tokens = torch::arange(2 * 9, torch::TensorOptions().dtype(torch::kLong).device(device())).view({2, 9}) % 97;
    const auto logits = titan::call(model, tokens);  // [2, 9, 97]
    logits.pow(2).mean().backward();
    std::map<std::string, torch::Tensor> grads;
    for (const auto& item : model->named_parameters()) grads[item.key()] = item.value().grad();
    return std::make_pair(logits.detach(), grads);
  };
  const auto [plain_logits, plain_grads] = run(false);
  const auto [fused_logits, fused_grads] = run(true);
  CHECK(max_abs_diff(fused_logits, plain_logits) < 1e-5);
  REQUIRE(fused_grads.size() == plain_grads.size());
  for (const auto& [name, grad] : plain_grads) {
    CAPTURE(name);
    REQUIRE(fused_grads.count(name) == 1);  // the same names: checkpoints and HF adapters see no difference
    CHECK(max_abs_diff(fused_grads.at(name), grad) < 1e-5 * (1 + grad.abs().max().item<double>()));
  }
}

TEST_CASE("model: attention matches a naive reference (GQA, RoPE, causal and sliding window)") {
  torch::manual_seed(0);
  for (int64_t window : {0, 5}) {
    for (bool scaled : {false, true}) {
      CAPTURE(window);
      CAPTURE(scaled);
      auto args = tiny_args().sliding_window(window).rope_theta(scaled ? 500000.0 : 10000.0);
      if (scaled) args.rope_scaling(RopeScaling().enabled(true).original_max_position_embeddings(16));
      Attention attention(args, torch::TensorOptions().device(device()));
      for (auto& p : attention->parameters()) p.data().normal_(0, 0.2);
      auto angles = torch::outer(torch::arange(args.max_seq_len(), torch::kFloat), rope_frequencies(args)).to(device());
      auto x = torch::randn({2, 12, 64}).to(device());
      auto out = attention->forward(x, angles.cos().narrow(0, 0, 12), angles.sin().narrow(0, 0, 12));
      CHECK(max_abs_diff(out, naive_attention(*attention, x, args)) < 1e-5);
    }
  }
  // Unscaled frequencies are theta^(-2i / head_dim) (a CPU table: the model copies it to its device).
  auto freqs = rope_frequencies(tiny_args());
  auto expected = torch::pow(10000.0, -torch::arange(0, 16, 2, torch::kDouble) / 16.0);
  CHECK(max_abs_diff(freqs, expected) < 1e-7);
}

TEST_CASE("model: causal, and Mistral attends only inside the window") {
  torch::manual_seed(1);
  auto args = tiny_args().n_layers(1).sliding_window(4);
  Transformer model(args, device());
  init_weights(*model, 3);
  auto tokens = torch::randint(0, 97, {1, 16}, torch::kLong).to(device());
  auto logits = titan::call(model, tokens);
  CHECK(logits.sizes() == torch::IntArrayRef({1, 16, 97}));
  auto changed = tokens.clone();
  changed[0][10] = (tokens[0][10].item<int64_t>() + 1) % 97;
  auto after = titan::call(model, changed);
  CHECK(max_abs_diff(after.narrow(1, 0, 10), logits.narrow(1, 0, 10)) == 0.0);  // causal
  CHECK(max_abs_diff(after.narrow(1, 10, 4), logits.narrow(1, 10, 4)) > 1e-4);   // positions 10..13 see it
  CHECK(max_abs_diff(after.narrow(1, 14, 2), logits.narrow(1, 14, 2)) == 0.0);   // 14 - 10 >= window
  const auto too_long = torch::zeros({1, 65}, torch::TensorOptions().dtype(torch::kLong).device(device()));
  CHECK_CONTAINS(error_of([&] { model->forward(too_long); }), "exceeds max_seq_len 64");
}

TEST_CASE("model: block-causal attention gives each packed document the logits and gradients it has alone") {
  // RoPE is relative, so a document at positions p.. of a packed row attends as it would alone at
  // 0..: the reference is the same model on each document by itself (with a sliding window too).
  for (int64_t window : {0, 3}) {
    CAPTURE(window);
    torch::manual_seed(2);
    auto args = tiny_args().sliding_window(window);
    Transformer model(args, device());
    init_weights(*model, 5);
    const std::vector<std::vector<int64_t>> rows = {{5, 7, 3}, {15}, {1, 1, 13}};  // document lengths per row
    auto tokens = torch::randint(0, 97, {3, 15}, torch::kLong).to(device());
    auto documents = torch::empty({3, 15}, torch::kLong);
    for (int64_t r = 0; r < 3; ++r)
      for (int64_t d = 0, at = 0; d < static_cast<int64_t>(rows[r].size()); at += rows[r][d++])
        documents[r].narrow(0, at, rows[r][d]).fill_(d);
    auto packed = titan::call(model, tokens, torch::Tensor(), documents.to(device()));  // [3, 15, 97]
    auto causal = titan::call(model, tokens);
    double worst = 0;
    for (int64_t r = 0; r < 3; ++r) {
      for (int64_t d = 0, at = 0; d < static_cast<int64_t>(rows[r].size()); at += rows[r][d++]) {
        auto alone = titan::call(model, tokens[r].narrow(0, at, rows[r][d]).unsqueeze(0));  // [1, len, 97]
        worst = std::max(worst, max_abs_diff(packed[r].narrow(0, at, rows[r][d]), alone[0]));
        if (at == 0) CHECK(max_abs_diff(causal[r].narrow(0, at, rows[r][d]), alone[0]) < 1e-5);
      }
    }
    CHECK(worst < 1e-5);
    // The mask matters: a later document sees the earlier ones without it.
    CHECK(max_abs_diff(causal[0].narrow(0, 5, 7), packed[0].narrow(0, 5, 7)) > 1e-3);
    // Gradients: the packed row's loss equals the sum of the documents' own.
    auto weight = model->layers[0]->as<TransformerBlockImpl>()->attention->wq->weight;
    auto row_loss = [&](const torch::Tensor& logits, const torch::Tensor& targets) {
      return torch::nn::functional::cross_entropy(logits, targets, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    };
    auto targets = torch::randint(0, 97, {15}, torch::kLong).to(device());
    auto grad_packed = torch::autograd::grad({row_loss(titan::call(model, tokens.narrow(0, 0, 1), torch::Tensor(),
                                                                   documents.narrow(0, 0, 1).to(device()))[0], targets)},
                                             {weight})[0];
    torch::Tensor alone_loss;
    for (int64_t d = 0, at = 0; d < 3; at += rows[0][d++]) {
      auto loss = row_loss(titan::call(model, tokens[0].narrow(0, at, rows[0][d]).unsqueeze(0))[0],
                           targets.narrow(0, at, rows[0][d]));
      alone_loss = alone_loss.defined() ? alone_loss + loss : loss;
    }
    auto grad_alone = torch::autograd::grad({alone_loss}, {weight})[0];
    CHECK(max_abs_diff(grad_packed, grad_alone) < 1e-5);
  }
  Transformer model(tiny_args(), device());
  const auto tokens = torch::zeros({2, 4}, torch::TensorOptions().dtype(torch::kLong).device(device()));
  CHECK_CONTAINS(error_of([&] { model->forward(tokens, {}, torch::zeros({2, 5}, torch::kLong)); }),
                 "documents must be int64 [2, 4] (one per token)");
}

TEST_CASE("model: init_weights follows torchtitan's scheme and is reproducible") {
  auto args = model_args("llama3", "debug").n_layers(4).vocab_size(512);
  Transformer model(args, torch::kMeta);
  CHECK_CONTAINS(error_of([&] { init_weights(*model, 0); }), "call titan::to_empty");
  titan::to_empty(*model, device());
  init_weights(*model, 7);
  auto params = model->named_parameters();
  auto std_of = [&](const std::string& name) { return params[name].std().item<double>(); };
  CHECK(std_of("tok_embeddings.weight") == doctest::Approx(1.0).epsilon(0.02));
  CHECK(std_of("layers.0.attention.wq.weight") == doctest::Approx(0.02).epsilon(0.03));
  CHECK(std_of("layers.2.feed_forward.w1.weight") == doctest::Approx(0.02).epsilon(0.03));
  for (int layer : {0, 3})
    for (const char* w : {"attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight"}) {
      auto name = "layers." + std::to_string(layer) + "." + w;
      CAPTURE(name);
      CHECK(std_of(name) == doctest::Approx(0.02 / std::sqrt(2.0 * (layer + 1))).epsilon(0.03));
    }
  const double out_std = 1.0 / std::sqrt(256.0);
  // A normal truncated at 3 std has std 0.9866 of the untruncated one.
  CHECK(std_of("output.weight") == doctest::Approx(0.9866 * out_std).epsilon(0.02));
  CHECK(params["output.weight"].abs().max().item<double>() <= 3 * out_std + 1e-7);
  CHECK(same_values(params["layers.1.ffn_norm.weight"], torch::ones({256})));
  CHECK(same_values(params["norm.weight"], torch::ones({256})));

  // Same seed: same values, also for a model built directly on the CPU; another seed differs.
  Transformer again(args, torch::kCPU);
  init_weights(*again, 7);
  for (const auto& item : again->named_parameters()) CHECK(same_values(item.value(), params[item.key()]));
  CHECK(same_values(again->rope_cos, model->rope_cos));
  init_weights(*again, 8);
  CHECK_FALSE(same_values(again->named_parameters()["layers.0.attention.wq.weight"], params["layers.0.attention.wq.weight"]));
  // A MoE model: the router and the experts' w1 std 0.02, their w2 / w3 the depth std, q/k norms
  // 1, the expert bias 0; names as torchtitan's MoE (layers.N.moe.{gate, experts}).
  auto moe_args = model_args("qwen3_moe", "debug").n_layers(2).vocab_size(64);
  moe_args.moe(titan::MoeOptions(moe_args.moe()).expert_bias(true));
  Transformer moe(moe_args, torch::kMeta);
  titan::to_empty(*moe, device());
  moe->named_buffers()["layers.1.moe.expert_bias"].fill_(5);  // garbage, as to_empty leaves it
  init_weights(*moe, 7);
  auto moe_params = moe->named_parameters();
  CHECK(moe_params["layers.1.moe.experts.w1"].sizes() == torch::IntArrayRef({8, 64, 256}));
  CHECK(moe_params["layers.1.moe.experts.w2"].sizes() == torch::IntArrayRef({8, 256, 64}));
  CHECK(moe_params["layers.1.attention.q_norm.weight"].sizes() == torch::IntArrayRef({32}));
  CHECK_FALSE(moe_params.contains("layers.0.feed_forward.w1.weight"));
  CHECK(moe_params["layers.0.moe.gate.weight"].std().item<double>() == doctest::Approx(0.02).epsilon(0.05));
  CHECK(moe_params["layers.1.moe.experts.w1"].std().item<double>() == doctest::Approx(0.02).epsilon(0.03));
  CHECK(moe_params["layers.1.moe.experts.w3"].std().item<double>() == doctest::Approx(0.02 / 2).epsilon(0.03));
  CHECK(same_values(moe_params["layers.0.attention.k_norm.weight"], torch::ones({32})));
  CHECK(same_values(moe->named_buffers()["layers.1.moe.expert_bias"], torch::zeros({8})));
  auto moe_tokens = torch::randint(0, 64, {2, 8}, torch::kLong).to(device());
  CHECK(titan::call(moe, moe_tokens).sizes() == torch::IntArrayRef({2, 8, 64}));

  // No depth_init: one std for every layer.
  Transformer flat(ModelArgs(args).depth_init(false));
  init_weights(*flat, 7);
  CHECK(flat->named_parameters()["layers.0.attention.wo.weight"].std().item<double>() ==
        doctest::Approx(0.02 / std::sqrt(8.0)).epsilon(0.03));
}

TEST_CASE("model: every submodule call goes through titan::call") {
  Transformer model(tiny_args(), device());
  init_weights(*model, 0);
  std::map<std::string, int> counts;
  for (const auto& item : model->named_modules("", /*include_self=*/false)) {
    if (item.key().find('.') != std::string::npos && item.key().rfind("layers.", 0) != 0) continue;
    if (item.key() == "layers") continue;  // the ModuleList is iterated, never called: no hook there
    titan::attach_hook(*item.value(), std::make_shared<CountingHook>(counts, item.key()));
  }
  auto tokens = torch::randint(0, 97, {2, 8}, torch::kLong).to(device());
  titan::call(model, tokens);
  CHECK(counts["tok_embeddings"] == 1);
  CHECK(counts["norm"] == 1);
  CHECK(counts["output"] == 1);
  for (int i = 0; i < 2; ++i) {
    const auto p = "layers." + std::to_string(i) + ".";
    for (const char* m : {"", "attention", "attention.wq", "attention.wk", "attention.wv", "attention.wo",
                          "feed_forward", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "attention_norm",
                          "ffn_norm"}) {
      auto key = std::string(m).empty() ? p.substr(0, p.size() - 1) : p + m;
      CAPTURE(key);
      CHECK(counts[key] == 1);
    }
  }
  CHECK(causal_lm_loss(titan::call(model, tokens), tokens).item<double>() > 0);
}
