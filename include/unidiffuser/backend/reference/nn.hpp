// SPDX-License-Identifier: Apache-2.0
//! \file nn.hpp
//! The network primitives of the reference backend: linear layers, activations, layer norm,
//! multi-head attention, patch (un)folding, bilinear resize, embeddings and batch reductions,
//! forward and backward, over `Context<reference>` and host BatchBlock / RowBlock operands.
//!
//! Everything is a naive serial loop (no Eigen, no threads, no vector intrinsics) whose sums,
//! products and transcendental functions are evaluated in double and rounded once to `T` when
//! the result is stored; an accumulating output (`+=`) is read, added to in double and rounded
//! once. It is the oracle the CPU and CUDA kernels are tested against, and proof that the code
//! above the primitives is backend-generic. The CPU twins (backend/cpu/nn.hpp) have the same
//! signatures with `cpu` in place of `reference`.
//!
//! Shapes are validated with unidiffuser::error ("ops::<name>: <operand>: ..."). Unless a
//! function says otherwise, outputs must not overlap inputs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::ops {

namespace reference_detail {
inline constexpr double inv_sqrt2 = 0.70710678118654752440;
inline constexpr double inv_sqrt_2pi = 0.39894228040143267794;

inline double gelu(double u) {
  return 0.5 * u * (1.0 + std::erf(u * inv_sqrt2));
}
//! d gelu / du = Phi(u) + u phi(u).
inline double gelu_grad(double u) {
  return 0.5 * (1.0 + std::erf(u * inv_sqrt2)) + u * inv_sqrt_2pi * std::exp(-0.5 * u * u);
}
inline double sigmoid(double u) {
  return 1.0 / (1.0 + std::exp(-u));
}

//! Throws unless the optional operand `b` (null data = absent) is [samples; rows, cols].
template <class T>
void check_optional(const char* op, const char* name, const BatchBlock<T, reference>& b,
                    std::int64_t samples, std::int64_t rows, std::int64_t cols) {
  if (b.data) check_batch(op, name, b, samples, rows, cols);
}
//! Throws unless `b` is [rows, cols] with ld >= cols and data for a non-empty block.
template <class T>
void check_rows(const char* op, const char* name, const RowBlock<T, reference>& b,
                std::int64_t rows, std::int64_t cols) {
  if (b.rows != rows || b.cols != cols)
    throw_mismatch(op, name, "shape [rows, cols]",
                   "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]",
                   "[" + std::to_string(b.rows) + ", " + std::to_string(b.cols) + "]");
  if (rows > 1 && b.ld < cols) throw_mismatch(op, name, "leading dimension", ">= cols", b.ld);
  if (b.data == nullptr && rows * cols != 0) throw error(op, name, "null data");
}
//! Throws unless `p` (n values) is non-null or n is 0.
template <class T>
void check_vector(const char* op, const char* name, const T* p, std::int64_t n) {
  if (p == nullptr && n != 0) throw error(op, name, "null data");
}
inline void check_geometry(const char* op, const ImageGeom& g) {
  if (g.channels < 0 || g.height < 0 || g.width < 0 || g.patch < 1 || g.height % g.patch != 0 ||
      g.width % g.patch != 0)
    throw error(op, "geometry",
                "need channels, height, width >= 0 and a patch >= 1 dividing height and width; "
                "got c = " +
                    std::to_string(g.channels) + ", h = " + std::to_string(g.height) +
                    ", w = " + std::to_string(g.width) + ", p = " + std::to_string(g.patch));
}
//! Head dim of a fused qkv [S; L, 3E] with `heads` heads.
template <class T>
std::int64_t head_dim(const char* op, const BatchBlock<T, reference>& qkv, std::int64_t heads) {
  if (heads < 1) throw_mismatch(op, "heads", "head count", ">= 1", heads);
  if (qkv.cols % 3 != 0 || (qkv.cols / 3) % heads != 0)
    throw_mismatch(op, "qkv", "columns (3 * heads * head dim)",
                   "a multiple of " + std::to_string(3 * heads), qkv.cols);
  return qkv.cols / 3 / heads;
}
//! Row-major softmax(scale q_i . k_j) over keys j of one (sample, head): p [l, l].
template <class T>
void attention_probs(const BatchBlock<T, reference>& qkv, std::int64_t s, std::int64_t h,
                     std::int64_t dh, double scale, std::vector<double>& p) {
  const std::int64_t l = qkv.rows, e = qkv.cols / 3;
  p.assign(static_cast<std::size_t>(l * l), 0.0);
  for (std::int64_t i = 0; i < l; ++i) {
    const T* q = qkv.row(s, i) + h * dh;
    double* pi = p.data() + i * l;
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < l; ++j) {
      const T* k = qkv.row(s, j) + e + h * dh;
      double acc = 0;
      for (std::int64_t d = 0; d < dh; ++d)
        acc += static_cast<double>(q[d]) * static_cast<double>(k[d]);
      pi[j] = scale * acc;
      mx = std::max(mx, pi[j]);
    }
    double sum = 0;
    for (std::int64_t j = 0; j < l; ++j) {
      pi[j] = std::exp(pi[j] - mx);
      sum += pi[j];
    }
    for (std::int64_t j = 0; j < l; ++j) pi[j] /= sum;
  }
}
inline void check_resize(const char* op, std::int64_t i0, std::int64_t i1, std::int64_t o0,
                         std::int64_t o1) {
  if (i0 < 1 || i1 < 1 || o0 < 0 || o1 < 0)
    throw error(op, "sizes",
                "need input extents >= 1 and output extents >= 0; got " + std::to_string(i0) +
                    " x " + std::to_string(i1) + " -> " + std::to_string(o0) + " x " +
                    std::to_string(o1));
}
//! Row i of sample s of z = x (+ r) into z[0, n) (double), and its mean and 1 / sqrt(biased
//! variance + eps), two-pass in double.
template <class T>
std::pair<double, double> row_stats(const BatchBlock<const T, reference>& x,
                                    const BatchBlock<const T, reference>& r, std::int64_t s,
                                    std::int64_t i, double* z, double eps) {
  const std::int64_t n = x.cols;
  double mean = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    double v = static_cast<double>(x.row(s, i)[j]);
    if (r.data) v += static_cast<double>(r.row(s, i)[j]);
    z[j] = v;
    mean += v;
  }
  mean /= static_cast<double>(n);
  double var = 0;
  for (std::int64_t j = 0; j < n; ++j) var += (z[j] - mean) * (z[j] - mean);
  var /= static_cast<double>(n);
  return {mean, 1.0 / std::sqrt(var + eps)};
}
}  // namespace reference_detail

