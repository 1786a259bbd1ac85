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

//! How a backend computes fp32 networks (a context's `math`):
//! - fp32: exact fp32 arithmetic (the default; the backends agree to float rounding);
//! - tf32 (CUDA): GEMMs on TF32 tensor cores (10-bit mantissa operands, fp32 accumulation);
//! - bf16 / fp16: mixed precision -- master weights, activations, layer norm, softmax statistics,
//!   residuals and the sampler state stay fp32; the operands of the network's block GEMMs are
//!   rounded to 16 bits (weights once per parameter version, through the network's LinearCache)
//!   and products accumulate in fp32. The analogue of PyTorch's autocast, with fp32 activations.
//!   CUDA: bf16 and fp16 on tensor cores, attention's q, k, v rounded too. CPU: bf16 only, through
//!   oneDNN on CPUs with AVX512-BF16 or AMX (ops::math_supported says; elsewhere, and for fp16 or
//!   tf32, the CPU computes fp32); attention stays fp32.
enum class MathMode { fp32, tf32, bf16, fp16 };

//! CPU context: how many threads the primitives may use (0 = all available) and the math mode of
//! fp32 networks (MathMode::fp32, exact, by default; MathMode::bf16 where supported). `region`
//! is set by the CPU backend itself on the contexts it hands to code running inside one of its
//! parallel regions (ops::run_samples); users leave it null.
template <>
struct Context<cpu> {
  int threads = 0;
  MathMode math = MathMode::fp32;
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
