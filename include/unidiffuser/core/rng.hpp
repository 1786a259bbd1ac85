// SPDX-License-Identifier: Apache-2.0
//! \file rng.hpp
//! Counter-based standard-normal noise (Philox-4x32-10 from Random123 + Box-Muller).
//!
//! A normal number is a pure function of (seed, stream, sample, element):
//!   key     = seed (64 bits)
//!   counter = { element / 4, sample, stream low 32 bits, stream high 32 bits }
//! and the four 32-bit outputs of one Philox block give four normals by two Box-Muller
//! transforms; element e takes output e % 4. So the noise of a sample depends neither on the batch
//! it is computed in, nor its position there, nor the number of threads, nor the backend: the
//! same function compiles for host and device (Random123 supports both).
//!
//! Limits: sample < 2^32 and element < 2^34 (per sample); `streams` separate independent uses
//! (initial state, each solver step's noise, each marginalisation draw) under one seed.
#pragma once

#include <Random123/philox.h>
#include <Random123/boxmuller.hpp>
#include <cstdint>

#include "unidiffuser/config.hpp"

namespace unidiffuser {

//! Four standard normals of Philox block `block` of (seed, stream, sample).
struct Normal4 {
  float v[4];
};

UNIDIFFUSER_HOST_DEVICE inline Normal4 philox_normal4(std::uint64_t seed, std::uint64_t stream,
                                                      std::uint64_t sample, std::uint64_t block) {
  using rng = r123::Philox4x32;
  rng gen;
  rng::key_type key = {{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  rng::ctr_type ctr = {{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(sample),
                        static_cast<std::uint32_t>(stream),
                        static_cast<std::uint32_t>(stream >> 32)}};
  const rng::ctr_type r = gen(ctr, key);
  const r123::float2 a = r123::boxmuller(r[0], r[1]);
  const r123::float2 b = r123::boxmuller(r[2], r[3]);
  return Normal4{{a.x, a.y, b.x, b.y}};
}

//! The standard normal number of element `element` of sample `sample` in (seed, stream).
UNIDIFFUSER_HOST_DEVICE inline float philox_normal(std::uint64_t seed, std::uint64_t stream,
                                                   std::uint64_t sample, std::uint64_t element) {
  return philox_normal4(seed, stream, sample, element >> 2).v[element & 3u];
}

//! A seed plus a stream id: the key of one independent noise tensor.
struct NoiseKey {
  std::uint64_t seed = 0;
  std::uint64_t stream = 0;
};

}  // namespace unidiffuser
