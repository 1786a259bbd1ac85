// SPDX-License-Identifier: Apache-2.0
// Tasks and guidance: which network calls are made, with which inputs and time inputs, and in
// which order noise is drawn (UNIDIFFUSER.md §7.2, §8) -- checked by recording every event.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/diffusion/guidance.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

namespace ud = unidiffuser;

namespace {

std::string tname(double t, double tau_in) {
  if (t == 0) return "0";
  if (t == 1000) return "N";
  return t == tau_in ? "tau" : "?" + std::to_string(t);
}

// Network that logs "call(t_img,t_text)[x_img0,x_text0]" and returns 0.5 x + t / 1000.
// With `batch` set, a call of more rows is logged as its segments of `batch` rows joined by '+'
// (the batched reference calls); every row of a segment must match its first.
struct LogNet {
  std::vector<std::string>* log;
  double tau_in = 0;
  std::int64_t batch = 0;
  void operator()(const ud::Context<ud::cpu>&, const std::array<ud::TensorView<const double>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<double>, 2>& out) {
    const std::int64_t rows = x[0].dim(0), seg = batch > 0 ? batch : rows;
    std::string all;
    for (std::int64_t r0 = 0; r0 < rows; r0 += seg) {
      const auto i0 = static_cast<std::size_t>(r0);
      std::string e = "call(" + tname(t[0][i0], tau_in) + "," + tname(t[1][i0], tau_in) + ")[";
      for (int g = 0; g < 2; ++g) {
        const double v = x[g](r0, 0);
        e += (g ? "," : "") + (v >= 100  ? "xi" + std::to_string(static_cast<int>(v) - 100)
                               : v == -7 ? std::string("null")
                               : v == 5  ? std::string("cond")
                                         : std::string("state"));
        for (std::int64_t b = r0; b < r0 + seg; ++b) {
          CHECK(t[g][static_cast<std::size_t>(b)] == t[g][i0]);
          for (std::int64_t j = 0; j < x[g].dim(1); ++j) {
            CHECK(x[g](b, j) == x[g](r0, j));
            out[g](b, j) = 0.5 * x[g](b, j) + t[g][static_cast<std::size_t>(b)] / 1000;
          }
        }
      }
      all += (all.empty() ? "" : "+") + e + "]";
    }
    log->push_back(all);
  }
};

// Noise that logs "draw<g>.<c>" and fills 100 + draw index (so the value identifies the draw).
struct LogNoise {
  std::vector<std::string>* log;
  int n = 0;
  void draw(const ud::Context<ud::cpu>&, std::size_t g, std::size_t c, ud::RowBlock<double> dst) {
    log->push_back("draw" + std::to_string(g) + "." + std::to_string(c));
    for (std::int64_t r = 0; r < dst.rows; ++r)
      for (std::int64_t j = 0; j < dst.cols; ++j) dst.data[r * dst.ld + j] = 100 + n;
    ++n;
  }
};

ud::GroupLayout<2> layout() {
  return ud::GroupLayout<2>(
      {ud::GroupSpec{"image", {{"z", ud::Shape{2, 2}}, {"c", ud::Shape{1, 3}}}},
       ud::GroupSpec{"text", {{"y", ud::Shape{3, 2}}}}});
}

// The log of one evaluation at tau = 0.5, batch 2: by default with the reference calls separate
// (the official call structure); `batched`: in one call with the main one.
std::string one_call(const ud::Task<2>& task, double scale,
                     ud::CfgMode mode = ud::CfgMode::true_uncond, bool batched = false) {
  std::vector<std::string> log;
  LogNet net{&log};
  net.batch = 2;
  LogNoise noise{&log};
  ud::GuidanceOptions g;
  g.scale = scale;
  g.cfg_mode = mode;
  g.batch_references = batched;
  const auto lay = layout();
  ud::Tensor<double> cimg(ud::Shape{2, 7}), ctxt(ud::Shape{2, 6}), nimg(ud::Shape{2, 7}),
      ntxt(ud::Shape{2, 6});
  for (auto* t : {&cimg, &ctxt})
    for (auto& v : *t) v = 5;
  for (auto* t : {&nimg, &ntxt})
    for (auto& v : *t) v = -7;
  ud::GuidedPredictor<double, 2, LogNet, LogNoise> p(ud::Context<ud::cpu>{}, net, noise, lay, task,
                                                     g, 2, {cimg.view(), ctxt.view()},
                                                     {nimg.view(), ntxt.view()});
  ud::Tensor<double> x(ud::Shape{2, p.state_size()}), e(ud::Shape{2, p.state_size()});
  for (auto& v : x) v = 1;
  const double tau = 0.5;
  net.tau_in = static_cast<double>(static_cast<float>(tau) * 1000.f);
  p(x.view(), tau, e.view());
  std::string s;
  for (const auto& l : log) s += (s.empty() ? "" : " ") + l;
  return s;
}

}  // namespace

