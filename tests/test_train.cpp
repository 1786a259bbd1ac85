// SPDX-License-Identifier: Apache-2.0
// Training: AdamW, the learning-rate schedule, clipping and EMA against their formulas; the K-group
// trainer lowering the loss, learning the exact noise predictor of Gaussian data, resuming bit for
// bit, surviving a kill during a checkpoint, and two data-parallel workers matching one process.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <Eigen/Core>

#include "support.hpp"
#include "unidiffuser/diffusion/forward.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/objective.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/oracle/gaussian_oracle.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "unidiffuser/train/optim.hpp"
#include "unidiffuser/train/trainer.hpp"

namespace ud = unidiffuser;
namespace nn = unidiffuser::nn;
namespace tr = unidiffuser::train;

namespace {

nn::UViTConfig tiny() {
  // v1 layout: img [2, 4, 4] patch 2 + clip [1, 4] (group 0), text [3, 3] (group 1)
  return nn::UViTConfig::official("v1", 4, 2, 2, /*embed_dim=*/16, /*depth=*/3, /*heads=*/2, 2.0,
                                  false, false, /*text_dim=*/3, /*text_len=*/3, /*clip=*/4);
}

// Clean data keyed by the global sample index: a fixed pattern per group plus a small
// per-sample perturbation (so the objective has something to learn).
void pattern_data(std::uint64_t seed, std::int64_t, std::int64_t first,
                  const std::array<ud::RowBlock<float>, 2>& x0, std::span<std::int64_t> dt) {
  for (std::size_t g = 0; g < 2; ++g) {
    const auto& b = x0[g];
    ud::ops::random_normal(ud::Context<ud::cpu>{}, b, ud::NoiseKey{seed + 17, 100 + g},
                           static_cast<std::uint64_t>(first));
    for (std::int64_t r = 0; r < b.rows; ++r)
      for (std::int64_t j = 0; j < b.cols; ++j) {
        float& v = b.data[r * b.ld + j];
        v = static_cast<float>(std::sin(0.7 * static_cast<double>(j) + 1.3 * g)) + 0.1f * v;
      }
  }
  for (auto& d : dt) d = 1;
}

tr::TrainerOptions<float, 2> options(std::int64_t batch) {
  tr::TrainerOptions<float, 2> o;
  o.seed = 5;
  o.batch = batch;
  o.lr.lr = 2e-3;
  o.lr.warmup = 5;
  o.adamw.weight_decay = 0.01;
  o.clip_norm = 1.0;
  o.ema_decay = 0.9;
  return o;
}

std::vector<float> values(ud::TensorView<const float> v) {
  return std::vector<float>(v.begin(), v.end());
}

}  // namespace

TEST_CASE("AdamW, the schedule, clipping and EMA follow their formulas") {
  // AdamW on three values over three steps against PyTorch's update written out in double
  std::vector<double> p = {0.5, -1.0, 2.0}, g = {0.1, -0.3, 0.05};
  std::vector<double> m(3, 0.0), v(3, 0.0), want = p;
  const double lr = 0.01, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.1;
  tr::AdamW<double> opt({{"w", 0, 2}, {"b.bias", 2, 1}}, 3, {b1, b2, eps, wd});
  ud::Tensor<double> P(ud::Shape{3}), G(ud::Shape{3});
  std::copy(p.begin(), p.end(), P.begin());
  std::copy(g.begin(), g.end(), G.begin());
  for (int t = 1; t <= 3; ++t) {
    opt.step(ud::Context<ud::cpu>{}, P.view(), G.view(), lr);
    for (int i = 0; i < 3; ++i) {
      const double d = i < 2 ? wd : 0.0;  // "b.bias" is in the default no-decay set
      want[i] *= 1 - lr * d;
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
      want[i] -= lr * mh / (std::sqrt(vh) + eps);
    }
  }
  for (int i = 0; i < 3; ++i) CHECK(P[i] == doctest::Approx(want[i]).epsilon(1e-14));
  CHECK(opt.steps() == 3);
  // schedule: warm-up, then cosine to min_lr
  tr::LrSchedule s{1.0, 0.1, 10, 110, tr::Decay::cosine};
  CHECK(s.at(0) == doctest::Approx(0.1));
  CHECK(s.at(9) == doctest::Approx(1.0));
  CHECK(s.at(60) == doctest::Approx(0.55));
  CHECK(s.at(110) == doctest::Approx(0.1));
  tr::LrSchedule lin{1.0, 0.0, 0, 100, tr::Decay::linear};
  CHECK(lin.at(25) == doctest::Approx(0.75));
  // clipping by global norm: [3, 4] has norm 5
  ud::Tensor<double> c(ud::Shape{2});
  c[0] = 3;
  c[1] = 4;
  CHECK(tr::clip_grad_norm<double>(ud::Context<ud::cpu>{}, c.view(), 1.0) == doctest::Approx(5));
  CHECK(c[0] == doctest::Approx(0.6).epsilon(1e-6));
  CHECK(c[1] == doctest::Approx(0.8).epsilon(1e-6));
  // EMA
  ud::Tensor<double> w(ud::Shape{1});
  w[0] = 1;
  tr::Ema<double> ema(ud::Context<ud::cpu>{}, w.view(), 0.5);
  w[0] = 3;
  ema.update(ud::Context<ud::cpu>{}, w.view());
  CHECK(ema.weights()[0] == doctest::Approx(2));
  // the reference backend's AdamW agrees
  ud::Tensor<double, ud::reference> PR(ud::Shape{3}), GR(ud::Shape{3});
  std::copy(p.begin(), p.end(), PR.begin());
  std::copy(g.begin(), g.end(), GR.begin());
  tr::AdamW<double, ud::reference> optr({{"w", 0, 2}, {"b.bias", 2, 1}}, 3, {b1, b2, eps, wd});
  for (int t = 1; t <= 3; ++t) optr.step(ud::Context<ud::reference>{}, PR.view(), GR.view(), lr);
  for (int i = 0; i < 3; ++i) CHECK(PR[i] == doctest::Approx(want[i]).epsilon(1e-14));
}

