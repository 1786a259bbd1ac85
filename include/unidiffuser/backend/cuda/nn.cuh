// SPDX-License-Identifier: Apache-2.0
//! \file nn.cuh
//! The network primitives of the CUDA backend (the twins of backend/cpu/nn.hpp, same
//! signatures with Context<cuda> and device operands): linear layers through cuBLASLt, layer
//! norm with CUB warp reductions, the fused attention of attention.cuh, activations, patches,
//! positional tables and embeddings as small kernels. Parameter-gradient reductions (bias, norm
//! gains, positional table, tokens) sum in a fixed order: results are the same run to run.
#pragma once

#include <cub/warp/warp_reduce.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cuda/attention.cuh"
#include "unidiffuser/backend/cuda/attention_tc.cuh"
#include "unidiffuser/backend/cuda/attention_tc_backward.cuh"
#include "unidiffuser/backend/cuda/gemm.cuh"
#include "unidiffuser/backend/cuda/ops.cuh"
#include "unidiffuser/backend/cuda/runtime.cuh"

namespace unidiffuser {
namespace cuda_detail {

template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

//! Element i of a batch block in (sample, row, column) order (32-bit divisions where the
//! numbers fit: several times cheaper than 64-bit ones, which element-wise kernels would
//! otherwise be bound by).
template <class P>
__device__ inline std::int64_t batch_offset(const P& b, std::int64_t i) {
  const std::int64_t per = b.rows * b.cols;
  if (((per | i) >> 32) == 0) {
    const std::uint32_t ui = static_cast<std::uint32_t>(i), up = static_cast<std::uint32_t>(per),
                        uc = static_cast<std::uint32_t>(b.cols);
    const std::uint32_t s = ui / up, rem = ui - s * up, r = rem / uc;
    return s * b.stride + r * b.ld + (rem - r * uc);
  }
  const std::int64_t s = i / per, rem = i % per;
  return s * b.stride + (rem / b.cols) * b.ld + rem % b.cols;
}

// Column sums over `rows` rows: out(c, sum_r f(r, c)) for c < cols, rows summed in fixed chunks
// of kColChunk (8 row lanes each, then the chunks in order): deterministic.
inline constexpr std::int64_t kColChunk = 256;
template <class Acc, class F>
__global__ void col_partial_kernel(std::int64_t rows, std::int64_t cols, F f, Acc* part) {
  __shared__ Acc sh[8][33];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * kColChunk,
                     r1 = r0 + kColChunk < rows ? r0 + kColChunk : rows;
  Acc acc = 0;
  if (c < cols)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += f(r, c);
  sh[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    Acc s = 0;
    for (int y = 0; y < 8; ++y) s += sh[y][threadIdx.x];
    part[static_cast<std::int64_t>(blockIdx.y) * cols + c] = s;
  }
}
template <class Acc, class G>
__global__ void col_finish_kernel(std::int64_t chunks, std::int64_t cols, const Acc* part, G out) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  Acc s = 0;
  for (std::int64_t k = 0; k < chunks; ++k) s += part[k * cols + c];
  out(c, s);
}
template <class Acc, class F, class G>
void column_sums(const Context<cuda>& ctx, std::int64_t rows, std::int64_t cols, F f, G out,
                 const char* op) {
  if (cols <= 0) return;
  const std::int64_t chunks = std::max<std::int64_t>(1, (rows + kColChunk - 1) / kColChunk);
  if (chunks > 65535) throw error(op, "rows", "too many rows for the column reduction");
  Scratch part(ctx, static_cast<std::size_t>(chunks * cols) * sizeof(Acc), op);
  col_partial_kernel<Acc>
      <<<dim3(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(chunks)), dim3(32, 8),
         0, ctx.stream>>>(rows, cols, f, part.template as<Acc>());
  check_launch(op);
  col_finish_kernel<Acc><<<static_cast<unsigned>((cols + 255) / 256), 256, 0, ctx.stream>>>(
      chunks, cols, part.template as<Acc>(), out);
  check_launch(op);
}

// Layer norm, one warp per row: z = x (+ r); y = (z - mean) rstd g + b; stats (mean, rstd).
template <class T>
__global__ void layer_norm_kernel(BatchBlock<const T, cuda> x, BatchBlock<const T, cuda> r,
                                  const T* g, const T* b, BatchBlock<T, cuda> y,
                                  BatchBlock<T, cuda> stats, double eps) {
  using Acc = acc_t<T>;
  using WR = cub::WarpReduce<Acc>;
  __shared__ typename WR::TempStorage tmp[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * 8 + warp;
  if (row >= x.samples * x.rows) return;
  const std::int64_t s = row / x.rows, i = row % x.rows, n = x.cols;
  const T* xr = x.data + s * x.stride + i * x.ld;
  const T* rr = r.data ? r.data + s * r.stride + i * r.ld : nullptr;
  T* yr = y.data + s * y.stride + i * y.ld;
  auto z = [&](std::int64_t j) { return rr ? static_cast<T>(xr[j] + rr[j]) : xr[j]; };
  Acc sum = 0;
  for (std::int64_t j = lane; j < n; j += 32) sum += static_cast<Acc>(z(j));
  const Acc mean = __shfl_sync(0xffffffffu, WR(tmp[warp]).Sum(sum), 0) / static_cast<Acc>(n);
  Acc sq = 0;
  for (std::int64_t j = lane; j < n; j += 32) {
    const Acc d = static_cast<Acc>(z(j)) - mean;
    sq += d * d;
  }
  __syncwarp();
  const Acc var = __shfl_sync(0xffffffffu, WR(tmp[warp]).Sum(sq), 0) / static_cast<Acc>(n);
  const Acc inv = Acc(1) / sqrt(var + static_cast<Acc>(eps));
  for (std::int64_t j = lane; j < n; j += 32)
    yr[j] = static_cast<T>((static_cast<Acc>(z(j)) - mean) * inv * static_cast<Acc>(g[j]) +
                           static_cast<Acc>(b[j]));
  if (stats.data && lane == 0) {
    T* st = stats.data + s * stats.stride + i * 2;
    st[0] = static_cast<T>(mean);
    st[1] = static_cast<T>(inv);
  }
}
// The same for float rows of at most 128 C columns whose blocks (and g, b) allow 16-byte
// accesses: the row (x + r) read once into registers, 4 columns per lane and chunk, then
// the mean, the variance about it and the output from the registers (one read, one write).
template <int C>
__global__ void layer_norm_rows4_kernel(BatchBlock<const float, cuda> x,
                                        BatchBlock<const float, cuda> r, const float* g,
                                        const float* b, BatchBlock<float, cuda> y,
                                        BatchBlock<float, cuda> stats, float eps) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * 8 + warp;
  if (row >= x.samples * x.rows) return;
  const std::int64_t s = row / x.rows, i = row % x.rows;
  const int n4 = static_cast<int>(x.cols / 4);
  const float* xr = x.data + s * x.stride + i * x.ld;
  const float* rr = r.data ? r.data + s * r.stride + i * r.ld : nullptr;
  float* yr = y.data + s * y.stride + i * y.ld;
  float4 v[C];
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int j4 = lane + 32 * k;
    v[k] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (j4 < n4) {
      v[k] = reinterpret_cast<const float4*>(xr)[j4];
      if (rr) {
        const float4 a = reinterpret_cast<const float4*>(rr)[j4];
        v[k] = make_float4(v[k].x + a.x, v[k].y + a.y, v[k].z + a.z, v[k].w + a.w);
      }
      sum += (v[k].x + v[k].y) + (v[k].z + v[k].w);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float mean = sum / static_cast<float>(x.cols);
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < C; ++k)
    if (lane + 32 * k < n4) {
      const float dx = v[k].x - mean, dy = v[k].y - mean, dz = v[k].z - mean, dw = v[k].w - mean;
      sq += (dx * dx + dy * dy) + (dz * dz + dw * dw);
    }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
  const float var = sq / static_cast<float>(x.cols);
  const float inv = 1.f / sqrtf(var + eps);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int j4 = lane + 32 * k;
    if (j4 < n4) {
      const float4 gg = reinterpret_cast<const float4*>(g)[j4];
      const float4 bb = reinterpret_cast<const float4*>(b)[j4];
      reinterpret_cast<float4*>(yr)[j4] =
          make_float4((v[k].x - mean) * inv * gg.x + bb.x, (v[k].y - mean) * inv * gg.y + bb.y,
                      (v[k].z - mean) * inv * gg.z + bb.z, (v[k].w - mean) * inv * gg.w + bb.w);
    }
  }
  if (stats.data && lane == 0) {
    float* st = stats.data + s * stats.stride + i * 2;
    st[0] = mean;
    st[1] = inv;
  }
}
// dz = rstd (dy g - mean(dy g) - xhat mean(dy g xhat)); dz may be dy.
template <class T>
__global__ void layer_norm_backward_kernel(BatchBlock<const T, cuda> x, BatchBlock<const T, cuda> r,
                                           const T* g, BatchBlock<const T, cuda> stats,
                                           BatchBlock<const T, cuda> dy, BatchBlock<T, cuda> dz) {
  using Acc = acc_t<T>;
  using WR = cub::WarpReduce<Acc>;
  __shared__ typename WR::TempStorage tmp[8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * 8 + warp;
  if (row >= x.samples * x.rows) return;
  const std::int64_t s = row / x.rows, i = row % x.rows, n = x.cols;
  const T* xr = x.data + s * x.stride + i * x.ld;
  const T* rr = r.data ? r.data + s * r.stride + i * r.ld : nullptr;
  const T* dr = dy.data + s * dy.stride + i * dy.ld;
  T* zr = dz.data + s * dz.stride + i * dz.ld;
  const T* st = stats.data + s * stats.stride + i * 2;
  const Acc mean = static_cast<Acc>(st[0]), rstd = static_cast<Acc>(st[1]);
  auto xhat = [&](std::int64_t j) {
    const T z = rr ? static_cast<T>(xr[j] + rr[j]) : xr[j];
    return (static_cast<Acc>(z) - mean) * rstd;
  };
  Acc s1 = 0, s2 = 0;
  for (std::int64_t j = lane; j < n; j += 32) {
    const Acc gy = static_cast<Acc>(dr[j]) * static_cast<Acc>(g[j]);
    s1 += gy;
    s2 += gy * xhat(j);
  }
  s1 = __shfl_sync(0xffffffffu, WR(tmp[warp]).Sum(s1), 0) / static_cast<Acc>(n);
  __syncwarp();
  s2 = __shfl_sync(0xffffffffu, WR(tmp[warp]).Sum(s2), 0) / static_cast<Acc>(n);
  for (std::int64_t j = lane; j < n; j += 32) {
    const Acc gy = static_cast<Acc>(dr[j]) * static_cast<Acc>(g[j]);
    zr[j] = static_cast<T>(rstd * (gy - s1 - xhat(j) * s2));
  }
}

template <class T>
__device__ inline T gelu_exact(T u) {
  return T(0.5) * u * (T(1) + erf(u * T(0.70710678118654752440)));
}

// fp32 rows [S; rows, cols] -> packed 16-bit [S rows, cols] (round to nearest even).
template <class H>
void round_rows(const Context<cuda>& ctx, BatchBlock<const float, cuda> src, std::uint16_t* dst,
                const char* op) {
  round_rows_into<H>(ctx, src.data, src.samples, src.rows, src.cols, src.ld, src.stride, dst, op);
}
inline bool mixed(const Context<cuda>& ctx) {
  return ctx.math == MathMode::bf16 || ctx.math == MathMode::fp16;
}

}  // namespace cuda_detail

