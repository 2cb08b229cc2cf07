#pragma once
// titan/moe.hpp: mixture-of-experts layers: the token-choice top-k router, grouped experts with
// stacked weights, the MoE layer that sends each token to its experts and sums what they return,
// and load balancing (Mixtral's auxiliary loss, DeepSeek-V3's auxiliary-loss-free expert bias).
//
//   On tokens x [T, dim], with E experts and k per token:
//     logits  = gate(x)                                   [T, E]  (a linear map without bias)
//     scores  = softmax or sigmoid of the logits, in fp32 [T, E]
//     experts = top-k of scores (+ expert bias)           [T, k]  (the bias only chooses)
//     weights = the chosen scores, renormalised to sum 1 (route_norm), times route_scale
//               (cast to the experts' output dtype before weighing it, unless fp32_weighting)
//     y       = Σ_j weights_j · SwiGLU_{experts_j}(x)     [T, dim]  (the k terms added in fp32,
//                                                                   rounded once, no atomics)
//   The T·k assignments are sorted by expert (stably), so each expert computes one contiguous run
//   of rows: one at::_grouped_mm per projection over all experts, or a loop over the experts (the
//   fallback, and the tests' reference).
//   Options: node-limited routing (the experts in groups, each token choosing among its best
//   groups' experts, DeepSeek-V3), shared experts every token also goes through, and a capacity
//   factor that drops the assignments beyond an expert's capacity (by score or by position);
//   dropless by default.
//
// Expert weights are stacked: w1 (gate) and w3 (up) [E, hidden, dim], w2 (down) [E, dim, hidden],
// expert j's being Hugging Face's experts.{j}.w1/w3/w2 (Mixtral) or gate_proj/up_proj/down_proj
// (Qwen3-MoE); transformers 5's fused gate_up_proj [E, 2·hidden, dim] is [w1 | w3] along dim 1.

#include <titan/collectives.hpp>
#include <titan/detail/enum_names.hpp>
#include <titan/fused/moe_combine.hpp>
#include <titan/fused/swiglu.hpp>
#include <titan/hooks.hpp>
#include <titan/world.hpp>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/arg.h>
#include <torch/nn/module.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace titan {

/// How the router turns logits into scores: softmax over the experts (Mixtral, Qwen3-MoE) or an
/// independent sigmoid per expert (DeepSeek-V3).
enum class RouterScore { Softmax, Sigmoid };

/// The score functions' names: "softmax", "sigmoid".
inline const detail::EnumNames<RouterScore, 2>& router_score_names() {
  static const detail::EnumNames<RouterScore, 2> names{{{RouterScore::Softmax, "softmax"},
                                                        {RouterScore::Sigmoid, "sigmoid"}}};
  return names;
}

/// "softmax" or "sigmoid".
inline std::string router_score_name(RouterScore score) { return detail::enum_name(router_score_names(), score); }

/// Parses "softmax" or "sigmoid"; anything else is an error naming the value.
inline RouterScore parse_router_score(const std::string& name) {
  return detail::parse_enum(router_score_names(), name, "titan: unknown MoE router score function");
}

/// Which assignments an expert over its capacity keeps: its highest routing weights (GShard,
/// the default) or its first tokens in order (Switch Transformer).
enum class MoeDropPolicy { ByScore, ByPosition };

