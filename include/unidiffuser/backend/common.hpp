// SPDX-License-Identifier: Apache-2.0
//! \file common.hpp
//! Backend-neutral vocabulary of the primitives: the terms of a linear combination, the
//! epilogue of a linear layer and the geometry of a patched image. Every backend implements the
//! same set of primitives (backend/<name>/ops.hpp and nn.hpp) by overload on its Context.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::ops {

//! One term of a linear combination: coefficient times a block.
template <class T, class Backend = cpu>
struct Term {
  double coef;
  RowBlock<const T, Backend> x;
};

//! What a linear layer does after x W^T + b: store it, store GELU(it) (exact erf GELU
//! 0.5 u (1 + erf(u / sqrt 2))), or add it to the output.
enum class Epilogue { none, gelu, accumulate };

//! A latent image [channels, height, width] cut into patch x patch squares: tokens() patches in
//! row-major (u, v) order. patchify gives each its features in (c, i, k) order (the conv weight's
//! [out, c, i, k] layout); the decoder's linear gives them in (i, k, c) order (UVIT.md §4.4, §4.7).
struct ImageGeom {
  std::int64_t channels = 0, height = 0, width = 0, patch = 1;
  constexpr std::int64_t tokens() const { return (height / patch) * (width / patch); }
  constexpr std::int64_t features() const { return channels * patch * patch; }
  constexpr std::int64_t numel() const { return channels * height * width; }
};

//! The source taps of one output coordinate of a bilinear resize along one axis: rows a and b
//! with weights wa, wb. PyTorch's align_corners=False coordinates, with the scale and the source
//! coordinate in T as the reference computes them (float for float; UVIT.md §4.5). Shared by every
//! backend: it defines which grid points are read, not how the blend is computed.
template <class T>
struct BilinearTap {
  std::int64_t a, b;
  T wa, wb;
};
template <class T>
std::vector<BilinearTap<T>> bilinear_taps(std::int64_t in, std::int64_t on) {
  std::vector<BilinearTap<T>> t(static_cast<std::size_t>(on));
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
}

//! One sinusoidal time embedding o[0, dim) = [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})] (+ one 0
//! when dim is odd), f_k = exp(-ln(max_period) k / h), h = dim / 2 (UVIT.md §4.1): for T = float
//! the reference float32 recipe operation by operation (q_k = fl(fl(-ln 1e4 * k) / h), f_k =
//! fl(exp(q_k)), a_k = fl(t f_k), cos / sin of the float argument) -- at t ~ 1000 one ulp of f_k
//! moves the argument by ~6e-5 -- for T = double every step in float64. Shared by every backend
//! (it is the definition of the embedding, element by element).
template <class T>
void sinusoid_row(double t, std::int64_t dim, double max_period, T* o) {
  const std::int64_t half = dim / 2;
  const T tb = static_cast<T>(t);
  for (std::int64_t k = 0; k < half; ++k) {
    const T q =
        static_cast<T>(static_cast<T>(-std::log(static_cast<T>(max_period))) * static_cast<T>(k)) /
        static_cast<T>(half);
    const T f = static_cast<T>(std::exp(q));
    const T a = static_cast<T>(tb * f);
    o[k] = static_cast<T>(std::cos(static_cast<double>(a)));
    o[half + k] = static_cast<T>(std::sin(static_cast<double>(a)));
  }
  if (dim % 2) o[dim - 1] = T(0);
}

//! Coefficients of one AdamW step (PyTorch's AdamW): p -= lr wd p; m = b1 m + (1 - b1) g;
//! v = b2 v + (1 - b2) g^2; p -= lr (m / c1) / (sqrt(v / c2) + eps) with the bias corrections
//! c1 = 1 - b1^t, c2 = 1 - b2^t. Scalars in double, applied in the parameter type.
struct AdamWStep {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  double c1 = 1, c2 = 1;
};

//! A backend's cache of prepared (e.g. reordered) copies of weight matrices for `linear`. The
//! primary template prepares nothing; the CPU backend packs fp32 weights for oneDNN.
template <class T, class Backend>
class LinearCache {
 public:
  static constexpr bool available = false;
  void prepare(std::span<const RowBlock<const T, Backend>>) {}
  void clear() {}
  bool empty() const { return true; }
  std::int64_t packed_elements() const { return 0; }
};

}  // namespace unidiffuser::ops
