// SPDX-License-Identifier: Apache-2.0
//! \file nn.hpp
//! The network primitives of the CPU backend, forward and backward, over batches of per-sample
//! row blocks (BatchBlock). The same functions with the same signatures exist for every backend
//! (backend/reference/nn.hpp); the network (nn/) is written once against them.
//!
//! Parallelism is this backend's business. A primitive splits its work into items whose sizes
//! depend only on the shapes (one sample times one column chunk of a product, one head, 32 rows
//! of a norm), so every element is computed by the same single-threaded kernel call whatever the
//! thread count, batch size or batch position: results are bit-identical per sample
//! (docs/NOTES.md, "Reproducibility"). Called with a user's context, a primitive runs its items on
//! `ctx.threads` OpenMP threads (all when 0) when there is enough work. `run_samples` runs a whole
//! network pass inside one parallel region: each thread first takes whole samples through every
//! layer (no synchronisation), then the team shares each primitive's items for the remaining
//! samples; the contexts it hands out carry that region and primitives follow it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "unidiffuser/backend/common.hpp"
#include "unidiffuser/backend/cpu/kernels.hpp"
#include "unidiffuser/backend/cpu/onednn.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__) && defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace unidiffuser {

namespace cpu_detail {
//! The first exception of a work item inside a parallel region, rethrown after it (an exception
//! must not leave an OpenMP region, and every thread must still meet every barrier).
struct ErrorSlot {
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::exception_ptr error;
  void capture() {
    std::lock_guard<std::mutex> lock(mu);
    if (!failed.exchange(true)) error = std::current_exception();
  }
  void rethrow() {
    if (error) std::rethrow_exception(error);
  }
};
//! What a context inside run_samples carries: the region's error slot and whether the team
//! shares a primitive's items (`shared`) or the calling thread runs them all.
struct Region {
  ErrorSlot* err = nullptr;
  bool shared = false;
};

//! Threads a primitive may use: ctx.threads, or all of OpenMP's (the element-wise ops' rule).
inline int thread_count(const Context<cpu>& ctx) {
  return ops::detail::thread_count(ctx);
}

//! Runs f(i) for items [0, n). Inside run_samples: on the calling thread, or shared by the team
//! (`omp for`, barrier at the end). Otherwise on up to ctx.threads threads when `work` (about
//! the element operations) makes the fork worth it. Exceptions reach the caller (after the
//! region).
template <class F>
void for_items(const Context<cpu>& ctx, std::int64_t n, double work, F&& f) {
  if (ctx.region) {
    ErrorSlot& err = *ctx.region->err;
    auto one = [&](std::int64_t i) {
      if (err.failed.load(std::memory_order_relaxed)) return;
      try {
        f(i);
      } catch (...) {
        err.capture();
      }
    };
    if (!ctx.region->shared) {
      for (std::int64_t i = 0; i < n; ++i) one(i);
      return;
    }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic)
#endif
    for (std::int64_t i = 0; i < n; ++i) one(i);
    return;
  }
#if defined(_OPENMP)
  const int nt = thread_count(ctx);
  if (nt > 1 && n > 1 && work >= 32768.0 && !omp_in_parallel()) {
    ErrorSlot err;
#pragma omp parallel for schedule(dynamic) num_threads(nt)
    for (std::int64_t i = 0; i < n; ++i) {
      if (err.failed.load(std::memory_order_relaxed)) continue;
      try {
        f(i);
      } catch (...) {
        err.capture();
      }
    }
    err.rethrow();
    return;
  }
#endif
  (void)work;
  for (std::int64_t i = 0; i < n; ++i) f(i);
}

//! Whether a primitive's items can be whole samples: the calling thread runs every item anyway
//! (inside run_samples' per-thread pass, or one thread), or the samples split evenly over the
//! threads for_items would use. Otherwise (run_samples' shared pass of the batch's remainder, an
//! uneven batch) finer items keep the threads busy.
inline bool samples_suffice(const Context<cpu>& ctx, std::int64_t samples) {
  if (ctx.region) return !ctx.region->shared;
  const int nt = thread_count(ctx);
#if defined(_OPENMP)
  if (omp_in_parallel()) return true;
#endif
  return nt <= 1 || samples % nt == 0;
}

//! Output columns of one work item of a product: about a quarter of the outputs, 64 to 256 wide
//! (a multiple of 64: oneDNN's packed fp32 and bf16 weight layouts block the outputs by 64, so
//! such a chunk packs without padding, in place too), so a small layer still splits over threads
//! and a large one makes few calls. Depends only on the product's shape.
inline std::int64_t col_width(std::int64_t n) {
  if (n <= 64) return std::max<std::int64_t>(n, 1);
  return std::min<std::int64_t>(256, ((n + 3) / 4 + 63) / 64 * 64);
}
inline std::int64_t col_chunks(std::int64_t n) {
  return (n + col_width(n) - 1) / col_width(n);
}
inline constexpr std::int64_t kRowChunk = 32;
inline std::int64_t row_chunks(std::int64_t m) {
  return (m + kRowChunk - 1) / kRowChunk;
}

#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
//! The oneDNN products of the backward (plain weights; one process-wide primitive cache).
inline onednn::Gemm& backward_gemm() {
  static onednn::Gemm g;
  return g;
}
#endif

//! Per-thread scratch of `n` elements, 64-byte aligned, grown and kept.
template <class T>
T* scratch(std::int64_t n, int which = 0) {
  thread_local cpu_kernels::AlignedVector<T> buf[2];
  auto& b = buf[which];
  if (b.size() < static_cast<std::size_t>(n)) b.resize(static_cast<std::size_t>(n));
  return b.data();
}
}  // namespace cpu_detail

namespace ops {

// ---------------------------------------------------------------------------------------------
// Execution

//! Runs a network pass over `samples` samples: f(ctx, s0, s1) processes samples [s0, s1) with
//! every primitive call taking the context it is given. With `whole_samples`, each of the
//! ctx.threads threads first runs B / threads whole samples on its own, then the team runs the
//! remaining B mod threads samples sharing each primitive's items; without it (tracing), all
//! samples go the shared way (so that `once` sees the whole batch).
template <class F>
void run_samples(const Context<cpu>& ctx, std::int64_t samples, F&& f, bool whole_samples = true) {
  if (samples <= 0) return;
  [[maybe_unused]] const int threads = cpu_detail::thread_count(ctx);
  cpu_detail::ErrorSlot err;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
#if defined(_OPENMP)
    const std::int64_t team = omp_get_num_threads(), tid = omp_get_thread_num();
#else
    const std::int64_t team = 1, tid = 0;
#endif
    const std::int64_t per = whole_samples ? samples / team : 0;
    cpu_detail::Region own{&err, false}, shared{&err, true};
    if (per > 0) {
      try {
        Context<cpu> c = ctx;
        c.region = &own;
        f(c, tid * per, (tid + 1) * per);
      } catch (...) {
        err.capture();
      }
    }
    if (per * team < samples) {
      try {
        Context<cpu> c = ctx;
        c.region = &shared;
        f(c, per * team, samples);
      } catch (...) {
        err.capture();
      }
    }
  }
  err.rethrow();
}

