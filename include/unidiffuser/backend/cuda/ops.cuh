// SPDX-License-Identifier: Apache-2.0
//! \file ops.cuh
//! The element-wise, noise and optimiser primitives of the CUDA backend (the twins of
//! backend/cpu/ops.hpp): every operand is device memory; per-call host scalars (coefficients)
//! travel as kernel arguments, per-row host arrays through stream-ordered scratch. Results that
//! the interface returns to the host (squared_error_rows, all_finite, sum_squares) wait for the
//! stream. Reductions sum in a fixed order (deterministic run to run).
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cuda/runtime.cuh"
#include "unidiffuser/core/rng.hpp"

namespace unidiffuser::ops {

namespace cuda_ops_detail {
template <class T>
struct Terms {
  const T* x[6];
  std::int64_t ld[6];
  T c[6];
  int n;
};
// Per-row sums of f(r, j) over j (one block of 256 threads per row, fixed tree order): out[r].
template <class F>
__global__ void row_sum_kernel(std::int64_t rows, std::int64_t cols, F f, double* out) {
  __shared__ double part[256];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    double acc = 0;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) acc += f(r, j);
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
      if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
      __syncthreads();
    }
    if (threadIdx.x == 0) out[r] = part[0];
    __syncthreads();
  }
}
template <class F>
void row_sums(const Context<cuda>& ctx, std::int64_t rows, std::int64_t cols, F f, double* out,
              const char* op) {
  if (rows <= 0) return;
  row_sum_kernel<<<cuda_detail::grid_for(rows, 1), 256, 0, ctx.stream>>>(rows, cols, f, out);
  cuda_detail::check_launch(op);
}
}  // namespace cuda_ops_detail

//! dst = value.
template <class T>
void fill(const Context<cuda>& ctx, RowBlock<T, cuda> dst, T value) {
  const std::int64_t cols = dst.cols, ld = dst.ld;
  T* d = dst.data;
  cuda_detail::for_each(
      ctx, dst.rows * cols,
      [=] __device__(std::int64_t i) { d[(i / cols) * ld + i % cols] = value; }, "ops::fill");
}
template <class T>
void fill(const Context<cuda>& ctx, TensorView<T, cuda> dst, T value) {
  fill(ctx, as_rows(dst), value);
}

//! dst = src, block by block (device to device; no overlap).
template <class T>
void copy(const Context<cuda>& ctx, RowBlock<const T, cuda> src, RowBlock<T, cuda> dst) {
  checks::same_block("ops::copy", src, dst);
  if (src.rows * src.cols == 0) return;
  if (src.rows == 1) {
    cuda_detail::check(cudaMemcpyAsync(dst.data, src.data, src.cols * sizeof(T),
                                       cudaMemcpyDeviceToDevice, ctx.stream),
                       "ops::copy", "cudaMemcpyAsync");
    return;
  }
  cuda_detail::check(
      cudaMemcpy2DAsync(dst.data, dst.ld * sizeof(T), src.data, src.ld * sizeof(T),
                        src.cols * sizeof(T), src.rows, cudaMemcpyDeviceToDevice, ctx.stream),
      "ops::copy", "cudaMemcpy2DAsync");
}
template <class T>
void copy(const Context<cuda>& ctx, TensorView<const T, cuda> src, TensorView<T, cuda> dst) {
  if (src.size() != dst.size())
    throw_mismatch("ops::copy", "dst", "element count", src.size(), dst.size());
  if (src.size() == 0 || src.data() == dst.data()) return;
  cuda_detail::check(cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(T),
                                     cudaMemcpyDeviceToDevice, ctx.stream),
                     "ops::copy", "cudaMemcpyAsync");
}

