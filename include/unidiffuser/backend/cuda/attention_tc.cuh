// SPDX-License-Identifier: Apache-2.0
//! \file attention_tc.cuh
//! Tensor-core attention of the CUDA backend for the bf16 / fp16 math modes (flash-attention-2
//! style forward): q, k and v are rounded once from the fp32 activations into a packed 16-bit
//! copy; a block of 8 warps (4 at head dim 128) takes 16 query rows per warp of one (sample,
//! head); keys and values stream through shared memory in 16-byte loads; S = q k^T and O += P v
//! run on `mma.sync.m16n8k16` with fp32 accumulation; the online softmax (running max and sum per
//! row, exp2 with log2(e) folded into the scale) stays in fp32 registers; P is rounded to 16 bits
//! for the second product. No [L, L] buffer; head dims up to 128 (padded to 16, 32, 64 or
//! 128). sm_80 and newer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "unidiffuser/backend/cuda/attention.cuh"
#include "unidiffuser/backend/cuda/runtime.cuh"
#include "unidiffuser/core/dtype.hpp"

namespace unidiffuser::cuda_detail {

// 16-bit rounding (round to nearest even) and pairs packed low-first.
template <class H>
__device__ inline std::uint16_t round16(float v) {
  if constexpr (std::is_same_v<H, bfloat16_t>)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  else
    return __half_as_ushort(__float2half_rn(v));
}
template <class H>
__device__ inline std::uint32_t pack16(float lo, float hi) {
  return static_cast<std::uint32_t>(round16<H>(lo)) |
         (static_cast<std::uint32_t>(round16<H>(hi)) << 16);
}

// c += a b for one m16n8k16 tile (a: 4 registers of the row-major A fragment, b: 2 registers of
// the column-major B fragment; PTX ISA fragment layouts).
template <class H>
__device__ inline void mma16816(float (&c)[4], const std::uint32_t (&a)[4],
                                const std::uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<H, bfloat16_t>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)c, (void)a, (void)b;
  __trap();  // built for an architecture without 16-bit mma (the host dispatch refuses it)
#endif
}

// Warps per block (16 query rows each): 8, or 4 for head dim 128 (shared memory under 48 KiB).
template <int DM>
constexpr int tc_warps() {
  return DM == 128 ? 4 : 8;
}

// q | k | v of a (sample, head) as 16-bit values, [L, 3E] rows ld apart (the rounded copy made
// by attention_tc); VEC: rows and head slices are 16-byte aligned (8 values per load).
template <int DM, int ROWS, bool VEC>
__device__ inline void tc_load(const std::uint16_t* __restrict__ src, std::int64_t ld,
                               std::int64_t r0, std::int64_t rows_left, int D,
                               std::uint16_t (*dst)[DM + 8]) {
  if constexpr (VEC) {
    for (int e = threadIdx.x; e < ROWS * (DM / 8); e += blockDim.x) {
      const int r = e / (DM / 8), d = (e % (DM / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < rows_left && d < D) v = *reinterpret_cast<const uint4*>(src + (r0 + r) * ld + d);
      *reinterpret_cast<uint4*>(&dst[r][d]) = v;
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * DM; e += blockDim.x) {
      const int r = e / DM, d = e % DM;
      dst[r][d] = r < rows_left && d < D ? src[(r0 + r) * ld + d] : std::uint16_t(0);
    }
  }
}
// The same rows transposed: dst[d][r] (v as the column-major B operand of P v).
template <int DM, int ROWS, bool VEC>
__device__ inline void tc_load_t(const std::uint16_t* __restrict__ src, std::int64_t ld,
                                 std::int64_t r0, std::int64_t rows_left, int D,
                                 std::uint16_t (*dst)[ROWS + 8]) {
  if constexpr (VEC) {
    for (int e = threadIdx.x; e < ROWS * (DM / 8); e += blockDim.x) {
      const int r = e % ROWS, d = (e / ROWS) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < rows_left && d < D) v = *reinterpret_cast<const uint4*>(src + (r0 + r) * ld + d);
      const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        dst[d + 2 * i][r] = static_cast<std::uint16_t>(w[i] & 0xffffu);
        dst[d + 2 * i + 1][r] = static_cast<std::uint16_t>(w[i] >> 16);
      }
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * DM; e += blockDim.x) {
      const int r = e % ROWS, d = e / ROWS;
      dst[d][r] = r < rows_left && d < D ? src[(r0 + r) * ld + d] : std::uint16_t(0);
    }
  }
}

