// Traces one training step of titan's trainer at a GPU shape without computing it, for the GPU
// cost model (bench/gpu_cost/cost_model.py). The model is built on the meta device and
// parallelized exactly as the trainer does it (parallelize_llama: AC, FSDP on a world of one),
// the optimizer is the trainer's FusedAdamW and the step is the trainer's: forward, token loss
// sum (its gradient scaled in the forward), backward, gradient norm, skip flag, the optimizer step
// with the clipping inside. The second step is recorded (the first one creates the optimizer state).
//
//   bench_gpu_cost_trace --out titan.jsonl --dim 2048 --n-layers 16 --n-heads 32 --n-kv-heads 8
//       --multiple-of 256 --ffn-dim-multiplier 1.5 --vocab-size 128256 --seq-len 8192 --local-batch 1
//       --dtype bfloat16 --ac op --titan-kernels aten --fused-projections 0      (one command line)
//   Mixture of experts (Qwen3-MoE's blocks): --head-dim 128 --qk-norm 1 --moe-experts 128 --moe-top-k 8
//       --moe-hidden 768; the expert bias is updated after the step, as the trainer does.
//   Float8 linear layers: --float8 tensorwise (or rowwise): the trainer's float8.enable with that
//       recipe and its other float8 settings at their defaults (the output layer in bf16), as the
//       side-by-side benchmark's titan_float8 row.
//
// What is recorded is what a PyTorch dispatch mode would see (TorchDispatchMode, used for the
// Python peers by trace_peers.py): every operator call that reaches the kernels below autograd,
// one line each with its tensors' shapes and dtypes and its scalar arguments. Operators that
// LibTorch decomposes above autograd (CompositeImplicitAutograd) are not lines; the operators
// they call are. Operators called inside a kernel are not lines either. Outputs that per-operator
// activation checkpointing hands back from the first forward (no kernel runs) are left out.
//
// The meta device would take other kernel choices than CUDA at three places; CUDA's are made
// here (meta kernels registered below):
//   - SDPA: the cuDNN attention kernel (what an H200 runs for these shapes),
//   - at::rms_norm with matching dtypes: the fused RMSNorm kernel and its fused backward,
//   - the fused AdamW kernel (no C++ meta kernel in LibTorch; nor have index_select and
//     embedding_dense_backward, the embedding's, complex.out, RoPE's, and abs.out,
//     logical_not.out and where.self, which gradient clipping and the skip flag reach, and
//     _grouped_mm, the MoE experts', and _scaled_mm, float8's: all registered here).
#include "models/llama/model.hpp"
#include "models/llama/parallelize.hpp"
#include "common/config.hpp"
#include "common/optim.hpp"
#include "common/parallelism.hpp"

#include "bench_args.hpp"

#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <titan/fsdp.hpp>
#include <titan/fused.hpp>
#include <titan/moe.hpp>
#include <titan/sharding.hpp>
#include <titan/world.hpp>
#include <torch/library.h>

#include <nlohmann/json.hpp>

#include <fstream>
#include <iostream>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace {

using namespace titan::examples;
using Stack = torch::jit::Stack;

// ---- CUDA's kernel choices on the meta device ------------------------------------------------

/// SDPA as CUDA runs it for these shapes: the cuDNN attention kernel (with autograd). SDPA picks
/// its backend through a per-device stub that the meta device lacks (it would decompose into the
/// math path), so the composite itself is replaced in this process.
at::Tensor sdpa_as_cudnn(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask, double dropout, bool is_causal,
                         std::optional<double> scale, bool /*enable_gqa: cuDNN takes fewer kv heads as they are*/) {
  const bool lse = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  return std::get<0>(at::_scaled_dot_product_cudnn_attention(q, k, v, mask, lse, dropout, is_causal, false, scale));
}