// ---- linear ------------------------------------------------------------------------------------

//! y [S; m, n] = epilogue(x [S; m, k] w^T + bias), w [n, k] row-major (nn.Linear weight), bias
//! n values or null. none: store; gelu: store the exact GELU of it; accumulate: add it to y.
template <class T>
void linear(const Context<reference>& ctx, BatchBlock<const T, reference> x,
            RowBlock<const T, reference> w, const T* bias, BatchBlock<T, reference> y, Epilogue ep,
            const LinearCache<T, reference>* cache = nullptr) {
  (void)ctx;
  (void)cache;  // nothing to prepare: the reference computes from the plain weights
  constexpr const char* op = "ops::linear";
  const std::int64_t S = x.samples, m = x.rows, k = x.cols, n = w.rows;
  check_batch(op, "x", x, S, m, k);
  reference_detail::check_rows(op, "w", w, n, k);
  check_batch(op, "y", y, S, m, n);
  if (ep != Epilogue::none && ep != Epilogue::gelu && ep != Epilogue::accumulate)
    throw error(op, "epilogue", "unknown epilogue");
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i) {
      const T* xr = x.row(s, i);
      T* yr = y.row(s, i);
      for (std::int64_t j = 0; j < n; ++j) {
        const T* wr = w.data + j * w.ld;
        double acc = bias ? static_cast<double>(bias[j]) : 0.0;
        for (std::int64_t l = 0; l < k; ++l)
          acc += static_cast<double>(xr[l]) * static_cast<double>(wr[l]);
        if (ep == Epilogue::gelu)
          acc = reference_detail::gelu(acc);
        else if (ep == Epilogue::accumulate)
          acc += static_cast<double>(yr[j]);
        yr[j] = static_cast<T>(acc);
      }
    }
}

//! Gradients of y = x w^T + b for dy [S; m, n]: dx [S; m, k] = dy w (+= dx when accumulate_dx;
//! null data: not wanted), dw [n, k] += sum_s dy_s^T x_s (null data: not wanted), db [n] +=
//! sum over samples and rows of dy (null: not wanted). x may be absent when dw is not wanted.
template <class T>
void linear_backward(const Context<reference>& ctx, BatchBlock<const T, reference> x,
                     RowBlock<const T, reference> w, BatchBlock<const T, reference> dy,
                     BatchBlock<T, reference> dx, bool accumulate_dx, RowBlock<T, reference> dw,
                     T* db) {
  (void)ctx;
  constexpr const char* op = "ops::linear_backward";
  const std::int64_t S = dy.samples, m = dy.rows, n = w.rows, k = w.cols;
  reference_detail::check_rows(op, "w", w, n, k);
  check_batch(op, "dy", dy, S, m, n);
  reference_detail::check_optional(op, "x", x, S, m, k);
  reference_detail::check_optional(op, "dx", dx, S, m, k);
  if (dw.data) {
    check_batch(op, "x", x, S, m, k);
    reference_detail::check_rows(op, "dw", dw, n, k);
  }
  if (dx.data)
    for (std::int64_t s = 0; s < S; ++s)
      for (std::int64_t i = 0; i < m; ++i) {
        const T* dyr = dy.row(s, i);
        T* dxr = dx.row(s, i);
        for (std::int64_t l = 0; l < k; ++l) {
          double acc = accumulate_dx ? static_cast<double>(dxr[l]) : 0.0;
          for (std::int64_t j = 0; j < n; ++j)
            acc += static_cast<double>(dyr[j]) * static_cast<double>(w.data[j * w.ld + l]);
          dxr[l] = static_cast<T>(acc);
        }
      }
  if (dw.data)
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t l = 0; l < k; ++l) {
        T* dwp = dw.data + j * dw.ld + l;
        double acc = static_cast<double>(*dwp);
        for (std::int64_t s = 0; s < S; ++s)
          for (std::int64_t i = 0; i < m; ++i)
            acc += static_cast<double>(dy.row(s, i)[j]) * static_cast<double>(x.row(s, i)[l]);
        *dwp = static_cast<T>(acc);
      }
  if (db)
    for (std::int64_t j = 0; j < n; ++j) {
      double acc = static_cast<double>(db[j]);
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t i = 0; i < m; ++i) acc += static_cast<double>(dy.row(s, i)[j]);
      db[j] = static_cast<T>(acc);
    }
}

