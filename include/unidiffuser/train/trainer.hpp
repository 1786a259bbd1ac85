// SPDX-License-Identifier: Apache-2.0
//! \file trainer.hpp
//! Training a K-group U-ViT with the UniDiffuser objective (UNIDIFFUSER.md §3): every group of
//! every sample noised at its own level drawn from Philox, the network predicting every group's
//! noise, the mean squared error over all elements. The data source is a pure function of (seed,
//! step, global sample index), and so are the levels and the noise: a step's batch does not depend
//! on how it is split over micro-batches or workers, and a run resumed from a checkpoint continues
//! exactly as the run straight through.
//!
//! Data-parallel training plugs in through one place: `Reducer::sum` is called once per step on
//! the gradient buffer (and on the loss sums) after the local backward passes; an MPI reducer is in
//! train/mpi.hpp, a NCCL one would take the same seat.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/forward.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/diffusion/objective.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "unidiffuser/train/optim.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace unidiffuser::train {

//! Sums buffers over the workers of a data-parallel run (identity for one process).
struct Reducer {
  int rank = 0, world = 1;
  std::function<void(float*, std::int64_t)> sum_f32;
  std::function<void(double*, std::int64_t)> sum_f64;
};

template <class T, std::size_t K, class Backend = cpu>
struct TrainerOptions {
  std::uint64_t seed = 0;
  std::int64_t batch = 8;          //!< global batch (all workers, all micro-batches)
  std::int64_t micro_batches = 1;  //!< gradient accumulation: batch / world / micro per pass
  int levels = 1000;               //!< N: levels drawn uniformly in 1..N
  LrSchedule lr{};
  AdamWOptions adamw{};
  double clip_norm = 0;  //!< global-norm clipping (0: off)
  double ema_decay = 0.9999;
  bool recompute = false;  //!< per-block activation recomputation in the backward
  //! Leave the step's gradients (reduced, clipped) in net.gradients() after step(), for
  //! inspection; by default the optimiser's pass zeroes them for the next step as it reads them
  //! (one pass over the buffer fewer).
  bool keep_gradients = false;
  std::int64_t data_type = 1;  //!< default data type of v1 networks when the source sets none
  //! Weight of each group's squared error in the loss; empty: 1 for every group, i.e. the mean
  //! over the concatenation of all groups' elements (UNIDIFFUSER.md §3, the library's default).
  //! group_mean_weights() gives every group's MSE the same weight whatever its size.
  std::vector<double> group_weights{};
  //! Marginalisation training (a library extension; empty or zeros: the objective of
  //! UNIDIFFUSER.md §3 exactly): with probability marginal_probability[g], independently per
  //! sample, group g's input is fresh N(0, I) noise at level N (its target that same noise), which
  //! is exactly what sampling feeds a marginalised group: the marginal modes and the guidance
  //! references then query inputs the network was trained on. At level N the noised data still
  //! holds sqrt(abar_N) = 0.068 of the signal, so without this the marginalised input is off the
  //! training distribution wherever the data's mean is far from 0. Off by default: on the shapes
  //! demo it made the marginals worse (docs/CUSTOM_LAYOUTS.md §2).
  std::vector<double> marginal_probability{};
  //! Min-SNR-gamma loss weighting over levels (Hang et al., ICCV 2023; a library extension, 0 =
  //! off, the exact objective): each sample's squared error of a group at level n is weighted by
  //! min_snr_weight(n, gamma) = min(SNR_n, gamma) / SNR_n, SNR_n = abar_n / (1 - abar_n) — 1 at
  //! the noisy levels (SNR <= gamma), less at the clean end, where the epsilon loss is easy and
  //! its gradients crowd out the levels that decide a sample's content.
  double min_snr_gamma = 0;
  //! The training schedule's betas, beta_1 .. beta_N (N = `levels`); empty: the official
  //! scaled-linear schedule (DiscreteSchedule::stable_diffusion()). A network trained on other
  //! betas must be sampled with the same ones (VPSchedule::discrete(betas)).
  std::vector<double> betas{};
};