/// (q, k, v, bias, compute_lse, dropout, is_causal, debug_mask, scale) -> out, lse [B, H, S, 1], ...
void cudnn_attention_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto q = (*stack)[stack->size() - 9].toTensor();  // [B, H, S, D]
  const auto k = (*stack)[stack->size() - 8].toTensor();
  const auto v = (*stack)[stack->size() - 7].toTensor();
  torch::jit::drop(*stack, 9);
  // The output takes the query's layout (a transposed [B, S, H, D] stays one), as CUDA's kernel does.
  auto out = v.size(-1) == q.size(-1) ? at::empty_like(q)
                                      : at::empty({q.size(0), q.size(1), q.size(2), v.size(-1)}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2), 1}, q.options().dtype(at::kFloat));
  auto seed = at::empty({}, q.options().dtype(at::kLong));
  stack->emplace_back(out);
  stack->emplace_back(lse);
  stack->emplace_back(at::Tensor());
  stack->emplace_back(at::Tensor());
  stack->emplace_back(q.size(2));
  stack->emplace_back(k.size(2));
  stack->emplace_back(seed);
  stack->emplace_back(seed.clone());
  stack->emplace_back(at::Tensor());
}

/// (grad_out, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout, causal, scale)
void cudnn_attention_backward_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto first = stack->size() - 16;
  auto dq = at::empty_like((*stack)[first + 1].toTensor());
  auto dk = at::empty_like((*stack)[first + 2].toTensor());
  auto dv = at::empty_like((*stack)[first + 3].toTensor());
  torch::jit::drop(*stack, 16);
  stack->emplace_back(dq);
  stack->emplace_back(dk);
  stack->emplace_back(dv);
}

/// (input, normalized_shape, weight, eps) -> y, rstd (float32, the normalized dims kept as 1)
void fused_rms_norm_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto input = (*stack)[stack->size() - 4].toTensor();
  const auto normalized = (*stack)[stack->size() - 3].toIntVector();
  torch::jit::drop(*stack, 4);
  auto stat_shape = input.sizes().vec();
  for (size_t i = 0; i < normalized.size(); ++i) stat_shape[stat_shape.size() - 1 - i] = 1;
  stack->emplace_back(at::empty_like(input, at::MemoryFormat::Contiguous));
  stack->emplace_back(at::empty(stat_shape, input.options().dtype(at::kFloat)));
}

/// (grad_out, input, normalized_shape, rstd, weight, output_mask) -> grad_input, grad_weight
void fused_rms_norm_backward_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto first = stack->size() - 6;
  const auto input = (*stack)[first + 1].toTensor();
  const auto weight = (*stack)[first + 4];
  const auto mask = (*stack)[first + 5].toBoolList();
  at::Tensor grad_input, grad_weight;
  if (mask.get(0)) grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
  if (mask.get(1) && weight.isTensor()) grad_weight = at::empty_like(weight.toTensor());
  torch::jit::drop(*stack, 6);
  stack->emplace_back(grad_input);
  stack->emplace_back(grad_weight);
}

void fused_adamw_meta(const c10::OperatorHandle&, Stack* stack) { torch::jit::drop(*stack, 15); }

/// (self, dim, index) -> self's shape with dim's size index.numel() (the embedding's gather; only
/// PyTorch's Python meta registrations have it).
void index_select_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto self = (*stack)[stack->size() - 3].toTensor();
  const auto dim = c10::maybe_wrap_dim((*stack)[stack->size() - 2].toInt(), self.dim());
  const auto index = (*stack)[stack->size() - 1].toTensor();
  torch::jit::drop(*stack, 3);
  auto sizes = self.sizes().vec();
  if (!sizes.empty()) sizes[static_cast<size_t>(dim)] = index.numel();
  stack->emplace_back(at::empty(sizes, self.options()));
}

/// (grad_output, indices, num_weights, padding_idx, scale_grad_by_freq) -> [num_weights, dim]
void embedding_dense_backward_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto grad = (*stack)[stack->size() - 5].toTensor();
  const auto rows = (*stack)[stack->size() - 3].toInt();
  torch::jit::drop(*stack, 5);
  stack->emplace_back(at::empty({rows, grad.size(-1)}, grad.options()));
}

