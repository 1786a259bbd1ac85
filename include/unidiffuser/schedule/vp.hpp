// SPDX-License-Identifier: Apache-2.0
//! \file vp.hpp
//! Continuous-time variance-preserving view of a schedule: log alpha(t), alpha, sigma, lambda
//! and the inverse of lambda, as DPM-Solver's NoiseScheduleVP defines them.
//! Ref: SAMPLERS.md §4, §13.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/schedule/discrete.hpp"

namespace unidiffuser {

//! How the table of a discrete schedule (and the float time grids built from it) are rounded.
enum class TablePrecision {
  //! Bit-compatible with the official sampler, which passes float32 betas: 1 - beta and log in
  //! float32, cumulative sum in float64 stored as float32, knots from a float32 linspace. The
  //! UniDiffuser golden references depend on it (SAMPLERS.md §4.1). Evaluation stays float64.
  float32_reference,
  //! Everything in float64 (the reference class run under a float64 default dtype).
  float64,
};

namespace detail {
//! torch.linspace(start, end, n) in the element type F (halves computed from either end).
template <class F>
inline std::vector<double> linspace(double start, double end, std::int64_t n) {
  std::vector<double> out(static_cast<std::size_t>(n));
  if (n == 1) {
    out[0] = static_cast<double>(static_cast<F>(start));
    return out;
  }
  const F s = static_cast<F>(start), e = static_cast<F>(end);
  const F step = (e - s) / static_cast<F>(n - 1);
  const std::int64_t half = n / 2;
  for (std::int64_t i = 0; i < n; ++i) {
    const F v = i < half ? static_cast<F>(s + step * static_cast<F>(i))
                         : static_cast<F>(e - step * static_cast<F>(n - 1 - i));
    out[static_cast<std::size_t>(i)] = static_cast<double>(v);
  }
  return out;
}
inline std::vector<double> linspace(TablePrecision p, double start, double end, std::int64_t n) {
  return p == TablePrecision::float32_reference ? linspace<float>(start, end, n)
                                                : linspace<double>(start, end, n);
}
//! logaddexp(a, b) = max + log1p(exp(-|a - b|)).
inline double logaddexp(double a, double b) {
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}
//! Piecewise-linear interpolation with linear extrapolation (SAMPLERS.md §4.2). A point equal to
//! an interior knot uses the left segment, as the reference does.
inline double interp(double x, const std::vector<double>& xp, const std::vector<double>& yp) {
  const std::size_t k = xp.size();
  std::size_t j;
  if (x <= xp[0]) {
    j = 0;
  } else if (x > xp[k - 1]) {
    j = k - 2;
  } else {
    // first knot >= x, then the segment to its left
    j = static_cast<std::size_t>(std::lower_bound(xp.begin(), xp.end(), x) - xp.begin()) - 1;
  }
  return yp[j] + (x - xp[j]) * (yp[j + 1] - yp[j]) / (xp[j + 1] - xp[j]);
}
}  // namespace detail

//! The continuous VP schedule alpha_t^2 + sigma_t^2 = 1 on t in [t_min, T].
class VPSchedule {
 public:
  enum class Kind { discrete, linear, cosine };

  //! DPM-Solver's discrete schedule from betas (SAMPLERS.md §4.1): knot j at t = (j+1)/N with
  //! log alpha = 1/2 sum_{i<=j} log(1 - beta_i).
  static VPSchedule discrete(const std::vector<double>& betas,
                             TablePrecision p = TablePrecision::float32_reference) {
    const std::size_t n = betas.size();
    if (n < 2) throw_mismatch("VPSchedule::discrete", "betas", "length", ">= 2", n);
    VPSchedule s;
    s.kind_ = Kind::discrete;
    s.precision_ = p;
    s.n_ = static_cast<int>(n);
    s.t_ = detail::linspace(p, 1.0 / static_cast<double>(n), 1.0, static_cast<std::int64_t>(n));
    s.log_alpha_.resize(n);
    double acc = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double b = betas[i];
      if (!(b > 0 && b < 1))
        throw error("VPSchedule::discrete", "betas[" + std::to_string(i) + "]",
                    "every beta must lie in (0, 1); got " + std::to_string(b));
      if (p == TablePrecision::float32_reference) {
        const float l = std::log(1.0f - static_cast<float>(b));
        acc = static_cast<double>(static_cast<float>(acc + static_cast<double>(l)));
        s.log_alpha_[i] = static_cast<double>(0.5f * static_cast<float>(acc));
      } else {
        acc += std::log(1.0 - b);
        s.log_alpha_[i] = 0.5 * acc;
      }
    }
    s.finish_tables();
    return s;
  }
  //! From a discrete schedule object.
  static VPSchedule discrete(const DiscreteSchedule& d,
                             TablePrecision p = TablePrecision::float32_reference) {
    return discrete(d.betas(), p);
  }
  //! The official UniDiffuser schedule (SD scaled-linear betas, reference float32 table).
  static VPSchedule unidiffuser(TablePrecision p = TablePrecision::float32_reference) {
    return discrete(scaled_linear_betas(), p);
  }
  //! Continuous linear VP schedule (beta_0 = 0.1, beta_1 = 20), T = 1 (SAMPLERS.md §4.5).
  static VPSchedule continuous_linear(double beta0 = 0.1, double beta1 = 20.0) {
    VPSchedule s;
    s.kind_ = Kind::linear;
    s.precision_ = TablePrecision::float64;
    s.beta0_ = beta0;
    s.beta1_ = beta1;
    s.T_ = 1.0;
    s.t_min_ = 0.0;
    return s;
  }
  //! Cosine schedule (s = 0.008), T = 0.9946 (SAMPLERS.md §4.5).
  static VPSchedule cosine(double cos_s = 0.008) {
    VPSchedule s;
    s.kind_ = Kind::cosine;
    s.precision_ = TablePrecision::float64;
    s.cos_s_ = cos_s;
    s.T_ = 0.9946;
    s.t_min_ = 0.0;
    return s;
  }

