// SPDX-License-Identifier: Apache-2.0
//! \file eval.hpp
//! The shapes demo's evaluation: every mode sampled through the library's task, guidance and
//! sampler API (sample_mode, UViTPredictor, DPM-Solver++), scored with the world's attribute
//! readers, drawn as PNG grids, and written as report.md / report.json.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "font.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/unidiffuser.hpp"
#include "world.hpp"

namespace shapes {

namespace ud = unidiffuser;

struct EvalSettings {
  bool full = false, quiet = false;
  double best_scale = 3.0;
  double rescale = 0.0;  //!< guidance rescale phi (GuidanceOptions::rescale; 0: official)
  double interval_lo = 0.0, interval_hi = 1.0;  //!< GuidanceOptions::interval_lo / _hi
  std::int64_t samples = 256, marginal_samples = 2048;
  int steps = 12;
  int marginal_steps = 0;  //!< DPM-Solver++ steps of the marginal modes i and t (0: `steps`)
  std::uint64_t seed = 2024;
  ImageCode code{};           //!< the network's image latent code (the checkpoint's; world.hpp)
  int world = kWorldVersion;  //!< the world version the network was trained on (the checkpoint's)
  //! The betas the network was trained with (the checkpoint's schedule); empty: the official
  //! scaled-linear betas.
  std::vector<double> betas{};
};

//! One line of the report.
struct Row {
  std::string mode;
  double scale = 0;
  std::string metric;
  double value = 0;
  std::int64_t samples = 0;
  std::string bar;  //!< e.g. ">= 0.90"; empty: informative
  bool pass = true;
};

//! Samples of one mode: per sample the image and caption involved (condition, intermediate and
//! result, in the order the mode produces them).
struct ModeSamples {
  std::int64_t n = 0;
  std::vector<float> cond_img, cond_text, img, text, mid_img, mid_text;
};

namespace detail {

// A progress line per batch chunk.
struct Progress {
  bool quiet = false;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void operator()(const std::string& what, std::int64_t done, std::int64_t total) const {
    if (quiet) return;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "\rsampling %-16s %6lld/%-6lld  %6.1fs", what.c_str(),
                 static_cast<long long>(done), static_cast<long long>(total), s);
    if (done == total) std::fprintf(stderr, "\n");
  }
};

// The world's samples first..first+n of `seed`: their scenes, images and caption latents.
inline void world_batch(std::uint64_t seed, std::int64_t first, std::int64_t n,
                        std::vector<Attributes>& attr, std::vector<float>& img,
                        std::vector<float>& text, int version) {
  attr.resize(static_cast<std::size_t>(n));
  img.assign(static_cast<std::size_t>(n * kPixels), 0.f);
  text.assign(static_cast<std::size_t>(n * kTextSize), 0.f);
  for (std::int64_t r = 0; r < n; ++r) {
    const Scene s = sample_scene(seed, static_cast<std::uint64_t>(first + r));
    attr[static_cast<std::size_t>(r)] = s.attr;
    render(s, std::span<float>(img.data() + r * kPixels, kPixels), version);
    encode_caption(caption_words(s.attr), std::span<float>(text.data() + r * kTextSize, kTextSize));
  }
}

}  // namespace detail

