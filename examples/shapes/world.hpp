// SPDX-License-Identifier: Apache-2.0
//! \file world.hpp
//! The procedural image-caption world of the shapes demo (README, docs/SHAPES.md).
//!
//! A sample is one shape on a black 16 x 16 RGB canvas, described by four attributes
//!   size     small (5 px box) | large (7 px box)
//!   colour   red | green | blue | yellow          (frequencies 0.4 / 0.3 / 0.2 / 0.1)
//!   shape    circle | square | triangle
//!   position top left | top right | bottom left | bottom right (the quadrant)
//! plus a uniform jitter of the box inside its quadrant, and the caption
//! "<size> <colour> <shape> <top|bottom> <left|right>" (five words of a 13-word vocabulary).
//! Everything is a pure function of (seed, sample index) through Philox.
//!
//! Latents: the image group is the pixels themselves, [3, 16, 16] in [-1, 1] (black = -1); the
//! "text encoder" is a frozen random embedding table (13 x 32, N(0, 1) entries from a fixed Philox
//! key), so a caption is a [5, 32] token sequence, and the "text decoder" is nearest-token
//! decoding. Rule-based readers recover the attributes from an image (largest connected component
//! of lit pixels: colour = nearest palette entry of its mean, size = box extent, shape = corner and
//! top / bottom mass tests, position = centroid quadrant) and from a caption (word categories per
//! slot); an attribute they cannot read is -1.
//!
//! World versions (the checkpoint's "world" metadata, `shapes-16x16-v<N>`): v1 draws a circle as
//! the pixels whose centres lie in the box's inscribed disc, which at the small 5 px box differs
//! from the square by its four corner pixels only (rows 3 5 5 5 3); it is the default and the
//! committed checkpoint's. v2 (`--world 2`, an experiment: docs/SHAPES.md, attempt 14, which
//! failed more bars than v1) cuts every corner of a circle by three pixels (small: rows 1 3 5 3 1;
//! large unchanged: 3 5 7 7 7 5 3), so that a small circle and a small square differ by 12 of 25
//! pixels instead of 4. Everything else is the same in both.
#pragma once

#include <Random123/philox.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace shapes {

inline constexpr int kSide = 16, kChannels = 3, kPixels = kChannels * kSide * kSide;
inline constexpr int kWords = 5, kVocab = 13, kEmbed = 32, kTextSize = kWords * kEmbed;
inline constexpr int kAttributes = 4;
enum Attribute { size_attr = 0, colour_attr = 1, shape_attr = 2, position_attr = 3 };

inline constexpr std::array<int, kAttributes> kValues{2, 4, 3, 4};
inline const std::array<std::vector<std::string>, kAttributes>& value_names() {
  static const std::array<std::vector<std::string>, kAttributes> n{
      std::vector<std::string>{"small", "large"},
      {"red", "green", "blue", "yellow"},
      {"circle", "square", "triangle"},
      {"top left", "top right", "bottom left", "bottom right"}};
  return n;
}
inline constexpr std::array<const char*, kAttributes> kAttributeNames{"size", "colour", "shape",
                                                                      "position"};
//! The data distribution: independent attributes with these frequencies.
inline const std::array<std::vector<double>, kAttributes>& frequencies() {
  static const std::array<std::vector<double>, kAttributes> p{std::vector<double>{0.5, 0.5},
                                                              {0.4, 0.3, 0.2, 0.1},
                                                              {1.0 / 3, 1.0 / 3, 1.0 / 3},
                                                              {0.25, 0.25, 0.25, 0.25}};
  return p;
}
inline constexpr std::array<const char*, kVocab> kVocabulary{
    "small",  "large",    "red", "green",  "blue", "yellow", "circle",
    "square", "triangle", "top", "bottom", "left", "right"};
inline constexpr std::array<std::array<float, 3>, 4> kPalette{
    {{1.f, 0.f, 0.f}, {0.f, 1.f, 0.f}, {0.f, 0.f, 1.f}, {1.f, 1.f, 0.f}}};
inline constexpr std::array<int, 2> kBox{5, 7};

//! The world version new checkpoints are trained on, and the ones this code can draw.
inline constexpr int kWorldVersion = 1, kWorldVersions = 2;
//! The world's name in checkpoint metadata.
inline std::string world_name(int version = kWorldVersion) {
  return "shapes-16x16-v" + std::to_string(version);
}

