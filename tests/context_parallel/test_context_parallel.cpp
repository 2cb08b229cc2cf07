// titan/context_parallel.hpp: the load-balanced sequence layout, and context-parallel attention
// (all-gather and ring) against unsharded scaled-dot-product attention on the whole sequence:
// outputs and q/k/v gradients, causal and not, MHA/GQA/MQA, sliding windows, both layouts,
// block-causal attention within the documents of packed rows. The
// context-parallel group is the world (cp = 1, 2, 4 under titan.ranks1/2/4).
#include "../support/multirank.hpp"

#include <titan/context_parallel.hpp>
#include <titan/fsdp.hpp>
#include <titan/mesh.hpp>

#include <string>
#include <vector>

namespace {

using titan::ContextParallelLayout;
using titan::ContextParallelOptions;
using titan::RotateMethod;
using titan_test::device;
using titan_test::error_of;
using titan_test::world;
using torch::Tensor;

/// The whole-sequence reference (the tests run it on the CPU in float64): SDPA with K/V repeated
/// per head group and the causal / sliding-window mask written out, within `documents` [B, S] when
/// given.
Tensor reference_attention(const Tensor& q, const Tensor& k, const Tensor& v, const ContextParallelOptions& options,
                           const Tensor& documents = {}) {
  const int64_t seq = q.size(2), groups = q.size(1) / k.size(1);
  auto pos = torch::arange(seq, torch::TensorOptions().dtype(torch::kLong).device(q.device()));
  auto distance = pos.unsqueeze(1) - pos.unsqueeze(0);  // [S, S] query - key
  auto visible = options.causal() ? distance.ge(0) : torch::ones_like(distance, torch::kBool);
  if (options.sliding_window() > 0) visible = visible.logical_and(distance.lt(options.sliding_window()));
  if (documents.defined())  // [B, 1, S, S]
    visible = visible.logical_and(documents.unsqueeze(2).eq(documents.unsqueeze(1))).unsqueeze(1);
  return at::scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), visible);
}

/// Packed rows' documents [batch, seq]: a new document starts after a token with chance 1/4 (so
/// borders fall inside chunks and across them), numbered from 0 in each row.
Tensor packed_documents(int64_t batch, int64_t seq, at::Generator& gen) {
  auto starts = at::randint(0, 4, {batch, seq}, gen, torch::kLong).eq(0);  // [B, S]
  starts.select(1, 0).fill_(false);
  return starts.to(torch::kLong).cumsum(1);
}

struct Shape {
  int64_t batch, q_heads, kv_heads, seq, head_dim;
};

/// Runs context_parallel_attention on this rank's tokens and compares output and gradients with
/// the reference's rows of this rank (block-causal over packed documents with `packed`).
void check_attention(const Shape& s, const ContextParallelOptions& options, torch::ScalarType dtype, double tol,
                     const std::string& what, bool packed = false) {
  CAPTURE(what);
  auto group = world()->group();
  const ContextParallelLayout layout(group->size(), group->rank(), options.load_balance());
  auto gen = at::detail::createCPUGenerator(7);
  auto q = at::randn({s.batch, s.q_heads, s.seq, s.head_dim}, gen, torch::kFloat64);  // [B, Hq, S, D]
  auto k = at::randn({s.batch, s.kv_heads, s.seq, s.head_dim}, gen, torch::kFloat64);  // [B, Hkv, S, D]
  auto v = at::randn({s.batch, s.kv_heads, s.seq, s.head_dim}, gen, torch::kFloat64);
  auto grad = at::randn({s.batch, s.q_heads, s.seq, s.head_dim}, gen, torch::kFloat64);
  const auto documents = packed ? packed_documents(s.batch, s.seq, gen) : Tensor();  // [B, S]

  auto qr = q.clone().requires_grad_(true), kr = k.clone().requires_grad_(true), vr = v.clone().requires_grad_(true);
  auto expected = reference_attention(qr, kr, vr, options, documents);
  expected.backward(grad);

  auto local = [&](const Tensor& t) { return layout.shard(t, 2).to(device(), dtype).requires_grad_(true); };
  auto ql = local(q), kl = local(k), vl = local(v);
  const auto local_documents = packed ? layout.shard(documents, 1).to(device()) : Tensor();  // [B, S/cp]
  auto out = titan::context_parallel_attention(ql, kl, vl, group, options, local_documents);  // [B, Hq, S/cp, D]
  CHECK(out.device() == device());
  CHECK((out.scalar_type() == dtype));
  out.backward(layout.shard(grad, 2).to(device(), dtype));
  CHECK_CLOSE(out.to(torch::kFloat64), layout.shard(expected, 2), tol);
  CHECK_CLOSE(ql.grad().to(torch::kFloat64), layout.shard(qr.grad(), 2), tol);
  CHECK_CLOSE(kl.grad().to(torch::kFloat64), layout.shard(kr.grad(), 2), tol);
  CHECK_CLOSE(vl.grad().to(torch::kFloat64), layout.shard(vr.grad(), 2), tol);
}

}  // namespace

