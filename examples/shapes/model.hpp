// SPDX-License-Identifier: Apache-2.0
//! \file model.hpp
//! The shapes demo's two-group U-ViT (group 0: the image, pixels [3, 16, 16] in 4 x 4 patches;
//! group 1: the caption, [5, 32] tokens) and its training on the procedural world with the
//! library's Trainer (the UniDiffuser objective: an independent level per group).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_config.hpp"
#include "unidiffuser/train/trainer.hpp"
#include "world.hpp"

namespace shapes {

namespace ud = unidiffuser;

//! Network size.
struct ModelSize {
  std::int64_t embed_dim = 128, depth = 7, heads = 4, patch = 4;
  double mlp_ratio = 4.0;
};

//! The two-group layout: "img" (patched image, group 0) and "text" (tokens, group 1), official
//! parameter names, no data-type token.
inline ud::nn::UViTConfig config(const ModelSize& m = {}) {
  using ud::nn::ComponentKind;
  ud::nn::UViTConfig c;
  c.version = "custom";
  c.embed_dim = m.embed_dim;
  c.depth = m.depth;
  c.num_heads = m.heads;
  c.mlp_ratio = m.mlp_ratio;
  c.time_names = {"time_img_embed", "time_text_embed"};
  const ud::nn::UViTComponent img{.name = "img",
                                  .kind = ComponentKind::patched_image,
                                  .group = 0,
                                  .channels = kChannels,
                                  .size = kSide,
                                  .patch = m.patch,
                                  .in_name = "patch_embed.proj",
                                  .out_name = "decoder_pred"};
  const ud::nn::UViTComponent text{.name = "text",
                                   .kind = ComponentKind::tokens,
                                   .group = 1,
                                   .length = kWords,
                                   .dim = kEmbed,
                                   .in_name = "text_embed",
                                   .out_name = "text_out"};
  c.components = {text, img};
  c.validate();
  return c;
}

//! The world as the Trainer's data source: sample `first + r` of the run's seed fills row r
//! (the image of world `version` in the latent code `code`).
inline void fill_batch(std::uint64_t seed, std::int64_t first, std::int64_t rows, float* img,
                       std::int64_t img_ld, float* text, std::int64_t text_ld,
                       const ImageCode& code = {}, int version = kWorldVersion) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const Scene s = sample_scene(seed, static_cast<std::uint64_t>(first + r));
    render(s, std::span<float>(img + r * img_ld, kPixels), version);
    if (!code.identity()) code.encode(std::span<float>(img + r * img_ld, kPixels));
    const auto w = caption_words(s.attr);
    encode_caption(w, std::span<float>(text + r * text_ld, kTextSize));
  }
}

using Trainer = ud::train::Trainer<float, 2>;

inline Trainer::DataSource data_source(ImageCode code = {}, int version = kWorldVersion) {
  return [code, version](std::uint64_t seed, std::int64_t, std::int64_t first,
                         const Trainer::Views& x0, std::span<std::int64_t>) {
    fill_batch(seed, first, x0[0].rows, x0[0].data, x0[0].ld, x0[1].data, x0[1].ld, code, version);
  };
}

//! The demo's initialisation: the library's N(0, 0.02^2) for every parameter (init_random), then
//! the input embeddings (patch and token projections) at std 1 / sqrt(fan_in), so that a token's
//! content starts at unit scale, and the positional table at std `pos_std`. With the positional
//! table at 0.02 next to unit-scale content the network starts out almost blind to where a patch
//! or a caption word sits, and learned positions only slowly (docs/SHAPES.md, "Training").
inline void init_network(ud::nn::UViT<float>& net, std::uint64_t seed, double pos_std = 0.5) {
  net.init_random(seed);
  const ud::Context<ud::cpu> ctx{};
  std::uint64_t stream = 1000;
  auto redraw = [&](const std::string& name, double std) {
    auto v = net.param(name);
    ud::RowBlock<float> b(v.data(), 1, v.size(), v.size());
    ud::ops::random_normal(ctx, b, ud::NoiseKey{seed, stream++}, 0);
    for (std::int64_t i = 0; i < v.size(); ++i) v.data()[i] = static_cast<float>(v.data()[i] * std);
  };
  for (const auto& c : net.config().components) {
    // the embedding weight is [E, fan_in...] for every kind (patched: [E, C, p, p])
    const auto w = net.param(c.in_name + ".weight");
    const double fan_in = static_cast<double>(w.size() / w.shape()[0]);
    redraw(c.in_name + ".weight", 1.0 / std::sqrt(fan_in));
  }
  redraw("pos_embed", pos_std);
  net.parameters_changed();
}

