// SPDX-License-Identifier: Apache-2.0
//! \file dpm_solver.hpp
//! DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3, with the
//! singlestep, multistep and official "fast" drivers of the reference `dpm_solver_pp.py`.
//!
//! The sampler is a pure algorithm over a batch-first state `x` ([B, ...], each sample an
//! independent flat vector) and any callable
//!     model(TensorView<const T, B> x, double t, TensorView<T, B> eps_out)
//! returning the (guided) noise prediction at continuous time t. Scalar coefficients are formed
//! in float64 on the host (SAMPLERS.md §13.4, §13.9); the state is touched only through backend
//! primitives, and the workspace is allocated once, outside the step loop.
//! Ref: SAMPLERS.md §6-§11, §14.
#pragma once

#include <array>
#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/sampler/timesteps.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! How steps are laid out (SAMPLERS.md §10).
enum class SolverMethod {
  singlestep,  //!< steps / order stages of fixed order with the default ratios
  multistep,   //!< one evaluation per step, history of `order` values (intended reference driver)
  fast,        //!< official UniDiffuser driver: order split on a steps + 1 point grid
};
//! Second/third-order difference formula (SAMPLERS.md §8).
enum class SolverType { dpm_solver, taylor };

inline SolverMethod parse_solver_method(std::string_view s) {
  if (s == "singlestep") return SolverMethod::singlestep;
  if (s == "multistep") return SolverMethod::multistep;
  if (s == "fast") return SolverMethod::fast;
  throw error("parse_solver_method", "method",
              "unknown method '" + std::string(s) + "'; expected singlestep, multistep or fast");
}
inline SolverType parse_solver_type(std::string_view s) {
  if (s == "dpm_solver") return SolverType::dpm_solver;
  if (s == "taylor") return SolverType::taylor;
  throw error("parse_solver_type", "solver_type",
              "unknown solver type '" + std::string(s) + "'; expected dpm_solver or taylor");
}

//! Settings; the defaults are the official UniDiffuser run (SAMPLERS.md §11).
struct DpmSolverOptions {
  int steps = 50;                             //!< number of function evaluations (NFE)
  int order = 3;                              //!< 1, 2 or 3 (fast: 2 or 3)
  SolverMethod method = SolverMethod::fast;   //!< driver
  Spacing skip_type = Spacing::time_uniform;  //!< grid spacing
  SolverType solver_type = SolverType::dpm_solver;
  bool predict_x0 = true;  //!< true: DPM-Solver++ (data prediction); false: DPM-Solver
  double T = 1.0;          //!< start time
  double eps = 1e-3;       //!< end time (>= 1/N for discrete schedules)
  //! One extra evaluation at eps returning x0 = (x - sigma eps_hat) / alpha. The reference
  //! converts twice when predict_x0 is true (SAMPLERS.md §10.5); this is the intended formula.
  bool denoise = false;
};

//! The order list of the fast driver (SAMPLERS.md §10.1).
inline std::vector<int> fast_orders(int steps, int order) {
  if (steps < 1) throw_mismatch("fast_orders", "steps", "number of evaluations", ">= 1", steps);
  std::vector<int> o;
  if (order == 3) {
    const int k = steps / 3 + 1;
    if (steps % 3 == 0) {
      o.assign(static_cast<std::size_t>(k - 2), 3);
      o.push_back(2);
      o.push_back(1);
    } else {
      o.assign(static_cast<std::size_t>(k - 1), 3);
      o.push_back(steps % 3);
    }
  } else if (order == 2) {
    o.assign(static_cast<std::size_t>(steps / 2), 2);
    if (steps % 2) o.push_back(1);
  } else {
    throw_mismatch("fast_orders", "order", "the fast method supports", "2 or 3", order);
  }
  return o;
}

template <class T, class Backend = cpu>
class DpmSolver {
 public:
  using View = TensorView<T, Backend>;
  using CView = TensorView<const T, Backend>;