// ---- activations -------------------------------------------------------------------------------

//! y = exact GELU(u) = 0.5 u (1 + erf(u / sqrt 2)); y may be u (element-wise).
template <class T>
void gelu(const Context<reference>& ctx, BatchBlock<const T, reference> u,
          BatchBlock<T, reference> y) {
  (void)ctx;
  check_batch("ops::gelu", "u", u, u.samples, u.rows, u.cols);
  check_batch("ops::gelu", "y", y, u.samples, u.rows, u.cols);
  for (std::int64_t s = 0; s < u.samples; ++s)
    for (std::int64_t i = 0; i < u.rows; ++i)
      for (std::int64_t j = 0; j < u.cols; ++j)
        y.row(s, i)[j] =
            static_cast<T>(reference_detail::gelu(static_cast<double>(u.row(s, i)[j])));
}
//! du = dy * GELU'(u), GELU'(u) = Phi(u) + u phi(u); du may be dy (element-wise).
template <class T>
void gelu_backward(const Context<reference>& ctx, BatchBlock<const T, reference> u,
                   BatchBlock<const T, reference> dy, BatchBlock<T, reference> du) {
  (void)ctx;
  constexpr const char* op = "ops::gelu_backward";
  check_batch(op, "u", u, u.samples, u.rows, u.cols);
  check_batch(op, "dy", dy, u.samples, u.rows, u.cols);
  check_batch(op, "du", du, u.samples, u.rows, u.cols);
  for (std::int64_t s = 0; s < u.samples; ++s)
    for (std::int64_t i = 0; i < u.rows; ++i)
      for (std::int64_t j = 0; j < u.cols; ++j) {
        const double g = reference_detail::gelu_grad(static_cast<double>(u.row(s, i)[j]));
        du.row(s, i)[j] = static_cast<T>(static_cast<double>(dy.row(s, i)[j]) * g);
      }
}

//! y = SiLU(u) = u sigmoid(u); y may be u (element-wise).
template <class T>
void silu(const Context<reference>& ctx, BatchBlock<const T, reference> u,
          BatchBlock<T, reference> y) {
  (void)ctx;
  check_batch("ops::silu", "u", u, u.samples, u.rows, u.cols);
  check_batch("ops::silu", "y", y, u.samples, u.rows, u.cols);
  for (std::int64_t s = 0; s < u.samples; ++s)
    for (std::int64_t i = 0; i < u.rows; ++i)
      for (std::int64_t j = 0; j < u.cols; ++j) {
        const double v = static_cast<double>(u.row(s, i)[j]);
        y.row(s, i)[j] = static_cast<T>(v * reference_detail::sigmoid(v));
      }
}
//! du = dy * SiLU'(u), SiLU'(u) = sigmoid(u) (1 + u (1 - sigmoid(u))); du may be dy.
template <class T>
void silu_backward(const Context<reference>& ctx, BatchBlock<const T, reference> u,
                   BatchBlock<const T, reference> dy, BatchBlock<T, reference> du) {
  (void)ctx;
  constexpr const char* op = "ops::silu_backward";
  check_batch(op, "u", u, u.samples, u.rows, u.cols);
  check_batch(op, "dy", dy, u.samples, u.rows, u.cols);
  check_batch(op, "du", du, u.samples, u.rows, u.cols);
  for (std::int64_t s = 0; s < u.samples; ++s)
    for (std::int64_t i = 0; i < u.rows; ++i)
      for (std::int64_t j = 0; j < u.cols; ++j) {
        const double v = static_cast<double>(u.row(s, i)[j]);
        const double sg = reference_detail::sigmoid(v);
        du.row(s, i)[j] =
            static_cast<T>(static_cast<double>(dy.row(s, i)[j]) * sg * (1.0 + v * (1.0 - sg)));
      }
}

// ---- layer norm --------------------------------------------------------------------------------