//! Training settings; the defaults are the base recipe (the previous shapes checkpoint's, and
//! shapes3's with its group weights), committed_settings() the shapes demo's (docs/SHAPES.md).
struct TrainSettings {
  std::uint64_t seed = 1;
  std::int64_t steps = 10000, batch = 128, warmup = 300;
  double lr = 3e-3, min_lr = 1e-5, weight_decay = 0.03, clip = 1.0, ema = 0.999, pos_std = 0.5;
  //! "elements": the mean over all elements of both groups (the image has 768, the caption 160);
  //! "group-mean": the mean of the two groups' MSEs (train::group_mean_weights).
  std::string loss = "elements";
  //! Explicit per-group loss weights (TrainerOptions::group_weights; overrides `loss` when set).
  std::vector<double> group_weights{};
  //! Per group, the probability that a sample trains the group's marginalised input (fresh noise
  //! at level N; TrainerOptions::marginal_probability).
  double marginal_p = 0.0;
  //! Min-SNR-gamma level weighting of the loss (TrainerOptions::min_snr_gamma; 0: off).
  double min_snr = 0.0;
  //! The image group's latent code (world.hpp, ImageCode): "pixels", "standardised", "centred" or
  //! "centred-half".
  std::string image_code = "pixels";
  //! The world version to train on (world.hpp; recorded as the checkpoint's "world" metadata).
  int world = kWorldVersion;
  //! The training (and so sampling) schedule, schedule_betas(): "sd" (the official scaled-linear
  //! betas), "sd-rescaled" (those with a quarter of the terminal data trace) or "linear" (DDPM's);
  //! recorded as the checkpoint's "schedule" metadata.
  std::string schedule = "sd";
};

//! The recipe of the committed `shapes.safetensors` (attempt 22, docs/SHAPES.md): the base recipe
//! with the terminal data trace quartered, 16,000 steps, training seed 2.
inline TrainSettings committed_settings() {
  TrainSettings s;
  s.seed = 2;
  s.steps = 16000;
  s.schedule = "sd-rescaled";
  return s;
}

//! The names --schedule accepts.
inline const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> n{"sd", "sd-rescaled", "linear"};
  return n;
}

//! schedule_names() as "sd, sd-rescaled or linear", for messages.
inline std::string schedule_list() {
  const auto& n = schedule_names();
  std::string s;
  for (std::size_t i = 0; i < n.size(); ++i)
    s += (i == 0 ? "" : i + 1 == n.size() ? " or " : ", ") + n[i];
  return s;
}

//! The betas of schedule `name`:
//! - "sd", the official scaled-linear 0.00085 .. 0.012 (terminal sqrt(abar_N) = 0.068);
//! - "sd-rescaled", those rescaled (ud::rescale_terminal) to a quarter of that terminal
//!   sqrt(abar_N), 0.017, level 1 kept (docs/SHAPES.md, attempt 21: the level-N data trace the
//!   N(0, I) start lacks biases the marginals; mid levels move little, sqrt(abar_500) 0.527 ->
//!   0.501);
//! - "linear", DDPM's 1e-4 .. 0.02 (terminal sqrt(abar_N) = 0.0064).
inline std::vector<double> schedule_betas(const std::string& name) {
  if (name == "sd") return ud::scaled_linear_betas();
  if (name == "sd-rescaled") {
    const auto sd = ud::scaled_linear_betas();
    return ud::rescale_terminal(sd, ud::DiscreteSchedule(sd).sqrt_abar(1000) / 4);
  }
  if (name == "linear") return ud::linear_betas();
  throw ud::error("shapes schedule", "schedule",
                  "expected " + schedule_list() + ", got '" + name + "'");
}

//! The Trainer's options of settings `s` for a K-group network.
template <std::size_t K>
typename ud::train::Trainer<float, K>::Options options_for(const TrainSettings& s,
                                                           const ud::nn::UViTConfig& cfg) {
  typename ud::train::Trainer<float, K>::Options o;
  if (s.loss == "group-mean") o.group_weights = ud::train::group_mean_weights(cfg.layout<K>());
  if (!s.group_weights.empty()) o.group_weights = s.group_weights;
  o.marginal_probability.assign(K, s.marginal_p);
  o.min_snr_gamma = s.min_snr;
  if (s.schedule != "sd") o.betas = schedule_betas(s.schedule);
  o.seed = s.seed;
  o.batch = s.batch;
  o.lr.lr = s.lr;
  o.lr.min_lr = s.min_lr;
  o.lr.warmup = s.warmup;
  o.lr.total = s.steps;
  o.lr.decay = ud::train::Decay::cosine;
  o.adamw.weight_decay = s.weight_decay;
  o.clip_norm = s.clip;
  o.ema_decay = s.ema;
  return o;
}
inline Trainer::Options trainer_options(const TrainSettings& s, const ud::nn::UViTConfig& cfg) {
  return options_for<2>(s, cfg);
}

