#pragma once
// titan/detail/torch_internals.hpp: every place titan reaches below LibTorch's public C++ API, in
// one file, so that a LibTorch upgrade is audited here. Each item says what it relies on; the
// torch==2.11.0 wheel is the version checked (the test suite exercises every item).
//
// Not listed: the autograd node API (torch::autograd::Node, collect_next_edges, set_history) used
// by detail/autograd.hpp and ac.hpp is the documented way C++ extensions write custom backward
// functions, and c10d's Backend/ProcessGroup classes are the public C++ distributed API.

#include <ATen/ATen.h>
#include <ATen/native/Resize.h>
#include <c10/core/DispatchKey.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>

// --- 1. USE_C10D_GLOO / USE_C10D_NCCL --------------------------------------------------------
// c10d declares ProcessGroupGloo / ProcessGroupNCCL only when these macros are defined. The
// wheel's CMake target defines both; a consumer without that target (or a header parsed before
// it) would see empty headers, so titan defines them when the backend's own headers are present.
// Relies on: the classes being compiled into libtorch_cpu.so / libtorch_cuda.so of the wheel, and
// ProcessGroupGloo's layout holding Gloo types only through pointers (docs/design.md, section 1:
// Gloo's headers come from Debian's libgloo-dev). Define TITAN_NO_GLOO / TITAN_NO_NCCL to opt out.
#if !defined(TITAN_NO_GLOO) && __has_include(<gloo/context.h>)
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#define TITAN_HAS_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#else
#define TITAN_HAS_GLOO 0
#endif

#if !defined(TITAN_NO_NCCL) && __has_include(<nccl.h>) && __has_include(<cuda_runtime_api.h>)
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#define TITAN_HAS_NCCL 1
#include <ATen/native/cuda/Resize.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#else
#define TITAN_HAS_NCCL 0
#endif

#include <torch/nn/cloneable.h>

#include <functional>
#include <string>

// --- 2. Module::parameters_ (protected) and Module::children_ (private) -----------------------
// parameters_ is reached through a pointer to member of a derived class (a documented C++ rule,
// not undefined behaviour). children_ is private; Module befriends every specialization of
// torch::nn::Cloneable, so titan declares an explicit specialization of it for a tag type of its
// own (legal for a user type) whose one function returns the dictionary. Relies on: Module
// keeping its parameters and children in these two OrderedDicts (what parameters(),
// named_parameters(), children() and optimizers read) and the `friend class Cloneable` line.

namespace titan::detail {
struct ModuleChildrenTag {};
}  // namespace titan::detail

template <>
class torch::nn::Cloneable<titan::detail::ModuleChildrenTag> {
 public:
  static const OrderedDict<std::string, std::shared_ptr<Module>>& children_of(const Module& module) {
    return module.children_;
  }
};