//! The min-SNR-gamma weight of level n (TrainerOptions::min_snr_gamma).
inline double min_snr_weight(const DiscreteSchedule& s, std::int64_t n, double gamma) {
  const double a = s.abar(static_cast<int>(n)), snr = a / (1.0 - a);
  return std::min(snr, gamma) / snr;
}

//! Loss weights that make the loss the mean of the K groups' MSEs (each group counts the same,
//! whatever its number of elements): w_g = D / (K D_g), D = the sum of the D_g.
template <std::size_t K>
std::vector<double> group_mean_weights(const GroupLayout<K>& layout) {
  std::int64_t total = 0;
  for (std::size_t g = 0; g < K; ++g) total += layout.size(g);
  std::vector<double> w(K);
  for (std::size_t g = 0; g < K; ++g)
    w[g] =
        static_cast<double>(total) / (static_cast<double>(K) * static_cast<double>(layout.size(g)));
  return w;
}

//! One step's log: the loss (the objective: weighted by group_weights and any level weighting,
//! mean over the global batch) and each group's plain MSE.
struct StepLog {
  std::int64_t step = 0;
  double loss = 0, grad_norm = 0, lr = 0;
  std::vector<double> group_mse;
};

//! The K-group trainer. `DataSource`: void(seed, step, first global sample index, x0 views
//! [rows, D_g] per group, data types span) filling clean data for samples first..first + rows.
template <class T, std::size_t K, class Backend = cpu>
class Trainer {
 public:
  using Net = nn::UViT<T, Backend>;
  using Views = std::array<RowBlock<T, Backend>, K>;
  using DataSource = std::function<void(std::uint64_t seed, std::int64_t step, std::int64_t first,
                                        const Views& x0, std::span<std::int64_t> data_type)>;
  using Options = TrainerOptions<T, K, Backend>;

  Trainer(Net& net, Options opt, DataSource data, Reducer reducer = {})
      : net_(net),
        opt_(std::move(opt)),
        data_(std::move(data)),
        red_(std::move(reducer)),
        layout_(net.config().template layout<K>()),
        sched_(opt_.betas.empty() ? DiscreteSchedule::stable_diffusion()
                                  : DiscreteSchedule(opt_.betas)),
        adam_(parameter_ranges(net), net.parameters().size(), opt_.adamw),
        ema_(Context<Backend>{}, TensorView<const T, Backend>(net.parameters()), opt_.ema_decay) {
    const char* op = "train::Trainer";
    if (red_.world < 1 || red_.rank < 0 || red_.rank >= red_.world)
      throw error(op, "reducer", "rank must lie in [0, world)");
    if (opt_.batch < 1 || opt_.micro_batches < 1 ||
        opt_.batch % (red_.world * opt_.micro_batches) != 0)
      throw error(op, "batch",
                  "the global batch " + std::to_string(opt_.batch) +
                      " must be a positive multiple of workers x micro-batches (" +
                      std::to_string(red_.world) + " x " + std::to_string(opt_.micro_batches) +
                      ")");
    if (opt_.levels < 1) throw_mismatch(op, "levels", "levels", ">= 1", opt_.levels);
    if (!opt_.betas.empty() && opt_.levels != sched_.levels())
      throw_mismatch(op, "betas", "one beta per level", opt_.levels, opt_.betas.size());
    if (opt_.levels > sched_.levels())
      throw_mismatch(op, "levels", "levels (at most the schedule's)", sched_.levels(), opt_.levels);
    if (!data_) throw error(op, "data", "no data source");
    if (opt_.group_weights.empty()) opt_.group_weights.assign(K, 1.0);
    if (opt_.group_weights.size() != K)
      throw_mismatch(op, "group_weights", "one weight per group", K, opt_.group_weights.size());
    double wsum = 0;
    for (double w : opt_.group_weights) {
      if (!std::isfinite(w) || w < 0)
        throw error(op, "group_weights",
                    "weights must be finite and >= 0; got " + std::to_string(w));
      wsum += w;
    }
    if (!(wsum > 0)) throw error(op, "group_weights", "at least one weight must be positive");
    if (opt_.marginal_probability.empty()) opt_.marginal_probability.assign(K, 0.0);
    if (opt_.marginal_probability.size() != K)
      throw_mismatch(op, "marginal_probability", "one probability per group", K,
                     opt_.marginal_probability.size());
    if (!(opt_.min_snr_gamma >= 0) || !std::isfinite(opt_.min_snr_gamma))
      throw error(
          op, "min_snr_gamma",
          "expected a finite value >= 0 (0: off); got " + std::to_string(opt_.min_snr_gamma));
    for (double p : opt_.marginal_probability)
      if (!(p >= 0.0 && p <= 1.0))
        throw error(op, "marginal_probability",
                    "probabilities must lie in [0, 1]; got " + std::to_string(p));
    const auto& C = net.config().components;
    for (std::size_t k = 0; k < C.size(); ++k) {
      std::int64_t off = 0;
      for (std::size_t j = 0; j < C[k].slot; ++j)
        off += layout_.group(C[k].group).components[j].numel();
      offset_.push_back(off);
    }
    const std::int64_t per = micro();
    for (std::size_t g = 0; g < K; ++g) {
      const Shape s{per, layout_.size(g)};
      x0_[g] = Tensor<T, Backend>(s);
      eps_[g] = Tensor<T, Backend>(s);
      xn_[g] = Tensor<T, Backend>(s);
      pred_[g] = Tensor<T, Backend>(s);
      dpred_[g] = Tensor<T, Backend>(s);
    }
    dt_.assign(static_cast<std::size_t>(per), opt_.data_type);
  }

