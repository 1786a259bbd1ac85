// SPDX-License-Identifier: Apache-2.0
//! \file guidance.hpp
//! Turns a multimodal noise predictor into the sampler's `eps(x, t)` for a task, with
//! classifier-free guidance "for free" (UNIDIFFUSER.md §5-§8).
//!
//! The network concept (any callable):
//!   net(const std::array<TensorView<const T, B>, K>& x,      // x[g]: [B, D_g]
//!       const std::array<std::span<const double>, K>& t_in,   // network time input per sample
//!       const std::array<TensorView<T, B>, K>& out)           // noise prediction per group
//! The solver state is the concatenation, per sample, of the generated groups' rows (ascending
//! group index). Per NFE: marginalised groups get noise drawn before the main call (ascending
//! group index, components in order); with guidance active, the groups replaced in reference
//! calls get one draw each after those, shared by all reference calls (§8 draw rule). The
//! reference calls of an evaluation go to the network batched with the main call (one call of
//! (1 + R) B rows: the main call's B rows, then each reference call's, in the official order) or,
//! with GuidanceOptions::batch_references off, as separate calls after the main one. The network
//! makes no draws, so both give the same draws in the same order, and, for a network whose
//! per-sample output does not depend on the other samples of its batch (nn::UViT), the same
//! numbers.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/diffusion/task.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace unidiffuser {

//! Reference of conditional guidance.
enum class CfgMode {
  true_uncond,      //!< condition replaced by noise at time N (official default)
  empty_condition,  //!< condition replaced by a user "null" value at time 0 (official
                    //!< 'empty_token')
};
//! Where marginalisation / reference noise comes from.
enum class MarginalNoise {
  fresh,  //!< drawn from the noise source at every network call (official)
  fixed,  //!< one user tensor per group, reused at every call (diffusers' img/text; golden runs)
};

//! Guidance settings. scale = 0 disables guidance (no reference calls, no noise drawn for them).
struct GuidanceOptions {
  double scale = 7.0;  //!< official convention: e + s (e - r) (diffusers' guidance_scale = s + 1)
  CfgMode cfg_mode = CfgMode::true_uncond;
  //! Keep conditions clean (time 0) inside reference calls; only meaningful with >= 2 generated
  //! groups (with one generated group the condition is always replaced, as officially).
  bool keep_condition_in_reference = false;
  MarginalNoise marginal_noise = MarginalNoise::fresh;
  int levels = 1000;  //!< N: time input of marginalised groups and the factor of N * tau
  //! Form N * tau as the reference does: float32(float32(tau) * N). Off: double product.
  bool float32_time_input = true;
  //! Guidance rescale phi in [0, 1] (Lin et al., "Common Diffusion Noise Schedules and Sample
  //! Steps Are Flawed", WACV 2024, eq. 15-16, taken to the data prediction): per sample and
  //! generated group, the guided data prediction x0 = (x - sigma e) / alpha is scaled by
  //! phi * std(x0_cond) / std(x0_guided) + (1 - phi), where std is over the group's elements of
  //! the sample. Guidance extrapolates x0 away from the reference, which inflates the magnitude of
  //! a modality whose content is its amplitude (a sound's loudness, an image's saturation); this
  //! brings the magnitude back to the conditional prediction's and keeps the direction. 0
  //! (default): the official guidance, bit for bit. Not part of the official code.
  double rescale = 0;
  //! Guidance interval (Kynkaanniemi et al., "Applying Guidance in a Limited Interval Improves
  //! Sample and Distribution Quality", NeurIPS 2024): guidance applies only at solver times tau
  //! in [interval_lo, interval_hi] (tau = 1 is pure noise); elsewhere the evaluation is the
  //! unguided prediction, one network call, no reference noise drawn. Default [0, 1]: everywhere
  //! (official). Not part of the official code.
  double interval_lo = 0, interval_hi = 1;
  //! Evaluate the reference calls of a step in the same network call as the main one ((1 + R) B
  //! rows; default) rather than in R more calls of B rows. Same results for a network whose
  //! samples are independent of each other; fewer, larger calls (better use of threads at small
  //! batch sizes) for (1 + R) times the network's per-call memory.
  bool batch_references = true;
  //! The noise schedule of the sampler's time (alpha, sigma at tau), needed when rescale > 0;
  //! sample_task / sample_chain fill it from the sampler (its schedule()) when left null.
  const VPSchedule* schedule = nullptr;
};

