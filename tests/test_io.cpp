// SPDX-License-Identifier: Apache-2.0
// Reliability of the I/O layer: zero-element tensors, overflowing shapes, non-regular files, the
// atomic writer under concurrency, and checkpoint hardening (config bounds, network-free checks,
// memory estimates, non-finite weights).
#include <doctest/doctest.h>

#include <sys/stat.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <new>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit.hpp"

#include "support.hpp"

// The largest single allocation since the last reset: lets a test show that a hostile config is
// refused without allocating anything of its size. The replacements pair malloc with free (GCC
// cannot see that every operator new of the program is replaced as well).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
namespace {
std::atomic<std::size_t> g_largest_alloc{0};
void note_alloc(std::size_t n) {
  std::size_t cur = g_largest_alloc.load(std::memory_order_relaxed);
  while (n > cur && !g_largest_alloc.compare_exchange_weak(cur, n, std::memory_order_relaxed)) {
  }
}
}  // namespace

void* operator new(std::size_t n) {
  note_alloc(n);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  note_alloc(n);
  const auto al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al + (n ? 0 : al))) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  std::free(p);
}

namespace ud = unidiffuser;
namespace st = unidiffuser::safetensors;
using ud::testing::message_of;

namespace {
const std::string kGolden = std::string(UNIDIFFUSER_GOLDEN_DIR) + "/uvit_v1_tiny.safetensors";

bool has(const std::string& m, const std::string& part) {
  if (m.find(part) != std::string::npos) return true;
  MESSAGE("'" << part << "' not in: " << m);
  return false;
}

// A safetensors image with the given JSON header and `data` bytes of zeros.
std::vector<unsigned char> raw_file(const std::string& header, std::size_t data) {
  std::vector<unsigned char> b(8 + header.size() + data, 0);
  const std::uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

std::vector<char> bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A scratch directory removed at the end of the test.
struct TempDir {
  std::filesystem::path dir;
  explicit TempDir(const std::string& name)
      : dir(std::filesystem::temp_directory_path() /
            (name + "-" + std::to_string(static_cast<long>(::getpid())))) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() { std::filesystem::remove_all(dir); }
  std::string operator/(const std::string& f) const { return (dir / f).string(); }
  std::set<std::string> listing() const {
    std::set<std::string> s;
    for (const auto& e : std::filesystem::directory_iterator(dir))
      s.insert(e.path().filename().string());
    return s;
  }
};

// The golden checkpoint's weights (names without "param/") written through `edit`, which may
// replace the data of a tensor before it is added.
template <class Edit>
void write_golden_copy(const st::File& g, const std::string& path, Edit edit) {
  st::Writer w;
  for (const auto& n : g.names("param/")) {
    auto t = g.get<float>(n);
    const std::string name = n.substr(6);
    if (!edit(w, name, t)) w.add<float>(name, t);
  }
  w.metadata("config", g.metadata("config"));
  w.write(path);
}

ud::nn::UViTConfig golden_config_with(const std::string& key, const nlohmann::json& value) {
  const auto g = st::File::read(kGolden);
  auto j = nlohmann::json::parse(g.metadata("config"));
  j[key] = value;
  return ud::checkpoint_config_from(j, g, "param/");
}
}  // namespace

TEST_CASE("Shape rejects extents whose non-zero product overflows int64, zero extent or not") {
  const std::int64_t big = std::int64_t{1} << 62;
  CHECK(has(message_of([&] { ud::Shape{big, 2, 0}; }), "int64"));
  CHECK(has(message_of([&] { ud::Shape{0, big, 2}; }), "Shape"));
  CHECK_THROWS_AS((ud::Shape{3037000500, 3037000500}), ud::error);  // > 2^63 - 1
  const std::vector<std::int64_t> r{big, 2, 0};
  CHECK(has(message_of([&] { ud::Shape::from_range(r.begin(), r.end(), "t"); }), "Shape: t"));
  const ud::Shape ok{big, 1, 0};
  CHECK(ok.numel() == 0);
  CHECK(ok.inner() == 0);
  CHECK((ud::Shape{big / 2, 2}).numel() == big);
  CHECK((ud::Shape{3037000499, 3037000499}).numel() == std::int64_t{3037000499} * 3037000499);
}

TEST_CASE("safetensors: zero-element tensors read, convert and round-trip through the writer") {
  TempDir d("unidiffuser_test_io_zero");
  const std::string path = d / "zero.safetensors";
  ud::Tensor<float> empty(ud::Shape{0});
  ud::Tensor<double> empty2(ud::Shape{3, 0});
  ud::Tensor<float> one(ud::Shape{2});
  one[0] = 1.5f;
  one[1] = -2.0f;
  st::Writer w;
  w.add<float>("a", empty).add<double>("b", empty2).add<float>("c", one);
  w.add_converted("d", empty.view(), ud::dtype::bf16);
  w.write(path);
  const auto f = st::File::read(path);
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.info("a").numel() == 0);
  CHECK(f.info("b").shape == std::vector<std::int64_t>{3, 0});
  CHECK(f.get<float>("a").size() == 0);
  CHECK(f.get<double>("b").shape() == (ud::Shape{3, 0}));
  CHECK(f.get<float>("b").size() == 0);  // converting path
  CHECK(f.get_vector<double>("a").empty());
  CHECK(f.get_vector<float>("d").empty());
  ud::Tensor<float> into(ud::Shape{3, 0});
  f.get_into<float>("b", into.view());
  CHECK(f.get_vector<float>("c") == std::vector<float>{1.5f, -2.0f});

