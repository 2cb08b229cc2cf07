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

#include <titan/ac.hpp>
#include <titan/collectives.hpp>
#include <titan/fsdp.hpp>
#include <titan/tensor_parallel.hpp>
#include <titan/world.hpp>

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace titan {

// ---------------------------------------------------------------------------------------------
// Schedules

/// One step of a schedule: a pass of one stage over one micro-batch.
struct PipelineAction {
  enum class Kind : char {
    Forward = 'F',         ///< forward (the last stage also computes the loss)
    Backward = 'B',        ///< full backward: input and weight gradients
    BackwardInput = 'I',   ///< zero-bubble: the input gradient only (sent on at once)
    BackwardWeight = 'W',  ///< zero-bubble: the weight gradients, deferred to fill bubbles
  };
  Kind kind;
  int64_t stage;
  int64_t microbatch;
  /// "F3.1": kind, stage, micro-batch.
  std::string text() const {
    return std::string(1, static_cast<char>(kind)) + std::to_string(stage) + "." + std::to_string(microbatch);
  }
  bool operator==(const PipelineAction& other) const {
    return kind == other.kind && stage == other.stage && microbatch == other.microbatch;
  }
};

/// The schedules titan implements (torchtitan's pipeline_parallel_schedule names in parse).
enum class PipelineScheduleKind {
  GPipe,            ///< all forwards, then all backwards ("GPipe")
  OneFOneB,         ///< one forward, one backward after a warm-up ("1F1B")
  Interleaved1F1B,  ///< 1F1B over several stages per rank, looped placement ("Interleaved1F1B")
  ZeroBubbleH1,     ///< 1F1B with backward split in input and weight passes, ZB-H1 ("ZBH1")
};

/// The config name of a schedule kind.
inline std::string schedule_name(PipelineScheduleKind kind) {
  switch (kind) {
    case PipelineScheduleKind::GPipe: return "GPipe";
    case PipelineScheduleKind::OneFOneB: return "1F1B";
    case PipelineScheduleKind::Interleaved1F1B: return "Interleaved1F1B";
    case PipelineScheduleKind::ZeroBubbleH1: return "ZBH1";
  }
  return "?";
}

/// The schedule kind named `name` ("GPipe", "1F1B", "Interleaved1F1B" or "ZBH1"); an error lists them.
inline PipelineScheduleKind parse_schedule(const std::string& name) {
  for (auto kind : {PipelineScheduleKind::GPipe, PipelineScheduleKind::OneFOneB, PipelineScheduleKind::Interleaved1F1B,
                    PipelineScheduleKind::ZeroBubbleH1})
    if (schedule_name(kind) == name) return kind;
  TORCH_CHECK(false, "titan pipeline: unknown schedule '", name, "'; expected one of GPipe, 1F1B, Interleaved1F1B, ZBH1");
}

/// Whether a schedule runs several stages per rank.
inline bool is_multi_stage(PipelineScheduleKind kind) { return kind == PipelineScheduleKind::Interleaved1F1B; }

/// What each rank of a pipeline does, in order.
struct PipelineSchedule {
  PipelineScheduleKind kind = PipelineScheduleKind::OneFOneB;
  int64_t ranks = 1;            ///< pipeline degree p
  int64_t stages_per_rank = 1;  ///< v: stage s runs on rank s % p
  int64_t microbatches = 1;     ///< m
  std::vector<std::vector<PipelineAction>> actions;  ///< [rank] -> its actions in order

  int64_t num_stages() const { return ranks * stages_per_rank; }
  int64_t rank_of(int64_t stage) const { return stage % ranks; }
  /// One line per rank: "rank 0: F0.0 F0.1 B0.0 ...".
  std::string table() const {
    std::string text;
    for (size_t r = 0; r < actions.size(); ++r) {
      text += "rank " + std::to_string(r) + ":";
      for (const auto& a : actions[r]) text += " " + a.text();
      text += "\n";
    }
    return text;
  }
};

namespace detail {

using Kind = PipelineAction::Kind;

/// 1F1B on one rank over the ordered forward and backward passes `forwards` / `backwards`:
/// `warmup` forwards, then one forward and one backward alternately, then the remaining backwards.
inline std::vector<PipelineAction> one_f_one_b(const std::vector<PipelineAction>& forwards,
                                               const std::vector<PipelineAction>& backwards, int64_t warmup) {
  std::vector<PipelineAction> out;
  const auto total = static_cast<int64_t>(forwards.size());
  warmup = std::min(warmup, total);
  for (int64_t k = 0; k < warmup; ++k) out.push_back(forwards[static_cast<size_t>(k)]);
  for (int64_t k = 0; k < total - warmup; ++k) {
    out.push_back(forwards[static_cast<size_t>(warmup + k)]);
    out.push_back(backwards[static_cast<size_t>(k)]);
  }
  for (int64_t k = total - warmup; k < total; ++k) out.push_back(backwards[static_cast<size_t>(k)]);
  return out;
}

/// ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): every rank runs 1F1B's order of forward
/// and input-gradient passes, and the weight passes go where a rank would otherwise wait, found
/// by running the table with unit costs: a rank that is free runs its next forward or input pass
/// when that is ready, else its oldest pending weight pass. A rank holds at most p micro-batches
/// (1F1B's peak, on rank 0), so the last ranks defer weight passes that 1F1B could not. With
/// forward = input = weight cost the bubble is (p - 1) / (3 m + p - 1), a third of 1F1B's.
inline std::vector<std::vector<PipelineAction>> zero_bubble_h1(int64_t p, int64_t m) {
  std::vector<std::vector<PipelineAction>> base, rows(static_cast<size_t>(p));
  for (int64_t r = 0; r < p; ++r) {
    std::vector<PipelineAction> forwards, inputs;
    for (int64_t mb = 0; mb < m; ++mb) {
      forwards.push_back({Kind::Forward, r, mb});
      inputs.push_back({Kind::BackwardInput, r, mb});
    }
    base.push_back(one_f_one_b(forwards, inputs, p - 1 - r));
  }
  std::map<std::tuple<char, int64_t, int64_t>, int64_t> done;  // (kind, stage, mb) -> end time
  auto end_of = [&done](char kind, int64_t stage, int64_t mb) -> std::optional<int64_t> {
    auto it = done.find({kind, stage, mb});
    return it == done.end() ? std::nullopt : std::optional<int64_t>(it->second);
  };
  std::vector<int64_t> clock(static_cast<size_t>(p), 0), live(static_cast<size_t>(p), 0);
  std::vector<size_t> next(static_cast<size_t>(p), 0);
  std::vector<std::vector<int64_t>> pending(static_cast<size_t>(p));  // micro-batches awaiting W
  auto run = [&](int64_t r, PipelineAction a) {
    auto& t = clock[static_cast<size_t>(r)];
    rows[static_cast<size_t>(r)].push_back(a);
    done[{static_cast<char>(a.kind), a.stage, a.microbatch}] = ++t;
  };
  auto run_weight = [&](int64_t r) {
    auto& queue = pending[static_cast<size_t>(r)];
    run(r, {Kind::BackwardWeight, r, queue.front()});
    queue.erase(queue.begin());
    live[static_cast<size_t>(r)] -= 1;
  };
  for (;;) {
    std::vector<int64_t> order;
    for (int64_t r = 0; r < p; ++r)
      if (next[static_cast<size_t>(r)] < base[static_cast<size_t>(r)].size() || !pending[static_cast<size_t>(r)].empty())
        order.push_back(r);
    if (order.empty()) break;
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return clock[static_cast<size_t>(a)] < clock[static_cast<size_t>(b)]; });
    bool progress = false;
    for (int64_t r : order) {
      const auto i = static_cast<size_t>(r);
      if (next[i] == base[i].size()) {  // only weight passes left
        run_weight(r);
        progress = true;
        break;
      }
      const auto a = base[i][next[i]];
      std::optional<int64_t> ready;
      if (a.kind == Kind::Forward) {
        ready = r == 0 ? std::optional<int64_t>(0) : end_of('F', r - 1, a.microbatch);
      } else if (end_of('F', r, a.microbatch)) {
        ready = r == p - 1 ? std::optional<int64_t>(0) : end_of('I', r + 1, a.microbatch);
      }
      const bool full = a.kind == Kind::Forward && live[i] >= p && !pending[i].empty();
      if (ready && *ready <= clock[i] && !full) {
        run(r, a);
        ++next[i];
        if (a.kind == Kind::Forward)
          live[i] += 1;
        else
          pending[i].push_back(a.microbatch);
      } else if (!pending[i].empty()) {
        run_weight(r);
      } else if (ready) {
        clock[i] = *ready;  // idle until the input arrives
      } else {
        continue;  // waits for a pass another rank has not placed yet
      }
      progress = true;
      break;
    }
    TORCH_CHECK(progress, "titan pipeline: internal error: the ZB-H1 placement found no rank that can run");
  }
  return rows;
}

}  // namespace detail

