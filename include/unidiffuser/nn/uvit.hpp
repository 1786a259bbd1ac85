// SPDX-License-Identifier: Apache-2.0
//! \file uvit.hpp
//! The multimodal U-ViT noise-prediction network over K timestep groups (UVIT.md), with presets
//! for the official v0 / v1 models. Parameters use the official state_dict names.
//!
//! Token layout (configuration): one time token per group (group order), an optional learned
//! data-type token (v1), then the content tokens of the components in `components` order. A
//! component is a patched image latent (strided-conv embedding, linear head + unpatchify) or a
//! token sequence (linear embedding and head; a vector is one token). The positional table
//! `pos_embed` covers time and content tokens at the default sizes; v1's data-type position is the
//! separate `pos_embed_token`, spliced in after the time tokens (UVIT.md §4.4).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
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

namespace unidiffuser::nn {

enum class ComponentKind { patched_image, tokens };

//! One input/output tensor of the network.
struct UViTComponent {
  std::string name;  //!< e.g. "img", "clip_img", "text"
  ComponentKind kind = ComponentKind::tokens;
  std::size_t group = 0;  //!< timestep group
  std::size_t slot = 0;   //!< position inside the group's row (GroupLayout component index)
  std::int64_t channels = 0, size = 0, patch = 0;  //!< patched image: C, default side S, p
  std::int64_t length = 0, dim = 0;                //!< tokens: L, D
  std::string in_name, out_name;  //!< parameter prefixes of the embedding and the head

  std::int64_t tokens(std::int64_t h = 0, std::int64_t w = 0) const {
    if (kind == ComponentKind::tokens) return length;
    if (h == 0) h = w = size;
    return (h / patch) * (w / patch);
  }
  std::int64_t numel(std::int64_t h = 0, std::int64_t w = 0) const {
    if (kind == ComponentKind::tokens) return length * dim;
    if (h == 0) h = w = size;
    return channels * h * w;
  }
  std::int64_t in_features() const {
    return kind == ComponentKind::tokens ? dim : channels * patch * patch;
  }
};

//! Network hyper-parameters and token layout.
struct UViTConfig {
  std::int64_t embed_dim = 0, depth = 0, num_heads = 0;
  double mlp_ratio = 4.0;
  bool qkv_bias = false;
  bool mlp_time_embed = false;
  std::vector<std::string> time_names;  //!< per group: parameter prefix of its time MLP
  bool data_type_token = false;         //!< v1's learned token (and pos_embed_token)
  std::int64_t data_types = 2;
  std::vector<UViTComponent> components;  //!< content tokens in token order
  std::string version = "custom";

  std::size_t groups() const { return time_names.size(); }
  std::int64_t hidden() const {
    return static_cast<std::int64_t>(static_cast<double>(embed_dim) * mlp_ratio);
  }
  std::int64_t blocks_per_side() const { return depth / 2; }
  std::int64_t lead_tokens() const {
    return static_cast<std::int64_t>(groups()) + (data_type_token ? 1 : 0);
  }
  std::int64_t tokens(std::int64_t h = 0, std::int64_t w = 0) const {
    std::int64_t n = lead_tokens();
    for (const auto& c : components) n += c.tokens(h, w);
    return n;
  }