TEST_CASE("context parallel: the load-balanced layout holds chunks r and 2cp-1-r; shard and unshard invert") {
  const ContextParallelLayout two(2, 0), two_last(2, 1);
  CHECK(two.chunks() == 4);
  CHECK(torch::equal(two.positions(8), torch::tensor({0, 1, 6, 7}, torch::kLong)));
  CHECK(torch::equal(two_last.positions(8), torch::tensor({2, 3, 4, 5}, torch::kLong)));
  const ContextParallelLayout plain(2, 1, /*load_balance=*/false);
  CHECK(plain.chunks() == 2);
  CHECK(torch::equal(plain.positions(8), torch::tensor({4, 5, 6, 7}, torch::kLong)));
  const ContextParallelLayout four(4, 1);
  CHECK(torch::equal(four.positions(16), torch::tensor({2, 3, 12, 13}, torch::kLong)));
  CHECK(torch::equal(ContextParallelLayout(1, 0).positions(5), torch::arange(5, torch::kLong)));
  CHECK(error_of([&] { two.positions(10); }).find("sequence length 10 does not split into 4 equal chunks") !=
        std::string::npos);
  CHECK(error_of([&] { ContextParallelLayout(2, 2); }).find("rank 2 is not below the degree 2") != std::string::npos);

  // unshard over the world: every rank's part back in sequence order, with the gradient.
  auto group = world()->group();
  const ContextParallelLayout layout(group->size(), group->rank());
  const int64_t seq = 4 * layout.chunks();
  auto whole = torch::arange(2 * seq, torch::kFloat64).view({2, seq}).to(device());  // [2, S]
  auto mine = layout.shard(whole, 1).clone().requires_grad_(true);                    // [2, S/cp]
  auto gathered = layout.unshard(mine, group, 1);
  CHECK(titan_test::same_values(gathered, whole));
  gathered.sum().backward();  // every rank's sum: each token's gradient is the world size
  CHECK(titan_test::same_values(mine.grad(), torch::full({2, seq / group->size()}, double(group->size()))));
}

TEST_CASE("context parallel: the pairs each rank computes (skipped, whole, causal diagonal, masked)") {
  using Mask = titan::detail::AttentionPair::Mask;
  const ContextParallelLayout layout(2, 0);  // holds positions [0, 4) and [12, 16) of 16
  const auto mine = layout.segments(16), other = layout.segments(16, 1);  // other: [4, 8) and [8, 12)
  auto own = titan::detail::attention_pairs(mine, mine, ContextParallelOptions());
  REQUIRE(own.size() == 3);  // [0,4) diagonal; [12,16) against [0,4) whole and itself diagonal
  CHECK((own[0].mask == Mask::Causal && own[0].query == 0));
  CHECK((own[1].mask == Mask::None && own[1].query == 1 && own[1].key_start == 0));
  CHECK((own[2].mask == Mask::Causal && own[2].query == 1));
  auto from_other = titan::detail::attention_pairs(mine, other, ContextParallelOptions());
  REQUIRE(from_other.size() == 1);  // only [12,16) sees [4,12), one call over both adjacent chunks
  CHECK((from_other[0].query == 1 && from_other[0].key_start == 4 && from_other[0].key_length == 8));
  // A window of 4: [12,16) sees [8,12) partly (masked), [4,8) not at all (12 - 7 >= 4).
  auto windowed = titan::detail::attention_pairs(mine, other, ContextParallelOptions().sliding_window(4));
  REQUIRE(windowed.size() == 1);
  CHECK((windowed[0].mask == Mask::Explicit && windowed[0].key_start == 8));
  CHECK(titan::detail::attention_pairs(mine, other, ContextParallelOptions().causal(false)).size() == 2);
  // Block-causal (documents): every pair needed is masked and none is joined.
  auto packed = titan::detail::attention_pairs(mine, other, ContextParallelOptions(), /*documents=*/true);
  REQUIRE(packed.size() == 2);
  CHECK((packed[0].mask == Mask::Explicit && packed[0].key_start == 4 && packed[0].key_length == 4));
  CHECK((packed[1].mask == Mask::Explicit && packed[1].key_start == 8 && packed[1].key_length == 4));
}