TEST_CASE("joint: main call, then the three guidance draws, then one reference call per group") {
  CHECK(one_call(ud::tasks::joint(), 7) ==
        "call(tau,tau)[state,state] draw0.0 draw0.1 draw1.0 call(tau,N)[state,xi2] "
        "call(N,tau)[xi0,state]");
  CHECK(one_call(ud::tasks::joint(), 0) == "call(tau,tau)[state,state]");
}

TEST_CASE("t2i / i2t: conditional guidance draws the replaced condition after the main call") {
  CHECK(one_call(ud::tasks::t2i(), 7) == "call(tau,0)[state,cond] draw1.0 call(tau,N)[state,xi0]");
  CHECK(one_call(ud::tasks::i2t(), 7) ==
        "call(0,tau)[cond,state] draw0.0 draw0.1 call(N,tau)[xi0,state]");
  CHECK(one_call(ud::tasks::t2i(), 0) == "call(tau,0)[state,cond]");
  CHECK(one_call(ud::tasks::t2i(), 7, ud::CfgMode::empty_condition) ==
        "call(tau,0)[state,cond] call(tau,0)[state,null]");
}

TEST_CASE("i / t: marginal noise is drawn before the only call; no guidance even with s != 0") {
  CHECK(one_call(ud::tasks::i(), 7) == "draw1.0 call(tau,N)[state,xi0]");
  CHECK(one_call(ud::tasks::t(), 7) == "draw0.0 draw0.1 call(N,tau)[xi0,state]");
}

// Network whose output for a group also depends on the other group's input:
// out_g = 0.5 x_g + 0.1 x_other[0] + t_g / 1000, so a reference call with the other group replaced
// by noise gives r != e.
struct CoupledNet {
  void operator()(const ud::Context<ud::cpu>&, const std::array<ud::TensorView<const double>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<double>, 2>& out) {
    for (int g = 0; g < 2; ++g)
      for (std::int64_t b = 0; b < x[g].dim(0); ++b)
        for (std::int64_t j = 0; j < x[g].dim(1); ++j)
          out[g](b, j) =
              0.5 * x[g](b, j) + 0.1 * x[1 - g](b, 0) + t[g][static_cast<std::size_t>(b)] / 1000;
  }
};

