// SPDX-License-Identifier: Apache-2.0
// The U-ViT: layer kernels against naive references, checkpoints in both namings, strict errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "unidiffuser/backend/cpu/kernels.hpp"
#include "unidiffuser/backend/cpu/onednn.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"

#include "support.hpp"
#include "uvit_configs.hpp"

namespace ud = unidiffuser;
namespace kk = unidiffuser::cpu_kernels;

namespace {
const std::string kGolden = std::string(UNIDIFFUSER_GOLDEN_DIR) + "/uvit_v1_tiny.safetensors";

std::vector<double> random_vec(std::size_t n, std::uint64_t seed) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = ud::philox_normal(seed, 0, 0, i);
  return v;
}

// Runs the native input set of the v1 golden file; returns all outputs concatenated.
std::vector<float> run_native(ud::nn::UViT<float>& net, const ud::safetensors::File& f,
                              const ud::Context<ud::cpu>& ctx = {}) {
  const auto& cfg = net.config();
  std::vector<ud::Tensor<float>> xs, outs;
  ud::nn::UViTInputs<float> in;
  std::vector<ud::RowBlock<float>> ob;
  for (const auto& c : cfg.components) {
    xs.push_back(f.get<float>("input/native/" + c.name));
    outs.emplace_back(xs.back().shape());
  }
  for (std::size_t k = 0; k < xs.size(); ++k) {
    in.x.push_back(ud::as_rows(ud::TensorView<const float>(xs[k].view())));
    ob.push_back(ud::as_rows(outs[k].view()));
  }
  const auto ti = f.get_vector<double>("input/native/t_img"),
             tt = f.get_vector<double>("input/native/t_text");
  const auto dt = f.get_vector<std::int64_t>("input/native/data_type");
  in.t = {ti, tt};
  in.data_type = dt;
  net.forward(ctx, in, ob);
  std::vector<float> all;
  for (auto& o : outs) all.insert(all.end(), o.begin(), o.end());
  return all;
}

// Writes the parameters of `net` in diffusers naming by applying the documented mapping
// (CHECKPOINTS.md §2): fused qkv weights and biases split in three, the patch embedding twice.
void write_diffusers(const ud::nn::UViT<float>& net, const std::string& path) {
  ud::safetensors::Writer w;
  for (const auto& n : net.parameter_names()) {
    const auto src = ud::detail::diffusers_names(n);
    REQUIRE_MESSAGE(!src.empty(), n);
    const auto& t = net.param(n);
    if (src.size() == 3) {
      const std::int64_t rows = t.dim(0) / 3, cols = t.size() / t.dim(0);
      const ud::Shape s = t.rank() == 2 ? ud::Shape{rows, cols} : ud::Shape{rows};
      for (int k = 0; k < 3; ++k)
        w.add<float>(src[static_cast<std::size_t>(k)],
                     ud::TensorView<const float>(t.data() + k * rows * cols, s));
    } else {
      w.add<float>(src[0], t.view());
    }
    if (n == "patch_embed.proj.weight") w.add<float>("transformer.pos_embed.proj.weight", t.view());
    if (n == "patch_embed.proj.bias") w.add<float>("transformer.pos_embed.proj.bias", t.view());
  }
  w.write(path);
}

using unidiffuser::testing::message_of;
}  // namespace

namespace {
// softmax(Q K^T / sqrt(dh)) V per (sample, head) in double, straight from the definition.
std::vector<double> naive_attention(const std::vector<double>& qkv, std::int64_t B, std::int64_t L,
                                    std::int64_t E, std::int64_t H) {
  const std::int64_t dh = E / H;
  std::vector<double> out(static_cast<std::size_t>(B * L * E));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < L; ++i) {
        const double* x = qkv.data() + b * L * 3 * E;
        std::vector<double> s(static_cast<std::size_t>(L));
        double mx = -1e300, sum = 0;
        for (std::int64_t j = 0; j < L; ++j) {
          double d = 0;
          for (std::int64_t k = 0; k < dh; ++k)
            d += x[i * 3 * E + h * dh + k] * x[j * 3 * E + E + h * dh + k];
          s[static_cast<std::size_t>(j)] = d / std::sqrt(double(dh));
          mx = std::max(mx, s[static_cast<std::size_t>(j)]);
        }
        for (auto& v : s) sum += (v = std::exp(v - mx));
        for (std::int64_t k = 0; k < dh; ++k) {
          double o = 0;
          for (std::int64_t j = 0; j < L; ++j)
            o += s[static_cast<std::size_t>(j)] / sum * x[j * 3 * E + 2 * E + h * dh + k];
          out[static_cast<std::size_t>((b * L + i) * E + h * dh + k)] = o;
        }
      }
  return out;
}
}  // namespace

