// SPDX-License-Identifier: Apache-2.0
// The network written once against the backend primitives: finite-difference checks of the whole
// U-ViT's backward in double (v0, v1, a K = 3 layout, interpolated positions), recomputation
// equal to the recorded tape, the CPU and reference backends agreeing on whole runs (forward,
// backward, a guided sampling run, the loss), and concurrent forwards of one network.
#include <doctest/doctest.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "kinds.hpp"
#include "support.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/objective.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"
#include "uvit_configs.hpp"

namespace ud = unidiffuser;
namespace nn = unidiffuser::nn;
using unidiffuser::testing::k3_config;
using unidiffuser::testing::v0_config;
using unidiffuser::testing::v1_config;

namespace {

// Random inputs of one batch for a config, latent size lh x lw (0: the default; lw < 0: lh).
template <class T>
struct Batch {
  std::int64_t B = 2, lh = 0, lw = 0;
  std::vector<std::vector<T>> x, w;  // inputs and the weights of the scalar objective
  std::vector<std::vector<double>> t;
  std::vector<std::int64_t> dt;
  Batch(const nn::UViTConfig& cfg, std::int64_t batch, std::int64_t latent, std::uint64_t seed,
        std::int64_t latent_w = -1)
      : B(batch), lh(latent), lw(latent_w < 0 ? latent : latent_w) {
    std::uint64_t s = seed;
    auto fill = [&](std::vector<T>& v, std::int64_t n) {
      v.resize(static_cast<std::size_t>(n));
      ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::RowBlock<T>(v.data(), 1, n, n),
                             ud::NoiseKey{s++, 3}, 0);
    };
    for (const auto& c : cfg.components) {
      x.emplace_back();
      w.emplace_back();
      fill(x.back(), B * c.numel(lh, lw));
      fill(w.back(), B * c.numel(lh, lw));
    }
    for (std::size_t g = 0; g < cfg.groups(); ++g) {
      t.emplace_back();
      for (std::int64_t b = 0; b < B; ++b)
        t.back().push_back(static_cast<double>(137 + 311 * g + 97 * static_cast<std::size_t>(b)));
    }
    for (std::int64_t b = 0; b < B; ++b) dt.push_back(b % cfg.data_types);
  }
  template <class Backend>
  nn::UViTInputs<T, Backend> inputs(const nn::UViTConfig& cfg) const {
    nn::UViTInputs<T, Backend> in;
    for (std::size_t k = 0; k < cfg.components.size(); ++k) {
      const std::int64_t n = cfg.components[k].numel(lh, lw);
      in.x.push_back(ud::RowBlock<const T, Backend>(x[k].data(), B, n, n));
    }
    for (const auto& v : t) in.t.push_back(v);
    in.data_type = dt;
    in.latent_h = lh;
    in.latent_w = lw;
    return in;
  }
};

// Outputs of one forward, one buffer per component.
template <class T, class Backend>
struct Outputs {
  std::vector<std::vector<T>> y;
  std::vector<ud::RowBlock<T, Backend>> blocks;
  Outputs(const nn::UViTConfig& cfg, std::int64_t B, std::int64_t lh, std::int64_t lw = -1) {
    for (const auto& c : cfg.components) {
      const std::int64_t n = c.numel(lh, lw < 0 ? lh : lw);
      y.emplace_back(static_cast<std::size_t>(B * n));
      blocks.emplace_back(y.back().data(), B, n, n);
    }
  }
};

// sum_k <w_k, out_k> of the forward at the network's current parameters.
template <class Backend>
double objective(nn::UViT<double, Backend>& net, const Batch<double>& b) {
  const auto& cfg = net.config();
  Outputs<double, Backend> o(cfg, b.B, b.lh, b.lw);
  net.forward(ud::Context<Backend>{}, b.template inputs<Backend>(cfg), o.blocks);
  double s = 0;
  for (std::size_t k = 0; k < o.y.size(); ++k)
    for (std::size_t i = 0; i < o.y[k].size(); ++i) s += o.y[k][i] * b.w[k][i];
  return s;
}

// Parameter and input gradients of the objective through the training forward and backward
// (dx null: input gradients not asked for).
template <class T, class Backend>
void gradients(nn::UViT<T, Backend>& net, Batch<T>& b,
               std::type_identity_t<std::vector<std::vector<T>>>* dx, bool recompute = false,
               typename nn::UViT<T, Backend>::Tape* tp = nullptr, int threads = 0) {
  const auto& cfg = net.config();
  ud::Context<Backend> ctx{};
  if constexpr (std::is_same_v<Backend, ud::cpu>) ctx.threads = threads;
  Outputs<T, Backend> o(cfg, b.B, b.lh, b.lw);
  typename nn::UViT<T, Backend>::Tape own;
  auto& tape = tp ? *tp : own;
  net.forward(ctx, b.template inputs<Backend>(cfg), o.blocks, tape, recompute);
  std::vector<ud::RowBlock<const T, Backend>> dout;
  std::vector<ud::RowBlock<T, Backend>> dxb;
  for (std::size_t k = 0; k < cfg.components.size(); ++k) {
    const std::int64_t n = cfg.components[k].numel(b.lh, b.lw);
    dout.emplace_back(b.w[k].data(), b.B, n, n);
    if (dx) {
      (*dx)[k].assign(static_cast<std::size_t>(b.B * n), T(0));
      dxb.emplace_back((*dx)[k].data(), b.B, n, n);
    }
  }
  net.zero_gradients();
  net.backward(ctx, tape, dout, dxb);
}

