// SPDX-License-Identifier: Apache-2.0
// The shapes demo (examples/shapes): the world generator and its attribute readers, a short
// training run on it, a trained checkpoint reloading from its own metadata; and the general JSON
// form of U-ViT configs with the configuration checks it relies on.
#include <doctest/doctest.h>

#include <unistd.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eval.hpp"
#include "model.hpp"
#include "three.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/schedule/discrete.hpp"
#include "wave.hpp"
#include "world.hpp"

namespace ud = unidiffuser;

TEST_CASE("shapes: the readers recover the attributes of every scene and caption") {
  int scenes = 0;
  for (int version = 1; version <= shapes::kWorldVersions; ++version)
    for (int size = 0; size < 2; ++size)
      for (int colour = 0; colour < 4; ++colour)
        for (int shape = 0; shape < 3; ++shape)
          for (int pos = 0; pos < 4; ++pos) {
            const int d = shapes::kBox[static_cast<std::size_t>(size)], room = 8 - d + 1;
            for (int dy = 0; dy < room; ++dy)
              for (int dx = 0; dx < room; ++dx) {
                shapes::Scene s;
                s.attr.v = {size, colour, shape, pos};
                s.x0 = (pos % 2) * 8 + dx;
                s.y0 = (pos / 2) * 8 + dy;
                std::vector<float> img(shapes::kPixels);
                shapes::render(s, img, version);
                const auto got = shapes::read_image(img);
                CAPTURE(version);
                CAPTURE(shapes::describe(s.attr));
                CAPTURE(dx);
                CAPTURE(dy);
                CHECK(got == s.attr);
                ++scenes;
              }
            shapes::Attributes a;
            a.v = {size, colour, shape, pos};
            std::vector<float> text(shapes::kTextSize);
            shapes::encode_caption(shapes::caption_words(a), text);
            CHECK(shapes::read_caption(text) == a);
            // a token perturbed by a little noise still decodes to its word
            for (float& x : text) x += 0.1f * std::sin(7.f * x);
            CHECK(shapes::read_caption(text) == a);
          }
  CHECK(scenes == shapes::kWorldVersions * 96 / 2 * (16 + 4));
}

TEST_CASE("shapes: world v2 cuts a small circle's corners by three pixels, v1 by one") {
  // The pixel counts of each shape's box in both versions: v2 changes the small circle only.
  auto count = [](int shape, int d, int version) {
    int n = 0;
    for (int v = 0; v < d; ++v)
      for (int u = 0; u < d; ++u) n += shapes::inside(shape, d, u, v, version) ? 1 : 0;
    return n;
  };
  CHECK(count(0, 5, 1) == 21);  // rows 3 5 5 5 3
  CHECK(count(0, 5, 2) == 13);  // rows 1 3 5 3 1
  CHECK(count(0, 7, 1) == 37);  // rows 3 5 7 7 7 5 3
  CHECK(count(0, 7, 2) == 37);
  for (int version = 1; version <= 2; ++version) {
    CHECK(count(1, 5, version) == 25);
    CHECK(count(2, 5, version) == 13);
    CHECK(count(1, 7, version) == 49);
  }
  CHECK(shapes::world_name() == "shapes-16x16-v" + std::to_string(shapes::kWorldVersion));
  CHECK(shapes::world_name(1) == "shapes-16x16-v1");
}

TEST_CASE("shapes: the sampled world follows its frequencies and stays inside its quadrant") {
  std::map<int, int> counts[shapes::kAttributes];
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const auto s = shapes::sample_scene(5, static_cast<std::uint64_t>(i));
    for (int k = 0; k < shapes::kAttributes; ++k) ++counts[k][s.attr[k]];
    const int d = shapes::kBox[static_cast<std::size_t>(s.attr[shapes::size_attr])];
    const int q = s.attr[shapes::position_attr];
    CHECK(s.x0 >= (q % 2) * 8);
    CHECK(s.x0 + d <= (q % 2) * 8 + 8);
    CHECK(s.y0 >= (q / 2) * 8);
    CHECK(s.y0 + d <= (q / 2) * 8 + 8);
  }
  for (int k = 0; k < shapes::kAttributes; ++k) {
    const auto& p = shapes::frequencies()[static_cast<std::size_t>(k)];
    for (std::size_t v = 0; v < p.size(); ++v)
      CHECK(std::abs(counts[k][static_cast<int>(v)] / double(n) - p[v]) < 0.015);
  }
  // a pure function of (seed, index)
  const auto a = shapes::sample_scene(9, 1234), b = shapes::sample_scene(9, 1234);
  CHECK(a.attr == b.attr);
  CHECK(a.x0 == b.x0);
}

