// SPDX-License-Identifier: Apache-2.0
//! \file font.hpp
//! An RGB canvas with a 5 x 7 bitmap font (capitals, digits, a few signs) for the demo's PNG
//! grids, written with stb_image_write.
#pragma once

#include <stb/stb_image_write.h>

#include <array>
#include <cctype>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "unidiffuser/core/error.hpp"

namespace shapes {

//! Rows of a glyph, 5 bits each (bit 4 = leftmost column).
inline const std::array<std::uint8_t, 7>* glyph(char ch) {
  struct G {
    char c;
    std::array<std::uint8_t, 7> r;
  };
  static const G table[] = {
      {'A', {14, 17, 17, 31, 17, 17, 17}}, {'B', {30, 17, 17, 30, 17, 17, 30}},
      {'C', {14, 17, 16, 16, 16, 17, 14}}, {'D', {30, 17, 17, 17, 17, 17, 30}},
      {'E', {31, 16, 16, 30, 16, 16, 31}}, {'F', {31, 16, 16, 30, 16, 16, 16}},
      {'G', {14, 17, 16, 23, 17, 17, 15}}, {'H', {17, 17, 17, 31, 17, 17, 17}},
      {'I', {14, 4, 4, 4, 4, 4, 14}},      {'J', {7, 2, 2, 2, 2, 18, 12}},
      {'K', {17, 18, 20, 24, 20, 18, 17}}, {'L', {16, 16, 16, 16, 16, 16, 31}},
      {'M', {17, 27, 21, 21, 17, 17, 17}}, {'N', {17, 17, 25, 21, 19, 17, 17}},
      {'O', {14, 17, 17, 17, 17, 17, 14}}, {'P', {30, 17, 17, 30, 16, 16, 16}},
      {'Q', {14, 17, 17, 17, 21, 18, 13}}, {'R', {30, 17, 17, 30, 20, 18, 17}},
      {'S', {15, 16, 16, 14, 1, 1, 30}},   {'T', {31, 4, 4, 4, 4, 4, 4}},
      {'U', {17, 17, 17, 17, 17, 17, 14}}, {'V', {17, 17, 17, 17, 17, 10, 4}},
      {'W', {17, 17, 17, 21, 21, 21, 10}}, {'X', {17, 17, 10, 4, 10, 17, 17}},
      {'Y', {17, 17, 10, 4, 4, 4, 4}},     {'Z', {31, 1, 2, 4, 8, 16, 31}},
      {'0', {14, 17, 19, 21, 25, 17, 14}}, {'1', {4, 12, 4, 4, 4, 4, 14}},
      {'2', {14, 17, 1, 2, 4, 8, 31}},     {'3', {31, 2, 4, 2, 1, 17, 14}},
      {'4', {2, 6, 10, 18, 31, 2, 2}},     {'5', {31, 16, 30, 1, 1, 17, 14}},
      {'6', {6, 8, 16, 30, 17, 17, 14}},   {'7', {31, 1, 2, 4, 8, 8, 8}},
      {'8', {14, 17, 17, 14, 17, 17, 14}}, {'9', {14, 17, 17, 15, 1, 2, 12}},
      {'?', {14, 17, 1, 2, 4, 0, 4}},      {'.', {0, 0, 0, 0, 0, 12, 12}},
      {'-', {0, 0, 0, 31, 0, 0, 0}},       {'>', {8, 4, 2, 1, 2, 4, 8}},
      {'=', {0, 0, 31, 0, 31, 0, 0}},      {':', {0, 12, 12, 0, 12, 12, 0}},
      {'(', {2, 4, 8, 8, 8, 4, 2}},        {')', {8, 4, 2, 2, 2, 4, 8}},
      {'/', {1, 1, 2, 4, 8, 16, 16}},      {'%', {24, 25, 2, 4, 8, 19, 3}}};
  const char u = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  for (const auto& g : table)
    if (g.c == u) return &g.r;
  return nullptr;
}

//! An 8-bit RGB image.
class Canvas {
 public:
  using Rgb = std::array<std::uint8_t, 3>;
  Canvas(int w, int h, Rgb bg) : w_(w), h_(h), px_(static_cast<std::size_t>(w) * h * 3) {
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) set(x, y, bg);
  }
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    const auto o =
        (static_cast<std::size_t>(y) * static_cast<std::size_t>(w_) + static_cast<std::size_t>(x)) *
        3;
    px_[o] = c[0], px_[o + 1] = c[1], px_[o + 2] = c[2];
  }
  //! A two-pixel frame.
  void rect(int x, int y, int w, int h, Rgb c) {
    for (int t = 0; t < 2; ++t) {
      for (int i = x; i < x + w; ++i) set(i, y + t, c), set(i, y + h - 1 - t, c);
      for (int j = y; j < y + h; ++j) set(x + t, j, c), set(x + w - 1 - t, j, c);
    }
  }
  //! Text at (x, y) (top left), each font pixel `scale` x `scale`.
  void text(int x, int y, std::string_view s, int scale, Rgb c) {
    for (char ch : s) {
      if (const auto* g = glyph(ch))
        for (int r = 0; r < 7; ++r)
          for (int b = 0; b < 5; ++b)
            if (((*g)[static_cast<std::size_t>(r)] >> (4 - b)) & 1)
              for (int dy = 0; dy < scale; ++dy)
                for (int dx = 0; dx < scale; ++dx) set(x + b * scale + dx, y + r * scale + dy, c);
      x += 6 * scale;
    }
  }
  void write_png(const std::string& path) const {
    if (!stbi_write_png(path.c_str(), w_, h_, 3, px_.data(), w_ * 3))
      throw unidiffuser::error("write_png", path, "cannot write the PNG file");
  }

 private:
  int w_, h_;
  std::vector<std::uint8_t> px_;
};

}  // namespace shapes