//! Over each row of z = x + r (r: optional residual, null data = none): y = (z - mean) rstd g + b,
//! mean and biased variance of the row, rstd = 1 / sqrt(var + eps); g / b null mean 1 / 0.
//! stats [S; rows, 2] receives (mean, rstd) per row (null data: not stored). y may be x or r
//! (each row is read before it is written).
template <class T>
void layer_norm(const Context<reference>& ctx, BatchBlock<const T, reference> x,
                BatchBlock<const T, reference> r, const T* g, const T* b,
                BatchBlock<T, reference> y, BatchBlock<T, reference> stats, double eps = 1e-5) {
  (void)ctx;
  constexpr const char* op = "ops::layer_norm";
  const std::int64_t S = x.samples, m = x.rows, n = x.cols;
  check_batch(op, "x", x, S, m, n);
  reference_detail::check_optional(op, "r", r, S, m, n);
  check_batch(op, "y", y, S, m, n);
  reference_detail::check_optional(op, "stats", stats, S, m, 2);
  std::vector<double> z(static_cast<std::size_t>(n));
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i) {
      const auto [mean, rstd] = reference_detail::row_stats(x, r, s, i, z.data(), eps);
      T* yr = y.row(s, i);
      for (std::int64_t j = 0; j < n; ++j) {
        double v = (z[static_cast<std::size_t>(j)] - mean) * rstd;
        if (g) v *= static_cast<double>(g[j]);
        if (b) v += static_cast<double>(b[j]);
        yr[j] = static_cast<T>(v);
      }
      if (stats.data) {
        stats.row(s, i)[0] = static_cast<T>(mean);
        stats.row(s, i)[1] = static_cast<T>(rstd);
      }
    }
}

//! Gradients of y = layer_norm(x + r) for dy: dz = d loss / d z (the gradient of x and of r)
//! written to dz (which may be dy), dg += sum dy xhat, db += sum dy (null: not wanted). The
//! reference recomputes mean and rstd in double from x + r; `stats` (the forward's, optional) is
//! checked for shape only. `eps` must be the forward's.
template <class T>
void layer_norm_backward(const Context<reference>& ctx, BatchBlock<const T, reference> x,
                         BatchBlock<const T, reference> r, const T* g,
                         BatchBlock<const T, reference> stats, BatchBlock<const T, reference> dy,
                         BatchBlock<T, reference> dz, T* dg, T* db, double eps = 1e-5) {
  (void)ctx;
  constexpr const char* op = "ops::layer_norm_backward";
  const std::int64_t S = x.samples, m = x.rows, n = x.cols;
  check_batch(op, "x", x, S, m, n);
  reference_detail::check_optional(op, "r", r, S, m, n);
  reference_detail::check_optional(op, "stats", stats, S, m, 2);
  check_batch(op, "dy", dy, S, m, n);
  check_batch(op, "dz", dz, S, m, n);
  const auto un = static_cast<std::size_t>(n);
  std::vector<double> xhat(un), gy(un), sum_g(dg ? un : 0, 0.0), sum_b(db ? un : 0, 0.0);
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t i = 0; i < m; ++i) {
      const auto [mean, rstd] = reference_detail::row_stats(x, r, s, i, xhat.data(), eps);
      double mean_gy = 0, mean_gy_xhat = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        const auto uj = static_cast<std::size_t>(j);
        xhat[uj] = (xhat[uj] - mean) * rstd;
        const double d = static_cast<double>(dy.row(s, i)[j]);
        if (dg) sum_g[uj] += d * xhat[uj];
        if (db) sum_b[uj] += d;
        gy[uj] = g ? d * static_cast<double>(g[j]) : d;
        mean_gy += gy[uj];
        mean_gy_xhat += gy[uj] * xhat[uj];
      }
      mean_gy /= static_cast<double>(n);
      mean_gy_xhat /= static_cast<double>(n);
      T* dzr = dz.row(s, i);
      for (std::int64_t j = 0; j < n; ++j) {
        const auto uj = static_cast<std::size_t>(j);
        dzr[j] = static_cast<T>(rstd * (gy[uj] - mean_gy - xhat[uj] * mean_gy_xhat));
      }
    }
  for (std::int64_t j = 0; j < n; ++j) {
    const auto uj = static_cast<std::size_t>(j);
    if (dg) dg[j] = static_cast<T>(static_cast<double>(dg[j]) + sum_g[uj]);
    if (db) db[j] = static_cast<T>(static_cast<double>(db[j]) + sum_b[uj]);
  }
}

// ---- attention ---------------------------------------------------------------------------------

//! Multi-head self-attention: qkv [S; L, 3E] (columns q | k | v, each E = heads * dh, head h at
//! columns h dh of each), out [S; L, E] = softmax(q k^T / sqrt(dh)) v per head, heads
//! concatenated.
template <class T>
void attention(const Context<reference>& ctx, BatchBlock<const T, reference> qkv,
               std::int64_t heads, BatchBlock<T, reference> out) {
  (void)ctx;
  constexpr const char* op = "ops::attention";
  const std::int64_t dh = reference_detail::head_dim(op, qkv, heads);
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3;
  check_batch(op, "qkv", qkv, S, l, 3 * e);
  check_batch(op, "out", out, S, l, e);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  std::vector<double> p;
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t h = 0; h < heads; ++h) {
      reference_detail::attention_probs(qkv, s, h, dh, scale, p);
      for (std::int64_t i = 0; i < l; ++i)
        for (std::int64_t d = 0; d < dh; ++d) {
          double acc = 0;
          for (std::int64_t j = 0; j < l; ++j)
            acc += p[static_cast<std::size_t>(i * l + j)] *
                   static_cast<double>(qkv.row(s, j)[2 * e + h * dh + d]);
          out.row(s, i)[h * dh + d] = static_cast<T>(acc);
        }
    }
}

