// SPDX-License-Identifier: Apache-2.0
// Core: errors, tensors, 16-bit storage types, counter-based noise, safetensors I/O.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/io/safetensors.hpp"

#include "support.hpp"

namespace ud = unidiffuser;
namespace st = unidiffuser::safetensors;

namespace {
using unidiffuser::testing::message_of;

// A safetensors blob from a header string and a data block.
std::vector<unsigned char> blob(const std::string& header, std::size_t data_bytes) {
  std::vector<unsigned char> b(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  std::memcpy(b.data() + 8, header.data(), header.size());
  for (std::size_t i = 0; i < data_bytes; ++i)
    b[8 + header.size() + i] = static_cast<unsigned char>(i);
  return b;
}
}  // namespace

TEST_CASE("errors name the operation, the subject and expected vs actual") {
  const std::string m = message_of([] {
    ud::Tensor<float> t(ud::Shape{2, 3});
    ud::check_shape("nn::linear", "weight", t, ud::Shape{3, 3});
  });
  CHECK(m.find("nn::linear") != std::string::npos);
  CHECK(m.find("weight") != std::string::npos);
  CHECK(m.find("expected [3, 3]") != std::string::npos);
  CHECK(m.find("got [2, 3]") != std::string::npos);
}

TEST_CASE("tensors are row-major, rank <= 4, with views, row slices and column blocks") {
  ud::Tensor<float> t(ud::Shape{2, 3, 4});
  for (std::int64_t i = 0; i < t.size(); ++i) t[i] = static_cast<float>(i);
  CHECK(t(1, 2, 3) == 23.f);
  CHECK(t.view().rows(1, 1)(0, 0, 1) == 13.f);
  auto blk = ud::column_block(t.view(), 4, 8);
  CHECK(blk.rows == 2);
  CHECK(blk.ld == 12);
  CHECK(blk.data[blk.ld] == 16.f);
  CHECK_THROWS_AS(t.view().reshape(ud::Shape{5, 5}), ud::error);
  CHECK_THROWS_AS(t.view().rows(1, 2), ud::error);
  CHECK_THROWS_AS(ud::column_block(t.view(), 10, 3), ud::error);
  CHECK_THROWS_AS((ud::Shape{1, 2, 3, 4, 5}), ud::error);
  CHECK_THROWS_AS((ud::Shape{2, -1}), ud::error);
  ud::Tensor<float> moved = std::move(t);
  CHECK(moved.size() == 24);
  CHECK(t.size() == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(moved.data()) % 64 == 0);
}

TEST_CASE("half and bfloat16 round to nearest even and keep specials") {
  CHECK(ud::half_t::from_float(1.0f).bits == 0x3c00);
  CHECK(ud::half_t::from_float(-2.0f).bits == 0xc000);
  CHECK(ud::half_t::from_float(65504.f).bits == 0x7bff);
  CHECK(ud::half_t::from_float(1e6f).bits == 0x7c00);
  CHECK(ud::half_t::from_float(5.9604645e-8f).bits == 0x0001);  // smallest subnormal
  CHECK(std::isnan(ud::half_t::from_float(std::nanf("")).to_float()));
  CHECK(ud::half_t::from_bits(0x3555).to_float() == doctest::Approx(0.333251953125));
  // 1 + 2^-11 is a tie between 1 and 1 + 2^-10: rounds to even (1)
  CHECK(ud::half_t::from_float(1.0f + 1.0f / 2048).bits == 0x3c00);
  CHECK(ud::half_t::from_float(1.0f + 3.0f / 2048).bits == 0x3c02);
  for (std::uint32_t b = 0; b < 0x7c00; b += 7) {  // every finite half survives the round trip
    const auto h = ud::half_t::from_bits(static_cast<std::uint16_t>(b));
    CHECK(ud::half_t::from_float(h.to_float()).bits == b);
  }
  CHECK(ud::bfloat16_t::from_float(1.0f).bits == 0x3f80);
  CHECK(ud::bfloat16_t::from_float(3.140625f).to_float() == 3.140625f);
  CHECK(ud::bfloat16_t::from_float(1.0f + 1.0f / 256).bits == 0x3f80);  // tie to even
  CHECK(std::isnan(ud::bfloat16_t::from_float(std::nanf("")).to_float()));
}

TEST_CASE("Philox noise is a function of (seed, stream, sample, element) only") {
  const ud::Context<ud::cpu> ctx{};
  ud::Tensor<float> big(ud::Shape{8, 37}), small(ud::Shape{3, 37});
  ud::ops::random_normal(ctx, ud::as_rows(big.view()), ud::NoiseKey{42, 5}, 100);
  ud::ops::random_normal(ctx, ud::as_rows(small.view()), ud::NoiseKey{42, 5},
                         104);  // samples 104..106
  for (std::int64_t r = 0; r < 3; ++r)
    for (std::int64_t j = 0; j < 37; ++j) CHECK(small(r, j) == big(r + 4, j));
  CHECK(ud::philox_normal(42, 5, 101, 9) == big(1, 9));
  ud::Tensor<float> other(ud::Shape{8, 37});
  ud::ops::random_normal(ctx, ud::as_rows(other.view()), ud::NoiseKey{42, 6}, 100);
  CHECK(other(0, 0) != big(0, 0));
}

TEST_CASE("Philox normals have the moments of N(0, 1)") {
  const ud::Context<ud::cpu> ctx{};
  ud::Tensor<double> x(ud::Shape{100, 2000});
  ud::ops::random_normal(ctx, ud::as_rows(x.view()), ud::NoiseKey{7, 0}, 0);
  double m1 = 0, m2 = 0, m4 = 0, lag = 0;
  const auto n = static_cast<double>(x.size());
  for (std::int64_t i = 0; i < x.size(); ++i) {
    m1 += x[i];
    m2 += x[i] * x[i];
    m4 += x[i] * x[i] * x[i] * x[i];
    if (i) lag += x[i] * x[i - 1];
  }
  m1 /= n, m2 /= n, m4 /= n, lag /= n;
  CHECK(std::abs(m1) < 5 / std::sqrt(n));
  CHECK(std::abs(m2 - 1) < 5 * std::sqrt(2 / n));
  CHECK(std::abs(m4 - 3) < 5 * std::sqrt(96 / n));
  CHECK(std::abs(lag) < 5 / std::sqrt(n));
}

TEST_CASE("ops: lincomb, per-row axpby and squared errors") {
  const ud::Context<ud::cpu> ctx{};
  ud::Tensor<double> a(ud::Shape{2, 3}), b(ud::Shape{2, 3}), o(ud::Shape{2, 3});
  for (int i = 0; i < 6; ++i) a[i] = i, b[i] = 10 * i;
  ud::ops::lincomb<double>(ctx, o.view(), {{2.0, a.view()}, {0.5, b.view()}});
  CHECK(o[5] == doctest::Approx(2 * 5 + 0.5 * 50));
  const double ca[] = {1, 2}, cb[] = {0, 1};
  ud::ops::axpby_rows<double>(ctx, ud::as_rows(o.view()), ca,
                              ud::as_rows(ud::TensorView<const double>(a.view())), cb,
                              ud::as_rows(ud::TensorView<const double>(b.view())));
  CHECK(o(0, 2) == 2);
  CHECK(o(1, 2) == 2 * 5 + 50);
  double rows[2];
  ud::ops::squared_error_rows<double>(ctx, ud::as_rows(ud::TensorView<const double>(a.view())),
                                      ud::as_rows(ud::TensorView<const double>(b.view())), rows);
  CHECK(rows[0] == doctest::Approx(81 + 324));
}

TEST_CASE("safetensors: write then read every dtype, metadata included, atomically") {
  const auto dir = std::filesystem::temp_directory_path() / "unidiffuser_test_st";
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "roundtrip.safetensors").string();
  ud::Tensor<float> f(ud::Shape{2, 3});
  ud::Tensor<double> d(ud::Shape{4});
  ud::Tensor<std::int64_t> i(ud::Shape{3});
  for (int k = 0; k < 6; ++k) f[k] = 0.25f * static_cast<float>(k) - 0.5f;
  for (int k = 0; k < 4; ++k) d[k] = 1.0 / (k + 1);
  for (int k = 0; k < 3; ++k) i[k] = 1000 * k - 7;
  st::Writer w;
  w.add(std::string("a/f32"), f).add(std::string("b/f64"), d).add(std::string("c/i64"), i);
  w.add_converted("d/f16", f.view(), ud::dtype::f16)
      .add_converted("e/bf16", f.view(), ud::dtype::bf16);
  w.metadata("config", "{\"x\": 1}");
  w.write(path);
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));
  const auto r = st::File::read(path);
  CHECK(r.metadata("config") == "{\"x\": 1}");
  CHECK(r.names("a/").size() == 1);
  const auto f2 = r.get<float>("a/f32");
  CHECK(f2.shape() == f.shape());
  for (int k = 0; k < 6; ++k) CHECK(f2[k] == f[k]);
  const auto h = r.get<double>("d/f16");
  const auto bf = r.get<float>("e/bf16");
  for (int k = 0; k < 6; ++k) {
    CHECK(h[k] == f[k]);  // multiples of 0.25 are exact in both
    CHECK(bf[k] == f[k]);
  }
  CHECK(r.get<float>("b/f64")[3] == 0.25f);
  CHECK(r.get<double>("c/i64")[0] == -7.0);
  ud::Tensor<float> wrong(ud::Shape{3, 2});
  CHECK_THROWS_AS(r.get_into<float>("a/f32", wrong.view()), ud::error);
  CHECK_THROWS_AS(r.info("missing"), ud::error);
  // writing into a directory that does not exist fails cleanly and leaves nothing behind
  CHECK_THROWS_AS(w.write((dir / "no" / "such" / "x.safetensors").string()), ud::error);
  CHECK_THROWS_AS(st::Writer().add(std::string("x"), f).add(std::string("x"), f), ud::error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("safetensors: every kind of malformed file is a clear error naming file and tensor") {
  struct Bad {
    std::string header;
    std::size_t data;
    std::string expect;
  };
  const Bad cases[] = {
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", 8, "malformed JSON"},
      {"[1,2]", 0, "JSON object"},
      {"{\"a\":{\"dtype\":\"F99\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unsupported dtype"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "non-negative"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,16]}}", 8,
       "beyond the data block"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
       "does not match shape"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "begin"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"F32\","
       "\"shape\":[1],"
       "\"data_offsets\":[0,4]}}",
       4, "overlaps"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "hole"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "covered"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\","
       "\"shape\":[1],"
       "\"data_offsets\":[4,8]}}",
       8, "duplicate"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8,
       "overflow"},
      {"{\"__metadata__\":{\"k\":1}}", 0, "strings"},
      {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "data_offsets"},
  };
  for (const auto& c : cases) {
    const std::string m =
        message_of([&] { st::File::parse(blob(c.header, c.data), "bad.safetensors"); });
    CHECK_MESSAGE(m.find(c.expect) != std::string::npos, m);
    CHECK_MESSAGE(m.find("bad.safetensors") != std::string::npos, m);
  }
  // header length larger than the file, zero, or a file shorter than 8 bytes
  auto b = blob("{}", 0);
  const std::uint64_t huge = 1000;
  std::memcpy(b.data(), &huge, 8);
  CHECK(message_of([&] { st::File::parse(b, "x"); }).find("exceeds the file") != std::string::npos);
  CHECK(message_of([&] { st::File::parse(std::vector<unsigned char>(5), "x"); }).find("shorter") !=
        std::string::npos);
  CHECK(message_of([&] {
          st::File::parse(std::vector<unsigned char>(8), "x");
        }).find("header length is 0") != std::string::npos);
  CHECK(message_of([] { st::File::read("/nonexistent/file.safetensors"); }).find("cannot open") !=
        std::string::npos);
}

TEST_CASE("safetensors: the golden files parse and convert") {
  const auto f =
      st::File::read(std::string(UNIDIFFUSER_GOLDEN_DIR) + "/timestep_embedding.safetensors");
  CHECK(f.metadata("format") == "unidiffuser-golden-1");
  CHECK(f.get<float>("output/dim32").shape() == ud::Shape{7, 32});
  CHECK(f.get<double>("input/t")[6] == 1000.0);
}