TEST_CASE("a short training run lowers the loss") {
  nn::UViT<float> net(tiny());
  net.init_random(1, 0.02);
  tr::Trainer<float, 2> t(net, options(8), pattern_data);
  const ud::Context<ud::cpu> ctx{};
  double first = 0, last = 0;
  for (int s = 0; s < 80; ++s) {
    const auto log = t.step(ctx);
    REQUIRE(std::isfinite(log.loss));
    if (s < 10) first += log.loss / 10;
    if (s >= 70) last += log.loss / 10;
  }
  MESSAGE("mean loss of steps 1-10: " << first << ", of steps 71-80: " << last);
  CHECK(last < 0.7 * first);
}

TEST_CASE("a run resumed from a checkpoint ends with the same weights, bit for bit") {
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_resume_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "train.safetensors").string();
  const ud::Context<ud::cpu> ctx{2};
  auto fresh = [] {
    auto n = std::make_unique<nn::UViT<float>>(tiny());
    n->init_random(3, 0.02);
    return n;
  };
  auto a = fresh();
  tr::Trainer<float, 2> ta(*a, options(4), pattern_data);
  ta.run(ctx, 6, 0, ck, 3, true);  // checkpoints at steps 3 and 6
  // the checkpoint of step 6 was written last: restart from step 3 by running a second trainer
  auto b = fresh();
  tr::Trainer<float, 2> tb(*b, options(4), pattern_data);
  tb.run(ctx, 3, 0, ck + ".3", 3, true);
  auto c = fresh();  // a new process: a fresh network and trainer, loaded from the step-3 file
  c->init_random(99, 0.5);
  tr::Trainer<float, 2> tc(*c, options(4), pattern_data);
  tc.load(ck + ".3");
  CHECK(tc.step_index() == 3);
  tc.run(ctx, 6, 0, {}, 0, true);
  const nn::UViT<float>& ca = *a;
  const nn::UViT<float>& cc = *c;
  CHECK(values(ca.parameters()) == values(cc.parameters()));
  CHECK(values(ta.ema().weights()) == values(tc.ema().weights()));
  CHECK(values(ta.optimizer().second_moment()) == values(tc.optimizer().second_moment()));
  // the loaded checkpoint of a different run is refused
  auto o = options(4);
  o.seed = 6;
  tr::Trainer<float, 2> td(*fresh(), o, pattern_data);
  CHECK_THROWS_AS(td.load(ck), ud::error);
  // the weights are a checkpoint the loader takes (prefix "param/")
  nn::UViT<float> d(tiny());
  ud::load_checkpoint(d, ud::safetensors::File::read(ck), "param/");
  CHECK(values(static_cast<const nn::UViT<float>&>(d).parameters()) == values(ca.parameters()));
  std::filesystem::remove_all(dir);
}