struct FdCase {
  const char* name;
  nn::UViTConfig cfg;
  std::int64_t latent;
  std::int64_t latent_w = -1;  // < 0: latent
};

// K = 3 with patched images of different sizes, one of them non-square: img 2 x 4 x 8 in patches
// of 2 (a 2 x 4 grid), text, and a 1 x 6 x 6 "depth" image in patches of 3.
nn::UViTConfig patched_sizes_config() {
  auto c = k3_config();
  c.components[0].width = 8;
  c.components[2] = nn::UViTComponent{.name = "depth",
                                      .kind = nn::ComponentKind::patched_image,
                                      .group = 2,
                                      .channels = 1,
                                      .size = 6,
                                      .patch = 3,
                                      .in_name = "depth_embed",
                                      .out_name = "depth_out"};
  c.validate();
  return c;
}
// k3_config with a non-square default image (4 x 8), for run-time sizes.
nn::UViTConfig wide_config() {
  auto c = k3_config();
  c.components[0].width = 8;
  c.validate();
  return c;
}

}  // namespace

TEST_CASE("U-ViT backward matches central finite differences in double") {
  for (const FdCase& fc :
       {FdCase{"v0 (qkv bias, time MLPs)", v0_config(), 0}, FdCase{"v1", v1_config(), 0},
        FdCase{"K = 3 layout", k3_config(), 0},
        FdCase{"v1 at 6x6 latent (interpolated positions)", v1_config(), 6},
        FdCase{"patched images of different sizes, one non-square", patched_sizes_config(), 0},
        FdCase{"a 4x8 image at a 6x4 run-time latent (interpolated positions)", wide_config(), 6,
               4},
        FdCase{"kinds defined outside the library (frames, gelu_frames)",
               ud::testing::kinds_config(), 0}}) {
    CAPTURE(fc.name);
    nn::UViT<double> net(fc.cfg);
    net.init_random(11, 0.3);
    Batch<double> b(fc.cfg, 2, fc.latent, 5, fc.latent_w);
    std::vector<std::vector<double>> dx(fc.cfg.components.size());
    gradients(net, b, &dx);
    const std::vector<double> g(net.gradients().begin(), net.gradients().end());
    const double h = 1e-5;
    // every parameter tensor along a random direction restricted to it
    std::vector<double> dir(static_cast<std::size_t>(net.parameters().size()));
    ud::ops::random_normal(
        ud::Context<ud::cpu>{},
        ud::RowBlock<double>(dir.data(), 1, net.parameters().size(), net.parameters().size()),
        ud::NoiseKey{77, 1}, 0);
    auto p = net.parameters();
    int checked = 0;
    for (const auto& name : net.parameter_names()) {
      CAPTURE(name);
      const auto view = net.param(name);
      const std::int64_t off = net.parameter_offset(name), n = view.size();
      double analytic = 0;
      for (std::int64_t i = 0; i < n; ++i)
        analytic += g[static_cast<std::size_t>(off + i)] * dir[static_cast<std::size_t>(off + i)];
      auto shift = [&](double s) {
        for (std::int64_t i = 0; i < n; ++i)
          p[off + i] += s * dir[static_cast<std::size_t>(off + i)];
        net.parameters_changed();
      };
      shift(h);
      const double fp = objective(net, b);
      shift(-2 * h);
      const double fm = objective(net, b);
      shift(h);
      const double fd = (fp - fm) / (2 * h);
      CHECK(std::abs(fd - analytic) <= 1e-6 * std::max(1.0, std::abs(analytic)));
      ++checked;
    }
    CHECK(checked == static_cast<int>(net.parameter_names().size()));
    // every input component along a random direction
    for (std::size_t k = 0; k < fc.cfg.components.size(); ++k) {
      CAPTURE(fc.cfg.components[k].name);
      std::vector<double> v(b.x[k].size());
      ud::ops::random_normal(ud::Context<ud::cpu>{},
                             ud::RowBlock<double>(v.data(), 1, static_cast<std::int64_t>(v.size()),
                                                  static_cast<std::int64_t>(v.size())),
                             ud::NoiseKey{78, k}, 0);
      double analytic = 0;
      for (std::size_t i = 0; i < v.size(); ++i) analytic += dx[k][i] * v[i];
      auto shift = [&](double s) {
        for (std::size_t i = 0; i < v.size(); ++i) b.x[k][i] += s * v[i];
      };
      shift(h);
      const double fp = objective(net, b);
      shift(-2 * h);
      const double fm = objective(net, b);
      shift(h);
      CHECK(std::abs((fp - fm) / (2 * h) - analytic) <= 1e-6 * std::max(1.0, std::abs(analytic)));
    }
  }
}

