// SPDX-License-Identifier: Apache-2.0
//! \file pipeline.hpp
//! Sampling a task end to end: initial noise, guided predictor, sampler, and the split of the
//! final state back into groups; multi-stage chains over any K, and the official modes, two-stage
//! ones included (UNIDIFFUSER.md §7).
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/diffusion/guidance.hpp"
#include "unidiffuser/diffusion/task.hpp"

namespace unidiffuser {

//! Samples `task` with `sampler` (DpmSolver, Ddim, ...). The initial noise of *every* group's
//! components is drawn from `noise`, in group then component order (the reference draws all of
//! them whatever the mode, UNIDIFFUSER.md §9.3), and the generated groups form the initial state.
//! Returns one [B, D_g] tensor per group: the sample for generated groups, empty otherwise.
//! A guidance rescale without a schedule takes the sampler's (`sampler.schedule()`).
template <class T, std::size_t K, class Net, class Noise, class Sampler, class Backend>
std::array<Tensor<T, Backend>, K> sample_task(
    const Context<Backend>& ctx, Net& net, Noise& noise, const GroupLayout<K>& layout,
    const Task<K>& task, const GuidanceOptions& guidance, const Sampler& sampler,
    std::int64_t batch,
    std::type_identity_t<std::array<TensorView<const T, Backend>, K>> conditions = {},
    std::type_identity_t<std::array<TensorView<const T, Backend>, K>> null_conditions = {},
    std::type_identity_t<std::array<TensorView<const T, Backend>, K>> fixed_noise = {}) {
  GuidanceOptions opt = guidance;
  if constexpr (requires { sampler.schedule(); })
    if (opt.schedule == nullptr) opt.schedule = &sampler.schedule();
  GuidedPredictor<T, K, Net, Noise, Backend> pred(ctx, net, noise, layout, task, opt, batch,
                                                  conditions, null_conditions, fixed_noise);
  Tensor<T, Backend> state(Shape{batch, pred.state_size()});
  std::array<Tensor<T, Backend>, K> init;
  for (std::size_t g = 0; g < K; ++g) {
    init[g] = Tensor<T, Backend>(Shape{batch, layout.size(g)});
    const auto& comps = layout.group(g).components;
    for (std::size_t c = 0; c < comps.size(); ++c)
      noise.draw(ctx, g, c, column_block(init[g].view(), layout.offset(g, c), comps[c].numel()));
    if (task.generated(g))
      ops::copy<T>(ctx, as_rows(TensorView<const T, Backend>(init[g].view())),
                   column_block(state.view(), pred.state_offset(g), layout.size(g)));
  }
  auto ws = sampler.make_workspace(batch, pred.state_size());
  sampler.sample(ctx, state.view(), pred, ws);
  std::array<Tensor<T, Backend>, K> out;
  for (std::size_t g = 0; g < K; ++g) {
    if (!task.generated(g)) continue;
    out[g] = Tensor<T, Backend>(Shape{batch, layout.size(g)});
    ops::copy<T>(ctx,
                 column_block(TensorView<const T, Backend>(state.view()), pred.state_offset(g),
                              layout.size(g)),
                 as_rows(out[g].view()));
  }
  return out;
}

//! Runs the stages of `chain` in order (any K). A stage's conditioned group takes the latest value
//! an earlier stage generated for it, else `conditions[g]`. Returns the latest generated value of
//! every group (empty for groups no stage generated).
template <class T, std::size_t K, class Net, class Noise, class Sampler, class Backend>
std::array<Tensor<T, Backend>, K> sample_chain(
    const Context<Backend>& ctx, Net& net, Noise& noise, const GroupLayout<K>& layout,
    const Chain<K>& chain, const GuidanceOptions& guidance, const Sampler& sampler,
    std::int64_t batch,
    std::type_identity_t<std::array<TensorView<const T, Backend>, K>> conditions = {},
    std::type_identity_t<std::array<TensorView<const T, Backend>, K>> null_conditions = {}) {
  if (chain.empty()) throw error("sample_chain", "chain", "needs at least one stage");
  std::array<Tensor<T, Backend>, K> result;
  for (const Task<K>& task : chain) {
    std::array<TensorView<const T, Backend>, K> cond = conditions;
    for (std::size_t g = 0; g < K; ++g)
      if (task.roles[g] == Role::condition && result[g].size() > 0) cond[g] = result[g].view();
    auto out = sample_task<T, K>(ctx, net, noise, layout, task, guidance, sampler, batch, cond,
                                 null_conditions);
    for (std::size_t g = 0; g < K; ++g)
      if (task.generated(g)) result[g] = std::move(out[g]);
  }
  return result;
}

//! Runs an official mode on the two-group layout. `conditions[g]` are the clean inputs the mode
//! needs (image group for i2t / i2t2i, text group for t2i / t2i2t). Two-stage modes feed the
//! sampled state of the first stage, as is, as the condition of the second. Returns the final
//! value of each group produced by the mode (the intermediate one for two-stage modes).
template <class T, class Net, class Noise, class Sampler, class Backend>
std::array<Tensor<T, Backend>, 2> sample_mode(
    const Context<Backend>& ctx, Net& net, Noise& noise, const GroupLayout<2>& layout, Mode mode,
    const GuidanceOptions& guidance, const Sampler& sampler, std::int64_t batch,
    std::type_identity_t<std::array<TensorView<const T, Backend>, 2>> conditions = {},
    std::type_identity_t<std::array<TensorView<const T, Backend>, 2>> null_conditions = {}) {
  return sample_chain<T, 2>(ctx, net, noise, layout, tasks::stages(mode), guidance, sampler, batch,
                            conditions, null_conditions);
}

}  // namespace unidiffuser