TEST_CASE("a process killed while writing a checkpoint leaves the previous one intact") {
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_kill_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "train.safetensors").string();
  // a network large enough that a checkpoint takes a while to write (about 40 MB)
  auto cfg = nn::UViTConfig::official("v1", 8, 4, 2, 256, 6, 4, 4.0, false, false, 16, 8, 32);
  nn::UViT<float> net(cfg);
  net.init_random(1, 0.02);
  auto data = [](std::uint64_t, std::int64_t, std::int64_t,
                 const std::array<ud::RowBlock<float>, 2>& x, std::span<std::int64_t>) {
    for (const auto& b : x)
      for (std::int64_t r = 0; r < b.rows; ++r)
        for (std::int64_t j = 0; j < b.cols; ++j) b.data[r * b.ld + j] = 0.5f;
  };
  tr::Trainer<float, 2> t(net, options(2), data);
  t.save(ck);
  const auto good = std::filesystem::file_size(ck);
  int killed = 0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {  // child: overwrite the checkpoint again and again until killed
      for (;;) t.save(ck);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(30 + 40 * attempt));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    killed += WIFSIGNALED(status) ? 1 : 0;
    // the file is a complete checkpoint: it loads, with every tensor
    tr::Trainer<float, 2> r(net, options(2), data);
    CHECK_NOTHROW(r.load(ck));
    CHECK(std::filesystem::file_size(ck) == good);
  }
  CHECK(killed == 3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("two data-parallel workers on halves of the batch match one process on all of it") {
  const auto cfg = tiny();
  auto init = [&] {
    auto n = std::make_unique<nn::UViT<float>>(cfg);
    n->init_random(8, 0.02);
    return n;
  };
  auto one = init();
  tr::Trainer<float, 2> t1(*one, options(8), pattern_data);
  for (int s = 0; s < 4; ++s) t1.step(ud::Context<ud::cpu>{1});
  // two workers in threads, reducing through a shared buffer with barriers (what MPI does)
  std::array<std::unique_ptr<nn::UViT<float>>, 2> nets = {init(), init()};
  std::vector<double> shared;
  std::vector<float> sharedf;
  std::barrier sync(2);
  // rank 0 zeroes the shared buffer, each rank adds its values in rank order, all read the sum
  auto sum = [&](auto& buf, int rank, auto* d, std::int64_t n) {
    using V = std::remove_pointer_t<decltype(d)>;
    if (rank == 0) buf.assign(static_cast<std::size_t>(n), V(0));
    sync.arrive_and_wait();
    for (int r = 0; r < 2; ++r) {
      if (r == rank)
        for (std::int64_t i = 0; i < n; ++i) buf[static_cast<std::size_t>(i)] += d[i];
      sync.arrive_and_wait();
    }
    std::copy_n(buf.begin(), n, d);
    sync.arrive_and_wait();
  };
  std::array<double, 2> loss{};
  std::vector<std::thread> th;
  for (int rank = 0; rank < 2; ++rank)
    th.emplace_back([&, rank] {
      tr::Reducer red{rank, 2, [&, rank](float* d, std::int64_t n) { sum(sharedf, rank, d, n); },
                      [&, rank](double* d, std::int64_t n) { sum(shared, rank, d, n); }};
      tr::Trainer<float, 2> t(*nets[static_cast<std::size_t>(rank)], options(8), pattern_data, red);
      for (int s = 0; s < 4; ++s)
        loss[static_cast<std::size_t>(rank)] = t.step(ud::Context<ud::cpu>{1}).loss;
    });
  for (auto& t : th) t.join();
  const nn::UViT<float>& a = *one;
  const nn::UViT<float>& b = *nets[0];
  const nn::UViT<float>& c = *nets[1];
  CHECK(values(b.parameters()) == values(c.parameters()));  // the workers agree exactly
  double worst = 0, scale = 0;
  const auto pa = values(a.parameters()), pb = values(b.parameters());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, std::abs(double(pa[i]) - pb[i]));
    scale = std::max(scale, std::abs(double(pa[i])));
  }
  MESSAGE("max |one process - two workers| after 4 steps: " << worst << " (max |w| " << scale
                                                            << ")");
  CHECK(worst <= 1e-5 * scale);
  CHECK(loss[0] == loss[1]);
}

