// SPDX-License-Identifier: Apache-2.0
// The primitives of the reference backend (backend/reference/ops.hpp and nn.hpp):
//  * their gradients against central finite differences in double (h = 1e-6; the largest
//    |finite difference - analytic| over all elements must be <= 1e-6 max |analytic|), at odd
//    sizes, plus forward values against hand computations and known PyTorch outputs;
//  * the element-wise ops against backend/cpu/ops.hpp, the timestep embedding bit for bit against
//    the original float32 / float64 recipe (a verbatim copy of the pre-backend function);
//  * the agreement of the CPU backend's network primitives (backend/cpu/nn.hpp, same
//    signatures over Context<cpu>) with them, forward and backward, float and double, at shapes
//    including odd head dims, L = 1, 7, 37 and padded leading dimensions / sample strides.
//    Tolerance: max |cpu - reference| <= rtol * max |reference| per output, rtol = 1e-12 for
//    double and 5e-6 for float (the reference rounds once from double; a float kernel carries a
//    few ulps of accumulated rounding relative to the largest output: measured at most 5.6e-7
//    for float, 1e-15 for double). Data movement (patchify, copy, gather, add_rows, timestep
//    embedding) must agree exactly. Padding (NaN) must be neither read into results nor written.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "support.hpp"
#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/backend/reference/nn.hpp"
#include "unidiffuser/backend/reference/ops.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"

#if __has_include("unidiffuser/backend/cpu/nn.hpp")
#include "unidiffuser/backend/cpu/nn.hpp"
#define UNIDIFFUSER_TEST_CPU_NN 1
#else
#define UNIDIFFUSER_TEST_CPU_NN 0
#endif

namespace {

using namespace unidiffuser;
using ops::Epilogue;
using ops::ImageGeom;
using R = unidiffuser::reference;
using unidiffuser::testing::message_of;

// ---- host buffers viewed by either backend -------------------------------------------------

//! [samples; rows, cols] in a std::vector with rows `ld` apart and samples `stride` apart; the
//! padding holds NaN (a kernel that reads it into a result, or writes it, is caught).
template <class T>
struct Buf {
  std::int64_t samples = 0, rows = 0, cols = 0, ld = 0, stride = 0;
  std::vector<T> v;

  Buf() = default;
  Buf(std::int64_t s, std::int64_t r, std::int64_t c, std::int64_t pad_ld = 0,
      std::int64_t pad_stride = 0)
      : samples(s), rows(r), cols(c), ld(c + pad_ld), stride(r * (c + pad_ld) + pad_stride) {
    v.assign(static_cast<std::size_t>(std::max<std::int64_t>(1, s * stride)),
             std::numeric_limits<T>::quiet_NaN());
    fill(0);
  }
  static bool logical_index(const Buf& b, std::size_t f, std::int64_t& s, std::int64_t& i,
                            std::int64_t& j) {
    const auto k = static_cast<std::int64_t>(f);
    if (b.stride == 0) return false;
    s = k / b.stride;
    const std::int64_t rem = k % b.stride;
    i = rem / b.ld;
    j = rem % b.ld;
    return s < b.samples && i < b.rows && j < b.cols;
  }
  T& at(std::int64_t s, std::int64_t i, std::int64_t j) {
    return v[static_cast<std::size_t>(s * stride + i * ld + j)];
  }
  const T& at(std::int64_t s, std::int64_t i, std::int64_t j) const {
    return v[static_cast<std::size_t>(s * stride + i * ld + j)];
  }
  template <class F>
  void each(F&& f) {
    for (std::int64_t s = 0; s < samples; ++s)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) f(at(s, i, j));
  }
  template <class F>
  void each(F&& f) const {
    for (std::int64_t s = 0; s < samples; ++s)
      for (std::int64_t i = 0; i < rows; ++i)
        for (std::int64_t j = 0; j < cols; ++j) f(at(s, i, j));
  }
  void fill(T x) {
    each([&](T& e) { e = x; });
  }
  template <class Rng>
  void randomize(Rng& rng, double lo = -1, double hi = 1) {
    std::uniform_real_distribution<double> d(lo, hi);
    each([&](T& e) { e = static_cast<T>(d(rng)); });
  }
  double max_abs() const {
    double m = 0;
    each([&](const T& e) { m = std::max(m, std::abs(static_cast<double>(e))); });
    return m;
  }
  bool padding_intact() const {
    for (std::size_t f = 0; f < v.size(); ++f) {
      std::int64_t s, i, j;
      if (!logical_index(*this, f, s, i, j) && !std::isnan(static_cast<double>(v[f]))) return false;
    }
    return true;
  }
  T* ptr() { return v.data(); }
  const T* ptr() const { return v.data(); }
};

template <class B, class T>
BatchBlock<T, B> batch(Buf<T>& b) {
  return BatchBlock<T, B>(b.v.data(), b.samples, b.rows, b.cols, b.ld, b.stride);
}
template <class B, class T>
BatchBlock<const T, B> cbatch(const Buf<T>& b) {
  return BatchBlock<const T, B>(b.v.data(), b.samples, b.rows, b.cols, b.ld, b.stride);
}
template <class B, class T>
RowBlock<T, B> rows(Buf<T>& b) {
  REQUIRE(b.samples == 1);
  return RowBlock<T, B>(b.v.data(), b.rows, b.cols, b.ld);
}
template <class B, class T>
RowBlock<const T, B> crows(const Buf<T>& b) {
  REQUIRE(b.samples == 1);
  return RowBlock<const T, B>(b.v.data(), b.rows, b.cols, b.ld);
}

template <class T>
double dot(const Buf<T>& a, const Buf<T>& b) {
  REQUIRE(a.samples == b.samples);
  REQUIRE(a.rows == b.rows);
  REQUIRE(a.cols == b.cols);
  double acc = 0;
  for (std::int64_t s = 0; s < a.samples; ++s)
    for (std::int64_t i = 0; i < a.rows; ++i)
      for (std::int64_t j = 0; j < a.cols; ++j)
        acc += static_cast<double>(a.at(s, i, j)) * static_cast<double>(b.at(s, i, j));
  return acc;
}

//! max |got - want| over the logical elements, and the padding of `got` untouched.
template <class T>
void expect_close(const std::string& what, const Buf<T>& want, const Buf<T>& got, double rtol) {
  REQUIRE(want.samples == got.samples);
  REQUIRE(want.rows == got.rows);
  REQUIRE(want.cols == got.cols);
  double err = 0;
  bool nonfinite = false;
  for (std::int64_t s = 0; s < want.samples; ++s)
    for (std::int64_t i = 0; i < want.rows; ++i)
      for (std::int64_t j = 0; j < want.cols; ++j) {
        const double a = static_cast<double>(want.at(s, i, j));
        const double b = static_cast<double>(got.at(s, i, j));
        if (!std::isfinite(a) || !std::isfinite(b)) nonfinite = true;
        err = std::max(err, std::abs(a - b));
      }
  const double scale = want.max_abs();
  INFO(what << ": max |diff| = " << err << ", max |want| = " << scale
            << ", relative = " << (scale > 0 ? err / scale : err) << ", rtol = " << rtol);
  CHECK_FALSE(nonfinite);
  CHECK(err <= rtol * scale);
  CHECK(got.padding_intact());
}

//! Central differences of loss() in every logical element of p against grad (p's layout).
template <class F>
void check_gradient(const std::string& what, Buf<double>& p, const Buf<double>& grad, F&& loss) {
  REQUIRE(p.samples == grad.samples);
  REQUIRE(p.rows == grad.rows);
  REQUIRE(p.cols == grad.cols);
  const double h = 1e-6;
  const double gmax = grad.max_abs();
  double worst = 0;
  for (std::int64_t s = 0; s < p.samples; ++s)
    for (std::int64_t i = 0; i < p.rows; ++i)
      for (std::int64_t j = 0; j < p.cols; ++j) {
        double& e = p.at(s, i, j);
        const double saved = e;
        e = saved + h;
        const double lp = loss();
        e = saved - h;
        const double lm = loss();
        e = saved;
        const double fd = (lp - lm) / (2 * h);
        worst = std::max(worst, std::abs(fd - grad.at(s, i, j)));
      }
  INFO(what << ": max |fd - analytic| = " << worst << ", max |analytic| = " << gmax);
  CHECK(gmax > 0);
  CHECK(worst <= 1e-6 * gmax);
}

