// SPDX-License-Identifier: Apache-2.0
// The main demo until a trained network ships: a two-group "image + text" toy whose data are
// jointly Gaussian, so the exact noise predictor is known (GaussianOracle). It samples the five
// basic UniDiffuser modes with the official sampler (DPM-Solver++ fast, order 3, 50 steps,
// uniform time) and classifier-free guidance, and prints how far the sample moments are from
// the exact law of the probability-flow ODE and from the data law.
#include <Eigen/Dense>
#include <chrono>
#include <cstdio>
#include <exception>
#include <string_view>
#include <unidiffuser/unidiffuser.hpp>

namespace ud = unidiffuser;

namespace {

int demo() {
  // image group: z (3 values) + c (1 value); text group: y (2 values)
  ud::GroupLayout<2> layout({ud::GroupSpec{"image", {{"z", ud::Shape{3}}, {"c", ud::Shape{1}}}},
                             ud::GroupSpec{"text", {{"y", ud::Shape{2}}}}});
  Eigen::VectorXd mu(6);
  mu << 0.6, -0.4, 0.1, 0.9, 0.3, -0.7;
  Eigen::MatrixXd a = Eigen::MatrixXd::Random(6, 6) * 0.5;  // Eigen's fixed default seed
  Eigen::MatrixXd cov = a * a.transpose() + 0.2 * Eigen::MatrixXd::Identity(6, 6);
  const auto ns = ud::VPSchedule::unidiffuser();
  ud::GaussianOracle<2> oracle(layout, mu, cov, ns);
  const ud::DpmSolver<float> solver(ns, ud::DpmSolverOptions{});  // the official settings

  const std::int64_t batch = 16384;
  std::array<Eigen::VectorXd, 2> cond{Eigen::Vector4d(1.0, -0.5, 0.2, 0.8),
                                      Eigen::Vector2d(0.1, -1.2)};
  std::array<ud::Tensor<float>, 2> cond_t, fixed_t;
  ud::PhiloxNoise noise(2023);
  for (std::size_t g = 0; g < 2; ++g) {
    cond_t[g] = ud::Tensor<float>(ud::Shape{batch, layout.size(g)});
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t j = 0; j < layout.size(g); ++j)
        cond_t[g](b, j) = static_cast<float>(cond[g](j));
    fixed_t[g] = ud::Tensor<float>(ud::Shape{batch, layout.size(g)});
    noise.draw(ud::Context<ud::cpu>{}, g, 0, ud::as_rows(fixed_t[g].view()));
  }
  std::printf(
      "UniDiffuser on a Gaussian toy: %lld samples per mode, DPM-Solver++ fast order 3, 50 NFE\n",
      static_cast<long long>(batch));
  std::printf("%-6s %-6s %8s  %-30s %-26s %8s\n", "mode", "scale", "forwards",
              "max |moment - exact ODE law|", "max |moment - data law|", "time");
  for (ud::Mode mode : {ud::Mode::joint, ud::Mode::t2i, ud::Mode::i2t, ud::Mode::i, ud::Mode::t}) {
    const ud::Task<2> task = ud::tasks::stages(mode).front();
    for (double scale : {0.0, 3.0}) {
      if (scale != 0 && (mode == ud::Mode::i || mode == ud::Mode::t)) continue;  // never guided
      ud::GuidanceOptions g;
      g.scale = scale;
      g.marginal_noise = ud::MarginalNoise::fixed;  // the exact law assumes one noise per sample
      const auto t0 = std::chrono::steady_clock::now();
      auto out = ud::sample_task<float, 2>(ud::Context<ud::cpu>{}, oracle, noise, layout, task, g,
                                           solver, batch, {cond_t[0].view(), cond_t[1].view()}, {},
                                           {fixed_t[0].view(), fixed_t[1].view()});
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // sample moments of the generated groups
      std::int64_t d = 0;
      for (std::size_t k = 0; k < 2; ++k) d += task.generated(k) ? layout.size(k) : 0;
      Eigen::MatrixXd x(batch, d);
      std::int64_t col = 0;
      for (std::size_t k = 0; k < 2; ++k) {
        if (!task.generated(k)) continue;
        for (std::int64_t b = 0; b < batch; ++b)
          for (std::int64_t j = 0; j < layout.size(k); ++j) x(b, col + j) = out[k](b, j);
        col += layout.size(k);
      }
      const Eigen::VectorXd m = x.colwise().mean();
      const Eigen::MatrixXd xc = x.rowwise() - m.transpose();
      const Eigen::MatrixXd c = xc.transpose() * xc / static_cast<double>(batch - 1);
      const auto law = oracle.sample_law(task, g, cond, 1.0, 1e-3);
      const double err =
          std::max((m - law.mean).cwiseAbs().maxCoeff(), (c - law.cov).cwiseAbs().maxCoeff());
      char data_col[64] = "-";
      if (scale == 0 && task.count(ud::Role::marginalize) == 0) {
        const auto data = oracle.data_law(task, cond, 1e-3);
        std::snprintf(
            data_col, sizeof data_col, "%.4f",
            std::max((m - data.mean).cwiseAbs().maxCoeff(), (c - data.cov).cwiseAbs().maxCoeff()));
      }
      const int fw = scale == 0 || (task.count(ud::Role::condition) == 0 &&
                                    task.count(ud::Role::generate) == 1)
                         ? 1
                         : 1 + static_cast<int>(task.count(ud::Role::generate));
      std::printf("%-6s %-6.1f %8d  %-30.4f %-26s %7.2fs\n",
                  std::string(ud::mode_name(mode)).c_str(), scale, 50 * fw, err, data_col, secs);
    }
  }
  std::printf(
      "(Monte Carlo standard error of these moments is about %.3f; the data-law column also\n"
      " contains the start bias of N(0, I) versus p_T, alpha_T = %.3f.)\n",
      1.0 / std::sqrt(static_cast<double>(batch)), ns.marginal_alpha(1.0));
  return 0;
}

}  // namespace

// The demo takes no options; anything but --help is an error (exit 1, one line on stderr).
int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::puts(
          "usage: oracle_demo  (no options)\n\n"
          "Samples the five basic UniDiffuser modes on a Gaussian toy with an exact noise\n"
          "predictor and prints how far the sample moments are from the exact laws.");
      return 0;
    }
    std::fprintf(stderr,
                 "oracle_demo: error: command line: '%s': unexpected argument; the demo takes no "
                 "options (see --help)\n",
                 argv[i]);
    return 1;
  }
  try {
    return demo();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "oracle_demo: error: %s\n", e.what());
    return 1;
  }
}
