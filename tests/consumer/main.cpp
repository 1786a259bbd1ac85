// SPDX-License-Identifier: Apache-2.0
// Samples a 2-D Gaussian with the library's oracle and DPM-Solver++: exits 0 when the sample mean
// is where it should be.
#include <cmath>
#include <cstdio>
#include <unidiffuser/unidiffuser.hpp>

int main() {
  namespace ud = unidiffuser;
  ud::GroupLayout<1> layout({ud::GroupSpec{"x", {{"x", ud::Shape{2}}}}});
  Eigen::Vector2d mu(1.0, -2.0);
  Eigen::Matrix2d cov;
  cov << 0.5, 0.1, 0.1, 0.3;
  ud::GaussianOracle<1> oracle(layout, mu, cov, ud::VPSchedule::unidiffuser());
  ud::PhiloxNoise noise(1);
  ud::DpmSolverOptions o;
  o.steps = 20;
  const ud::DpmSolver<double> solver(ud::VPSchedule::unidiffuser(), o);
  ud::GuidanceOptions g;
  g.scale = 0;
  auto out = ud::sample_task<double, 1>(ud::Context<ud::cpu>{}, oracle, noise, layout,
                                        ud::Task<1>{{ud::Role::generate}}, g, solver, 4000);
  double m0 = 0;
  for (std::int64_t b = 0; b < 4000; ++b) m0 += out[0](b, 0) / 4000;
  std::printf("sample mean %.3f (expected about %.3f)\n", m0, 1.0);
  return std::abs(m0 - 1.0) < 0.1 ? 0 : 1;
}
