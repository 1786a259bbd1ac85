// SPDX-License-Identifier: Apache-2.0
//! \file safetensors.hpp
//! Strict safetensors reader and atomic writer.
//!
//! Format: 8-byte little-endian header length N, N bytes of JSON mapping names to
//! {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" object of
//! strings, then the data block. The reader validates everything before any tensor is used:
//! header length bounds, well-formed JSON, known dtypes, non-negative shapes, offsets in bounds,
//! shape x dtype size = byte length, no duplicate names, no overlap and no holes in the data
//! block. Errors name the file and the tensor. Tensors convert to the requested working type.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/error.hpp"
#include "unidiffuser/core/tensor.hpp"

namespace unidiffuser::safetensors {

static_assert(std::endian::native == std::endian::little,
              "safetensors I/O assumes a little-endian host");

//! Largest header accepted (the format's own limit is 100 MB).
inline constexpr std::uint64_t max_header_bytes = 100u * 1024u * 1024u;

//! One tensor entry of a file.
struct TensorInfo {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;   //!< any rank (the library's tensors take rank <= 4)
  std::uint64_t begin = 0, end = 0;  //!< byte range inside the data block
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

namespace detail {
inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

template <class T>
T load_elem(const unsigned char* p, dtype t) {
  auto rd = [p](auto v) {
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  switch (t) {
    case dtype::f64: return static_cast<T>(rd(double{}));
    case dtype::f32: return static_cast<T>(rd(float{}));
    case dtype::f16: return static_cast<T>(half_t::from_bits(rd(std::uint16_t{})).to_float());
    case dtype::bf16: return static_cast<T>(bfloat16_t::from_bits(rd(std::uint16_t{})).to_float());
    case dtype::i64: return static_cast<T>(rd(std::int64_t{}));
    case dtype::i32: return static_cast<T>(rd(std::int32_t{}));
    case dtype::u8: return static_cast<T>(p[0]);
  }
  return T{};
}
}  // namespace detail

//! A parsed, validated safetensors file held in memory.
class File {
 public:
  //! Parses and validates `bytes`; `source` names the file in error messages.
  static File parse(std::vector<unsigned char> bytes, std::string source = "<memory>") {
    File f;
    f.source_ = std::move(source);
    f.bytes_ = std::move(bytes);
    f.validate();
    return f;
  }
  //! Reads and validates the file at `path`.
  static File read(const std::string& path) {
    const char* op = "safetensors::read";
    std::FILE* fp = std::fopen(path.c_str(), "rb");
    if (!fp) throw error(op, path, std::string("cannot open: ") + std::strerror(errno));
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> guard(fp, &std::fclose);
    std::vector<unsigned char> buf;
    if (std::fseek(fp, 0, SEEK_END) == 0) {
      const long size = std::ftell(fp);
      if (size > 0) buf.reserve(static_cast<std::size_t>(size));
      std::fseek(fp, 0, SEEK_SET);
    }
    unsigned char chunk[1 << 16];
    std::size_t n;
    while ((n = std::fread(chunk, 1, sizeof chunk, fp)) > 0)
      buf.insert(buf.end(), chunk, chunk + n);
    if (std::ferror(fp)) throw error(op, path, "read error");
    return parse(std::move(buf), path);
  }

