// SPDX-License-Identifier: Apache-2.0
//! \file attention.cuh
//! Fused multi-head self-attention of the CUDA backend in the flash-attention style: keys and
//! values stream through shared memory in tiles, each query row keeps a running maximum, a
//! running sum and its output accumulator (online softmax), so no [L, L] score matrix exists.
//! The backward recomputes the probabilities from per-row log-sum-exp values: one pass for the
//! row statistics (log-sum-exp, delta = dO . O), one for dQ (query-major), one each for dV and dK
//! (key-major) -- every gradient element is written once, with no atomics (deterministic).
//!
//! This is the exact path (fp32 / fp64 arithmetic on CUDA cores, one thread per row, head
//! dimension padded to 16, 32, 64 or 128 in registers); tensor-core (bf16 / fp16 mma) kernels
//! are future work.
#pragma once

#include <cmath>
#include <cstdint>

#include "unidiffuser/backend/cuda/runtime.cuh"

namespace unidiffuser::cuda_detail {

struct AttnGeom {
  std::int64_t L, E, H, D;
  std::int64_t ld, stride;    // qkv
  std::int64_t old, ostride;  // out / dout / dqkv (per kernel)
};

inline constexpr int kAttnThreads = 64;
inline constexpr int kAttnSub = 16;  // keys per online-softmax update
//! Keys (or queries) per shared-memory tile: two [tile, DM] arrays in 32 KiB.
template <class Acc, int DM>
constexpr int attn_tile() {
  return 16384 / (DM * static_cast<int>(sizeof(Acc)));
}

// Loads rows [r0, r0 + n) of the head-h slices at column offsets c0 (and c1) into [tile, DM]
// shared arrays, zero-filling rows >= n and columns >= D.
template <class T, class Acc, int DM, int TILE>
__device__ void attn_load(const T* base, const AttnGeom& g, std::int64_t h, std::int64_t r0, int n,
                          std::int64_t c0, Acc (*a)[DM], std::int64_t c1, Acc (*b)[DM]) {
  for (int e = threadIdx.x; e < TILE * DM; e += blockDim.x) {
    const int j = e / DM, d = e % DM;
    const bool ok = j < n && d < g.D;
    const T* row = base + (r0 + j) * g.ld + h * g.D + d;
    a[j][d] = ok ? static_cast<Acc>(row[c0]) : Acc(0);
    b[j][d] = ok ? static_cast<Acc>(row[c1]) : Acc(0);
  }
}

//! Forward (dout null): out = softmax(scale q k^T) v per head. Statistics pass (dout given):
//! lse[row] = max + log(sum) and delta[row] = dout . out for rows (s, h, i), out not written.
template <class T, class Acc, int DM>
__global__ void __launch_bounds__(kAttnThreads)
    attn_forward_kernel(const T* qkv, AttnGeom g, Acc scale, T* out, const T* dout, Acc* lse,
                        Acc* delta) {
  constexpr int TILE = attn_tile<Acc, DM>();
  __shared__ Acc ks[TILE][DM];
  __shared__ Acc vs[TILE][DM];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     i = static_cast<std::int64_t>(blockIdx.x) * kAttnThreads + threadIdx.x;
  const T* base = qkv + s * g.stride;
  const bool live = i < g.L;
  Acc q[DM], acc[DM];
#pragma unroll
  for (int d = 0; d < DM; ++d) {
    q[d] = live && d < g.D ? static_cast<Acc>(base[i * g.ld + h * g.D + d]) : Acc(0);
    acc[d] = 0;
  }
  Acc mx = -INFINITY, l = 0;
  for (std::int64_t k0 = 0; k0 < g.L; k0 += TILE) {
    const int nk = static_cast<int>(g.L - k0 < TILE ? g.L - k0 : TILE);
    attn_load<T, Acc, DM, TILE>(base, g, h, k0, nk, g.E, ks, 2 * g.E, vs);
    __syncthreads();
    if (live) {
      for (int j0 = 0; j0 < nk; j0 += kAttnSub) {
        Acc sc[kAttnSub];
        Acc tmax = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < kAttnSub; ++jj) {
          Acc dot = 0;
#pragma unroll
          for (int d = 0; d < DM; ++d) dot += q[d] * ks[j0 + jj][d];
          sc[jj] = j0 + jj < nk ? dot * scale : Acc(-INFINITY);
          tmax = sc[jj] > tmax ? sc[jj] : tmax;
        }
        const Acc mnew = tmax > mx ? tmax : mx;
        const Acc alpha = exp(mx - mnew);
        l *= alpha;
#pragma unroll
        for (int d = 0; d < DM; ++d) acc[d] *= alpha;
#pragma unroll
        for (int jj = 0; jj < kAttnSub; ++jj) {
          const Acc p = exp(sc[jj] - mnew);
          l += p;
#pragma unroll
          for (int d = 0; d < DM; ++d) acc[d] += p * vs[j0 + jj][d];
        }
        mx = mnew;
      }
    }
    __syncthreads();
  }
  if (!live) return;
  const Acc inv = Acc(1) / l;
  if (dout == nullptr) {
    T* o = out + s * g.ostride + i * g.old + h * g.D;
#pragma unroll
    for (int d = 0; d < DM; ++d)
      if (d < g.D) o[d] = static_cast<T>(acc[d] * inv);
    return;
  }
  const T* dor = dout + s * g.ostride + i * g.old + h * g.D;
  Acc dl = 0;
#pragma unroll
  for (int d = 0; d < DM; ++d)
    if (d < g.D) dl += static_cast<Acc>(dor[d]) * static_cast<T>(acc[d] * inv);
  const std::int64_t row = (s * g.H + h) * g.L + i;
  lse[row] = mx + log(l);
  delta[row] = dl;
}

