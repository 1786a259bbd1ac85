// SPDX-License-Identifier: Apache-2.0
//! \file attention_tc_backward.cuh
//! Tensor-core backward of attention for the bf16 / fp16 math modes (flash-attention-2 style),
//! head dims up to 64 (128: the exact kernels of attention.cuh):
//!  1. q | k | v and dO rounded once into 16-bit copies (head slices padded to a multiple of 8);
//!  2. row statistics by the forward kernel (attn_tc_kernel with STATS): lse2 = log2 of the
//!     softmax denominator (in the exp2 domain of the forward) and delta = dO . O, from fp32 dO
//!     and the fp32 output;
//!  3. dQ, query-major (4 warps x 16 query rows; key tiles of 64 double-buffered by cp.async):
//!     S = q k^T, P = 2^(S scale log2(e) - lse2), dP = dO v^T, dS = P (dP - delta),
//!     dQ += dS k;
//!  4. dK and dV, key-major (4 warps x 16 keys; query tiles of 32 double-buffered): the same
//!     products transposed, dV += P^T dO, dK += dS^T q.
//! Every product is m16n8k16 with 16-bit operands (P and dS rounded to 16 bits as operands) and
//! fp32 accumulation; every gradient element is written once (no atomics: deterministic).
#pragma once

#include <cstdint>

#include "unidiffuser/backend/cuda/attention_tc.cuh"

namespace unidiffuser::cuda_detail {

// The row-major A operand (rows r and r + 8 of this thread, DM / 16 chunks of 16 columns) from a
// [rows][LD] 16-bit shared tile.
template <int DM, int LD>
__device__ inline void tc_a_frags(const std::uint16_t (*t)[LD], int r0, int c,
                                  std::uint32_t (&a)[DM / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < DM / 16; ++kk) {
    a[kk][0] = *reinterpret_cast<const std::uint32_t*>(&t[r0][kk * 16 + c]);
    a[kk][1] = *reinterpret_cast<const std::uint32_t*>(&t[r0 + 8][kk * 16 + c]);
    a[kk][2] = *reinterpret_cast<const std::uint32_t*>(&t[r0][kk * 16 + c + 8]);
    a[kk][3] = *reinterpret_cast<const std::uint32_t*>(&t[r0 + 8][kk * 16 + c + 8]);
  }
}

// acc[N/8][4] = A B^T for A (registers, 16 rows x DM) and the N rows of a row-major tile
// (B^T's rows: the column-major B operand by ldmatrix without transposition).
template <class H, int DM, int N, int LD>
__device__ inline void tc_abt(const std::uint32_t (&a)[DM / 16][4], const std::uint16_t (*t)[LD],
                              int lane, float (&acc)[N / 8][4]) {
#pragma unroll
  for (int nt = 0; nt < N / 8; ++nt) {
    acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
    for (int kp = 0; kp < DM / 32; ++kp) {
      std::uint32_t b[4];
      ldsm_x4<false>(b, &t[nt * 8 + (lane % 8)][kp * 32 + (lane / 8) * 8]);
      const std::uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma16816<H>(acc[nt], a[2 * kp], b0);
      mma16816<H>(acc[nt], a[2 * kp + 1], b1);
    }
  }
}

// acc[DM/8][4] += X B for X [16 rows, K] in accumulator layout (x[K/8][4], rounded to 16 bits
// here) and B = the K rows x DM columns of a row-major tile (ldmatrix with transposition).
template <class H, int DM, int K, int LD>
__device__ inline void tc_xb(const float (&x)[K / 8][4], const std::uint16_t (*t)[LD], int lane,
                             float (&acc)[DM / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const std::uint32_t a[4] = {pack16<H>(x[2 * kk][0], x[2 * kk][1]),
                                pack16<H>(x[2 * kk][2], x[2 * kk][3]),
                                pack16<H>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                                pack16<H>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < DM / 16; ++dp) {
      std::uint32_t b[4];
      ldsm_x4<true>(b, &t[kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8][dp * 16 + (lane / 16) * 8]);
      const std::uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
      mma16816<H>(acc[2 * dp], a, b0);
      mma16816<H>(acc[2 * dp + 1], a, b1);
    }
  }
}

// Writes acc (16 rows per warp in accumulator layout) times `mul` to rows r of
// dst + r * ld (columns < D).
template <int DM>
__device__ inline void tc_store_rows(const float (&acc)[DM / 8][4], float mul, float* dst,
                                     std::int64_t ld, std::int64_t first, std::int64_t rows,
                                     int gid, int c, int D) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t i = first + gid + 8 * r;
    if (i >= rows) continue;
    float* o = dst + i * ld;
#pragma unroll
    for (int dt = 0; dt < DM / 8; ++dt) {
      const int col = dt * 8 + c;
      if (col < D) o[col] = acc[dt][2 * r] * mul;
      if (col + 1 < D) o[col + 1] = acc[dt][2 * r + 1] * mul;
    }
  }
}

