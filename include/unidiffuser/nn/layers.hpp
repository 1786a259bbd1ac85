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
#include <unsupported/Eigen/SpecialFunctions>
#include <vector>

#include "unidiffuser/config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace unidiffuser::nn::cpu_kernels {

//! Threads the element-wise kernels may use (all of OpenMP's, or 1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

//! Workspace storage aligned like Eigen's packets (results must not depend on where a buffer
//! lands).
template <class T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

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
//! biased variance, two-pass statistics in the accumulation type), rows in parallel.
template <class T>
void layer_norm(T* x, std::int64_t m, std::int64_t n, const T* r, const T* g, const T* b,
                double eps = 1e-5) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  const CRow G(g, n), Bv(b, n);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (m * n >= 32768)
#endif
  for (std::int64_t i = 0; i < m; ++i) {
    Row row(x + i * n, n);
    if (r) row += CRow(r + i * n, n);
    const T mean = row.sum() / static_cast<T>(n);
    const T var = (row - mean).square().sum() / static_cast<T>(n);
    const T inv = T(1) / std::sqrt(var + static_cast<T>(eps));
    row = (row - mean) * inv * G + Bv;
  }
}

//! y = GELU(y + bias) over rows of y [M, N] (bias may be null): exact erf GELU
//! 0.5 u (1 + erf(u / sqrt 2)) with Eigen's vectorised erf, rows in parallel.
template <class T>
void bias_gelu(T* y, std::int64_t m, std::int64_t n, const T* bias) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  const T r = static_cast<T>(0.70710678118654752440);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (m * n >= 32768)
#endif
  for (std::int64_t i = 0; i < m; ++i) {
    Row row(y + i * n, n);
    if (bias) row += CRow(bias, n);
    row = T(0.5) * row * (T(1) + (row * r).erf());
  }
}
//! Exact GELU in place over n contiguous values.
template <class T>
void gelu(T* x, std::int64_t n) {
  bias_gelu<T>(x, 1, n, nullptr);
}

//! SiLU u sigmoid(u), in place.
template <class T>
void silu(T* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) x[i] = x[i] / (T(1) + std::exp(-x[i]));
}

//! Per-thread scratch of attention(): a multiple of 16 elements, so that every thread's buffer has
//! the same (64-byte) alignment and the vectorised reductions take the same path whichever thread
//! handles a (sample, head) pair -- results do not depend on scheduling.
inline std::int64_t attention_scratch(std::int64_t l, std::int64_t block) {
  return (std::min(block, l) * l + 15) / 16 * 16;
}

//! Multi-head attention over a batch: qkv [B, L, 3E] in the fused (k, h, d) channel layout,
//! out [B, L, E] (heads concatenated). Scores are formed `block` query rows at a time, so each
//! thread's score buffer is [block, L], never [L, L] per head; (sample, head) pairs run in
//! parallel. `scores` needs max_threads() * attention_scratch(L, block) elements, 64-byte aligned.
template <class T>
void attention(const T* qkv, std::int64_t batch, std::int64_t l, std::int64_t e, std::int64_t heads,
               T* out, T* scores, std::int64_t block) {
  const std::int64_t dh = e / heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic) if (batch * heads > 1)
#endif
  for (std::int64_t bh = 0; bh < batch * heads; ++bh) {
    const std::int64_t b = bh / heads, h = bh % heads;
    const T* base = qkv + b * l * 3 * e;
    T* sc = scores + static_cast<std::int64_t>(thread_id()) * attention_scratch(l, block);
    CMapRM<T> K(base + e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
    CMapRM<T> V(base + 2 * e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
    for (std::int64_t q0 = 0; q0 < l; q0 += block) {
      const std::int64_t rb = std::min(block, l - q0);
      CMapRM<T> Q(base + q0 * 3 * e + h * dh, rb, dh, Eigen::OuterStride<>(3 * e));
      MapRM<T> S(sc, rb, l, Eigen::OuterStride<>(l));
      S.noalias() = (Q * K.transpose()) * scale;
      for (std::int64_t i = 0; i < rb; ++i) {
        auto row = S.row(i).array();
        row = (row - row.maxCoeff()).exp();
        row *= T(1) / row.sum();
      }
      MapRM<T> O(out + (b * l + q0) * e + h * dh, rb, dh, Eigen::OuterStride<>(e));
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