TEST_CASE("activation recomputation gives the gradients of the recorded tape, bit for bit") {
  for (const auto& cfg : {v0_config(), k3_config()}) {
    nn::UViT<float> net(cfg);
    net.init_random(3, 0.2);
    Batch<float> b(cfg, 3, 0, 9);
    std::vector<std::vector<float>> dx1(cfg.components.size()), dx2(cfg.components.size());
    gradients(net, b, &dx1, false);
    const std::vector<float> g1(net.gradients().begin(), net.gradients().end());
    gradients(net, b, &dx2, true);
    const std::vector<float> g2(net.gradients().begin(), net.gradients().end());
    CHECK(g1 == g2);
    CHECK(dx1 == dx2);
    // the gradient is not trivially zero
    CHECK(std::any_of(g1.begin(), g1.end(), [](float v) { return std::abs(v) > 1e-4f; }));
  }
}

TEST_CASE("the training forward returns the inference forward's outputs") {
  const auto cfg = v1_config();
  nn::UViT<float> net(cfg);
  net.use_packed_gemm(false);  // both passes on the same GEMM path
  net.init_random(4, 0.2);
  Batch<float> b(cfg, 3, 0, 2);
  Outputs<float, ud::cpu> a(cfg, b.B, 0), t(cfg, b.B, 0);
  net.forward(ud::Context<ud::cpu>{}, b.inputs<ud::cpu>(cfg), a.blocks);
  nn::UViT<float>::Tape tape;
  net.forward(ud::Context<ud::cpu>{}, b.inputs<ud::cpu>(cfg), t.blocks, tape);
  CHECK(a.y == t.y);
}

TEST_CASE("CPU and reference backends agree on the whole network, forward and backward") {
  for (const auto& cfg : {v0_config(), v1_config(), k3_config()}) {
    nn::UViT<double, ud::cpu> cpu(cfg);
    nn::UViT<double, ud::reference> ref(cfg);
    cpu.init_random(21, 0.3);
    std::copy(cpu.parameters().begin(), cpu.parameters().end(), ref.parameters().begin());
    ref.parameters_changed();
    Batch<double> b(cfg, 3, 0, 8);
    std::vector<std::vector<double>> dxc(cfg.components.size()), dxr(cfg.components.size());
    gradients(cpu, b, &dxc);
    gradients(ref, b, &dxr);
    Outputs<double, ud::cpu> oc(cfg, b.B, 0);
    Outputs<double, ud::reference> orf(cfg, b.B, 0);
    cpu.forward(ud::Context<ud::cpu>{}, b.inputs<ud::cpu>(cfg), oc.blocks);
    ref.forward(ud::Context<ud::reference>{}, b.inputs<ud::reference>(cfg), orf.blocks);
    auto close = [](const auto& a, const auto& r, double rtol) {
      double mx = 0, d = 0;
      for (std::size_t i = 0; i < r.size(); ++i) {
        mx = std::max(mx, std::abs(double(r[i])));
        d = std::max(d, std::abs(double(a[i]) - double(r[i])));
      }
      return d <= rtol * std::max(mx, 1e-300);
    };
    for (std::size_t k = 0; k < oc.y.size(); ++k) {
      CHECK(close(oc.y[k], orf.y[k], 1e-12));
      CHECK(close(dxc[k], dxr[k], 1e-11));
    }
    for (const auto& n : cpu.parameter_names()) {
      CAPTURE(n);
      const auto gc = cpu.grad(n);
      const auto gr = ref.grad(n);
      CHECK(close(std::vector<double>(gc.begin(), gc.end()),
                  std::vector<double>(gr.begin(), gr.end()), 1e-11));
    }
  }
}

