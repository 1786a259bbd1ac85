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
#include <limits>
#include <type_traits>
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
//! Threads of the current team (1 outside a parallel region).
inline int team_size() {
#if defined(_OPENMP)
  return omp_get_num_threads();
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

namespace detail {
//! f(i) for rows i in [0, m): OpenMP threads when the work (elements) is large and no region is
//! active, else a plain loop -- even a disabled `omp parallel if (...)` costs libgomp calls and a
//! system call, which per-chunk kernel calls would pay thousands of times per forward.
//! Set on a thread while a caller that manages threads itself (UViT::forward) runs kernels on it:
//! they then never start threads of their own.
inline bool& serial_kernels() {
  thread_local bool on = false;
  return on;
}
struct SerialKernels {
  bool saved = serial_kernels();
  SerialKernels() { serial_kernels() = true; }
  ~SerialKernels() { serial_kernels() = saved; }
  SerialKernels(const SerialKernels&) = delete;
  SerialKernels& operator=(const SerialKernels&) = delete;
};
template <class F>
void parallel_rows(std::int64_t m, std::int64_t work, F&& f) {
#if defined(_OPENMP)
  if (work >= 32768 && m > 1 && !serial_kernels() && !omp_in_parallel() &&
      omp_get_max_threads() > 1) {
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < m; ++i) f(i);
    return;
  }
#endif
  (void)work;
  for (std::int64_t i = 0; i < m; ++i) f(i);
}

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

//! Over rows of x [M, N]: y = LayerNorm(x (+ r)) with gain g and bias b (eps 1e-5, biased
//! variance, two-pass statistics in the accumulation type), rows in parallel; y may be x.
template <class T>
void layer_norm(const T* x, const T* r, T* y, std::int64_t m, std::int64_t n, const T* g,
                const T* b, double eps = 1e-5) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  const CRow G(g, n), Bv(b, n);
  auto one = [&](std::int64_t i) {
    Row row(y + i * n, n);
    if (r)
      row = CRow(x + i * n, n) + CRow(r + i * n, n);
    else if (y != x)
      row = CRow(x + i * n, n);
    const T mean = row.sum() / static_cast<T>(n);
    const T var = (row - mean).square().sum() / static_cast<T>(n);
    const T inv = T(1) / std::sqrt(var + static_cast<T>(eps));
    row = (row - mean) * inv * G + Bv;
  };
  detail::parallel_rows(m, m * n, one);
}
//! In place: x = LayerNorm(x (+ r)).
template <class T>
void layer_norm(T* x, std::int64_t m, std::int64_t n, const T* r, const T* g, const T* b,
                double eps = 1e-5) {
  layer_norm<T>(x, r, x, m, n, g, b, eps);
}