  //! Buffers for a [rows, cols] state, allocated once and reused by every call of sample().
  class Workspace {
   public:
    Workspace() = default;
    Workspace(std::int64_t rows, std::int64_t cols) : rows_(rows), cols_(cols) {
      for (auto& b : buf_) b = Tensor<T, Backend>(Shape{rows, cols});
    }
    std::int64_t rows() const { return rows_; }
    std::int64_t cols() const { return cols_; }

   private:
    friend class DpmSolver;
    std::array<Tensor<T, Backend>, 4> buf_;
    std::int64_t rows_ = 0, cols_ = 0;
  };

  //! `grid_schedule`, when given, builds the time grid (get_time_steps) while `ns` gives every
  //! coefficient: e.g. the reference's float32 table for the grid and a float64 table for the
  //! update (see docs/NOTES.md, "float32 table vs float64 table").
  DpmSolver(VPSchedule ns, DpmSolverOptions opt, const VPSchedule* grid_schedule = nullptr)
      : ns_(std::move(ns)), opt_(opt) {
    const VPSchedule& gs = grid_schedule ? *grid_schedule : ns_;
    const char* op = "DpmSolver";
    if (opt_.order < 1 || opt_.order > 3)
      throw_mismatch(op, "order", "solver order", "1, 2 or 3", opt_.order);
    if (opt_.steps < 1) throw_mismatch(op, "steps", "number of evaluations", ">= 1", opt_.steps);
    if (!(opt_.eps > 0) || !(opt_.eps < opt_.T)) throw error(op, "eps/T", "need 0 < eps < T");
    if (opt_.method == SolverMethod::fast) {
      orders_ = fast_orders(opt_.steps, opt_.order);
      grid_ = time_steps(gs, opt_.skip_type, opt_.T, opt_.eps, opt_.steps);
    } else if (opt_.method == SolverMethod::singlestep) {
      const int m = opt_.steps / opt_.order;
      if (m < 1)
        throw error(op, "steps",
                    "singlestep needs steps >= order; got steps = " + std::to_string(opt_.steps) +
                        ", order = " + std::to_string(opt_.order));
      orders_.assign(static_cast<std::size_t>(m), opt_.order);
      grid_ = time_steps(gs, opt_.skip_type, opt_.T, opt_.eps, m);
    } else {
      if (opt_.steps < opt_.order)
        throw error(op, "steps",
                    "multistep needs steps >= order; got steps = " + std::to_string(opt_.steps) +
                        ", order = " + std::to_string(opt_.order));
      grid_ = time_steps(gs, opt_.skip_type, opt_.T, opt_.eps, opt_.steps);
    }
  }

  const VPSchedule& schedule() const { return ns_; }
  const DpmSolverOptions& options() const { return opt_; }
  //! The time grid stepped through (get_time_steps of the reference).
  const std::vector<double>& timesteps() const { return grid_; }
  //! Stage orders (singlestep and fast; empty for multistep).
  const std::vector<int>& orders() const { return orders_; }
  //! Model evaluations per sample() call.
  int nfe() const {
    int n = opt_.method == SolverMethod::multistep ? opt_.steps : 0;
    for (int o : orders_) n += o;
    return n + (opt_.denoise ? 1 : 0);
  }

  //! A workspace for states with `rows` samples of `cols` values.
  Workspace make_workspace(std::int64_t rows, std::int64_t cols) const { return {rows, cols}; }

  //! Integrates x in place from t = T to t = eps. x: [B, ...] with B * inner = ws size.
  template <class Model>
  void sample(const Context<Backend>& ctx, View x, Model&& model, Workspace& ws) const {
    const std::int64_t rows = x.rank() ? x.dim(0) : 1;
    if (rows != ws.rows_ || x.size() != ws.rows_ * ws.cols_)
      throw error("DpmSolver::sample", "x",
                  "state " + x.shape().str() + " does not match the workspace [" +
                      std::to_string(ws.rows_) + ", " + std::to_string(ws.cols_) + "]");
    Run<Model> run{*this, ctx, x, model, ws};
    if (opt_.method == SolverMethod::multistep)
      run.multistep();
    else
      run.staged();
    if (opt_.denoise) run.denoise();
  }