TEST_CASE("CPU and reference backends agree on a guided sampling run and the loss") {
  const auto cfg = v1_config();
  nn::UViT<double, ud::cpu> cpu(cfg);
  nn::UViT<double, ud::reference> ref(cfg);
  cpu.init_random(5, 0.2);
  std::copy(cpu.parameters().begin(), cpu.parameters().end(), ref.parameters().begin());
  ref.parameters_changed();
  const auto layout = cfg.layout<2>();
  ud::DpmSolverOptions o;
  o.steps = 3;
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  ud::GuidanceOptions g;  // scale 7, true_uncond: several network calls per step
  const std::int64_t B = 2;
  auto run = [&](auto& net, auto backend) {
    using Bk = decltype(backend);
    nn::UViTPredictor<double, 2, Bk> model(net, 1);
    ud::PhiloxNoise noise(42);
    const ud::DpmSolver<double, Bk> solver(ns, o);
    const auto r = ud::sample_mode<double>(ud::Context<Bk>{}, model, noise, layout, ud::Mode::joint,
                                           g, solver, B);
    std::vector<double> out;
    for (const auto& t : r) out.insert(out.end(), t.begin(), t.end());
    return out;
  };
  const auto a = run(cpu, ud::cpu{});
  const auto r = run(ref, ud::reference{});
  REQUIRE(a.size() == r.size());
  double mx = 0, d = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    mx = std::max(mx, std::abs(r[i]));
    d = std::max(d, std::abs(a[i] - r[i]));
  }
  CHECK(mx > 0);
  CHECK(d <= 1e-9 * mx);
  // the objective and its gradient on the two backends
  std::array<ud::Tensor<double, ud::cpu>, 2> pc, ec, gc;
  std::array<ud::Tensor<double, ud::reference>, 2> pr, er, gr;
  for (std::size_t k = 0; k < 2; ++k) {
    const ud::Shape s{B, layout.size(k)};
    pc[k] = ud::Tensor<double, ud::cpu>(s);
    ec[k] = ud::Tensor<double, ud::cpu>(s);
    gc[k] = ud::Tensor<double, ud::cpu>(s);
    pr[k] = ud::Tensor<double, ud::reference>(s);
    er[k] = ud::Tensor<double, ud::reference>(s);
    gr[k] = ud::Tensor<double, ud::reference>(s);
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(pc[k].view()), {1, k}, 0);
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(ec[k].view()), {2, k}, 0);
    ud::ops::random_normal(ud::Context<ud::reference>{}, ud::as_rows(pr[k].view()), {1, k}, 0);
    ud::ops::random_normal(ud::Context<ud::reference>{}, ud::as_rows(er[k].view()), {2, k}, 0);
  }
  using CV = ud::GroupViews<const double, 2, ud::cpu>;
  using RV = ud::GroupViews<const double, 2, ud::reference>;
  const auto lc = ud::unidiffuser_loss<double, 2>(
      ud::Context<ud::cpu>{}, CV{pc[0].view(), pc[1].view()}, CV{ec[0].view(), ec[1].view()});
  const auto lr = ud::unidiffuser_loss<double, 2>(
      ud::Context<ud::reference>{}, RV{pr[0].view(), pr[1].view()}, RV{er[0].view(), er[1].view()});
  CHECK(lc.loss == doctest::Approx(lr.loss).epsilon(1e-14));
  ud::unidiffuser_loss_grad<double, 2>(
      ud::Context<ud::cpu>{}, CV{pc[0].view(), pc[1].view()}, CV{ec[0].view(), ec[1].view()},
      ud::GroupViews<double, 2, ud::cpu>{gc[0].view(), gc[1].view()});
  ud::unidiffuser_loss_grad<double, 2>(
      ud::Context<ud::reference>{}, RV{pr[0].view(), pr[1].view()}, RV{er[0].view(), er[1].view()},
      ud::GroupViews<double, 2, ud::reference>{gr[0].view(), gr[1].view()});
  for (std::size_t k = 0; k < 2; ++k)
    for (std::int64_t i = 0; i < gc[k].size(); ++i)
      CHECK(gc[k][i] == doctest::Approx(gr[k][i]).epsilon(1e-14));
}

TEST_CASE("several threads sample from one network at once, each with its own workspace") {
  const auto cfg = v1_config();
  nn::UViT<float> net(cfg);
  net.init_random(6, 0.2);
  std::vector<Batch<float>> batches;
  for (int i = 0; i < 4; ++i)
    batches.emplace_back(cfg, 1 + i, 0, 100 + static_cast<std::uint64_t>(i));
  std::vector<std::vector<std::vector<float>>> serial, parallel(batches.size());
  for (auto& b : batches) {
    Outputs<float, ud::cpu> o(cfg, b.B, 0);
    net.forward(ud::Context<ud::cpu>{1}, b.inputs<ud::cpu>(cfg), o.blocks);
    serial.push_back(o.y);
  }
  std::vector<std::thread> th;
  for (std::size_t i = 0; i < batches.size(); ++i)
    th.emplace_back([&, i] {
      nn::UViT<float>::Workspace ws;
      for (int rep = 0; rep < 3; ++rep) {
        Outputs<float, ud::cpu> o(cfg, batches[i].B, 0);
        const nn::UViT<float>& shared = net;
        shared.forward(ud::Context<ud::cpu>{1}, batches[i].inputs<ud::cpu>(cfg), o.blocks, ws);
        parallel[i] = o.y;
      }
    });
  for (auto& t : th) t.join();
  for (std::size_t i = 0; i < batches.size(); ++i) CHECK(parallel[i] == serial[i]);
}