//! Runs f once: inside run_samples' shared pass by one thread of the team (the others wait),
//! else on the calling thread. For host-side work on a whole batch (tracing).
template <class F>
void once(const Context<cpu>& ctx, F&& f) {
  if (ctx.region && ctx.region->shared) {
#if defined(_OPENMP)
#pragma omp single
#endif
    {
      try {
        if (!ctx.region->err->failed.load()) f();
      } catch (...) {
        ctx.region->err->capture();
      }
    }
    return;
  }
  f();
}

//! Waits for the work queued on ctx: CPU calls return when their work is done, so there is
//! nothing to wait for (generic code can call it on any backend).
inline void synchronize(const Context<cpu>&) {}

//! The part of a call's work to count for the calling thread: 1 / the team's size inside
//! run_samples' shared pass (the team runs each call together), else 1. For accounting such as
//! nn::LayerProfile's.
inline double work_share([[maybe_unused]] const Context<cpu>& ctx) {
#if defined(_OPENMP)
  if (ctx.region && ctx.region->shared) return 1.0 / omp_get_num_threads();
#endif
  return 1.0;
}

// ---------------------------------------------------------------------------------------------
// Packed weights (oneDNN): a CPU-backend cache of reordered copies of weight matrices

//! Reordered weight matrices for oneDNN's matmul (builds with UNIDIFFUSER_WITH_ONEDNN;
//! elsewhere it packs nothing), for one math mode each: fp32, or bf16 where the CPU has bf16
//! instructions (supports()). Each column chunk of a weight (the rows one work item of `linear`
//! uses) is packed on its own, either as a copy beside the plain weight (`prepare`: the plain
//! weights stay where they are, read-only) or in the weight's own storage (`pack_in_place`: no
//! extra memory, and the storage holds the packed layout until `unpack_in_place`). bf16 in place
//! takes the first half of the storage and hands the other half's whole pages back to the
//! system (Linux), so the block weights take half the memory; unpacking it restores the
//! bf16-rounded values (an inference layout: the fp32 values are gone). A weight's chunks lie
//! one after the other (in place: piece after piece), so they also form the whole weight packed
//! (Entry::whole, checked), which `linear` uses for one product per sample where the samples
//! alone keep the threads busy. A network keeps
//! one cache, fills it once per mode and passes it to `linear`, which uses the entries of its
//! context's math mode.
template <class T>
class LinearCache<T, cpu> {
 public:
  static constexpr bool available = onednn::available && std::is_same_v<T, float>;
  static constexpr bool in_place_available = available;
  //! Whether weights can be packed for `math`: fp32 with oneDNN, bf16 where the CPU also has
  //! bf16 instructions.
  bool supports(MathMode math) const {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (available) {
      if (math == MathMode::fp32) return true;
      if (math == MathMode::bf16) return gemm_.bf16();
    }
#endif
    (void)math;
    return false;
  }
  //! Packs a copy for `math` of every weight not yet packed for it (thread-safe; a no-op where
  //! the mode is not supported).
  void prepare(std::span<const RowBlock<const T, cpu>> weights, MathMode math = MathMode::fp32) {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (available) {
      if (!supports(math)) return;
      std::lock_guard<std::mutex> lock(mu_);
      const bool b16 = math == MathMode::bf16;
      for (const auto& w : weights) {
        const std::int64_t n = w.rows, k = w.cols, cw = cpu_detail::col_width(n);
        if (b16) {
          copy16(w.data, n, k, w.ld);
          continue;
        }
        // each chunk in its packed layout (padded where its width is not a multiple of the
        // layout's block), reordered straight from the plain weight; a stale copy of the same
        // shape is repacked in its own storage
        auto it = map_.find(w.data);
        if (it != map_.end() && !it->second.stale) continue;
        if (it != map_.end() && (it->second.n != n || it->second.k != k)) {
          map_.erase(it);
          it = map_.end();
        }
        const bool fresh = it == map_.end();
        if (fresh) {
          Entry e;
          e.n = n;
          e.k = k;
          std::vector<std::size_t> at;
          std::size_t total = 0;
          for (std::int64_t c = 0; c < cpu_detail::col_chunks(n); ++c) {
            at.push_back(total);
            total += (gemm_.packed_bytes(std::min(cw, n - c * cw), k) + 63) / 64 * 16;
          }
          e.data.assign(total, 0.f);
          for (std::size_t off : at) e.chunks.push_back(e.data.data() + off);
          it = map_.emplace(w.data, std::move(e)).first;
        }
        Entry& e = it->second;
        for (std::int64_t c = 0; c < cpu_detail::col_chunks(n); ++c) {
          const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
          // the chunk lies in e.data, which this cache owns
          auto* dst = static_cast<float*>(const_cast<void*>(e.chunks[static_cast<std::size_t>(c)]));
          gemm_.pack_copy(w.data + r0 * w.ld, nr, k, w.ld, dst);
        }
        if (fresh) e.whole = whole_of(w.data, n, k, w.ld, e.chunks, false);
        e.stale = false;
      }
      (b16 ? ready16_ : ready_).store(true);
    }
#else
    (void)weights;
    (void)math;
#endif
  }
  //! Packs each matrix in its own storage for `math`: m.w is W [rows, pieces x k] with
  //! contiguous rows (ld = cols), used by `linear` as `pieces` weights side by side (piece p: the
  //! RowBlock at m.w.data + p k, k columns, ld = cols). A matrix whose packed layout would not
  //! fit, or whose rows are not contiguous, stays plain (linear takes the plain path for it).
  //! Every matrix packed in place holds one mode: call unpack_in_place() before packing for
  //! another (unidiffuser::error otherwise). Thread-safe; a no-op where the mode is not supported.
  void pack_in_place(std::span<const InPlaceWeight<T, cpu>> matrices,
                     MathMode math = MathMode::fp32) {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (available) {
      if (!supports(math)) return;
      std::lock_guard<std::mutex> lock(mu_);
      if (!in_place_.empty() && in_place_math_ != math)
        throw error("LinearCache::pack_in_place", "weights",
                    "packed in place for another math mode; unpack_in_place() first");
      in_place_math_ = math;
      for (const auto& m : matrices) {
        const std::int64_t n = m.w.rows, K = m.w.cols, pieces = m.pieces;
        if (pieces < 1 || K % pieces != 0 || m.w.ld != K) continue;
        if (math == MathMode::bf16) {
          pack16_in_place(m);
          continue;
        }
        if (map_.count(m.w.data)) continue;
        const std::int64_t k = K / pieces, cw = cpu_detail::col_width(n),
                           nch = cpu_detail::col_chunks(n);
        if (!fits(n, k)) continue;
        // every piece's chunks packed one after the other (each takes its plain size), piece
        // after piece, through a temporary of the matrix's size: the matrix is unchanged until
        // all are made, and each piece is then also its whole packed weight where the layout
        // allows (Entry::whole)
        cpu_kernels::AlignedVector<float> tmp(static_cast<std::size_t>(n * K));
        for (std::int64_t p = 0; p < pieces; ++p)
          for (std::int64_t c = 0; c < nch; ++c) {
            const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
            gemm_.pack_copy(m.w.data + r0 * K + p * k, nr, k, K, tmp.data() + p * n * k + r0 * k);
          }
        std::vector<const void*> first;
        for (std::int64_t c = 0; c < nch; ++c) first.push_back(tmp.data() + c * cw * k);
        const bool whole = whole_of(m.w.data, n, k, K, first, false);
        std::copy(tmp.begin(), tmp.end(), m.w.data);
        for (std::int64_t p = 0; p < pieces; ++p) {
          Entry e;
          for (std::int64_t c = 0; c < nch; ++c)
            e.chunks.push_back(m.w.data + p * n * k + c * cw * k);
          e.whole = whole;
          map_.emplace(m.w.data + p * k, std::move(e));
        }
        in_place_.push_back(m);
      }
      (math == MathMode::bf16 ? ready16_ : ready_).store(true);
    }
#else
    (void)matrices;
    (void)math;
#endif
  }
  //! Restores the plain layout of every matrix packed in place (bf16: the rounded values) and
  //! forgets every packed weight.
  void unpack_in_place() {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (available) {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<char> tmp;
      for (const auto& m : in_place_) {
        const std::int64_t n = m.w.rows, K = m.w.cols, k = K / m.pieces;
        const std::int64_t cw = cpu_detail::col_width(n);
        if (in_place_math_ == MathMode::bf16) {  // the packed bytes first: they span many rows
          const auto at = offsets16(n, k);
          const char* start = reinterpret_cast<const char*>(m.w.data);
          tmp.assign(start, start + at.back() * static_cast<std::size_t>(m.pieces));
          for (std::int64_t p = 0; p < m.pieces; ++p)
            for (std::int64_t c = 0; c < cpu_detail::col_chunks(n); ++c) {
              const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
              gemm_.unpack16(tmp.data() + static_cast<std::size_t>(p) * at.back() +
                                 at[static_cast<std::size_t>(c)],
                             nr, k, m.w.data + r0 * K + p * k, K);
            }
          continue;
        }
        const std::vector<float> packed(m.w.data, m.w.data + n * K);  // pack_in_place's order
        for (std::int64_t p = 0; p < m.pieces; ++p)
          for (std::int64_t c = 0; c < cpu_detail::col_chunks(n); ++c) {
            const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
            gemm_.unpack_copy(packed.data() + p * n * k + r0 * k, nr, k, m.w.data + r0 * K + p * k,
                              K);
          }
      }
      in_place_.clear();
      map_.clear();
      map16_.clear();
      ready_.store(false);
      ready16_.store(false);
    }
#endif
  }
  //! Whether some matrix holds the packed layout in its own storage.
  bool packed_in_place() const {
    std::lock_guard<std::mutex> lock(mu_);
    return !in_place_.empty();
  }
  //! The math mode of the matrices packed in place (fp32 when none is).
  MathMode in_place_math() const {
    std::lock_guard<std::mutex> lock(mu_);
    return in_place_.empty() ? MathMode::fp32 : in_place_math_;
  }
  //! Forgets every packed copy (after the weights changed). Matrices packed in place must be
  //! unpacked first (unidiffuser::error otherwise: their storage does not hold plain weights).
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_place_.empty())
      throw error(
          "LinearCache::clear", "weights",
          "packed in place: their storage does not hold plain values; unpack_in_place() first");
    map_.clear();
    map16_.clear();
    ready_.store(false);
    ready16_.store(false);
  }
  //! As clear() for the weights' values, keeping the storage of the fp32 copies: the next
  //! prepare() repacks each weight of the same shape into its old copy (a training step changes
  //! every weight; no reallocation, no fresh pages).
  void invalidate() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_place_.empty())
      throw error(
          "LinearCache::invalidate", "weights",
          "packed in place: their storage does not hold plain values; unpack_in_place() first");
    for (auto& kv : map_) kv.second.stale = true;
    map16_.clear();
    ready_.store(false);
    ready16_.store(false);
  }
  bool empty() const {
    return !ready_.load() && !ready16_.load();
  }
  //! Whether weights were packed for `math` since the last clear.
  bool ready(MathMode math) const {
    return math == MathMode::bf16 ? ready16_.load() : math == MathMode::fp32 && ready_.load();
  }
  //! Elements (4 bytes each) held in packed copies beside the plain weights; weights packed in
  //! place take none.
  std::int64_t packed_elements() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::int64_t n = 0;
    for (const auto* m : {&map_, &map16_})
      for (const auto& [k, v] : *m) n += static_cast<std::int64_t>(v.data.size());
    return n;
  }

  // Backend internals (used by ops::linear).
  struct Entry {
    cpu_kernels::AlignedVector<float> data;  // a copy's storage (empty when packed in place)
    std::vector<const void*> chunks;         // packed column chunk c of the weight
    std::int64_t n = 0, k = 0;               // a copy's weight shape
    bool stale = false;                      // invalidated: the weights changed since packing
    bool whole = false;  // chunks[0] is also the whole weight packed (all columns): whole_of
  };
  //! The packed weight w for `math`, or null.
  const Entry* find(const T* w, MathMode math = MathMode::fp32) const {
    if (!ready(math)) return nullptr;
    const auto& m = math == MathMode::bf16 ? map16_ : map_;
    auto it = m.find(w);
    return it == m.end() || it->second.stale ? nullptr : &it->second;
  }
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  onednn::Gemm& gemm() const {
    return gemm_;
  }
