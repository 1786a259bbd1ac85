// SPDX-License-Identifier: Apache-2.0
//! \file checkpoint.hpp
//! U-ViT checkpoints in safetensors: official names (v0 / v1) or diffusers' `UniDiffuserModel`
//! names (CHECKPOINTS.md §2), auto-detected, any float dtype converted to the working type. Loading
//! is strict and all-or-nothing: every missing, unexpected or mis-shaped tensor is listed in one
//! error and the network is left untouched. Saving writes official names.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "unidiffuser/backend/cpu/nn.hpp"
#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit.hpp"

namespace unidiffuser {

enum class CheckpointNaming { automatic, official, diffusers };

namespace detail {
inline bool starts_with(const std::string& s, const std::string& p) {
  return s.compare(0, p.size(), p) == 0;
}
inline bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

//! diffusers source name(s) of one official parameter (three for a fused qkv weight or bias).
inline std::vector<std::string> diffusers_names(const std::string& n) {
  static const std::map<std::string, std::string> top = {
      {"pos_embed", "pos_embed"},
      {"pos_embed_token", "data_type_pos_embed_token"},
      {"token_embedding.weight", "data_type_token_embedding.weight"},
      {"patch_embed.proj.weight", "vae_img_in.proj.weight"},
      {"patch_embed.proj.bias", "vae_img_in.proj.bias"},
      {"clip_img_embed.weight", "clip_img_in.weight"},
      {"clip_img_embed.bias", "clip_img_in.bias"},
      {"text_embed.weight", "text_in.weight"},
      {"text_embed.bias", "text_in.bias"},
      {"norm.weight", "transformer.norm_out.weight"},
      {"norm.bias", "transformer.norm_out.bias"},
      {"decoder_pred.weight", "vae_img_out.weight"},
      {"decoder_pred.bias", "vae_img_out.bias"},
      {"clip_img_out.weight", "clip_img_out.weight"},
      {"clip_img_out.bias", "clip_img_out.bias"},
      {"text_out.weight", "text_out.weight"},
      {"text_out.bias", "text_out.bias"}};
  if (auto it = top.find(n); it != top.end()) return {it->second};
  // the optional time MLPs (use_timestep_embedding): diffusers' TimestepEmbedding linear_1 / _2
  for (const char* g : {"img", "text"}) {
    const std::string o = std::string("time_") + g + "_embed.";
    const std::string d = std::string("timestep_") + g + "_embed.";
    if (starts_with(n, o + "0.")) return {d + "linear_1." + n.substr(o.size() + 2)};
    if (starts_with(n, o + "2.")) return {d + "linear_2." + n.substr(o.size() + 2)};
  }
  std::string pre, rest, q;
  if (starts_with(n, "in_blocks.") || starts_with(n, "out_blocks.")) {
    const bool in = starts_with(n, "in_blocks.");
    const std::size_t a = n.find('.', 0), b = n.find('.', a + 1);
    const std::string idx = n.substr(a + 1, b - a - 1);
    rest = n.substr(b + 1);
    q = std::string(in ? "transformer.transformer_in_blocks."
                       : "transformer.transformer_out_blocks.") +
        idx;
    if (!in) {
      if (starts_with(rest, "skip_linear.")) return {q + ".skip." + rest};
      if (starts_with(rest, "norm1.")) return {q + ".skip.norm." + rest.substr(6)};
      q += ".block";
    }
  } else if (starts_with(n, "mid_block.")) {
    rest = n.substr(10);
    q = "transformer.transformer_mid_block";
  } else {
    return {};  // no diffusers counterpart (a custom layout's names)
  }
  if (rest == "attn.qkv.weight" || rest == "attn.qkv.bias") {  // bias: attention_bias = True
    const std::string w = rest.substr(9);
    return {q + ".attn1.to_q." + w, q + ".attn1.to_k." + w, q + ".attn1.to_v." + w};
  }
  if (starts_with(rest, "attn.proj.")) return {q + ".attn1.to_out.0." + rest.substr(10)};
  if (starts_with(rest, "norm2.")) return {q + ".norm1." + rest.substr(6)};
  if (starts_with(rest, "norm3.")) return {q + ".norm3." + rest.substr(6)};
  if (starts_with(rest, "mlp.fc1.")) return {q + ".ff.net.0.proj." + rest.substr(8)};
  if (starts_with(rest, "mlp.fc2.")) return {q + ".ff.net.2." + rest.substr(8)};
  return {};
}
}  // namespace detail

//! Which naming a file (under `prefix`) uses.
inline CheckpointNaming detect_naming(const safetensors::File& f, const std::string& prefix = "") {
  if (f.contains(prefix + "in_blocks.0.norm2.weight") ||
      f.contains(prefix + "mid_block.norm2.weight"))
    return CheckpointNaming::official;
  if (f.contains(prefix + "transformer.transformer_mid_block.norm1.weight"))
    return CheckpointNaming::diffusers;
  throw error("detect_naming", f.source(),
              "neither official U-ViT names (mid_block.norm2.weight) nor diffusers names "
              "(transformer.transformer_mid_block.norm1.weight) found under prefix '" +
                  prefix + "'");
}

//! Bounds that check_config_bounds() enforces before anything is allocated. They are far above
//! every official model (embed_dim 1536, depth 30, 1105 tokens, 952 M parameters) and keep every
//! shape product of a config, and the memory estimate, inside int64.
namespace config_limits {
//! embed_dim, num_heads, MLP hidden width, token length and dim, data types, a patch's input
//! features (channels x patch^2), tokens of one component and of the whole sequence.
inline constexpr std::int64_t extent = std::int64_t{1} << 20;
inline constexpr std::int64_t depth = 1024;          //!< transformer blocks
inline constexpr std::int64_t image_side = 1 << 16;  //!< image side and channels
inline constexpr std::int64_t patch = 1024;          //!< patch side
inline constexpr std::int64_t groups = 64;           //!< timestep groups, components
inline constexpr double mlp_ratio = 1024.0;          //!< (0, 1024]
inline constexpr std::uint64_t parameters = std::uint64_t{1} << 40;  //!< total parameter count
}  // namespace config_limits

namespace detail {
inline void check_range(const char* op, const std::string& field, std::int64_t v, std::int64_t hi) {
  if (v < 1 || v > hi)
    throw_mismatch(op, field, "value out of range", "[1, " + std::to_string(hi) + "]", v);
}
// x * y and x + y, saturating at the uint64 maximum.
inline std::uint64_t sat_mul(std::uint64_t x, std::uint64_t y) {
  std::uint64_t r;
  return __builtin_mul_overflow(x, y, &r) ? std::numeric_limits<std::uint64_t>::max() : r;
}
inline std::uint64_t sat_add(std::uint64_t x, std::uint64_t y) {
  std::uint64_t r;
  return __builtin_add_overflow(x, y, &r) ? std::numeric_limits<std::uint64_t>::max() : r;
}
// Parameter count of a config that passed check_config_bounds (every shape is small then).
inline std::uint64_t config_parameter_count(const nn::UViTConfig& cfg) {
  std::uint64_t n = 0;
  for (const auto& [name, shape] : cfg.parameters())
    n = sat_add(n, static_cast<std::uint64_t>(shape.numel()));
  return n;
}
}  // namespace detail

//! Throws unidiffuser::error unless every extent and derived size of `cfg` lies within
//! config_limits (checked in an order in which no product can overflow) and the parameter count
//! is at most 2^40; then validates the config. Cheap and allocation-free apart from the
//! parameter list: call it on untrusted configs (checkpoint metadata) before building a network.
inline void check_config_bounds(const nn::UViTConfig& cfg) {
  const char* op = "check_config_bounds";
  namespace lim = config_limits;
  if (!(cfg.mlp_ratio > 0 && cfg.mlp_ratio <= lim::mlp_ratio))  // NaN fails too
    throw_mismatch(op, "mlp_ratio", "value out of range", "(0, 1024]", cfg.mlp_ratio);
  detail::check_range(op, "embed_dim", cfg.embed_dim, lim::extent);
  detail::check_range(op, "num_heads", cfg.num_heads, lim::extent);
  detail::check_range(op, "depth", cfg.depth, lim::depth);
  detail::check_range(op, "hidden (embed_dim x mlp_ratio)", cfg.hidden(), lim::extent);
  detail::check_range(op, "groups (time tokens)", static_cast<std::int64_t>(cfg.groups()),
                      lim::groups);
  detail::check_range(op, "components", static_cast<std::int64_t>(cfg.components.size()),
                      lim::groups);
  if (cfg.data_type_token) detail::check_range(op, "data_types", cfg.data_types, lim::extent);
  for (const auto& c : cfg.components) {
    if (c.kind == nn::ComponentKind::tokens) {
      detail::check_range(op, c.name + ".length", c.length, lim::extent);
      detail::check_range(op, c.name + ".dim", c.dim, lim::extent);
    } else if (c.kind == nn::ComponentKind::custom) {
      // the kind's own checks first (its options), then the sizes it derives from them
      if (c.custom_kind.empty())
        throw error(op, c.name, "a custom component needs custom_kind (a registered kind)");
      const auto& k = nn::kind_info(c.custom_kind, c.name);
      k.validate(c);
      const Shape s = k.shape(c);
      detail::check_range(op, c.name + ".numel", s.numel(), lim::extent);
      detail::check_range(op, c.name + ".tokens", k.tokens(c), lim::extent);
      const auto sc = k.scratch(c, cfg.embed_dim);
      detail::check_range(op, c.name + ".scratch (embedding)", std::max<std::int64_t>(1, sc[0]),
                          lim::extent);
      detail::check_range(op, c.name + ".scratch (head)", std::max<std::int64_t>(1, sc[1]),
                          lim::extent);
    } else {
      detail::check_range(op, c.name + ".channels", c.channels, lim::image_side);
      detail::check_range(op, c.name + ".patch", c.patch, lim::patch);
      detail::check_range(op, c.name + ".size", c.size, lim::image_side);
      detail::check_range(op, c.name + ".width", c.latent()[1], lim::image_side);
      detail::check_range(op, c.name + ".in_features (channels x patch^2)", c.in_features(),
                          lim::extent);
      detail::check_range(op, c.name + ".tokens ((size / patch) x (width / patch))", c.tokens(),
                          lim::extent);
    }
  }
  detail::check_range(op, "tokens (sequence length)", cfg.tokens(), lim::extent);
  cfg.validate();
  const std::uint64_t n = detail::config_parameter_count(cfg);
  if (n > lim::parameters)
    throw_mismatch(op, "parameters", "parameter count out of range",
                   "<= " + std::to_string(lim::parameters), n);
}

namespace detail {
// The official parameter names and the file's source tensor(s) of each.
using CheckpointPlan = std::vector<std::pair<std::string, std::vector<std::string>>>;

// Compares `f` (names under `prefix`) with the parameters of `cfg` without any network: every
// missing, unexpected, mis-shaped or integer-typed tensor goes into one error of operation `op`.
inline CheckpointPlan checkpoint_plan(const char* op, const nn::UViTConfig& cfg,
                                      const safetensors::File& f, const std::string& prefix,
                                      CheckpointNaming naming) {
  check_config_bounds(cfg);
  if (naming == CheckpointNaming::automatic) naming = detect_naming(f, prefix);
  const bool diff = naming == CheckpointNaming::diffusers;
  std::vector<std::string> missing, misshaped;
  std::set<std::string> used;
  CheckpointPlan plan;
  for (const auto& [name, shape] : cfg.parameters()) {
    std::vector<std::string> src = diff ? diffusers_names(name) : std::vector<std::string>{name};
    if (src.empty()) {
      missing.push_back(name + " (no diffusers counterpart)");
      continue;
    }
    bool ok = true;
    for (const auto& s : src) {
      if (!f.contains(prefix + s)) {
        missing.push_back(prefix + s);
        ok = false;
        continue;
      }
      used.insert(prefix + s);
      const auto& info = f.info(prefix + s);
      std::vector<std::int64_t> want(static_cast<std::size_t>(shape.rank()));
      for (int i = 0; i < shape.rank(); ++i) want[static_cast<std::size_t>(i)] = shape[i];
      if (src.size() == 3) want[0] /= 3;  // one third of the fused qkv rows
      if (info.shape != want) {
        misshaped.push_back(prefix + s + " (expected " + safetensors::detail::shape_str(want) +
                            ", got " + safetensors::detail::shape_str(info.shape) + ")");
        ok = false;
      }
      if (info.type == dtype::i64 || info.type == dtype::i32 || info.type == dtype::u8) {
        misshaped.push_back(prefix + s + " (integer dtype " + std::string(dtype_name(info.type)) +
                            ")");
        ok = false;
      }
    }
    if (ok) plan.push_back({name, src});
  }
  if (diff)  // the converter duplicates the patch embedding; the copy is unused
    for (const char* dup : {"transformer.pos_embed.proj.weight", "transformer.pos_embed.proj.bias"})
      if (f.contains(prefix + dup)) used.insert(prefix + dup);
  std::vector<std::string> unexpected;
  for (const auto& n : f.names(prefix))
    if (!used.count(n)) unexpected.push_back(n);
  if (!missing.empty() || !misshaped.empty() || !unexpected.empty()) {
    std::string m;
    auto list = [&](const char* what, const std::vector<std::string>& v) {
      if (v.empty()) return;
      m += std::string(m.empty() ? "" : "; ") + what + " (" + std::to_string(v.size()) + "): ";
      for (std::size_t i = 0; i < v.size(); ++i) m += (i ? ", " : "") + v[i];
    };
    list("missing", missing);
    list("unexpected", unexpected);
    list("mis-shaped", misshaped);
    throw error(
        op, f.source(),
        std::string(diff ? "diffusers" : "official") + " naming, " + cfg.version + " config: " + m);
  }
  return plan;
}

// Number of non-finite values of a float tensor once converted to T, and the first index.
template <class T>
std::pair<std::int64_t, std::int64_t> count_nonfinite(const safetensors::File& f,
                                                      const std::string& name) {
  const auto& info = f.info(name);
  std::int64_t count = 0, first = -1;
  const auto es = static_cast<std::size_t>(dtype_size(info.type));
  auto scan = [&](auto type) {  // the dtype as a compile-time constant: no switch per element
    f.for_each_chunk(name, [&](const unsigned char* p, std::size_t at, std::size_t n) {
      for (std::size_t k = 0; k < n; ++k)
        if (!std::isfinite(safetensors::detail::load_elem<T>(p + k * es, decltype(type)::value)))
          if (count++ == 0) first = static_cast<std::int64_t>(at + k);
    });
  };
  switch (info.type) {
    case dtype::f64: scan(std::integral_constant<dtype, dtype::f64>{}); break;
    case dtype::f32: scan(std::integral_constant<dtype, dtype::f32>{}); break;
    case dtype::f16: scan(std::integral_constant<dtype, dtype::f16>{}); break;
    case dtype::bf16: scan(std::integral_constant<dtype, dtype::bf16>{}); break;
    default: break;  // integer tensors are refused before
  }
  return {count, first};
}
}  // namespace detail

//! Checks, without a network, that `f` holds exactly the parameters of `cfg` under `prefix`
//! (official or diffusers names, `automatic`: detected): every missing, unexpected, mis-shaped or
//! integer-typed tensor is listed in one unidiffuser::error. Runs check_config_bounds(cfg) first.
//! Tools call it before constructing nn::UViT<T>; load_checkpoint() runs the same check.
inline void check_checkpoint(const nn::UViTConfig& cfg, const safetensors::File& f,
                             const std::string& prefix = "",
                             CheckpointNaming naming = CheckpointNaming::automatic) {
  (void)detail::checkpoint_plan("check_checkpoint", cfg, f, prefix, naming);
}

//! Loads every parameter of `net` from `f` (names under `prefix`). Strict and all-or-nothing:
//! the names, shapes and dtypes are checked (check_checkpoint) and, unless `allow_nonfinite`,
//! every value converted to T must be finite (an error names each tensor with NaN/Inf values,
//! their count and the first index) before the network is touched.
template <class T>
void load_checkpoint(nn::UViT<T>& net, const safetensors::File& f, const std::string& prefix = "",
                     CheckpointNaming naming = CheckpointNaming::automatic,
                     bool allow_nonfinite = false) {
  const char* op = "load_checkpoint";
  const auto plan = detail::checkpoint_plan(op, net.config(), f, prefix, naming);
  if (!allow_nonfinite) {
    std::string bad;
    std::size_t nbad = 0;
    for (const auto& [name, src] : plan)
      for (const auto& s : src) {
        const auto [count, first] = detail::count_nonfinite<T>(f, prefix + s);
        if (count == 0) continue;
        bad += std::string(nbad++ ? ", " : "") + prefix + s + " (" + std::to_string(count) +
               " non-finite, first at index " + std::to_string(first) + ")";
      }
    if (nbad)
      throw error(op, f.source(),
                  "non-finite weights (NaN or Inf) in " + std::to_string(nbad) +
                      " tensor(s): " + bad + "; pass allow_nonfinite = true to load them anyway");
  }
  // all checks passed: now convert (nothing above touched the network)
  for (const auto& [name, src] : plan) {
    const auto t = net.param(name);
    std::int64_t off = 0;
    for (const auto& s : src) {
      const auto& info = f.info(prefix + s);
      const Shape shape = Shape::from_range(info.shape.begin(), info.shape.end(), prefix + s);
      f.get_into<T>(prefix + s, TensorView<T>(t.data() + off, shape));
      off += shape.numel();
    }
  }
  net.parameters_changed();
}

//! Memory a forward pass of nn::UViT<T> needs: parameters and the forward's workspace, in bytes.
struct MemoryEstimate {
  std::uint64_t parameters = 0;  //!< sizeof(T) x parameter count
  std::uint64_t workspace = 0;   //!< upper bound of the forward's buffers, 25 % slack included
  //! The packed copies of the block weights that builds with the oneDNN GEMM path keep beside the
  //! plain ones with nn::WeightPacking::copies (ops::LinearCache; 0 where it packs nothing, and
  //! with none or in_place): the blocks' qkv, proj, fc1, fc2 and skip weights, an upper bound
  //! (each column chunk's layout padded to whole blocks of 64 outputs and 16 inputs, aligned).
  std::uint64_t packed = 0;
  std::uint64_t total = 0;  //!< parameters + packed + workspace
};

//! Estimates the memory of nn::UViT<T>(cfg) running forwards of `batch` samples at latent size
//! latent_h x latent_w (0: the default size), its weights packed as `packing` says (the
//! network's default: copies). The workspace mirrors UViT::reserve() and
//! forward(): with M = batch x L tokens, x, tmp and attn (M x E each), qkv (3 M E), the MLP
//! hidden (M x hidden), one skip per in-block ((depth / 2) M E), the time embeddings, the im2col
//! buffer (batch x the largest patched component's tokens x in_features), plus the shared
//! attention scratch (threads x attention_scratch) and positional table (L x E). Every per-sample
//! size is rounded up to a multiple of 16 elements (per-sample strides padded to 64 bytes), and
//! 25 % slack is added on top for allocator overhead and small buffers. Saturates at the uint64
//! maximum. Throws unidiffuser::error for a config outside check_config_bounds, batch < 1 or a
//! latent whose token count exceeds config_limits::extent.
template <class T>
MemoryEstimate estimate_memory(const nn::UViTConfig& cfg, std::int64_t batch,
                               std::int64_t latent_h = 0, std::int64_t latent_w = 0,
                               nn::WeightPacking packing = nn::WeightPacking::copies) {
  const char* op = "estimate_memory";
  check_config_bounds(cfg);
  if (batch < 1) throw_mismatch(op, "batch", "batch size", ">= 1", batch);
  if (latent_h < 0 || latent_w < 0 || latent_h > config_limits::image_side ||
      latent_w > config_limits::image_side)
    throw error(op, "latent",
                "sides must lie in [0, " + std::to_string(config_limits::image_side) + "]; got " +
                    std::to_string(latent_h) + "x" + std::to_string(latent_w));
  const std::int64_t L = cfg.tokens(latent_h, latent_w);  // <= 64 components x 2^32
  detail::check_range(op, "tokens at the latent size", L, config_limits::extent);
  using detail::sat_add, detail::sat_mul;
  const auto u = [](std::int64_t v) { return static_cast<std::uint64_t>(v); };
  const auto pad = [](std::uint64_t n) { return sat_add(n, 15) / 16 * 16; };
  const std::uint64_t E = u(cfg.embed_dim), Hm = u(cfg.hidden()), LE = pad(u(L) * E);
  std::uint64_t colsz = 0;
  std::uint64_t kinds = 0;  // custom kinds' scratch
  for (const auto& c : cfg.components) {
    if (c.kind == nn::ComponentKind::patched_image)
      colsz = std::max(colsz, u(c.tokens(latent_h, latent_w)) * u(c.in_features()));
    if (c.kind == nn::ComponentKind::custom) {
      const auto sc = nn::kind_info(c.custom_kind, c.name).scratch(c, cfg.embed_dim);
      kinds = sat_add(kinds, sat_add(pad(u(std::max<std::int64_t>(1, sc[0]))),
                                     pad(u(std::max<std::int64_t>(1, sc[1])))));
    }
  }
  std::uint64_t per_sample = 3 * LE;            // x, tmp, attn
  per_sample += pad(3 * u(L) * E);              // qkv
  per_sample += pad(u(L) * Hm);                 // MLP hidden
  per_sample += u(cfg.blocks_per_side()) * LE;  // skips
  per_sample += pad(colsz);                     // im2col
  per_sample = sat_add(per_sample, kinds);      // custom kinds' scratch
  per_sample += u(static_cast<std::int64_t>(cfg.groups())) *
                (pad(E) + pad(cfg.mlp_time_embed ? 4 * E : 1));  // time embeddings per group
  const std::int64_t block = L * L * static_cast<std::int64_t>(sizeof(T)) <= (1 << 20)
                                 ? L
                                 : 128;  // ops::detail::score_block
  const std::uint64_t scores =
      u(cpu_detail::thread_count(Context<cpu>{})) *
      u(cpu_kernels::attention_scratch(L, block, cfg.embed_dim / cfg.num_heads));
  const std::uint64_t elems = sat_add(sat_mul(u(batch), per_sample), sat_add(scores, LE));  // + pe
  const std::uint64_t ws = sat_mul(elems, sizeof(T));
  MemoryEstimate m;
  m.workspace = sat_add(ws, ws / 4);
  m.parameters = sat_mul(detail::config_parameter_count(cfg), sizeof(T));
  if (ops::LinearCache<T, cpu>::available && packing == nn::WeightPacking::copies) {
    // per block qkv (3 E x E), proj (E x E), fc1 (H x E), fc2 (E x H); per out-block the skip
    // linear's two E x E halves
    // (chunks of whole blocks of 64 outputs but the last: n rounded up to 64; k to 16; 16
    // elements of alignment per chunk)
    const auto mat = [&](std::uint64_t n, std::uint64_t k) {
      return sat_add(sat_mul((n + 63) / 64 * 64, (k + 15) / 16 * 16), 16 * ((n + 63) / 64 + 1));
    };
    const std::uint64_t blocks = 2 * u(cfg.blocks_per_side()) + 1;
    const std::uint64_t per_block =
        sat_add(sat_add(mat(3 * E, E), mat(E, E)), sat_add(mat(Hm, E), mat(E, Hm)));
    m.packed = sat_mul(
        sat_add(sat_mul(blocks, per_block), sat_mul(u(cfg.blocks_per_side()), 2 * mat(E, E))),
        sizeof(T));
  }
  m.total = sat_add(sat_add(m.parameters, m.packed), m.workspace);
  return m;
}

//! Memory available to this process in bytes: MemAvailable of /proc/meminfo (Linux), else the
//! available physical pages x the page size; 0 when unknown.
inline std::uint64_t available_memory_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, rest;
  std::uint64_t kib = 0;
  while (in >> key >> kib) {
    if (key == "MemAvailable:") return detail::sat_mul(kib, 1024);
    std::getline(in, rest);
  }
#if defined(_SC_AVPHYS_PAGES) && defined(_SC_PAGESIZE)
  const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0)
    return detail::sat_mul(static_cast<std::uint64_t>(pages), static_cast<std::uint64_t>(page));