/// The schedule `kind` for `ranks` pipeline ranks, `microbatches` micro-batches and
/// `stages_per_rank` stages per rank (1 except for Interleaved1F1B, which needs >= 2). A
/// micro-batch count the schedule cannot use is an error naming it.
inline PipelineSchedule make_pipeline_schedule(PipelineScheduleKind kind, int64_t ranks, int64_t microbatches,
                                               int64_t stages_per_rank = 1) {
  using detail::Kind;
  const std::string name = schedule_name(kind);
  TORCH_CHECK(ranks >= 1, "titan pipeline: the pipeline degree must be >= 1, got ", ranks);
  TORCH_CHECK(microbatches >= 1, "titan pipeline: schedule ", name, " needs at least one micro-batch, got ",
              microbatches);
  if (is_multi_stage(kind)) {
    TORCH_CHECK(stages_per_rank >= 2, "titan pipeline: schedule ", name, " runs several stages per rank; got ",
                stages_per_rank, " (use 1F1B for one stage per rank)");
    TORCH_CHECK(microbatches % ranks == 0, "titan pipeline: schedule ", name, " needs a micro-batch count divisible ",
                "by the pipeline degree ", ranks, "; got ", microbatches, " micro-batches (use ",
                (microbatches / ranks + 1) * ranks, ")");
  } else {
    TORCH_CHECK(stages_per_rank == 1, "titan pipeline: schedule ", name, " runs one stage per rank; got ",
                stages_per_rank, " (use Interleaved1F1B for several)");
  }
  PipelineSchedule schedule{kind, ranks, stages_per_rank, microbatches, {}};
  const int64_t p = ranks, m = microbatches, v = stages_per_rank;
  for (int64_t r = 0; r < p; ++r) {
    std::vector<PipelineAction> forwards, backwards;
    if (kind == PipelineScheduleKind::Interleaved1F1B) {
      // Megatron-LM's order: groups of p micro-batches go through the rank's stages in turn
      // (forward: first stage first; backward: last first).
      for (int64_t k = 0; k < m * v; ++k) {
        const int64_t chunk = (k / p) % v, mb = (k / (p * v)) * p + k % p;
        forwards.push_back({Kind::Forward, chunk * p + r, mb});
        backwards.push_back({Kind::Backward, (v - 1 - chunk) * p + r, mb});
      }
    } else {
      for (int64_t mb = 0; mb < m; ++mb) {
        forwards.push_back({Kind::Forward, r, mb});
        backwards.push_back({Kind::Backward, r, mb});
      }
    }
    std::vector<PipelineAction> order;
    switch (kind) {
      case PipelineScheduleKind::GPipe: order = detail::one_f_one_b(forwards, backwards, m); break;
      case PipelineScheduleKind::OneFOneB: order = detail::one_f_one_b(forwards, backwards, p - 1 - r); break;
      case PipelineScheduleKind::Interleaved1F1B:
        order = detail::one_f_one_b(forwards, backwards, (p - 1 - r) * 2 + (v - 1) * p);
        break;
      case PipelineScheduleKind::ZeroBubbleH1: break;  // placed for all ranks at once below
    }
    schedule.actions.push_back(std::move(order));
  }
  if (kind == PipelineScheduleKind::ZeroBubbleH1) schedule.actions = detail::zero_bubble_h1(p, m);
  return schedule;
}

/// What a simulated run of a schedule gives: the time each rank works and the total span, with
/// forward, backward-input and backward-weight passes of given costs (a full backward costs
/// input + weight) and free communication.
struct ScheduleSimulation {
  double makespan = 0;             ///< when the last pass ends
  std::vector<double> busy;        ///< [rank] time spent in passes
  std::vector<int64_t> peak_live;  ///< [rank] most micro-batches whose activations it held at once
  /// Idle share of the ranks' time: 1 - sum(busy) / (ranks * makespan).
  double bubble() const {
    double total = 0;
    for (double b : busy) total += b;
    return makespan > 0 ? 1.0 - total / (static_cast<double>(busy.size()) * makespan) : 0.0;
  }
};