TEST_CASE("shapes: the readers refuse what they cannot read") {
  std::vector<float> img(shapes::kPixels, -1.f);
  CHECK_FALSE(shapes::read_image(img).readable());  // blank
  // a 3 x 3 blob has no readable size
  for (int y = 2; y < 5; ++y)
    for (int x = 2; x < 5; ++x) img[static_cast<std::size_t>(y * 16 + x)] = 1.f;
  CHECK(shapes::read_image(img)[shapes::size_attr] == -1);
  // a caption with a colour word in the shape slot
  const std::vector<int> words{1, 2, 3, 9, 11};
  const auto a = shapes::read_caption_words(words);
  CHECK(a[shapes::size_attr] == 1);
  CHECK(a[shapes::colour_attr] == 0);
  CHECK(a[shapes::shape_attr] == -1);
  CHECK(a[shapes::position_attr] == 0);
  CHECK(shapes::caption_text(shapes::caption_words(a)).size() > 0);
}

TEST_CASE("shapes: the wave reader recovers every signal and refuses noise") {
  std::vector<float> s(shapes::kWave);
  int read = 0, total = 0;
  for (int z = 0; z < 2; ++z)
    for (int c = 0; c < 4; ++c)
      for (int h = 0; h < 3; ++h)
        for (int p = 0; p < 4; ++p)
          for (double u : {-1.0, 0.0, 1.0}) {
            shapes::Attributes a;
            a.v = {z, c, h, p};
            shapes::render_wave(a, u, s);
            for (float v : s) CHECK(std::abs(v) <= 1.0f);
            ++total;
            read += shapes::read_wave(s) == a;
            // deterministic small perturbation (std 0.03): still read
            for (int n = 0; n < shapes::kWave; ++n) {
              const auto b = ud::philox_normal(77, static_cast<std::uint64_t>(total), 0,
                                               static_cast<std::uint64_t>(n));
              s[static_cast<std::size_t>(n)] += 0.03f * b;
            }
            read += shapes::read_wave(s) == a;
          }
  CHECK(read == 2 * total);
  // the world's samples: the reader returns the scene's attributes
  for (std::uint64_t i = 0; i < 500; ++i) {
    const auto sc = shapes::sample_scene(3, i);
    const double u = shapes::wave_jitter(3, i);
    CHECK(u >= -1.0);
    CHECK(u <= 1.0);
    shapes::render_wave(sc.attr, u, s);
    CHECK(shapes::read_wave(s) == sc.attr);
  }
  // silence, white noise and a signal at the wrong level are unreadable
  std::fill(s.begin(), s.end(), 0.f);
  CHECK_FALSE(shapes::read_wave(s).readable());
  int noise_read = 0;
  for (std::uint64_t k = 0; k < 50; ++k) {
    for (int n = 0; n < shapes::kWave; ++n)
      s[static_cast<std::size_t>(n)] =
          0.5f * ud::philox_normal(78, k, 0, static_cast<std::uint64_t>(n));
    noise_read += shapes::read_wave(s).readable();
  }
  CHECK(noise_read == 0);
  shapes::Attributes a;
  a.v = {1, 2, 0, 1};
  shapes::render_wave(a, 0, s);
  for (auto& v : s) v *= 2.f;  // gain 1.8: no size
  CHECK_FALSE(shapes::read_wave(s).readable());
}

TEST_CASE("shapes: the standardised image code centres and scales the world, and inverts") {
  const auto px = shapes::image_code("pixels");
  const auto sd = shapes::image_code("standardised");
  CHECK(px.identity());
  CHECK_FALSE(sd.identity());
  // measured on seed 0; on another seed's samples every channel is near mean 0, std 1
  constexpr int n = 4096, N = shapes::kSide * shapes::kSide;
  std::vector<float> img(static_cast<std::size_t>(n) * shapes::kPixels), raw(img.size()),
      text(static_cast<std::size_t>(n) * shapes::kTextSize);
  shapes::fill_batch(5, 0, n, img.data(), shapes::kPixels, text.data(), shapes::kTextSize, sd);
  shapes::fill_batch(5, 0, n, raw.data(), shapes::kPixels, text.data(), shapes::kTextSize, px);
  for (int c = 0; c < shapes::kChannels; ++c) {
    CAPTURE(c);
    double s = 0, q = 0;
    for (int r = 0; r < n; ++r)
      for (int p = 0; p < N; ++p) {
        const double x = img[static_cast<std::size_t>(r * shapes::kPixels + c * N + p)];
        s += x, q += x * x;
      }
    const double m = s / (double(n) * N), sdev = std::sqrt(q / (double(n) * N) - m * m);
    CHECK(std::abs(m) < 0.02);
    CHECK(std::abs(sdev - 1) < 0.03);
    CHECK(sd.shift[static_cast<std::size_t>(c)] < -0.85f);  // mostly black background
  }
  // decode inverts encode to float rounding; the pixel code changes nothing
  std::vector<float> back(img.begin(), img.begin() + shapes::kPixels);
  sd.decode(back);
  double worst = 0;
  for (int i = 0; i < shapes::kPixels; ++i)
    worst = std::max(worst, std::abs(double(back[static_cast<std::size_t>(i)]) -
                                     raw[static_cast<std::size_t>(i)]));
  CHECK(worst < 1e-6);
  std::vector<float> same(raw.begin(), raw.begin() + shapes::kPixels);
  px.encode(same);
  CHECK(std::equal(same.begin(), same.end(), raw.begin()));
}

