// SPDX-License-Identifier: Apache-2.0
//! \file uvit.hpp
//! The multimodal U-ViT noise-prediction network over K timestep groups (UVIT.md), written once
//! against the backend primitives (ops::linear, ops::layer_norm, ops::attention, ...): its
//! parameters in one contiguous buffer (and one for their gradients) under the official
//! state_dict names, typed per-block views resolved once, a forward pass over a separate
//! per-call workspace, and a training forward that records a tape for `backward`. The
//! configuration (token layout, presets, JSON) is in uvit_config.hpp, the predictor adapter in
//! uvit_predictor.hpp. How a backend parallelises the pass is its own business
//! (ops::run_samples).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/nn/component_kind.hpp"
#include "unidiffuser/nn/layer_profile.hpp"
#include "unidiffuser/nn/uvit_config.hpp"

namespace unidiffuser::nn {

//! How a network lays out its block weights for a backend's packed GEMM (the CPU backend packs
//! fp32 weights into oneDNN's blocked layout in builds with UNIDIFFUSER_ONEDNN; elsewhere
//! nothing is packed and every choice runs the plain GEMM):
//! - none: the plain GEMM on the plain weights;
//! - copies (the default): packed copies beside the plain weights, made by the first forward
//!   after a change (memory: about the block weights once more); training and every accessor
//!   work as usual;
//! - in_place: the first forward packs the weights in the parameter buffer itself (no extra
//!   memory), for inference. While packed, the const accessors param() and parameters() throw
//!   (their values are not there), the non-const ones and parameters_changed() unpack first
//!   (the next forward packs again), and the training forward refuses. A backend that cannot
//!   pack in place (CUDA's 16-bit copies) makes copies.
enum class WeightPacking { none, copies, in_place };

//! Per-sample inputs of a forward pass, one entry per config component (config order).
template <class T, class Backend = cpu>
struct UViTInputs {
  std::vector<RowBlock<const T, Backend>> x;  //!< [B, numel] per component
  std::vector<std::span<const double>> t;     //!< per group: B time inputs (N t at sampling)
  std::span<const std::int64_t> data_type;    //!< B values (v1)
  //! Run-time latent size of the patched images (0 x 0: each at its default size; an override
  //! needs every patched component to share one default size; positions are interpolated).
  std::int64_t latent_h = 0, latent_w = 0;
};

namespace detail {
//! Elements of a workspace slot: a multiple of 16, so that every slot starts 64-byte aligned
//! and a sample's kernels see the same alignment wherever it sits in the batch.
inline std::int64_t slot(std::int64_t n) {
  return (n + 15) / 16 * 16;
}
}  // namespace detail

//! The U-ViT: parameters (official names) and forward / backward passes.
template <class T, class Backend = cpu>
class UViT {
  static_assert(std::is_floating_point_v<T>, "UViT<T>: T must be float or double");

 public:
  using Trace = std::function<void(const std::string& name, const T* data, Shape shape)>;
  using Inputs = UViTInputs<T, Backend>;
  class Workspace;
  class Tape;

  explicit UViT(UViTConfig cfg) : cfg_(std::move(cfg)) {
    cfg_.validate();
    std::int64_t off = 0;
    for (auto& [name, shape] : cfg_.parameters()) {
      if (!index_.emplace(name, entries_.size()).second)
        throw error("UViT", name,
                    "parameter declared twice (a custom kind's parameters must have names of "
                    "their own, e.g. under its in_name / out_name)");
      entries_.push_back({name, shape, off});
      off += detail::slot(shape.numel());
    }
    params_ = Tensor<T, Backend>(Shape{off});
    ops::fill(ctx0(), params_.view(), T(0));
    resolve();
  }
  UViT(const UViT&) = delete;
  UViT& operator=(const UViT&) = delete;