  //! The official two-group network (UVIT.md §1): version "v0" or "v1".
  static UViTConfig official(const std::string& version, std::int64_t img_size = 64,
                             std::int64_t in_chans = 4, std::int64_t patch_size = 2,
                             std::int64_t embed_dim = 1536, std::int64_t depth = 30,
                             std::int64_t num_heads = 24, double mlp_ratio = 4.0,
                             bool qkv_bias = false, bool mlp_time_embed = false,
                             std::int64_t text_dim = 64, std::int64_t num_text_tokens = 77,
                             std::int64_t clip_img_dim = 512) {
    if (version != "v0" && version != "v1")
      throw error("UViTConfig::official", "version",
                  "expected \"v0\" or \"v1\", got \"" + version + "\"");
    UViTConfig c;
    c.version = version;
    c.embed_dim = embed_dim;
    c.depth = depth;
    c.num_heads = num_heads;
    c.mlp_ratio = mlp_ratio;
    c.qkv_bias = qkv_bias;
    c.mlp_time_embed = mlp_time_embed;
    c.time_names = {"time_img_embed", "time_text_embed"};
    c.data_type_token = version == "v1";
    UViTComponent text{"text",   ComponentKind::tokens, 1,         0, 0, 0, 0, num_text_tokens,
                       text_dim, "text_embed",          "text_out"};
    UViTComponent clip{"clip_img",       ComponentKind::tokens, 0, 1, 0, 0, 0, 1, clip_img_dim,
                       "clip_img_embed", "clip_img_out"};
    UViTComponent img{"img",
                      ComponentKind::patched_image,
                      0,
                      0,
                      in_chans,
                      img_size,
                      patch_size,
                      0,
                      0,
                      "patch_embed.proj",
                      "decoder_pred"};
    c.components = {text, clip, img};
    c.validate();
    return c;
  }
  //! From the official constructor arguments as JSON (img_size, in_chans, patch_size, embed_dim,
  //! depth, num_heads, mlp_ratio, qkv_bias, mlp_time_embed, text_dim, num_text_tokens,
  //! clip_img_dim) plus "version" ("v0" / "v1"); `default_version` when the key is absent.
  static UViTConfig from_json(const nlohmann::json& j, const std::string& default_version = "") {
    const char* op = "UViTConfig::from_json";
    auto need = [&](const char* k) -> const nlohmann::json& {
      if (!j.contains(k)) throw error(op, k, "missing key in the config");
      return j.at(k);
    };
    std::string v = j.value("version", default_version);
    if (v.empty()) throw error(op, "version", "missing; expected \"v0\" or \"v1\"");
    try {
      return official(v, need("img_size").get<std::int64_t>(), need("in_chans").get<std::int64_t>(),
                      need("patch_size").get<std::int64_t>(), need("embed_dim").get<std::int64_t>(),
                      need("depth").get<std::int64_t>(), need("num_heads").get<std::int64_t>(),
                      j.value("mlp_ratio", 4.0), j.value("qkv_bias", false),
                      j.value("mlp_time_embed", false), need("text_dim").get<std::int64_t>(),
                      need("num_text_tokens").get<std::int64_t>(),
                      need("clip_img_dim").get<std::int64_t>());
    } catch (const nlohmann::json::exception& e) {
      throw error(op, "config", std::string("malformed value: ") + e.what());
    }
  }
  nlohmann::json to_json() const {
    const UViTComponent* img = find("img");
    const UViTComponent* text = find("text");
    const UViTComponent* clip = find("clip_img");
    if (!img || !text || !clip)
      throw error("UViTConfig::to_json", version, "only the official layout has a JSON form");
    return {{"version", version},        {"img_size", img->size},
            {"in_chans", img->channels}, {"patch_size", img->patch},
            {"embed_dim", embed_dim},    {"depth", depth},
            {"num_heads", num_heads},    {"mlp_ratio", mlp_ratio},
            {"qkv_bias", qkv_bias},      {"mlp_time_embed", mlp_time_embed},
            {"text_dim", text->dim},     {"num_text_tokens", text->length},
            {"clip_img_dim", clip->dim}};
  }
  const UViTComponent* find(const std::string& name) const {
    for (const auto& c : components)
      if (c.name == name) return &c;
    return nullptr;
  }