TEST_CASE("training on Gaussian data brings the network close to the exact noise predictor") {
  const auto cfg = tiny();
  const auto layout = cfg.layout<2>();
  const std::int64_t d = layout.size(0) + layout.size(1);
  // a correlated Gaussian law over the joint vector: x = mu + L z
  Eigen::MatrixXd L = Eigen::MatrixXd::Zero(d, d);
  Eigen::VectorXd mu(d);
  for (std::int64_t i = 0; i < d; ++i) {
    mu[i] = std::sin(0.9 * static_cast<double>(i));
    for (std::int64_t j = 0; j <= i; ++j)
      L(i, j) = (i == j ? 0.6
                        : 0.25 * std::cos(1.7 * static_cast<double>(i * d + j)) /
                              std::sqrt(static_cast<double>(i + 1)));
  }
  const Eigen::MatrixXd cov = L * L.transpose();
  auto law = [&](std::uint64_t key, std::int64_t first,
                 const std::array<ud::RowBlock<float>, 2>& x) {
    std::vector<float> z(static_cast<std::size_t>(x[0].rows * d));
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::RowBlock<float>(z.data(), x[0].rows, d, d),
                           ud::NoiseKey{key, 7}, static_cast<std::uint64_t>(first));
    for (std::int64_t r = 0; r < x[0].rows; ++r) {
      const Eigen::VectorXd v =
          mu + L * Eigen::Map<const Eigen::VectorXf>(z.data() + r * d, d).cast<double>();
      for (std::int64_t j = 0; j < layout.size(0); ++j)
        x[0].data[r * x[0].ld + j] = static_cast<float>(v[j]);
      for (std::int64_t j = 0; j < layout.size(1); ++j)
        x[1].data[r * x[1].ld + j] = static_cast<float>(v[layout.size(0) + j]);
    }
  };
  auto data = [&](std::uint64_t seed, std::int64_t, std::int64_t first,
                  const std::array<ud::RowBlock<float>, 2>& x, std::span<std::int64_t> dt) {
    law(seed, first, x);
    for (auto& v : dt) v = 1;
  };
  ud::GaussianOracle<2> oracle(layout, mu, cov,
                               ud::VPSchedule::unidiffuser(ud::TablePrecision::float64));
  // held-out noised inputs at independent levels per group, and the exact predictor's output
  const std::int64_t B = 256;
  std::array<ud::Tensor<float>, 2> x0, eps, xn, exact, got;
  for (std::size_t g = 0; g < 2; ++g)
    for (auto* t : {&x0[g], &eps[g], &xn[g], &exact[g], &got[g]})
      *t = ud::Tensor<float>(ud::Shape{B, layout.size(g)});
  law(999, 0, {ud::as_rows(x0[0].view()), ud::as_rows(x0[1].view())});
  const auto levels = ud::draw_levels<2>(4242, 0, B, 1000);
  std::array<std::vector<double>, 2> tin;
  for (std::size_t g = 0; g < 2; ++g) {
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(eps[g].view()), {31, g}, 0);
    ud::q_sample<float>(ud::Context<ud::cpu>{}, ud::DiscreteSchedule::stable_diffusion(),
                        x0[g].view(), eps[g].view(), levels[g], xn[g].view());
    tin[g].assign(levels[g].begin(), levels[g].end());
  }
  const std::array<std::span<const double>, 2> ts = {tin[0], tin[1]};
  const std::array<ud::TensorView<const float>, 2> xv = {xn[0].view(), xn[1].view()};
  oracle(ud::Context<ud::cpu>{}, xv, ts, {exact[0].view(), exact[1].view()});
  nn::UViT<float> net(cfg);
  net.init_random(2, 0.02);
  auto rel_error = [&] {  // sum |net - exact|^2 / sum |exact|^2 over the held-out set
    nn::UViTPredictor<float, 2> model(net, 1);
    model(ud::Context<ud::cpu>{}, xv, ts, {got[0].view(), got[1].view()});
    double num = 0, den = 0;
    for (std::size_t g = 0; g < 2; ++g)
      for (std::int64_t i = 0; i < got[g].size(); ++i) {
        const double e = exact[g][i];
        num += (got[g][i] - e) * (got[g][i] - e);
        den += e * e;
      }
    return num / den;
  };
  const double before = rel_error();
  auto o = options(32);
  o.lr = tr::LrSchedule{4e-3, 2e-4, 20, 1200, tr::Decay::cosine};
  o.adamw.weight_decay = 0;
  tr::Trainer<float, 2> t(net, o, data);
  t.run(ud::Context<ud::cpu>{}, 1200, 0, {}, 0, true);
  const double after = rel_error();
  MESSAGE(
      "relative squared error against the exact Gaussian predictor on 256 held-out noised "
      "samples: "
      << before << " untrained, " << after << " after 1200 steps of batch 32");
  CHECK(after < 0.05 * before);
  CHECK(after < 0.05);
}

