// SPDX-License-Identifier: Apache-2.0
//! \file uvit_config.hpp
//! Configuration of the multimodal U-ViT (UVIT.md): hyper-parameters, the token layout over K
//! timestep groups, the official v0 / v1 presets and their JSON form (the official constructor
//! arguments), the parameter list in state-dict order and the GroupLayout of the inputs.
//!
//! Token layout: one time token per group (group order), an optional learned data-type token
//! (v1), then the content tokens of the components in `components` order. A component is a
//! patched image latent (strided-conv embedding, linear head + unpatchify) or a token sequence
//! (linear embedding and head; a vector is one token). The positional table `pos_embed` covers
//! time and content tokens at the default sizes; v1's data-type position is the separate
//! `pos_embed_token`, spliced in after the time tokens (UVIT.md §4.4).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/diffusion/groups.hpp"

namespace unidiffuser::nn {

//! The built-in kinds, and `custom`: a kind registered by name (register_kind, component_kind.hpp;
//! UViTComponent::custom_kind names it, UViTComponent::options holds its settings).
enum class ComponentKind { patched_image, tokens, custom };

struct UViTComponent;

//! The shape side of a registered component kind (no element type or backend): what the
//! configuration, the checkpoint loader and the layout need. register_kind fills it from the
//! kind type's static functions; the compute side is in component_kind.hpp.
struct KindInfo {
  std::string name;
  //! Checks the component's options; throws unidiffuser::error naming the field.
  std::function<void(const UViTComponent&)> validate;
  //! The component's input shape (without the batch; its GroupLayout shape) and token count.
  std::function<Shape(const UViTComponent&)> shape;
  std::function<std::int64_t(const UViTComponent&)> tokens;
  //! Its parameters (full names, shapes) for embedding width E, in the order the kind's compute
  //! functions receive them.
  std::function<std::vector<std::pair<std::string, Shape>>(const UViTComponent&, std::int64_t E)>
      parameters;
  //! Per-sample scratch elements its forward keeps for its backward (embedding, head).
  std::function<std::array<std::int64_t, 2>(const UViTComponent&, std::int64_t E)> scratch;
};

namespace detail {
struct KindTable {
  std::mutex m;
  std::map<std::string, KindInfo> kinds;
};
inline KindTable& kind_table() {
  static KindTable t;
  return t;
}
}  // namespace detail

//! The registered kind `name`, or an error naming the component (`who`) and the known kinds.
inline const KindInfo& kind_info(const std::string& name, const std::string& who = "component") {
  auto& t = detail::kind_table();
  std::lock_guard<std::mutex> lock(t.m);
  const auto it = t.kinds.find(name);
  if (it == t.kinds.end()) {
    std::string known;
    for (const auto& [n, k] : t.kinds) known += (known.empty() ? "" : ", ") + ("\"" + n + "\"");
    throw error("UViTConfig", who,
                "component kind \"" + name +
                    "\" is not registered in this program (nn::register_kind<Kind>() before "
                    "building or loading the network); registered: " +
                    (known.empty() ? std::string("none") : known));
  }
  return it->second;  // entries are never removed: the reference stays valid
}

//! One input/output tensor of the network.
struct UViTComponent {
  std::string name;  //!< e.g. "img", "clip_img", "text"
  ComponentKind kind = ComponentKind::tokens;
  std::size_t group = 0;  //!< timestep group
  std::size_t slot = 0;   //!< position inside the group's row (GroupLayout component index)
  std::int64_t channels = 0, size = 0, patch = 0;  //!< patched image: C, default height S, p
  std::int64_t length = 0, dim = 0;                //!< tokens: L, D
  std::string in_name, out_name;  //!< parameter prefixes of the embedding and the head
  std::string custom_kind{};      //!< kind == custom: the registered kind's name
  nlohmann::json options = nlohmann::json::object();  //!< kind == custom: its settings
  //! Patched image: the default latent width (0: `size`, a square latent). Last, so that
  //! positional aggregate initialisation written before it existed still compiles.
  std::int64_t width = 0;