TEST_CASE("guided output is (1 + s) e - s r on each generated group, r from its own reference") {
  // joint, s = 3, state 2 everywhere, tau = 0.25 (time input 250): e = 1 + 0.2 + 0.25 for both
  // groups. Guidance draws xi0 = 100 (z), xi1 = 101 (clip), xi2 = 102 (text); the image reference
  // sees the text replaced by 102, the text reference the image replaced by 100 (its first
  // element).
  std::vector<std::string> log;
  CoupledNet net;
  LogNoise noise{&log};
  ud::GuidanceOptions g;
  g.scale = 3;
  g.float32_time_input = false;
  ud::GuidedPredictor<double, 2, CoupledNet, LogNoise> p(ud::Context<ud::cpu>{}, net, noise,
                                                         layout(), ud::tasks::joint(), g, 1);
  CHECK(p.forwards_per_call() == 3);
  ud::Tensor<double> x(ud::Shape{1, 13}), e(ud::Shape{1, 13});
  for (auto& v : x) v = 2;
  p(x.view(), 0.25, e.view());
  const double main = 0.5 * 2 + 0.1 * 2 + 0.25;
  const double r_img = 0.5 * 2 + 0.1 * 102 + 0.25, r_text = 0.5 * 2 + 0.1 * 100 + 0.25;
  for (std::int64_t j = 0; j < 7; ++j)  // the image group: z (4) and clip (3)
    CHECK(e(0, j) == doctest::Approx(4 * main - 3 * r_img));
  for (std::int64_t j = 7; j < 13; ++j)  // the text group
    CHECK(e(0, j) == doctest::Approx(4 * main - 3 * r_text));
  // s = 0: the unguided output, one call
  g.scale = 0;
  ud::GuidedPredictor<double, 2, CoupledNet, LogNoise> p0(ud::Context<ud::cpu>{}, net, noise,
                                                          layout(), ud::tasks::joint(), g, 1);
  p0(x.view(), 0.25, e.view());
  for (double v : e) CHECK(v == doctest::Approx(main));
}

TEST_CASE("batched references: the same draws, then one call with the separate calls' rows") {
  using M = ud::CfgMode;
  CHECK(one_call(ud::tasks::joint(), 3, M::true_uncond, true) ==
        "draw0.0 draw0.1 draw1.0 "
        "call(tau,tau)[state,state]+call(tau,N)[state,xi2]+call(N,tau)[xi0,state]");
  CHECK(one_call(ud::tasks::t2i(), 7, M::true_uncond, true) ==
        "draw1.0 call(tau,0)[state,cond]+call(tau,N)[state,xi0]");
  CHECK(one_call(ud::tasks::i2t(), 7, M::true_uncond, true) ==
        "draw0.0 draw0.1 call(0,tau)[cond,state]+call(N,tau)[xi0,state]");
  CHECK(one_call(ud::tasks::t2i(), 7, M::empty_condition, true) ==
        "call(tau,0)[state,cond]+call(tau,0)[state,null]");
  CHECK(one_call(ud::tasks::t2i(), 0, M::true_uncond, true) == "call(tau,0)[state,cond]");
  CHECK(one_call(ud::tasks::i(), 7, M::true_uncond, true) == "draw1.0 call(tau,N)[state,xi0]");
  // the same numbers as separate calls, for every task and guidance mode
  for (const auto& task : {ud::tasks::joint(), ud::tasks::t2i(), ud::tasks::i2t()})
    for (const M mode : {M::true_uncond, M::empty_condition})
      for (const double rescale : {0.0, 0.7}) {
        if (mode == M::empty_condition && task.count(ud::Role::condition) == 0) continue;
        CAPTURE(rescale);
        std::array<ud::Tensor<double>, 2> out;
        std::array<std::uint64_t, 2> calls{};
        int forwards = 0;
        for (int b = 0; b < 2; ++b) {
          CoupledNet net;
          std::vector<std::string> log;
          LogNoise noise{&log};
          ud::GuidanceOptions g;
          g.scale = 3;
          g.cfg_mode = mode;
          g.rescale = rescale;
          const auto sched = ud::VPSchedule::unidiffuser();
          g.schedule = &sched;
          g.batch_references = b == 1;
          ud::Tensor<double> cimg(ud::Shape{3, 7}), ctxt(ud::Shape{3, 6}), nimg(ud::Shape{3, 7}),
              ntxt(ud::Shape{3, 6});
          for (std::int64_t i = 0; i < cimg.size(); ++i) cimg.data()[i] = 0.1 * double(i % 5);
          for (std::int64_t i = 0; i < ctxt.size(); ++i) ctxt.data()[i] = 0.3 - 0.05 * double(i);
          for (auto* t : {&nimg, &ntxt})
            for (auto& v : *t) v = -7;
          ud::GuidedPredictor<double, 2, CoupledNet, LogNoise> p(
              ud::Context<ud::cpu>{}, net, noise, layout(), task, g, 3, {cimg.view(), ctxt.view()},
              {nimg.view(), ntxt.view()});
          CHECK(p.calls_per_evaluation() == (b == 1 ? 1 : p.forwards_per_call()));
          forwards = p.forwards_per_call();
          CHECK(p.rows_per_call() == (b == 1 ? 3 * p.forwards_per_call() : 3));
          ud::Tensor<double> x(ud::Shape{3, p.state_size()});
          out[static_cast<std::size_t>(b)] = ud::Tensor<double>(ud::Shape{3, p.state_size()});
          for (std::int64_t i = 0; i < x.size(); ++i) x.data()[i] = std::sin(double(i));
          for (double tau : {0.9, 0.5, 0.1})
            p(x.view(), tau, out[static_cast<std::size_t>(b)].view());
          calls[static_cast<std::size_t>(b)] = p.network_calls();
        }
        CHECK(forwards > 1);
        CHECK(calls[1] == 3);
        CHECK(calls[0] == 3 * static_cast<std::uint64_t>(forwards));
        for (std::int64_t i = 0; i < out[0].size(); ++i)
          CHECK(out[1].data()[i] == out[0].data()[i]);
      }
}