TEST_CASE("backward: thread count, tape reuse, optional input gradients, stale tapes") {
  const auto cfg = k3_config();
  nn::UViT<float> net(cfg);
  net.init_random(8, 0.2);
  Batch<float> b3(cfg, 3, 0, 1), b2(cfg, 2, 6, 2);  // another batch and latent size
  std::vector<std::vector<float>> dx(cfg.components.size());
  auto grads = [&] { return std::vector<float>(net.gradients().begin(), net.gradients().end()); };
  // deterministic whatever the thread count (dW and db sum the samples in order)
  gradients(net, b3, &dx, false, nullptr, 1);
  const auto g1 = grads();
  const auto dx1 = dx;
  gradients(net, b3, &dx, false, nullptr, 2);
  CHECK(grads() == g1);
  CHECK(dx == dx1);
  // without input gradients: the same parameter gradients
  gradients(net, b3, nullptr, false, nullptr, 2);
  CHECK(grads() == g1);
  // one tape through batch 3, batch 2 at a 6x6 latent, batch 3 again: as fresh tapes
  nn::UViT<float>::Tape tape;
  gradients(net, b2, nullptr);
  const auto g2 = grads();
  for (bool rc : {false, true}) {
    gradients(net, b3, nullptr, rc, &tape);
    CHECK(grads() == g1);
    gradients(net, b2, nullptr, rc, &tape);
    CHECK(grads() == g2);
  }
  // a tape refuses the backward once the parameters changed, or on another network
  const ud::Context<ud::cpu> ctx{};
  Outputs<float, ud::cpu> o(cfg, b3.B, 0);
  net.forward(ctx, b3.inputs<ud::cpu>(cfg), o.blocks, tape);
  std::vector<ud::RowBlock<const float>> dout;
  for (std::size_t k = 0; k < cfg.components.size(); ++k)
    dout.emplace_back(b3.w[k].data(), b3.B, cfg.components[k].numel(), cfg.components[k].numel());
  nn::UViT<float> other(cfg);
  CHECK_THROWS_AS(other.backward(ctx, tape, dout), ud::error);
  net.parameters_changed();
  CHECK_THROWS_AS(net.backward(ctx, tape, dout), ud::error);
  nn::UViT<float>::Tape empty;
  CHECK_THROWS_AS(net.backward(ctx, empty, dout), ud::error);
  // malformed views are errors, not reads out of bounds
  auto in = b3.inputs<ud::cpu>(cfg);
  in.x[1] = ud::RowBlock<const float>(nullptr, b3.B, in.x[1].cols, in.x[1].ld);
  CHECK_THROWS_AS(net.forward(ctx, in, o.blocks), ud::error);
  in = b3.inputs<ud::cpu>(cfg);
  in.x[2].ld = in.x[2].cols - 1;
  CHECK_THROWS_AS(net.forward(ctx, in, o.blocks), ud::error);
}

TEST_CASE("a kind defined outside the library: the same arithmetic as the built-in it mirrors") {
  // "frames" over [4, 3] in frames of 2 is a token sequence of 2 tokens of 6, element for element
  auto with_audio = [](nn::UViTComponent audio) {
    auto c = k3_config();
    c.components[2] = std::move(audio);
    c.validate();
    return c;
  };
  (void)ud::testing::kinds_config();  // registers the kinds
  nn::UViTComponent tok{"audio",    nn::ComponentKind::tokens, 2, 0, 0, 0, 0, 2, 6, "audio_embed",
                        "audio_out"};
  const auto ca = with_audio(tok);
  const auto cb = with_audio(ud::testing::frames_component("frames", "audio", 2, 0, 4, 3, 2));
  nn::UViT<float> a(ca), b(cb);
  a.init_random(6, 0.2);
  REQUIRE(a.parameter_names().size() == b.parameter_names().size());
  for (const auto& n : a.parameter_names()) {
    const auto src = a.param(n);
    auto dst = b.param(n);
    REQUIRE(dst.shape() == src.shape());
    std::copy(src.begin(), src.end(), dst.begin());
  }
  b.parameters_changed();
  Batch<float> in(ca, 3, 0, 4);
  Outputs<float, ud::cpu> oa(ca, in.B, 0), ob(cb, in.B, 0);
  a.forward(ud::Context<ud::cpu>{}, in.inputs<ud::cpu>(ca), oa.blocks);
  b.forward(ud::Context<ud::cpu>{}, in.inputs<ud::cpu>(cb), ob.blocks);
  CHECK(oa.y == ob.y);
  for (bool rc : {false, true}) {
    std::vector<std::vector<float>> dxa(3), dxb(3);
    gradients(a, in, &dxa, rc);
    gradients(b, in, &dxb, rc);
    CHECK(dxa == dxb);
    for (const auto& n : a.parameter_names()) {
      CAPTURE(n);
      const auto ga = a.grad(n), gb = b.grad(n);
      CHECK(std::vector<float>(ga.begin(), ga.end()) == std::vector<float>(gb.begin(), gb.end()));
    }
  }
}

namespace {
// A patched image [C, H, W] in patches of p as its token sequence of (H/p)(W/p) patches of C p^2
// values: input order (c, i, k) (the conv weight's), output order (i, k, c) (UVIT.md §4.2-4.3).
std::vector<float> image_to_tokens(const std::vector<float>& img, std::int64_t B, std::int64_t C,
                                   std::int64_t H, std::int64_t W, std::int64_t p) {
  std::vector<float> tok(img.size());
  const std::int64_t gw = W / p, D = C * p * p, n = C * H * W;
  for (std::int64_t s = 0; s < B; ++s)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t y = 0; y < H; ++y)
        for (std::int64_t x = 0; x < W; ++x)
          tok[static_cast<std::size_t>(s * n + ((y / p) * gw + x / p) * D + (c * p + y % p) * p +
                                       x % p)] =
              img[static_cast<std::size_t>(s * n + (c * H + y) * W + x)];
  return tok;
}
std::vector<float> tokens_to_image(const std::vector<float>& tok, std::int64_t B, std::int64_t C,
                                   std::int64_t H, std::int64_t W, std::int64_t p) {
  std::vector<float> img(tok.size());
  const std::int64_t gw = W / p, D = C * p * p, n = C * H * W;
  for (std::int64_t s = 0; s < B; ++s)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t y = 0; y < H; ++y)
        for (std::int64_t x = 0; x < W; ++x)
          img[static_cast<std::size_t>(s * n + (c * H + y) * W + x)] = tok[static_cast<std::size_t>(
              s * n + ((y / p) * gw + x / p) * D + ((y % p) * p + x % p) * C + c)];
  return img;
}
// The config with every patched component replaced by its token sequence at latent h x w
// (0: the default), the same parameter names and sizes apart from pos_embed's rows.
nn::UViTConfig as_tokens(nn::UViTConfig cfg, std::int64_t h = 0, std::int64_t w = 0) {
  for (auto& c : cfg.components)
    if (c.kind == nn::ComponentKind::patched_image)
      c = nn::UViTComponent{.name = c.name,
                            .kind = nn::ComponentKind::tokens,
                            .group = c.group,
                            .slot = c.slot,
                            .length = c.tokens(h, w),
                            .dim = c.in_features(),
                            .in_name = c.in_name,
                            .out_name = c.out_name};
  cfg.validate();
  return cfg;
}
}  // namespace