/// A MoE layer's routing and computation, with chained setters.
struct MoeOptions {
  /// Routed experts (E).
  TORCH_ARG(int64_t, num_experts) = 8;
  /// Experts per token (k).
  TORCH_ARG(int64_t, top_k) = 2;
  /// Softmax (default) or sigmoid scores.
  TORCH_ARG(RouterScore, score) = RouterScore::Softmax;
  /// Renormalise each token's k chosen scores to sum 1 (Mixtral; Qwen3-MoE's norm_topk_prob).
  TORCH_ARG(bool, route_norm) = true;
  /// Factor on the routing weights after renormalisation (DeepSeek-V3's routed_scaling_factor).
  TORCH_ARG(double, route_scale) = 1.0;
  /// Node-limited routing (DeepSeek-V3): the experts form num_groups equal groups (one per node
  /// under expert parallelism); each token ranks the groups by the sum of their two best scores
  /// (with the expert bias) and chooses its top_k among the experts of its top_groups best.
  TORCH_ARG(int64_t, num_groups) = 1;
  TORCH_ARG(int64_t, top_groups) = 1;
  /// Hidden width of the shared experts, a SwiGLU feed-forward every token goes through, added to
  /// the routed experts' output (DeepSeek-V3: n_shared_experts × moe_intermediate_size); 0: none.
  TORCH_ARG(int64_t, shared_hidden) = 0;
  /// Each expert takes at most ceil(capacity_factor · T · k / E) of a forward's T·k assignments;
  /// the others are dropped (the token keeps its other experts' outputs). 0: dropless (default).
  TORCH_ARG(double, capacity_factor) = 0.0;
  /// Which assignments an expert over capacity keeps.
  TORCH_ARG(MoeDropPolicy, drop_policy) = MoeDropPolicy::ByScore;
  /// Multiply each expert's input by its routing weight (torchtitan) instead of its output
  /// (Hugging Face's Mixtral and Qwen3-MoE, the default). With SwiGLU the two differ.
  TORCH_ARG(bool, score_before_experts) = false;
  /// Weigh each expert's output in fp32, the product rounded once to the output's dtype
  /// (transformers' Mixtral). Off (default): the weight is cast to the output's dtype first, so
  /// in bf16 the product stays bf16 (transformers' Qwen3-MoE): no fp32 copy of the T·k rows, each
  /// way. The two differ by at most an ulp of the output's dtype; in fp32 not at all.
  TORCH_ARG(bool, fp32_weighting) = false;
  /// Keep an expert bias (a buffer, [E]) added to the scores when choosing experts only: the
  /// auxiliary-loss-free balancing of DeepSeek-V3, updated by update_expert_bias.
  TORCH_ARG(bool, expert_bias) = false;
  /// Keep the router statistics of the auxiliary load-balancing loss (moe_aux_loss; Mixtral's
  /// router_aux_loss_coef multiplies it). They need the router's gradient, so a MoE layer with it
  /// must not be activation-checkpointed (its first pass keeps no gradient): an error says so.
  TORCH_ARG(bool, aux_loss) = false;
  /// Compute the experts with at::_grouped_mm where it runs (CPU: float32 and bfloat16; CUDA:
  /// bfloat16; rows 16-byte aligned), else with a loop over the experts.
  TORCH_ARG(bool, grouped_mm) = true;
};

/// Which experts each token goes to, with what weight.
struct MoeRouting {
  at::Tensor weights;  ///< [T, k] float32: the routing weights
  at::Tensor experts;  ///< [T, k] int64: the chosen experts, best first
  at::Tensor scores;   ///< [T, E] float32: every expert's score
};

/// Checks `options` for a layer, naming the bad value.
inline void check_moe_options(const MoeOptions& o) {
  const int64_t e = o.num_experts(), g = o.num_groups();
  TORCH_CHECK(e >= 1, "titan::MoeOptions: num_experts must be >= 1, got ", e);
  TORCH_CHECK(g >= 1 && e % g == 0, "titan::MoeOptions: num_groups (", g, ") must divide num_experts (", e, ")");
  TORCH_CHECK(o.top_groups() >= 1 && o.top_groups() <= g, "titan::MoeOptions: top_groups must be in [1, ", g,
              "] (num_groups), got ", o.top_groups());
  const int64_t reachable = g == 1 ? e : o.top_groups() * (e / g);
  TORCH_CHECK(o.top_k() >= 1 && o.top_k() <= reachable, "titan::MoeOptions: top_k must be in [1, ", reachable,
              "] (the experts of the top_groups best groups), got ", o.top_k());
  TORCH_CHECK(o.route_scale() > 0 && std::isfinite(o.route_scale()), "titan::MoeOptions: route_scale must be a ",
              "positive number, got ", o.route_scale());
  TORCH_CHECK(o.shared_hidden() >= 0, "titan::MoeOptions: shared_hidden must be >= 0, got ", o.shared_hidden());
  TORCH_CHECK(o.capacity_factor() == 0 || (o.capacity_factor() > 0 && std::isfinite(o.capacity_factor())),
              "titan::MoeOptions: capacity_factor must be 0 (dropless) or positive, got ", o.capacity_factor());
}