const Context<R> rctx{};

// ---- reference ops.hpp -------------------------------------------------------------------------

TEST_CASE("reference ops: fill, copy, lincomb, axpby_rows, squared_error_rows, all_finite") {
  std::mt19937_64 rng(11);
  Buf<double> a(1, 3, 5, 2), b(1, 3, 5, 1), c(1, 3, 5, 3), d(1, 3, 5);
  a.randomize(rng);
  b.randomize(rng);
  c.randomize(rng);
  ops::fill<double>(rctx, rows<R>(d), 2.5);
  d.each([](const double& e) { CHECK(e == 2.5); });
  CHECK(d.padding_intact());

  ops::copy<double>(rctx, crows<R>(a), rows<R>(d));
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 5; ++j) CHECK(d.at(0, i, j) == a.at(0, i, j));
  CHECK(d.padding_intact());

  ops::lincomb<double>(rctx, rows<R>(d),
                       {{0.5, crows<R>(a)}, {-2.0, crows<R>(b)}, {0.25, crows<R>(c)}});
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 5; ++j)
      CHECK(d.at(0, i, j) ==
            doctest::Approx(0.5 * a.at(0, i, j) - 2.0 * b.at(0, i, j) + 0.25 * c.at(0, i, j))
                .epsilon(1e-15));
  // in place: d = 2 d
  Buf<double> d0 = d;
  ops::lincomb<double>(rctx, rows<R>(d), {{2.0, crows<R>(d)}});
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 5; ++j) CHECK(d.at(0, i, j) == 2 * d0.at(0, i, j));
  CHECK(message_of([&] { ops::lincomb<double>(rctx, rows<R>(d), {}); }).find("ops::lincomb") == 0);
  Buf<double> wrong(1, 2, 5);
  CHECK(message_of([&] {
          ops::lincomb<double>(rctx, rows<R>(d), {{1.0, crows<R>(wrong)}});
        }).find("ops::lincomb: operands") == 0);

  // lincomb accumulates in double: float data, a sum that float arithmetic would round away
  Buf<float> f1(1, 1, 1), f2(1, 1, 1), fo(1, 1, 1);
  f1.at(0, 0, 0) = 1.0f;
  f2.at(0, 0, 0) = 1.0f;
  ops::lincomb<float>(rctx, rows<R>(fo),
                      {{1.0, crows<R>(f1)}, {1e-8, crows<R>(f2)}, {-1.0, crows<R>(f1)}});
  CHECK(fo.at(0, 0, 0) == doctest::Approx(1e-8).epsilon(1e-6));

  // TensorView forms
  std::vector<double> tv1{1, 2, 3, 4}, tv2{10, 20, 30, 40}, tvo(4);
  TensorView<const double, R> t1(tv1.data(), Shape{2, 2}), t2(tv2.data(), Shape{2, 2});
  TensorView<double, R> to(tvo.data(), Shape{2, 2});
  ops::lincomb<double>(rctx, to, {{1.0, t1}, {0.5, t2}});
  CHECK(tvo == std::vector<double>{6, 12, 18, 24});
  ops::copy<double>(rctx, t1, to);
  CHECK(tvo == tv1);
  ops::fill<double>(rctx, to, -1.0);
  CHECK(tvo == std::vector<double>{-1, -1, -1, -1});

  const double ca[3] = {0.5, -1, 2}, cb[3] = {3, 0.25, -0.5};
  ops::axpby_rows<double>(rctx, rows<R>(d), ca, crows<R>(a), cb, crows<R>(b));
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 5; ++j)
      CHECK(d.at(0, i, j) == ca[i] * a.at(0, i, j) + cb[i] * b.at(0, i, j));

  double se[3];
  ops::squared_error_rows<double>(rctx, crows<R>(a), crows<R>(b), se);
  for (std::int64_t i = 0; i < 3; ++i) {
    double want = 0;
    for (std::int64_t j = 0; j < 5; ++j)
      want += (a.at(0, i, j) - b.at(0, i, j)) * (a.at(0, i, j) - b.at(0, i, j));
    CHECK(se[i] == doctest::Approx(want).epsilon(1e-15));
  }
  CHECK(ops::all_finite<double>(rctx, crows<R>(a)));  // NaN padding is not looked at
  a.at(0, 2, 4) = std::numeric_limits<double>::infinity();
  CHECK_FALSE(ops::all_finite<double>(rctx, crows<R>(a)));
}

TEST_CASE("reference ops: random_normal is the Philox noise, like the CPU backend") {
  Buf<float> r(1, 3, 11, 2), c(1, 3, 11, 2);
  Buf<double> rd(1, 3, 11, 1);
  const NoiseKey key{1234, 7};
  ops::random_normal<float>(rctx, rows<R>(r), key, 5);
  ops::random_normal<double>(rctx, rows<R>(rd), key, 5);
  ops::random_normal<float>(Context<cpu>{}, rows<cpu>(c), key, 5);
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 11; ++j) {
      const float want = philox_normal(key.seed, key.stream, 5 + static_cast<std::uint64_t>(i),
                                       static_cast<std::uint64_t>(j));
      CHECK(r.at(0, i, j) == want);
      CHECK(c.at(0, i, j) == want);
      CHECK(rd.at(0, i, j) == static_cast<double>(want));
    }
  CHECK(r.padding_intact());
}

TEST_CASE_TEMPLATE("reference ops agree with the CPU ops", T, float, double) {
  std::mt19937_64 rng(5);
  const double rtol = std::is_same_v<T, double> ? 1e-12 : 5e-6;
  Buf<T> a(1, 7, 37, 3), b(1, 7, 37, 1), c(1, 7, 37, 0);
  a.randomize(rng);
  b.randomize(rng);
  c.randomize(rng);
  const Context<cpu> cctx{};
  for (int n = 1; n <= 6; ++n) {
    Buf<T> dr(1, 7, 37, 2), dc(1, 7, 37, 2);
    const double k[6] = {0.3, -1.7, 2.25, 0.1, -0.6, 1.3};
    auto run = [&]<class B>(B, Buf<T>& d) {
      const Context<B> ctx{};
      const ops::Term<T, B> t[6] = {{k[0], crows<B>(a)}, {k[1], crows<B>(b)}, {k[2], crows<B>(c)},
                                    {k[3], crows<B>(a)}, {k[4], crows<B>(b)}, {k[5], crows<B>(c)}};
      switch (n) {
        case 1: return ops::lincomb<T>(ctx, rows<B>(d), {t[0]});
        case 2: return ops::lincomb<T>(ctx, rows<B>(d), {t[0], t[1]});
        case 3: return ops::lincomb<T>(ctx, rows<B>(d), {t[0], t[1], t[2]});
        case 4: return ops::lincomb<T>(ctx, rows<B>(d), {t[0], t[1], t[2], t[3]});
        case 5: return ops::lincomb<T>(ctx, rows<B>(d), {t[0], t[1], t[2], t[3], t[4]});
        default: return ops::lincomb<T>(ctx, rows<B>(d), {t[0], t[1], t[2], t[3], t[4], t[5]});
      }
    };
    run(R{}, dr);
    run(cpu{}, dc);
    expect_close("lincomb of " + std::to_string(n), dr, dc, rtol);
  }
  std::vector<double> ca(7), cb(7);
  for (int i = 0; i < 7; ++i) {
    ca[static_cast<std::size_t>(i)] = 0.1 * i - 0.3;
    cb[static_cast<std::size_t>(i)] = 1.0 / (i + 1);
  }
  Buf<T> dr(1, 7, 37, 2), dc(1, 7, 37, 2);
  ops::axpby_rows<T>(rctx, rows<R>(dr), ca.data(), crows<R>(a), cb.data(), crows<R>(b));
  ops::axpby_rows<T>(cctx, rows<cpu>(dc), ca.data(), crows<cpu>(a), cb.data(), crows<cpu>(b));
  expect_close("axpby_rows", dr, dc, 0.0);  // the same double formula, one rounding
  std::vector<double> sr(7), sc(7);
  ops::squared_error_rows<T>(rctx, crows<R>(a), crows<R>(b), sr.data());
  ops::squared_error_rows<T>(cctx, crows<cpu>(a), crows<cpu>(b), sc.data());
  CHECK(sr == sc);
  ops::copy<T>(rctx, crows<R>(a), rows<R>(dr));
  ops::copy<T>(cctx, crows<cpu>(a), rows<cpu>(dc));
  expect_close("copy", dr, dc, 0.0);
  ops::fill<T>(rctx, rows<R>(dr), T(3));
  ops::fill<T>(cctx, rows<cpu>(dc), T(3));
  expect_close("fill", dr, dc, 0.0);
  CHECK(ops::all_finite<T>(rctx, crows<R>(a)) == ops::all_finite<T>(cctx, crows<cpu>(a)));
}