TEST_CASE("patched images of any size and shape are the token sequences of their patches") {
  const auto cp = patched_sizes_config();
  const auto ct = as_tokens(cp);
  CHECK(cp.layout<3>().group(0).components[0].shape == ud::Shape{2, 4, 8});
  CHECK(cp.components[0].tokens() == 8);
  CHECK(cp.components[2].tokens() == 4);
  nn::UViT<float> a(cp), b(ct);
  a.init_random(6, 0.2);
  for (const auto& n : a.parameter_names()) {
    const auto src = a.param(n);
    auto dst = b.param(n);
    REQUIRE(dst.size() == src.size());
    std::copy(src.begin(), src.end(), dst.begin());
  }
  b.parameters_changed();
  Batch<float> in(cp, 3, 0, 4), tin = in;
  std::vector<std::size_t> patched;
  for (std::size_t k = 0; k < cp.components.size(); ++k) {
    const auto& c = cp.components[k];
    if (c.kind != nn::ComponentKind::patched_image) continue;
    patched.push_back(k);
    const auto [h, w] = c.latent();
    tin.x[k] = image_to_tokens(in.x[k], in.B, c.channels, h, w, c.patch);
  }
  REQUIRE(patched.size() == 2);
  Outputs<float, ud::cpu> oa(cp, in.B, 0), ob(ct, in.B, 0);
  a.forward(ud::Context<ud::cpu>{}, in.inputs<ud::cpu>(cp), oa.blocks);
  b.forward(ud::Context<ud::cpu>{}, tin.inputs<ud::cpu>(ct), ob.blocks);
  for (std::size_t k = 0; k < cp.components.size(); ++k) {
    CAPTURE(cp.components[k].name);
    const auto& c = cp.components[k];
    if (c.kind != nn::ComponentKind::patched_image) {
      CHECK(oa.y[k] == ob.y[k]);
      continue;
    }
    const auto [h, w] = c.latent();
    const auto img = tokens_to_image(ob.y[k], in.B, c.channels, h, w, c.patch);
    double md = 0, mx = 0;
    for (std::size_t i = 0; i < img.size(); ++i) {
      md = std::max(md, static_cast<double>(std::abs(img[i] - oa.y[k][i])));
      mx = std::max(mx, static_cast<double>(std::abs(img[i])));
    }
    CHECK(mx > 0);
    CHECK(md <= 1e-6 * mx);
  }
  // backward: the same parameter gradients (by name), input gradients in the patch order
  // (the weights of the scalar objective are permuted to the head's output order (i, k, c))
  for (std::size_t k : patched) {
    const auto& c = cp.components[k];
    const auto [h, w] = c.latent();
    // tokens_to_image reads token element perm[i] into image element i: the token network's
    // objective weight there is the image's weight w[i]
    std::vector<float> back(in.w[k].size());
    const std::int64_t n = c.channels * h * w;
    std::vector<float> idx(static_cast<std::size_t>(in.B * n));
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<float>(i);
    const auto perm = tokens_to_image(idx, in.B, c.channels, h, w, c.patch);
    for (std::size_t i = 0; i < perm.size(); ++i)
      back[static_cast<std::size_t>(perm[i])] = in.w[k][i];
    tin.w[k] = back;
  }
  std::vector<std::vector<float>> dxa(3), dxb(3);
  gradients(a, in, &dxa);
  gradients(b, tin, &dxb);
  double md = 0, mx = 0;
  auto compare = [&](std::span<const float> x, std::span<const float> y) {
    REQUIRE(x.size() == y.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      md = std::max(md, static_cast<double>(std::abs(x[i] - y[i])));
      mx = std::max(mx, static_cast<double>(std::abs(x[i])));
    }
  };
  for (const auto& n : a.parameter_names()) {
    const auto ga = a.grad(n), gb = b.grad(n);
    compare({ga.data(), static_cast<std::size_t>(ga.size())},
            {gb.data(), static_cast<std::size_t>(gb.size())});
  }
  for (std::size_t k = 0; k < cp.components.size(); ++k) {
    const auto& c = cp.components[k];
    if (c.kind != nn::ComponentKind::patched_image) {
      compare(dxa[k], dxb[k]);
      continue;
    }
    const auto [h, w] = c.latent();
    compare(image_to_tokens(dxa[k], in.B, c.channels, h, w, c.patch), dxb[k]);
  }
  CHECK(mx > 0);
  CHECK(md <= 1e-5 * mx);
}