  // in memory: a huge but zero-element shape is accepted while its non-zero extents fit in int64
  const std::int64_t big = std::int64_t{1} << 61;
  const auto g = st::File::parse(
      raw_file(
          R"({"z":{"dtype":"F32","shape":[)" + std::to_string(big) +
              R"(,2,0],"data_offsets":[0,0]},"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
          1),
      "mem");
  CHECK(g.info("z").numel() == 0);
  CHECK(g.get_vector<double>("z").empty());
  CHECK(g.get<float>("z").shape() == (ud::Shape{big, 2, 0}));
  // ... and refused, naming file, tensor and shape, once they do not
  const std::string m = message_of([] {
    st::File::parse(raw_file(R"({"huge":{"dtype":"F32","shape":[4611686018427387904,2,0],)"
                             R"("data_offsets":[0,0]}})",
                             0),
                    "mem.safetensors");
  });
  CHECK(has(m, "mem.safetensors: huge"));
  CHECK(has(m, "[4611686018427387904,2,0]"));
  CHECK(has(m, "int64"));
}

TEST_CASE("safetensors::read refuses what is not a regular file") {
  TempDir d("unidiffuser_test_io_dir");
  CHECK(has(message_of([&] { st::File::read(d.dir.string()); }), "not a regular file"));
  CHECK(has(message_of([] { st::File::read("/dev/null"); }), "not a regular file"));
  REQUIRE(::mkfifo((d / "fifo").c_str(), 0600) == 0);  // no writer: opening must not block
  CHECK(has(message_of([&] { st::File::read(d / "fifo"); }), "not a regular file"));
  CHECK(has(message_of([&] { st::File::read(d / "missing"); }), "cannot open"));
  // an empty regular file is read (0 bytes) and refused by the parser
  std::ofstream(d / "empty").close();
  CHECK(has(message_of([&] { st::File::read(d / "empty"); }), "shorter than the 8-byte"));
}