TEST_CASE("the fused optimiser pass: AdamW, EMA and zeroed gradients as the separate passes") {
  // 10,000 values over two ranges (one decayed), three steps: the fused CPU pass against
  // AdamW::step, Ema::update and a fill, and the reference backend (no fused op: the fallback).
  // The ranges are no multiple of a packet or of the passes' chunks, so the padded tails count.
  const std::int64_t n = 10000;
  const std::vector<tr::ParamRange> ranges = {{"w", 0, 6007}, {"x.bias", 6007, 3993}};
  auto fill = [&](auto& t, double a, double b) {
    for (std::int64_t i = 0; i < n; ++i) t[i] = static_cast<float>(a * std::sin(b * double(i)));
  };
  ud::Tensor<float> P1(ud::Shape{n}), P2(ud::Shape{n}), G1(ud::Shape{n}), G2(ud::Shape{n});
  ud::Tensor<float, ud::reference> P3(ud::Shape{n}), G3(ud::Shape{n});
  fill(P1, 1.0, 0.37), fill(P2, 1.0, 0.37), fill(P3, 1.0, 0.37);
  const ud::Context<ud::cpu> ctx{};
  tr::AdamW<float> fused(ranges, n), plain(ranges, n);
  tr::AdamW<float, ud::reference> ref(ranges, n);
  tr::Ema<float> e1(ctx, P1.view(), 0.99), e2(ctx, P2.view(), 0.99);
  tr::Ema<float, ud::reference> e3(ud::Context<ud::reference>{}, P3.view(), 0.99);
  for (int t = 0; t < 3; ++t) {
    fill(G1, 0.1, 0.11 * (t + 1)), fill(G2, 0.1, 0.11 * (t + 1)), fill(G3, 0.1, 0.11 * (t + 1));
    fused.step(ctx, P1.view(), G1.view(), 1e-3, &e1, true);
    plain.step(ctx, P2.view(), ud::TensorView<const float>(G2.view()), 1e-3);
    e2.update(ctx, P2.view());
    ref.step(ud::Context<ud::reference>{}, P3.view(), G3.view(), 1e-3, &e3, true);
    for (std::int64_t i = 0; i < n; ++i) {
      CHECK(G1[i] == 0.0f);  // zeroed as read
      CHECK(G3[i] == 0.0f);
    }
  }
  double worst_p = 0, worst_e = 0, worst_r = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    worst_p = std::max(worst_p, std::abs(double(P1[i]) - P2[i]));  // the same arithmetic
    worst_e = std::max(worst_e, std::abs(double(e1.weights()[i]) - e2.weights()[i]));
    worst_r = std::max(worst_r, std::abs(double(P1[i]) - P3[i]));
  }
  CHECK(worst_p == 0.0);
  CHECK(worst_e < 1e-6);  // the EMA's products may round differently (contraction)
  CHECK(worst_r < 1e-6);  // the reference computes in double
  CHECK(fused.steps() == 3);
  // the sum of squares behind clipping (chunks of 4096 and eight running sums each) against a
  // plain sum in long double, over a length that leaves a partial chunk and a partial group
  for (std::int64_t len : {n, n - 3, std::int64_t{5}}) {
    long double w = 0;
    for (std::int64_t i = 0; i < len; ++i) w += static_cast<long double>(P1[i]) * P1[i];
    CHECK(ud::ops::sum_squares<float>(ctx, P1.data(), len) ==
          doctest::Approx(static_cast<double>(w)).epsilon(1e-13));
    CHECK(ud::ops::sum_squares<float>(ud::Context<ud::cpu>{1}, P1.data(), len) ==
          ud::ops::sum_squares<float>(ctx, P1.data(), len));  // whatever the threads
  }
  // wrong sizes are named
  ud::Tensor<float> small(ud::Shape{5});
  CHECK_THROWS_AS(fused.step(ctx, small.view(), G1.view(), 1e-3, &e1, true), ud::error);
}

TEST_CASE("the optimiser's packet square root is correctly rounded (std::sqrt's bits)") {
  // Eigen's own psqrt is an estimate plus Newton steps under EIGEN_FAST_MATH on AVX and AVX-512
  namespace od = ud::cpu_kernels::optim_detail;
  auto check = [](auto zero) {
    using T = decltype(zero);
    using P = od::Packet<T>;
    constexpr int W = od::lanes<T>;
    std::uint64_t state = 12345;
    int bad = 0;
    for (int i = 0; i < 20000; ++i) {
      T in[W], out[W];
      for (int w = 0; w < W; ++w) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        // magnitudes from 1e-30 to 1e30, as the second moments of a training run span
        const double e = static_cast<double>(state >> 11) / 9007199254740992.0 * 60.0 - 30.0;
        in[w] = static_cast<T>(std::pow(10.0, e) * (1.0 + static_cast<double>(w) / 64));
      }
      Eigen::internal::pstoreu(out, od::psqrt_exact(Eigen::internal::ploadu<P>(in)));
      for (int w = 0; w < W; ++w) bad += out[w] != std::sqrt(in[w]);
    }
    CHECK(bad == 0);
  };
  check(0.0f);
  check(0.0);
}

TEST_CASE("a trainer's step zeroes the gradients it used unless asked to keep them") {
  const auto cfg = tiny();
  nn::UViT<float> a(cfg), b(cfg);
  a.init_random(9, 0.02);
  b.init_random(9, 0.02);
  auto oa = options(4), ob = options(4);
  ob.keep_gradients = true;
  tr::Trainer<float, 2> ta(a, oa, pattern_data), tb(b, ob, pattern_data);
  for (int s = 0; s < 3; ++s) {
    const auto la = ta.step(ud::Context<ud::cpu>{}), lb = tb.step(ud::Context<ud::cpu>{});
    CHECK(la.loss == lb.loss);
    CHECK(la.grad_norm == lb.grad_norm);
    bool zero = true, kept = false;
    for (float v : values(a.gradients())) zero = zero && v == 0.0f;
    for (float v : values(b.gradients())) kept = kept || v != 0.0f;
    CHECK(zero);
    CHECK(kept);
  }
  CHECK(values(static_cast<const nn::UViT<float>&>(a).parameters()) ==
        values(static_cast<const nn::UViT<float>&>(b).parameters()));
  CHECK(values(ta.ema().weights()) == values(tb.ema().weights()));
}