/// Runs `schedule` on paper, checking that it is complete (every stage runs every micro-batch's
/// forward once and its backward once, as B or as I then W, on the stage's rank), cannot
/// deadlock when each rank runs its actions in order and a pass waits for its inputs, and that
/// on every link between two ranks the messages are received in the order they are sent. Errors
/// name the rank and action.
inline ScheduleSimulation simulate_schedule(const PipelineSchedule& schedule, double forward_cost = 1.0,
                                            double input_cost = 1.0, double weight_cost = 1.0) {
  using detail::Kind;
  const int64_t p = schedule.ranks, stages = schedule.num_stages(), m = schedule.microbatches;
  TORCH_CHECK(static_cast<int64_t>(schedule.actions.size()) == p, "titan pipeline: the schedule has ",
              schedule.actions.size(), " rows for ", p, " ranks");
  // done[kind][stage * m + mb] = end time, or -1.
  std::map<char, std::vector<double>> done;
  for (char k : {'F', 'B', 'I', 'W'}) done[k].assign(static_cast<size_t>(stages * m), -1.0);
  auto slot = [m](int64_t stage, int64_t mb) { return static_cast<size_t>(stage * m + mb); };
  for (int64_t r = 0; r < p; ++r) {
    for (const auto& a : schedule.actions[static_cast<size_t>(r)]) {
      TORCH_CHECK(a.stage >= 0 && a.stage < stages && a.microbatch >= 0 && a.microbatch < m, "titan pipeline: rank ",
                  r, " has action ", a.text(), " outside ", stages, " stages x ", m, " micro-batches");
      TORCH_CHECK(schedule.rank_of(a.stage) == r, "titan pipeline: rank ", r, " runs ", a.text(), " of stage ",
                  a.stage, ", which lives on rank ", schedule.rank_of(a.stage));
    }
  }
  ScheduleSimulation sim;
  sim.busy.assign(static_cast<size_t>(p), 0.0);
  sim.peak_live.assign(static_cast<size_t>(p), 0);
  std::vector<size_t> next(static_cast<size_t>(p), 0);
  std::vector<double> clock(static_cast<size_t>(p), 0.0);
  std::vector<int64_t> live(static_cast<size_t>(p), 0);
  // The gradient of stage s's output is ready when stage s + 1 finished its B or I pass.
  auto grad_ready = [&](int64_t stage, int64_t mb) {
    if (stage + 1 == stages) return 0.0;
    const double b = done['B'][slot(stage + 1, mb)], i = done['I'][slot(stage + 1, mb)];
    return std::max(b, i);
  };
  for (bool progress = true; progress;) {
    progress = false;
    for (int64_t r = 0; r < p; ++r) {
      auto& row = schedule.actions[static_cast<size_t>(r)];
      auto& at = next[static_cast<size_t>(r)];
      while (at < row.size()) {
        const auto& a = row[at];
        const size_t s = slot(a.stage, a.microbatch);
        double ready = 0, cost = 0;
        switch (a.kind) {
          case Kind::Forward:
            TORCH_CHECK(done['F'][s] < 0, "titan pipeline: rank ", r, " runs ", a.text(), " twice");
            ready = a.stage == 0 ? 0.0 : done['F'][slot(a.stage - 1, a.microbatch)];
            cost = forward_cost;
            break;
          case Kind::Backward:
          case Kind::BackwardInput:
            TORCH_CHECK(done['B'][s] < 0 && done['I'][s] < 0, "titan pipeline: rank ", r, " runs the backward ",
                        a.text(), " twice");
            ready = done['F'][s] < 0 ? -1.0 : grad_ready(a.stage, a.microbatch);
            cost = a.kind == Kind::Backward ? input_cost + weight_cost : input_cost;
            break;
          case Kind::BackwardWeight:
            TORCH_CHECK(done['W'][s] < 0, "titan pipeline: rank ", r, " runs ", a.text(), " twice");
            ready = done['I'][s];
            cost = weight_cost;
            break;
        }
        if (ready < 0) break;  // waits for another rank
        const double start = std::max(clock[static_cast<size_t>(r)], ready);
        clock[static_cast<size_t>(r)] = start + cost;
        sim.busy[static_cast<size_t>(r)] += cost;
        done[static_cast<char>(a.kind)][s] = start + cost;
        auto& held = live[static_cast<size_t>(r)];
        if (a.kind == Kind::Forward) held += 1;
        if (a.kind == Kind::Backward || a.kind == Kind::BackwardWeight) held -= 1;
        sim.peak_live[static_cast<size_t>(r)] = std::max(sim.peak_live[static_cast<size_t>(r)], held);
        ++at;
        progress = true;
      }
    }
  }
  std::string stuck;
  for (int64_t r = 0; r < p; ++r) {
    const auto& row = schedule.actions[static_cast<size_t>(r)];
    const auto at = next[static_cast<size_t>(r)];
    if (at < row.size()) stuck += (stuck.empty() ? "" : ", ") + c10::str("rank ", r, " waits forever at ", row[at].text());
  }
  TORCH_CHECK(stuck.empty(), "titan pipeline: schedule ", schedule_name(schedule.kind), " deadlocks: ", stuck, "\n",
              schedule.table());
  for (int64_t stage = 0; stage < stages; ++stage) {
    for (int64_t mb = 0; mb < m; ++mb) {
      const size_t s = slot(stage, mb);
      const bool split = done['I'][s] >= 0;
      TORCH_CHECK(done['F'][s] >= 0 && (done['B'][s] >= 0 || (split && done['W'][s] >= 0)),
                  "titan pipeline: schedule ", schedule_name(schedule.kind), " never completes the forward and ",
                  "backward of stage ", stage, ", micro-batch ", mb);
    }
  }
  // NCCL matches point-to-point messages by order, not tag: on every link, the receiver must
  // take the messages in the order the sender sends them (each rank in its row's order).
  using Message = std::tuple<char, int64_t, int64_t>;  // (activation 'a' / gradient 'g', from stage, mb)
  std::map<std::pair<int64_t, int64_t>, std::vector<Message>> sent, received;
  for (int64_t r = 0; r < p; ++r) {
    for (const auto& a : schedule.actions[static_cast<size_t>(r)]) {
      const bool forward = a.kind == Kind::Forward, backward = a.kind == Kind::Backward || a.kind == Kind::BackwardInput;
      if (forward && a.stage + 1 < stages) sent[{r, schedule.rank_of(a.stage + 1)}].emplace_back('a', a.stage, a.microbatch);
      if (forward && a.stage > 0) received[{schedule.rank_of(a.stage - 1), r}].emplace_back('a', a.stage - 1, a.microbatch);
      if (backward && a.stage > 0) sent[{r, schedule.rank_of(a.stage - 1)}].emplace_back('g', a.stage, a.microbatch);
      if (backward && a.stage + 1 < stages) received[{schedule.rank_of(a.stage + 1), r}].emplace_back('g', a.stage + 1, a.microbatch);
    }
  }
  for (const auto& [link, messages] : sent) {
    if (link.first == link.second) continue;  // handed over locally
    TORCH_CHECK(received[link] == messages, "titan pipeline: schedule ", schedule_name(schedule.kind), ": rank ",
                link.second, " receives the messages of rank ", link.first, " in another order than they are sent ",
                "(NCCL matches them by order)\n", schedule.table());
  }
  for (double c : clock) sim.makespan = std::max(sim.makespan, c);
  return sim;
}

// ---------------------------------------------------------------------------------------------
// Stages from a whole model

