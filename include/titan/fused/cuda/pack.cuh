#pragma once
// titan/fused/cuda/pack.cuh: 16-byte loads and stores for titan's memory-bound kernels. A thread
// that loads one bf16 element and waits for it keeps 2 bytes in flight: ~4-8 KB per multiprocessor
// at full occupancy, where HBM's bandwidth-latency product asks ~20 KB (an H100: 3.35 TB/s x ~0.8 us
// over 132 multiprocessors), so such a kernel runs at a fraction of the bandwidth. A pack of 16 bytes
// per load (8 bf16 or fp16, 4 fp32; ATen's own vectorized element-wise kernels do the same) keeps
// 8x as much in flight. A kernel takes packs where every row it reads and writes starts at a 16-byte
// boundary, and one element at a time elsewhere, with the same arithmetic either way.
#include <titan/fused/cuda/runtime.cuh>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

namespace titan::cuda::detail {

/// Elements of `T` in a 16-byte pack: 8 bf16 or fp16, 4 fp32.
template <typename T>
inline constexpr int kPackWidth = 16 / static_cast<int>(sizeof(T));

/// kWidth elements loaded or stored together: one 16-byte access for a full pack, else (fewer
/// elements, e.g. the element-at-a-time path) aligned as the element and accessed element-wise.
template <typename T, int kWidth>
struct alignas(kWidth == kPackWidth<T> ? 16 : alignof(T)) Pack {
  T v[kWidth];
};

/// The kWidth elements at `p` (16-byte aligned for a full pack).
template <int kWidth, typename T>
__device__ __forceinline__ Pack<T, kWidth> load_pack(const T* p) {
  check_aligned(p, alignof(Pack<T, kWidth>));
  return *reinterpret_cast<const Pack<T, kWidth>*>(p);
}

/// Writes `pack` to the kWidth elements at `p` (16-byte aligned for a full pack).
template <int kWidth, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kWidth>& pack) {
  check_aligned(p, alignof(Pack<T, kWidth>));
  if constexpr (kWidth == kPackWidth<T>) {  // one explicit 16-byte store: nvcc may split a pack's assignment
    uint4 words;
    memcpy(&words, &pack, sizeof(words));
    __stwb(reinterpret_cast<uint4*>(p), words);
  } else {
    *reinterpret_cast<Pack<T, kWidth>*>(p) = pack;
  }
}

/// Whether a launch can take full packs of `T`: every pointer 16-byte aligned and every count (row
/// widths and strides, in elements) a multiple of kPackWidth<T>, so that every row starts at a
/// 16-byte boundary.
template <typename T>
bool packable(std::initializer_list<const void*> pointers, std::initializer_list<int64_t> counts) {
  for (const void* p : pointers)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  for (const int64_t c : counts)
    if (c % kPackWidth<T> != 0) return false;
  return true;
}

/// Calls f(std::integral_constant<int, kPackWidth<T>>{}) when `packed`, else with kSingle, the
/// kernel's width when it takes one element (RoPE: one pair) at a time.
template <typename T, int kSingle = 1, typename F>
void with_pack_width(bool packed, const F& f) {
  if (packed)
    f(std::integral_constant<int, kPackWidth<T>>{});
  else
    f(std::integral_constant<int, kSingle>{});
}

}  // namespace titan::cuda::detail
