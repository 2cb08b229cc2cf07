// titan/checkpoint.hpp with titan/fsdp.hpp: a real FSDP model saves and resumes bitwise, its
// parameters and AdamW state carrying FSDP's layouts. Runs on 1, 2 and 4 ranks (titan.ranksN), on
// titan_test::device() (the world's, which titan_ckpt::Net is built on).
#include "../support/multirank.hpp"
#include "../support/checkpoint_fixtures.hpp"

#include <titan/checkpoint.hpp>
#include <titan/fsdp.hpp>

namespace {

using titan_ckpt::Net;
using titan_test::world;

std::vector<float> train(Net& model, torch::optim::Optimizer& optimizer, int first, int last) {
  return titan_ckpt::train_net(model, optimizer, first, last, world()->rank());
}

}  // namespace

TEST_CASE("checkpoint: an FSDP model with AdamW resumes bitwise into a fresh model") {
  titan::DeviceMesh mesh(world(), {"dp_shard"}, {world()->world_size()});
  auto options = torch::optim::AdamWOptions(0.01).weight_decay(0.05);
  Net straight(mesh, 1);
  torch::optim::AdamW straight_optimizer(straight->parameters(), options);
  auto expected = train(straight, straight_optimizer, 1, 10);

  auto dir = titan_ckpt::shared_dir(world(), "fsdp_resume");
  std::vector<float> losses;
  {
    Net model(mesh, 1);
    torch::optim::AdamW optimizer(model->parameters(), options);
    losses = train(model, optimizer, 1, 5);
    titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir).async(true));
    titan::TrainState state;
    state.model = model.get();
    state.optimizer = &optimizer;
    manager.save(5, state);
    train(model, optimizer, 6, 7);  // goes on while the staged copy is written; not part of step 5
    manager.wait();
  }
  Net resumed(mesh, 2);
  torch::optim::AdamW optimizer(resumed->parameters(), options);
  titan::CheckpointManager manager(world(), titan::CheckpointOptions(dir));
  titan::TrainState state;
  state.model = resumed.get();
  state.optimizer = &optimizer;
  REQUIRE(manager.load_latest(state) == std::optional<int64_t>(5));
  auto rest = train(resumed, optimizer, 6, 10);
  losses.insert(losses.end(), rest.begin(), rest.end());
  CHECK(losses == expected);
  auto want = straight->named_parameters();
  for (const auto& item : resumed->named_parameters()) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), want[item.key()]));
  }
  auto meta = titan::read_checkpoint_metadata(dir + "/step-5");
  REQUIRE(meta.find("model.blocks.0.fc1.weight") != nullptr);
  CHECK(meta.find("model.blocks.0.fc1.weight")->shape == std::vector<int64_t>{9, 6});
  if (world()->world_size() > 1) {
    CHECK(meta.find("model.blocks.0.fc1.weight")->placement == "Shard(0)@dp_shard");
    CHECK(meta.find("optim.blocks.0.fc1.weight.exp_avg")->placement == "Shard(0)@dp_shard");
  }
}
