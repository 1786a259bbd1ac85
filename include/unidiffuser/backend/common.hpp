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
#include <string>
#include <vector>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
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

//! Argument checks shared by the CPU and CUDA backends (the reference backend keeps its own,
//! independent ones: it is the oracle). Each throws an unidiffuser::error naming `op`.
namespace checks {
//! Two blocks of the same [rows, cols].
template <class A, class B>
void same_block(const char* op, const A& a, const B& b) {
  if (a.rows != b.rows || a.cols != b.cols)
    throw error(op, "operands",
                "block shapes differ: [" + std::to_string(a.rows) + ", " + std::to_string(a.cols) +
                    "] vs [" + std::to_string(b.rows) + ", " + std::to_string(b.cols) + "]");
}
//! An image of whole patch x patch squares.
inline void geometry(const char* op, const ImageGeom& g) {
  if (g.channels < 1 || g.patch < 1 || g.height < g.patch || g.width < g.patch ||
      g.height % g.patch || g.width % g.patch)
    throw error(op, "geometry",
                "image [" + std::to_string(g.channels) + ", " + std::to_string(g.height) + ", " +
                    std::to_string(g.width) + "] is not a whole number of " +
                    std::to_string(g.patch) + "x" + std::to_string(g.patch) + " patches");
}
//! Contiguous grids [i0 i1, e] -> [o0 o1, e] of a bilinear resize.
template <class A, class B>
void resize(const char* op, const A& src, std::int64_t i0, std::int64_t i1, const B& dst,
            std::int64_t o0, std::int64_t o1) {
  if (i0 < 1 || i1 < 1 || o0 < 1 || o1 < 1 || src.rows != i0 * i1 || dst.rows != o0 * o1 ||
      src.cols != dst.cols || src.ld != src.cols || dst.ld != dst.cols)
    throw error(op, "grids",
                "expected contiguous [" + std::to_string(i0 * i1) + ", e] -> [" +
                    std::to_string(o0 * o1) + ", e]; got [" + std::to_string(src.rows) + ", " +
                    std::to_string(src.cols) + "] -> [" + std::to_string(dst.rows) + ", " +
                    std::to_string(dst.cols) + "]");
}
//! A fused qkv of `cols` columns = 3 x heads x head dim.
inline void heads(const char* op, std::int64_t cols, std::int64_t heads) {
  if (heads < 1 || cols % 3 || (cols / 3) % heads)
    throw error(op, "qkv",
                "columns " + std::to_string(cols) + " are not 3 x heads (" + std::to_string(heads) +
                    ") x head dim");
}
//! Row indices into a table of `rows` rows.
inline void row_ids(const char* op, std::span<const std::int64_t> ids, std::int64_t rows) {
  for (std::size_t s = 0; s < ids.size(); ++s)
    if (ids[s] < 0 || ids[s] >= rows)
      throw_mismatch(op, "ids", "row index", "0.." + std::to_string(rows - 1), ids[s]);
}
//! An image [S; 1, c h w] and its patch rows [S; tokens, c p p] (names for the message).
template <class I, class C>
void patches(const char* op, const ImageGeom& g, const I& img, const char* img_name, const C& cols,
             const char* cols_name) {
  geometry(op, g);
  const std::int64_t S = img.samples;
  check_batch(op, img_name, img, S, 1, g.numel());
  check_batch(op, cols_name, cols, S, g.tokens(), g.features());
}
//! Layer norm operands: x [S; rows, n], r (optional) and y alike, stats (optional) [S; rows, 2]
//! with contiguous rows.
template <class X, class R, class Y, class St>
void layer_norm(const char* op, const X& x, const R& r, const Y& y, const St& stats) {
  check_batch(op, "y", y, x.samples, x.rows, x.cols);
  if (r) check_batch(op, "r", r, x.samples, x.rows, x.cols);
  if (stats) check_batch(op, "stats", stats, x.samples, x.rows, 2);
  if (stats && stats.ld != 2) throw error(op, "stats", "rows of stats must be contiguous (ld 2)");
}
//! Layer norm backward operands: r (optional), dy and dz like x [S; rows, n]; stats [S; rows, 2]
//! with contiguous rows.
template <class X, class R, class St, class D, class Z>
void layer_norm_backward(const char* op, const X& x, const R& r, const St& stats, const D& dy,
                         const Z& dz) {
  const std::int64_t S = x.samples, m = x.rows, n = x.cols;
  if (r) check_batch(op, "r", r, S, m, n);
  check_batch(op, "stats", stats, S, m, 2);
  check_batch(op, "dy", dy, S, m, n);
  check_batch(op, "dz", dz, S, m, n);
  if (stats.ld != 2) throw error(op, "stats", "rows of stats must be contiguous (ld 2)");
}
}  // namespace checks

//! A weight matrix W [rows, cols] (contiguous rows: ld = cols) that a network lets its
//! LinearCache pack in the matrix's own storage, used by `linear` as `pieces` weights side by
//! side (piece p: columns [p cols / pieces, (p + 1) cols / pieces)).
template <class T, class Backend>
struct InPlaceWeight {
  RowBlock<T, Backend> w;
  std::int64_t pieces = 1;
};

//! A backend's cache of prepared (e.g. reordered) weight matrices for `linear`, for one math
//! mode each (MathMode::fp32 or a 16-bit mode). The primary template prepares nothing; the CPU
//! backend packs weights for oneDNN (fp32, or bf16 where the CPU has it), as copies or in place.
template <class T, class Backend>
class LinearCache {
 public:
  static constexpr bool available = false;
  static constexpr bool in_place_available = false;
  void prepare(std::span<const RowBlock<const T, Backend>>, MathMode = MathMode::fp32) {}
  void pack_in_place(std::span<const InPlaceWeight<T, Backend>>, MathMode = MathMode::fp32) {}
  void unpack_in_place() {}
  bool packed_in_place() const { return false; }
  void clear() {}
  void invalidate() {}
  bool empty() const { return true; }
  bool ready(MathMode) const { return false; }
  std::int64_t packed_elements() const { return 0; }
};

}  // namespace unidiffuser::ops