//! Gradient of attention: dqkv [S; L, 3E] (written, every column) from dout [S; L, E].
template <class T>
void attention_backward(const Context<reference>& ctx, BatchBlock<const T, reference> qkv,
                        std::int64_t heads, BatchBlock<const T, reference> dout,
                        BatchBlock<T, reference> dqkv) {
  (void)ctx;
  constexpr const char* op = "ops::attention_backward";
  const std::int64_t dh = reference_detail::head_dim(op, qkv, heads);
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3;
  check_batch(op, "qkv", qkv, S, l, 3 * e);
  check_batch(op, "dout", dout, S, l, e);
  check_batch(op, "dqkv", dqkv, S, l, 3 * e);
  const double scale = 1.0 / std::sqrt(static_cast<double>(dh));
  const auto ul = static_cast<std::size_t>(l);
  std::vector<double> p, ds(ul * ul);
  auto at = [](const T* row, std::int64_t c) { return static_cast<double>(row[c]); };
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t cq = h * dh, ck = e + h * dh, cv = 2 * e + h * dh;
      reference_detail::attention_probs(qkv, s, h, dh, scale, p);
      // dS_ij = P_ij (dP_ij - sum_j' P_ij' dP_ij'), dP_ij = dout_i . v_j
      for (std::int64_t i = 0; i < l; ++i) {
        double delta = 0;
        for (std::int64_t j = 0; j < l; ++j) {
          double dp = 0;
          for (std::int64_t d = 0; d < dh; ++d)
            dp += at(dout.row(s, i), cq + d) * at(qkv.row(s, j), cv + d);
          ds[static_cast<std::size_t>(i * l + j)] = dp;
          delta += p[static_cast<std::size_t>(i * l + j)] * dp;
        }
        for (std::int64_t j = 0; j < l; ++j) {
          const auto ij = static_cast<std::size_t>(i * l + j);
          ds[ij] = p[ij] * (ds[ij] - delta);
        }
      }
      for (std::int64_t i = 0; i < l; ++i)
        for (std::int64_t d = 0; d < dh; ++d) {
          double dq = 0, dk = 0, dv = 0;
          for (std::int64_t j = 0; j < l; ++j) {
            const auto ij = static_cast<std::size_t>(i * l + j);
            const auto ji = static_cast<std::size_t>(j * l + i);
            dq += ds[ij] * at(qkv.row(s, j), ck + d);
            dk += ds[ji] * at(qkv.row(s, j), cq + d);
            dv += p[ji] * at(dout.row(s, j), cq + d);
          }
          dqkv.row(s, i)[cq + d] = static_cast<T>(scale * dq);
          dqkv.row(s, i)[ck + d] = static_cast<T>(scale * dk);
          dqkv.row(s, i)[cv + d] = static_cast<T>(dv);
        }
    }
}

// ---- patches -----------------------------------------------------------------------------------

//! img [S; 1, c h w] (image [c, h, w] row-major) -> cols [S; tokens, c p p]: row u (w / p) + v,
//! column (ch p + i) p + k = img[ch, u p + i, v p + k].
template <class T>
void patchify(const Context<reference>& ctx, BatchBlock<const T, reference> img, ImageGeom g,
              BatchBlock<T, reference> cols) {
  (void)ctx;
  constexpr const char* op = "ops::patchify";
  reference_detail::check_geometry(op, g);
  const std::int64_t S = img.samples, p = g.patch, gw = g.width / p;
  check_batch(op, "img", img, S, 1, g.numel());
  check_batch(op, "cols", cols, S, g.tokens(), g.features());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t u = 0; u < g.height / p; ++u)
      for (std::int64_t v = 0; v < gw; ++v)
        for (std::int64_t ch = 0; ch < g.channels; ++ch)
          for (std::int64_t i = 0; i < p; ++i)
            for (std::int64_t k = 0; k < p; ++k)
              cols.row(s, u * gw + v)[(ch * p + i) * p + k] =
                  img.row(s, 0)[(ch * g.height + u * p + i) * g.width + v * p + k];
}
//! Gradient of patchify: dimg [S; 1, c h w] (written) from dcols [S; tokens, c p p].
template <class T>
void patchify_backward(const Context<reference>& ctx, BatchBlock<const T, reference> dcols,
                       ImageGeom g, BatchBlock<T, reference> dimg) {
  (void)ctx;
  constexpr const char* op = "ops::patchify_backward";
  reference_detail::check_geometry(op, g);
  const std::int64_t S = dcols.samples, p = g.patch, gw = g.width / p;
  check_batch(op, "dcols", dcols, S, g.tokens(), g.features());
  check_batch(op, "dimg", dimg, S, 1, g.numel());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t u = 0; u < g.height / p; ++u)
      for (std::int64_t v = 0; v < gw; ++v)
        for (std::int64_t ch = 0; ch < g.channels; ++ch)
          for (std::int64_t i = 0; i < p; ++i)
            for (std::int64_t k = 0; k < p; ++k)
              dimg.row(s, 0)[(ch * g.height + u * p + i) * g.width + v * p + k] =
                  dcols.row(s, u * gw + v)[(ch * p + i) * p + k];
}