namespace ops {

//! The CUDA backend's weight cache: 16-bit copies (bf16 and / or fp16) of the registered fp32
//! weight matrices for the mixed-precision math modes, each made on first use and kept until
//! clear() (a network clears it when its parameters change). Thread-safe: a copy made on one
//! stream is waited for (an event) by products enqueued on another.
template <>
class LinearCache<float, cuda> {
 public:
  static constexpr bool available = true;
  //! The 16-bit copies are always copies: nothing is packed in place on this backend.
  static constexpr bool in_place_available = false;
  void pack_in_place(std::span<const InPlaceWeight<float, cuda>>) {}
  void unpack_in_place() {}
  bool packed_in_place() const { return false; }
  void prepare(std::span<const RowBlock<const float, cuda>> weights) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& w : weights) map_.try_emplace(w.data, Entry{w, {}, {}});  // copies: lazily
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
  }
  //! The weights changed: the 16-bit copies are dropped (made again lazily).
  void invalidate() { clear(); }
  bool empty() const {
    std::lock_guard<std::mutex> lock(mu_);
    return map_.empty();
  }
  //! Elements held in 16-bit copies.
  std::int64_t packed_elements() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::int64_t n = 0;
    for (const auto& [p, e] : map_) n += e.bf16.t.size() + e.fp16.t.size();
    return n;
  }
  //! The packed [n, k] 16-bit copy of registered weight w for a mixed mode (made on ctx's stream
  //! on first use; later users on any stream wait for it), or null when w is not registered.
  const std::uint16_t* rounded(const Context<cuda>& ctx, const float* w) const {
    const char* op = "LinearCache<cuda>";
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(w);
    if (it == map_.end()) return nullptr;
    Entry& e = it->second;
    const bool bf = ctx.math == MathMode::bf16;
    Copy& c = bf ? e.bf16 : e.fp16;
    if (c.t.size() == 0) {
      c.t = Tensor<std::uint16_t, cuda>(Shape{e.w.rows, e.w.cols});
      const BatchBlock<const float, cuda> src(e.w.data, 1, e.w.rows, e.w.cols, e.w.ld, 0);
      if (bf)
        cuda_detail::round_rows<bfloat16_t>(ctx, src, c.t.data(), op);
      else
        cuda_detail::round_rows<half_t>(ctx, src, c.t.data(), op);
      cuda_detail::check(cudaEventCreateWithFlags(&c.ready.e, cudaEventDisableTiming), op, "event");
      cuda_detail::check(cudaEventRecord(c.ready.e, ctx.stream), op, "event");
    } else {
      cuda_detail::check(cudaStreamWaitEvent(ctx.stream, c.ready.e, 0), op, "wait for the copy");
    }
    return c.t.data();
  }

 private:
  struct Event {  // owns a CUDA event
    cudaEvent_t e = nullptr;
    Event() = default;
    Event(Event&& o) noexcept : e(std::exchange(o.e, nullptr)) {}
    Event& operator=(Event&& o) noexcept {
      std::swap(e, o.e);
      return *this;
    }
    ~Event() {
      if (e) (void)cudaEventDestroy(e);
    }
  };
  struct Copy {
    Tensor<std::uint16_t, cuda> t;
    Event ready;
  };
  struct Entry {
    RowBlock<const float, cuda> w;
    Copy bf16, fp16;
  };
  mutable std::mutex mu_;
  mutable std::map<const float*, Entry> map_;
};

