// SPDX-License-Identifier: Apache-2.0
//! \file ops.hpp
//! The element-wise and data-movement primitives of the reference backend: the twins of
//! backend/cpu/ops.hpp over `Context<reference>`, written as naive serial loops. Where the CPU
//! backend computes in the compute type `T`, the reference accumulates in double and rounds once
//! at the store (it is the oracle of the kernel tests, compared with a tolerance); the noise is
//! the same Philox numbers as on every backend.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::ops {

namespace reference_detail {
//! Throws unless blocks `a` and `b` have the same [rows, cols].
template <class A, class B>
void check_same_block(const char* op, const A& a, const B& b) {
  if (a.rows != b.rows || a.cols != b.cols)
    throw error(op, "operands",
                "block shapes differ: [" + std::to_string(a.rows) + ", " + std::to_string(a.cols) +
                    "] vs [" + std::to_string(b.rows) + ", " + std::to_string(b.cols) + "]");
}
}  // namespace reference_detail

//! Waits for the work queued on ctx: the reference backend runs each call to its end, so there
//! is nothing to wait for (generic code can call it on any backend).
inline void synchronize(const Context<reference>&) {}

//! dst = value.
template <class T>
void fill(const Context<reference>& ctx, RowBlock<T, reference> dst, T value) {
  (void)ctx;
  for (std::int64_t r = 0; r < dst.rows; ++r)
    for (std::int64_t j = 0; j < dst.cols; ++j) dst.data[r * dst.ld + j] = value;
}
template <class T>
void fill(const Context<reference>& ctx, TensorView<T, reference> dst, T value) {
  fill(ctx, as_rows(dst), value);
}

//! dst = src, block by block (dst and src must not overlap).
template <class T>
void copy(const Context<reference>& ctx, RowBlock<const T, reference> src,
          RowBlock<T, reference> dst) {
  (void)ctx;
  reference_detail::check_same_block("ops::copy", src, dst);
  for (std::int64_t r = 0; r < src.rows; ++r)
    for (std::int64_t j = 0; j < src.cols; ++j) dst.data[r * dst.ld + j] = src.data[r * src.ld + j];
}
template <class T>
void copy(const Context<reference>& ctx, TensorView<const T, reference> src,
          TensorView<T, reference> dst) {
  (void)ctx;
  if (src.size() != dst.size())
    throw_mismatch("ops::copy", "dst", "element count", src.size(), dst.size());
  for (std::int64_t i = 0; i < src.size(); ++i) dst.data()[i] = src.data()[i];
}

//! dst = sum_k coef_k * x_k (all blocks the same shape; dst may alias any x_k element-wise).
//! Unlike the CPU backend (coefficients rounded to T, arithmetic in T), the products and the sum
//! are formed in double with the double coefficients and rounded once.
template <class T>
void lincomb(const Context<reference>& ctx, RowBlock<T, reference> dst,
             std::initializer_list<Term<T, reference>> terms) {
  (void)ctx;
  constexpr std::size_t max_terms = 6;
  if (terms.size() == 0 || terms.size() > max_terms)
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  for (const auto& t : terms) reference_detail::check_same_block("ops::lincomb", t.x, dst);
  for (std::int64_t r = 0; r < dst.rows; ++r)
    for (std::int64_t j = 0; j < dst.cols; ++j) {
      double acc = 0;
      for (const auto& t : terms) acc += t.coef * static_cast<double>(t.x.data[r * t.x.ld + j]);
      dst.data[r * dst.ld + j] = static_cast<T>(acc);
    }
}
template <class T>
void lincomb(const Context<reference>& ctx, TensorView<T, reference> dst,
             std::initializer_list<std::pair<double, TensorView<const T, reference>>> terms) {
  constexpr std::size_t max_terms = 6;
  if (terms.size() == 0 || terms.size() > max_terms)
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  Term<T, reference> t[max_terms];
  std::size_t n = 0;
  for (const auto& p : terms) t[n++] = Term<T, reference>{p.first, as_rows(p.second)};
  const auto d = as_rows(dst);
  switch (n) {
    case 1: return lincomb(ctx, d, {t[0]});
    case 2: return lincomb(ctx, d, {t[0], t[1]});
    case 3: return lincomb(ctx, d, {t[0], t[1], t[2]});
    case 4: return lincomb(ctx, d, {t[0], t[1], t[2], t[3]});
    case 5: return lincomb(ctx, d, {t[0], t[1], t[2], t[3], t[4]});
    default: return lincomb(ctx, d, {t[0], t[1], t[2], t[3], t[4], t[5]});
  }
}

