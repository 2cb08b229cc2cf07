// titan/hooks.hpp: titan::call runs attached hooks around forward, outermost last attached, for
// forwards returning a tensor or a tuple of them. The modules and inputs live on
// titan_test::device().
#include "../support/multirank.hpp"

#include <titan/hooks.hpp>
#include <titan/meta.hpp>

namespace {

using titan_test::device;

struct AffineImpl : torch::nn::Module {
  AffineImpl() { weight = register_parameter("weight", torch::full({3}, 2.0)); }
  torch::Tensor forward(const torch::Tensor& x, double shift, const torch::Tensor& y) { return x * weight + shift + y; }
  torch::Tensor weight;
};
TORCH_MODULE(Affine);

/// Records its calls and scales the first input before forward.
struct ScaleInput : titan::ModuleHook {
  ScaleInput(double factor, std::vector<std::string>* log) : factor(factor), log(log) {}
  std::string name() const override { return "scale"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    log->push_back("enter " + std::to_string(factor));
    auto changed = inputs;
    changed[0] = changed[0] * factor;
    auto out = next(changed);
    log->push_back("leave " + std::to_string(factor));
    return out;
  }
  double factor;
  std::vector<std::string>* log;
};

/// A module returning two tensors: (x + y, x * weight) with a non-tensor argument between them.
struct TwoOutputsImpl : torch::nn::Module {
  TwoOutputsImpl() { weight = register_parameter("weight", torch::full({3}, 2.0)); }
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x, double shift, const torch::Tensor& y) {
    return {x + y + shift, x * weight};
  }
  torch::Tensor weight;
};
TORCH_MODULE(TwoOutputs);

/// Scales every input before the forward and every output after it, for modules returning several.
struct ScaleAll : titan::ModuleHook {
  std::string name() const override { return "scale all"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    return next(inputs);
  }
  titan::TensorList forward_outputs(torch::nn::Module&, const titan::TensorList& inputs,
                                    const titan::OutputsForwardFn& next) override {
    titan::TensorList scaled;
    for (const auto& t : inputs) scaled.push_back(t * 10);
    auto outputs = next(scaled);
    for (auto& t : outputs) t = t + 1;
    return outputs;
  }
};

}  // namespace

TEST_CASE("titan::call without hooks is forward") {
  Affine affine;
  affine->to(device());
  auto x = torch::ones({3}, device()), y = torch::full({3}, 0.5, device());
  CHECK(torch::equal(titan::call(affine, x, 1.0, y), affine->forward(x, 1.0, y)));
  CHECK(titan::hooks_of(*affine).empty());
}

TEST_CASE("titan::call nests hooks, the last attached outermost, and binds non-tensor arguments") {
  Affine affine;
  affine->to(device());
  std::vector<std::string> log;
  titan::attach_hook(*affine, std::make_shared<ScaleInput>(3.0, &log));
  titan::attach_hook(*affine, std::make_shared<ScaleInput>(10.0, &log));
  auto x = torch::ones({3}, device()), y = torch::full({3}, 0.5, device());
  auto out = titan::call(affine, x, 1.0, y);
  CHECK(out.device() == device());
  CHECK(torch::allclose(out, torch::full({3}, 1.0 * 10 * 3 * 2 + 1.0 + 0.5, device())));
  CHECK(log == std::vector<std::string>{"enter 10.000000", "enter 3.000000", "leave 3.000000", "leave 10.000000"});
  CHECK(titan::hooks_of(*affine).size() == 2);
  CHECK(titan::find_hook<ScaleInput>(*affine)->factor == 3.0);
  // The hook slot holds no parameters: the module's parameters and their names are unchanged.
  CHECK(affine->named_parameters().size() == 1);
  CHECK(affine->named_parameters().contains("weight"));
  // A shared_ptr and a raw pointer work too.
  std::shared_ptr<AffineImpl> shared = affine.ptr();
  CHECK(torch::equal(titan::call(shared, x, 1.0, y), out));
  CHECK(torch::equal(titan::call(affine.get(), x, 1.0, y), out));
}

