// SPDX-License-Identifier: Apache-2.0
// Writes the fuzzers' seed corpora: make_seeds OUT_DIR fills OUT_DIR/safetensors (small valid and
// malformed files, each < 1 KiB) and OUT_DIR/checkpoint (tiny valid U-ViT checkpoints in each
// naming and storage dtype, plus hostile configs and a NaN weight). The committed corpus in
// fuzz/corpus was made with `make_seeds fuzz/corpus`; rerun it after changing this file.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit.hpp"

namespace ud = unidiffuser;
namespace st = unidiffuser::safetensors;
namespace fs = std::filesystem;

namespace {
// A raw file: 8-byte length, the header as given (malformed on purpose where needed), `data`.
void raw(const fs::path& p, const std::string& header, const std::vector<unsigned char>& data,
         std::uint64_t length_field) {
  std::ofstream o(p, std::ios::binary);
  o.write(reinterpret_cast<const char*>(&length_field), 8);
  o.write(header.data(), static_cast<std::streamsize>(header.size()));
  o.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}
void raw(const fs::path& p, const std::string& header, std::size_t data_bytes) {
  raw(p, header, std::vector<unsigned char>(data_bytes, 0x3f), header.size());
}

void safetensors_seeds(const fs::path& d) {
  ud::Tensor<float> f(ud::Shape{2, 3});
  for (std::int64_t i = 0; i < f.size(); ++i) f[i] = 0.5f * static_cast<float>(i) - 1.0f;
  ud::Tensor<double> g(ud::Shape{2});
  g[0] = 1e-300;
  g[1] = -3.25;
  ud::Tensor<std::int64_t> i64(ud::Shape{3});
  ud::Tensor<std::int32_t> i32(ud::Shape{1, 2});
  ud::Tensor<std::uint8_t> u8(ud::Shape{5});
  for (std::int64_t k = 0; k < 5; ++k) u8[k] = static_cast<std::uint8_t>(k * 60);
  for (std::int64_t k = 0; k < 3; ++k) i64[k] = -k * 1000;
  i32[0] = 7, i32[1] = -8;
  st::Writer().add<float>("f32", f).add<double>("f64", g).metadata("k", "v").write(
      (d / "valid_f32_f64_meta").string());
  st::Writer()
      .add_converted("f16", f.view(), ud::dtype::f16)
      .add_converted("bf16", f.view(), ud::dtype::bf16)
      .write((d / "valid_f16_bf16").string());
  st::Writer()
      .add<std::int64_t>("i64", i64)
      .add<std::int32_t>("i32", i32)
      .add<std::uint8_t>("u8", u8)
      .write((d / "valid_i64_i32_u8").string());
  ud::Tensor<float> nonfinite(ud::Shape{4});
  nonfinite[0] = std::numeric_limits<float>::quiet_NaN();
  nonfinite[1] = std::numeric_limits<float>::infinity();
  nonfinite[2] = -0.0f, nonfinite[3] = 1e-45f;
  st::Writer().add<float>("nonfinite", nonfinite).write((d / "valid_nonfinite").string());
  ud::Tensor<float> empty(ud::Shape{0});
  ud::Tensor<double> empty2(ud::Shape{3, 0});
  st::Writer()
      .add<float>("empty", empty)
      .add<double>("empty2", empty2)
      .add<float>("x", f)
      .write((d / "valid_zero_elements").string());
  st::Writer().write((d / "valid_no_tensors").string());

  const std::string e = R"("dtype":"F32","shape":[1],"data_offsets":)";
  raw(d / "shape_2p62_2_0",
      R"({"z":{"dtype":"F32","shape":[4611686018427387904,2,0],"data_offsets":[0,0]}})", 0);
  raw(d / "shape_2p61_2_0",
      R"({"z":{"dtype":"F32","shape":[2305843009213693952,2,0],"data_offsets":[0,0]}})", 0);
  raw(d / "shape_u64_max",
      R"({"z":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,1]}})", 1);
  raw(d / "shape_rank5", R"({"r":{"dtype":"U8","shape":[1,1,1,1,2],"data_offsets":[0,2]}})", 2);
  raw(d / "shape_negative", R"({"n":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4);
  raw(d / "shape_float", R"({"n":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4);
  raw(d / "duplicate_keys", "{\"a\":{" + e + "[0,4]},\"a\":{" + e + "[4,8]}}", 8);
  raw(d / "overlap",
      "{\"a\":{" + e + "[0,4]},\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[2,10]}}",
      10);
  raw(d / "hole", "{\"a\":{" + e + "[0,4]},\"b\":{" + e + "[8,12]}}", 12);
  raw(d / "trailing_bytes", "{\"a\":{" + e + "[0,4]}}", 9);
  raw(d / "offsets_reversed", "{\"a\":{" + e + "[4,0]}}", 4);
  raw(d / "offsets_beyond", "{\"a\":{" + e + "[0,4]}}", 2);
  raw(d / "length_mismatch", "{\"a\":{" + e + "[0,8]}}", 8);
  raw(d / "bad_dtype", R"({"a":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1);
  raw(d / "metadata_not_string", R"({"__metadata__":{"k":1}})", 0);
  raw(d / "metadata_duplicate", R"({"__metadata__":{"k":"a","k":"b"}})", 0);
  raw(d / "header_not_object", "[1,2,3]", 0);
  raw(d / "header_bad_json", "{\"a\":{\"dtype\":", 0);
  raw(d / "header_too_long", "{}", std::vector<unsigned char>{}, 1000);
  raw(d / "header_zero", "", std::vector<unsigned char>{}, 0);
  raw(d / "header_huge", "{}", std::vector<unsigned char>{}, std::uint64_t{1} << 40);
  raw(d / "short_file", "", std::vector<unsigned char>{}, 0);
  fs::resize_file(d / "short_file", 5);
}

ud::nn::UViTConfig tiny(const std::string& version, std::int64_t depth) {
  return ud::nn::UViTConfig::official(version, /*img_size=*/4, /*in_chans=*/1, /*patch=*/2,
                                      /*embed_dim=*/8, depth, /*heads=*/2, /*mlp_ratio=*/1.0,
                                      /*qkv_bias=*/false, /*mlp_time_embed=*/false,
                                      /*text_dim=*/2, /*num_text_tokens=*/2, /*clip_img_dim=*/2);
}

// A checkpoint of `cfg` with random weights stored as `as`, official or diffusers names; `config`
// replaces the metadata (empty: the config's own JSON; "-": none); `nan` poisons one weight.
void checkpoint(const fs::path& p, const ud::nn::UViTConfig& cfg, ud::dtype as, bool diffusers,
                const std::string& config = "", bool nan = false) {
  ud::nn::UViT<float> net(cfg);
  net.init_random(7, 0.5);
  if (nan) net.param("norm.weight")[1] = std::numeric_limits<float>::quiet_NaN();
  st::Writer w;
  for (const auto& n : net.parameter_names()) {
    const auto& t = net.param(n);
    const auto src = diffusers ? ud::detail::diffusers_names(n) : std::vector<std::string>{n};
    const std::int64_t pieces = static_cast<std::int64_t>(src.size());
    const std::int64_t rows = t.dim(0) / pieces, inner = t.size() / t.dim(0);
    for (std::int64_t k = 0; k < pieces; ++k) {
      std::vector<std::int64_t> dims{rows};
      for (int r = 1; r < t.rank(); ++r) dims.push_back(t.dim(r));
      const ud::TensorView<const float> v(t.data() + k * rows * inner,
                                          ud::Shape::from_range(dims.begin(), dims.end()));
      w.add_converted(src[static_cast<std::size_t>(k)], v, as);
    }
  }
  if (config != "-") w.metadata("config", config.empty() ? cfg.to_json().dump() : config);
  w.write(p.string());
}

// Whether the checkpoint at `p` loads (as the fuzz target does it); prints the error otherwise.
bool loads(const fs::path& p) {
  try {
    const auto f = st::File::read(p.string());
    const auto cfg = ud::checkpoint_config(f);
    ud::check_checkpoint(cfg, f);
    ud::nn::UViT<float> net(cfg);
    ud::load_checkpoint(net, f);
    return true;
  } catch (const ud::error& e) {
    std::cout << p.filename().string() << ": " << e.what() << "\n";
    return false;
  }
}

void checkpoint_seeds(const fs::path& d) {
  const auto v1 = tiny("v1", 1), v0 = tiny("v0", 3);
  checkpoint(d / "v1_d1_f32_official", v1, ud::dtype::f32, false);
  checkpoint(d / "v0_d3_bf16_official", v0, ud::dtype::bf16, false);
  checkpoint(d / "v1_d1_f16_diffusers", v1, ud::dtype::f16, true);
  checkpoint(d / "v1_d1_nan_weight", v1, ud::dtype::bf16, false, "", true);
  for (const char* ok : {"v1_d1_f32_official", "v0_d3_bf16_official", "v1_d1_f16_diffusers"})
    if (!loads(d / ok)) throw std::runtime_error(std::string("valid seed does not load: ") + ok);
  auto hostile = [&](const std::string& name, const std::string& key, const nlohmann::json& v) {
    auto j = v1.to_json();
    if (v.is_null())
      j.erase(key);
    else
      j[key] = v;
    checkpoint(d / name, v1, ud::dtype::bf16, false, j.dump());
  };
  hostile("hostile_embed_dim_2p26", "embed_dim", std::int64_t{1} << 26);
  hostile("hostile_text_tokens_2p40", "num_text_tokens", std::int64_t{1} << 40);
  hostile("hostile_depth_1e6", "depth", 1000000);
  hostile("hostile_mlp_ratio_1e300", "mlp_ratio", 1e300);
  hostile("hostile_missing_depth", "depth", nullptr);
  hostile("hostile_version_number", "version", 1);
  hostile("mismatch_clip_dim", "clip_img_dim", 3);
  checkpoint(d / "hostile_config_array", v1, ud::dtype::bf16, false, "[1,2]");
  checkpoint(d / "hostile_no_config", v1, ud::dtype::bf16, false, "-");
  for (const auto& e : fs::directory_iterator(d)) {
    const std::string n = e.path().filename().string();
    if ((n.rfind("hostile_", 0) == 0 || n.rfind("mismatch_", 0) == 0 || n == "v1_d1_nan_weight") &&
        loads(e.path()))
      throw std::runtime_error("hostile seed loads: " + n);
  }
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: make_seeds OUT_DIR\n";
    return 2;
  }
  const fs::path out(argv[1]);
  for (const char* sub : {"safetensors", "checkpoint"}) fs::create_directories(out / sub);
  safetensors_seeds(out / "safetensors");
  checkpoint_seeds(out / "checkpoint");
  std::uintmax_t largest = 0;
  for (const auto& e : fs::directory_iterator(out / "safetensors"))
    largest = std::max(largest, fs::file_size(e.path()));
  std::cout << "largest safetensors seed: " << largest << " bytes\n";
  return largest < 1024 ? 0 : 1;
}
