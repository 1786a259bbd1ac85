// SPDX-License-Identifier: Apache-2.0
//! \file onednn.hpp
//! Optional GEMM path of the CPU backend through oneDNN (build option UNIDIFFUSER_ONEDNN, which
//! defines UNIDIFFUSER_WITH_ONEDNN and links DNNL::dnnl). A weight matrix is reordered once into
//! oneDNN's blocked layout for this CPU -- in place, in the storage of the plain matrix, so the
//! packed network needs no extra memory -- and every product then runs oneDNN's matmul (brgemm
//! kernels on AVX-512 CPUs) on the packed weights with the bias and an optional exact-erf GELU or
//! accumulation fused into it. The bf16 variant (MathMode::bf16 on CPUs with AVX512-BF16 or AMX)
//! packs the weights as bf16 and rounds each product's activations to bf16 before it; products
//! accumulate in fp32 and bias, GELU and the output stay fp32. Without the option `available` is
//! false and nothing else is declared. See docs/NOTES.md, "oneDNN GEMM path" and "bf16".
#pragma once

#include <cstdint>

#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <tuple>
#include <unordered_map>
#include <vector>

#include "unidiffuser/core/error.hpp"
#endif

namespace unidiffuser::onednn {

//! What a product does after x W^T (+ bias).
enum class Post { none, gelu, accumulate };

#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)

//! Rounds n floats to bf16 (nearest even; NaN stays NaN): the bit pattern of
//! bfloat16_t::from_float, as a loop the compiler vectorises.
inline void round_bf16(const float* x, std::int64_t n, std::uint16_t* y) {
  for (std::int64_t i = 0; i < n; ++i) {
    std::uint32_t u;
    std::memcpy(&u, x + i, 4);
    const std::uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    y[i] = static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r);
  }
}
#if defined(__GNUC__) && defined(__x86_64__)
//! round_bf16 with AVX512-BF16's conversion (16 values per instruction), for the bf16 path, which
//! runs only on CPUs that have it whatever the build's -march (VCVTNEPS2BF16 also rounds to
//! nearest even; it flushes denormal inputs to zero).
__attribute__((target("avx512f,avx512bf16"))) inline void round_bf16_native(const float* x,
                                                                            std::int64_t n,
                                                                            std::uint16_t* y) {
  std::int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    std::memcpy(y + i, &h, sizeof h);
  }
  round_bf16(x + i, n - i, y + i);
}
#else
inline void round_bf16_native(const float* x, std::int64_t n, std::uint16_t* y) {
  round_bf16(x, n, y);
}
#endif

inline constexpr bool available = true;

//! Packs fp32 weight matrices in place and runs y = x W^T (+ b) (post) with them. One object
//! per network: it owns the engine, the packed layouts and a cache of primitives (one per
//! shape); `linear` may be called concurrently from several threads (each OpenMP thread of a
//! parallel region runs its primitive single-threaded; outside a parallel region oneDNN uses
//! OpenMP's threads itself).
class Gemm {
 public:
  Gemm() : eng_(engine()) {}

  //! Reorders W [n, pieces * k] (row-major, the weight of `pieces` products side by side: piece
  //! p is columns [p k, (p + 1) k)) in place into `pieces` packed [k, n] blocks, one after the
  //! other. Returns false and leaves w untouched when the packed layout would not fit in the
  //! same storage (then the caller keeps the plain path for this matrix). The layout is the one
  //! oneDNN picks for 1105 rows (the official sequence); a product whose row count wants another
  //! one re-lays the weights into a per-thread buffer first (not seen on the test CPU for 1 to
  //! 5000 rows).
  //! Whether pack(w, n, k) would succeed: the packed layout of W [n, k] takes exactly the plain
  //! matrix's storage.
  bool fits(std::int64_t n, std::int64_t k) {
    return layout(n, k).get_size() == static_cast<std::size_t>(n * k) * sizeof(float);
  }
  bool pack(float* w, std::int64_t n, std::int64_t k, std::int64_t pieces = 1) {
    const dnnl::memory::desc md = layout(n, k);
    if (md.get_size() != static_cast<std::size_t>(n * k) * sizeof(float)) return false;
    std::vector<float> tmp(static_cast<std::size_t>(n * k * pieces));
    for (std::int64_t p = 0; p < pieces; ++p)
      reorder(Copy::pack, n, k, pieces * k, w + p * k, tmp.data() + p * n * k);
    std::copy(tmp.begin(), tmp.end(), w);
    return true;
  }
  //! Bytes of W [n, k] in the packed fp32 layout (more than n k floats where n or k is not a
  //! multiple of the layout's blocks).
  std::size_t packed_bytes(std::int64_t n, std::int64_t k) { return layout(n, k).get_size(); }
  //! Reorders W [n, k] (row stride ldw) into the packed fp32 layout at dst (packed_bytes(n, k)
  //! bytes), padding included: the operand of linear() as pack() makes it, for a copy.
  void pack_copy(const float* w, std::int64_t n, std::int64_t k, std::int64_t ldw, float* dst) {
    reorder(Copy::pack, n, k, ldw, w, dst);
  }
  //! Inverse of pack_copy: W [n, k] (row stride ldw) from its packed fp32 layout at `packed`.
  void unpack_copy(const float* packed, std::int64_t n, std::int64_t k, float* w,
                   std::int64_t ldw) {
    reorder(Copy::unpack, n, k, ldw, packed, w);
  }
  //! Inverse of a successful pack(w, n, k, pieces): the plain row-major matrix again.
  void unpack(float* w, std::int64_t n, std::int64_t k, std::int64_t pieces = 1) {
    std::vector<float> tmp(w, w + n * k * pieces);
    for (std::int64_t p = 0; p < pieces; ++p)
      reorder(Copy::unpack, n, k, pieces * k, tmp.data() + p * n * k, w + p * k);
  }

