#pragma once
// titan/pipeline.hpp: pipeline parallelism. A model is cut into stages by module names; each rank
// of the pipeline group keeps only its stages' modules (the model's parameter names unchanged),
// and a schedule of forward and backward passes over micro-batches runs the stages, sending
// activations and gradients between neighbouring stages point to point.
//
//   titan::PipelineSplit split = titan::PipelineSplit().first({"tok_embeddings"}).layers("layers")
//                                    .last({"norm", "output"});
//   Transformer model(args, torch::kMeta);
//   titan::keep_pipeline_stage(*model, split, /*num_stages=*/pp, /*stage=*/rank_in_pp);
//   ... parallelize (TP, AC, FSDP), titan::to_empty, initialise ...
//   titan::Pipeline pipeline(mesh.group("pp"), {titan::PipelineStage(rank_in_pp, model, forward)},
//                            titan::PipelineOptions().schedule(titan::PipelineScheduleKind::OneFOneB)
//                                .microbatches(8));
//   auto losses = pipeline.step(microbatches, [&](const at::Tensor& logits, int64_t mb) { ... });
//
// The model's forward skips what a stage does not hold (no embedding: its input is the previous
// stage's activation; no output layer: it returns the hidden states). Stage s lives on pipeline
// rank s % p; with v stages per rank (interleaved schedules) rank r holds stages r, r + p, ...
// Schedules are tables of actions per rank (PipelineSchedule::table prints them); see
// docs/pipeline_parallel.md.

#include <titan/pipeline/schedule.hpp>        // schedule tables, their simulation
#include <titan/pipeline/stage.hpp>           // stages from an unchanged model
#include <titan/pipeline/split_backward.hpp>  // zero-bubble input / weight backward passes
#include <titan/pipeline/runtime.hpp>         // Pipeline: running a table over the pp group
