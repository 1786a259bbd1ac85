// SPDX-License-Identifier: Apache-2.0
//! \file time_embedding.hpp
//! Sinusoidal timestep embedding, cos block first (UVIT.md §4.1).
//!
//! For T = float the reference float32 recipe is followed operation by operation
//! (q_k = fl(fl(-ln 1e4 * k) / half), f_k = fl(exp(q_k)), a_k = fl(t * f_k), cos/sin of the float
//! argument), because at t ~ 1000 one ulp of f_k moves the argument by ~6e-5. For T = double
//! every step is float64 (the reference's float64 variant). Ref: UVIT.md §4.1.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::nn {

//! emb[b, :] = [cos(t_b f_0..f_{h-1}), sin(t_b f_0..f_{h-1})] (+ one 0 when dim is odd),
//! f_k = exp(-ln(max_period) k / h), h = dim / 2.  t: [B], out: [B, dim].
template <class T>
void timestep_embedding(const Context<cpu>& ctx, TensorView<const T, cpu> t, TensorView<T, cpu> out,
                        double max_period = 10000.0) {
  static_assert(std::is_floating_point_v<T>, "timestep_embedding: T must be float or double");
  (void)ctx;
  if (t.rank() != 1) throw_mismatch("nn::timestep_embedding", "t", "rank", 1, t.rank());
  if (out.rank() != 2 || out.dim(0) != t.dim(0))
    throw_mismatch("nn::timestep_embedding", "out", "shape",
                   "[" + std::to_string(t.dim(0)) + ", dim]", out.shape().str());
  const std::int64_t dim = out.dim(1), half = dim / 2;
  for (std::int64_t b = 0; b < t.dim(0); ++b) {
    const T tb = t[b];
    T* o = out.data() + b * dim;
    for (std::int64_t k = 0; k < half; ++k) {
      const T q = static_cast<T>(static_cast<T>(-std::log(static_cast<T>(max_period))) *
                                 static_cast<T>(k)) /
                  static_cast<T>(half);
      const T f = static_cast<T>(std::exp(q));
      const T a = static_cast<T>(tb * f);
      o[k] = static_cast<T>(std::cos(static_cast<double>(a)));
      o[half + k] = static_cast<T>(std::sin(static_cast<double>(a)));
    }
    if (dim % 2) o[dim - 1] = T(0);
  }
}

}  // namespace unidiffuser::nn