//! Trains the K-group network `cfg` on `data` from scratch (or resumes `state_path`), saving the
//! trainer's state every 500 steps, and writes the EMA weights with the config, the run's
//! settings, the world's name and `extra` as metadata to `path` (atomic writer).
template <std::size_t K>
void train_network(const ud::nn::UViTConfig& cfg,
                   typename ud::train::Trainer<float, K>::DataSource data, const TrainSettings& ts,
                   const std::string& path, const std::string& state_path, bool resume, bool quiet,
                   const std::string& world, std::map<std::string, std::string> extra = {}) {
  ud::nn::UViT<float> net(cfg);
  init_network(net, ts.seed, ts.pos_std);
  ud::train::Trainer<float, K> tr(net, options_for<K>(ts, net.config()), std::move(data));
  if (resume) tr.load(state_path);
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t first = tr.step_index();
  if (!quiet)
    std::fprintf(stderr, "training %lld steps of batch %lld (%.2f M parameters)\n",
                 static_cast<long long>(ts.steps), static_cast<long long>(ts.batch),
                 static_cast<double>(net.parameters().size()) / 1e6);
  const ud::Context<ud::cpu> ctx{};
  const auto last = tr.run(ctx, ts.steps, 100, state_path, 500, quiet);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // the EMA weights become the network's parameters
  const auto ema = tr.ema().weights();
  std::copy_n(ema.data(), ema.size(), net.parameters().data());
  net.parameters_changed();
  nlohmann::json info = {{"seed", ts.seed},         {"steps", ts.steps},
                         {"batch", ts.batch},       {"lr", ts.lr},
                         {"min_lr", ts.min_lr},     {"warmup", ts.warmup},
                         {"ema", ts.ema},           {"weight_decay", ts.weight_decay},
                         {"clip", ts.clip},         {"pos_std", ts.pos_std},
                         {"loss", ts.loss},         {"marginal_p", ts.marginal_p},
                         {"min_snr", ts.min_snr},   {"group_weights", ts.group_weights},
                         {"schedule", ts.schedule}, {"final_loss", last.loss},
                         {"seconds", secs},         {"resumed_at", first}};
  extra["training"] = info.dump();
  extra["world"] = world;
  extra["schedule"] = ts.schedule;
  ud::save_checkpoint(net, path, extra);
  if (!quiet)
    std::fprintf(stderr, "trained in %.0f s (final loss %.4f); wrote %s\n", secs, last.loss,
                 path.c_str());
}

//! The demo's training: the two-group network of size `ms` on version `ts.world` of the shapes
//! world (recorded as the checkpoint's "world" metadata), the image in the code `ts.image_code`
//! (recorded as the checkpoint's "image_code" metadata; absent means pixels).
inline void train(const ModelSize& ms, const TrainSettings& ts, const std::string& path,
                  const std::string& state_path, bool resume, bool quiet) {
  if (ts.world < 1 || ts.world > kWorldVersions)
    throw ud::error("shapes training", "world",
                    "expected a version 1.." + std::to_string(kWorldVersions) + ", got " +
                        std::to_string(ts.world));
  train_network<2>(config(ms), data_source(image_code(ts.image_code, ts.world), ts.world), ts, path,
                   state_path, resume, quiet, world_name(ts.world),
                   {{"image_code", ts.image_code}});
}

//! The world version a checkpoint was trained on: its "world" metadata, `shapes-16x16-v<N>` for a
//! version this code draws; absent (a trainer state file) means the current version.
inline int checkpoint_world_version(const ud::safetensors::File& f) {
  const std::string name = f.metadata("world", world_name());
  for (int v = 1; v <= kWorldVersions; ++v)
    if (name == world_name(v)) return v;
  throw ud::error(
      "shapes checkpoint", "metadata world",
      "expected " + world_name(1) + " .. " + world_name(kWorldVersions) + ", got '" + name + "'");
}

//! The schedule a checkpoint was trained with (its "schedule" metadata; sd when absent, as in
//! files written before the option existed).
inline std::string checkpoint_schedule(const ud::safetensors::File& f) {
  const std::string name = f.metadata("schedule", "sd");
  const auto& names = schedule_names();
  if (std::find(names.begin(), names.end(), name) == names.end())
    throw ud::error("shapes checkpoint", "metadata schedule",
                    "expected " + schedule_list() + ", got '" + name + "'");
  return name;
}

//! The image code a checkpoint was trained with (its "image_code" metadata; pixels when absent,
//! as in files written before the code existed).
inline ImageCode checkpoint_image_code(const ud::safetensors::File& f) {
  const int version = checkpoint_world_version(f);
  const std::string name = f.metadata("image_code", "pixels");
  const auto& names = image_code_names();
  if (std::find(names.begin(), names.end(), name) == names.end())
    throw ud::error("shapes checkpoint", "metadata image_code",
                    "expected pixels, standardised, centred or centred-half, got '" + name + "'");
  return image_code(name, version);
}

}  // namespace shapes