TEST_CASE("titan::call runs a module returning a tuple of tensors through hooks that support it") {
  TwoOutputs pair;
  pair->to(device());
  auto x = torch::ones({3}, device()), y = torch::full({3}, 0.5, device());
  auto [plain_sum, plain_product] = titan::call(pair, x, 1.0, y);  // no hooks: forward itself
  CHECK(torch::equal(plain_sum, torch::full({3}, 2.5, device())));
  CHECK(torch::equal(plain_product, torch::full({3}, 2.0, device())));
  titan::attach_hook(*pair, std::make_shared<ScaleAll>());
  auto [sum, product] = titan::call(pair, x, 1.0, y);  // inputs x10, outputs +1
  CHECK(torch::equal(sum, torch::full({3}, 10.0 + 5.0 + 1.0 + 1.0, device())));
  CHECK(torch::equal(product, torch::full({3}, 10.0 * 2.0 + 1.0, device())));
  // A hook written for one output refuses such a module, naming itself.
  std::vector<std::string> log;
  titan::attach_hook(*pair, std::make_shared<ScaleInput>(3.0, &log));
  CHECK(titan_test::error_of([&] { titan::call(pair, x, 1.0, y); })
            .find("'scale' is attached to a module whose forward returns several tensors") != std::string::npos);
  CHECK(log.empty());
}

TEST_CASE("to_empty materialises meta parameters and buffers in place, keeping every handle") {
  struct NetImpl : torch::nn::Module {
    NetImpl() {
      auto meta = torch::TensorOptions().device(torch::kMeta);
      weight = register_parameter("weight", torch::empty({4, 3}, meta));
      scale = register_buffer("scale", torch::empty({3}, meta));
    }
    torch::Tensor forward(const torch::Tensor& x) { return torch::matmul(x * scale, weight.t()); }
    torch::Tensor weight, scale;
  };
  auto net = std::make_shared<NetImpl>();
  CHECK(net->weight.is_meta());
  titan::to_empty(*net, device());
  CHECK(net->weight.device() == device());
  CHECK(net->named_parameters()["weight"].device() == device());
  CHECK(net->scale.device() == device());
  CHECK(net->weight.requires_grad());
  {
    torch::NoGradGuard no_grad;
    net->named_parameters()["weight"].fill_(2.0);  // writes through the dictionary handle...
    net->named_buffers()["scale"].fill_(1.0);
  }
  auto x = torch::ones({2, 3}, device());
  auto y = titan::call(net, x);  // ...and forward reads the member handle: the same tensor
  CHECK(torch::allclose(y, torch::full({2, 4}, 6.0, device())));
  y.sum().backward();
  CHECK(torch::allclose(net->weight.grad(), torch::full({4, 3}, 2.0, device())));
}

namespace {

/// A hook that only records that it ran, with a model-wide check counting its calls.
struct Marker : titan::ModuleHook {
  std::string name() const override { return "marker"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    return next(inputs);
  }
  void verify_model(const torch::nn::Module&) const override { ++verified; }
  mutable int verified = 0;
};

/// parent(x) = b(a(x)); `direct` calls b with ->forward instead of titan::call.
struct PairImpl : torch::nn::Module {
  explicit PairImpl(bool direct = false) : direct(direct) {
    a = register_module("a", torch::nn::Linear(3, 3));
    b = register_module("b", torch::nn::Linear(3, 3));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = titan::call(a, x);
    return direct ? b->forward(h) : titan::call(b, h);
  }
  bool direct;
  torch::nn::Linear a{nullptr}, b{nullptr};
};
TORCH_MODULE(Pair);

}  // namespace

TEST_CASE("titan::call reports a hooked module its parent called with ->forward, when the outermost call returns") {
  Pair pair(/*direct=*/true);
  pair->to(device());
  titan::attach_hook(pair->a, std::make_shared<Marker>());
  titan::attach_hook(pair->b, std::make_shared<Marker>());
  const auto x = torch::ones({2, 3}, device());
  CHECK_THROWS_WITH(titan::call(pair, x),
                    doctest::Contains("'b' has marker attached but was not called through titan::call during the "
                                      "forward of '(anonymous namespace)::PairImpl'"));
  // Called properly, nothing is reported, also when the root itself has no hook.
  Pair good;
  good->to(device());
  titan::attach_hook(good->a, std::make_shared<Marker>());
  titan::attach_hook(good->b, std::make_shared<Marker>());
  CHECK_NOTHROW(titan::call(good, x));
  // A nested titan::call does not check on its own: only the outermost does, once.
  CHECK_NOTHROW(titan::call(good->a, x));
}

