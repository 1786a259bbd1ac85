// SPDX-License-Identifier: Apache-2.0
//! \file attention_tc.cuh
//! Tensor-core attention of the CUDA backend for the bf16 / fp16 math modes (flash-attention-2
//! style forward): q, k and v are rounded once from the fp32 activations into a 16-bit copy
//! whose head slices are padded to a multiple of 8 values (16-byte aligned rows for any head
//! dim); a block of 4 warps takes 16 MT query rows per warp of one (sample, head); key and
//! value tiles stream through shared memory by cp.async, double-buffered; K and V fragments come
//! out of shared memory by ldmatrix (V transposed on the way); S = q k^T and O += P v run on
//! `mma.sync.m16n8k16` with fp32 accumulation; the online softmax (running max and sum per row,
//! exp2 with log2(e) folded into the scale) stays in fp32 registers; P is rounded to 16 bits for
//! the second product. No [L, L] buffer; head dims up to 128 (padded to 32, 64 or 128 in the
//! kernel). sm_80 and newer.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <type_traits>
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

// Shared-memory address, 16-byte asynchronous copies (zero-filled when !pred) and 8x8 b16 matrix
// loads (ldmatrix; .trans gives the column-major B operand from row-major rows).
__device__ inline std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}
__device__ inline void cp_async16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(pred ? 16 : 0)
               : "memory");
#else
  (void)dst, (void)src, (void)pred;
  __trap();
#endif
}
__device__ inline void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ inline void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
template <bool Trans>
__device__ inline void ldsm_x4(std::uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p))
                 : "memory");
#else
  (void)r, (void)p;
  __trap();
#endif
}

//! Layout of the 16-bit copy of q | k | v: head slices hd values wide (the head dim rounded up
//! to a multiple of 8, zeros past it), parts ce = heads hd wide, rows ld = 3 ce apart, samples
//! stride apart.
struct TcCopy {
  std::int64_t hd = 0, ce = 0, ld = 0, stride = 0;
};

// Rows [r0, r0 + ROWS) of a 16-bit copy (rows ld apart, 16-byte aligned) into dst[ROWS][LD] by
// 16-byte cp.async, zeros past the last row and past column `width` (128 threads).
template <int ROWS, int LD>
__device__ inline void tc_load(std::uint16_t (*dst)[LD], const std::uint16_t* src, std::int64_t r0,
                               std::int64_t rows, int width, std::int64_t ld) {
  constexpr int CH = (LD - 8) / 8;
  static_assert(ROWS * CH % 128 == 0);
#pragma unroll
  for (int i = 0; i < ROWS * CH / 128; ++i) {
    const int e = i * 128 + static_cast<int>(threadIdx.x), r = e / CH, d = (e % CH) * 8;
    const bool ok = r0 + r < rows && d < width;
    cp_async16(&dst[r][d], ok ? src + (r0 + r) * ld + d : src, ok);
  }
}

//! Row statistics for the tensor-core backward, written by attn_tc_kernel in place of its
//! output: lse2 = log2 sum_j 2^(scale log2(e) s_ij) per row, delta = dO . O (dout fp32).
struct AttnStats {
  const float* dout = nullptr;
  std::int64_t ld = 0, stride = 0;
  float* lse2 = nullptr;
  float* delta = nullptr;
};