  //! Whether this CPU has bf16 instructions for oneDNN (AVX512-BF16 or AMX, as oneDNN's effective
  //! ISA says: ONEDNN_MAX_CPU_ISA=AVX512_CORE turns them off) and its bf16 matmul is created;
  //! asked once per object. Emulated bf16 on other AVX-512 CPUs is not used (slower than fp32).
  bool bf16() {
    std::call_once(bf16_once_, [&] {
      const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
      const auto need = static_cast<unsigned>(dnnl_cpu_isa_avx512_core_bf16);
      if ((isa & need) != need) return;
      try {
        bf16_ = layout16(64, 64).get_size() > 0;
      } catch (const error&) {
        bf16_ = false;
      }
    });
    return bf16_;
  }
  //! Whether oneDNN runs AVX-512 kernels here (its effective ISA: ONEDNN_MAX_CPU_ISA lowers it).
  bool avx512() {
    std::call_once(isa_once_, [&] {
      const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
      const auto need = static_cast<unsigned>(dnnl_cpu_isa_avx512_core);
      avx512_ = (isa & need) == need;
    });
    return avx512_;
  }
  //! Bytes of W [n, k] packed as bf16 for linear16.
  std::size_t packed16_bytes(std::int64_t n, std::int64_t k) { return layout16(n, k).get_size(); }
  //! Rounds W [n, k] (row stride ldw, fp32) to bf16 into oneDNN's packed layout at dst
  //! (packed16_bytes(n, k) bytes). Requires bf16().
  void pack16(const float* w, std::int64_t n, std::int64_t k, std::int64_t ldw, void* dst) {
    reorder(Copy::pack16, n, k, ldw, w, dst);
  }
  //! Inverse of pack16 (the bf16 values widened to fp32): W [n, k] with row stride ldw.
  void unpack16(const void* packed, std::int64_t n, std::int64_t k, float* w, std::int64_t ldw) {
    reorder(Copy::unpack16, n, k, ldw, packed, w);
  }
  //! As linear() with W packed by pack16: x is rounded to bf16 (into a per-thread buffer), the
  //! product accumulates in fp32, bias, post operation and y are fp32.
  void linear16(const float* x, std::int64_t m, std::int64_t k, std::int64_t ldx, const void* w,
                std::int64_t n, const float* b, float* y, std::int64_t ldy, Post post) {
    static thread_local std::vector<std::uint16_t> xs16;
    xs16.resize(static_cast<std::size_t>(m * k));
    round_rows(x, m, k, ldx, xs16.data());
    linear16(xs16.data(), m, k, w, n, b, y, ldy, post);
  }
  //! x [m, k] (row stride ldx) rounded to bf16 into x16 [m, k] (contiguous rows).
  static void round_rows(const float* x, std::int64_t m, std::int64_t k, std::int64_t ldx,
                         std::uint16_t* x16) {
    for (std::int64_t i = 0; i < m; ++i) round_bf16_native(x + i * ldx, k, x16 + i * k);
  }
  //! The same with x already rounded (x16 [m, k], contiguous rows; round_rows). (oneDNN 2.6's
  //! bf16 brgemm takes contiguous outputs only: a strided y is written through a per-thread
  //! buffer, and the accumulation is done here.)
  void linear16(const std::uint16_t* x16, std::int64_t m, std::int64_t k, const void* w,
                std::int64_t n, const float* b, float* y, std::int64_t ldy, Post post) {
    const bool direct = ldy == n && post != Post::accumulate;
    Key key = key_of(m, k, n, k, n, b != nullptr, post == Post::gelu ? post : Post::none);
    std::get<7>(key) = true;
    // oneDNN's preferred bf16 layout does not depend on the row count (checked for 1 to 1105
    // rows); the packed one is asked for, so a change would make a slow primitive, not a wrong one
    const dnnl::memory::desc packed = layout16(n, k);
    const Prim& p = primitive(key, &packed);
    static thread_local std::vector<float> out;
    if (!direct) out.resize(static_cast<std::size_t>(m * n));
    float* dst = direct ? y : out.data();
    execute(p, x16, w, dst, b);
    if (direct) return;
    for (std::int64_t i = 0; i < m; ++i) {
      const float* o = dst + i * n;
      float* yi = y + i * ldy;
      if (post == Post::accumulate)
        for (std::int64_t j = 0; j < n; ++j) yi[j] += o[j];
      else
        std::copy_n(o, n, yi);
    }
  }

