// SPDX-License-Identifier: Apache-2.0
//! \file groups.hpp
//! Timestep groups ("modalities"): each group is a list of components (tensors) that share one
//! diffusion level. A batch of group g is stored as one [B, D_g] matrix whose row is the
//! row-major flattening of the group's components, concatenated in declaration order. K, the
//! number of groups, is a compile-time constant; shapes are run-time values.
//! Ref: UNIDIFFUSER.md §1, §8; ARCHITECTURE.md §1.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser {

//! One tensor of a group, by its per-sample shape (e.g. z: {4, 64, 64}; c: {1, 512}).
struct ComponentSpec {
  std::string name;
  Shape shape;
  std::int64_t numel() const { return shape.numel(); }
};

//! A named group of components.
struct GroupSpec {
  std::string name;
  std::vector<ComponentSpec> components;
  std::int64_t size() const {
    std::int64_t n = 0;
    for (const auto& c : components) n += c.numel();
    return n;
  }
};

//! The K groups of a model, with per-group sizes and component offsets.
template <std::size_t K>
class GroupLayout {
  static_assert(K >= 1, "GroupLayout<K>: need at least one group");

 public:
  GroupLayout() = default;
  explicit GroupLayout(std::array<GroupSpec, K> groups) : groups_(std::move(groups)) {
    for (std::size_t g = 0; g < K; ++g) {
      if (groups_[g].components.empty())
        throw error("GroupLayout", "group " + groups_[g].name,
                    "a group needs at least one component");
      for (const auto& c : groups_[g].components)
        if (c.numel() <= 0)
          throw error("GroupLayout", groups_[g].name + "." + c.name,
                      "component shape " + c.shape.str() + " has no elements");
    }
  }
  static constexpr std::size_t groups() { return K; }
  const GroupSpec& group(std::size_t g) const { return groups_.at(g); }
  //! Values per sample of group g.
  std::int64_t size(std::size_t g) const { return groups_.at(g).size(); }
  //! Offset of component c inside a row of group g.
  std::int64_t offset(std::size_t g, std::size_t c) const {
    std::int64_t o = 0;
    for (std::size_t k = 0; k < c; ++k) o += groups_.at(g).components.at(k).numel();
    return o;
  }
  //! Index of a group by name; throws if absent.
  std::size_t find(const std::string& name) const {
    for (std::size_t g = 0; g < K; ++g)
      if (groups_[g].name == name) return g;
    throw error("GroupLayout::find", name, "no group of that name");
  }

 private:
  std::array<GroupSpec, K> groups_;
};

//! The official two-group layout: group 0 "image" = {z: [C, H, W], c: [1, clip_dim]},
//! group 1 "text" = {y: [L, text_dim]}. Defaults are the official 512x512 model.
inline GroupLayout<2> official_layout(std::int64_t latent_c = 4, std::int64_t latent_hw = 64,
                                      std::int64_t clip_dim = 512, std::int64_t text_len = 77,
                                      std::int64_t text_dim = 64) {
  return GroupLayout<2>({GroupSpec{"image",
                                   {ComponentSpec{"z", Shape{latent_c, latent_hw, latent_hw}},
                                    ComponentSpec{"c", Shape{1, clip_dim}}}},
                         GroupSpec{"text", {ComponentSpec{"y", Shape{text_len, text_dim}}}}});
}

//! Views of one batch of every group: x[g] is [B, D_g].
template <class T, std::size_t K, class Backend = cpu>
using GroupViews = std::array<TensorView<T, Backend>, K>;

//! Throws unless every view is [B, layout.size(g)].
template <class T, std::size_t K, class Backend>
void check_groups(std::string_view op, std::string_view what, const GroupLayout<K>& layout,
                  const GroupViews<T, K, Backend>& v, std::int64_t batch) {
  for (std::size_t g = 0; g < K; ++g)
    check_shape(op, std::string(what) + "[" + layout.group(g).name + "]", v[g],
                Shape{batch, layout.size(g)});
}

}  // namespace unidiffuser
