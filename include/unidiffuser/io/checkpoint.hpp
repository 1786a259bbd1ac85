// SPDX-License-Identifier: Apache-2.0
//! \file checkpoint.hpp
//! U-ViT checkpoints in safetensors: official names (v0 / v1) or diffusers' `UniDiffuserModel`
//! names (CHECKPOINTS.md §2), auto-detected, any float dtype converted to the working type. Loading
//! is strict and all-or-nothing: every missing, unexpected or mis-shaped tensor is listed in one
//! error and the network is left untouched. Saving writes official names.
#pragma once

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "unidiffuser/core/error.hpp"
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

//! diffusers source name(s) of one official parameter (three for a fused qkv weight).
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
    return {};  // no diffusers counterpart (e.g. the optional time MLPs, which the converter drops)
  }
  if (rest == "attn.qkv.weight")
    return {q + ".attn1.to_q.weight", q + ".attn1.to_k.weight", q + ".attn1.to_v.weight"};
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

//! Loads every parameter of `net` from `f` (names under `prefix`). Strict and all-or-nothing.
template <class T>
void load_checkpoint(nn::UViT<T>& net, const safetensors::File& f, const std::string& prefix = "",
                     CheckpointNaming naming = CheckpointNaming::automatic) {
  const char* op = "load_checkpoint";
  if (naming == CheckpointNaming::automatic) naming = detect_naming(f, prefix);
  const bool diff = naming == CheckpointNaming::diffusers;
  std::vector<std::string> missing, misshaped;
  std::set<std::string> used;
  std::vector<std::pair<std::string, std::vector<std::string>>> plan;
  for (const auto& [name, shape] : net.config().parameters()) {
    std::vector<std::string> src =
        diff ? detail::diffusers_names(name) : std::vector<std::string>{name};
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
      std::vector<std::int64_t> want(shape.rank());
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
    throw error(op, f.source(),
                std::string(diff ? "diffusers" : "official") + " naming, " + net.config().version +
                    " config: " + m);
  }
  // all checks passed: now convert (nothing above touched the network)
  for (const auto& [name, src] : plan) {
    auto& t = net.param(name);
    std::int64_t off = 0;
    for (const auto& s : src) {
      const auto v = f.get_vector<T>(prefix + s);
      std::copy(v.begin(), v.end(), t.data() + off);
      off += static_cast<std::int64_t>(v.size());
    }
  }
  net.parameters_changed();
}

//! Writes `net` with official names and its config as JSON metadata ("config").
template <class T>
void save_checkpoint(const nn::UViT<T>& net, const std::string& path,
                     const std::map<std::string, std::string>& metadata = {}) {
  safetensors::Writer w;
  for (const auto& n : net.parameter_names()) w.add<T>(n, net.param(n).view());
  try {
    w.metadata("config", net.config().to_json().dump());
  } catch (const error&) {
  }
  for (const auto& [k, v] : metadata) w.metadata(k, v);
  w.write(path);
}

//! The config given as JSON for a checkpoint (version inferred from the tensors when absent).
inline nn::UViTConfig checkpoint_config_from(const nlohmann::json& j, const safetensors::File& f,
                                             const std::string& prefix = "") {
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
  const bool v1 = f.contains(prefix + "token_embedding.weight") ||
                  f.contains(prefix + "data_type_token_embedding.weight");
  return nn::UViTConfig::from_json(j, v1 ? "v1" : "v0");
}

}  // namespace unidiffuser