// ---------------------------------------------------------------------------------------------
// Execution

//! A network pass over `samples` samples: one call over the whole batch (the device runs the
//! samples of each primitive in parallel).
template <class F>
void run_samples(const Context<cuda>& ctx, std::int64_t samples, F&& f, bool whole_samples = true) {
  (void)whole_samples;
  if (samples > 0) f(ctx, std::int64_t{0}, samples);
}
//! Runs f once on the calling thread.
template <class F>
void once(const Context<cuda>&, F&& f) {
  f();
}

// ---------------------------------------------------------------------------------------------
// Linear layers

namespace cuda_nn_detail {
template <class B>
bool packed_samples(const B& b) {
  return b.samples <= 1 || b.stride == b.rows * b.ld;
}

// Mixed precision y (+)= x w^T + b: x rounded to H, w16 the packed [n, k] 16-bit weight; fp32
// accumulation and result.
template <class H>
void mixed_linear(const Context<cuda>& ctx, BatchBlock<const float, cuda> x,
                  const std::uint16_t* w16, std::int64_t k, std::int64_t n, const float* b,
                  BatchBlock<float, cuda> y, bool accumulate, const char* op) {
  const std::int64_t S = x.samples, m = x.rows;
  cuda_detail::Scratch xs(ctx, static_cast<std::size_t>(S * m * k) * 2, op);
  cuda_detail::round_rows<H>(ctx, x, xs.template as<std::uint16_t>(), op);
  cuda_detail::Gemm<H, float> g;
  g.ta = true;
  g.a = {reinterpret_cast<const H*>(w16), k, n, k, 0};
  const bool fold = packed_samples(y);
  g.b = {xs.template as<const H>(), k, fold ? S * m : m, k, m * k};
  g.d = {y.data, n, fold ? S * m : m, y.ld, y.stride};
  g.batch = fold ? 1 : S;
  g.bias = b;
  g.beta = accumulate ? 1.0 : 0.0;
  cuda_detail::gemm(ctx, g, op);
}

// Mixed precision backward products: dx (+)= dy w and dw += x^T dy with 16-bit operands.
template <class H>
void mixed_linear_backward(const Context<cuda>& ctx, BatchBlock<const float, cuda> x,
                           RowBlock<const float, cuda> w, BatchBlock<const float, cuda> dy,
                           BatchBlock<float, cuda> dx, bool accumulate_dx, RowBlock<float, cuda> dw,
                           const char* op) {
  const std::int64_t S = dy.samples, m = dy.rows, k = w.cols, n = w.rows;
  cuda_detail::Scratch dys(ctx, static_cast<std::size_t>(S * m * n) * 2, op);
  cuda_detail::round_rows<H>(ctx, dy, dys.template as<std::uint16_t>(), op);
  if (dx) {
    cuda_detail::Scratch wt(ctx, static_cast<std::size_t>(n * k) * 2, op);
    cuda_detail::round_rows<H>(ctx, BatchBlock<const float, cuda>(w.data, 1, n, k, w.ld, 0),
                               wt.template as<std::uint16_t>(), op);
    cuda_detail::Gemm<H, float> g;
    const bool fold = packed_samples(dx);
    g.a = {wt.template as<const H>(), k, n, k, 0};
    g.b = {dys.template as<const H>(), n, fold ? S * m : m, n, m * n};
    g.d = {dx.data, k, fold ? S * m : m, dx.ld, dx.stride};
    g.batch = fold ? 1 : S;
    g.beta = accumulate_dx ? 1.0 : 0.0;
    cuda_detail::gemm(ctx, g, op);
  }
  if (dw.data) {
    cuda_detail::Scratch xs(ctx, static_cast<std::size_t>(S * m * k) * 2, op);
    cuda_detail::round_rows<H>(ctx, x, xs.template as<std::uint16_t>(), op);
    cuda_detail::Gemm<H, float> g;
    g.tb = true;
    g.a = {xs.template as<const H>(), k, S * m, k, 0};
    g.b = {dys.template as<const H>(), n, S * m, n, 0};
    g.d = {dw.data, k, n, dw.ld, 0};
    g.beta = 1.0;
    cuda_detail::gemm(ctx, g, op);
  }
}
}  // namespace cuda_nn_detail

