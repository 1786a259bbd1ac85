// SPDX-License-Identifier: Apache-2.0
//! \file optim.hpp
//! The optimiser's passes of the CPU backend: AdamW (alone, or fused with the EMA and the
//! zeroing of the gradients) and the sum of squares behind global-norm clipping. They stream the
//! whole parameter store several times per training step, so they are written with Eigen's
//! packets: the compiler cannot vectorise the plain loops (the buffers may alias, and std::sqrt
//! sets errno unless -fno-math-errno). The square root is correctly rounded, as std::sqrt's. Every
//! element gets the same arithmetic wherever it lies (the last n mod W values go through the packet
//! code on a padded copy), so results depend only on the data, never on the thread count or the
//! split into ranges.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cpu/kernels.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/backend/tags.hpp"

namespace unidiffuser::cpu_kernels {

namespace optim_detail {
using detail::lanes;
using detail::Packet;

#if defined(__GNUC__)
#pragma GCC diagnostic push
// is_same_v<P, Packet16f> drops the vector type's alignment attribute in the template argument,
// as in Eigen's own kernels (which silence the same warning)
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif
// Correctly rounded square root of a packet. Eigen's psqrt is not: under EIGEN_FAST_MATH (its
// default) the AVX/AVX-512 float and AVX-512 double versions are a reciprocal-square-root estimate
// and Newton steps, 1-2 bits short. The x86 packets use the hardware instruction (AVX-512: the
// masked form with every lane set, whose unmasked twin trips GCC 12's -Wmaybe-uninitialized in the
// intrinsics header); any other packet type goes lane by lane through std::sqrt.
template <class P>
inline P psqrt_exact(const P& x) {
  using namespace Eigen::internal;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<P, Packet16f>) return _mm512_mask_sqrt_ps(x, 0xffff, x);
  if constexpr (std::is_same_v<P, Packet8d>) return _mm512_mask_sqrt_pd(x, 0xff, x);
#endif
#if defined(EIGEN_VECTORIZE_AVX)
  if constexpr (std::is_same_v<P, Packet8f>) return _mm256_sqrt_ps(x);
  if constexpr (std::is_same_v<P, Packet4d>) return _mm256_sqrt_pd(x);
#endif
#if defined(EIGEN_VECTORIZE_SSE2)
  if constexpr (std::is_same_v<P, Packet4f>) return _mm_sqrt_ps(x);
  if constexpr (std::is_same_v<P, Packet2d>) return _mm_sqrt_pd(x);
#endif
  using T = typename unpacket_traits<P>::type;
  constexpr int W = unpacket_traits<P>::size;
  if constexpr (W == 1) {
    return std::sqrt(x);
  } else {
    T b[W];
    pstoreu(b, x);
    for (T& v : b) v = std::sqrt(v);
    return ploadu<P>(b);
  }
}
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

// One AdamW step's constants as packets.
template <class T>
struct AdamWPackets {
  using P = Packet<T>;
  P lr, b1, b2, ob1, ob2, ic1, ic2, eps, keep, d, od;
  AdamWPackets(const ops::AdamWStep& s, double ema_decay) {
    using Eigen::internal::pset1;
    lr = pset1<P>(static_cast<T>(s.lr));
    b1 = pset1<P>(static_cast<T>(s.beta1));
    b2 = pset1<P>(static_cast<T>(s.beta2));
    ob1 = pset1<P>(static_cast<T>(1 - s.beta1));
    ob2 = pset1<P>(static_cast<T>(1 - s.beta2));
    ic1 = pset1<P>(static_cast<T>(1 / s.c1));
    ic2 = pset1<P>(static_cast<T>(1 / s.c2));
    eps = pset1<P>(static_cast<T>(s.eps));
    keep = pset1<P>(static_cast<T>(1 - s.lr * s.weight_decay));
    d = pset1<P>(static_cast<T>(ema_decay));
    od = pset1<P>(static_cast<T>(1 - ema_decay));
  }
};

// W values at x (p, g, m, v, ema: ema only with E; g zeroed with Z).
template <class T, bool E, bool Z>
inline void adamw_packet(const AdamWPackets<T>& c, T* p, const T* g, T* m, T* v, T* ema, T* gz) {
  using namespace Eigen::internal;
  using P = Packet<T>;
  const P gj = ploadu<P>(g);
  const P mj = pmadd(c.b1, ploadu<P>(m), pmul(c.ob1, gj));
  const P vj = pmadd(c.b2, ploadu<P>(v), pmul(pmul(c.ob2, gj), gj));
  pstoreu(m, mj);
  pstoreu(v, vj);
  const P step = pdiv(pmul(c.lr, pmul(mj, c.ic1)), padd(psqrt_exact(pmul(vj, c.ic2)), c.eps));
  const P pj = psub(pmul(c.keep, ploadu<P>(p)), step);
  pstoreu(p, pj);
  if constexpr (E) pstoreu(ema, pmadd(c.d, ploadu<P>(ema), pmul(c.od, pj)));
  if constexpr (Z) pstoreu(gz, pset1<P>(T(0)));
}
}  // namespace optim_detail