// The forward: head dims padded to DM (32, 64 or 128) in shared memory; 4 warps x 16 MT query
// rows per block; key and value tiles of BK rows double-buffered through cp.async (the next tile
// streams in while this one is used); K and V fragments by ldmatrix (V transposed on the way out
// of shared memory, so it is stored as it comes), each fragment used for the warp's MT row
// tiles. Shared memory: [K0 | V0 | K1 | V1], the query rows staged in [K1 | V1] before the loop.
// g: the attention's geometry (L, H, D; the output's old / ostride); c: the 16-bit copy's.
// STATS: the backward's row statistics instead of the output.
template <class H, int DM, int BK, int MT, bool STATS = false>
__global__ void __launch_bounds__(128)
    attn_tc_kernel(const std::uint16_t* __restrict__ qkv, AttnGeom g, TcCopy cp, float scale,
                   float* __restrict__ out, AttnStats st = {}) {
  // the query rows are staged in [K1 | V1] (loaded with the first tile) or, when they need
  // more room, in all four buffers (before the first tile)
  constexpr bool kWide = 64 * MT > 2 * BK;
  static_assert(DM % 32 == 0 && BK % 16 == 0 && 64 * MT <= 4 * BK);
  constexpr int QR = 64 * MT, LD = DM + 8;
  __shared__ alignas(128) std::uint16_t sm[4][BK][LD];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     q0 = static_cast<std::int64_t>(blockIdx.x) * QR;
  const std::uint16_t* base = qkv + s * cp.stride + h * cp.hd;
  const int hd = static_cast<int>(cp.hd);
  const int D = static_cast<int>(g.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, c = (lane % 4) * 2;
  // (rows counted from the start of the whole array: the staging spans several buffers)
  auto* qs = reinterpret_cast<std::uint16_t(*)[LD]>(&sm[0][0][0] + (kWide ? 0 : 2 * BK * LD));
  tc_load<QR, LD>(qs, base, q0, g.L, hd, cp.ld);
  if constexpr (!kWide) {
    tc_load<BK, LD>(sm[0], base + cp.ce, 0, g.L, hd, cp.ld);
    tc_load<BK, LD>(sm[1], base + 2 * cp.ce, 0, g.L, hd, cp.ld);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  std::uint32_t qa[MT][DM / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r0 = (warp * MT + mt) * 16 + gid;
#pragma unroll
    for (int kk = 0; kk < DM / 16; ++kk) {
      qa[mt][kk][0] = *reinterpret_cast<const std::uint32_t*>(&qs[r0][kk * 16 + c]);
      qa[mt][kk][1] = *reinterpret_cast<const std::uint32_t*>(&qs[r0 + 8][kk * 16 + c]);
      qa[mt][kk][2] = *reinterpret_cast<const std::uint32_t*>(&qs[r0][kk * 16 + c + 8]);
      qa[mt][kk][3] = *reinterpret_cast<const std::uint32_t*>(&qs[r0 + 8][kk * 16 + c + 8]);
    }
  }
  __syncthreads();  // the query rows are in registers before their buffers are refilled
  if constexpr (kWide) {
    tc_load<BK, LD>(sm[0], base + cp.ce, 0, g.L, hd, cp.ld);
    tc_load<BK, LD>(sm[1], base + 2 * cp.ce, 0, g.L, hd, cp.ld);
    cp_async_commit();
  }
  float o[MT][DM / 8][4];
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < DM / 8; ++dt)
      o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.f;
  }
  const float sl2 = scale * 1.4426950408889634f;
  const int tiles = static_cast<int>((g.L + BK - 1) / BK);
  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < tiles) {  // the next tile into the other buffers (free since the last barrier)
      const std::int64_t k1 = static_cast<std::int64_t>(t + 1) * BK;
      tc_load<BK, LD>(sm[2 * (buf ^ 1)], base + cp.ce, k1, g.L, hd, cp.ld);
      tc_load<BK, LD>(sm[2 * (buf ^ 1) + 1], base + 2 * cp.ce, k1, g.L, hd, cp.ld);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const std::uint16_t(*ks)[LD] = sm[2 * buf];
    const std::uint16_t(*vs)[LD] = sm[2 * buf + 1];
    const std::int64_t k0 = static_cast<std::int64_t>(t) * BK;
    float sc[MT][BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        sc[mt][nt][0] = sc[mt][nt][1] = sc[mt][nt][2] = sc[mt][nt][3] = 0.f;
#pragma unroll
      for (int kp = 0; kp < DM / 32; ++kp) {
        std::uint32_t b[4];
        ldsm_x4<false>(b, &ks[nt * 8 + (lane % 8)][kp * 32 + (lane / 8) * 8]);
        const std::uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<H>(sc[mt][nt], qa[mt][2 * kp], b0);
          mma16816<H>(sc[mt][nt], qa[mt][2 * kp + 1], b1);
        }
      }
    }
    std::uint32_t pa[MT][BK / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {m[mt][0], m[mt][1]};
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool live = k0 + nt * 8 + c + (i & 1) < g.L;
          const float v = live ? sc[mt][nt][i] * sl2 : -INFINITY;
          sc[mt][nt][i] = v;
          mx[i >> 1] = fmaxf(mx[i >> 1], v);
        }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        alpha[r] = exp2f(m[mt][r] - mx[r]);
        m[mt][r] = mx[r];
        l[mt][r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          sc[mt][nt][i] = exp2f(sc[mt][nt][i] - m[mt][i >> 1]);
          l[mt][i >> 1] += sc[mt][nt][i];
        }