//! The image group's latent code: per channel an affine map of the pixels, latent = (pixel -
//! shift) / scale, and its inverse. `pixels` is the identity (the latent is the [-1, 1] image);
//! `standardised` centres and scales each channel to mean 0 and standard deviation 1 over the
//! world (measured on its first 16,384 samples of seed 0, in double, so the same on every
//! machine); `centred` only centres (scale 1), so the content keeps the pixels' signal-to-noise
//! ratio at every level while the level-N input loses its offset; `centred-half` centres and
//! halves (scale 2), so the level-N input also carries half the trace of the content, at a
//! quarter of the pixels' signal-to-noise ratio at every level (docs/SHAPES.md, attempt 20). The
//! pixel image is mostly black background (channel means about -0.9, standard deviations
//! 0.30-0.46), so in `pixels` the content the network must learn has a variance of about 0.15 next
//! to the caption's 1, and the pure-noise start of sampling lacks the -0.9 offset that training
//! showed the network at level N (docs/SHAPES.md, "Image code").
struct ImageCode {
  std::string name = "pixels";
  std::array<float, kChannels> shift{0.f, 0.f, 0.f}, scale{1.f, 1.f, 1.f};

  void encode(std::span<float> img) const { apply(img, false); }
  void decode(std::span<float> img) const { apply(img, true); }
  bool identity() const { return name == "pixels"; }

 private:
  void apply(std::span<float> img, bool inverse) const {
    constexpr std::size_t N = kSide * kSide;
    for (std::size_t c = 0; c < kChannels; ++c)
      for (std::size_t p = 0; p < N; ++p) {
        float& x = img[c * N + p];
        x = inverse ? x * scale[c] + shift[c] : (x - shift[c]) / scale[c];
      }
  }
};

//! Attribute values (-1: not readable).
struct Attributes {
  std::array<int, kAttributes> v{-1, -1, -1, -1};
  int operator[](int a) const { return v[static_cast<std::size_t>(a)]; }
  bool readable() const {
    return std::all_of(v.begin(), v.end(), [](int x) { return x >= 0; });
  }
  bool operator==(const Attributes&) const = default;
};

//! One world sample: attributes and the box's top-left corner.
struct Scene {
  Attributes attr;
  int x0 = 0, y0 = 0;
};