TEST_CASE("gradient accumulation over micro-batches matches one pass over the batch") {
  const auto cfg = tiny();
  nn::UViT<float> a(cfg), b(cfg);
  a.init_random(9, 0.02);
  b.init_random(9, 0.02);
  auto oa = options(8), ob = options(8);
  ob.micro_batches = 4;
  tr::Trainer<float, 2> ta(a, oa, pattern_data), tb(b, ob, pattern_data);
  CHECK(tb.micro() == 2);
  double la = 0, lb = 0;
  for (int s = 0; s < 3; ++s) {
    la = ta.step(ud::Context<ud::cpu>{}).loss;
    lb = tb.step(ud::Context<ud::cpu>{}).loss;
  }
  CHECK(la == doctest::Approx(lb).epsilon(1e-5));  // weights differ by float rounding
  const auto pa = values(static_cast<const nn::UViT<float>&>(a).parameters());
  const auto pb = values(static_cast<const nn::UViT<float>&>(b).parameters());
  double worst = 0;
  for (std::size_t i = 0; i < pa.size(); ++i)
    worst = std::max(worst, std::abs(double(pa[i]) - pb[i]));
  CHECK(worst < 1e-5);
  // a batch that does not split is an error
  auto bad = options(6);
  bad.micro_batches = 4;
  using Tr = tr::Trainer<float, 2>;
  CHECK_THROWS_AS(Tr(a, bad, pattern_data), ud::error);
}

TEST_CASE("group loss weights: the weighted loss, its gradient, group_mean_weights, bad weights") {
  const auto cfg = tiny();
  const auto layout = cfg.layout<2>();
  const double d0 = static_cast<double>(layout.size(0)), d1 = static_cast<double>(layout.size(1));
  auto run_one = [&](std::vector<double> w) {
    auto net = std::make_unique<nn::UViT<float>>(cfg);
    net->init_random(4, 0.02);
    auto o = options(4);
    o.clip_norm = 0;  // the raw gradient stays in net.gradients() after the step
    o.keep_gradients = true;
    o.group_weights = std::move(w);
    tr::Trainer<float, 2> t(*net, o, pattern_data);
    const auto log = t.step(ud::Context<ud::cpu>{});
    auto g = values(net->gradients());
    return std::tuple{log, g, std::move(net)};
  };
  const auto [l1, g1, n1] = run_one({});
  const auto [l2, g2, n2] = run_one({2.0, 2.0});
  const auto [lm, gm, nm] = run_one(tr::group_mean_weights(layout));
  const auto [l0, g0, n0] = run_one({1.0, 0.0});
  // default: the mean over all elements; weights scale each group's share
  CHECK(l1.loss == doctest::Approx((l1.group_mse[0] * d0 + l1.group_mse[1] * d1) / (d0 + d1)));
  CHECK(l2.loss == doctest::Approx(2 * l1.loss));
  CHECK(lm.loss == doctest::Approx((lm.group_mse[0] + lm.group_mse[1]) / 2));
  CHECK(lm.group_mse == l1.group_mse);  // same step, same data: only the weighting differs
  std::size_t exact = 0;
  for (std::size_t i = 0; i < g1.size(); ++i) exact += g2[i] == 2 * g1[i];
  CHECK(exact == g1.size());  // a power-of-two weight scales the gradient exactly
  // weight 0 on the caption group: its head gets no gradient, the image head does
  const auto grad_of = [](nn::UViT<float>& n, const char* name) { return values(n.grad(name)); };
  for (float v : grad_of(*n0, "text_out.weight")) CHECK(v == 0.0f);
  bool any = false;
  for (float v : grad_of(*n0, "decoder_pred.weight")) any = any || v != 0.0f;
  CHECK(any);
  // a checkpoint of one weighting does not resume under another
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_weights_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "t.safetensors").string();
  {
    auto o = options(4);
    o.group_weights = {1.0, 3.0};
    tr::Trainer<float, 2>(*nm, o, pattern_data).save(ck);
    tr::Trainer<float, 2>(*nm, o, pattern_data).load(ck);  // the same weighting loads
    o.group_weights = {};
    const std::string m =
        ud::testing::message_of([&] { tr::Trainer<float, 2>(*nm, o, pattern_data).load(ck); });
    CHECK(m.find("group_weights of the checkpoint [1.0,3.0]") != std::string::npos);
  }
  std::filesystem::remove_all(dir);
  // bad weights are named
  nn::UViT<float> net(cfg);
  using Tr = tr::Trainer<float, 2>;
  for (const std::vector<double>& w :
       {std::vector<double>{1.0}, std::vector<double>{-1.0, 1.0}, std::vector<double>{0.0, 0.0},
        std::vector<double>{1.0, std::nan("")}}) {
    auto o = options(4);
    o.group_weights = w;
    const std::string m = ud::testing::message_of([&] { Tr(net, o, pattern_data); });
    CAPTURE(m);
    CHECK(m.find("group_weights") != std::string::npos);
  }
}