/// (self, out) -> out resized to self (abs.out and logical_not.out, which the skip flag reaches).
void unary_out_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto self = (*stack)[stack->size() - 2].toTensor();
  auto out = (*stack)[stack->size() - 1].toTensor();
  torch::jit::drop(*stack, 2);
  out.resize_(self.sizes());
  stack->emplace_back(out);
}

/// (a, b, out) -> out resized to the broadcast shape (complex.out: RoPE's rotation).
void binary_out_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto a = (*stack)[stack->size() - 3].toTensor();
  const auto b = (*stack)[stack->size() - 2].toTensor();
  auto out = (*stack)[stack->size() - 1].toTensor();
  torch::jit::drop(*stack, 3);
  out.resize_(at::infer_size(a.sizes(), b.sizes()));
  stack->emplace_back(out);
}

/// where.self(condition, self, other): the broadcast shape, self and other's promoted dtype.
void where_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto condition = (*stack)[stack->size() - 3].toTensor();
  const auto self = (*stack)[stack->size() - 2].toTensor();
  const auto other = (*stack)[stack->size() - 1].toTensor();
  torch::jit::drop(*stack, 3);
  const auto shape = at::infer_size(at::infer_size(condition.sizes(), self.sizes()), other.sizes());
  stack->emplace_back(at::empty(shape, self.options().dtype(at::result_type(self, other))));
}

/// _grouped_mm(self, mat2, offs, bias, out_dtype): the output shape of each layout the MoE experts
/// and their gradients use (LibTorch's CompositeExplicitAutograd fallback reads offs on the host):
/// [M, K] x [E, K, N] -> [M, N] (groups of rows); [K, M] x [M, N] -> [E, K, N] (groups along the
/// contracted M, the weights' gradient); [E, M, K] x [E, K, N] -> [E, M, N].
void grouped_mm_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto first = stack->size() - 5;
  const auto a = (*stack)[first].toTensor();
  const auto b = (*stack)[first + 1].toTensor();
  const auto offs = (*stack)[first + 2];
  const auto out_dtype = (*stack)[first + 4];
  const auto dtype = out_dtype.isNone() ? a.scalar_type() : out_dtype.toScalarType();
  std::vector<int64_t> shape;
  if (a.dim() == 2 && b.dim() == 3) shape = {a.size(0), b.size(2)};
  else if (a.dim() == 2 && b.dim() == 2) shape = {offs.toTensor().size(0), a.size(0), b.size(1)};
  else if (a.dim() == 3 && b.dim() == 3) shape = {a.size(0), a.size(1), b.size(2)};
  else TORCH_CHECK(false, "bench_gpu_cost_trace: _grouped_mm of ", a.sizes(), " and ", b.sizes(), " is not traced");
  torch::jit::drop(*stack, 5);
  stack->emplace_back(at::empty(shape, a.options().dtype(dtype)));
}

/// _scaled_mm(self [M, K], mat2 [K, N], scale_a, scale_b, bias, scale_result, out_dtype, fast_accum) -> [M, N]
/// in out_dtype (self's when none).
void scaled_mm_meta(const c10::OperatorHandle&, Stack* stack) {
  const auto first = stack->size() - 8;
  const auto a = (*stack)[first].toTensor();
  const auto b = (*stack)[first + 1].toTensor();
  const auto out_dtype = (*stack)[first + 6];
  const auto dtype = out_dtype.isNone() ? a.scalar_type() : out_dtype.toScalarType();
  torch::jit::drop(*stack, 8);
  stack->emplace_back(at::empty({a.size(0), b.size(1)}, a.options().dtype(dtype)));
}

TORCH_LIBRARY_IMPL(aten, CompositeImplicitAutograd, m) { m.impl("scaled_dot_product_attention", &sdpa_as_cudnn); }

