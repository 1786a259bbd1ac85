// SPDX-License-Identifier: Apache-2.0
// U-ViT layer kernels at the shapes of the 'small' benchmark config (B = 4, L = 337, E = 512,
// H = 8, MLP 2048; attention also at the demo config's) with FLOP and byte counters.
#include <benchmark/benchmark.h>

#include <utility>
#include <vector>

#include "unidiffuser/backend/cpu/onednn.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/nn/layers.hpp"

namespace ud = unidiffuser;
namespace kk = unidiffuser::nn::cpu_kernels;

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
  for (auto _ : st) {
#if defined(UNIDIFFUSER_WITH_ONEDNN)
    if (packed)
      gemm.linear(x.data(), M, k, k, w.data(), n, b.data(), y.data(), n, ud::onednn::Post::none);
#endif
    if (!packed) kk::linear(x.data(), M, k, k, w.data(), n, k, b.data(), y.data(), n);
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

// Args: batch, tokens, width, heads, query rows per score block (0 = all).
void BM_Attention(benchmark::State& st) {
  const std::int64_t b = st.range(0), l = st.range(1), e = st.range(2), h = st.range(3);
  const std::int64_t block = st.range(4) ? st.range(4) : l;
  const auto qkv = randn(b * l * 3 * e, 4);
  std::vector<float> out(static_cast<std::size_t>(b * l * e)),
      scores(static_cast<std::size_t>(kk::max_threads() * kk::attention_scratch(l, block, e / h)));
  for (auto _ : st) {
    kk::attention(qkv.data(), b, l, e, h, out.data(), scores.data(), block);
    benchmark::DoNotOptimize(out.data());
  }
  st.counters["FLOP/s"] =
      benchmark::Counter(4.0 * b * l * l * e, benchmark::Counter::kIsIterationInvariantRate);
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * b * l * 4 * e * 4);
}
BENCHMARK(BM_Attention)
    ->ArgNames({"B", "L", "E", "H", "block"})
    ->Args({B, L, E, H, 64})
    ->Args({B, L, E, H, 128})
    ->Args({B, L, E, H, 0})
    ->Args({16, 84, 128, 4, 0})  // the demo config
    ->Unit(benchmark::kMillisecond);

void BM_LayerNormResidual(benchmark::State& st) {
  auto x = randn(M * E, 5);
  const auto r = randn(M * E, 6), g = randn(E, 7), b = randn(E, 8);
  for (auto _ : st) {
    kk::layer_norm(x.data(), M, E, r.data(), g.data(), b.data());
    benchmark::DoNotOptimize(x.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * M * E * 3 * 4);
}
BENCHMARK(BM_LayerNormResidual)->Unit(benchmark::kMicrosecond);

void BM_BiasGelu(benchmark::State& st) {
  const auto x0 = randn(M * Hm, 9), b = randn(Hm, 10);
  auto x = x0;
  for (auto _ : st) {
    x = x0;
    kk::bias_gelu(x.data(), M, Hm, b.data());
    benchmark::DoNotOptimize(x.data());
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * M * Hm * 2 * 4);
}
BENCHMARK(BM_BiasGelu)->Unit(benchmark::kMicrosecond);
}  // namespace

BENCHMARK_MAIN();