//! dst = sum_k coef_k * x_k (coefficients rounded to T; dst may alias any x_k element-wise).
template <class T>
void lincomb(const Context<cuda>& ctx, RowBlock<T, cuda> dst,
             std::initializer_list<Term<T, cuda>> terms) {
  if (terms.size() == 0 || terms.size() > 6)
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  cuda_ops_detail::Terms<T> t{};
  for (const auto& term : terms) {
    checks::same_block("ops::lincomb", term.x, dst);
    t.x[t.n] = term.x.data;
    t.ld[t.n] = term.x.ld;
    t.c[t.n] = static_cast<T>(term.coef);
    ++t.n;
  }
  const std::int64_t cols = dst.cols, ld = dst.ld;
  T* d = dst.data;
  cuda_detail::for_each(
      ctx, dst.rows * cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t r = i / cols, j = i % cols;
        T acc = t.c[0] * t.x[0][r * t.ld[0] + j];
        for (int k = 1; k < t.n; ++k) acc += t.c[k] * t.x[k][r * t.ld[k] + j];
        d[r * ld + j] = acc;
      },
      "ops::lincomb");
}
template <class T>
void lincomb(const Context<cuda>& ctx, TensorView<T, cuda> dst,
             std::initializer_list<std::pair<double, TensorView<const T, cuda>>> terms) {
  if (terms.size() == 0 || terms.size() > 6)
    throw error("ops::lincomb", "terms", "between 1 and 6 terms are supported");
  Term<T, cuda> t[6];
  int n = 0;
  for (const auto& p : terms) t[n++] = Term<T, cuda>{p.first, as_rows(p.second)};
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

//! dst[r, :] = a[r] x[r, :] + b[r] y[r, :] in double, rounded once (a, b: host arrays of rows).
template <class T>
void axpby_rows(const Context<cuda>& ctx, RowBlock<T, cuda> dst, const double* a,
                RowBlock<const T, cuda> x, const double* b, RowBlock<const T, cuda> y) {
  checks::same_block("ops::axpby_rows", x, dst);
  checks::same_block("ops::axpby_rows", y, dst);
  if (dst.rows * dst.cols == 0) return;
  std::vector<double> ab(static_cast<std::size_t>(2 * dst.rows));
  for (std::int64_t r = 0; r < dst.rows; ++r) {
    ab[static_cast<std::size_t>(r)] = a[r];
    ab[static_cast<std::size_t>(dst.rows + r)] = b[r];
  }
  const auto s = cuda_detail::upload(ctx, ab.data(), ab.size(), "ops::axpby_rows");
  const double* pa = s.as<double>();
  const std::int64_t rows = dst.rows, cols = dst.cols, ld = dst.ld, xl = x.ld, yl = y.ld;
  T* d = dst.data;
  const T *px = x.data, *py = y.data;
  cuda_detail::for_each(
      ctx, rows * cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t r = i / cols, j = i % cols;
        d[r * ld + j] = static_cast<T>(pa[r] * static_cast<double>(px[r * xl + j]) +
                                       pa[rows + r] * static_cast<double>(py[r * yl + j]));
      },
      "ops::axpby_rows");
}

//! Standard normal noise: dst[r, j] = philox_normal(key.seed, key.stream, sample0 + r, j) (the
//! host's function compiled for the device: the same Philox bits; Box-Muller's log and sincos
//! agree with the host's to a few float ulps).
template <class T>
void random_normal(const Context<cuda>& ctx, RowBlock<T, cuda> dst, NoiseKey key,
                   std::uint64_t sample0) {
  const std::int64_t cols = dst.cols, ld = dst.ld, blocks = (cols + 3) / 4;
  T* d = dst.data;
  cuda_detail::for_each(
      ctx, dst.rows * blocks,
      [=] __device__(std::int64_t i) {
        const std::int64_t r = i / blocks, blk = i % blocks;
        const Normal4 n =
            philox_normal4(key.seed, key.stream, sample0 + static_cast<std::uint64_t>(r),
                           static_cast<std::uint64_t>(blk));
        for (int k = 0; k < 4 && blk * 4 + k < cols; ++k)
          d[r * ld + blk * 4 + k] = static_cast<T>(n.v[k]);
      },
      "ops::random_normal");
}