  const std::string& source() const { return source_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  //! A metadata value, or `fallback` when absent.
  std::string metadata(const std::string& key, std::string fallback = {}) const {
    auto it = metadata_.find(key);
    return it == metadata_.end() ? fallback : it->second;
  }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  //! Entries in file-offset order.
  const std::vector<TensorInfo>& tensors() const { return infos_; }
  //! Names that start with `prefix`, in file-offset order.
  std::vector<std::string> names(std::string_view prefix = {}) const {
    std::vector<std::string> out;
    for (const auto& i : infos_)
      if (std::string_view(i.name).substr(0, prefix.size()) == prefix) out.push_back(i.name);
    return out;
  }
  const TensorInfo& info(const std::string& name) const {
    auto it = index_.find(name);
    if (it == index_.end())
      throw error("safetensors::File::info", source_ + ": " + name, "no such tensor");
    return infos_[it->second];
  }
  //! Raw little-endian bytes of a tensor.
  const unsigned char* raw(const std::string& name) const {
    return bytes_.data() + data_start_ + info(name).begin;
  }

  //! The tensor converted to `T` (float, double, or an integer type); rank <= 4.
  template <class T>
  Tensor<T, cpu> get(const std::string& name) const {
    const TensorInfo& i = info(name);
    if (i.shape.size() > static_cast<std::size_t>(max_rank))
      throw_mismatch("safetensors::File::get", source_ + ": " + name, "rank", "<= 4",
                     i.shape.size());
    Tensor<T, cpu> t(Shape::from_range(i.shape.begin(), i.shape.end()));
    copy_to(i, t.data());
    return t;
  }
  //! Converts into `out`, whose shape must equal the stored one.
  template <class T>
  void get_into(const std::string& name, TensorView<T, cpu> out) const {
    const TensorInfo& i = info(name);
    if (i.shape.size() > static_cast<std::size_t>(max_rank) ||
        Shape::from_range(i.shape.begin(), i.shape.end()) != out.shape())
      throw_mismatch("safetensors::File::get_into", source_ + ": " + name, "shape",
                     out.shape().str(), detail::shape_str(i.shape));
    copy_to(i, out.data());
  }
  //! All elements as a flat vector of `T`.
  template <class T>
  std::vector<T> get_vector(const std::string& name) const {
    const TensorInfo& i = info(name);
    std::vector<T> v(static_cast<std::size_t>(i.numel()));
    copy_to(i, v.data());
    return v;
  }

 private:
  template <class T>
  void copy_to(const TensorInfo& i, T* out) const {
    const unsigned char* p = bytes_.data() + data_start_ + i.begin;
    const std::size_t es = dtype_size(i.type);
    const auto n = static_cast<std::size_t>(i.numel());
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      if (i.type == dtype_of<T>::value) {
        std::memcpy(out, p, n * sizeof(T));
        return;
      }
    }
    for (std::size_t k = 0; k < n; ++k) out[k] = detail::load_elem<T>(p + k * es, i.type);
  }

  [[noreturn]] void fail(const std::string& subject, const std::string& what) const {
    throw error("safetensors::parse", subject.empty() ? source_ : source_ + ": " + subject, what);
  }