  //! Samples per forward pass of this worker.
  std::int64_t micro() const { return opt_.batch / red_.world / opt_.micro_batches; }
  std::int64_t step_index() const { return step_; }
  const Options& options() const { return opt_; }
  Ema<T, Backend>& ema() { return ema_; }
  AdamW<T, Backend>& optimizer() { return adam_; }

  //! One optimisation step: forward and backward over the local micro-batches, the reduction,
  //! clipping, AdamW, EMA.
  StepLog step(const Context<Backend>& ctx) {
    StepLog log;
    log.step = step_;
    log.lr = opt_.lr.at(step_);
    net_.zero_gradients();
    const std::int64_t per = micro(), local = per * opt_.micro_batches;
    std::int64_t d_total = 0;
    for (std::size_t g = 0; g < K; ++g) d_total += layout_.size(g);
    const double denom = static_cast<double>(opt_.batch) * static_cast<double>(d_total);
    std::vector<double> sums(K + 1, 0.0);  // per-group squared error sums, then the total
    for (std::int64_t mb = 0; mb < opt_.micro_batches; ++mb) {
      const std::int64_t first = step_ * opt_.batch + red_.rank * local + mb * per;
      pass(ctx, first, denom, sums);
    }
    if (red_.world > 1) {
      reduce(net_.gradients());
      red_.sum_f64(sums.data(), static_cast<std::int64_t>(sums.size()));
    }
    log.grad_norm = clip_grad_norm<T>(ctx, net_.gradients(), opt_.clip_norm);
    // AdamW, the EMA and the next step's zero gradients in one pass where the backend fuses them
    adam_.step(ctx, net_.parameters(), net_.gradients(), log.lr, &ema_, !opt_.keep_gradients);
    if (!opt_.keep_gradients) net_.note_gradients_zero();
    net_.parameters_changed();
    log.loss = sums[K] / denom;
    for (std::size_t g = 0; g < K; ++g)
      log.group_mse.push_back(sums[g] / (static_cast<double>(opt_.batch) * layout_.size(g)));
    ++step_;
    return log;
  }

