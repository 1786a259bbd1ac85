// SPDX-License-Identifier: Apache-2.0
//! \file uvit.hpp
//! The multimodal U-ViT noise-prediction network over K timestep groups (UVIT.md): parameters
//! under the official state_dict names and the forward pass with its reusable workspace. The
//! configuration (token layout, presets, JSON) is in uvit_config.hpp, the predictor adapter in
//! uvit_predictor.hpp.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "unidiffuser/backend/cpu/onednn.hpp"
#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"
#include "unidiffuser/nn/layers.hpp"
#include "unidiffuser/nn/time_embedding.hpp"
#include "unidiffuser/nn/uvit_config.hpp"

namespace unidiffuser::nn {

//! Per-sample inputs of a forward pass, one entry per config component (config order).
template <class T>
struct UViTInputs {
  std::vector<RowBlock<const T, cpu>> x;    //!< [B, numel] per component
  std::vector<std::span<const double>> t;   //!< per group: B time inputs (N t at sampling)
  std::span<const std::int64_t> data_type;  //!< B values (v1)
  std::int64_t latent_h = 0, latent_w = 0;  //!< patched images' size (0 = default)
};

//! The U-ViT: parameters (official names) and a forward pass with a reusable workspace.
template <class T>
class UViT {
 public:
  using Trace = std::function<void(const std::string& name, const T* data, Shape shape)>;