TEST_CASE("safetensors::Writer is atomic: concurrent writers, failures leave nothing behind") {
  TempDir d("unidiffuser_test_io_atomic");
  const std::string path = d / "shared.safetensors";
  // two different contents, and the exact bytes each produces on its own
  st::Writer a, b;
  ud::Tensor<float> ta(ud::Shape{64});
  ud::Tensor<double> tb(ud::Shape{3, 5});
  for (std::int64_t i = 0; i < ta.size(); ++i) ta[i] = static_cast<float>(i) * 0.5f;
  for (std::int64_t i = 0; i < tb.size(); ++i) tb[i] = -static_cast<double>(i);
  a.add<float>("w", ta).metadata("who", "a");
  b.add<double>("w", tb).add<double>("v", tb).metadata("who", "b");
  a.write(d / "a.ref");
  b.write(d / "b.ref");
  const auto ref_a = bytes_of(d / "a.ref"), ref_b = bytes_of(d / "b.ref");
  REQUIRE(ref_a != ref_b);

  std::atomic<bool> stop{false};
  std::atomic<int> reads{0}, bad_reads{0};
  auto writer = [&](const st::Writer& w) {
    for (int k = 0; k < 40; ++k) w.write(path);
  };
  std::thread reader([&] {
    while (!stop.load()) {
      if (!std::filesystem::exists(path)) continue;
      try {
        const auto f = st::File::read(path);
        const std::string who = f.metadata("who");
        if (who != "a" && who != "b") ++bad_reads;
        ++reads;
      } catch (const ud::error&) {
        ++bad_reads;
      }
    }
  });
  std::thread t1(writer, std::cref(a)), t2(writer, std::cref(b));
  t1.join();
  t2.join();
  stop = true;
  reader.join();
  CHECK(bad_reads.load() == 0);
  MESSAGE("concurrent reads: " << reads.load());
  const auto final_bytes = bytes_of(path);
  CHECK((final_bytes == ref_a || final_bytes == ref_b));
  CHECK(d.listing() == std::set<std::string>{"a.ref", "b.ref", "shared.safetensors"});
  struct stat sb {};
  REQUIRE(::stat(path.c_str(), &sb) == 0);
  CHECK((sb.st_mode & 0777) == 0644);

  // a missing directory: an error naming the path, nothing created anywhere
  const std::string nowhere = d / "no/such/dir/x.safetensors";
  CHECK(has(message_of([&] { a.write(nowhere); }), nowhere));
  CHECK(d.listing() == std::set<std::string>{"a.ref", "b.ref", "shared.safetensors"});
  // the destination is a directory: rename fails, the directory and its content are untouched
  std::filesystem::create_directories(d / "dest");
  std::ofstream(d / "dest/keep").put('k');
  CHECK(has(message_of([&] { a.write(d / "dest"); }), "cannot move the finished file"));
  CHECK(std::filesystem::is_directory(d / "dest"));
  CHECK(bytes_of(d / "dest/keep") == std::vector<char>{'k'});
  CHECK(d.listing() == std::set<std::string>{"a.ref", "b.ref", "dest", "shared.safetensors"});
}

TEST_CASE("hostile config metadata is refused before anything of its size is allocated") {
  const auto g = st::File::read(kGolden);
  const auto hostile = [&](const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(g.metadata("config"));
    j[key] = value;
    g_largest_alloc = 0;
    const std::string m = message_of([&] {
      const auto cfg = ud::checkpoint_config_from(j, g, "param/");
      ud::check_config_bounds(cfg);
    });
    CHECK(g_largest_alloc.load() < (std::size_t{1} << 20));
    return m;
  };
  std::string m = hostile("embed_dim", std::int64_t{1} << 26);
  CHECK(has(m, "check_config_bounds: embed_dim"));
  CHECK(has(m, "expected [1, 1048576], got 67108864"));
  m = hostile("num_text_tokens", std::int64_t{1} << 40);
  CHECK(has(m, "text.length"));
  CHECK(has(m, "got 1099511627776"));
  CHECK(has(hostile("num_text_tokens", std::int64_t{1} << 50), "num_text_tokens"));
  CHECK(has(hostile("mlp_ratio", 1e300), "mlp_ratio"));
  CHECK(has(hostile("depth", 100000), "depth"));
  CHECK(has(hostile("img_size", 1 << 20), "img.size"));
  CHECK(has(hostile("version", 5), "version"));
  CHECK(has(hostile("qkv_bias", "yes"), "qkv_bias"));
  CHECK(has(hostile("embed_dim", 8.5), "embed_dim"));
  // not an object / no config at all
  CHECK(has(message_of([&] {
              ud::checkpoint_config_from(nlohmann::json::array({1, 2}), g);
            }),
            "must be a JSON object"));
  // within every extent bound but too many parameters in total (2^45)
  m = message_of([] {
    ud::check_config_bounds(ud::nn::UViTConfig::official("v1", 64, 4, 2, 65536, 1000, 64));
  });
  CHECK(has(m, "check_config_bounds: parameters"));
  CHECK(has(m, "<= 1099511627776"));
  // the official models pass
  CHECK_NOTHROW(ud::check_config_bounds(ud::nn::UViTConfig::official("v1")));
  CHECK_NOTHROW(ud::check_config_bounds(ud::checkpoint_config(g, "param/")));
}