TEST_CASE("context parallel attention equals SDPA on the whole sequence: outputs and q, k, v gradients") {
  const int n = world()->world_size();
  for (auto method : {RotateMethod::AllGather, RotateMethod::P2P}) {
    const auto name = titan::rotate_method_name(method);
    auto options = ContextParallelOptions().rotate_method(method);
    const int64_t seq = 8 * n;  // 4 tokens per chunk
    check_attention({2, 4, 4, seq, 8}, options, torch::kFloat32, 1e-5, name + " causal MHA");
    check_attention({2, 4, 2, seq, 8}, options, torch::kFloat32, 1e-5, name + " causal GQA");
    check_attention({1, 4, 1, seq, 8}, options, torch::kFloat32, 1e-5, name + " causal MQA");
    check_attention({1, 4, 2, seq, 8}, ContextParallelOptions(options).causal(false), torch::kFloat32, 1e-5,
                    name + " full attention");
    check_attention({1, 4, 2, seq, 8}, ContextParallelOptions(options).load_balance(false), torch::kFloat32, 1e-5,
                    name + " contiguous layout");
    // Sliding window: the sequence 3x the window; the window's border cuts chunks (masked pairs)
    // and leaves some pairs wholly outside (skipped).
    const int64_t window_seq = 12 * n, window = window_seq / 3;
    check_attention({1, 4, 2, window_seq, 8}, ContextParallelOptions(options).sliding_window(window),
                    torch::kFloat32, 1e-5, name + " sliding window");
    check_attention({1, 4, 2, window_seq, 8}, ContextParallelOptions(options).sliding_window(5), torch::kFloat32,
                    1e-5, name + " sliding window of 5 (not a chunk multiple)");
    // Block-causal: packed documents whose borders fall inside and between chunks.
    check_attention({3, 4, 2, seq, 8}, options, torch::kFloat32, 1e-5, name + " block-causal GQA", true);
    check_attention({2, 4, 2, seq, 8}, ContextParallelOptions(options).load_balance(false), torch::kFloat32, 1e-5,
                    name + " block-causal, contiguous layout", true);
    check_attention({2, 4, 2, window_seq, 8}, ContextParallelOptions(options).sliding_window(5), torch::kFloat32,
                    1e-5, name + " block-causal with a sliding window", true);
    if (device().is_cpu()) {  // the CPU kernel takes float64; CUDA's memory-efficient one does not
      check_attention({1, 2, 1, seq, 4}, options, torch::kFloat64, 1e-12, name + " float64");
      check_attention({2, 2, 1, seq, 4}, options, torch::kFloat64, 1e-12, name + " block-causal float64", true);
    } else {
      auto x = torch::randn({1, 2, 4, 4}, torch::TensorOptions().dtype(torch::kFloat64).device(device()));
      CHECK(error_of([&] { titan::context_parallel_attention(x, x, x, world()->group(), options); })
                .find("on CUDA takes float32, float16 or bfloat16, got Double") != std::string::npos);
    }
  }
}

TEST_CASE("context parallel attention rejects bad shapes, naming them") {
  auto group = world()->group();
  auto q = torch::randn({1, 4, 3, 8}, device()), kv = torch::randn({1, 3, 3, 8}, device());
  CHECK(error_of([&] { titan::context_parallel_attention(q, kv, kv, group); }).find("4 query heads are not a multiple "
                                                                                  "of 3 key/value heads") !=
        std::string::npos);
  auto q3 = torch::randn({1, 3, 8}, device());
  CHECK(error_of([&] { titan::context_parallel_attention(q3, q3, q3, group); }).find("[batch, heads, local seq") !=
        std::string::npos);
  if (world()->world_size() > 1) {  // 3 local tokens: a sequence of 3 * cp does not split into 2 * cp chunks
    auto odd = torch::randn({1, 2, 3, 8}, device());
    CHECK(error_of([&] { titan::context_parallel_attention(odd, odd, odd, group); }).find("does not split into") !=
          std::string::npos);
  }
  CHECK(error_of([] { titan::parse_rotate_method("ring"); }).find("'ring' (expected one of: allgather, p2p)") !=
        std::string::npos);
  auto x = torch::randn({2, 2, 4, 8}, device());
  CHECK(error_of([&] { titan::context_parallel_attention(x, x, x, group, {}, torch::zeros({2, 5}, torch::kLong)); })
            .find("documents must be integers [batch, local seq] = [2, 4]") != std::string::npos);
  CHECK(error_of([&] { titan::context_parallel_attention(x, x, x, group, {}, torch::zeros({2, 4})); })
            .find("got Float [2, 4]") != std::string::npos);
}

