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

inline bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

/// A c10d backend named `name` ("gloo" or "nccl") over `store` for `size` ranks.
inline c10::intrusive_ptr<c10d::Backend> make_backend(const std::string& name,
                                                      const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                      int size, std::chrono::milliseconds timeout,
                                                      int gloo_threads, const std::string& master_addr) {
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
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, options);
#else
    TORCH_CHECK(false, "titan: the NCCL backend needs <nccl.h> and the CUDA headers at compile time");
#endif
  }
  TORCH_CHECK(false, "titan: unknown backend '", name, "' (expected 'gloo' or 'nccl')");
}

}  // namespace titan::detail