  //! A patched image's latent height x width: the default (size x width, or size x size when
  //! width is 0) when h is 0, else h x w (a run-time latent size, UViTInputs::latent_h / _w).
  std::array<std::int64_t, 2> latent(std::int64_t h = 0, std::int64_t w = 0) const {
    if (h == 0) return {size, width != 0 ? width : size};
    return {h, w};
  }
  std::int64_t tokens(std::int64_t h = 0, std::int64_t w = 0) const {
    if (kind == ComponentKind::tokens) return length;
    if (kind == ComponentKind::custom) return kind_info(custom_kind, name).tokens(*this);
    const auto [lh, lw] = latent(h, w);
    return (lh / patch) * (lw / patch);
  }
  std::int64_t numel(std::int64_t h = 0, std::int64_t w = 0) const {
    if (kind == ComponentKind::tokens) return length * dim;
    if (kind == ComponentKind::custom) return shape().numel();
    const auto [lh, lw] = latent(h, w);
    return channels * lh * lw;
  }
  //! The input's shape without the batch (patched images at latent size h x w; 0: the default).
  Shape shape(std::int64_t h = 0, std::int64_t w = 0) const {
    if (kind == ComponentKind::tokens) return Shape{length, dim};
    if (kind == ComponentKind::custom) return kind_info(custom_kind, name).shape(*this);
    const auto [lh, lw] = latent(h, w);
    return Shape{channels, lh, lw};
  }
  //! Input width of the embedding (built-in kinds; a custom kind's own business: 0).
  std::int64_t in_features() const {
    if (kind == ComponentKind::custom) return 0;
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
  //! From JSON: the official constructor arguments (img_size, in_chans, patch_size, embed_dim,
  //! depth, num_heads, mlp_ratio, qkv_bias, mlp_time_embed, text_dim, num_text_tokens,
  //! clip_img_dim) plus "version" ("v0" / "v1"; `default_version` when the key is absent), or the
  //! general form of any layout written by to_json() ("version": "custom"), or diffusers'
  //! `config.json` (recognised by "_class_name", or by "num_attention_heads" without "version";
  //! from_diffusers_json()).
  static UViTConfig from_json(const nlohmann::json& j, const std::string& default_version = "") {
    const char* op = "UViTConfig::from_json";
    auto need = [&](const char* k) -> const nlohmann::json& {
      if (!j.contains(k)) throw error(op, k, "missing key in the config");
      return j.at(k);
    };
    if (!j.is_object())
      throw_mismatch(op, "config", "JSON type", "an object {...}", std::string(j.type_name()));
    if (j.contains("_class_name") || (j.contains("num_attention_heads") && !j.contains("version")))
      return from_diffusers_json(j);
    try {
      const std::string v = j.value("version", default_version);
      if (v.empty()) throw error(op, "version", "missing; expected \"v0\", \"v1\" or \"custom\"");
      if (v == "custom") return from_custom_json(j);
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
  //! From diffusers' `config.json` of a `UniDiffuserModel` (CHECKPOINTS.md §2). Absent keys take
  //! diffusers' constructor defaults. num_attention_heads x attention_head_dim is embed_dim,
  //! num_layers is depth, sample_size / in_channels / patch_size the image latent, attention_bias
  //! the qkv bias, use_timestep_embedding the time MLPs, use_data_type_embedding selects v1. The
  //! options the official network does not have (pre-LN, another block type or activation,
  //! patch positional embeddings, cross-attention, ...) are refused by name; dropout settings are
  //! irrelevant at inference and ignored.
  static UViTConfig from_diffusers_json(const nlohmann::json& j) {
    const char* op = "UViTConfig::from_diffusers_json";
    if (!j.is_object())
      throw_mismatch(op, "config", "JSON type", "an object {...}", std::string(j.type_name()));
    if (j.contains("_class_name") && (!j["_class_name"].is_string() ||
                                      j["_class_name"].get<std::string>() != "UniDiffuserModel"))
      throw_mismatch(op, "_class_name", "model class", "\"UniDiffuserModel\"",
                     j["_class_name"].dump());
    constexpr std::int64_t big = std::int64_t{1} << 40;
    auto integer = [&](const char* k, std::int64_t def, bool required) -> std::int64_t {
      if (!j.contains(k) || j[k].is_null()) {
        if (required) throw error(op, k, "missing key (diffusers' default is None)");
        return def;
      }
      const auto& v = j[k];
      if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > big) ||
          (!v.is_number_unsigned() && (v.get<std::int64_t>() < 1 || v.get<std::int64_t>() > big)))
        throw_mismatch(op, k, "value", "an integer in [1, 2^40]", v.dump());
      return v.get<std::int64_t>();
    };
    auto boolean = [&](const char* k, bool def) {
      if (!j.contains(k)) return def;
      if (!j[k].is_boolean()) throw_mismatch(op, k, "value", "true or false", j[k].dump());
      return j[k].get<bool>();
    };
    auto must_equal = [&](const char* k, const nlohmann::json& def, const nlohmann::json& want,
                          const char* why) {
      const nlohmann::json& v = j.contains(k) ? j[k] : def;
      if (v != want)
        throw error(op, k,
                    "expected " + want.dump() + ", got " + v.dump() +
                        (j.contains(k) ? "" : " (diffusers' default)") + ": " + why);
    };
    must_equal("block_type", "unidiffuser", "unidiffuser",
               "only UniDiffuser's block (LayerNorms on the residual path) is implemented");
    must_equal("pre_layer_norm", false, false, "the official U-ViT is post-LayerNorm");
    must_equal("activation_fn", "geglu", "gelu", "the official MLP uses GELU");
    must_equal("norm_type", "layer_norm", "layer_norm", "the official blocks use LayerNorm");
    must_equal("norm_elementwise_affine", true, true, "the official LayerNorms are affine");
    must_equal("use_patch_pos_embed", false, false,
               "the official patch embedding has no positional embedding of its own");
    must_equal("only_cross_attention", false, false, "the U-ViT has no cross-attention");
    for (const char* k : {"cross_attention_dim", "num_vector_embeds", "num_embeds_ada_norm"})
      must_equal(k, nullptr, nullptr, "not part of the U-ViT");
    const std::int64_t heads = integer("num_attention_heads", 16, false);
    const std::int64_t head_dim = integer("attention_head_dim", 88, false);
    if (heads > (std::int64_t{1} << 20) || head_dim > (std::int64_t{1} << 20))
      throw error(
          op, "num_attention_heads/attention_head_dim",
          "each must be <= 2^20; got " + std::to_string(heads) + " / " + std::to_string(head_dim));
    const std::int64_t in_ch = integer("in_channels", 0, true);
    if (j.contains("out_channels") && !j["out_channels"].is_null() &&
        integer("out_channels", 0, true) != in_ch)
      throw_mismatch(op, "out_channels", "out_channels", "null or in_channels",
                     j["out_channels"].dump());
    return official(boolean("use_data_type_embedding", false) ? "v1" : "v0",
                    integer("sample_size", 0, true), in_ch, integer("patch_size", 0, true),
                    heads * head_dim, integer("num_layers", 1, false), heads, 4.0,
                    boolean("attention_bias", false), boolean("use_timestep_embedding", false),
                    integer("text_dim", 768, false), integer("num_text_tokens", 77, false),
                    integer("clip_img_dim", 512, false));
  }
  //! The official constructor arguments when this config is exactly an official preset (every
  //! field, names included), else the general form: hyper-parameters, time_names and the
  //! component list, "version": "custom". Either form reloads with from_json().
  nlohmann::json to_json() const {
    const UViTComponent* img = find("img");
    const UViTComponent* text = find("text");
    const UViTComponent* clip = find("clip_img");
    if (img && text && clip && (version == "v0" || version == "v1") &&
        img->kind == ComponentKind::patched_image && text->kind == ComponentKind::tokens &&
        clip->kind == ComponentKind::tokens) {
      try {
        const UViTConfig o =
            official(version, img->size, img->channels, img->patch, embed_dim, depth, num_heads,
                     mlp_ratio, qkv_bias, mlp_time_embed, text->dim, text->length, clip->dim);
        if (o.custom_json() == custom_json())
          return {{"version", version},        {"img_size", img->size},
                  {"in_chans", img->channels}, {"patch_size", img->patch},
                  {"embed_dim", embed_dim},    {"depth", depth},
                  {"num_heads", num_heads},    {"mlp_ratio", mlp_ratio},
                  {"qkv_bias", qkv_bias},      {"mlp_time_embed", mlp_time_embed},
                  {"text_dim", text->dim},     {"num_text_tokens", text->length},
                  {"clip_img_dim", clip->dim}};
      } catch (const error&) {  // not an official preset: the general form below
      }
    }
    return custom_json();
  }
  //! The general JSON form of any layout (what to_json() writes for non-official configs).
  nlohmann::json custom_json() const {
    nlohmann::json comps = nlohmann::json::array();
    for (const auto& c : components) {
      nlohmann::json o = {{"name", c.name},         {"group", c.group},
                          {"slot", c.slot},         {"in_name", c.in_name},
                          {"out_name", c.out_name}, {"kind", kind_name(c.kind)}};
      if (c.kind == ComponentKind::patched_image) {
        o["channels"] = c.channels, o["size"] = c.size, o["patch"] = c.patch;
        if (c.latent()[1] != c.size) o["width"] = c.latent()[1];  // only non-square latents
      } else if (c.kind == ComponentKind::tokens)
        o["length"] = c.length, o["dim"] = c.dim;
      else
        o["kind"] = c.custom_kind, o["options"] = c.options;
      comps.push_back(std::move(o));
    }
    return {{"version", "custom"},
            {"embed_dim", embed_dim},
            {"depth", depth},
            {"num_heads", num_heads},
            {"mlp_ratio", mlp_ratio},
            {"qkv_bias", qkv_bias},
            {"mlp_time_embed", mlp_time_embed},
            {"time_names", time_names},
            {"data_type_token", data_type_token},
            {"data_types", data_types},
            {"components", std::move(comps)}};
  }
  static const char* kind_name(ComponentKind k) {
    return k == ComponentKind::patched_image ? "patched_image"
           : k == ComponentKind::tokens      ? "tokens"
                                             : "custom";
  }
  const UViTComponent* find(const std::string& name) const {
    for (const auto& c : components)
      if (c.name == name) return &c;
    return nullptr;
  }

  //! Reads the general form (every field required, integers in [0, 2^40]); then validate().
  static UViTConfig from_custom_json(const nlohmann::json& j) {
    const char* op = "UViTConfig::from_json";
    constexpr std::int64_t big = std::int64_t{1} << 40;
    auto field = [&](const nlohmann::json& o, const std::string& where,
                     const char* k) -> const nlohmann::json& {
      if (!o.is_object() || !o.contains(k)) throw error(op, where + k, "missing key in the config");
      return o.at(k);
    };
    auto integer = [&](const nlohmann::json& o, const std::string& where, const char* k) {
      const auto& v = field(o, where, k);
      if (!v.is_number_integer() || (v.is_number_unsigned() && v.get<std::uint64_t>() > big) ||
          (!v.is_number_unsigned() && (v.get<std::int64_t>() < 0 || v.get<std::int64_t>() > big)))
        throw_mismatch(op, where + k, "value", "an integer in [0, 2^40]", v.dump());
      return v.get<std::int64_t>();
    };
    auto boolean = [&](const nlohmann::json& o, const std::string& where, const char* k) {
      const auto& v = field(o, where, k);
      if (!v.is_boolean()) throw_mismatch(op, where + k, "value", "true or false", v.dump());
      return v.get<bool>();
    };
    auto text = [&](const nlohmann::json& o, const std::string& where, const char* k) {
      const auto& v = field(o, where, k);
      if (!v.is_string()) throw_mismatch(op, where + k, "value", "a string", v.dump());
      return v.get<std::string>();
    };
    UViTConfig c;
    c.version = "custom";
    c.embed_dim = integer(j, "", "embed_dim");
    c.depth = integer(j, "", "depth");
    c.num_heads = integer(j, "", "num_heads");
    const auto& r = field(j, "", "mlp_ratio");
    if (!r.is_number() || !(r.get<double>() > 0 && r.get<double>() <= 1024))
      throw_mismatch(op, "mlp_ratio", "value", "a number in (0, 1024]", r.dump());
    c.mlp_ratio = r.get<double>();
    c.qkv_bias = boolean(j, "", "qkv_bias");
    c.mlp_time_embed = boolean(j, "", "mlp_time_embed");
    c.data_type_token = boolean(j, "", "data_type_token");
    c.data_types = integer(j, "", "data_types");
    const auto& tn = field(j, "", "time_names");
    if (!tn.is_array() || tn.size() > 64)
      throw_mismatch(op, "time_names", "value", "an array of at most 64 strings", tn.dump());
    for (const auto& t : tn) {
      if (!t.is_string()) throw_mismatch(op, "time_names", "entry", "a string", t.dump());
      c.time_names.push_back(t.get<std::string>());
    }
    const auto& cs = field(j, "", "components");
    if (!cs.is_array() || cs.size() > 64)
      throw_mismatch(op, "components", "value", "an array of at most 64 objects",
                     std::string(cs.type_name()));
    for (std::size_t i = 0; i < cs.size(); ++i) {
      const auto& o = cs[i];
      const std::string w = "components[" + std::to_string(i) + "].";
      UViTComponent k;
      k.name = text(o, w, "name");
      const std::string kind = text(o, w, "kind");
      k.group = static_cast<std::size_t>(integer(o, w, "group"));
      k.slot = static_cast<std::size_t>(integer(o, w, "slot"));
      k.in_name = text(o, w, "in_name");
      k.out_name = text(o, w, "out_name");
      if (kind == "patched_image") {
        k.kind = ComponentKind::patched_image;
        k.channels = integer(o, w, "channels");
        k.size = integer(o, w, "size");
        k.patch = integer(o, w, "patch");
        if (o.contains("width")) k.width = integer(o, w, "width");  // absent: square
      } else if (kind == "tokens") {
        k.kind = ComponentKind::tokens;
        k.length = integer(o, w, "length");
        k.dim = integer(o, w, "dim");
      } else {
        // a registered kind: its settings are the "options" object (checked by validate())
        k.kind = ComponentKind::custom;
        k.custom_kind = kind;
        (void)kind_info(kind, w + "kind");  // not registered: say so before anything else
        const auto& opt = field(o, w, "options");
        if (!opt.is_object())
          throw_mismatch(op, w + "options", "value", "an object {...}", opt.dump());
        k.options = opt;
      }
      c.components.push_back(std::move(k));
    }
    c.validate();
    return c;
  }

  void validate() const {
    const char* op = "UViTConfig";
    // hidden() converts embed_dim x mlp_ratio to an integer: both must keep it representable
    if (!(mlp_ratio > 0 && mlp_ratio <= 1024))
      throw error(op, "mlp_ratio",
                  "expected a finite value in (0, 1024]; got " + std::to_string(mlp_ratio));
    if (embed_dim > (std::int64_t{1} << 40))
      throw_mismatch(op, "embed_dim", "embed_dim", "<= 2^40", embed_dim);
    if (embed_dim <= 0 || num_heads <= 0 || embed_dim % num_heads != 0)
      throw error(op, "embed_dim/num_heads",
                  "embed_dim must be a positive multiple of num_heads; got " +
                      std::to_string(embed_dim) + " / " + std::to_string(num_heads));
    if (depth < 1) throw_mismatch(op, "depth", "depth", ">= 1", depth);
    if (hidden() < 1) throw error(op, "mlp_ratio", "MLP hidden width must be positive");
    if (time_names.empty()) throw error(op, "time_names", "need one time token per group");
    if (components.empty()) throw error(op, "components", "need at least one component");
    // names: non-empty and unique (parameter prefixes that collided would merge parameters)
    std::vector<std::string> prefixes(time_names.begin(), time_names.end()), names;
    for (const auto& c : components) {
      if (c.name.empty()) throw error(op, "components", "a component has an empty name");
      if (c.in_name.empty() || c.out_name.empty())
        throw error(op, c.name, "in_name and out_name (parameter prefixes) must be non-empty");
      names.push_back(c.name);
      prefixes.push_back(c.in_name);
      prefixes.push_back(c.out_name);
    }
    for (const auto& t : time_names)
      if (t.empty()) throw error(op, "time_names", "a time-embedding prefix is empty");
    auto duplicate = [](std::vector<std::string> v) -> std::string {
      std::sort(v.begin(), v.end());
      const auto it = std::adjacent_find(v.begin(), v.end());
      return it == v.end() ? std::string() : *it;
    };
    if (const auto d = duplicate(names); !d.empty())
      throw error(op, d, "two components share this name");
    if (const auto d = duplicate(prefixes); !d.empty())
      throw error(op, d, "parameter prefix used twice (time_names, in_name, out_name)");
    // slots: each group's components take the slots 0 .. n-1 once each
    for (std::size_t g = 0; g < groups(); ++g) {
      std::vector<std::size_t> slots;
      for (const auto& c : components)
        if (c.group == g) slots.push_back(c.slot);
      std::sort(slots.begin(), slots.end());
      for (std::size_t i = 0; i < slots.size(); ++i)
        if (slots[i] != i)
          throw error(op, "slot",
                      "group " + std::to_string(g) + " (" + time_names[g] + "): the slots of its " +
                          std::to_string(slots.size()) + " components must be 0.." +
                          std::to_string(slots.size() - 1) + " once each");
    }
    if (data_type_token && data_types < 1)
      throw_mismatch(op, "data_types", "data_types", ">= 1", data_types);
    for (const auto& c : components) {
      if (c.group >= groups()) throw error(op, c.name, "component group out of range");
      if (c.kind == ComponentKind::patched_image) {
        if (c.channels < 1 || c.patch < 1)
          throw error(op, c.name,
                      "channels and patch must be positive; got " + std::to_string(c.channels) +
                          " and " + std::to_string(c.patch));
        if (c.width < 0 || c.size < c.patch || c.size % c.patch || c.latent()[1] < c.patch ||
            c.latent()[1] % c.patch)
          throw error(op, c.name,
                      "latent sides (size x width) must be positive multiples of the patch size " +
                          std::to_string(c.patch) + "; got " + std::to_string(c.size) + "x" +
                          std::to_string(c.width));
      } else if (c.kind == ComponentKind::tokens) {
        if (c.length < 1 || c.dim < 1)
          throw error(op, c.name, "token length and dim must be positive");
      } else {
        if (c.custom_kind.empty())
          throw error(op, c.name, "a custom component needs custom_kind (a registered kind)");
        const KindInfo& k = kind_info(c.custom_kind, c.name);
        k.validate(c);
        const Shape s = k.shape(c);
        const std::int64_t t = k.tokens(c);
        if (s.rank() < 1 || s.numel() < 1 || t < 1)
          throw error(op, c.name,
                      "kind \"" + c.custom_kind + "\" gives an empty input or no tokens (" +
                          std::to_string(s.numel()) + " elements, " + std::to_string(t) +
                          " tokens)");
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
    for (const auto& c : components)
      if (c.kind == ComponentKind::custom)
        for (auto& q : kind_info(c.custom_kind, c.name).parameters(c, E)) p.push_back(std::move(q));
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
    for (const auto& c : components)
      slots[c.group].push_back({c.slot, ComponentSpec{c.name, c.shape(h, w)}});
    for (std::size_t k = 0; k < K; ++k) {
      std::sort(slots[k].begin(), slots[k].end(),
                [](auto& a, auto& b) { return a.first < b.first; });
      g[k].name = time_names[k];
      for (auto& [slot, spec] : slots[k]) g[k].components.push_back(spec);
    }
    return GroupLayout<K>(g);
  }
};

}  // namespace unidiffuser::nn