#endif

 private:
  // Whether every column chunk of W [n, k] packs into its own storage.
  bool fits([[maybe_unused]] std::int64_t n, [[maybe_unused]] std::int64_t k) const {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    const std::int64_t cw = cpu_detail::col_width(n);
    for (std::int64_t c = 0; c < cpu_detail::col_chunks(n); ++c)
      if (!gemm_.fits(std::min(cw, n - c * cw), k)) return false;
    return true;
#else
    return false;
#endif
  }
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  // Byte offsets of the column chunks of W [n, k] packed as bf16 one after the other (one more
  // entry: the total).
  std::vector<std::size_t> offsets16(std::int64_t n, std::int64_t k) {
    const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
    std::vector<std::size_t> at{0};
    for (std::int64_t c = 0; c < nch; ++c)
      at.push_back(at.back() + gemm_.packed16_bytes(std::min(cw, n - c * cw), k));
    return at;
  }
  // Whether the packed column chunks of W [n, k] (row stride ld) at `chunks` (fp32, or bf16
  // with `b16`) lie one after the other and are byte for byte W packed whole -- as when
  // oneDNN's layout blocks the outputs by 64 and the chunks are multiples of 64 wide -- so that
  // chunks[0] is also the whole packed weight, and one product over all the columns gives the
  // chunks' products bit for bit (tested). Checked once per weight, by packing it whole.
  bool whole_of(const T* w, std::int64_t n, std::int64_t k, std::int64_t ld,
                const std::vector<const void*>& chunks, bool b16) {
    const std::int64_t cw = cpu_detail::col_width(n);
    const char* base = static_cast<const char*>(chunks[0]);
    std::size_t off = 0;
    for (std::size_t c = 0; c < chunks.size(); ++c) {
      if (static_cast<const char*>(chunks[c]) != base + off) return false;
      const std::int64_t nr = std::min(cw, n - static_cast<std::int64_t>(c) * cw);
      off += b16 ? gemm_.packed16_bytes(nr, k) : gemm_.packed_bytes(nr, k);
    }
    if ((b16 ? gemm_.packed16_bytes(n, k) : gemm_.packed_bytes(n, k)) != off) return false;
    cpu_kernels::AlignedVector<float> whole((off + 3) / 4);
    if (b16)
      gemm_.pack16(w, n, k, ld, whole.data());
    else
      gemm_.pack_copy(w, n, k, ld, whole.data());
    const char* wb = reinterpret_cast<const char*>(whole.data());
    return std::equal(wb, wb + off, base);
  }
  // bf16 in place: all pieces' chunks packed one after the other at the matrix's start (piece
  // after piece: each piece is then its whole-width packed matrix too), through a temporary of
  // that size (about half the matrix); the whole pages of the rest go back to the system. The
  // matrix is unchanged until every layout is made.
  void pack16_in_place(const InPlaceWeight<T, cpu>& m) {
    const std::int64_t n = m.w.rows, K = m.w.cols, pieces = m.pieces, k = K / pieces;
    const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
    if (map16_.count(m.w.data)) return;
    const auto at = offsets16(n, k);
    const std::size_t piece = at.back(), total = piece * static_cast<std::size_t>(pieces);
    if (total > static_cast<std::size_t>(n * K) * sizeof(float)) {
      // does not fit (a small matrix padded to oneDNN's blocks): bf16 copies instead, so the
      // products are those of the copies' path
      for (std::int64_t p = 0; p < pieces; ++p) copy16(m.w.data + p * k, n, k, K);
      return;
    }
    std::vector<char> tmp(total);
    for (std::int64_t p = 0; p < pieces; ++p)
      for (std::int64_t c = 0; c < nch; ++c) {
        const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
        gemm_.pack16(
            m.w.data + r0 * K + p * k, nr, k, K,
            tmp.data() + static_cast<std::size_t>(p) * piece + at[static_cast<std::size_t>(c)]);
      }
    std::vector<const void*> first;
    for (std::int64_t c = 0; c < nch; ++c)
      first.push_back(tmp.data() + at[static_cast<std::size_t>(c)]);
    const bool whole = whole_of(m.w.data, n, k, K, first, true);
    char* start = reinterpret_cast<char*>(m.w.data);
    std::copy_n(tmp.data(), total, start);
    release(start + total, start + static_cast<std::size_t>(n * K) * sizeof(float));
    for (std::int64_t p = 0; p < pieces; ++p) {
      Entry e;
      for (std::int64_t c = 0; c < nch; ++c)
        e.chunks.push_back(start + static_cast<std::size_t>(p) * piece +
                           at[static_cast<std::size_t>(c)]);
      e.whole = whole;
      map16_.emplace(m.w.data + p * k, std::move(e));
    }
    in_place_.push_back(m);
  }
  // A packed bf16 copy of W [n, k] (row stride ld), its column chunks one after the other.
  void copy16(const T* w, std::int64_t n, std::int64_t k, std::int64_t ld) {
    if (map16_.count(w)) return;
    const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
    const auto at = offsets16(n, k);
    Entry e;
    e.data.assign((at.back() + 3) / 4, 0.f);
    char* base = reinterpret_cast<char*>(e.data.data());
    for (std::int64_t c = 0; c < nch; ++c) {
      const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
      gemm_.pack16(w + r0 * ld, nr, k, ld, base + at[static_cast<std::size_t>(c)]);
      e.chunks.push_back(base + at[static_cast<std::size_t>(c)]);
    }
    e.whole = whole_of(w, n, k, ld, e.chunks, true);
    map16_.emplace(w, std::move(e));
  }
  // Hands the whole pages inside [a, b) back to the system (their contents become zeros on the
  // next touch); elsewhere than Linux nothing is released.
  static void release([[maybe_unused]] char* a, [[maybe_unused]] char* b) {
#if defined(__linux__)
    const auto page = static_cast<std::uintptr_t>(sysconf(_SC_PAGESIZE));
    const std::uintptr_t lo = (reinterpret_cast<std::uintptr_t>(a) + page - 1) / page * page;
    const std::uintptr_t hi = reinterpret_cast<std::uintptr_t>(b) / page * page;
    if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
#endif
  }
