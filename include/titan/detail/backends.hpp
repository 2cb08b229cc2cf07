#pragma once
// titan/detail/backends.hpp: creating c10d backends. Gloo and NCCL are compiled into LibTorch;
// their C++ classes are declared in headers that need <gloo/...> (Debian's libgloo-dev) and
// <nccl.h> with the CUDA headers. detail/torch_internals.hpp enables each when its headers are
// found (define TITAN_NO_GLOO / TITAN_NO_NCCL to opt out).

#include <titan/detail/torch_internals.hpp>  // TITAN_HAS_GLOO / TITAN_HAS_NCCL and the backend classes

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <torch/cuda.h>

#include <chrono>
#include <string>

namespace titan::detail {

/// CUDA devices visible to this process (0 without CUDA support compiled in).
inline int cuda_device_count() {
#if TITAN_HAS_NCCL
  return static_cast<int>(c10::cuda::device_count());
#else
  return 0;
#endif
}

/// CUDA devices LibTorch sees, whether or not titan was compiled with CUDA support (its NCCL path).
inline int visible_gpu_count() { return static_cast<int>(torch::cuda::device_count()); }

/// Fails when CUDA devices are visible but titan was compiled without its CUDA path (no <nccl.h>
/// or CUDA headers), unless the CPU was asked for: the job would train on the CPU silently.
inline void check_cuda_support(bool compiled_with_cuda, int visible_gpus, const std::string& requested_device) {
  TORCH_CHECK(compiled_with_cuda || visible_gpus == 0 || requested_device == "cpu", "titan: ", visible_gpus,
              " GPU(s) are visible but titan was compiled without CUDA support (<nccl.h> or the CUDA headers were ",
              "not found), so it would train on the CPU. Build with the CUDA toolkit's headers (NCCL included), or ",
              "ask for the CPU: DistOptions().device(\"cpu\") or TITAN_DEVICE=cpu");
}

/// The GPU of the rank with `local_rank` among `local_world_size` ranks on its node, given
/// `visible` GPUs. One GPU per rank; several ranks on one GPU (round robin) only with
/// `share_gpus` and the Gloo backend (NCCL cannot put two ranks on one GPU).
inline int cuda_device_for(int local_rank, int local_world_size, int visible, bool share_gpus,
                           const std::string& backend) {
  TORCH_CHECK(visible > 0, "titan: device 'cuda' requested but no CUDA device is visible");
  if (local_world_size <= visible) return local_rank;
  TORCH_CHECK(share_gpus, "titan: ", local_world_size, " ranks run on this node (LOCAL_WORLD_SIZE or the launcher's "
              "equivalent) but only ", visible, " GPU(s) are visible (CUDA_VISIBLE_DEVICES?): start at most ", visible,
              " ranks per node, or share GPUs deliberately with DistOptions().share_gpus(true) / TITAN_SHARE_GPUS=1 ",
              "and the Gloo backend");
  TORCH_CHECK(backend != "nccl", "titan: ", local_world_size, " ranks share ", visible, " GPU(s), which NCCL cannot ",
              "do (one rank per GPU): use the Gloo backend (DistOptions().backend(\"gloo\") or TITAN_BACKEND=gloo)");
  return local_rank % visible;
}

inline bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

/// A c10d backend named `name` ("gloo" or "nccl") over `store` for `size` ranks, on `device`.
inline c10::intrusive_ptr<c10d::Backend> make_backend(const std::string& name,
                                                      const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                      int size, std::chrono::milliseconds timeout,
                                                      int gloo_threads, const std::string& master_addr,
                                                      c10::Device device) {
  if (name == "gloo") {
#if TITAN_HAS_GLOO
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->threads = gloo_threads;
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (is_loopback(master_addr)) {
      options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
#else
    TORCH_CHECK(false, "titan: the Gloo backend needs the gloo headers at compile time "
                       "(Debian: apt-get install libgloo-dev)");
#endif
  }
  if (name == "nccl") {
#if TITAN_HAS_NCCL
    // High-priority streams, as FSDP2's; the group is bound to this rank's GPU and its
    // communicator created now, so no collective has to guess the device.
    auto options = c10d::ProcessGroupNCCL::Options::create(/*is_high_priority_stream=*/true);
    options->timeout = timeout;
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
    backend->setBoundDeviceId(device);
    backend->eagerConnectSingleDevice(device);
    return backend;
#else
    TORCH_CHECK(false, "titan: the NCCL backend needs <nccl.h> and the CUDA headers at compile time");
#endif
  }
  TORCH_CHECK(false, "titan: unknown backend '", name, "' (expected 'gloo' or 'nccl')");
}

}  // namespace titan::detail