namespace cuda_nn_detail {
// out = f(u) (dy null) or out = dy * f(u), element by element over [S; rows, cols] (out may
// alias u or dy: one element per thread).
template <class T, class F>
void activation(const Context<cuda>& ctx, BatchBlock<const T, cuda> u, BatchBlock<const T, cuda> dy,
                BatchBlock<T, cuda> out, F f, const char* op) {
  if (dy.data) check_batch(op, "dy", dy, u.samples, u.rows, u.cols);
  check_batch(op, dy.data ? "du" : "y", out, u.samples, u.rows, u.cols);
  if constexpr (std::is_same_v<T, float>) {  // 4 columns per thread where the layouts allow
    if (cuda_detail::chunks4(u) && cuda_detail::chunks4(out) &&
        (!dy.data || cuda_detail::chunks4(dy))) {
      cuda_detail::for_each_chunk4(
          ctx, u.samples, u.rows, u.cols,
          [=] __device__(std::uint32_t, std::uint32_t s, std::uint32_t r, std::uint32_t j) {
            float4 a = *reinterpret_cast<const float4*>(u.data + s * u.stride + r * u.ld + j);
            a = make_float4(f(a.x), f(a.y), f(a.z), f(a.w));
            if (dy.data) {
              const float4 d =
                  *reinterpret_cast<const float4*>(dy.data + s * dy.stride + r * dy.ld + j);
              a = make_float4(d.x * a.x, d.y * a.y, d.z * a.z, d.w * a.w);
            }
            *reinterpret_cast<float4*>(out.data + s * out.stride + r * out.ld + j) = a;
          },
          op);
      return;
    }
  }
  cuda_detail::for_each(
      ctx, u.samples * u.rows * u.cols,
      [=] __device__(std::int64_t i) {
        const T v = f(u.data[cuda_detail::batch_offset(u, i)]);
        out.data[cuda_detail::batch_offset(out, i)] =
            dy.data ? dy.data[cuda_detail::batch_offset(dy, i)] * v : v;
      },
      op);
}
}  // namespace cuda_nn_detail

//! y_s = x_s w^T + b (none), GELU of it (gelu, exact erf), or y_s += x_s w^T + b (accumulate):
//! one cuBLASLt product over the batch (bias in its epilogue; the erf GELU as a kernel).
template <class T>
void linear(const Context<cuda>& ctx, BatchBlock<const T, cuda> x, RowBlock<const T, cuda> w,
            const T* b, BatchBlock<T, cuda> y, Epilogue ep,
            const LinearCache<T, cuda>* cache = nullptr) {
  const char* op = "ops::linear";
  check_batch(op, "x", x, x.samples, x.rows, w.cols);
  check_batch(op, "y", y, x.samples, x.rows, w.rows);
  const std::int64_t S = x.samples, m = x.rows, k = w.cols, n = w.rows;
  if (S * m == 0 || n == 0) return;
  cuda_detail::Gemm<T> g;
  g.ta = true;  // op(A) = W [n, k] (stored column-major as [k, n])
  g.a = {w.data, k, n, w.ld, 0};
  const bool fold = cuda_nn_detail::packed_samples(x) && cuda_nn_detail::packed_samples(y);
  g.b = {x.data, k, fold ? S * m : m, x.ld, x.stride};
  g.d = {y.data, n, fold ? S * m : m, y.ld, y.stride};
  g.batch = fold ? 1 : S;
  g.bias = b;
  g.beta = ep == Epilogue::accumulate ? 1.0 : 0.0;
  bool done = false;
  if constexpr (std::is_same_v<T, float>) {
    // mixed modes: 16-bit operands for the weights registered in the network's cache (the block
    // GEMMs); embeddings and heads, where rounding goes straight into the outputs, stay fp32
    const std::uint16_t* wh =
        k > 0 && cuda_detail::mixed(ctx) && cache ? cache->rounded(ctx, w.data) : nullptr;
    if (wh) {
      const bool acc = ep == Epilogue::accumulate;
      if (ctx.math == MathMode::bf16)
        cuda_nn_detail::mixed_linear<bfloat16_t>(ctx, x, wh, k, n, b, y, acc, op);
      else
        cuda_nn_detail::mixed_linear<half_t>(ctx, x, wh, k, n, b, y, acc, op);
      done = true;
    }
  }
  if (done) {
  } else if (k == 0) {  // y = b (or += b): no product
    const T* bias = b;
    T* yd = y.data;
    const BatchBlock<T, cuda> yb = y;
    const bool acc = ep == Epilogue::accumulate;
    cuda_detail::for_each(
        ctx, S * m * n,
        [=] __device__(std::int64_t i) {
          const std::int64_t off = cuda_detail::batch_offset(yb, i);
          const T v = bias ? bias[i % yb.cols] : T(0);
          yd[off] = acc ? static_cast<T>(yd[off] + v) : v;
        },
        op);
  } else {
    cuda_detail::gemm(ctx, g, op);
  }
  if (ep == Epilogue::gelu)
    cuda_nn_detail::activation<T>(
        ctx, BatchBlock<const T, cuda>(y), {}, y,
        [] __device__(T v) { return cuda_detail::gelu_exact(v); }, op);
}