 private:
  template <class Model>
  struct Run {
    const DpmSolver& S;
    const Context<Backend>& ctx;
    View x;
    Model& model;
    Workspace& ws;

    View buf(int i) const { return ws.buf_[static_cast<std::size_t>(i)].view().reshape(x.shape()); }
    static RowBlock<const T, Backend> cb(View v) { return as_rows(CView(v)); }
    const VPSchedule& ns() const { return S.ns_; }
    bool x0() const { return S.opt_.predict_x0; }

    // D(v, u) into out: the noise prediction, or the data prediction (v - sigma eps) / alpha.
    void evaluate(View v, double u, View out) {
      model(CView(v), u, out);
      if (x0()) {
        const double la = ns().marginal_log_mean_coeff(u);
        const double a = std::exp(la), s = std::sqrt(-std::expm1(2 * la));
        ops::lincomb<T>(ctx, as_rows(out), {{1.0 / a, cb(v)}, {-s / a, cb(out)}});
      }
    }
    // dst = cx * src + sum_k c[k] * D_k
    void combine(View dst, double cx, View src, int n, const double* c, const View* d) {
      using Tm = ops::Term<T, Backend>;
      switch (n) {
        case 1: return ops::lincomb<T>(ctx, as_rows(dst), {Tm{cx, cb(src)}, Tm{c[0], cb(d[0])}});
        case 2:
          return ops::lincomb<T>(ctx, as_rows(dst),
                                 {Tm{cx, cb(src)}, Tm{c[0], cb(d[0])}, Tm{c[1], cb(d[1])}});
        default:
          return ops::lincomb<T>(
              ctx, as_rows(dst),
              {Tm{cx, cb(src)}, Tm{c[0], cb(d[0])}, Tm{c[1], cb(d[1])}, Tm{c[2], cb(d[2])}});
      }
    }

    struct Point {
      double t, la, alpha, sigma, lambda;
    };
    Point at(double t) const {
      const double la = ns().marginal_log_mean_coeff(t);
      return {t, la, std::exp(la), std::sqrt(-std::expm1(2 * la)),
              la - 0.5 * std::log(-std::expm1(2 * la))};
    }
    // Coefficient of the state in a step from p to q: sigma_q / sigma_p (++) or alpha_q / alpha_p.
    double state_coef(const Point& p, const Point& q) const {
      return x0() ? q.sigma / p.sigma : std::exp(q.la - p.la);
    }

