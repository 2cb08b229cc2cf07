#pragma once
// OpEvents: what ATen operators and profiler scopes ran while a test watched, on every thread
// (the autograd engine runs a GPU's backward on a thread of its own).
#include <ATen/record_function.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace titan_test {

/// Records every operator and RecordFunction scope that starts, on any thread, while alive: its
/// name, the scope directly enclosing it on that thread ("" at the top), its nesting depth there
/// (0 at the top) and the tag set last (e.g. the training step). One may be alive at a time.
class OpEvents {
 public:
  struct Event {
    std::string name;
    std::string parent;
    int depth = 0;
    int64_t tag = 0;
  };

  OpEvents() {
    OpEvents* none = nullptr;
    if (!active().compare_exchange_strong(none, this)) throw std::logic_error("OpEvents: one at a time");
    ++generation();  // every thread's enclosing-scope stack starts afresh
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(&on_start, &on_end).scopes({at::RecordScope::FUNCTION, at::RecordScope::USER_SCOPE}));
  }
  ~OpEvents() {
    at::removeCallback(handle_);
    active() = nullptr;
  }
  OpEvents(const OpEvents&) = delete;
  OpEvents& operator=(const OpEvents&) = delete;

  /// Events from now on carry `tag`.
  void tag(int64_t value) { tag_ = value; }
  /// The events so far, in the order they started.
  std::vector<Event> events() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return events_;
  }

 private:
  static std::atomic<OpEvents*>& active() {
    static std::atomic<OpEvents*> instance{nullptr};
    return instance;
  }
  static std::atomic<int>& generation() {
    static std::atomic<int> value{0};
    return value;
  }
  /// This thread's open scopes (dropped when a new OpEvents starts: those began unwatched).
  static std::vector<std::string>& stack() {
    static thread_local std::vector<std::string> names;
    static thread_local int seen = -1;
    if (seen != generation().load()) {
      names.clear();
      seen = generation().load();
    }
    return names;
  }
  static std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
    auto& names = stack();
    if (OpEvents* self = active().load()) {
      std::lock_guard<std::mutex> lock(self->mutex_);
      self->events_.push_back({fn.name(), names.empty() ? "" : names.back(), static_cast<int>(names.size()),
                               self->tag_.load()});
    }
    names.emplace_back(fn.name());
    return nullptr;
  }
  static void on_end(const at::RecordFunction&, at::ObserverContext*) {
    if (!stack().empty()) stack().pop_back();
  }

  at::CallbackHandle handle_ = 0;
  std::atomic<int64_t> tag_{0};
  mutable std::mutex mutex_;
  std::vector<Event> events_;
};

}  // namespace titan_test
