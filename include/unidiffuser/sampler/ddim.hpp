// SPDX-License-Identifier: Apache-2.0
//! \file ddim.hpp
//! DDIM(eta) and DDPM ancestral sampling in the continuous VP notation (SAMPLERS.md §12).
//!
//! Both step along a descending grid t_0 = T > ... > t_M = end using x0 = (x - sigma eps)/alpha.
//! With eta = 0 DDIM is deterministic (equal to DPM-Solver order 1); stochastic steps draw
//! counter-based noise keyed by (seed, stream_base + step, sample_offset + row), so a sample's
//! trajectory does not depend on the batch it is computed in. `end = 0` lands on the clean level
//! (alpha = 1, sigma = 0) without evaluating the schedule at 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/sampler/timesteps.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! Settings of DDIM / DDPM.
struct DdimOptions {
  int steps = 50;                             //!< number of steps (= NFE)
  double eta = 0.0;                           //!< 0: deterministic DDIM; 1: DDPM posterior
  Spacing skip_type = Spacing::time_uniform;  //!< grid spacing
  double T = 1.0;                             //!< start time
  double eps = 1e-3;                          //!< last grid time (>= 1/N)
  bool end_at_zero = false;                   //!< replace the last target by the clean level t = 0
  std::uint64_t seed = 0;                     //!< noise seed (stochastic steps only)
  std::uint64_t stream_base = 1u << 20;       //!< step k uses stream stream_base + k
  std::uint64_t sample_offset = 0;            //!< global index of the batch's first sample
};

//! Shared step algebra of DDIM/DDPM.
template <class T, class Backend = cpu>
class Ddim {
 public:
  using View = TensorView<T, Backend>;
  using CView = TensorView<const T, Backend>;

  class Workspace {
   public:
    Workspace() = default;
    Workspace(std::int64_t rows, std::int64_t cols)
        : eps_(Shape{rows, cols}), z_(Shape{rows, cols}), rows_(rows), cols_(cols) {}

   private:
    friend class Ddim;
    Tensor<T, Backend> eps_, z_;
    std::int64_t rows_ = 0, cols_ = 0;
  };

  Ddim(VPSchedule ns, DdimOptions opt) : ns_(std::move(ns)), opt_(opt) {
    if (!(opt_.eta >= 0 && opt_.eta <= 1))
      throw_mismatch("Ddim", "eta", "stochasticity", "a value in [0, 1]", opt_.eta);
    grid_ = time_steps(ns_, opt_.skip_type, opt_.T, opt_.eps, opt_.steps);
  }
  const std::vector<double>& timesteps() const { return grid_; }
  //! The noise schedule of the sampler's time.
  const VPSchedule& schedule() const { return ns_; }
  int nfe() const { return opt_.steps; }
  Workspace make_workspace(std::int64_t rows, std::int64_t cols) const { return {rows, cols}; }

  template <class Model>
  void sample(const Context<Backend>& ctx, View x, Model&& model, Workspace& ws) const {
    const std::int64_t rows = x.rank() ? x.dim(0) : 1;
    if (rows != ws.rows_ || x.size() != ws.rows_ * ws.cols_)
      throw error("Ddim::sample", "x",
                  "state " + x.shape().str() + " does not match the workspace [" +
                      std::to_string(ws.rows_) + ", " + std::to_string(ws.cols_) + "]");
    const View e = ws.eps_.view().reshape(x.shape());
    const View z = ws.z_.view().reshape(x.shape());
    const auto xb = as_rows(x);
    for (int k = 0; k < opt_.steps; ++k) {
      const double t = grid_[static_cast<std::size_t>(k)];
      const bool last = k + 1 == opt_.steps;
      const double s = grid_[static_cast<std::size_t>(k) + 1];
      model(CView(x), t, e);
      const double lat = ns_.marginal_log_mean_coeff(t);
      const double at = std::exp(lat), st = std::sqrt(-std::expm1(2 * lat));
      double as, ss, v;
      if (last && opt_.end_at_zero) {
        as = 1.0;
        ss = 0.0;
        v = -std::expm1(2 * lat);  // 1 - a^2 with alpha_s = 1
      } else {
        const double las = ns_.marginal_log_mean_coeff(s);
        as = std::exp(las);
        ss = std::sqrt(-std::expm1(2 * las));
        v = -std::expm1(2 * (lat - las));
      }
      // c = eta sqrt(sigma_s^2 / sigma_t^2 * v); x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z
      const double c = opt_.eta * std::sqrt(ss * ss / (st * st) * v);
      const double de = std::sqrt(std::max(ss * ss - c * c, 0.0));
      // alpha_s x0 = (alpha_s / alpha_t) (x - sigma_t eps)
      const double cx = as / at, ce = -as / at * st + de;
      if (c > 0) {
        ops::random_normal(ctx, as_rows(z), NoiseKey{opt_.seed, opt_.stream_base + k},
                           opt_.sample_offset);
        ops::lincomb<T>(ctx, xb,
                        {{cx, as_rows(CView(x))}, {ce, as_rows(CView(e))}, {c, as_rows(CView(z))}});
      } else {
        ops::lincomb<T>(ctx, xb, {{cx, as_rows(CView(x))}, {ce, as_rows(CView(e))}});
      }
    }
  }

 private:
  VPSchedule ns_;
  DdimOptions opt_;
  std::vector<double> grid_;
};

//! DDPM ancestral sampling: the posterior mean (alpha_s v / sigma_t^2) x0 + (a sigma_s^2 /
//! sigma_t^2) x plus sqrt(v sigma_s^2 / sigma_t^2) z. Algebraically DDIM with eta = 1
//! (SAMPLERS.md §12.2), and implemented as exactly that.
template <class T, class Backend = cpu>
class Ddpm : public Ddim<T, Backend> {
 public:
  Ddpm(VPSchedule ns, DdimOptions opt) : Ddim<T, Backend>(std::move(ns), with_eta1(opt)) {}

 private:
  static DdimOptions with_eta1(DdimOptions o) {
    o.eta = 1.0;
    return o;
  }
};

}  // namespace unidiffuser