#endif
  return 0;
}

//! Throws unidiffuser::error ("needs X MiB (parameters P MiB + workspace W MiB), only Y MiB
//! available") when `m.total` exceeds `available` bytes; `what` names the run. Does nothing when
//! the available memory is unknown (0).
inline void check_memory_fits(const MemoryEstimate& m, const std::string& what,
                              std::uint64_t available = available_memory_bytes()) {
  if (available == 0 || m.total <= available) return;
  const auto mib = [](std::uint64_t b) { return std::to_string((b >> 20) + ((b & 0xFFFFF) != 0)); };
  throw error("check_memory_fits", what,
              "needs " + mib(m.total) + " MiB (parameters " + mib(m.parameters) +
                  (m.packed ? " MiB + packed weights " + mib(m.packed) : std::string()) +
                  " MiB + workspace " + mib(m.workspace) + " MiB), only " +
                  std::to_string(available >> 20) + " MiB available");
}

//! Writes `net` with official names and its config as JSON metadata ("config").
template <class T>
void save_checkpoint(const nn::UViT<T>& net, const std::string& path,
                     const std::map<std::string, std::string>& metadata = {}) {
  safetensors::Writer w;
  for (const auto& n : net.parameter_names()) w.add_ref<T>(n, net.param(n));  // no copy
  try {
    w.metadata("config", net.config().to_json().dump());
  } catch (const error&) {
  }
  for (const auto& [k, v] : metadata) w.metadata(k, v);
  w.write(path);
}

