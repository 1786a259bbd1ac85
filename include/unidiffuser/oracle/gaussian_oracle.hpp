// SPDX-License-Identifier: Apache-2.0
//! \file gaussian_oracle.hpp
//! The exact noise predictor for jointly Gaussian data: a drop-in "network" for validating
//! samplers, tasks and guidance without training anything.
//!
//! Data (the concatenation of all K groups' values) ~ N(mu, Sigma). A group at time input n
//! (continuous tau = n / N) is seen as alpha_tau x0 + sigma_tau eps (n = 0: clean). With A, S the
//! diagonal matrices of every element's alpha and sigma, the observation is u = A x0 + S eps and
//!   E[eps | u] = S (A Sigma A + S^2)^{-1} (u - A mu),
//! linear in u: the predictor, its guided combinations and the probability-flow ODE are all
//! linear, so the law of a sample is Gaussian and computable (see the oracle tests).
#pragma once

#include <Eigen/Dense>
#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/diffusion/guidance.hpp"
#include "unidiffuser/diffusion/task.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! Mean and covariance of a Gaussian law.
struct GaussianLaw {
  Eigen::VectorXd mean;
  Eigen::MatrixXd cov;
};

template <std::size_t K>
class GaussianOracle {
 public:
  GaussianOracle(GroupLayout<K> layout, Eigen::VectorXd mean, Eigen::MatrixXd cov, VPSchedule ns,
                 int levels = 1000)
      : layout_(std::move(layout)),
        mu_(std::move(mean)),
        cov_(std::move(cov)),
        ns_(std::move(ns)),
        levels_(levels) {
    std::int64_t d = 0;
    for (std::size_t g = 0; g < K; ++g) {
      off_[g] = d;
      d += layout_.size(g);
    }
    dim_ = d;
    if (mu_.size() != d) throw_mismatch("GaussianOracle", "mean", "length", d, mu_.size());
    if (cov_.rows() != d || cov_.cols() != d)
      throw_mismatch("GaussianOracle", "cov", "shape", std::to_string(d) + "x" + std::to_string(d),
                     std::to_string(cov_.rows()) + "x" + std::to_string(cov_.cols()));
  }

  std::int64_t dim() const { return dim_; }
  std::int64_t offset(std::size_t g) const { return off_[g]; }
  const Eigen::VectorXd& mean() const { return mu_; }
  const Eigen::MatrixXd& cov() const { return cov_; }
  const VPSchedule& schedule() const { return ns_; }

  //! (alpha, sigma) of a network time input n (0 = clean, N = the noisiest level).
  std::pair<double, double> coefficients(double time_input) const {
    if (time_input == 0) return {1.0, 0.0};
    const double tau = time_input / levels_;
    return {ns_.marginal_alpha(tau), ns_.marginal_std(tau)};
  }

  //! The affine predictor for per-group time inputs: eps = gain * u + bias over all d elements.
  void affine(const std::array<double, K>& time_input, Eigen::MatrixXd& gain,
              Eigen::VectorXd& bias) const {
    Eigen::VectorXd a(dim_), s(dim_);
    for (std::size_t g = 0; g < K; ++g) {
      const auto [al, si] = coefficients(time_input[g]);
      a.segment(off_[g], layout_.size(g)).setConstant(al);
      s.segment(off_[g], layout_.size(g)).setConstant(si);
    }
    Eigen::MatrixXd c = a.asDiagonal() * cov_ * a.asDiagonal();
    c.diagonal() += s.cwiseProduct(s);
    gain = s.asDiagonal() * c.ldlt().solve(Eigen::MatrixXd::Identity(dim_, dim_));
    bias = -gain * a.cwiseProduct(mu_);
  }