//! Backward of linear: dx_s (+)= dy_s w; dw += sum_s dy_s^T x_s; db += column sums of dy (each
//! optional). Products through cuBLASLt; db by a fixed-order column reduction.
template <class T>
void linear_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> x,
                     RowBlock<const T, cuda> w, BatchBlock<const T, cuda> dy,
                     BatchBlock<T, cuda> dx, bool accumulate_dx, RowBlock<T, cuda> dw, T* db) {
  const char* op = "ops::linear_backward";
  const std::int64_t S = dy.samples, m = dy.rows, k = w.cols, n = w.rows;
  check_batch(op, "dy", dy, S, m, n);
  if (S * m == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (cuda_detail::mixed(ctx) && n > 0 && k > 0) {
      if (dx) check_batch(op, "dx", dx, S, m, k);
      if (dw.data) {
        check_batch(op, "x", x, S, m, k);
        if (dw.rows != n || dw.cols != k)
          throw_mismatch(op, "dw", "shape",
                         "[" + std::to_string(n) + ", " + std::to_string(k) + "]",
                         "[" + std::to_string(dw.rows) + ", " + std::to_string(dw.cols) + "]");
      }
      if (ctx.math == MathMode::bf16)
        cuda_nn_detail::mixed_linear_backward<bfloat16_t>(ctx, x, w, dy, dx, accumulate_dx, dw, op);
      else
        cuda_nn_detail::mixed_linear_backward<half_t>(ctx, x, w, dy, dx, accumulate_dx, dw, op);
      dx = BatchBlock<T, cuda>{};  // done: only the bias sums remain
      dw = RowBlock<T, cuda>{};
    }
  }
  if (dx) {
    check_batch(op, "dx", dx, S, m, k);
    if (n == 0) {
      if (!accumulate_dx)
        for (std::int64_t s = 0; s < S; ++s) fill(ctx, dx.sample(s), T(0));
    } else if (k > 0) {
      // dX^T [k, rows] = W^T [k, n] dY^T [n, rows] (column-major views)
      cuda_detail::Gemm<T> g;
      const bool fold = cuda_nn_detail::packed_samples(dy) && cuda_nn_detail::packed_samples(dx);
      g.a = {w.data, k, n, w.ld, 0};
      g.b = {dy.data, n, fold ? S * m : m, dy.ld, dy.stride};
      g.d = {dx.data, k, fold ? S * m : m, dx.ld, dx.stride};
      g.batch = fold ? 1 : S;
      g.beta = accumulate_dx ? 1.0 : 0.0;
      cuda_detail::gemm(ctx, g, op);
    }
  }
  if (dw.data) {
    check_batch(op, "x", x, S, m, k);
    if (dw.rows != n || dw.cols != k)
      throw_mismatch(op, "dw", "shape", "[" + std::to_string(n) + ", " + std::to_string(k) + "]",
                     "[" + std::to_string(dw.rows) + ", " + std::to_string(dw.cols) + "]");
    if (n > 0 && k > 0) {
      // dW^T [k, n] += X^T [k, rows] dY [rows, n] (column-major views; dY transposed)
      const bool fold = cuda_nn_detail::packed_samples(dy) && cuda_nn_detail::packed_samples(x);
      for (std::int64_t s = 0; s < (fold ? 1 : S); ++s) {
        cuda_detail::Gemm<T> g;
        g.tb = true;
        g.a = {x.data + s * x.stride, k, fold ? S * m : m, x.ld, 0};
        g.b = {dy.data + s * dy.stride, n, fold ? S * m : m, dy.ld, 0};
        g.d = {dw.data, k, n, dw.ld, 0};
        g.beta = 1.0;
        cuda_detail::gemm(ctx, g, op);
      }
    }
  }
  if (db && n > 0) {
    using Acc = cuda_detail::acc_t<T>;
    const BatchBlock<const T, cuda> d = dy;
    cuda_detail::column_sums<Acc>(
        ctx, S * m, n,
        [=] __device__(std::int64_t r, std::int64_t c) {
          return static_cast<Acc>(d.data[(r / d.rows) * d.stride + (r % d.rows) * d.ld + c]);
        },
        [=] __device__(std::int64_t c, Acc v) { db[c] = static_cast<T>(db[c] + v); }, op);
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise activations

//! y = GELU(u) (exact erf); y may be u.
template <class T>
void gelu(const Context<cuda>& ctx, BatchBlock<const T, cuda> u, BatchBlock<T, cuda> y) {
  cuda_nn_detail::activation<T>(
      ctx, u, {}, y, [] __device__(T v) { return cuda_detail::gelu_exact(v); }, "ops::gelu");
}
//! du = dy GELU'(u), GELU'(u) = Phi(u) + u phi(u); du may be dy.
template <class T>
void gelu_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> u,
                   BatchBlock<const T, cuda> dy, BatchBlock<T, cuda> du) {
  cuda_nn_detail::activation<T>(
      ctx, u, dy, du,
      [] __device__(T v) {
        const T cdf = T(0.5) * (T(1) + erf(v * T(0.70710678118654752440)));
        return cdf + v * (T(0.39894228040143267794) * exp(T(-0.5) * v * v));
      },
      "ops::gelu_backward");
}
//! y = u sigmoid(u); y may be u.
template <class T>
void silu(const Context<cuda>& ctx, BatchBlock<const T, cuda> u, BatchBlock<T, cuda> y) {
  cuda_nn_detail::activation<T>(
      ctx, u, {}, y, [] __device__(T v) { return v / (T(1) + exp(-v)); }, "ops::silu");
}
//! du = dy s (1 + u (1 - s)), s = sigmoid(u); du may be dy.
template <class T>
void silu_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> u,
                   BatchBlock<const T, cuda> dy, BatchBlock<T, cuda> du) {
  cuda_nn_detail::activation<T>(
      ctx, u, dy, du,
      [] __device__(T v) {
        const T sg = T(1) / (T(1) + exp(-v));
        return sg * (T(1) + v * (T(1) - sg));
      },
      "ops::silu_backward");
}

// ---------------------------------------------------------------------------------------------
// Layer norm

//! y = LayerNorm(x + r) per row (r null: x); stats [S; rows, 2] (optional, ld 2) receives
//! (mean, rstd). y may be x.
template <class T>
void layer_norm(const Context<cuda>& ctx, BatchBlock<const T, cuda> x, BatchBlock<const T, cuda> r,
                const T* g, const T* b, BatchBlock<T, cuda> y, BatchBlock<T, cuda> stats,
                double eps = 1e-5) {
  const char* op = "ops::layer_norm";
  checks::layer_norm(op, x, r, y, stats);
  const std::int64_t rows = x.samples * x.rows;
  if (rows == 0) return;
  const auto grid = static_cast<unsigned>((rows + 7) / 8);
  if constexpr (std::is_same_v<T, float>) {
    const auto al16 = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
    if (x.cols <= 2048 && cuda_detail::chunks4(x) && cuda_detail::chunks4(y) &&
        (!r.data || cuda_detail::chunks4(r)) && al16(g) && al16(b)) {
      if (x.cols <= 512)
        cuda_detail::layer_norm_rows4_kernel<4>
            <<<grid, 256, 0, ctx.stream>>>(x, r, g, b, y, stats, static_cast<float>(eps));
      else
        cuda_detail::layer_norm_rows4_kernel<16>
            <<<grid, 256, 0, ctx.stream>>>(x, r, g, b, y, stats, static_cast<float>(eps));
      cuda_detail::check_launch(op);
      return;
    }
  }
  cuda_detail::layer_norm_kernel<T><<<grid, 256, 0, ctx.stream>>>(x, r, g, b, y, stats, eps);
  cuda_detail::check_launch(op);
}
//! Backward of layer_norm: dz written (may be dy); dg += sum dy xhat, db += sum dy (optional).
template <class T>
void layer_norm_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> x,
                         BatchBlock<const T, cuda> r, const T* g, BatchBlock<const T, cuda> stats,
                         BatchBlock<const T, cuda> dy, BatchBlock<T, cuda> dz, T* dg, T* db) {
  const char* op = "ops::layer_norm_backward";
  const std::int64_t S = x.samples, m = x.rows, n = x.cols;
  checks::layer_norm_backward(op, x, r, stats, dy, dz);
  if (S * m == 0) return;
  using Acc = cuda_detail::acc_t<T>;
  if (dg || db) {  // before dz: dz may overwrite dy
    const BatchBlock<const T, cuda> xb = x, rb = r, sb = stats, db_ = dy;
    auto xhat = [=] __device__(std::int64_t row, std::int64_t c) {
      const std::int64_t s = row / xb.rows, i = row % xb.rows;
      T z = xb.data[s * xb.stride + i * xb.ld + c];
      if (rb.data) z = static_cast<T>(z + rb.data[s * rb.stride + i * rb.ld + c]);
      const T* st = sb.data + s * sb.stride + i * 2;
      return (static_cast<Acc>(z) - static_cast<Acc>(st[0])) * static_cast<Acc>(st[1]);
    };
    auto dyv = [=] __device__(std::int64_t row, std::int64_t c) {
      return static_cast<Acc>(
          db_.data[(row / db_.rows) * db_.stride + (row % db_.rows) * db_.ld + c]);
    };
    if (dg)
      cuda_detail::column_sums<Acc>(
          ctx, S * m, n,
          [=] __device__(std::int64_t row, std::int64_t c) { return dyv(row, c) * xhat(row, c); },
          [=] __device__(std::int64_t c, Acc v) { dg[c] = static_cast<T>(dg[c] + v); }, op);
    if (db)
      cuda_detail::column_sums<Acc>(
          ctx, S * m, n, dyv,
          [=] __device__(std::int64_t c, Acc v) { db[c] = static_cast<T>(db[c] + v); }, op);
  }
  cuda_detail::layer_norm_backward_kernel<T>
      <<<static_cast<unsigned>((S * m + 7) / 8), 256, 0, ctx.stream>>>(x, r, g, stats, dy, dz);
  cuda_detail::check_launch(op);
}