namespace {
/// An attention core as a model writes it: forward(q, k, v) is causal SDPA, within the rows'
/// documents [B, S] when given.
struct CoreImpl : torch::nn::Module {
  Tensor forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& documents = {}) {
    if (!documents.defined()) return at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
    return reference_attention(q, k, v, ContextParallelOptions(), documents);
  }
};
TORCH_MODULE(Core);
struct BlockImpl : torch::nn::Module {
  BlockImpl() { core = register_module("core", Core()); }
  Core core{nullptr};
};
TORCH_MODULE(Block);
}  // namespace

TEST_CASE("apply_context_parallel: the core's titan::call computes context-parallel attention") {
  auto group = world()->group();
  torch::nn::ModuleList model;
  model->push_back(Block());
  model->push_back(Block());
  CHECK(titan::apply_context_parallel(*model, "*.core", group, ContextParallelOptions().rotate_method(RotateMethod::P2P)) ==
        2);
  CHECK(error_of([&] { titan::apply_context_parallel(*model, "*.attention", group); }).find("no module matches "
                                                                                           "'*.attention'") !=
        std::string::npos);
  const ContextParallelLayout layout(group->size(), group->rank());
  auto gen = at::detail::createCPUGenerator(3);
  auto q = at::randn({1, 2, 4 * layout.chunks(), 8}, gen, torch::kFloat32);  // [B, H, S, D]
  auto expected = at::scaled_dot_product_attention(q, q, q, {}, 0.0, true);
  auto core = model[0]->as<BlockImpl>()->core;
  auto local = layout.shard(q, 2).to(device());
  CHECK_CLOSE(titan::call(core, local, local, local), layout.shard(expected, 2), 1e-5);
  // A fourth tensor: the local tokens' documents (block-causal attention).
  auto documents = packed_documents(1, q.size(2), gen);  // [1, S]
  auto within = reference_attention(q, q, q, ContextParallelOptions(), documents);
  CHECK_CLOSE(titan::call(core, local, local, local, layout.shard(documents, 1).to(device())), layout.shard(within, 2),
              1e-5);
}

namespace {
/// A projection with parameters in front of the attention core, taking positions as a model under
/// context parallelism must (it has no position embedding to index with them).
struct ProjectedImpl : torch::nn::Module {
  ProjectedImpl() {
    proj = register_module("proj", torch::nn::Linear(8, 8));
    core = register_module("core", Core());
  }
  Tensor forward(const Tensor& x, const Tensor& positions) {  // x [B, S / cp, 8], positions [S / cp]
    auto q = titan::call(proj, x).unsqueeze(1);                // [B, 1, S / cp, 8]
    return titan::call(core, q, q, q);
  }
  torch::nn::Linear proj{nullptr};
  Core core{nullptr};
};
TORCH_MODULE(Projected);
}  // namespace

namespace {
/// A model taking tokens ([B, S / cp], or [S / cp] for one sequence) and their positions.
struct EmbeddedImpl : torch::nn::Module {
  EmbeddedImpl() {
    wte = register_module("wte", torch::nn::Embedding(16, 8));
    core = register_module("core", Core());
  }
  Tensor forward(const Tensor& tokens, const Tensor& positions) {                      // [.., S / cp], [S / cp]
    auto q = titan::call(wte, tokens).reshape({-1, positions.size(-1), 8}).unsqueeze(1);  // [B, 1, S / cp, 8]
    return titan::call(core, q, q, q);
  }
  torch::nn::Embedding wte{nullptr};
  Core core{nullptr};
};
TORCH_MODULE(Embedded);
}  // namespace