  //! Runs until step `until`: a progress line with the loss, step rate and ETA (redrawn in place
  //! on a terminal, one line every `log_every` steps otherwise); checkpoints every `save_every`
  //! steps to `path` (0 / empty: never). Returns the last step's log.
  StepLog run(const Context<Backend>& ctx, std::int64_t until, std::int64_t log_every = 10,
              const std::string& path = {}, std::int64_t save_every = 0, bool quiet = false) {
    StepLog last;
    const auto t0 = std::chrono::steady_clock::now();
    const std::int64_t s0 = step_;
#if defined(__unix__) || defined(__APPLE__)
    const bool tty = isatty(2) != 0;
#else
    const bool tty = false;
#endif
    while (step_ < until) {
      last = step(ctx);
      const bool show = !quiet && red_.rank == 0 &&
                        (tty || (log_every > 0 && (step_ % log_every == 0 || step_ == until)));
      if (show) {
        const double secs =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        const double rate = static_cast<double>(step_ - s0) / std::max(secs, 1e-9);
        std::string mse;
        for (std::size_t g = 0; g < K; ++g)
          mse += " " + layout_.group(g).name + " " + fmt(last.group_mse[g]);
        std::fprintf(stderr, "%sstep %lld/%lld  loss %s (%s )  %.2f step/s  ETA %.0fs%s",
                     tty ? "\r" : "", static_cast<long long>(step_), static_cast<long long>(until),
                     fmt(last.loss).c_str(), mse.c_str(), rate,
                     static_cast<double>(until - step_) / std::max(rate, 1e-9),
                     tty ? (step_ == until ? "\n" : "") : "\n");
      }
      if (!path.empty() && save_every > 0 && (step_ % save_every == 0 || step_ == until))
        save(path);
    }
    return last;
  }

  //! Writes weights, EMA, optimizer moments, the step and the options' identity (seed, batch) to
  //! `path` with the atomic writer (a crash leaves the previous file); rank 0 only.
  void save(const std::string& path) const {
    static_assert(is_host_backend_v<Backend>, "Trainer::save: host backends (copy to host first)");
    if (red_.rank != 0) return;
    safetensors::Writer w;
    const Net& net = net_;
    const auto P = net.parameters();
    const auto E = ema_.weights();
    const auto M = adam_.first_moment();
    const auto V = adam_.second_moment();
    for (const auto& r : adam_.ranges()) {
      const Shape s = net_.param(r.name).shape();
      w.add_ref<T>("param/" + r.name, TensorView<const T, cpu>(P.data() + r.offset, s));
      w.add_ref<T>("ema/" + r.name, TensorView<const T, cpu>(E.data() + r.offset, s));
      w.add_ref<T>("adam_m/" + r.name, TensorView<const T, cpu>(M.data() + r.offset, s));
      w.add_ref<T>("adam_v/" + r.name, TensorView<const T, cpu>(V.data() + r.offset, s));
    }
    nlohmann::json st = {{"step", step_},
                         {"adam_steps", adam_.steps()},
                         {"seed", opt_.seed},
                         {"batch", opt_.batch},
                         {"levels", opt_.levels},
                         {"group_weights", opt_.group_weights},
                         {"marginal_probability", opt_.marginal_probability},
                         {"min_snr_gamma", opt_.min_snr_gamma}};
    if (!opt_.betas.empty()) st["betas"] = opt_.betas;
    w.metadata("train_state", st.dump());
    try {
      w.metadata("config", net_.config().to_json().dump());
    } catch (const error&) {  // a layout without a JSON form: the weights still load by name
    }
    w.write(path);
  }

