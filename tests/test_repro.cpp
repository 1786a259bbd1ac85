// SPDX-License-Identifier: Apache-2.0
// Reproducibility: a sample's output is bit-identical whatever the batch size, its position in
// the batch and the thread count, in every official mode (docs/NOTES.md, "Reproducibility").
#include <doctest/doctest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

#include "support.hpp"

namespace ud = unidiffuser;

namespace {
constexpr std::int64_t kMaxBatch = 6;

// An official v1 layout of 84 tokens, E = 96 (3 heads of 32): large enough that the products
// take Eigen's blocked GEMM paths, where the rounding of a row used to depend on the rows and
// threads around it (this test failed on the forward before per-sample calls).
ud::nn::UViTConfig small_config() {
  return ud::nn::UViTConfig::official("v1", /*img_size=*/16, /*in_chans=*/4, /*patch_size=*/2,
                                      /*embed_dim=*/96, /*depth=*/2, /*num_heads=*/3, 4.0, false,
                                      false, /*text_dim=*/16, /*num_text_tokens=*/16,
                                      /*clip_img_dim=*/32);
}

// Head dim 15: attention takes the blocked Eigen path (not the register tiles), whose vectorised
// reductions depend on alignment -- per-thread scratch and per-sample slots must keep it fixed.
ud::nn::UViTConfig odd_head_config() {
  return ud::nn::UViTConfig::official("v1", 8, 4, 2, /*embed_dim=*/90, 2, /*num_heads=*/6, 4.0,
                                      false, false, 8, 5, 12);
}

struct Fixture {
  ud::nn::UViT<float> net{small_config()};
  ud::GroupLayout<2> layout = net.config().layout<2>();
  // clean conditions of kMaxBatch samples (rows differ, so a mix-up between samples shows)
  std::array<ud::Tensor<float>, 2> cond;
  Fixture() {
    net.init_random(7, 0.1);
    for (std::size_t g = 0; g < 2; ++g) {
      cond[g] = ud::Tensor<float>(ud::Shape{kMaxBatch, layout.size(g)});
      ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(cond[g].view()),
                             ud::NoiseKey{99, g}, 0);
    }
  }
  // Every group the mode produces, [batch, D_g] each, flattened per group.
  // `batched`: the guidance reference calls in the main call's forward (the default) or apart.
  std::array<std::vector<float>, 2> run(ud::Mode mode, std::int64_t batch, bool batched = true) {
    ud::nn::UViTPredictor<float, 2> model(net, 1);
    ud::PhiloxNoise noise(1234);
    ud::DpmSolverOptions o;  // official: DPM-Solver++ "fast", order 3
    o.steps = 4;
    const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
    const ud::DpmSolver<float> solver(ns, o);
    ud::GuidanceOptions g;  // official scale 7, true_uncond: several forwards per step
    g.batch_references = batched;
    std::array<ud::TensorView<const float>, 2> cv;
    for (std::size_t k = 0; k < 2; ++k)
      cv[k] = ud::TensorView<const float>(cond[k].data(), ud::Shape{batch, layout.size(k)});
    const auto r = ud::sample_mode<float>(ud::Context<ud::cpu>{}, model, noise, layout, mode, g,
                                          solver, batch, cv);
    std::array<std::vector<float>, 2> out;
    for (std::size_t k = 0; k < 2; ++k) out[k].assign(r[k].begin(), r[k].end());
    return out;
  }
};

void set_threads(int t) {
#if defined(_OPENMP)
  omp_set_num_threads(t);
#else
  (void)t;
#endif
}
}  // namespace

TEST_CASE("every sample is bit-identical for batch sizes 1-6 and 1-4 threads, in every mode") {
  Fixture fx;
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  const std::vector<int> thread_counts{1, 2, 3, 4};
#else
  const std::vector<int> thread_counts{1};
  MESSAGE("built without OpenMP: only the batch sizes vary");
#endif
  using M = ud::Mode;
  for (M mode : {M::joint, M::t2i, M::i2t, M::i, M::t, M::i2t2i, M::t2i2t}) {
    CAPTURE(std::string(ud::mode_name(mode)));
    set_threads(1);
    const auto ref = fx.run(mode, kMaxBatch);  // the reference: all six samples, one thread
    bool produced = false;
    for (std::size_t k = 0; k < 2; ++k) produced = produced || !ref[k].empty();
    REQUIRE(produced);
    // the samples differ from each other (a run that repeated sample 0 would not be caught)
    for (std::size_t k = 0; k < 2; ++k)
      if (!ref[k].empty()) {
        const std::size_t d = ref[k].size() / kMaxBatch;
        CHECK(std::memcmp(ref[k].data(), ref[k].data() + d, d * sizeof(float)) != 0);
      }
    for (int t : thread_counts) {
      set_threads(t);
      for (std::int64_t batch = 1; batch <= kMaxBatch; ++batch) {
        CAPTURE(t);
        CAPTURE(batch);
        const auto got = fx.run(mode, batch);
        for (std::size_t k = 0; k < 2; ++k) {
          REQUIRE(got[k].size() * kMaxBatch == ref[k].size() * batch);
          if (got[k].empty()) continue;  // a group this mode does not produce
          // sample b of this run against sample b of the reference, bit for bit
          CHECK(std::memcmp(got[k].data(), ref[k].data(), got[k].size() * sizeof(float)) == 0);
        }
      }
    }
  }
#if defined(_OPENMP)
  set_threads(saved);
#endif
}

