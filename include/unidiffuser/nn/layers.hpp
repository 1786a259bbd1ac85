// SPDX-License-Identifier: Apache-2.0
//! \file layers.hpp
//! CPU kernels of the U-ViT layers, over raw row-major blocks (pointer, rows, cols, leading
//! dimension) so that the network can address sub-blocks (one head, one component) without
//! copies. GEMMs go through Eigen. Ref: UVIT.md §4.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "unidiffuser/config.hpp"

namespace unidiffuser::nn::cpu_kernels {

template <class T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MapRM = Eigen::Map<RowMat<T>, 0, Eigen::OuterStride<>>;
template <class T>
using CMapRM = Eigen::Map<const RowMat<T>, 0, Eigen::OuterStride<>>;

//! y[M, N] (+)= x[M, K] W[N, K]^T (+ b[N]): nn.Linear with row-major weight [out, in].
template <class T>
void linear(const T* x, std::int64_t m, std::int64_t k, std::int64_t ldx, const T* w,
            std::int64_t n, std::int64_t ldw, const T* b, T* y, std::int64_t ldy,
            bool accumulate = false) {
  CMapRM<T> X(x, m, k, Eigen::OuterStride<>(ldx));
  CMapRM<T> W(w, n, k, Eigen::OuterStride<>(ldw));
  MapRM<T> Y(y, m, n, Eigen::OuterStride<>(ldy));
  if (accumulate)
    Y.noalias() += X * W.transpose();
  else
    Y.noalias() = X * W.transpose();
  if (b) Y.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(b, n);
}

//! In place over rows of x [M, N]: x = LayerNorm(x (+ r)) with gain g and bias b (eps 1e-5,
//! biased variance); statistics accumulated in double.
template <class T>
void layer_norm(T* x, std::int64_t m, std::int64_t n, const T* r, const T* g, const T* b,
                double eps = 1e-5) {
  for (std::int64_t i = 0; i < m; ++i) {
    T* row = x + i * n;
    if (r)
      for (std::int64_t j = 0; j < n; ++j) row[j] += r[i * n + j];
    double mean = 0;
    for (std::int64_t j = 0; j < n; ++j) mean += static_cast<double>(row[j]);
    mean /= static_cast<double>(n);
    double var = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      const double d = static_cast<double>(row[j]) - mean;
      var += d * d;
    }
    var /= static_cast<double>(n);
    const T inv = static_cast<T>(1.0 / std::sqrt(var + eps));
    const T mu = static_cast<T>(mean);
    for (std::int64_t j = 0; j < n; ++j) row[j] = (row[j] - mu) * inv * g[j] + b[j];
  }
}

//! Exact GELU 0.5 u (1 + erf(u / sqrt 2)), in place.
template <class T>
void gelu(T* x, std::int64_t n) {
  const T r = static_cast<T>(0.70710678118654752440);
  for (std::int64_t i = 0; i < n; ++i)
    x[i] = static_cast<T>(0.5) * x[i] * (T(1) + std::erf(x[i] * r));
}

//! SiLU u sigmoid(u), in place.
template <class T>
void silu(T* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) x[i] = x[i] / (T(1) + std::exp(-x[i]));
}