//! The guided noise predictor of one task; a callable `(state, tau, eps_out)` for samplers.
template <class T, std::size_t K, class Net, class Noise, class Backend = cpu>
class GuidedPredictor {
 public:
  using View = TensorView<T, Backend>;
  using CView = TensorView<const T, Backend>;

  //! `conditions[g]`: [B, D_g] clean values for conditioned groups (others ignored).
  //! `extra[g]`: null values (empty_condition) or fixed noise (MarginalNoise::fixed), as needed.
  GuidedPredictor(const Context<Backend>& ctx, Net& net, Noise& noise, GroupLayout<K> layout,
                  Task<K> task, GuidanceOptions opt, std::int64_t batch,
                  std::array<CView, K> conditions = {}, std::array<CView, K> null_conditions = {},
                  std::array<CView, K> fixed_noise = {})
      : ctx_(ctx),
        net_(net),
        noise_(noise),
        layout_(std::move(layout)),
        task_(task),
        opt_(opt),
        batch_(batch),
        cond_(conditions),
        null_(null_conditions),
        fixed_(fixed_noise) {
    const char* op = "GuidedPredictor";
    task_.validate(op);
    if (batch_ < 1) throw_mismatch(op, "batch", "batch size", ">= 1", batch_);
    if (opt_.levels < 1) throw_mismatch(op, "levels", "number of levels", ">= 1", opt_.levels);
    if (!std::isfinite(opt_.scale)) throw error(op, "scale", "guidance scale must be finite");
    if (!(opt_.rescale >= 0 && opt_.rescale <= 1))
      throw_mismatch(op, "rescale", "guidance rescale phi", "a value in [0, 1]", opt_.rescale);
    if (!(opt_.interval_lo >= 0 && opt_.interval_lo <= opt_.interval_hi && opt_.interval_hi <= 1))
      throw error(op, "interval",
                  "guidance interval must satisfy 0 <= interval_lo <= interval_hi <= 1; got [" +
                      std::to_string(opt_.interval_lo) + ", " + std::to_string(opt_.interval_hi) +
                      "]");
    if (opt_.rescale > 0 && opt_.schedule == nullptr)
      throw error(
          op, "rescale",
          "guidance rescale needs GuidanceOptions::schedule (the sampler's noise schedule)");
    const std::size_t n_gen = task_.count(Role::generate), n_cond = task_.count(Role::condition);
    keep_ = opt_.keep_condition_in_reference && n_gen >= 2;
    if (opt_.scale != 0) {
      if (opt_.cfg_mode == CfgMode::empty_condition)
        active_ = n_cond > 0;
      else
        active_ = !(n_cond == 0 && n_gen == 1);
    }
    if (opt_.cfg_mode == CfgMode::empty_condition && opt_.scale != 0 && n_cond == 0)
      throw error(op, "cfg_mode", "empty_condition guidance needs at least one conditioned group");
    std::int64_t off = 0;
    for (std::size_t g = 0; g < K; ++g) {
      const std::int64_t d = layout_.size(g);
      const std::string name = "group '" + layout_.group(g).name + "'";
      const Shape want{batch_, d};
      if (task_.roles[g] == Role::generate) {
        state_off_[g] = off;
        off += d;
      }
      if (task_.roles[g] == Role::condition)
        check_shape(op, "conditions[" + name + "]", cond_[g], want);
      if (task_.roles[g] == Role::condition && active_ && opt_.cfg_mode == CfgMode::empty_condition)
        check_shape(op, "null_conditions[" + name + "]", null_[g], want);
      const bool noisy = task_.roles[g] == Role::marginalize || (active_ && replaced(g));
      if (noisy && opt_.marginal_noise == MarginalNoise::fixed)
        check_shape(op, "fixed_noise[" + name + "]", fixed_[g], want);
      in_[g] = Tensor<T, Backend>(want);
      out_[g] = Tensor<T, Backend>(want);
      if (active_) {
        ref_[g] = Tensor<T, Backend>(want);
        // the separate reference calls' discarded outputs, and the rescale's scratch
        if (!opt_.batch_references || opt_.rescale > 0) scratch_[g] = Tensor<T, Backend>(want);
      }
      if (active_ && opt_.rescale > 0 && task_.generated(g)) {
        zeros_[g] = Tensor<T, Backend>(want);
        ones_[g] = Tensor<T, Backend>(want);
        means_[g] = Tensor<T, Backend>(want);
        for (auto* v :
             {&rs_.sq, &rs_.sq1, &rs_.mean, &rs_.none, &rs_.f, &rs_.c, &rs_.var_c, &rs_.var_g})
          v->assign(static_cast<std::size_t>(batch_), 0.0);
        ops::fill<T>(ctx_, zeros_[g].view(), T(0));
        ops::fill<T>(ctx_, ones_[g].view(), T(1));
      }
      if (noisy && opt_.marginal_noise == MarginalNoise::fresh) xi_[g] = Tensor<T, Backend>(want);
    }
    if (active_ && opt_.batch_references) {
      const std::int64_t rows = batch_ * forwards_per_call();
      for (std::size_t g = 0; g < K; ++g) {
        big_in_[g] = Tensor<T, Backend>(Shape{rows, layout_.size(g)});
        big_out_[g] = Tensor<T, Backend>(Shape{rows, layout_.size(g)});
      }
      for (std::size_t g = 0; g < K; ++g) big_tv_[g].assign(static_cast<std::size_t>(rows), 0.0);
    }
    state_size_ = off;
    t_gen_.assign(static_cast<std::size_t>(batch_), 0.0);
    t_zero_.assign(static_cast<std::size_t>(batch_), 0.0);
    t_max_.assign(static_cast<std::size_t>(batch_), static_cast<double>(opt_.levels));
  }