/// Routes tokens from the router's `logits` [T, E]: scores, top-k (choosing by scores + `bias`
/// when `bias` [E] is defined, among the best groups' experts with num_groups > 1),
/// renormalisation and scale as `options` say.
inline MoeRouting route_tokens(const at::Tensor& logits, const MoeOptions& options, const at::Tensor& bias = {}) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) == options.num_experts(), "titan::route_tokens: expected logits ",
              "[tokens, ", options.num_experts(), " experts], got ", logits.sizes());
  const auto fp32 = logits.to(at::kFloat);  // [T, E]
  MoeRouting r;
  r.scores = options.score() == RouterScore::Softmax ? at::softmax(fp32, -1) : at::sigmoid(fp32);  // [T, E]
  auto choice = bias.defined() ? r.scores.detach() + bias : r.scores.detach();                    // [T, E]
  if (options.num_groups() > 1) {
    const int64_t tokens = choice.size(0), groups = options.num_groups(), per = options.num_experts() / groups;
    const auto grouped = choice.view({tokens, groups, per});                                    // [T, G, E / G]
    const auto group_scores = std::get<0>(grouped.topk(std::min<int64_t>(2, per), -1)).sum(-1);  // [T, G]
    const auto best = std::get<1>(group_scores.topk(options.top_groups(), -1));                  // [T, top_groups]
    const auto allowed = at::zeros_like(group_scores, at::kBool).scatter_(1, best, true);        // [T, G]
    choice = choice.masked_fill(allowed.logical_not().unsqueeze(-1).expand_as(grouped).reshape_as(choice),
                                -std::numeric_limits<float>::infinity());
  }
  r.experts = std::get<1>(choice.topk(options.top_k(), -1));  // [T, k]
  r.weights = r.scores.gather(1, r.experts);                 // [T, k]
  if (options.route_norm()) r.weights = r.weights / r.weights.sum(-1, /*keepdim=*/true);
  if (options.route_scale() != 1.0) r.weights = r.weights * options.route_scale();
  return r;
}

/// The T·k assignments of a routing in expert order, each expert keeping at most its capacity.
struct MoeDispatch {
  at::Tensor slot;     ///< [N] int64: each kept assignment's position t·k + j in the routing, by expert
  at::Tensor token;    ///< [N] int64: its token t
  at::Tensor weight;   ///< [N, 1] float32: its routing weight
  at::Tensor counts;   ///< [E] int64: kept assignments per expert (they sum to N)
  at::Tensor routed;   ///< [E] int64: every assignment per expert, before the capacity (= counts if dropless)
};

