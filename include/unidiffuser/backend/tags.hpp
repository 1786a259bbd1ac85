// SPDX-License-Identifier: Apache-2.0
//! \file tags.hpp
//! Backend tags and their execution contexts.
//!
//! Code above the backend layer (network, diffusion, samplers) is written once against the
//! primitives of `backend/<name>/ops.hpp`, selected by overload on the tag type (the pattern of
//! Thrust's execution policies). Every primitive takes the backend's `Context`, which carries what
//! a call needs to run: the thread count on the CPU, the stream and library handles on CUDA.
#pragma once

namespace unidiffuser {

//! Host memory, computed with Eigen and plain loops (optionally OpenMP threads).
struct cpu {};
//! NVIDIA device memory (arrives with the CUDA backend; only usable when compiled by nvcc).
struct cuda {};

//! Execution context of a backend; the primary template is not usable.
template <class Backend>
struct Context {
  static_assert(sizeof(Backend) == 0,
                "unidiffuser::Context<B>: unknown backend tag; use unidiffuser::cpu, or "
                "unidiffuser::cuda from a translation unit compiled by nvcc");
};

//! CPU context: how many threads element-wise primitives may use (0 = all available).
template <>
struct Context<cpu> {
  int threads = 0;
};

template <class Backend>
inline constexpr bool is_backend_v = false;
template <>
inline constexpr bool is_backend_v<cpu> = true;
template <>
inline constexpr bool is_backend_v<cuda> = true;

}  // namespace unidiffuser