  //! The network interface of GuidedPredictor: x[g] [B, D_g], t[g] per-sample time inputs.
  template <class T>
  void operator()(const Context<cpu>& ctx, const std::array<TensorView<const T, cpu>, K>& x,
                  const std::array<std::span<const double>, K>& t,
                  const std::array<TensorView<T, cpu>, K>& out) {
    (void)ctx;
    const std::int64_t batch = x[0].dim(0);
    Eigen::VectorXd u(dim_), e(dim_);
    for (std::int64_t b = 0; b < batch; ++b) {
      std::array<double, K> ti;
      for (std::size_t g = 0; g < K; ++g) ti[g] = t[g][static_cast<std::size_t>(b)];
      if (!cached_ || ti != cache_t_) {
        affine(ti, gain_, bias_);
        cache_t_ = ti;
        cached_ = true;
      }
      for (std::size_t g = 0; g < K; ++g)
        for (std::int64_t j = 0; j < layout_.size(g); ++j)
          u(off_[g] + j) = static_cast<double>(x[g](b, j));
      e.noalias() = gain_ * u + bias_;
      for (std::size_t g = 0; g < K; ++g)
        for (std::int64_t j = 0; j < layout_.size(g); ++j)
          out[g](b, j) = static_cast<T>(e(off_[g] + j));
    }
  }