/// Sorts `routing`'s assignments by expert (stably: by token within an expert, or by weight
/// with MoeDropPolicy::ByScore), dropping those beyond each expert's capacity when
/// options.capacity_factor() > 0.
inline MoeDispatch dispatch_tokens(const MoeRouting& routing, const MoeOptions& options) {
  const int64_t k = routing.experts.size(1), experts = options.num_experts();
  const bool capped = options.capacity_factor() > 0;
  const auto chosen = routing.experts.reshape({-1});  // [T·k]
  const auto weights = routing.weights.reshape({-1}); // [T·k]
  auto order = at::argsort(chosen, /*stable=*/true);  // [T·k] assignments by expert, then token
  if (capped && options.drop_policy() == MoeDropPolicy::ByScore) {  // by expert, then weight (highest first)
    const auto by_weight = at::argsort(weights.detach(), /*stable=*/true, 0, /*descending=*/true);  // [T·k]
    order = by_weight.index_select(0, at::argsort(chosen.index_select(0, by_weight), /*stable=*/true));
  }
  MoeDispatch d;
  d.routed = at::zeros({experts}, chosen.options()).index_add_(0, chosen, at::ones_like(chosen));  // [E]
  d.counts = d.routed;
  if (capped) {
    const auto capacity = static_cast<int64_t>(
        std::ceil(options.capacity_factor() * static_cast<double>(chosen.numel()) / static_cast<double>(experts)));
    const auto starts = d.routed.cumsum(0) - d.routed;                                        // [E] first rows
    const auto rank = at::arange(chosen.numel(), chosen.options()) -
                      starts.index_select(0, chosen.index_select(0, order));                  // [T·k] within expert
    order = order.masked_select(rank.lt(capacity));                                           // [N]
    d.counts = d.routed.clamp_max(capacity);                                                  // [E]
  }
  d.slot = order;                                          // [N]
  d.token = order.div(k, "floor");                         // [N]
  d.weight = weights.index_select(0, order).unsqueeze(1);  // [N, 1]
  return d;
}

/// E SwiGLU feed-forwards with stacked weights: w1 and w3 [E, hidden, dim], w2 [E, dim, hidden].
/// forward(x, counts) computes, for rows sorted by expert (counts[e] rows of expert e in order),
/// w2_e · (silu(w1_e x) ⊙ w3_e x) on each expert's rows.
struct GroupedExpertsImpl : torch::nn::Module {
  GroupedExpertsImpl(int64_t num_experts, int64_t dim, int64_t hidden, bool grouped_mm = true,
                     const at::TensorOptions& options = {})
      : grouped_mm(grouped_mm) {
    TORCH_CHECK(num_experts >= 1 && dim >= 1 && hidden >= 1, "titan::GroupedExperts: experts (", num_experts,
                "), dim (", dim, ") and hidden (", hidden, ") must be >= 1");
    w1 = register_parameter("w1", at::empty({num_experts, hidden, dim}, options));
    w2 = register_parameter("w2", at::empty({num_experts, dim, hidden}, options));
    w3 = register_parameter("w3", at::empty({num_experts, hidden, dim}, options));
  }

  /// x [N, dim] sorted by expert, counts [E] int64 summing to N -> [N, dim].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& counts) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == w1.size(2), "titan::GroupedExperts: expected rows [N, ", w1.size(2),
                "], got ", x.sizes());
    TORCH_CHECK(counts.dim() == 1 && counts.size(0) == w1.size(0), "titan::GroupedExperts: expected counts [",
                w1.size(0), "], got ", counts.sizes());
    return runs_grouped(x) ? forward_grouped(x, counts) : forward_loop(x, counts);
  }

  /// Whether forward uses at::_grouped_mm for rows like `x` (else the per-expert loop).
  bool runs_grouped(const at::Tensor& x) const {
    if (!grouped_mm || x.scalar_type() != w1.scalar_type()) return false;
    const auto dtype = x.scalar_type();
    const bool kind = x.is_cuda() ? dtype == at::kBFloat16 : (dtype == at::kFloat || dtype == at::kBFloat16);
    const int64_t bytes = static_cast<int64_t>(x.element_size());
    return kind && (w1.size(2) * bytes) % 16 == 0 && (w1.size(1) * bytes) % 16 == 0;  // 16-byte aligned rows
  }

  bool grouped_mm;
  at::Tensor w1, w2, w3;

 private:
  at::Tensor forward_grouped(const at::Tensor& x, const at::Tensor& counts) const {
    const auto offsets = counts.cumsum(0).to(at::kInt);  // [E]: the end row of each expert's run
    auto mm = [&offsets](const at::Tensor& a, const at::Tensor& w) {  // a [N, in], w [E, out, in] -> [N, out]
      return at::_grouped_mm(a, w.transpose(-2, -1), offsets);
    };
    const auto h = titan::swiglu(mm(x, w1), mm(x, w3));  // [N, hidden]: silu(x w1ᵀ) ⊙ x w3ᵀ, one operator
    return mm(h, w2);                                    // [N, dim]
  }

  at::Tensor forward_loop(const at::Tensor& x, const at::Tensor& counts) const {
    const auto host = counts.to(at::kCPU, at::kLong);  // one device-to-host copy
    const auto* count = host.data_ptr<int64_t>();
    std::vector<at::Tensor> outputs;
    int64_t row = 0;
    for (int64_t e = 0; e < host.numel(); ++e) {
      TORCH_CHECK(count[e] >= 0 && row + count[e] <= x.size(0), "titan::GroupedExperts: counts ", host.sizes(),
                  " do not split the ", x.size(0), " rows");
      if (count[e] == 0) continue;
      const auto rows = x.narrow(0, row, count[e]);                                           // [n_e, dim]
      const auto h = titan::swiglu(at::linear(rows, w1[e]), at::linear(rows, w3[e]));        // [n_e, hidden]
      outputs.push_back(at::linear(h, w2[e]));                                                // [n_e, dim]
      row += count[e];
    }
    TORCH_CHECK(row == x.size(0), "titan::GroupedExperts: counts sum to ", row, " but there are ", x.size(0), " rows");
    return outputs.empty() ? at::zeros_like(x) : at::cat(outputs);  // [N, dim]
  }
};
TORCH_MODULE(GroupedExperts);

