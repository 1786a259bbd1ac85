// SPDX-License-Identifier: Apache-2.0
//! \file noise.hpp
//! Noise sources: where samplers and guidance get their standard-normal tensors.
//!
//! A source fills one component of one group at a time, `draw(ctx, group, component, dst)`, in
//! the order the caller defines (UNIDIFFUSER.md §8 for guidance). `PhiloxNoise` gives every draw
//! its own Philox stream and keys rows by the global sample index, so results do not depend on
//! batch size or position; `InjectedNoise` replays recorded tensors (e.g. the reference's torch
//! draws) and checks their shapes, for golden tests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <string>
#include <utility>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser {

//! Counter-based noise: the n-th draw uses stream `stream_base + n`.
class PhiloxNoise {
 public:
  explicit PhiloxNoise(std::uint64_t seed, std::uint64_t sample_offset = 0,
                       std::uint64_t stream_base = 0)
      : seed_(seed), sample_offset_(sample_offset), next_stream_(stream_base) {}

  template <class T, class Backend>
  void draw(const Context<Backend>& ctx, std::size_t /*group*/, std::size_t /*component*/,
            RowBlock<T, Backend> dst) {
    ops::random_normal(ctx, dst, NoiseKey{seed_, next_stream_++}, sample_offset_);
  }
  std::uint64_t draws() const { return next_stream_; }

 private:
  std::uint64_t seed_, sample_offset_, next_stream_;
};

//! Replays recorded host tensors in order; each draw must match the next tensor's element count
//! per row.
template <class T>
class InjectedNoise {
 public:
  void push(Tensor<T, cpu> t) { queue_.push_back(std::move(t)); }
  std::size_t remaining() const { return queue_.size(); }

  template <class Backend>
  void draw(const Context<Backend>& ctx, std::size_t group, std::size_t component,
            RowBlock<T, Backend> dst) {
    static_assert(is_host_backend_v<Backend>, "InjectedNoise replays host tensors");
    const std::string who =
        "group " + std::to_string(group) + " component " + std::to_string(component);
    if (queue_.empty()) throw error("InjectedNoise::draw", who, "no recorded noise left");
    Tensor<T, cpu> t = std::move(queue_.front());
    queue_.pop_front();
    const std::int64_t rows = t.rank() ? t.dim(0) : 1;
    if (rows != dst.rows || t.size() != dst.rows * dst.cols)
      throw_mismatch("InjectedNoise::draw", who, "recorded tensor size",
                     "[" + std::to_string(dst.rows) + ", " + std::to_string(dst.cols) + "]",
                     t.shape().str());
    ops::copy<T>(ctx, RowBlock<const T, Backend>(t.data(), dst.rows, dst.cols, dst.cols), dst);
  }

 private:
  std::deque<Tensor<T, cpu>> queue_;
};

}  // namespace unidiffuser
