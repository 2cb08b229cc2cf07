#pragma once
// The interface every example model's root module implements: tokens in, logits out, with the
// positions context parallelism needs and the documents of packed rows for block-causal attention. Plain LibTorch; the trainer and the model registry
// (registry.hpp) drive a family through it.

#include <torch/torch.h>

namespace titan::examples {

/// A causal language model as the trainer drives it: the root module of a family (the whole model
/// or one pipeline stage of it). Its submodules go through titan::call, so parallelisms attach as
/// hooks without changing it.
class CausalLM : public torch::nn::Module {
 public:
  /// input [B, S] int64 tokens (or a later pipeline stage's [B, S, dim] hidden states); positions
  /// [S] int64, the tokens' positions when they are not 0..S-1 (this rank's part of the sequence
  /// under context parallelism), else undefined; documents [B, S] int64, the document each token
  /// belongs to in its packed row (tokens attend only within their document: block-causal), else
  /// undefined (causal over the row) -> logits [B, S, vocab] (or hidden states from a stage without
  /// the output layer).
  virtual torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& positions = {},
                                const torch::Tensor& documents = {}) = 0;
};

}  // namespace titan::examples