  //! y [m, n] (leading dimension ldy) = x [m, k] (ldx) W^T (+ b) with W packed by pack() (for a
  //! piece p of a multi-piece matrix, pass w + p n k), then the post operation: none, exact
  //! GELU, or accumulate (y += ...).
  void linear(const float* x, std::int64_t m, std::int64_t k, std::int64_t ldx, const float* w,
              std::int64_t n, const float* b, float* y, std::int64_t ldy, Post post) {
    const Prim& p = primitive(key_of(m, k, n, ldx, ldy, b != nullptr, post));
    if (p.relay) {  // this m wants another layout than the packed one (not seen so far): re-lay
      static thread_local std::vector<float> relaid;
      relaid.resize(p.wmd.get_size() / sizeof(float) + 1);
      dnnl::memory ws(layout(n, k), eng_, const_cast<float*>(w)), r(p.wmd, eng_, relaid.data());
      dnnl::reorder(ws, r).execute(stream(), ws, r);
      stream().wait();
      w = relaid.data();
    }
    execute(p, x, w, y, b);
  }

  //! c [m, n] (row stride ldc) = a [m, k] b [k, n], or += with `accumulate`, on plain operands
  //! of any strides: element (i, p) of a at a[i as0 + p as1], (p, j) of b at b[p bs0 + j bs1]
  //! (transposed operands are strides). The backward's products dX = dY W and dW += dY^T X.
  void matmul(const float* a, std::int64_t m, std::int64_t k, std::int64_t as0, std::int64_t as1,
              const float* b, std::int64_t n, std::int64_t bs0, std::int64_t bs1, float* c,
              std::int64_t ldc, bool accumulate) {
    execute(plain_primitive({m, k, n, as0, as1, bs0, bs1, ldc, accumulate}), a, b, c, nullptr);
  }