TEST_CASE("the reference calls batched with the main call give the separate calls' samples") {
  // the U-ViT computes each row on its own, so a forward of (1 + R) B rows is R + 1 forwards of B
  Fixture fx;
  using M = ud::Mode;
  for (M mode : {M::joint, M::t2i, M::i2t, M::i2t2i, M::t2i2t}) {
    CAPTURE(std::string(ud::mode_name(mode)));
    const auto batched = fx.run(mode, 3, true), separate = fx.run(mode, 3, false);
    for (std::size_t k = 0; k < 2; ++k) {
      REQUIRE(batched[k].size() == separate[k].size());
      if (batched[k].empty()) continue;  // a group this mode does not produce (no memcmp on null)
      CHECK(std::memcmp(batched[k].data(), separate[k].data(), batched[k].size() * sizeof(float)) ==
            0);
    }
  }
}

TEST_CASE("a forward output does not depend on the sample's position, neighbours or threads") {
  // fp32, and bf16 where this build and CPU have it (MathMode::bf16)
  for (const auto math : ud::testing::cpu_math_modes())
    for (const auto& cfg : {small_config(), odd_head_config()}) {
      CAPTURE(cfg.embed_dim);
      CAPTURE(static_cast<int>(math));
      ud::nn::UViT<float> net(cfg);
      net.init_random(11, 0.1);
      constexpr std::int64_t B = 5;
      const auto& C = cfg.components;
      std::vector<std::vector<float>> x(C.size());  // canonical order: sample b is row b
      for (std::size_t k = 0; k < C.size(); ++k) {
        x[k].resize(static_cast<std::size_t>(B * C[k].numel()));
        for (std::size_t i = 0; i < x[k].size(); ++i)
          x[k][i] = static_cast<float>(ud::philox_normal(5, k, 0, i));
      }
      const std::vector<double> t0{10, 250, 999, 1, 600}, t1{1000, 3, 420, 777, 0};
      const std::vector<std::int64_t> dt{1, 0, 1, 1, 0};
      // outputs of the samples `order` (row r of the batch is sample order[r]), put back in
      // canonical order
      auto run = [&](const std::vector<std::int64_t>& order, int threads) {
        set_threads(threads);
        const auto nb = static_cast<std::int64_t>(order.size());
        std::vector<std::vector<float>> xin(C.size()), out(C.size());
        std::vector<double> a, b;
        std::vector<std::int64_t> d;
        for (std::int64_t s : order) {
          a.push_back(t0[static_cast<std::size_t>(s)]);
          b.push_back(t1[static_cast<std::size_t>(s)]);
          d.push_back(dt[static_cast<std::size_t>(s)]);
        }
        ud::nn::UViTInputs<float> in;
        std::vector<ud::RowBlock<float, ud::cpu>> ob;
        for (std::size_t k = 0; k < C.size(); ++k) {
          const std::int64_t n = C[k].numel();
          for (std::int64_t s : order)
            xin[k].insert(xin[k].end(), x[k].begin() + s * n, x[k].begin() + (s + 1) * n);
          out[k].assign(static_cast<std::size_t>(nb * n), 0.f);
          in.x.push_back(ud::RowBlock<const float, ud::cpu>(xin[k].data(), nb, n, n));
          ob.push_back(ud::RowBlock<float, ud::cpu>(out[k].data(), nb, n, n));
        }
        in.t = {std::span<const double>(a), std::span<const double>(b)};
        in.data_type = d;
        net.forward(ud::Context<ud::cpu>{0, math}, in, ob);
        std::vector<std::vector<float>> canon(C.size());
        for (std::size_t k = 0; k < C.size(); ++k) {
          const std::int64_t n = C[k].numel();
          canon[k].assign(static_cast<std::size_t>(B * n), 0.f);
          for (std::int64_t r = 0; r < nb; ++r)
            std::copy_n(out[k].begin() + r * n, n,
                        canon[k].begin() + order[static_cast<std::size_t>(r)] * n);
        }
        return canon;
      };
      const auto ref = run({0, 1, 2, 3, 4}, 1);
      for (int t : {1, 2, 3, 4}) {
        CAPTURE(t);
        for (const auto& order : std::vector<std::vector<std::int64_t>>{
                 {4, 3, 2, 1, 0}, {2, 0, 4, 1, 3}, {3, 1}, {1, 3}, {4}, {0, 1, 2, 3, 4}}) {
          CAPTURE(order.size());
          const auto got = run(order, t);
          for (std::size_t k = 0; k < C.size(); ++k) {
            const std::int64_t n = C[k].numel();
            for (std::int64_t s : order)
              CHECK(std::memcmp(got[k].data() + s * n, ref[k].data() + s * n,
                                static_cast<std::size_t>(n) * sizeof(float)) == 0);
          }
        }
      }
    }
  set_threads(1);
}