// ---------------------------------------------------------------------------------------------
// Attention

namespace cuda_nn_detail {
inline dim3 attn_grid(std::int64_t S, std::int64_t heads, std::int64_t l, const char* op) {
  if (S > 65535 || heads > 65535) throw error(op, "qkv", "more than 65535 samples or heads");
  return dim3(
      static_cast<unsigned>((l + cuda_detail::kAttnThreads - 1) / cuda_detail::kAttnThreads),
      static_cast<unsigned>(heads), static_cast<unsigned>(S));
}
}  // namespace cuda_nn_detail

//! Multi-head self-attention: qkv [S; L, 3E] (q | k | v), out [S; L, E]; fused, no [L, L]
//! buffer (attention.cuh).
template <class T>
void attention(const Context<cuda>& ctx, BatchBlock<const T, cuda> qkv, std::int64_t heads,
               BatchBlock<T, cuda> out) {
  const char* op = "ops::attention";
  checks::heads(op, qkv.cols, heads);
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3, dh = e / heads;
  check_batch(op, "out", out, S, l, e);
  if (S * l == 0 || e == 0) return;
  using Acc = cuda_detail::acc_t<T>;
  const cuda_detail::AttnGeom g{l, e, heads, dh, qkv.ld, qkv.stride, out.ld, out.stride};
  const dim3 grid = cuda_nn_detail::attn_grid(S, heads, l, op);
  if constexpr (std::is_same_v<T, float>) {
    if (cuda_detail::mixed(ctx) && cuda_detail::has_mma16()) {
      const float sc = cuda_detail::attn_scale<float>(dh);
      if (ctx.math == MathMode::bf16)
        cuda_detail::attention_tc<bfloat16_t>(ctx, qkv.data, g, sc, out.data, S, op);
      else
        cuda_detail::attention_tc<half_t>(ctx, qkv.data, g, sc, out.data, S, op);
      return;
    }
  }
  cuda_detail::with_head_dim(dh, op, [&](auto dm) {
    cuda_detail::attn_forward_kernel<T, Acc, decltype(dm)::value>
        <<<grid, cuda_detail::kAttnThreads, 0, ctx.stream>>>(
            qkv.data, g, cuda_detail::attn_scale<Acc>(dh), out.data, nullptr, nullptr, nullptr);
  });
  cuda_detail::check_launch(op);
}
//! Backward of attention: dqkv [S; L, 3E] written from dout [S; L, E] (probabilities recomputed
//! from per-row log-sum-exp; four passes, no atomics).
template <class T>
void attention_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> qkv, std::int64_t heads,
                        BatchBlock<const T, cuda> dout, BatchBlock<T, cuda> dqkv) {
  const char* op = "ops::attention_backward";
  checks::heads(op, qkv.cols, heads);
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3, dh = e / heads;
  check_batch(op, "dout", dout, S, l, e);
  check_batch(op, "dqkv", dqkv, S, l, 3 * e);
  if (S * l == 0 || e == 0) return;
  const dim3 grid = cuda_nn_detail::attn_grid(S, heads, l, op);  // checks the launch limits
  if constexpr (std::is_same_v<T, float>) {
    if (cuda_detail::mixed(ctx) && cuda_detail::has_mma16()) {  // attention_tc_backward.cuh
      const cuda_detail::AttnGeom g{l, e, heads, dh, qkv.ld, qkv.stride, dqkv.ld, dqkv.stride};
      const float sc = cuda_detail::attn_scale<float>(dh);
      const bool done =
          ctx.math == MathMode::bf16
              ? cuda_detail::attention_tc_backward<bfloat16_t>(
                    ctx, qkv.data, g, S, dout.data, dout.ld, dout.stride, dqkv.data, sc, op)
              : cuda_detail::attention_tc_backward<half_t>(ctx, qkv.data, g, S, dout.data, dout.ld,
                                                           dout.stride, dqkv.data, sc, op);
      if (done) return;
    }
  }
  using Acc = cuda_detail::acc_t<T>;
  const std::size_t nrows = static_cast<std::size_t>(S * heads * l);
  cuda_detail::Scratch stats(ctx, 2 * nrows * sizeof(Acc), op);
  Acc* lse = stats.template as<Acc>();
  Acc* delta = lse + nrows;
  const Acc scale = cuda_detail::attn_scale<Acc>(dh);
  cuda_detail::AttnGeom gs{l, e, heads, dh, qkv.ld, qkv.stride, dout.ld, dout.stride};
  cuda_detail::AttnGeom gd{l, e, heads, dh, qkv.ld, qkv.stride, dqkv.ld, dqkv.stride};
  cuda_detail::with_head_dim(dh, op, [&](auto dm) {
    constexpr int DM = decltype(dm)::value;
    const auto th = cuda_detail::kAttnThreads;
    cuda_detail::attn_forward_kernel<T, Acc, DM>
        <<<grid, th, 0, ctx.stream>>>(qkv.data, gs, scale, nullptr, dout.data, lse, delta);
    cuda_detail::check_launch(op);
    cuda_detail::attn_dq_kernel<T, Acc, DM><<<grid, th, 0, ctx.stream>>>(
        qkv.data, gd, scale, dout.data, dout.ld, dout.stride, lse, delta, dqkv.data);
    cuda_detail::check_launch(op);
    cuda_detail::attn_dkv_kernel<T, Acc, DM, true><<<grid, th, 0, ctx.stream>>>(
        qkv.data, gd, scale, dout.data, dout.ld, dout.stride, lse, delta, dqkv.data);
    cuda_detail::check_launch(op);
    cuda_detail::attn_dkv_kernel<T, Acc, DM, false><<<grid, th, 0, ctx.stream>>>(
        qkv.data, gd, scale, dout.data, dout.ld, dout.stride, lse, delta, dqkv.data);
  });
  cuda_detail::check_launch(op);
}

