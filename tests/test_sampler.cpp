// SPDX-License-Identifier: Apache-2.0
// Samplers: convergence orders, algebraic identities between samplers, drivers and validation.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "unidiffuser/sampler/ddim.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

namespace ud = unidiffuser;

namespace {

// A smooth analytic noise model eps(x, t) = tanh(x W + t c) + 0.3 x, on [B = 2, 6].
struct Smooth {
  int calls = 0;
  void operator()(ud::TensorView<const double> x, double t, ud::TensorView<double> out) {
    ++calls;
    for (std::int64_t b = 0; b < x.dim(0); ++b)
      for (std::int64_t j = 0; j < x.dim(1); ++j) {
        double acc = 0;
        for (std::int64_t k = 0; k < x.dim(1); ++k)
          acc += x(b, k) * 0.35 *
                 std::sin(1.0 + 0.7 * static_cast<double>(j) - 1.3 * static_cast<double>(k));
        out(b, j) = std::tanh(acc + t * (0.5 - 0.2 * static_cast<double>(j))) + 0.3 * x(b, j);
      }
  }
};

ud::Tensor<double> initial() {
  ud::Tensor<double> x(ud::Shape{2, 6});
  for (std::int64_t i = 0; i < x.size(); ++i)
    x[i] = std::sin(1.7 * static_cast<double>(i) + 0.3) * 1.2;
  return x;
}

template <class Solver>
std::vector<double> solve(const Solver& s, int* nfe = nullptr) {
  auto x = initial();
  Smooth m;
  auto ws = s.make_workspace(2, 6);
  s.sample(ud::Context<ud::cpu>{}, x.view(), m, ws);
  if (nfe) *nfe = m.calls;
  return {x.begin(), x.end()};
}

double dist(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// A smooth schedule (no knots) so that the asymptotic order is visible.
ud::VPSchedule smooth_schedule() {
  return ud::VPSchedule::continuous_linear();
}

ud::DpmSolverOptions base(ud::SolverMethod m, int order, bool x0, int steps) {
  ud::DpmSolverOptions o;
  o.method = m;
  o.order = order;
  o.predict_x0 = x0;
  o.steps = steps;
  o.skip_type = ud::Spacing::logSNR;
  o.eps = 1e-3;
  return o;
}

std::vector<double> reference_solution() {
  // singlestep order 3 with 3 x 2000 evaluations: error far below the coarse runs'
  return solve(
      ud::DpmSolver<double>(smooth_schedule(), base(ud::SolverMethod::singlestep, 3, true, 6000)));
}

}  // namespace

TEST_CASE("each DPM-Solver variant converges at its nominal order") {
  const auto ref = reference_solution();
  struct V {
    ud::SolverMethod m;
    int order;
    bool x0;
    ud::SolverType type;
    const char* name;
  };
  using SM = ud::SolverMethod;
  using ST = ud::SolverType;
  const V vs[] = {
      {SM::singlestep, 1, true, ST::dpm_solver, "singlestep-1 ++"},
      {SM::singlestep, 2, true, ST::dpm_solver, "singlestep-2 ++"},
      {SM::singlestep, 3, true, ST::dpm_solver, "singlestep-3 ++"},
      {SM::singlestep, 2, true, ST::taylor, "singlestep-2 ++ taylor"},
      {SM::singlestep, 3, true, ST::taylor, "singlestep-3 ++ taylor"},
      {SM::singlestep, 1, false, ST::dpm_solver, "singlestep-1 eps"},
      {SM::singlestep, 2, false, ST::dpm_solver, "singlestep-2 eps"},
      {SM::singlestep, 3, false, ST::dpm_solver, "singlestep-3 eps"},
      {SM::singlestep, 3, false, ST::taylor, "singlestep-3 eps taylor"},
      {SM::multistep, 1, true, ST::dpm_solver, "multistep-1 ++"},
      {SM::multistep, 2, true, ST::dpm_solver, "multistep-2 ++"},
      {SM::multistep, 2, true, ST::taylor, "multistep-2 ++ taylor"},
      {SM::multistep, 3, true, ST::dpm_solver, "multistep-3 ++"},
      {SM::multistep, 2, false, ST::dpm_solver, "multistep-2 eps"},
      {SM::multistep, 3, false, ST::dpm_solver, "multistep-3 eps"},
      {SM::fast, 3, true, ST::dpm_solver, "fast-3 ++"},
      {SM::fast, 2, false, ST::dpm_solver, "fast-2 eps"},
  };
  for (const auto& v : vs) {
    // NFE n and 2n on the same spacing: error ratio 2^order
    const int n = v.order == 1 ? 48 : 36;
    auto o1 = base(v.m, v.order, v.x0, n), o2 = base(v.m, v.order, v.x0, 2 * n),
         o3 = base(v.m, v.order, v.x0, 4 * n);
    o1.solver_type = o2.solver_type = o3.solver_type = v.type;
    const double e1 = dist(solve(ud::DpmSolver<double>(smooth_schedule(), o1)), ref);
    const double e2 = dist(solve(ud::DpmSolver<double>(smooth_schedule(), o2)), ref);
    const double e3 = dist(solve(ud::DpmSolver<double>(smooth_schedule(), o3)), ref);
    const double p = std::log2(e2 / e3);
    // Multistep-k starts with k - 1 lower-order steps, exactly as the reference; the O(h^2) local
    // error of its first-order first step bounds the global order by 2 (standard multistep theory),
    // so multistep-3 is expected at order 2 here. Its update formula is checked against the
    // reference to 1e-13 by the dpm_solver golden cases.
    const int expected = v.m == ud::SolverMethod::multistep ? std::min(v.order, 2) : v.order;
    std::printf("  %-26s errors %.2e %.2e %.2e  measured order %.2f (nominal %d, expected %d)\n",
                v.name, e1, e2, e3, p, v.order, expected);
    CHECK_MESSAGE(std::abs(p - expected) < 0.35, v.name);
  }
}

TEST_CASE("DDIM (eta = 0) is first order and equals DPM-Solver(++) order 1 step for step") {
  for (int steps : {10, 25}) {
    ud::DdimOptions d;
    d.steps = steps;
    d.skip_type = ud::Spacing::logSNR;
    const auto a = solve(ud::Ddim<double>(smooth_schedule(), d));
    const auto b = solve(ud::DpmSolver<double>(smooth_schedule(),
                                               base(ud::SolverMethod::multistep, 1, true, steps)));
    const auto c = solve(ud::DpmSolver<double>(
        smooth_schedule(), base(ud::SolverMethod::singlestep, 1, false, steps)));
    CHECK(dist(a, b) < 1e-12);
    CHECK(dist(a, c) < 1e-12);
  }
  const auto ref = reference_solution();
  ud::DdimOptions d;
  d.skip_type = ud::Spacing::logSNR;
  d.steps = 96;
  const double e2 = dist(solve(ud::Ddim<double>(smooth_schedule(), d)), ref);
  d.steps = 192;
  const double e3 = dist(solve(ud::Ddim<double>(smooth_schedule(), d)), ref);
  std::printf("  DDIM measured order %.2f\n", std::log2(e2 / e3));
  CHECK(std::abs(std::log2(e2 / e3) - 1) < 0.35);
}

TEST_CASE("DDPM ancestral equals DDIM with eta = 1 for the same noise; eta adds noise") {
  ud::DdimOptions d;
  d.steps = 20;
  d.seed = 99;
  d.eta = 1.0;
  const auto a = solve(ud::Ddim<double>(ud::VPSchedule::unidiffuser(), d));
  d.eta = 0.3;  // Ddpm forces eta = 1 whatever is passed
  const auto b = solve(ud::Ddpm<double>(ud::VPSchedule::unidiffuser(), d));
  CHECK(dist(a, b) == 0);
  d.eta = 0.0;
  const auto c = solve(ud::Ddim<double>(ud::VPSchedule::unidiffuser(), d));
  CHECK(dist(a, c) > 1e-3);
}

TEST_CASE("DDIM with end = 0 returns the clean prediction of the last evaluation") {
  ud::DdimOptions d;
  d.steps = 8;
  d.end_at_zero = true;
  const ud::Ddim<double> s(ud::VPSchedule::unidiffuser(), d);
  const auto out = solve(s);
  for (double v : out) CHECK(std::isfinite(v));
  // the same run stopping at eps differs by about sigma_eps * eps_hat
  d.end_at_zero = false;
  const auto at_eps = solve(ud::Ddim<double>(ud::VPSchedule::unidiffuser(), d));
  CHECK(dist(out, at_eps) > 1e-3);
  CHECK(dist(out, at_eps) < 0.2);
}

TEST_CASE("the fast driver's order split follows the reference table") {
  auto v50 = std::vector<int>(16, 3);
  v50.push_back(2);
  CHECK(ud::fast_orders(50, 3) == v50);
  CHECK(ud::fast_orders(15, 3) == std::vector<int>{3, 3, 3, 3, 2, 1});
  CHECK(ud::fast_orders(10, 3) == std::vector<int>{3, 3, 3, 1});
  CHECK(ud::fast_orders(1, 3) == std::vector<int>{1});
  CHECK(ud::fast_orders(2, 3) == std::vector<int>{2});
  CHECK(ud::fast_orders(3, 3) == std::vector<int>{2, 1});
  CHECK(ud::fast_orders(20, 2) == std::vector<int>(10, 2));
  CHECK(ud::fast_orders(5, 2) == std::vector<int>{2, 2, 1});
}

TEST_CASE("drivers evaluate the model the advertised number of times") {
  for (auto m : {ud::SolverMethod::singlestep, ud::SolverMethod::multistep, ud::SolverMethod::fast})
    for (int order : {2, 3})
      for (bool denoise : {false, true}) {
        auto o = base(m, order, true, 12);
        o.denoise = denoise;
        const ud::DpmSolver<double> s(ud::VPSchedule::unidiffuser(), o);
        int nfe = 0;
        solve(s, &nfe);
        CHECK(nfe == s.nfe());
        CHECK(nfe == 12 + (denoise ? 1 : 0));
      }
}

TEST_CASE("float32 and float64 states agree to float32 rounding") {
  const ud::DpmSolver<double> sd(ud::VPSchedule::unidiffuser(), ud::DpmSolverOptions{});
  const ud::DpmSolver<float> sf(ud::VPSchedule::unidiffuser(), ud::DpmSolverOptions{});
  const auto a = solve(sd);
  ud::Tensor<float> x(ud::Shape{2, 6});
  const auto x0 = initial();
  for (std::int64_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(x0[i]);
  auto ws = sf.make_workspace(2, 6);
  sf.sample(
      ud::Context<ud::cpu>{}, x.view(),
      [](ud::TensorView<const float> xv, double t, ud::TensorView<float> out) {
        ud::Tensor<double> xd(xv.shape()), od(xv.shape());
        for (std::int64_t i = 0; i < xv.size(); ++i) xd[i] = xv[i];
        Smooth{}(xd.view(), t, od.view());
        for (std::int64_t i = 0; i < xv.size(); ++i) out[i] = static_cast<float>(od[i]);
      },
      ws);
  double m = 0, scale = 0;
  for (std::int64_t i = 0; i < x.size(); ++i) {
    m = std::max(m, std::abs(x[i] - a[static_cast<std::size_t>(i)]));
    scale = std::max(scale, std::abs(a[static_cast<std::size_t>(i)]));
  }
  CHECK(m < 1e-4 * scale);
}

TEST_CASE("invalid sampler settings are rejected with unidiffuser::error") {
  const auto ns = ud::VPSchedule::unidiffuser();
  auto o = ud::DpmSolverOptions{};
  o.order = 4;
  CHECK_THROWS_AS(ud::DpmSolver<float>(ns, o), ud::error);
  o = {};
  o.method = ud::SolverMethod::fast;
  o.order = 1;
  CHECK_THROWS_AS(ud::DpmSolver<float>(ns, o), ud::error);
  o = {};
  o.eps = 1e-4;  // below 1/N for the discrete schedule
  CHECK_THROWS_AS(ud::DpmSolver<float>(ns, o), ud::error);
  o = {};
  o.method = ud::SolverMethod::multistep;
  o.steps = 2;
  CHECK_THROWS_AS(ud::DpmSolver<float>(ns, o), ud::error);
  CHECK_THROWS_AS(ud::parse_spacing("uniform"), ud::error);
  const ud::DpmSolver<double> s(ns, ud::DpmSolverOptions{});
  auto ws = s.make_workspace(2, 6);
  ud::Tensor<double> wrong(ud::Shape{3, 6});
  Smooth m;
  CHECK_THROWS_AS(s.sample(ud::Context<ud::cpu>{}, wrong.view(), m, ws), ud::error);
  ud::DdimOptions d;
  d.eta = 1.5;
  CHECK_THROWS_AS(ud::Ddim<double>(ns, d), ud::error);
}