TEST_CASE("shapes: the centred image code only shifts: mean 0, the pixels' spread, inverts") {
  const auto sd = shapes::image_code("standardised");
  const auto ce = shapes::image_code("centred");
  CHECK_FALSE(ce.identity());
  constexpr int n = 4096, N = shapes::kSide * shapes::kSide;
  std::vector<float> img(static_cast<std::size_t>(n) * shapes::kPixels), raw(img.size()),
      text(static_cast<std::size_t>(n) * shapes::kTextSize);
  shapes::fill_batch(5, 0, n, img.data(), shapes::kPixels, text.data(), shapes::kTextSize, ce);
  shapes::fill_batch(5, 0, n, raw.data(), shapes::kPixels, text.data(), shapes::kTextSize);
  for (int c = 0; c < shapes::kChannels; ++c) {
    CAPTURE(c);
    const auto cu = static_cast<std::size_t>(c);
    CHECK(ce.scale[cu] == 1.f);
    CHECK(ce.shift[cu] == sd.shift[cu]);  // the same world statistics
    double s = 0, q = 0, off = 0;         // off: the largest departure from a pure shift
    for (int r = 0; r < n; ++r)
      for (int p = 0; p < N; ++p) {
        const auto i = static_cast<std::size_t>(r * shapes::kPixels + c * N + p);
        off = std::max(off, double(std::abs(img[i] - (raw[i] - ce.shift[cu]))));
        s += img[i], q += double(img[i]) * img[i];
      }
    CHECK(off < 1e-6);
    const double m = s / (double(n) * N), sdev = std::sqrt(q / (double(n) * N) - m * m);
    CHECK(std::abs(m) < 0.02);
    CHECK(std::abs(sdev - sd.scale[cu]) < 0.02);  // the spread of the pixels, not 1
  }
  std::vector<float> back(img.begin(), img.begin() + shapes::kPixels);
  ce.decode(back);
  double worst = 0;
  for (int i = 0; i < shapes::kPixels; ++i)
    worst = std::max(worst, std::abs(double(back[static_cast<std::size_t>(i)]) -
                                     raw[static_cast<std::size_t>(i)]));
  CHECK(worst < 1e-6);
}

TEST_CASE("shapes: the centred-half image code is the centred code halved, and inverts") {
  const auto ce = shapes::image_code("centred");
  const auto ch = shapes::image_code("centred-half");
  CHECK(ch.name == "centred-half");
  CHECK_FALSE(ch.identity());
  constexpr int n = 64;
  std::vector<float> a(static_cast<std::size_t>(n) * shapes::kPixels), b(a.size()), raw(a.size()),
      text(static_cast<std::size_t>(n) * shapes::kTextSize);
  shapes::fill_batch(9, 0, n, a.data(), shapes::kPixels, text.data(), shapes::kTextSize, ch);
  shapes::fill_batch(9, 0, n, b.data(), shapes::kPixels, text.data(), shapes::kTextSize, ce);
  shapes::fill_batch(9, 0, n, raw.data(), shapes::kPixels, text.data(), shapes::kTextSize);
  for (std::size_t c = 0; c < shapes::kChannels; ++c) {
    CHECK(ch.shift[c] == ce.shift[c]);
    CHECK(ch.scale[c] == 2.f);
  }
  double off = 0, worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    off = std::max(off, double(std::abs(a[i] - 0.5f * b[i])));
  CHECK(off < 1e-6);
  for (int r = 0; r < n; ++r) {
    std::vector<float> back(a.begin() + r * shapes::kPixels, a.begin() + (r + 1) * shapes::kPixels);
    ch.decode(back);
    for (int i = 0; i < shapes::kPixels; ++i)
      worst = std::max(worst, std::abs(double(back[static_cast<std::size_t>(i)]) -
                                       raw[static_cast<std::size_t>(r * shapes::kPixels + i)]));
  }
  CHECK(worst < 1e-6);
}