TEST_CASE("check_checkpoint lists every mismatch between a config and a file without a network") {
  const auto g = st::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(g, "param/");
  CHECK_NOTHROW(ud::check_checkpoint(cfg, g, "param/"));
  CHECK_NOTHROW(ud::check_checkpoint(cfg, g, "param/", ud::CheckpointNaming::official));
  // depth 6 instead of 4: the in/out blocks 2 are missing; clip_img_dim 13: three mis-shaped
  auto j = nlohmann::json::parse(g.metadata("config"));
  j["depth"] = 6;
  j["clip_img_dim"] = 13;
  const auto wrong = ud::checkpoint_config_from(j, g, "param/");
  std::size_t block2 = 0;
  for (const auto& [n, s] : wrong.parameters())
    if (n.rfind("in_blocks.2.", 0) == 0 || n.rfind("out_blocks.2.", 0) == 0) ++block2;
  REQUIRE(block2 > 0);
  const std::string m = message_of([&] { ud::check_checkpoint(wrong, g, "param/"); });
  CHECK(has(m, "check_checkpoint: "));
  CHECK(has(m, "missing (" + std::to_string(block2) + "): param/in_blocks.2.norm2.weight"));
  CHECK(has(m, "param/out_blocks.2.skip_linear.bias"));
  CHECK(has(m, "mis-shaped (3): "));
  CHECK(has(m, "param/clip_img_embed.weight (expected [64, 13], got [64, 12])"));
  CHECK(has(m, "param/clip_img_out.bias (expected [13], got [12])"));
  CHECK(m.find("unexpected") == std::string::npos);
  // a smaller config: the surplus tensors are unexpected; an integer tensor is refused
  j = nlohmann::json::parse(g.metadata("config"));
  j["depth"] = 2;
  const std::string m2 =
      message_of([&] { ud::check_checkpoint(ud::checkpoint_config_from(j, g), g, "param/"); });
  CHECK(has(m2, "unexpected ("));
  CHECK(has(m2, "param/in_blocks.1.attn.qkv.weight"));
  TempDir d("unidiffuser_test_io_ckpt");
  write_golden_copy(g, d / "int.safetensors", [](st::Writer& w, const std::string& n, auto& t) {
    if (n != "norm.bias") return false;
    ud::Tensor<std::int64_t> i(t.shape());
    std::fill(i.begin(), i.end(), 1);
    w.add<std::int64_t>(n, i);
    return true;
  });
  CHECK(has(message_of([&] { ud::check_checkpoint(cfg, st::File::read(d / "int.safetensors")); }),
            "norm.bias (integer dtype I64)"));
  // hostile config: refused by the bounds before any comparison
  CHECK(has(message_of([&] {
              ud::check_checkpoint(golden_config_with("embed_dim", std::int64_t{1} << 26), g,
                                   "param/");
            }),
            "check_config_bounds: embed_dim"));
}

