// SPDX-License-Identifier: Apache-2.0
//! \file wave.hpp
//! A third modality for the shapes world: the scene's "sound", a 64-sample signal whose waveform
//! encodes the same four attributes (the running example of docs/CUSTOM_LAYOUTS.md's three-group
//! model). For a scene with attributes (size, colour, shape, position) and a jitter u:
//!
//!   s[n] = A (1 + 0.1 u) env_shape(n) sin(2 pi (f_colour n / 64 + phi_position)),  n = 0..63
//!
//!   size      A = 0.5 (small) | 0.9 (large)
//!   colour    f = 2 | 3 | 4 | 5 cycles per signal
//!   shape     envelope: constant (circle) | rising n / 63 (square) | falling 1 - n / 63 (triangle)
//!   position  phi = 0 | 1/4 | 1/2 | 3/4 of a cycle (the quadrant's index / 4)
//!
//! The reader is a matched filter: the best least-squares fit a t of the signal by each of the 96
//! unit templates t (positive gain a), the template with the smallest residual naming colour, shape
//! and position, the gain naming the size; a signal whose best residual exceeds a third of its
//! energy, or whose gain lies outside [0.3, 1.2], is unreadable. Half a cycle of phase negates
//! every template, which is why the gain must be positive.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <span>

#include "world.hpp"

namespace shapes {

inline constexpr int kWave = 64;
inline constexpr std::array<double, 2> kWaveGain{0.5, 0.9};
inline constexpr std::array<int, 4> kWaveCycles{2, 3, 4, 5};

namespace detail {
inline double envelope(int shape, int n) {
  const double r = static_cast<double>(n) / (kWave - 1);
  return shape == 0 ? 1.0 : shape == 1 ? r : 1.0 - r;
}
//! The unit template of (colour, shape, position) at sample n.
inline double wave_template(int colour, int shape, int position, int n) {
  const double x = static_cast<double>(kWaveCycles[static_cast<std::size_t>(colour)]) * n / kWave +
                   position / 4.0;
  return envelope(shape, n) * std::sin(2 * 3.14159265358979323846 * x);
}
}  // namespace detail

//! The jitter of sample `index` under `seed`, in [-1, 1] (its own Philox stream, so the image and
//! the caption of the same scene do not change).
inline double wave_jitter(std::uint64_t seed, std::uint64_t index) {
  return 2 * detail::unit(detail::bits(seed, index, 2)[0]) - 1;
}

//! Renders the signal of attributes `a` with jitter u into `out` (64 values, within [-1, 1]).
inline void render_wave(const Attributes& a, double u, std::span<float> out) {
  const double g = kWaveGain[static_cast<std::size_t>(a[size_attr])] * (1 + 0.1 * u);
  for (int n = 0; n < kWave; ++n)
    out[static_cast<std::size_t>(n)] = static_cast<float>(
        g * detail::wave_template(a[colour_attr], a[shape_attr], a[position_attr], n));
}

//! Attributes of a signal (64 values); -1 everywhere when it cannot be read.
inline Attributes read_wave(std::span<const float> s) {
  double energy = 0;
  for (int n = 0; n < kWave; ++n)
    energy += static_cast<double>(s[static_cast<std::size_t>(n)]) * s[static_cast<std::size_t>(n)];
  Attributes best;
  if (!(energy > 1e-6)) return best;
  double best_res = INFINITY, best_gain = 0;
  for (int c = 0; c < kValues[colour_attr]; ++c)
    for (int h = 0; h < kValues[shape_attr]; ++h)
      for (int p = 0; p < kValues[position_attr]; ++p) {
        double st = 0, tt = 0;
        for (int n = 0; n < kWave; ++n) {
          const double t = detail::wave_template(c, h, p, n);
          st += s[static_cast<std::size_t>(n)] * t;
          tt += t * t;
        }
        const double gain = st / tt;
        if (gain <= 0) continue;
        const double res = energy - st * st / tt;  // |s - gain t|^2
        if (res < best_res) {
          best_res = res, best_gain = gain;
          best.v = {-1, c, h, p};
        }
      }
  // the gain is the peak amplitude of the envelope; small 0.45-0.55, large 0.81-0.99
  if (!(best_res <= energy / 3) || best_gain < 0.3 || best_gain > 1.2) return Attributes{};
  best.v[size_attr] = best_gain < 0.7 ? 0 : 1;
  return best;
}

}  // namespace shapes
