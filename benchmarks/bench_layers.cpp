// SPDX-License-Identifier: Apache-2.0
// The CPU backend's network primitives (ops::linear, ops::attention, ops::layer_norm, GELU),
// forward and backward, at the shapes of the 'small' benchmark config (B = 4, L = 337, E = 512,
// H = 8, MLP 2048; attention also at the demo config's) with FLOP and byte counters.
#include <benchmark/benchmark.h>

#include <utility>
#include <vector>

#include "unidiffuser/backend/cpu/nn.hpp"
#include "unidiffuser/backend/cpu/onednn.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"

namespace ud = unidiffuser;
namespace ops = unidiffuser::ops;
using Batch = ud::BatchBlock<float>;
using CBatch = ud::BatchBlock<const float>;

namespace {
constexpr std::int64_t B = 4, L = 337, E = 512, H = 8, Hm = 2048, M = B * L;

std::vector<float> randn(std::int64_t n, std::uint64_t seed) {
  std::vector<float> v(static_cast<std::size_t>(n));
  ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::RowBlock<float>(v.data(), 1, n, n),
                         ud::NoiseKey{seed, 0}, 0);
  return v;
}

// Args: k, n, GEMM path (0: Eigen; 1: oneDNN on weights packed once, outside the timing --
// builds with UNIDIFFUSER_ONEDNN only).
void BM_Linear(benchmark::State& st) {
  const std::int64_t k = st.range(0), n = st.range(1);
  auto x = randn(M * k, 1), w = randn(n * k, 2), b = randn(n, 3);
  std::vector<float> y(static_cast<std::size_t>(M * n));
#if defined(UNIDIFFUSER_WITH_ONEDNN)
  ud::onednn::Gemm gemm;
  const bool packed = st.range(2) == 1;
  if (packed && !gemm.pack(w.data(), n, k)) st.SkipWithError("layout does not fit in place");
#else
  const bool packed = false;
#endif
  const ud::Context<ud::cpu> ctx{};
  for (auto _ : st) {
#if defined(UNIDIFFUSER_WITH_ONEDNN)
    if (packed)
      gemm.linear(x.data(), M, k, k, w.data(), n, b.data(), y.data(), n, ud::onednn::Post::none);
#endif
    if (!packed)
      ops::linear<float>(ctx, CBatch(x.data(), B, L, k, k, L * k),
                         ud::RowBlock<const float>(w.data(), n, k, k), b.data(),
                         Batch(y.data(), B, L, n, n, L * n), ops::Epilogue::none);
    benchmark::DoNotOptimize(y.data());
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(2.0 * M * n * k, benchmark::Counter::kIsIterationInvariantRate);
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * (M * k + n * k + M * n) * 4);
}
void linear_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"k", "n", "onednn"});
  for (std::int64_t path = 0; path <= (ud::onednn::available ? 1 : 0); ++path)
    for (auto [k, n] : {std::pair{E, 3 * E}, {E, E}, {E, Hm}, {Hm, E}}) b->Args({k, n, path});
}
BENCHMARK(BM_Linear)->Apply(linear_args)->Unit(benchmark::kMillisecond);