/// The router's linear map without bias: weight [E, dim] (Hugging Face's gate.weight).
struct MoeGateImpl : torch::nn::Module {
  MoeGateImpl(int64_t num_experts, int64_t dim, const at::TensorOptions& options = {}) {
    weight = register_parameter("weight", at::empty({num_experts, dim}, options));
  }
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight); }  // [T, dim] -> [T, E]
  at::Tensor weight;
};
TORCH_MODULE(MoeGate);

/// The shared experts: one SwiGLU feed-forward, w2 (silu(w1 x) ⊙ w3 x), with w1 and w3
/// [hidden, dim], w2 [dim, hidden] (Hugging Face's shared_experts.gate_proj / up_proj / down_proj).
struct MoeSharedExpertsImpl : torch::nn::Module {
  MoeSharedExpertsImpl(int64_t dim, int64_t hidden, const at::TensorOptions& options = {}) {
    w1 = register_parameter("w1", at::empty({hidden, dim}, options));
    w2 = register_parameter("w2", at::empty({dim, hidden}, options));
    w3 = register_parameter("w3", at::empty({hidden, dim}, options));
  }
  at::Tensor forward(const at::Tensor& x) {  // [T, dim] -> [T, dim]
    return at::linear(titan::swiglu(at::linear(x, w1), at::linear(x, w3)), w2);
  }
  at::Tensor w1, w2, w3;
};
TORCH_MODULE(MoeSharedExperts);

/// What the auxiliary load-balancing loss needs of one MoE layer, summed over the tokens of its
/// training forwards since the last moe_aux_loss.
struct MoeAuxStatistics {
  at::Tensor assignments;    ///< [E] float32: top-k assignments per expert
  at::Tensor probabilities;  ///< [E] float32: router probabilities per expert, with their gradient
  int64_t rows = 0;          ///< tokens
};

