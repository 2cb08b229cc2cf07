// bench_float8: what float8 linear layers cost in accuracy and gain in time on this machine.
// For each shape (tokens M, in K, out N) and each recipe, one linear layer's forward and backward
// on the same random x [M, K] (a few outlier features, as activations have), W [N, K], dy [M, N]:
//   - the signal-to-quantization-noise ratio (dB, higher is better; torchao's compute_error) of
//     y, dx and dW against the same products in float64;
//   - the median time of forward + backward, and its ratio to the unconverted layer in the
//     high-precision dtype (bf16 on CUDA, fp32 on the CPU).
// On the CPU the times say nothing about float8 hardware (_scaled_mm runs a reference kernel, and
// the rowwise recipes are emulated): there the table is for correctness only. On a Hopper GPU the
// ratio is the float8 speed-up of the layer.
//
//   bench_float8 [--device cpu|cuda] [--shapes 1024x1024x1024,4096x4096x4096] [--steps 5]
#include <titan/float8.hpp>
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "bench_args.hpp"
#include "bench_measure.hpp"

namespace {

using titan_bench::int_arg;
using titan_bench::median_ms;
using titan_bench::text_arg;

/// 20 log10(|reference| / |reference - value|) (torchao's compute_error).
double sqnr_db(const torch::Tensor& reference, const torch::Tensor& value) {
  auto r = reference.to(torch::kDouble).cpu(), v = value.to(torch::kDouble).cpu();
  return 20.0 * std::log10(r.norm().item<double>() / (r - v).norm().item<double>());
}

struct Shape {
  int64_t m, k, n;
};

std::vector<Shape> parse_shapes(const std::string& text) {
  std::vector<Shape> shapes;
  std::stringstream list(text);
  for (std::string item; std::getline(list, item, ',');) {
    Shape s{};
    TORCH_CHECK(std::sscanf(item.c_str(), "%ldx%ldx%ld", &s.m, &s.k, &s.n) == 3, "bench_float8: --shapes item '", item,
                "' is not MxKxN");
    shapes.push_back(s);
  }
  return shapes;
}

}  // namespace

int main(int argc, char** argv) {
  const torch::Device device(text_arg(argc, argv, "--device", "cpu"));
  const auto shapes = parse_shapes(text_arg(argc, argv, "--shapes", device.is_cuda() ? "4096x4096x4096,8192x4096x14336"
                                                                                     : "256x512x512,1024x1024x1024"));
  const int steps = static_cast<int>(int_arg(argc, argv, "--steps", 5));
  const auto dtype = device.is_cuda() ? torch::kBFloat16 : torch::kFloat32;
  std::printf("bench_float8 on %s, high precision %s%s\n", device.str().c_str(), c10::toString(dtype),
              device.is_cpu() ? " (CPU: errors only; the times are not float8 hardware)" : "");
  std::printf("%-22s %-20s %9s %9s %9s %11s %9s\n", "shape MxKxN", "recipe", "y dB", "dx dB", "dW dB", "fwd+bwd ms",
              "vs plain");
  for (const auto& s : shapes) {
    torch::manual_seed(0);
    auto x = torch::randn({s.m, s.k});
    x.narrow(1, 0, 4).mul_(30);  // outlier features
    auto w = torch::randn({s.n, s.k}) / std::sqrt(static_cast<double>(s.k));
    auto dy = torch::randn({s.m, s.n}) * 1e-2;
    auto x64 = x.to(torch::kDouble), w64 = w.to(torch::kDouble), dy64 = dy.to(torch::kDouble);
    auto y64 = x64.mm(w64.t()), dx64 = dy64.mm(w64), dw64 = dy64.t().mm(x64);
    const std::string label = std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
    double plain_ms = 0;
    for (int variant = -1; variant < 3; ++variant) {  // -1: the unconverted layer
      torch::nn::Linear layer(torch::nn::LinearOptions(s.k, s.n).bias(false));
      {
        torch::NoGradGuard no_grad;
        layer->weight.copy_(w);
      }
      layer->to(device, dtype);
      std::string name = "plain";
      if (variant >= 0) {
        const auto recipe = static_cast<titan::Float8Recipe>(variant);
        name = titan::float8_recipe_name(recipe);
        titan::convert_to_float8_training(layer, titan::Float8Options().recipe(recipe));
      }
      auto xd = x.to(device, dtype).requires_grad_(true), dyd = dy.to(device, dtype);
      torch::Tensor y;
      const double ms = median_ms(
          device, steps,
          [&] {
            y = titan::call(layer, xd);
            y.backward(dyd);
          },
          [&] {
            xd.mutable_grad() = torch::Tensor();
            layer->weight.mutable_grad() = torch::Tensor();
          });
      if (variant < 0) plain_ms = ms;
      std::printf("%-22s %-20s %9.1f %9.1f %9.1f %11.2f %8.2fx\n", label.c_str(), name.c_str(), sqnr_db(y64, y),
                  sqnr_db(dx64, xd.grad()), sqnr_db(dw64, layer->weight.grad()), ms, plain_ms / ms);
    }
  }
  return 0;
}