// ---------------------------------------------------------------------------------------------
// Patches, positions, embeddings

namespace cuda_nn_detail {
// Image element idx (c, y, x) of a sample -> (token, feature) in (c, i, k) or (i, k, c) order.
__device__ inline void patch_of(const ImageGeom& g, std::int64_t idx, bool ikc, std::int64_t& t,
                                std::int64_t& f) {
  const std::int64_t p = g.patch, xw = idx % g.width, yh = (idx / g.width) % g.height,
                     ch = idx / (g.width * g.height);
  const std::int64_t u = yh / p, i = yh % p, v = xw / p, k = xw % p;
  t = u * (g.width / p) + v;
  f = ikc ? (i * p + k) * g.channels + ch : (ch * p + i) * p + k;
}
// Copies between images [S; 1, c h w] and their patch rows [S; tokens, c p p] ((c, i, k) order,
// or (i, k, c) with ikc): to_cols: rows <- image, else image <- rows. One thread per element.
template <class T>
void move_patches(const Context<cuda>& ctx, BatchBlock<const T, cuda> src, BatchBlock<T, cuda> dst,
                  ImageGeom g, bool ikc, bool to_cols, const char* op) {
  const std::int64_t per = g.numel();
  cuda_detail::for_each(
      ctx, src.samples * per,
      [=] __device__(std::int64_t i) {
        const std::int64_t s = i / per, idx = i % per;
        std::int64_t t, f;
        patch_of(g, idx, ikc, t, f);
        if (to_cols)
          dst.data[s * dst.stride + t * dst.ld + f] = src.data[s * src.stride + idx];
        else
          dst.data[s * dst.stride + idx] = src.data[s * src.stride + t * src.ld + f];
      },
      op);
}
}  // namespace cuda_nn_detail

//! cols_s [tokens, c p p] = patches of img_s [1, c h w] in (c, i, k) order.
template <class T>
void patchify(const Context<cuda>& ctx, BatchBlock<const T, cuda> img, ImageGeom g,
              BatchBlock<T, cuda> cols) {
  checks::patches("ops::patchify", g, img, "img", cols, "cols");
  cuda_nn_detail::move_patches<T>(ctx, img, cols, g, false, true, "ops::patchify");
}
//! Backward of patchify: dimg_s written from dcols_s.
template <class T>
void patchify_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> dcols, ImageGeom g,
                       BatchBlock<T, cuda> dimg) {
  checks::patches("ops::patchify_backward", g, dimg, "dimg", dcols, "dcols");
  cuda_nn_detail::move_patches<T>(ctx, dcols, dimg, g, false, false, "ops::patchify_backward");
}
//! img_s [1, c h w] from y_s [tokens, p p c] in (i, k, c) order.
template <class T>
void unpatchify(const Context<cuda>& ctx, BatchBlock<const T, cuda> y, ImageGeom g,
                BatchBlock<T, cuda> img) {
  checks::patches("ops::unpatchify", g, img, "img", y, "y");
  cuda_nn_detail::move_patches<T>(ctx, y, img, g, true, false, "ops::unpatchify");
}
//! Backward of unpatchify: dy_s written from dimg_s.
template <class T>
void unpatchify_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> dimg, ImageGeom g,
                         BatchBlock<T, cuda> dy) {
  checks::patches("ops::unpatchify_backward", g, dimg, "dimg", dy, "dy");
  cuda_nn_detail::move_patches<T>(ctx, dimg, dy, g, true, true, "ops::unpatchify_backward");
}

namespace cuda_nn_detail {
// The taps of both axes (host-computed: the shared definition in common.hpp) on the device.
template <class T>
cuda_detail::Scratch upload_taps(const Context<cuda>& ctx, std::int64_t i0, std::int64_t i1,
                                 std::int64_t o0, std::int64_t o1, const char* op) {
  auto ty = bilinear_taps<T>(i0, o0);
  const auto tx = bilinear_taps<T>(i1, o1);
  ty.insert(ty.end(), tx.begin(), tx.end());
  return cuda_detail::upload(ctx, ty.data(), ty.size(), op);
}
}  // namespace cuda_nn_detail

//! dst [o0 o1, e] = bilinear resize of src [i0 i1, e] (align_corners=False, the CPU formula).
template <class T>
void bilinear_resize(const Context<cuda>& ctx, RowBlock<const T, cuda> src, std::int64_t i0,
                     std::int64_t i1, std::int64_t o0, std::int64_t o1, RowBlock<T, cuda> dst) {
  const char* op = "ops::bilinear_resize";
  checks::resize(op, src, i0, i1, dst, o0, o1);
  const auto taps = cuda_nn_detail::upload_taps<T>(ctx, i0, i1, o0, o1, op);
  const BilinearTap<T>* ty = taps.template as<BilinearTap<T>>();
  const BilinearTap<T>* tx = ty + o0;
  const std::int64_t e = src.cols;
  const T* q = src.data;
  T* out = dst.data;
  cuda_detail::for_each(
      ctx, o0 * o1 * e,
      [=] __device__(std::int64_t i) {
        const std::int64_t j = i % e, x = (i / e) % o1, y = i / (e * o1);
        const BilinearTap<T> a = ty[y], b = tx[x];
        const T p00 = q[(a.a * i1 + b.a) * e + j], p01 = q[(a.a * i1 + b.b) * e + j];
        const T p10 = q[(a.b * i1 + b.a) * e + j], p11 = q[(a.b * i1 + b.b) * e + j];
        out[i] = a.wa * (b.wa * p00 + b.wb * p01) + a.wb * (b.wa * p10 + b.wb * p11);
      },
      op);
}
//! Backward of bilinear_resize: dsrc += the transposed interpolation of ddst (one thread per
//! channel, output points in the CPU's order: deterministic).
template <class T>
void bilinear_resize_backward(const Context<cuda>& ctx, RowBlock<const T, cuda> ddst,
                              std::int64_t i0, std::int64_t i1, std::int64_t o0, std::int64_t o1,
                              RowBlock<T, cuda> dsrc) {
  const char* op = "ops::bilinear_resize_backward";
  checks::resize(op, dsrc, i0, i1, ddst, o0, o1);
  const auto taps = cuda_nn_detail::upload_taps<T>(ctx, i0, i1, o0, o1, op);
  const BilinearTap<T>* ty = taps.template as<BilinearTap<T>>();
  const BilinearTap<T>* tx = ty + o0;
  const std::int64_t e = ddst.cols;
  const T* d = ddst.data;
  T* dq = dsrc.data;
  cuda_detail::for_each(
      ctx, e,
      [=] __device__(std::int64_t j) {
        for (std::int64_t y = 0; y < o0; ++y)
          for (std::int64_t x = 0; x < o1; ++x) {
            const BilinearTap<T> a = ty[y], b = tx[x];
            const T v = d[(y * o1 + x) * e + j];
            dq[(a.a * i1 + b.a) * e + j] += a.wa * b.wa * v;
            dq[(a.a * i1 + b.b) * e + j] += a.wa * b.wb * v;
            dq[(a.b * i1 + b.a) * e + j] += a.wb * b.wa * v;
            dq[(a.b * i1 + b.b) * e + j] += a.wb * b.wb * v;
          }
      },
      op);
}