//! y [S; tokens, p p c] (column (i p + k) c + ch of token u (w / p) + v) -> img [S; 1, c h w]
//! with img[ch, u p + i, v p + k] = that element.
template <class T>
void unpatchify(const Context<reference>& ctx, BatchBlock<const T, reference> y, ImageGeom g,
                BatchBlock<T, reference> img) {
  (void)ctx;
  constexpr const char* op = "ops::unpatchify";
  reference_detail::check_geometry(op, g);
  const std::int64_t S = y.samples, p = g.patch, gw = g.width / p, c = g.channels;
  check_batch(op, "y", y, S, g.tokens(), g.features());
  check_batch(op, "img", img, S, 1, g.numel());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t u = 0; u < g.height / p; ++u)
      for (std::int64_t v = 0; v < gw; ++v)
        for (std::int64_t i = 0; i < p; ++i)
          for (std::int64_t k = 0; k < p; ++k)
            for (std::int64_t ch = 0; ch < c; ++ch)
              img.row(s, 0)[(ch * g.height + u * p + i) * g.width + v * p + k] =
                  y.row(s, u * gw + v)[(i * p + k) * c + ch];
}
//! Gradient of unpatchify: dy [S; tokens, p p c] (written) from dimg [S; 1, c h w].
template <class T>
void unpatchify_backward(const Context<reference>& ctx, BatchBlock<const T, reference> dimg,
                         ImageGeom g, BatchBlock<T, reference> dy) {
  (void)ctx;
  constexpr const char* op = "ops::unpatchify_backward";
  reference_detail::check_geometry(op, g);
  const std::int64_t S = dimg.samples, p = g.patch, gw = g.width / p, c = g.channels;
  check_batch(op, "dimg", dimg, S, 1, g.numel());
  check_batch(op, "dy", dy, S, g.tokens(), g.features());
  for (std::int64_t s = 0; s < S; ++s)
    for (std::int64_t u = 0; u < g.height / p; ++u)
      for (std::int64_t v = 0; v < gw; ++v)
        for (std::int64_t i = 0; i < p; ++i)
          for (std::int64_t k = 0; k < p; ++k)
            for (std::int64_t ch = 0; ch < c; ++ch)
              dy.row(s, u * gw + v)[(i * p + k) * c + ch] =
                  dimg.row(s, 0)[(ch * g.height + u * p + i) * g.width + v * p + k];
}

// ---- bilinear resize ---------------------------------------------------------------------------

