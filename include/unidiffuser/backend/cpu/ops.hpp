// SPDX-License-Identifier: Apache-2.0
//! \file ops.hpp
//! The element-wise and data-movement primitives of the CPU backend. Sampler, diffusion and
//! guidance code use only these (and their CUDA twins), never raw element loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace unidiffuser::ops {

namespace detail {
inline int thread_count(const Context<cpu>& ctx) {
#if defined(_OPENMP)
  return ctx.threads > 0 ? ctx.threads : omp_get_max_threads();
#else
  (void)ctx;
  return 1;
#endif
}
// Parallelise a loop over rows only when it is worth the fork (>= 64 K elements).
template <class F>
void for_rows(const Context<cpu>& ctx, std::int64_t rows, std::int64_t work_per_row, F&& f) {
#if defined(_OPENMP)
  const int nt = thread_count(ctx);
  if (nt > 1 && rows > 1 && rows * work_per_row >= (1 << 16)) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
#else
  (void)ctx;
#endif
  (void)work_per_row;
  for (std::int64_t r = 0; r < rows; ++r) f(r);
}
}  // namespace detail

//! dst = value.
template <class T>
void fill(const Context<cpu>& ctx, RowBlock<T, cpu> dst, T value) {
  detail::for_rows(ctx, dst.rows, dst.cols,
                   [&](std::int64_t r) { std::fill_n(dst.data + r * dst.ld, dst.cols, value); });
}
template <class T>
void fill(const Context<cpu>& ctx, TensorView<T, cpu> dst, T value) {
  fill(ctx, as_rows(dst), value);
}

//! dst = src, block by block (dst and src must not overlap).
template <class T>
void copy(const Context<cpu>& ctx, RowBlock<const T, cpu> src, RowBlock<T, cpu> dst) {
  checks::same_block("ops::copy", src, dst);
  detail::for_rows(ctx, src.rows, src.cols, [&](std::int64_t r) {
    std::copy_n(src.data + r * src.ld, src.cols, dst.data + r * dst.ld);
  });
}
template <class T>
void copy(const Context<cpu>& ctx, TensorView<const T, cpu> src, TensorView<T, cpu> dst) {
  if (src.size() != dst.size())
    throw_mismatch("ops::copy", "dst", "element count", src.size(), dst.size());
  std::copy_n(src.data(), src.size(), dst.data());
  (void)ctx;
}

