// SPDX-License-Identifier: Apache-2.0
// cli_make_hostile TINY_CHECKPOINT TINY_CONDITIONS OUT_DIR: writes the hostile inputs the
// command-line tests (tests/cli.cmake) feed to unidiffuser-sample, derived from the tiny golden
// checkpoint (tensors under "param/"):
//   ckpt_copy.safetensors,        byte copies of the inputs (the --out == input tests must not
//   cond_copy.safetensors         put the project's data at risk)
//   embed_huge.safetensors        config metadata with embed_dim = 2^26
//   text_tokens_huge.safetensors  config metadata with num_text_tokens = 2^40
//   nan_weight.safetensors        one NaN in param/pos_embed
//   cond_transposed.safetensors   text condition of shape [8, 6] (the model wants [6, 8])
//   cond_i64.safetensors          text condition of shape [6, 8] stored as I64
//   config_array.json             the JSON text [1, 2]
//   k3.safetensors                a three-group U-ViT (tests/uvit_configs.hpp k3_config: img, text
//                                 and audio groups) with arbitrary weights, its config saved
//   k3_conditions.safetensors     one sample of each of its components (img, text, audio)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit_config.hpp"
#include "uvit_configs.hpp"

namespace ud = unidiffuser;
namespace fs = std::filesystem;

namespace {

// The checkpoint's tensors and metadata, with the config's `key` set to `value` and, when
// `poison` names a tensor, its first element set to NaN.
void rewrite(const ud::safetensors::File& f, const fs::path& out, const std::string& key,
             std::int64_t value, const std::string& poison = "") {
  ud::safetensors::Writer w;
  for (const auto& info : f.tensors()) {
    auto t = f.get<float>(info.name);
    if (info.name == poison) t.data()[0] = std::numeric_limits<float>::quiet_NaN();
    w.add<float>(info.name, t);
  }
  for (const auto& [k, v] : f.metadata()) w.metadata(k, v);
  auto cfg = nlohmann::json::parse(f.metadata("config"));
  if (!key.empty()) cfg[key] = value;
  w.metadata("config", cfg.dump());
  w.write(out.string());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr,
                 "usage: cli_make_hostile TINY_CHECKPOINT TINY_CONDITIONS OUT_DIR [GOLDEN_DIR]\n");
    return 1;
  }
  try {
    const fs::path dir = argv[3];
    fs::create_directories(dir);
    fs::copy_file(argv[1], dir / "ckpt_copy.safetensors", fs::copy_options::overwrite_existing);
    fs::copy_file(argv[2], dir / "cond_copy.safetensors", fs::copy_options::overwrite_existing);
    const auto f = ud::safetensors::File::read(argv[1]);
    rewrite(f, dir / "embed_huge.safetensors", "embed_dim", std::int64_t{1} << 26);
    rewrite(f, dir / "text_tokens_huge.safetensors", "num_text_tokens", std::int64_t{1} << 40);
    rewrite(f, dir / "nan_weight.safetensors", "", 0, "param/pos_embed");

    ud::Tensor<float> transposed(ud::Shape{8, 6});
    for (std::int64_t i = 0; i < transposed.size(); ++i)
      transposed.data()[i] = 0.01f * static_cast<float>(i);
    ud::safetensors::Writer()
        .add<float>("text", transposed)
        .write((dir / "cond_transposed.safetensors").string());
    ud::Tensor<std::int64_t> integers(ud::Shape{6, 8});
    for (std::int64_t i = 0; i < integers.size(); ++i) integers.data()[i] = i;
    ud::safetensors::Writer()
        .add<std::int64_t>("text", integers)
        .write((dir / "cond_i64.safetensors").string());

    std::ofstream(dir / "config_array.json") << "[1, 2]\n";

    // checkpoints of other layouts (weights need not be trained to sample) and their conditions
    auto write_layout = [&](const ud::nn::UViTConfig& cfg, const std::string& stem) {
      ud::safetensors::Writer w;
      std::int64_t k = 0;
      for (const auto& [name, shape] : cfg.parameters()) {
        ud::Tensor<float> t(shape);
        for (std::int64_t i = 0; i < t.size(); ++i, ++k)
          t.data()[i] = 0.2f * static_cast<float>(std::sin(0.37 * static_cast<double>(k)));
        w.add<float>(name, t);
      }
      w.metadata("config", cfg.to_json().dump());
      w.write((dir / (stem + ".safetensors")).string());
      ud::safetensors::Writer c;
      for (const auto& comp : cfg.components) {
        ud::Tensor<float> t(comp.shape());
        for (std::int64_t i = 0; i < t.size(); ++i)
          t.data()[i] = static_cast<float>(std::cos(0.9 * static_cast<double>(i)));
        c.add<float>(comp.name, t);
      }
      c.write((dir / (stem + "_conditions.safetensors")).string());
    };
    write_layout(ud::testing::k3_config(), "k3");
    // K = 6 and K = 9: the K = 3 layout and more token groups g3, g4, ...
    for (int groups : {6, 9}) {
      auto cfg = ud::testing::k3_config();
      for (int g = 3; g < groups; ++g) {
        const std::string n = "g" + std::to_string(g);
        cfg.time_names.push_back("time_" + n + "_embed");
        cfg.components.push_back(ud::nn::UViTComponent{.name = n,
                                                       .kind = ud::nn::ComponentKind::tokens,
                                                       .group = static_cast<std::size_t>(g),
                                                       .length = 2,
                                                       .dim = 3,
                                                       .in_name = n + "_embed",
                                                       .out_name = n + "_out"});
      }
      cfg.validate();
      write_layout(cfg, "k" + std::to_string(groups));
    }

    if (argc == 5) {  // golden directories the checker must fail on
      // a reference whose tolerance is missing from the file's checks
      const auto g = ud::safetensors::File::read(
          (fs::path(argv[4]) / "timestep_embedding.safetensors").string());
      ud::safetensors::Writer w;
      for (const auto& info : g.tensors()) w.add<double>(info.name, g.get<double>(info.name));
      for (const auto& [k, v] : g.metadata()) w.metadata(k, v);
      auto checks = nlohmann::json::parse(g.metadata("checks"));
      checks["tolerances"].erase("embedding");
      w.metadata("checks", checks.dump());
      fs::create_directories(dir / "golden_no_tolerance");
      w.write((dir / "golden_no_tolerance" / "timestep_embedding.safetensors").string());
      // nothing the checker recognises: no check passes
      fs::create_directories(dir / "golden_unknown");
      ud::safetensors::Writer()
          .add<float>("x", transposed)
          .write((dir / "golden_unknown" / "x.safetensors").string());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cli_make_hostile: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