//! Per-row coefficients: dst[r, :] = a[r] * x[r, :] + b[r] * y[r, :], formed in double and
//! rounded once (as on the CPU).
template <class T>
void axpby_rows(const Context<reference>& ctx, RowBlock<T, reference> dst, const double* a,
                RowBlock<const T, reference> x, const double* b, RowBlock<const T, reference> y) {
  (void)ctx;
  reference_detail::check_same_block("ops::axpby_rows", x, dst);
  reference_detail::check_same_block("ops::axpby_rows", y, dst);
  for (std::int64_t r = 0; r < dst.rows; ++r)
    for (std::int64_t j = 0; j < dst.cols; ++j)
      dst.data[r * dst.ld + j] = static_cast<T>(a[r] * static_cast<double>(x.data[r * x.ld + j]) +
                                                b[r] * static_cast<double>(y.data[r * y.ld + j]));
}

//! Standard normal noise: dst[r, j] = philox_normal(key.seed, key.stream, sample0 + r, j).
template <class T>
void random_normal(const Context<reference>& ctx, RowBlock<T, reference> dst, NoiseKey key,
                   std::uint64_t sample0) {
  (void)ctx;
  for (std::int64_t r = 0; r < dst.rows; ++r) {
    const std::uint64_t sample = sample0 + static_cast<std::uint64_t>(r);
    for (std::int64_t j = 0; j < dst.cols; ++j) {
      const auto e = static_cast<std::uint64_t>(j);
      const Normal4 n = philox_normal4(key.seed, key.stream, sample, e >> 2);
      dst.data[r * dst.ld + j] = static_cast<T>(n.v[e & 3u]);
    }
  }
}

//! Sum over the elements of row r of (x - y)^2, accumulated in double, into `out[r]`.
template <class T>
void squared_error_rows(const Context<reference>& ctx, RowBlock<const T, reference> x,
                        RowBlock<const T, reference> y, double* out) {
  (void)ctx;
  reference_detail::check_same_block("ops::squared_error_rows", x, y);
  for (std::int64_t r = 0; r < x.rows; ++r) {
    double acc = 0;
    for (std::int64_t j = 0; j < x.cols; ++j) {
      const double d =
          static_cast<double>(x.data[r * x.ld + j]) - static_cast<double>(y.data[r * y.ld + j]);
      acc += d * d;
    }
    out[r] = acc;
  }
}

//! True if every element is finite.
template <class T>
bool all_finite(const Context<reference>& ctx, RowBlock<const T, reference> x) {
  (void)ctx;
  for (std::int64_t r = 0; r < x.rows; ++r)
    for (std::int64_t j = 0; j < x.cols; ++j)
      if (!std::isfinite(static_cast<double>(x.data[r * x.ld + j]))) return false;
  return true;
}

//! One AdamW step over a contiguous range, every operation in double, stored once in T.
template <class T>
void adamw_update(const Context<reference>& ctx, T* p, const T* g, T* m, T* v, std::int64_t n,
                  const AdamWStep& s) {
  (void)ctx;
  for (std::int64_t j = 0; j < n; ++j) {
    const double gj = static_cast<double>(g[j]);
    const double mj = s.beta1 * static_cast<double>(m[j]) + (1 - s.beta1) * gj;
    const double vj = s.beta2 * static_cast<double>(v[j]) + (1 - s.beta2) * gj * gj;
    m[j] = static_cast<T>(mj);
    v[j] = static_cast<T>(vj);
    p[j] = static_cast<T>((1 - s.lr * s.weight_decay) * static_cast<double>(p[j]) -
                          s.lr * (mj / s.c1) / (std::sqrt(vj / s.c2) + s.eps));
  }
}

//! Sum of squares of n contiguous values, in double.
template <class T>
double sum_squares(const Context<reference>& ctx, const T* x, std::int64_t n) {
  (void)ctx;
  double s = 0;
  for (std::int64_t j = 0; j < n; ++j) s += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  return s;
}

}  // namespace unidiffuser::ops