//! out[r] = sum_j (x[r, j] - y[r, j])^2 in double (out: host array; waits for the stream).
template <class T>
void squared_error_rows(const Context<cuda>& ctx, RowBlock<const T, cuda> x,
                        RowBlock<const T, cuda> y, double* out) {
  checks::same_block("ops::squared_error_rows", x, y);
  if (x.rows == 0) return;
  cuda_detail::Scratch s(ctx, static_cast<std::size_t>(x.rows) * sizeof(double),
                         "ops::squared_error_rows");
  const T *px = x.data, *py = y.data;
  const std::int64_t xl = x.ld, yl = y.ld;
  cuda_ops_detail::row_sums(
      ctx, x.rows, x.cols,
      [=] __device__(std::int64_t r, std::int64_t j) {
        const double d = static_cast<double>(px[r * xl + j]) - static_cast<double>(py[r * yl + j]);
        return d * d;
      },
      s.as<double>(), "ops::squared_error_rows");
  cuda_detail::download(ctx, s.as<double>(), out, static_cast<std::size_t>(x.rows),
                        "ops::squared_error_rows");
}

//! True if every element is finite (waits for the stream).
template <class T>
bool all_finite(const Context<cuda>& ctx, RowBlock<const T, cuda> x) {
  if (x.rows * x.cols == 0) return true;
  cuda_detail::Scratch s(ctx, sizeof(int), "ops::all_finite");
  int* flag = s.as<int>();
  cuda_detail::check(cudaMemsetAsync(flag, 0, sizeof(int), ctx.stream), "ops::all_finite",
                     "memset");
  const T* p = x.data;
  const std::int64_t cols = x.cols, ld = x.ld;
  cuda_detail::for_each(
      ctx, x.rows * cols,
      [=] __device__(std::int64_t i) {
        const double v = static_cast<double>(p[(i / cols) * ld + i % cols]);
        if (!isfinite(v)) *flag = 1;
      },
      "ops::all_finite");
  int h = 0;
  cuda_detail::download(ctx, flag, &h, 1, "ops::all_finite");
  return h == 0;
}

//! One AdamW step over n contiguous device values (see AdamWStep; the CPU backend's formula).
template <class T>
void adamw_update(const Context<cuda>& ctx, T* p, const T* g, T* m, T* v, std::int64_t n,
                  const AdamWStep& s) {
  const T lr = static_cast<T>(s.lr), b1 = static_cast<T>(s.beta1), b2 = static_cast<T>(s.beta2);
  const T ob1 = static_cast<T>(1 - s.beta1), ob2 = static_cast<T>(1 - s.beta2);
  const T ic1 = static_cast<T>(1 / s.c1), ic2 = static_cast<T>(1 / s.c2),
          eps = static_cast<T>(s.eps), keep = static_cast<T>(1 - s.lr * s.weight_decay);
  cuda_detail::for_each(
      ctx, n,
      [=] __device__(std::int64_t j) {
        const T gj = g[j];
        const T mj = b1 * m[j] + ob1 * gj;
        const T vj = b2 * v[j] + ob2 * gj * gj;
        m[j] = mj;
        v[j] = vj;
        p[j] = keep * p[j] - lr * (mj * ic1) / (sqrt(vj * ic2) + eps);
      },
      "ops::adamw_update");
}

//! Sum of squares of n contiguous device values in double, in fixed chunks of 4096 summed in
//! order (deterministic; waits for the stream).
template <class T>
double sum_squares(const Context<cuda>& ctx, const T* x, std::int64_t n) {
  if (n <= 0) return 0;
  const std::int64_t chunk = 4096, nch = (n + chunk - 1) / chunk;
  cuda_detail::Scratch s(ctx, static_cast<std::size_t>(nch) * sizeof(double), "ops::sum_squares");
  cuda_ops_detail::row_sums(
      ctx, nch, chunk,
      [=] __device__(std::int64_t c, std::int64_t j) {
        const std::int64_t i = c * chunk + j;
        const double v = i < n ? static_cast<double>(x[i]) : 0.0;
        return v * v;
      },
      s.as<double>(), "ops::sum_squares");
  std::vector<double> part(static_cast<std::size_t>(nch));
  cuda_detail::download(ctx, s.as<double>(), part.data(), part.size(), "ops::sum_squares");
  double total = 0;
  for (double v : part) total += v;
  return total;
}

}  // namespace unidiffuser::ops
