// SPDX-License-Identifier: Apache-2.0
// Schedules, time grids, the time embedding, the forward process and the objective.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "unidiffuser/diffusion/forward.hpp"
#include "unidiffuser/diffusion/objective.hpp"
#include "unidiffuser/nn/time_embedding.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"
#include "unidiffuser/sampler/timesteps.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace ud = unidiffuser;

TEST_CASE("scaled-linear schedule reproduces the reference table (SAMPLERS.md 2.3)") {
  const auto d = ud::DiscreteSchedule::stable_diffusion();
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  struct Row {
    int n;
    double beta, abar, alpha, sigma, lambda;
  };
  const Row rows[] = {{1, 0.0008500000, 0.9991500000, 0.99957491, 0.02915476, 3.534712},
                      {100, 0.0013779918, 0.8954627735, 0.94628895, 0.32332217, 1.073899},
                      {500, 0.0048037930, 0.2776696505, 0.52694369, 0.84990020, -0.478025},
                      {999, 0.0119823763, 0.0047166989, 0.06867823, 0.99763886, -2.675959},
                      {1000, 0.0120000000, 0.0046600985, 0.06826491, 0.99766723, -2.682024}};
  for (const auto& r : rows) {
    CHECK(d.betas()[static_cast<std::size_t>(r.n - 1)] == doctest::Approx(r.beta).epsilon(1e-8));
    CHECK(d.abar(r.n) == doctest::Approx(r.abar).epsilon(1e-9));
    const double t = r.n / 1000.0;
    CHECK(ns.marginal_alpha(t) == doctest::Approx(r.alpha).epsilon(1e-7));
    CHECK(ns.marginal_std(t) == doctest::Approx(r.sigma).epsilon(1e-6));
    CHECK(ns.marginal_lambda(t) == doctest::Approx(r.lambda).epsilon(1e-6));
  }
  CHECK(d.abar(0) == 1.0);
  CHECK(ud::DiscreteSchedule(ud::linear_betas()).abar(1000) ==
        doctest::Approx(4.0358e-5).epsilon(1e-4));
}