TEST_CASE(
    "marginalisation training: the draws, data never seen, a resume under another p refused") {
  // the draws: frequency, independence of the batch split, the edge probabilities, bad input
  const std::vector<double> p{0.25, 0.0};
  const auto all = ud::draw_marginalised<2>(9, 3, 40000, p);
  double n = 0;
  for (auto v : all[0]) n += v;
  CHECK(n / 40000 == doctest::Approx(0.25).epsilon(0.05));  // 5 standard deviations: 0.011
  for (auto v : all[1]) CHECK(v == 0);
  const auto part = ud::draw_marginalised<2>(9, 3, 10, p, 100);
  for (std::size_t b = 0; b < 10; ++b) CHECK(part[0][b] == all[0][100 + b]);
  const auto other_step = ud::draw_marginalised<2>(9, 4, 40000, p);
  CHECK(other_step[0] != all[0]);
  const std::vector<double> ones{1.0, 1.0};
  for (const auto& g : ud::draw_marginalised<2>(9, 3, 1000, ones))
    for (auto v : g) CHECK(v == 1);
  const std::vector<double> bad{0.5, 1.5}, one{0.5};
  CHECK(ud::testing::message_of([&] { ud::draw_marginalised<2>(1, 0, 4, bad); }).find("p[1]") !=
        std::string::npos);
  CHECK(ud::testing::message_of([&] {
          ud::draw_marginalised<2>(1, 0, 4, one);
        }).find("one probability per group") != std::string::npos);

  // with probability 1 for the caption group, its data never reaches the network: the run does
  // not depend on it (its input and target are the noise); with probability 0 it does
  const auto cfg = tiny();
  auto run = [&](std::vector<double> mp, float shift1, float shift0) {
    nn::UViT<float> net(cfg);
    net.init_random(4, 0.02);
    auto o = options(8);
    o.marginal_probability = std::move(mp);
    auto data = [&](std::uint64_t seed, std::int64_t step, std::int64_t first,
                    const std::array<ud::RowBlock<float>, 2>& x0, std::span<std::int64_t> dt) {
      pattern_data(seed, step, first, x0, dt);
      const float shift[2] = {shift0, shift1};
      for (std::size_t g = 0; g < 2; ++g)
        for (std::int64_t r = 0; r < x0[g].rows; ++r)
          for (std::int64_t j = 0; j < x0[g].cols; ++j) x0[g].data[r * x0[g].ld + j] += shift[g];
    };
    tr::Trainer<float, 2> t(net, o, data);
    for (int s = 0; s < 3; ++s) t.step(ud::Context<ud::cpu>{});
    return values(net.parameters());
  };
  CHECK(run({0.0, 1.0}, 0.f, 0.f) == run({0.0, 1.0}, 5.f, 0.f));
  CHECK(run({0.0, 1.0}, 0.f, 0.f) != run({0.0, 1.0}, 0.f, 5.f));
  CHECK(run({0.0, 0.0}, 0.f, 0.f) != run({0.0, 0.0}, 5.f, 0.f));
  CHECK(run({}, 0.f, 0.f) == run({0.0, 0.0}, 0.f, 0.f));  // empty: the exact objective
  // some but not all samples marginalised: neither the plain run nor the always-marginalised one
  const auto half = run({0.5, 0.5}, 0.f, 0.f);
  CHECK(half != run({0.0, 0.0}, 0.f, 0.f));
  CHECK(half != run({1.0, 1.0}, 0.f, 0.f));

  // the probabilities are part of the run: a state of one does not resume under another
  nn::UViT<float> net(cfg);
  net.init_random(4, 0.02);
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_marginal_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "t.safetensors").string();
  auto o = options(4);
  o.marginal_probability = {0.1, 0.1};
  tr::Trainer<float, 2>(net, o, pattern_data).save(ck);
  tr::Trainer<float, 2>(net, o, pattern_data).load(ck);
  o.marginal_probability = {};
  const std::string m =
      ud::testing::message_of([&] { tr::Trainer<float, 2>(net, o, pattern_data).load(ck); });
  CHECK(m.find("marginal_probability of the checkpoint [0.1,0.1]") != std::string::npos);
  std::filesystem::remove_all(dir);
  using Tr = tr::Trainer<float, 2>;
  for (const std::vector<double>& w :
       {std::vector<double>{0.1}, std::vector<double>{-0.1, 0.0},
        std::vector<double>{std::nan(""), 0.0}, std::vector<double>{0.0, 1.5}}) {
    auto ob = options(4);
    ob.marginal_probability = w;
    const std::string mb = ud::testing::message_of([&] { Tr(net, ob, pattern_data); });
    CAPTURE(mb);
    CHECK(mb.find("marginal_probability") != std::string::npos);
  }
}