template <class H, int DM, int BK, bool VEC>
__global__ void __launch_bounds__(32 * tc_warps<DM>())
    attn_tc_kernel(const std::uint16_t* __restrict__ qkv, AttnGeom g, float scale,
                   float* __restrict__ out) {
  constexpr int PAD = 8, kTcRows = 16 * tc_warps<DM>();
  __shared__ alignas(16) std::uint16_t qs[kTcRows][DM + PAD];
  __shared__ alignas(16) std::uint16_t ks[BK][DM + PAD];
  __shared__ alignas(16) std::uint16_t vt[DM][BK + PAD];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     q0 = static_cast<std::int64_t>(blockIdx.x) * kTcRows;
  const std::uint16_t* base = qkv + s * g.stride + h * g.D;
  const int D = static_cast<int>(g.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, c = (lane % 4) * 2;
  tc_load<DM, kTcRows, VEC>(base, g.ld, q0, g.L - q0, D, qs);
  __syncthreads();
  std::uint32_t qa[DM / 16][4];
  const int r0 = warp * 16 + gid;
#pragma unroll
  for (int kk = 0; kk < DM / 16; ++kk) {
    qa[kk][0] = *reinterpret_cast<const std::uint32_t*>(&qs[r0][kk * 16 + c]);
    qa[kk][1] = *reinterpret_cast<const std::uint32_t*>(&qs[r0 + 8][kk * 16 + c]);
    qa[kk][2] = *reinterpret_cast<const std::uint32_t*>(&qs[r0][kk * 16 + c + 8]);
    qa[kk][3] = *reinterpret_cast<const std::uint32_t*>(&qs[r0 + 8][kk * 16 + c + 8]);
  }
  float o[DM / 8][4];
#pragma unroll
  for (int dt = 0; dt < DM / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float sl2 = scale * 1.4426950408889634f;
  for (std::int64_t k0 = 0; k0 < g.L; k0 += BK) {
    __syncthreads();  // the previous tile is consumed
    tc_load<DM, BK, VEC>(base + g.E, g.ld, k0, g.L - k0, D, ks);
    tc_load_t<DM, BK, VEC>(base + 2 * g.E, g.ld, k0, g.L - k0, D, vt);
    __syncthreads();
    float sc[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < DM / 16; ++kk) {
        const std::uint32_t b[2] = {
            *reinterpret_cast<const std::uint32_t*>(&ks[nt * 8 + gid][kk * 16 + c]),
            *reinterpret_cast<const std::uint32_t*>(&ks[nt * 8 + gid][kk * 16 + c + 8])};
        mma16816<H>(sc[nt], qa[kk], b);
      }
    }
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool live = k0 + nt * 8 + c + (i & 1) < g.L;
        const float v = live ? sc[nt][i] * sl2 : -INFINITY;
        sc[nt][i] = v;
        mx[i >> 1] = fmaxf(mx[i >> 1], v);
      }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      alpha[r] = exp2f(m[r] - mx[r]);
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        sc[nt][i] = exp2f(sc[nt][i] - m[i >> 1]);
        l[i >> 1] += sc[nt][i];
      }
#pragma unroll
    for (int dt = 0; dt < DM / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const std::uint32_t a[4] = {pack16<H>(sc[2 * kk][0], sc[2 * kk][1]),
                                  pack16<H>(sc[2 * kk][2], sc[2 * kk][3]),
                                  pack16<H>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                  pack16<H>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < DM / 8; ++dt) {
        const std::uint32_t b[2] = {
            *reinterpret_cast<const std::uint32_t*>(&vt[dt * 8 + gid][kk * 16 + c]),
            *reinterpret_cast<const std::uint32_t*>(&vt[dt * 8 + gid][kk * 16 + c + 8])};
        mma16816<H>(o[dt], a, b);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    l[r] = 1.f / l[r];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t q = q0 + r0 + 8 * r;
    if (q >= g.L) continue;
    float* orow = out + s * g.ostride + q * g.old + h * g.D;
#pragma unroll
    for (int dt = 0; dt < DM / 8; ++dt) {
      const int col = dt * 8 + c;
      if (col < D) orow[col] = o[dt][2 * r] * l[r];
      if (col + 1 < D) orow[col + 1] = o[dt][2 * r + 1] * l[r];
    }
  }
}

template <class H, int DM, int BK>
void attention_tc_launch(const Context<cuda>& ctx, const std::uint16_t* q16, const AttnGeom& g,
                         float scale, float* out, dim3 grid) {
  constexpr int rows = 16 * tc_warps<DM>();
  grid.x = static_cast<unsigned>((g.L + rows - 1) / rows);
  if (g.D % 8 == 0 && g.E % 8 == 0)
    attn_tc_kernel<H, DM, BK, true>
        <<<grid, 32 * tc_warps<DM>(), 0, ctx.stream>>>(q16, g, scale, out);
  else
    attn_tc_kernel<H, DM, BK, false>
        <<<grid, 32 * tc_warps<DM>(), 0, ctx.stream>>>(q16, g, scale, out);
}

//! The tensor-core forward with 16-bit type H: qkv rounded once into a packed 16-bit copy
//! (stream-ordered scratch), then one kernel per (query block, head, sample).
template <class H>
void attention_tc(const Context<cuda>& ctx, const float* qkv, const AttnGeom& g0, float scale,
                  float* out, dim3 grid, const char* op) {
  if (g0.D > 128) throw_mismatch(op, "qkv", "head dimension", "<= 128", g0.D);
  const std::int64_t S = grid.z, rows = S * g0.L, cols = 3 * g0.E;
  Scratch q16(ctx, static_cast<std::size_t>(rows * cols) * sizeof(std::uint16_t), op);
  std::uint16_t* dst = q16.template as<std::uint16_t>();
  const std::int64_t ld = g0.ld, stride = g0.stride, L = g0.L;
  for_each(
      ctx, rows * cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t r = i / cols, j = i % cols;
        dst[i] = round16<H>(qkv[(r / L) * stride + (r % L) * ld + j]);
      },
      op);
  AttnGeom g = g0;
  g.ld = cols;
  g.stride = L * cols;
  const std::uint16_t* src = q16.template as<const std::uint16_t>();
  if (g.D <= 16)
    attention_tc_launch<H, 16, 64>(ctx, src, g, scale, out, grid);
  else if (g.D <= 32)
    attention_tc_launch<H, 32, 64>(ctx, src, g, scale, out, grid);
  else if (g.D <= 64)
    attention_tc_launch<H, 64, 64>(ctx, src, g, scale, out, grid);
  else
    attention_tc_launch<H, 128, 32>(ctx, src, g, scale, out, grid);
  check_launch(op);
}

//! Whether the tensor-core path can run on the current device: compute capability 8.0 or newer
//! and kernels compiled for it (a build whose code targets an older architecture, e.g. the
//! compiler's default, JIT-compiles PTX without mma: the exact kernels are used instead).
inline bool has_mma16() {
  static std::mutex mu;
  static std::vector<int> known;  // per device: -1 unknown, 0 no, 1 yes
  const int dev = current_device("ops::attention");
  std::lock_guard<std::mutex> lock(mu);
  if (known.size() <= static_cast<std::size_t>(dev)) known.resize(dev + 1, -1);
  int& k = known[static_cast<std::size_t>(dev)];
  if (k < 0) {
    int major = 0;
    cudaFuncAttributes attr{};
    const bool cc =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
        major >= 8;
    const bool code =
        cudaFuncGetAttributes(&attr, attn_tc_kernel<bfloat16_t, 64, 64, true>) == cudaSuccess &&
        attr.ptxVersion >= 80;
    (void)cudaGetLastError();
    k = cc && code ? 1 : 0;
  }
  return k == 1;
}

}  // namespace unidiffuser::cuda_detail
