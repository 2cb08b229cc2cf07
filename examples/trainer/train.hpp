#pragma once
// The training loop shared by the example trainers (examples/llama, examples/mistral).
//
//   int main(int argc, char** argv) { return titan::examples::train_main(argc, argv, {"llama2", "llama3", "llama3.1"}); }
//
// Reads `--config file.toml` plus `--section.key value` overrides, joins the job (torchrun, Slurm,
// mpirun or one process), builds the model on the meta device, parallelizes it (TP, AC, FSDP),
// materializes and initializes the local shards, then trains: gradient accumulation, clipping,
// the LR schedule, validation, metrics (line, metrics.jsonl, TensorBoard), NaN/Inf guard, SIGINT /
// SIGTERM stop at a step boundary, and distributed checkpoints (auto-resume, interval saves, the
// final export).

#include <string>
#include <vector>

namespace titan::examples {

/// Runs a training job; returns the process exit code (0 on success, 2 for a bad config, 1 on
/// other errors). `families` are the model.name values this trainer accepts.
int train_main(int argc, char** argv, const std::vector<std::string>& families);

}  // namespace titan::examples
