// SPDX-License-Identifier: Apache-2.0
//! \file timesteps.hpp
//! Time grids for samplers: M + 1 descending times from T to eps (SAMPLERS.md §7).
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! Time spacing of a sampler grid.
enum class Spacing {
  time_uniform,    //!< uniform in t (official)
  logSNR,          //!< uniform in lambda
  time_quadratic,  //!< the reference's 10^7-point snapped quadratic grid
  t2,              //!< exact quadratic in sqrt(t) (stand-alone DPM-Solver's "time_quadratic")
};

//! Parses "time_uniform" | "logSNR" | "time_quadratic" | "t2".
inline Spacing parse_spacing(std::string_view s) {
  if (s == "time_uniform") return Spacing::time_uniform;
  if (s == "logSNR") return Spacing::logSNR;
  if (s == "time_quadratic") return Spacing::time_quadratic;
  if (s == "t2") return Spacing::t2;
  throw error("parse_spacing", "skip_type",
              "unknown spacing '" + std::string(s) +
                  "'; expected time_uniform, logSNR, "
                  "time_quadratic or t2");
}

namespace detail {
// Element i of torch.linspace(start, end, n) in type F, computed on demand.
template <class F>
struct LazyLinspace {
  F s, e, step;
  std::int64_t n;
  LazyLinspace(double start, double end, std::int64_t count)
      : s(static_cast<F>(start)), e(static_cast<F>(end)), n(count) {
    step = (e - s) / static_cast<F>(n - 1);
  }
  F operator()(std::int64_t i) const {
    return i < n / 2 ? static_cast<F>(s + step * static_cast<F>(i))
                     : static_cast<F>(e - step * static_cast<F>(n - 1 - i));
  }
};
template <class F>
std::vector<double> time_quadratic(double T, double eps, int m) {
  constexpr std::int64_t fine = 10000000;
  LazyLinspace<F> g(eps, T, fine);
  auto q = [&](std::int64_t j) { return static_cast<F>(std::sqrt(g(j))); };
  const auto mu = linspace<F>(static_cast<double>(q(0)), static_cast<double>(q(fine - 1)), m + 1);
  std::vector<double> asc;
  asc.reserve(static_cast<std::size_t>(m) + 1);
  for (int k = 0; k < m; ++k) {
    // searchsorted(left): the first j with q(j) >= mu_k
    std::int64_t lo = 0, hi = fine;
    const F target = static_cast<F>(mu[static_cast<std::size_t>(k)]);
    while (lo < hi) {
      const std::int64_t mid = lo + (hi - lo) / 2;
      if (q(mid) < target)
        lo = mid + 1;
      else
        hi = mid;
    }
    asc.push_back(static_cast<double>(g(std::min(lo, fine - 1))));
  }
  asc.push_back(static_cast<double>(static_cast<F>(T)));
  return {asc.rbegin(), asc.rend()};
}
}  // namespace detail

//! get_time_steps(type, T, eps, M): M + 1 times, t_0 = T > ... > t_M = eps. Grids are rounded
//! like the reference's in the schedule's table precision (float32 linspace for the official
//! schedule).
inline std::vector<double> time_steps(const VPSchedule& ns, Spacing type, double T, double eps,
                                      int m) {
  if (m < 1) throw_mismatch("time_steps", "steps", "number of intervals", ">= 1", m);
  if (!(eps < T))
    throw error("time_steps", "eps/T",
                "need eps < T; got eps = " + std::to_string(eps) + ", T = " + std::to_string(T));
  if (ns.kind() == VPSchedule::Kind::discrete && (eps < ns.t_min() * (1 - 1e-6) || T > ns.T()))
    throw error("time_steps", "eps/T",
                "the discrete schedule is defined on [" + std::to_string(ns.t_min()) + ", " +
                    std::to_string(ns.T()) + "]; got [" + std::to_string(eps) + ", " +
                    std::to_string(T) + "]");
  const TablePrecision p = ns.precision();
  const bool f32 = p == TablePrecision::float32_reference;
  switch (type) {
    case Spacing::time_uniform: return detail::linspace(p, T, eps, m + 1);
    case Spacing::logSNR: {
      double lT = ns.marginal_lambda(T), l0 = ns.marginal_lambda(eps);
      auto ls = detail::linspace(p, lT, l0, m + 1);
      for (double& l : ls) {
        l = ns.inverse_lambda(l);
        if (f32) l = static_cast<double>(static_cast<float>(l));
      }
      return ls;
    }
    case Spacing::time_quadratic:
      return f32 ? detail::time_quadratic<float>(T, eps, m)
                 : detail::time_quadratic<double>(T, eps, m);
    case Spacing::t2: {
      std::vector<double> out(static_cast<std::size_t>(m) + 1);
      const double a = std::sqrt(T), b = std::sqrt(eps);
      for (int k = 0; k <= m; ++k) {
        const double r = a + k * (b - a) / m;
        out[static_cast<std::size_t>(k)] = r * r;
      }
      return out;
    }
  }
  return {};
}

}  // namespace unidiffuser