namespace detail {
inline std::array<std::uint32_t, 4> bits(std::uint64_t seed, std::uint64_t index,
                                         std::uint32_t stream) {
  using rng = r123::Philox4x32;
  rng gen;
  rng::key_type key = {{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  rng::ctr_type ctr = {{static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
                        stream, 0x5a17e5u}};
  const auto r = gen(ctr, key);
  return {r[0], r[1], r[2], r[3]};
}
inline double unit(std::uint32_t b) {
  return (static_cast<double>(b) + 0.5) * 0x1p-32;
}
inline int pick(const std::vector<double>& p, double u) {
  double c = 0;
  for (std::size_t i = 0; i + 1 < p.size(); ++i)
    if (u < (c += p[i])) return static_cast<int>(i);
  return static_cast<int>(p.size()) - 1;
}
}  // namespace detail

//! Sample `index` of the world under `seed`.
inline Scene sample_scene(std::uint64_t seed, std::uint64_t index) {
  const auto a = detail::bits(seed, index, 0), b = detail::bits(seed, index, 1);
  Scene s;
  for (int k = 0; k < kAttributes; ++k)
    s.attr.v[static_cast<std::size_t>(k)] =
        detail::pick(frequencies()[static_cast<std::size_t>(k)], detail::unit(a[k]));
  const int d = kBox[static_cast<std::size_t>(s.attr[size_attr])], room = kSide / 2 - d + 1;
  const int q = s.attr[position_attr];
  s.x0 = (q % 2) * (kSide / 2) + static_cast<int>(b[0] % static_cast<std::uint32_t>(room));
  s.y0 = (q / 2) * (kSide / 2) + static_cast<int>(b[1] % static_cast<std::uint32_t>(room));
  return s;
}

//! Whether local pixel (u, v) of a d x d box belongs to the shape in world `version`.
inline bool inside(int shape, int d, int u, int v, int version = kWorldVersion) {
  if (shape == 1) return true;  // square
  if (shape == 0) {             // circle: pixel centre within a disc about the box centre
    // v1: the inscribed disc (radius^2 = c^2); v2: radius^2 = c^2 - 2, which cuts three pixels
    // per corner at both box sizes (at 7 px the same pixels as v1).
    const double c = d / 2.0, du = u + 0.5 - c, dv = v + 0.5 - c;
    return du * du + dv * dv <= c * c - (version >= 2 ? 2.0 : 0.0);
  }
  const int half = v / 2;  // triangle pointing up: rows 1, 1, 3, 3, 5, ... pixels wide
  return std::abs(u - d / 2) <= half;
}

//! Renders a scene of world `version` into `img` ([3, 16, 16], channel-major, values in [-1, 1]).
inline void render(const Scene& s, std::span<float> img, int version = kWorldVersion) {
  std::fill(img.begin(), img.end(), -1.f);
  const int d = kBox[static_cast<std::size_t>(s.attr[size_attr])];
  const auto& rgb = kPalette[static_cast<std::size_t>(s.attr[colour_attr])];
  for (int v = 0; v < d; ++v)
    for (int u = 0; u < d; ++u)
      if (inside(s.attr[shape_attr], d, u, v, version))
        for (int c = 0; c < kChannels; ++c)
          img[static_cast<std::size_t>((c * kSide + s.y0 + v) * kSide + s.x0 + u)] =
              2.f * rgb[static_cast<std::size_t>(c)] - 1.f;
}

//! The image code called `name` (one of image_code_names()); anything else is an
//! error of the caller (image_code_names lists the valid ones).
inline const std::array<const char*, 4>& image_code_names() {
  static const std::array<const char*, 4> n{"pixels", "standardised", "centred", "centred-half"};
  return n;
}
//! The code's statistics are those of world `version`.
inline ImageCode image_code(const std::string& name, int version = kWorldVersion) {
  ImageCode code;
  code.name = name;
  const bool centred = name == "centred" || name == "centred-half";
  if (name != "standardised" && !centred) return code;
  constexpr int n = 16384, N = kSide * kSide;
  std::array<double, kChannels> s{}, q{};
  std::vector<float> img(kPixels);
  for (int i = 0; i < n; ++i) {
    render(sample_scene(0, static_cast<std::uint64_t>(i)), img, version);
    for (int c = 0; c < kChannels; ++c)
      for (int p = 0; p < N; ++p) {
        const double x = img[static_cast<std::size_t>(c * N + p)];
        s[static_cast<std::size_t>(c)] += x, q[static_cast<std::size_t>(c)] += x * x;
      }
  }
  for (std::size_t c = 0; c < kChannels; ++c) {
    const double m = s[c] / (double(n) * N), v = q[c] / (double(n) * N) - m * m;
    code.shift[c] = static_cast<float>(m);
    code.scale[c] = name == "centred"        ? 1.f
                    : name == "centred-half" ? 2.f
                                             : static_cast<float>(std::sqrt(v));
  }
  return code;
}

//! The caption's word ids.
inline std::array<int, kWords> caption_words(const Attributes& a) {
  const int p = a[position_attr];
  return {a[size_attr], 2 + a[colour_attr], 6 + a[shape_attr], 9 + p / 2, 11 + p % 2};
}
inline std::string caption_text(std::span<const int> words) {
  std::string s;
  for (int w : words) {
    if (!s.empty()) s += ' ';
    s += w >= 0 && w < kVocab ? kVocabulary[static_cast<std::size_t>(w)] : "?";
  }
  return s;
}
inline std::string describe(const Attributes& a) {
  std::string s;
  for (int k = 0; k < kAttributes; ++k) {
    if (k) s += ' ';
    const int v = a[k];
    s += v >= 0 ? value_names()[static_cast<std::size_t>(k)][static_cast<std::size_t>(v)] : "?";
  }
  return s;
}

//! The frozen "text encoder": a 13 x 32 table of N(0, 1) entries from a fixed Philox key.
inline const std::array<float, kVocab * kEmbed>& embedding_table() {
  static const std::array<float, kVocab* kEmbed> t = [] {
    std::array<float, kVocab * kEmbed> e{};
    for (int i = 0; i < kVocab * kEmbed; i += 2) {
      const auto b = detail::bits(0x7e87u, static_cast<std::uint64_t>(i), 7);
      const double r = std::sqrt(-2 * std::log(detail::unit(b[0])));
      const double th = 2 * 3.14159265358979323846 * detail::unit(b[1]);
      e[static_cast<std::size_t>(i)] = static_cast<float>(r * std::cos(th));
      e[static_cast<std::size_t>(i + 1)] = static_cast<float>(r * std::sin(th));
    }
    return e;
  }();
  return t;
}
inline void encode_caption(std::span<const int> words, std::span<float> out) {
  const auto& t = embedding_table();
  for (int w = 0; w < kWords; ++w)
    std::copy_n(t.begin() + words[static_cast<std::size_t>(w)] * kEmbed, kEmbed,
                out.begin() + w * kEmbed);
}
//! The "text decoder": the nearest vocabulary entry per token.
inline std::array<int, kWords> decode_caption(std::span<const float> text) {
  const auto& t = embedding_table();
  std::array<int, kWords> w{};
  for (int k = 0; k < kWords; ++k) {
    double best = INFINITY;
    for (int v = 0; v < kVocab; ++v) {
      double d = 0;
      for (int e = 0; e < kEmbed; ++e) {
        const double x = text[static_cast<std::size_t>(k * kEmbed + e)] -
                         t[static_cast<std::size_t>(v * kEmbed + e)];
        d += x * x;
      }
      if (d < best) best = d, w[static_cast<std::size_t>(k)] = v;
    }
  }
  return w;
}

//! Attributes of a caption's words: each slot must hold a word of its category.
inline Attributes read_caption_words(std::span<const int> w) {
  Attributes a;
  auto in = [](int x, int lo, int n) { return x >= lo && x < lo + n ? x - lo : -1; };
  a.v[size_attr] = in(w[0], 0, 2);
  a.v[colour_attr] = in(w[1], 2, 4);
  a.v[shape_attr] = in(w[2], 6, 3);
  const int top = in(w[3], 9, 2), left = in(w[4], 11, 2);
  a.v[position_attr] = top >= 0 && left >= 0 ? top * 2 + left : -1;
  return a;
}
inline Attributes read_caption(std::span<const float> text) {
  const auto w = decode_caption(text);
  return read_caption_words(w);
}

//! Attributes of an image ([3, 16, 16] in [-1, 1]); -1 where it cannot tell.
inline Attributes read_image(std::span<const float> img) {
  constexpr int N = kSide * kSide;
  auto at = [&](int c, int p) { return img[static_cast<std::size_t>(c * N + p)]; };
  std::array<bool, N> lit{};
  for (int p = 0; p < N; ++p)
    lit[static_cast<std::size_t>(p)] = std::max({at(0, p), at(1, p), at(2, p)}) > 0.f;
  // largest 4-connected component of lit pixels
  std::array<int, N> comp{};
  comp.fill(-1);
  std::vector<int> best, cur, stack;
  for (int p = 0; p < N; ++p) {
    if (!lit[static_cast<std::size_t>(p)] || comp[static_cast<std::size_t>(p)] >= 0) continue;
    cur.clear();
    stack.assign(1, p);
    comp[static_cast<std::size_t>(p)] = p;
    while (!stack.empty()) {
      const int q = stack.back();
      stack.pop_back();
      cur.push_back(q);
      const int x = q % kSide, y = q / kSide;
      const int nb[4][2] = {{x - 1, y}, {x + 1, y}, {x, y - 1}, {x, y + 1}};
      for (const auto& n : nb) {
        if (n[0] < 0 || n[0] >= kSide || n[1] < 0 || n[1] >= kSide) continue;
        const int r = n[1] * kSide + n[0];
        if (lit[static_cast<std::size_t>(r)] && comp[static_cast<std::size_t>(r)] < 0)
          comp[static_cast<std::size_t>(r)] = p, stack.push_back(r);
      }
    }
    if (cur.size() > best.size()) best = cur;
  }
  Attributes a;
  if (best.size() < 4) return a;
  int x0 = kSide, x1 = -1, y0 = kSide, y1 = -1;
  double mx = 0, my = 0;
  std::array<double, 3> rgb{};
  std::array<bool, N> in{};
  for (int p : best) {
    const int x = p % kSide, y = p / kSide;
    in[static_cast<std::size_t>(p)] = true;
    x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
    mx += x + 0.5, my += y + 0.5;
    for (int c = 0; c < 3; ++c) rgb[static_cast<std::size_t>(c)] += (at(c, p) + 1) / 2;
  }
  const double n = static_cast<double>(best.size());
  mx /= n, my /= n;
  // colour: nearest palette entry of the mean
  double bd = INFINITY;
  for (int k = 0; k < 4; ++k) {
    double d = 0;
    for (int c = 0; c < 3; ++c) {
      const double e = rgb[static_cast<std::size_t>(c)] / n -
                       kPalette[static_cast<std::size_t>(k)][static_cast<std::size_t>(c)];
      d += e * e;
    }
    if (d < bd) bd = d, a.v[colour_attr] = k;
  }
  // size: the box extent (5 or 7)
  const int w = x1 - x0 + 1, h = y1 - y0 + 1, ext = std::max(w, h);
  a.v[size_attr] = ext >= 4 && ext <= 5 ? 0 : ext >= 6 && ext <= 8 ? 1 : -1;
  // position: the quadrant of the centroid
  a.v[position_attr] = (my < kSide / 2.0 ? 0 : 2) + (mx < kSide / 2.0 ? 0 : 1);
  // shape: a triangle has most of its mass in its lower half; a square has its corners lit
  double top = 0, bottom = 0;
  for (int p : best) {
    const double y = p / kSide + 0.5 - y0;
    if (y < h / 2.0) top += 1;
    if (y > h - h / 2.0) bottom += 1;
  }
  auto on = [&](int x, int y) { return in[static_cast<std::size_t>(y * kSide + x)] ? 1 : 0; };
  const int corners = on(x0, y0) + on(x1, y0) + on(x0, y1) + on(x1, y1);
  if (top < 0.6 * bottom)
    a.v[shape_attr] = 2;
  else if (corners >= 3)
    a.v[shape_attr] = 1;
  else if (corners <= 1)
    a.v[shape_attr] = 0;
  return a;
}

}  // namespace shapes