  //! Restores what save() wrote (the network's config must match; the seed and batch must be the
  //! run's, or the continuation would not be the same run).
  void load(const std::string& path) {
    static_assert(is_host_backend_v<Backend>, "Trainer::load: host backends");
    const char* op = "train::Trainer::load";
    const auto f = safetensors::File::open(path);
    const std::string sj = f.metadata("train_state");
    if (sj.empty()) throw error(op, path, "no train_state metadata (not a trainer checkpoint)");
    nlohmann::json st;
    try {
      st = nlohmann::json::parse(sj);
    } catch (const std::exception& e) {
      throw error(op, path, std::string("malformed train_state: ") + e.what());
    }
    if (st.value("seed", std::uint64_t{0}) != opt_.seed ||
        st.value("batch", std::int64_t{0}) != opt_.batch)
      throw error(op, path,
                  "seed / batch of the checkpoint (" + std::to_string(st.value("seed", 0ull)) +
                      " / " + std::to_string(st.value("batch", 0ll)) +
                      ") differ from this run's (" + std::to_string(opt_.seed) + " / " +
                      std::to_string(opt_.batch) + ")");
    if (st.contains("group_weights") && st["group_weights"] != nlohmann::json(opt_.group_weights))
      throw error(op, path,
                  "group_weights of the checkpoint " + st["group_weights"].dump() +
                      " differ from this run's " + nlohmann::json(opt_.group_weights).dump());
    {
      // absent (a state written before the option existed): no marginalisation training
      const auto mp = st.contains("marginal_probability") ? st["marginal_probability"]
                                                          : nlohmann::json(std::vector<double>(K));
      if (mp != nlohmann::json(opt_.marginal_probability))
        throw error(op, path,
                    "marginal_probability of the checkpoint " + mp.dump() +
                        " differ from this run's " +
                        nlohmann::json(opt_.marginal_probability).dump());
    }
    if (st.value("min_snr_gamma", 0.0) != opt_.min_snr_gamma)
      throw error(op, path,
                  "min_snr_gamma of the checkpoint (" +
                      std::to_string(st.value("min_snr_gamma", 0.0)) +
                      ") differs from this run's (" + std::to_string(opt_.min_snr_gamma) + ")");
    {
      // absent (a state written before the option existed, or the default): the official betas
      const auto b = st.contains("betas") ? st["betas"] : nlohmann::json(std::vector<double>{});
      if (b != nlohmann::json(opt_.betas))
        throw error(op, path,
                    "the checkpoint's training schedule (betas) differs from this run's (" +
                        std::string(opt_.betas.empty() ? "the official scaled-linear betas"
                                                       : "custom betas") +
                        ")");
    }
    const auto P = net_.parameters();
    const auto E = ema_.weights();
    const auto M = adam_.first_moment();
    const auto V = adam_.second_moment();
    for (const auto& r : adam_.ranges()) {
      const Shape s = net_.param(r.name).shape();
      f.get_into<T>("param/" + r.name, TensorView<T, cpu>(P.data() + r.offset, s));
      f.get_into<T>("ema/" + r.name, TensorView<T, cpu>(E.data() + r.offset, s));
      f.get_into<T>("adam_m/" + r.name, TensorView<T, cpu>(M.data() + r.offset, s));
      f.get_into<T>("adam_v/" + r.name, TensorView<T, cpu>(V.data() + r.offset, s));
    }
    step_ = st.value("step", std::int64_t{0});
    adam_.set_steps(st.value("adam_steps", std::int64_t{0}));
    net_.parameters_changed();
  }