//! dQ rows: dq_i = scale sum_j p_ij (dO_i . v_j - delta_i) k_j, written to dqkv[:, h D + d].
template <class T, class Acc, int DM>
__global__ void __launch_bounds__(kAttnThreads)
    attn_dq_kernel(const T* qkv, AttnGeom g, Acc scale, const T* dout, std::int64_t dold,
                   std::int64_t dostride, const Acc* lse, const Acc* delta, T* dqkv) {
  constexpr int TILE = attn_tile<Acc, DM>();
  __shared__ Acc ks[TILE][DM];
  __shared__ Acc vs[TILE][DM];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     i = static_cast<std::int64_t>(blockIdx.x) * kAttnThreads + threadIdx.x;
  const T* base = qkv + s * g.stride;
  const bool live = i < g.L;
  Acc q[DM], dO[DM], dq[DM];
#pragma unroll
  for (int d = 0; d < DM; ++d) {
    const bool ok = live && d < g.D;
    q[d] = ok ? static_cast<Acc>(base[i * g.ld + h * g.D + d]) : Acc(0);
    dO[d] = ok ? static_cast<Acc>(dout[s * dostride + i * dold + h * g.D + d]) : Acc(0);
    dq[d] = 0;
  }
  const std::int64_t row = (s * g.H + h) * g.L + (live ? i : 0);
  const Acc li = lse[row], di = delta[row];
  for (std::int64_t k0 = 0; k0 < g.L; k0 += TILE) {
    const int nk = static_cast<int>(g.L - k0 < TILE ? g.L - k0 : TILE);
    attn_load<T, Acc, DM, TILE>(base, g, h, k0, nk, g.E, ks, 2 * g.E, vs);
    __syncthreads();
    if (live) {
      for (int j = 0; j < nk; ++j) {
        Acc dot = 0, dp = 0;
#pragma unroll
        for (int d = 0; d < DM; ++d) {
          dot += q[d] * ks[j][d];
          dp += dO[d] * vs[j][d];
        }
        const Acc ds = exp(dot * scale - li) * (dp - di);
#pragma unroll
        for (int d = 0; d < DM; ++d) dq[d] += ds * ks[j][d];
      }
    }
    __syncthreads();
  }
  if (!live) return;
  T* o = dqkv + s * g.ostride + i * g.old + h * g.D;
#pragma unroll
  for (int d = 0; d < DM; ++d)
    if (d < g.D) o[d] = static_cast<T>(dq[d] * scale);
}