TORCH_LIBRARY_IMPL(aten, Meta, m) {
  m.impl("_scaled_dot_product_cudnn_attention", torch::CppFunction::makeFromBoxedFunction<&cudnn_attention_meta>());
  m.impl("_scaled_dot_product_cudnn_attention_backward",
         torch::CppFunction::makeFromBoxedFunction<&cudnn_attention_backward_meta>());
  m.impl("_fused_rms_norm", torch::CppFunction::makeFromBoxedFunction<&fused_rms_norm_meta>());
  m.impl("_fused_rms_norm_backward", torch::CppFunction::makeFromBoxedFunction<&fused_rms_norm_backward_meta>());
  m.impl("_fused_adamw_", torch::CppFunction::makeFromBoxedFunction<&fused_adamw_meta>());
  m.impl("_fused_adamw_.tensor_lr", torch::CppFunction::makeFromBoxedFunction<&fused_adamw_meta>());
  m.impl("index_select", torch::CppFunction::makeFromBoxedFunction<&index_select_meta>());
  m.impl("embedding_dense_backward", torch::CppFunction::makeFromBoxedFunction<&embedding_dense_backward_meta>());
  m.impl("abs.out", torch::CppFunction::makeFromBoxedFunction<&unary_out_meta>());
  m.impl("where.self", torch::CppFunction::makeFromBoxedFunction<&where_meta>());
  m.impl("logical_not.out", torch::CppFunction::makeFromBoxedFunction<&unary_out_meta>());
  m.impl("complex.out", torch::CppFunction::makeFromBoxedFunction<&binary_out_meta>());
  m.impl("_grouped_mm", torch::CppFunction::makeFromBoxedFunction<&grouped_mm_meta>());
  m.impl("_scaled_mm", torch::CppFunction::makeFromBoxedFunction<&scaled_mm_meta>());
}

// ---- the recorder -----------------------------------------------------------------------------

/// Whether LibTorch decomposes `op` above autograd on the meta device (its parts are dispatched).
bool decomposed_on_meta(const c10::OperatorHandle& op) {
  using K = c10::DispatchKey;
  if (!op.hasKernelForDispatchKey(K::CompositeImplicitAutograd)) return false;
  if (op.hasKernelForDispatchKey(K::CompositeExplicitAutograd) ||
      op.hasKernelForDispatchKey(K::CompositeExplicitAutogradNonFunctional))
    return false;
  return !op.hasKernelForDispatchKey(K::Meta);
}

/// A tensor as the cost model reads it: shape, dtype, distinct elements (a broadcast dimension,
/// stride 0, reads its elements once), element size, its storage (the identity of the data it
/// reads or writes) and whether the operator writes it.
nlohmann::json tensor_json(const at::Tensor& t, bool written) {
  int64_t distinct = 1;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.stride(d) != 0 || t.size(d) == 0) distinct *= t.size(d);
  nlohmann::json j = {{"shape", t.sizes().vec()},
                      {"dtype", std::string(c10::toString(t.scalar_type()))},
                      {"elements", distinct},
                      {"itemsize", static_cast<int64_t>(t.element_size())},
                      {"storage", t.has_storage() ? reinterpret_cast<uintptr_t>(t.storage().unsafeGetStorageImpl())
                                                  : uintptr_t{0}}};
  if (written) j["written"] = true;
  return j;
}

/// Appends `value`'s tensors to `tensors` and, when it holds none, its value to `scalars[name]`.
void add_values(nlohmann::json& tensors, nlohmann::json& scalars, const c10::IValue& value, const std::string& name,
                bool written) {
  if (value.isTensor()) {
    if (value.toTensor().defined()) tensors.push_back(tensor_json(value.toTensor(), written));
  } else if (value.isTensorList() || value.isOptionalTensorList()) {
    for (const auto& item : value.toListRef())
      if (item.isTensor() && item.toTensor().defined()) tensors.push_back(tensor_json(item.toTensor(), written));
  } else if (value.isBool()) {
    scalars[name] = value.toBool();
  } else if (value.isInt()) {
    scalars[name] = value.toInt();
  } else if (value.isDouble()) {
    scalars[name] = value.toDouble();
  } else if (value.isIntList()) {
    scalars[name] = value.toIntVector();
  } else if (value.isNone()) {
    scalars[name] = nullptr;
  }
}