TEST_CASE("a non-square image at another run-time size: positions resized on its own grid") {
  // the 4 x 8 image (a 2 x 4 grid) at 6 x 4 (3 x 2) is the token network whose positional rows
  // are the 2 x 4 rows resized bilinearly to 3 x 2 (UVIT.md §4.5)
  const auto cp = wide_config();
  const auto ct = as_tokens(cp, 6, 4);
  nn::UViT<float> a(cp), b(ct);
  a.init_random(3, 0.3);
  for (const auto& n : a.parameter_names()) {
    if (n == "pos_embed") continue;
    const auto src = a.param(n);
    auto dst = b.param(n);
    REQUIRE(dst.size() == src.size());
    std::copy(src.begin(), src.end(), dst.begin());
  }
  const std::int64_t E = cp.embed_dim, lead = 3, t0 = 8, t1 = 6;
  const auto pa = a.param("pos_embed");
  auto pb = b.param("pos_embed");
  REQUIRE(pb.size() == pa.size() - (t0 - t1) * E);
  std::copy_n(pa.data(), lead * E, pb.data());
  ud::ops::bilinear_resize<float>(ud::Context<ud::cpu>{},
                                  ud::RowBlock<const float>(pa.data() + lead * E, t0, E, E), 2, 4,
                                  3, 2, ud::RowBlock<float>(pb.data() + lead * E, t1, E, E));
  std::copy(pa.data() + (lead + t0) * E, pa.data() + pa.size(), pb.data() + (lead + t1) * E);
  b.parameters_changed();
  Batch<float> in(cp, 2, 6, 7, 4), tin = in;
  tin.lh = tin.lw = 0;
  const auto& c = cp.components[0];
  tin.x[0] = image_to_tokens(in.x[0], in.B, c.channels, 6, 4, c.patch);
  Outputs<float, ud::cpu> oa(cp, in.B, 6, 4), ob(ct, in.B, 0);
  a.forward(ud::Context<ud::cpu>{}, in.inputs<ud::cpu>(cp), oa.blocks);
  b.forward(ud::Context<ud::cpu>{}, tin.inputs<ud::cpu>(ct), ob.blocks);
  const auto img = tokens_to_image(ob.y[0], in.B, c.channels, 6, 4, c.patch);
  double md = 0, mx = 0;
  for (std::size_t i = 0; i < img.size(); ++i) {
    md = std::max(md, static_cast<double>(std::abs(img[i] - oa.y[0][i])));
    mx = std::max(mx, static_cast<double>(std::abs(img[i])));
  }
  CHECK(mx > 0);
  CHECK(md <= 1e-6 * mx);
  for (std::size_t k = 1; k < 3; ++k) {
    const std::vector<float> ya(oa.y[k]), yb(ob.y[k]);
    double d = 0;
    for (std::size_t i = 0; i < ya.size(); ++i)
      d = std::max(d, static_cast<double>(std::abs(ya[i] - yb[i])));
    CHECK(d <= 1e-6);
  }
}

TEST_CASE("patched image sizes: JSON, checkpoint bounds and errors") {
  auto msg = [](auto&& fn) { return ud::testing::message_of(fn); };
  const auto cp = patched_sizes_config();
  const auto j = cp.to_json();
  CHECK(j["components"][0]["width"] == 8);
  CHECK_FALSE(j["components"][2].contains("width"));  // square: written as before
  const auto back = nn::UViTConfig::from_json(j);
  CHECK(back.custom_json() == j);
  CHECK(back.components[0].latent() == std::array<std::int64_t, 2>{4, 8});
  ud::check_config_bounds(cp);
  // a square width written out equals the square default (the official presets stay official)
  auto v1 = v1_config();
  v1.components.back().width = v1.components.back().size;
  CHECK(v1.to_json() == v1_config().to_json());
  auto bad = cp;
  bad.components[0].width = 5;  // not a multiple of the patch 2
  auto m = msg([&] { bad.validate(); });
  CHECK(m.find("img") != std::string::npos);
  CHECK(m.find("latent sides") != std::string::npos);
  bad.components[0].width = -2;
  CHECK(msg([&] { bad.validate(); }).find("latent sides") != std::string::npos);
  bad.components[0].width = std::int64_t{1} << 30;
  CHECK(msg([&] { ud::check_config_bounds(bad); }).find("img.width") != std::string::npos);
  // run-time sizes: both or neither, multiples of the patch, one shared default
  nn::UViT<float> net(cp);
  Batch<float> b(cp, 1, 0, 1);
  Outputs<float, ud::cpu> o(cp, 1, 0);
  auto in = b.inputs<ud::cpu>(cp);
  in.latent_h = 4;
  in.latent_w = 0;
  CHECK(msg([&] { net.forward({}, in, o.blocks); }).find("both positive or both 0") !=
        std::string::npos);
  in.latent_w = 8;
  m = msg([&] { net.forward({}, in, o.blocks); });
  CHECK(m.find("share one default size") != std::string::npos);
  CHECK(m.find("img is 4x8, depth 6x6") != std::string::npos);
  nn::UViT<float> wide(wide_config());
  Batch<float> bw(wide_config(), 1, 0, 1);
  Outputs<float, ud::cpu> ow(wide_config(), 1, 0);
  auto iw = bw.inputs<ud::cpu>(wide_config());
  iw.latent_h = 5;
  iw.latent_w = 4;
  CHECK(msg([&] { wide.forward({}, iw, ow.blocks); }).find("multiples of the patch size 2") !=
        std::string::npos);
}