TEST_CASE("rescale_terminal: level 1 kept, level N at the target, sqrt(abar) affine in between") {
  const auto base = ud::scaled_linear_betas();
  const ud::DiscreteSchedule d(base);
  const double target = d.sqrt_abar(1000) / 4;
  const ud::DiscreteSchedule r(ud::rescale_terminal(base, target));
  CHECK(r.betas()[0] == base[0]);
  CHECK(r.sqrt_abar(1000) == doctest::Approx(target).epsilon(1e-12));
  // (s'_n - s'_N) / (s_n - s_N) is one constant (Lin et al. 2024, Algorithm 1)
  const double gain = (r.sqrt_abar(1) - target) / (d.sqrt_abar(1) - d.sqrt_abar(1000));
  for (int n : {2, 100, 500, 999})
    CHECK((r.sqrt_abar(n) - target) / (d.sqrt_abar(n) - d.sqrt_abar(1000)) ==
          doctest::Approx(gain).epsilon(1e-10));
  for (double b : r.betas()) CHECK((b > 0 && b < 1));
  // mid-range levels move little: level 500 keeps sqrt(abar) within 0.03 of the official 0.527
  CHECK(std::abs(r.sqrt_abar(500) - d.sqrt_abar(500)) < 0.03);
  // a larger target than the original end is allowed (the map still increases)
  CHECK(ud::DiscreteSchedule(ud::rescale_terminal(base, 0.2)).sqrt_abar(1000) ==
        doctest::Approx(0.2).epsilon(1e-12));
  const auto msg = [&](double t, std::vector<double> b) {
    try {
      (void)ud::rescale_terminal(b, t);
    } catch (const ud::error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(msg(0.0, base).find("rescale_terminal") != std::string::npos);
  CHECK(msg(0.0, base).find("terminal") != std::string::npos);
  CHECK(msg(std::nan(""), base).find("terminal") != std::string::npos);
  CHECK(msg(d.sqrt_abar(1), base).find("(0, sqrt(abar_1)") != std::string::npos);
  CHECK(msg(0.01, {0.1}).find("betas") != std::string::npos);
  CHECK(msg(0.01, {0.1, 1.0}).find("betas[1]") != std::string::npos);
}

TEST_CASE("the official float32 table reproduces the reference log alpha (SAMPLERS.md 4.1)") {
  const auto f32 = ud::VPSchedule::unidiffuser();
  const auto f64 = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  CHECK(static_cast<float>(f32.log_alpha_knots()[0]) == -0.00042519165f);
  CHECK(f64.log_alpha_knots()[0] == doctest::Approx(-0.00042518073).epsilon(1e-7));
  CHECK(f32.marginal_lambda(1.0) == doctest::Approx(-2.6820242).epsilon(1e-6));
  CHECK(f32.marginal_std(0.001) == doctest::Approx(0.029155133).epsilon(2e-6));
}

TEST_CASE("inverse lambda inverts lambda, for every schedule kind") {
  for (const auto& ns :
       {ud::VPSchedule::unidiffuser(), ud::VPSchedule::unidiffuser(ud::TablePrecision::float64),
        ud::VPSchedule::continuous_linear(), ud::VPSchedule::cosine()}) {
    for (double t = 0.002; t < ns.T(); t += 0.0371)
      CHECK(ns.inverse_lambda(ns.marginal_lambda(t)) == doctest::Approx(t).epsilon(1e-9));
    CHECK(ns.marginal_alpha(0.3) * ns.marginal_alpha(0.3) +
              ns.marginal_std(0.3) * ns.marginal_std(0.3) ==
          doctest::Approx(1.0));
  }
}

TEST_CASE("the official 50-step grid and its per-step ratios (SAMPLERS.md 11)") {
  ud::DpmSolverOptions o;  // official defaults
  const ud::DpmSolver<float> s(ud::VPSchedule::unidiffuser(), o);
  const auto& g = s.timesteps();
  REQUIRE(g.size() == 51);
  CHECK(g[0] == 1.0);
  CHECK(static_cast<float>(g[1]) == doctest::Approx(0.98002f));
  CHECK(static_cast<float>(g[50]) == 0.001f);
  for (int k = 0; k < 50; ++k)
    CHECK(1000 * g[static_cast<std::size_t>(k)] == doctest::Approx(1000 - 19.98 * k).epsilon(1e-6));
  const auto& ns = s.schedule();
  const double h1 = ns.marginal_lambda(g[3]) - ns.marginal_lambda(g[0]);
  CHECK(h1 == doctest::Approx(0.348633).epsilon(1e-5));
  CHECK((ns.marginal_lambda(g[1]) - ns.marginal_lambda(g[0])) / h1 ==
        doctest::Approx(0.342913).epsilon(1e-5));
  const double hl = ns.marginal_lambda(g[50]) - ns.marginal_lambda(g[48]);
  CHECK(hl == doctest::Approx(1.919994).epsilon(1e-5));
  CHECK(s.nfe() == 50);
}

TEST_CASE("time grids: end points, monotonicity, and the quadratic grids") {
  const auto ns = ud::VPSchedule::unidiffuser();
  for (auto sp : {ud::Spacing::time_uniform, ud::Spacing::logSNR, ud::Spacing::time_quadratic,
                  ud::Spacing::t2}) {
    const auto g = ud::time_steps(ns, sp, 1.0, 1e-3, 10);
    REQUIRE(g.size() == 11);
    CHECK(g.front() == doctest::Approx(1.0).epsilon(1e-6));
    CHECK(g.back() == doctest::Approx(1e-3).epsilon(1e-3));
    for (std::size_t k = 1; k < g.size(); ++k) CHECK(g[k] < g[k - 1]);
  }
  const auto q = ud::time_steps(ns, ud::Spacing::time_quadratic, 1.0, 1e-3, 10);
  const auto t2 = ud::time_steps(ns, ud::Spacing::t2, 1.0, 1e-3, 10);
  for (std::size_t k = 0; k < q.size(); ++k) CHECK(std::abs(q[k] - t2[k]) < 2e-6);
  CHECK_THROWS_AS(ud::time_steps(ns, ud::Spacing::time_uniform, 1.0, 1e-3, 0), ud::error);
  CHECK_THROWS_AS(ud::time_steps(ns, ud::Spacing::time_uniform, 1e-3, 1.0, 5), ud::error);
}

TEST_CASE("time embedding: cos block first, zero pad for odd dims, float32 recipe") {
  ud::Tensor<float> t(ud::Shape{2});
  t[0] = 0.f;
  t[1] = 1000.f;
  ud::Tensor<float> e(ud::Shape{2, 7});
  ud::nn::timestep_embedding<float>(ud::Context<ud::cpu>{}, t.view(), e.view());
  for (int k = 0; k < 3; ++k) {
    CHECK(e(0, k) == 1.f);
    CHECK(e(0, 3 + k) == 0.f);
  }
  CHECK(e(1, 6) == 0.f);
  CHECK(e(1, 0) == doctest::Approx(std::cos(1000.0)));
  ud::Tensor<float> bad(ud::Shape{3, 7});
  CHECK_THROWS_AS(ud::nn::timestep_embedding<float>(ud::Context<ud::cpu>{}, t.view(), bad.view()),
                  ud::error);
}

TEST_CASE("forward process: level 0 is clean, level n mixes with sqrt(abar_n), per sample") {
  const auto d = ud::DiscreteSchedule::stable_diffusion();
  ud::Tensor<double> x0(ud::Shape{3, 4}), eps(ud::Shape{3, 4}), xn(ud::Shape{3, 4});
  for (int i = 0; i < 12; ++i) x0[i] = 1.0 + i, eps[i] = -0.5 * i;
  const std::vector<std::int64_t> levels{0, 500, 1000};
  ud::q_sample<double>(ud::Context<ud::cpu>{}, d, x0.view(), eps.view(), levels, xn.view());
  for (int j = 0; j < 4; ++j) {
    CHECK(xn(0, j) == x0(0, j));
    CHECK(xn(1, j) == doctest::Approx(std::sqrt(d.abar(500)) * x0(1, j) +
                                      std::sqrt(1 - d.abar(500)) * eps(1, j)));
  }
  const std::vector<std::int64_t> bad{0, 1001, 3};
  CHECK_THROWS_AS(
      ud::q_sample<double>(ud::Context<ud::cpu>{}, d, x0.view(), eps.view(), bad, xn.view()),
      ud::error);
  const std::vector<std::int64_t> short_levels{1, 2};
  CHECK_THROWS_AS(ud::q_sample<double>(ud::Context<ud::cpu>{}, d, x0.view(), eps.view(),
                                       short_levels, xn.view()),
                  ud::error);
}

TEST_CASE("training levels are uniform on 1..N, independent across groups and batch splits") {
  const auto a = ud::draw_levels<2>(5, 0, 40000, 1000);
  const auto b = ud::draw_levels<2>(5, 0, 10, 1000, 100);  // samples 100..109
  for (int i = 0; i < 10; ++i)
    CHECK(b[1][static_cast<std::size_t>(i)] == a[1][static_cast<std::size_t>(100 + i)]);
  double mean = 0, corr = 0;
  std::int64_t lo = 1001, hi = 0;
  for (std::size_t i = 0; i < a[0].size(); ++i) {
    lo = std::min(lo, a[0][i]);
    hi = std::max(hi, a[0][i]);
    mean += static_cast<double>(a[0][i]);
    corr += (static_cast<double>(a[0][i]) - 500.5) * (static_cast<double>(a[1][i]) - 500.5);
  }
  mean /= 40000;
  corr /= 40000 * (1000.0 * 1000.0 - 1) / 12;
  CHECK(lo == 1);
  CHECK(hi == 1000);
  CHECK(std::abs(mean - 500.5) < 5 * 288.7 / 200);
  CHECK(std::abs(corr) < 5 / 200.0);
}

TEST_CASE("the loss is the mean over all concatenated elements, not the mean of group MSEs") {
  ud::Tensor<double> p0(ud::Shape{2, 3}), e0(ud::Shape{2, 3}), p1(ud::Shape{2, 1}),
      e1(ud::Shape{2, 1});
  for (int i = 0; i < 6; ++i) p0[i] = 1, e0[i] = 0;  // squared error 1 on 6 elements
  for (int i = 0; i < 2; ++i) p1[i] = 3, e1[i] = 0;  // squared error 9 on 2 elements
  const auto l = ud::unidiffuser_loss<double, 2>(ud::Context<ud::cpu>{}, {p0.view(), p1.view()},
                                                 {e0.view(), e1.view()});
  CHECK(l.loss == doctest::Approx((6 * 1 + 2 * 9) / 8.0));
  CHECK(l.per_group_mse[0] == 1);
  CHECK(l.per_group_mse[1] == 9);
  CHECK(l.per_sample[0] == doctest::Approx((3 + 9) / 4.0));
}