//! dst = sum_k coef_k * x_k (all blocks the same shape; dst may alias any x_k element-wise).
//! Coefficients are computed by the caller in double and applied in the compute type `T`.
template <class T>
void lincomb(const Context<cpu>& ctx, RowBlock<T, cpu> dst,
             std::initializer_list<Term<T, cpu>> terms) {
  constexpr int max_terms = 6;
  if (terms.size() == 0 || terms.size() > static_cast<std::size_t>(max_terms))
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  const T* px[max_terms];
  std::int64_t ld[max_terms];
  T c[max_terms];
  int n = 0;
  for (const auto& t : terms) {
    checks::same_block("ops::lincomb", t.x, dst);
    px[n] = t.x.data;
    ld[n] = t.x.ld;
    c[n] = static_cast<T>(t.coef);
    ++n;
  }
  detail::for_rows(ctx, dst.rows, dst.cols * n, [&](std::int64_t r) {
    T* o = dst.data + r * dst.ld;
    const T* x0 = px[0] + r * ld[0];
    switch (n) {
      case 1:
        for (std::int64_t j = 0; j < dst.cols; ++j) o[j] = c[0] * x0[j];
        break;
      case 2: {
        const T* x1 = px[1] + r * ld[1];
        for (std::int64_t j = 0; j < dst.cols; ++j) o[j] = c[0] * x0[j] + c[1] * x1[j];
        break;
      }
      case 3: {
        const T* x1 = px[1] + r * ld[1];
        const T* x2 = px[2] + r * ld[2];
        for (std::int64_t j = 0; j < dst.cols; ++j)
          o[j] = c[0] * x0[j] + c[1] * x1[j] + c[2] * x2[j];
        break;
      }
      case 4: {
        const T* x1 = px[1] + r * ld[1];
        const T* x2 = px[2] + r * ld[2];
        const T* x3 = px[3] + r * ld[3];
        for (std::int64_t j = 0; j < dst.cols; ++j)
          o[j] = c[0] * x0[j] + c[1] * x1[j] + c[2] * x2[j] + c[3] * x3[j];
        break;
      }
      default: {
        for (std::int64_t j = 0; j < dst.cols; ++j) {
          T acc = c[0] * x0[j];
          for (int k = 1; k < n; ++k) acc += c[k] * px[k][r * ld[k] + j];
          o[j] = acc;
        }
      }
    }
  });
}
template <class T>
void lincomb(const Context<cpu>& ctx, TensorView<T, cpu> dst,
             std::initializer_list<std::pair<double, TensorView<const T, cpu>>> terms) {
  constexpr int max_terms = 6;
  if (terms.size() == 0 || terms.size() > static_cast<std::size_t>(max_terms))
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  Term<T, cpu> t[max_terms];
  int n = 0;
  for (const auto& p : terms) t[n++] = Term<T, cpu>{p.first, as_rows(p.second)};
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

//! Per-row (per-sample) coefficients: dst[r, :] = a[r] * x[r, :] + b[r] * y[r, :], with the
//! products and the sum formed in double and rounded once (this is how the reference forms the
//! noised training input x_n = sqrt(abar) x0 + sqrt(1 - abar) eps).
template <class T>
void axpby_rows(const Context<cpu>& ctx, RowBlock<T, cpu> dst, const double* a,
                RowBlock<const T, cpu> x, const double* b, RowBlock<const T, cpu> y) {
  checks::same_block("ops::axpby_rows", x, dst);
  checks::same_block("ops::axpby_rows", y, dst);
  detail::for_rows(ctx, dst.rows, dst.cols, [&](std::int64_t r) {
    const T* xr = x.data + r * x.ld;
    const T* yr = y.data + r * y.ld;
    T* o = dst.data + r * dst.ld;
    const double ar = a[r], br = b[r];
    for (std::int64_t j = 0; j < dst.cols; ++j)
      o[j] = static_cast<T>(ar * static_cast<double>(xr[j]) + br * static_cast<double>(yr[j]));
  });
}

//! Standard normal noise: dst[r, j] = philox_normal(key.seed, key.stream, sample0 + r, j).
template <class T>
void random_normal(const Context<cpu>& ctx, RowBlock<T, cpu> dst, NoiseKey key,
                   std::uint64_t sample0) {
  detail::for_rows(ctx, dst.rows, dst.cols * 8, [&](std::int64_t r) {
    T* o = dst.data + r * dst.ld;
    const std::uint64_t sample = sample0 + static_cast<std::uint64_t>(r);
    std::int64_t j = 0;
    for (std::uint64_t blk = 0; j < dst.cols; ++blk) {
      const Normal4 n = philox_normal4(key.seed, key.stream, sample, blk);
      for (int k = 0; k < 4 && j < dst.cols; ++k, ++j) o[j] = static_cast<T>(n.v[k]);
    }
  });
}

//! Sum over all elements of (x - y)^2, accumulated in double, per row into `out[r]`.
template <class T>
void squared_error_rows(const Context<cpu>& ctx, RowBlock<const T, cpu> x, RowBlock<const T, cpu> y,
                        double* out) {
  checks::same_block("ops::squared_error_rows", x, y);
  detail::for_rows(ctx, x.rows, x.cols, [&](std::int64_t r) {
    double acc = 0;
    const T* xr = x.data + r * x.ld;
    const T* yr = y.data + r * y.ld;
    for (std::int64_t j = 0; j < x.cols; ++j) {
      const double d = static_cast<double>(xr[j]) - static_cast<double>(yr[j]);
      acc += d * d;
    }
    out[r] = acc;
  });
}

//! True if every element is finite.
template <class T>
bool all_finite(const Context<cpu>& ctx, RowBlock<const T, cpu> x) {
  (void)ctx;
  for (std::int64_t r = 0; r < x.rows; ++r)
    for (std::int64_t j = 0; j < x.cols; ++j)
      if (!std::isfinite(static_cast<double>(x.data[r * x.ld + j]))) return false;
  return true;
}

}  // namespace unidiffuser::ops