// ---- finite-difference checks of the reference backward primitives (double) --------------------

TEST_CASE("reference linear: values, epilogues and gradients") {
  std::mt19937_64 rng(1);
  const std::int64_t S = 2, m = 5, k = 7, n = 3;
  Buf<double> x(S, m, k, 2, 3), w(1, n, k, 1), b(1, 1, n), wy(S, m, n, 1, 1);
  x.randomize(rng);
  w.randomize(rng);
  b.randomize(rng);
  wy.randomize(rng);

  Buf<double> y(S, m, n, 1, 2);
  ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(y), Epilogue::none);
  CHECK(y.padding_intact());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double want = b.at(0, 0, j);
        for (std::int64_t l = 0; l < k; ++l) want += x.at(s, i, l) * w.at(0, j, l);
        CHECK(y.at(s, i, j) == doctest::Approx(want).epsilon(1e-14));
      }
  // gelu epilogue = gelu of the none result; accumulate = old + none result; no bias
  Buf<double> yg(S, m, n), ya(S, m, n, 2), y0(S, m, n, 2), ynb(S, m, n);
  ya.randomize(rng);
  y0 = ya;
  ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(yg), Epilogue::gelu);
  ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(ya), Epilogue::accumulate);
  ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), static_cast<const double*>(nullptr),
                      batch<R>(ynb), Epilogue::none);
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        const double u = y.at(s, i, j);
        CHECK(yg.at(s, i, j) ==
              doctest::Approx(0.5 * u * (1 + std::erf(u / std::sqrt(2.0)))).epsilon(1e-14));
        CHECK(ya.at(s, i, j) == doctest::Approx(y0.at(s, i, j) + u).epsilon(1e-14));
        CHECK(ynb.at(s, i, j) == doctest::Approx(u - b.at(0, 0, j)).epsilon(1e-13));
      }

  for (Epilogue ep : {Epilogue::none, Epilogue::gelu}) {
    CAPTURE(static_cast<int>(ep));
    auto loss = [&] {
      Buf<double> out(S, m, n, 1, 2);
      ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(out), ep);
      return dot(wy, out);
    };
    Buf<double> du = wy;
    if (ep == Epilogue::gelu) {
      Buf<double> u(S, m, n, 1, 2);
      ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(u), Epilogue::none);
      ops::gelu_backward<double>(rctx, cbatch<R>(u), cbatch<R>(wy), batch<R>(du));
    }
    Buf<double> dx(S, m, k, 1, 1), dw(1, n, k, 2), db(1, 1, n);
    ops::linear_backward<double>(rctx, cbatch<R>(x), crows<R>(w), cbatch<R>(du), batch<R>(dx),
                                 false, rows<R>(dw), db.ptr());
    CHECK(dx.padding_intact());
    CHECK(dw.padding_intact());
    check_gradient("linear dx", x, dx, loss);
    check_gradient("linear dw", w, dw, loss);
    check_gradient("linear db", b, db, loss);

    // += semantics: dx with accumulate_dx, dw and db always
    Buf<double> dx2(S, m, k, 1, 1), dw2(1, n, k, 2), db2(1, 1, n);
    dx2.randomize(rng);
    dw2.randomize(rng);
    db2.randomize(rng);
    const Buf<double> dx20 = dx2, dw20 = dw2, db20 = db2;
    ops::linear_backward<double>(rctx, cbatch<R>(x), crows<R>(w), cbatch<R>(du), batch<R>(dx2),
                                 true, rows<R>(dw2), db2.ptr());
    auto check_sum = [](const Buf<double>& got, const Buf<double>& a, const Buf<double>& g) {
      for (std::int64_t s = 0; s < got.samples; ++s)
        for (std::int64_t i = 0; i < got.rows; ++i)
          for (std::int64_t j = 0; j < got.cols; ++j)
            CHECK(got.at(s, i, j) == doctest::Approx(a.at(s, i, j) + g.at(s, i, j)).epsilon(1e-14));
    };
    check_sum(dx2, dx20, dx);
    check_sum(dw2, dw20, dw);
    check_sum(db2, db20, db);
    // dx only: x absent, dw and db not wanted
    Buf<double> dx3(S, m, k);
    ops::linear_backward<double>(rctx, BatchBlock<const double, R>{}, crows<R>(w), cbatch<R>(du),
                                 batch<R>(dx3), false, RowBlock<double, R>{},
                                 static_cast<double*>(nullptr));
    expect_close("dx alone", dx, dx3, 0.0);
  }
  CHECK(message_of([&] {
          Buf<double> bad(S, m, n + 1);
          ops::linear<double>(rctx, cbatch<R>(x), crows<R>(w), b.ptr(), batch<R>(bad),
                              Epilogue::none);
        }).find("ops::linear: y") == 0);
  CHECK(message_of([&] {
          Buf<double> bad(1, n, k + 1);
          ops::linear<double>(rctx, cbatch<R>(x), crows<R>(bad), b.ptr(), batch<R>(y),
                              Epilogue::none);
        }).find("ops::linear: w") == 0);
  CHECK(message_of([&] {
          Buf<double> dx(S, m, k);
          ops::linear_backward<double>(rctx, BatchBlock<const double, R>{}, crows<R>(w),
                                       cbatch<R>(wy), batch<R>(dx), false, rows<R>(w),
                                       static_cast<double*>(nullptr));
        }).find("ops::linear_backward: x") == 0);
}

TEST_CASE("reference gelu and silu: values and gradients, in place") {
  std::mt19937_64 rng(2);
  Buf<double> u(2, 3, 5, 1, 2), wy(2, 3, 5);
  u.randomize(rng, -3, 3);
  wy.randomize(rng);
  u.at(0, 0, 0) = 1.0;
  u.at(0, 0, 1) = -1.0;
  u.at(0, 0, 2) = 0.0;
  Buf<double> y(2, 3, 5, 2);
  ops::gelu<double>(rctx, cbatch<R>(u), batch<R>(y));
  CHECK(y.at(0, 0, 0) == doctest::Approx(0.8413447460685429).epsilon(1e-15));
  CHECK(y.at(0, 0, 1) == doctest::Approx(-0.15865525393145707).epsilon(1e-15));
  CHECK(y.at(0, 0, 2) == 0.0);
  CHECK(y.padding_intact());
  ops::silu<double>(rctx, cbatch<R>(u), batch<R>(y));
  CHECK(y.at(0, 0, 0) == doctest::Approx(0.7310585786300049).epsilon(1e-15));
  CHECK(y.at(0, 0, 1) == doctest::Approx(-0.2689414213699951).epsilon(1e-15));

  for (int which = 0; which < 2; ++which) {
    CAPTURE(which);
    auto fwd = [&](const Buf<double>& in, Buf<double>& out) {
      if (which == 0)
        ops::gelu<double>(rctx, cbatch<R>(in), batch<R>(out));
      else
        ops::silu<double>(rctx, cbatch<R>(in), batch<R>(out));
    };
    auto bwd = [&](const Buf<double>& dy, Buf<double>& du) {
      if (which == 0)
        ops::gelu_backward<double>(rctx, cbatch<R>(u), cbatch<R>(dy), batch<R>(du));
      else
        ops::silu_backward<double>(rctx, cbatch<R>(u), cbatch<R>(dy), batch<R>(du));
    };
    auto loss = [&] {
      Buf<double> out(2, 3, 5);
      fwd(u, out);
      return dot(wy, out);
    };
    Buf<double> du(2, 3, 5, 3);
    bwd(wy, du);
    check_gradient(which == 0 ? "gelu" : "silu", u, du, loss);
    // du = dy in place, y = u in place
    Buf<double> inplace = wy;
    bwd(inplace, inplace);
    expect_close("backward in place", du, inplace, 0.0);
    Buf<double> yo(2, 3, 5), ui = u;
    fwd(u, yo);
    fwd(ui, ui);
    expect_close("forward in place", yo, ui, 0.0);
  }
}