//! Runs `mode` at guidance `scale` on n samples (conditions: the world's samples of `seed`),
//! in chunks of 256 (the noise of a sample does not depend on the chunking).
inline ModeSamples sample(ud::nn::UViTPredictor<float, 2>& model, const std::string& mode,
                          double scale, std::int64_t n, const EvalSettings& ev,
                          std::uint64_t stream) {
  const ud::Mode m = ud::parse_mode(mode);
  ModeSamples out;
  out.n = n;
  std::vector<Attributes> attr;
  detail::world_batch(ev.seed, 0, n, attr, out.cond_img, out.cond_text, ev.world);
  const auto betas = ev.betas.empty() ? ud::scaled_linear_betas() : ev.betas;
  const auto ns = ud::VPSchedule::discrete(betas, ud::TablePrecision::float64);
  const auto grid = ud::VPSchedule::discrete(betas, ud::TablePrecision::float32_reference);
  ud::DpmSolverOptions o;
  o.steps = (m == ud::Mode::i || m == ud::Mode::t) && ev.marginal_steps > 0 ? ev.marginal_steps
                                                                            : ev.steps;
  o.order = 2;
  o.method = ud::SolverMethod::multistep;
  o.predict_x0 = true;
  const ud::DpmSolver<float> solver(ns, o, &grid);
  ud::GuidanceOptions g;
  g.scale = scale;
  const auto& layout = model.layout();
  const bool two = m == ud::Mode::i2t2i || m == ud::Mode::t2i2t;
  out.img.assign(static_cast<std::size_t>(n * kPixels), 0.f);
  out.text.assign(static_cast<std::size_t>(n * kTextSize), 0.f);
  if (two) out.mid_img = out.img, out.mid_text = out.text;
  detail::Progress prog{ev.quiet};
  const std::string what = mode + (m == ud::Mode::i || m == ud::Mode::t
                                       ? std::string()
                                       : " s=" + std::to_string(static_cast<int>(scale)));
  const ud::Context<ud::cpu> ctx{};
  constexpr std::int64_t chunk = 256;
  std::vector<float> code_buf;
  for (std::int64_t first = 0; first < n; first += chunk) {
    const std::int64_t b = std::min(chunk, n - first);
    prog(what, first, n);
    // the conditions in the network's image code (a copy only when it is not the pixels); every
    // image kept here stays in pixels
    const float* cimg = out.cond_img.data() + first * kPixels;
    if (!ev.code.identity()) {
      code_buf.assign(cimg, cimg + b * kPixels);
      for (std::int64_t r = 0; r < b; ++r)
        ev.code.encode(std::span<float>(code_buf.data() + r * kPixels, kPixels));
      cimg = code_buf.data();
    }
    std::array<ud::TensorView<const float>, 2> cond{};
    cond[0] = ud::TensorView<const float>(cimg, ud::Shape{b, kPixels});
    cond[1] = ud::TensorView<const float>(out.cond_text.data() + first * kTextSize,
                                          ud::Shape{b, kTextSize});
    ud::PhiloxNoise noise(ev.seed ^ (0x9e3779b97f4a7c15ull * (stream + 1)),
                          static_cast<std::uint64_t>(first));
    auto r = ud::sample_mode<float>(ctx, model, noise, layout, m, g, solver, b, cond);
    // final image / caption; for two-stage modes the other group is the intermediate
    float* dst[2] = {out.img.data() + first * kPixels, out.text.data() + first * kTextSize};
    if (m == ud::Mode::i2t2i) dst[1] = out.mid_text.data() + first * kTextSize;
    if (m == ud::Mode::t2i2t) dst[0] = out.mid_img.data() + first * kPixels;
    for (std::size_t k = 0; k < 2; ++k)
      if (r[k].size() > 0) std::copy_n(r[k].data(), r[k].size(), dst[k]);
    if (r[0].size() > 0 && !ev.code.identity())
      for (std::int64_t i = 0; i < b; ++i)
        ev.code.decode(std::span<float>(dst[0] + i * kPixels, kPixels));
  }
  prog(what, n, n);
  return out;
}

