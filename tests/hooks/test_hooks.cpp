// titan/hooks.hpp: titan::call runs attached hooks around forward, outermost last attached.
#include "../support/multirank.hpp"

#include <titan/hooks.hpp>
#include <titan/meta.hpp>

namespace {

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

}  // namespace

TEST_CASE("titan::call without hooks is forward") {
  Affine affine;
  auto x = torch::ones({3}), y = torch::full({3}, 0.5);
  CHECK(torch::equal(titan::call(affine, x, 1.0, y), affine->forward(x, 1.0, y)));
  CHECK(titan::hooks_of(*affine).empty());
}

TEST_CASE("titan::call nests hooks, the last attached outermost, and binds non-tensor arguments") {
  Affine affine;
  std::vector<std::string> log;
  titan::attach_hook(*affine, std::make_shared<ScaleInput>(3.0, &log));
  titan::attach_hook(*affine, std::make_shared<ScaleInput>(10.0, &log));
  auto x = torch::ones({3}), y = torch::full({3}, 0.5);
  auto out = titan::call(affine, x, 1.0, y);
  CHECK(torch::allclose(out, torch::full({3}, 1.0 * 10 * 3 * 2 + 1.0 + 0.5)));
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
  titan::to_empty(*net, torch::kCPU);
  CHECK(net->weight.device().is_cpu());
  CHECK(net->named_parameters()["weight"].device().is_cpu());
  CHECK(net->scale.device().is_cpu());
  CHECK(net->weight.requires_grad());
  {
    torch::NoGradGuard no_grad;
    net->named_parameters()["weight"].fill_(2.0);  // writes through the dictionary handle...
    net->named_buffers()["scale"].fill_(1.0);
  }
  auto x = torch::ones({2, 3});
  auto y = titan::call(net, x);  // ...and forward reads the member handle: the same tensor
  CHECK(torch::allclose(y, torch::full({2, 4}, 6.0)));
  y.sum().backward();
  CHECK(torch::allclose(net->weight.grad(), torch::full({4, 3}, 2.0)));
}