TEST_CASE("reference layer_norm: values, stats, in place and gradients") {
  std::mt19937_64 rng(3);
  const std::int64_t S = 2, m = 3, n = 7;
  Buf<double> x(S, m, n, 1, 2), r(S, m, n, 2), g(1, 1, n), b(1, 1, n), wy(S, m, n);
  x.randomize(rng);
  r.randomize(rng);
  g.randomize(rng, 0.5, 1.5);
  b.randomize(rng);
  wy.randomize(rng);
  Buf<double> y(S, m, n, 3), st(S, m, 2, 1, 1);
  ops::layer_norm<double>(rctx, cbatch<R>(x), cbatch<R>(r), g.ptr(), b.ptr(), batch<R>(y),
                          batch<R>(st));
  CHECK(y.padding_intact());
  CHECK(st.padding_intact());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i) {
      double mean = 0, var = 0;
      for (std::int64_t j = 0; j < n; ++j) mean += x.at(s, i, j) + r.at(s, i, j);
      mean /= n;
      for (std::int64_t j = 0; j < n; ++j) {
        const double d = x.at(s, i, j) + r.at(s, i, j) - mean;
        var += d * d;
      }
      var /= n;
      const double rstd = 1 / std::sqrt(var + 1e-5);
      CHECK(st.at(s, i, 0) == doctest::Approx(mean).epsilon(1e-14));
      CHECK(st.at(s, i, 1) == doctest::Approx(rstd).epsilon(1e-14));
      for (std::int64_t j = 0; j < n; ++j)
        CHECK(y.at(s, i, j) ==
              doctest::Approx((x.at(s, i, j) + r.at(s, i, j) - mean) * rstd * g.at(0, 0, j) +
                              b.at(0, 0, j))
                  .epsilon(1e-13));
    }
  // y = x in place, no residual, no stats
  Buf<double> yn(S, m, n), xi = x;
  ops::layer_norm<double>(rctx, cbatch<R>(x), BatchBlock<const double, R>{}, g.ptr(), b.ptr(),
                          batch<R>(yn), BatchBlock<double, R>{});
  ops::layer_norm<double>(rctx, cbatch<R>(xi), BatchBlock<const double, R>{}, g.ptr(), b.ptr(),
                          batch<R>(xi), BatchBlock<double, R>{});
  expect_close("layer_norm in place", yn, xi, 0.0);

  for (bool residual : {true, false}) {
    CAPTURE(residual);
    const BatchBlock<const double, R> rb = residual ? cbatch<R>(r) : BatchBlock<const double, R>{};
    auto loss = [&] {
      Buf<double> out(S, m, n);
      ops::layer_norm<double>(rctx, cbatch<R>(x),
                              residual ? cbatch<R>(r) : BatchBlock<const double, R>{}, g.ptr(),
                              b.ptr(), batch<R>(out), BatchBlock<double, R>{});
      return dot(wy, out);
    };
    Buf<double> stats(S, m, 2);
    ops::layer_norm<double>(rctx, cbatch<R>(x), rb, g.ptr(), b.ptr(), batch<R>(y), batch<R>(stats));
    Buf<double> dz(S, m, n, 1, 1), dg(1, 1, n), db(1, 1, n);
    dg.randomize(rng);
    db.randomize(rng);
    const Buf<double> dg0 = dg, db0 = db;
    ops::layer_norm_backward<double>(rctx, cbatch<R>(x), rb, g.ptr(), cbatch<R>(stats),
                                     cbatch<R>(wy), batch<R>(dz), dg.ptr(), db.ptr());
    CHECK(dz.padding_intact());
    Buf<double> dgd(1, 1, n), dbd(1, 1, n);  // the increments
    for (std::int64_t j = 0; j < n; ++j) {
      dgd.at(0, 0, j) = dg.at(0, 0, j) - dg0.at(0, 0, j);
      dbd.at(0, 0, j) = db.at(0, 0, j) - db0.at(0, 0, j);
    }
    check_gradient("layer_norm dx", x, dz, loss);
    if (residual) check_gradient("layer_norm dr", r, dz, loss);
    check_gradient("layer_norm dg", g, dgd, loss);
    check_gradient("layer_norm db", b, dbd, loss);
    // dz = dy in place, no stats, dg and db not wanted
    Buf<double> inplace = wy;
    ops::layer_norm_backward<double>(rctx, cbatch<R>(x), rb, g.ptr(), BatchBlock<const double, R>{},
                                     cbatch<R>(inplace), batch<R>(inplace),
                                     static_cast<double*>(nullptr), static_cast<double*>(nullptr));
    expect_close("layer_norm_backward in place", dz, inplace, 0.0);
  }
  CHECK(message_of([&] {
          Buf<double> bad(S, m, 3);
          ops::layer_norm<double>(rctx, cbatch<R>(x), cbatch<R>(r), g.ptr(), b.ptr(), batch<R>(y),
                                  batch<R>(bad));
        }).find("ops::layer_norm: stats") == 0);
}

TEST_CASE("reference attention: values and gradients") {
  std::mt19937_64 rng(4);
  const std::int64_t S = 2, L = 7, heads = 2, dh = 3, E = heads * dh;
  Buf<double> qkv(S, L, 3 * E, 2, 3), wy(S, L, E);
  qkv.randomize(rng, -1.5, 1.5);
  wy.randomize(rng);
  Buf<double> out(S, L, E, 1, 1);
  ops::attention<double>(rctx, cbatch<R>(qkv), heads, batch<R>(out));
  CHECK(out.padding_intact());
  // direct formula for one (sample, head, query)
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < L; ++i) {
        std::vector<double> p(L);
        double sum = 0;
        for (std::int64_t j = 0; j < L; ++j) {
          double a = 0;
          for (std::int64_t d = 0; d < dh; ++d)
            a += qkv.at(s, i, h * dh + d) * qkv.at(s, j, E + h * dh + d);
          p[static_cast<std::size_t>(j)] = std::exp(a / std::sqrt(3.0));
          sum += p[static_cast<std::size_t>(j)];
        }
        for (std::int64_t d = 0; d < dh; ++d) {
          double o = 0;
          for (std::int64_t j = 0; j < L; ++j)
            o += p[static_cast<std::size_t>(j)] / sum * qkv.at(s, j, 2 * E + h * dh + d);
          CHECK(out.at(s, i, h * dh + d) == doctest::Approx(o).epsilon(1e-13));
        }
      }
  // L = 1: out = v
  Buf<double> one(1, 1, 3 * E), o1(1, 1, E);
  one.randomize(rng);
  ops::attention<double>(rctx, cbatch<R>(one), heads, batch<R>(o1));
  for (std::int64_t c = 0; c < E; ++c)
    CHECK(o1.at(0, 0, c) == doctest::Approx(one.at(0, 0, 2 * E + c)).epsilon(1e-15));

  auto loss = [&] {
    Buf<double> o(S, L, E);
    ops::attention<double>(rctx, cbatch<R>(qkv), heads, batch<R>(o));
    return dot(wy, o);
  };
  Buf<double> dqkv(S, L, 3 * E, 1, 2);
  ops::attention_backward<double>(rctx, cbatch<R>(qkv), heads, cbatch<R>(wy), batch<R>(dqkv));
  CHECK(dqkv.padding_intact());
  check_gradient("attention dqkv", qkv, dqkv, loss);
  CHECK(message_of([&] {
          ops::attention<double>(rctx, cbatch<R>(qkv), 4, batch<R>(out));
        }).find("ops::attention: qkv") == 0);
  CHECK(message_of([&] {
          Buf<double> bad(S, L, E + 1);
          ops::attention<double>(rctx, cbatch<R>(qkv), heads, batch<R>(bad));
        }).find("ops::attention: out") == 0);
}