 private:
  using PlainKey = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                              std::int64_t, std::int64_t, std::int64_t, bool>;
  // A created matmul: its descriptors, scratchpad size, and an id naming it in each thread's
  // table of argument memory objects (args()). `relay`: its weights layout differs from the
  // packed one (linear re-lays the operand first).
  struct Prim {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul prim;
    dnnl::memory::desc src, wmd, dst, bias, scratch_md;
    std::size_t scratch = 0;
    std::uint64_t id = next_id();
    bool relay = false;
  };
  static std::uint64_t next_id() {
    static std::atomic<std::uint64_t> n{0};
    return ++n;
  }
  const Prim& plain_primitive(const PlainKey& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = plain_.find(key);
    if (it != plain_.end()) return it->second;
    const auto [m, k, n, as0, as1, bs0, bs1, ldc, acc] = key;
    const dnnl::memory::desc src({m, k}, dt::f32, dnnl::memory::dims{as0, as1});
    const dnnl::memory::desc wei({k, n}, dt::f32, dnnl::memory::dims{bs0, bs1});
    const dnnl::memory::desc dst({m, n}, dt::f32, dnnl::memory::dims{ldc, 1});
    dnnl::post_ops po;
    if (acc) po.append_sum(1.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    try {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), attr, eng_);
      Prim p{pd,
             dnnl::matmul(pd),
             src,
             wei,
             dst,
             dnnl::memory::desc(),
             pd.scratchpad_desc(),
             pd.scratchpad_desc().get_size()};
      return plain_.emplace(key, std::move(p)).first->second;
    } catch (const dnnl::error& e) {
      throw error("onednn::Gemm::matmul",
                  "[" + std::to_string(m) + ", " + std::to_string(k) + "] x [" + std::to_string(k) +
                      ", " + std::to_string(n) + "]",
                  std::string("oneDNN could not create the primitive: ") + e.what());
    }
  }
  // m, k, n, ldx, ldy, bias, post, bf16 (source and weights)
  using Key = std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, bool,
                         int, bool>;
  static Key key_of(std::int64_t m, std::int64_t k, std::int64_t n, std::int64_t ldx,
                    std::int64_t ldy, bool bias, Post post) {
    return {m, k, n, ldx, ldy, bias, static_cast<int>(post), false};
  }
  using dt = dnnl::memory::data_type;
  // W [n, k] with row stride ldw, seen as the [k, n] operand of x W^T.
  static dnnl::memory::desc plain(std::int64_t n, std::int64_t k, std::int64_t ldw) {
    return dnnl::memory::desc({k, n}, dt::f32, dnnl::memory::dims{1, ldw});
  }
  static constexpr std::int64_t kLayoutRows = 1105;  // the row count packed layouts come from
  dnnl::memory::desc layout(std::int64_t n, std::int64_t k) {
    return primitive(key_of(kLayoutRows, k, n, k, n, false, Post::none)).wmd;
  }
  dnnl::memory::desc layout16(std::int64_t n, std::int64_t k) {
    Key key = key_of(kLayoutRows, k, n, k, n, false, Post::none);
    std::get<7>(key) = true;
    return primitive(key).wmd;
  }
  // The primitive of `key`; weights in the layout `fixed` when given (else oneDNN's choice).
  const Prim& primitive(const Key& key, const dnnl::memory::desc* fixed = nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    return primitive_locked(key, fixed);
  }
  const Prim& primitive_locked(const Key& key, const dnnl::memory::desc* fixed) {
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    const auto [m, k, n, ldx, ldy, bias, post, b16] = key;
    const dt in = b16 ? dt::bf16 : dt::f32;
    const dnnl::memory::desc src({m, k}, in, dnnl::memory::dims{ldx, 1});
    const dnnl::memory::desc dst({m, n}, dt::f32, dnnl::memory::dims{ldy, 1});
    const dnnl::memory::desc wany =
        fixed ? *fixed : dnnl::memory::desc({k, n}, in, dnnl::memory::format_tag::any);
    const dnnl::memory::desc bmd({1, n}, dt::f32, dnnl::memory::format_tag::ab);
    dnnl::post_ops po;
    if (post == static_cast<int>(Post::gelu))
      po.append_eltwise(1.f, dnnl::algorithm::eltwise_gelu_erf, 0.f, 0.f);
    else if (post == static_cast<int>(Post::accumulate))
      po.append_sum(1.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    try {
      auto d = bias ? dnnl::matmul::desc(src, wany, bmd, dst) : dnnl::matmul::desc(src, wany, dst);
      dnnl::matmul::primitive_desc pd(d, attr, eng_);
      Prim p{pd,
             dnnl::matmul(pd),
             src,
             pd.weights_desc(),
             dst,
             bmd,
             pd.scratchpad_desc(),
             pd.scratchpad_desc().get_size()};
      if (!b16 && m != kLayoutRows) {
        const Key lk = key_of(kLayoutRows, k, n, k, n, false, Post::none);
        p.relay = !(p.wmd == primitive_locked(lk, nullptr).wmd);
      }
      return cache_.emplace(key, std::move(p)).first->second;
    } catch (const dnnl::error& e) {
      throw error("onednn::Gemm",
                  "matmul [" + std::to_string(m) + ", " + std::to_string(k) + "] x [" +
                      std::to_string(k) + ", " + std::to_string(n) + "]",
                  std::string("oneDNN could not create the primitive: ") + e.what());
    }
  }

  // The weight copies: plain W [n, k] (row stride ldw) to the packed fp32 or bf16 layout, or
  // back from it. Each reorder primitive is made once (creating one per call
  // cost a primitive descriptor each time).
  enum class Copy { pack, unpack, pack16, unpack16 };
  void reorder(Copy kind, std::int64_t n, std::int64_t k, std::int64_t ldw, const void* src,
               void* dst) {
    const Reorder& r = reorder_primitive(kind, n, k, ldw);
    Slots& a = args(r.id);
    dnnl_exec_arg_t v[3] = {{DNNL_ARG_FROM, point(a[0], r.from, src)},
                            {DNNL_ARG_TO, point(a[1], r.to, dst)},
                            {DNNL_ARG_SCRATCHPAD, point(a[2], r.scratch_md, scratch(r.scratch))}};
    run(r.prim, v, 3);
  }
  struct Reorder {
    dnnl::memory::desc from, to, scratch_md;
    std::size_t scratch = 0;
    dnnl::reorder prim;
    std::uint64_t id = next_id();
  };
  const Reorder& reorder_primitive(Copy kind, std::int64_t n, std::int64_t k, std::int64_t ldw) {
    const bool f32 = kind == Copy::pack || kind == Copy::unpack;
    const bool back = kind == Copy::unpack || kind == Copy::unpack16;
    const dnnl::memory::desc packed = f32 ? layout(n, k) : layout16(n, k);
    std::lock_guard<std::mutex> lock(mu_);
    const auto key = std::make_tuple(static_cast<int>(kind), n, k, ldw);
    auto it = reorders_.find(key);
    if (it != reorders_.end()) return it->second;
    const dnnl::memory::desc from = back ? packed : plain(n, k, ldw);
    const dnnl::memory::desc to = back ? plain(n, k, ldw) : packed;
    dnnl::primitive_attr attr;  // a scratchpad per thread, as for the matmuls
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::reorder::primitive_desc pd(eng_, from, eng_, to, attr);
    Reorder r{from, to, pd.scratchpad_desc(), pd.scratchpad_desc().get_size(), dnnl::reorder(pd)};
    return reorders_.emplace(key, std::move(r)).first->second;
  }
  // Runs a matmul: source, weights, output, optional fp32 bias, this thread's scratchpad.
  void execute(const Prim& p, const void* x, const void* w, void* y, const float* b) {
    Slots& a = args(p.id);
    dnnl_exec_arg_t v[5] = {{DNNL_ARG_SRC, point(a[0], p.src, x)},
                            {DNNL_ARG_WEIGHTS, point(a[1], p.wmd, w)},
                            {DNNL_ARG_DST, point(a[2], p.dst, y)},
                            {DNNL_ARG_SCRATCHPAD, point(a[3], p.scratch_md, scratch(p.scratch))},
                            {DNNL_ARG_BIAS, nullptr}};
    if (b) v[4].memory = point(a[4], p.bias, b);
    run(p.prim, v, b ? 5 : 4);
  }
  // This thread's memory objects for the arguments of primitive `id`: made once without a
  // buffer and pointed at each call's operands (making them per call cost two allocations
  // each, about a fifth of a small product). The table is bounded: a process that makes many
  // networks starts it again.
  using Slots = std::array<dnnl::memory, 5>;
  static Slots& args(std::uint64_t id) {
    static thread_local std::unordered_map<std::uint64_t, Slots> table;
    if (table.size() >= 4096 && table.find(id) == table.end()) table.clear();
    return table[id];
  }
  static dnnl_memory_t point(dnnl::memory& m, const dnnl::memory::desc& md, const void* ptr) {
    if (!m) m = dnnl::memory(md, engine(), static_cast<void*>(nullptr));
    dnnl::error::wrap_c_api(dnnl_memory_set_data_handle(m.get(), const_cast<void*>(ptr)),
                            "could not set a memory object's buffer");
    return m.get();
  }
  static void* scratch(std::size_t bytes) {
    static thread_local std::vector<char> buf;
    if (buf.size() < bytes) buf.resize(bytes);
    return buf.data();
  }
  // Executes a primitive on this thread's stream and waits (the C API's argument array: no
  // map built per call).
  static void run(const dnnl::primitive& prim, const dnnl_exec_arg_t* args, int n) {
    dnnl::stream& s = stream();
    dnnl::error::wrap_c_api(dnnl_primitive_execute(prim.get(), s.get(), n, args),
                            "could not execute a primitive");
    s.wait();
  }
  // The CPU engine every Gemm shares, and each thread's stream on it (created once per thread,
  // not per product).
  static const dnnl::engine& engine() {
    static const dnnl::engine e(dnnl::engine::kind::cpu, 0);
    return e;
  }
  static dnnl::stream& stream() {
    static thread_local dnnl::stream s(engine());
    return s;
  }

  dnnl::engine eng_;
  std::mutex mu_;
  std::once_flag bf16_once_, isa_once_;
  bool bf16_ = false, avx512_ = false;
  std::map<Key, Prim> cache_;
  std::map<PlainKey, Prim> plain_;
  std::map<std::tuple<int, std::int64_t, std::int64_t, std::int64_t>, Reorder> reorders_;
};
#else
inline constexpr bool available = false;
#endif

}  // namespace unidiffuser::onednn