namespace {
struct Impostor : ud::testing::Frames {};
struct Builtin : ud::testing::Frames {
  static constexpr const char* name = "tokens";
};
struct CpuOnly : ud::testing::Frames {
  static constexpr const char* name = "cpu_only_frames";
};
}  // namespace

TEST_CASE("custom kinds: JSON and checkpoints round-trip; CPU and reference agree; errors") {
  const auto cfg = ud::testing::kinds_config();
  // the general JSON form names the kind and keeps its options
  const auto j = cfg.to_json();
  CHECK(j["components"][2]["kind"] == "frames");
  CHECK(j["components"][3]["options"]["patch"] == 2);
  const auto back = nn::UViTConfig::from_json(j);
  CHECK(back.custom_json() == j);
  CHECK(back.layout<3>().group(2).components[0].shape == ud::Shape{4, 3});
  // a checkpoint saves and reloads by itself
  nn::UViT<float> net(cfg);
  net.init_random(9, 0.1);
  const auto path = std::filesystem::temp_directory_path() /
                    ("ud_kinds_" + std::to_string(::getpid()) + ".safetensors");
  ud::save_checkpoint(net, path.string());
  const auto f = ud::safetensors::File::read(path.string());
  const auto cfg2 = ud::checkpoint_config(f);
  ud::check_config_bounds(cfg2);
  nn::UViT<float> net2(cfg2);
  ud::load_checkpoint(net2, f);
  CHECK(std::equal(net.parameters().begin(), net.parameters().end(), net2.parameters().begin()));
  std::filesystem::remove(path);
  // the reference backend runs the same kind code: whole network forward and backward agree
  nn::UViT<double, ud::cpu> cpu(cfg);
  nn::UViT<double, ud::reference> ref(cfg);
  cpu.init_random(2, 0.3);
  std::copy(cpu.parameters().begin(), cpu.parameters().end(), ref.parameters().begin());
  ref.parameters_changed();
  Batch<double> b(cfg, 2, 0, 3);
  gradients(cpu, b, nullptr);
  gradients(ref, b, nullptr);
  double md = 0, mx = 0;
  for (const auto& n : cpu.parameter_names()) {
    const auto gc = cpu.grad(n);
    const auto gr = ref.grad(n);
    for (std::int64_t i = 0; i < gc.size(); ++i) {
      md = std::max(md, std::abs(gc[i] - gr[i]));
      mx = std::max(mx, std::abs(gr[i]));
    }
  }
  CHECK(md <= 1e-11 * mx);
  // errors name the component, the kind, the option
  auto msg = [](auto&& fn) { return ud::testing::message_of(fn); };
  auto bad = cfg;
  bad.components[2].custom_kind = "nonesuch";
  auto m = msg([&] { bad.validate(); });
  CHECK(m.find("\"nonesuch\" is not registered") != std::string::npos);
  CHECK(m.find("\"frames\"") != std::string::npos);  // the registered ones are listed
  CHECK(m.find("sig") != std::string::npos);
  bad = cfg;
  bad.components[3].options["length"] = 5;  // not a multiple of the patch
  CHECK(msg([&] { bad.validate(); }).find("audio.options.length") != std::string::npos);
  bad = cfg;
  bad.components[3].options.erase("channels");
  CHECK(msg([&] { bad.validate(); }).find("audio.options.channels") != std::string::npos);
  bad = cfg;
  bad.components[3].custom_kind.clear();
  CHECK(msg([&] { bad.validate(); }).find("custom_kind") != std::string::npos);
  auto jb = j;
  jb["components"][3]["options"] = 3;
  CHECK(msg([&] { nn::UViTConfig::from_json(jb); }).find("options") != std::string::npos);
  CHECK(msg([] { nn::register_kind<Impostor>(); }).find("another type") != std::string::npos);
  CHECK(msg([] { nn::register_kind<Builtin>(); }).find("built-in") != std::string::npos);
  nn::register_kind<ud::testing::Frames>();  // the same type again: fine
  // registered for the CPU only: a float network on the reference backend is refused by name
  nn::register_kind<CpuOnly>();
  auto c3 = cfg;
  c3.components[2].custom_kind = "cpu_only_frames";
  nn::UViT<float> fine(c3);
  CHECK(msg([&] { nn::UViT<float, ud::reference> r(c3); }).find("cpu_only_frames") !=
        std::string::npos);
}