TEST_CASE("reference patchify and unpatchify: layout and gradients") {
  std::mt19937_64 rng(5);
  for (const ImageGeom g : {ImageGeom{3, 6, 6, 2}, ImageGeom{3, 6, 6, 3}, ImageGeom{2, 6, 9, 3}}) {
    CAPTURE(g.patch);
    CAPTURE(g.width);
    const std::int64_t S = 2, p = g.patch, gw = g.width / p;
    Buf<double> img(S, 1, g.numel(), 1, 2), cols(S, g.tokens(), g.features(), 2, 1);
    img.randomize(rng);
    ops::patchify<double>(rctx, cbatch<R>(img), g, batch<R>(cols));
    CHECK(cols.padding_intact());
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t u = 0; u < g.height / p; ++u)
        for (std::int64_t v = 0; v < gw; ++v)
          for (std::int64_t ch = 0; ch < g.channels; ++ch)
            for (std::int64_t i = 0; i < p; ++i)
              for (std::int64_t k = 0; k < p; ++k)
                CHECK(cols.at(s, u * gw + v, (ch * p + i) * p + k) ==
                      img.at(s, 0, (ch * g.height + u * p + i) * g.width + v * p + k));
    Buf<double> y(S, g.tokens(), g.features(), 1), im2(S, 1, g.numel(), 3);
    y.randomize(rng);
    ops::unpatchify<double>(rctx, cbatch<R>(y), g, batch<R>(im2));
    CHECK(im2.padding_intact());
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t u = 0; u < g.height / p; ++u)
        for (std::int64_t v = 0; v < gw; ++v)
          for (std::int64_t ch = 0; ch < g.channels; ++ch)
            for (std::int64_t i = 0; i < p; ++i)
              for (std::int64_t k = 0; k < p; ++k)
                CHECK(im2.at(s, 0, (ch * g.height + u * p + i) * g.width + v * p + k) ==
                      y.at(s, u * gw + v, (i * p + k) * g.channels + ch));

    Buf<double> wc(S, g.tokens(), g.features()), wi(S, 1, g.numel());
    wc.randomize(rng);
    wi.randomize(rng);
    Buf<double> dimg(S, 1, g.numel(), 2), dy(S, g.tokens(), g.features(), 1, 1);
    ops::patchify_backward<double>(rctx, cbatch<R>(wc), g, batch<R>(dimg));
    ops::unpatchify_backward<double>(rctx, cbatch<R>(wi), g, batch<R>(dy));
    CHECK(dimg.padding_intact());
    CHECK(dy.padding_intact());
    check_gradient("patchify", img, dimg, [&] {
      Buf<double> o(S, g.tokens(), g.features());
      ops::patchify<double>(rctx, cbatch<R>(img), g, batch<R>(o));
      return dot(wc, o);
    });
    check_gradient("unpatchify", y, dy, [&] {
      Buf<double> o(S, 1, g.numel());
      ops::unpatchify<double>(rctx, cbatch<R>(y), g, batch<R>(o));
      return dot(wi, o);
    });
  }
  Buf<double> img(1, 1, 3 * 6 * 6), cols(1, 9, 12);
  CHECK(message_of([&] {
          ops::patchify<double>(rctx, cbatch<R>(img), ImageGeom{3, 6, 6, 4}, batch<R>(cols));
        }).find("ops::patchify: geometry") == 0);
  CHECK(message_of([&] {
          ops::patchify<double>(rctx, cbatch<R>(img), ImageGeom{3, 6, 6, 3}, batch<R>(cols));
        }).find("ops::patchify: cols") == 0);
}

TEST_CASE("reference bilinear_resize: PyTorch values, identity and gradients") {
  // F.interpolate(torch.tensor([[1., 2.], [3., 4.]])[None, None], size=(4, 4), mode='bilinear',
  // align_corners=False)
  Buf<double> src(1, 4, 1), dst(1, 16, 1, 1);
  for (int i = 0; i < 4; ++i) src.at(0, i, 0) = i + 1;
  ops::bilinear_resize<double>(rctx, crows<R>(src), 2, 2, 4, 4, rows<R>(dst));
  const double want[16] = {1.0, 1.25, 1.75, 2.0, 1.5, 1.75, 2.25, 2.5,
                           2.5, 2.75, 3.25, 3.5, 3.0, 3.25, 3.75, 4.0};
  for (int i = 0; i < 16; ++i) CHECK(dst.at(0, i, 0) == doctest::Approx(want[i]).epsilon(1e-15));
  CHECK(dst.padding_intact());

  std::mt19937_64 rng(6);
  {
    Buf<double> a(1, 12, 3, 1), o(1, 12, 3, 2);
    a.randomize(rng);
    ops::bilinear_resize<double>(rctx, crows<R>(a), 3, 4, 3, 4, rows<R>(o));
    expect_close("same size is the identity", a, o, 0.0);
  }
  struct Case {
    std::int64_t i0, i1, o0, o1, e;
  };
  for (const Case c : {Case{3, 3, 5, 4, 2}, Case{5, 4, 3, 3, 3}, Case{2, 3, 7, 2, 1}}) {
    CAPTURE(c.i0);
    CAPTURE(c.o0);
    Buf<double> a(1, c.i0 * c.i1, c.e, 1), w(1, c.o0 * c.o1, c.e);
    a.randomize(rng);
    w.randomize(rng);
    Buf<double> da(1, c.i0 * c.i1, c.e, 2), da0;
    da.randomize(rng);
    da0 = da;
    ops::bilinear_resize_backward<double>(rctx, crows<R>(w), c.i0, c.i1, c.o0, c.o1, rows<R>(da));
    CHECK(da.padding_intact());
    Buf<double> inc(1, c.i0 * c.i1, c.e);
    for (std::int64_t i = 0; i < inc.rows; ++i)
      for (std::int64_t j = 0; j < c.e; ++j) inc.at(0, i, j) = da.at(0, i, j) - da0.at(0, i, j);
    check_gradient("bilinear", a, inc, [&] {
      Buf<double> o(1, c.o0 * c.o1, c.e);
      ops::bilinear_resize<double>(rctx, crows<R>(a), c.i0, c.i1, c.o0, c.o1, rows<R>(o));
      return dot(w, o);
    });
  }
  CHECK(message_of([&] {
          ops::bilinear_resize<double>(rctx, crows<R>(src), 2, 3, 4, 4, rows<R>(dst));
        }).find("ops::bilinear_resize: src") == 0);
}

//! nn::timestep_embedding as it was before the backends (git HEAD of nn/time_embedding.hpp),
//! verbatim: the float32 recipe of the reference model, step by step.
template <class T>
void original_timestep_embedding(const T* t, std::int64_t batch_size, T* out, std::int64_t dim,
                                 double max_period = 10000.0) {
  const std::int64_t half = dim / 2;
  for (std::int64_t b = 0; b < batch_size; ++b) {
    const T tb = t[b];
    T* o = out + b * dim;
    for (std::int64_t k = 0; k < half; ++k) {
      const T q = static_cast<T>(static_cast<T>(-std::log(static_cast<T>(max_period))) *
                                 static_cast<T>(k)) /
                  static_cast<T>(half);
      const T f = static_cast<T>(std::exp(q));
      const T a = static_cast<T>(tb * f);
      o[k] = static_cast<T>(std::cos(static_cast<double>(a)));
      o[half + k] = static_cast<T>(std::sin(static_cast<double>(a)));
    }
    if (dim % 2) o[dim - 1] = T(0);
  }
}

TEST_CASE_TEMPLATE("reference timestep_embedding is bit-identical to the original recipe", T, float,
                   double) {
  const std::vector<double> t{0.0, 1.0, 0.37, 500.5, 999.0, 123.456};
  for (std::int64_t dim : {1, 7, 8, 256, 1537}) {
    CAPTURE(dim);
    Buf<T> out(static_cast<std::int64_t>(t.size()), 1, dim, 0, 3);
    ops::timestep_embedding<T>(rctx, std::span<const double>(t), batch<R>(out));
    std::vector<T> tt(t.size()), want(t.size() * static_cast<std::size_t>(dim));
    for (std::size_t i = 0; i < t.size(); ++i) tt[i] = static_cast<T>(t[i]);
    original_timestep_embedding<T>(tt.data(), static_cast<std::int64_t>(tt.size()), want.data(),
                                   dim);
    bool same = true;
    for (std::size_t s = 0; s < t.size(); ++s)
      for (std::int64_t j = 0; j < dim; ++j)
        same = same && out.at(static_cast<std::int64_t>(s), 0, j) ==
                           want[s * static_cast<std::size_t>(dim) + static_cast<std::size_t>(j)];
    CHECK(same);
    CHECK(out.padding_intact());
  }
  // values: dim 4, t = 2: [cos 2, cos 2e-2, sin 2, sin 2e-2] (f = 1, 1e4^(-1/2))
  Buf<T> v(1, 1, 4);
  const std::vector<double> t2{2.0};
  ops::timestep_embedding<T>(rctx, std::span<const double>(t2), batch<R>(v));
  const double tol = std::is_same_v<T, double> ? 1e-15 : 1e-6;
  CHECK(v.at(0, 0, 0) == doctest::Approx(std::cos(2.0)).epsilon(tol));
  CHECK(v.at(0, 0, 1) == doctest::Approx(std::cos(0.02)).epsilon(tol));
  CHECK(v.at(0, 0, 2) == doctest::Approx(std::sin(2.0)).epsilon(tol));
  CHECK(v.at(0, 0, 3) == doctest::Approx(std::sin(0.02)).epsilon(tol));
  Buf<T> bad(2, 1, 8);
  CHECK(message_of([&] {
          ops::timestep_embedding<T>(rctx, std::span<const double>(t), batch<R>(bad));
        }).find("ops::timestep_embedding: out") == 0);
}