#endif
  mutable std::mutex mu_;
  std::atomic<bool> ready_{false}, ready16_{false};
  std::unordered_map<const T*, Entry> map_, map16_;
  std::vector<InPlaceWeight<T, cpu>> in_place_;
  MathMode in_place_math_ = MathMode::fp32;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  mutable onednn::Gemm gemm_;
#endif
};

//! Whether the CPU backend computes `math` as asked (fp32 always; bf16 in oneDNN builds on CPUs
//! with AVX512-BF16 or AMX); where not, a network computes fp32.
inline bool math_supported(const Context<cpu>&, MathMode math) {
  if (math == MathMode::fp32) return true;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  if (math == MathMode::bf16) return cpu_detail::backward_gemm().bf16();
#endif
  return false;
}

// ---------------------------------------------------------------------------------------------
// Linear layers

namespace detail {
// db[r0 + j] += the sum of dy's column r0 + j over samples and rows, for j < nr: added in the
// order of the samples and rows, into a local copy (so the adds vectorise across columns).
template <class T>
void bias_grad(BatchBlock<const T, cpu> dy, std::int64_t r0, std::int64_t nr, T* db) {
  constexpr std::int64_t kCols = 256;
  for (std::int64_t j0 = 0; j0 < nr; j0 += kCols) {
    const std::int64_t nj = std::min(kCols, nr - j0);
    T acc[kCols];
    std::copy_n(db + r0 + j0, nj, acc);
    for (std::int64_t s = 0; s < dy.samples; ++s)
      for (std::int64_t i = 0; i < dy.rows; ++i) {
        const T* d = dy.data + s * dy.stride + i * dy.ld + r0 + j0;
        for (std::int64_t j = 0; j < nj; ++j) acc[j] += d[j];
      }
    std::copy_n(acc, nj, db + r0 + j0);
  }
}
template <class X, class Y>
void check_linear(const char* op, const X& x, std::int64_t k, const Y& y, std::int64_t n) {
  check_batch(op, "x", x, x.samples, x.rows, k);
  check_batch(op, "y", y, x.samples, x.rows, n);
}
}  // namespace detail

