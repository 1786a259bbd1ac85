// SPDX-License-Identifier: Apache-2.0
// Component kinds defined outside the library, as a user would: "frames" (a [length, channels]
// signal cut into frames of `patch` steps, each frame one token through a linear embedding and
// head: the same arithmetic as a token sequence of length / patch tokens of patch x channels) and
// "gelu_frames" (the same with a GELU after the embedding, whose pre-activation is the kind's
// scratch), both written with the backend primitives for any backend.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/nn/component_kind.hpp"
#include "uvit_configs.hpp"

namespace unidiffuser::testing {

template <bool Gelu>
struct FramesKind {
  static constexpr const char* name = Gelu ? "gelu_frames" : "frames";
  static std::int64_t get(const nn::UViTComponent& c, const char* k) {
    if (!c.options.contains(k) || !c.options[k].is_number_integer() ||
        c.options[k].get<std::int64_t>() < 1 || c.options[k].get<std::int64_t>() > (1 << 20))
      throw error(name, c.name + ".options." + k,
                  "expected an integer in [1, 2^20], got " +
                      (c.options.contains(k) ? c.options[k].dump() : std::string("nothing")));
    return c.options[k].get<std::int64_t>();
  }
  static void validate(const nn::UViTComponent& c) {
    if (get(c, "length") % get(c, "patch") != 0)
      throw error(name, c.name + ".options.length", "must be a multiple of patch");
    get(c, "channels");
  }
  static Shape shape(const nn::UViTComponent& c) {
    return Shape{get(c, "length"), get(c, "channels")};
  }
  static std::int64_t tokens(const nn::UViTComponent& c) {
    return get(c, "length") / get(c, "patch");
  }
  static std::int64_t features(const nn::UViTComponent& c) {
    return get(c, "patch") * get(c, "channels");
  }
  static std::vector<std::pair<std::string, Shape>> parameters(const nn::UViTComponent& c,
                                                               std::int64_t E) {
    const std::int64_t F = features(c);
    return {{c.in_name + ".weight", Shape{E, F}},
            {c.in_name + ".bias", Shape{E}},
            {c.out_name + ".weight", Shape{F, E}},
            {c.out_name + ".bias", Shape{F}}};
  }
  static std::array<std::int64_t, 2> scratch(const nn::UViTComponent& c, std::int64_t E) {
    return {Gelu ? tokens(c) * E : 0, 0};
  }
  // [S; 1, numel] as [S; tokens, F]: the frames are consecutive in memory
  template <class U, class B>
  static BatchBlock<U, B> frames(const nn::UViTComponent& c, BatchBlock<U, B> x) {
    if (!x) return x;
    const std::int64_t F = features(c);
    return BatchBlock<U, B>(x.data, x.samples, tokens(c), F, F, x.stride);
  }
  template <class T, class B>
  static BatchBlock<T, B> as_tokens(BatchBlock<T, B> s, std::int64_t n, std::int64_t E) {
    return BatchBlock<T, B>(s.data, s.samples, n, E, E, s.stride);
  }
  template <class T, class B>
  static RowBlock<const T, B> weight(const nn::KindCall<T, B>& k, std::size_t i, std::int64_t n,
                                     std::int64_t m) {
    return RowBlock<const T, B>(k.params[i], n, m, m);
  }
  template <class T, class B>
  static void embed(const Context<B>& ctx, const nn::KindCall<T, B>& k, BatchBlock<const T, B> x,
                    BatchBlock<T, B> scratch, BatchBlock<T, B> tok) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    if constexpr (Gelu) {
      const auto u = as_tokens(scratch, tokens(c), E);
      ops::linear<T>(ctx, frames(c, x), weight(k, 0, E, F), k.params[1], u, ops::Epilogue::none);
      ops::gelu<T>(ctx, u, tok);
    } else {
      ops::linear<T>(ctx, frames(c, x), weight(k, 0, E, F), k.params[1], tok, ops::Epilogue::none);
    }
  }
  template <class T, class B>
  static void embed_backward(const Context<B>& ctx, const nn::KindCall<T, B>& k,
                             BatchBlock<const T, B> x, BatchBlock<T, B> scratch,
                             BatchBlock<const T, B> dtok, BatchBlock<T, B> dx) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    BatchBlock<const T, B> d = dtok;
    if constexpr (Gelu) {  // du = gelu'(u) dtok, in place of u
      const auto u = as_tokens(scratch, tokens(c), E);
      ops::gelu_backward<T>(ctx, u, dtok, u);
      d = u;
    }
    ops::linear_backward<T>(ctx, frames(c, x), weight(k, 0, E, F), d, frames(c, dx), false,
                            RowBlock<T, B>(k.grads[0], E, F, F), k.grads[1]);
  }
  template <class T, class B>
  static void head(const Context<B>& ctx, const nn::KindCall<T, B>& k, BatchBlock<const T, B> tok,
                   BatchBlock<T, B>, BatchBlock<T, B> out) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    ops::linear<T>(ctx, tok, weight(k, 2, F, E), k.params[3], frames(c, out), ops::Epilogue::none);
  }
  template <class T, class B>
  static void head_backward(const Context<B>& ctx, const nn::KindCall<T, B>& k,
                            BatchBlock<const T, B> tok, BatchBlock<T, B>,
                            BatchBlock<const T, B> dout, BatchBlock<T, B> dtok) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    ops::linear_backward<T>(ctx, tok, weight(k, 2, F, E), frames(c, dout), dtok, false,
                            RowBlock<T, B>(k.grads[2], F, E, E), k.grads[3]);
  }
};
using Frames = FramesKind<false>;
using GeluFrames = FramesKind<true>;

//! A frames component (group g, slot s): [length, channels] in frames of `patch`.
inline nn::UViTComponent frames_component(const std::string& kind, const std::string& name,
                                          std::size_t g, std::size_t s, std::int64_t length,
                                          std::int64_t channels, std::int64_t patch) {
  nn::UViTComponent c;
  c.name = name;
  c.kind = nn::ComponentKind::custom;
  c.custom_kind = kind;
  c.group = g;
  c.slot = s;
  c.in_name = name + "_embed";
  c.out_name = name + "_out";
  c.options = {{"length", length}, {"channels", channels}, {"patch", patch}};
  return c;
}

//! Three groups, two kinds defined here: img (patched) | text (tokens) + sig (frames, [6, 2] in
//! frames of 3) | audio (gelu_frames, [4, 3] in frames of 2). Registers both kinds for the CPU
//! and reference backends.
inline nn::UViTConfig kinds_config() {
  nn::register_kind<Frames, cpu, reference>();
  nn::register_kind<GeluFrames, cpu, reference>();
  auto c = k3_config();  // img (patched) | text | audio: audio becomes gelu_frames, sig joins text
  const auto img = c.components[0], text = c.components[1];
  c.components = {img, text, frames_component("frames", "sig", 1, 1, 6, 2, 3),
                  frames_component("gelu_frames", "audio", 2, 0, 4, 3, 2)};
  c.validate();
  return c;
}

}  // namespace unidiffuser::testing