TEST_CASE("reference gather_rows, add_rows, sum_samples, copy, add") {
  std::mt19937_64 rng(8);
  const std::int64_t V = 4, e = 5;
  Buf<double> table(1, V, e, 2), w(5, 1, e);
  table.randomize(rng);
  w.randomize(rng);
  const std::vector<std::int64_t> ids{2, 0, 2, 3, 2};
  Buf<double> out(5, 1, e, 1, 2);
  ops::gather_rows<double>(rctx, crows<R>(table), ids, batch<R>(out));
  CHECK(out.padding_intact());
  for (std::int64_t s = 0; s < 5; ++s)
    for (std::int64_t j = 0; j < e; ++j)
      CHECK(out.at(s, 0, j) == table.at(0, ids[static_cast<std::size_t>(s)], j));
  Buf<double> dt(1, V, e, 1), dt0;
  dt.randomize(rng);
  dt0 = dt;
  ops::gather_rows_backward<double>(rctx, cbatch<R>(w), ids, rows<R>(dt));
  CHECK(dt.padding_intact());
  Buf<double> inc(1, V, e);
  for (std::int64_t i = 0; i < V; ++i)
    for (std::int64_t j = 0; j < e; ++j) inc.at(0, i, j) = dt.at(0, i, j) - dt0.at(0, i, j);
  for (std::int64_t j = 0; j < e; ++j) CHECK(inc.at(0, 1, j) == 0.0);  // row 1 not gathered
  check_gradient("gather_rows", table, inc, [&] {
    Buf<double> o(5, 1, e);
    ops::gather_rows<double>(rctx, crows<R>(table), ids, batch<R>(o));
    return dot(w, o);
  });
  for (std::int64_t bad_id : {std::int64_t{-1}, V}) {
    const std::vector<std::int64_t> bad{0, bad_id, 1, 1, 1};
    CHECK(message_of([&] {
            ops::gather_rows<double>(rctx, crows<R>(table), bad, batch<R>(out));
          }).find("ops::gather_rows: ids") == 0);
    CHECK(message_of([&] {
            ops::gather_rows_backward<double>(rctx, cbatch<R>(w), bad, rows<R>(dt));
          }).find("ops::gather_rows_backward: ids") == 0);
  }

  // add_rows / sum_samples
  const std::int64_t S = 3, m = 4, n = 5;
  Buf<double> a(1, m, n, 2), y(S, m, n, 1, 3), wy(S, m, n);
  a.randomize(rng);
  y.randomize(rng);
  wy.randomize(rng);
  const Buf<double> y0 = y;
  ops::add_rows<double>(rctx, crows<R>(a), batch<R>(y));
  CHECK(y.padding_intact());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) CHECK(y.at(s, i, j) == y0.at(s, i, j) + a.at(0, i, j));
  Buf<double> da(1, m, n, 1);
  ops::sum_samples<double>(rctx, cbatch<R>(wy), rows<R>(da));
  CHECK(da.padding_intact());
  check_gradient("add_rows", a, da, [&] {
    Buf<double> o = y0;
    ops::add_rows<double>(rctx, crows<R>(a), batch<R>(o));
    return dot(wy, o);
  });

  // copy / add over batch blocks
  Buf<double> c(S, m, n, 2, 1);
  ops::copy<double>(rctx, cbatch<R>(y0), batch<R>(c));
  expect_close("copy", y0, c, 0.0);
  ops::add<double>(rctx, cbatch<R>(wy), batch<R>(c));
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) CHECK(c.at(s, i, j) == y0.at(s, i, j) + wy.at(s, i, j));
  CHECK(c.padding_intact());
  CHECK(message_of([&] {
          Buf<double> bad(S, m, n + 1);
          ops::add<double>(rctx, cbatch<R>(wy), batch<R>(bad));
        }).find("ops::add: dst") == 0);
}

TEST_CASE("reference run_samples and once call back as specified") {
  int calls = 0;
  ops::run_samples(rctx, 5, [&](const Context<R>& ctx, std::int64_t first, std::int64_t count) {
    CHECK(&ctx == &rctx);
    CHECK(first == 0);
    CHECK(count == 5);
    ++calls;
  });
  CHECK(calls == 1);
  // the CPU backend's optional whole_samples flag is accepted (and means nothing serially)
  ops::run_samples(
      rctx, 3,
      [&](const Context<R>&, std::int64_t first, std::int64_t count) {
        CHECK(first == 0);
        CHECK(count == 3);
        ++calls;
      },
      false);
  CHECK(calls == 2);
  // no samples: no call (as on the CPU)
  ops::run_samples(rctx, 0, [&](const Context<R>&, std::int64_t, std::int64_t) { ++calls; });
  CHECK(calls == 2);
  int once_calls = 0;
  ops::once(rctx, [&] { ++once_calls; });
  CHECK(once_calls == 1);
}

// ---- the CPU backend's network primitives against the reference ---------------------------------

#if UNIDIFFUSER_TEST_CPU_NN

template <class T>
constexpr double cpu_rtol() {
  return std::is_same_v<T, double> ? 1e-12 : 5e-6;
}

TEST_CASE_TEMPLATE("cpu nn: linear and linear_backward agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(21);
  struct Case {
    std::int64_t S, m, k, n;
  };
  int idx = 0;
  for (const Case c : {Case{1, 1, 1, 1}, Case{2, 5, 7, 3}, Case{2, 7, 32, 64}, Case{3, 37, 64, 33},
                       Case{1, 17, 256, 96}, Case{2, 1, 13, 29}, Case{2, 37, 96, 288}}) {
    const std::int64_t pad = idx++ % 2 ? 0 : 3;
    CAPTURE(c.S);
    CAPTURE(c.m);
    CAPTURE(c.k);
    CAPTURE(c.n);
    CAPTURE(pad);
    Buf<T> x(c.S, c.m, c.k, pad, 2 * pad), w(1, c.n, c.k, pad), b(1, 1, c.n);
    Buf<T> dy(c.S, c.m, c.n, pad, pad);
    x.randomize(rng);
    w.randomize(rng);
    b.randomize(rng);
    dy.randomize(rng);
    for (Epilogue ep : {Epilogue::none, Epilogue::gelu, Epilogue::accumulate})
      for (bool bias : {true, false}) {
        CAPTURE(static_cast<int>(ep));
        CAPTURE(bias);
        Buf<T> yr(c.S, c.m, c.n, pad + 1, 1);
        yr.randomize(rng);
        Buf<T> yc = yr;
        auto run = [&]<class B>(B, Buf<T>& y) {
          ops::linear<T>(Context<B>{}, cbatch<B>(x), crows<B>(w), bias ? b.ptr() : nullptr,
                         batch<B>(y), ep);
        };
        run(R{}, yr);
        run(cpu{}, yc);
        expect_close("linear", yr, yc, cpu_rtol<T>());
      }
    for (int mode = 0; mode < 4; ++mode) {
      // 0: everything, dx stored; 1: everything, dx accumulated; 2: dx only; 3: dw and db only
      CAPTURE(mode);
      Buf<T> dxr(c.S, c.m, c.k, 1, pad), dwr(1, c.n, c.k, 2), dbr(1, 1, c.n);
      dxr.randomize(rng);
      dwr.randomize(rng);
      dbr.randomize(rng);
      Buf<T> dxc = dxr, dwc = dwr, dbc = dbr;
      auto run = [&]<class B>(B, Buf<T>& dx, Buf<T>& dw, Buf<T>& db) {
        ops::linear_backward<T>(Context<B>{}, cbatch<B>(x), crows<B>(w), cbatch<B>(dy),
                                mode == 3 ? BatchBlock<T, B>{} : batch<B>(dx), mode == 1,
                                mode == 2 ? RowBlock<T, B>{} : rows<B>(dw),
                                mode == 2 ? nullptr : db.ptr());
      };
      run(R{}, dxr, dwr, dbr);
      run(cpu{}, dxc, dwc, dbc);
      expect_close("linear_backward dx", dxr, dxc, cpu_rtol<T>());
      expect_close("linear_backward dw", dwr, dwc, cpu_rtol<T>());
      expect_close("linear_backward db", dbr, dbc, cpu_rtol<T>());
    }
  }
}