//! y_s = x_s w^T + b (Epilogue::none), GELU of it (gelu) or y_s += x_s w^T + b (accumulate) for
//! every sample: x [S; m, k], w [n, k] (row-major nn.Linear weight, rows w.ld apart), b [n] or
//! null, y [S; m, n]. `cache`: packed copies of the weights (oneDNN) where prepared.
template <class T>
void linear(const Context<cpu>& ctx, BatchBlock<const T, cpu> x, RowBlock<const T, cpu> w,
            const T* b, BatchBlock<T, cpu> y, Epilogue ep,
            const LinearCache<T, cpu>* cache = nullptr) {
  detail::check_linear("ops::linear", x, w.cols, y, w.rows);
  const std::int64_t m = x.rows, k = w.cols, n = w.rows;
  if (m == 0 || n == 0) return;
  const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
  // the weight packed for the context's math mode (bf16 where prepared), else for fp32
  [[maybe_unused]] const bool b16 =
      ctx.math == MathMode::bf16 && cache && cache->find(w.data, MathMode::bf16);
  [[maybe_unused]] const auto* packed =
      cache ? cache->find(w.data, b16 ? MathMode::bf16 : MathMode::fp32) : nullptr;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  // bf16: a sample's rows are rounded once per call and thread, for all the column chunks the
  // thread runs for it in a row (items go chunk-fastest); the call's number tells calls apart
  static std::atomic<std::uint64_t> calls{0};
  const std::uint64_t call = b16 ? ++calls : 0;
  struct Rounded {
    std::uint64_t call = 0;
    std::int64_t sample = -1;
  };
  thread_local Rounded last;
#endif
  // a weight packed whole (see LinearCache): one product per sample over all the columns -- one
  // call instead of one per chunk (bf16: a contiguous output, no staging) -- where the samples
  // alone share out the threads' work (bf16's accumulation is staged either way: chunks)
  [[maybe_unused]] const bool whole = packed && packed->whole &&
                                      !(b16 && ep == Epilogue::accumulate) &&
                                      cpu_detail::samples_suffice(ctx, x.samples);
  const std::int64_t items = whole ? x.samples : x.samples * nch;
  cpu_detail::for_items(
      ctx, items, 2.0 * static_cast<double>(x.samples * m * n * k), [&](std::int64_t it) {
        const std::int64_t s = whole ? it
                               : b16 ? it / nch
                                     : it % x.samples,
                           c = whole ? 0
                               : b16 ? it % nch
                                     : it / x.samples;
        const std::int64_t c0 = c * cw, nc = whole ? n : std::min(cw, n - c0);
        const T* bc = b ? b + c0 : nullptr;
        T* yc = y.data + s * y.stride + c0;
        const T* xs = x.data + s * x.stride;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
        if constexpr (std::is_same_v<T, float>) {
          if (packed) {
            const auto post = ep == Epilogue::gelu         ? onednn::Post::gelu
                              : ep == Epilogue::accumulate ? onednn::Post::accumulate
                                                           : onednn::Post::none;
            const void* wc = packed->chunks[static_cast<std::size_t>(c)];
            if (b16) {
              auto* x16 = cpu_detail::scratch<std::uint16_t>(m * k);
              if (last.call != call || last.sample != s) {
                onednn::Gemm::round_rows(xs, m, k, x.ld, x16);
                last = {call, s};
              }
              cache->gemm().linear16(x16, m, k, wc, nc, bc, yc, y.ld, post);
            } else
              cache->gemm().linear(xs, m, k, x.ld, static_cast<const float*>(wc), nc, bc, yc, y.ld,
                                   post);
            return;
          }
        }
#endif
        cpu_kernels::linear(xs, m, k, x.ld, w.data + c0 * w.ld, nc, w.ld, bc, yc, y.ld,
                            ep == Epilogue::accumulate);
        if (ep == Epilogue::gelu)
          for (std::int64_t i = 0; i < m; ++i)
            cpu_kernels::bias_gelu(yc + i * y.ld, 1, nc, static_cast<const T*>(nullptr));
      });
}

//! Backward of linear: dx_s (+)= dy_s w (dx null: not wanted), dw += sum_s dy_s^T x_s (dw null:
//! not wanted), db += the sum of dy over samples and rows (null: not wanted). dW and db are
//! split by rows of w and each chunk sums the samples in order (deterministic).
template <class T>
void linear_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> x, RowBlock<const T, cpu> w,
                     BatchBlock<const T, cpu> dy, BatchBlock<T, cpu> dx, bool accumulate_dx,
                     RowBlock<T, cpu> dw, T* db) {
  const char* op = "ops::linear_backward";
  const std::int64_t S = dy.samples, m = dy.rows, k = w.cols, n = w.rows;
  check_batch(op, "dy", dy, S, m, n);
  if (dx) {
    check_batch(op, "dx", dx, S, m, k);
    const std::int64_t cw = cpu_detail::col_width(k), nch = cpu_detail::col_chunks(k);
    cpu_detail::for_items(
        ctx, S * nch, 2.0 * static_cast<double>(S * m * n * k), [&](std::int64_t it) {
          const std::int64_t s = it % S, c = it / S;
          const std::int64_t c0 = c * cw, nc = std::min(cw, k - c0);
          T* o = dx.data + s * dx.stride + c0;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
          if constexpr (std::is_same_v<T, float>) {  // dY W through oneDNN
            cpu_detail::backward_gemm().matmul(dy.data + s * dy.stride, m, n, dy.ld, 1, w.data + c0,
                                               nc, w.ld, 1, o, dx.ld, accumulate_dx);
            return;
          }
#endif
          if (!accumulate_dx)
            for (std::int64_t i = 0; i < m; ++i) std::fill_n(o + i * dx.ld, nc, T(0));
          cpu_kernels::detail::gemm_nt_accumulate<T, Eigen::ColMajor>(
              dy.data + s * dy.stride, m, n, dy.ld, w.data + c0, nc, w.ld, o, dx.ld);
        });
  }
  if (dw.data || db) {
    check_batch(op, "x", x, S, m, k);
    if (dw.data && (dw.rows != n || dw.cols != k))
      throw_mismatch(op, "dw", "shape", "[" + std::to_string(n) + ", " + std::to_string(k) + "]",
                     "[" + std::to_string(dw.rows) + ", " + std::to_string(dw.cols) + "]");
    const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
    cpu_detail::for_items(ctx, nch, 2.0 * static_cast<double>(S * m * n * k), [&](std::int64_t c) {
      const std::int64_t r0 = c * cw, nr = std::min(cw, n - r0);
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
      if constexpr (std::is_same_v<T, float>) {
        // dY^T X through oneDNN. Samples stored one after the other (x's and dY's rows
        // contiguous across samples) make one product of depth S m. On AVX-512 CPUs oneDNN
        // reads the transposed dY directly (its kernels lay it out faster than a separate
        // transpose); elsewhere (AVX2: products with a transposed source run well below plain
        // ones there) the chunk's columns of dY are transposed into scratch first (nr x rows,
        // k times fewer elements than the product's operations) for a plain product.
        onednn::Gemm& g = cpu_detail::backward_gemm();
        if (dw.data && m > 0) {
          const bool joined = S == 1 || x.stride == m * x.ld;
          const std::int64_t depth = joined ? S * m : m;
          const bool direct = g.avx512() && (S == 1 || (joined && dy.stride == m * dy.ld));
          float* t = direct ? nullptr : cpu_detail::scratch<float>(nr * depth);
          for (std::int64_t s0 = 0; s0 < S; s0 += joined ? S : 1) {
            const std::int64_t s1 = joined ? S : s0 + 1;
            if (direct) {
              g.matmul(dy.data + s0 * dy.stride + r0, nr, depth, 1, dy.ld, x.data + s0 * x.stride,
                       k, x.ld, 1, dw.data + r0 * dw.ld, dw.ld, true);
              continue;
            }
            for (std::int64_t s = s0; s < s1; ++s)
              cpu_kernels::detail::transpose(dy.data + s * dy.stride + r0, m, nr, dy.ld,
                                             t + (s - s0) * m, depth);
            g.matmul(t, nr, depth, depth, 1, x.data + s0 * x.stride, k, x.ld, 1,
                     dw.data + r0 * dw.ld, dw.ld, true);
          }
        }
        if (db) detail::bias_grad(dy, r0, nr, db);
        return;
      }
#endif
      if (dw.data)
        for (std::int64_t s = 0; s < S; ++s)
          cpu_kernels::detail::gemm_tn_accumulate<T>(dy.data + s * dy.stride + r0, m, nr, dy.ld,
                                                     x.data + s * x.stride, k, x.ld,
                                                     dw.data + r0 * dw.ld, dw.ld);
      if (db) detail::bias_grad(dy, r0, nr, db);
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Element-wise activations

namespace detail {
// f(sample, row0, rows) over row chunks of every sample.
template <class B, class F>
void for_row_chunks(const Context<cpu>& ctx, const B& a, double work_per_elem, F&& f) {
  const std::int64_t nch = cpu_detail::row_chunks(a.rows);
  cpu_detail::for_items(ctx, a.samples * nch,
                        work_per_elem * static_cast<double>(a.samples * a.rows * a.cols),
                        [&](std::int64_t it) {
                          const std::int64_t s = it % a.samples, c = it / a.samples;
                          const std::int64_t r0 = c * cpu_detail::kRowChunk;
                          f(s, r0, std::min(cpu_detail::kRowChunk, a.rows - r0));
                        });
}
}  // namespace detail

//! y = GELU(u) (exact erf GELU); y may be u.
template <class T>
void gelu(const Context<cpu>& ctx, BatchBlock<const T, cpu> u, BatchBlock<T, cpu> y) {
  check_batch("ops::gelu", "y", y, u.samples, u.rows, u.cols);
  detail::for_row_chunks(ctx, u, 8.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r) cpu_kernels::gelu(u.row(s, r), y.row(s, r), u.cols);
  });
}
//! du = dy GELU'(u); du may be dy.
template <class T>
void gelu_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> u, BatchBlock<const T, cpu> dy,
                   BatchBlock<T, cpu> du) {
  check_batch("ops::gelu_backward", "dy", dy, u.samples, u.rows, u.cols);
  check_batch("ops::gelu_backward", "du", du, u.samples, u.rows, u.cols);
  detail::for_row_chunks(ctx, u, 16.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r)
      cpu_kernels::gelu_backward(u.row(s, r), dy.row(s, r), du.row(s, r), u.cols);
  });
}
//! y = SiLU(u) = u sigmoid(u); y may be u.
template <class T>
void silu(const Context<cpu>& ctx, BatchBlock<const T, cpu> u, BatchBlock<T, cpu> y) {
  check_batch("ops::silu", "y", y, u.samples, u.rows, u.cols);
  detail::for_row_chunks(ctx, u, 8.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r) {
      T* o = y.row(s, r);
      if (o != u.row(s, r)) std::copy_n(u.row(s, r), u.cols, o);
      cpu_kernels::silu(o, u.cols);
    }
  });
}
//! du = dy SiLU'(u); du may be dy.
template <class T>
void silu_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> u, BatchBlock<const T, cpu> dy,
                   BatchBlock<T, cpu> du) {
  check_batch("ops::silu_backward", "dy", dy, u.samples, u.rows, u.cols);
  check_batch("ops::silu_backward", "du", du, u.samples, u.rows, u.cols);
  detail::for_row_chunks(ctx, u, 8.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r)
      cpu_kernels::silu_backward(u.row(s, r), dy.row(s, r), du.row(s, r), u.cols);
  });
}

