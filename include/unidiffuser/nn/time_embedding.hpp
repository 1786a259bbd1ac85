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
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::nn {

//! emb[b, :] = [cos(t_b f_0..f_{h-1}), sin(t_b f_0..f_{h-1})] (+ one 0 when dim is odd),
//! f_k = exp(-ln(max_period) k / h), h = dim / 2.  t: [B], out: [B, dim] (host backends; the
//! primitive ops::timestep_embedding takes the times as host values).
template <class T, class Backend>
void timestep_embedding(const Context<Backend>& ctx,
                        std::type_identity_t<TensorView<const T, Backend>> t,
                        std::type_identity_t<TensorView<T, Backend>> out,
                        double max_period = 10000.0) {
  static_assert(std::is_floating_point_v<T>, "timestep_embedding: T must be float or double");
  static_assert(is_host_backend_v<Backend>, "nn::timestep_embedding: host tensors only");
  if (t.rank() != 1) throw_mismatch("nn::timestep_embedding", "t", "rank", 1, t.rank());
  if (out.rank() != 2 || out.dim(0) != t.dim(0))
    throw_mismatch("nn::timestep_embedding", "out", "shape",
                   "[" + std::to_string(t.dim(0)) + ", dim]", out.shape().str());
  std::vector<double> tv(static_cast<std::size_t>(t.size()));
  for (std::int64_t b = 0; b < t.size(); ++b) tv[static_cast<std::size_t>(b)] = t[b];
  const std::int64_t dim = out.dim(1);
  ops::timestep_embedding<T>(
      ctx, tv, BatchBlock<T, Backend>(out.data(), t.dim(0), 1, dim, dim, dim), max_period);
}

}  // namespace unidiffuser::nn
