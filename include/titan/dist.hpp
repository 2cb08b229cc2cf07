#pragma once
// titan/dist.hpp: the distributed runtime.
//
//   auto world = titan::init_distributed();                  // torchrun, Slurm, Open MPI or one process
//   titan::DeviceMesh mesh(world, {"dp_shard", "tp"}, {2, 2});
//   auto y = titan::all_gather(x, mesh.group("dp_shard"));   // differentiable
//
// Everything here is an object the caller owns: no hidden globals.

#include <titan/world.hpp>
#include <titan/mesh.hpp>
#include <titan/collectives.hpp>