TEST_CASE("titan::call explains an error from ATen by the hooked modules not yet called through titan::call") {
  Pair pair(/*direct=*/true);  // b runs as b->forward(...)
  pair->to(device());
  titan::attach_hook(pair->b, std::make_shared<Marker>());
  {
    torch::NoGradGuard no_grad;
    pair->b->weight.set_data(torch::ones({3, 2}, device()));  // b's weight as a rowwise shard would leave it
  }
  const auto message = titan_test::error_of([&] { titan::call(pair, torch::ones({2, 3}, device())); });
  CHECK(message.find("mat1 and mat2 shapes cannot be multiplied") != std::string::npos);  // ATen's, kept
  CHECK(message.find("where 'b' has marker attached but was not called through titan::call before it") !=
        std::string::npos);
}

namespace {
/// A marker of a given parallelism kind (for the order rule).
struct KindMarker : Marker {
  explicit KindMarker(titan::HookKind k) : k(k) {}
  titan::HookKind kind() const override { return k; }
  titan::HookKind k;
};
}  // namespace

TEST_CASE("hooks compose in one order: a hook attached where a later kind already is fails, naming both") {
  using titan::HookKind;
  Pair pair;
  titan::attach_hook(pair->b, std::make_shared<KindMarker>(HookKind::FullyShard));
  CHECK(titan_test::error_of([&] { titan::attach_hook(*pair, std::make_shared<KindMarker>(HookKind::TensorParallel)); })
            .find("titan::attach_hook: 'b' already has marker attached. Apply tensor and expert parallelism first: "
                  "titan's parallelisms compose in one order, convert_to_float8_training, then parallelize_module "
                  "and apply_expert_parallel, then checkpoint_wrapper, then fully_shard") != std::string::npos);
  CHECK(titan_test::error_of([&] {
          titan::attach_hook(pair->b, std::make_shared<KindMarker>(HookKind::ActivationCheckpoint));
        }).find("'<root>' already has marker attached. Apply activation checkpointing first") != std::string::npos);
  CHECK(titan::hooks_of(pair->b).size() == 1);  // refused: nothing attached
  // The same kind, a later kind, and unordered hooks attach.
  CHECK_NOTHROW(titan::attach_hook(pair->b, std::make_shared<KindMarker>(HookKind::FullyShard)));
  CHECK_NOTHROW(titan::attach_hook(pair->a, std::make_shared<KindMarker>(HookKind::Conversion)));
  CHECK_NOTHROW(titan::attach_hook(pair->a, std::make_shared<KindMarker>(HookKind::FullyShard)));
  CHECK_NOTHROW(titan::attach_hook(*pair, std::make_shared<Marker>()));
}

TEST_CASE("titan::verify_calls: hooked modules never called while others were, and the hooks' model checks") {
  Pair pair(/*direct=*/true);
  pair->to(device());
  auto a = std::make_shared<Marker>(), b = std::make_shared<Marker>();
  titan::attach_hook(pair->a, a);
  titan::attach_hook(pair->b, b);
  CHECK_NOTHROW(titan::verify_calls(pair));  // nothing ran yet: only the model checks
  CHECK(a->verified + b->verified == 1);       // once per hook type
  pair->forward(torch::ones({2, 3}, device()));  // the root called directly: a runs through titan::call, b not
  CHECK_THROWS_WITH(titan::verify_calls(pair),
                    doctest::Contains("'b' has marker attached but was never called through titan::call"));
  pair->direct = false;
  pair->forward(torch::ones({2, 3}, device()));
  CHECK_NOTHROW(titan::verify_calls(pair));
}

TEST_CASE("titan::call runs the model-wide checks of hooks that ran for the first time, against the outermost module") {
  Pair pair;
  pair->to(device());
  auto a = std::make_shared<Marker>(), b = std::make_shared<Marker>();
  titan::attach_hook(pair->a, a);
  titan::attach_hook(pair->b, b);
  const auto x = torch::ones({2, 3}, device());
  titan::call(pair, x);
  CHECK(a->verified + b->verified == 1);  // once per hook type
  titan::call(pair, x);
  CHECK(a->verified + b->verified == 1);  // not again
  auto later = std::make_shared<Marker>();
  titan::attach_hook(pair->b, later);  // a hook attached afterwards: checked at its module's next call
  titan::call(pair, x);
  CHECK(a->verified + b->verified + later->verified == 2);
}