TEST_CASE("a sampling run draws every group's initial noise first, then per-NFE noise") {
  std::vector<std::string> log;
  LogNet net{&log};
  LogNoise noise{&log};
  ud::DpmSolverOptions o;
  o.steps = 3;
  const ud::DpmSolver<double> solver(ud::VPSchedule::unidiffuser(), o);
  ud::GuidanceOptions g;
  g.scale = 0;
  auto out = ud::sample_task<double, 2>(ud::Context<ud::cpu>{}, net, noise, layout(),
                                        ud::tasks::i(), g, solver, 2);
  REQUIRE(log.size() >= 3);
  CHECK(log[0] == "draw0.0");
  CHECK(log[1] == "draw0.1");
  CHECK(log[2] == "draw1.0");
  int calls = 0, draws = 0;
  for (std::size_t k = 3; k < log.size(); ++k) (log[k].rfind("call", 0) == 0 ? calls : draws)++;
  CHECK(calls == 3);
  CHECK(draws == 3);  // one text marginal per NFE
  CHECK(out[0].shape() == ud::Shape{2, 7});
  CHECK(out[1].size() == 0);
}

TEST_CASE("bad tasks and missing conditions are clear errors") {
  std::vector<std::string> log;
  LogNet net{&log};
  LogNoise noise{&log};
  ud::GuidanceOptions g;
  using R = ud::Role;
  using P = ud::GuidedPredictor<double, 2, LogNet, LogNoise>;
  CHECK_THROWS_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(),
                    ud::Task<2>{{R::condition, R::marginalize}}, g, 2),
                  ud::error);
  CHECK_THROWS_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::t2i(), g, 2),
                  ud::error);  // no condition given
  g.marginal_noise = ud::MarginalNoise::fixed;
  CHECK_THROWS_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::i(), g, 2),
                  ud::error);  // no fixed noise given
  g = {};
  g.cfg_mode = ud::CfgMode::empty_condition;
  CHECK_THROWS_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::joint(), g, 2),
                  ud::error);
  CHECK_THROWS_AS(ud::parse_mode("img2txt"), ud::error);
}

// Network whose slope in its own input depends on the other group's time input:
// out_g = (0.5 + 0.0004 t_other) x_g + 0.1 x_other[0], so a reference call (the other group at
// time N) predicts a different spread than the main call.
struct SlopeNet {
  void operator()(const ud::Context<ud::cpu>&, const std::array<ud::TensorView<const double>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<double>, 2>& out) {
    for (int g = 0; g < 2; ++g)
      for (std::int64_t b = 0; b < x[g].dim(0); ++b)
        for (std::int64_t j = 0; j < x[g].dim(1); ++j)
          out[g](b, j) = (0.5 + 0.0004 * t[1 - g][static_cast<std::size_t>(b)]) * x[g](b, j) +
                         0.1 * x[1 - g](b, 0);
  }
};

