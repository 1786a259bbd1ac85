// SPDX-License-Identifier: Apache-2.0
//! \file objective.hpp
//! The UniDiffuser training objective (UNIDIFFUSER.md §3, §8): levels i.i.d. uniform in 1..N per
//! group and sample, every group noised at its own level, and the mean squared error between the
//! predicted and the true noise over the concatenation of all groups' elements.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"

namespace unidiffuser {

//! Draws training levels: levels[g][b] uniform in 1..N, a pure function of
//! (seed, stream, group, global sample index) so that it is independent of the batch split.
template <std::size_t K>
std::array<std::vector<std::int64_t>, K> draw_levels(std::uint64_t seed, std::uint64_t stream,
                                                     std::int64_t batch, int n_levels,
                                                     std::uint64_t sample_offset = 0) {
  if (n_levels < 1) throw_mismatch("draw_levels", "n_levels", "number of levels", ">= 1", n_levels);
  std::array<std::vector<std::int64_t>, K> out;
  for (std::size_t g = 0; g < K; ++g) {
    out[g].resize(static_cast<std::size_t>(batch));
    for (std::int64_t b = 0; b < batch; ++b) {
      // 32 random bits of one Philox block mapped to 0..N-1 by multiply-shift (bias < N / 2^32).
      using rng = r123::Philox4x32;
      rng gen;
      rng::key_type key = {
          {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
      rng::ctr_type ctr = {
          {static_cast<std::uint32_t>(g),
           static_cast<std::uint32_t>(sample_offset + static_cast<std::uint64_t>(b)),
           static_cast<std::uint32_t>(stream),
           static_cast<std::uint32_t>(stream >> 32) ^ 0x9e3779b9u}};
      const auto r = gen(ctr, key);
      const std::uint64_t hi =
          (static_cast<std::uint64_t>(r[0]) * static_cast<std::uint64_t>(n_levels)) >> 32;
      out[g][static_cast<std::size_t>(b)] = static_cast<std::int64_t>(hi) + 1;
    }
  }
  return out;
}

//! Draws which samples train a group's marginalised input (a library extension, off by default):
//! out[g][b] = 1 with probability p[g], a pure function of (seed, stream, group, global sample
//! index) like draw_levels, from its own Philox stream. Such a sample sees, for group g, what
//! sampling feeds a marginalised group (UNIDIFFUSER.md §5): fresh N(0, I) noise at level N.
template <std::size_t K>
std::array<std::vector<std::uint8_t>, K> draw_marginalised(std::uint64_t seed, std::uint64_t stream,
                                                           std::int64_t batch,
                                                           std::span<const double> p,
                                                           std::uint64_t sample_offset = 0) {
  if (!p.empty() && p.size() != K)
    throw_mismatch("draw_marginalised", "p", "one probability per group", K, p.size());
  std::array<std::vector<std::uint8_t>, K> out;
  for (std::size_t g = 0; g < K; ++g) {
    out[g].assign(static_cast<std::size_t>(batch), 0);
    const double pg = p.empty() ? 0.0 : p[g];
    if (!(pg >= 0.0 && pg <= 1.0))
      throw error("draw_marginalised", "p[" + std::to_string(g) + "]",
                  "a probability in [0, 1]; got " + std::to_string(pg));
    if (pg == 0.0) continue;
    // 32 random bits against p * 2^32 (p = 1 always, p = 0 never)
    const auto threshold = static_cast<std::uint64_t>(std::ldexp(pg, 32));
    for (std::int64_t b = 0; b < batch; ++b) {
      using rng = r123::Philox4x32;
      rng gen;
      rng::key_type key = {{static_cast<std::uint32_t>(seed) ^ 0x243f6a88u,
                            static_cast<std::uint32_t>(seed >> 32) ^ 0x85a308d3u}};
      rng::ctr_type ctr = {
          {static_cast<std::uint32_t>(g),
           static_cast<std::uint32_t>(sample_offset + static_cast<std::uint64_t>(b)),
           static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)}};
      const auto r = gen(ctr, key);
      out[g][static_cast<std::size_t>(b)] = static_cast<std::uint64_t>(r[1]) < threshold ? 1 : 0;
    }
  }
  return out;
}

//! Result of the objective.
struct LossValue {
  double loss = 0;                    //!< mean over all B * sum_g D_g squared errors
  std::vector<double> per_sample;     //!< mean over each sample's concatenated elements
  std::vector<double> per_group_mse;  //!< mean over each group's elements (batch included)
};

//! The UniDiffuser loss of noise predictions `pred` against the true noises `eps`.
template <class T, std::size_t K, class Backend>
LossValue unidiffuser_loss(const Context<Backend>& ctx,
                           const std::type_identity_t<GroupViews<const T, K, Backend>>& pred,
                           const std::type_identity_t<GroupViews<const T, K, Backend>>& eps) {
  const std::int64_t batch = eps[0].rank() ? eps[0].dim(0) : 1;
  LossValue out;
  out.per_sample.assign(static_cast<std::size_t>(batch), 0.0);
  out.per_group_mse.assign(K, 0.0);
  std::vector<double> rows(static_cast<std::size_t>(batch));
  std::int64_t total = 0;
  for (std::size_t g = 0; g < K; ++g) {
    check_shape("unidiffuser_loss", "pred[" + std::to_string(g) + "]", pred[g], eps[g].shape());
    if ((eps[g].rank() ? eps[g].dim(0) : 1) != batch)
      throw_mismatch("unidiffuser_loss", "eps[" + std::to_string(g) + "]", "batch", batch,
                     eps[g].dim(0));
    ops::squared_error_rows<T>(ctx, as_rows(pred[g]), as_rows(eps[g]), rows.data());
    double sum = 0;
    for (std::int64_t b = 0; b < batch; ++b) {
      sum += rows[static_cast<std::size_t>(b)];
      out.per_sample[static_cast<std::size_t>(b)] += rows[static_cast<std::size_t>(b)];
    }
    out.per_group_mse[g] = sum / static_cast<double>(eps[g].size());
    out.loss += sum;
    total += eps[g].size();
  }
  const double per_row = static_cast<double>(total) / static_cast<double>(batch);
  for (double& v : out.per_sample) v /= per_row;
  out.loss /= static_cast<double>(total);
  return out;
}

//! Gradient of unidiffuser_loss with respect to the predictions: dpred[g] = 2 (pred[g] -
//! eps[g]) / (number of elements of all groups), written.
template <class T, std::size_t K, class Backend>
void unidiffuser_loss_grad(const Context<Backend>& ctx,
                           const std::type_identity_t<GroupViews<const T, K, Backend>>& pred,
                           const std::type_identity_t<GroupViews<const T, K, Backend>>& eps,
                           const std::type_identity_t<GroupViews<T, K, Backend>>& dpred) {
  const std::int64_t batch = eps[0].rank() ? eps[0].dim(0) : 1;
  std::int64_t total = 0;
  for (std::size_t g = 0; g < K; ++g) {
    if ((eps[g].rank() ? eps[g].dim(0) : 1) != batch)
      throw_mismatch("unidiffuser_loss_grad", "eps[" + std::to_string(g) + "]", "batch", batch,
                     eps[g].dim(0));
    check_shape("unidiffuser_loss_grad", "pred[" + std::to_string(g) + "]", pred[g],
                eps[g].shape());
    check_shape("unidiffuser_loss_grad", "dpred[" + std::to_string(g) + "]", dpred[g],
                eps[g].shape());
    total += eps[g].size();
  }
  if (total == 0) return;
  const std::vector<double> a(static_cast<std::size_t>(batch), 2.0 / static_cast<double>(total)),
      b(static_cast<std::size_t>(batch), -2.0 / static_cast<double>(total));
  for (std::size_t g = 0; g < K; ++g)
    ops::axpby_rows(ctx, as_rows(dpred[g]), a.data(), as_rows(pred[g]), b.data(), as_rows(eps[g]));
}

}  // namespace unidiffuser