TEST_CASE("estimate_memory bounds the parameters and grows with the batch; check_memory_fits") {
  const auto g = st::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(g, "param/");
  const ud::nn::UViT<float> net(cfg);
  const auto param_bytes = static_cast<std::uint64_t>(net.parameter_count()) * sizeof(float);
  ud::MemoryEstimate prev{};
  for (std::int64_t b = 1; b <= 16; b *= 2) {
    const auto e = ud::estimate_memory<float>(cfg, b);
    CHECK(e.parameters == param_bytes);
    CHECK(e.total == e.parameters + e.packed + e.workspace);
    CHECK(e.total >= param_bytes);
    // at least x, tmp, attn, qkv and the MLP hidden of every token of every sample
    const auto L = static_cast<std::uint64_t>(cfg.tokens()),
               E = static_cast<std::uint64_t>(cfg.embed_dim),
               H = static_cast<std::uint64_t>(cfg.hidden());
    CHECK(e.workspace >= static_cast<std::uint64_t>(b) * L * (6 * E + H) * sizeof(float));
    CHECK(e.workspace > prev.workspace);
    prev = e;
  }
  const auto d = ud::estimate_memory<double>(cfg, 4), f = ud::estimate_memory<float>(cfg, 4);
  CHECK(d.parameters == 2 * f.parameters);
  CHECK(d.workspace > f.workspace);
  // a larger latent needs more; an absurd batch saturates instead of overflowing
  CHECK(ud::estimate_memory<float>(cfg, 4, 16, 16).workspace > f.workspace);
  const auto huge = ud::estimate_memory<float>(cfg, std::numeric_limits<std::int64_t>::max());
  CHECK(huge.total == std::numeric_limits<std::uint64_t>::max());
  CHECK_THROWS_AS(ud::estimate_memory<float>(cfg, 0), ud::error);
  CHECK_THROWS_AS(ud::estimate_memory<float>(cfg, 1, 1 << 17, 1 << 17), ud::error);
  // the official v1 model in float32, batch 1: the 3.8 GB of weights plus a workspace
  const auto official = ud::estimate_memory<float>(ud::nn::UViTConfig::official("v1"), 1);
  CHECK(official.parameters == 952509520ull * 4);
  CHECK(official.workspace > 1105ull * 1536 * 4 * 6);
  // oneDNN builds keep packed copies of the block weights: 31 blocks x (4 E^2 + 2 H E) + 15 skip
  // linears x 2 E^2, E = 1536, H = 4 E (about 3.5 GiB), and at most the chunks' alignment more;
  // the double network packs nothing
  if constexpr (ud::ops::LinearCache<float, ud::cpu>::available) {
    const std::uint64_t exact = (31ull * 12 * 1536 * 1536 + 15ull * 2 * 1536 * 1536) * 4;
    CHECK(official.packed >= exact);
    CHECK(official.packed <= exact + exact / 1000);
    CHECK(official.packed < official.parameters);
  } else {
    CHECK(official.packed == 0);
  }
  CHECK(d.packed == 0);

  CHECK(ud::available_memory_bytes() > 0);  // Linux: MemAvailable
  CHECK_NOTHROW(ud::check_memory_fits(f, "tiny", f.total));
  CHECK_NOTHROW(ud::check_memory_fits(huge, "unknown", 0));  // 0 = unknown: no verdict
  const std::string m = message_of([&] { ud::check_memory_fits(official, "v1 batch 1", 1 << 30); });
  CHECK(has(m, "check_memory_fits: v1 batch 1: needs "));
  CHECK(has(m, ud::ops::LinearCache<float, ud::cpu>::available
                   ? " MiB (parameters 3634 MiB + packed weights "
                   : " MiB (parameters 3634 MiB + workspace "));
  CHECK(has(m, "only 1024 MiB available"));
}

TEST_CASE("load_checkpoint refuses non-finite weights unless asked, leaving the net untouched") {
  const auto g = st::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(g, "param/");
  TempDir d("unidiffuser_test_io_nan");
  const std::string path = d / "nan.safetensors";
  write_golden_copy(g, path, [](st::Writer& w, const std::string& n, auto& t) {
    if (n == "mid_block.mlp.fc1.weight") {
      t[7] = std::numeric_limits<float>::quiet_NaN();
      t[9] = -std::numeric_limits<float>::infinity();
    } else if (n == "norm.weight") {
      // finite in float64, infinite once converted to float32
      ud::Tensor<double> v(t.shape());
      for (std::int64_t i = 0; i < v.size(); ++i) v[i] = t[i];
      v[3] = 1e300;
      w.add<double>(n, v);
      return true;
    }
    return false;
  });
  const auto f = st::File::read(path);
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, g, "param/");
  std::vector<std::vector<float>> before;
  for (const auto& n : net.parameter_names())
    before.emplace_back(net.param(n).begin(), net.param(n).end());
  const std::string m = message_of([&] { ud::load_checkpoint(net, f); });
  CHECK(has(m, "load_checkpoint: " + path + ": non-finite weights (NaN or Inf) in 2 tensor(s)"));
  CHECK(has(m, "mid_block.mlp.fc1.weight (2 non-finite, first at index 7)"));
  CHECK(has(m, "norm.weight (1 non-finite, first at index 3)"));
  std::size_t k = 0;
  bool same = true;
  for (const auto& n : net.parameter_names())
    same = same && std::vector<float>(net.param(n).begin(), net.param(n).end()) == before[k++];
  CHECK(same);
  // in float64 the 1e300 is finite: only the NaN/Inf tensor is named
  ud::nn::UViT<double> net64(cfg);
  const std::string m64 = message_of([&] { ud::load_checkpoint(net64, f); });
  CHECK(has(m64, "in 1 tensor(s): mid_block.mlp.fc1.weight"));
  // with the flag the weights load as stored
  ud::load_checkpoint(net, f, "", ud::CheckpointNaming::automatic, /*allow_nonfinite=*/true);
  CHECK(std::isnan(net.param("mid_block.mlp.fc1.weight")[7]));
  CHECK(std::isinf(net.param("mid_block.mlp.fc1.weight")[9]));
  CHECK(std::isinf(net.param("norm.weight")[3]));
  CHECK(net.param("mid_block.mlp.fc1.weight")[8] ==
        g.get_vector<float>("param/mid_block.mlp.fc1.weight")[8]);
}