/// A mixture-of-experts feed-forward: `gate` (MoeGate, dim -> E) routes each token to
/// top_k of the `experts` (GroupedExperts). Its children are called through titan::call, so FSDP
/// and expert parallelism attach to them as to any module. Training forwards with gradients (an
/// activation-checkpointed layer: its recomputation) count the tokens each expert received, and
/// with MoeOptions::aux_loss keep the auxiliary loss's statistics.
struct MoEImpl : torch::nn::Module {
  MoEImpl(int64_t dim, int64_t hidden, MoeOptions options, const at::TensorOptions& tensor_options = {})
      : options_(options) {
    check_moe_options(options);
    gate = register_module("gate", MoeGate(options.num_experts(), dim, tensor_options));
    experts = register_module(
        "experts", GroupedExperts(options.num_experts(), dim, hidden, options.grouped_mm(), tensor_options));
    if (options.shared_hidden() > 0)
      shared_experts = register_module("shared_experts", MoeSharedExperts(dim, options.shared_hidden(), tensor_options));
    if (options.expert_bias())
      expert_bias = register_buffer("expert_bias", at::zeros({options.num_experts()}, tensor_options.dtype(at::kFloat)));
  }

  /// x [..., dim] -> [..., dim].
  at::Tensor forward(const at::Tensor& x) {
    const int64_t dim = gate->weight.size(1);
    const auto tokens = x.reshape({-1, dim});                                     // [T, dim]
    const auto routing = route_tokens(titan::call(gate, tokens), options_, expert_bias);
    const auto d = dispatch_tokens(routing, options_);                            // N kept assignments
    // Indexing rather than index_select: its gradient adds a token's k rows after sorting them
    // (on CUDA too; index_select's adds them with atomics), so the same bits on every run.
    auto rows = tokens.index({d.token});                                          // [N, dim]
    if (options_.score_before_experts()) rows = (rows * d.weight).to(tokens.scalar_type());
    auto out = titan::call(experts, rows, d.counts);                              // [N, dim]
    std::optional<at::Tensor> weight;  // [N]: each row's routing weight, unless the rows were weighed before
    if (!options_.score_before_experts())
      weight = (options_.fp32_weighting() ? d.weight : d.weight.to(out.scalar_type())).view({-1});
    if (is_training()) record(routing, d);
    // Each row times its weight, back at its token, the k added in fp32: one operator each way.
    auto y = titan::moe_combine(out, weight, d.slot, tokens.size(0), routing.experts.size(1))
                 .to(tokens.scalar_type());  // [T, dim]
    if (shared_experts) y = y + titan::call(shared_experts, tokens);
    return y.reshape(x.sizes());
  }

  const MoeOptions& options() const { return options_; }
  /// Tokens routed to each expert ([E] int64, undefined when none) since the last reset, and the
  /// assignments dropped for capacity ([] int64).
  const at::Tensor& tokens_per_expert() const { return tokens_per_expert_; }
  const at::Tensor& dropped_tokens() const { return dropped_; }
  /// The auxiliary loss's statistics since the last reset.
  const MoeAuxStatistics& aux_statistics() const { return aux_; }
  /// Empties the token counts, or the auxiliary loss's statistics.
  void reset_tokens_per_expert() {
    tokens_per_expert_ = at::Tensor();
    dropped_ = at::Tensor();
  }
  void reset_aux_statistics() { aux_ = MoeAuxStatistics{}; }

  MoeGate gate{nullptr};
  GroupedExperts experts{nullptr};
  MoeSharedExperts shared_experts{nullptr};  ///< when MoeOptions::shared_hidden > 0
  at::Tensor expert_bias;  ///< [E] float32 buffer when MoeOptions::expert_bias, else undefined

