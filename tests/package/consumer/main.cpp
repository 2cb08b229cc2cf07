// A minimal titan user: one process, a mesh of one rank, a differentiable all-gather.
#include <titan/titan.hpp>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto world = titan::init_distributed();
  titan::DeviceMesh mesh(world, {"dp_shard"}, {1});
  auto x = torch::ones({2, 3}, torch::requires_grad());
  auto y = titan::all_gather(x, mesh.group("dp_shard"));
  y.sum().backward();
  bool ok = y.sizes() == x.sizes() && x.grad().sum().item<double>() == 6.0;
  std::cout << (ok ? "consumer ok" : "consumer FAILED") << std::endl;
  return ok ? 0 : 1;
}