const c10::StorageImpl* storage_of(const c10::IValue& value) {
  if (!value.isTensor() || !value.toTensor().defined() || !value.toTensor().has_storage()) return nullptr;
  return value.toTensor().storage().unsafeGetStorageImpl();
}

class Recorder {
 public:
  /// `titan_ops_in_aten`: titan's fused operators are not lines, the ATen operators of their ATen
  /// implementation are (a build without titan's CUDA kernels); else each is one kernel.
  Recorder(const std::string& path, bool titan_ops_in_aten) : out_(path), titan_ops_in_aten_(titan_ops_in_aten) {
    TORCH_CHECK(out_, "bench_gpu_cost_trace: cannot write '", path, "'");
  }
  void set_phase(const std::string& phase) { phase_ = phase; }
  int64_t lines() const { return lines_; }
  int64_t replayed() const { return replayed_; }

  void start(const at::RecordFunction& fn) {
    auto& frames = stack();
    const bool inside_atom = !frames.empty() && frames.back().inside_atom;
    Frame frame{inside_atom, false, {}, {}, {}};
    const auto name = fn.operator_name();
    if (!inside_atom && fn.scope() == at::RecordScope::FUNCTION && name) {
      auto op = c10::Dispatcher::singleton().findOp(*name);
      const bool in_aten = titan_ops_in_aten_ && op && op->schema().name().rfind("titan::", 0) == 0;
      if (op && !decomposed_on_meta(*op) && !in_aten) {
        frame.inside_atom = frame.atom = true;
        frame.op = op;
        frame.event = {{"op", fn.name() + std::string(*fn.overload_name() ? "." : "") + fn.overload_name()},
                       {"phase", phase_},
                       {"inputs", nlohmann::json::array()},
                       {"scalars", nlohmann::json::object()}};
        const auto& schema = op->schema();
        frame.event["mutates"] = schema.is_mutable();
        bool view = !schema.returns().empty();
        for (const auto& ret : schema.returns()) view = view && ret.alias_info() && !ret.alias_info()->isWrite();
        frame.event["view"] = view;
        const auto inputs = fn.inputs();
        for (size_t i = 0; i < inputs.size() && i < schema.arguments().size(); ++i) {
          const auto& argument = schema.arguments()[i];
          const bool written = argument.alias_info() && argument.alias_info()->isWrite();
          add_values(frame.event["inputs"], frame.event["scalars"], inputs[i], argument.name(), written);
          if (const auto* s = storage_of(inputs[i])) frame.input_storages.insert(s);
        }
      }
    }
    frames.push_back(std::move(frame));
  }

  void end(const at::RecordFunction& fn) {
    auto& frames = stack();
    TORCH_CHECK(!frames.empty(), "bench_gpu_cost_trace: unbalanced RecordFunction end for ", fn.name());
    Frame frame = std::move(frames.back());
    frames.pop_back();
    if (!frame.atom) return;
    nlohmann::json outputs = nlohmann::json::array(), ignored = nlohmann::json::object();
    // A functional operator whose output storage came out of an earlier operator (and is not one
    // of its inputs) ran no kernel: per-operator AC handed back the first forward's result.
    const auto& schema = frame.op->schema();
    bool functional = !schema.is_mutable();
    for (const auto& ret : schema.returns()) functional = functional && !ret.alias_info();
    bool replay = false;
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& value : fn.outputs()) {
      add_values(outputs, ignored, value, "", false);
      const auto* s = storage_of(value);
      if (s == nullptr || frame.input_storages.count(s)) continue;
      if (functional && seen_.count(s)) replay = true;
      seen_.emplace(s, value.toTensor().storage().getWeakStorageImpl());
    }
    if (replay) {
      ++replayed_;
      return;
    }
    frame.event["outputs"] = std::move(outputs);
    out_ << frame.event.dump() << '\n';
    ++lines_;
  }

 private:
  struct Frame {
    bool inside_atom;  ///< this call or one around it is a recorded operator
    bool atom;         ///< this call is a recorded operator
    std::optional<c10::OperatorHandle> op;
    nlohmann::json event;
    std::unordered_set<const c10::StorageImpl*> input_storages;
  };
  static std::vector<Frame>& stack() {
    thread_local std::vector<Frame> frames;
    return frames;
  }
  std::ofstream out_;
  bool titan_ops_in_aten_;
  std::string phase_ = "forward";
  std::mutex mutex_;
  // Weak references keep each recorded storage's address from being reused during the trace.
  std::unordered_map<const c10::StorageImpl*, c10::weak_intrusive_ptr<c10::StorageImpl>> seen_;
  int64_t lines_ = 0, replayed_ = 0;
};