  const UViTConfig& config() const { return cfg_; }
  //! Parameter names in state-dict order.
  std::vector<std::string> parameter_names() const {
    std::vector<std::string> n;
    for (const auto& e : entries_) n.push_back(e.name);
    return n;
  }
  //! A parameter (its official shape) as a view into the parameter buffer. Writing through it
  //! changes the network: call parameters_changed() afterwards. While the weights are packed in
  //! place (WeightPacking::in_place), the non-const accessors unpack them first and the const
  //! ones throw unidiffuser::error (call unpack_weights()).
  TensorView<T, Backend> param(const std::string& n) {
    const Entry& e = entry(n);
    unpack_weights();
    return TensorView<T, Backend>(params_.data() + e.offset, e.shape);
  }
  TensorView<const T, Backend> param(const std::string& n) const {
    const Entry& e = entry(n);
    require_plain("UViT::param");
    return TensorView<const T, Backend>(params_.data() + e.offset, e.shape);
  }
  //! The shape of parameter n (never touches the buffer).
  const Shape& parameter_shape(const std::string& n) const { return entry(n).shape; }
  //! The gradient of parameter n (allocated, zero, on first use).
  TensorView<T, Backend> grad(const std::string& n) {
    const Entry& e = entry(n);
    return TensorView<T, Backend>(gradients().data() + e.offset, e.shape);
  }
  //! Every parameter in one buffer (parameter n at its offset; gaps between parameters pad
  //! each to a multiple of 16 elements and stay zero). After writing through it (an optimiser
  //! step, a copy) call parameters_changed(): cached positional tables and packed weights are
  //! keyed by it, and a tape recorded before refuses the backward.
  TensorView<T, Backend> parameters() {
    unpack_weights();
    return params_.view();
  }
  TensorView<const T, Backend> parameters() const {
    require_plain("UViT::parameters");
    return params_.view();
  }
  //! The gradient buffer, laid out like parameters() (allocated and zeroed on first use).
  TensorView<T, Backend> gradients() {
    if (grads_.size() != params_.size()) {
      grads_ = Tensor<T, Backend>(params_.shape());
      ops::fill(ctx0(), grads_.view(), T(0));
    }
    grads_zero_ = false;  // the caller may write through it
    return grads_.view();
  }
  //! Zeroes every gradient; a no-op when they are known to be zero (zeroed by this call or, as
  //! note_gradients_zero() says, by the caller through the last gradients() view) and the
  //! buffer was not handed out since.
  void zero_gradients() {
    if (grads_zero_ && grads_.size() == params_.size()) return;
    ops::fill(ctx0(), gradients(), T(0));
    grads_zero_ = true;
  }
  //! The caller has zeroed every gradient through the last gradients() view (e.g. a fused
  //! optimiser step): the next zero_gradients() skips its pass.
  void note_gradients_zero() { grads_zero_ = grads_.size() == params_.size(); }
  //! Offset and shape of parameter n in the buffers.
  std::int64_t parameter_offset(const std::string& n) const { return entry(n).offset; }
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const auto& e : entries_) n += e.shape.numel();
    return n;
  }

  //! How forward() lays out the block weights for the backend's packed GEMM (the CPU backend's
  //! oneDNN path for fp32): WeightPacking::copies by default. See WeightPacking.
  void set_weight_packing(WeightPacking p) {
    if (p == packing_) return;
    unpack_weights();
    cache_.clear();
    packing_ = p;
  }
  WeightPacking weight_packing() const { return packing_; }
  //! use_packed_gemm(on): set_weight_packing(on ? copies : none).
  void use_packed_gemm(bool on) {
    set_weight_packing(on ? WeightPacking::copies : WeightPacking::none);
  }
  static constexpr bool packed_gemm_available() { return ops::LinearCache<T, Backend>::available; }
  //! Whether forward() runs the block GEMMs on packed weights (copies or in place).
  bool packed_gemm() const { return packed_gemm_available() && packing_ != WeightPacking::none; }
  //! Whether the parameter buffer holds block weights in the packed layout now (in_place, after
  //! a forward, on a backend that packs in place).
  bool weights_packed() const { return cache_.packed_in_place(); }
  //! Restores the plain layout of weights packed in place (a no-op otherwise); the next forward
  //! packs them again while the packing is in_place. Not concurrent with a forward.
  void unpack_weights() {
    if (cache_.packed_in_place()) cache_.unpack_in_place();
  }

  //! Fills every parameter with N(0, std^2) (LayerNorm gains 1 + N(0, std^2)) from Philox.
  void init_random(std::uint64_t seed, double std = 0.02) {
    unpack_weights();
    const auto& ctx = ctx0();
    Tensor<T, Backend> one(Shape{std::max<std::int64_t>(cfg_.embed_dim, 1)});
    ops::fill(ctx, one.view(), T(1));
    std::uint64_t stream = 0;
    for (const auto& e : entries_) {
      const std::int64_t n = e.shape.numel();
      RowBlock<T, Backend> b(params_.data() + e.offset, 1, n, n);
      ops::random_normal(ctx, b, NoiseKey{seed, stream++}, 0);
      const bool gain = e.name.find("norm") != std::string::npos && e.name.size() > 7 &&
                        e.name.compare(e.name.size() - 7, 7, ".weight") == 0;
      if (gain && n <= one.size())
        ops::lincomb<T>(ctx, b, {{std, b}, {1.0, RowBlock<const T, Backend>(one.data(), 1, n, n)}});
      else
        ops::lincomb<T>(ctx, b, {{std, b}});
    }
    parameters_changed();
  }
  //! Call after changing parameters (drops packed weight copies and cached positional tables).
  void parameters_changed() {
    unpack_weights();
    cache_.invalidate();
    version_ = next_version();
  }
  //! Observes intermediate activations of forward() under the official module paths: the time
  //! tokens, data-type token and component embeddings, x_embedded, every block's output and its
  //! sub-modules (attn.qkv, attn, norm2, mlp; skip_linear, norm1), the final norm, the heads.
  //! Tracing runs the batch layer by layer. Not for concurrent forwards.
  void set_trace(Trace t) { trace_ = std::move(t); }
  //! FLOPs of one forward for one sample (matrix products only; multiply-add = 2).
  double flops(std::int64_t h = 0, std::int64_t w = 0) const {
    const double L = static_cast<double>(cfg_.tokens(h, w)),
                 E = static_cast<double>(cfg_.embed_dim), Hm = static_cast<double>(cfg_.hidden());
    const double nb = static_cast<double>(2 * cfg_.blocks_per_side() + 1);
    double f = nb * (2 * L * E * 3 * E + 2 * 2 * L * L * E + 2 * L * E * E + 2 * 2 * L * E * Hm);
    f += static_cast<double>(cfg_.blocks_per_side()) * 2 * L * 2 * E * E;
    return f + 2 * io_flops(h, w);
  }
  //! The part of flops() in the input embeddings (the same again in the output heads).
  double io_flops(std::int64_t h = 0, std::int64_t w = 0) const {
    const double E = static_cast<double>(cfg_.embed_dim);
    double f = 0;
    for (const auto& c : cfg_.components) {
      // a custom kind counts as a linear embedding and head over its whole input
      const double tk = static_cast<double>(c.tokens(h, w)),
                   in = c.kind == ComponentKind::custom ? static_cast<double>(c.numel()) / tk
                                                        : static_cast<double>(c.in_features());
      f += 2 * tk * in * E;
    }
    return f;
  }
  //! From now on every inference forward adds the thread time and products of its layers to `p`
  //! by layer kind (null: stop); training forwards add their blocks' layers. `p` must outlive
  //! its use; set it between forwards. See LayerProfile. On a device backend (CUDA) each
  //! profiled layer call waits for the device before and after it (ops::synchronize), so its
  //! time is the layer's kernels plus one launch and one wait: diagnostics, slower than an
  //! unprofiled forward.
  void set_profile(LayerProfile* p) { prof_ = p; }

  //! out[c]: [B, numel_c] per component (config order), with the network's own workspace (one
  //! forward at a time).
  void forward(const Context<Backend>& ctx, const Inputs& in,
               std::span<const RowBlock<T, Backend>> out) {
    if (!own_ws_) own_ws_ = std::make_unique<Workspace>();
    forward(ctx, in, out, *own_ws_);
  }
  //! The same with a caller's workspace: the parameters are only read, so several threads may
  //! run forwards of one network at once, each with its own workspace (and no trace set).
  void forward(const Context<Backend>& ctx, const Inputs& in,
               std::span<const RowBlock<T, Backend>> out, Workspace& ws) const {
    const Pass ps = check(in, out);
    ws.reserve(*this, ps);
    prepare_cache(ctx);
    const Positional& pe = ws.positional(*this, ps.lh, ps.lw);
    ops::run_samples(
        ctx, ps.B,
        [&](const Context<Backend>& c, std::int64_t s0, std::int64_t s1) {
          run(c, ps, pe, ws.acts(), s0, s1);
        },
        !trace_);
  }

  //! Training forward: as forward(), recording on `tape` what backward() needs. With
  //! `recompute`, only each block's input is kept and a block's internals are recomputed during
  //! the backward (less memory, one more block forward each). The inputs need not outlive the
  //! call.
  void forward(const Context<Backend>& ctx, const Inputs& in,
               std::span<const RowBlock<T, Backend>> out, Tape& tape, bool recompute = false) {
    const Pass ps = check(in, out);
    if (packing_ == WeightPacking::in_place && cache_.in_place_available)
      throw error("UViT::forward (training)", "weights",
                  "packed in place for inference (WeightPacking::in_place): the backward needs the "
                  "plain weights; set WeightPacking::copies or none to train");
    tape.record(*this, ctx, ps, recompute);
    prepare_cache(ctx);  // the same GEMM path for the forward and any recomputation
    const Positional& pe = tape.ws.positional(*this, ps.lh, ps.lw);
    train_forward(ctx, ps, pe, tape);
    tape.version_ = version_;
    tape.ready_ = true;
  }

  //! Backward of the last training forward recorded on `tape`: dout[c] [B, numel_c] the
  //! gradients of the outputs; parameter gradients are added to gradients(); `dx` (optional,
  //! one per component or empty) receives the gradients of the inputs.
  void backward(const Context<Backend>& ctx, Tape& tape,
                std::span<const RowBlock<const T, Backend>> dout,
                std::span<const RowBlock<T, Backend>> dx = {}) {
    train_backward(ctx, tape, dout, dx);
  }

 private:
  struct Entry {
    std::string name;
    Shape shape;
    std::int64_t offset;
  };
  // A linear layer: weight [n, k] (rows ld apart) and bias at offsets into the buffers.
  struct Lin {
    std::int64_t w = -1, n = 0, k = 0, ld = 0, b = -1;
    RowBlock<const T, Backend> wv(const T* base) const {
      return RowBlock<const T, Backend>(base + w, n, k, ld);
    }
    RowBlock<T, Backend> wg(T* base) const { return RowBlock<T, Backend>(base + w, n, k, ld); }
    const T* bv(const T* base) const { return b < 0 ? nullptr : base + b; }
    T* bg(T* base) const { return b < 0 ? nullptr : base + b; }
  };
  struct Norm {
    std::int64_t g = -1, b = -1;
  };
  struct Block {
    std::string name;
    bool skip = false;
    Lin skip0, skip1, qkv, proj, fc1, fc2;
    Norm norm1, norm2, norm3;
  };
  struct Component {
    Lin in, out;
    ops::ImageGeom geom;  // patched images (latent side per pass)
    // custom kinds: the compute side and the offsets of the kind's parameters (its order)
    const KindOps<T, Backend>* kind = nullptr;
    std::vector<std::int64_t> koff{};
    std::array<std::int64_t, 2> scratch{0, 0};
  };
  KindCall<T, Backend> kind_call(std::size_t k, std::vector<const T*>& p, std::vector<T*>& g,
                                 T* G) const {
    p.clear();
    g.clear();
    for (auto o : comps_[k].koff) {
      p.push_back(params_.data() + o);
      if (G) g.push_back(G + o);
    }
    return KindCall<T, Backend>{cfg_.components[k], cfg_.embed_dim, p, g};
  }

  const Entry& entry(const std::string& n) const {
    auto it = index_.find(n);
    if (it == index_.end()) throw error("UViT::param", n, "no such parameter");
    return entries_[it->second];
  }
  std::int64_t off(const std::string& n) const { return entry(n).offset; }
  Lin lin(const std::string& p, bool bias = true) const {
    const Entry& w = entry(p + ".weight");
    Lin l;
    l.w = w.offset;
    l.n = w.shape[0];
    l.k = w.shape.numel() / w.shape[0];
    l.ld = l.k;
    if (bias) l.b = off(p + ".bias");
    return l;
  }
  Norm norm(const std::string& p) const { return {off(p + ".weight"), off(p + ".bias")}; }
  // Typed views of every layer, resolved once from the names.
  void resolve() {
    const std::int64_t E = cfg_.embed_dim;
    auto add_block = [&](const std::string& p, bool skip) {
      Block b;
      b.name = p;
      b.skip = skip;
      if (skip) {
        b.skip0 = lin(p + ".skip_linear");
        b.skip0.k = E;
        b.skip0.ld = 2 * E;
        b.skip1 = b.skip0;
        b.skip1.w += E;
        b.skip1.b = -1;
        b.norm1 = norm(p + ".norm1");
      }
      b.qkv = lin(p + ".attn.qkv", cfg_.qkv_bias);
      b.proj = lin(p + ".attn.proj");
      b.fc1 = lin(p + ".mlp.fc1");
      b.fc2 = lin(p + ".mlp.fc2");
      b.norm2 = norm(p + ".norm2");
      b.norm3 = norm(p + ".norm3");
      blocks_.push_back(b);
    };
    for (std::int64_t i = 0; i < cfg_.blocks_per_side(); ++i)
      add_block("in_blocks." + std::to_string(i), false);
    add_block("mid_block", false);
    for (std::int64_t i = 0; i < cfg_.blocks_per_side(); ++i)
      add_block("out_blocks." + std::to_string(i), true);
    final_norm_ = norm("norm");
    for (const auto& c : cfg_.components) {
      if (c.kind != ComponentKind::custom) {
        comps_.push_back({lin(c.in_name), lin(c.out_name), {}});
        continue;
      }
      Component k;
      k.kind = &kind_ops<T, Backend>(c.custom_kind, c.name);
      for (const auto& [name, shape] : kind_info(c.custom_kind, c.name).parameters(c, E))
        k.koff.push_back(off(name));
      k.scratch = kind_info(c.custom_kind, c.name).scratch(c, E);
      if (k.scratch[0] < 0 || k.scratch[1] < 0)
        throw error("UViT", c.name, "kind \"" + c.custom_kind + "\": negative scratch size");
      comps_.push_back(std::move(k));
    }
    if (cfg_.mlp_time_embed)
      for (const auto& t : cfg_.time_names) time_.push_back({lin(t + ".0"), lin(t + ".2")});
  }
  static const Context<Backend>& ctx0() {
    static const Context<Backend> c{};
    return c;
  }
  void require_plain(const char* op) const {
    if (cache_.packed_in_place())
      throw error(op, "parameters",
                  "the block weights are packed in place (WeightPacking::in_place) and the buffer "
                  "does not hold their plain values; call unpack_weights() first");
  }
  // The math mode the CPU backend packs weights for: the context's bf16 where the CPU has it,
  // else fp32 (the CUDA backend makes its 16-bit copies per call, from ctx.math).
  MathMode packed_math([[maybe_unused]] const Context<Backend>& ctx) const {
    if constexpr (std::is_same_v<Backend, cpu>)
      if (ctx.math == MathMode::bf16 && cache_.supports(MathMode::bf16)) return MathMode::bf16;
    return MathMode::fp32;
  }
  bool cache_ready(const Context<Backend>& ctx) const {
    if constexpr (std::is_same_v<Backend, cpu>)
      return cache_.ready(packed_math(ctx));
    else
      return !cache_.empty();
  }
  void prepare_cache(const Context<Backend>& ctx) const {
    if (!packed_gemm() || cache_ready(ctx)) return;
    const MathMode math = packed_math(ctx);
    if (packing_ == WeightPacking::in_place && cache_.in_place_available) {
      // one mode in place at a time: switching unpacks first (from bf16: the rounded values)
      if constexpr (std::is_same_v<Backend, cpu>)
        if (cache_.packed_in_place() && cache_.in_place_math() != math) cache_.unpack_in_place();
      // the buffer is the network's own; packing it is a change of layout, not of values
      // (const like the copies' cache: forwards of one network serialise on the cache's lock)
      T* P = const_cast<T*>(params_.data());
      std::vector<ops::InPlaceWeight<T, Backend>> w;
      for (const auto& b : blocks_) {
        if (b.skip)
          w.push_back(
              {RowBlock<T, Backend>(P + b.skip0.w, b.skip0.n, 2 * b.skip0.k, 2 * b.skip0.k), 2});
        for (const Lin* l : {&b.qkv, &b.proj, &b.fc1, &b.fc2})
          w.push_back({RowBlock<T, Backend>(P + l->w, l->n, l->k, l->ld), 1});
      }
      if constexpr (std::is_same_v<Backend, cpu>)
        cache_.pack_in_place(w, math);
      else
        cache_.pack_in_place(w);
      return;
    }
    std::vector<RowBlock<const T, Backend>> w;
    const T* P = params_.data();
    for (const auto& b : blocks_) {
      if (b.skip) w.push_back(b.skip0.wv(P)), w.push_back(b.skip1.wv(P));
      for (const Lin* l : {&b.qkv, &b.proj, &b.fc1, &b.fc2}) w.push_back(l->wv(P));
    }
    if constexpr (std::is_same_v<Backend, cpu>)
      cache_.prepare(w, math);
    else
      cache_.prepare(w);
  }

  // Per-call description of a pass.
  struct Pass {
    const Inputs* in;
    std::span<const RowBlock<T, Backend>> out;
    std::int64_t B, L, lh, lw;
  };
  Pass check(const Inputs& in, std::span<const RowBlock<T, Backend>> out) const {
    const char* op = "UViT::forward";
    const auto& C = cfg_.components;
    if (in.x.size() != C.size())
      throw_mismatch(op, "inputs", "one per component", C.size(), in.x.size());
    if (out.size() != C.size())
      throw_mismatch(op, "outputs", "one per component", C.size(), out.size());
    if (in.t.size() != cfg_.groups())
      throw_mismatch(op, "t", "one time vector per group", cfg_.groups(), in.t.size());
    const std::int64_t B = in.x[0].rows;
    // latent_h x latent_w (0 x 0: each patched component at its default size) overrides the
    // size of every patched component; they must then share one default size.
    const std::int64_t lh = in.latent_h, lw = in.latent_w;
    if ((lh == 0) != (lw == 0) || lh < 0 || lw < 0)
      throw error(op, "latent",
                  "latent_h and latent_w: both positive or both 0 (the default size); got " +
                      std::to_string(lh) + "x" + std::to_string(lw));
    if (lh != 0) {
      const UViTComponent* first = nullptr;
      for (const auto& c : C) {
        if (c.kind != ComponentKind::patched_image) continue;
        if (first && first->latent() != c.latent())
          throw error(op, c.name,
                      "a latent size override needs every patched component to share one default "
                      "size; " +
                          first->name + " is " + std::to_string(first->latent()[0]) + "x" +
                          std::to_string(first->latent()[1]) + ", " + c.name + " " +
                          std::to_string(c.latent()[0]) + "x" + std::to_string(c.latent()[1]));
        first = &c;
        if (lh % c.patch || lw % c.patch)
          throw error(op, c.name,
                      "latent sides must be positive multiples of the patch size " +
                          std::to_string(c.patch) + "; got " + std::to_string(lh) + "x" +
                          std::to_string(lw));
      }
    }
    for (std::size_t k = 0; k < C.size(); ++k) {
      check_block(op, "x[" + C[k].name + "]", in.x[k]);
      check_block(op, "out[" + C[k].name + "]", out[k]);
      const std::string want =
          "[" + std::to_string(B) + ", " + std::to_string(C[k].numel(lh, lw)) + "]";
      if (in.x[k].rows != B || in.x[k].cols != C[k].numel(lh, lw))
        throw_mismatch(
            op, "x[" + C[k].name + "]", "shape", want,
            "[" + std::to_string(in.x[k].rows) + ", " + std::to_string(in.x[k].cols) + "]");
      if (out[k].rows != B || out[k].cols != C[k].numel(lh, lw))
        throw_mismatch(
            op, "out[" + C[k].name + "]", "shape", want,
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
    return Pass{&in, out, B, cfg_.tokens(lh, lw), lh, lw};
  }
  template <class U>
  static void check_block(const char* op, const std::string& name, const RowBlock<U, Backend>& b) {
    if (b.rows < 0 || b.cols < 0 || (b.rows > 1 && b.ld < b.cols))
      throw error(op, name,
                  "rows overlap: leading dimension " + std::to_string(b.ld) + " < " +
                      std::to_string(b.cols) + " columns");
    if (b.data == nullptr && b.rows * b.cols > 0) throw error(op, name, "null data");
  }
  ops::ImageGeom geom(const UViTComponent& c, std::int64_t lh, std::int64_t lw) const {
    const auto [h, w] = c.latent(lh, lw);
    return ops::ImageGeom{c.channels, h, w, c.patch};
  }

 public:
  //! Activations of one pass: per-sample slots of B samples.
  struct Buffer {
    Tensor<T, Backend> t;
    std::int64_t slot = 0, rows = 0, cols = 0;
    void fit(std::int64_t B, std::int64_t r, std::int64_t c) {
      rows = r;
      cols = c;
      slot = detail::slot(r * c);
      if (t.size() < B * slot) t = Tensor<T, Backend>(Shape{B * slot});
    }
    BatchBlock<T, Backend> all(std::int64_t B) { return {t.data(), B, rows, cols, cols, slot}; }
  };
  //! The positional table actually added for one latent size.
  struct Positional {
    Tensor<T, Backend> table;
    std::int64_t h = -1, w = -1;
    std::uint64_t version = 0;
  };
  //! Per component: a custom kind's scratch for its embedding and its head (whole batch).
  using KindScratch = std::vector<std::array<BatchBlock<T, Backend>, 2>>;
  //! One block's activations; in inference several of them are the same buffer.
  struct BlockActs {
    BatchBlock<T, Backend> in, skip, t, x1, qkv, att, p, x2, u, h, m, y, st1, st2, st3;
  };
  //! Per-call memory of a forward: activations and the positional table. Reusable across calls
  //! (it only grows); one per concurrent forward.
  class Workspace {
   public:
    Workspace() = default;

   private:
    friend class UViT;
    struct Acts {
      Buffer x, tmp, attn, qkv, hid, col, temb, temb_h;
      std::vector<Buffer> skips;
      std::vector<BatchBlock<T, Backend>> cols;  // per component: the im2col slots (patched)
      std::vector<std::array<Buffer, 2>> kbuf;   // per component: custom kinds' scratch
      KindScratch kscr;
      std::int64_t B = 0;
    };
    void reserve(const UViT& net, const Pass& ps) {
      const auto& cfg = net.cfg_;
      const std::int64_t E = cfg.embed_dim, B = ps.B, L = ps.L;
      const auto G = static_cast<std::int64_t>(cfg.groups());
      a_.B = B;
      a_.x.fit(B, L, E);
      a_.tmp.fit(B, L, E);
      a_.attn.fit(B, L, E);
      a_.qkv.fit(B, L, 3 * E);
      a_.hid.fit(B, L, cfg.hidden());
      std::int64_t colsz = 1;
      for (const auto& c : cfg.components)
        if (c.kind == ComponentKind::patched_image)
          colsz = std::max(colsz, c.tokens(ps.lh, ps.lw) * c.in_features());
      a_.col.fit(B, 1, colsz);
      a_.cols.clear();
      for (const auto& c : cfg.components)
        a_.cols.push_back(c.kind == ComponentKind::patched_image
                              ? BatchBlock<T, Backend>(a_.col.t.data(), B, c.tokens(ps.lh, ps.lw),
                                                       c.in_features(), c.in_features(),
                                                       a_.col.slot)
                              : BatchBlock<T, Backend>{});
      a_.kbuf.resize(cfg.components.size());
      a_.kscr.assign(cfg.components.size(), {});
      for (std::size_t k = 0; k < cfg.components.size(); ++k)
        if (cfg.components[k].kind == ComponentKind::custom)
          for (std::size_t i = 0; i < 2; ++i) {
            a_.kbuf[k][i].fit(B, 1, std::max<std::int64_t>(1, net.comps_[k].scratch[i]));
            a_.kscr[k][i] = a_.kbuf[k][i].all(B);
          }
      a_.temb.fit(G * B, 1, E);
      a_.temb_h.fit(G * B, 1, cfg.mlp_time_embed ? 4 * E : 1);
      a_.skips.resize(static_cast<std::size_t>(cfg.blocks_per_side()));
      for (auto& s : a_.skips) s.fit(B, L, E);
    }
    Acts& acts() { return a_; }
    const Positional& positional(const UViT& net, std::int64_t h, std::int64_t w) {
      if (pe_.h != h || pe_.w != w || pe_.version != net.version_) {
        net.build_positional(pe_, h, w);
        pe_.h = h;
        pe_.w = w;
        pe_.version = net.version_;
      }
      return pe_;
    }
    Acts a_;
    Positional pe_;
  };

 private:
  // The positional table [L, E] for latent side h x w: the group and data-type rows, then each
  // component's rows, bilinearly resized where the latent differs from the default (UVIT.md §4.5).
  void build_positional(Positional& pe, std::int64_t h, std::int64_t w) const {
    const auto& ctx = ctx0();
    const std::int64_t E = cfg_.embed_dim, L = cfg_.tokens(h, w);
    pe.table = Tensor<T, Backend>(Shape{L, E});
    const T* src = params_.data() + off("pos_embed");
    auto rows = [&](const T* p, std::int64_t n) { return RowBlock<const T, Backend>(p, n, E, E); };
    auto dst = [&](std::int64_t r, std::int64_t n) {
      return RowBlock<T, Backend>(pe.table.data() + r * E, n, E, E);
    };
    const auto ng = static_cast<std::int64_t>(cfg_.groups());
    ops::copy<T>(ctx, rows(src, ng), dst(0, ng));
    std::int64_t dst_row = ng, src_row = ng;
    if (cfg_.data_type_token)
      ops::copy<T>(ctx, rows(params_.data() + off("pos_embed_token"), 1), dst(dst_row++, 1));
    for (const auto& c : cfg_.components) {
      const std::int64_t t0 = c.tokens(), t1 = c.tokens(h, w);
      if (!resized(c, h, w)) {
        ops::copy<T>(ctx, rows(src + src_row * E, t0), dst(dst_row, t0));
      } else {
        const auto [h0, w0] = c.latent();
        const auto [h1, w1] = c.latent(h, w);
        ops::bilinear_resize<T>(ctx, rows(src + src_row * E, t0), h0 / c.patch, w0 / c.patch,
                                h1 / c.patch, w1 / c.patch, dst(dst_row, t1));
        emit_host("pos_embed_patches_interp", pe.table.data() + dst_row * E, Shape{1, t1, E});
      }
      src_row += t0;
      dst_row += t1;
    }
  }
  // Whether a patched component's positional rows are resized at latent h x w (UVIT.md §4.5:
  // skipped at the default size).
  static bool resized(const UViTComponent& c, std::int64_t h, std::int64_t w) {
    return c.kind == ComponentKind::patched_image && c.latent(h, w) != c.latent();
  }
  // Backward of build_positional: the gradient of the table [L, E] into the parameters'.
  void positional_backward(const Context<Backend>& ctx, RowBlock<const T, Backend> dpe,
                           std::int64_t h, std::int64_t w, T* G) const {
    const std::int64_t E = cfg_.embed_dim;
    auto add = [&](const T* d, std::int64_t n, T* to) {
      const BatchBlock<const T, Backend> src(d, 1, n, E, E, 0);
      ops::add<T>(ctx, src, BatchBlock<T, Backend>(to, 1, n, E, E, 0));
    };
    T* gpos = G + off("pos_embed");
    const auto ng = static_cast<std::int64_t>(cfg_.groups());
    add(dpe.data, ng, gpos);
    std::int64_t row = ng, src_row = ng;
    if (cfg_.data_type_token) add(dpe.data + (row++) * E, 1, G + off("pos_embed_token"));
    for (const auto& c : cfg_.components) {
      const std::int64_t t0 = c.tokens(), t1 = c.tokens(h, w);
      if (!resized(c, h, w)) {
        add(dpe.data + row * E, t0, gpos + src_row * E);
      } else {
        const auto [h0, w0] = c.latent();
        const auto [h1, w1] = c.latent(h, w);
        ops::bilinear_resize_backward<T>(ctx,
                                         RowBlock<const T, Backend>(dpe.data + row * E, t1, E, E),
                                         h0 / c.patch, w0 / c.patch, h1 / c.patch, w1 / c.patch,
                                         RowBlock<T, Backend>(gpos + src_row * E, t0, E, E));
      }
      src_row += t0;
      row += t1;
    }
  }

  void emit_host(const char* name, const T* d, Shape s) const {
    if (!trace_) return;
    if constexpr (is_host_backend_v<Backend>) trace_(name, d, s);
  }
  // Trace of an activation of samples [s0, s1) (contiguous copy for the callback).
  void emit(const Context<Backend>& ctx, const std::string& name,
            BatchBlock<const T, Backend> a) const {
    if (!trace_) return;
    if constexpr (is_host_backend_v<Backend>) {
      ops::once(ctx, [&] {
        std::vector<T> buf(static_cast<std::size_t>(a.samples * a.rows * a.cols));
        for (std::int64_t s = 0; s < a.samples; ++s)
          for (std::int64_t r = 0; r < a.rows; ++r)
            std::copy_n(a.row(s, r), a.cols, buf.data() + (s * a.rows + r) * a.cols);
        trace_(name, buf.data(), Shape{a.samples, a.rows, a.cols});
      });
    }
  }

  // The rows of component k of a token array [S; L, E].
  BatchBlock<T, Backend> comp_rows(BatchBlock<T, Backend> x, std::size_t k, const Pass& ps) const {
    std::int64_t r = cfg_.lead_tokens();
    for (std::size_t j = 0; j < k; ++j) r += cfg_.components[j].tokens(ps.lh, ps.lw);
    return x.row_range(r, cfg_.components[k].tokens(ps.lh, ps.lw));
  }
  // Component input / output k of samples [s0, s1) as [S; tokens, dim] or [S; 1, numel].
  template <class U>
  BatchBlock<U, Backend> io_view(RowBlock<U, Backend> b, std::size_t k, std::int64_t s0,
                                 std::int64_t n) const {
    const auto& c = cfg_.components[k];
    if (c.kind == ComponentKind::tokens)
      return BatchBlock<U, Backend>(b.data + s0 * b.ld, n, c.length, c.dim, c.dim, b.ld);
    return BatchBlock<U, Backend>(b.data + s0 * b.ld, n, 1, b.cols, b.cols, b.ld);
  }

  // Token sequence of samples [s0, s1) into x: time tokens, data-type token, component
  // embeddings, positional table (UVIT.md §4.2-4.5). `temb`/`temb_h`/`cols`: scratch (or the
  // tape's records in training).
  void embed(const Context<Backend>& ctx, const Pass& ps, const Positional& pe,
             BatchBlock<T, Backend> x, BatchBlock<T, Backend> temb, BatchBlock<T, Backend> temb_u,
             BatchBlock<T, Backend> temb_h, const std::vector<BatchBlock<T, Backend>>& cols,
             const KindScratch& ks, std::int64_t s0, std::int64_t s1) const {
    const Inputs& in = *ps.in;
    const T* P = params_.data();
    const std::int64_t n = s1 - s0;
    for (std::size_t g = 0; g < cfg_.groups(); ++g) {
      const auto tg = in.t[g].subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n));
      const auto dst = x.row_range(static_cast<std::int64_t>(g), 1);
      if (cfg_.mlp_time_embed) {
        const auto e = temb.sample_range(g * n, n), u = temb_u.sample_range(g * n, n),
                   hh = temb_h.sample_range(g * n, n);
        ops::timestep_embedding<T>(ctx, tg, e);
        const auto& tl = time_[g];
        if (u.data != hh.data) {
          ops::linear<T>(ctx, e, tl[0].wv(P), tl[0].bv(P), u, ops::Epilogue::none);
          ops::silu<T>(ctx, u, hh);
        } else {
          ops::linear<T>(ctx, e, tl[0].wv(P), tl[0].bv(P), hh, ops::Epilogue::none);
          ops::silu<T>(ctx, hh, hh);
        }
        ops::linear<T>(ctx, hh, tl[1].wv(P), tl[1].bv(P), dst, ops::Epilogue::none);
      } else {
        ops::timestep_embedding<T>(ctx, tg, dst);
      }
      if (trace_) emit(ctx, cfg_.time_names[g], dst);
    }
    if (cfg_.data_type_token)
      ops::gather_rows<T>(
          ctx,
          RowBlock<const T, Backend>(P + off("token_embedding.weight"), cfg_.data_types,
                                     cfg_.embed_dim, cfg_.embed_dim),
          in.data_type.subspan(static_cast<std::size_t>(s0), static_cast<std::size_t>(n)),
          x.row_range(static_cast<std::int64_t>(cfg_.groups()), 1));
    if (trace_ && cfg_.data_type_token)
      emit(ctx, "token_embedding", x.row_range(static_cast<std::int64_t>(cfg_.groups()), 1));
    for (std::size_t k = 0; k < cfg_.components.size(); ++k) {
      const auto& c = cfg_.components[k];
      const auto src = io_view<const T>(in.x[k], k, s0, n);
      const auto dst = comp_rows(x, k, ps);
      if (c.kind == ComponentKind::tokens) {
        ops::linear<T>(ctx, src, comps_[k].in.wv(P), comps_[k].in.bv(P), dst, ops::Epilogue::none);
      } else if (c.kind == ComponentKind::custom) {
        std::vector<const T*> pp;
        std::vector<T*> gg;
        comps_[k].kind->embed(ctx, kind_call(k, pp, gg, nullptr), src, ks[k][0].sample_range(s0, n),
                              dst);
      } else {
        const auto col = cols[k].sample_range(s0, n);
        ops::patchify<T>(ctx, src, geom(c, ps.lh, ps.lw), col);
        ops::linear<T>(ctx, col, comps_[k].in.wv(P), comps_[k].in.bv(P), dst, ops::Epilogue::none);
      }
      if (trace_) {  // the module's name, and its parent's for a patch embedding's conv
        emit(ctx, c.in_name, dst);
        const auto dot = c.in_name.rfind('.');
        if (c.kind == ComponentKind::patched_image && dot != std::string::npos)
          emit(ctx, c.in_name.substr(0, dot), dst);
      }
    }
    ops::add_rows<T>(
        ctx, RowBlock<const T, Backend>(pe.table.data(), ps.L, cfg_.embed_dim, cfg_.embed_dim), x);
  }

  // Outputs of samples [s0, s1) from the normed tokens xn (UVIT.md §4.7).
  void heads(const Context<Backend>& ctx, const Pass& ps, BatchBlock<T, Backend> xn,
             const std::vector<BatchBlock<T, Backend>>& cols, const KindScratch& ks,
             std::int64_t s0, std::int64_t s1) const {
    const T* P = params_.data();
    for (std::size_t k = 0; k < cfg_.components.size(); ++k) {
      const auto& c = cfg_.components[k];
      const auto dst = io_view<T>(ps.out[k], k, s0, s1 - s0);
      const auto src = comp_rows(xn, k, ps);
      if (c.kind == ComponentKind::tokens) {
        ops::linear<T>(ctx, src, comps_[k].out.wv(P), comps_[k].out.bv(P), dst,
                       ops::Epilogue::none);
      } else if (c.kind == ComponentKind::custom) {
        std::vector<const T*> pp;
        std::vector<T*> gg;
        comps_[k].kind->head(ctx, kind_call(k, pp, gg, nullptr), src,
                             ks[k][1].sample_range(s0, s1 - s0), dst);
      } else {
        const auto col = cols[k].sample_range(s0, s1 - s0);
        ops::linear<T>(ctx, src, comps_[k].out.wv(P), comps_[k].out.bv(P), col,
                       ops::Epilogue::none);
        if (trace_) emit(ctx, c.out_name, col);
        ops::unpatchify<T>(ctx, col, geom(c, ps.lh, ps.lw), dst);
      }
      if (trace_ && c.kind != ComponentKind::patched_image) emit(ctx, c.out_name, dst);
    }
  }

  // Runs f, adding its thread time and `flop` (the whole call's products) to the profile as
  // kind k where one is set.
  template <class F>
  void timed(const Context<Backend>& ctx, LayerKind k, double flop, F&& f) const {
    if (prof_) {
      if constexpr (std::is_same_v<Backend, cpu>) {
        const auto t0 = LayerProfile::clock::now();
        f();
        prof_->add(k, LayerProfile::clock::now() - t0, flop * ops::work_share(ctx));
      } else {  // asynchronous backends: the layer's kernels between two waits
        ops::synchronize(ctx);
        const auto t0 = LayerProfile::clock::now();
        f();
        ops::synchronize(ctx);
        prof_->add(k, LayerProfile::clock::now() - t0, flop);
      }
      return;
    }
    f();
  }
  // Products of a linear layer x w^T.
  template <class X, class W>
  static double linear_flop(const X& x, const W& w) {
    return 2.0 * static_cast<double>(x.samples * x.rows) * static_cast<double>(w.rows * w.cols);
  }

  // One post-LN block (UVIT.md §4.6). In inference several activations share a buffer: x1 and
  // x2 and y are the output array, t / p / m the temporary, u == h (GELU fused into fc1).
  void block(const Context<Backend>& ctx, const Block& b, const BlockActs& a) const {
    const T* P = params_.data();
    const auto none = ops::Epilogue::none;
    const BatchBlock<const T, Backend> nul{};
    using K = LayerKind;
    if (b.skip) {
      timed(ctx, K::skip_linear,
            linear_flop(a.in, b.skip0.wv(P)) + linear_flop(a.skip, b.skip1.wv(P)), [&] {
              ops::linear<T>(ctx, a.in, b.skip0.wv(P), b.skip0.bv(P), a.t, none, &cache_);
              ops::linear<T>(ctx, a.skip, b.skip1.wv(P), nullptr, a.t, ops::Epilogue::accumulate,
                             &cache_);
            });
      if (trace_) emit(ctx, b.name + ".skip_linear", a.t);
      timed(ctx, K::layer_norm, 0,
            [&] { ops::layer_norm<T>(ctx, a.t, nul, P + b.norm1.g, P + b.norm1.b, a.x1, a.st1); });
      if (trace_) emit(ctx, b.name + ".norm1", a.x1);
    }
    timed(ctx, K::qkv, linear_flop(a.x1, b.qkv.wv(P)),
          [&] { ops::linear<T>(ctx, a.x1, b.qkv.wv(P), b.qkv.bv(P), a.qkv, none, &cache_); });
    if (trace_) emit(ctx, b.name + ".attn.qkv", a.qkv);
    const double lq = static_cast<double>(a.qkv.rows);
    timed(ctx, K::attention,
          4.0 * static_cast<double>(a.qkv.samples) * lq * lq * static_cast<double>(cfg_.embed_dim),
          [&] { ops::attention<T>(ctx, a.qkv, cfg_.num_heads, a.att); });
    timed(ctx, K::proj, linear_flop(a.att, b.proj.wv(P)),
          [&] { ops::linear<T>(ctx, a.att, b.proj.wv(P), b.proj.bv(P), a.p, none, &cache_); });
    if (trace_) emit(ctx, b.name + ".attn", a.p);
    timed(ctx, K::layer_norm, 0,
          [&] { ops::layer_norm<T>(ctx, a.x1, a.p, P + b.norm2.g, P + b.norm2.b, a.x2, a.st2); });
    if (trace_) emit(ctx, b.name + ".norm2", a.x2);
    timed(ctx, K::fc1_gelu, linear_flop(a.x2, b.fc1.wv(P)), [&] {
      if (a.u.data == a.h.data && !trace_) {
        ops::linear<T>(ctx, a.x2, b.fc1.wv(P), b.fc1.bv(P), a.h, ops::Epilogue::gelu, &cache_);
      } else {  // training (pre-activation kept) or tracing (pre-activation observed)
        ops::linear<T>(ctx, a.x2, b.fc1.wv(P), b.fc1.bv(P), a.u, none, &cache_);
        if (trace_) emit(ctx, b.name + ".mlp.fc1", a.u);
        ops::gelu<T>(ctx, a.u, a.h);
      }
    });
    timed(ctx, K::fc2, linear_flop(a.h, b.fc2.wv(P)),
          [&] { ops::linear<T>(ctx, a.h, b.fc2.wv(P), b.fc2.bv(P), a.m, none, &cache_); });
    if (trace_) emit(ctx, b.name + ".mlp", a.m);
    timed(ctx, K::layer_norm, 0,
          [&] { ops::layer_norm<T>(ctx, a.x2, a.m, P + b.norm3.g, P + b.norm3.b, a.y, a.st3); });
  }

  // Inference pass over samples [s0, s1) on the workspace.
  void run(const Context<Backend>& ctx, const Pass& ps, const Positional& pe,
           typename Workspace::Acts& w, std::int64_t s0, std::int64_t s1) const {
    const std::int64_t n = s1 - s0, B = ps.B;
    auto sl = [&](Buffer& b) { return b.all(B).sample_range(s0, n); };
    const auto x = sl(w.x), tmp = sl(w.tmp);
    const auto& cols = w.cols;  // whole-batch views, made before the parallel region
    // one slot per (group, sample) for the time MLP
    const auto te = BatchBlock<T, Backend>(w.temb.t.data() + s0 * cfg_.groups() * w.temb.slot,
                                           n * static_cast<std::int64_t>(cfg_.groups()), 1,
                                           cfg_.embed_dim, cfg_.embed_dim, w.temb.slot);
    const auto th = BatchBlock<T, Backend>(w.temb_h.t.data() + s0 * cfg_.groups() * w.temb_h.slot,
                                           n * static_cast<std::int64_t>(cfg_.groups()), 1,
                                           w.temb_h.cols, w.temb_h.cols, w.temb_h.slot);
    const double io = io_flops(ps.lh, ps.lw) * static_cast<double>(n);
    timed(ctx, LayerKind::embed, io,
          [&] { embed(ctx, ps, pe, x, te, th, th, cols, w.kscr, s0, s1); });
    emit(ctx, "x_embedded", x);
    const std::int64_t sides = cfg_.blocks_per_side();
    BatchBlock<T, Backend> cur = x;
    BlockActs a;
    a.qkv = sl(w.qkv);
    a.att = sl(w.attn);
    a.u = a.h = sl(w.hid);
    a.t = a.p = a.m = tmp;
    for (std::int64_t i = 0; i < 2 * sides + 1; ++i) {
      const Block& b = blocks_[static_cast<std::size_t>(i)];
      a.in = cur;
      if (i < sides) {  // in_blocks.i writes into skip buffer i, which the next block reads
        a.y = sl(w.skips[static_cast<std::size_t>(i)]);
        a.x1 = a.in;
      } else {
        a.y = x;
        a.x1 = b.skip ? x : a.in;
        if (b.skip) a.skip = sl(w.skips[static_cast<std::size_t>(2 * sides - i)]);
      }
      a.x2 = a.y;
      block(ctx, b, a);
      emit(ctx, b.name, a.y);
      cur = a.y;
    }
    const T* P = params_.data();
    timed(ctx, LayerKind::heads, io, [&] {
      ops::layer_norm<T>(ctx, x, BatchBlock<const T, Backend>{}, P + final_norm_.g,
                         P + final_norm_.b, x, BatchBlock<T, Backend>{});
      emit(ctx, "norm", x);
      heads(ctx, ps, x, cols, w.kscr, s0, s1);
    });
  }

 public:
  //! What a training forward records for backward().
  class Tape {
   public:
    Tape() = default;
    //! Elements held (activations and saved inputs).
    std::int64_t elements() const {
      std::int64_t n = 0;
      for (const auto* b : all()) n += b->t.size();
      return n;
    }

   private:
    friend class UViT;
    std::vector<const Buffer*> all() const {
      std::vector<const Buffer*> v;
      for (const auto& b : bufs_) v.push_back(b.get());
      return v;
    }
    Buffer& buf() {
      if (used_ == bufs_.size()) bufs_.push_back(std::make_unique<Buffer>());
      return *bufs_[used_++];
    }
    BatchBlock<T, Backend> make(std::int64_t B, std::int64_t r, std::int64_t c) {
      Buffer& b = buf();
      b.fit(B, r, c);
      return b.all(B);
    }
    void record(const UViT& net, const Context<Backend>& ctx, const Pass& ps, bool recompute) {
      const auto& cfg = net.cfg_;
      ready_ = false;
      owner_ = &net;
      used_ = 0;
      const std::int64_t B = ps.B, L = ps.L, E = cfg.embed_dim, Hm = cfg.hidden();
      const auto G = static_cast<std::int64_t>(cfg.groups());
      B_ = B;
      lh = ps.lh;
      lw = ps.lw;
      recompute_ = recompute;
      x0 = make(B, L, E);
      temb = make(G * B, 1, E);
      temb_u = make(G * B, 1, cfg.mlp_time_embed ? 4 * E : 1);
      temb_h = make(G * B, 1, cfg.mlp_time_embed ? 4 * E : 1);
      t_.assign(static_cast<std::size_t>(G), {});
      for (std::int64_t g = 0; g < G; ++g)
        t_[static_cast<std::size_t>(g)].assign(ps.in->t[static_cast<std::size_t>(g)].begin(),
                                               ps.in->t[static_cast<std::size_t>(g)].end());
      dt_.assign(ps.in->data_type.begin(), ps.in->data_type.end());
      xin.clear();
      cols.clear();
      kscr.assign(cfg.components.size(), {});
      for (std::size_t k = 0; k < cfg.components.size(); ++k) {
        const auto& c = cfg.components[k];
        if (c.kind == ComponentKind::tokens) {
          xin.push_back(make(B, c.length, c.dim));
          ops::copy<T>(ctx, net.io_view<const T>(ps.in->x[k], k, 0, B), xin.back());
          cols.push_back({});
        } else if (c.kind == ComponentKind::custom) {
          xin.push_back(make(B, 1, c.numel()));
          ops::copy<T>(ctx, net.io_view<const T>(ps.in->x[k], k, 0, B), xin.back());
          cols.push_back({});
          for (std::size_t i = 0; i < 2; ++i)
            kscr[k][i] = make(B, 1, std::max<std::int64_t>(1, net.comps_[k].scratch[i]));
        } else {
          xin.push_back({});
          cols.push_back(make(B, c.tokens(ps.lh, ps.lw), c.in_features()));
        }
      }
      const std::size_t nb = net.blocks_.size();
      acts.assign(recompute ? nb + 1 : nb, {});
      auto internals = [&](BlockActs& a, bool skip) {
        if (skip) {
          a.t = make(B, L, E);
          a.x1 = make(B, L, E);
          a.st1 = make(B, L, 2);
        }
        a.qkv = make(B, L, 3 * E);
        a.att = make(B, L, E);
        a.p = make(B, L, E);
        a.x2 = make(B, L, E);
        a.st2 = make(B, L, 2);
        a.u = make(B, L, Hm);
        a.h = make(B, L, Hm);
        a.m = make(B, L, E);
        a.st3 = make(B, L, 2);
      };
      BatchBlock<T, Backend> cur = x0;
      const std::int64_t sides = cfg.blocks_per_side();
      for (std::size_t i = 0; i < nb; ++i) {
        BlockActs& a = acts[i];
        a.in = cur;
        a.y = make(B, L, E);
        if (net.blocks_[i].skip)
          a.skip = acts[static_cast<std::size_t>(2 * sides) - i].y;  // in_blocks.(2s - i)'s output
        if (!recompute) internals(a, net.blocks_[i].skip);
        cur = a.y;
      }
      if (recompute) {
        internals(acts[nb], true);
        x1_internal = acts[nb].x1;
      }
      xn = make(B, L, E);
      stn = make(B, L, 2);
      // backward scratch
      gx = make(B, L, E);
      gy = make(B, L, E);
      ga = make(B, L, E);
      gb = make(B, L, E);
      gq = make(B, L, 3 * E);
      gh = make(B, L, Hm);
      gskip.clear();
      for (std::int64_t i = 0; i < sides; ++i) gskip.push_back(make(B, L, E));
      gcol.clear();
      for (const auto& c : cols) gcol.push_back(c ? make(B, c.rows, c.cols) : c);
      gte = make(G * B, 1, E);
      gth = make(G * B, 1, cfg.mlp_time_embed ? 4 * E : 1);
      gpe = make(1, L, E);
    }
    BlockActs& block_acts(std::size_t i, const Block& b) {
      if (!recompute_) return acts[i];
      BlockActs& s = acts.back();
      BlockActs& a = acts[i];
      s.in = a.in;
      s.skip = a.skip;
      s.y = a.y;
      s.x1 = b.skip ? x1_internal : a.in;
      return s;
    }

    std::vector<std::unique_ptr<Buffer>> bufs_;
    std::size_t used_ = 0;
    bool ready_ = false, recompute_ = false;
    const UViT* owner_ = nullptr;
    std::uint64_t version_ = 0;
    std::int64_t B_ = 0, lh = 0, lw = 0;
    std::vector<std::vector<double>> t_;
    std::vector<std::int64_t> dt_;
    Workspace ws;  // positional table
    BatchBlock<T, Backend> x0, temb, temb_u, temb_h, xn, stn, x1_internal;
    std::vector<BatchBlock<T, Backend>> xin, cols;
    KindScratch kscr;
    std::vector<BlockActs> acts;
    BatchBlock<T, Backend> gx, gy, ga, gb, gq, gh, gte, gth, gpe;
    std::vector<BatchBlock<T, Backend>> gskip, gcol;
  };

 private:
  void train_forward(const Context<Backend>& ctx, const Pass& ps, const Positional& pe,
                     Tape& tp) const {
    const std::int64_t B = ps.B;
    // the tape's inputs: token components from its copies, times and data types likewise
    Inputs in = *ps.in;
    for (std::size_t g = 0; g < cfg_.groups(); ++g) in.t[g] = tp.t_[g];
    in.data_type = tp.dt_;
    for (std::size_t k = 0; k < cfg_.components.size(); ++k)
      if (tp.xin[k])
        in.x[k] = RowBlock<const T, Backend>(tp.xin[k].data, B, in.x[k].cols, tp.xin[k].stride);
    Pass p2 = ps;
    p2.in = &in;
    embed(ctx, p2, pe, tp.x0, tp.temb, tp.temb_u, tp.temb_h, tp.cols, tp.kscr, 0, B);
    emit(ctx, "x_embedded", tp.x0);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      const Block& b = blocks_[i];
      BlockActs& a = tp.block_acts(i, b);
      if (!b.skip) a.x1 = a.in;
      block(ctx, b, a);
      emit(ctx, b.name, a.y);
    }
    const T* P = params_.data();
    ops::layer_norm<T>(ctx, tp.acts[blocks_.size() - 1].y, BatchBlock<const T, Backend>{},
                       P + final_norm_.g, P + final_norm_.b, tp.xn, tp.stn);
    emit(ctx, "norm", tp.xn);
    std::vector<BatchBlock<T, Backend>> scratch;
    for (std::size_t k = 0; k < cfg_.components.size(); ++k) scratch.push_back(tp.gcol[k]);
    heads(ctx, p2, tp.xn, scratch, tp.kscr, 0, B);
  }

  // Backward of one block: dy (clobbered) -> din (written), dskip (+=), parameter gradients.
  void block_backward(const Context<Backend>& ctx, const Block& b, const BlockActs& a,
                      BatchBlock<T, Backend> dy, BatchBlock<T, Backend> din,
                      BatchBlock<T, Backend> dskip, Tape& tp, T* G) const {
    const T* P = params_.data();
    using CB = BatchBlock<const T, Backend>;
    const CB nul{};
    // y = LN3(x2 + m)
    ops::layer_norm_backward<T>(ctx, a.x2, a.m, P + b.norm3.g, a.st3, dy, dy, G + b.norm3.g,
                                G + b.norm3.b);
    // m = h W2^T + b2 ; h = gelu(u) ; u = x2 W1^T + b1
    ops::linear_backward<T>(ctx, a.h, b.fc2.wv(P), dy, tp.gh, false, b.fc2.wg(G), b.fc2.bg(G));
    ops::gelu_backward<T>(ctx, a.u, tp.gh, tp.gh);
    ops::linear_backward<T>(ctx, a.x2, b.fc1.wv(P), tp.gh, dy, true, b.fc1.wg(G), b.fc1.bg(G));
    // x2 = LN2(x1 + p)
    ops::layer_norm_backward<T>(ctx, a.x1, a.p, P + b.norm2.g, a.st2, dy, dy, G + b.norm2.g,
                                G + b.norm2.b);
    ops::linear_backward<T>(ctx, a.att, b.proj.wv(P), dy, tp.ga, false, b.proj.wg(G), b.proj.bg(G));
    ops::attention_backward<T>(ctx, a.qkv, cfg_.num_heads, tp.ga, tp.gq);
    ops::linear_backward<T>(ctx, a.x1, b.qkv.wv(P), tp.gq, dy, true, b.qkv.wg(G), b.qkv.bg(G));
    if (b.skip) {
      ops::layer_norm_backward<T>(ctx, a.t, nul, P + b.norm1.g, a.st1, dy, dy, G + b.norm1.g,
                                  G + b.norm1.b);
      ops::linear_backward<T>(ctx, a.in, b.skip0.wv(P), dy, din, false, b.skip0.wg(G),
                              b.skip0.bg(G));
      ops::linear_backward<T>(ctx, a.skip, b.skip1.wv(P), dy, dskip, true, b.skip1.wg(G), nullptr);
    } else {
      ops::copy<T>(ctx, dy, din);
    }
  }

  void train_backward(const Context<Backend>& ctx, Tape& tp,
                      std::span<const RowBlock<const T, Backend>> dout,
                      std::span<const RowBlock<T, Backend>> dx) {
    require_plain("UViT::backward");
    const char* op = "UViT::backward";
    if (!tp.ready_) throw error(op, "tape", "no complete training forward was recorded on it");
    if (tp.owner_ != this) throw error(op, "tape", "recorded by another network");
    if (tp.version_ != version_)
      throw error(op, "tape",
                  "the parameters changed since its forward (parameters_changed was called)");
    const auto& C = cfg_.components;
    const std::int64_t B = tp.B_, E = cfg_.embed_dim;
    if (dout.size() != C.size())
      throw_mismatch(op, "dout", "one per component", C.size(), dout.size());
    if (!dx.empty() && dx.size() != C.size())
      throw_mismatch(op, "dx", "one per component (or none)", C.size(), dx.size());

    Inputs in;
    Pass ps{&in, {}, B, cfg_.tokens(tp.lh, tp.lw), tp.lh, tp.lw};
    for (std::size_t k = 0; k < C.size(); ++k) {
      const std::int64_t n = C[k].numel(tp.lh, tp.lw);
      check_block(op, "dout[" + C[k].name + "]", dout[k]);
      if (!dx.empty()) check_block(op, "dx[" + C[k].name + "]", dx[k]);
      if (dout[k].rows != B || dout[k].cols != n)
        throw_mismatch(
            op, "dout[" + C[k].name + "]", "shape",
            "[" + std::to_string(B) + ", " + std::to_string(n) + "]",
            "[" + std::to_string(dout[k].rows) + ", " + std::to_string(dout[k].cols) + "]");
      if (!dx.empty() && (dx[k].rows != B || dx[k].cols != n))
        throw_mismatch(op, "dx[" + C[k].name + "]", "shape",
                       "[" + std::to_string(B) + ", " + std::to_string(n) + "]",
                       "[" + std::to_string(dx[k].rows) + ", " + std::to_string(dx[k].cols) + "]");
    }
    T* G = gradients().data();
    const T* P = params_.data();
    // heads
    const auto dxn = tp.gx;
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const auto d = io_view<const T>(dout[k], k, 0, B);
      const auto rows = comp_rows(dxn, k, ps);
      const auto xr = comp_rows(tp.xn, k, ps);
      if (c.kind == ComponentKind::tokens) {
        ops::linear_backward<T>(ctx, xr, comps_[k].out.wv(P), d, rows, false, comps_[k].out.wg(G),
                                comps_[k].out.bg(G));
      } else if (c.kind == ComponentKind::custom) {
        std::vector<const T*> pp;
        std::vector<T*> gg;
        comps_[k].kind->head_backward(ctx, kind_call(k, pp, gg, G), xr, tp.kscr[k][1], d, rows);
      } else {
        ops::unpatchify_backward<T>(ctx, d, geom(c, tp.lh, tp.lw), tp.gcol[k]);
        ops::linear_backward<T>(ctx, xr, comps_[k].out.wv(P), tp.gcol[k], rows, false,
                                comps_[k].out.wg(G), comps_[k].out.bg(G));
      }
    }
    zero(ctx, dxn.row_range(0, cfg_.lead_tokens()));
    // final norm
    const std::size_t nb = blocks_.size();
    ops::layer_norm_backward<T>(ctx, tp.acts[nb - 1].y, BatchBlock<const T, Backend>{},
                                P + final_norm_.g, tp.stn, dxn, tp.gy, G + final_norm_.g,
                                G + final_norm_.b);
    // blocks, last first; gy holds d(output of the current block)
    const std::int64_t sides = cfg_.blocks_per_side();
    for (auto& g : tp.gskip) zero(ctx, g);
    BatchBlock<T, Backend> dy = tp.gy, din = tp.gx;
    for (std::size_t ii = nb; ii-- > 0;) {
      const Block& b = blocks_[ii];
      const auto i = static_cast<std::int64_t>(ii);
      if (i < sides)  // in_blocks.i's output also fed out_blocks.(s - 1 - i) as its skip
        ops::add<T>(ctx, tp.gskip[ii], dy);
      BlockActs& a = tp.block_acts(ii, b);
      if (tp.recompute_) {  // the block's internals again, from its recorded input
        if (!b.skip) a.x1 = a.in;
        const auto y = a.y;
        a.y = tp.gb;  // recomputed output is not needed: keep the recorded one intact
        block(ctx, b, a);
        a.y = y;
      }
      const auto ds =
          b.skip ? tp.gskip[static_cast<std::size_t>(2 * sides - i)] : BatchBlock<T, Backend>{};
      block_backward(ctx, b, a, dy, din, ds, tp, G);
      std::swap(dy, din);
    }
    // dy: gradient of the embedded tokens x0
    zero(ctx, tp.gpe);
    ops::sum_samples<T>(ctx, dy, RowBlock<T, Backend>(tp.gpe.data, ps.L, E, E));
    positional_backward(ctx, RowBlock<const T, Backend>(tp.gpe.data, ps.L, E, E), tp.lh, tp.lw, G);
    if (cfg_.data_type_token)
      ops::gather_rows_backward<T>(
          ctx, dy.row_range(static_cast<std::int64_t>(cfg_.groups()), 1), tp.dt_,
          RowBlock<T, Backend>(G + off("token_embedding.weight"), cfg_.data_types, E, E));
    if (cfg_.mlp_time_embed) {
      const std::int64_t G0 = static_cast<std::int64_t>(cfg_.groups());
      for (std::int64_t g = 0; g < G0; ++g) {
        const auto& tl = time_[static_cast<std::size_t>(g)];
        const auto dtok = dy.row_range(g, 1);
        const auto hh = tp.temb_h.sample_range(g * B, B), u = tp.temb_u.sample_range(g * B, B),
                   e = tp.temb.sample_range(g * B, B), dh = tp.gth.sample_range(g * B, B);
        ops::linear_backward<T>(ctx, hh, tl[1].wv(P), dtok, dh, false, tl[1].wg(G), tl[1].bg(G));
        ops::silu_backward<T>(ctx, u, dh, dh);
        ops::linear_backward<T>(ctx, e, tl[0].wv(P), dh, BatchBlock<T, Backend>{}, false,
                                tl[0].wg(G), tl[0].bg(G));
      }
    }
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const auto d = comp_rows(dy, k, ps);
      const bool want = !dx.empty();
      if (c.kind == ComponentKind::tokens) {
        ops::linear_backward<T>(ctx, tp.xin[k], comps_[k].in.wv(P), d,
                                want ? io_view<T>(dx[k], k, 0, B) : BatchBlock<T, Backend>{}, false,
                                comps_[k].in.wg(G), comps_[k].in.bg(G));
      } else if (c.kind == ComponentKind::custom) {
        std::vector<const T*> pp;
        std::vector<T*> gg;
        comps_[k].kind->embed_backward(
            ctx, kind_call(k, pp, gg, G), tp.xin[k], tp.kscr[k][0], d,
            want ? io_view<T>(dx[k], k, 0, B) : BatchBlock<T, Backend>{});
      } else {
        ops::linear_backward<T>(ctx, tp.cols[k], comps_[k].in.wv(P), d,
                                want ? tp.gcol[k] : BatchBlock<T, Backend>{}, false,
                                comps_[k].in.wg(G), comps_[k].in.bg(G));
        if (want)
          ops::patchify_backward<T>(ctx, tp.gcol[k], geom(c, tp.lh, tp.lw),
                                    io_view<T>(dx[k], k, 0, B));
      }
    }
  }
  static void zero(const Context<Backend>& ctx, BatchBlock<T, Backend> b) {
    for (std::int64_t s = 0; s < b.samples; ++s) ops::fill(ctx, b.sample(s), T(0));
  }

  UViTConfig cfg_;
  std::vector<Entry> entries_;
  std::map<std::string, std::size_t> index_;
  Tensor<T, Backend> params_, grads_;
  std::vector<Block> blocks_;
  std::vector<Component> comps_;
  std::vector<std::array<Lin, 2>> time_;
  Norm final_norm_;
  // Identifies the parameters' state across every network of the process (workspace caches and
  // tapes compare it, so a workspace moved to another network rebuilds its tables).
  static std::uint64_t next_version() {
    static std::atomic<std::uint64_t> n{0};
    return ++n;
  }
  std::uint64_t version_ = next_version();
  mutable ops::LinearCache<T, Backend> cache_;
  bool grads_zero_ = false;  // every gradient known to be zero (zero_gradients)
  std::unique_ptr<Workspace> own_ws_;
  Trace trace_;
  LayerProfile* prof_ = nullptr;
  WeightPacking packing_ = WeightPacking::copies;
};

}  // namespace unidiffuser::nn