//! dQ: blocks of 64 query rows of one (sample, head). q16 / g: the packed 16-bit q | k | v;
//! do16: packed 16-bit dO [S; L, E]; dq: fp32 rows (g.old / g.ostride apart, q columns).
template <class H, int DM>
__global__ void __launch_bounds__(128)
    attn_tc_dq_kernel(const std::uint16_t* __restrict__ q16, const std::uint16_t* __restrict__ do16,
                      AttnGeom g, TcCopy cp, float scale, const float* __restrict__ lse2,
                      const float* __restrict__ delta, float* __restrict__ dq) {
  constexpr int BK = 64, LD = DM + 8;
  __shared__ alignas(128) std::uint16_t ks[2][BK][LD];
  __shared__ alignas(128) std::uint16_t vs[2][BK][LD];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     q0 = static_cast<std::int64_t>(blockIdx.x) * 64;
  const std::uint16_t* base = q16 + s * cp.stride + h * cp.hd;
  const std::uint16_t* dob = do16 + s * g.L * cp.ce + h * cp.hd;
  const int D = static_cast<int>(g.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, c = (lane % 4) * 2;
  // q and dO of this block's rows through the second buffers (first refilled after a barrier)
  tc_load<64, LD>(ks[1], base, q0, g.L, static_cast<int>(cp.hd), cp.ld);
  tc_load<64, LD>(vs[1], dob, q0, g.L, static_cast<int>(cp.hd), cp.ce);
  tc_load<BK, LD>(ks[0], base + cp.ce, 0, g.L, static_cast<int>(cp.hd), cp.ld);
  tc_load<BK, LD>(vs[0], base + 2 * cp.ce, 0, g.L, static_cast<int>(cp.hd), cp.ld);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  std::uint32_t qa[DM / 16][4], da[DM / 16][4];
  tc_a_frags<DM, LD>(ks[1], warp * 16 + gid, c, qa);
  tc_a_frags<DM, LD>(vs[1], warp * 16 + gid, c, da);
  float li[2], di[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t q = q0 + warp * 16 + gid + 8 * r;
    const std::int64_t row = (s * g.H + h) * g.L + (q < g.L ? q : 0);
    li[r] = lse2[row];
    di[r] = delta[row];
  }
  __syncthreads();  // q / dO fragments are in registers before buffer 1 is refilled
  float acc[DM / 8][4];
#pragma unroll
  for (int dt = 0; dt < DM / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  const float sl2 = scale * 1.4426950408889634f;
  const int tiles = static_cast<int>((g.L + BK - 1) / BK);
  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < tiles) {
      const std::int64_t k1 = static_cast<std::int64_t>(t + 1) * BK;
      tc_load<BK, LD>(ks[buf ^ 1], base + cp.ce, k1, g.L, static_cast<int>(cp.hd), cp.ld);
      tc_load<BK, LD>(vs[buf ^ 1], base + 2 * cp.ce, k1, g.L, static_cast<int>(cp.hd), cp.ld);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const std::int64_t k0 = static_cast<std::int64_t>(t) * BK;
    float sc[BK / 8][4], dp[BK / 8][4];
    tc_abt<H, DM, BK, LD>(qa, ks[buf], lane, sc);
    tc_abt<H, DM, BK, LD>(da, vs[buf], lane, dp);
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool live = k0 + nt * 8 + c + (i & 1) < g.L;
        const float p = live ? exp2f(sc[nt][i] * sl2 - li[i >> 1]) : 0.f;
        sc[nt][i] = p * (dp[nt][i] - di[i >> 1]);
      }
    tc_xb<H, DM, BK, LD>(sc, ks[buf], lane, acc);
    __syncthreads();
  }
  tc_store_rows<DM>(acc, scale, dq + s * g.ostride + h * g.D, g.old, q0 + warp * 16, g.L, gid, c,
                    D);
}