// Backward of a linear layer: dx = dy W, dW += dy^T x, db += sum dy. Args: k, n.
void BM_LinearBackward(benchmark::State& st) {
  const std::int64_t k = st.range(0), n = st.range(1);
  const auto x = randn(M * k, 1), w = randn(n * k, 2), dy = randn(M * n, 3);
  std::vector<float> dx(static_cast<std::size_t>(M * k)), dw(static_cast<std::size_t>(n * k)),
      db(static_cast<std::size_t>(n));
  const ud::Context<ud::cpu> ctx{};
  for (auto _ : st) {
    ops::linear_backward<float>(
        ctx, CBatch(x.data(), B, L, k, k, L * k), ud::RowBlock<const float>(w.data(), n, k, k),
        CBatch(dy.data(), B, L, n, n, L * n), Batch(dx.data(), B, L, k, k, L * k), false,
        ud::RowBlock<float>(dw.data(), n, k, k), db.data());
    benchmark::DoNotOptimize(dw.data());
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(4.0 * M * n * k, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_LinearBackward)
    ->ArgNames({"k", "n"})
    ->Args({E, 3 * E})
    ->Args({E, Hm})
    ->Unit(benchmark::kMillisecond);

// Args: batch, tokens, width, heads.
void BM_Attention(benchmark::State& st) {
  const std::int64_t b = st.range(0), l = st.range(1), e = st.range(2), h = st.range(3);
  const auto qkv = randn(b * l * 3 * e, 4);
  std::vector<float> out(static_cast<std::size_t>(b * l * e));
  const ud::Context<ud::cpu> ctx{};
  for (auto _ : st) {
    ops::attention<float>(ctx, CBatch(qkv.data(), b, l, 3 * e, 3 * e, l * 3 * e), h,
                          Batch(out.data(), b, l, e, e, l * e));
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(4.0 * b * l * l * e, benchmark::Counter::kIsIterationInvariantRate);
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * b * l * 4 * e * 4);
}
BENCHMARK(BM_Attention)
    ->ArgNames({"B", "L", "E", "H"})
    ->Args({B, L, E, H})
    ->Args({16, 84, 128, 4})  // the demo config
    ->Unit(benchmark::kMillisecond);

// Backward of attention (P recomputed per head). Args: batch, tokens, width, heads.
void BM_AttentionBackward(benchmark::State& st) {
  const std::int64_t b = st.range(0), l = st.range(1), e = st.range(2), h = st.range(3);
  const auto qkv = randn(b * l * 3 * e, 4), dout = randn(b * l * e, 5);
  std::vector<float> dqkv(static_cast<std::size_t>(b * l * 3 * e));
  const ud::Context<ud::cpu> ctx{};
  for (auto _ : st) {
    ops::attention_backward<float>(ctx, CBatch(qkv.data(), b, l, 3 * e, 3 * e, l * 3 * e), h,
                                   CBatch(dout.data(), b, l, e, e, l * e),
                                   Batch(dqkv.data(), b, l, 3 * e, 3 * e, l * 3 * e));
    benchmark::DoNotOptimize(dqkv.data());
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(10.0 * b * l * l * e, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_AttentionBackward)
    ->ArgNames({"B", "L", "E", "H"})
    ->Args({B, L, E, H})
    ->Args({16, 84, 128, 4})
    ->Unit(benchmark::kMillisecond);

void BM_LayerNormResidual(benchmark::State& st) {
  auto x = randn(M * E, 5);
  const auto r = randn(M * E, 6), g = randn(E, 7), b = randn(E, 8);
  const ud::Context<ud::cpu> ctx{};
  for (auto _ : st) {
    ops::layer_norm<float>(ctx, CBatch(x.data(), B, L, E, E, L * E),
                           CBatch(r.data(), B, L, E, E, L * E), g.data(), b.data(),
                           Batch(x.data(), B, L, E, E, L * E), Batch{});
    benchmark::DoNotOptimize(x.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * M * E * 3 * 4);
}
BENCHMARK(BM_LayerNormResidual)->Unit(benchmark::kMicrosecond);

void BM_Gelu(benchmark::State& st) {
  const auto x0 = randn(M * Hm, 9), b = randn(Hm, 10);
  auto x = x0;
  const ud::Context<ud::cpu> ctx{};
  (void)b;
  for (auto _ : st) {
    x = x0;
    ops::gelu<float>(ctx, CBatch(x.data(), B, L, Hm, Hm, L * Hm),
                     Batch(x.data(), B, L, Hm, Hm, L * Hm));
    benchmark::DoNotOptimize(x.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * M * Hm * 2 * 4);
}
BENCHMARK(BM_Gelu)->Unit(benchmark::kMicrosecond);
}  // namespace

BENCHMARK_MAIN();
