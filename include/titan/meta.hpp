#pragma once
// titan/meta.hpp: build a model on the meta device, then give its tensors real (uninitialised)
// storage, in place. LibTorch has no Module::to_empty, and Tensor::set_data refuses to turn a meta
// tensor into a CPU or CUDA one; titan instead re-points each tensor's TensorImpl at new storage
// (detail::repoint_tensor, the step set_data itself ends with). Every handle to the tensor — the
// module's member, its parameter dictionary, an FSDP hook — therefore sees the change, and
// requires_grad is kept.
//
//   Transformer model(args, torch::kMeta);   // no memory allocated
//   titan::fully_shard(...);                  // shards the (meta) parameters
//   titan::to_empty(*model, device);          // allocates only what this rank holds
//   init_weights(*model);                     // initialise the local shards

#include <titan/detail/torch_internals.hpp>

#include <torch/nn/module.h>

namespace titan {

/// Gives `tensor` fresh uninitialised storage of its shape and dtype on `device`, in place
/// (every handle to it sees the change). A tensor already on `device` is left alone.
inline void materialize_tensor(at::Tensor& tensor, c10::Device device) {
  if (!tensor.defined() || (tensor.device() == device && !tensor.is_meta())) return;
  auto fresh = at::empty_strided(tensor.sizes(), tensor.strides(), tensor.options().device(device));
  detail::repoint_tensor(tensor, fresh);
}

/// Gives every parameter and buffer of `module` (recursively) uninitialised storage on `device`,
/// in place, like PyTorch's Module.to_empty. Values are undefined afterwards: initialise them.
inline void to_empty(torch::nn::Module& module, c10::Device device) {
  for (auto& parameter : module.parameters(/*recurse=*/true)) materialize_tensor(parameter, device);
  for (auto& buffer : module.buffers(/*recurse=*/true)) materialize_tensor(buffer, device);
}

}  // namespace titan