 private:
  void record(const MoeRouting& routing, const MoeDispatch& d) {
    const bool grad = c10::GradMode::is_enabled();
    TORCH_CHECK(grad || !options_.aux_loss(), "titan::MoE: a training-mode forward ran without gradients. Under ",
                "activation checkpointing's first pass the auxiliary loss would get no gradient through the router: ",
                "leave the MoE layers' blocks un-checkpointed, or balance with MoeOptions().expert_bias(true) ",
                "instead of aux_loss. For an evaluation under torch::NoGradGuard, call model->eval() first");
    if (!grad) return;  // the recomputation counts these tokens
    {
      at::NoGradGuard no_grad;
      tokens_per_expert_ = tokens_per_expert_.defined() ? tokens_per_expert_ + d.counts : d.counts.clone();
      const auto dropped = (d.routed - d.counts).sum();  // []
      dropped_ = dropped_.defined() ? dropped_ + dropped : dropped;
    }
    if (!options_.aux_loss()) return;
    // Mixtral's (Switch Transformer's) statistics: softmax probabilities; sigmoid scores are
    // normalised per token to sum 1 first.
    const auto probabilities = options_.score() == RouterScore::Softmax
                                   ? routing.scores
                                   : routing.scores / routing.scores.sum(-1, /*keepdim=*/true);  // [T, E]
    const auto assigned = d.routed.to(at::kFloat);                                               // [E]
    const auto summed = probabilities.sum(0);                                                     // [E]
    aux_.assignments = aux_.assignments.defined() ? aux_.assignments + assigned : assigned;
    aux_.probabilities = aux_.probabilities.defined() ? aux_.probabilities + summed : summed;
    aux_.rows += routing.scores.size(0);
  }

  MoeOptions options_;
  at::Tensor tokens_per_expert_;  ///< [E] int64, undefined after a reset
  at::Tensor dropped_;            ///< [] int64, undefined after a reset
  MoeAuxStatistics aux_;
};
TORCH_MODULE(MoE);

namespace detail {

/// The MoE layers of `root` with their dotted names, in pre-order.
inline std::vector<std::pair<std::string, MoEImpl*>> moe_layers(torch::nn::Module& root) {
  std::vector<std::pair<std::string, MoEImpl*>> layers;
  visit_modules(root, "", [&layers](const std::string& path, torch::nn::Module& module) {
    if (auto* moe = module.as<MoEImpl>()) layers.emplace_back(path.empty() ? "<root>" : path, moe);
  });
  return layers;
}

}  // namespace detail

/// The auxiliary load-balancing loss of every MoE layer of `model` (a module, ModuleHolder,
/// shared_ptr or pointer) with MoeOptions::aux_loss, over their training forwards since the last
/// call, as transformers' load_balancing_loss_func computes it over a model's layers:
/// E · Σ_e f_e · P_e, with f_e the share of top-k assignments and P_e the mean router probability
/// of expert e, both over every layer's tokens. Add coefficient × it to the loss before backward;
/// the statistics are then emptied.
template <typename M>
at::Tensor moe_aux_loss(M&& model) {
  at::Tensor assignments, probabilities;
  int64_t rows = 0, experts = 0, layers = 0;
  for (auto& [name, layer] : detail::moe_layers(detail::module_ref(model))) {
    if (!layer->options().aux_loss()) continue;
    ++layers;
    const auto& aux = layer->aux_statistics();
    TORCH_CHECK(experts == 0 || experts == layer->options().num_experts(), "titan::moe_aux_loss: MoE layer '", name,
                "' has ", layer->options().num_experts(), " experts but an earlier one ", experts,
                "; the loss sums layers of one expert count");
    experts = layer->options().num_experts();
    if (aux.rows > 0) {
      assignments = assignments.defined() ? assignments + aux.assignments : aux.assignments;
      probabilities = probabilities.defined() ? probabilities + aux.probabilities : aux.probabilities;
      rows += aux.rows;
    }
    layer->reset_aux_statistics();
  }
  TORCH_CHECK(layers > 0, "titan::moe_aux_loss: no MoE layer keeps the auxiliary loss's statistics: build them with ",
              "MoeOptions().aux_loss(true)");
  TORCH_CHECK(rows > 0, "titan::moe_aux_loss: the MoE layers ran no training forward with gradients since the last ",
              "call (call it after the forward, before backward)");
  const double n = static_cast<double>(rows);
  return (assignments / n * (probabilities / n)).sum() * static_cast<double>(experts);  // []
}

/// One MoE layer's load since the last reset: tokens per expert and the largest over the mean
/// (1 is perfectly balanced; E when one expert takes every token).
struct MoeLoad {
  std::string layer;
  at::Tensor tokens;      ///< [E] int64 on the CPU: assignments each expert computed
  double max_over_mean = 0;
  int64_t dropped = 0;    ///< assignments dropped for capacity
};