  void validate() const {
    const char* op = "UViTConfig";
    if (embed_dim <= 0 || num_heads <= 0 || embed_dim % num_heads != 0)
      throw error(op, "embed_dim/num_heads",
                  "embed_dim must be a positive multiple of num_heads; got " +
                      std::to_string(embed_dim) + " / " + std::to_string(num_heads));
    if (depth < 1) throw_mismatch(op, "depth", "depth", ">= 1", depth);
    if (hidden() < 1) throw error(op, "mlp_ratio", "MLP hidden width must be positive");
    if (time_names.empty()) throw error(op, "time_names", "need one time token per group");
    if (components.empty()) throw error(op, "components", "need at least one component");
    for (const auto& c : components) {
      if (c.group >= groups()) throw error(op, c.name, "component group out of range");
      if (c.kind == ComponentKind::patched_image) {
        if (c.channels < 1 || c.patch < 1 || c.size < c.patch || c.size % c.patch)
          throw error(op, c.name, "image side must be a positive multiple of the patch size");
      } else if (c.length < 1 || c.dim < 1) {
        throw error(op, c.name, "token length and dim must be positive");
      }
    }
  }

  //! Every parameter with its shape, official names, state-dict order (CHECKPOINTS.md §1).
  std::vector<std::pair<std::string, Shape>> parameters() const {
    const std::int64_t E = embed_dim, Hm = hidden();
    std::int64_t l0 = static_cast<std::int64_t>(groups());
    for (const auto& c : components) l0 += c.tokens();
    std::vector<std::pair<std::string, Shape>> p;
    p.push_back({"pos_embed", Shape{1, l0, E}});
    if (data_type_token) p.push_back({"pos_embed_token", Shape{1, 1, E}});
    auto comp = [&](const std::string& name) -> const UViTComponent* { return find(name); };
    // the official order: patch embed, time MLPs, then the token embeddings and heads
    for (const auto& c : components)
      if (c.kind == ComponentKind::patched_image)
        p.push_back({c.in_name + ".weight", Shape{E, c.channels, c.patch, c.patch}}),
            p.push_back({c.in_name + ".bias", Shape{E}});
    if (mlp_time_embed)
      for (const auto& t : time_names) {
        p.push_back({t + ".0.weight", Shape{4 * E, E}});
        p.push_back({t + ".0.bias", Shape{4 * E}});
        p.push_back({t + ".2.weight", Shape{E, 4 * E}});
        p.push_back({t + ".2.bias", Shape{E}});
      }
    std::vector<const UViTComponent*> tok;
    for (const char* n : {"text", "clip_img"})
      if (comp(n) && comp(n)->kind == ComponentKind::tokens) tok.push_back(comp(n));
    for (const auto& c : components)
      if (c.kind == ComponentKind::tokens && c.name != "text" && c.name != "clip_img")
        tok.push_back(&c);
    for (const auto* c : tok) {
      p.push_back({c->in_name + ".weight", Shape{E, c->dim}});
      p.push_back({c->in_name + ".bias", Shape{E}});
      p.push_back({c->out_name + ".weight", Shape{c->dim, E}});
      p.push_back({c->out_name + ".bias", Shape{c->dim}});
    }
    auto block = [&](const std::string& pre, bool out) {
      if (out)
        p.push_back({pre + ".norm1.weight", Shape{E}}),
            p.push_back({pre + ".norm1.bias", Shape{E}});
      p.push_back({pre + ".norm2.weight", Shape{E}});
      p.push_back({pre + ".norm2.bias", Shape{E}});
      p.push_back({pre + ".attn.qkv.weight", Shape{3 * E, E}});
      if (qkv_bias) p.push_back({pre + ".attn.qkv.bias", Shape{3 * E}});
      p.push_back({pre + ".attn.proj.weight", Shape{E, E}});
      p.push_back({pre + ".attn.proj.bias", Shape{E}});
      p.push_back({pre + ".norm3.weight", Shape{E}});
      p.push_back({pre + ".norm3.bias", Shape{E}});
      p.push_back({pre + ".mlp.fc1.weight", Shape{Hm, E}});
      p.push_back({pre + ".mlp.fc1.bias", Shape{Hm}});
      p.push_back({pre + ".mlp.fc2.weight", Shape{E, Hm}});
      p.push_back({pre + ".mlp.fc2.bias", Shape{E}});
      if (out)
        p.push_back({pre + ".skip_linear.weight", Shape{E, 2 * E}}),
            p.push_back({pre + ".skip_linear.bias", Shape{E}});
    };
    for (std::int64_t i = 0; i < blocks_per_side(); ++i)
      block("in_blocks." + std::to_string(i), false);
    block("mid_block", false);
    for (std::int64_t i = 0; i < blocks_per_side(); ++i)
      block("out_blocks." + std::to_string(i), true);
    p.push_back({"norm.weight", Shape{E}});
    p.push_back({"norm.bias", Shape{E}});
    for (const auto& c : components)
      if (c.kind == ComponentKind::patched_image)
        p.push_back({c.out_name + ".weight", Shape{c.patch * c.patch * c.channels, E}}),
            p.push_back({c.out_name + ".bias", Shape{c.patch * c.patch * c.channels}});
    if (data_type_token) p.push_back({"token_embedding.weight", Shape{data_types, E}});
    return p;
  }