/// How a model is cut into stages, by module names relative to the model: `first` modules run
/// before the layers and go to the first stage, the children of the `layers` container are cut
/// into consecutive runs (at `split_points`, or evenly), `last` modules go to the last stage.
struct PipelineSplit {
  /// Modules of the first stage that run before the layers (e.g. {"tok_embeddings"}).
  TORCH_ARG(std::vector<std::string>, first) = {};
  /// The container (ModuleList, ModuleDict or any module) whose children are the layers, in order.
  TORCH_ARG(std::string, layers) = "layers";
  /// Modules of the last stage that run after the layers (e.g. {"norm", "output"}).
  TORCH_ARG(std::vector<std::string>, last) = {};
  /// Layer names where stages 1, 2, ... begin (torchtitan's pipeline_parallel_split_points, e.g.
  /// {"layers.4"}): one fewer than the stages. Empty: the layers are split evenly (the first
  /// stages take one more when they do not divide).
  TORCH_ARG(std::vector<std::string>, split_points) = {};
};

namespace detail {

inline torch::nn::Module& submodule(torch::nn::Module& root, const std::string& name, const char* what) {
  torch::nn::Module* m = &root;
  std::string path;
  for (const auto& part : split_dots(name)) {
    const auto& children = child_dict(*m);
    const auto* found = children.find(part);
    TORCH_CHECK(found != nullptr, "titan pipeline: the model has no module '", name, "' (", what, "); '",
                path.empty() ? std::string("<root>") : path, "' has children ", [&] {
                  std::string list;
                  for (const auto& c : children) list += (list.empty() ? "" : ", ") + c.key();
                  return list.empty() ? std::string("none") : list;
                }());
    path += (path.empty() ? "" : ".") + part;
    m = found->get();
  }
  return *m;
}

}  // namespace detail

/// The module names each of `num_stages` stages keeps: stage 0 the `first` modules and its layers,
/// the last stage its layers and the `last` modules. A split that leaves a stage without layers,
/// an unknown or out-of-order split point, or a parameter of the model outside every stage is an
/// error naming it.
inline std::vector<std::vector<std::string>> pipeline_stage_modules(torch::nn::Module& model,
                                                                    const PipelineSplit& split, int64_t num_stages) {
  TORCH_CHECK(num_stages >= 1, "titan pipeline: the number of stages must be >= 1, got ", num_stages);
  auto& container = detail::submodule(model, split.layers(), "PipelineSplit::layers");
  std::vector<std::string> layers;
  for (const auto& child : detail::child_dict(container))
    if (child.key() != detail::kHookSlotName) layers.push_back(split.layers() + "." + child.key());
  const auto count = static_cast<int64_t>(layers.size());
  std::vector<int64_t> begins;  // first layer index of each stage
  if (split.split_points().empty()) {
    TORCH_CHECK(count >= num_stages, "titan pipeline: ", count, " layers cannot fill ", num_stages,
                " stages: a stage would be empty (use fewer stages or stages per rank)");
    for (int64_t s = 0, at = 0; s < num_stages; ++s) {
      begins.push_back(at);
      at += count / num_stages + (s < count % num_stages ? 1 : 0);
    }
  } else {
    TORCH_CHECK(static_cast<int64_t>(split.split_points().size()) == num_stages - 1, "titan pipeline: ",
                split.split_points().size(), " split points make ", split.split_points().size() + 1,
                " stages but the pipeline has ", num_stages, " (pipeline degree x stages per rank)");
    begins.push_back(0);
    for (const auto& point : split.split_points()) {
      auto it = std::find(layers.begin(), layers.end(), point);
      TORCH_CHECK(it != layers.end(), "titan pipeline: split point '", point, "' is not a layer; layers are '",
                  layers.front(), "' ... '", layers.back(), "'");
      const auto at = static_cast<int64_t>(it - layers.begin());
      TORCH_CHECK(at > begins.back(), "titan pipeline: split point '", point, "' leaves stage ", begins.size() - 1,
                  " without layers (split points must be increasing layer names after the first)");
      begins.push_back(at);
    }
  }
  begins.push_back(count);
  std::vector<std::vector<std::string>> stages(static_cast<size_t>(num_stages));
  for (int64_t s = 0; s < num_stages; ++s) {
    auto& names = stages[static_cast<size_t>(s)];
    if (s == 0) names = split.first();
    for (int64_t l = begins[static_cast<size_t>(s)]; l < begins[static_cast<size_t>(s) + 1]; ++l)
      names.push_back(layers[static_cast<size_t>(l)]);
    if (s == num_stages - 1) names.insert(names.end(), split.last().begin(), split.last().end());
  }
  for (const auto& name : split.first()) detail::submodule(model, name, "PipelineSplit::first");
  for (const auto& name : split.last()) detail::submodule(model, name, "PipelineSplit::last");
  // Every parameter must belong to one stage: a module kept nowhere would lose its weights.
  for (const auto& item : model.named_parameters(true)) {
    bool owned = false;
    for (const auto& names : stages)
      for (const auto& n : names) owned = owned || item.key().rfind(n + ".", 0) == 0;
    TORCH_CHECK(owned, "titan pipeline: parameter '", item.key(), "' is in no stage: add its module to ",
                "PipelineSplit::first or ::last (or the layers)");
  }
  return stages;
}

/// Removes from `model` every submodule stage `stage` of `num_stages` does not keep
/// (pipeline_stage_modules), so its parameters are never materialised; the kept ones keep their
/// names. Buffers of the root stay on every stage. Call it on the model built on the meta device,
/// before parallelizing it.
inline void keep_pipeline_stage(torch::nn::Module& model, const PipelineSplit& split, int64_t num_stages,
                                int64_t stage) {
  TORCH_CHECK(stage >= 0 && stage < num_stages, "titan pipeline: stage ", stage, " is not in [0, ", num_stages, ")");
  const auto stages = pipeline_stage_modules(model, split, num_stages);
  const auto& keep = stages[static_cast<size_t>(stage)];
  std::function<void(torch::nn::Module&, const std::string&)> prune = [&](torch::nn::Module& m,
                                                                          const std::string& path) {
    std::vector<std::string> drop;
    for (const auto& child : detail::child_dict(m)) {
      const std::string name = path.empty() ? child.key() : path + "." + child.key();
      bool kept = false, above = false;
      for (const auto& k : keep) {
        kept = kept || k == name;
        above = above || k.rfind(name + ".", 0) == 0;
      }
      if (above && !kept) prune(*child.value(), name);
      if (!above && !kept) drop.push_back(child.key());
    }
    for (const auto& key : drop) m.unregister_module(key);
  };
  prune(model, "");
}

/// The entries of `plan` that match a module of `stage_module` (a stage keeps only some of the
/// whole model's modules; parallelize_module rejects entries that match nothing).
inline ParallelizePlan plan_for_stage(const ParallelizePlan& plan, torch::nn::Module& stage_module) {
  ParallelizePlan kept;
  for (const auto& [pattern, style] : plan.entries())
    if (!modules_matching(stage_module, pattern).empty()) kept.add(pattern, style);
  return kept;
}

