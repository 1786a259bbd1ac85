// SPDX-License-Identifier: Apache-2.0
//! \file discrete.hpp
//! Discrete beta schedules and the training-index view of them (UNIDIFFUSER.md §3).
//! Ref: SAMPLERS.md §2, UNIDIFFUSER.md §3.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "unidiffuser/core/error.hpp"

namespace unidiffuser {

//! Stable-Diffusion "scaled linear" betas (UniDiffuser's): linspace of the square roots, squared,
//! in float64. Returns beta_1 .. beta_N (array index n - 1).
inline std::vector<double> scaled_linear_betas(int n = 1000, double beta_start = 0.00085,
                                               double beta_end = 0.012) {
  if (n < 2) throw_mismatch("scaled_linear_betas", "n", "number of levels", ">= 2", n);
  if (!(beta_start > 0 && beta_end < 1 && beta_start <= beta_end))
    throw error("scaled_linear_betas", "beta_start/beta_end", "need 0 < start <= end < 1");
  const double a = std::sqrt(beta_start), b = std::sqrt(beta_end);
  const double step = (b - a) / (n - 1);
  std::vector<double> betas(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    // numpy/torch linspace: start + i * step for the first half, end - (n-1-i) * step after.
    const double r = (i < n / 2) ? a + i * step : b - (n - 1 - i) * step;
    betas[static_cast<std::size_t>(i)] = r * r;
  }
  return betas;
}

//! Linear DDPM betas (1e-4 .. 0.02 for N = 1000), float64.
inline std::vector<double> linear_betas(int n = 1000, double beta_start = 1e-4,
                                        double beta_end = 0.02) {
  if (n < 2) throw_mismatch("linear_betas", "n", "number of levels", ">= 2", n);
  if (!(beta_start > 0 && beta_end < 1 && beta_start <= beta_end))
    throw error("linear_betas", "beta_start/beta_end", "need 0 < start <= end < 1");
  const double step = (beta_end - beta_start) / (n - 1);
  std::vector<double> betas(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    betas[static_cast<std::size_t>(i)] =
        (i < n / 2) ? beta_start + i * step : beta_end - (n - 1 - i) * step;
  return betas;
}

//! `betas` rescaled so that sqrt(abar) ends at `terminal` at level N and keeps its level-1 value,
//! by the affine map of sqrt(abar) through those two points (Lin et al. 2024, "Common diffusion
//! noise schedules and sample steps are flawed", Algorithm 1, which takes terminal = 0; a positive
//! end keeps the samplers' lambda = log(alpha / sigma) finite at t = 1). The map is increasing,
//! so the result is a schedule: every beta in (0, 1). float64 throughout.
inline std::vector<double> rescale_terminal(const std::vector<double>& betas, double terminal) {
  const char* op = "rescale_terminal";
  if (betas.size() < 2) throw_mismatch(op, "betas", "length", ">= 2", betas.size());
  std::vector<double> s(betas.size());
  double abar = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) {
    if (!(betas[i] > 0 && betas[i] < 1))
      throw error(op, "betas[" + std::to_string(i) + "]",
                  "every beta must lie in (0, 1); got " + std::to_string(betas[i]));
    abar *= 1.0 - betas[i];
    s[i] = std::sqrt(abar);
  }
  const double first = s.front(), last = s.back();
  if (!(terminal > 0 && terminal < first))
    throw error(op, "terminal",
                "the level-N sqrt(abar) must lie in (0, sqrt(abar_1) = " + std::to_string(first) +
                    "); got " + std::to_string(terminal));
  const double gain = (first - terminal) / (first - last);
  std::vector<double> out(betas.size());
  double prev = 1.0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const double r = i == 0 ? first : terminal + (s[i] - last) * gain;
    out[i] = 1.0 - (r / prev) * (r / prev);
    prev = r;
  }
  out.front() = betas.front();  // level 1 unchanged, bit for bit
  return out;
}

//! A discrete schedule in the training convention: levels n = 0..N, abar_0 = 1 (clean),
//! abar_n = prod_{i<=n} (1 - beta_i), all in float64.
class DiscreteSchedule {
 public:
  explicit DiscreteSchedule(std::vector<double> betas) : betas_(std::move(betas)) {
    if (betas_.size() < 2)
      throw_mismatch("DiscreteSchedule", "betas", "length", ">= 2", betas_.size());
    abar_.resize(betas_.size() + 1);
    abar_[0] = 1.0;
    for (std::size_t i = 0; i < betas_.size(); ++i) {
      const double b = betas_[i];
      if (!(b > 0 && b < 1))
        throw error("DiscreteSchedule", "betas[" + std::to_string(i) + "]",
                    "every beta must lie in (0, 1); got " + std::to_string(b));
      abar_[i + 1] = abar_[i] * (1.0 - b);
    }
  }
  //! The official UniDiffuser schedule (scaled linear, N = 1000).
  static DiscreteSchedule stable_diffusion() { return DiscreteSchedule(scaled_linear_betas()); }

  int levels() const { return static_cast<int>(betas_.size()); }
  const std::vector<double>& betas() const { return betas_; }
  //! abar_n for n in 0..N.
  double abar(int n) const { return abar_.at(static_cast<std::size_t>(check(n))); }
  //! sqrt(abar_n): the signal coefficient of level n.
  double sqrt_abar(int n) const { return std::sqrt(abar(n)); }
  //! sqrt(1 - abar_n): the noise coefficient of level n.
  double sqrt_one_minus_abar(int n) const { return std::sqrt(1.0 - abar(n)); }
  //! cumprod(1 - beta) as diffusers/PyTorch index it: element k is abar_{k+1}.
  std::vector<double> alphas_cumprod() const { return {abar_.begin() + 1, abar_.end()}; }

 private:
  int check(int n) const {
    if (n < 0 || n > levels())
      throw_mismatch("DiscreteSchedule", "level", "level index out of range",
                     "0.." + std::to_string(levels()), n);
    return n;
  }
  std::vector<double> betas_;
  std::vector<double> abar_;
};

}  // namespace unidiffuser