// ---------------------------------------------------------------------------------------------
// Layer norm

//! y = LayerNorm(x + r) per row (r null: x), gain g, bias b, biased variance, eps; y may be x.
//! stats [S; rows, 2] (optional) receives (mean, 1 / sqrt(var + eps)) per row for the backward.
template <class T>
void layer_norm(const Context<cpu>& ctx, BatchBlock<const T, cpu> x, BatchBlock<const T, cpu> r,
                const T* g, const T* b, BatchBlock<T, cpu> y, BatchBlock<T, cpu> stats,
                double eps = 1e-5) {
  const char* op = "ops::layer_norm";
  checks::layer_norm(op, x, r, y, stats);
  detail::for_row_chunks(ctx, x, 8.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    cpu_kernels::layer_norm(x.row(s, r0), x.ld, r ? r.row(s, r0) : nullptr, r.ld, y.row(s, r0),
                            y.ld, nr, x.cols, g, b, stats ? stats.row(s, r0) : nullptr, eps);
  });
}
//! Backward of layer_norm: dz = d loss / d (x + r) written (may be dy); dg += sum dy xhat,
//! db += sum dy (either may be null). `stats` from the forward.
template <class T>
void layer_norm_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> x,
                         BatchBlock<const T, cpu> r, const T* g, BatchBlock<const T, cpu> stats,
                         BatchBlock<const T, cpu> dy, BatchBlock<T, cpu> dz, T* dg, T* db) {
  const char* op = "ops::layer_norm_backward";
  const std::int64_t S = x.samples, m = x.rows, n = x.cols;
  checks::layer_norm_backward(op, x, r, stats, dy, dz);
  // parameter gradients first: dz may overwrite dy
  if (dg || db) {
    const std::int64_t cw = cpu_detail::col_width(n), nch = cpu_detail::col_chunks(n);
    cpu_detail::for_items(ctx, nch, 4.0 * static_cast<double>(S * m * n), [&](std::int64_t c) {
      const std::int64_t c0 = c * cw, nc = std::min(cw, n - c0);
      for (std::int64_t s = 0; s < S; ++s)
        cpu_kernels::layer_norm_param_grads(x.row(s, 0), x.ld, r ? r.row(s, 0) : nullptr, r.ld,
                                            stats.row(s, 0), dy.row(s, 0), dy.ld, m, c0, nc, dg,
                                            db);
    });
  }
  detail::for_row_chunks(ctx, x, 10.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    cpu_kernels::layer_norm_backward(x.row(s, r0), x.ld, r ? r.row(s, r0) : nullptr, r.ld,
                                     stats.row(s, r0), dy.row(s, r0), dy.ld, dz.row(s, r0), dz.ld,
                                     nr, n, g);
  });
}

// ---------------------------------------------------------------------------------------------
// Attention

namespace detail {
// Query rows per score block of the untiled path: the whole sequence while its L x L scores fit
// in 1 MiB, else 128 rows (the official 1105 tokens).
template <class T>
std::int64_t score_block(std::int64_t l) {
  return l * l * static_cast<std::int64_t>(sizeof(T)) <= (1 << 20) ? l : 128;
}
}  // namespace detail