//! Resize of the grid src [i0 i1, e] (row-major [i0, i1] of e-vectors) to dst [o0 o1, e]:
//! PyTorch's F.interpolate(mode='bilinear', align_corners=False) without anti-aliasing, with the
//! scale, source coordinates and weights computed in T as cpu_kernels::bilinear_resize does
//! and the blend of the four taps in double.
template <class T>
void bilinear_resize(const Context<reference>& ctx, RowBlock<const T, reference> src,
                     std::int64_t i0, std::int64_t i1, std::int64_t o0, std::int64_t o1,
                     RowBlock<T, reference> dst) {
  (void)ctx;
  constexpr const char* op = "ops::bilinear_resize";
  reference_detail::check_resize(op, i0, i1, o0, o1);
  const std::int64_t e = src.cols;
  reference_detail::check_rows(op, "src", src, i0 * i1, e);
  reference_detail::check_rows(op, "dst", dst, o0 * o1, e);
  const auto ty = bilinear_taps<T>(i0, o0);
  const auto tx = bilinear_taps<T>(i1, o1);
  for (std::int64_t y = 0; y < o0; ++y)
    for (std::int64_t x = 0; x < o1; ++x) {
      const auto& a = ty[static_cast<std::size_t>(y)];
      const auto& b = tx[static_cast<std::size_t>(x)];
      const T* p00 = src.data + (a.a * i1 + b.a) * src.ld;
      const T* p01 = src.data + (a.a * i1 + b.b) * src.ld;
      const T* p10 = src.data + (a.b * i1 + b.a) * src.ld;
      const T* p11 = src.data + (a.b * i1 + b.b) * src.ld;
      const double ya = static_cast<double>(a.wa), yb = static_cast<double>(a.wb);
      const double xa = static_cast<double>(b.wa), xb = static_cast<double>(b.wb);
      T* o = dst.data + (y * o1 + x) * dst.ld;
      for (std::int64_t j = 0; j < e; ++j)
        o[j] = static_cast<T>(
            ya * (xa * static_cast<double>(p00[j]) + xb * static_cast<double>(p01[j])) +
            yb * (xa * static_cast<double>(p10[j]) + xb * static_cast<double>(p11[j])));
    }
}
//! Gradient of bilinear_resize: dsrc [i0 i1, e] += the transpose of the resize applied to
//! ddst [o0 o1, e] (the same T weights, sums in double, one rounding per element).
template <class T>
void bilinear_resize_backward(const Context<reference>& ctx, RowBlock<const T, reference> ddst,
                              std::int64_t i0, std::int64_t i1, std::int64_t o0, std::int64_t o1,
                              RowBlock<T, reference> dsrc) {
  (void)ctx;
  constexpr const char* op = "ops::bilinear_resize_backward";
  reference_detail::check_resize(op, i0, i1, o0, o1);
  const std::int64_t e = ddst.cols;
  reference_detail::check_rows(op, "ddst", ddst, o0 * o1, e);
  reference_detail::check_rows(op, "dsrc", dsrc, i0 * i1, e);
  const auto ty = bilinear_taps<T>(i0, o0);
  const auto tx = bilinear_taps<T>(i1, o1);
  std::vector<double> acc(static_cast<std::size_t>(i0 * i1 * e), 0.0);
  auto add = [&](std::int64_t row, double w, const T* d) {
    double* a = acc.data() + row * e;
    for (std::int64_t j = 0; j < e; ++j) a[j] += w * static_cast<double>(d[j]);
  };
  for (std::int64_t y = 0; y < o0; ++y)
    for (std::int64_t x = 0; x < o1; ++x) {
      const auto& a = ty[static_cast<std::size_t>(y)];
      const auto& b = tx[static_cast<std::size_t>(x)];
      const double ya = static_cast<double>(a.wa), yb = static_cast<double>(a.wb);
      const double xa = static_cast<double>(b.wa), xb = static_cast<double>(b.wb);
      const T* d = ddst.data + (y * o1 + x) * ddst.ld;
      add(a.a * i1 + b.a, ya * xa, d);
      add(a.a * i1 + b.b, ya * xb, d);
      add(a.b * i1 + b.a, yb * xa, d);
      add(a.b * i1 + b.b, yb * xb, d);
    }
  for (std::int64_t r = 0; r < i0 * i1; ++r)
    for (std::int64_t j = 0; j < e; ++j) {
      T* o = dsrc.data + r * dsrc.ld + j;
      *o = static_cast<T>(static_cast<double>(*o) + acc[static_cast<std::size_t>(r * e + j)]);
    }
}

// ---- embeddings --------------------------------------------------------------------------------

//! out [S; 1, dim] = [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})] (+ one 0 when dim is odd),
//! f_k = exp(-ln(max_period) k / h), h = dim / 2 (UVIT.md §4.1), operation by operation as the
//! CPU backend and the original nn::timestep_embedding: t first cast to T, for T = float the
//! float32 arithmetic of the reference model (at t ~ 1000 one ulp of f_k moves the argument by
//! ~6e-5), for T = double every step in float64. Bit-identical to the CPU backend.
template <class T>
void timestep_embedding(const Context<reference>& ctx, std::span<const double> t,
                        BatchBlock<T, reference> out, double max_period = 10000.0) {
  (void)ctx;
  check_batch("ops::timestep_embedding", "out", out, static_cast<std::int64_t>(t.size()), 1,
              out.cols);
  for (std::int64_t s = 0; s < out.samples; ++s)
    sinusoid_row<T>(t[static_cast<std::size_t>(s)], out.cols, max_period, out.row(s, 0));
}

//! out_s = table[ids[s]] (table [V, e], out [S; 1, e], S = ids.size()); an id outside [0, V)
//! throws.
template <class T>
void gather_rows(const Context<reference>& ctx, RowBlock<const T, reference> table,
                 std::span<const std::int64_t> ids, BatchBlock<T, reference> out) {
  (void)ctx;
  constexpr const char* op = "ops::gather_rows";
  const auto S = static_cast<std::int64_t>(ids.size());
  reference_detail::check_rows(op, "table", table, table.rows, table.cols);
  check_batch(op, "out", out, S, 1, table.cols);
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t id = ids[static_cast<std::size_t>(s)];
    if (id < 0 || id >= table.rows)
      throw_mismatch(op, "ids", "id of sample " + std::to_string(s),
                     "in [0, " + std::to_string(table.rows) + ")", id);
  }
  for (std::int64_t s = 0; s < S; ++s) {
    const T* src = table.data + ids[static_cast<std::size_t>(s)] * table.ld;
    for (std::int64_t j = 0; j < table.cols; ++j) out.row(s, 0)[j] = src[j];
  }
}
//! Gradient of gather_rows: dtable[ids[s]] += dout_s for every sample (a row named by several
//! samples gets their sum, formed in double and added once).
template <class T>
void gather_rows_backward(const Context<reference>& ctx, BatchBlock<const T, reference> dout,
                          std::span<const std::int64_t> ids, RowBlock<T, reference> dtable) {
  (void)ctx;
  constexpr const char* op = "ops::gather_rows_backward";
  const auto S = static_cast<std::int64_t>(ids.size());
  reference_detail::check_rows(op, "dtable", dtable, dtable.rows, dtable.cols);
  check_batch(op, "dout", dout, S, 1, dtable.cols);
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t id = ids[static_cast<std::size_t>(s)];
    if (id < 0 || id >= dtable.rows)
      throw_mismatch(op, "ids", "id of sample " + std::to_string(s),
                     "in [0, " + std::to_string(dtable.rows) + ")", id);
  }
  for (std::int64_t s = 0; s < S; ++s) {
    const std::int64_t id = ids[static_cast<std::size_t>(s)];
    bool seen = false;
    for (std::int64_t q = 0; q < s && !seen; ++q) seen = ids[static_cast<std::size_t>(q)] == id;
    if (seen) continue;  // added with the first sample naming this row
    T* dst = dtable.data + id * dtable.ld;
    for (std::int64_t j = 0; j < dtable.cols; ++j) {
      double acc = static_cast<double>(dst[j]);
      for (std::int64_t q = s; q < S; ++q)
        if (ids[static_cast<std::size_t>(q)] == id) acc += static_cast<double>(dout.row(q, 0)[j]);
      dst[j] = static_cast<T>(acc);
    }
  }
}