//! Multi-head attention for one sample: qkv [L, 3E] in the fused (k, h, d) channel layout,
//! out [L, E] (heads concatenated). Scores are formed `block` query rows at a time, so the score
//! buffer is [block, L], never [L, L] per head. `scores` needs block * L elements.
template <class T>
void attention(const T* qkv, std::int64_t l, std::int64_t e, std::int64_t heads, T* out, T* scores,
               std::int64_t block) {
  const std::int64_t dh = e / heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
  for (std::int64_t h = 0; h < heads; ++h) {
    CMapRM<T> K(qkv + e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
    CMapRM<T> V(qkv + 2 * e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
    for (std::int64_t q0 = 0; q0 < l; q0 += block) {
      const std::int64_t rb = std::min(block, l - q0);
      CMapRM<T> Q(qkv + q0 * 3 * e + h * dh, rb, dh, Eigen::OuterStride<>(3 * e));
      MapRM<T> S(scores, rb, l, Eigen::OuterStride<>(l));
      S.noalias() = (Q * K.transpose()) * scale;
      for (std::int64_t i = 0; i < rb; ++i) {
        T* s = scores + i * l;
        T mx = s[0];
        for (std::int64_t j = 1; j < l; ++j) mx = std::max(mx, s[j]);
        T sum = 0;
        for (std::int64_t j = 0; j < l; ++j) {
          s[j] = std::exp(s[j] - mx);
          sum += s[j];
        }
        const T inv = T(1) / sum;
        for (std::int64_t j = 0; j < l; ++j) s[j] *= inv;
      }
      MapRM<T> O(out + q0 * e + h * dh, rb, dh, Eigen::OuterStride<>(e));
      O.noalias() = S * V;
    }
  }
}

//! im2col of one latent img [C, H, W] into patches [(H/p)(W/p), C p p] in (c, i, k) order.
template <class T>
void patchify_conv(const T* img, std::int64_t c, std::int64_t h, std::int64_t w, std::int64_t p,
                   T* out) {
  const std::int64_t gw = w / p, pd = c * p * p;
  for (std::int64_t u = 0; u < h / p; ++u)
    for (std::int64_t v = 0; v < gw; ++v) {
      T* o = out + (u * gw + v) * pd;
      for (std::int64_t ch = 0; ch < c; ++ch)
        for (std::int64_t i = 0; i < p; ++i)
          for (std::int64_t k = 0; k < p; ++k) *o++ = img[(ch * h + u * p + i) * w + v * p + k];
    }
}

//! unpatchify of one sample: y [(H/p)(W/p), p p C] in (i, k, c) order -> img [C, H, W].
template <class T>
void unpatchify(const T* y, std::int64_t ldy, std::int64_t c, std::int64_t h, std::int64_t w,
                std::int64_t p, T* img) {
  const std::int64_t gw = w / p;
  for (std::int64_t u = 0; u < h / p; ++u)
    for (std::int64_t v = 0; v < gw; ++v) {
      const T* yr = y + (u * gw + v) * ldy;
      for (std::int64_t i = 0; i < p; ++i)
        for (std::int64_t k = 0; k < p; ++k)
          for (std::int64_t ch = 0; ch < c; ++ch)
            img[(ch * h + u * p + i) * w + v * p + k] = yr[(i * p + k) * c + ch];
    }
}

//! Bilinear resize of a row-major grid q [I0, I1, E] to [O0, O1, E], PyTorch's
//! F.interpolate(mode='bilinear', align_corners=False) without anti-aliasing (UVIT.md §4.5).
template <class T>
void bilinear_resize(const T* q, std::int64_t i0, std::int64_t i1, std::int64_t e, std::int64_t o0,
                     std::int64_t o1, T* out) {
  struct Tap {
    std::int64_t a, b;
    T wa, wb;
  };
  auto taps = [](std::int64_t in, std::int64_t on) {
    std::vector<Tap> t(static_cast<std::size_t>(on));
    // the reference's scale and source coordinate are in the accumulation type (float for float)
    const T scale = static_cast<T>(in) / static_cast<T>(on);
    for (std::int64_t o = 0; o < on; ++o) {
      T src = (static_cast<T>(o) + T(0.5)) * scale - T(0.5);
      if (src < 0) src = 0;
      const auto a = static_cast<std::int64_t>(std::floor(src));
      const std::int64_t b = std::min(a + 1, in - 1);
      const T wb = src - static_cast<T>(a);
      t[static_cast<std::size_t>(o)] = {a, b, T(1) - wb, wb};
    }
    return t;
  };
  const auto ty = taps(i0, o0), tx = taps(i1, o1);
  for (std::int64_t y = 0; y < o0; ++y)
    for (std::int64_t x = 0; x < o1; ++x) {
      const Tap& a = ty[static_cast<std::size_t>(y)];
      const Tap& b = tx[static_cast<std::size_t>(x)];
      T* o = out + (y * o1 + x) * e;
      const T* p00 = q + (a.a * i1 + b.a) * e;
      const T* p01 = q + (a.a * i1 + b.b) * e;
      const T* p10 = q + (a.b * i1 + b.a) * e;
      const T* p11 = q + (a.b * i1 + b.b) * e;
      for (std::int64_t j = 0; j < e; ++j)
        o[j] = a.wa * (b.wa * p00[j] + b.wb * p01[j]) + a.wb * (b.wa * p10[j] + b.wb * p11[j]);
    }
}

}  // namespace unidiffuser::nn::cpu_kernels