//! The attributes of n consecutive items of `width` floats read by `reader`.
template <class Reader>
std::vector<Attributes> read_all(const std::vector<float>& v, std::int64_t n, int width,
                                 Reader reader) {
  std::vector<Attributes> a(static_cast<std::size_t>(n));
  for (std::int64_t r = 0; r < n; ++r)
    a[static_cast<std::size_t>(r)] =
        reader(std::span<const float>(v.data() + r * width, static_cast<std::size_t>(width)));
  return a;
}
inline std::vector<Attributes> read_images(const std::vector<float>& img, std::int64_t n) {
  return read_all(img, n, kPixels, [](std::span<const float> x) { return read_image(x); });
}
inline std::vector<Attributes> read_captions(const std::vector<float>& text, std::int64_t n) {
  return read_all(text, n, kTextSize, [](std::span<const float> x) { return read_caption(x); });
}
//! Per pair: readable and all four attributes equal.
inline std::vector<bool> matches(const std::vector<Attributes>& x,
                                 const std::vector<Attributes>& y) {
  std::vector<bool> ok(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ok[i] = x[i].readable() && x[i] == y[i];
  return ok;
}

//! Fraction of pairs whose four attributes all match (unreadable never matches).
inline double agreement(const std::vector<Attributes>& x, const std::vector<Attributes>& y) {
  const auto ok = matches(x, y);
  return x.empty() ? 0.0
                   : static_cast<double>(std::count(ok.begin(), ok.end(), true)) /
                         static_cast<double>(x.size());
}
//! Fraction of attribute values that match, per attribute and overall.
inline std::array<double, kAttributes + 1> attribute_match(const std::vector<Attributes>& x,
                                                           const std::vector<Attributes>& y) {
  std::array<double, kAttributes + 1> m{};
  for (std::size_t i = 0; i < x.size(); ++i)
    for (int k = 0; k < kAttributes; ++k)
      if (x[i][k] >= 0 && x[i][k] == y[i][k]) m[static_cast<std::size_t>(k)] += 1;
  const double n = std::max<double>(1.0, static_cast<double>(x.size()));
  for (int k = 0; k < kAttributes; ++k) {
    m[static_cast<std::size_t>(k)] /= n;
    m[kAttributes] += m[static_cast<std::size_t>(k)] / kAttributes;
  }
  return m;
}
//! Total-variation distance of each attribute's empirical frequencies from the data
//! distribution; an unreadable value counts as a category of its own (probability 0 in the data).
inline std::array<double, kAttributes> marginal_tv(const std::vector<Attributes>& x) {
  std::array<double, kAttributes> tv{};
  for (int k = 0; k < kAttributes; ++k) {
    const auto& p = frequencies()[static_cast<std::size_t>(k)];
    std::vector<double> c(p.size() + 1, 0.0);
    for (const auto& a : x) c[a[k] >= 0 ? static_cast<std::size_t>(a[k]) : p.size()] += 1;
    double d = c[p.size()] / static_cast<double>(x.size());
    for (std::size_t v = 0; v < p.size(); ++v)
      d += std::abs(c[v] / static_cast<double>(x.size()) - p[v]);
    tv[static_cast<std::size_t>(k)] = d / 2;
  }
  return tv;
}

//! Draws an image ([3, 16, 16] in [-1, 1]) at (x, y), each pixel `up` x `up`.
inline void draw_image(Canvas& cv, int x, int y, const float* px, int up) {
  for (int v = 0; v < kSide * up; ++v)
    for (int u = 0; u < kSide * up; ++u) {
      std::array<std::uint8_t, 3> c{};
      for (int k = 0; k < 3; ++k) {
        const float val = px[(k * kSide + v / up) * kSide + u / up];
        c[static_cast<std::size_t>(k)] =
            static_cast<std::uint8_t>(std::lround(std::clamp((val + 1) / 2, 0.f, 1.f) * 255));
      }
      cv.set(x + u, y + v, c);
    }
}
//! Draws a caption latent's decoded words at (x, y) in three lines (size colour / shape /
//! position).
inline void draw_caption(Canvas& cv, int x, int y, const float* t, int font) {
  const auto w = decode_caption(std::span<const float>(t, kTextSize));
  const std::string line[3] = {caption_text(std::span<const int>(w.data(), 2)),
                               caption_text(std::span<const int>(w.data() + 2, 1)),
                               caption_text(std::span<const int>(w.data() + 3, 2))};
  for (int l = 0; l < 3; ++l) cv.text(x, y + 6 + l * 18, line[l], font, {235, 235, 235});
}

//! The grid of one mode: up to 32 cells (8 rows x 4 columns), each the mode's items left to right
//! (images 4x upscaled, captions in three lines), framed green where the sample scores as
//! correct and red where not.
inline void write_grid(const std::string& path, const std::string& title, const ModeSamples& s,
                       const std::vector<char>& items, const std::vector<bool>& ok) {
  constexpr int up = 4, img_px = kSide * up, text_px = 12 * 12, gap = 8, font = 2;
  int cell_w = gap;
  for (char c : items) cell_w += (c == 'i' || c == 'I' || c == 'J' ? img_px : text_px) + gap;
  const int cols = 4, rows = static_cast<int>(std::min<std::int64_t>(8, (s.n + cols - 1) / cols));
  const int head = 28, cell_h = img_px + 2 * gap, W = cols * cell_w, H = head + rows * cell_h;
  Canvas cv(W, H, {24, 24, 28});
  cv.text(gap, 8, title, 2, {230, 230, 230});
  auto draw_img = [&](int x, int y, const float* px) { draw_image(cv, x, y, px, up); };
  auto draw_caption = [&](int x, int y, const float* t) {
    shapes::draw_caption(cv, x, y, t, font);
  };
  for (std::int64_t i = 0; i < std::min<std::int64_t>(s.n, cols * rows); ++i) {
    const int cx = static_cast<int>(i % cols) * cell_w,
              cy = head + static_cast<int>(i / cols) * cell_h;
    const std::array<std::uint8_t, 3> frame = ok[static_cast<std::size_t>(i)]
                                                  ? std::array<std::uint8_t, 3>{40, 160, 70}
                                                  : std::array<std::uint8_t, 3>{200, 50, 50};
    cv.rect(cx + 2, cy + 2, cell_w - 4, cell_h - 4, frame);
    int x = cx + gap;
    for (char c : items) {
      // c: condition image 'I' / caption 'C', intermediate 'j' / 'd', result image 'i' / caption
      // 't'
      if (c == 'I') draw_img(x, cy + gap, s.cond_img.data() + i * kPixels);
      if (c == 'i') draw_img(x, cy + gap, s.img.data() + i * kPixels);
      if (c == 'J') draw_img(x, cy + gap, s.mid_img.data() + i * kPixels);
      if (c == 'C') draw_caption(x, cy + gap, s.cond_text.data() + i * kTextSize);
      if (c == 't') draw_caption(x, cy + gap, s.text.data() + i * kTextSize);
      if (c == 'd') draw_caption(x, cy + gap, s.mid_text.data() + i * kTextSize);
      x += (c == 'i' || c == 'I' || c == 'J' ? img_px : text_px) + gap;
    }
  }
  cv.write_png(path);
}

//! Samples and scores every mode; writes the grids into `out`.
inline std::vector<Row> evaluate(ud::nn::UViT<float>& net, const EvalSettings& ev,
                                 const std::string& out) {
  namespace fs = std::filesystem;
  ud::nn::UViTPredictor<float, 2> model(net, 0);
  std::vector<Row> rows;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<double> scales = {0.0, ev.best_scale};
  if (ev.full) scales = {0.0, 1.0, 3.0, 7.0};
  std::sort(scales.begin(), scales.end());
  scales.erase(std::unique(scales.begin(), scales.end()), scales.end());
  const double best = ev.full ? 7.0 : ev.best_scale;
  const auto n = ev.samples;
  std::uint64_t stream = 0;
  auto add = [&](std::string mode, double scale, std::string metric, double v, std::int64_t k,
                 std::string bar = {}, bool pass = true) {
    rows.push_back({std::move(mode), scale, std::move(metric), v, k, std::move(bar), pass});
  };
  auto png = [&](const std::string& name) { return (fs::path(out) / (name + ".png")).string(); };
  auto scale_tag = [](double s) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", s);
    return std::string(b);
  };
  const char* names[kAttributes] = {"size", "colour", "shape", "position"};
  // conditional modes
  for (const std::string mode : {"t2i", "i2t"}) {
    for (double s : scales) {
      const auto r = sample(model, mode, s, n, ev, stream++);
      const bool t2i = mode == "t2i";
      const auto want = t2i ? read_captions(r.cond_text, n) : read_images(r.cond_img, n);
      const auto got = t2i ? read_images(r.img, n) : read_captions(r.text, n);
      const double acc = agreement(got, want);
      const auto per = attribute_match(got, want);
      add(mode, s, "accuracy", acc, n, s == best ? ">= 0.90" : "", s != best || acc >= 0.9);
      for (int k = 0; k < kAttributes; ++k)
        add(mode, s, std::string("accuracy/") + names[k], per[static_cast<std::size_t>(k)], n);
      const auto ok = matches(got, want);
      write_grid(png(mode + "_s" + scale_tag(s)),
                 mode + "  SCALE " + scale_tag(s) +
                     (t2i ? "  CAPTION -> GENERATED IMAGE" : "  IMAGE -> GENERATED CAPTION"),
                 r, t2i ? std::vector<char>{'C', 'i'} : std::vector<char>{'I', 't'}, ok);
    }
  }
  // guidance helps: best scale better than 0
  for (const std::string mode : {"t2i", "i2t"}) {
    double a0 = 0, ab = 0;
    for (const auto& r : rows)
      if (r.mode == mode && r.metric == "accuracy") {
        if (r.scale == 0) a0 = r.value;
        if (r.scale == best) ab = r.value;
      }
    add(mode, best, "gain over scale 0", ab - a0, n, "> 0", ab > a0);
  }
  // joint
  for (double s : ev.full ? scales : std::vector<double>{best}) {
    const auto r = sample(model, "joint", s, n, ev, stream++);
    const auto ai = read_images(r.img, n), at = read_captions(r.text, n);
    const double acc = agreement(ai, at);
    add("joint", s, "agreement", acc, n, s == best ? ">= 0.90" : "", s != best || acc >= 0.9);
    const auto ok = matches(ai, at);
    write_grid(png("joint_s" + scale_tag(s)), "joint  SCALE " + scale_tag(s) + "  GENERATED PAIRS",
               r, {'i', 't'}, ok);
  }
  // marginals, next to the noise floor of as many true samples
  const auto m = ev.marginal_samples;
  {
    std::vector<Attributes> attr;
    std::vector<float> img, text;
    detail::world_batch(ev.seed ^ 0xf100ull, 0, m, attr, img, text, ev.world);
    const auto fi = marginal_tv(read_images(img, m)), ft = marginal_tv(read_captions(text, m));
    for (int k = 0; k < kAttributes; ++k) {
      add("data (image reader)", 0, std::string("tv/") + names[k], fi[static_cast<std::size_t>(k)],
          m);
      add("data (caption reader)", 0, std::string("tv/") + names[k],
          ft[static_cast<std::size_t>(k)], m);
    }
  }
  for (const std::string mode : {"i", "t"}) {
    const auto r = sample(model, mode, 0, m, ev, stream++);
    const auto a = mode == "i" ? read_images(r.img, m) : read_captions(r.text, m);
    const auto tv = marginal_tv(a);
    for (int k = 0; k < kAttributes; ++k)
      add(mode, 0, std::string("tv/") + names[k], tv[static_cast<std::size_t>(k)], m, "<= 0.05",
          tv[static_cast<std::size_t>(k)] <= 0.05);
    std::vector<bool> ok(static_cast<std::size_t>(m));
    for (std::int64_t i = 0; i < m; ++i)
      ok[static_cast<std::size_t>(i)] = a[static_cast<std::size_t>(i)].readable();
    write_grid(png(mode), mode == "i" ? "i  IMAGE MARGINAL" : "t  CAPTION MARGINAL", r,
               mode == "i" ? std::vector<char>{'i'} : std::vector<char>{'t'}, ok);
  }
  // variations
  for (const std::string mode : {"i2t2i", "t2i2t"}) {
    for (double s : ev.full ? scales : std::vector<double>{best}) {
      const auto r = sample(model, mode, s, n, ev, stream++);
      const bool img = mode == "i2t2i";
      const auto want = img ? read_images(r.cond_img, n) : read_captions(r.cond_text, n);
      const auto got = img ? read_images(r.img, n) : read_captions(r.text, n);
      const auto per = attribute_match(got, want);
      add(mode, s, "preservation", per[kAttributes], n, s == best ? ">= 0.90" : "",
          s != best || per[kAttributes] >= 0.9);
      add(mode, s, "all attributes kept", agreement(got, want), n);
      const auto ok = matches(got, want);
      write_grid(png(mode + "_s" + scale_tag(s)),
                 mode + "  SCALE " + scale_tag(s) +
                     (img ? "  IMAGE -> CAPTION -> IMAGE" : "  CAPTION -> IMAGE -> CAPTION"),
                 r, img ? std::vector<char>{'I', 'd', 'i'} : std::vector<char>{'C', 'J', 't'}, ok);
    }
  }
  // negative control: true images with the captions of other samples
  {
    std::vector<Attributes> attr;
    std::vector<float> img, text;
    detail::world_batch(ev.seed ^ 0xc0ull, 0, n, attr, img, text, ev.world);
    // each image with the caption of the next sample (independent draws)
    std::vector<float> shuffled(text.size());
    for (std::int64_t i = 0; i < n; ++i)
      std::copy_n(text.data() + ((i + 1) % n) * kTextSize, kTextSize,
                  shuffled.data() + i * kTextSize);
    double chance = 1;
    for (int k = 0; k < kAttributes; ++k) {
      double q = 0;
      for (double p : frequencies()[static_cast<std::size_t>(k)]) q += p * p;
      chance *= q;
    }
    add("control", 0, "agreement of shuffled true pairs",
        agreement(read_images(img, n), read_captions(shuffled, n)), n);
    add("control", 0, "chance level (independent pairs)", chance, n);
    add("control", 0, "agreement of true pairs",
        agreement(read_images(img, n), read_captions(text, n)), n);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  add("run", 0, "seconds", secs, 0);
  return rows;
}

//! report.md (the table) and report.json (a list of rows); prints the table. Returns the number
//! of failed bars.
inline int write_reports(const std::vector<Row>& rows, const EvalSettings& ev,
                         const std::string& checkpoint, const std::string& out,
                         const std::string& program = "unidiffuser-shapes") {
  namespace fs = std::filesystem;
  nlohmann::json j = nlohmann::json::array();
  for (const auto& r : rows)
    j.push_back({{"mode", r.mode},
                 {"scale", r.scale},
                 {"metric", r.metric},
                 {"value", r.value},
                 {"samples", r.samples},
                 {"bar", r.bar},
                 {"pass", r.pass}});
  std::string md =
      "# " + program + " report\n\ncheckpoint `" + checkpoint + "` (world " + world_name(ev.world) +
      "), seed " + std::to_string(ev.seed) + ", DPM-Solver++ (2M) " + std::to_string(ev.steps) +
      " steps" +
      (ev.marginal_steps > 0 ? " (i and t: " + std::to_string(ev.marginal_steps) + ")" : "") +
      "\n\n| mode | scale | metric | value | samples | bar |\n|---|---|---|---|---|---|\n";
  std::string table;
  int failed = 0;
  for (const auto& r : rows) {
    if (r.metric.find('/') != std::string::npos && r.metric.rfind("tv/", 0) != 0)
      continue;  // per-attribute accuracies: report.json only
    char line[256];
    std::snprintf(line, sizeof line, "| %s | %g | %s | %.4f | %lld | %s |\n", r.mode.c_str(),
                  r.scale, r.metric.c_str(), r.value, static_cast<long long>(r.samples),
                  r.bar.empty() ? "" : (r.bar + (r.pass ? " ok" : " **FAILED**")).c_str());
    md += line;
    char t[256];
    std::snprintf(t, sizeof t, "%-22s %5g  %-34s %8.4f  %6lld  %s\n", r.mode.c_str(), r.scale,
                  r.metric.c_str(), r.value, static_cast<long long>(r.samples),
                  r.bar.empty() ? "" : (r.bar + (r.pass ? "  ok" : "  FAILED")).c_str());
    table += t;
    failed += !r.pass;
  }
  md += "\n" + std::to_string(failed) + " bar(s) failed.\n";
  std::ofstream(fs::path(out) / "report.md") << md;
  std::ofstream(fs::path(out) / "report.json") << j.dump(1) << "\n";
  std::printf("%-22s %5s  %-34s %8s  %6s  %s\n%s", "mode", "scale", "metric", "value", "samples",
              "bar", table.c_str());
  std::printf("%d bar(s) failed; grids, report.md and report.json in %s\n", failed, out.c_str());
  return failed;
}

}  // namespace shapes