  explicit UViT(UViTConfig cfg) : cfg_(std::move(cfg)) {
    cfg_.validate();
    for (auto& [name, shape] : cfg_.parameters()) {
      Tensor<T> t(shape);
      std::fill(t.begin(), t.end(), T(0));
      params_.emplace(name, std::move(t));
      order_.push_back(name);
    }
  }
  const UViTConfig& config() const { return cfg_; }
  //! Parameter names in state-dict order.
  const std::vector<std::string>& parameter_names() const { return order_; }
  //! A parameter in its plain (official) layout. In builds with the oneDNN GEMM path, forward()
  //! packs the block weights in place and this call unpacks them again, so a reference taken
  //! from param() is valid until the next forward().
  Tensor<T>& param(const std::string& n) {
    unpack_weights();
    return raw(n);
  }
  const Tensor<T>& param(const std::string& n) const { return const_cast<UViT*>(this)->param(n); }
  //! Whether forward() runs the block GEMMs on packed weights through oneDNN (fp32 networks in
  //! builds with UNIDIFFUSER_ONEDNN; on by default there). Off: Eigen's GEMM, as in other builds.
  void use_packed_gemm(bool on) {
    if (!on) unpack_weights();
    packed_gemm_ = on;
  }
  static constexpr bool packed_gemm_available() {
    return onednn::available && std::is_same_v<T, float>;
  }
  bool packed_gemm() const { return packed_gemm_available() && packed_gemm_; }
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const auto& [k, v] : params_) n += v.size();
    return n;
  }
  //! Fills every parameter with N(0, std^2) (LayerNorm gains 1 + N(0, std^2)) from Philox.
  void init_random(std::uint64_t seed, double std = 0.02) {
    unpack_weights();
    std::uint64_t stream = 0;
    for (const auto& n : order_) {
      auto& t = params_.at(n);
      ops::random_normal(Context<cpu>{}, RowBlock<T, cpu>(t.data(), 1, t.size(), t.size()),
                         NoiseKey{seed, stream++}, 0);
      const bool gain = n.find("norm") != std::string::npos && n.size() > 7 &&
                        n.compare(n.size() - 7, 7, ".weight") == 0;
      for (auto& v : t) v = static_cast<T>(static_cast<double>(v) * std + (gain ? 1.0 : 0.0));
    }
    pe_cache_h_ = -1;
  }
  //! Call after changing parameters directly (invalidates the cached positional table).
  void parameters_changed() { pe_cache_h_ = -1; }
  void set_trace(Trace t) { trace_ = std::move(t); }
  //! FLOPs of one forward for one sample (matrix products only; multiply-add = 2).
  double flops(std::int64_t h = 0, std::int64_t w = 0) const {
    const double L = static_cast<double>(cfg_.tokens(h, w)),
                 E = static_cast<double>(cfg_.embed_dim), Hm = static_cast<double>(cfg_.hidden());
    const double nb = static_cast<double>(2 * cfg_.blocks_per_side() + 1);
    double f = nb * (2 * L * E * 3 * E + 2 * 2 * L * L * E + 2 * L * E * E + 2 * 2 * L * E * Hm);
    f += static_cast<double>(cfg_.blocks_per_side()) * 2 * L * 2 * E * E;
    for (const auto& c : cfg_.components) {
      const double tk = static_cast<double>(c.tokens(h, w)),
                   in = static_cast<double>(c.in_features());
      f += 2 * tk * in * E * 2;
    }
    return f;
  }

  //! out[c]: [B, numel_c] per component (config order).
  void forward(const Context<cpu>& ctx, const UViTInputs<T>& in,
               std::span<const RowBlock<T, cpu>> out) {
    const char* op = "UViT::forward";
    const auto& C = cfg_.components;
    if (in.x.size() != C.size() || out.size() != C.size())
      throw_mismatch(op, "inputs/outputs", "one per component", C.size(), in.x.size());
    if (in.t.size() != cfg_.groups())
      throw_mismatch(op, "t", "one time vector per group", cfg_.groups(), in.t.size());
    const std::int64_t B = in.x[0].rows;
    std::int64_t lh = in.latent_h, lw = in.latent_w;
    for (const auto& c : C)
      if (c.kind == ComponentKind::patched_image) {
        if (lh == 0) lh = lw = c.size;
        if (lh != lw || lh % c.patch || lh < c.patch)
          throw error(op, c.name,
                      "latent must be square with sides a multiple of the patch size; got " +
                          std::to_string(lh) + "x" + std::to_string(lw));
      }
    for (std::size_t k = 0; k < C.size(); ++k) {
      if (in.x[k].rows != B || in.x[k].cols != C[k].numel(lh, lw))
        throw_mismatch(
            op, "x[" + C[k].name + "]", "shape",
            "[" + std::to_string(B) + ", " + std::to_string(C[k].numel(lh, lw)) + "]",
            "[" + std::to_string(in.x[k].rows) + ", " + std::to_string(in.x[k].cols) + "]");
      if (out[k].rows != B || out[k].cols != C[k].numel(lh, lw))
        throw_mismatch(
            op, "out[" + C[k].name + "]", "shape",
            "[" + std::to_string(B) + ", " + std::to_string(C[k].numel(lh, lw)) + "]",
            "[" + std::to_string(out[k].rows) + ", " + std::to_string(out[k].cols) + "]");
    }
    for (std::size_t g = 0; g < cfg_.groups(); ++g)
      if (static_cast<std::int64_t>(in.t[g].size()) != B)
        throw_mismatch(op, "t[" + std::to_string(g) + "]", "length", B, in.t[g].size());
    if (cfg_.data_type_token) {
      if (static_cast<std::int64_t>(in.data_type.size()) != B)
        throw_mismatch(op, "data_type", "length", B, in.data_type.size());
      for (auto d : in.data_type)
        if (d < 0 || d >= cfg_.data_types)
          throw_mismatch(op, "data_type", "value", "0.." + std::to_string(cfg_.data_types - 1), d);
    }

    const std::int64_t L = cfg_.tokens(lh, lw);
    std::int64_t colsz = 0;  // im2col rows of one sample's patched components
    for (const auto& c : C)
      if (c.kind == ComponentKind::patched_image)
        colsz = std::max(colsz, c.tokens(lh, lw) * c.in_features());
    const int threads = ctx.threads > 0 ? ctx.threads : cpu_kernels::max_threads();
    reserve(B, L, colsz, threads);
    const Pass ps{&in, out, B, L, lh, lw, positional(lh, lw)};  // positions cached before threads
    if (packed_gemm()) pack_weights();
    ErrorSlot err;
    err_ = &err;

    // Every sample runs the same sequence of single-threaded calls with the same sizes on its own
    // 64-byte aligned workspace slot, so its result is bit-identical whatever the batch size, its
    // position and the thread count (docs/NOTES.md, "Reproducibility"). Scheduling: with at least
    // as many samples as threads each thread takes B / threads contiguous samples through every
    // layer (no synchronisation between layers); the remaining B mod threads samples (all of them
    // when tracing) go layer by layer with the team sharing each layer's fixed work items (column
    // chunks of the products, heads, row chunks of the norms).
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
      const cpu_kernels::detail::SerialKernels serial;  // the kernels below start no threads
      const std::int64_t team = cpu_kernels::team_size(), tid = cpu_kernels::thread_id();
      const std::int64_t per = trace_ ? 0 : B / team;
      sample_pass(ps, tid * per, (tid + 1) * per);
      layer_pass(ps, per * team, B);
    }
    err_ = nullptr;
    if (err.error) std::rethrow_exception(err.error);
  }

 private:
  Tensor<T>& raw(const std::string& n) {
    auto it = params_.find(n);
    if (it == params_.end()) throw error("UViT::param", n, "no such parameter");
    return it->second;
  }
  // Per-call state of a forward.
  struct Pass {
    const UViTInputs<T>* in;
    std::span<const RowBlock<T, cpu>> out;
    std::int64_t B, L, lh, lw;
    const T* pe;
  };
  // Output columns of one work item of a product: about a quarter of the outputs, 64 to 256 wide
  // (a multiple of 16), so a small layer still splits over threads and a large one makes few
  // calls. The chunks (and so every call's sizes) depend only on the product's shape, never on
  // the thread count.
  static constexpr std::int64_t kRowChunk = 32;
  static std::int64_t col_width(std::int64_t n) {
    if (n <= 64) return std::max<std::int64_t>(n, 1);
    return std::min<std::int64_t>(
        256, std::max<std::int64_t>(64, cpu_kernels::detail::pad16((n + 3) / 4)));
  }
  static std::int64_t col_chunks(std::int64_t n) {
    return (n + col_width(n) - 1) / col_width(n);
  }
  static std::int64_t chunks(std::int64_t n, std::int64_t w) {
    return (n + w - 1) / w;
  }

  // Block weights the packed GEMM path takes: (name, pieces) -- skip_linear's [E, 2E] weight is
  // two [E, E] products, over x and over the skip.
  std::vector<std::pair<std::string, std::int64_t>> packable() const {
    std::vector<std::pair<std::string, std::int64_t>> r;
    auto ends = [](const std::string& n, const char* suf) {
      const std::string f(suf);
      return n.size() > f.size() && n.compare(n.size() - f.size(), f.size(), f) == 0;
    };
    for (const auto& n : order_)
      if (ends(n, ".attn.qkv.weight") || ends(n, ".attn.proj.weight") ||
          ends(n, ".mlp.fc1.weight") || ends(n, ".mlp.fc2.weight"))
        r.emplace_back(n, 1);
      else if (ends(n, ".skip_linear.weight"))
        r.emplace_back(n, 2);
    return r;
  }
  // oneDNN: each column chunk (a contiguous block of weight rows) is packed on its own, in place,
  // so a chunk's product addresses its packed block directly.
  void pack_weights() {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (std::is_same_v<T, float>) {
      if (!packer_) packer_ = std::make_unique<Packer>();
      std::lock_guard<std::mutex> lock(packer_->mu);
      if (packer_->on) return;
      // `on` first: if packing throws, `packed` lists exactly the weights in packed layout (a
      // weight's chunks packed so far are restored before the exception leaves), so lin() and
      // unpack_weights() stay consistent
      packer_->on = true;
      for (const auto& [n, pieces] : packable()) {
        Tensor<T>& w = raw(n);
        const std::int64_t rows = w.shape()[0], k = w.shape()[1] / pieces;
        bool fits = true;
        const std::int64_t cw = col_width(rows);
        for (std::int64_t c = 0; c < col_chunks(rows); ++c)
          fits = fits && packer_->gemm.fits(std::min(cw, rows - c * cw), k);
        if (!fits) continue;
        std::int64_t done = 0;
        try {
          for (; done < col_chunks(rows); ++done) {
            const std::int64_t r0 = done * cw, nr = std::min(cw, rows - r0);
            packer_->gemm.pack(w.data() + r0 * pieces * k, nr, k, pieces);
          }
        } catch (...) {
          for (std::int64_t c = 0; c < done; ++c) {
            const std::int64_t r0 = c * cw, nr = std::min(cw, rows - r0);
            packer_->gemm.unpack(w.data() + r0 * pieces * k, nr, k, pieces);
          }
          throw;
        }
        packer_->packed.emplace(n, pieces);
      }
    }
#endif
  }
  void unpack_weights() {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (std::is_same_v<T, float>) {
      if (!packer_) return;
      std::lock_guard<std::mutex> lock(packer_->mu);
      if (!packer_->on) return;
      for (const auto& [n, pieces] : packer_->packed) {
        Tensor<T>& w = raw(n);
        const std::int64_t rows = w.shape()[0], k = w.shape()[1] / pieces;
        const std::int64_t cw = col_width(rows);
        for (std::int64_t c = 0; c < col_chunks(rows); ++c) {
          const std::int64_t r0 = c * cw, nr = std::min(cw, rows - r0);
          packer_->gemm.unpack(w.data() + r0 * pieces * k, nr, k, pieces);
        }
      }
      packer_->packed.clear();
      packer_->on = false;
    }
#endif
  }
  // Column chunk c of y [m, n] (ldy) = x [m, k] (ldx) W_piece^T (+ b), then `post`, where W_piece
  // is columns [piece k, (piece + 1) k) of the weight `wname` ([n, pieces k]): oneDNN on packed
  // weights where forward() packed them, else Eigen (with the separate exact-GELU pass).
  void lin(const std::string& wname, std::int64_t piece, const T* x, std::int64_t m, std::int64_t k,
           std::int64_t ldx, const T* b, T* y, std::int64_t ldy, onednn::Post post,
           std::int64_t c) {
    const Tensor<T>& w = raw(wname);
    const std::int64_t n = w.shape()[0], ldw = w.shape()[1], pieces = ldw / k;
    const std::int64_t cw = col_width(n), c0 = c * cw, nc = std::min(cw, n - c0);
    const T* bc = b ? b + c0 : nullptr;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (std::is_same_v<T, float>) {
      if (packer_ && packer_->on && packer_->packed.count(wname)) {
        packer_->gemm.linear(x, m, k, ldx, w.data() + c0 * ldw + piece * nc * k, nc, bc, y + c0,
                             ldy, post);
        return;
      }
    }
#endif
    (void)pieces;
    cpu_kernels::linear(x, m, k, ldx, w.data() + c0 * ldw + piece * k, nc, ldw, bc, y + c0, ldy,
                        post == onednn::Post::accumulate);
    if (post == onednn::Post::gelu)
      for (std::int64_t i = 0; i < m; ++i)
        cpu_kernels::bias_gelu(y + i * ldy + c0, 1, nc, static_cast<const T*>(nullptr));
  }
  // Runs f(sample, item) for samples [s0, s1) and items [0, items): on the calling thread, or
  // (`shared`, inside the forward's parallel region) shared by the team, with the barrier at the
  // end of the loop. An exception is kept (the first one) and rethrown after the region, so every
  // thread still meets every barrier.
  template <class F>
  void stage(std::int64_t s0, std::int64_t s1, std::int64_t items, bool shared, F&& f) {
    const std::int64_t n = (s1 - s0) * items;
    // w -> (sample, item), samples fastest: consecutive work items share a chunk of weights
    auto one = [&](std::int64_t w) {
      if (err_->failed.load(std::memory_order_relaxed)) return;
      try {
        f(s0 + w % (s1 - s0), w / (s1 - s0));
      } catch (...) {
        std::lock_guard<std::mutex> lock(err_->mu);
        if (!err_->failed.exchange(true)) err_->error = std::current_exception();
      }
    };
    if (!shared) {
      for (std::int64_t w = 0; w < n; ++w) one(w);
      return;
    }
#if defined(_OPENMP)
#pragma omp for schedule(dynamic)
#endif
    for (std::int64_t w = 0; w < n; ++w) one(w);
  }
  // The trace callback sees [samples, L, E] contiguous (workspace slots are padded).
  void emit(const char* name, const T* d, std::int64_t stride, std::int64_t nb, std::int64_t per,
            Shape s) {
    if (!trace_) return;
#if defined(_OPENMP)
#pragma omp single
#endif
    {
      try {  // the callback is user code: its exception is rethrown after the region
        const T* p = d;
        if (stride != per && nb > 1) {
          trace_buf_.resize(static_cast<std::size_t>(nb * per));
          for (std::int64_t b = 0; b < nb; ++b)
            std::copy_n(d + b * stride, per, trace_buf_.data() + b * per);
          p = trace_buf_.data();
        }
        if (!(err_ && err_->failed.load())) trace_(name, p, s);
      } catch (...) {
        if (!err_) throw;  // outside a forward's region (positional table)
        std::lock_guard<std::mutex> lock(err_->mu);
        if (!err_->failed.exchange(true)) err_->error = std::current_exception();
      }
    }
  }
  void reserve(std::int64_t B, std::int64_t L, std::int64_t colsz, int threads) {
    const std::int64_t E = cfg_.embed_dim;
    sx_ = cpu_kernels::detail::pad16(L * E);
    sq_ = cpu_kernels::detail::pad16(L * 3 * E);
    sh_ = cpu_kernels::detail::pad16(L * cfg_.hidden());
    scol_ = cpu_kernels::detail::pad16(colsz);
    st_ = cpu_kernels::detail::pad16(1 + E + (cfg_.mlp_time_embed ? 4 * E : 0));
    auto fit = [](cpu_kernels::AlignedVector<T>& v, std::int64_t n) {
      if (v.size() < static_cast<std::size_t>(n)) v.assign(static_cast<std::size_t>(n), T(0));
    };
    fit(x_, B * sx_);
    fit(tmp_, B * sx_);
    fit(attn_, B * sx_);
    fit(qkv_, B * sq_);
    fit(hid_, B * sh_);
    fit(col_, B * scol_);
    fit(temb_, B * st_);
    skips_.resize(static_cast<std::size_t>(cfg_.blocks_per_side()));
    for (auto& v : skips_) fit(v, B * sx_);
    scratch_ = cpu_kernels::attention_scratch(L, score_block(L), E / cfg_.num_heads);
    fit(scores_, std::max(threads, cpu_kernels::max_threads()) * scratch_);
  }
  // Query rows per attention score block: the whole sequence while its L x L scores fit in 1 MiB
  // per thread (one pass over K and V per head), else 128 rows (the official 1105 tokens).
  static std::int64_t score_block(std::int64_t L) {
    return L * L * static_cast<std::int64_t>(sizeof(T)) <= (1 << 20) ? L : 128;
  }

  // Samples [s0, s1) start to end on the calling thread, layer by layer (a layer's weights stay
  // in cache across the samples; each sample still makes its own calls).
  void sample_pass(const Pass& ps, std::int64_t s0, std::int64_t s1) {
    if (s0 >= s1) return;
    stage(s0, s1, 1, false, [&](std::int64_t s, std::int64_t) { embed(ps, s); });
    blocks(ps, s0, s1, false);
    stage(s0, s1, 1, false, [&](std::int64_t s, std::int64_t) { heads(ps, s); });
  }
  // Samples [s0, s1) layer by layer, each layer's work items shared by the team.
  void layer_pass(const Pass& ps, std::int64_t s0, std::int64_t s1) {
    if (s0 >= s1) return;
    const std::int64_t E = cfg_.embed_dim, nb = s1 - s0;
    stage(s0, s1, 1, true, [&](std::int64_t s, std::int64_t) { embed(ps, s); });
    emit("x_embedded", x_.data() + s0 * sx_, sx_, nb, ps.L * E, Shape{nb, ps.L, E});
    blocks(ps, s0, s1, true);
    stage(s0, s1, 1, true, [&](std::int64_t s, std::int64_t) { heads(ps, s); });
  }

  // Token sequence of sample b in its slot of x_: time tokens, data-type token, component
  // embeddings, positional table (UVIT.md §4.2-4.5).
  void embed(const Pass& ps, std::int64_t b) {
    namespace kk = cpu_kernels;
    const auto& C = cfg_.components;
    const UViTInputs<T>& in = *ps.in;
    const std::int64_t E = cfg_.embed_dim, L = ps.L;
    T* X = x_.data() + b * sx_;
    T* tslot = temb_.data() + b * st_;
    for (std::size_t g = 0; g < cfg_.groups(); ++g) {
      TensorView<T> tt(tslot, Shape{1}), emb(tslot + 1, Shape{1, E});
      tt[0] = static_cast<T>(in.t[g][static_cast<std::size_t>(b)]);
      timestep_embedding<T>(Context<cpu>{}, TensorView<const T>(tt), emb);
      T* dst = X + static_cast<std::int64_t>(g) * E;
      if (cfg_.mlp_time_embed) {
        const std::string& n = cfg_.time_names[g];
        T* h = tslot + 1 + E;
        kk::linear(emb.data(), 1, E, E, raw(n + ".0.weight").data(), 4 * E, E,
                   raw(n + ".0.bias").data(), h, 4 * E);
        kk::silu(h, 4 * E);
        kk::linear(h, 1, 4 * E, 4 * E, raw(n + ".2.weight").data(), E, 4 * E,
                   raw(n + ".2.bias").data(), dst, E);
      } else {
        std::copy_n(emb.data(), E, dst);
      }
    }
    if (cfg_.data_type_token)
      std::copy_n(
          raw("token_embedding.weight").data() + in.data_type[static_cast<std::size_t>(b)] * E, E,
          X + static_cast<std::int64_t>(cfg_.groups()) * E);
    std::int64_t off = cfg_.lead_tokens();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const std::int64_t tk = c.tokens(ps.lh, ps.lw);
      const T* w = raw(c.in_name + ".weight").data();
      const T* bias = raw(c.in_name + ".bias").data();
      const T* src = in.x[k].data + b * in.x[k].ld;
      T* dst = X + off * E;
      if (c.kind == ComponentKind::tokens) {
        kk::linear(src, tk, c.dim, c.dim, w, E, c.dim, bias, dst, E);
      } else {
        const std::int64_t pd = c.in_features();
        T* col = col_.data() + b * scol_;
        kk::patchify_conv(src, c.channels, ps.lh, ps.lw, c.patch, col);
        kk::linear(col, tk, pd, pd, w, E, pd, bias, dst, E);
      }
      off += tk;
    }
    for (std::int64_t i = 0; i < L * E; ++i) X[i] += ps.pe[i];
  }

  // Outputs of sample b from its normed tokens (UVIT.md §4.7).
  void heads(const Pass& ps, std::int64_t b) {
    namespace kk = cpu_kernels;
    const auto& C = cfg_.components;
    const std::int64_t E = cfg_.embed_dim;
    const T* X = x_.data() + b * sx_;
    std::int64_t off = cfg_.lead_tokens();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const std::int64_t tk = c.tokens(ps.lh, ps.lw);
      const T* w = raw(c.out_name + ".weight").data();
      const T* bias = raw(c.out_name + ".bias").data();
      const T* src = X + off * E;
      T* dst = ps.out[k].data + b * ps.out[k].ld;
      if (c.kind == ComponentKind::tokens) {
        kk::linear(src, tk, E, E, w, c.dim, E, bias, dst, c.dim);
      } else {
        const std::int64_t pd = c.patch * c.patch * c.channels;
        T* col = col_.data() + b * scol_;
        kk::linear(src, tk, E, E, w, pd, E, bias, col, pd);
        kk::unpatchify(col, pd, c.channels, ps.lh, ps.lw, c.patch, dst);
      }
      off += tk;
    }
  }

  // Every block and the final norm for samples [s0, s1) (UVIT.md §4.6).
  void blocks(const Pass& ps, std::int64_t s0, std::int64_t s1, bool shared) {
    const std::int64_t E = cfg_.embed_dim, L = ps.L, nb = s1 - s0;
    const std::int64_t sides = cfg_.blocks_per_side();
    const Shape shape{nb, L, E};
    // in_blocks.i writes its output straight into skip buffer i, which the next block reads
    // (no copy of the activations into the skip stack)
    T* cur = x_.data();
    for (std::int64_t i = 0; i < sides; ++i) {
      const std::string name = "in_blocks." + std::to_string(i);
      T* dst = skips_[static_cast<std::size_t>(i)].data();
      block(name, cur, dst, s0, s1, L, nullptr, shared);
      emit(name.c_str(), dst + s0 * sx_, sx_, nb, L * E, shape);
      cur = dst;
    }
    block("mid_block", cur, x_.data(), s0, s1, L, nullptr, shared);
    emit("mid_block", x_.data() + s0 * sx_, sx_, nb, L * E, shape);
    for (std::int64_t i = 0; i < sides; ++i) {
      const std::string name = "out_blocks." + std::to_string(i);
      block(name, x_.data(), x_.data(), s0, s1, L,
            skips_[static_cast<std::size_t>(sides - 1 - i)].data(), shared);
      emit(name.c_str(), x_.data() + s0 * sx_, sx_, nb, L * E, shape);
    }
    const T* g = raw("norm.weight").data();
    const T* bn = raw("norm.bias").data();
    stage(s0, s1, chunks(L, kRowChunk), shared, [&](std::int64_t b, std::int64_t r) {
      const std::int64_t r0 = r * kRowChunk, nr = std::min(kRowChunk, L - r0);
      cpu_kernels::layer_norm(x_.data() + b * sx_ + r0 * E, nr, E, static_cast<const T*>(nullptr),
                              g, bn);
    });
    emit("norm", x_.data() + s0 * sx_, sx_, nb, L * E, shape);
  }

  // One post-LN block on samples [s0, s1) (UVIT.md §4.6): reads the workspace array `in`,
  // writes `out` (may be the same array; `in` is not modified when they differ), `skip` the
  // array of the skip input (out blocks). Arrays hold one slot of sx_ elements per sample.
  void block(const std::string& p, const T* in, T* out, std::int64_t s0, std::int64_t s1,
             std::int64_t L, const T* skip, bool shared) {
    namespace kk = cpu_kernels;
    using onednn::Post;
    const std::int64_t E = cfg_.embed_dim, Hm = cfg_.hidden();
    const T* none = nullptr;
    const std::int64_t ce = col_chunks(E), rows = chunks(L, kRowChunk);
    auto norm = [&](const T* x, const T* r, T* y, const std::string& n) {
      const T* g = raw(n + ".weight").data();
      const T* bn = raw(n + ".bias").data();
      stage(s0, s1, rows, shared, [&, x, r, y, g, bn](std::int64_t b, std::int64_t i) {
        const std::int64_t o = b * sx_ + i * kRowChunk * E,
                           nr = std::min(kRowChunk, L - i * kRowChunk);
        kk::layer_norm(x + o, r ? r + o : nullptr, y + o, nr, E, g, bn);
      });
    };
    const T* X = in;
    if (skip) {  // skip_linear([x, skip]) as two products over the halves of its weight
      const std::string w = p + ".skip_linear.weight";
      const T* sb = raw(p + ".skip_linear.bias").data();
      stage(s0, s1, ce, shared, [&](std::int64_t b, std::int64_t c) {
        T* t = tmp_.data() + b * sx_;
        lin(w, 0, X + b * sx_, L, E, E, sb, t, E, Post::none, c);
        lin(w, 1, skip + b * sx_, L, E, E, none, t, E, Post::accumulate, c);
      });
      norm(tmp_.data(), nullptr, out, p + ".norm1");
      X = out;
    }
    const T* qb = cfg_.qkv_bias ? raw(p + ".attn.qkv.bias").data() : nullptr;
    const std::string wq = p + ".attn.qkv.weight", wp = p + ".attn.proj.weight",
                      w1 = p + ".mlp.fc1.weight", w2 = p + ".mlp.fc2.weight";
    stage(s0, s1, col_chunks(3 * E), shared, [&](std::int64_t b, std::int64_t c) {
      lin(wq, 0, X + b * sx_, L, E, E, qb, qkv_.data() + b * sq_, 3 * E, Post::none, c);
    });
    const std::int64_t heads = cfg_.num_heads, sb = score_block(L);
    stage(s0, s1, heads, shared, [&](std::int64_t b, std::int64_t h) {
      kk::attention_head(qkv_.data() + b * sq_, L, E, heads, h, attn_.data() + b * sx_,
                         scores_.data() + kk::thread_id() * scratch_, sb);
    });
    const T* pb = raw(p + ".attn.proj.bias").data();
    stage(s0, s1, ce, shared, [&](std::int64_t b, std::int64_t c) {
      lin(wp, 0, attn_.data() + b * sx_, L, E, E, pb, tmp_.data() + b * sx_, E, Post::none, c);
    });
    norm(X, tmp_.data(), out, p + ".norm2");
    const T* b1 = raw(p + ".mlp.fc1.bias").data();
    stage(s0, s1, col_chunks(Hm), shared, [&](std::int64_t b, std::int64_t c) {
      lin(w1, 0, out + b * sx_, L, E, E, b1, hid_.data() + b * sh_, Hm, Post::gelu, c);
    });
    const T* b2 = raw(p + ".mlp.fc2.bias").data();
    stage(s0, s1, ce, shared, [&](std::int64_t b, std::int64_t c) {
      lin(w2, 0, hid_.data() + b * sh_, L, Hm, Hm, b2, tmp_.data() + b * sx_, E, Post::none, c);
    });
    norm(out, tmp_.data(), out, p + ".norm3");
  }

  // The positional table actually added, [L, E] for latent side h x w (cached).
  const T* positional(std::int64_t h, std::int64_t w) {
    if (pe_cache_h_ == h && pe_cache_w_ == w) return pe_.data();
    const std::int64_t E = cfg_.embed_dim, L = cfg_.tokens(h, w);
    pe_.assign(static_cast<std::size_t>(L * E), T(0));
    const T* src = raw("pos_embed").data();
    const auto ng = static_cast<std::int64_t>(cfg_.groups());
    std::copy_n(src, ng * E, pe_.data());
    std::int64_t dst_row = ng, src_row = ng;
    if (cfg_.data_type_token)
      std::copy_n(raw("pos_embed_token").data(), E, pe_.data() + (dst_row++) * E);
    for (const auto& c : cfg_.components) {
      const std::int64_t t0 = c.tokens(), t1 = c.tokens(h, w);
      if (t0 == t1) {
        std::copy_n(src + src_row * E, t0 * E, pe_.data() + dst_row * E);
      } else {
        const std::int64_t g0 = c.size / c.patch;
        cpu_kernels::bilinear_resize(src + src_row * E, g0, g0, E, h / c.patch, w / c.patch,
                                     pe_.data() + dst_row * E);
        emit("pos_embed_patches_interp", pe_.data() + dst_row * E, t1 * E, 1, t1 * E,
             Shape{1, t1, E});
      }
      src_row += t0;
      dst_row += t1;
    }
    pe_cache_h_ = h;
    pe_cache_w_ = w;
    return pe_.data();
  }

  UViTConfig cfg_;
  std::map<std::string, Tensor<T>> params_;
  std::vector<std::string> order_;
  cpu_kernels::AlignedVector<T> x_, tmp_, attn_, qkv_, hid_, scores_, col_, pe_, temb_;
  std::vector<cpu_kernels::AlignedVector<T>> skips_;
  // per-sample slot sizes (multiples of 16 elements: every slot starts 64-byte aligned) and the
  // per-thread attention scratch
  std::int64_t sx_ = 0, sq_ = 0, sh_ = 0, scol_ = 0, st_ = 0, scratch_ = 0;
  std::vector<T> trace_buf_;
  // the first exception of a work item inside the forward's parallel region (set per forward)
  struct ErrorSlot {
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::exception_ptr error;
  };
  ErrorSlot* err_ = nullptr;
  std::int64_t pe_cache_h_ = -1, pe_cache_w_ = -1;
  Trace trace_;
  bool packed_gemm_ = true;
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
  struct Packer {
    onednn::Gemm gemm;
    std::mutex mu;
    bool on = false;                             // weights in `packed` are in oneDNN layout
    std::map<std::string, std::int64_t> packed;  // name -> pieces
  };
  std::unique_ptr<Packer> packer_;
#endif
};

}  // namespace unidiffuser::nn
