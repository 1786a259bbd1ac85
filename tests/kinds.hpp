// SPDX-License-Identifier: Apache-2.0
// The component kinds defined outside the library that the tests use: "frames" and "gelu_frames"
// of the shapes example (examples/shapes/frames_kind.hpp: a [length, channels] signal cut into
// frames, one token each; the second with a GELU whose pre-activation is the kind's scratch), and
// a K = 3 configuration that carries both.
#pragma once

#include "frames_kind.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "uvit_configs.hpp"

namespace unidiffuser::testing {

using Frames = shapes::Frames;
using GeluFrames = shapes::GeluFrames;
using shapes::frames_component;

//! Three groups and both kinds: img (patched) | text (tokens) + sig (frames, [6, 2] in
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
