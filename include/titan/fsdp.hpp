#pragma once
// titan/fsdp.hpp: fully sharded data parallelism with per-parameter sharding (PyTorch's FSDP2).
//
//   titan::DeviceMesh mesh(world, {"dp_shard"}, {world->world_size()});
//   for (auto& block : *model->layers) titan::fully_shard(*block, mesh);
//   titan::fully_shard(*model, mesh);            // the root: what no block owns
//   torch::optim::AdamW optimizer(model->parameters(), ...);   // sees the local shards
//   auto loss = loss_fn(titan::call(model, batch));
//   loss.backward();                             // gradients reduce-scattered into the shards
//   optimizer.step();
//
// Each parameter of a unit is split along dim 0 in torch.chunk parts across the "dp_shard" mesh
// dimension (uneven sizes padded internally). The module's parameter dictionary gets the local
// shard (what optimizers, clipping and state dicts see); the member the user's forward reads keeps
// the original TensorImpl as the unsharded parameter, whose storage is all-gathered before the
// unit runs and resized to 0 bytes after (docs/design.md, section 4). Units must be called through
// titan::call. See docs/fsdp.md.

#include <titan/fsdp/options.hpp>      // FsdpOptions
#include <titan/fsdp/param.hpp>        // one parameter: shards, unsharded storage, custom gathers
#include <titan/fsdp/collectives.hpp>  // all-gather / reduce-scatter buffers and copies
#include <titan/fsdp/unit.hpp>         // FsdpHook: a unit's unshard / reshard state machine
#include <titan/fsdp/fully_shard.hpp>  // fully_shard, verify_optimizer, functions over units