  //! Values per sample of the solver state.
  std::int64_t state_size() const { return state_size_; }
  std::int64_t batch() const { return batch_; }
  //! Column offset of generated group g inside the state.
  std::int64_t state_offset(std::size_t g) const { return state_off_[g]; }
  //! Whether reference calls are made.
  bool guidance_active() const { return active_; }
  //! Network forwards per evaluation (inside the guidance interval).
  int forwards_per_call() const {
    if (!active_) return 1;
    return opt_.cfg_mode == CfgMode::empty_condition
               ? 2
               : 1 + static_cast<int>(task_.count(Role::generate));
  }
  //! Calls of the network per evaluation inside the guidance interval: 1 when the reference
  //! calls are batched with the main one, else forwards_per_call(). Outside it: 1.
  int calls_per_evaluation() const {
    return active_ && opt_.batch_references ? 1 : forwards_per_call();
  }
  //! Rows of the largest network call: B x forwards_per_call() when batched, else B.
  std::int64_t rows_per_call() const {
    return active_ && opt_.batch_references ? batch_ * forwards_per_call() : batch_;
  }
  std::uint64_t network_calls() const { return calls_; }

  //! eps_out = guided noise prediction of the generated groups at solver time tau.
  void operator()(CView state, double tau, View eps_out) {
    const Context<Backend>& ctx = ctx_;
    const char* op = "GuidedPredictor";
    if (state.size() != batch_ * state_size_)
      throw_mismatch(op, "state", "element count", batch_ * state_size_, state.size());
    if (eps_out.size() != batch_ * state_size_)
      throw_mismatch(op, "eps_out", "element count", batch_ * state_size_, eps_out.size());
    const auto st = state.reshape(Shape{batch_, state_size_});
    const auto eo = eps_out.reshape(Shape{batch_, state_size_});
    const double tin = opt_.float32_time_input
                           ? static_cast<double>(static_cast<float>(
                                 static_cast<float>(tau) * static_cast<float>(opt_.levels)))
                           : tau * opt_.levels;
    std::fill(t_gen_.begin(), t_gen_.end(), tin);

    // 1. noise for marginalised groups, before the main call
    for (std::size_t g = 0; g < K; ++g)
      if (task_.roles[g] == Role::marginalize) draw(ctx, g);
    const bool guided = active_ && tau >= opt_.interval_lo && tau <= opt_.interval_hi;
    if (guided && opt_.batch_references) return batched(st, tin, tau, eo);
    // 2. main call
    std::array<CView, K> x;
    std::array<std::span<const double>, K> t;
    std::array<View, K> o;
    for (std::size_t g = 0; g < K; ++g) {
      switch (task_.roles[g]) {
        case Role::generate:
          ops::copy<T>(ctx, column_block(st, state_off_[g], layout_.size(g)),
                       as_rows(in_[g].view()));
          x[g] = in_[g].view();
          t[g] = t_gen_;
          break;
        case Role::condition:
          x[g] = cond_[g];
          t[g] = t_zero_;
          break;
        case Role::marginalize:
          x[g] = noise_view(g);
          t[g] = t_max_;
          break;
      }
      o[g] = out_[g].view();
    }
    call(x, t, o);
    if (!guided) {
      for (std::size_t g = 0; g < K; ++g)
        if (task_.generated(g))
          ops::copy<T>(ctx, as_rows(CView(out_[g].view())),
                       column_block(eo, state_off_[g], layout_.size(g)));
      return;
    }
    // 3. reference calls
    if (opt_.cfg_mode == CfgMode::empty_condition) {
      auto xr = x;
      for (std::size_t g = 0; g < K; ++g) {
        if (task_.roles[g] == Role::condition) xr[g] = null_[g];
        o[g] = ref_[g].view();
      }
      call(xr, t, o);
      for (std::size_t g = 0; g < K; ++g)
        if (task_.generated(g)) combine(ctx, eo, g, tau);
      return;
    }
    for (std::size_t g = 0; g < K; ++g)
      if (task_.roles[g] != Role::marginalize && replaced(g)) draw(ctx, g);
    for (std::size_t g = 0; g < K; ++g) {
      if (!task_.generated(g)) continue;
      auto xr = x;
      auto tr = t;
      for (std::size_t h = 0; h < K; ++h) {
        o[h] = h == g ? ref_[g].view() : scratch_[h].view();  // outputs of h != g are discarded
        if (h == g || task_.roles[h] == Role::marginalize) continue;
        if (task_.roles[h] == Role::condition && keep_) continue;
        xr[h] = noise_view(h);
        tr[h] = t_max_;
      }
      call(xr, tr, o);
      combine(ctx, eo, g, tau);
    }
  }