#pragma unroll
      for (int dt = 0; dt < DM / 8; ++dt) {
        o[mt][dt][0] *= alpha[0];
        o[mt][dt][1] *= alpha[0];
        o[mt][dt][2] *= alpha[1];
        o[mt][dt][3] *= alpha[1];
      }
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        pa[mt][kk][0] = pack16<H>(sc[mt][2 * kk][0], sc[mt][2 * kk][1]);
        pa[mt][kk][1] = pack16<H>(sc[mt][2 * kk][2], sc[mt][2 * kk][3]);
        pa[mt][kk][2] = pack16<H>(sc[mt][2 * kk + 1][0], sc[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = pack16<H>(sc[mt][2 * kk + 1][2], sc[mt][2 * kk + 1][3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < DM / 16; ++dp) {
        std::uint32_t b[4];
        ldsm_x4<true>(b,
                      &vs[kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8][dp * 16 + (lane / 16) * 8]);
        const std::uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816<H>(o[mt][2 * dp], pa[mt][kk], b0);
          mma16816<H>(o[mt][2 * dp + 1], pa[mt][kk], b1);
        }
      }
    }
    __syncthreads();  // every warp is done with these buffers before they are refilled
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int r0 = (warp * MT + mt) * 16 + gid;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
      const std::int64_t q = q0 + r0 + 8 * r;
      const bool live = q < g.L;
      const float inv = 1.f / l[mt][r];
      if constexpr (STATS) {
        const float* dor = st.dout + s * st.stride + (live ? q : 0) * st.ld + h * g.D;
        float dl = 0.f;
#pragma unroll
        for (int dt = 0; dt < DM / 8; ++dt) {
          const int col = dt * 8 + c;
          if (live && col < D) dl += o[mt][dt][2 * r] * inv * dor[col];
          if (live && col + 1 < D) dl += o[mt][dt][2 * r + 1] * inv * dor[col + 1];
        }
        dl += __shfl_xor_sync(0xffffffffu, dl, 1);
        dl += __shfl_xor_sync(0xffffffffu, dl, 2);
        if (live && (lane % 4) == 0) {
          const std::int64_t row = (s * g.H + h) * g.L + q;
          st.lse2[row] = m[mt][r] + log2f(l[mt][r]);
          st.delta[row] = dl;
        }
      } else if (live) {
        float* orow = out + s * g.ostride + q * g.old + h * g.D;
#pragma unroll
        for (int dt = 0; dt < DM / 8; ++dt) {
          const int col = dt * 8 + c;
          if (col < D) orow[col] = o[mt][dt][2 * r] * inv;
          if (col + 1 < D) orow[col + 1] = o[mt][dt][2 * r + 1] * inv;
        }
      }
    }
  }
}

//! [S; rows, cols] fp32 (rows ld apart, samples stride apart) rounded into dst, a packed 16-bit
//! [S rows, cols] array (round to nearest even); 4 values per thread where the layout allows.
template <class H>
void round_rows_into(const Context<cuda>& ctx, const float* x, std::int64_t S, std::int64_t rows,
                     std::int64_t cols, std::int64_t ld, std::int64_t stride, std::uint16_t* dst,
                     const char* op) {
  const BatchBlock<const float, cuda> b(x, S, rows, cols, ld, stride);
  if (chunks4(b) && reinterpret_cast<std::uintptr_t>(dst) % 8 == 0) {
    for_each_chunk4(
        ctx, S, rows, cols,
        [=] __device__(std::uint32_t c, std::uint32_t s, std::uint32_t r, std::uint32_t j) {
          const float4 v = *reinterpret_cast<const float4*>(x + s * stride + r * ld + j);
          *reinterpret_cast<uint2*>(dst + 4 * static_cast<std::int64_t>(c)) =
              make_uint2(pack16<H>(v.x, v.y), pack16<H>(v.z, v.w));
        },
        op);
    return;
  }
  for_each(
      ctx, S * rows * cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t q = i / cols, j = i % cols;
        dst[i] = round16<H>(x[(q / rows) * stride + (q % rows) * ld + j]);
      },
      op);
}
//! The same into a new stream-ordered scratch.
template <class H>
Scratch round_rows16(const Context<cuda>& ctx, const float* x, std::int64_t S, std::int64_t rows,
                     std::int64_t cols, std::int64_t ld, std::int64_t stride, const char* op) {
  Scratch c16(ctx, static_cast<std::size_t>(S * rows * cols) * sizeof(std::uint16_t), op);
  round_rows_into<H>(ctx, x, S, rows, cols, ld, stride, c16.template as<std::uint16_t>(), op);
  return c16;
}

