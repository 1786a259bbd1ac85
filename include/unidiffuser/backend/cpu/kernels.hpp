// SPDX-License-Identifier: Apache-2.0
//! \file kernels.hpp
//! Single-threaded CPU kernels behind the network primitives of backend/cpu/nn.hpp, over raw
//! row-major blocks (pointer, rows, cols, leading dimension). GEMMs go through Eigen's blocked
//! kernel called directly; attention uses register tiles of Eigen packets. Every kernel runs on
//! the calling thread and its result depends only on the sizes and the data (never on threads or
//! on where the call runs): the basis of the bit-identical per-sample results (docs/NOTES.md,
//! "Reproducibility"). Ref: UVIT.md §4.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <unsupported/Eigen/SpecialFunctions>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/config.hpp"

namespace unidiffuser::cpu_kernels {

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

namespace detail {
//! Eigen's single-thread blocking sizes for a column-major [rows, cols] += [rows, depth] x
//! [depth, cols] product (what gemm_blocking_space computes for one thread), with the packing
//! buffers taken from per-thread storage that grows and is kept: no allocation per product
//! (Eigen would heap-allocate packing buffers over 128 KiB on every call).
template <class T>
class GemmBlocking : public Eigen::internal::level3_blocking<T, T> {
 public:
  GemmBlocking(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth) {
    this->m_mc = rows;
    this->m_nc = cols;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc,
                                                          Eigen::Index{1});
    thread_local AlignedVector<T> a, b;
    const auto sa = static_cast<std::size_t>(this->m_mc * this->m_kc);
    const auto sb = static_cast<std::size_t>(this->m_kc * this->m_nc);
    if (a.size() < sa) a.resize(sa);
    if (b.size() < sb) b.resize(sb);
    this->m_blockA = a.data();
    this->m_blockB = b.data();
  }
};

//! y [m, n] (ldy) += x [m, k] (ldx) W^T, W [n, k] (ldw) row-major (`WOrder` RowMajor) or
//! W^T [k, n] row-major, i.e. y += x V with V = W^T (`WOrder` ColMajor): Eigen's blocked GEMM
//! kernel called directly, always on the calling thread with single-thread blocking. `Y.noalias()
//! += X * W^T` would pick multi-threaded blocking outside an OpenMP region and a coefficient-wise
//! product for tiny sizes, so the rounding of an element would depend on the thread count and the
//! problem size; here it depends only on (m, n, k) and the data -- the basis of the U-ViT's
//! bit-identical per-sample results (docs/NOTES.md, "Reproducibility").
template <class T, int WOrder = Eigen::RowMajor>
void gemm_nt_accumulate(const T* x, std::int64_t m, std::int64_t k, std::int64_t ldx, const T* w,
                        std::int64_t n, std::int64_t ldw, T* y, std::int64_t ldy) {
  if (m == 0 || n == 0 || k == 0) return;
  namespace ei = Eigen::internal;
  using Index = Eigen::Index;
  // column-major view: Y^T [n, m] (stride ldy) += W [n, k] (row-major, ldw) X^T [k, m] (ldx)
  GemmBlocking<T> blocking(static_cast<Index>(n), static_cast<Index>(m), static_cast<Index>(k));
  ei::general_matrix_matrix_product<Index, T, WOrder, false, T, Eigen::ColMajor, false,
                                    Eigen::ColMajor, 1>::run(static_cast<Index>(n),
                                                             static_cast<Index>(m),
                                                             static_cast<Index>(k), w,
                                                             static_cast<Index>(ldw), x,
                                                             static_cast<Index>(ldx), y, 1,
                                                             static_cast<Index>(ldy), T(1),
                                                             blocking, nullptr);
}
}  // namespace detail