TEST_CASE("shapes: a short training run lowers the loss") {
  shapes::ModelSize ms;
  ms.embed_dim = 32;
  ms.depth = 3;
  ms.heads = 2;
  ud::nn::UViT<float> net(shapes::config(ms));
  shapes::init_network(net, 3);
  shapes::TrainSettings ts;
  ts.steps = 150;
  ts.batch = 16;
  ts.warmup = 10;
  ts.lr = 3e-3;
  shapes::Trainer tr(net, shapes::trainer_options(ts, net.config()), shapes::data_source());
  double first = 0, last = 0;
  for (int s = 0; s < ts.steps; ++s) {
    const auto log = tr.step(ud::Context<ud::cpu>{});
    REQUIRE(std::isfinite(log.loss));
    if (s < 10) first += log.loss / 10;
    if (s >= ts.steps - 10) last += log.loss / 10;
  }
  CAPTURE(first);
  CAPTURE(last);
  CHECK(last < 0.6 * first);
}

TEST_CASE("shapes: a trained checkpoint reloads from the config it records") {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("unidiffuser-shapes-test-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  shapes::ModelSize ms;
  ms.embed_dim = 16;
  ms.depth = 1;
  ms.heads = 2;
  shapes::TrainSettings ts;
  ts.steps = 2;
  ts.batch = 4;
  ts.warmup = 1;
  ts.image_code = "standardised";  // not the default: the metadata must say so
  ts.schedule = "linear";
  const std::string path = (dir / "net.safetensors").string();
  shapes::train(ms, ts, path, (dir / "state.safetensors").string(), false, true);
  const auto f = ud::safetensors::File::read(path);
  const auto cfg = ud::checkpoint_config(f);
  CHECK(cfg.version == "custom");
  CHECK(cfg.custom_json() == shapes::config(ms).custom_json());
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f);
  CHECK(f.metadata("training").size() > 0);
  // the image code travels with the checkpoint; files without it are in pixels
  CHECK(f.metadata("image_code") == "standardised");
  CHECK(shapes::checkpoint_image_code(f).name == "standardised");
  // and so does the schedule; files without it use the official one
  CHECK(f.metadata("schedule") == "linear");
  CHECK(shapes::checkpoint_schedule(f) == "linear");
  CHECK(shapes::schedule_betas("linear") == ud::linear_betas());
  CHECK(shapes::schedule_betas("sd") == ud::scaled_linear_betas());
  {
    // sd-rescaled: the official betas with a quarter of the level-N sqrt(abar), level 1 kept
    const ud::DiscreteSchedule sd(ud::scaled_linear_betas()),
        r(shapes::schedule_betas("sd-rescaled"));
    CHECK(r.sqrt_abar(1000) == doctest::Approx(sd.sqrt_abar(1000) / 4).epsilon(1e-12));
    CHECK(r.abar(1) == sd.abar(1));
  }
  CHECK_THROWS_WITH_AS(shapes::schedule_betas("cosine"),
                       doctest::Contains("expected sd, sd-rescaled or linear, got 'cosine'"),
                       ud::error);
  {
    ud::Tensor<float> one(ud::Shape{1});
    ud::safetensors::Writer w;
    w.add<float>("x", one);
    w.write((dir / "plain.safetensors").string());
    CHECK(shapes::checkpoint_image_code(
              ud::safetensors::File::read((dir / "plain.safetensors").string()))
              .identity());
    CHECK(shapes::checkpoint_schedule(
              ud::safetensors::File::read((dir / "plain.safetensors").string())) == "sd");
    w.metadata("image_code", "jpeg");
    w.metadata("schedule", "cosine");
    w.write((dir / "bad.safetensors").string());
    const auto bad = ud::safetensors::File::read((dir / "bad.safetensors").string());
    CHECK_THROWS_WITH_AS(
        shapes::checkpoint_image_code(bad),
        doctest::Contains("expected pixels, standardised, centred or centred-half, got 'jpeg'"),
        ud::error);
    CHECK_THROWS_WITH_AS(shapes::checkpoint_schedule(bad),
                         doctest::Contains("expected sd, sd-rescaled or linear, got 'cosine'"),
                         ud::error);
    // the world version too: the current one when absent, named ones as named, others refused
    CHECK(shapes::checkpoint_world_version(ud::safetensors::File::read(
              (dir / "plain.safetensors").string())) == shapes::kWorldVersion);
    ud::safetensors::Writer v;
    v.add<float>("x", one);
    v.metadata("world", "shapes-16x16-v2");
    v.write((dir / "v2.safetensors").string());
    CHECK(shapes::checkpoint_world_version(
              ud::safetensors::File::read((dir / "v2.safetensors").string())) == 2);
    v.metadata("world", "shapes-16x16-wave64-v1");
    v.write((dir / "v3.safetensors").string());
    CHECK_THROWS_WITH_AS(shapes::checkpoint_world_version(
                             ud::safetensors::File::read((dir / "v3.safetensors").string())),
                         doctest::Contains("got 'shapes-16x16-wave64-v1'"), ud::error);
  }
  CHECK(f.metadata("world") == shapes::world_name());
  CHECK(shapes::checkpoint_world_version(f) == shapes::kWorldVersion);
  // the trainer's state resumes to the same step
  shapes::Trainer tr(net, shapes::trainer_options(ts, net.config()), shapes::data_source());
  tr.load((dir / "state.safetensors").string());
  CHECK(tr.step_index() == 2);
  // one denoising call on a noised world sample: finite output of the layout's size
  ud::nn::UViTPredictor<float, 2> model(net, 0);
  std::vector<float> img(shapes::kPixels), text(shapes::kTextSize), oi(shapes::kPixels),
      ot(shapes::kTextSize);
  shapes::fill_batch(1, 0, 1, img.data(), shapes::kPixels, text.data(), shapes::kTextSize);
  const std::vector<double> t{500.0};
  model(ud::Context<ud::cpu>{},
        {ud::TensorView<const float>(img.data(), ud::Shape{1, shapes::kPixels}),
         ud::TensorView<const float>(text.data(), ud::Shape{1, shapes::kTextSize})},
        {std::span<const double>(t), std::span<const double>(t)},
        {ud::TensorView<float>(oi.data(), ud::Shape{1, shapes::kPixels}),
         ud::TensorView<float>(ot.data(), ud::Shape{1, shapes::kTextSize})});
  for (float x : oi) REQUIRE(std::isfinite(x));
  for (float x : ot) REQUIRE(std::isfinite(x));
  fs::remove_all(dir);
}