TEST_CASE("attention kernel equals the naive softmax(QK^T/sqrt(d))V for any shape and block") {
  // Head dims that are a multiple of 16 take the register-tiled path on every ISA, odd ones the
  // blocked Eigen path; sequence lengths that are not multiples of the 4-row tile or the packet.
  struct Case {
    std::int64_t B, L, E, H;
  };
  for (const Case c : {Case{1, 37, 12, 3}, Case{2, 37, 48, 3}, Case{2, 70, 64, 2},
                       Case{1, 300, 12, 3}, Case{2, 21, 9, 3}, Case{1, 5, 32, 1}}) {
    CAPTURE(c.L);
    CAPTURE(c.E);
    const auto qkv = random_vec(static_cast<std::size_t>(c.B * c.L * 3 * c.E), 5);
    const auto naive = naive_attention(qkv, c.B, c.L, c.E, c.H);
    // every (sample, head) through the kernel, with score blocks of several sizes
    auto run = [&](auto* q, auto* o, std::int64_t block) {
      using T = std::remove_pointer_t<decltype(o)>;
      kk::AlignedVector<T> sc(
          static_cast<std::size_t>(kk::attention_scratch(c.L, block, c.E / c.H)));
      for (std::int64_t b = 0; b < c.B; ++b)
        for (std::int64_t h = 0; h < c.H; ++h)
          kk::attention_head<T>(q + b * c.L * 3 * c.E, 3 * c.E, c.L, c.E, c.H, h, o + b * c.L * c.E,
                                c.E, sc.data(), block);
    };
    for (std::int64_t block : {1, 5, 16, 64}) {
      std::vector<double> out(static_cast<std::size_t>(c.B * c.L * c.E));
      run(qkv.data(), out.data(), block);
      for (std::size_t i = 0; i < out.size(); ++i)
        CHECK(out[i] == doctest::Approx(naive[i]).epsilon(1e-12));
    }
    // float: the same kernels at float precision
    std::vector<float> qf(qkv.begin(), qkv.end()), of(static_cast<std::size_t>(c.B * c.L * c.E));
    run(qf.data(), of.data(), std::int64_t{64});
    double worst = 0;
    for (std::size_t i = 0; i < of.size(); ++i)
      worst = std::max(worst, std::abs(double(of[i]) - naive[i]));
    CHECK(worst < 2e-6);
  }
}

TEST_CASE(
    "patch embedding order (c,i,k) and unpatchify order (i,k,c) invert the official patchify") {
  const std::int64_t C = 3, H = 4, W = 4, p = 2;
  std::vector<double> img(static_cast<std::size_t>(C * H * W));
  for (std::size_t i = 0; i < img.size(); ++i) img[i] = double(i);
  std::vector<double> col(img.size()), back(img.size());
  kk::patchify_conv(img.data(), C, H, W, p, col.data());
  CHECK(col[1] == img[1]);      // patch 0, c 0, i 0, k 1
  CHECK(col[4] == img[H * W]);  // patch 0, c 1, i 0, k 0
  // (i,k,c) vectors: re-order the conv patches and unpatchify back
  std::vector<double> y(img.size());
  for (std::int64_t t = 0; t < 4; ++t)
    for (std::int64_t c = 0; c < C; ++c)
      for (std::int64_t i = 0; i < p; ++i)
        for (std::int64_t k = 0; k < p; ++k)
          y[t * 12 + (i * p + k) * C + c] = col[t * 12 + (c * p + i) * p + k];
  kk::unpatchify(y.data(), 12, C, H, W, p, back.data());
  CHECK(back == img);
}

TEST_CASE("bilinear resize is the identity at the same size and interpolates half-pixel centres") {
  const std::vector<double> q = {0, 1, 2, 3};  // 2x2 grid, E = 1
  std::vector<double> same(4), up(16);
  kk::bilinear_resize(q.data(), 2, 2, 1, 2, 2, same.data());
  CHECK(same == q);
  kk::bilinear_resize(q.data(), 2, 2, 1, 4, 4, up.data());
  CHECK(up[0] == 0);                      // clamped corner
  CHECK(up[1] == doctest::Approx(0.25));  // src x = 0.25
  CHECK(up[15] == 3);
}

TEST_CASE("the official configs have the documented parameter counts") {
  const auto v1 = ud::nn::UViTConfig::official("v1");
  const auto v0 = ud::nn::UViTConfig::official("v0");
  CHECK(v1.parameters().size() == 418);
  CHECK(v0.parameters().size() == 416);
  std::int64_t n1 = 0;
  for (auto& [k, s] : v1.parameters()) n1 += s.numel();
  CHECK(n1 == 952509520);
  CHECK(v1.tokens() == 1105);
  CHECK(v0.tokens() == 1104);
}

TEST_CASE("a diffusers-named checkpoint loads and gives the same outputs as the official naming") {
  const auto f = ud::safetensors::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(f, "param/");
  ud::nn::UViT<float> a(cfg), b(cfg);
  ud::load_checkpoint(a, f, "param/");
  // write the golden weights in diffusers naming by applying the documented mapping
  const auto dir = std::filesystem::temp_directory_path() / "unidiffuser_test_ckpt";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "diffusers.safetensors").string();
  write_diffusers(a, path);
  const auto df = ud::safetensors::File::read(path);
  CHECK(ud::detect_naming(df) == ud::CheckpointNaming::diffusers);
  CHECK(df.tensors().size() == a.parameter_names().size() - 5 + 15 + 2);  // 5 blocks: qkv -> q,k,v
  ud::load_checkpoint(b, df);
  CHECK(run_native(a, f) == run_native(b, f));
  // round trip through the official writer
  const std::string p2 = (dir / "official.safetensors").string();
  ud::save_checkpoint(a, p2);
  const auto of = ud::safetensors::File::read(p2);
  ud::nn::UViT<float> c(ud::checkpoint_config(of));
  ud::load_checkpoint(c, of);
  CHECK(run_native(c, f) == run_native(a, f));
  std::filesystem::remove_all(dir);
}