Recorder* recorder = nullptr;  // the one trace of this process, for the RecordFunction callbacks

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  recorder->start(fn);
  return nullptr;
}
void on_end(const at::RecordFunction& fn, at::ObserverContext*) { recorder->end(fn); }

double double_arg(int argc, char** argv, const char* name, double fallback) {
  const auto text = titan_bench::text_arg(argc, argv, name, "");
  return text.empty() ? fallback : std::stod(text);
}

int run(int argc, char** argv) {
  using titan_bench::int_arg;
  using titan_bench::text_arg;
  const std::string out = text_arg(argc, argv, "--out", "titan.jsonl");
  const std::string dtype = text_arg(argc, argv, "--dtype", "bfloat16");
  const std::string ac = text_arg(argc, argv, "--ac", "op");
  const std::string titan_kernels = text_arg(argc, argv, "--titan-kernels", "aten");
  TORCH_CHECK(titan_kernels == "aten" || titan_kernels == "cuda", "bench_gpu_cost_trace: --titan-kernels '",
              titan_kernels, "' is not 'aten' (titan's fused operators as their ATen implementation, the default ",
              "build) or 'cuda' (each one kernel: a build with TITAN_CUDA_KERNELS)");
  const std::string float8 = text_arg(argc, argv, "--float8", "none");  // or a float8.recipe_name
  const int64_t seq = int_arg(argc, argv, "--seq-len", 8192), batch = int_arg(argc, argv, "--local-batch", 1);
  auto args = ModelArgs()
                  .dim(int_arg(argc, argv, "--dim", 2048))
                  .n_layers(int_arg(argc, argv, "--n-layers", 16))
                  .n_heads(int_arg(argc, argv, "--n-heads", 32))
                  .n_kv_heads(int_arg(argc, argv, "--n-kv-heads", 8))
                  .multiple_of(int_arg(argc, argv, "--multiple-of", 256))
                  .ffn_dim_multiplier(double_arg(argc, argv, "--ffn-dim-multiplier", 1.5))
                  .vocab_size(int_arg(argc, argv, "--vocab-size", 128256))
                  .rope_theta(double_arg(argc, argv, "--rope-theta", 500000.0))
                  .max_seq_len(seq)
                  .fused_projections(int_arg(argc, argv, "--fused-projections", 0) != 0)  // model.fused_projections
                  .head_dim(int_arg(argc, argv, "--head-dim", 0))
                  .qk_norm(int_arg(argc, argv, "--qk-norm", 0) != 0);
  // A mixture-of-experts model (the qwen3_moe family's blocks with --qk-norm 1): every block's
  // feed-forward routed top-k of E experts, softmax renormalised, balanced by the expert bias
  // (the trainer's moe.load_balance_coeff, torchtitan's default 1e-3).
  const int64_t experts = int_arg(argc, argv, "--moe-experts", 0);
  const double load_balance = 1e-3;
  if (experts > 0)
    args.moe_hidden_dim(int_arg(argc, argv, "--moe-hidden", 64))
        .moe(titan::MoeOptions().num_experts(experts).top_k(int_arg(argc, argv, "--moe-top-k", 2)).expert_bias(true));

  // The trainer's configuration for this run (as bench/side_by_side's titan row sets it).
  TrainConfig config;
  std::vector<std::pair<std::string, std::string>> overrides = {
      {"training.seq_len", std::to_string(seq)},
      {"training.batch_size", std::to_string(batch)},
      {"training.mixed_precision_param", dtype},
      {"training.mixed_precision_reduce", "float32"},
      {"training.fused_kernels", titan_kernels},  // "cuda": one-rank FSDP keeps the bf16 copy (adamw_copy_)
      {"activation_checkpoint.mode", ac == "none" || ac == "full" ? ac : "selective"},
      {"activation_checkpoint.selective_ac_option", ac == "none" || ac == "full" ? "2" : ac}};
  if (float8 != "none") overrides.insert(overrides.end(), {{"float8.enable", "true"}, {"float8.recipe_name", float8}});
  for (const auto& [key, value] : overrides) apply_override(config, key, value, "command line");
  validate(config, "command line");

  auto world = titan::init_distributed(titan::DistOptions().device("meta"));
  TORCH_CHECK(world->world_size() == 1, "bench_gpu_cost_trace: run it as one process (the trace is one GPU's step)");
  const auto dims = ParallelDims::from_config(config.parallelism, 1);
  const auto mesh = dims.build_mesh(world);
  Transformer model(args, torch::kMeta);  // stays on meta: nothing is allocated or computed
  parallelize_llama(*model, mesh, dims, config);
  auto optimizer = make_adamw(model->named_parameters(), adamw_config(config));
  optimizer->write_compute_copies(titan::fsdp_units(model));  // as the trainer does
  const auto meta_long = torch::TensorOptions().dtype(torch::kLong).device(torch::kMeta);
  auto input = torch::empty({batch, seq}, meta_long), labels = torch::empty({batch, seq}, meta_long);

  Recorder trace(out, titan_kernels == "aten");
  auto step = [&](Recorder* r) {
    if (r) r->set_phase("forward");
    optimizer->zero_grad();
    auto logits = titan::call(model, input);  // [B, S, V]
    // The trainer's token_loss_sum (no loss parallel on one GPU) and train_step.
    const double scale = 1.0 / static_cast<double>(batch * seq);
    auto loss = titan::cross_entropy(
        logits, labels, titan::CrossEntropyOptions().reduction(at::Reduction::Sum).grad_scale(scale));
    if (r) r->set_phase("backward");
    (loss * scale).backward();
    if (r) r->set_phase("optimizer");
    auto norm = titan::grad_norm(model, world->group());
    optimizer->scale_grads(titan::clip_coefficient(norm, config.training.max_norm));
    optimizer->skip_if(norm.isfinite().logical_not().to(torch::kFloat).reshape({1}));
    optimizer->step();
    if (experts > 0) titan::update_expert_bias(model, world->group(), load_balance);  // the trainer's, after the step
  };
  step(nullptr);  // creates the optimizer state, FSDP's lazy setup
  recorder = &trace;
  auto handle = at::addGlobalCallback(
      at::RecordFunctionCallback(&on_start, &on_end).needsInputs(true).needsOutputs(true));
  step(&trace);
  at::removeCallback(handle);
  recorder = nullptr;
  std::cout << "bench_gpu_cost_trace: " << trace.lines() << " operator calls (" << trace.replayed()
            << " handed back by per-operator AC) of one step of titan at dim " << args.dim() << ", "
            << args.n_layers() << " layers, seq " << seq << ", " << dtype << ", AC " << ac
            << (args.fused_projections() ? ", fused projections" : "")
            << (float8 != "none" ? ", float8 " + float8 : "")
            << (experts > 0 ? ", " + std::to_string(experts) + " experts top-" + std::to_string(args.moe().top_k())
                            : "")
            << " -> " << out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "bench_gpu_cost_trace: " << e.what() << "\n";
    return 1;
  }
}