namespace detail {
// Screens an untrusted config JSON before UViTConfig::from_json reads it: an object, a string
// "version", integer constructor arguments of magnitude <= 2^40, boolean flags and a finite
// mlp_ratio in (0, 1024] (so that no conversion inside from_json / validate can overflow).
inline void check_config_json(const nlohmann::json& j, const std::string& source) {
  const char* op = "checkpoint_config";
  if (!j.is_object())
    throw error(op, source, std::string("the config must be a JSON object; got ") + j.type_name());
  if (j.contains("version") && !j["version"].is_string())
    throw error(op, source + ": version", "must be a string (\"v0\" or \"v1\")");
  constexpr std::int64_t big = std::int64_t{1} << 40;
  for (const char* k : {"img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads",
                        "text_dim", "num_text_tokens", "clip_img_dim"}) {
    if (!j.contains(k)) continue;  // from_json names the missing key
    const auto& v = j[k];
    if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > big) ||
        (!v.is_number_unsigned() && (v.get<std::int64_t>() > big || v.get<std::int64_t>() < -big)))
      throw_mismatch(op, source + ": " + k, "value", "an integer in [-2^40, 2^40]", v.dump());
  }
  for (const char* k : {"qkv_bias", "mlp_time_embed"})
    if (j.contains(k) && !j[k].is_boolean())
      throw_mismatch(op, source + ": " + k, "value", "true or false", j[k].dump());
  if (j.contains("mlp_ratio")) {
    const auto& r = j["mlp_ratio"];
    if (!r.is_number() || !(r.get<double>() > 0 && r.get<double>() <= config_limits::mlp_ratio))
      throw_mismatch(op, source + ": mlp_ratio", "value", "a number in (0, 1024]", r.dump());
  }
}
}  // namespace detail