TEST_CASE("guidance rescale: the guided data prediction takes the conditional one's spread") {
  // joint, s = 3, a state that varies along each row; e_c from an unguided predictor (the joint
  // draws nothing before its main call, so it sees the same inputs), e_g from a guided one
  // without rescale; the rescaled output must be f e_g + (1 - f) x / sigma with
  // f = phi std(x - sigma e_c) / std(x - sigma e_g) + 1 - phi per sample and group.
  const auto ns = ud::VPSchedule::unidiffuser();
  const double tau = 0.4, sigma = ns.marginal_std(tau);
  SlopeNet net;
  std::vector<std::string> log;
  constexpr std::int64_t B = 2, D = 13;
  ud::Tensor<double> x(ud::Shape{B, D}), ec(ud::Shape{B, D}), eg(ud::Shape{B, D}),
      er(ud::Shape{B, D});
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t j = 0; j < D; ++j) x(b, j) = std::sin(1.0 + 0.7 * j + 13.0 * b) + 0.2 * b;
  auto run = [&](double scale, double phi, ud::Tensor<double>& e) {
    LogNoise noise{&log};
    ud::GuidanceOptions g;
    g.scale = scale;
    g.rescale = phi;
    g.schedule = &ns;
    ud::GuidedPredictor<double, 2, SlopeNet, LogNoise> p(ud::Context<ud::cpu>{}, net, noise,
                                                         layout(), ud::tasks::joint(), g, B);
    p(x.view(), tau, e.view());
  };
  run(0, 0, ec);
  run(3, 0, eg);
  auto stdev = [](const std::vector<double>& v) {
    double m = 0, q = 0;
    for (double a : v) m += a / static_cast<double>(v.size());
    for (double a : v) q += (a - m) * (a - m) / static_cast<double>(v.size());
    return std::sqrt(q);
  };
  const std::pair<std::int64_t, std::int64_t> groups[2] = {{0, 7}, {7, 13}};
  for (double phi : {1.0, 0.7}) {
    CAPTURE(phi);
    run(3, phi, er);
    for (std::int64_t b = 0; b < B; ++b)
      for (const auto& [lo, hi] : groups) {
        std::vector<double> uc, ug, ur;
        for (std::int64_t j = lo; j < hi; ++j) {
          uc.push_back(x(b, j) - sigma * ec(b, j));
          ug.push_back(x(b, j) - sigma * eg(b, j));
          ur.push_back(x(b, j) - sigma * er(b, j));
        }
        REQUIRE(stdev(ug) > 1.5 * stdev(uc));  // guidance did inflate the spread here
        const double f = phi * stdev(uc) / stdev(ug) + 1 - phi;
        for (std::int64_t j = lo; j < hi; ++j) {
          const double a = f * eg(b, j), c = (1 - f) * x(b, j) / sigma;
          CAPTURE(er(b, j) - (a + c));
          CHECK(std::abs(er(b, j) - (a + c)) <= 1e-12 * (std::abs(a) + std::abs(c)));
        }
        if (phi == 1.0) CHECK(stdev(ur) == doctest::Approx(stdev(uc)).epsilon(1e-12));
      }
  }
  // rescale 0 is the official guidance, bit for bit
  run(3, 0, er);
  for (std::int64_t i = 0; i < B * D; ++i) CHECK(er.data()[i] == eg.data()[i]);
}