namespace detail {

/// The layouts of a stages view's parameters: each answered by the stage module holding it.
class StagesLayoutHook : public ModuleHook, public ParameterLayoutProvider {
 public:
  explicit StagesLayoutHook(std::vector<std::shared_ptr<torch::nn::Module>> stages) : stages_(std::move(stages)) {}
  std::string name() const override { return "pipeline stages view"; }
  at::Tensor forward(torch::nn::Module&, const TensorList&, const ForwardFn&) override {
    TORCH_CHECK(false, "titan::pipeline_stages_view: the view is for state (checkpoints, optimizers, clipping); ",
                "run the stages through titan::Pipeline");
  }
  std::optional<TensorLayout> layout_of(const std::string& name) const override {
    for (const auto& stage : stages_) {
      const auto params = stage->named_parameters(true);
      if (const auto* p = params.find(name)) return parameter_layout(*stage, name, *p);
    }
    return std::nullopt;
  }

 private:
  std::vector<std::shared_ptr<torch::nn::Module>> stages_;
};

/// Registers under `view` the children of `parts` (modules at the same path), merging the
/// containers several of them hold.
inline void merge_children(torch::nn::Module& view, const std::vector<torch::nn::Module*>& parts) {
  std::vector<std::string> order;
  std::map<std::string, std::vector<std::shared_ptr<torch::nn::Module>>> holders;
  for (auto* part : parts) {
    for (const auto& child : child_dict(*part)) {
      if (child.key() == kHookSlotName) continue;
      if (!holders.count(child.key())) order.push_back(child.key());
      holders[child.key()].push_back(child.value());
    }
  }
  for (const auto& key : order) {
    const auto& same = holders[key];
    if (same.size() == 1) {
      view.register_module(key, same.front());
      continue;
    }
    std::vector<torch::nn::Module*> nested;
    for (const auto& m : same) {
      TORCH_CHECK(m->named_parameters(false).is_empty(), "titan::pipeline_stages_view: module '", key,
                  "' holds parameters of its own in several stages");
      nested.push_back(m.get());
    }
    auto merged = std::make_shared<torch::nn::Module>(key);
    merge_children(*merged, nested);
    view.register_module(key, merged);
  }
}

}  // namespace detail

/// One module presenting every stage this rank holds (interleaved schedules: several pruned
/// copies of the model) under the whole model's names, sharing their parameters: for a
/// checkpoint's TrainState::model, an optimizer, clip_grad_norm_ or an export. Buffers are the
/// first stage's. It cannot be called: run the stages through Pipeline.
inline std::shared_ptr<torch::nn::Module> pipeline_stages_view(
    const std::vector<std::shared_ptr<torch::nn::Module>>& stages) {
  TORCH_CHECK(!stages.empty(), "titan::pipeline_stages_view: no stages");
  auto view = std::make_shared<torch::nn::Module>("PipelineStages");
  std::vector<torch::nn::Module*> parts;
  for (const auto& stage : stages) parts.push_back(stage.get());
  detail::merge_children(*view, parts);
  for (const auto& item : stages.front()->named_buffers(false)) view->register_buffer(item.key(), item.value());
  attach_hook(*view, std::make_shared<detail::StagesLayoutHook>(stages));
  return view;
}

// ---------------------------------------------------------------------------------------------
// Zero-bubble weight passes

namespace detail {

/// Keeps the gradients an autograd node receives (its inputs, summed) when it runs.
class CaptureGradients : public torch::autograd::FunctionPreHook {
 public:
  explicit CaptureGradients(std::shared_ptr<torch::autograd::variable_list> into) : into_(std::move(into)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    *into_ = grads;
    return grads;
  }

 private:
  std::shared_ptr<torch::autograd::variable_list> into_;
};

/// A micro-batch's weight-gradient pass, prepared by its input-gradient pass. A node on the
/// input's gradient path (which the input pass runs) whose other edges lead only to parameters
/// is a branch point: the input pass captures the gradients it receives, and the weight pass
/// runs the node again from them, restricted to those parameters. The parameter-only parts of
/// the graph run once, the activation-gradient path not again (PyTorch's stage_backward_weight).
struct WeightPass {
  struct Branch {
    std::shared_ptr<torch::autograd::Node> node;
    std::shared_ptr<torch::autograd::variable_list> grads;  // captured by the input pass
    torch::autograd::edge_list params;                      // gradient edges of its parameters
  };
  std::vector<Branch> branches;