 private:
  // The guided evaluation as one network call: segment 0 is the main call, segment 1 + r the
  // r-th reference call (empty_condition: one, with the null conditions; true_uncond: one per
  // generated group, ascending), each B rows, with the inputs and time inputs the separate calls
  // would get.
  void batched(CView st, double tin, double tau, View eo) {
    const Context<Backend>& ctx = ctx_;
    const std::int64_t B = batch_;
    const bool empty = opt_.cfg_mode == CfgMode::empty_condition;
    if (!empty)
      for (std::size_t g = 0; g < K; ++g)
        if (task_.roles[g] != Role::marginalize && replaced(g)) draw(ctx, g);
    for (std::size_t g = 0; g < K; ++g)
      if (task_.roles[g] == Role::generate)
        ops::copy<T>(ctx, column_block(st, state_off_[g], layout_.size(g)), as_rows(in_[g].view()));
    // (input, time input) of group h in segment seg
    enum class Src { state, cond, null, noise };
    auto source = [&](std::size_t h, int seg) -> std::pair<Src, double> {
      const Role r = task_.roles[h];
      if (r == Role::marginalize) return {Src::noise, double(opt_.levels)};
      if (seg == 0)
        return r == Role::generate ? std::pair{Src::state, tin} : std::pair{Src::cond, 0.0};
      if (empty)
        return r == Role::generate ? std::pair{Src::state, tin} : std::pair{Src::null, 0.0};
      // true_uncond, the reference call of the seg-th generated group
      std::size_t g = 0;
      for (int n = 0; g < K; ++g)
        if (task_.generated(g) && ++n == seg) break;
      if (h == g) return {Src::state, tin};
      if (r == Role::condition && keep_) return {Src::cond, 0.0};
      return {Src::noise, double(opt_.levels)};
    };
    const int segs = forwards_per_call();
    std::array<CView, K> x;
    std::array<std::span<const double>, K> t;
    std::array<View, K> o;
    for (std::size_t h = 0; h < K; ++h) {
      const std::int64_t d = layout_.size(h);
      for (int seg = 0; seg < segs; ++seg) {
        const auto [src, time] = source(h, seg);
        const CView from = src == Src::state  ? CView(in_[h].view())
                           : src == Src::cond ? cond_[h]
                           : src == Src::null ? null_[h]
                                              : noise_view(h);
        ops::copy<T>(ctx, as_rows(from),
                     RowBlock<T, Backend>(big_in_[h].data() + seg * B * d, B, d, d));
        std::fill_n(big_tv_[h].begin() + seg * B, B, time);
      }
      x[h] = big_in_[h].view();
      t[h] = big_tv_[h];
      o[h] = big_out_[h].view();
    }
    call(x, t, o);
    // the main outputs and each generated group's reference, then the combination
    int seg = 0;
    for (std::size_t g = 0; g < K; ++g) {
      if (!task_.generated(g)) continue;
      ++seg;
      const std::int64_t d = layout_.size(g);
      const int rs = empty ? 1 : seg;
      ops::copy<T>(ctx, RowBlock<const T, Backend>(big_out_[g].data(), B, d, d),
                   as_rows(out_[g].view()));
      ops::copy<T>(ctx, RowBlock<const T, Backend>(big_out_[g].data() + rs * B * d, B, d, d),
                   as_rows(ref_[g].view()));
      combine(ctx, eo, g, tau);
    }
  }
  // Whether group g is replaced by noise in at least one reference call (true_uncond).
  bool replaced(std::size_t g) const {
    if (opt_.cfg_mode == CfgMode::empty_condition) return false;
    switch (task_.roles[g]) {
      case Role::generate: return task_.count(Role::generate) >= 2;
      case Role::condition: return !keep_;
      case Role::marginalize: return true;
    }
    return false;
  }
  CView noise_view(std::size_t g) const {
    return opt_.marginal_noise == MarginalNoise::fixed ? fixed_[g] : CView(xi_[g].view());
  }
  void draw(const Context<Backend>& ctx, std::size_t g) {
    if (opt_.marginal_noise == MarginalNoise::fixed) return;
    const auto& comps = layout_.group(g).components;
    for (std::size_t c = 0; c < comps.size(); ++c)
      noise_.draw(ctx, g, c, column_block(xi_[g].view(), layout_.offset(g, c), comps[c].numel()));
  }
  void call(const std::array<CView, K>& x, const std::array<std::span<const double>, K>& t,
            const std::array<View, K>& o) {
    ++calls_;
    net_(ctx_, x, t, o);
  }
  // eps_out[:, group g] = (1 + s) e_g - s r_g, then the optional rescale
  void combine(const Context<Backend>& ctx, View eo, std::size_t g, double tau) {
    const double s = opt_.scale;
    const auto dst = column_block(eo, state_off_[g], layout_.size(g));
    ops::lincomb<T>(
        ctx, dst,
        {{1.0 + s, as_rows(CView(out_[g].view()))}, {-s, as_rows(CView(ref_[g].view()))}});
    if (opt_.rescale > 0) rescale(ctx, dst, g, tau);
  }
  // Guidance rescale (GuidanceOptions::rescale). With u = x - sigma e (alpha x0), the data
  // prediction scaled by f is e' = f e + (1 - f) x / sigma; f = phi std(u_cond) / std(u_guided)
  // + 1 - phi per sample (alpha cancels). The row moments come from squared-error reductions,
  // available on every backend: the mean from those against 0 and 1 (sum u = (sum u^2 + D -
  // sum (u - 1)^2) / 2), then the variance from the one against the mean.
  void rescale(const Context<Backend>& ctx, RowBlock<T, Backend> dst, std::size_t g, double tau) {
    const double alpha = opt_.schedule->marginal_alpha(tau),
                 sigma = opt_.schedule->marginal_std(tau), phi = opt_.rescale;
    if (!(sigma > 0) || !(alpha > 0)) return;
    const auto x = as_rows(CView(in_[g].view()));
    // the reference output is no longer needed: it holds u_cond; scratch holds u_guided
    ops::lincomb<T>(ctx, as_rows(ref_[g].view()),
                    {{1.0, x}, {-sigma, as_rows(CView(out_[g].view()))}});
    ops::lincomb<T>(ctx, as_rows(scratch_[g].view()),
                    {{1.0, x}, {-sigma, RowBlock<const T, Backend>(dst)}});
    const auto b = static_cast<std::size_t>(batch_);
    const double d = static_cast<double>(layout_.size(g));
    // per-sample values, sized once in the constructor
    auto &sq = rs_.sq, &sq1 = rs_.sq1, &mean = rs_.mean, &f = rs_.f, &c = rs_.c;
    const auto& none = rs_.none;
    auto variance = [&](const Tensor<T, Backend>& u, std::vector<double>& var) {
      const auto ur = as_rows(CView(u.view())), zeros = as_rows(CView(zeros_[g].view())),
                 ones = as_rows(CView(ones_[g].view()));
      ops::squared_error_rows<T>(ctx, ur, zeros, sq.data());
      ops::squared_error_rows<T>(ctx, ur, ones, sq1.data());
      for (std::size_t r = 0; r < b; ++r) mean[r] = (sq[r] + d - sq1[r]) / (2 * d);
      // second pass about the mean (no cancellation in the variance)
      ops::axpby_rows<T>(ctx, as_rows(means_[g].view()), mean.data(), ones, none.data(), zeros);
      ops::squared_error_rows<T>(ctx, ur, as_rows(CView(means_[g].view())), var.data());
      for (std::size_t r = 0; r < b; ++r) var[r] /= d;
    };
    auto &var_c = rs_.var_c, &var_g = rs_.var_g;
    variance(ref_[g], var_c);
    variance(scratch_[g], var_g);
    for (std::size_t r = 0; r < b; ++r) {
      const double ratio = var_g[r] > 0 ? std::sqrt(var_c[r] / var_g[r]) : 1.0;
      f[r] = phi * (std::isfinite(ratio) ? ratio : 1.0) + (1 - phi);
      c[r] = (1 - f[r]) / sigma;
    }
    ops::axpby_rows<T>(ctx, dst, f.data(), RowBlock<const T, Backend>(dst), c.data(), x);
  }

  Context<Backend> ctx_;
  Net& net_;
  Noise& noise_;
  GroupLayout<K> layout_;
  Task<K> task_;
  GuidanceOptions opt_;
  std::int64_t batch_;
  std::array<CView, K> cond_, null_, fixed_;
  std::array<Tensor<T, Backend>, K> in_, out_, ref_, xi_, scratch_, zeros_, ones_, means_;
  std::array<Tensor<T, Backend>, K> big_in_, big_out_;  // batched references: (1 + R) B rows
  std::array<std::vector<double>, K> big_tv_;           // their time inputs
  std::array<std::int64_t, K> state_off_{};
  std::int64_t state_size_ = 0;
  std::vector<double> t_gen_, t_zero_, t_max_;
  struct RescaleScratch {  // per-sample moments and coefficients of the guidance rescale
    std::vector<double> sq, sq1, mean, none, f, c, var_c, var_g;
  } rs_;
  bool active_ = false, keep_ = false;
  std::uint64_t calls_ = 0;
};

}  // namespace unidiffuser