// ---- batch reductions and copies ---------------------------------------------------------------

//! y_s += a for every sample (a [rows, cols], y [S; rows, cols]).
template <class T>
void add_rows(const Context<reference>& ctx, RowBlock<const T, reference> a,
              BatchBlock<T, reference> y) {
  (void)ctx;
  constexpr const char* op = "ops::add_rows";
  reference_detail::check_rows(op, "a", a, a.rows, a.cols);
  check_batch(op, "y", y, y.samples, a.rows, a.cols);
  for (std::int64_t s = 0; s < y.samples; ++s)
    for (std::int64_t i = 0; i < a.rows; ++i)
      for (std::int64_t j = 0; j < a.cols; ++j) {
        T* o = y.row(s, i) + j;
        *o = static_cast<T>(static_cast<double>(*o) + static_cast<double>(a.data[i * a.ld + j]));
      }
}
//! da += sum_s dy_s (dy [S; rows, cols], da [rows, cols]): the gradient of add_rows.
template <class T>
void sum_samples(const Context<reference>& ctx, BatchBlock<const T, reference> dy,
                 RowBlock<T, reference> da) {
  (void)ctx;
  constexpr const char* op = "ops::sum_samples";
  reference_detail::check_rows(op, "da", da, da.rows, da.cols);
  check_batch(op, "dy", dy, dy.samples, da.rows, da.cols);
  for (std::int64_t i = 0; i < da.rows; ++i)
    for (std::int64_t j = 0; j < da.cols; ++j) {
      T* o = da.data + i * da.ld + j;
      double acc = static_cast<double>(*o);
      for (std::int64_t s = 0; s < dy.samples; ++s) acc += static_cast<double>(dy.row(s, i)[j]);
      *o = static_cast<T>(acc);
    }
}

//! dst = src, sample by sample (same [S; rows, cols]; no overlap).
template <class T>
void copy(const Context<reference>& ctx, BatchBlock<const T, reference> src,
          BatchBlock<T, reference> dst) {
  (void)ctx;
  check_batch("ops::copy", "src", src, src.samples, src.rows, src.cols);
  check_batch("ops::copy", "dst", dst, src.samples, src.rows, src.cols);
  for (std::int64_t s = 0; s < src.samples; ++s)
    for (std::int64_t i = 0; i < src.rows; ++i)
      for (std::int64_t j = 0; j < src.cols; ++j) dst.row(s, i)[j] = src.row(s, i)[j];
}
//! dst += src (same [S; rows, cols]; dst may be src element-wise).
template <class T>
void add(const Context<reference>& ctx, BatchBlock<const T, reference> src,
         BatchBlock<T, reference> dst) {
  (void)ctx;
  check_batch("ops::add", "src", src, src.samples, src.rows, src.cols);
  check_batch("ops::add", "dst", dst, src.samples, src.rows, src.cols);
  for (std::int64_t s = 0; s < src.samples; ++s)
    for (std::int64_t i = 0; i < src.rows; ++i)
      for (std::int64_t j = 0; j < src.cols; ++j) {
        T* o = dst.row(s, i) + j;
        *o = static_cast<T>(static_cast<double>(*o) + static_cast<double>(src.row(s, i)[j]));
      }
}

// ---- execution helpers -------------------------------------------------------------------------

//! Runs a network pass over `samples` samples: f(ctx, first, end) processes samples
//! [first, end). The reference runs them serially, as one call f(ctx, 0, samples) (none when
//! samples <= 0, as on the CPU). `whole_samples` (the CPU backend's scheduling choice) is
//! accepted so that generic code compiles against either backend; it changes nothing here.
template <class F>
void run_samples(const Context<reference>& ctx, std::int64_t samples, F&& f,
                 bool whole_samples = true) {
  (void)whole_samples;
  if (samples <= 0) return;
  f(ctx, std::int64_t{0}, samples);
}
//! Runs f() once (on the CPU, once per parallel region; here simply once).
template <class F>
void once(const Context<reference>& ctx, F&& f) {
  (void)ctx;
  f();
}

}  // namespace unidiffuser::ops
