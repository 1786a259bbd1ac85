// SPDX-License-Identifier: Apache-2.0
//! \file tags.hpp
//! Backend tags and their execution contexts.
//!
//! Code above the backend layer (network, diffusion, samplers) is written once against the
//! primitives of `backend/<name>/ops.hpp`, selected by overload on the tag type (the pattern of
//! Thrust's execution policies). Every primitive takes the backend's `Context`, which carries what
//! a call needs to run: the thread count on the CPU, the stream and library handles on CUDA.
#pragma once

#include <type_traits>

namespace unidiffuser {

//! Host memory, computed with Eigen and plain loops (optionally OpenMP threads).
struct cpu {};
//! NVIDIA device memory (arrives with the CUDA backend; only usable when compiled by nvcc).
struct cuda {};
//! Host memory, computed by naive loops with double accumulation and no vectorisation or
//! threads: the oracle of the kernel tests and the proof that code above the primitives is
//! backend-generic (backend/reference/).
struct reference {};

namespace cpu_detail {
struct Region;
}

//! Execution context of a backend; the primary template is not usable.
template <class Backend>
struct Context {
  static_assert(sizeof(Backend) == 0,
                "unidiffuser::Context<B>: unknown backend tag; use unidiffuser::cpu, or "
                "unidiffuser::cuda from a translation unit compiled by nvcc");
};

//! CPU context: how many threads the primitives may use (0 = all available). `region` is set
//! by the CPU backend itself on the contexts it hands to code running inside one of its parallel
//! regions (ops::run_samples); users leave it null.
template <>
struct Context<cpu> {
  int threads = 0;
  cpu_detail::Region* region = nullptr;
};

//! Reference context: nothing to configure (single-threaded, host memory).
template <>
struct Context<reference> {};

template <class Backend>
inline constexpr bool is_backend_v = false;
template <>
inline constexpr bool is_backend_v<cpu> = true;
template <>
inline constexpr bool is_backend_v<cuda> = true;
template <>
inline constexpr bool is_backend_v<reference> = true;

//! Backends whose tensors live in host memory (element access allowed).
template <class Backend>
inline constexpr bool is_host_backend_v =
    std::is_same_v<Backend, cpu> || std::is_same_v<Backend, reference>;

}  // namespace unidiffuser