TEST_CASE("shapes3: three modalities of one scene read alike; the layout and a short run") {
  // every group of the three-modality world carries the scene's attributes
  std::vector<float> img(shapes::kPixels), text(shapes::kTextSize), wave(shapes::kWave);
  for (std::uint64_t i = 0; i < 512; ++i) {
    const auto a = shapes::render3(9, i, img.data(), text.data(), wave.data());
    CAPTURE(i);
    REQUIRE(shapes::read_image(img) == a);
    REQUIRE(shapes::read_caption(text) == a);
    REQUIRE(shapes::read_wave(wave) == a);
  }
  // the layout: the sound is the program's registered "frames" kind, 8 tokens of 8 samples
  shapes::ModelSize ms;
  ms.embed_dim = 32;
  ms.depth = 3;
  ms.heads = 2;
  const auto cfg = shapes::config3(ms);
  REQUIRE(cfg.groups() == 3);
  const auto& w = cfg.components.back();
  CHECK(w.kind == ud::nn::ComponentKind::custom);
  CHECK(w.custom_kind == "frames");
  CHECK(w.tokens() == shapes::kWave / shapes::kWaveFrame);
  CHECK(cfg.layout<3>().size(shapes::kWaveGroup) == shapes::kWave);
  CHECK(cfg.tokens() == 3 + 16 + 5 + 8);
  // the tasks of the evaluation: six pairs, three two-to-one, three one-to-two
  std::set<std::string> names;
  for (const auto& t : shapes::conditional_tasks()) names.insert(t.name());
  CHECK(names == std::set<std::string>{"i->t", "i->w", "t->i", "t->w", "w->i", "w->t", "tw->i",
                                       "iw->t", "it->w", "i->tw", "t->iw", "w->it"});
  // a short run lowers the loss of all three groups
  ud::nn::UViT<float> net(cfg);
  shapes::init_network(net, 3);
  shapes::TrainSettings ts;
  ts.steps = 150;
  ts.batch = 16;
  ts.warmup = 10;
  shapes::Trainer3 tr(net, shapes::options_for<3>(ts, cfg), shapes::data_source3());
  std::array<double, 3> first{}, last{};
  for (int s = 0; s < ts.steps; ++s) {
    const auto log = tr.step(ud::Context<ud::cpu>{});
    REQUIRE(std::isfinite(log.loss));
    for (std::size_t g = 0; g < 3; ++g) {
      if (s < 10) first[g] += log.group_mse[g] / 10;
      if (s >= ts.steps - 10) last[g] += log.group_mse[g] / 10;
    }
  }
  for (std::size_t g = 0; g < 3; ++g) {
    CAPTURE(g);
    CAPTURE(first[g]);
    CAPTURE(last[g]);
    CHECK(last[g] < 0.7 * first[g]);
  }
}