  Kind kind() const { return kind_; }
  TablePrecision precision() const { return precision_; }
  //! Number of discrete levels (0 for continuous schedules).
  int levels() const { return n_; }
  //! Largest time (1 for discrete schedules).
  double T() const { return T_; }
  //! Smallest time on which the schedule is defined without extrapolation (1/N when discrete).
  double t_min() const { return t_min_; }
  const std::vector<double>& t_knots() const { return t_; }
  const std::vector<double>& log_alpha_knots() const { return log_alpha_; }

  //! log alpha_t.
  double marginal_log_mean_coeff(double t) const {
    switch (kind_) {
      case Kind::discrete: return detail::interp(t, t_, log_alpha_);
      case Kind::linear: return -0.25 * t * t * (beta1_ - beta0_) - 0.5 * t * beta0_;
      case Kind::cosine:
        return std::log(std::cos((t + cos_s_) / (1 + cos_s_) * half_pi)) - cos_log0();
    }
    return 0;
  }
  double marginal_alpha(double t) const { return std::exp(marginal_log_mean_coeff(t)); }
  //! sigma_t = sqrt(1 - alpha_t^2), via expm1 to avoid the cancellation near t = 1/N.
  double marginal_std(double t) const {
    return std::sqrt(-std::expm1(2.0 * marginal_log_mean_coeff(t)));
  }
  //! lambda_t = log alpha_t - log sigma_t (half log-SNR).
  double marginal_lambda(double t) const {
    const double la = marginal_log_mean_coeff(t);
    return la - 0.5 * std::log(-std::expm1(2.0 * la));
  }
  //! The time t with marginal_lambda(t) = lambda.
  double inverse_lambda(double lambda) const {
    switch (kind_) {
      case Kind::discrete: {
        const double la = -0.5 * detail::logaddexp(0.0, -2.0 * lambda);
        return detail::interp(la, log_alpha_rev_, t_rev_);
      }
      case Kind::linear: {
        const double tmp = 2.0 * (beta1_ - beta0_) * detail::logaddexp(-2.0 * lambda, 0.0);
        const double delta = beta0_ * beta0_ + tmp;
        return tmp / (std::sqrt(delta) + beta0_) / (beta1_ - beta0_);
      }
      case Kind::cosine: {
        const double la = -0.5 * detail::logaddexp(-2.0 * lambda, 0.0);
        return std::acos(std::exp(la + cos_log0())) * 2.0 * (1.0 + cos_s_) / pi - cos_s_;
      }
    }
    return 0;
  }

 private:
  static constexpr double pi = 3.14159265358979323846;
  static constexpr double half_pi = pi / 2;
  double cos_log0() const { return std::log(std::cos(cos_s_ / (1 + cos_s_) * half_pi)); }
  void finish_tables() {
    for (std::size_t i = 1; i < t_.size(); ++i)
      if (!(t_[i] > t_[i - 1]))
        throw error("VPSchedule", "t knots", "knots must increase strictly");
    for (std::size_t i = 1; i < log_alpha_.size(); ++i)
      if (!(log_alpha_[i] < log_alpha_[i - 1]))
        throw error("VPSchedule", "log_alpha knots",
                    "log alpha must decrease strictly (betas too small for the table precision)");
    t_rev_.assign(t_.rbegin(), t_.rend());
    log_alpha_rev_.assign(log_alpha_.rbegin(), log_alpha_.rend());
    T_ = t_.back();
    t_min_ = t_.front();
  }

  Kind kind_ = Kind::discrete;
  TablePrecision precision_ = TablePrecision::float64;
  int n_ = 0;
  std::vector<double> t_, log_alpha_, t_rev_, log_alpha_rev_;
  double T_ = 1.0, t_min_ = 0.0;
  double beta0_ = 0.1, beta1_ = 20.0, cos_s_ = 0.008;
};

}  // namespace unidiffuser