TEST_CASE("guidance rescale: sample_task takes the sampler's schedule; bad values are errors") {
  std::vector<std::string> log;
  SlopeNet net;
  ud::DpmSolverOptions o;
  o.steps = 4;
  const ud::DpmSolver<double> solver(ud::VPSchedule::unidiffuser(), o);
  ud::GuidanceOptions g;
  g.scale = 3;
  auto sample = [&](double phi) {
    LogNoise noise{&log};
    g.rescale = phi;
    return ud::sample_task<double, 2>(ud::Context<ud::cpu>{}, net, noise, layout(),
                                      ud::tasks::joint(), g, solver, 2);
  };
  const auto plain = sample(0), rescaled = sample(1);
  double diff = 0;
  for (std::int64_t i = 0; i < plain[0].size(); ++i)
    diff = std::max(diff, std::abs(plain[0].data()[i] - rescaled[0].data()[i]));
  CHECK(diff > 1e-3);
  using P = ud::GuidedPredictor<double, 2, SlopeNet, LogNoise>;
  LogNoise noise{&log};
  g.rescale = 0.5;  // no schedule given to the predictor itself
  CHECK_THROWS_WITH_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::joint(), g, 2),
                       doctest::Contains("schedule"), ud::error);
  const auto ns = ud::VPSchedule::unidiffuser();
  g.schedule = &ns;
  for (double bad : {-0.1, 1.5, std::nan("")}) {
    g.rescale = bad;
    CHECK_THROWS_WITH_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::joint(), g, 2),
                         doctest::Contains("rescale"), ud::error);
  }
}

TEST_CASE("guidance interval: outside it one unguided call and no reference draws") {
  std::vector<std::string> log;
  LogNet net{&log};
  const double tau = 0.5;
  net.tau_in = static_cast<double>(static_cast<float>(tau) * 1000.f);
  ud::Tensor<double> x(ud::Shape{2, 13}), e(ud::Shape{2, 13}), e0(ud::Shape{2, 13});
  for (auto& v : x) v = 1;
  auto run = [&](double scale, double lo, double hi, ud::Tensor<double>& out) {
    log.clear();
    LogNoise noise{&log};
    ud::GuidanceOptions g;
    g.scale = scale;
    g.interval_lo = lo;
    g.interval_hi = hi;
    g.batch_references = false;
    ud::GuidedPredictor<double, 2, LogNet, LogNoise> p(ud::Context<ud::cpu>{}, net, noise, layout(),
                                                       ud::tasks::joint(), g, 2);
    p(x.view(), tau, out.view());
    std::string s;
    for (const auto& l : log) s += (s.empty() ? "" : " ") + l;
    return s;
  };
  const std::string guided =
      "call(tau,tau)[state,state] draw0.0 draw0.1 draw1.0 call(tau,N)[state,xi2] "
      "call(N,tau)[xi0,state]";
  CHECK(run(7, 0.4, 0.6, e) == guided);
  CHECK(run(7, 0.5, 0.5, e) == guided);  // the bounds are inside
  CHECK(run(0, 0, 1, e0) == "call(tau,tau)[state,state]");
  for (const auto& range : {std::pair{0.6, 1.0}, std::pair{0.0, 0.4}}) {
    const double lo = range.first, hi = range.second;
    CAPTURE(lo);
    CHECK(run(7, lo, hi, e) == "call(tau,tau)[state,state]");
    for (std::int64_t i = 0; i < e.size(); ++i) CHECK(e.data()[i] == e0.data()[i]);
  }
  LogNoise noise{&log};
  ud::GuidanceOptions g;
  using P = ud::GuidedPredictor<double, 2, LogNet, LogNoise>;
  for (auto [lo, hi] : {std::pair{0.6, 0.4}, std::pair{-0.1, 1.0}, std::pair{0.0, 1.5},
                        std::pair{std::nan(""), 1.0}}) {
    g.interval_lo = lo;
    g.interval_hi = hi;
    CHECK_THROWS_WITH_AS(P(ud::Context<ud::cpu>{}, net, noise, layout(), ud::tasks::joint(), g, 2),
                         doctest::Contains("interval"), ud::error);
  }
}