//! out_s [1, dim] = sinusoidal embedding of t[s]: the rows are formed on the host with the shared
//! definition (ops::sinusoid_row, the reference float32 recipe) and copied in.
template <class T>
void timestep_embedding(const Context<cuda>& ctx, std::span<const double> t,
                        BatchBlock<T, cuda> out, double max_period = 10000.0) {
  static_assert(std::is_floating_point_v<T>, "timestep_embedding: T must be float or double");
  const char* op = "ops::timestep_embedding";
  check_batch(op, "out", out, static_cast<std::int64_t>(t.size()), 1, out.cols);
  if (t.empty() || out.cols == 0) return;
  std::vector<T> rows(t.size() * static_cast<std::size_t>(out.cols));
  for (std::size_t s = 0; s < t.size(); ++s)
    sinusoid_row<T>(t[s], out.cols, max_period, rows.data() + s * out.cols);
  const auto dev = cuda_detail::upload(ctx, rows.data(), rows.size(), op);
  const T* src = dev.template as<const T>();
  const std::int64_t dim = out.cols;
  cuda_detail::for_each(
      ctx, out.samples * dim,
      [=] __device__(std::int64_t i) { out.data[(i / dim) * out.stride + i % dim] = src[i]; }, op);
}

//! out_s [1, e] = table row ids[s] (ids: host).
template <class T>
void gather_rows(const Context<cuda>& ctx, RowBlock<const T, cuda> table,
                 std::span<const std::int64_t> ids, BatchBlock<T, cuda> out) {
  const char* op = "ops::gather_rows";
  check_batch(op, "out", out, static_cast<std::int64_t>(ids.size()), 1, table.cols);
  checks::row_ids(op, ids, table.rows);
  if (ids.empty() || table.cols == 0) return;
  const auto dev = cuda_detail::upload(ctx, ids.data(), ids.size(), op);
  const std::int64_t* pid = dev.template as<std::int64_t>();
  const std::int64_t e = table.cols, ld = table.ld;
  const T* tab = table.data;
  cuda_detail::for_each(
      ctx, out.samples * e,
      [=] __device__(std::int64_t i) {
        const std::int64_t s = i / e, j = i % e;
        out.data[s * out.stride + j] = tab[pid[s] * ld + j];
      },
      op);
}
//! Backward of gather_rows: dtable row ids[s] += dout_s, samples in order (one thread per column).
template <class T>
void gather_rows_backward(const Context<cuda>& ctx, BatchBlock<const T, cuda> dout,
                          std::span<const std::int64_t> ids, RowBlock<T, cuda> dtable) {
  const char* op = "ops::gather_rows_backward";
  check_batch(op, "dout", dout, static_cast<std::int64_t>(ids.size()), 1, dtable.cols);
  checks::row_ids(op, ids, dtable.rows);
  if (ids.empty() || dtable.cols == 0) return;
  const auto dev = cuda_detail::upload(ctx, ids.data(), ids.size(), op);
  const std::int64_t* pid = dev.template as<std::int64_t>();
  const std::int64_t n = static_cast<std::int64_t>(ids.size()), ld = dtable.ld;
  T* tab = dtable.data;
  cuda_detail::for_each(
      ctx, dtable.cols,
      [=] __device__(std::int64_t j) {
        for (std::int64_t s = 0; s < n; ++s) tab[pid[s] * ld + j] += dout.data[s * dout.stride + j];
      },
      op);
}

//! y_s += a for every sample (a [rows, cols]).
template <class T>
void add_rows(const Context<cuda>& ctx, RowBlock<const T, cuda> a, BatchBlock<T, cuda> y) {
  check_batch("ops::add_rows", "y", y, y.samples, a.rows, a.cols);
  cuda_detail::for_each(
      ctx, y.samples * a.rows * a.cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t rem = i % (a.rows * a.cols), r = rem / a.cols, j = rem % a.cols;
        y.data[cuda_detail::batch_offset(y, i)] += a.data[r * a.ld + j];
      },
      "ops::add_rows");
}
//! da += sum over samples of dy_s (samples in order).
template <class T>
void sum_samples(const Context<cuda>& ctx, BatchBlock<const T, cuda> dy, RowBlock<T, cuda> da) {
  check_batch("ops::sum_samples", "dy", dy, dy.samples, da.rows, da.cols);
  cuda_detail::for_each(
      ctx, da.rows * da.cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t r = i / da.cols, j = i % da.cols;
        T acc = da.data[r * da.ld + j];
        for (std::int64_t s = 0; s < dy.samples; ++s) acc += dy.data[s * dy.stride + r * dy.ld + j];
        da.data[r * da.ld + j] = acc;
      },
      "ops::sum_samples");
}

//! dst = src, sample by sample.
template <class T>
void copy(const Context<cuda>& ctx, BatchBlock<const T, cuda> src, BatchBlock<T, cuda> dst) {
  check_batch("ops::copy", "src", src, src.samples, src.rows, src.cols);
  check_batch("ops::copy", "dst", dst, src.samples, src.rows, src.cols);
  if (src.data == dst.data && src.ld == dst.ld && src.stride == dst.stride) return;
  cuda_detail::for_each(
      ctx, src.samples * src.rows * src.cols,
      [=] __device__(std::int64_t i) {
        dst.data[cuda_detail::batch_offset(dst, i)] = src.data[cuda_detail::batch_offset(src, i)];
      },
      "ops::copy");
}
//! dst += src, sample by sample.
template <class T>
void add(const Context<cuda>& ctx, BatchBlock<const T, cuda> src, BatchBlock<T, cuda> dst) {
  check_batch("ops::add", "dst", dst, src.samples, src.rows, src.cols);
  cuda_detail::for_each(
      ctx, src.samples * src.rows * src.cols,
      [=] __device__(std::int64_t i) {
        dst.data[cuda_detail::batch_offset(dst, i)] += src.data[cuda_detail::batch_offset(src, i)];
      },
      "ops::add");
}

}  // namespace ops
}  // namespace unidiffuser