  //! The law at time `eps` of the generated groups' state when the probability-flow ODE
  //! dx/dtau = f(tau) (x - eps_hat(x, tau) / sigma_tau), f = d log alpha / d tau, driven by this
  //! oracle under `task` and `guidance` (true_uncond, MarginalNoise::fixed: one N(0, I) tensor per
  //! noised group, shared by the main and reference calls), is integrated exactly from
  //! x_T ~ `start` (default N(0, I)) at tau = T. The state is augmented with the constant noise
  //! tensors, so the ODE is linear; mean and covariance are integrated with RK4, `substeps` steps
  //! per knot interval of the schedule (log alpha is piecewise linear, so each piece is smooth).
  GaussianLaw sample_law(const Task<K>& task, const GuidanceOptions& guidance,
                         const std::array<Eigen::VectorXd, K>& conditions, double T, double eps,
                         int substeps = 2, const GaussianLaw* start = nullptr) const {
    task.validate("GaussianOracle::sample_law");
    // z = [x of generated groups (ascending); xi of every noised group (ascending)]
    const std::size_t n_gen = task.count(Role::generate);
    const bool active = guidance.scale != 0 && !(task.count(Role::condition) == 0 && n_gen == 1);
    const bool keep = guidance.keep_condition_in_reference && n_gen >= 2;
    std::array<std::int64_t, K> xoff{}, noff{};
    std::array<bool, K> noised{};
    std::int64_t nx = 0, nz = 0;
    for (std::size_t g = 0; g < K; ++g)
      if (task.generated(g)) {
        xoff[g] = nx;
        nx += layout_.size(g);
      }
    nz = nx;
    for (std::size_t g = 0; g < K; ++g) {
      const Role r = task.roles[g];
      noised[g] =
          r == Role::marginalize ||
          (active && ((r == Role::generate && n_gen >= 2) || (r == Role::condition && !keep)));
      if (noised[g]) {
        noff[g] = nz;
        nz += layout_.size(g);
      }
    }
    const double N = levels_;
    // d/dtau [z] = M z + b
    auto drift = [&](double tau, double f, Eigen::MatrixXd& M, Eigen::VectorXd& b) {
      M.setZero(nz, nz);
      b.setZero(nz);
      const double sigma = ns_.marginal_std(tau);
      // guided eps of generated groups: eps_gen = E z + e0
      Eigen::MatrixXd E = Eigen::MatrixXd::Zero(nx, nz);
      Eigen::VectorXd e0 = Eigen::VectorXd::Zero(nx);
      auto call = [&](std::size_t only, double weight) {
        // `only` = K: main call (all generated outputs); else the reference call of group `only`
        std::array<double, K> ti;
        Eigen::MatrixXd P = Eigen::MatrixXd::Zero(dim_, nz);
        Eigen::VectorXd q = Eigen::VectorXd::Zero(dim_);
        for (std::size_t h = 0; h < K; ++h) {
          const std::int64_t d = layout_.size(h);
          const Role r = task.roles[h];
          const bool use_state = r == Role::generate && (only == K || only == h);
          const bool clean = r == Role::condition && (only == K || keep);
          if (use_state) {
            ti[h] = N * tau;
            P.block(off_[h], xoff[h], d, d).setIdentity();
          } else if (clean) {
            ti[h] = 0;
            q.segment(off_[h], d) = conditions[h];
          } else {
            ti[h] = N;
            P.block(off_[h], noff[h], d, d).setIdentity();
          }
        }
        Eigen::MatrixXd gain;
        Eigen::VectorXd bias;
        affine(ti, gain, bias);
        for (std::size_t g = 0; g < K; ++g) {
          if (!task.generated(g) || (only != K && only != g)) continue;
          const std::int64_t d = layout_.size(g);
          E.middleRows(xoff[g], d) += weight * gain.middleRows(off_[g], d) * P;
          e0.segment(xoff[g], d) +=
              weight * (gain.middleRows(off_[g], d) * q + bias.segment(off_[g], d));
        }
      };
      const double s = active ? guidance.scale : 0.0;
      call(K, 1.0 + s);
      if (active)
        for (std::size_t g = 0; g < K; ++g)
          if (task.generated(g)) call(g, -s);
      M.topRows(nx) = -(f / sigma) * E;
      M.topLeftCorner(nx, nx).diagonal().array() += f;
      b.head(nx) = -(f / sigma) * e0;
    };
    Eigen::VectorXd m = Eigen::VectorXd::Zero(nz);
    Eigen::MatrixXd P = Eigen::MatrixXd::Identity(nz, nz);
    if (start) {
      m.head(nx) = start->mean;
      P.topLeftCorner(nx, nx) = start->cov;
    }
    // breakpoints: eps, the knots strictly inside (eps, T), T -- integrated from T down to eps
    std::vector<double> pts{T};
    const auto& kn = ns_.t_knots();
    for (auto it = kn.rbegin(); it != kn.rend(); ++it)
      if (*it<T&& * it> eps) pts.push_back(*it);
    pts.push_back(eps);
    Eigen::MatrixXd M;
    Eigen::VectorXd b;
    auto deriv = [&](double tau, double f, const Eigen::VectorXd& mm, const Eigen::MatrixXd& PP,
                     Eigen::VectorXd& dm, Eigen::MatrixXd& dP) {
      drift(tau, f, M, b);
      dm = M * mm + b;
      dP = M * PP + PP * M.transpose();
    };
    for (std::size_t k = 0; k + 1 < pts.size(); ++k) {
      const double a = pts[k], c = pts[k + 1];
      // d log alpha / d tau on this piece (exact for the piecewise-linear table; a smooth
      // schedule is approximated by its secant, refined by the substeps)
      const int sub = kn.empty() ? 1 : substeps;
      for (int j = 0; j < sub; ++j) {
        const double t0 = a + (c - a) * j / sub, t1 = a + (c - a) * (j + 1) / sub;
        const double h = t1 - t0, tm = 0.5 * (t0 + t1);
        auto fslope = [&](double u) {
          if (!kn.empty())
            return (ns_.marginal_log_mean_coeff(c) - ns_.marginal_log_mean_coeff(a)) / (c - a);
          const double du = 1e-6;
          return (ns_.marginal_log_mean_coeff(u + du) - ns_.marginal_log_mean_coeff(u - du)) /
                 (2 * du);
        };
        Eigen::VectorXd k1m, k2m, k3m, k4m;
        Eigen::MatrixXd k1P, k2P, k3P, k4P;
        deriv(t0, fslope(t0), m, P, k1m, k1P);
        deriv(tm, fslope(tm), m + 0.5 * h * k1m, P + 0.5 * h * k1P, k2m, k2P);
        deriv(tm, fslope(tm), m + 0.5 * h * k2m, P + 0.5 * h * k2P, k3m, k3P);
        deriv(t1, fslope(t1), m + h * k3m, P + h * k3P, k4m, k4P);
        m += h / 6 * (k1m + 2 * k2m + 2 * k3m + k4m);
        P += h / 6 * (k1P + 2 * k2P + 2 * k3P + k4P);
      }
    }
    return {m.head(nx), P.topLeftCorner(nx, nx)};
  }

