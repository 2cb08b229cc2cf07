#pragma once
// Shared by tests/ac and bench/ac: a stack of small transformer blocks and memory meters (CPU
// tensor storage, an accelerator's caching allocator).
#include <titan/hooks.hpp>
#include <torch/torch.h>

#include <ATen/DeviceAccelerator.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace titan_ac {

/// Sizes of one transformer block.
struct BlockOptions {
  TORCH_ARG(int64_t, dim) = 32;
  TORCH_ARG(int64_t, heads) = 4;
  TORCH_ARG(int64_t, hidden) = 128;
  /// Dropout on the attention probabilities (CPU's math attention path then) and on both
  /// residual branches; 0 turns it off.
  TORCH_ARG(double, dropout) = 0.0;
};

/// Pre-norm block: x + attention(norm(x)), then + MLP(norm(.)), attention by
/// at::scaled_dot_product_attention (causal).
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(const BlockOptions& o)
      : options(o),
        norm1(register_module("norm1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.dim()})))),
        norm2(register_module("norm2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({o.dim()})))),
        wq(register_module("wq", torch::nn::Linear(o.dim(), o.dim()))),
        wk(register_module("wk", torch::nn::Linear(o.dim(), o.dim()))),
        wv(register_module("wv", torch::nn::Linear(o.dim(), o.dim()))),
        wo(register_module("wo", torch::nn::Linear(o.dim(), o.dim()))),
        w1(register_module("w1", torch::nn::Linear(o.dim(), o.hidden()))),
        w2(register_module("w2", torch::nn::Linear(o.hidden(), o.dim()))) {}

  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t b = x.size(0), t = x.size(1), d = options.dim(), heads = options.heads();
    const double p = is_training() ? options.dropout() : 0.0;
    auto h = norm1(x);                                                 // [B, T, D]
    auto split = [&](const torch::Tensor& y) { return y.view({b, t, heads, d / heads}).transpose(1, 2); };
    auto q = split(wq(h)), k = split(wk(h)), v = split(wv(h));         // [B, H, T, D/H]
    auto a = at::scaled_dot_product_attention(q, k, v, {}, p, /*is_causal=*/true);
    a = a.transpose(1, 2).reshape({b, t, d});                          // [B, T, D]
    auto x1 = x + torch::dropout(wo(a), p, is_training());
    auto m = w2(torch::gelu(w1(norm2(x1))));                           // [B, T, D]
    return x1 + torch::dropout(m, p, is_training());
  }

  BlockOptions options;
  torch::nn::LayerNorm norm1, norm2;
  torch::nn::Linear wq, wk, wv, wo, w1, w2;
};
TORCH_MODULE(Block);

/// `n` blocks called through titan::call, then a linear head.
struct StackImpl : torch::nn::Module {
  StackImpl(int64_t n, const BlockOptions& o)
      : layers(register_module("layers", torch::nn::ModuleList())),
        head(register_module("head", torch::nn::Linear(o.dim(), o.dim()))) {
    for (int64_t i = 0; i < n; ++i) layers->push_back(Block(o));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x;
    for (const auto& layer : *layers) h = titan::call(layer->as<BlockImpl>(), h);
    return head(h);
  }
  torch::nn::ModuleList layers;
  torch::nn::Linear head;
};
TORCH_MODULE(Stack);

/// Counts the bytes of CPU tensor storage allocated while a CpuMemoryMeter is alive (and frees of
/// those allocations, whenever they happen). One per process, so storages never outlive it. Its
/// data pointers are "simple" (context == data), as kernels using raw_allocate require, so the
/// wrapped allocations are looked up by address when freed.
class CountingAllocator final : public c10::Allocator {
 public:
  static CountingAllocator& instance() {
    static CountingAllocator allocator;
    return allocator;
  }
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = inner_->allocate(n);
    void* data = inner.get();
    if (data == nullptr) return inner;  // empty: nothing to count
    const auto device = inner.device();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ += static_cast<int64_t>(n);
      peak_ = std::max(peak_, current_);
      live_.emplace(data, Block{std::move(inner), static_cast<int64_t>(n)});
    }
    return {data, data, &release, device};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
  int64_t current() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return current_;
  }
  int64_t peak() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return peak_;
  }
  void reset(c10::Allocator* inner) {
    std::lock_guard<std::mutex> lock(mutex_);
    inner_ = inner;
    current_ = 0;
    peak_ = 0;
  }

 private:
  struct Block {
    c10::DataPtr inner;
    int64_t bytes;
  };
  static void release(void* data) {
    if (data == nullptr) return;
    auto& self = instance();
    c10::DataPtr inner;  // freed outside the lock
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.live_.find(data);
      TORCH_INTERNAL_ASSERT(it != self.live_.end(), "CountingAllocator: freeing unknown pointer");
      self.current_ -= it->second.bytes;
      inner = std::move(it->second.inner);
      self.live_.erase(it);
    }
  }
  mutable std::mutex mutex_;
  c10::Allocator* inner_ = nullptr;
  int64_t current_ = 0, peak_ = 0;
  std::unordered_map<void*, Block> live_;
};