//! y = GELU(y + bias) over rows of y [M, N] (bias may be null): exact erf GELU
//! 0.5 u (1 + erf(u / sqrt 2)) with Eigen's vectorised erf, rows in parallel.
template <class T>
void bias_gelu(T* y, std::int64_t m, std::int64_t n, const T* bias) {
  using Row = Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>;
  using CRow = Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>;
  const T r = static_cast<T>(0.70710678118654752440);
  auto one = [&](std::int64_t i) {
    Row row(y + i * n, n);
    if (bias) row += CRow(bias, n);
    row = T(0.5) * row * (T(1) + (row * r).erf());
  };
  detail::parallel_rows(m, m * n, one);
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

namespace detail {
template <class T>
using Packet = typename Eigen::internal::packet_traits<T>::type;
template <class T>
inline constexpr int lanes = Eigen::internal::unpacket_traits<Packet<T>>::size;
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

// Horizontal max / sum of a packet: Eigen's tree reductions for float, lane by lane for double
// (Eigen's predux for AVX-512 doubles trips GCC 12's -Wuninitialized in the intrinsics headers).
template <class T>
inline T lane_max(const Packet<T>& p) {
  if constexpr (std::is_same_v<T, float>) {
    return Eigen::internal::predux_max(p);
  } else {
    T b[lanes<T>];
    Eigen::internal::pstoreu(b, p);
    T m = b[0];
    for (int i = 1; i < lanes<T>; ++i) m = std::max(m, b[i]);
    return m;
  }
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

// Softmax numerators in place over s[0, l) of a row padded to lp (a multiple of the packet):
// s_j = exp(s_j - max); returns 1 / sum_j s_j. Padding lanes hold -inf, whose exp (Eigen clamps
// the argument) is below 1e-38 and cannot change a sum that is at least 1; they are never read.
template <class T>
inline T softmax_row(T* s, std::int64_t l, std::int64_t lp) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  constexpr int W = lanes<T>;
  for (std::int64_t j = l; j < lp; ++j) s[j] = -std::numeric_limits<T>::infinity();
  P m = ploadu<P>(s);
  for (std::int64_t j = W; j < lp; j += W) m = pmax(m, ploadu<P>(s + j));
  const P mx = pset1<P>(lane_max<T>(m));
  P sum = pset1<P>(T(0));
  for (std::int64_t j = 0; j < lp; j += W) {
    const P e = pexp(psub(ploadu<P>(s + j), mx));
    pstoreu(s + j, e);
    sum = padd(sum, e);
  }
  return T(1) / lane_sum<T>(sum);
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
  for (int r = 0; r < R; ++r) inv[r] = softmax_row(s + r * lp, l, lp);
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

//! Multi-head attention over a batch: qkv [B, L, 3E] in the fused (k, h, d) channel layout,
//! out [B, L, E] (heads concatenated); (sample, head) pairs run in parallel. Where Eigen vectorises
//! T and the head dim is a whole number of packets, each pair packs K^T and V once and takes
//! detail::kRows (8) query rows at a time through register tiles (scores, softmax and the product
//! with V per row group, so the score buffer is [8, L]); otherwise scores are formed `block` query
//! rows at a time with Eigen products ([block, L] per thread, never [L, L] per head). `scores`
//! needs max_threads() * attention_scratch(L, block, E / heads) elements (64-byte aligned for the
//! fastest loads).
template <class T>
bool attention_tiled(std::int64_t dh) {
  if constexpr (detail::attention_tiled_type<T>()) return dh % detail::lanes<T> == 0;
  return false;
}

//! One head h of one sample: qkv [l, 3e] (fused q | k | v, heads side by side), out [l, e]
//! (columns of head h written), `sc` a scratch of attention_scratch(l, block, e / heads)
//! elements (64-byte aligned). Runs on the calling thread; the result depends only on the data
//! and the sizes.
template <class T>
void attention_head(const T* qkv, std::int64_t l, std::int64_t e, std::int64_t heads,
                    std::int64_t h, T* out, T* sc, std::int64_t block) {
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
      detail::pack_transposed(k, 3 * e, l, dh, kt, lp);
      for (std::int64_t j = 0; j < l; ++j)
        std::copy_n(base + j * 3 * e + 2 * e + h * dh, dh, vp + j * dh);
      const T* q[R];
      T* o[R];
      for (std::int64_t i = 0; i < l; i += R) {
        // a last group past the end repeats the last query row into the sink
        for (int r = 0; r < R; ++r) {
          const std::int64_t row = std::min(i + r, l - 1);
          q[r] = base + row * 3 * e + h * dh;
          o[r] = i + r < l ? out + (i + r) * e + h * dh : sink + r * dh;
        }
        detail::attention_rows<T>(q, kt, l, lp, dh, scale, s, vp, o);
      }
      return;
    }
  }
  CMapRM<T> K(base + e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
  CMapRM<T> V(base + 2 * e + h * dh, l, dh, Eigen::OuterStride<>(3 * e));
  for (std::int64_t q0 = 0; q0 < l; q0 += block) {
    const std::int64_t rb = std::min(block, l - q0);
    CMapRM<T> Q(base + q0 * 3 * e + h * dh, rb, dh, Eigen::OuterStride<>(3 * e));
    MapRM<T> S(sc, rb, l, Eigen::OuterStride<>(l));
    S.setZero();
    detail::gemm_nt_accumulate<T>(Q.data(), rb, dh, 3 * e, K.data(), l, 3 * e, S.data(), l);
    S *= scale;
    for (std::int64_t i = 0; i < rb; ++i) {
      auto row = S.row(i).array();
      row = (row - row.maxCoeff()).exp();
      row *= T(1) / row.sum();
    }
    MapRM<T> O(out + q0 * e + h * dh, rb, dh, Eigen::OuterStride<>(e));
    O.setZero();
    detail::gemm_nt_accumulate<T, Eigen::ColMajor>(sc, rb, l, l, V.data(), dh, 3 * e, O.data(), e);
  }
}

//! Multi-head self-attention over the fused qkv [batch, l, 3e] into out [batch, l, e]: one
//! attention_head per (sample, head), in parallel over the pairs outside an OpenMP region and on
//! the calling thread inside one. detail::kRows (8) query rows at a time through register tiles
//! where the head dim is a whole number of packets; otherwise scores are formed `block` query
//! rows at a time ([block, L] per thread, never [L, L] per head). `scores` needs max_threads() *
//! attention_scratch(L, block, E / heads) elements (64-byte aligned for the fastest loads).
template <class T>
void attention(const T* qkv, std::int64_t batch, std::int64_t l, std::int64_t e, std::int64_t heads,
               T* out, T* scores, std::int64_t block) {
  const std::int64_t scratch = attention_scratch(l, block, e / heads);
  auto pair = [&](std::int64_t bh, T* sc) {
    const std::int64_t b = bh / heads, h = bh % heads;
    attention_head<T>(qkv + b * l * 3 * e, l, e, heads, h, out + b * l * e, sc, block);
  };
#if defined(_OPENMP)
  if (omp_in_parallel()) {
    T* sc = scores + static_cast<std::int64_t>(omp_get_thread_num()) * scratch;
    for (std::int64_t bh = 0; bh < batch * heads; ++bh) pair(bh, sc);
    return;
  }
#pragma omp parallel for schedule(dynamic) if (batch * heads > 1)
#endif
  for (std::int64_t bh = 0; bh < batch * heads; ++bh)
    pair(bh, scores + static_cast<std::int64_t>(thread_id()) * scratch);
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