TEST_CASE("min-SNR level weighting: the weight, the objective it changes, a resume under another") {
  const auto sched = ud::DiscreteSchedule::stable_diffusion();
  for (std::int64_t n : {1, 50, 150, 200, 500, 1000}) {
    const double a = sched.abar(static_cast<int>(n)), snr = a / (1 - a);
    CAPTURE(n);
    CHECK(tr::min_snr_weight(sched, n, 5.0) == doctest::Approx(std::min(snr, 5.0) / snr));
  }
  CHECK(tr::min_snr_weight(sched, 1000, 5.0) == 1.0);  // noisy levels keep weight 1
  CHECK(tr::min_snr_weight(sched, 1, 5.0) < 0.01);     // the clean end is down-weighted
  const auto cfg = tiny();
  auto step = [&](double gamma) {
    auto net = std::make_unique<nn::UViT<float>>(cfg);
    net->init_random(4, 0.02);
    auto o = options(16);
    o.clip_norm = 0;  // the raw gradient stays in net.gradients() after the step
    o.keep_gradients = true;
    o.min_snr_gamma = gamma;
    tr::Trainer<float, 2> t(*net, o, pattern_data);
    const auto log = t.step(ud::Context<ud::cpu>{});
    return std::pair{log, values(net->gradients())};
  };
  const auto [l0, g0] = step(0.0);
  const auto [lbig, gbig] = step(1e30);  // min(SNR, gamma) / SNR = 1 exactly at every level
  const auto [l5, g5] = step(5.0);
  CHECK(lbig.loss == l0.loss);
  CHECK(gbig == g0);
  // the same forward: the plain group MSEs agree, the weighted objective and gradient do not
  CHECK(l5.group_mse == l0.group_mse);
  CHECK(l5.loss < l0.loss);  // weights <= 1, some < 1 among 16 x 2 uniform levels
  CHECK(g5 != g0);
  // part of the run's identity, and bad values are named
  nn::UViT<float> net(cfg);
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_minsnr_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "t.safetensors").string();
  auto o = options(4);
  o.min_snr_gamma = 5;
  tr::Trainer<float, 2>(net, o, pattern_data).save(ck);
  tr::Trainer<float, 2>(net, o, pattern_data).load(ck);
  o.min_snr_gamma = 0;
  CHECK(ud::testing::message_of([&] {
          tr::Trainer<float, 2>(net, o, pattern_data).load(ck);
        }).find("min_snr_gamma of the checkpoint") != std::string::npos);
  std::filesystem::remove_all(dir);
  for (double bad : {-1.0, std::nan(""), static_cast<double>(INFINITY)}) {
    o.min_snr_gamma = bad;
    CHECK(ud::testing::message_of([&] {
            tr::Trainer<float, 2>(net, o, pattern_data);
          }).find("min_snr_gamma") != std::string::npos);
  }
}

TEST_CASE("training schedule: the official betas by default, others change the forward process") {
  const auto cfg = tiny();
  auto step = [&](std::vector<double> betas) {
    auto net = std::make_unique<nn::UViT<float>>(cfg);
    net->init_random(4, 0.02);
    auto o = options(16);
    o.clip_norm = 0;
    o.keep_gradients = true;
    o.betas = std::move(betas);
    tr::Trainer<float, 2> t(*net, o, pattern_data);
    const auto log = t.step(ud::Context<ud::cpu>{});
    return std::pair{log, values(net->gradients())};
  };
  const auto [l0, g0] = step({});
  const auto [lsd, gsd] = step(ud::scaled_linear_betas());  // spelled out: the same run
  const auto [llin, glin] = step(ud::linear_betas());
  CHECK(lsd.loss == l0.loss);
  CHECK(gsd == g0);
  CHECK(llin.group_mse != l0.group_mse);  // same levels and noise, other abar_n
  CHECK(glin != g0);
  // part of the run's identity; wrong lengths and bad betas are named
  nn::UViT<float> net(cfg);
  const auto dir =
      std::filesystem::temp_directory_path() / ("ud_betas_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string ck = (dir / "t.safetensors").string();
  auto o = options(4);
  o.betas = ud::linear_betas();
  tr::Trainer<float, 2>(net, o, pattern_data).save(ck);
  tr::Trainer<float, 2>(net, o, pattern_data).load(ck);
  o.betas = {};
  CHECK(ud::testing::message_of([&] {
          tr::Trainer<float, 2>(net, o, pattern_data).load(ck);
        }).find("training schedule (betas) differs") != std::string::npos);
  std::filesystem::remove_all(dir);
  o.betas = ud::linear_betas(500);
  const std::string ml =
      ud::testing::message_of([&] { tr::Trainer<float, 2>(net, o, pattern_data); });
  CAPTURE(ml);
  CHECK(ml.find("betas") != std::string::npos);
  CHECK(ml.find("500") != std::string::npos);
  o.betas = ud::linear_betas();
  o.betas[7] = 1.5;
  CHECK(ud::testing::message_of([&] {
          tr::Trainer<float, 2>(net, o, pattern_data);
        }).find("betas[7]") != std::string::npos);
  o.betas = {};
  o.levels = 1001;  // more levels than the official schedule has
  CHECK(ud::testing::message_of([&] {
          tr::Trainer<float, 2>(net, o, pattern_data);
        }).find("levels") != std::string::npos);
}
