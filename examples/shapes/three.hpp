// SPDX-License-Identifier: Apache-2.0
//! \file three.hpp
//! The three-modality shapes example (unidiffuser-shapes3, docs/CUSTOM_LAYOUTS.md): the shapes
//! world seen as an image, a caption and a sound, one U-ViT with three timestep groups
//!   group 0  img   [3, 16, 16] pixels, patched_image in 4 x 4 patches (16 tokens)
//!   group 1  text  [5, 32] caption embedding, tokens (5 tokens)
//!   group 2  wave  [64, 1] the scene's sound (wave.hpp), the "frames" kind of frames_kind.hpp
//!                  in frames of 8 (8 tokens): a kind registered by this program, not the library
//! trained with the library's Trainer (an independent level per group), and its data source.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "frames_kind.hpp"
#include "model.hpp"
#include "unidiffuser/nn/component_kind.hpp"
#include "unidiffuser/train/trainer.hpp"
#include "wave.hpp"
#include "world.hpp"

namespace shapes {

//! Group indices of the three-modality layout and the element count of each group.
inline constexpr std::size_t kImgGroup = 0, kTextGroup = 1, kWaveGroup = 2;
inline constexpr std::array<int, 3> kGroupSize{kPixels, kTextSize, kWave};
//! Samples per token of the sound.
inline constexpr int kWaveFrame = 8;
//! The world's name in the checkpoint metadata.
inline constexpr const char* kWorld3 = "shapes-16x16-wave64-v1";

//! Registers the program's kind ("frames", for the CPU backend). Idempotent.
inline void register_kinds() {
  ud::nn::register_kind<Frames>();
}

//! The three-group layout: the demo's image and caption (config()) plus the sound.
inline ud::nn::UViTConfig config3(const ModelSize& m = {}) {
  register_kinds();
  auto c = config(m);
  c.time_names = {"time_img_embed", "time_text_embed", "time_wave_embed"};
  c.components.push_back(frames_component("frames", "wave", kWaveGroup, 0, kWave, 1, kWaveFrame));
  c.validate();
  return c;
}

//! One world sample in all three modalities: image, caption latent and sound.
inline Attributes render3(std::uint64_t seed, std::uint64_t index, float* img, float* text,
                          float* wave) {
  const Scene s = sample_scene(seed, index);
  render(s, std::span<float>(img, kPixels), 1);  // kWorld3 draws world v1's shapes
  encode_caption(caption_words(s.attr), std::span<float>(text, kTextSize));
  render_wave(s.attr, wave_jitter(seed, index), std::span<float>(wave, kWave));
  return s.attr;
}

//! The letter of each group in task names: i(mage), t(ext), w(ave).
inline constexpr std::array<char, 3> kGroupLetter{'i', 't', 'w'};

//! One task of the evaluation: the groups generated and conditioned on (the rest marginalised).
struct Task3 {
  std::vector<std::size_t> generate, condition;
  //! "t->i", "iw->t", "i->tw", "joint" (every group generated), "w" (a marginal).
  std::string name() const {
    std::string c, g;
    for (auto k : condition) c += kGroupLetter[k];
    for (auto k : generate) g += kGroupLetter[k];
    if (!condition.empty()) return c + "->" + g;
    return generate.size() == 3 ? "joint" : g;
  }
};

//! The tasks in report order: six ordered pairs, three two-to-one, three one-to-two.
inline std::vector<Task3> conditional_tasks() {
  std::vector<Task3> t;
  for (std::size_t a = 0; a < 3; ++a)
    for (std::size_t b = 0; b < 3; ++b)
      if (a != b) t.push_back({{b}, {a}});
  for (std::size_t c = 0; c < 3; ++c) {
    std::vector<std::size_t> rest;
    for (std::size_t k = 0; k < 3; ++k)
      if (k != c) rest.push_back(k);
    t.push_back({{c}, rest});
  }
  for (std::size_t a = 0; a < 3; ++a) {
    std::vector<std::size_t> rest;
    for (std::size_t k = 0; k < 3; ++k)
      if (k != a) rest.push_back(k);
    t.push_back({rest, {a}});
  }
  return t;
}

using Trainer3 = ud::train::Trainer<float, 3>;

//! The world as the Trainer's data source: sample `first + r` of the run's seed fills row r.
inline Trainer3::DataSource data_source3() {
  return [](std::uint64_t seed, std::int64_t, std::int64_t first, const Trainer3::Views& x0,
            std::span<std::int64_t>) {
    for (std::int64_t r = 0; r < x0[0].rows; ++r)
      render3(
          seed, static_cast<std::uint64_t>(first + r), x0[kImgGroup].data + r * x0[kImgGroup].ld,
          x0[kTextGroup].data + r * x0[kTextGroup].ld, x0[kWaveGroup].data + r * x0[kWaveGroup].ld);
  };
}

//! Trains the three-group network (model.hpp's recipe; docs/CUSTOM_LAYOUTS.md) and writes the
//! EMA weights to `path`.
inline void train3(const ModelSize& ms, const TrainSettings& ts, const std::string& path,
                   const std::string& state_path, bool resume, bool quiet) {
  train_network<3>(config3(ms), data_source3(), ts, path, state_path, resume, quiet, kWorld3);
}

}  // namespace shapes