TEST_CASE_TEMPLATE("cpu nn: gelu, silu and their gradients agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(22);
  struct Case {
    std::int64_t S, m, n, pad;
  };
  for (const Case c :
       {Case{1, 1, 1, 0}, Case{2, 5, 7, 3}, Case{3, 37, 64, 0}, Case{2, 3, 129, 5}}) {
    CAPTURE(c.n);
    Buf<T> u(c.S, c.m, c.n, c.pad, c.pad), dy(c.S, c.m, c.n, c.pad + 1);
    u.randomize(rng, -4, 4);
    dy.randomize(rng);
    for (int which = 0; which < 2; ++which) {
      CAPTURE(which);
      Buf<T> yr(c.S, c.m, c.n, 1, c.pad), yc = yr, dur(c.S, c.m, c.n, 2), duc = dur;
      auto run = [&]<class B>(B, Buf<T>& y, Buf<T>& du) {
        const Context<B> ctx{};
        if (which == 0) {
          ops::gelu<T>(ctx, cbatch<B>(u), batch<B>(y));
          ops::gelu_backward<T>(ctx, cbatch<B>(u), cbatch<B>(dy), batch<B>(du));
        } else {
          ops::silu<T>(ctx, cbatch<B>(u), batch<B>(y));
          ops::silu_backward<T>(ctx, cbatch<B>(u), cbatch<B>(dy), batch<B>(du));
        }
      };
      run(R{}, yr, dur);
      run(cpu{}, yc, duc);
      expect_close("activation", yr, yc, cpu_rtol<T>());
      expect_close("activation backward", dur, duc, cpu_rtol<T>());
      // in place on the CPU: y = u, du = dy
      Buf<T> ui = u, di = dy;
      const Context<cpu> cctx{};
      if (which == 0) {
        ops::gelu_backward<T>(cctx, cbatch<cpu>(u), cbatch<cpu>(di), batch<cpu>(di));
        ops::gelu<T>(cctx, cbatch<cpu>(ui), batch<cpu>(ui));
      } else {
        ops::silu_backward<T>(cctx, cbatch<cpu>(u), cbatch<cpu>(di), batch<cpu>(di));
        ops::silu<T>(cctx, cbatch<cpu>(ui), batch<cpu>(ui));
      }
      expect_close("activation in place", yr, ui, cpu_rtol<T>());
      expect_close("activation backward in place", dur, di, cpu_rtol<T>());
    }
  }
}

TEST_CASE_TEMPLATE("cpu nn: layer_norm and its gradient agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(23);
  struct Case {
    std::int64_t S, m, n, pad;
  };
  for (const Case c : {Case{1, 1, 3, 0}, Case{2, 7, 5, 3}, Case{2, 37, 64, 0}, Case{3, 5, 96, 1},
                       Case{1, 3, 257, 4}}) {
    CAPTURE(c.n);
    Buf<T> x(c.S, c.m, c.n, c.pad, 1), r(c.S, c.m, c.n, 1, c.pad), g(1, 1, c.n), b(1, 1, c.n),
        dy(c.S, c.m, c.n, c.pad);
    x.randomize(rng, -2, 3);
    r.randomize(rng);
    g.randomize(rng, 0.5, 1.5);
    b.randomize(rng);
    dy.randomize(rng);
    for (bool residual : {true, false}) {
      CAPTURE(residual);
      Buf<T> yr(c.S, c.m, c.n, 2), yc = yr, sr(c.S, c.m, 2, 0, 1), sc = sr;  // CPU: stats ld 2
      Buf<T> dzr(c.S, c.m, c.n, 1, 2), dzc = dzr, dgr(1, 1, c.n), dbr(1, 1, c.n);
      dgr.randomize(rng);
      dbr.randomize(rng);
      Buf<T> dgc = dgr, dbc = dbr;
      auto run = [&]<class B>(B, Buf<T>& y, Buf<T>& st, Buf<T>& dz, Buf<T>& dg, Buf<T>& db) {
        const Context<B> ctx{};
        const BatchBlock<const T, B> rb = residual ? cbatch<B>(r) : BatchBlock<const T, B>{};
        ops::layer_norm<T>(ctx, cbatch<B>(x), rb, g.ptr(), b.ptr(), batch<B>(y), batch<B>(st));
        ops::layer_norm_backward<T>(ctx, cbatch<B>(x), rb, g.ptr(), cbatch<B>(st), cbatch<B>(dy),
                                    batch<B>(dz), dg.ptr(), db.ptr());
      };
      run(R{}, yr, sr, dzr, dgr, dbr);
      run(cpu{}, yc, sc, dzc, dgc, dbc);
      expect_close("layer_norm y", yr, yc, cpu_rtol<T>());
      // the mean may be ~0: compare the stats columns each against its own scale
      Buf<T> mr(c.S, c.m, 1), mc(c.S, c.m, 1), rr(c.S, c.m, 1), rc(c.S, c.m, 1);
      for (std::int64_t s = 0; s < c.S; ++s)
        for (std::int64_t i = 0; i < c.m; ++i) {
          mr.at(s, i, 0) = sr.at(s, i, 0);
          mc.at(s, i, 0) = sc.at(s, i, 0);
          rr.at(s, i, 0) = sr.at(s, i, 1);
          rc.at(s, i, 0) = sc.at(s, i, 1);
        }
      expect_close("layer_norm mean", mr, mc, cpu_rtol<T>());
      expect_close("layer_norm rstd", rr, rc, cpu_rtol<T>());
      CHECK(sc.padding_intact());
      expect_close("layer_norm_backward dz", dzr, dzc, cpu_rtol<T>());
      expect_close("layer_norm_backward dg", dgr, dgc, cpu_rtol<T>());
      expect_close("layer_norm_backward db", dbr, dbc, cpu_rtol<T>());
      // in place on the CPU: y = x, dz = dy
      Buf<T> xi = x, di = dy, st(c.S, c.m, 2);
      const Context<cpu> cctx{};
      const BatchBlock<const T, cpu> rb = residual ? cbatch<cpu>(r) : BatchBlock<const T, cpu>{};
      ops::layer_norm<T>(cctx, cbatch<cpu>(x), rb, g.ptr(), b.ptr(), batch<cpu>(yc),
                         batch<cpu>(st));
      ops::layer_norm<T>(cctx, cbatch<cpu>(xi), rb, g.ptr(), b.ptr(), batch<cpu>(xi),
                         BatchBlock<T, cpu>{});
      ops::layer_norm_backward<T>(cctx, cbatch<cpu>(x), rb, g.ptr(), cbatch<cpu>(st),
                                  cbatch<cpu>(di), batch<cpu>(di), static_cast<T*>(nullptr),
                                  static_cast<T*>(nullptr));
      expect_close("layer_norm in place", yr, xi, cpu_rtol<T>());
      expect_close("layer_norm_backward in place", dzr, di, cpu_rtol<T>());
    }
  }
}

TEST_CASE_TEMPLATE("cpu nn: attention and its gradient agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(24);
  struct Case {
    std::int64_t heads, dh;
  };
  int idx = 0;
  for (const Case c : {Case{2, 3}, Case{1, 32}, Case{2, 64}, Case{3, 5}, Case{4, 16}, Case{2, 8},
                       Case{1, 7}, Case{2, 24}})
    for (std::int64_t L : {1, 7, 37, 70}) {  // 70: the oneDNN backward of longer sequences
      const std::int64_t S = 2, E = c.heads * c.dh, pad = idx++ % 3;
      CAPTURE(c.heads);
      CAPTURE(c.dh);
      CAPTURE(L);
      Buf<T> qkv(S, L, 3 * E, pad, 2 * pad), dout(S, L, E, 2 * pad, 1);
      qkv.randomize(rng, -2, 2);
      dout.randomize(rng);
      Buf<T> outr(S, L, E, pad, 3), outc = outr, dr(S, L, 3 * E, 1, pad), dc = dr;
      auto run = [&]<class B>(B, Buf<T>& out, Buf<T>& d) {
        const Context<B> ctx{};
        ops::attention<T>(ctx, cbatch<B>(qkv), c.heads, batch<B>(out));
        ops::attention_backward<T>(ctx, cbatch<B>(qkv), c.heads, cbatch<B>(dout), batch<B>(d));
      };
      run(R{}, outr, dr);
      run(cpu{}, outc, dc);
      expect_close("attention", outr, outc, cpu_rtol<T>());
      expect_close("attention_backward", dr, dc, cpu_rtol<T>());
    }
}