//! Multi-head self-attention: qkv [S; L, 3E] (q | k | v, heads side by side), out [S; L, E]
//! (heads concatenated); one item per (sample, head).
template <class T>
void attention(const Context<cpu>& ctx, BatchBlock<const T, cpu> qkv, std::int64_t heads,
               BatchBlock<T, cpu> out) {
  const char* op = "ops::attention";
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3;
  checks::heads(op, qkv.cols, heads);
  check_batch(op, "out", out, S, l, e);
  const std::int64_t block = detail::score_block<T>(l);
  const std::int64_t sc = cpu_kernels::attention_scratch(l, block, e / heads);
  cpu_detail::for_items(
      ctx, S * heads, 4.0 * static_cast<double>(S * l * l * e), [&](std::int64_t it) {
        const std::int64_t s = it % S, h = it / S;
        cpu_kernels::attention_head(qkv.row(s, 0), qkv.ld, l, e, heads, h, out.row(s, 0), out.ld,
                                    cpu_detail::scratch<T>(sc), block);
      });
}
//! Backward of attention: dqkv [S; L, 3E] written from dout [S; L, E] (P recomputed).
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
namespace detail {
// cpu_kernels::attention_head_backward with its five products through oneDNN's plain matmul
// (its kernels run these shapes faster than Eigen's on AVX-512; the softmax parts are shared).
// Sequences shorter than this take the Eigen path: below it oneDNN's per-call cost outweighs its
// faster kernels (measured per head on AVX-512, heads of 32 and 64: Eigen 1.2-2.2x faster at 8-23
// rows, within 10 % at 48-64, oneDNN 1.25-1.45x faster at 84 and 128 rows).
inline constexpr std::int64_t kOnednnAttentionRows = 64;
inline void attention_head_backward_onednn(const float* qkv, std::int64_t ldq, std::int64_t l,
                                           std::int64_t e, std::int64_t heads, std::int64_t h,
                                           const float* dout, std::int64_t ldo, float* dqkv,
                                           std::int64_t ldg, float* sc) {
  const std::int64_t dh = e / heads;
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(dh)));
  const float* q = qkv + h * dh;
  const float* k = qkv + e + h * dh;
  const float* v = qkv + 2 * e + h * dh;
  const float* dO = dout + h * dh;
  float *dq = dqkv + h * dh, *dk = dqkv + e + h * dh, *dv = dqkv + 2 * e + h * dh;
  float *P = sc, *dP = sc + l * l;
  onednn::Gemm& g = cpu_detail::backward_gemm();
  g.matmul(q, l, dh, ldq, 1, k, l, 1, ldq, P, l, false);  // Q K^T
  cpu_kernels::detail::softmax_rows(P, l, scale);
  g.matmul(dO, l, dh, ldo, 1, v, l, 1, ldq, dP, l, false);  // dP = dO V^T
  cpu_kernels::detail::softmax_backward_rows(P, dP, l, scale);
  g.matmul(P, l, l, 1, l, dO, dh, ldo, 1, dv, ldg, false);  // dV = P^T dO
  g.matmul(dP, l, l, l, 1, k, dh, ldq, 1, dq, ldg, false);  // dQ = dS K / sqrt dh
  g.matmul(dP, l, l, 1, l, q, dh, ldq, 1, dk, ldg, false);  // dK = dS^T Q / sqrt dh
}
}  // namespace detail
#endif

template <class T>
void attention_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> qkv, std::int64_t heads,
                        BatchBlock<const T, cpu> dout, BatchBlock<T, cpu> dqkv) {
  const char* op = "ops::attention_backward";
  const std::int64_t S = qkv.samples, l = qkv.rows, e = qkv.cols / 3;
  checks::heads(op, qkv.cols, heads);
  check_batch(op, "dout", dout, S, l, e);
  check_batch(op, "dqkv", dqkv, S, l, 3 * e);
  const std::int64_t sc = cpu_kernels::attention_backward_scratch(l);
  cpu_detail::for_items(
      ctx, S * heads, 8.0 * static_cast<double>(S * l * l * e), [&](std::int64_t it) {
        const std::int64_t s = it % S, h = it / S;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
        if constexpr (std::is_same_v<T, float>) {  // the five products through oneDNN
          if (l >= detail::kOnednnAttentionRows) {
            detail::attention_head_backward_onednn(qkv.row(s, 0), qkv.ld, l, e, heads, h,
                                                   dout.row(s, 0), dout.ld, dqkv.row(s, 0), dqkv.ld,
                                                   cpu_detail::scratch<T>(sc, 1));
            return;
          }
        }
#endif
        cpu_kernels::attention_head_backward(qkv.row(s, 0), qkv.ld, l, e, heads, h, dout.row(s, 0),
                                             dout.ld, dqkv.row(s, 0), dqkv.ld,
                                             cpu_detail::scratch<T>(sc, 1));
      });
}

// ---------------------------------------------------------------------------------------------
// Patches, positions, embeddings

namespace detail {
// f(image index, patch-row index, column within the (c, i, k) / (i, k, c) feature order)
template <class F>
void for_patch_elements(const ImageGeom& g, bool ikc, F&& f) {
  const std::int64_t p = g.patch, gw = g.width / p;
  for (std::int64_t u = 0; u < g.height / p; ++u)
    for (std::int64_t v = 0; v < gw; ++v)
      for (std::int64_t ch = 0; ch < g.channels; ++ch)
        for (std::int64_t i = 0; i < p; ++i)
          for (std::int64_t k = 0; k < p; ++k)
            f((ch * g.height + u * p + i) * g.width + v * p + k, u * gw + v,
              ikc ? (i * p + k) * g.channels + ch : (ch * p + i) * p + k);
}
}  // namespace detail

//! cols_s [tokens, c p p] = patches of img_s [1, c h w] in (c, i, k) order (im2col of the
//! patch-embedding convolution).
template <class T>
void patchify(const Context<cpu>& ctx, BatchBlock<const T, cpu> img, ImageGeom g,
              BatchBlock<T, cpu> cols) {
  checks::patches("ops::patchify", g, img, "img", cols, "cols");
  cpu_detail::for_items(
      ctx, img.samples, static_cast<double>(img.samples * g.numel()), [&](std::int64_t s) {
        if (cols.ld == g.features()) {
          cpu_kernels::patchify_conv(img.row(s, 0), g.channels, g.height, g.width, g.patch,
                                     cols.row(s, 0));
          return;
        }
        const T* src = img.row(s, 0);
        detail::for_patch_elements(g, false,
                                   [&](auto i, auto t, auto c) { cols.row(s, t)[c] = src[i]; });
      });
}
//! Backward of patchify: dimg_s written from dcols_s.
template <class T>
void patchify_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> dcols, ImageGeom g,
                       BatchBlock<T, cpu> dimg) {
  checks::patches("ops::patchify_backward", g, dimg, "dimg", dcols, "dcols");
  cpu_detail::for_items(
      ctx, dcols.samples, static_cast<double>(dcols.samples * g.numel()), [&](std::int64_t s) {
        T* dst = dimg.row(s, 0);
        detail::for_patch_elements(g, false,
                                   [&](auto i, auto t, auto c) { dst[i] = dcols.row(s, t)[c]; });
      });
}
//! img_s [1, c h w] from y_s [tokens, p p c] in (i, k, c) order (the decoder's unpatchify).
template <class T>
void unpatchify(const Context<cpu>& ctx, BatchBlock<const T, cpu> y, ImageGeom g,
                BatchBlock<T, cpu> img) {
  checks::patches("ops::unpatchify", g, img, "img", y, "y");
  cpu_detail::for_items(ctx, y.samples, static_cast<double>(y.samples * g.numel()),
                        [&](std::int64_t s) {
                          cpu_kernels::unpatchify(y.row(s, 0), y.ld, g.channels, g.height, g.width,
                                                  g.patch, img.row(s, 0));
                        });
}
//! Backward of unpatchify: dy_s written from dimg_s.
template <class T>
void unpatchify_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> dimg, ImageGeom g,
                         BatchBlock<T, cpu> dy) {
  checks::patches("ops::unpatchify_backward", g, dimg, "dimg", dy, "dy");
  cpu_detail::for_items(ctx, dimg.samples, static_cast<double>(dimg.samples * g.numel()),
                        [&](std::int64_t s) {
                          const T* src = dimg.row(s, 0);
                          detail::for_patch_elements(
                              g, true, [&](auto i, auto t, auto c) { dy.row(s, t)[c] = src[i]; });
                        });
}