//! y[M, N] (+)= x[M, K] W[N, K]^T (+ b[N]): nn.Linear with row-major weight [out, in], on the
//! calling thread. Without `accumulate` the bias is the GEMM's initial value (y = b; y += x W^T),
//! which saves the zero fill and the separate bias pass of y = x W^T; y += b. The result of an
//! element depends only on (M, N, K) and the data, never on threads or where the call runs.
template <class T>
void linear(const T* x, std::int64_t m, std::int64_t k, std::int64_t ldx, const T* w,
            std::int64_t n, std::int64_t ldw, const T* b, T* y, std::int64_t ldy,
            bool accumulate = false) {
  if (!accumulate)
    for (std::int64_t i = 0; i < m; ++i) {
      T* yr = y + i * ldy;
      if (b)
        std::copy_n(b, n, yr);
      else
        std::fill_n(yr, n, T(0));
    }
  detail::gemm_nt_accumulate(x, m, k, ldx, w, n, ldw, y, ldy);
  if (accumulate && b)
    for (std::int64_t i = 0; i < m; ++i) {
      T* yr = y + i * ldy;
      for (std::int64_t j = 0; j < n; ++j) yr[j] += b[j];
    }
}

//! Over rows of x [M, N] (rows ldx apart; r, y alike): y = LayerNorm(x (+ r)) with gain g and
//! bias b (eps 1e-5, biased variance, two-pass statistics in the compute type); y may be x.
//! `stats` (optional) receives (mean, 1 / sqrt(var + eps)) per row, two values a row.
template <class T>
void layer_norm(const T* x, std::int64_t ldx, const T* r, std::int64_t ldr, T* y, std::int64_t ldy,
                std::int64_t m, std::int64_t n, const T* g, const T* b, T* stats = nullptr,
                double eps = 1e-5) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  const CRow G(g, n), Bv(b, n);
  for (std::int64_t i = 0; i < m; ++i) {
    Row row(y + i * ldy, n);
    if (r)
      row = CRow(x + i * ldx, n) + CRow(r + i * ldr, n);
    else if (y + i * ldy != x + i * ldx)
      row = CRow(x + i * ldx, n);
    const T mean = row.sum() / static_cast<T>(n);
    const T var = (row - mean).square().sum() / static_cast<T>(n);
    const T inv = T(1) / std::sqrt(var + static_cast<T>(eps));
    row = (row - mean) * inv * G + Bv;
    if (stats) {
      stats[2 * i] = mean;
      stats[2 * i + 1] = inv;
    }
  }
}

//! Backward of layer_norm over rows: z = x (+ r), xhat = (z - mean) rstd from `stats`;
//! dz = rstd (dy g - mean(dy g) - xhat mean(dy g xhat)) written to dz (may be dy); the
//! per-column sums dg += dy xhat and db += dy are left to layer_norm_param_grads. Vectorised
//! with Eigen arrays in the compute type.
template <class T>
void layer_norm_backward(const T* x, std::int64_t ldx, const T* r, std::int64_t ldr, const T* stats,
                         const T* dy, std::int64_t lddy, T* dz, std::int64_t lddz, std::int64_t m,
                         std::int64_t n, const T* g) {
  using A = Eigen::Array<T, 1, Eigen::Dynamic>;
  using CRow = Eigen::Map<const A>;
  const CRow G(g, n);
  const T inv_n = T(1) / static_cast<T>(n);
  for (std::int64_t i = 0; i < m; ++i) {
    const T mean = stats[2 * i], rstd = stats[2 * i + 1];
    const CRow X(x + i * ldx, n), D(dy + i * lddy, n);
    Eigen::Map<A> O(dz + i * lddz, n);
    auto body = [&](const auto& Z) {
      const auto XH = (Z - mean) * rstd;
      const T s1 = (D * G).sum() * inv_n, s2 = (D * G * XH).sum() * inv_n;
      O = rstd * (D * G - s1 - XH * s2);
    };
    if (r)
      body(X + CRow(r + i * ldr, n));
    else
      body(X);
  }
}

//! dg[j] += sum_i dy[i, j] xhat[i, j], db[j] += sum_i dy[i, j] for columns [c0, c0 + nc).
template <class T>
void layer_norm_param_grads(const T* x, std::int64_t ldx, const T* r, std::int64_t ldr,
                            const T* stats, const T* dy, std::int64_t lddy, std::int64_t m,
                            std::int64_t c0, std::int64_t nc, T* dg, T* db) {
  using A = Eigen::Array<T, 1, Eigen::Dynamic>;
  using CRow = Eigen::Map<const A>;
  Eigen::Map<A> DG(dg ? dg + c0 : nullptr, dg ? nc : 0), DB(db ? db + c0 : nullptr, db ? nc : 0);
  for (std::int64_t i = 0; i < m; ++i) {
    const T mean = stats[2 * i], rstd = stats[2 * i + 1];
    const CRow X(x + i * ldx + c0, nc), D(dy + i * lddy + c0, nc);
    if (dg) {
      if (r)
        DG += D * ((X + CRow(r + i * ldr + c0, nc)) - mean) * rstd;
      else
        DG += D * (X - mean) * rstd;
    }
    if (db) DB += D;
  }
}

