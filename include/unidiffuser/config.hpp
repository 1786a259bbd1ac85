// SPDX-License-Identifier: Apache-2.0
//! \file config.hpp
//! Version, portability macros and feature switches shared by every header.
#pragma once

#define UNIDIFFUSER_VERSION_MAJOR 0
#define UNIDIFFUSER_VERSION_MINOR 1
#define UNIDIFFUSER_VERSION_PATCH 0

#if defined(__CUDACC__)
#define UNIDIFFUSER_HOST_DEVICE __host__ __device__
#define UNIDIFFUSER_DEVICE __device__
#define UNIDIFFUSER_HAS_CUDA 1
#else
#define UNIDIFFUSER_HOST_DEVICE
#define UNIDIFFUSER_DEVICE
#define UNIDIFFUSER_HAS_CUDA 0
#endif

#if defined(_MSC_VER)
#define UNIDIFFUSER_RESTRICT __restrict
#else
#define UNIDIFFUSER_RESTRICT __restrict__
#endif

namespace unidiffuser {
//! Library version as a (major, minor, patch) triple.
struct Version {
  int major, minor, patch;
};
inline constexpr Version version{UNIDIFFUSER_VERSION_MAJOR, UNIDIFFUSER_VERSION_MINOR,
                                 UNIDIFFUSER_VERSION_PATCH};
}  // namespace unidiffuser