    // One singlestep stage of order o from s to t with ratios r1, r2 (SAMPLERS.md §8).
    void stage(int o, double s, double t, double r1, double r2) {
      const View D0 = buf(0), D1 = buf(1), D2 = buf(2), xt = buf(3);
      const Point ps = at(s), pt = at(t);
      const double h = pt.lambda - ps.lambda;
      const bool pp = x0();
      const bool taylor = S.opt_.solver_type == SolverType::taylor;
      evaluate(x, s, D0);
      if (o == 1) {
        const double c = pp ? pt.alpha * -(std::exp(-h) - 1) : -pt.sigma * std::expm1(h);
        const double cs[] = {c};
        const View ds[] = {D0};
        combine(x, state_coef(ps, pt), x, 1, cs, ds);
        return;
      }
      // first intermediate point
      const Point p1 = at(ns().inverse_lambda(ps.lambda + r1 * h));
      {
        const double c = pp ? -p1.alpha * std::expm1(-r1 * h) : -p1.sigma * std::expm1(r1 * h);
        const double cs[] = {c};
        const View ds[] = {D0};
        combine(xt, state_coef(ps, p1), x, 1, cs, ds);
      }
      evaluate(xt, p1.t, D1);
      if (o == 2) {
        double c0, c1;  // x_t = a x + c0 D_s + c1 (D_s1 - D_s)
        if (pp) {
          const double phi1 = std::expm1(-h);
          c0 = -pt.alpha * phi1;
          c1 = taylor ? (1.0 / r1) * pt.alpha * ((std::exp(-h) - 1) / h + 1)
                      : -(0.5 / r1) * pt.alpha * phi1;
        } else {
          const double psi1 = std::expm1(h);
          c0 = -pt.sigma * psi1;
          c1 = taylor ? -(1.0 / r1) * pt.sigma * ((std::exp(h) - 1) / h - 1)
                      : -(0.5 / r1) * pt.sigma * psi1;
        }
        const double cs[] = {c0 - c1, c1};
        const View ds[] = {D0, D1};
        combine(x, state_coef(ps, pt), x, 2, cs, ds);
        return;
      }
      // order 3: second intermediate point
      const Point p2 = at(ns().inverse_lambda(ps.lambda + r2 * h));
      {
        double c0, c1;  // x_s2 = a x + c0 D_s + c1 (D_s1 - D_s)
        if (pp) {
          const double phi12 = std::expm1(-r2 * h);
          const double phi22 = std::expm1(-r2 * h) / (r2 * h) + 1;
          c0 = -p2.alpha * phi12;
          c1 = (r2 / r1) * p2.alpha * phi22;
        } else {
          const double psi12 = std::expm1(r2 * h);
          const double psi22 = std::expm1(r2 * h) / (r2 * h) - 1;
          c0 = -p2.sigma * psi12;
          c1 = -(r2 / r1) * p2.sigma * psi22;
        }
        const double cs[] = {c0 - c1, c1};
        const View ds[] = {D0, D1};
        combine(xt, state_coef(ps, p2), x, 2, cs, ds);
      }
      evaluate(xt, p2.t, D2);
      // x_t = a x + b0 D_s + b1 D_s1 + b2 D_s2
      const double g = pp ? pt.alpha : -pt.sigma;  // sign convention of the family
      const double e1 = pp ? std::expm1(-h) : std::expm1(h);
      const double f1 = pp ? -g * e1 : g * e1;  // coefficient of D_s from the first term
      const double phi2 = pp ? e1 / h + 1 : e1 / h - 1;
      double b0 = f1, b1 = 0, b2 = 0;
      if (!taylor) {
        // ++: + (1/r2) alpha phi2 (D2 - D0);  noise: - (1/r2) sigma psi2 (D2 - D0)
        const double c = g * phi2 / r2;
        b0 -= c;
        b2 += c;
      } else {
        const double phi3 = phi2 / h - 0.5;
        // Delta0 = (D1 - D0)/r1, Delta1 = (D2 - D0)/r2
        const double d0[3] = {-1 / r1, 1 / r1, 0}, d1[3] = {-1 / r2, 0, 1 / r2};
        double dd1[3], dd2[3];
        for (int k = 0; k < 3; ++k) {
          dd1[k] = (r2 * d0[k] - r1 * d1[k]) / (r2 - r1);
          dd2[k] = 2 * (d1[k] - d0[k]) / (r2 - r1);
        }
        // ++: + alpha phi2 D1 - alpha phi3 D2;  noise: - sigma psi2 D1 - sigma psi3 D2
        const double c2 = pp ? -g * phi3 : g * phi3;
        b0 += g * phi2 * dd1[0] + c2 * dd2[0];
        b1 += g * phi2 * dd1[1] + c2 * dd2[1];
        b2 += g * phi2 * dd1[2] + c2 * dd2[2];
      }
      const double cs[] = {b0, b1, b2};
      const View ds[] = {D0, D1, D2};
      combine(x, state_coef(ps, pt), x, 3, cs, ds);
    }

    void staged() {
      const auto& g = S.grid_;
      const bool fast = S.opt_.method == SolverMethod::fast;
      std::size_t i = 0;
      for (int o : S.orders_) {
        if (fast) {
          const double ls = ns().marginal_lambda(g[i]);
          const double h = ns().marginal_lambda(g[i + static_cast<std::size_t>(o)]) - ls;
          const double r1 = o >= 2 ? (ns().marginal_lambda(g[i + 1]) - ls) / h : 0.5;
          const double r2 = o == 3 ? (ns().marginal_lambda(g[i + 2]) - ls) / h : 2.0 / 3.0;
          stage(o, g[i], g[i + static_cast<std::size_t>(o)], r1, r2);
          i += static_cast<std::size_t>(o);
        } else {
          stage(o, g[i], g[i + 1], o == 2 ? 0.5 : 1.0 / 3.0, 2.0 / 3.0);
          i += 1;
        }
      }
    }