//! y = GELU(x) over n contiguous values (y may be x): exact erf GELU 0.5 u (1 + erf(u / sqrt 2))
//! with Eigen's vectorised erf.
template <class T>
void gelu(const T* x, T* y, std::int64_t n) {
  const Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>> u(x, n);
  const T r = static_cast<T>(0.70710678118654752440);
  Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>(y, n) = T(0.5) * u * (T(1) + (u * r).erf());
}
//! y = GELU(y + bias) over rows of y [M, N] (bias may be null).
template <class T>
void bias_gelu(T* y, std::int64_t m, std::int64_t n, const T* bias) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  for (std::int64_t i = 0; i < m; ++i) {
    T* row = y + i * n;
    if (bias) Row(row, n) += CRow(bias, n);
    gelu<T>(row, row, n);
  }
}
//! Exact GELU in place over n contiguous values.
template <class T>
void gelu(T* x, std::int64_t n) {
  gelu<T>(x, x, n);
}

//! SiLU u sigmoid(u), in place.
template <class T>
void silu(T* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) x[i] = x[i] / (T(1) + std::exp(-x[i]));
}

namespace detail {
template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;
template <class T>
inline constexpr int lanes = Eigen::internal::unpacket_traits<Packet<T>>::size;
#if defined(__GNUC__)
#pragma GCC diagnostic push
// PacketBlock<Packet16f, ...> drops the vector type's alignment attribute in the template
// argument, as in Eigen's own kernels (which silence the same warning)
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
//! dst[j ldd + i] = src[i lds + j] for i < rows, j < cols (the transpose of a strided block),
//! by register tiles of lanes x lanes where Eigen vectorises T.
template <class T>
void transpose(const T* src, std::int64_t rows, std::int64_t cols, std::int64_t lds, T* dst,
               std::int64_t ldd) {
  using namespace Eigen::internal;
  constexpr int W = lanes<T>;
  std::int64_t i0 = 0;
  if constexpr (W > 1 && packet_traits<T>::Vectorizable) {
    for (; i0 + W <= rows; i0 += W) {
      std::int64_t j0 = 0;
      for (; j0 + W <= cols; j0 += W) {
        PacketBlock<Packet<T>, W> b;
        for (int r = 0; r < W; ++r) b.packet[r] = ploadu<Packet<T>>(src + (i0 + r) * lds + j0);
        ptranspose(b);
        for (int r = 0; r < W; ++r) pstoreu(dst + (j0 + r) * ldd + i0, b.packet[r]);
      }
      for (std::int64_t j = j0; j < cols; ++j)
        for (std::int64_t i = i0; i < i0 + W; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
  }
  for (std::int64_t j = 0; j < cols; ++j)
    for (std::int64_t i = i0; i < rows; ++i) dst[j * ldd + i] = src[i * lds + j];
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
//! The register-tiled attention path applies when Eigen vectorises T and a head is a whole number
//! of packets (head dims 32 and 64 of every official and benchmark config).
template <class T>
constexpr bool attention_tiled_type() {
  return Eigen::internal::packet_traits<T>::Vectorizable && lanes<T> > 1 &&
         Eigen::internal::packet_traits<T>::HasExp;
}
inline std::int64_t pad16(std::int64_t l) {
  return (l + 15) / 16 * 16;
}
//! Query rows per register tile group of the tiled attention.
inline constexpr int kRows = 8;
//! Score tile: query rows x key packets held in registers. With 32 vector registers (AVX-512)
//! all 8 rows of a group at once (24 accumulators): each K^T element loaded from L1/L2 feeds 8
//! rows, which matters once K^T outgrows L1 (L = 337, dh = 64: 88 KiB); with 16, 4 x 2.
inline constexpr bool kWideRegisterFile = (EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS) >= 32;
inline constexpr int kQkRows = kWideRegisterFile ? 8 : 4, kQkPackets = kWideRegisterFile ? 3 : 2;
}  // namespace detail

//! Per-thread scratch of attention() in elements, for sequence length l, query rows per score
//! block `block` and head dim dh: a multiple of 16 elements, so that every thread's buffer has the
//! same (64-byte) alignment and the vectorised reductions take the same path whichever thread
//! handles a (sample, head) pair -- results do not depend on scheduling.
inline std::int64_t attention_scratch(std::int64_t l, std::int64_t block, std::int64_t dh) {
  const std::int64_t blocked = (std::min(block, l) * l + 15) / 16 * 16;
  const std::int64_t tiled = (2 * dh + detail::kRows) * detail::pad16(l) + detail::kRows * dh;
  return detail::pad16(std::max(blocked, tiled));
}

namespace detail {
// S[r, j0 + v W + i] = scale * sum_d q_r[d] kt[d, j0 + v W + i] for R query rows and NV packets of
// keys, accumulated in R x NV registers over d in order (kt: packed K^T [dh, ldk]).
template <class T, int R, int NV>
inline void qk_tile(const T* const* q, const T* kt, std::int64_t ldk, std::int64_t dh, T scale,
                    T* s, std::int64_t lds) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr int W = lanes<T>;
  P acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = pset1<P>(T(0));
  for (std::int64_t d = 0; d < dh; ++d) {
    P k[NV];
    for (int v = 0; v < NV; ++v) k[v] = ploadu<P>(kt + d * ldk + v * W);
    for (int r = 0; r < R; ++r) {
      const P qv = pset1<P>(q[r][d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = pmadd(qv, k[v], acc[r][v]);
    }
  }
  const P sc = pset1<P>(scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) pstoreu(s + r * lds + v * W, pmul(acc[r][v], sc));
}

// o_r[c W .. (c + NV) W) = inv_r * sum_j p[r, j] v[j, c W ..] over j < l in order, for R rows
// (p holds the unnormalised softmax numerators, inv_r the reciprocal of their sum).
template <class T, int R, int NV>
inline void pv_tile(const T* p, std::int64_t ldp, const T* inv, const T* v, std::int64_t ldv,
                    std::int64_t l, T* const* o) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr int W = lanes<T>;
  P acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = pset1<P>(T(0));
  for (std::int64_t j = 0; j < l; ++j) {
    P vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = ploadu<P>(v + j * ldv + c * W);
    for (int r = 0; r < R; ++r) {
      const P pr = pset1<P>(p[r * ldp + j]);
      for (int c = 0; c < NV; ++c) acc[r][c] = pmadd(pr, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const P ir = pset1<P>(inv[r]);
    for (int c = 0; c < NV; ++c) pstoreu(o[r] + c * W, pmul(acc[r][c], ir));
  }
}

// Horizontal max / sum of a packet. The max from the stored lanes, pairwise (exact in any order;
// Eigen's predux_max for AVX-512 trips GCC 12's -Wuninitialized in the intrinsics headers once
// inlined into the softmax). The sum: Eigen's tree for float, lane by lane for double (whose
// predux trips the same warning).
template <class T>
inline T lane_max(const Packet<T>& p) {
  constexpr int W = lanes<T>;
  T b[W];
  Eigen::internal::pstoreu(b, p);
  for (int w = W / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) b[i] = std::max(b[i], b[i + w]);
  return b[0];
}
template <class T>
inline T lane_sum(const Packet<T>& p) {
  if constexpr (std::is_same_v<T, float>) {
    return Eigen::internal::predux(p);
  } else {
    T b[lanes<T>];
    Eigen::internal::pstoreu(b, p);
    T s = b[0];
    for (int i = 1; i < lanes<T>; ++i) s += b[i];
    return s;
  }
}

// Softmax numerators in place over s[0, l) of R rows (rows lp apart, lp a multiple of the packet):
// s_j = exp(s_j - max) per row; inv[r] = 1 / sum_j s_j. The rows go through each pass side by side
// (R independent max and sum chains for the out-of-order core; a row at a time the pass waited on
// one chain's latency), and each row's arithmetic is that of a row alone: the same maximum, the
// same exponentials, the sum taken over the row's packets in order. Padding lanes hold -inf, whose
// exp is 0 or below 1e-38 (Eigen clamps the argument) and cannot change a sum that is at least 1;
// they are never read.
template <class T, int R>
inline void softmax_rows_tile(T* s, std::int64_t l, std::int64_t lp, T* inv) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr int W = lanes<T>;
  for (int r = 0; r < R; ++r)
    for (std::int64_t j = l; j < lp; ++j) s[r * lp + j] = -std::numeric_limits<T>::infinity();
  P m[R];
  for (int r = 0; r < R; ++r) m[r] = ploadu<P>(s + r * lp);
  for (std::int64_t j = W; j < lp; j += W)
    for (int r = 0; r < R; ++r) m[r] = pmax(m[r], ploadu<P>(s + r * lp + j));
  P mx[R], sum[R];
  for (int r = 0; r < R; ++r) {
    mx[r] = pset1<P>(lane_max<T>(m[r]));
    sum[r] = pset1<P>(T(0));
  }
  for (std::int64_t j = 0; j < lp; j += W)
    for (int r = 0; r < R; ++r) {
      const P e = pexp(psub(ploadu<P>(s + r * lp + j), mx[r]));
      pstoreu(s + r * lp + j, e);
      sum[r] = padd(sum[r], e);
    }
  for (int r = 0; r < R; ++r) inv[r] = T(1) / lane_sum<T>(sum[r]);
}

#if defined(__GNUC__)
#pragma GCC diagnostic push
// PacketBlock<Packet16f, ...> drops the vector type's alignment attribute in the template
// argument, as in Eigen's own kernels (which silence the same warning)
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
// kt[d, j] = k[j, d] for j < l, d < dh (dh a multiple of the packet), zero for l <= j < lp:
// W x W blocks transposed in registers, the last l mod W keys one by one.
template <class T>
void pack_transposed(const T* k, std::int64_t ldk, std::int64_t l, std::int64_t dh, T* kt,
                     std::int64_t lp) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr int W = lanes<T>;
  std::int64_t j0 = 0;
  for (; j0 + W <= l; j0 += W)
    for (std::int64_t d0 = 0; d0 < dh; d0 += W) {
      PacketBlock<P, W> blk;
      for (int i = 0; i < W; ++i) blk.packet[i] = ploadu<P>(k + (j0 + i) * ldk + d0);
      ptranspose(blk);
      for (int i = 0; i < W; ++i) pstoreu(kt + (d0 + i) * lp + j0, blk.packet[i]);
    }
  for (std::int64_t d = 0; d < dh; ++d) {
    for (std::int64_t j = j0; j < l; ++j) kt[d * lp + j] = k[j * ldk + d];
    for (std::int64_t j = l; j < lp; ++j) kt[d * lp + j] = T(0);
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// kRows query rows of one (sample, head): scores against every key (kQkRows x kQkPackets tiles),
// softmax numerators, times V (one kRows-row tile per pair of V packets), scaled by 1 / sum.
template <class T>
void attention_rows(const T* const* q, const T* kt, std::int64_t l, std::int64_t lp,
                    std::int64_t dh, T scale, T* s, const T* v, T* const* o) {
  constexpr int W = lanes<T>, R = kRows, QR = kQkRows, QN = kQkPackets;
  static_assert(R % QR == 0 && QN >= 2 && QN <= 4);
  for (int r0 = 0; r0 < R; r0 += QR) {
    std::int64_t j = 0;
    for (; j + QN * W <= lp; j += QN * W)
      qk_tile<T, QR, QN>(q + r0, kt + j, lp, dh, scale, s + r0 * lp + j, lp);
    const std::int64_t rest = (lp - j) / W;  // < QN packets
    if constexpr (QN > 3)
      if (rest == 3) qk_tile<T, QR, 3>(q + r0, kt + j, lp, dh, scale, s + r0 * lp + j, lp);
    if constexpr (QN > 2)
      if (rest == 2) qk_tile<T, QR, 2>(q + r0, kt + j, lp, dh, scale, s + r0 * lp + j, lp);
    if (rest == 1) qk_tile<T, QR, 1>(q + r0, kt + j, lp, dh, scale, s + r0 * lp + j, lp);
  }
  T inv[R];
  softmax_rows_tile<T, R>(s, l, lp, inv);
  const std::int64_t nv = dh / W;
  for (std::int64_t c = 0; c < nv; c += 2) {
    T* oc[R];
    for (int r = 0; r < R; ++r) oc[r] = o[r] + c * W;
    if (nv - c >= 2)
      pv_tile<T, R, 2>(s, lp, inv, v + c * W, dh, l, oc);
    else
      pv_tile<T, R, 1>(s, lp, inv, v + c * W, dh, l, oc);
  }
}
}  // namespace detail

//! Whether attention_head takes the register-tiled path: Eigen vectorises T and the head dim is
//! a whole number of packets (head dims 32 and 64 of every official and benchmark config).
template <class T>
bool attention_tiled(std::int64_t dh) {
  if constexpr (detail::attention_tiled_type<T>()) return dh % detail::lanes<T> == 0;
  return false;
}

//! One head h of one sample: qkv [l, 3e] (rows ldq apart; fused q | k | v, heads side by side),
//! out [l, e] (rows ldo apart; columns of head h written), `sc` a scratch of
//! attention_scratch(l, block, e / heads) elements (64-byte aligned). Where the tiled path
//! applies, K^T and V are packed once and detail::kRows (8) query rows at a time go through
//! register tiles (scores, softmax and the product with V per row group); otherwise scores are
//! formed `block` query rows at a time with Eigen's kernel ([block, L], never [L, L]).
template <class T>
void attention_head(const T* qkv, std::int64_t ldq, std::int64_t l, std::int64_t e,
                    std::int64_t heads, std::int64_t h, T* out, std::int64_t ldo, T* sc,
                    std::int64_t block) {
  const std::int64_t dh = e / heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
  const T* base = qkv;
  if constexpr (detail::attention_tiled_type<T>()) {
    if (attention_tiled<T>(dh)) {
      // scratch: K^T [dh, lp] (zero padded), V [l, dh] contiguous (rows of the fused layout
      // are 3E apart and alias in L1), scores [kRows, lp], a sink for rows past the end
      const std::int64_t lp = detail::pad16(l);
      constexpr int R = detail::kRows;
      T* kt = sc;
      T* vp = kt + dh * lp;
      T* s = vp + dh * lp;
      T* sink = s + R * lp;
      const T* k = base + e + h * dh;
      detail::pack_transposed(k, ldq, l, dh, kt, lp);
      for (std::int64_t j = 0; j < l; ++j)
        std::copy_n(base + j * ldq + 2 * e + h * dh, dh, vp + j * dh);
      const T* q[R];
      T* o[R];
      for (std::int64_t i = 0; i < l; i += R) {
        // a last group past the end repeats the last query row into the sink
        for (int r = 0; r < R; ++r) {
          const std::int64_t row = std::min(i + r, l - 1);
          q[r] = base + row * ldq + h * dh;
          o[r] = i + r < l ? out + (i + r) * ldo + h * dh : sink + r * dh;
        }
        detail::attention_rows<T>(q, kt, l, lp, dh, scale, s, vp, o);
      }
      return;
    }
  }
  CMapRM<T> K(base + e + h * dh, l, dh, Eigen::OuterStride<>(ldq));
  CMapRM<T> V(base + 2 * e + h * dh, l, dh, Eigen::OuterStride<>(ldq));
  for (std::int64_t q0 = 0; q0 < l; q0 += block) {
    const std::int64_t rb = std::min(block, l - q0);
    CMapRM<T> Q(base + q0 * ldq + h * dh, rb, dh, Eigen::OuterStride<>(ldq));
    MapRM<T> S(sc, rb, l, Eigen::OuterStride<>(l));
    S.setZero();
    detail::gemm_nt_accumulate<T>(Q.data(), rb, dh, ldq, K.data(), l, ldq, S.data(), l);
    S *= scale;
    for (std::int64_t i = 0; i < rb; ++i) {
      auto row = S.row(i).array();
      row = (row - row.maxCoeff()).exp();
      row *= T(1) / row.sum();
    }
    MapRM<T> O(out + q0 * ldo + h * dh, rb, dh, Eigen::OuterStride<>(ldo));
    O.setZero();
    detail::gemm_nt_accumulate<T, Eigen::ColMajor>(sc, rb, l, l, V.data(), dh, ldq, O.data(), ldo);
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

namespace detail {
//! C [n, k] (ldc, row-major) += A^T B with A [m, n] (lda) and B [m, k] (ldb) row-major: the
//! weight gradient dW += dY^T X of a linear layer, with Eigen's kernel on the calling thread.
template <class T>
void gemm_tn_accumulate(const T* a, std::int64_t m, std::int64_t n, std::int64_t lda, const T* b,
                        std::int64_t k, std::int64_t ldb, T* c, std::int64_t ldc) {
  if (m == 0 || n == 0 || k == 0) return;
  namespace ei = Eigen::internal;
  using Index = Eigen::Index;
  // column-major view: C^T [k, n] (stride ldc) += B^T [k, m] (col-major, ldb) A [m, n] (row-major)
  GemmBlocking<T> blocking(static_cast<Index>(k), static_cast<Index>(n), static_cast<Index>(m));
  ei::general_matrix_matrix_product<Index, T, Eigen::ColMajor, false, T, Eigen::RowMajor, false,
                                    Eigen::ColMajor, 1>::run(static_cast<Index>(k),
                                                             static_cast<Index>(n),
                                                             static_cast<Index>(m), b,
                                                             static_cast<Index>(ldb), a,
                                                             static_cast<Index>(lda), c, 1,
                                                             static_cast<Index>(ldc), T(1),
                                                             blocking, nullptr);
}
}  // namespace detail

//! du = dy * GELU'(u) over n values, GELU'(u) = Phi(u) + u phi(u), with Eigen's vectorised erf
//! and exp in the compute type; du may be dy.
template <class T>
void gelu_backward(const T* u, const T* dy, T* du, std::int64_t n) {
  using A = Eigen::Array<T, 1, Eigen::Dynamic>;
  using CRow = Eigen::Map<const A>;
  const T r = static_cast<T>(0.70710678118654752440), c = static_cast<T>(0.39894228040143267794);
  const CRow U(u, n), D(dy, n);
  Eigen::Map<A> O(du, n);
  O = D * (T(0.5) * (T(1) + (U * r).erf()) + U * c * (T(-0.5) * U.square()).exp());
}
//! du = dy * SiLU'(u) over n values, SiLU'(u) = s (1 + u (1 - s)), s = sigmoid(u); du may be dy.
template <class T>
void silu_backward(const T* u, const T* dy, T* du, std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j) {
    const T s = T(1) / (T(1) + std::exp(-u[j]));
    du[j] = dy[j] * s * (T(1) + u[j] * (T(1) - s));
  }
}

namespace detail {
//! Each row of S [l, l] (contiguous) becomes softmax(row * scale), in place.
template <class T>
void softmax_rows(T* S, std::int64_t l, T scale) {
  using A = Eigen::Array<T, 1, Eigen::Dynamic>;
  for (std::int64_t i = 0; i < l; ++i) {
    Eigen::Map<A> row(S + i * l, l);
    row *= scale;
    row = (row - row.maxCoeff()).exp();
    row *= T(1) / row.sum();
  }
}
//! dP [l, l] becomes dS scale = P (dP - rowsum(dP P)) scale, row by row, in place.
template <class T>
void softmax_backward_rows(const T* P, T* dP, std::int64_t l, T scale) {
  using A = Eigen::Array<T, 1, Eigen::Dynamic>;
  for (std::int64_t i = 0; i < l; ++i) {
    const Eigen::Map<const A> p(P + i * l, l);
    Eigen::Map<A> d(dP + i * l, l);
    const T dot = (p * d).sum();
    d = p * (d - dot) * scale;
  }
}
}  // namespace detail

//! Scratch elements of attention_head_backward for sequence length l: two [l, l] blocks.
inline std::int64_t attention_backward_scratch(std::int64_t l) {
  return detail::pad16(2 * l * l);
}

//! Backward of one head h of one sample (see attention_head): recomputes P = softmax(q k^T /
//! sqrt dh) and writes the head's columns of dqkv [l, 3e] (rows ldg apart): dV = P^T dO,
//! dS = P (dP - rowsum(dP P)) with dP = dO V^T, dQ = dS K / sqrt dh, dK = dS^T Q / sqrt dh.
//! `sc`: attention_backward_scratch(l) elements.
template <class T>
void attention_head_backward(const T* qkv, std::int64_t ldq, std::int64_t l, std::int64_t e,
                             std::int64_t heads, std::int64_t h, const T* dout, std::int64_t ldo,
                             T* dqkv, std::int64_t ldg, T* sc) {
  const std::int64_t dh = e / heads;
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(dh)));
  const T* q = qkv + h * dh;
  const T* k = qkv + e + h * dh;
  const T* v = qkv + 2 * e + h * dh;
  const T* dO = dout + h * dh;
  T* dq = dqkv + h * dh;
  T* dk = dqkv + e + h * dh;
  T* dv = dqkv + 2 * e + h * dh;
  T* P = sc;
  T* dP = sc + l * l;
  std::fill_n(P, l * l, T(0));
  detail::gemm_nt_accumulate<T>(q, l, dh, ldq, k, l, ldq, P, l);
  detail::softmax_rows(P, l, scale);
  std::fill_n(dP, l * l, T(0));
  detail::gemm_nt_accumulate<T>(dO, l, dh, ldo, v, l, ldq, dP, l);  // dP = dO V^T
  detail::softmax_backward_rows(P, dP, l, scale);
  for (std::int64_t i = 0; i < l; ++i) {
    std::fill_n(dq + i * ldg, dh, T(0));
    std::fill_n(dk + i * ldg, dh, T(0));
    std::fill_n(dv + i * ldg, dh, T(0));
  }
  detail::gemm_tn_accumulate<T>(P, l, l, l, dO, dh, ldo, dv, ldg);                   // dV = P^T dO
  detail::gemm_nt_accumulate<T, Eigen::ColMajor>(dP, l, l, l, k, dh, ldq, dq, ldg);  // dS K
  detail::gemm_tn_accumulate<T>(dP, l, l, l, q, dh, ldq, dk, ldg);                   // dK = dS^T Q
}

//! Bilinear resize of a row-major grid q [I0, I1, E] to [O0, O1, E], PyTorch's
//! F.interpolate(mode='bilinear', align_corners=False) without anti-aliasing (UVIT.md §4.5).
template <class T>
void bilinear_resize(const T* q, std::int64_t i0, std::int64_t i1, std::int64_t e, std::int64_t o0,
                     std::int64_t o1, T* out) {
  const auto ty = ops::bilinear_taps<T>(i0, o0), tx = ops::bilinear_taps<T>(i1, o1);
  for (std::int64_t y = 0; y < o0; ++y)
    for (std::int64_t x = 0; x < o1; ++x) {
      const auto& a = ty[static_cast<std::size_t>(y)];
      const auto& b = tx[static_cast<std::size_t>(x)];
      T* o = out + (y * o1 + x) * e;
      const T* p00 = q + (a.a * i1 + b.a) * e;
      const T* p01 = q + (a.a * i1 + b.b) * e;
      const T* p10 = q + (a.b * i1 + b.a) * e;
      const T* p11 = q + (a.b * i1 + b.b) * e;
      for (std::int64_t j = 0; j < e; ++j)
        o[j] = a.wa * (b.wa * p00[j] + b.wb * p01[j]) + a.wb * (b.wa * p10[j] + b.wb * p11[j]);
    }
}

//! Backward of bilinear_resize: dq [I0, I1, E] += the transposed interpolation of dout.
template <class T>
void bilinear_resize_backward(const T* dout, std::int64_t i0, std::int64_t i1, std::int64_t e,
                              std::int64_t o0, std::int64_t o1, T* dq) {
  const auto ty = ops::bilinear_taps<T>(i0, o0), tx = ops::bilinear_taps<T>(i1, o1);
  for (std::int64_t y = 0; y < o0; ++y)
    for (std::int64_t x = 0; x < o1; ++x) {
      const auto& a = ty[static_cast<std::size_t>(y)];
      const auto& b = tx[static_cast<std::size_t>(x)];
      const T* d = dout + (y * o1 + x) * e;
      T* p00 = dq + (a.a * i1 + b.a) * e;
      T* p01 = dq + (a.a * i1 + b.b) * e;
      T* p10 = dq + (a.b * i1 + b.a) * e;
      T* p11 = dq + (a.b * i1 + b.b) * e;
      for (std::int64_t j = 0; j < e; ++j) {
        p00[j] += a.wa * b.wa * d[j];
        p01[j] += a.wa * b.wb * d[j];
        p10[j] += a.wb * b.wa * d[j];
        p11[j] += a.wb * b.wb * d[j];
      }
    }
}

}  // namespace unidiffuser::cpu_kernels