  //! The GroupLayout of the network's inputs (latent side h x w for patched images; 0 = default).
  template <std::size_t K>
  GroupLayout<K> layout(std::int64_t h = 0, std::int64_t w = 0) const {
    if (groups() != K) throw_mismatch("UViTConfig::layout", "K", "number of groups", groups(), K);
    std::array<GroupSpec, K> g;
    std::array<std::vector<std::pair<std::size_t, ComponentSpec>>, K> slots;
    for (const auto& c : components) {
      Shape s = c.kind == ComponentKind::tokens ? Shape{c.length, c.dim}
                                                : Shape{c.channels, h ? h : c.size, w ? w : c.size};
      slots[c.group].push_back({c.slot, ComponentSpec{c.name, s}});
    }
    for (std::size_t k = 0; k < K; ++k) {
      std::sort(slots[k].begin(), slots[k].end(),
                [](auto& a, auto& b) { return a.first < b.first; });
      g[k].name = time_names[k];
      for (auto& [slot, spec] : slots[k]) g[k].components.push_back(spec);
    }
    return GroupLayout<K>(g);
  }
};

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
    (void)ctx;
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
    reserve(B, L);
    std::int64_t colsz = 0;  // im2col rows of one sample's patched components
    for (const auto& c : C)
      if (c.kind == ComponentKind::patched_image)
        colsz = std::max(colsz, c.tokens(lh, lw) * c.in_features());
    if (col_.size() < static_cast<std::size_t>(B * colsz))
      col_.assign(static_cast<std::size_t>(B * colsz), T(0));
    const T* pe = positional(lh, lw);  // cached and shared: computed before any parallel region
    if (packed_gemm()) pack_weights();

