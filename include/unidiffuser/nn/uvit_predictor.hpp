// SPDX-License-Identifier: Apache-2.0
//! \file uvit_predictor.hpp
//! The U-ViT as the multimodal noise predictor that GuidedPredictor and sample_task call: group
//! rows [B, D_g] addressed in place as the network's per-component inputs and outputs.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/nn/uvit.hpp"

namespace unidiffuser::nn {

//! The network as the multimodal noise predictor of GuidedPredictor / sample_task: group g's
//! row [B, D_g] holds the group's components in slot order (UViTConfig::layout), addressed in
//! place; every call uses the same data-type value (official: 1 for v1) unless per-sample values
//! are set (set_data_types).
template <class T, std::size_t K, class Backend = cpu>
class UViTPredictor {
 public:
  explicit UViTPredictor(UViT<T, Backend>& net, std::int64_t data_type = 1,
                         std::int64_t latent_h = 0, std::int64_t latent_w = 0)
      : net_(net),
        layout_(net.config().template layout<K>(latent_h, latent_w)),
        data_type_(data_type),
        h_(latent_h),
        w_(latent_w) {
    const auto& C = net_.config().components;
    for (const auto& c : C) {
      std::int64_t off = 0;
      for (std::size_t k = 0; k < c.slot; ++k) off += layout_.group(c.group).components[k].numel();
      offset_.push_back(off);
    }
  }
  const GroupLayout<K>& layout() const { return layout_; }
  UViT<T, Backend>& network() { return net_; }
  //! Per-sample data types (the v1 token) for the following calls, one per row of their batch
  //! (a call of k times as many rows -- the guided predictor's main and reference rows batched --
  //! takes them k times over); empty: every row takes the constructor's single value again.
  void set_data_types(std::vector<std::int64_t> per_sample) { per_sample_ = std::move(per_sample); }

  void operator()(const Context<Backend>& ctx, const std::array<TensorView<const T, Backend>, K>& x,
                  const std::array<std::span<const double>, K>& t,
                  const std::array<TensorView<T, Backend>, K>& out) {
    const auto& C = net_.config().components;
    const std::int64_t B = x[0].dim(0);
    // reused per call: clear() keeps the capacity, so no allocation after the first call
    UViTInputs<T, Backend>& in = in_;
    std::vector<RowBlock<T, Backend>>& o = out_;
    in.x.clear();
    in.t.clear();
    o.clear();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto g = C[k].group;
      const std::int64_t n = C[k].numel(h_, w_), ld = layout_.size(g);
      in.x.push_back(RowBlock<const T, Backend>(x[g].data() + offset_[k], B, n, ld));
      o.push_back(RowBlock<T, Backend>(out[g].data() + offset_[k], B, n, ld));
    }
    for (std::size_t g = 0; g < K; ++g) in.t.push_back(t[g]);
    if (!per_sample_.empty()) {
      const auto n = static_cast<std::int64_t>(per_sample_.size());
      if (B % n != 0)
        throw_mismatch("UViTPredictor", "data types",
                       "one per sample of the batch (a call of k times as many rows, as the "
                       "guided predictor's batched references make, repeats them k times)",
                       B, n);
      if (n == B) {
        in.data_type = per_sample_;
      } else {
        tiled_.resize(static_cast<std::size_t>(B));
        for (std::int64_t r = 0; r < B; ++r)
          tiled_[static_cast<std::size_t>(r)] = per_sample_[static_cast<std::size_t>(r % n)];
        in.data_type = tiled_;
      }
    } else {
      if (static_cast<std::int64_t>(dt_.size()) != B)
        dt_.assign(static_cast<std::size_t>(B), data_type_);
      in.data_type = dt_;
    }
    in.latent_h = h_;
    in.latent_w = w_;
    net_.forward(ctx, in, std::span<const RowBlock<T, Backend>>(o));
  }

 private:
  UViT<T, Backend>& net_;
  GroupLayout<K> layout_;
  std::int64_t data_type_, h_, w_;
  std::vector<std::int64_t> offset_;
  std::vector<std::int64_t> dt_, per_sample_, tiled_;
  UViTInputs<T, Backend> in_;
  std::vector<RowBlock<T, Backend>> out_;
};

}  // namespace unidiffuser::nn