/// While alive, CPU tensors are allocated through CountingAllocator: current() is the bytes
/// allocated since construction and still live, peak() its high-water mark. Deterministic (it
/// counts tensor storage, not the process's pages); restores the previous allocator on
/// destruction.
class CpuMemoryMeter {
 public:
  CpuMemoryMeter() : previous_(c10::GetCPUAllocator()) {
    auto& counting = CountingAllocator::instance();
    TORCH_CHECK(previous_ != &counting, "CpuMemoryMeter: meters do not nest");
    counting.reset(previous_);
    c10::SetCPUAllocator(&counting, kPriority);
  }
  ~CpuMemoryMeter() { c10::SetCPUAllocator(previous_, kPriority); }
  CpuMemoryMeter(const CpuMemoryMeter&) = delete;
  CpuMemoryMeter& operator=(const CpuMemoryMeter&) = delete;
  int64_t current() const { return CountingAllocator::instance().current(); }
  int64_t peak() const { return CountingAllocator::instance().peak(); }

 private:
  static constexpr uint8_t kPriority = 255;  // above any registered CPU allocator
  c10::Allocator* previous_;
};

/// While alive, counts the bytes allocated on accelerator `device` (a GPU) since construction:
/// current() and its high-water mark peak(), from the caching allocator's statistics (allocated
/// bytes, in the allocator's rounded block sizes). Deterministic like CpuMemoryMeter; resets the
/// device's peak statistics.
class DeviceMemoryMeter {
 public:
  explicit DeviceMemoryMeter(c10::Device device) : index_(device.index()) {
    at::accelerator::resetPeakStats(index_);
    base_ = allocated().current;
  }
  int64_t current() const { return allocated().current - base_; }
  int64_t peak() const { return allocated().peak - base_; }

 private:
  c10::CachingAllocator::Stat allocated() const {
    const auto stats = at::accelerator::getDeviceStats(index_);
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
  }
  c10::DeviceIndex index_;
  int64_t base_ = 0;
};

/// Activation memory of one training step of `model` on `x` (loss: mean of squares).
struct StepMemory {
  int64_t saved = 0;  ///< bytes still allocated when forward returns: what backward keeps
  int64_t peak = 0;   ///< high-water mark over forward and backward (gradients included)
};

/// Measures a step on x's device: CpuMemoryMeter on the CPU, DeviceMemoryMeter on a GPU.
inline StepMemory measure_step(Stack& model, const torch::Tensor& x) {
  model->zero_grad();
  auto measure = [&](const auto& meter) {
    StepMemory memory;
    auto loss = model->forward(x).pow(2).mean();
    memory.saved = meter.current();
    loss.backward();
    memory.peak = meter.peak();
    return memory;
  };
  if (x.is_cpu()) return measure(CpuMemoryMeter());
  return measure(DeviceMemoryMeter(x.device()));
}

}  // namespace titan_ac
