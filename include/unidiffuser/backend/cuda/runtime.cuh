// SPDX-License-Identifier: Apache-2.0
//! \file runtime.cuh
//! The CUDA backend's runtime: `Context<cuda>` (an explicit stream), device memory for
//! `Tensor<T, cuda>`, stream-ordered scratch, error checks that throw `unidiffuser::error`, the
//! cuBLASLt handle, host <-> device copies and the launch helpers of the kernels.
//!
//! Memory: tensors own `cudaMalloc` memory; temporaries of a primitive (upload of host scalars,
//! reduction partials, GEMM workspace) come from the device's default memory pool through
//! `cudaMallocAsync` / `cudaFreeAsync` on the context's stream, with the pool's release threshold
//! raised so that after the first step no call reaches the driver's allocator (stream-ordered
//! allocation). A failed allocation trims the pool and retries once. Uploads go through pinned
//! staging with a host-side wait on reuse, so a step is not yet capturable in a CUDA graph.
#pragma once

#if !defined(__CUDACC__)
#error "unidiffuser/backend/cuda/*.cuh are CUDA headers: compile this translation unit with nvcc"
#endif

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser {

// MathMode (fp32, tf32, bf16, fp16): backend/tags.hpp.

//! CUDA context: the stream every primitive is enqueued on (null: the legacy default stream)
//! and the math mode of fp32 networks (MathMode::fp32, exact, by default).
template <>
struct Context<cuda> {
  cudaStream_t stream = nullptr;
  MathMode math = MathMode::fp32;
};

namespace cuda_detail {

inline void check(cudaError_t e, const char* op, const char* what) {
  if (e != cudaSuccess)
    throw error(op, what,
                std::string("CUDA error ") + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
//! Throws if the last launch failed (configuration errors; faults surface at the next sync).
inline void check_launch(const char* op) {
  check(cudaGetLastError(), op, "kernel launch");
}
inline void check_blas(cublasStatus_t s, const char* op, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw error(op, what, "cuBLASLt status " + std::to_string(static_cast<int>(s)));
}

//! Number of CUDA devices (0 when there is no driver or device; never throws).
inline int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

//! The current device (throws on failure).
inline int current_device(const char* op) {
  int dev = 0;
  check(cudaGetDevice(&dev), op, "cudaGetDevice");
  return dev;
}

// Returns the cached memory of the current device's default pool to the driver (after a failed
// allocation: the pool keeps what cudaFreeAsync released, up to its raised threshold).
inline void trim_pool() noexcept {
  int dev = 0;
  cudaMemPool_t pool;
  if (cudaGetDevice(&dev) == cudaSuccess && cudaDeviceGetDefaultMemPool(&pool, dev) == cudaSuccess)
    (void)cudaMemPoolTrimTo(pool, 0);
}

// Raises the release threshold of the current device's default pool once per device, so that
// memory freed by cudaFreeAsync stays cached for the next step.
inline void configure_pool() {
  static std::mutex mu;
  static std::vector<int> done;
  int dev = 0;
  check(cudaGetDevice(&dev), "cuda::scratch", "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  for (int d : done)
    if (d == dev) return;
  cudaMemPool_t pool;
  check(cudaDeviceGetDefaultMemPool(&pool, dev), "cuda::scratch", "default memory pool");
  std::uint64_t threshold = UINT64_MAX;
  check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold), "cuda::scratch",
        "pool release threshold");
  done.push_back(dev);
}

//! Stream-ordered temporary device memory, freed (into the pool) on the stream at scope end.
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Context<cuda>& ctx, std::size_t bytes, const char* op) : stream_(ctx.stream) {
    if (bytes == 0) return;
    configure_pool();
    cudaError_t e = cudaMallocAsync(&p_, bytes, stream_);
    if (e == cudaErrorMemoryAllocation) {  // memory parked in the pool: release it, retry once
      (void)cudaGetLastError();
      (void)cudaStreamSynchronize(stream_);
      trim_pool();
      e = cudaMallocAsync(&p_, bytes, stream_);
    }
    check(e, op, "stream-ordered scratch allocation");
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch(Scratch&& o) noexcept : p_(o.p_), stream_(o.stream_) { o.p_ = nullptr; }
  Scratch& operator=(Scratch&& o) noexcept {
    if (this != &o) {
      if (p_) (void)cudaFreeAsync(p_, stream_);
      p_ = std::exchange(o.p_, nullptr);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~Scratch() {
    if (p_) (void)cudaFreeAsync(p_, stream_);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void* p_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

//! Pinned host staging for the small host -> device copies of a step (coefficients, row indices,
//! time embeddings): a per-thread ring of pinned chunks, each reused once the copy that last used
//! it has completed (an event), so that an upload never waits for the stream -- a copy from
//! pageable memory would synchronise the host with the device.
class Staging {
 public:
  Staging() = default;
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;
  ~Staging() {
    for (auto& c : ring_) {
      if (c.done) (void)cudaEventDestroy(c.done);
      if (c.p) (void)cudaFreeHost(c.p);
    }
  }
  //! Enqueues dst[0, n) = src[0, n) (n bytes) on the context's stream; src may be reused at return.
  void copy(const Context<cuda>& ctx, void* dst, const void* src, std::size_t n, const char* op) {
    if (n == 0) return;
    Chunk& c = ring_[next_];
    next_ = (next_ + 1) % ring_.size();
    if (c.done)
      check(cudaEventSynchronize(c.done), op, "staging buffer reuse");
    else
      check(cudaEventCreateWithFlags(&c.done, cudaEventDisableTiming), op, "staging event");
    if (c.bytes < n) {
      if (c.p) (void)cudaFreeHost(c.p);
      c.p = nullptr;
      c.bytes = 0;
      const std::size_t want = n < 4096 ? 4096 : n;
      check(cudaMallocHost(&c.p, want), op, "pinned staging allocation");
      c.bytes = want;
    }
    std::memcpy(c.p, src, n);
    check(cudaMemcpyAsync(dst, c.p, n, cudaMemcpyHostToDevice, ctx.stream), op, "upload");
    check(cudaEventRecord(c.done, ctx.stream), op, "staging event");
  }

 private:
  struct Chunk {
    void* p = nullptr;
    std::size_t bytes = 0;
    cudaEvent_t done = nullptr;
  };
  std::array<Chunk, 32> ring_{};
  std::size_t next_ = 0;
};
//! The calling thread's staging ring for the current device (events belong to a device).
inline Staging& staging() {
  thread_local std::vector<std::unique_ptr<Staging>> rings;
  const auto dev = static_cast<std::size_t>(current_device("cuda::upload"));
  if (rings.size() <= dev) rings.resize(dev + 1);
  if (!rings[dev]) rings[dev] = std::make_unique<Staging>();
  return *rings[dev];
}

//! Copies n host values into stream-ordered scratch through the pinned staging ring (no host
//! synchronisation; the host buffer may be reused at return).
template <class T>
Scratch upload(const Context<cuda>& ctx, const T* host, std::size_t n, const char* op) {
  Scratch s(ctx, n * sizeof(T), op);
  staging().copy(ctx, s.as<T>(), host, n * sizeof(T), op);
  return s;
}

//! Copies n device values to the host and waits for them.
template <class T>
void download(const Context<cuda>& ctx, const T* dev, T* host, std::size_t n, const char* op) {
  if (n)
    check(cudaMemcpyAsync(host, dev, n * sizeof(T), cudaMemcpyDeviceToHost, ctx.stream), op,
          "download of results");
  check(cudaStreamSynchronize(ctx.stream), op, "stream synchronisation");
}

//! The process's cuBLASLt handle (one per device, created on first use; cuBLASLt handles may be
//! shared between threads, and every call names its stream).
inline cublasLtHandle_t lt_handle() {
  static std::mutex mu;
  static std::vector<std::pair<int, cublasLtHandle_t>> handles;
  int dev = 0;
  check(cudaGetDevice(&dev), "cuda::gemm", "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  for (auto& [d, h] : handles)
    if (d == dev) return h;
  cublasLtHandle_t h = nullptr;
  check_blas(cublasLtCreate(&h), "cuda::gemm", "cublasLtCreate");
  handles.emplace_back(dev, h);
  return h;
}

//! Grid size for a grid-stride loop over n items with `threads` per block.
inline unsigned grid_for(std::int64_t n, int threads) {
  const std::int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

template <class F>
__global__ void for_each_kernel(std::int64_t n, F f) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
    f(i);
}
//! f(i) for i in [0, n) on the device (f a __device__ lambda or functor taken by value).
template <class F>
void for_each(const Context<cuda>& ctx, std::int64_t n, F f, const char* op) {
  if (n <= 0) return;
  for_each_kernel<<<grid_for(n, 256), 256, 0, ctx.stream>>>(n, f);
  check_launch(op);
}

//! Whether a block of 4-byte elements (data, samples, rows, cols, ld, stride) can be walked in
//! chunks of 4 consecutive columns with 16-byte accesses and 32-bit chunk numbers.
template <class P>
inline bool chunks4(const P& b) {
  using E = std::remove_cv_t<std::remove_pointer_t<decltype(b.data)>>;
  return sizeof(E) == 4 && b.cols % 4 == 0 && b.ld % 4 == 0 &&
         (b.samples <= 1 || b.stride % 4 == 0) &&
         reinterpret_cast<std::uintptr_t>(b.data) % 16 == 0 &&
         b.samples * b.rows * (b.cols / 4) < (std::int64_t{1} << 31);
}
template <class F>
__global__ void chunks4_kernel(std::uint32_t n, std::uint32_t per_row, std::uint32_t rows, F f) {
  for (std::uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < n;
       c += gridDim.x * blockDim.x) {
    const std::uint32_t row = c / per_row, s = row / rows;
    f(c, s, row - s * rows, (c - row * per_row) * 4);
  }
}
//! f(c, s, r, j) for every chunk c of the 4 columns [j, j + 4) of row r of sample s of an
//! [S; rows, cols] geometry (cols a multiple of 4, S rows cols / 4 < 2^31; chunks numbered in
//! (sample, row, column) order): 32-bit index arithmetic, one division pair per 4 elements.
template <class F>
void for_each_chunk4(const Context<cuda>& ctx, std::int64_t S, std::int64_t rows, std::int64_t cols,
                     F f, const char* op) {
  const std::int64_t n = S * rows * (cols / 4);
  if (n <= 0) return;
  chunks4_kernel<<<grid_for(n, 256), 256, 0, ctx.stream>>>(static_cast<std::uint32_t>(n),
                                                           static_cast<std::uint32_t>(cols / 4),
                                                           static_cast<std::uint32_t>(rows), f);
  check_launch(op);
}

}  // namespace cuda_detail

namespace detail {
//! Device memory of `Tensor<T, cuda>`: cudaMalloc'd (256-byte aligned), freed with cudaFree.
template <>
struct allocator<cuda> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaErrorMemoryAllocation) {  // scratch memory parked in the pool: release, retry
      (void)cudaGetLastError();
      (void)cudaDeviceSynchronize();
      cuda_detail::trim_pool();
      e = cudaMalloc(&p, bytes);
    }
    cuda_detail::check(e, "Tensor<cuda>",
                       ("allocation of " + std::to_string(bytes) + " bytes").c_str());
    return p;
  }
  static void deallocate(void* p) noexcept {
    if (p) (void)cudaFree(p);
  }
};
}  // namespace detail

namespace ops {

//! Waits for every primitive enqueued on the context's stream; throws on a device fault.
inline void synchronize(const Context<cuda>& ctx) {
  cuda_detail::check(cudaStreamSynchronize(ctx.stream), "ops::synchronize", "stream");
  cuda_detail::check(cudaGetLastError(), "ops::synchronize", "device");
}

//! Host -> device copy of a whole tensor (same element count).
template <class T>
void copy(const Context<cuda>& ctx, TensorView<const T, cpu> src, TensorView<T, cuda> dst) {
  if (src.size() != dst.size())
    throw_mismatch("ops::copy (host to device)", "dst", "element count", src.size(), dst.size());
  if (src.size())
    cuda_detail::check(cudaMemcpyAsync(dst.data(), src.data(), src.size() * sizeof(T),
                                       cudaMemcpyHostToDevice, ctx.stream),
                       "ops::copy (host to device)", "cudaMemcpyAsync");
}
//! Device -> host copy of a whole tensor; waits for the stream (the host values are ready).
template <class T>
void copy(const Context<cuda>& ctx, TensorView<const T, cuda> src, TensorView<T, cpu> dst) {
  if (src.size() != dst.size())
    throw_mismatch("ops::copy (device to host)", "dst", "element count", src.size(), dst.size());
  cuda_detail::download(ctx, src.data(), dst.data(), static_cast<std::size_t>(src.size()),
                        "ops::copy (device to host)");
}
//! A device copy of a host tensor.
template <class T>
Tensor<T, cuda> to_device(const Context<cuda>& ctx, TensorView<const T, cpu> src) {
  Tensor<T, cuda> d(src.shape());
  copy<T>(ctx, src, d.view());
  return d;
}
//! A host copy of a device tensor (waits for the stream).
template <class T>
Tensor<T, cpu> to_host(const Context<cuda>& ctx, TensorView<const T, cuda> src) {
  Tensor<T, cpu> h(src.shape());
  copy<T>(ctx, src, h.view());
  return h;
}

}  // namespace ops
}  // namespace unidiffuser