//! One AdamW step over n contiguous values, in PyTorch's order: m = b1 m + (1 - b1) g,
//! v = b2 v + (1 - b2) g^2, p = (1 - lr wd) p - lr (m / c1) / (sqrt(v / c2) + eps); then, with E,
//! ema = d ema + (1 - d) p, and with Z, g = 0 (`gz` is g, writable). Single-threaded.
template <class T, bool E, bool Z>
void adamw(const optim_detail::AdamWPackets<T>& c, T* p, const T* g, T* m, T* v, T* ema, T* gz,
           std::int64_t n) {
  constexpr int W = optim_detail::lanes<T>;
  std::int64_t j = 0;
  for (; j + W <= n; j += W)
    optim_detail::adamw_packet<T, E, Z>(c, p + j, g + j, m + j, v + j, E ? ema + j : nullptr,
                                        Z ? gz + j : nullptr);
  const std::int64_t rest = n - j;
  if (rest == 0) return;
  // the tail through the same packet code on padded copies (padding: p = g = m = v = 0)
  T tp[W] = {}, tg[W] = {}, tm[W] = {}, tv[W] = {}, te[W] = {}, tz[W] = {};
  std::copy_n(p + j, rest, tp);
  std::copy_n(g + j, rest, tg);
  std::copy_n(m + j, rest, tm);
  std::copy_n(v + j, rest, tv);
  if constexpr (E) std::copy_n(ema + j, rest, te);
  optim_detail::adamw_packet<T, E, Z>(c, tp, tg, tm, tv, te, tz);
  std::copy_n(tp, rest, p + j);
  std::copy_n(tm, rest, m + j);
  std::copy_n(tv, rest, v + j);
  if constexpr (E) std::copy_n(te, rest, ema + j);
  if constexpr (Z) std::fill_n(gz + j, rest, T(0));
}

//! Sum of x_j^2 over n contiguous values in double: eight running sums (value j into sum j mod 8),
//! combined pairwise at the end -- a fixed order, so the result depends only on the data.
template <class T>
double sum_squares(const T* x, std::int64_t n) {
  double acc[8] = {};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int k = 0; k < 8; ++k)
      acc[k] += static_cast<double>(x[j + k]) * static_cast<double>(x[j + k]);
  for (int k = 0; j < n; ++j, ++k) acc[k] += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace unidiffuser::cpu_kernels

namespace unidiffuser::ops {

namespace detail {
// The optimiser's passes in chunks of this many values: a fixed split, whatever the threads.
inline constexpr std::int64_t kOptimChunk = 4096;
}  // namespace detail

//! One AdamW step over a contiguous range (p, g, m, v of n elements); the step's weight decay is
//! s.weight_decay (0 for the no-decay parameters).
template <class T>
void adamw_update(const Context<cpu>& ctx, T* p, const T* g, T* m, T* v, std::int64_t n,
                  const AdamWStep& s) {
  const cpu_kernels::optim_detail::AdamWPackets<T> c(s, 0.0);
  const std::int64_t chunk = detail::kOptimChunk, nch = (n + chunk - 1) / chunk;
  detail::for_rows(ctx, nch, chunk * 8, [&](std::int64_t i) {
    const std::int64_t j0 = i * chunk, len = std::min(n, j0 + chunk) - j0;
    cpu_kernels::adamw<T, false, false>(c, p + j0, g + j0, m + j0, v + j0, nullptr, nullptr, len);
  });
}

//! adamw_update fused with what follows it in a training step, in the same pass over the
//! buffers: the moving average of the new parameters, ema = d ema + (1 - d) p (ema null: none),
//! and the gradients zeroed once read (zero_grad). The parameters are bit for bit those of
//! ops::adamw_update (the same packet code); the EMA those of ops::lincomb up to the rounding of
//! its two products (one fused multiply-add here).
template <class T>
void adamw_update(const Context<cpu>& ctx, T* p, T* g, T* m, T* v, std::int64_t n,
                  const AdamWStep& s, T* ema, double ema_decay, bool zero_grad) {
  const cpu_kernels::optim_detail::AdamWPackets<T> c(s, ema_decay);
  const std::int64_t chunk = detail::kOptimChunk, nch = (n + chunk - 1) / chunk;
  detail::for_rows(ctx, nch, chunk * 10, [&](std::int64_t i) {
    const std::int64_t j0 = i * chunk, len = std::min(n, j0 + chunk) - j0;
    T* e = ema ? ema + j0 : nullptr;
    if (ema && zero_grad)
      cpu_kernels::adamw<T, true, true>(c, p + j0, g + j0, m + j0, v + j0, e, g + j0, len);
    else if (ema)
      cpu_kernels::adamw<T, true, false>(c, p + j0, g + j0, m + j0, v + j0, e, nullptr, len);
    else if (zero_grad)
      cpu_kernels::adamw<T, false, true>(c, p + j0, g + j0, m + j0, v + j0, nullptr, g + j0, len);
    else
      cpu_kernels::adamw<T, false, false>(c, p + j0, g + j0, m + j0, v + j0, nullptr, nullptr, len);
  });
}

//! Sum of squares of n contiguous values, in double: fixed chunks (each summed by
//! cpu_kernels::sum_squares), the chunks' sums added in order -- deterministic.
template <class T>
double sum_squares(const Context<cpu>& ctx, const T* x, std::int64_t n) {
  const std::int64_t chunk = detail::kOptimChunk, nch = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<std::size_t>(nch), 0.0);
  detail::for_rows(ctx, nch, chunk, [&](std::int64_t i) {
    const std::int64_t j0 = i * chunk;
    part[static_cast<std::size_t>(i)] =
        cpu_kernels::sum_squares(x + j0, std::min(n, j0 + chunk) - j0);
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

}  // namespace unidiffuser::ops