    // Multistep update of order o to time t with history (oldest first) hp[0..o-1].
    void multistep_update(int o, const Point* hp, const View* hd, const Point& pt) {
      const Point& p0 = hp[o - 1];
      const double h = pt.lambda - p0.lambda;
      const bool pp = x0();
      const double a = state_coef(p0, pt);
      const double g = pp ? pt.alpha : -pt.sigma;
      const double e = pp ? std::exp(-h) - 1 : std::exp(h) - 1;
      const double c_first = pp ? -g * e : g * e;  // coefficient of D_p0 from the first term
      if (o == 1) {
        const double cs[] = {c_first};
        const View ds[] = {hd[0]};
        return combine(x, a, x, 1, cs, ds);
      }
      if (o == 2) {
        const Point& p1 = hp[0];
        const double r0 = (p0.lambda - p1.lambda) / h;
        double c;  // coefficient of Delta = (D_p0 - D_p1) / r0
        if (S.opt_.solver_type == SolverType::dpm_solver)
          c = 0.5 * c_first;
        else
          c = pp ? g * (e / h + 1) : g * (e / h - 1);
        const double cs[] = {-c / r0, c_first + c / r0};  // on D_p1, D_p0
        const View ds[] = {hd[0], hd[1]};
        return combine(x, a, x, 2, cs, ds);
      }
      const Point &p2 = hp[0], &p1 = hp[1];
      const double r0 = (p0.lambda - p1.lambda) / h, r1 = (p1.lambda - p2.lambda) / h;
      // Delta0 = (D0 - D1)/r0, Delta1 = (D1 - D2)/r1 over (D_p2, D_p1, D_p0)
      const double d0[3] = {0, -1 / r0, 1 / r0}, d1[3] = {-1 / r1, 1 / r1, 0};
      const double cD1 = pp ? g * (e / h + 1) : g * (e / h - 1);
      const double cD2 = pp ? -g * ((e + h) / (h * h) - 0.5) : g * ((e - h) / (h * h) - 0.5);
      double cs[3];
      for (int k = 0; k < 3; ++k) {
        const double D1 = d0[k] + r0 / (r0 + r1) * (d0[k] - d1[k]);
        const double D2 = (d0[k] - d1[k]) / (r0 + r1);
        cs[k] = cD1 * D1 + cD2 * D2;
      }
      cs[2] += c_first;
      const View ds[] = {hd[0], hd[1], hd[2]};
      combine(x, a, x, 3, cs, ds);
    }

    void multistep() {
      const auto& g = S.grid_;
      const int order = S.opt_.order, steps = S.opt_.steps;
      // ring of the last `order` (time, value) pairs, oldest first
      Point hp[3];
      View hd[3];
      int n = 0, next = 0;
      auto push = [&](double t) {
        const View d = buf(next);
        next = (next + 1) % 3;
        evaluate(x, t, d);
        if (n == order) {
          for (int k = 0; k + 1 < n; ++k) {
            hp[k] = hp[k + 1];
            hd[k] = hd[k + 1];
          }
          --n;
        }
        hp[n] = at(t);
        hd[n] = d;
        ++n;
      };
      push(g[0]);
      for (int k = 1; k <= steps; ++k) {
        const int o = k < order ? k : order;
        multistep_update(o, hp + (n - o), hd + (n - o), at(g[static_cast<std::size_t>(k)]));
        if (k < steps) push(g[static_cast<std::size_t>(k)]);
      }
    }

    void denoise() {
      const View e = buf(0);
      const double t = S.opt_.eps;
      model(CView(x), t, e);
      const Point p = at(t);
      ops::lincomb<T>(ctx, as_rows(x), {{1.0 / p.alpha, cb(x)}, {-p.sigma / p.alpha, cb(e)}});
    }
  };

  VPSchedule ns_;
  DpmSolverOptions opt_;
  std::vector<double> grid_;
  std::vector<int> orders_;
};

}  // namespace unidiffuser