//! dst [o0 o1, e] = bilinear resize of the grid src [i0 i1, e] (PyTorch, align_corners=False,
//! no anti-aliasing; UVIT.md §4.5).
template <class T>
void bilinear_resize(const Context<cpu>& ctx, RowBlock<const T, cpu> src, std::int64_t i0,
                     std::int64_t i1, std::int64_t o0, std::int64_t o1, RowBlock<T, cpu> dst) {
  (void)ctx;
  checks::resize("ops::bilinear_resize", src, i0, i1, dst, o0, o1);
  cpu_kernels::bilinear_resize(src.data, i0, i1, src.cols, o0, o1, dst.data);
}
//! Backward of bilinear_resize: dsrc += the transposed interpolation of ddst.
template <class T>
void bilinear_resize_backward(const Context<cpu>& ctx, RowBlock<const T, cpu> ddst, std::int64_t i0,
                              std::int64_t i1, std::int64_t o0, std::int64_t o1,
                              RowBlock<T, cpu> dsrc) {
  (void)ctx;
  checks::resize("ops::bilinear_resize_backward", dsrc, i0, i1, ddst, o0, o1);
  cpu_kernels::bilinear_resize_backward(ddst.data, i0, i1, ddst.cols, o0, o1, dsrc.data);
}

//! out_s [1, dim] = sinusoidal embedding of t[s] (ops::sinusoid_row: cos block first, the
//! reference float32 recipe for float; UVIT.md §4.1).
template <class T>
void timestep_embedding(const Context<cpu>& ctx, std::span<const double> t, BatchBlock<T, cpu> out,
                        double max_period = 10000.0) {
  static_assert(std::is_floating_point_v<T>, "timestep_embedding: T must be float or double");
  check_batch("ops::timestep_embedding", "out", out, static_cast<std::int64_t>(t.size()), 1,
              out.cols);
  cpu_detail::for_items(ctx, out.samples, 0.0, [&](std::int64_t s) {
    sinusoid_row<T>(t[static_cast<std::size_t>(s)], out.cols, max_period, out.row(s, 0));
  });
}

//! out_s [1, e] = table row ids[s].
template <class T>
void gather_rows(const Context<cpu>& ctx, RowBlock<const T, cpu> table,
                 std::span<const std::int64_t> ids, BatchBlock<T, cpu> out) {
  check_batch("ops::gather_rows", "out", out, static_cast<std::int64_t>(ids.size()), 1, table.cols);
  checks::row_ids("ops::gather_rows", ids, table.rows);
  cpu_detail::for_items(ctx, out.samples, 0.0, [&](std::int64_t s) {
    std::copy_n(table.data + ids[static_cast<std::size_t>(s)] * table.ld, table.cols,
                out.row(s, 0));
  });
}
//! Backward of gather_rows: dtable row ids[s] += dout_s, samples in order.
template <class T>
void gather_rows_backward(const Context<cpu>& ctx, BatchBlock<const T, cpu> dout,
                          std::span<const std::int64_t> ids, RowBlock<T, cpu> dtable) {
  (void)ctx;
  check_batch("ops::gather_rows_backward", "dout", dout, static_cast<std::int64_t>(ids.size()), 1,
              dtable.cols);
  for (std::size_t s = 0; s < ids.size(); ++s) {
    if (ids[s] < 0 || ids[s] >= dtable.rows)
      throw_mismatch("ops::gather_rows_backward", "ids", "row index",
                     "0.." + std::to_string(dtable.rows - 1), ids[s]);
    T* d = dtable.data + ids[s] * dtable.ld;
    const T* g = dout.row(static_cast<std::int64_t>(s), 0);
    for (std::int64_t j = 0; j < dtable.cols; ++j) d[j] += g[j];
  }
}

//! y_s += a for every sample (a [rows, cols]).
template <class T>
void add_rows(const Context<cpu>& ctx, RowBlock<const T, cpu> a, BatchBlock<T, cpu> y) {
  check_batch("ops::add_rows", "y", y, y.samples, a.rows, a.cols);
  cpu_detail::for_items(ctx, y.samples, static_cast<double>(y.samples * a.rows * a.cols),
                        [&](std::int64_t s) {
                          for (std::int64_t r = 0; r < a.rows; ++r) {
                            T* o = y.row(s, r);
                            const T* p = a.data + r * a.ld;
                            for (std::int64_t j = 0; j < a.cols; ++j) o[j] += p[j];
                          }
                        });
}
//! da += sum over samples of dy_s (samples in order).
template <class T>
void sum_samples(const Context<cpu>& ctx, BatchBlock<const T, cpu> dy, RowBlock<T, cpu> da) {
  check_batch("ops::sum_samples", "dy", dy, dy.samples, da.rows, da.cols);
  const std::int64_t nch = cpu_detail::row_chunks(da.rows);
  cpu_detail::for_items(ctx, nch, static_cast<double>(dy.samples * da.rows * da.cols),
                        [&](std::int64_t c) {
                          const std::int64_t r0 = c * cpu_detail::kRowChunk,
                                             nr = std::min(cpu_detail::kRowChunk, da.rows - r0);
                          for (std::int64_t s = 0; s < dy.samples; ++s)
                            for (std::int64_t r = r0; r < r0 + nr; ++r) {
                              T* o = da.data + r * da.ld;
                              const T* g = dy.row(s, r);
                              for (std::int64_t j = 0; j < da.cols; ++j) o[j] += g[j];
                            }
                        });
}

//! dst = src, sample by sample (must not overlap unless identical).
template <class T>
void copy(const Context<cpu>& ctx, BatchBlock<const T, cpu> src, BatchBlock<T, cpu> dst) {
  check_batch("ops::copy", "src", src, src.samples, src.rows, src.cols);
  check_batch("ops::copy", "dst", dst, src.samples, src.rows, src.cols);
  detail::for_row_chunks(ctx, src, 1.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r)
      if (dst.row(s, r) != src.row(s, r)) std::copy_n(src.row(s, r), src.cols, dst.row(s, r));
  });
}
//! dst += src, sample by sample.
template <class T>
void add(const Context<cpu>& ctx, BatchBlock<const T, cpu> src, BatchBlock<T, cpu> dst) {
  check_batch("ops::add", "dst", dst, src.samples, src.rows, src.cols);
  detail::for_row_chunks(ctx, src, 1.0, [&](std::int64_t s, std::int64_t r0, std::int64_t nr) {
    for (std::int64_t r = r0; r < r0 + nr; ++r) {
      T* o = dst.row(s, r);
      const T* p = src.row(s, r);
      for (std::int64_t j = 0; j < src.cols; ++j) o[j] += p[j];
    }
  });
}

}  // namespace ops
}  // namespace unidiffuser