//! dV (DV) or dK rows, key-major: dv_j = sum_i p_ij dO_i; dk_j = scale sum_i ds_ij q_i.
template <class T, class Acc, int DM, bool DV>
__global__ void __launch_bounds__(kAttnThreads)
    attn_dkv_kernel(const T* qkv, AttnGeom g, Acc scale, const T* dout, std::int64_t dold,
                    std::int64_t dostride, const Acc* lse, const Acc* delta, T* dqkv) {
  constexpr int TILE = attn_tile<Acc, DM>() / 2 > kAttnSub ? attn_tile<Acc, DM>() / 2 : kAttnSub;
  __shared__ Acc qs[TILE][DM];
  __shared__ Acc dos[TILE][DM];
  __shared__ Acc ls[TILE], dl[TILE];
  const std::int64_t s = blockIdx.z, h = blockIdx.y,
                     j = static_cast<std::int64_t>(blockIdx.x) * kAttnThreads + threadIdx.x;
  const T* base = qkv + s * g.stride;
  const bool live = j < g.L;
  Acc k[DM], v[DM], acc[DM];
#pragma unroll
  for (int d = 0; d < DM; ++d) {
    const bool ok = live && d < g.D;
    k[d] = ok ? static_cast<Acc>(base[j * g.ld + g.E + h * g.D + d]) : Acc(0);
    v[d] = ok && !DV ? static_cast<Acc>(base[j * g.ld + 2 * g.E + h * g.D + d]) : Acc(0);
    acc[d] = 0;
  }
  const T* dob = dout + s * dostride;
  for (std::int64_t q0 = 0; q0 < g.L; q0 += TILE) {
    const int nq = static_cast<int>(g.L - q0 < TILE ? g.L - q0 : TILE);
    for (int e = threadIdx.x; e < TILE * DM; e += blockDim.x) {
      const int r = e / DM, d = e % DM;
      const bool ok = r < nq && d < g.D;
      qs[r][d] = ok ? static_cast<Acc>(base[(q0 + r) * g.ld + h * g.D + d]) : Acc(0);
      dos[r][d] = ok ? static_cast<Acc>(dob[(q0 + r) * dold + h * g.D + d]) : Acc(0);
    }
    for (int r = threadIdx.x; r < TILE; r += blockDim.x) {
      const std::int64_t row = (s * g.H + h) * g.L + q0 + r;
      ls[r] = r < nq ? lse[row] : Acc(0);
      dl[r] = r < nq ? delta[row] : Acc(0);
    }
    __syncthreads();
    if (live) {
      for (int r = 0; r < nq; ++r) {
        Acc dot = 0;
#pragma unroll
        for (int d = 0; d < DM; ++d) dot += qs[r][d] * k[d];
        const Acc p = exp(dot * scale - ls[r]);
        if constexpr (DV) {
#pragma unroll
          for (int d = 0; d < DM; ++d) acc[d] += p * dos[r][d];
        } else {
          Acc dp = 0;
#pragma unroll
          for (int d = 0; d < DM; ++d) dp += dos[r][d] * v[d];
          const Acc ds = p * (dp - dl[r]);
#pragma unroll
          for (int d = 0; d < DM; ++d) acc[d] += ds * qs[r][d];
        }
      }
    }
    __syncthreads();
  }
  if (!live) return;
  T* o = dqkv + s * g.ostride + j * g.old + (DV ? 2 : 1) * g.E + h * g.D;
#pragma unroll
  for (int d = 0; d < DM; ++d)
    if (d < g.D) o[d] = static_cast<T>(DV ? acc[d] : acc[d] * scale);
}

template <class Acc>
inline Acc attn_scale(std::int64_t dh) {
  return static_cast<Acc>(1.0 / std::sqrt(static_cast<double>(dh)));
}

// Calls f(std::integral_constant<int, DM>) for the padded head dimension of dh (<= 128).
template <class F>
void with_head_dim(std::int64_t dh, const char* op, F&& f) {
  if (dh <= 16) return f(std::integral_constant<int, 16>{});
  if (dh <= 32) return f(std::integral_constant<int, 32>{});
  if (dh <= 64) return f(std::integral_constant<int, 64>{});
  if (dh <= 128) return f(std::integral_constant<int, 128>{});
  throw_mismatch(op, "qkv", "head dimension", "<= 128", dh);
}

}  // namespace unidiffuser::cuda_detail
