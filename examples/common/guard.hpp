#pragma once
// Run guards of the example trainers: NaN/Inf loss handling and SIGINT/SIGTERM stop requests.
//
// API summary
//   NanGuard nan(NanPolicy::Stop);          // or nan_policy_from_string(cfg.training.nan_policy)
//   nan.check(first_step, last_step, n);    // at a sync step: n steps had a non-finite norm
//                                           // (Stop: throws naming them; Skip: returns)
//   SignalFlag stop;                        // installs SIGINT/SIGTERM handlers until destroyed
//   if (stop.any_rank(group)) break;        // at a sync step: all ranks agree to stop
//   stop.requested(); stop.signal_number(); // this process only
//
// Neither check runs every step. A step whose global gradient norm is not finite (NaN/Inf loss
// or gradients on any rank) is skipped on the device as it happens (FusedAdamW::skip_if), so the
// host needs no sync to keep NaN out of the parameters; it reads the count at the next sync step
// (logging, validation, checkpoint or last step), before any checkpoint is written.

#include <titan/world.hpp>

#include <csignal>
#include <cstdint>
#include <string>

namespace titan::examples {

/// What to do about steps whose gradient norm (or loss) is NaN or infinite. Either way their
/// updates were skipped on the device.
enum class NanPolicy {
  Stop,  ///< fail at the next sync step, naming the steps
  Skip,  ///< go on (the metrics line counts the skipped steps)
};

/// "stop" or "skip" (training.nan_policy).
NanPolicy nan_policy_from_string(const std::string& name);

/// Applies the NaN policy at the trainer's sync steps.
class NanGuard {
 public:
  explicit NanGuard(NanPolicy policy) : policy_(policy) {}
  /// `nonfinite` steps among first_step..last_step were not finite. Stop throws c10::Error naming
  /// those steps when there is any; Skip returns.
  void check(int64_t first_step, int64_t last_step, int64_t nonfinite) const;
  NanPolicy policy() const { return policy_; }

 private:
  NanPolicy policy_;
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