  /// Accumulates every branch's parameter gradients.
  void run() const {
    for (const auto& branch : branches) {
      torch::autograd::edge_list roots;
      torch::autograd::variable_list grads;
      for (size_t i = 0; i < branch.grads->size(); ++i) {
        if (!(*branch.grads)[i].defined()) continue;
        roots.emplace_back(branch.node, static_cast<uint32_t>(i));
        grads.push_back((*branch.grads)[i]);
      }
      // The graph stays: parameter-only nodes (a transpose of a weight) may serve two branches;
      // it is freed with the micro-batch's output.
      if (!roots.empty())
        torch::autograd::Engine::get_default_engine().execute(roots, grads, /*keep_graph=*/true,
                                                              /*create_graph=*/false, /*accumulate_grad=*/true,
                                                              branch.params);
    }
  }
};

/// Finds the branch points of `output`'s graph for `params` (see WeightPass) and hooks them, before
/// the input pass runs. nullopt when a parameter lies below two branch points (a weight used
/// twice): running them one by one would count it twice, so the caller re-runs backward instead.
inline std::optional<WeightPass> prepare_weight_pass(const at::Tensor& output, const at::Tensor& input,
                                                     const std::vector<at::Tensor>& params) {
  using torch::autograd::Node;
  std::map<const Node*, torch::autograd::Edge> accumulators;  // parameter gradient edges by node
  for (const auto& p : params)
    if (auto acc = torch::autograd::impl::try_get_grad_accumulator(p)) accumulators.emplace(acc.get(), torch::autograd::Edge(acc, 0));
  const auto input_acc = torch::autograd::impl::try_get_grad_accumulator(input);
  if (!output.grad_fn() || !input_acc) return std::nullopt;
  // Which nodes lead to the input (memoized depth-first search).
  std::map<const Node*, bool> to_input;
  std::function<bool(const Node*)> leads_to_input = [&](const Node* node) {
    if (node == input_acc.get()) return true;
    auto [it, fresh] = to_input.emplace(node, false);
    if (!fresh) return it->second;
    bool found = false;
    for (const auto& edge : node->next_edges())
      if (edge.is_valid() && leads_to_input(edge.function.get())) found = true;
    to_input[node] = found;
    return found;
  };
  leads_to_input(output.grad_fn().get());
  WeightPass pass;
  std::map<const Node*, int> owners;  // parameter node -> branch points above it
  for (const auto& [node, on_path] : to_input) {
    if (!on_path) continue;
    torch::autograd::edge_list below;
    std::set<const Node*> seen;
    std::function<void(const std::shared_ptr<Node>&)> collect = [&](const std::shared_ptr<Node>& n) {
      if (!seen.insert(n.get()).second) return;
      if (auto it = accumulators.find(n.get()); it != accumulators.end()) {
        below.push_back(it->second);
        owners[n.get()] += 1;
        return;
      }
      for (const auto& edge : n->next_edges())
        if (edge.is_valid()) collect(edge.function);
    };
    for (const auto& edge : node->next_edges()) {
      if (!edge.is_valid() || edge.function.get() == input_acc.get()) continue;
      auto it = to_input.find(edge.function.get());
      if (it != to_input.end() && it->second) continue;  // on the input's path: the input pass runs it
      collect(edge.function);
    }
    if (below.empty()) continue;
    pass.branches.push_back({std::const_pointer_cast<Node>(node->shared_from_this()),
                             std::make_shared<torch::autograd::variable_list>(), std::move(below)});
  }
  for (const auto& [param, count] : owners)
    if (count > 1) return std::nullopt;
  for (const auto& branch : pass.branches)
    branch.node->add_pre_hook(std::make_unique<CaptureGradients>(branch.grads));
  return pass;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Running a schedule

/// One stage this rank runs: its index, its module (the pruned model, for FSDP's gradient sync
/// and the parameters of weight passes) and how to run it on a micro-batch's input (the first
/// stage's input is the micro-batch itself, the others' the previous stage's output).
struct PipelineStage {
  PipelineStage(int64_t index, std::shared_ptr<torch::nn::Module> module,
                std::function<at::Tensor(const at::Tensor&)> forward)
      : index(index), module(std::move(module)), forward(std::move(forward)) {}
  int64_t index;
  std::shared_ptr<torch::nn::Module> module;
  std::function<at::Tensor(const at::Tensor&)> forward;
};

/// The loss of micro-batch `microbatch` from the last stage's output: the schedule backpropagates
/// it as is, so scale it as the whole step's loss needs (e.g. token sum / global token count).
using PipelineLossFn = std::function<at::Tensor(const at::Tensor& output, int64_t microbatch)>;

/// Where a rank's step time went (seconds of the last step).
struct PipelineStats {
  double step_seconds = 0;     ///< the whole step
  double compute_seconds = 0;  ///< inside passes (forward, loss, backward), sends issued
  double forward_seconds = 0;  ///< of which forward passes (with the loss)
  double backward_seconds = 0; ///< full backward passes (B)
  double input_seconds = 0;    ///< input-gradient passes (I)
  double weight_seconds = 0;   ///< weight-gradient passes (W)
  double wait_seconds = 0;     ///< waiting for activations and gradients from other ranks
  int64_t peak_live = 0;       ///< most micro-batches whose activations this rank held at once
};

/// Options of Pipeline, with chained setters.
struct PipelineOptions {
  /// The schedule.
  TORCH_ARG(PipelineScheduleKind, schedule) = PipelineScheduleKind::OneFOneB;
  /// Micro-batches per step (m): the first stage's step() gets exactly this many inputs.
  TORCH_ARG(int64_t, microbatches) = 1;
  /// Called after each action with the action (benchmarks sample memory here).
  TORCH_ARG(std::function<void(const PipelineAction&)>, after_action) = nullptr;
};

/// Runs one rank's stages of a pipeline over `group` (the "pp" mesh dimension) with a schedule.
class Pipeline {
 public:
  /// `stages`: this rank's stages in order, stage indices r, r + p, ... (r = group rank, p = its
  /// size). Checks the stage counts of all ranks agree (a collective over `group`).
  Pipeline(ProcessGroupPtr group, std::vector<PipelineStage> stages, PipelineOptions options)
      : group_(std::move(group)), stages_(std::move(stages)), options_(std::move(options)) {
    TORCH_CHECK(group_, "titan::Pipeline: this rank is not in the pipeline group");
    TORCH_CHECK(!stages_.empty(), "titan::Pipeline: this rank has no stage");
    const int64_t p = group_->size(), r = group_->rank(), v = static_cast<int64_t>(stages_.size());
    for (int64_t i = 0; i < v; ++i) {
      const auto& stage = stages_[static_cast<size_t>(i)];
      TORCH_CHECK(stage.index == r + i * p, "titan::Pipeline: stage ", i, " of pipeline rank ", r, " has index ",
                  stage.index, "; expected ", r + i * p, " (stage s runs on rank s % ", p, ", in increasing order)");
      TORCH_CHECK(stage.module && stage.forward, "titan::Pipeline: stage ", stage.index, " has no module or forward");
    }
    if (p > 1) {
      auto counts = at::full({2}, v, at::TensorOptions().dtype(at::kLong).device(group_->device()));  // [2]
      counts[1] = -v;
      counts = detail::all_reduce_raw(counts, *group_, ReduceOp::Max).cpu();
      TORCH_CHECK(counts[0].item<int64_t>() == v && -counts[1].item<int64_t>() == v, "titan::Pipeline: ranks hold ",
                  "different numbers of stages (this rank ", v, ", others between ", -counts[1].item<int64_t>(),
                  " and ", counts[0].item<int64_t>(), ")");
    }
    schedule_ = make_pipeline_schedule(options_.schedule(), p, options_.microbatches(), v);
    simulate_schedule(schedule_);  // complete and deadlock-free
    if (options_.schedule() == PipelineScheduleKind::ZeroBubbleH1) {
      for (const auto& stage : stages_) {
        const bool wrapped = !detail::hooks_in_subtree<FsdpHook>(*stage.module).empty() ||
                             !detail::hooks_in_subtree<CheckpointHook>(*stage.module).empty();
        TORCH_CHECK(!wrapped, "titan::Pipeline: schedule ZBH1 splits backward into input and weight passes, which ",
                    "fully_shard and activation checkpointing do not support yet (stage ", stage.index, " uses ",
                    "them); use 1F1B or Interleaved1F1B");
      }
    }
  }

  const PipelineSchedule& schedule() const { return schedule_; }
  const PipelineStats& stats() const { return stats_; }
  int64_t num_stages() const { return schedule_.num_stages(); }
  /// Whether this rank runs stage 0 (it feeds the micro-batches).
  bool has_first_stage() const { return stages_.front().index == 0; }
  /// Whether this rank runs the last stage (it computes the losses).
  bool has_last_stage() const { return stages_.back().index == num_stages() - 1; }

  /// Forward and backward of every micro-batch by the schedule. `microbatches`: the inputs, one
  /// per micro-batch (read on the rank of the first stage only). Returns the micro-batches'
  /// losses (detached) on the rank of the last stage, else nothing. Parameter gradients
  /// accumulate; FSDP reduces them only in each stage's last backward.
  std::vector<at::Tensor> step(const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn) {
    return run(schedule_.actions[static_cast<size_t>(group_->rank())], microbatches, loss_fn, true);
  }

  /// Forward only (no gradients), e.g. for validation: returns the losses as step does.
  std::vector<at::Tensor> evaluate(const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn) {
    std::vector<PipelineAction> forwards;
    for (const auto& a : schedule_.actions[static_cast<size_t>(group_->rank())])
      if (a.kind == PipelineAction::Kind::Forward) forwards.push_back(a);
    at::NoGradGuard no_grad;
    return run(forwards, microbatches, loss_fn, false);
  }

 private:
  using Kind = PipelineAction::Kind;
  using Clock = std::chrono::steady_clock;
  static constexpr int64_t kMetaSize = 8;  // dtype, ndim, up to 6 sizes

  /// A micro-batch's state on one stage between its forward and backward.
  struct Slot {
    at::Tensor input, output, grad;  // output: the loss on the last stage
    std::optional<detail::WeightPass> weights;  // zero-bubble: prepared by the input pass
  };

  const PipelineStage& local(int64_t stage) const {
    return stages_[static_cast<size_t>(stage / group_->size())];
  }
  uint32_t tag(int64_t stage, int64_t mb, bool grad) const {
    return static_cast<uint32_t>((stage * schedule_.microbatches + mb) * 2 + (grad ? 1 : 0));
  }
  uint32_t meta_tag(int64_t stage) const {
    return static_cast<uint32_t>((num_stages() * schedule_.microbatches + stage) * 2);
  }
  int peer(int64_t stage) const { return static_cast<int>(schedule_.rank_of(stage)); }

  void send(const at::Tensor& tensor, int64_t to_stage, uint32_t t) {
    if (peer(to_stage) == group_->rank()) {  // the next stage is this rank's (one pipeline rank)
      local_[t] = tensor.detach().contiguous();
      return;
    }
    sends_.push_back(send_async(*group_, tensor, peer(to_stage), t));
  }

  /// Posts the receive of `t` from `from_stage` into a new tensor of `shape` and `options`.
  void post_recv(uint32_t t, int64_t from_stage, const std::vector<int64_t>& shape, const at::TensorOptions& options) {
    if (recvs_.count(t) || local_.count(t)) return;
    if (peer(from_stage) == group_->rank()) return;  // arrives through local_
    recvs_[t] = recv_async(*group_, shape, options, peer(from_stage), t);
  }

  at::Tensor wait_recv(uint32_t t, int64_t stage, int64_t mb, const char* what) {
    if (auto it = local_.find(t); it != local_.end()) {
      auto out = it->second;
      local_.erase(it);
      return out;
    }
    auto it = recvs_.find(t);
    TORCH_CHECK(it != recvs_.end(), "titan::Pipeline: internal error: no receive posted for micro-batch ", mb, "'s ",
                what, " from stage ", stage);
    const auto start = Clock::now();
    at::Tensor out;
    try {
      out = it->second.wait();
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "titan::Pipeline: receiving micro-batch ", mb, "'s ", what, " from stage ", stage,
                  " (pipeline rank ", peer(stage), ") failed (did that rank fail?): ", e.what());
    }
    stats_.wait_seconds += std::chrono::duration<double>(Clock::now() - start).count();
    recvs_.erase(it);
    return out;
  }

  /// The activation shape stage `stage` sends this step (received once per step, before its
  /// first activation).
  const std::pair<std::vector<int64_t>, at::TensorOptions>& activation_meta(int64_t stage) {
    auto it = meta_.find(stage);
    if (it != meta_.end()) return it->second;
    const uint32_t t = meta_tag(stage);
    post_recv(t, stage, {kMetaSize}, at::TensorOptions().dtype(at::kLong).device(group_->device()));  // unless local
    const auto meta = wait_recv(t, stage, 0, "shape").cpu();  // [8]
    const auto* m = meta.data_ptr<int64_t>();
    std::vector<int64_t> shape(m + 2, m + 2 + m[1]);
    auto options = at::TensorOptions().dtype(static_cast<at::ScalarType>(m[0])).device(group_->device());
    return meta_.emplace(stage, std::make_pair(shape, options)).first->second;
  }

  /// Sends stage `stage`'s output of `mb` on (its shape first, once per step).
  void send_activation(int64_t stage, int64_t mb, const at::Tensor& output) {
    auto sent = sent_shape_.find(stage);
    if (sent == sent_shape_.end()) {
      TORCH_CHECK(output.dim() <= kMetaSize - 2, "titan::Pipeline: stage ", stage, " outputs a ", output.dim(),
                  "-dimensional tensor; at most ", kMetaSize - 2, " dimensions can be sent");
      auto meta = at::zeros({kMetaSize}, at::kLong);  // [8]
      meta[0] = static_cast<int64_t>(output.scalar_type());
      meta[1] = output.dim();
      for (int64_t d = 0; d < output.dim(); ++d) meta[2 + d] = output.size(d);
      send(meta.to(group_->device()), stage + 1, meta_tag(stage));
      sent_shape_[stage] = output.sizes().vec();
    } else {
      TORCH_CHECK(sent->second == output.sizes().vec(), "titan::Pipeline: stage ", stage, " output of micro-batch ",
                  mb, " has shape ", output.sizes(), " but micro-batch 0's was ", c10::IntArrayRef(sent->second),
                  "; every micro-batch of a step must have the same shape");
    }
    send(output, stage + 1, tag(stage, mb, false));
  }

  /// Posts the receive action `a` waits for: an activation (its shape received first, once per
  /// step, when `wait_for_shape`; else skipped while the shape is unknown) or a gradient.
  void post_inputs(const PipelineAction& a, bool wait_for_shape) {
    if (a.kind == Kind::Forward && a.stage > 0) {
      auto it = meta_.find(a.stage - 1);
      if (it == meta_.end() && !wait_for_shape) return;
      const auto& meta = it != meta_.end() ? it->second : activation_meta(a.stage - 1);
      post_recv(tag(a.stage - 1, a.microbatch, false), a.stage - 1, meta.first, meta.second);
    } else if ((a.kind == Kind::Backward || a.kind == Kind::BackwardInput) && a.stage + 1 < num_stages()) {
      auto it = slots_.find({a.stage, a.microbatch});
      if (it != slots_.end())
        post_recv(tag(a.stage, a.microbatch, true), a.stage + 1, it->second.output.sizes().vec(),
                  it->second.output.options());
    }
  }

  void forward(const PipelineAction& a, const std::vector<at::Tensor>& microbatches, const PipelineLossFn& loss_fn,
               bool train, std::vector<at::Tensor>& losses) {
    const auto& stage = local(a.stage);
    at::Tensor input;
    if (a.stage == 0) {
      input = microbatches[static_cast<size_t>(a.microbatch)];
    } else {
      input = wait_recv(tag(a.stage - 1, a.microbatch, false), a.stage - 1, a.microbatch, "activation");
      if (train && input.is_floating_point()) input.requires_grad_(true);
    }
    const auto start = Clock::now();
    at::Tensor output = stage.forward(input);
    if (a.stage + 1 == num_stages()) {
      output = loss_fn(output, a.microbatch);
      TORCH_CHECK(output.numel() == 1, "titan::Pipeline: the loss function returned ", output.sizes(),
                  " for micro-batch ", a.microbatch, "; expected a scalar");
      losses[static_cast<size_t>(a.microbatch)] = output.detach();
    } else {
      send_activation(a.stage, a.microbatch, output);
    }
    if (train) {
      TORCH_CHECK(output.requires_grad(), "titan::Pipeline: the output of stage ", a.stage, " for micro-batch ",
                  a.microbatch, " does not require grad; nothing would train");
      slots_[{a.stage, a.microbatch}] = Slot{input, output, {}, std::nullopt};
      stats_.peak_live = std::max<int64_t>(stats_.peak_live, static_cast<int64_t>(slots_.size()));
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    stats_.forward_seconds += seconds;
    stats_.compute_seconds += seconds;
  }

  void backward(const PipelineAction& a) {
    auto it = slots_.find({a.stage, a.microbatch});
    TORCH_CHECK(it != slots_.end(), "titan::Pipeline: internal error: ", a.text(), " before its forward");
    auto& slot = it->second;
    const bool last = a.stage + 1 == num_stages();
    if (a.kind != Kind::BackwardWeight && !last) {
      slot.grad = wait_recv(tag(a.stage, a.microbatch, true), a.stage + 1, a.microbatch, "gradient");
    }
    const auto start = Clock::now();
    const auto& stage = local(a.stage);
    torch::autograd::variable_list grads;
    if (!last) grads.push_back(slot.grad);
    const bool needs_input_grad = a.stage > 0 && slot.input.requires_grad();
    if (a.kind == Kind::Backward) {
      // FSDP reduces the gradients and frees the gathered parameters only in the stage's last
      // backward of the step: one all-gather and one reduce-scatter per unit and step.
      const bool last_of_stage = a.microbatch == last_backward_.at(a.stage);
      set_requires_gradient_sync(*stage.module, last_of_stage);
      set_reshard_after_backward(*stage.module, last_of_stage);
      torch::autograd::backward({slot.output}, grads);
      if (a.stage > 0) send_input_grad(a, needs_input_grad ? slot.input.grad() : at::Tensor(), slot.input);
      slots_.erase(it);
    } else if (a.kind == Kind::BackwardInput) {
      // The input gradient only, sent on at once; the branch points of the weight gradients keep
      // what they received (the first stage has no input gradient: its weight pass does it all).
      if (needs_input_grad) {
        slot.weights = detail::prepare_weight_pass(slot.output, slot.input, trainable(stage));
        auto g = torch::autograd::grad({slot.output}, {slot.input}, grads, /*retain_graph=*/true,
                                       /*create_graph=*/false, /*allow_unused=*/true);
        send_input_grad(a, g[0], slot.input);
      } else if (a.stage > 0) {
        send_input_grad(a, at::Tensor(), slot.input);
      }
    } else {
      if (slot.weights) {
        slot.weights->run();
      } else {  // the first stage, or a weight used twice: backward restricted to the parameters
        const auto params = trainable(stage);
        if (!params.empty()) torch::autograd::backward({slot.output}, grads, /*retain_graph=*/false, false, params);
      }
      slots_.erase(it);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    (a.kind == Kind::Backward ? stats_.backward_seconds
     : a.kind == Kind::BackwardInput ? stats_.input_seconds
                                     : stats_.weight_seconds) += seconds;
    stats_.compute_seconds += seconds;
  }

  static std::vector<at::Tensor> trainable(const PipelineStage& stage) {
    std::vector<at::Tensor> params;
    for (const auto& p : stage.module->parameters())
      if (p.requires_grad()) params.push_back(p);
    return params;
  }

  void send_input_grad(const PipelineAction& a, const at::Tensor& grad, const at::Tensor& input) {
    send(grad.defined() ? grad : at::zeros_like(input), a.stage - 1, tag(a.stage - 1, a.microbatch, true));
  }

  std::vector<at::Tensor> run(const std::vector<PipelineAction>& actions, const std::vector<at::Tensor>& microbatches,
                              const PipelineLossFn& loss_fn, bool train) {
    const int64_t m = schedule_.microbatches;
    if (has_first_stage())
      TORCH_CHECK(static_cast<int64_t>(microbatches.size()) == m, "titan::Pipeline: got ", microbatches.size(),
                  " micro-batch inputs; the pipeline was made for ", m, " (PipelineOptions::microbatches)");
    if (has_last_stage()) TORCH_CHECK(loss_fn, "titan::Pipeline: the rank of the last stage needs a loss function");
    const auto start = Clock::now();
    stats_ = PipelineStats{};
    meta_.clear();
    sent_shape_.clear();
    last_backward_.clear();
    for (const auto& a : actions)
      if (a.kind == Kind::Backward) last_backward_[a.stage] = a.microbatch;
    std::vector<at::Tensor> losses(has_last_stage() ? static_cast<size_t>(m) : 0);
    if (train) set_fsdp_step_mode(true);
    try {
      for (size_t k = 0; k < actions.size(); ++k) {
        // Receives are posted in the table's order (NCCL matches them by order, not tag): this
        // action's, then the next one's, so it is in flight while this one computes.
        const auto& a = actions[k];
        post_inputs(a, true);
        if (k + 1 < actions.size()) post_inputs(actions[k + 1], false);
        if (a.kind == Kind::Forward)
          forward(a, microbatches, loss_fn, train, losses);
        else
          backward(a);
        if (options_.after_action()) options_.after_action()(a);
      }
      for (auto& transfer : sends_) transfer.wait();
    } catch (...) {
      // The error goes to the caller, whose process is expected to end (as the example trainer
      // does): the neighbours waiting on this rank then fail as its connections close.
      set_fsdp_step_mode(false);
      clear();
      throw;
    }
    set_fsdp_step_mode(false);
    TORCH_CHECK(slots_.empty() && recvs_.empty() && local_.empty(), "titan::Pipeline: internal error: ",
                slots_.size(), " micro-batch states, ", recvs_.size(), " receives left after the step");
    clear();
    stats_.step_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    return losses;
  }

  /// FSDP units of the stages keep their gathered parameters and unreduced gradients across the
  /// micro-batches of a step (`within`), or behave as usual.
  void set_fsdp_step_mode(bool within) {
    for (const auto& stage : stages_) {
      set_requires_gradient_sync(*stage.module, !within);
      set_reshard_after_backward(*stage.module, !within);
    }
  }

  void clear() {
    sends_.clear();
    recvs_.clear();
    local_.clear();
    slots_.clear();
  }

  ProcessGroupPtr group_;
  std::vector<PipelineStage> stages_;
  PipelineOptions options_;
  PipelineSchedule schedule_;
  PipelineStats stats_;
  std::map<std::pair<int64_t, int64_t>, Slot> slots_;  // (stage, micro-batch)
  std::map<uint32_t, PendingTransfer> recvs_;           // by tag
  std::map<uint32_t, at::Tensor> local_;                // stage-to-stage on this rank, by tag
  std::vector<PendingTransfer> sends_;
  std::map<int64_t, std::pair<std::vector<int64_t>, at::TensorOptions>> meta_;  // received shapes by stage
  std::map<int64_t, std::vector<int64_t>> sent_shape_;                         // sent shapes by stage
  std::map<int64_t, int64_t> last_backward_;                                   // stage -> its last B
};

}  // namespace titan
