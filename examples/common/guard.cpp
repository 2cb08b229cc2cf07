#include "guard.hpp"

#include <titan/collectives.hpp>

#include <atomic>

namespace titan::examples {
namespace {

// The signal that arrived (0 = none); a handler can only reach a global lock-free atomic.
std::atomic<int> g_signal{0};
// Whether a SignalFlag currently owns the handlers.
std::atomic<bool> g_installed{false};

extern "C" void record_signal(int signal_number) { g_signal.store(signal_number); }

}  // namespace

NanPolicy nan_policy_from_string(const std::string& name) {
  if (name == "stop") return NanPolicy::Stop;
  if (name == "skip") return NanPolicy::Skip;
  TORCH_CHECK(false, "training.nan_policy = '", name, "' is not one of: stop, skip");
}

void NanGuard::check(int64_t first_step, int64_t last_step, int64_t nonfinite) const {
  TORCH_CHECK(policy_ == NanPolicy::Skip || nonfinite == 0, "training: the loss or gradient norm was NaN or infinite in ",
              nonfinite, " step(s) of steps ", first_step, "-", last_step,
              " (their updates were skipped); stopping (set training.nan_policy = \"skip\" to go on past such steps)");
}

SignalFlag::SignalFlag() {
  TORCH_CHECK(!g_installed.exchange(true), "SignalFlag: another SignalFlag already handles SIGINT/SIGTERM");
  static_assert(std::atomic<int>::is_always_lock_free, "the signal flag must be lock-free");
  g_signal.store(0);
  struct sigaction action {};
  action.sa_handler = record_signal;
  sigemptyset(&action.sa_mask);
  TORCH_CHECK(sigaction(SIGINT, &action, &previous_int_) == 0 && sigaction(SIGTERM, &action, &previous_term_) == 0,
              "SignalFlag: cannot install the SIGINT/SIGTERM handlers");
}

SignalFlag::~SignalFlag() {
  sigaction(SIGINT, &previous_int_, nullptr);
  sigaction(SIGTERM, &previous_term_, nullptr);
  g_signal.store(0);
  g_installed.store(false);
}

bool SignalFlag::requested() const { return g_signal.load() != 0; }

int SignalFlag::signal_number() const { return g_signal.load(); }

bool SignalFlag::any_rank(const ProcessGroupPtr& group) const {
  if (!group || group->size() == 1) return requested();
  auto flag = torch::full({1}, requested() ? 1 : 0, torch::TensorOptions().dtype(torch::kInt).device(group->device()));
  return all_reduce(flag, group).item<int>() > 0;
}

}  // namespace titan::examples
