#pragma once
// titan/checkpoint/stateful.hpp: titan::Stateful, the interface of a component that checkpoints
// save and restore by name (data loader, LR schedule, ...), and its ComponentState.

#include <titan/sharding.hpp>

#include <map>
#include <string>

namespace titan {

/// The state of a checkpointed component: small strings, the same on every rank (rank 0's are
/// saved), and tensors with their layouts (replicated or sharded).
struct ComponentState {
  std::map<std::string, std::string> values;
  ShardedStateDict tensors;
};

/// A part of the training state besides the model and optimizer that checkpoints save and restore
/// by name: a data loader, a random generator, an LR schedule (titan::TrainState::add).
class Stateful {
 public:
  virtual ~Stateful() = default;
  /// The state to save. A load overwrites the local tensors of a fresh state() and hands it to
  /// load_state, so they must have the saved shapes.
  virtual ComponentState state() const = 0;
  /// Restores a state that state() produced.
  virtual void load_state(const ComponentState& state) = 0;
};

}  // namespace titan