TEST_CASE_TEMPLATE("cpu nn: patchify, unpatchify and gradients agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(25);
  for (const ImageGeom g : {ImageGeom{3, 6, 6, 2}, ImageGeom{3, 6, 6, 3}, ImageGeom{4, 8, 8, 2},
                            ImageGeom{3, 6, 9, 3}, ImageGeom{4, 16, 16, 2}}) {
    CAPTURE(g.patch);
    CAPTURE(g.width);
    const std::int64_t S = 2;
    Buf<T> img(S, 1, g.numel(), 0, 3), y(S, g.tokens(), g.features(), 2, 1);
    Buf<T> dcols(S, g.tokens(), g.features(), 1), dimg(S, 1, g.numel(), 1, 1);
    img.randomize(rng);
    y.randomize(rng);
    dcols.randomize(rng);
    dimg.randomize(rng);
    Buf<T> pr(S, g.tokens(), g.features(), 3), pc = pr, ir(S, 1, g.numel(), 2), ic = ir;
    Buf<T> dir(S, 1, g.numel(), 0, 2), dic = dir, dyr(S, g.tokens(), g.features(), 1, 1), dyc = dyr;
    auto run = [&]<class B>(B, Buf<T>& p, Buf<T>& i, Buf<T>& di, Buf<T>& dy) {
      const Context<B> ctx{};
      ops::patchify<T>(ctx, cbatch<B>(img), g, batch<B>(p));
      ops::unpatchify<T>(ctx, cbatch<B>(y), g, batch<B>(i));
      ops::patchify_backward<T>(ctx, cbatch<B>(dcols), g, batch<B>(di));
      ops::unpatchify_backward<T>(ctx, cbatch<B>(dimg), g, batch<B>(dy));
    };
    run(R{}, pr, ir, dir, dyr);
    run(cpu{}, pc, ic, dic, dyc);
    expect_close("patchify", pr, pc, 0.0);
    expect_close("unpatchify", ir, ic, 0.0);
    expect_close("patchify_backward", dir, dic, 0.0);
    expect_close("unpatchify_backward", dyr, dyc, 0.0);
  }
}

TEST_CASE_TEMPLATE("cpu nn: bilinear_resize and its gradient agree with the reference", T, float,
                   double) {
  std::mt19937_64 rng(26);
  // the CPU backend takes contiguous grids only (ld = e; the reference accepts any ld)
  struct Case {
    std::int64_t i0, i1, o0, o1, e;
  };
  for (const Case c :
       {Case{3, 3, 5, 4, 2}, Case{5, 4, 3, 3, 7}, Case{4, 4, 4, 4, 3}, Case{2, 2, 8, 8, 5},
        Case{16, 16, 9, 9, 64}, Case{9, 9, 16, 16, 33}, Case{1, 1, 3, 2, 4}}) {
    CAPTURE(c.i0);
    CAPTURE(c.o0);
    Buf<T> src(1, c.i0 * c.i1, c.e), ddst(1, c.o0 * c.o1, c.e);
    src.randomize(rng);
    ddst.randomize(rng);
    Buf<T> yr(1, c.o0 * c.o1, c.e), yc = yr, dr(1, c.i0 * c.i1, c.e);
    dr.randomize(rng);
    Buf<T> dc = dr;
    auto run = [&]<class B>(B, Buf<T>& y, Buf<T>& d) {
      const Context<B> ctx{};
      ops::bilinear_resize<T>(ctx, crows<B>(src), c.i0, c.i1, c.o0, c.o1, rows<B>(y));
      ops::bilinear_resize_backward<T>(ctx, crows<B>(ddst), c.i0, c.i1, c.o0, c.o1, rows<B>(d));
    };
    run(R{}, yr, dr);
    run(cpu{}, yc, dc);
    expect_close("bilinear_resize", yr, yc, cpu_rtol<T>());
    expect_close("bilinear_resize_backward", dr, dc, cpu_rtol<T>());
  }
}

TEST_CASE_TEMPLATE("cpu nn: embeddings, add_rows, sum_samples, copy, add agree with the reference",
                   T, float, double) {
  std::mt19937_64 rng(27);
  // timestep embedding: the same float / double recipe on both backends, bit for bit
  const std::vector<double> t{0.0, 1.0, 0.37, 500.5, 999.0};
  for (std::int64_t dim : {7, 8, 256, 1536}) {
    Buf<T> er(5, 1, dim, 0, 2), ec = er;
    ops::timestep_embedding<T>(rctx, std::span<const double>(t), batch<R>(er));
    ops::timestep_embedding<T>(Context<cpu>{}, std::span<const double>(t), batch<cpu>(ec));
    expect_close("timestep_embedding", er, ec, 0.0);
  }
  // gather_rows (repeated ids)
  for (auto [V, e] : {std::array<std::int64_t, 2>{5, 7}, std::array<std::int64_t, 2>{2, 64}}) {
    const std::vector<std::int64_t> ids{V - 1, 0, V - 1, 1 % V, 0};
    Buf<T> table(1, V, e, 1), dout(5, 1, e, 0, 2);
    table.randomize(rng);
    dout.randomize(rng);
    Buf<T> gr(5, 1, e, 2, 1), gc = gr, dtr(1, V, e, 3);
    dtr.randomize(rng);
    Buf<T> dtc = dtr;
    auto run = [&]<class B>(B, Buf<T>& g, Buf<T>& dt) {
      const Context<B> ctx{};
      ops::gather_rows<T>(ctx, crows<B>(table), ids, batch<B>(g));
      ops::gather_rows_backward<T>(ctx, cbatch<B>(dout), ids, rows<B>(dt));
    };
    run(R{}, gr, dtr);
    run(cpu{}, gc, dtc);
    expect_close("gather_rows", gr, gc, 0.0);
    expect_close("gather_rows_backward", dtr, dtc, cpu_rtol<T>());
    const std::vector<std::int64_t> bad{0, V, 0, 0, 0};
    CHECK(message_of([&] {
            ops::gather_rows<T>(Context<cpu>{}, crows<cpu>(table), bad, batch<cpu>(gc));
          }).find("ops::gather_rows") == 0);
  }
  // add_rows / sum_samples / copy / add
  for (auto [S, m, n] :
       {std::array<std::int64_t, 3>{3, 7, 5}, std::array<std::int64_t, 3>{2, 37, 64},
        std::array<std::int64_t, 3>{5, 1, 1}}) {
    Buf<T> a(1, m, n, 2), y(S, m, n, 1, 3), src(S, m, n, 0, 1);
    a.randomize(rng);
    y.randomize(rng);
    src.randomize(rng);
    Buf<T> yr = y, yc = y, dar(1, m, n, 1), cr(S, m, n, 2, 2), cc = cr, ar = y, ac = y;
    dar.randomize(rng);
    Buf<T> dac = dar;
    auto run = [&]<class B>(B, Buf<T>& yy, Buf<T>& da, Buf<T>& cp, Buf<T>& ad) {
      const Context<B> ctx{};
      ops::add_rows<T>(ctx, crows<B>(a), batch<B>(yy));
      ops::sum_samples<T>(ctx, cbatch<B>(src), rows<B>(da));
      ops::copy<T>(ctx, cbatch<B>(src), batch<B>(cp));
      ops::add<T>(ctx, cbatch<B>(src), batch<B>(ad));
    };
    run(R{}, yr, dar, cr, ar);
    run(cpu{}, yc, dac, cc, ac);
    expect_close("add_rows", yr, yc, 0.0);
    expect_close("sum_samples", dar, dac, cpu_rtol<T>());
    expect_close("copy", cr, cc, 0.0);
    expect_close("add", ar, ac, 0.0);
  }
}

#endif  // UNIDIFFUSER_TEST_CPU_NN

}  // namespace
