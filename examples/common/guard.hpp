#pragma once
// Run guards of the example trainers: NaN/Inf loss handling and SIGINT/SIGTERM stop requests.
//
// API summary
//   NanGuard nan(NanPolicy::Stop);          // or nan_policy_from_string(cfg.training.nan_policy)
//   if (!nan.check(step, loss)) { /* skip: zero grads, no optimizer step */ }  // Stop: throws
//   nan.skipped();                          // steps skipped so far
//   SignalFlag stop;                        // installs SIGINT/SIGTERM handlers until destroyed
//   if (stop.any_rank(group)) break;        // at the end of each step: all ranks agree to stop
//   stop.requested(); stop.signal_number(); // this process only

#include <titan/world.hpp>

#include <csignal>
#include <cstdint>
#include <string>

namespace titan::examples {

/// What to do when a step's loss is NaN or infinite.
enum class NanPolicy {
  Stop,  ///< fail with the step number
  Skip,  ///< drop the step's update and go on
};

/// "stop" or "skip" (training.nan_policy).
NanPolicy nan_policy_from_string(const std::string& name);

/// Checks each step's loss (call it on a loss reduced over the ranks, so all ranks agree).
class NanGuard {
 public:
  explicit NanGuard(NanPolicy policy) : policy_(policy) {}
  /// True when `loss` is finite. Otherwise Stop throws c10::Error naming the step, and Skip counts
  /// the step and returns false: the caller zeroes the gradients and skips the optimizer step.
  bool check(int64_t step, double loss);
  int64_t skipped() const { return skipped_; }  ///< steps skipped so far
  NanPolicy policy() const { return policy_; }

 private:
  NanPolicy policy_;
  int64_t skipped_ = 0;
};

/// Records SIGINT and SIGTERM instead of dying, so the loop can stop at a step boundary (and
/// save a checkpoint). The handlers are installed by the constructor and the previous ones put
/// back by the destructor; one SignalFlag may exist at a time. The only global is the atomic the
/// handler writes, which a signal handler cannot avoid.
class SignalFlag {
 public:
  SignalFlag();
  ~SignalFlag();
  SignalFlag(const SignalFlag&) = delete;
  SignalFlag& operator=(const SignalFlag&) = delete;

  /// True once SIGINT or SIGTERM arrived in this process.
  bool requested() const;
  /// The signal that arrived (SIGINT or SIGTERM), 0 when none.
  int signal_number() const;
  /// True when any rank of `group` got a signal (one small all-reduce; nullptr = this process),
  /// so that every rank stops after the same step.
  bool any_rank(const ProcessGroupPtr& group) const;

 private:
  struct sigaction previous_int_ {};
  struct sigaction previous_term_ {};
};

}  // namespace titan::examples