TEST_CASE("hooks_of, find_hook and attach_hook accept module holders") {
  Affine affine;
  auto hook = std::make_shared<Marker>();
  titan::attach_hook(affine, hook);
  CHECK(titan::hooks_of(affine).size() == 1);
  CHECK(titan::find_hook<Marker>(affine) == hook);
  CHECK(titan::find_hook<Marker>(affine.ptr()) == hook);
  CHECK(titan::find_hook<ScaleInput>(affine) == nullptr);
}

TEST_CASE("modules_matching: one name component per '*', the root as \"\", never a hook slot") {
  using titan::detail::match_module_name;
  CHECK(match_module_name("layers.*.attention.wq", "layers.0.attention.wq"));
  CHECK(match_module_name("layers.*.attention.wq", "layers.11.attention.wq"));
  CHECK_FALSE(match_module_name("layers.*.attention.wq", "layers.0.attention.wk"));
  CHECK_FALSE(match_module_name("layers.*", "layers.0.attention"));
  CHECK(match_module_name("layers.*.feed_forward.w*", "layers.3.feed_forward.w13"));
  CHECK(match_module_name("", ""));
  CHECK_FALSE(match_module_name("", "output"));

  auto root = std::make_shared<torch::nn::Module>();
  auto layers = root->register_module("layers", std::make_shared<torch::nn::Module>());
  for (const char* name : {"0", "1"}) {
    auto layer = layers->register_module(name, std::make_shared<torch::nn::Module>());
    layer->register_module("wq", torch::nn::Linear(2, 2));
    layer->register_module("w1", torch::nn::Linear(2, 2));
  }
  titan::attach_hook(*layers->children()[0], std::make_shared<ScaleInput>(2.0, nullptr));  // a hook slot in layers.0
  auto names = [&](const std::string& pattern) {
    std::vector<std::string> found;
    for (const auto& [name, module] : titan::modules_matching(*root, pattern)) found.push_back(name);
    return found;
  };
  CHECK(names("layers.*.wq") == std::vector<std::string>{"layers.0.wq", "layers.1.wq"});
  CHECK(names("layers.0.*") == std::vector<std::string>{"layers.0.wq", "layers.0.w1"});  // not _titan_hooks
  CHECK(names("") == std::vector<std::string>{""});
  CHECK(names("layers.*.w2").empty());
  CHECK(titan::detail::module_names_like(*root, "layers.*.w2").find("'layers.0.wq', 'layers.0.w1'") != std::string::npos);
}