TEST_CASE("U-ViT config: the general JSON form round-trips; official presets keep theirs") {
  const auto c = shapes::config();
  const auto j = c.to_json();
  CHECK(j.at("version") == "custom");
  const auto back = ud::nn::UViTConfig::from_json(nlohmann::json::parse(j.dump()));
  CHECK(back.custom_json() == c.custom_json());
  CHECK(back.parameters() == c.parameters());
  const auto v1 = ud::nn::UViTConfig::official("v1", 8, 4, 2, 32, 3, 2);
  CHECK(v1.to_json().at("version") == "v1");
  CHECK(v1.to_json().contains("img_size"));
  // official component names in a layout that is not the official one: the general form
  auto k3 = v1;
  k3.time_names.push_back("time_audio_embed");
  ud::nn::UViTComponent audio;
  audio.name = "audio";
  audio.group = 2;
  audio.length = 3;
  audio.dim = 4;
  audio.in_name = "audio_embed";
  audio.out_name = "audio_out";
  k3.components.push_back(audio);
  k3.validate();
  CHECK(k3.to_json().at("version") == "custom");
  const auto k3b = ud::nn::UViTConfig::from_json(k3.to_json());
  CHECK(k3b.groups() == 3);
  CHECK(k3b.parameters() == k3.parameters());
}