TEST_CASE(
    "diffusers' attention_bias and use_timestep_embedding map to the qkv bias and time MLPs") {
  // v0_config has both options on; its diffusers file carries to_{q,k,v}.bias and
  // timestep_{img,text}_embed.linear_{1,2}
  ud::nn::UViT<float> a(unidiffuser::testing::v0_config()), b(unidiffuser::testing::v0_config());
  a.init_random(7, 0.3);
  const auto dir = std::filesystem::temp_directory_path() / "unidiffuser_test_diffusers_opts";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "d.safetensors").string();
  write_diffusers(a, path);
  const auto df = ud::safetensors::File::read(path);
  CHECK(df.contains("transformer.transformer_mid_block.attn1.to_k.bias"));
  CHECK(df.contains("timestep_text_embed.linear_2.weight"));
  CHECK(ud::detect_naming(df) == ud::CheckpointNaming::diffusers);
  ud::load_checkpoint(b, df);
  for (const auto& n : a.parameter_names()) {
    CAPTURE(n);
    const auto& x = a.param(n);
    const auto& y = b.param(n);
    CHECK(std::equal(x.data(), x.data() + x.size(), y.data()));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("UViTPredictor: per-sample data types equal one value per call, row by row") {
  ud::nn::UViT<float> net(unidiffuser::testing::v1_config());
  net.init_random(11, 0.3);
  const auto layout = net.config().layout<2>();
  constexpr std::int64_t B = 3;
  std::array<ud::Tensor<float>, 2> x, out;
  std::array<ud::TensorView<const float>, 2> xv;
  std::array<ud::TensorView<float>, 2> ov;
  for (std::size_t g = 0; g < 2; ++g) {
    x[g] = ud::Tensor<float>(ud::Shape{B, layout.size(g)});
    const auto r = random_vec(static_cast<std::size_t>(x[g].size()), 40 + g);
    std::copy(r.begin(), r.end(), x[g].data());
    out[g] = ud::Tensor<float>(ud::Shape{B, layout.size(g)});
    xv[g] = x[g].view();
    ov[g] = out[g].view();
  }
  const std::vector<double> t0{500, 20, 999}, t1{0, 700, 1000};
  const std::array<std::span<const double>, 2> t{t0, t1};
  auto run = [&](ud::nn::UViTPredictor<float, 2>& p) {
    p(ud::Context<ud::cpu>{}, xv, t, ov);
    std::array<std::vector<float>, 2> r;
    for (std::size_t g = 0; g < 2; ++g) r[g].assign(out[g].data(), out[g].data() + out[g].size());
    return r;
  };
  ud::nn::UViTPredictor<float, 2> p0(net, 0), p1(net, 1), mixed(net, 1);
  const auto a0 = run(p0), a1 = run(p1);
  mixed.set_data_types({0, 1, 0});
  const auto m = run(mixed);
  CHECK(a0[0] != a1[0]);  // the data type matters
  for (std::size_t g = 0; g < 2; ++g) {
    const auto D = static_cast<std::size_t>(layout.size(g));
    for (std::size_t b = 0; b < 3; ++b) {
      const auto& want = b == 1 ? a1[g] : a0[g];
      CHECK(std::equal(m[g].begin() + static_cast<std::ptrdiff_t>(b * D),
                       m[g].begin() + static_cast<std::ptrdiff_t>((b + 1) * D),
                       want.begin() + static_cast<std::ptrdiff_t>(b * D)));
    }
  }
  mixed.set_data_types({0, 1});  // not one per sample
  CHECK(message_of([&] { (void)run(mixed); }).find("one per sample") != std::string::npos);
  mixed.set_data_types({0});  // 3 rows: taken three times over (batched guidance rows)
  CHECK(run(mixed) == a0);
  mixed.set_data_types({});
  CHECK(run(mixed) == a1);
}

TEST_CASE("diffusers' config.json gives the official config; unsupported options are refused") {
  using Cfg = ud::nn::UViTConfig;
  // the official v1 model as diffusers' converter writes it (CHECKPOINTS.md §2)
  nlohmann::json d = {{"_class_name", "UniDiffuserModel"},
                      {"_diffusers_version", "0.19.0"},
                      {"num_attention_heads", 24},
                      {"attention_head_dim", 64},
                      {"num_layers", 30},
                      {"sample_size", 64},
                      {"patch_size", 2},
                      {"in_channels", 4},
                      {"out_channels", 4},
                      {"text_dim", 64},
                      {"clip_img_dim", 512},
                      {"num_text_tokens", 77},
                      {"attention_bias", false},
                      {"activation_fn", "gelu"},
                      {"block_type", "unidiffuser"},
                      {"pre_layer_norm", false},
                      {"use_timestep_embedding", false},
                      {"use_patch_pos_embed", false},
                      {"ff_final_dropout", true},
                      {"dropout", 0.0},
                      {"norm_num_groups", 32},
                      {"cross_attention_dim", nullptr},
                      {"num_vector_embeds", nullptr},
                      {"num_embeds_ada_norm", nullptr},
                      {"use_linear_projection", false},
                      {"only_cross_attention", false},
                      {"upcast_attention", false},
                      {"norm_type", "layer_norm"},
                      {"norm_elementwise_affine", true},
                      {"use_data_type_embedding", true}};
  CHECK(Cfg::from_json(d).custom_json() == Cfg::official("v1").custom_json());
  CHECK(Cfg::from_json(d).version == "v1");
  d["use_data_type_embedding"] = false;
  CHECK(Cfg::from_json(d).custom_json() == Cfg::official("v0").custom_json());
  // the toy v0 (qkv bias, time MLPs): the same through diffusers' keys
  const auto v0 = unidiffuser::testing::v0_config();
  nlohmann::json t = {{"num_attention_heads", 2},
                      {"attention_head_dim", 6},
                      {"num_layers", 3},
                      {"sample_size", 4},
                      {"patch_size", 2},
                      {"in_channels", 2},
                      {"text_dim", 3},
                      {"num_text_tokens", 2},
                      {"clip_img_dim", 5},
                      {"attention_bias", true},
                      {"use_timestep_embedding", true},
                      {"activation_fn", "gelu"}};
  auto toy = Cfg::from_json(t);
  toy.mlp_ratio = v0.mlp_ratio;  // diffusers' FeedForward is fixed at 4x; the toy uses 2x
  CHECK(toy.custom_json() == v0.custom_json());
  CHECK(Cfg::from_json(t).mlp_ratio == 4.0);
  // refused, naming the field
  auto refused = [&](nlohmann::json j, const std::string& field) {
    const std::string m = message_of([&] { (void)Cfg::from_json(j); });
    CAPTURE(m);
    CHECK(m.find("from_diffusers_json") != std::string::npos);
    CHECK(m.find(field) != std::string::npos);
  };
  auto with = [&](const char* k, nlohmann::json v) {
    auto j = d;
    j[k] = std::move(v);
    return j;
  };
  refused(with("pre_layer_norm", true), "pre_layer_norm");
  refused(with("block_type", "diffusers"), "block_type");
  refused(with("use_patch_pos_embed", true), "use_patch_pos_embed");
  refused(with("cross_attention_dim", 768), "cross_attention_dim");
  refused(with("out_channels", 8), "out_channels");
  refused(with("num_layers", -3), "num_layers");
  refused(with("attention_head_dim", "64"), "attention_head_dim");
  refused(with("_class_name", "UNet2DConditionModel"), "_class_name");
  auto no_act = d;
  no_act.erase("activation_fn");  // diffusers' default is geglu
  refused(no_act, "activation_fn");
  auto no_size = d;
  no_size.erase("sample_size");
  refused(no_size, "sample_size");
}

TEST_CASE(
    "a corrupted or mis-shaped checkpoint is one clear error and leaves the network untouched") {
  const auto f = ud::safetensors::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(f, "param/");
  const auto dir = std::filesystem::temp_directory_path() / "unidiffuser_test_bad";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "bad.safetensors").string();
  {
    ud::safetensors::Writer w;
    for (const auto& n : f.names("param/")) {
      const std::string name = n.substr(6);
      if (name == "norm.bias") continue;  // missing
      auto t = f.get<float>(n);
      if (name == "mid_block.attn.proj.weight") {  // mis-shaped
        w.add<float>(name, t.view().reshape(ud::Shape{t.dim(1) * t.dim(0)}));
        continue;
      }
      w.add<float>(name, t);
    }
    ud::Tensor<float> extra(ud::Shape{3});
    w.add<float>("extra.weight", extra);  // unexpected
    w.write(path);
  }
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f, "param/");
  const auto before = net.param("in_blocks.0.norm2.weight")[0];
  const std::string m =
      message_of([&] { ud::load_checkpoint(net, ud::safetensors::File::read(path)); });
  CHECK(m.find("load_checkpoint") != std::string::npos);
  CHECK(m.find("missing (1): norm.bias") != std::string::npos);
  CHECK(m.find("unexpected (1): extra.weight") != std::string::npos);
  CHECK(m.find("mid_block.attn.proj.weight (expected [64, 64], got [4096])") != std::string::npos);
  CHECK(net.param("in_blocks.0.norm2.weight")[0] == before);
  // truncated file: the safetensors layer reports it
  {
    std::ifstream in(kGolden, std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::ofstream out(path, std::ios::binary);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  }
  CHECK(message_of([&] { ud::safetensors::File::read(path); }).find("beyond the data block") !=
        std::string::npos);
  // no config anywhere
  CHECK(message_of([&] {
          ud::safetensors::Writer w;
          ud::Tensor<float> t(ud::Shape{1});
          w.add<float>("x", t);
          w.write(path);
          ud::checkpoint_config(ud::safetensors::File::read(path));
        }).find("num_heads") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("the forward gives the same outputs with any thread count and with tracing on") {
  // B >= threads runs the blocks sample-parallel, otherwise (and when traced) layer-parallel
  const auto f = ud::safetensors::File::read(kGolden);
  ud::nn::UViT<float> net(ud::checkpoint_config(f, "param/"));
  ud::load_checkpoint(net, f, "param/");
#if defined(_OPENMP)
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
#endif
  const auto ref = run_native(net, f);
  auto close = [&](const std::vector<float>& got) {
    REQUIRE(got.size() == ref.size());
    double worst = 0;
    for (std::size_t i = 0; i < ref.size(); ++i)
      worst = std::max(worst, std::abs(double(got[i]) - ref[i]) / (1 + std::abs(double(ref[i]))));
    return worst;
  };
#if defined(_OPENMP)
  for (int t : {2, 3, 4}) {
    CAPTURE(t);
    omp_set_num_threads(t);
    CHECK(close(run_native(net, f)) < 1e-5);
  }
#endif
  net.set_trace([](const std::string&, const float*, ud::Shape) {});
  CHECK(close(run_native(net, f)) < 1e-5);
  net.set_trace({});
#if defined(_OPENMP)
  omp_set_num_threads(saved);
#endif
}

TEST_CASE("a layer profile counts every product once and leaves the outputs unchanged") {
  const auto f = ud::safetensors::File::read(kGolden);
  ud::nn::UViT<float> net(ud::checkpoint_config(f, "param/"));
  ud::load_checkpoint(net, f, "param/");
  const auto ref = run_native(net, f);
  const auto B = static_cast<double>(
      f.get<float>("input/native/" + net.config().components[0].name).shape()[0]);
  const auto& cfg = net.config();
  const double L = static_cast<double>(cfg.tokens()), E = static_cast<double>(cfg.embed_dim),
               nb = static_cast<double>(2 * cfg.blocks_per_side() + 1);
  using K = ud::nn::LayerKind;
  // threads 1: sample-parallel on one thread; 2 and 3 with the batch's remainder run by the
  // whole team (each thread counts its share of those calls' products)
  for (int t : {1, 2, 3}) {
    CAPTURE(t);
    ud::nn::LayerProfile prof;
    net.set_profile(&prof);
    CHECK(run_native(net, f, ud::Context<ud::cpu>{t}) == ref);
    net.set_profile(nullptr);
    double total = 0;
    for (std::size_t k = 0; k < ud::nn::kLayerKinds; ++k) {
      const auto kind = static_cast<K>(k);
      CAPTURE(ud::nn::kLayerKindNames[k]);
      CHECK(prof.seconds(kind) > 0);
      total += prof.flop(kind);
    }
    CHECK(total == doctest::Approx(net.flops() * B).epsilon(1e-12));
    CHECK(prof.flop(K::attention) == doctest::Approx(nb * 4 * L * L * E * B).epsilon(1e-12));
    CHECK(prof.flop(K::qkv) == doctest::Approx(nb * 2 * L * E * 3 * E * B).epsilon(1e-12));
    CHECK(prof.flop(K::layer_norm) == 0);
    CHECK(prof.flop(K::embed) == doctest::Approx(net.io_flops() * B).epsilon(1e-12));
    // no profile set: nothing more is added
    const double before = prof.seconds(K::fc2);
    run_native(net, f, ud::Context<ud::cpu>{t});
    CHECK(prof.seconds(K::fc2) == before);
  }
}

TEST_CASE("packed GEMM path: same outputs as Eigen's, parameters unchanged through packing") {
  // In builds with UNIDIFFUSER_ONEDNN forward() packs copies of the block weights; param() must
  // give back the exact plain values and the outputs must match the Eigen path. In other builds
  // both runs take the Eigen path (the test then checks only that the switch is inert).
  const auto f = ud::safetensors::File::read(kGolden);
  ud::nn::UViT<float> net(ud::checkpoint_config(f, "param/"));
  ud::load_checkpoint(net, f, "param/");
  std::map<std::string, std::vector<float>> before;
  for (const auto& n : net.parameter_names())
    before[n] = std::vector<float>(net.param(n).begin(), net.param(n).end());
  MESSAGE("packed GEMM path (oneDNN) in this build: " << net.packed_gemm_available());
  CHECK(net.packed_gemm() == net.packed_gemm_available());
  const auto packed = run_native(net, f);  // packs (where available)
  bool same = true;
  for (const auto& n : net.parameter_names()) {
    const auto& p = net.param(n);  // unpacks
    same = same && std::equal(p.begin(), p.end(), before[n].begin(), before[n].end());
  }
  CHECK(same);
  net.use_packed_gemm(false);
  CHECK_FALSE(net.packed_gemm());
  const auto plain = run_native(net, f);
  REQUIRE(plain.size() == packed.size());
  double worst = 0;
  for (std::size_t i = 0; i < plain.size(); ++i)
    worst =
        std::max(worst, std::abs(double(plain[i]) - packed[i]) / (1 + std::abs(double(plain[i]))));
  CHECK(worst < 1e-5);
  net.use_packed_gemm(true);
  const auto again = run_native(net, f);  // packs again after the plain run
  CHECK(std::equal(again.begin(), again.end(), packed.begin(), packed.end()));
  // changed weights: parameters_changed() repacks the copies in their old storage, and the
  // outputs are those of a network packed from scratch with the new weights
  auto P = net.parameters();
  for (std::int64_t i = 0; i < P.size(); ++i) P[i] *= 0.75f;
  net.parameters_changed();
  const auto changed = run_native(net, f);
  ud::nn::UViT<float> fresh(net.config());
  std::copy(P.begin(), P.end(), fresh.parameters().begin());
  fresh.parameters_changed();
  CHECK(changed != packed);
  CHECK(run_native(fresh, f) == changed);
}

TEST_CASE("weights packed in place: the copies' outputs bit for bit, plain values restored") {
  // WeightPacking::in_place packs the block weights in the parameter buffer (oneDNN builds);
  // elsewhere nothing is packed and the buffer keeps the plain values throughout.
  const auto f = ud::safetensors::File::read(kGolden);
  ud::nn::UViT<float> net(ud::checkpoint_config(f, "param/"));
  ud::load_checkpoint(net, f, "param/");
  const std::vector<float> plain(net.parameters().begin(), net.parameters().end());
  const auto copies = run_native(net, f);
  net.set_weight_packing(ud::nn::WeightPacking::in_place);
  CHECK(net.weight_packing() == ud::nn::WeightPacking::in_place);
  const auto in_place = run_native(net, f);
  CHECK(in_place == copies);
  const bool packs = decltype(net)::packed_gemm_available();
  CHECK(net.weights_packed() == packs);
  const ud::nn::UViT<float>& cnet = net;
  const auto has = [](const std::string& m, const char* s) {
    return m.find(s) != std::string::npos;
  };
  // the buffer itself holds another layout (read through a pointer taken while plain)
  const float* buf = net.param("pos_embed").data() - net.parameter_offset("pos_embed");
  CHECK(run_native(net, f) == copies);  // packs again (param() above unpacked)
  CHECK(std::equal(plain.begin(), plain.end(), buf) == !packs);
  (void)net.parameters();
  CHECK_FALSE(net.weights_packed());  // parameters() (non-const) unpacked them
  CHECK(std::equal(plain.begin(), plain.end(), cnet.parameters().begin()));
  CHECK(run_native(net, f) == copies);  // packs again
  CHECK(net.weights_packed() == packs);
  if (packs) {
    const std::string m = message_of([&] { (void)cnet.param("pos_embed"); });
    CHECK(has(m, "UViT::param"));
    CHECK(has(m, "unpack_weights()"));
    CHECK_THROWS_AS((void)cnet.parameters(), ud::error);
    CHECK(cnet.parameter_shape("pos_embed").numel() > 0);  // shapes stay available
    // the training forward needs the plain weights
    ud::nn::UViT<float>::Tape tape;
    const std::string t = message_of([&] {
      std::vector<ud::Tensor<float>> xs, outs;
      ud::nn::UViTInputs<float> in;
      std::vector<ud::RowBlock<float>> ob;
      for (const auto& c : net.config().components) {
        xs.push_back(f.get<float>("input/native/" + c.name));
        outs.emplace_back(xs.back().shape());
        in.x.push_back(ud::as_rows(ud::TensorView<const float>(xs.back().view())));
        ob.push_back(ud::as_rows(outs.back().view()));
      }
      const auto ti = f.get_vector<double>("input/native/t_img"),
                 tt = f.get_vector<double>("input/native/t_text");
      const auto dt = f.get_vector<std::int64_t>("input/native/data_type");
      in.t = {ti, tt};
      in.data_type = dt;
      net.forward(ud::Context<ud::cpu>{}, in, ob, tape);
    });
    CAPTURE(t);
    CHECK(has(t, "UViT::forward (training)"));
  }
  net.unpack_weights();
  CHECK_FALSE(net.weights_packed());
  CHECK(std::equal(plain.begin(), plain.end(), cnet.parameters().begin()));
  // back to copies: the buffer is never packed again
  net.set_weight_packing(ud::nn::WeightPacking::copies);
  CHECK(run_native(net, f) == copies);
  CHECK_FALSE(net.weights_packed());
  CHECK(std::equal(plain.begin(), plain.end(), cnet.parameters().begin()));
  // the memory estimate counts no copies for in_place
  const auto& cfg = net.config();
  CHECK(ud::estimate_memory<float>(cfg, 1, 0, 0, ud::nn::WeightPacking::in_place).packed == 0);
  CHECK(ud::estimate_memory<float>(cfg, 1, 0, 0, ud::nn::WeightPacking::none).packed == 0);
  CHECK((ud::estimate_memory<float>(cfg, 1).packed > 0) == packs);
}

#if defined(UNIDIFFUSER_WITH_ONEDNN)
// The largest |got - want| / (1 + |want|) over the m x n outputs of a product written with row
// stride ldy, want(i, j) the expected value; the padding between rows must still hold y0.
template <class Want>
double worst_linear_error(const std::vector<float>& got, const std::vector<float>& y0,
                          std::int64_t m, std::int64_t n, std::int64_t ldy, Want want) {
  double worst = 0;
  for (std::int64_t i = 0; i < m; ++i)
    for (std::int64_t j = 0; j < ldy; ++j) {
      const auto at = static_cast<std::size_t>(i * ldy + j);
      if (j >= n) {  // padding between rows is not written
        REQUIRE(got[at] == y0[at]);
        continue;
      }
      const double w = want(i, j);
      worst = std::max(worst, std::abs(double(got[at]) - w) / (1 + std::abs(w)));
    }
  return worst;
}

TEST_CASE("oneDNN linear on packed weights equals the Eigen linear (bias, GELU, accumulate)") {
  ud::onednn::Gemm gemm;
  int packed_cases = 0;
  // (m, k, n, pieces, ldx pad, ldy pad)
  for (auto [m, k, n, pieces, px, py] :
       std::vector<std::array<std::int64_t, 6>>{{1, 64, 128, 1, 0, 0},
                                                {37, 96, 192, 1, 5, 3},
                                                {337, 128, 64, 2, 0, 0},
                                                {5, 32, 16, 1, 0, 0}}) {
    CAPTURE(m);
    CAPTURE(k);
    CAPTURE(n);
    const std::int64_t ldx = k + px, ldy = n + py, ldw = k * pieces;
    const auto wd = random_vec(static_cast<std::size_t>(n * ldw), 11),
               xd = random_vec(static_cast<std::size_t>(m * ldx), 12),
               bd = random_vec(static_cast<std::size_t>(n), 13),
               yd = random_vec(static_cast<std::size_t>(m * ldy), 14);
    std::vector<float> w(wd.begin(), wd.end()), x(xd.begin(), xd.end()), b(bd.begin(), bd.end()),
        y0(yd.begin(), yd.end());
    const std::vector<float> plain = w;
    const bool ok = gemm.pack(w.data(), n, k, pieces);
    packed_cases += ok ? 1 : 0;
    if (!ok) {  // the layout would not fit (n = 16 on AVX-512 CPUs): refused, untouched
      CHECK(w == plain);
      continue;
    }
    for (std::int64_t piece = 0; piece < pieces; ++piece)
      for (auto post :
           {ud::onednn::Post::none, ud::onednn::Post::gelu, ud::onednn::Post::accumulate}) {
        CAPTURE(piece);
        CAPTURE(static_cast<int>(post));
        std::vector<float> want = y0, got = y0;
        kk::linear(x.data(), m, k, ldx, plain.data() + piece * k, n, ldw, b.data(), want.data(),
                   ldy, post == ud::onednn::Post::accumulate);
        if (post == ud::onednn::Post::gelu)
          for (std::int64_t i = 0; i < m; ++i) kk::gelu(want.data() + i * ldy, n);
        gemm.linear(x.data(), m, k, ldx, w.data() + piece * n * k, n, b.data(), got.data(), ldy,
                    post);
        CHECK(worst_linear_error(got, y0, m, n, ldy, [&](std::int64_t i, std::int64_t j) {
                return double(want[static_cast<std::size_t>(i * ldy + j)]);
              }) < 2e-5);
      }
    gemm.unpack(w.data(), n, k, pieces);
    CHECK(w == plain);
  }
  CHECK(packed_cases >= 3);
  // copies (LinearCache's fp32 entries): any n and k, padded to the layout's blocks, reordered
  // from a strided plain weight
  for (auto [m, k, n] :
       std::vector<std::array<std::int64_t, 3>>{{7, 40, 80}, {3, 32, 16}, {84, 128, 96}}) {
    CAPTURE(m);
    CAPTURE(k);
    CAPTURE(n);
    const std::int64_t ldw = k + 3;
    const auto wd = random_vec(static_cast<std::size_t>(n * ldw), 21),
               xd = random_vec(static_cast<std::size_t>(m * k), 22),
               bd = random_vec(static_cast<std::size_t>(n), 23);
    const std::vector<float> w(wd.begin(), wd.end()), x(xd.begin(), xd.end()),
        b(bd.begin(), bd.end());
    CHECK(gemm.packed_bytes(n, k) >= static_cast<std::size_t>(n * k) * 4);
    std::vector<float> packed(gemm.packed_bytes(n, k) / 4);
    gemm.pack_copy(w.data(), n, k, ldw, packed.data());
    std::vector<float> want(static_cast<std::size_t>(m * n)), got = want;
    kk::linear(x.data(), m, k, k, w.data(), n, ldw, b.data(), want.data(), n, false);
    gemm.linear(x.data(), m, k, k, packed.data(), n, b.data(), got.data(), n,
                ud::onednn::Post::none);
    CHECK(worst_linear_error(got, got, m, n, n, [&](std::int64_t i, std::int64_t j) {
            return double(want[static_cast<std::size_t>(i * n + j)]);
          }) < 2e-5);
  }
}
#endif

TEST_CASE("bf16 math: copies and in place agree; in place halves and rounds the block weights") {
  const ud::Context<ud::cpu> b16{0, ud::MathMode::bf16};
  if (!ud::ops::math_supported(b16, ud::MathMode::bf16)) {
    MESSAGE("bf16 not checked: this build or CPU has no bf16 products (fp32 runs instead)");
    return;
  }
  const auto f = ud::safetensors::File::read(kGolden);
  ud::nn::UViT<float> net(ud::checkpoint_config(f, "param/"));
  ud::load_checkpoint(net, f, "param/");
  const std::vector<float> plain(net.parameters().begin(), net.parameters().end());
  const auto fp32 = run_native(net, f);
  const auto copies = run_native(net, f, b16);
  // bf16 ran (outputs differ from fp32) and is close (the golden checker holds the bound)
  double d = 0, n = 0;
  for (std::size_t i = 0; i < fp32.size(); ++i)
    d += (double(copies[i]) - fp32[i]) * (double(copies[i]) - fp32[i]),
        n += double(fp32[i]) * fp32[i];
  CHECK(d > 0);
  CHECK(std::sqrt(d / n) < 1e-2);
  CHECK(run_native(net, f) == fp32);  // the fp32 entries are kept beside the bf16 ones
  CHECK(std::equal(plain.begin(), plain.end(), net.parameters().begin()));  // copies: untouched
  net.set_weight_packing(ud::nn::WeightPacking::in_place);
  CHECK(run_native(net, f, b16) == copies);
  CHECK(net.weights_packed());
  net.unpack_weights();
  // block weights: their bf16 roundings; everything else: unchanged
  const ud::nn::UViT<float>& cnet = net;
  for (const auto& name : net.parameter_names()) {
    CAPTURE(name);
    const auto p = cnet.param(name);
    const auto off = static_cast<std::size_t>(net.parameter_offset(name));
    // in_blocks.*, mid_block, out_blocks.*: qkv, proj, fc1, fc2, skip_linear
    const bool block = name.find("block") != std::string::npos &&
                       name.find(".weight") != std::string::npos &&
                       name.find("norm") == std::string::npos;
    bool ok = true;
    for (std::int64_t i = 0; i < p.size(); ++i) {
      const float v = plain[off + static_cast<std::size_t>(i)];
      const float want = block ? ud::bfloat16_t::from_float(v).to_float() : v;
      ok = ok && p.data()[i] == want;
    }
    CHECK(ok);
  }
  // the rounded weights give the same bf16 outputs again, and fp32 runs after bf16 in place
  CHECK(run_native(net, f, b16) == copies);
  const auto after = run_native(net, f);  // fp32 in place now, on the rounded weights
  CHECK(net.weights_packed());
  d = 0;
  for (std::size_t i = 0; i < fp32.size(); ++i)
    d += (double(after[i]) - fp32[i]) * (double(after[i]) - fp32[i]);
  CHECK(d > 0);
  CHECK(std::sqrt(d / n) < 1e-2);
}

#if defined(UNIDIFFUSER_WITH_ONEDNN)
TEST_CASE("oneDNN bf16 linear: the fp32 product of the bf16-rounded operands") {
  ud::onednn::Gemm gemm;
  if (!gemm.bf16()) {
    MESSAGE("bf16 not checked: this CPU has no bf16 instructions for oneDNN");
    return;
  }
  const auto r16 = [](float v) { return double(ud::bfloat16_t::from_float(v).to_float()); };
  // (m, k, n, ldx pad, ldy pad)
  for (auto [m, k, n, px, py] : std::vector<std::array<std::int64_t, 5>>{
           {1, 64, 128, 0, 0}, {37, 96, 192, 5, 3}, {337, 128, 64, 0, 0}, {5, 32, 16, 0, 7}}) {
    CAPTURE(m);
    CAPTURE(k);
    CAPTURE(n);
    const std::int64_t ldx = k + px, ldy = n + py, ldw = k + 3;
    const auto wd = random_vec(static_cast<std::size_t>(n * ldw), 21),
               xd = random_vec(static_cast<std::size_t>(m * ldx), 22),
               bd = random_vec(static_cast<std::size_t>(n), 23),
               yd = random_vec(static_cast<std::size_t>(m * ldy), 24);
    std::vector<float> w(wd.begin(), wd.end()), x(xd.begin(), xd.end()), b(bd.begin(), bd.end()),
        y0(yd.begin(), yd.end());
    std::vector<char> packed(gemm.packed16_bytes(n, k));
    gemm.pack16(w.data(), n, k, ldw, packed.data());
    std::vector<float> back(static_cast<std::size_t>(n * ldw), -1.f);
    gemm.unpack16(packed.data(), n, k, back.data(), ldw);
    bool rounded = true;  // pack16 rounds to nearest even, unpack16 widens exactly
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t p = 0; p < k; ++p)
        rounded = rounded && back[static_cast<std::size_t>(j * ldw + p)] ==
                                 float(r16(w[static_cast<std::size_t>(j * ldw + p)]));
    CHECK(rounded);
    for (auto post :
         {ud::onednn::Post::none, ud::onednn::Post::gelu, ud::onednn::Post::accumulate}) {
      CAPTURE(static_cast<int>(post));
      std::vector<float> got = y0;
      gemm.linear16(x.data(), m, k, ldx, packed.data(), n, b.data(), got.data(), ldy, post);
      const double worst =
          worst_linear_error(got, y0, m, n, ldy, [&](std::int64_t i, std::int64_t j) {
            double acc = b[static_cast<std::size_t>(j)];
            for (std::int64_t p = 0; p < k; ++p)
              acc += r16(x[static_cast<std::size_t>(i * ldx + p)]) *
                     r16(w[static_cast<std::size_t>(j * ldw + p)]);
            if (post == ud::onednn::Post::gelu)
              acc = 0.5 * acc * (1 + std::erf(acc / std::sqrt(2.0)));
            if (post == ud::onednn::Post::accumulate)
              acc += y0[static_cast<std::size_t>(i * ldy + j)];
            return acc;
          });
      CHECK(worst < 2e-5);  // fp32 accumulation of exact bf16 products
    }
  }
}

TEST_CASE("packed linear: one whole-width product per sample equals the column chunks' products") {
  // n = 320: chunks of 128, 128 and 64 columns. 3 samples on 2 threads run per chunk (the
  // samples alone would leave a thread idle), on one thread per whole sample; a two-piece
  // matrix (skip_linear's shape), packed as copies and in place; fp32 and bf16
  constexpr std::int64_t S = 3, m = 37, k = 96, n = 320;
  const auto wd = random_vec(static_cast<std::size_t>(n * 2 * k), 31),
             xd = random_vec(static_cast<std::size_t>(S * m * k), 32),
             bd = random_vec(static_cast<std::size_t>(n), 33);
  const std::vector<float> w0(wd.begin(), wd.end()), x(xd.begin(), xd.end()),
      b(bd.begin(), bd.end());
  const ud::BatchBlock<const float> xb(x.data(), S, m, k, k, m * k);
  for (const auto math : ud::testing::cpu_math_modes())
    for (bool in_place : {false, true}) {
      CAPTURE(static_cast<int>(math));
      CAPTURE(in_place);
      const ud::Context<ud::cpu> one{1, math}, two{2, math};
      std::vector<float> w = w0;
      ud::ops::LinearCache<float, ud::cpu> cache;
      const ud::RowBlock<const float> piece0(w.data(), n, k, 2 * k),
          piece1(w.data() + k, n, k, 2 * k);
      if (in_place) {
        const ud::ops::InPlaceWeight<float, ud::cpu> m2{
            ud::RowBlock<float>(w.data(), n, 2 * k, 2 * k), 2};
        cache.pack_in_place(std::span(&m2, 1), math);
      } else {
        const std::array<ud::RowBlock<const float>, 2> ws{piece0, piece1};
        cache.prepare(ws, math);
      }
      for (const auto& piece : {piece0, piece1}) {
        const auto* e = cache.find(piece.data, math);
        REQUIRE(e != nullptr);
        CHECK(e->whole);
        for (auto ep :
             {ud::ops::Epilogue::none, ud::ops::Epilogue::gelu, ud::ops::Epilogue::accumulate}) {
          CAPTURE(static_cast<int>(ep));
          std::vector<float> a(static_cast<std::size_t>(S * m * n), 0.5f), c = a;
          ud::ops::linear<float>(one, xb, piece, b.data(),
                                 ud::BatchBlock<float>(a.data(), S, m, n, n, m * n), ep, &cache);
          ud::ops::linear<float>(two, xb, piece, b.data(),
                                 ud::BatchBlock<float>(c.data(), S, m, n, n, m * n), ep, &cache);
          CHECK(a == c);
        }
      }
      if (in_place) {
        cache.unpack_in_place();
        // fp32 in place unpacks to the plain values exactly, bf16 to their roundings
        bool back = true;
        for (std::size_t i = 0; i < w.size(); ++i)
          back = back && w[i] == (math == ud::MathMode::fp32
                                      ? w0[i]
                                      : ud::bfloat16_t::from_float(w0[i]).to_float());
        CHECK(back);
      }
    }
}
#endif

TEST_CASE("forward rejects wrong input shapes, times and data types") {
  ud::nn::UViT<float> net(
      ud::nn::UViTConfig::official("v1", 8, 4, 2, 32, 2, 2, 4.0, false, false, 8, 6, 12));
  ud::Tensor<float> img(ud::Shape{2, 4, 8, 8}), clip(ud::Shape{2, 1, 12}), text(ud::Shape{2, 6, 8});
  ud::Tensor<float> oi(ud::Shape{2, 4, 8, 8}), oc(ud::Shape{2, 1, 12}), ot(ud::Shape{2, 5, 8});
  std::vector<double> t2{1, 2};
  std::vector<std::int64_t> dt{1, 3};
  ud::nn::UViTInputs<float> in;
  in.x = {ud::as_rows(ud::TensorView<const float>(text.view())),
          ud::as_rows(ud::TensorView<const float>(clip.view())),
          ud::as_rows(ud::TensorView<const float>(img.view()))};
  in.t = {t2, t2};
  in.data_type = dt;
  std::vector<ud::RowBlock<float>> o{ud::as_rows(ot.view()), ud::as_rows(oc.view()),
                                     ud::as_rows(oi.view())};
  CHECK(message_of([&] { net.forward({}, in, o); }).find("out[text]") != std::string::npos);
  ud::Tensor<float> ot2(ud::Shape{2, 6, 8});
  o[0] = ud::as_rows(ot2.view());
  CHECK(message_of([&] { net.forward({}, in, o); }).find("data_type") != std::string::npos);
  dt[1] = 0;
  net.forward({}, in, o);  // now valid
  CHECK_THROWS_AS(ud::nn::UViTConfig::official("v2"), ud::error);
  CHECK_THROWS_AS(ud::nn::UViTConfig::official("v1", 8, 4, 2, 30, 2, 4), ud::error);  // 30 % 4 != 0
}
