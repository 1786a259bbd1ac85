// SPDX-License-Identifier: Apache-2.0
//! \file dtype.hpp
//! Element types: the compute types (float, double), 16-bit storage types (half, bfloat16) used
//! for checkpoint I/O, and the run-time `dtype` tag that names them in files.
#pragma once

#include <cstdint>
#include <cstring>
#include <string_view>

#include "unidiffuser/config.hpp"

namespace unidiffuser {

namespace detail {
UNIDIFFUSER_HOST_DEVICE inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
UNIDIFFUSER_HOST_DEVICE inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace detail

//! IEEE 754 binary16, a storage type only: convert to float to compute.
struct half_t {
  std::uint16_t bits = 0;

  UNIDIFFUSER_HOST_DEVICE static half_t from_bits(std::uint16_t b) {
    half_t h;
    h.bits = b;
    return h;
  }
  //! Round-to-nearest-even conversion (overflow to infinity, NaN preserved as quiet NaN).
  UNIDIFFUSER_HOST_DEVICE static half_t from_float(float f) {
    const std::uint32_t x = detail::float_bits(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u;
    const std::uint32_t absx = x & 0x7fffffffu;
    if (absx > 0x7f800000u) return from_bits(static_cast<std::uint16_t>(sign | 0x7e00u));
    if (absx >= 0x47800000u) return from_bits(static_cast<std::uint16_t>(sign | 0x7c00u));
    if (absx < 0x38800000u) {  // subnormal half (or zero)
      // value = absx as float; half subnormal unit is 2^-24.
      const float a = detail::bits_float(absx);
      const float scaled = a * 16777216.0f;  // a / 2^-24, exact for the range considered
      // round half to even
      std::uint32_t q = static_cast<std::uint32_t>(scaled);
      const float rem = scaled - static_cast<float>(q);
      if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
      return from_bits(static_cast<std::uint16_t>(sign | q));
    }
    std::uint32_t mant = absx & 0x007fffffu;
    std::uint32_t exp = (absx >> 23) - 127 + 15;
    std::uint32_t h = (exp << 10) | (mant >> 13);
    const std::uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent
    return from_bits(static_cast<std::uint16_t>(sign | h));
  }
  UNIDIFFUSER_HOST_DEVICE float to_float() const {
    const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
    const std::uint32_t exp = (bits >> 10) & 0x1fu;
    const std::uint32_t mant = bits & 0x3ffu;
    if (exp == 0) {
      const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
      return sign ? -v : v;
    }
    if (exp == 31) return detail::bits_float(sign | 0x7f800000u | (mant << 13));
    return detail::bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
  }
};

//! bfloat16 (the upper half of a binary32), a storage type only.
struct bfloat16_t {
  std::uint16_t bits = 0;

  UNIDIFFUSER_HOST_DEVICE static bfloat16_t from_bits(std::uint16_t b) {
    bfloat16_t h;
    h.bits = b;
    return h;
  }
  //! Round-to-nearest-even; NaN stays NaN.
  UNIDIFFUSER_HOST_DEVICE static bfloat16_t from_float(float f) {
    const std::uint32_t x = detail::float_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
      return from_bits(static_cast<std::uint16_t>((x >> 16) | 0x40u));
    const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
    return from_bits(static_cast<std::uint16_t>((x + rounding) >> 16));
  }
  UNIDIFFUSER_HOST_DEVICE float to_float() const {
    return detail::bits_float(static_cast<std::uint32_t>(bits) << 16);
  }
};

//! Element types that can appear in a checkpoint or golden file.
enum class dtype { f64, f32, f16, bf16, i64, i32, u8 };

//! Size in bytes of one element of `t`.
constexpr std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f64:
    case dtype::i64: return 8;
    case dtype::f32:
    case dtype::i32: return 4;
    case dtype::f16:
    case dtype::bf16: return 2;
    case dtype::u8: return 1;
  }
  return 0;
}

//! safetensors spelling of `t` ("F32", "BF16", ...).
constexpr std::string_view dtype_name(dtype t) {
  switch (t) {
    case dtype::f64: return "F64";
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::u8: return "U8";
  }
  return "?";
}

//! Parses a safetensors dtype string; returns false for names the library does not read.
constexpr bool parse_dtype(std::string_view s, dtype& out) {
  constexpr dtype all[] = {dtype::f64, dtype::f32, dtype::f16, dtype::bf16,
                           dtype::i64, dtype::i32, dtype::u8};
  for (dtype t : all) {
    if (dtype_name(t) == s) {
      out = t;
      return true;
    }
  }
  return false;
}

//! The `dtype` tag of a C++ element type.
template <class T>
struct dtype_of;
template <>
struct dtype_of<double> {
  static constexpr dtype value = dtype::f64;
};
template <>
struct dtype_of<float> {
  static constexpr dtype value = dtype::f32;
};
template <>
struct dtype_of<half_t> {
  static constexpr dtype value = dtype::f16;
};
template <>
struct dtype_of<bfloat16_t> {
  static constexpr dtype value = dtype::bf16;
};
template <>
struct dtype_of<std::int64_t> {
  static constexpr dtype value = dtype::i64;
};
template <>
struct dtype_of<std::int32_t> {
  static constexpr dtype value = dtype::i32;
};
template <>
struct dtype_of<std::uint8_t> {
  static constexpr dtype value = dtype::u8;
};

//! Accumulation type: float for the 16-bit storage types, the type itself otherwise.
template <class T>
struct accum {
  using type = T;
};
template <>
struct accum<half_t> {
  using type = float;
};
template <>
struct accum<bfloat16_t> {
  using type = float;
};
template <class T>
using accum_t = typename accum<T>::type;

}  // namespace unidiffuser