TEST_CASE("U-ViT config: misconfigurations are errors naming the field") {
  auto expect = [](ud::nn::UViTConfig c, const std::string& needle) {
    try {
      c.validate();
      FAIL("accepted: " << needle);
    } catch (const ud::error& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  auto c = shapes::config();
  auto e1 = c;
  e1.components[0].in_name.clear();
  expect(e1, "in_name and out_name");
  auto e2 = c;
  e2.components[1].out_name = e2.components[0].out_name;
  expect(e2, "parameter prefix used twice");
  auto e3 = c;
  e3.components[1].name = e3.components[0].name;
  expect(e3, "two components share this name");
  auto e4 = c;
  e4.components[1].slot = 1;
  expect(e4, "slots");
  auto e5 = c;
  e5.time_names[1] = "text_embed";
  expect(e5, "parameter prefix used twice");
  // malformed general JSON
  auto j = c.custom_json();
  j["components"][0]["kind"] = "audio";
  CHECK_THROWS_WITH_AS(ud::nn::UViTConfig::from_json(j), doctest::Contains("kind"), ud::error);
  j = c.custom_json();
  j["embed_dim"] = -4;
  CHECK_THROWS_WITH_AS(ud::nn::UViTConfig::from_json(j), doctest::Contains("embed_dim"), ud::error);
  j = c.custom_json();
  j.erase("time_names");
  CHECK_THROWS_WITH_AS(ud::nn::UViTConfig::from_json(j), doctest::Contains("time_names"),
                       ud::error);
}

namespace {
// A committed example checkpoint: it loads from the config it records (equal to `expected`),
// names its world and records its training settings.
std::unique_ptr<ud::nn::UViT<float>> load_committed(const char* path,
                                                    const ud::nn::UViTConfig& expected,
                                                    const std::string& world) {
  const auto f = ud::safetensors::File::read(path);
  const auto cfg = ud::checkpoint_config(f);
  CHECK(cfg.version == "custom");
  CHECK(cfg.custom_json() == expected.custom_json());
  CHECK(f.metadata("world") == world);
  const auto info = nlohmann::json::parse(f.metadata("training"));
  CHECK(info.at("steps").get<std::int64_t>() > 0);
  auto net = std::make_unique<ud::nn::UViT<float>>(cfg);
  ud::load_checkpoint(*net, f);
  return net;
}
}  // namespace

TEST_CASE("shapes: the committed checkpoint loads from its own config and denoises the world") {
  // README command one evaluates this file; its config and training settings travel with it.
  const auto owner =
      load_committed(UNIDIFFUSER_SHAPES_CHECKPOINT, shapes::config(), "shapes-16x16-v1");
  auto& net = *owner;
  // One network call per group on 64 world samples, the other group clean: the predicted noise
  // explains most of the noise's variance (an untrained network explains none of it).
  // Noised with the schedule the network was trained on (its "schedule" metadata).
  const auto sched = ud::DiscreteSchedule(shapes::schedule_betas(
      shapes::checkpoint_schedule(ud::safetensors::File::read(UNIDIFFUSER_SHAPES_CHECKPOINT))));
  constexpr int B = 64, level = 500;
  std::vector<float> img(B * shapes::kPixels), text(B * shapes::kTextSize);
  shapes::fill_batch(7, 0, B, img.data(), shapes::kPixels, text.data(), shapes::kTextSize);
  ud::nn::UViTPredictor<float, 2> model(net, 0);
  for (int g = 0; g < 2; ++g) {
    CAPTURE(g);
    auto& x = g == 0 ? img : text;
    std::vector<float> eps(x.size()), xn(x), oi(img.size()), ot(text.size());
    ud::ops::random_normal(ud::Context<ud::cpu>{},
                           ud::RowBlock<float>(eps.data(), 1, static_cast<std::int64_t>(eps.size()),
                                               static_cast<std::int64_t>(eps.size())),
                           ud::NoiseKey{11, static_cast<std::uint64_t>(g)}, 0);
    for (std::size_t i = 0; i < x.size(); ++i)
      xn[i] = static_cast<float>(sched.sqrt_abar(level) * x[i] +
                                 sched.sqrt_one_minus_abar(level) * eps[i]);
    const std::vector<double> tn(B, double(level)), t0(B, 0.0);
    const auto& xi = g == 0 ? xn : img;
    const auto& xt = g == 1 ? xn : text;
    model(ud::Context<ud::cpu>{},
          {ud::TensorView<const float>(xi.data(), ud::Shape{B, shapes::kPixels}),
           ud::TensorView<const float>(xt.data(), ud::Shape{B, shapes::kTextSize})},
          {std::span<const double>(g == 0 ? tn : t0), std::span<const double>(g == 1 ? tn : t0)},
          {ud::TensorView<float>(oi.data(), ud::Shape{B, shapes::kPixels}),
           ud::TensorView<float>(ot.data(), ud::Shape{B, shapes::kTextSize})});
    const auto& pred = g == 0 ? oi : ot;
    double err = 0, var = 0;
    for (std::size_t i = 0; i < eps.size(); ++i) {
      err += (pred[i] - eps[i]) * (pred[i] - eps[i]);
      var += eps[i] * eps[i];
    }
    CAPTURE(err / var);
    CHECK(err / var < 0.02);  // trained: about 0.002 (image) and 0.0003 (caption)
  }
}

TEST_CASE("shapes: --retrain's defaults are the recipe the committed checkpoint records") {
  // --retrain (committed_settings()) must make the committed file again (docs/SHAPES.md: bit for
  // bit on this machine kind), so the recipe in the file's metadata and the defaults agree.
  const auto f = ud::safetensors::File::read(UNIDIFFUSER_SHAPES_CHECKPOINT);
  const auto rec = nlohmann::json::parse(f.metadata("training", "{}"));
  const shapes::TrainSettings s = shapes::committed_settings();
  CHECK(rec.at("seed").get<std::uint64_t>() == s.seed);
  CHECK(rec.at("steps").get<std::int64_t>() == s.steps);
  CHECK(rec.at("batch").get<std::int64_t>() == s.batch);
  CHECK(rec.at("warmup").get<std::int64_t>() == s.warmup);
  CHECK(rec.at("lr").get<double>() == s.lr);
  CHECK(rec.at("min_lr").get<double>() == s.min_lr);
  CHECK(rec.at("weight_decay").get<double>() == s.weight_decay);
  CHECK(rec.at("clip").get<double>() == s.clip);
  CHECK(rec.at("ema").get<double>() == s.ema);
  CHECK(rec.at("pos_std").get<double>() == s.pos_std);
  CHECK(rec.at("loss").get<std::string>() == s.loss);
  CHECK(rec.at("group_weights").get<std::vector<double>>() == s.group_weights);
  CHECK(rec.at("marginal_p").get<double>() == s.marginal_p);
  CHECK(rec.at("min_snr").get<double>() == s.min_snr);
  CHECK(rec.at("schedule").get<std::string>() == s.schedule);
  CHECK(rec.at("resumed_at").get<std::int64_t>() == 0);  // one uninterrupted run
  CHECK(shapes::checkpoint_schedule(f) == s.schedule);
  CHECK(f.metadata("world", "") == shapes::world_name(s.world));
  CHECK(f.metadata("image_code", "pixels") == s.image_code);
}

TEST_CASE("shapes: --marginal-steps sets the steps of the modes i and t only") {
  const auto owner =
      load_committed(UNIDIFFUSER_SHAPES_CHECKPOINT, shapes::config(), "shapes-16x16-v1");
  ud::nn::UViTPredictor<float, 2> model(*owner, 0);
  shapes::EvalSettings plain, split;
  plain.quiet = split.quiet = true;
  plain.steps = 2;
  split.steps = 3;
  split.marginal_steps = 2;
  const auto same = [](const shapes::ModeSamples& x, const shapes::ModeSamples& y) {
    return x.img == y.img && x.text == y.text;
  };
  // A marginal mode at marginal_steps is the plain run at that many steps, bit for bit; a
  // conditional mode keeps `steps`, so it differs from the 2-step run.
  for (const char* mode : {"i", "t"}) {
    CAPTURE(mode);
    CHECK(same(shapes::sample(model, mode, 0.0, 4, split, 0),
               shapes::sample(model, mode, 0.0, 4, plain, 0)));
  }
  CHECK_FALSE(same(shapes::sample(model, "t2i", 0.0, 4, split, 0),
                   shapes::sample(model, "t2i", 0.0, 4, plain, 0)));
  plain.steps = 3;
  CHECK(same(shapes::sample(model, "t2i", 0.0, 4, split, 0),
             shapes::sample(model, "t2i", 0.0, 4, plain, 0)));
}

TEST_CASE("shapes3: the committed checkpoint loads from its own config and denoises every group") {
  // unidiffuser-shapes3 evaluates this file by default; the sound's kind must be registered first.
  shapes::register_kinds();
  const auto owner =
      load_committed(UNIDIFFUSER_SHAPES3_CHECKPOINT, shapes::config3(), shapes::kWorld3);
  auto& net = *owner;
  REQUIRE(net.config().groups() == 3);
  // One network call per group on 64 world samples, the other groups clean: the predicted noise
  // explains most of the noise's variance (an untrained network explains none of it).
  const auto sched = ud::DiscreteSchedule::stable_diffusion();
  constexpr int B = 64, level = 500;
  std::array<std::vector<float>, 3> x0;
  for (std::size_t g = 0; g < 3; ++g) x0[g].resize(B * shapes::kGroupSize[g]);
  for (int r = 0; r < B; ++r)
    shapes::render3(7, static_cast<std::uint64_t>(r), x0[0].data() + r * shapes::kPixels,
                    x0[1].data() + r * shapes::kTextSize, x0[2].data() + r * shapes::kWave);
  ud::nn::UViTPredictor<float, 3> model(net, 0);
  const std::vector<double> tn(B, double(level)), t0(B, 0.0);
  for (std::size_t g = 0; g < 3; ++g) {
    CAPTURE(g);
    std::vector<float> eps(x0[g].size());
    ud::ops::random_normal(ud::Context<ud::cpu>{},
                           ud::RowBlock<float>(eps.data(), 1, static_cast<std::int64_t>(eps.size()),
                                               static_cast<std::int64_t>(eps.size())),
                           ud::NoiseKey{11, g}, 0);
    auto in = x0;
    for (std::size_t i = 0; i < eps.size(); ++i)
      in[g][i] = static_cast<float>(sched.sqrt_abar(level) * x0[g][i] +
                                    sched.sqrt_one_minus_abar(level) * eps[i]);
    std::array<std::vector<float>, 3> out;
    std::array<ud::TensorView<const float>, 3> iv;
    std::array<ud::TensorView<float>, 3> ov;
    std::array<std::span<const double>, 3> times;
    for (std::size_t k = 0; k < 3; ++k) {
      out[k].resize(in[k].size());
      iv[k] = ud::TensorView<const float>(in[k].data(), ud::Shape{B, shapes::kGroupSize[k]});
      ov[k] = ud::TensorView<float>(out[k].data(), ud::Shape{B, shapes::kGroupSize[k]});
      times[k] = k == g ? std::span<const double>(tn) : std::span<const double>(t0);
    }
    model(ud::Context<ud::cpu>{}, iv, times, ov);
    double err = 0, var = 0;
    for (std::size_t i = 0; i < eps.size(); ++i) {
      err += (out[g][i] - eps[i]) * (out[g][i] - eps[i]);
      var += eps[i] * eps[i];
    }
    CAPTURE(err / var);
    CHECK(err / var < 0.02);  // trained: about 0.003 (image), 0.0005 (caption and sound)
  }
}