TEST_CASE("safetensors::open reads on demand: the same values as read, in chunks, and its errors") {
  TempDir d("unidiffuser_test_io_open");
  const std::string path = d / "t.safetensors";
  // more than one 4 MiB chunk when converted (bf16: 2 Mi elements per chunk) and when copied
  const std::int64_t n = (std::int64_t{5} << 20) / 2 + 7;
  ud::Tensor<float> big(ud::Shape{n});
  for (std::int64_t i = 0; i < n; ++i) big[i] = static_cast<float>((i % 1001) - 500) * 0.25f;
  big[n - 3] = std::numeric_limits<float>::quiet_NaN();
  ud::Tensor<double> small(ud::Shape{2, 3});
  for (std::int64_t i = 0; i < 6; ++i) small[i] = 1.0 / (1.0 + static_cast<double>(i));
  ud::Tensor<std::int64_t> ids(ud::Shape{4});
  for (std::int64_t i = 0; i < 4; ++i) ids[i] = 10 * i - 7;
  ud::Tensor<float> empty(ud::Shape{0, 5});
  st::Writer w;
  w.add<float>("f32", big).add<double>("f64", small).add<std::int64_t>("i64", ids);
  w.add_converted("bf16", big.view(), ud::dtype::bf16);
  ud::Tensor<float> small32(ud::Shape{2, 3});
  for (std::int64_t i = 0; i < 6; ++i) small32[i] = static_cast<float>(small[i]);
  w.add_converted("f16", small32.view(), ud::dtype::f16);
  w.add<float>("empty", empty);
  w.metadata("note", "hello");
  w.write(path);

  const auto r = st::File::read(path);
  const auto o = st::File::open(path);
  CHECK(r.in_memory());
  CHECK_FALSE(o.in_memory());
  CHECK(o.metadata("note") == "hello");
  REQUIRE(o.tensors().size() == r.tensors().size());
  auto same_bits = [](const std::vector<float>& a, const std::vector<float>& b) {
    // memcmp on the empty tensor's null data() would be undefined behaviour
    return a.size() == b.size() &&
           (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
  };
  for (const auto& t : r.tensors()) {
    CAPTURE(t.name);
    CHECK(o.info(t.name).shape == t.shape);
    CHECK(o.info(t.name).type == t.type);
    CHECK(same_bits(o.get_vector<float>(t.name), r.get_vector<float>(t.name)));
    CHECK(o.get_vector<double>(t.name).size() == r.get_vector<double>(t.name).size());
  }
  CHECK(o.get_vector<std::int64_t>("i64") == r.get_vector<std::int64_t>("i64"));
  CHECK(o.get<double>("f64").shape() == (ud::Shape{2, 3}));
  ud::Tensor<float> into(ud::Shape{n});
  o.get_into<float>("bf16", into.view());
  CHECK(same_bits(std::vector<float>(into.begin(), into.end()), r.get_vector<float>("bf16")));
  // chunks: consecutive, whole elements, at most 4 MiB each, covering the tensor once
  std::int64_t covered = 0, pieces = 0;
  bool ordered = true;
  o.for_each_chunk("bf16", [&](const unsigned char*, std::size_t first, std::size_t count) {
    ordered = ordered && static_cast<std::int64_t>(first) == covered && count * 2 <= (4u << 20);
    covered += static_cast<std::int64_t>(count);
    ++pieces;
  });
  CHECK(ordered);
  CHECK(covered == n);
  CHECK(pieces == 2);
  r.for_each_chunk("bf16", [&](const unsigned char*, std::size_t, std::size_t count) {
    CHECK(static_cast<std::int64_t>(count) == n);
  });
  o.for_each_chunk("empty", [&](const unsigned char*, std::size_t, std::size_t) { CHECK(false); });
  CHECK(has(message_of([&] { (void)o.raw("f32"); }), "use for_each_chunk"));
  // a copy shares the open file and outlives the original
  std::vector<float> via_copy;
  {
    const st::File c = o;
    via_copy = c.get_vector<float>("f64");
  }
  CHECK(via_copy == r.get_vector<float>("f64"));

  // the same validation and file checks as read
  CHECK(has(message_of([&] { st::File::open(d.dir.string()); }), "not a regular file"));
  CHECK(has(message_of([&] { st::File::open(d / "missing"); }), "cannot open"));
  std::ofstream(d / "empty").close();
  CHECK(has(message_of([&] { st::File::open(d / "empty"); }), "shorter than the 8-byte"));
  {
    const auto bad = raw_file(R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8);
    std::ofstream(d / "bad", std::ios::binary)
        .write(reinterpret_cast<const char*>(bad.data()), static_cast<std::streamsize>(bad.size()));
    CHECK(has(message_of([&] { st::File::open(d / "bad"); }), "does not match shape"));
    const auto huge = raw_file("{}", 0);
    std::vector<unsigned char> h = huge;
    const std::uint64_t len = 1000;  // header length beyond the file
    std::memcpy(h.data(), &len, 8);
    std::ofstream(d / "long", std::ios::binary)
        .write(reinterpret_cast<const char*>(h.data()), static_cast<std::streamsize>(h.size()));
    CHECK(has(message_of([&] { st::File::open(d / "long"); }), "header length exceeds the file"));
  }
  // a file that shrinks after it was opened: an error naming it, not a crash
  const std::string shrink = d / "shrink.safetensors";
  std::filesystem::copy_file(path, shrink);
  const auto s = st::File::open(shrink);
  std::filesystem::resize_file(shrink, 64);
  const std::string m = message_of([&] { (void)s.get_vector<float>("f32"); });
  CHECK(has(m, shrink));
  CHECK(has(m, "shrank since it was opened"));
}

TEST_CASE(
    "load_checkpoint from an opened file: the same weights, non-finite values found by index") {
  const auto g = st::File::read(kGolden);
  const auto cfg = ud::checkpoint_config(g, "param/");
  ud::nn::UViT<float> a(cfg), b(cfg);
  ud::load_checkpoint(a, g, "param/");
  ud::load_checkpoint(b, st::File::open(kGolden), "param/");
  CHECK(a.parameters().size() == b.parameters().size());
  CHECK(std::memcmp(a.parameters().data(), b.parameters().data(),
                    static_cast<std::size_t>(a.parameters().size()) * sizeof(float)) == 0);
  // a NaN in the second 4 MiB chunk of a bf16 tensor is reported at its global index
  TempDir d("unidiffuser_test_io_open_nan");
  const std::string path = d / "nan.safetensors";
  const std::int64_t n = (std::int64_t{5} << 20) / 2;
  ud::Tensor<float> v(ud::Shape{n});
  for (std::int64_t i = 0; i < n; ++i) v[i] = 0.5f;
  v[n - 11] = std::numeric_limits<float>::infinity();
  st::Writer w;
  w.add_converted("x", v.view(), ud::dtype::bf16);
  w.write(path);
  const auto [count, first] = ud::detail::count_nonfinite<float>(st::File::open(path), "x");
  CHECK(count == 1);
  CHECK(first == n - 11);
}

TEST_CASE("safetensors::Writer::add_ref writes the same file as add, without a copy") {
  TempDir d("unidiffuser_test_io_ref");
  ud::Tensor<float> a(ud::Shape{3, 4});
  ud::Tensor<double> b(ud::Shape{5});
  ud::Tensor<float> e(ud::Shape{0});
  for (std::int64_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i) * 0.5f - 1.f;
  for (std::int64_t i = 0; i < b.size(); ++i) b[i] = 1.0 / (3.0 + static_cast<double>(i));
  st::Writer copy, ref;
  copy.add<float>("a", a).add<double>("b", b).add<float>("e", e).metadata("k", "v");
  ref.add_ref<float>("a", a.view()).add_ref<double>("b", b.view()).add_ref<float>("e", e.view());
  ref.metadata("k", "v");
  copy.write(d / "copy.safetensors");
  ref.write(d / "ref.safetensors");
  CHECK(bytes_of(d / "copy.safetensors") == bytes_of(d / "ref.safetensors"));
  // the reference is read at write(): a change before it is in the file
  a[0] = 42.f;
  ref.write(d / "ref2.safetensors");
  CHECK(st::File::read(d / "ref2.safetensors").get_vector<float>("a")[0] == 42.f);
  CHECK(has(message_of([&] { ref.add_ref<float>("a", a.view()); }), "duplicate tensor name"));
}
