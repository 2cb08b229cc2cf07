#pragma once
// titan/pipeline/schedule.hpp: pipeline schedules as tables of actions per rank (GPipe, 1F1B,
// Interleaved1F1B, ZB-H1), checked and timed on paper by simulate_schedule (bubble figures).

#include <titan/detail/enum_names.hpp>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace titan {

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

/// The schedule kinds' config names (torchtitan's): "GPipe", "1F1B", "Interleaved1F1B", "ZBH1".
inline const detail::EnumNames<PipelineScheduleKind, 4>& schedule_names() {
  using Kind = PipelineScheduleKind;
  static const detail::EnumNames<Kind, 4> names{{{Kind::GPipe, "GPipe"},
                                                 {Kind::OneFOneB, "1F1B"},
                                                 {Kind::Interleaved1F1B, "Interleaved1F1B"},
                                                 {Kind::ZeroBubbleH1, "ZBH1"}}};
  return names;
}

/// The config name of a schedule kind.
inline std::string schedule_name(PipelineScheduleKind kind) { return detail::enum_name(schedule_names(), kind); }

/// The schedule kind named `name` ("GPipe", "1F1B", "Interleaved1F1B" or "ZBH1"); an error lists them.
inline PipelineScheduleKind parse_schedule(const std::string& name) {
  return detail::parse_enum(schedule_names(), name, "titan pipeline: unknown schedule");
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

namespace detail {

/// Checks that every action of `schedule` names a stage and micro-batch it has, on the stage's rank.
inline void check_action_placement(const PipelineSchedule& schedule) {
  const int64_t p = schedule.ranks, stages = schedule.num_stages(), m = schedule.microbatches;
  TORCH_CHECK(static_cast<int64_t>(schedule.actions.size()) == p, "titan pipeline: the schedule has ",
              schedule.actions.size(), " rows for ", p, " ranks");
  for (int64_t r = 0; r < p; ++r) {
    for (const auto& a : schedule.actions[static_cast<size_t>(r)]) {
      TORCH_CHECK(a.stage >= 0 && a.stage < stages && a.microbatch >= 0 && a.microbatch < m, "titan pipeline: rank ",
                  r, " has action ", a.text(), " outside ", stages, " stages x ", m, " micro-batches");
      TORCH_CHECK(schedule.rank_of(a.stage) == r, "titan pipeline: rank ", r, " runs ", a.text(), " of stage ",
                  a.stage, ", which lives on rank ", schedule.rank_of(a.stage));
    }
  }
}

/// NCCL matches point-to-point messages by order, not tag: checks that on every link between two
/// ranks the receiver takes the messages in the order the sender sends them (each rank in its
/// row's order).
inline void check_message_order(const PipelineSchedule& schedule) {
  const int64_t stages = schedule.num_stages();
  using Message = std::tuple<char, int64_t, int64_t>;  // (activation 'a' / gradient 'g', from stage, mb)
  std::map<std::pair<int64_t, int64_t>, std::vector<Message>> sent, received;
  for (int64_t r = 0; r < schedule.ranks; ++r) {
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
}

}  // namespace detail

/// Runs `schedule` on paper, checking that it is complete (every stage runs every micro-batch's
/// forward once and its backward once, as B or as I then W, on the stage's rank), cannot
/// deadlock when each rank runs its actions in order and a pass waits for its inputs, and that
/// on every link between two ranks the messages are received in the order they are sent. Errors
/// name the rank and action. The timing loop stays one piece: its passes, readiness rules and
/// clocks share the same per-rank state.
inline ScheduleSimulation simulate_schedule(const PipelineSchedule& schedule, double forward_cost = 1.0,
                                            double input_cost = 1.0, double weight_cost = 1.0) {
  using detail::Kind;
  detail::check_action_placement(schedule);
  const int64_t p = schedule.ranks, stages = schedule.num_stages(), m = schedule.microbatches;
  // done[kind][stage * m + mb] = end time, or -1.
  std::map<char, std::vector<double>> done;
  for (char k : {'F', 'B', 'I', 'W'}) done[k].assign(static_cast<size_t>(stages * m), -1.0);
  auto slot = [m](int64_t stage, int64_t mb) { return static_cast<size_t>(stage * m + mb); };
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
  detail::check_message_order(schedule);
  for (double c : clock) sim.makespan = std::max(sim.makespan, c);
  return sim;
}

}  // namespace titan
