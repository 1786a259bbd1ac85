// SPDX-License-Identifier: Apache-2.0
//! \file frames_kind.hpp
//! A component kind defined outside the library, as a user writes one (docs/CUSTOM_LAYOUTS.md §6):
//! "frames", a [length, channels] signal cut into frames of `patch` steps, each frame one token
//! through a linear embedding and a linear head (the same arithmetic as a token sequence of
//! length / patch tokens of patch x channels values), and "gelu_frames", the same with a GELU
//! after the embedding, whose pre-activation is the kind's scratch. Written with the backend
//! primitives only, so it runs on any backend it is registered for. The three-modality shapes
//! example (unidiffuser-shapes3) carries the scene's 64-sample sound as "frames" in frames of 8;
//! the library's tests use both kinds.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/nn/component_kind.hpp"

namespace shapes {

namespace ud = unidiffuser;

//! The kind's options: "length", "channels", "patch" (integers in [1, 2^20]; length a multiple of
//! patch). Parameters: in_name.weight [E, patch x channels], in_name.bias [E], out_name.weight
//! [patch x channels, E], out_name.bias [patch x channels].
template <bool Gelu>
struct FramesKind {
  static constexpr const char* name = Gelu ? "gelu_frames" : "frames";
  static std::int64_t get(const ud::nn::UViTComponent& c, const char* k) {
    if (!c.options.contains(k) || !c.options[k].is_number_integer() ||
        c.options[k].get<std::int64_t>() < 1 || c.options[k].get<std::int64_t>() > (1 << 20))
      throw ud::error(name, c.name + ".options." + k,
                      "expected an integer in [1, 2^20], got " +
                          (c.options.contains(k) ? c.options[k].dump() : std::string("nothing")));
    return c.options[k].get<std::int64_t>();
  }
  static void validate(const ud::nn::UViTComponent& c) {
    if (get(c, "length") % get(c, "patch") != 0)
      throw ud::error(name, c.name + ".options.length", "must be a multiple of patch");
    get(c, "channels");
  }
  static ud::Shape shape(const ud::nn::UViTComponent& c) {
    return ud::Shape{get(c, "length"), get(c, "channels")};
  }
  static std::int64_t tokens(const ud::nn::UViTComponent& c) {
    return get(c, "length") / get(c, "patch");
  }
  static std::int64_t features(const ud::nn::UViTComponent& c) {
    return get(c, "patch") * get(c, "channels");
  }
  static std::vector<std::pair<std::string, ud::Shape>> parameters(const ud::nn::UViTComponent& c,
                                                                   std::int64_t E) {
    const std::int64_t F = features(c);
    return {{c.in_name + ".weight", ud::Shape{E, F}},
            {c.in_name + ".bias", ud::Shape{E}},
            {c.out_name + ".weight", ud::Shape{F, E}},
            {c.out_name + ".bias", ud::Shape{F}}};
  }
  static std::array<std::int64_t, 2> scratch(const ud::nn::UViTComponent& c, std::int64_t E) {
    return {Gelu ? tokens(c) * E : 0, 0};
  }
  // [S; 1, numel] as [S; tokens, F]: the frames are consecutive in memory
  template <class U, class B>
  static ud::BatchBlock<U, B> frames(const ud::nn::UViTComponent& c, ud::BatchBlock<U, B> x) {
    if (!x) return x;
    const std::int64_t F = features(c);
    return ud::BatchBlock<U, B>(x.data, x.samples, tokens(c), F, F, x.stride);
  }
  template <class T, class B>
  static ud::BatchBlock<T, B> as_tokens(ud::BatchBlock<T, B> s, std::int64_t n, std::int64_t E) {
    return ud::BatchBlock<T, B>(s.data, s.samples, n, E, E, s.stride);
  }
  template <class T, class B>
  static ud::RowBlock<const T, B> weight(const ud::nn::KindCall<T, B>& k, std::size_t i,
                                         std::int64_t n, std::int64_t m) {
    return ud::RowBlock<const T, B>(k.params[i], n, m, m);
  }
  template <class T, class B>
  static void embed(const ud::Context<B>& ctx, const ud::nn::KindCall<T, B>& k,
                    ud::BatchBlock<const T, B> x, ud::BatchBlock<T, B> scratch,
                    ud::BatchBlock<T, B> tok) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    if constexpr (Gelu) {
      const auto u = as_tokens(scratch, tokens(c), E);
      ud::ops::linear<T>(ctx, frames(c, x), weight(k, 0, E, F), k.params[1], u,
                         ud::ops::Epilogue::none);
      ud::ops::gelu<T>(ctx, u, tok);
    } else {
      ud::ops::linear<T>(ctx, frames(c, x), weight(k, 0, E, F), k.params[1], tok,
                         ud::ops::Epilogue::none);
    }
  }
  template <class T, class B>
  static void embed_backward(const ud::Context<B>& ctx, const ud::nn::KindCall<T, B>& k,
                             ud::BatchBlock<const T, B> x, ud::BatchBlock<T, B> scratch,
                             ud::BatchBlock<const T, B> dtok, ud::BatchBlock<T, B> dx) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    ud::BatchBlock<const T, B> d = dtok;
    if constexpr (Gelu) {  // du = gelu'(u) dtok, in place of u
      const auto u = as_tokens(scratch, tokens(c), E);
      ud::ops::gelu_backward<T>(ctx, u, dtok, u);
      d = u;
    }
    ud::ops::linear_backward<T>(ctx, frames(c, x), weight(k, 0, E, F), d, frames(c, dx), false,
                                ud::RowBlock<T, B>(k.grads[0], E, F, F), k.grads[1]);
  }
  template <class T, class B>
  static void head(const ud::Context<B>& ctx, const ud::nn::KindCall<T, B>& k,
                   ud::BatchBlock<const T, B> tok, ud::BatchBlock<T, B>, ud::BatchBlock<T, B> out) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    ud::ops::linear<T>(ctx, tok, weight(k, 2, F, E), k.params[3], frames(c, out),
                       ud::ops::Epilogue::none);
  }
  template <class T, class B>
  static void head_backward(const ud::Context<B>& ctx, const ud::nn::KindCall<T, B>& k,
                            ud::BatchBlock<const T, B> tok, ud::BatchBlock<T, B>,
                            ud::BatchBlock<const T, B> dout, ud::BatchBlock<T, B> dtok) {
    const auto& c = k.component;
    const std::int64_t F = features(c), E = k.embed_dim;
    ud::ops::linear_backward<T>(ctx, tok, weight(k, 2, F, E), frames(c, dout), dtok, false,
                                ud::RowBlock<T, B>(k.grads[2], F, E, E), k.grads[3]);
  }
};
using Frames = FramesKind<false>;
using GeluFrames = FramesKind<true>;

//! A frames component (group g, slot s): [length, channels] in frames of `patch`, parameter
//! prefixes name_embed / name_out; `kind` is "frames" or "gelu_frames".
inline ud::nn::UViTComponent frames_component(const std::string& kind, const std::string& name,
                                              std::size_t g, std::size_t s, std::int64_t length,
                                              std::int64_t channels, std::int64_t patch) {
  ud::nn::UViTComponent c;
  c.name = name;
  c.kind = ud::nn::ComponentKind::custom;
  c.custom_kind = kind;
  c.group = g;
  c.slot = s;
  c.in_name = name + "_embed";
  c.out_name = name + "_out";
  c.options = {{"length", length}, {"channels", channels}, {"patch", patch}};
  return c;
}

}  // namespace shapes
