#pragma once
// titan/checkpoint.hpp: distributed checkpoints that reshard on load (titan's take on PyTorch DCP).
//
//   titan::CheckpointManager ckpt(world, titan::CheckpointOptions("runs/ckpt").interval(500)
//                                            .keep_latest_k(3).async(true));
//   titan::TrainState state;  state.model = model.get();  state.optimizer = &optimizer;
//   state.add("data", loader);                                  // any titan::Stateful, by name
//   if (auto step = ckpt.load_latest(state)) start = *step;   // resumes on any mesh
//   for (step = start + 1; ...) { train(); ckpt.maybe_save(step, state); }
//   ckpt.wait();
//
// A checkpoint is a directory <folder>/step-<N>/ holding one safetensors file per rank that owns
// data (rank-<r>.safetensors: only that rank's shards, a replicated tensor once) and metadata.json,
// written last by rank 0: per tensor its global shape, dtype, placement and every shard's offsets,
// sizes, file, byte range and CRC-32 per block. A loader computes its own rectangle of each tensor
// (TensorLayout::local_box) and reads only the blocks of the saved shards that overlap it, so a
// checkpoint saved on one mesh loads on any other. docs/checkpoint.md specifies the format.
//
// Safety: files go to <folder>/.tmp-step-<N>/ and are fsynced; after every rank is done rank 0
// writes metadata.json, renames the directory into place and atomically updates <folder>/latest.
// A crash mid-save leaves earlier checkpoints intact. Loading validates every tensor (names,
// shapes, dtypes, files, sizes, checksums) on every rank before it overwrites anything.

#include <titan/checkpoint/stateful.hpp>
#include <titan/checkpoint/format.hpp>
#include <titan/checkpoint/state.hpp>
#include <titan/checkpoint/save.hpp>
#include <titan/checkpoint/load.hpp>
#include <titan/checkpoint/manager.hpp>