//! The layout of the padded 16-bit copy of q | k | v for heads of dim D.
inline TcCopy tc_copy(std::int64_t L, std::int64_t heads, std::int64_t D) {
  const std::int64_t hd = (D + 7) / 8 * 8;
  return TcCopy{hd, heads * hd, 3 * heads * hd, L * 3 * heads * hd};
}

//! [S; L, parts heads D] fp32 (rows ld apart, samples stride apart) rounded into a packed 16-bit
//! copy whose head slices are padded to a multiple of 8 values with zeros (rows parts heads hd
//! wide), in a stream-ordered scratch: q | k | v with parts 3, dO with 1.
template <class H>
Scratch round_heads16(const Context<cuda>& ctx, const float* x, std::int64_t S, std::int64_t L,
                      std::int64_t parts, std::int64_t heads, std::int64_t D, std::int64_t ld,
                      std::int64_t stride, const char* op) {
  const std::int64_t hd = (D + 7) / 8 * 8, cols = parts * heads * hd;
  if (hd == D) return round_rows16<H>(ctx, x, S, L, cols, ld, stride, op);
  Scratch c16(ctx, static_cast<std::size_t>(S * L * cols) * sizeof(std::uint16_t), op);
  std::uint16_t* dst = c16.template as<std::uint16_t>();
  for_each(
      ctx, S * L * cols,
      [=] __device__(std::int64_t i) {
        const std::int64_t q = i / cols, j = i % cols, slice = j / hd, d = j % hd;
        dst[i] = d < D ? round16<H>(x[(q / L) * stride + (q % L) * ld + slice * D + d])
                       : std::uint16_t(0);
      },
      op);
  return c16;
}

//! The tensor-core forward with 16-bit type H: qkv rounded once into the padded 16-bit copy,
//! then attn_tc_kernel per (query block, head, sample). V (benchmarks and tests compare the
//! variants): 1 the default (32 query rows per warp and key tiles of 64 for head dims up to 64;
//! 16 rows and tiles of 32 above), 2 16 query rows per warp, 3 key tiles of 32.
template <class H, int V = 1>
void attention_tc(const Context<cuda>& ctx, const float* qkv, const AttnGeom& g, float scale,
                  float* out, std::int64_t S, const char* op) {
  if (g.D > 128) throw_mismatch(op, "qkv", "head dimension", "<= 128", g.D);
  const TcCopy c = tc_copy(g.L, g.H, g.D);
  const Scratch q16 = round_heads16<H>(ctx, qkv, S, g.L, 3, g.H, g.D, g.ld, g.stride, op);
  const std::uint16_t* src = q16.template as<const std::uint16_t>();
  const auto launch = [&](auto dm, auto bk, auto mt) {
    constexpr int DM = decltype(dm)::value, BK = decltype(bk)::value, MT = decltype(mt)::value;
    const dim3 grid(static_cast<unsigned>((g.L + 64 * MT - 1) / (64 * MT)),
                    static_cast<unsigned>(g.H), static_cast<unsigned>(S));
    attn_tc_kernel<H, DM, BK, MT><<<grid, 128, 0, ctx.stream>>>(src, g, c, scale, out);
  };
  using I32 = std::integral_constant<int, 32>;
  using I64 = std::integral_constant<int, 64>;
  using MT = std::integral_constant<int, V == 2 ? 1 : 2>;
  using BK = std::integral_constant<int, V == 3 ? 32 : 64>;
  if (c.hd <= 32)
    launch(I32{}, BK{}, MT{});
  else if (c.hd <= 64)
    launch(I64{}, BK{}, MT{});
  else
    launch(std::integral_constant<int, 128>{}, I32{}, std::integral_constant<int, 1>{});
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
        cudaFuncGetAttributes(&attr, attn_tc_kernel<bfloat16_t, 64, 64, 2>) == cudaSuccess &&
        attr.ptxVersion >= 80;
    (void)cudaGetLastError();
    k = cc && code ? 1 : 0;
  }
  return k == 1;
}

}  // namespace unidiffuser::cuda_detail