//! dK and dV: blocks of 64 keys of one (sample, head); query tiles of 32.
template <class H, int DM>
__global__ void __launch_bounds__(128)
    attn_tc_dkv_kernel(const std::uint16_t* __restrict__ q16,
                       const std::uint16_t* __restrict__ do16, AttnGeom g, TcCopy cp, float scale,
                       const float* __restrict__ lse2, const float* __restrict__ delta,
                       float* __restrict__ dqkv) {
  constexpr int BQ = 32, LD = DM + 8;
  __shared__ alignas(128) std::uint16_t kvs[2][64][LD];
  __shared__ alignas(128) std::uint16_t qs[2][BQ][LD];
  __shared__ alignas(128) std::uint16_t dos[2][BQ][LD];
  __shared__ float ls[2][BQ], dl[2][BQ];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     j0 = static_cast<std::int64_t>(blockIdx.x) * 64;
  const std::uint16_t* base = q16 + s * cp.stride + h * cp.hd;
  const std::uint16_t* dob = do16 + s * g.L * cp.ce + h * cp.hd;
  const float* lsb = lse2 + (s * g.H + h) * g.L;
  const float* dlb = delta + (s * g.H + h) * g.L;
  const int D = static_cast<int>(g.D);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, c = (lane % 4) * 2;
  auto stats = [&](int b, std::int64_t q0) {
    for (int i = static_cast<int>(threadIdx.x); i < BQ; i += 128) {
      const bool ok = q0 + i < g.L;
      ls[b][i] = ok ? lsb[q0 + i] : 0.f;
      dl[b][i] = ok ? dlb[q0 + i] : 0.f;
    }
  };
  tc_load<64, LD>(kvs[0], base + cp.ce, j0, g.L, static_cast<int>(cp.hd), cp.ld);
  tc_load<64, LD>(kvs[1], base + 2 * cp.ce, j0, g.L, static_cast<int>(cp.hd), cp.ld);
  tc_load<BQ, LD>(qs[0], base, 0, g.L, static_cast<int>(cp.hd), cp.ld);
  tc_load<BQ, LD>(dos[0], dob, 0, g.L, static_cast<int>(cp.hd), cp.ce);
  cp_async_commit();
  stats(0, 0);
  cp_async_wait<0>();
  __syncthreads();
  std::uint32_t ka[DM / 16][4], va[DM / 16][4];
  tc_a_frags<DM, LD>(kvs[0], warp * 16 + gid, c, ka);
  tc_a_frags<DM, LD>(kvs[1], warp * 16 + gid, c, va);
  float dk[DM / 8][4], dv[DM / 8][4];
#pragma unroll
  for (int dt = 0; dt < DM / 8; ++dt)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[dt][i] = dv[dt][i] = 0.f;
  const float sl2 = scale * 1.4426950408889634f;
  const int tiles = static_cast<int>((g.L + BQ - 1) / BQ);
  for (int t = 0; t < tiles; ++t) {
    const int buf = t & 1;
    if (t + 1 < tiles) {
      const std::int64_t q1 = static_cast<std::int64_t>(t + 1) * BQ;
      tc_load<BQ, LD>(qs[buf ^ 1], base, q1, g.L, static_cast<int>(cp.hd), cp.ld);
      tc_load<BQ, LD>(dos[buf ^ 1], dob, q1, g.L, static_cast<int>(cp.hd), cp.ce);
      cp_async_commit();
      stats(buf ^ 1, q1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const std::int64_t q0 = static_cast<std::int64_t>(t) * BQ;
    float p[BQ / 8][4], dp[BQ / 8][4];
    tc_abt<H, DM, BQ, LD>(ka, qs[buf], lane, p);    // S^T: keys x queries
    tc_abt<H, DM, BQ, LD>(va, dos[buf], lane, dp);  // dP^T
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = nt * 8 + c + (i & 1);
        const bool live = q0 + qi < g.L;
        p[nt][i] = live ? exp2f(p[nt][i] * sl2 - ls[buf][qi]) : 0.f;
        dp[nt][i] = p[nt][i] * (dp[nt][i] - dl[buf][qi]);
      }
    tc_xb<H, DM, BQ, LD>(p, dos[buf], lane, dv);
    tc_xb<H, DM, BQ, LD>(dp, qs[buf], lane, dk);
    __syncthreads();
  }
  float* out = dqkv + s * g.ostride + h * g.D;
  tc_store_rows<DM>(dk, scale, out + g.E, g.old, j0 + warp * 16, g.L, gid, c, D);
  tc_store_rows<DM>(dv, 1.f, out + 2 * g.E, g.old, j0 + warp * 16, g.L, gid, c, D);
}

//! The tensor-core backward where it applies (head dims up to 64; returns false for larger ones
//! and writes nothing): qkv / g the fp32 input ([S; L, 3E], g.ld / g.stride), dout fp32
//! [S; L, E] (dold / dostride apart), dqkv fp32 (g.old / g.ostride apart).
template <class H>
bool attention_tc_backward(const Context<cuda>& ctx, const float* qkv, const AttnGeom& g,
                           std::int64_t S, const float* dout, std::int64_t dold,
                           std::int64_t dostride, float* dqkv, float scale, const char* op) {
  if (g.D > 64) return false;
  const std::int64_t L = g.L, nrows = S * g.H * L;
  const TcCopy c = tc_copy(L, g.H, g.D);
  const Scratch q16 = round_heads16<H>(ctx, qkv, S, L, 3, g.H, g.D, g.ld, g.stride, op);
  const Scratch d16 = round_heads16<H>(ctx, dout, S, L, 1, g.H, g.D, dold, dostride, op);
  Scratch stats(ctx, 2 * static_cast<std::size_t>(nrows) * sizeof(float), op);
  float* lse2 = stats.template as<float>();
  float* delta = lse2 + nrows;
  const std::uint16_t* qs = q16.template as<const std::uint16_t>();
  const std::uint16_t* ds = d16.template as<const std::uint16_t>();
  const dim3 grid(static_cast<unsigned>((L + 63) / 64), static_cast<unsigned>(g.H),
                  static_cast<unsigned>(S));
  const AttnStats st{dout, dold, dostride, lse2, delta};
  const auto run = [&](auto dm) {
    constexpr int DM = decltype(dm)::value;
    attn_tc_kernel<H, DM, 64, 1, true><<<grid, 128, 0, ctx.stream>>>(qs, g, c, scale, nullptr, st);
    check_launch(op);
    attn_tc_dq_kernel<H, DM><<<grid, 128, 0, ctx.stream>>>(qs, ds, g, c, scale, lse2, delta, dqkv);
    check_launch(op);
    attn_tc_dkv_kernel<H, DM><<<grid, 128, 0, ctx.stream>>>(qs, ds, g, c, scale, lse2, delta, dqkv);
    check_launch(op);
  };
  if (c.hd <= 32)
    run(std::integral_constant<int, 32>{});
  else
    run(std::integral_constant<int, 64>{});
  return true;
}

}  // namespace unidiffuser::cuda_detail
