// SPDX-License-Identifier: Apache-2.0
//! \file forward.hpp
//! The forward (noising) process with one level per group (UNIDIFFUSER.md §2-§3):
//!   x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps, per sample, per group.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! Noises one group at integer levels: out[b] = sqrt(abar_{n_b}) x0[b] + sqrt(1 - abar_{n_b})
//! eps[b]. The sum is formed in double and rounded once, as the reference does. Level 0 is clean.
//! x0, eps, out: [B, ...] (same shape); levels: B entries in 0..N.
template <class T, class Backend>
void q_sample(const Context<Backend>& ctx, const DiscreteSchedule& sched,
              std::type_identity_t<TensorView<const T, Backend>> x0,
              std::type_identity_t<TensorView<const T, Backend>> eps,
              std::span<const std::int64_t> levels,
              std::type_identity_t<TensorView<T, Backend>> out) {
  const char* op = "q_sample";
  check_shape(op, "eps", eps, x0.shape());
  check_shape(op, "out", out, x0.shape());
  const std::int64_t rows = x0.rank() ? x0.dim(0) : 1;
  if (static_cast<std::int64_t>(levels.size()) != rows)
    throw_mismatch(op, "levels", "one level per sample", rows, levels.size());
  std::vector<double> a(static_cast<std::size_t>(rows)), s(static_cast<std::size_t>(rows));
  for (std::int64_t b = 0; b < rows; ++b) {
    const auto n = levels[static_cast<std::size_t>(b)];
    if (n < 0 || n > sched.levels())
      throw_mismatch(op, "levels[" + std::to_string(b) + "]", "level",
                     "0.." + std::to_string(sched.levels()), n);
    a[static_cast<std::size_t>(b)] = sched.sqrt_abar(static_cast<int>(n));
    s[static_cast<std::size_t>(b)] = sched.sqrt_one_minus_abar(static_cast<int>(n));
  }
  ops::axpby_rows(ctx, as_rows(out), a.data(), as_rows(x0), s.data(), as_rows(eps));
}

//! Continuous-time version: out[b] = alpha(t_b) x0[b] + sigma(t_b) eps[b], with t = 0 the clean
//! level (alpha = 1, sigma = 0; the schedule is never evaluated at 0).
template <class T, class Backend>
void q_sample_continuous(const Context<Backend>& ctx, const VPSchedule& ns,
                         std::type_identity_t<TensorView<const T, Backend>> x0,
                         std::type_identity_t<TensorView<const T, Backend>> eps,
                         std::span<const double> t,
                         std::type_identity_t<TensorView<T, Backend>> out) {
  const char* op = "q_sample_continuous";
  check_shape(op, "eps", eps, x0.shape());
  check_shape(op, "out", out, x0.shape());
  const std::int64_t rows = x0.rank() ? x0.dim(0) : 1;
  if (static_cast<std::int64_t>(t.size()) != rows)
    throw_mismatch(op, "t", "one time per sample", rows, t.size());
  std::vector<double> a(t.size()), s(t.size());
  for (std::size_t b = 0; b < t.size(); ++b) {
    if (t[b] == 0) {
      a[b] = 1;
      s[b] = 0;
    } else {
      if (!(t[b] >= ns.t_min() * (1 - 1e-6) && t[b] <= ns.T()))
        throw_mismatch(op, "t[" + std::to_string(b) + "]", "time", "0 or a value in [t_min, T]",
                       t[b]);
      a[b] = ns.marginal_alpha(t[b]);
      s[b] = ns.marginal_std(t[b]);
    }
  }
  ops::axpby_rows(ctx, as_rows(out), a.data(), as_rows(x0), s.data(), as_rows(eps));
}

//! Noises every group at its own per-sample levels: xn[g] = q_sample(x0[g], eps[g], levels[g]).
template <class T, std::size_t K, class Backend>
void forward_process(const Context<Backend>& ctx, const DiscreteSchedule& sched,
                     const std::type_identity_t<GroupViews<const T, K, Backend>>& x0,
                     const std::type_identity_t<GroupViews<const T, K, Backend>>& eps,
                     const std::array<std::span<const std::int64_t>, K>& levels,
                     const std::type_identity_t<GroupViews<T, K, Backend>>& xn) {
  for (std::size_t g = 0; g < K; ++g) q_sample<T>(ctx, sched, x0[g], eps[g], levels[g], xn[g]);
}

}  // namespace unidiffuser