/// The load of every MoE layer of `model` (a module, ModuleHolder, shared_ptr or pointer) since
/// the last reset, on this rank, or summed over `group` (every rank of it calls this; one
/// all-reduce of all layers' counts); `reset` empties the counts.
template <typename M>
std::vector<MoeLoad> moe_loads(M&& model, bool reset = false, const ProcessGroupPtr& group = nullptr) {
  std::vector<MoeLoad> loads;
  std::vector<at::Tensor> rows;  // per layer: tokens per expert, then the dropped assignments [E + 1]
  for (auto& [name, layer] : detail::moe_layers(detail::module_ref(model))) {
    const int64_t experts = layer->options().num_experts();
    auto row = at::zeros({experts + 1}, at::kLong);
    if (layer->tokens_per_expert().defined()) row.narrow(0, 0, experts).copy_(layer->tokens_per_expert());
    if (layer->dropped_tokens().defined()) row[experts].copy_(layer->dropped_tokens());
    rows.push_back(row);
    loads.push_back(MoeLoad{name, at::Tensor(), 0, 0});
    if (reset) layer->reset_tokens_per_expert();
  }
  if (rows.empty()) return loads;
  auto all = at::cat(rows);  // [Σ (E + 1)] int64 on the CPU
  if (group && group->size() > 1) all = detail::all_reduce_raw(all.to(group->device()), *group, ReduceOp::Sum).cpu();
  int64_t offset = 0;
  for (size_t i = 0; i < loads.size(); ++i) {
    auto& load = loads[i];
    const int64_t experts = rows[i].numel() - 1;
    load.tokens = all.narrow(0, offset, experts).clone();  // [E]
    load.dropped = all[offset + experts].item<int64_t>();
    offset += experts + 1;
    const double mean = load.tokens.to(at::kDouble).mean().item<double>();
    load.max_over_mean = mean > 0 ? static_cast<double>(load.tokens.max().item<int64_t>()) / mean : 0;
  }
  return loads;
}

/// DeepSeek-V3's auxiliary-loss-free balancing (torchtitan's expert-bias update), after each
/// optimizer step: for every MoE layer of `model` with an expert bias, the tokens per expert since
/// the last update are summed over `group` (the data-parallel ranks, all layers in one
/// all-reduce; nullptr: this rank's), and the bias moves by `rate` towards balance:
/// bias += rate · sign(mean − tokens), centred to mean 0. Every layer's counts are then emptied.
template <typename M>
void update_expert_bias(M&& model, const ProcessGroupPtr& group, double rate) {
  TORCH_CHECK(rate > 0 && std::isfinite(rate), "titan::update_expert_bias: rate must be a positive number, got ", rate);
  std::vector<MoEImpl*> biased;
  std::vector<at::Tensor> counts;
  for (auto& [name, layer] : detail::moe_layers(detail::module_ref(model))) {
    if (layer->expert_bias.defined()) {
      biased.push_back(layer);
      counts.push_back(layer->tokens_per_expert().defined()
                           ? layer->tokens_per_expert().to(at::kFloat)
                           : at::zeros({layer->options().num_experts()}, layer->expert_bias.options()));
    }
    layer->reset_tokens_per_expert();
  }
  if (biased.empty()) return;
  at::NoGradGuard no_grad;
  auto all = at::cat(counts);  // [Σ E] float32
  if (group && group->size() > 1) all = detail::all_reduce_raw(all.to(group->device()), *group, ReduceOp::Sum);
  int64_t offset = 0;
  for (size_t i = 0; i < biased.size(); ++i) {
    auto& bias = biased[i]->expert_bias;
    const auto tokens = all.narrow(0, offset, bias.numel()).to(bias.device());  // [E]
    offset += bias.numel();
    auto delta = at::sign(tokens.mean() - tokens) * rate;  // [E]
    bias.add_(delta - delta.mean());
  }
}

}  // namespace titan