  void validate() {
    using nlohmann::json;
    const std::size_t size = bytes_.size();
    if (size < 8)
      fail("",
           "file of " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
    std::uint64_t n;
    std::memcpy(&n, bytes_.data(), 8);
    if (n == 0) fail("", "header length is 0");
    if (n > max_header_bytes)
      fail("", unidiffuser::detail::expected_got("header length", "<= 100 MiB", n));
    if (n > size - 8)
      fail("", unidiffuser::detail::expected_got("header length exceeds the file",
                                                 "<= " + std::to_string(size - 8), n));
    data_start_ = 8 + static_cast<std::size_t>(n);
    const std::uint64_t data_size = size - data_start_;

    // Parse, rejecting duplicate keys in the top-level object.
    std::string dup;
    std::vector<std::set<std::string>> keys_at_depth;
    json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
      if (ev == json::parse_event_t::object_start) {
        keys_at_depth.resize(static_cast<std::size_t>(depth) + 1);
        keys_at_depth[static_cast<std::size_t>(depth)].clear();
      } else if (ev == json::parse_event_t::key && depth >= 1) {
        auto& s = keys_at_depth[static_cast<std::size_t>(depth - 1)];
        if (!s.insert(parsed.get<std::string>()).second && dup.empty())
          dup = parsed.get<std::string>();
      }
      return true;
    };
    json h;
    try {
      const char* b = reinterpret_cast<const char*>(bytes_.data() + 8);
      h = json::parse(b, b + n, cb, /*allow_exceptions=*/true);
    } catch (const json::exception& e) {
      fail("header", std::string("malformed JSON: ") + e.what());
    }
    if (!dup.empty()) fail(dup, "duplicate key in the header");
    if (!h.is_object()) fail("header", "the header must be a JSON object");

    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail(name, "__metadata__ must be an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail("__metadata__." + m.key(), "metadata values must be strings");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) fail(name, "entry must be an object");
      TensorInfo ti;
      ti.name = name;
      auto dt = v.find("dtype");
      if (dt == v.end() || !dt->is_string()) fail(name, "missing or non-string \"dtype\"");
      if (!parse_dtype(dt->get<std::string>(), ti.type))
        fail(name, "unsupported dtype \"" + dt->get<std::string>() +
                       "\"; expected one of F64, F32, F16, BF16, I64, I32, U8");
      auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) fail(name, "missing or non-array \"shape\"");
      std::uint64_t numel = 1;
      bool overflow = false;
      for (const json& d : *sh) {
        if (!d.is_number_integer() ||
            (d.is_number_integer() && !d.is_number_unsigned() && d.get<std::int64_t>() < 0))
          fail(name, "shape entries must be non-negative integers; got " + d.dump());
        const std::uint64_t e = d.get<std::uint64_t>();
        if (e > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
          overflow = true;
        if (e != 0 && numel > std::numeric_limits<std::uint64_t>::max() / e) overflow = true;
        numel *= e;
        ti.shape.push_back(static_cast<std::int64_t>(e));
      }
      auto off = v.find("data_offsets");
      if (off == v.end() || !off->is_array() || off->size() != 2 ||
          !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned())
        fail(name, "\"data_offsets\" must be two non-negative integers");
      ti.begin = (*off)[0].get<std::uint64_t>();
      ti.end = (*off)[1].get<std::uint64_t>();
      if (ti.begin > ti.end)
        fail(name,
             "data_offsets begin " + std::to_string(ti.begin) + " > end " + std::to_string(ti.end));
      if (ti.end > data_size)
        fail(name, unidiffuser::detail::expected_got("data_offsets end beyond the data block",
                                                     "<= " + std::to_string(data_size), ti.end));
      const std::uint64_t es = dtype_size(ti.type);
      if (overflow || numel > std::numeric_limits<std::uint64_t>::max() / es ||
          numel * es != ti.end - ti.begin)
        fail(name, "byte length " + std::to_string(ti.end - ti.begin) + " does not match shape " +
                       detail::shape_str(ti.shape) + " x " + std::string(dtype_name(ti.type)) +
                       (overflow ? " (overflow)" : " = " + std::to_string(numel * es) + " bytes"));
      infos_.push_back(std::move(ti));
    }
    std::sort(infos_.begin(), infos_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t pos = 0;
    for (const auto& ti : infos_) {
      if (ti.begin < pos) fail(ti.name, "data overlaps the previous tensor");
      if (ti.begin > pos)
        fail(ti.name, "hole in the data block before this tensor (bytes " + std::to_string(pos) +
                          ".." + std::to_string(ti.begin) + ")");
      pos = ti.end;
    }
    if (pos != data_size)
      fail("",
           unidiffuser::detail::expected_got("data block size covered by tensors", data_size, pos));
    for (std::size_t k = 0; k < infos_.size(); ++k) index_[infos_[k].name] = k;
  }

  std::string source_;
  std::vector<unsigned char> bytes_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> infos_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

//! Collects tensors and metadata, then writes them atomically (temporary file + rename).
class Writer {
 public:
  //! Adds a tensor stored as `T` (F32/F64/I64/...); the bytes are copied now.
  template <class T>
  Writer& add(const std::string& name, TensorView<const T, cpu> v) {
    std::vector<std::int64_t> shape;
    for (int i = 0; i < v.rank(); ++i) shape.push_back(v.dim(i));
    return add_raw(name, dtype_of<T>::value, shape, v.data(),
                   static_cast<std::size_t>(v.size()) * sizeof(T));
  }
  template <class T>
  Writer& add(const std::string& name, const Tensor<T, cpu>& t) {
    return add<T>(name, t.view());
  }
  //! Adds a tensor converted from float to a 16-bit storage type (f16 or bf16) or kept as f32.
  Writer& add_converted(const std::string& name, TensorView<const float, cpu> v, dtype as) {
    std::vector<std::int64_t> shape;
    for (int i = 0; i < v.rank(); ++i) shape.push_back(v.dim(i));
    const auto n = static_cast<std::size_t>(v.size());
    if (as == dtype::f32) return add_raw(name, as, shape, v.data(), n * 4);
    std::vector<std::uint16_t> b(n);
    for (std::size_t k = 0; k < n; ++k)
      b[k] = as == dtype::f16 ? half_t::from_float(v.data()[k]).bits
                              : bfloat16_t::from_float(v.data()[k]).bits;
    if (as != dtype::f16 && as != dtype::bf16)
      throw error("safetensors::Writer::add_converted", name,
                  "target dtype must be F32, F16 or BF16");
    return add_raw(name, as, shape, b.data(), n * 2);
  }
  Writer& metadata(const std::string& key, const std::string& value) {
    meta_[key] = value;
    return *this;
  }
  //! Writes the file: `path + ".tmp-<n>"` first, renamed over `path` only when complete.
  void write(const std::string& path) const {
    const char* op = "safetensors::write";
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!meta_.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& [k, v] : meta_) m[k] = v;
      h["__metadata__"] = m;
    }
    std::uint64_t off = 0;
    for (const auto& e : entries_) {
      h[e.name] = {{"dtype", std::string(dtype_name(e.type))},
                   {"shape", e.shape},
                   {"data_offsets", {off, off + e.bytes.size()}}};
      off += e.bytes.size();
    }
    std::string header = h.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
    const std::string tmp = path + ".tmp-" + std::to_string(reinterpret_cast<std::uintptr_t>(this));
    std::FILE* fp = std::fopen(tmp.c_str(), "wb");
    if (!fp)
      throw error(op, path, std::string("cannot create temporary file: ") + std::strerror(errno));
    bool ok = true;
    const std::uint64_t n = header.size();
    ok = ok && std::fwrite(&n, 8, 1, fp) == 1;
    ok = ok && std::fwrite(header.data(), 1, header.size(), fp) == header.size();
    for (const auto& e : entries_)
      ok = ok && (e.bytes.empty() ||
                  std::fwrite(e.bytes.data(), 1, e.bytes.size(), fp) == e.bytes.size());
    ok = (std::fclose(fp) == 0) && ok;
    if (!ok) {
      std::remove(tmp.c_str());
      throw error(op, path, "write failed (disk full?); nothing was replaced");
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      const std::string why = std::strerror(errno);
      std::remove(tmp.c_str());
      throw error(op, path, "cannot move the finished file into place: " + why);
    }
  }

 private:
  struct Entry {
    std::string name;
    dtype type;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;
  };
  Writer& add_raw(const std::string& name, dtype t, std::vector<std::int64_t> shape,
                  const void* data, std::size_t bytes) {
    const char* op = "safetensors::Writer::add";
    if (name.empty() || name == "__metadata__")
      throw error(op, "name", "invalid tensor name '" + name + "'");
    if (!names_.insert(name).second) throw error(op, name, "duplicate tensor name");
    Entry e{name, t, std::move(shape), {}};
    e.bytes.resize(bytes);
    if (bytes) std::memcpy(e.bytes.data(), data, bytes);
    entries_.push_back(std::move(e));
    return *this;
  }
  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> meta_;
};

}  // namespace unidiffuser::safetensors
