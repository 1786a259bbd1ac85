// SPDX-License-Identifier: Apache-2.0
//! \file layer_profile.hpp
//! Where a U-ViT forward spends its time, by layer kind: UViT::set_profile(&p) makes every later
//! forward add, per kind, the thread time of its layer calls and their products' floating-point
//! operations. Diagnostics for performance work (`unidiffuser-bench uvit --profile` prints it
//! next to the FMA peak, `unidiffuser-bench-cuda` next to the bf16 matrix peak); two clock reads
//! per layer call (on the CUDA backend also two waits for the device), nothing when no profile
//! is set.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>

namespace unidiffuser::nn {

//! The layer kinds of a U-ViT forward.
enum class LayerKind : int {
  embed,        //!< token embeddings: patch and vector embeddings, time MLPs, positions
  skip_linear,  //!< the long skips' linear over [x, skip] (out blocks)
  layer_norm,   //!< the blocks' post-LN layer norms (with their residual adds)
  qkv,          //!< attention's input projection
  attention,    //!< softmax(q k^T / sqrt(d)) v of every head
  proj,         //!< attention's output projection
  fc1_gelu,     //!< the MLP's first linear with its GELU
  fc2,          //!< the MLP's second linear
  heads,        //!< the final layer norm and the output heads (unpatchify included)
};
inline constexpr std::size_t kLayerKinds = 9;
inline constexpr std::array<const char*, kLayerKinds> kLayerKindNames = {
    "embed", "skip_linear", "layer_norm", "qkv", "attention", "proj", "fc1_gelu", "fc2", "heads"};

//! Accumulated time and work per layer kind (thread-safe: forwards on several threads add to
//! one profile). Time is thread time: a layer run by two threads for 1 ms counts 2 ms, so
//! divide by the threads for a share of the wall time; `flop` is each call's products (2 m n k
//! per linear, 4 L^2 E per attention; 0 for norms), counted once per call however many threads
//! share it.
class LayerProfile {
 public:
  using clock = std::chrono::steady_clock;
  void add(LayerKind k, clock::duration d, double flop) {
    const auto i = static_cast<std::size_t>(k);
    ns_[i].fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(d).count(),
                     std::memory_order_relaxed);
    double cur = flop_[i].load(std::memory_order_relaxed);
    while (!flop_[i].compare_exchange_weak(cur, cur + flop, std::memory_order_relaxed)) {
    }
  }
  //! Thread time (s) and floating-point operations of kind k so far.
  double seconds(LayerKind k) const {
    return static_cast<double>(ns_[static_cast<std::size_t>(k)].load()) * 1e-9;
  }
  double flop(LayerKind k) const { return flop_[static_cast<std::size_t>(k)].load(); }
  void reset() {
    for (std::size_t i = 0; i < kLayerKinds; ++i) {
      ns_[i] = 0;
      flop_[i] = 0.0;
    }
  }

 private:
  std::array<std::atomic<std::int64_t>, kLayerKinds> ns_{};
  std::array<std::atomic<double>, kLayerKinds> flop_{};
};

}  // namespace unidiffuser::nn