    // Samples are independent from the embeddings to the heads, so with at least as many samples
    // as threads each thread runs the whole network on its own contiguous samples (no
    // synchronisation between layers; the GEMMs run on the calling thread); the remaining
    // B mod threads samples, a smaller batch, or a traced run use threads inside each layer.
    auto run = [&](std::int64_t b0, std::int64_t nb) {
      embed(in, b0, nb, lh, lw, pe, colsz);
      blocks(b0, nb, L);
      heads(out, b0, nb, lh, lw, colsz);
    };
    std::int64_t done = 0;
    if (!trace_ && B >= 2 && cpu_kernels::max_threads() > 1) {
#if defined(_OPENMP)
#pragma omp parallel
#endif
      {
        const std::int64_t team = cpu_kernels::team_size(), per = B / team;
        if (per > 0) run(cpu_kernels::thread_id() * per, per);
        if (cpu_kernels::thread_id() == 0) done = per * team;
      }
    }
    if (done < B) run(done, B - done);
  }

 private:
  Tensor<T>& raw(const std::string& n) {
    auto it = params_.find(n);
    if (it == params_.end()) throw error("UViT::param", n, "no such parameter");
    return it->second;
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
  void pack_weights() {
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (std::is_same_v<T, float>) {
      if (!packer_) packer_ = std::make_unique<Packer>();
      std::lock_guard<std::mutex> lock(packer_->mu);
      if (packer_->on) return;
      for (const auto& [n, pieces] : packable()) {
        Tensor<T>& w = raw(n);
        const std::int64_t rows = w.shape()[0], k = w.shape()[1] / pieces;
        if (packer_->gemm.pack(w.data(), rows, k, pieces)) packer_->packed.emplace(n, pieces);
      }
      packer_->on = true;
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
        packer_->gemm.unpack(w.data(), w.shape()[0], w.shape()[1] / pieces, pieces);
      }
      packer_->packed.clear();
      packer_->on = false;
    }
#endif
  }
  // y [m, n] (ldy) = x [m, k] (ldx) W_piece^T (+ b), then `post`, where W_piece is columns
  // [piece k, (piece + 1) k) of the weight `wname`: oneDNN on packed weights where forward()
  // packed them, else Eigen (with the separate exact-GELU pass).
  void lin(const std::string& wname, std::int64_t piece, const T* x, std::int64_t m, std::int64_t k,
           std::int64_t ldx, const T* b, T* y, std::int64_t ldy, onednn::Post post) {
    const Tensor<T>& w = raw(wname);
    const std::int64_t n = w.shape()[0], ldw = w.shape()[1];
#if defined(UNIDIFFUSER_WITH_ONEDNN) && !defined(__CUDACC__)
    if constexpr (std::is_same_v<T, float>) {
      if (packer_ && packer_->on && packer_->packed.count(wname)) {
        packer_->gemm.linear(x, m, k, ldx, w.data() + piece * n * k, n, b, y, ldy, post);
        return;
      }
    }
#endif
    cpu_kernels::linear(x, m, k, ldx, w.data() + piece * k, n, ldw, b, y, ldy,
                        post == onednn::Post::accumulate);
    if (post == onednn::Post::gelu) {
      const T* none = nullptr;
      if (ldy == n)
        cpu_kernels::bias_gelu(y, m, n, none);
      else
        for (std::int64_t i = 0; i < m; ++i) cpu_kernels::bias_gelu(y + i * ldy, 1, n, none);
    }
  }
  void emit(const char* name, const T* d, Shape s) const {
    if (trace_) trace_(name, d, s);
  }
  void reserve(std::int64_t B, std::int64_t L) {
    const std::int64_t E = cfg_.embed_dim, M = B * L;
    const auto need = static_cast<std::size_t>(M * E);
    if (x_.size() < need) {
      x_.assign(need, T(0));
      tmp_.assign(need, T(0));
      attn_.assign(need, T(0));
      qkv_.assign(need * 3, T(0));
      hid_.assign(static_cast<std::size_t>(M * cfg_.hidden()), T(0));
      skips_.assign(static_cast<std::size_t>(cfg_.blocks_per_side()),
                    cpu_kernels::AlignedVector<T>(need));
    }
    const auto sc = static_cast<std::size_t>(
        cpu_kernels::max_threads() *
        cpu_kernels::attention_scratch(L, score_block(L), cfg_.embed_dim / cfg_.num_heads));
    if (scores_.size() < sc) scores_.assign(sc, T(0));
    const auto te = static_cast<std::size_t>(B + B * E + (cfg_.mlp_time_embed ? B * 4 * E : 0));
    if (temb_.size() < te) temb_.assign(te, T(0));
  }
  // Query rows per attention score block: the whole sequence while its L x L scores fit in 1 MiB
  // per thread (one pass over K and V per head), else 128 rows (the official 1105 tokens).
  static std::int64_t score_block(std::int64_t L) {
    return L * L * static_cast<std::int64_t>(sizeof(T)) <= (1 << 20) ? L : 128;
  }

  // Token sequence x_ of samples [b0, b0 + nb): time tokens, data-type token, component
  // embeddings, positional table pe (UVIT.md §4.2-4.5).
  void embed(const UViTInputs<T>& in, std::int64_t b0, std::int64_t nb, std::int64_t lh,
             std::int64_t lw, const T* pe, std::int64_t colsz) {
    namespace kk = cpu_kernels;
    const auto& C = cfg_.components;
    const std::int64_t B = in.x[0].rows, E = cfg_.embed_dim, L = cfg_.tokens(lh, lw);
    T* X = x_.data();
    for (std::size_t g = 0; g < cfg_.groups(); ++g) {
      // workspace views of this range (no allocation per forward once the batch has been seen)
      TensorView<T> tt(temb_.data() + b0, Shape{nb}), emb(temb_.data() + B + b0 * E, Shape{nb, E});
      for (std::int64_t b = 0; b < nb; ++b)
        tt[b] = static_cast<T>(in.t[g][static_cast<std::size_t>(b0 + b)]);
      timestep_embedding<T>(Context<cpu>{}, TensorView<const T>(tt), emb);
      if (cfg_.mlp_time_embed) {
        const std::string& n = cfg_.time_names[g];
        T* h = temb_.data() + B + B * E + b0 * 4 * E;
        kk::linear(emb.data(), nb, E, E, raw(n + ".0.weight").data(), 4 * E, E,
                   raw(n + ".0.bias").data(), h, 4 * E);
        kk::silu(h, nb * 4 * E);
        kk::linear(h, nb, 4 * E, 4 * E, raw(n + ".2.weight").data(), E, 4 * E,
                   raw(n + ".2.bias").data(), X + (b0 * L + static_cast<std::int64_t>(g)) * E,
                   L * E);
      } else {
        for (std::int64_t b = 0; b < nb; ++b)
          std::copy_n(emb.data() + b * E, E, X + ((b0 + b) * L + static_cast<std::int64_t>(g)) * E);
      }
    }
    if (cfg_.data_type_token) {
      const T* te = raw("token_embedding.weight").data();
      for (std::int64_t b = b0; b < b0 + nb; ++b)
        std::copy_n(te + in.data_type[static_cast<std::size_t>(b)] * E, E,
                    X + (b * L + static_cast<std::int64_t>(cfg_.groups())) * E);
    }
    std::int64_t off = cfg_.lead_tokens();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const std::int64_t tk = c.tokens(lh, lw);
      const T* w = raw(c.in_name + ".weight").data();
      const T* bias = raw(c.in_name + ".bias").data();
      for (std::int64_t b = b0; b < b0 + nb; ++b) {
        const T* src = in.x[k].data + b * in.x[k].ld;
        T* dst = X + (b * L + off) * E;
        if (c.kind == ComponentKind::tokens) {
          kk::linear(src, tk, c.dim, c.dim, w, E, c.dim, bias, dst, E);
        } else {
          const std::int64_t pd = c.in_features();
          T* col = col_.data() + b * colsz;
          kk::patchify_conv(src, c.channels, lh, lw, c.patch, col);
          kk::linear(col, tk, pd, pd, w, E, pd, bias, dst, E);
        }
      }
      off += tk;
    }
    for (std::int64_t b = b0; b < b0 + nb; ++b)
      for (std::int64_t i = 0; i < L * E; ++i) X[b * L * E + i] += pe[i];
    emit("x_embedded", X, Shape{nb, L, E});
  }

  // Per-component outputs of samples [b0, b0 + nb) from the normed tokens (UVIT.md §4.7).
  void heads(std::span<const RowBlock<T, cpu>> out, std::int64_t b0, std::int64_t nb,
             std::int64_t lh, std::int64_t lw, std::int64_t colsz) {
    namespace kk = cpu_kernels;
    const auto& C = cfg_.components;
    const std::int64_t E = cfg_.embed_dim, L = cfg_.tokens(lh, lw);
    const T* X = x_.data();
    std::int64_t off = cfg_.lead_tokens();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto& c = C[k];
      const std::int64_t tk = c.tokens(lh, lw);
      const T* w = raw(c.out_name + ".weight").data();
      const T* bias = raw(c.out_name + ".bias").data();
      for (std::int64_t b = b0; b < b0 + nb; ++b) {
        const T* src = X + (b * L + off) * E;
        T* dst = out[k].data + b * out[k].ld;
        if (c.kind == ComponentKind::tokens) {
          kk::linear(src, tk, E, E, w, c.dim, E, bias, dst, c.dim);
        } else {
          const std::int64_t pd = c.patch * c.patch * c.channels;
          T* col = col_.data() + b * colsz;
          kk::linear(src, tk, E, E, w, pd, E, bias, col, pd);
          kk::unpatchify(col, pd, c.channels, lh, lw, c.patch, dst);
        }
      }
      off += tk;
    }
  }

  // Every block and the final norm for samples [b0, b0 + nb) of the workspace (UVIT.md §4.6).
  void blocks(std::int64_t b0, std::int64_t nb, std::int64_t L) {
    const std::int64_t E = cfg_.embed_dim, M = nb * L, off = b0 * L * E;
    const std::int64_t sides = cfg_.blocks_per_side();
    // in_blocks.i writes its output straight into skip buffer i, which the next block reads
    // (no copy of the activations into the skip stack)
    T* cur = x_.data();
    for (std::int64_t i = 0; i < sides; ++i) {
      const std::string name = "in_blocks." + std::to_string(i);
      T* dst = skips_[static_cast<std::size_t>(i)].data();
      block(name, cur, dst, b0, nb, L, nullptr);
      emit(name.c_str(), dst, Shape{nb, L, E});
      cur = dst;
    }
    block("mid_block", cur, x_.data(), b0, nb, L, nullptr);
    emit("mid_block", x_.data(), Shape{nb, L, E});
    for (std::int64_t i = 0; i < sides; ++i) {
      const std::string name = "out_blocks." + std::to_string(i);
      block(name, x_.data(), x_.data(), b0, nb, L,
            skips_[static_cast<std::size_t>(sides - 1 - i)].data() + off);
      emit(name.c_str(), x_.data(), Shape{nb, L, E});
    }
    cpu_kernels::layer_norm(x_.data() + off, M, E, static_cast<const T*>(nullptr),
                            raw("norm.weight").data(), raw("norm.bias").data());
    emit("norm", x_.data(), Shape{nb, L, E});
  }

  // One post-LN block on samples [b0, b0 + nb) (UVIT.md §4.6): reads the workspace array `in`,
  // writes `out` (may be the same array; `in` is not modified when they differ); `skip` is
  // already offset to the samples.
  void block(const std::string& p, const T* in, T* out, std::int64_t b0, std::int64_t nb,
             std::int64_t L, const T* skip) {
    namespace kk = cpu_kernels;
    const std::int64_t E = cfg_.embed_dim, M = nb * L, Hm = cfg_.hidden(), r0 = b0 * L;
    const T* X = in + r0 * E;
    T* Y = out + r0 * E;
    T* tmp = tmp_.data() + r0 * E;
    T* qkv = qkv_.data() + r0 * 3 * E;
    T* att = attn_.data() + r0 * E;
    T* hid = hid_.data() + r0 * Hm;
    using onednn::Post;
    const T* none = nullptr;
    if (skip) {  // skip_linear([x, skip]) as two products over the halves of its weight
      lin(p + ".skip_linear.weight", 0, X, M, E, E, raw(p + ".skip_linear.bias").data(), tmp, E,
          Post::none);
      lin(p + ".skip_linear.weight", 1, skip, M, E, E, none, tmp, E, Post::accumulate);
      kk::layer_norm(tmp, none, Y, M, E, raw(p + ".norm1.weight").data(),
                     raw(p + ".norm1.bias").data());
      X = Y;
    }
    const T* qb = cfg_.qkv_bias ? raw(p + ".attn.qkv.bias").data() : nullptr;
    lin(p + ".attn.qkv.weight", 0, X, M, E, E, qb, qkv, 3 * E, Post::none);
    kk::attention(qkv, nb, L, E, cfg_.num_heads, att, scores_.data(), score_block(L));
    lin(p + ".attn.proj.weight", 0, att, M, E, E, raw(p + ".attn.proj.bias").data(), tmp, E,
        Post::none);
    kk::layer_norm(X, tmp, Y, M, E, raw(p + ".norm2.weight").data(), raw(p + ".norm2.bias").data());
    lin(p + ".mlp.fc1.weight", 0, Y, M, E, E, raw(p + ".mlp.fc1.bias").data(), hid, Hm, Post::gelu);
    lin(p + ".mlp.fc2.weight", 0, hid, M, Hm, Hm, raw(p + ".mlp.fc2.bias").data(), tmp, E,
        Post::none);
    kk::layer_norm(Y, M, E, tmp, raw(p + ".norm3.weight").data(), raw(p + ".norm3.bias").data());
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
        emit("pos_embed_patches_interp", pe_.data() + dst_row * E, Shape{1, t1, E});
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

//! The network as the multimodal noise predictor of GuidedPredictor / sample_task: group g's
//! row [B, D_g] holds the group's components in slot order (UViTConfig::layout), addressed in
//! place; every call uses the same data-type value (official: 1 for v1).
template <class T, std::size_t K>
class UViTPredictor {
 public:
  explicit UViTPredictor(UViT<T>& net, std::int64_t data_type = 1, std::int64_t latent_h = 0,
                         std::int64_t latent_w = 0)
      : net_(net),
        layout_(net.config().template layout<K>(latent_h, latent_w)),
        data_type_(data_type),
        h_(latent_h),
        w_(latent_w) {
    const auto& C = net_.config().components;
    for (const auto& c : C) {
      std::int64_t off = 0;
      for (std::size_t k = 0; k < c.slot; ++k) off += layout_.group(c.group).components[k].numel();
      offset_.push_back(off);
    }
  }
  const GroupLayout<K>& layout() const { return layout_; }
  UViT<T>& network() { return net_; }

  void operator()(const std::array<TensorView<const T, cpu>, K>& x,
                  const std::array<std::span<const double>, K>& t,
                  const std::array<TensorView<T, cpu>, K>& out) {
    const auto& C = net_.config().components;
    const std::int64_t B = x[0].dim(0);
    // reused per call: clear() keeps the capacity, so no allocation after the first call
    UViTInputs<T>& in = in_;
    std::vector<RowBlock<T, cpu>>& o = out_;
    in.x.clear();
    in.t.clear();
    o.clear();
    for (std::size_t k = 0; k < C.size(); ++k) {
      const auto g = C[k].group;
      const std::int64_t n = C[k].numel(h_, w_), ld = layout_.size(g);
      in.x.push_back(RowBlock<const T, cpu>(x[g].data() + offset_[k], B, n, ld));
      o.push_back(RowBlock<T, cpu>(out[g].data() + offset_[k], B, n, ld));
    }
    for (std::size_t g = 0; g < K; ++g) in.t.push_back(t[g]);
    if (static_cast<std::int64_t>(dt_.size()) != B)
      dt_.assign(static_cast<std::size_t>(B), data_type_);
    in.data_type = dt_;
    in.latent_h = h_;
    in.latent_w = w_;
    net_.forward(Context<cpu>{}, in, o);
  }

 private:
  UViT<T>& net_;
  GroupLayout<K> layout_;
  std::int64_t data_type_, h_, w_;
  std::vector<std::int64_t> offset_;
  std::vector<std::int64_t> dt_;
  UViTInputs<T> in_;
  std::vector<RowBlock<T, cpu>> out_;
};

}  // namespace unidiffuser::nn