  //! The data law of the generated groups at time tau given clean conditions (no marginalised
  //! groups: those are integrated out): alpha mu_{x|c} and alpha^2 Sigma_{x|c} + sigma^2 I.
  GaussianLaw data_law(const Task<K>& task, const std::array<Eigen::VectorXd, K>& conditions,
                       double tau) const {
    std::vector<std::int64_t> gi, ci;
    Eigen::VectorXd cval;
    for (std::size_t g = 0; g < K; ++g)
      for (std::int64_t j = 0; j < layout_.size(g); ++j) {
        if (task.generated(g)) gi.push_back(off_[g] + j);
        if (task.roles[g] == Role::condition) ci.push_back(off_[g] + j);
      }
    cval.resize(static_cast<Eigen::Index>(ci.size()));
    {
      Eigen::Index k = 0;
      for (std::size_t g = 0; g < K; ++g)
        if (task.roles[g] == Role::condition)
          for (std::int64_t j = 0; j < layout_.size(g); ++j) cval(k++) = conditions[g](j);
    }
    const auto ng = static_cast<Eigen::Index>(gi.size()), nc = static_cast<Eigen::Index>(ci.size());
    Eigen::MatrixXd Sgg(ng, ng), Sgc(ng, nc), Scc(nc, nc);
    Eigen::VectorXd mg(ng), mc(nc);
    for (Eigen::Index i = 0; i < ng; ++i) {
      mg(i) = mu_(gi[static_cast<std::size_t>(i)]);
      for (Eigen::Index j = 0; j < ng; ++j)
        Sgg(i, j) = cov_(gi[static_cast<std::size_t>(i)], gi[static_cast<std::size_t>(j)]);
      for (Eigen::Index j = 0; j < nc; ++j)
        Sgc(i, j) = cov_(gi[static_cast<std::size_t>(i)], ci[static_cast<std::size_t>(j)]);
    }
    for (Eigen::Index i = 0; i < nc; ++i) {
      mc(i) = mu_(ci[static_cast<std::size_t>(i)]);
      for (Eigen::Index j = 0; j < nc; ++j)
        Scc(i, j) = cov_(ci[static_cast<std::size_t>(i)], ci[static_cast<std::size_t>(j)]);
    }
    Eigen::VectorXd mean = mg;
    Eigen::MatrixXd cov = Sgg;
    if (nc > 0) {
      const Eigen::MatrixXd Kg = Sgc * Scc.ldlt().solve(Eigen::MatrixXd::Identity(nc, nc));
      mean += Kg * (cval - mc);
      cov -= Kg * Sgc.transpose();
    }
    const double a = ns_.marginal_alpha(tau), s = ns_.marginal_std(tau);
    GaussianLaw law{a * mean, a * a * cov};
    law.cov.diagonal().array() += s * s;
    return law;
  }

 private:
  GroupLayout<K> layout_;
  Eigen::VectorXd mu_;
  Eigen::MatrixXd cov_;
  VPSchedule ns_;
  int levels_;
  std::array<std::int64_t, K> off_{};
  std::int64_t dim_ = 0;
  bool cached_ = false;
  std::array<double, K> cache_t_{};
  Eigen::MatrixXd gain_;
  Eigen::VectorXd bias_;
};

}  // namespace unidiffuser