namespace {

/// Scales the first input by `factor` and hands on the output as computed; fuses with another
/// FusableScale of the same factor (as tensor-parallel colwise fuses with colwise).
struct FusableScale : titan::ModuleHook {
  explicit FusableScale(double factor, bool change_output = false) : factor(factor), change_output(change_output) {}
  std::string name() const override { return "fusable scale"; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn& next) override {
    ++calls;
    auto changed = inputs;
    changed[0] = changed[0] * factor;
    auto out = next(changed);
    return change_output ? out + 1 : out;
  }
  bool fuses_with(const titan::ModuleHook& other) const override {
    const auto* same = dynamic_cast<const FusableScale*>(&other);
    return same && same->factor == factor;
  }
  double factor;
  bool change_output;
  int calls = 0;
};

/// A conversion hook (it replaces the module's forward) that fuses but cannot compute several
/// modules at once: ModuleHook::forward_fused's default.
struct FusableConversion : titan::ModuleHook {
  std::string name() const override { return "fusable conversion"; }
  titan::HookKind kind() const override { return titan::HookKind::Conversion; }
  at::Tensor forward(torch::nn::Module&, const titan::TensorList& inputs, const titan::ForwardFn&) override {
    return inputs[0];
  }
  bool fuses_with(const titan::ModuleHook& other) const override {
    return dynamic_cast<const FusableConversion*>(&other) != nullptr;
  }
};

/// parent(x) = [a(x) | b(x)], computed by one fused forward through titan::call_fused.
struct FusedPairImpl : torch::nn::Module {
  FusedPairImpl() {
    a = register_module("a", torch::nn::Linear(torch::nn::LinearOptions(3, 2).bias(false)));
    b = register_module("b", torch::nn::Linear(torch::nn::LinearOptions(3, 4).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const auto parts = titan::call_fused({a.get(), b.get()}, {x}, [this](const titan::TensorList& inputs) {
      ++fused_calls;
      const auto y = torch::nn::functional::linear(inputs[0], torch::cat({a->weight, b->weight}));  // [N, 6]
      return titan::TensorList{y.narrow(-1, 0, 2), y.narrow(-1, 2, 4)};
    });
    return torch::cat(parts, -1);  // [N, 6]
  }
  int fused_calls = 0;
  torch::nn::Linear a{nullptr}, b{nullptr};
};
TORCH_MODULE(FusedPair);

}  // namespace

TEST_CASE("titan::call_fused runs one forward for the modules, the first one's fusable hooks once around it") {
  const auto x = torch::randn({5, 3}, device());  // [5, 3]
  FusedPair plain;
  plain->to(device());
  const auto want = torch::cat({titan::call(plain->a, x), titan::call(plain->b, x)}, -1);  // [5, 6]
  CHECK(titan_test::max_abs_diff(titan::call(plain, x), want) < 1e-6);  // one GEMM against two
  CHECK(plain->fused_calls == 1);

  FusedPair hooked;
  hooked->to(device());
  {
    torch::NoGradGuard no_grad;
    hooked->a->weight.copy_(plain->a->weight);
    hooked->b->weight.copy_(plain->b->weight);
  }
  auto hook_a = std::make_shared<FusableScale>(2.0), hook_b = std::make_shared<FusableScale>(2.0);
  titan::attach_hook(hooked->a, hook_a);
  titan::attach_hook(hooked->b, hook_b);
  const auto scaled = torch::cat({titan::call(plain->a, x * 2), titan::call(plain->b, x * 2)}, -1);  // [5, 6]
  CHECK(titan_test::max_abs_diff(titan::call(hooked, x), scaled) < 1e-6);
  CHECK(hook_a->calls == 1);  // the first module's hook prepared the shared input once
  CHECK(hook_b->calls == 0);
  CHECK_NOTHROW(titan::verify_calls(hooked));  // both modules count as called
}

TEST_CASE("titan::call_fused: hooks that do not fuse, uneven hooks and a changed output are errors") {
  const auto x = torch::randn({5, 3}, device());
  auto attach = [](const std::shared_ptr<titan::ModuleHook>& on_a, const std::shared_ptr<titan::ModuleHook>& on_b) {
    FusedPair pair;
    pair->to(device());
    if (on_a) titan::attach_hook(pair->a, on_a);
    if (on_b) titan::attach_hook(pair->b, on_b);
    return pair;
  };
  CHECK_THROWS_WITH(titan::call(attach(std::make_shared<FusableScale>(2.0), std::make_shared<FusableScale>(3.0)), x),
                    doctest::Contains("'fusable scale' attached to module 0 (torch::nn::LinearImpl) does not fuse with "
                                      "'fusable scale' attached to module 1"));
  CHECK_THROWS_WITH(titan::call(attach(std::make_shared<Marker>(), std::make_shared<Marker>()), x),
                    doctest::Contains("'marker' attached to module 0 (torch::nn::LinearImpl) does not fuse"));
  CHECK_THROWS_WITH(titan::call(attach(std::make_shared<FusableScale>(2.0), nullptr), x),
                    doctest::Contains("module 1 (torch::nn::LinearImpl) has 0 hooks attached but module 0 "
                                      "(torch::nn::LinearImpl) has 1"));
  CHECK_THROWS_WITH(
      titan::call(attach(std::make_shared<FusableScale>(2.0, true), std::make_shared<FusableScale>(2.0, true)), x),
      doctest::Contains("'fusable scale' attached to module 0 (torch::nn::LinearImpl) changed the fused forward's "
                        "output, which its fuses_with promised not to do"));
  // A conversion innermost computes the fused modules itself (float8 linear layers), or says it cannot.
  CHECK_THROWS_WITH(titan::call(attach(std::make_shared<FusableConversion>(), std::make_shared<FusableConversion>()), x),
                    doctest::Contains("'fusable conversion' replaces the forward of 2 fused modules but cannot "
                                      "compute them at once; call the modules one by one with titan::call"));
}