TEST_CASE("apply_context_parallel: tokens cut as a contiguous view of the batch are an error") {
  if (world()->world_size() < 2) return;  // a group of one rank attaches nothing
  auto group = world()->group();
  const ContextParallelLayout layout(group->size(), group->rank());
  const int64_t local = 2 * layout.chunks() / layout.degree(), seq = local * layout.degree();
  const auto positions = layout.positions(seq, torch::TensorOptions().device(device()));  // [S / cp]
  const auto buffer = torch::randint(16, {2, seq + 1}, torch::TensorOptions().dtype(torch::kLong).device(device()));
  const auto batch = buffer.narrow(1, 0, seq).contiguous();  // [B, S]
  torch::NoGradGuard no_grad;  // evaluation: no gradient reduction to check
  auto cp_model = [&](const ContextParallelOptions& options) {  // checks its first call that does not fail
    Embedded model;
    model->to(device());
    titan::apply_context_parallel(*model, "core", group, options);
    return model;
  };
  auto model = cp_model({});
  const std::string range = "are tokens [" + std::to_string(group->rank() * local) + ", " +
                            std::to_string((group->rank() + 1) * local) + ") of sequences of " +
                            std::to_string(seq) + " on rank " + std::to_string(group->rank()) +
                            ", a contiguous slice of the batch";
  const auto message = error_of([&] { titan::call(model, batch.narrow(1, group->rank() * local, local), positions); });
  CHECK(message.find(range) != std::string::npos);
  CHECK(message.find("the load-balanced layout gives rank " + std::to_string(group->rank()) + " of " +
                     std::to_string(layout.degree()) + " the chunks " + std::to_string(group->rank()) + " and " +
                     std::to_string(layout.chunks() - 1 - group->rank()) + " of " + std::to_string(layout.chunks()) +
                     ": cut the batch with ContextParallelLayout::shard") != std::string::npos);
  // A [B, S + 1] buffer of inputs and labels cut by chunk; one sequence cut by narrow.
  CHECK(error_of([&] { titan::call(model, buffer.narrow(1, 0, seq).chunk(layout.degree(), 1)[group->rank()], positions); })
            .find(range) != std::string::npos);
  CHECK(error_of([&] { titan::call(model, batch[0].narrow(0, group->rank() * local, local), positions); })
            .find(range) != std::string::npos);
  // Rank 0's shard in the first columns of a reused [B, S] buffer starts where its contiguous cut
  // would, but the other ranks' do not: no error on any rank.
  auto reused = torch::zeros_like(batch);
  reused.narrow(1, 0, local).copy_(layout.shard(batch, 1));
  CHECK_NOTHROW(titan::call(model, reused.narrow(1, 0, local), positions));
  CHECK_NOTHROW(titan::call(cp_model({}), layout.shard(batch, 1), positions));
  // The contiguous layout on both sides takes exactly such a slice.
  const ContextParallelLayout contiguous(group->size(), group->rank(), false);
  CHECK_NOTHROW(titan::call(cp_model(ContextParallelOptions().load_balance(false)),
                            batch.narrow(1, group->rank() * local, local), contiguous.positions(seq, positions.options())));
}

TEST_CASE("apply_context_parallel: missing or contiguous positions, and gradients not summed over cp, are errors") {
  if (world()->world_size() < 2) return;  // a group of one rank attaches nothing
  auto group = world()->group();
  torch::manual_seed(0);
  Projected model;
  model->to(device());
  titan::apply_context_parallel(*model, "core", group);
  const ContextParallelLayout layout(group->size(), group->rank());
  const int64_t local = 2 * layout.chunks() / layout.degree(), seq = local * layout.degree();
  auto x = torch::randn({1, local, 8}, device());  // [B, S / cp, 8]
  CHECK(error_of([&] { titan::call(model, x, Tensor()); })
            .find("was called without this rank's positions (its tensors: Float [1, " + std::to_string(local) +
                  ", 8], undefined)") !=
        std::string::npos);
  const auto contiguous = torch::arange(group->rank() * local, (group->rank() + 1) * local, torch::kLong).to(device());
  CHECK(error_of([&] { titan::call(model, x, contiguous); })
            .find(") are not this rank's positions of a sequence of " + std::to_string(seq) + " tokens in the "
                  "load-balanced layout") != std::string::npos);
  const auto positions = layout.positions(seq, x.options());  // [S / cp]
  CHECK(error_of([&] { titan::call(model, x, positions); })
            .find("2 trainable parameter(s) of '(anonymous namespace)::ProjectedImpl' ('proj.weight', 'proj.bias') "
                  "have no gradient reduction over the context-parallel ranks") != std::string::npos);
  {
    torch::NoGradGuard no_grad;  // evaluation reduces no gradient: nothing to check
    CHECK_NOTHROW(titan::call(model, x, positions));
  }
  titan::DeviceMesh mesh(world(), {"cp"}, {world()->world_size()});
  titan::fully_shard(model, mesh["cp"]);  // FSDP over the cp ranks sums their gradients
  CHECK_NOTHROW(titan::call(model, x, positions).sum().backward());
}