 private:
  static std::string fmt(double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%.4g", v);
    return b;
  }
  void reduce(TensorView<T, Backend> g) {
    if constexpr (std::is_same_v<T, float>) {
      if (!red_.sum_f32) throw error("train::Trainer", "reducer", "no float reduction");
      red_.sum_f32(g.data(), g.size());
    } else {
      if (!red_.sum_f64) throw error("train::Trainer", "reducer", "no double reduction");
      red_.sum_f64(g.data(), g.size());
    }
  }
  // One forward and backward over `micro()` samples starting at global index `first`.
  void pass(const Context<Backend>& ctx, std::int64_t first, double denom,
            std::vector<double>& sums) {
    const std::int64_t per = micro();
    Views x0;
    for (std::size_t g = 0; g < K; ++g) x0[g] = as_rows(x0_[g].view());
    std::fill(dt_.begin(), dt_.end(), opt_.data_type);
    data_(opt_.seed, step_, first, x0, dt_);
    // levels and noise: pure functions of (seed, step, global sample, group / component)
    auto levels = draw_levels<K>(opt_.seed, static_cast<std::uint64_t>(step_), per, opt_.levels,
                                 static_cast<std::uint64_t>(first));
    const auto marg =
        draw_marginalised<K>(opt_.seed, static_cast<std::uint64_t>(step_), per,
                             opt_.marginal_probability, static_cast<std::uint64_t>(first));
    for (std::size_t g = 0; g < K; ++g)
      for (std::size_t b = 0; b < levels[g].size(); ++b)
        if (marg[g][b]) levels[g][b] = opt_.levels;
    std::uint64_t comp = 0;
    for (std::size_t g = 0; g < K; ++g)
      for (std::size_t c = 0; c < layout_.group(g).components.size(); ++c, ++comp)
        ops::random_normal(ctx,
                           column_block(eps_[g].view(), layout_.offset(g, c),
                                        layout_.group(g).components[c].numel()),
                           NoiseKey{opt_.seed ^ 0x6a09e667f3bcc908ull,
                                    static_cast<std::uint64_t>(step_) * 64 + comp},
                           static_cast<std::uint64_t>(first));
    std::array<std::span<const std::int64_t>, K> lv;
    GroupViews<const T, K, Backend> cx0, ceps;
    GroupViews<T, K, Backend> xn;
    for (std::size_t g = 0; g < K; ++g) {
      lv[g] = levels[g];
      cx0[g] = x0_[g].view();
      ceps[g] = eps_[g].view();
      xn[g] = xn_[g].view();
      times_[g].assign(levels[g].begin(), levels[g].end());
    }
    forward_process<T, K>(ctx, sched_, cx0, ceps, lv, xn);
    // marginalised samples: the group's input becomes its noise (x_n = 0 x_n + 1 eps)
    for (std::size_t g = 0; g < K; ++g) {
      if (std::find(marg[g].begin(), marg[g].end(), std::uint8_t{1}) == marg[g].end()) continue;
      std::vector<double> a(marg[g].size()), b(marg[g].size());
      for (std::size_t r = 0; r < a.size(); ++r) a[r] = marg[g][r] ? 0.0 : 1.0, b[r] = 1.0 - a[r];
      ops::axpby_rows(ctx, as_rows(xn_[g].view()), a.data(),
                      as_rows(TensorView<const T, Backend>(xn_[g].view())), b.data(),
                      as_rows(TensorView<const T, Backend>(eps_[g].view())));
    }
    // the network on the component views of the noised groups
    const auto& C = net_.config().components;
    nn::UViTInputs<T, Backend> in;
    std::vector<RowBlock<T, Backend>> out;
    std::vector<RowBlock<const T, Backend>> dout;
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto g = C[k].group;
      const std::int64_t n = C[k].numel(), ld = layout_.size(g);
      in.x.emplace_back(xn_[g].data() + offset_[k], per, n, ld);
      out.emplace_back(pred_[g].data() + offset_[k], per, n, ld);
      dout.emplace_back(dpred_[g].data() + offset_[k], per, n, ld);
    }
    for (std::size_t g = 0; g < K; ++g) in.t.push_back(times_[g]);
    in.data_type = dt_;
    net_.forward(ctx, in, out, tape_, opt_.recompute);
    // squared errors and d loss / d pred = 2 w_g w_n (pred - eps) / (global batch x elements),
    // w_n the level weight (1 unless min-SNR weighting is on); the logged group MSEs are plain
    std::vector<double> rows(static_cast<std::size_t>(per));
    const auto n_rows = static_cast<std::size_t>(per);
    std::vector<double> a(n_rows), b(n_rows);
    for (std::size_t g = 0; g < K; ++g) {
      const double w = opt_.group_weights[g];
      const auto P = as_rows(TensorView<const T, Backend>(pred_[g].view()));
      const auto Ev = as_rows(TensorView<const T, Backend>(eps_[g].view()));
      ops::squared_error_rows<T>(ctx, P, Ev, rows.data());
      for (std::size_t r = 0; r < n_rows; ++r) {
        const double wn =
            opt_.min_snr_gamma > 0 ? min_snr_weight(sched_, levels[g][r], opt_.min_snr_gamma) : 1.0;
        a[r] = 2.0 * w * wn / denom;
        b[r] = -a[r];
        sums[g] += rows[r];
        sums[K] += w * wn * rows[r];
      }
      ops::axpby_rows(ctx, as_rows(dpred_[g].view()), a.data(), P, b.data(), Ev);
    }
    net_.backward(ctx, tape_, dout);
  }

  Net& net_;
  Options opt_;
  DataSource data_;
  Reducer red_;
  GroupLayout<K> layout_;
  DiscreteSchedule sched_;
  AdamW<T, Backend> adam_;
  Ema<T, Backend> ema_;
  std::vector<std::int64_t> offset_;
  std::array<Tensor<T, Backend>, K> x0_, eps_, xn_, pred_, dpred_;
  std::array<std::vector<double>, K> times_;
  std::vector<std::int64_t> dt_;
  typename Net::Tape tape_;
  std::int64_t step_ = 0;
};

}  // namespace unidiffuser::train