//! The config given as JSON for a checkpoint (version inferred from the tensors when absent).
inline nn::UViTConfig checkpoint_config_from(const nlohmann::json& j, const safetensors::File& f,
                                             const std::string& prefix = "") {
  detail::check_config_json(j, f.source());
  const bool v1 = f.contains(prefix + "token_embedding.weight") ||
                  f.contains(prefix + "data_type_token_embedding.weight");
  return nn::UViTConfig::from_json(j, v1 ? "v1" : "v0");
}

//! The config of a checkpoint: its "config" metadata (official constructor arguments + version),
//! else `json_fallback`; the version is inferred from the tensors when the JSON has none.
inline nn::UViTConfig checkpoint_config(const safetensors::File& f, const std::string& prefix = "",
                                        const nlohmann::json& json_fallback = {}) {
  nlohmann::json j = json_fallback;
  const std::string m = f.metadata("config");
  if (!m.empty()) {
    try {
      j = nlohmann::json::parse(m);
    } catch (const nlohmann::json::exception& e) {
      throw error("checkpoint_config", f.source(),
                  std::string("malformed config metadata: ") + e.what());
    }
  }
  if (j.is_null() || j.empty())
    throw error("checkpoint_config", f.source(),
                "no config: the file has no \"config\" metadata and none was given; num_heads and "
                "mlp_time_embed "
                "cannot be inferred from tensor shapes");
  return checkpoint_config_from(j, f, prefix);
}

}  // namespace unidiffuser