namespace titan::detail {

struct ModuleMembers : torch::nn::Module {
  using torch::nn::Module::parameters_;
};

/// `module`'s own parameter dictionary. FSDP replaces entries by the sharded parameters
/// (docs/design.md, section 4).
inline torch::OrderedDict<std::string, at::Tensor>& parameter_dict(torch::nn::Module& module) {
  return module.*(&ModuleMembers::parameters_);
}

/// `module`'s direct children by name, without the copy named_children() makes (titan::call
/// looks a child up on every call).
inline const torch::OrderedDict<std::string, std::shared_ptr<torch::nn::Module>>& child_dict(
    const torch::nn::Module& module) {
  return torch::nn::Cloneable<ModuleChildrenTag>::children_of(module);
}

// --- 3. at::native::resize_bytes_cpu / resize_bytes_cuda -------------------------------------
// Resize a StorageImpl in place (the kernels behind PyTorch's untyped_storage().resize_(), which
// FSDP2 uses the same way). Relies on: ATen/native/Resize.h and ATen/native/cuda/Resize.h keeping
// these functions and the wheel exporting them.

/// Sets the byte size of `tensor`'s storage in place (0 frees it); every tensor sharing the
/// StorageImpl (views saved by autograd included) sees the new memory.
inline void resize_storage_bytes(const at::Tensor& tensor, size_t bytes) {
  auto* storage = tensor.storage().unsafeGetStorageImpl();
  if (storage->nbytes() == bytes) return;
  if (tensor.device().is_cpu()) {
    at::native::resize_bytes_cpu(storage, bytes);
    return;
  }
  if (tensor.device().is_meta()) {  // a trace on the meta device (DistOptions::device "meta"): no memory
    storage->set_nbytes(bytes);
    return;
  }
#if TITAN_HAS_NCCL
  if (tensor.device().is_cuda()) {
    at::native::resize_bytes_cuda(storage, bytes);
    return;
  }
#endif
  TORCH_CHECK(false, "titan: cannot resize storage on device ", tensor.device(), " (CPU, CUDA and meta are supported)");
}

// --- 4. TensorImpl::shallow_copy_from --------------------------------------------------------
// Re-points an existing TensorImpl at another tensor's storage, sizes, dtype and device, keeping
// its autograd metadata (requires_grad, hooks, grad accumulator): the last step of
// Tensor::set_data, which itself refuses meta -> CPU/CUDA. Relies on: TensorImpl's public but
// unsafe-named interface (unsafeGetTensorImpl, shallow_copy_from) and its semantics above.

/// Makes every handle to `tensor` see `fresh`'s storage, shape, dtype and device, in place.
inline void repoint_tensor(const at::Tensor& tensor, const at::Tensor& fresh) {
  tensor.unsafeGetTensorImpl()->shallow_copy_from(fresh.getIntrusivePtr());
}

// --- 5. The autograd engine's final callback -------------------------------------------------
// FSDP finishes its gradient reductions when backward ends, as PyTorch's FSDP2 does through
// Variable._execution_engine.queue_callback. Relies on: Engine::get_default_engine() and
// queue_callback (torch/csrc/autograd/engine.h) running the callback once, after the graph task,
// on the thread that ran backward.

/// Runs `callback` once the current backward pass has finished (call it during backward).
inline void queue_end_of_backward(std::function<void()> callback) {
  torch::autograd::Engine::get_default_engine().queue_callback(std::move(callback));
}

/// Whether this thread is running a backward pass (an activation checkpoint's recomputation, a
/// gradient hook). Relies on: get_current_graph_task_id (torch/csrc/autograd/graph_task.h),
/// -1 outside the engine's work.
inline bool in_backward() { return torch::autograd::get_current_graph_task_id() != -1; }

// --- 6. A borrowed dispatch key ------------------------------------------------------------
// Selective per-operator activation checkpointing intercepts operators below autograd with a
// boxed fallback on a functionality key that LibTorch itself leaves unused: DispatchKey::Fake,
// reserved for torchdistx's out-of-tree fake tensors. Relies on: that key staying unused by
// LibTorch's own kernels (checked at registration: another fallback on it is an error) and
// being enabled only through this thread's included key set (docs/activation_checkpointing.md).
inline constexpr c10::DispatchKey kOpCacheKey = c10::DispatchKey::Fake;

// --- 7. A backward restricted to chosen edges ------------------------------------------------
// Zero-bubble pipelining runs a stage's weight-gradient pass later, from gradients captured in its
// input-gradient pass and restricted to the parameters (PyTorch's stage_backward_weight calls
// torch.autograd.backward with `inputs`). Relies on: Engine::execute(roots, grads, keep_graph,
// create_graph, accumulate_grad, outputs) accumulating only into the AccumulateGrad nodes of
// `outputs`, and impl::try_get_grad_accumulator returning a leaf's existing accumulator without
// creating one (nullptr when none exists yet).

/// Backpropagates `grads` from `roots` into the gradients of the leaves behind `outputs` only,
/// keeping the graph.
inline void backward_into(const torch::autograd::edge_list& roots, const torch::autograd::variable_list& grads,
                          const torch::autograd::edge_list& outputs) {
  torch::autograd::Engine::get_default_engine().execute(roots, grads, /*keep_graph=*/true, /*create_graph=*/false,
                                                        /*accumulate_grad=*/true, outputs);
}

/// `leaf`'s gradient accumulator node, or nullptr when it has none yet.
inline std::shared_ptr<torch::autograd::Node> grad_accumulator_of(const at::Tensor& leaf) {
  return torch::autograd::impl::try_get_grad_accumulator(leaf);
}

// --- 8. c10::impl::VirtualGuardImpl ----------------------------------------------------------
// An asynchronous checkpoint save waits for the device-to-host copies of its staging before the
// background write, on whatever device the tensors live (CUDA or another accelerator), without
// naming the backend. Relies on: c10/core/impl/VirtualGuardImpl.h (an implementation header)
// dispatching to the device type's registered DeviceGuardImpl.

/// Blocks until the work queued so far on `device`'s current stream is done.
inline void wait_for_stream(const c10::Device& device) {
  c10::impl::VirtualGuardImpl guard(device.type());
  guard.getStream(device).synchronize();
}

}  // namespace titan::detail
