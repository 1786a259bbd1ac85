// SPDX-License-Identifier: Apache-2.0
//! \file safetensors.hpp
//! Strict safetensors reader and atomic writer.
//!
//! Format: 8-byte little-endian header length N, N bytes of JSON mapping names to
//! {"dtype", "shape", "data_offsets": [begin, end]} plus an optional "__metadata__" object of
//! strings, then the data block. The reader validates everything before any tensor is used:
//! header length bounds, well-formed JSON, known dtypes, non-negative shapes whose non-zero
//! extents multiply to at most INT64_MAX, offsets in bounds, shape x dtype size = byte length, no
//! duplicate names, no overlap and no holes in the data block. Errors name the file and the
//! tensor. Tensors (zero-element ones included) convert to the requested working type. The writer
//! is atomic and durable (exclusive temporary, fsync, rename, directory fsync). POSIX only.
//!
//! Two ways to hold a file: File::read reads it whole into memory (then it no longer depends on
//! the file system); File::open parses the header and reads tensor bytes on demand with pread —
//! straight into the destination when no conversion is needed, through a 4 MiB buffer otherwise —
//! so that loading a multi-GB checkpoint costs no memory beyond the parameters it fills.
#pragma once

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
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

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

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
  //! Element count; representable for every entry of a parsed File (the reader rejects shapes
  //! whose non-zero extents multiply beyond int64).
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

//! A temporary file `<path>.tmp-XXXXXX` beside `path` (mkstemp: created exclusively), removed
//! unless commit() moved it over `path`. Errors name `path`.
class TempFile {
 public:
  explicit TempFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp-XXXXXX") {
    fd_ = ::mkstemp(tmp_.data());
    if (fd_ < 0) fail("cannot create a temporary file in the destination's directory");
    if (::fchmod(fd_, 0644) != 0) fail("cannot set the mode of the temporary file");
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }
  //! Appends `size` bytes (retrying short writes and interrupts).
  void put(const void* data, std::size_t size) {
    const auto* p = static_cast<const unsigned char*>(data);
    while (size > 0) {
      const ::ssize_t w = ::write(fd_, p, size);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) fail("write failed (disk full?); nothing was replaced");
      p += w;
      size -= static_cast<std::size_t>(w);
    }
  }
  //! fsync, close, rename over the destination, fsync the directory.
  void commit() {
    if (::fsync(fd_) != 0) fail("fsync of the temporary file failed; nothing was replaced");
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("closing the temporary file failed; nothing was replaced");
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0)
      fail("cannot move the finished file into place");
    committed_ = true;
    std::string dir = std::filesystem::path(path_).parent_path().string();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) fail("the file was replaced but its directory cannot be opened to sync it");
    const bool synced = ::fsync(dfd) == 0 || errno == EINVAL;  // EINVAL: no directory sync here
    ::close(dfd);
    if (!synced) fail("the file was replaced but syncing its directory failed");
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    const int e = errno;
    throw error("safetensors::write", path_, what + ": " + std::strerror(e));
  }
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};
}  // namespace detail

namespace detail {
// The open file descriptor of File::open, shared by the copies of a File.
struct ReadFd {
  int fd = -1;
  std::uint64_t size = 0;
  explicit ReadFd(int f) : fd(f) {}
  ReadFd(const ReadFd&) = delete;
  ReadFd& operator=(const ReadFd&) = delete;
  ~ReadFd() {
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace detail

//! A parsed, validated safetensors file: in memory (read, parse) or read on demand (open).
class File {
 public:
  //! Parses and validates `bytes`; `source` names the file in error messages.
  static File parse(std::vector<unsigned char> bytes, std::string source = "<memory>") {
    File f;
    f.source_ = std::move(source);
    f.bytes_ = std::move(bytes);
    f.validate(f.bytes_.data(), f.bytes_.size(), f.bytes_.size());
    return f;
  }
  //! Reads and validates the regular file at `path` (a directory, device or FIFO is an error;
  //! opening does not block on a FIFO). Allocates exactly the file's size, never more.
  static File read(const std::string& path) {
    const char* op = "safetensors::read";
    const auto fail = [&](const std::string& what) {
      const int e = errno;
      throw error(op, path, what + ": " + std::strerror(e));
    };
    const auto file = open_regular(op, path);
    const int fd = file->fd;
    const std::uint64_t size = file->size;
    std::vector<unsigned char> buf;
    try {
      buf.resize(static_cast<std::size_t>(size));
    } catch (const std::exception&) {  // std::bad_alloc or std::length_error
      throw error(op, path, "cannot allocate " + std::to_string(size) + " bytes for the file");
    }
    std::size_t got = 0;
    while (got < buf.size()) {
      const ::ssize_t r = ::read(fd, buf.data() + got, buf.size() - got);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) fail("read error");
      if (r == 0) throw error(op, path, "the file shrank while it was being read");
      got += static_cast<std::size_t>(r);
    }
    unsigned char extra;
    if (::read(fd, &extra, 1) > 0) throw error(op, path, "the file grew while it was being read");
    return parse(std::move(buf), path);
  }
  //! Opens the regular file at `path` for reading on demand: the header is read and validated
  //! now (the same checks as read), tensor bytes when a tensor is converted. The File keeps the
  //! file open (its copies share the descriptor); the file must not change while it is in use: a
  //! file that shrank is an error naming it, other changes in place are not detected.
  static File open(const std::string& path) {
    const char* op = "safetensors::open";
    File f;
    f.source_ = path;
    f.file_ = open_regular(op, path);
    const std::uint64_t size = f.file_->size;
    std::vector<unsigned char> head(static_cast<std::size_t>(std::min<std::uint64_t>(size, 8)));
    f.pread_all(head.data(), head.size(), 0, "the header length");
    std::uint64_t n = 0;
    if (head.size() == 8) std::memcpy(&n, head.data(), 8);
    if (n >= 1 && n <= max_header_bytes && n <= size - 8) {  // else validate names the problem
      head.resize(static_cast<std::size_t>(8 + n));
      f.pread_all(head.data() + 8, static_cast<std::size_t>(n), 8, "the header");
    }
    f.validate(head.data(), head.size(), size);
    return f;
  }
  //! Whether the tensor bytes live in memory (read, parse) rather than in the file (open).
  bool in_memory() const { return file_ == nullptr; }

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
  //! Raw little-endian bytes of a tensor of an in-memory File (read, parse); a File from open
  //! has none in memory (an error): use for_each_chunk.
  const unsigned char* raw(const std::string& name) const {
    const TensorInfo& i = info(name);
    if (!in_memory())
      throw error("safetensors::File::raw", source_ + ": " + name,
                  "the file was opened for reading on demand (File::open); its bytes are not in "
                  "memory: use for_each_chunk");
    return bytes_.data() + data_start_ + i.begin;
  }
  //! Calls f(bytes, first, count) over consecutive pieces of a tensor's raw little-endian data:
  //! `count` whole elements starting at element `first`. One piece for an in-memory File; pieces
  //! of at most 4 MiB, read into one buffer, for an opened one. Nothing for zero elements.
  template <class F>
  void for_each_chunk(const std::string& name, F&& f) const {
    for_each_chunk(info(name), f);
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
  static std::shared_ptr<detail::ReadFd> open_regular(const char* op, const std::string& path) {
    const auto fail = [&](const std::string& what) {
      const int e = errno;
      throw error(op, path, what + ": " + std::strerror(e));
    };
    // O_NONBLOCK: opening a FIFO does not block (it is refused below)
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail("cannot open");
    auto file = std::make_shared<detail::ReadFd>(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) fail("cannot stat");
    if (!S_ISREG(st.st_mode)) throw error(op, path, "not a regular file");
    file->size = static_cast<std::uint64_t>(st.st_size);
    return file;
  }
  // Reads exactly `size` bytes at file offset `at` (opened Files), retrying short reads.
  void pread_all(unsigned char* out, std::size_t size, std::uint64_t at,
                 const std::string& what) const {
    std::size_t got = 0;
    while (got < size) {
      const ::ssize_t r = ::pread(file_->fd, out + got, size - got, static_cast<::off_t>(at + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        const int e = errno;
        throw error("safetensors::File", source_,
                    "read error in " + what + ": " + std::strerror(e));
      }
      if (r == 0)
        throw error("safetensors::File", source_,
                    "the file shrank since it was opened (reading " + what + ")");
      got += static_cast<std::size_t>(r);
    }
  }
  template <class F>
  void for_each_chunk(const TensorInfo& i, F& f) const {
    const auto n = static_cast<std::size_t>(i.numel());
    if (n == 0) return;
    if (in_memory()) {
      f(static_cast<const unsigned char*>(bytes_.data() + data_start_ + i.begin), std::size_t{0},
        n);
      return;
    }
    const std::size_t es = dtype_size(i.type);
    const std::size_t per = std::max<std::size_t>(1, (std::size_t{4} << 20) / es);
    std::vector<unsigned char> buf(std::min(n, per) * es);
    for (std::size_t first = 0; first < n; first += per) {
      const std::size_t count = std::min(per, n - first);
      pread_all(buf.data(), count * es, data_start_ + i.begin + first * es, i.name);
      f(static_cast<const unsigned char*>(buf.data()), first, count);
    }
  }
  template <class T>
  void copy_to(const TensorInfo& i, T* out) const {
    const std::size_t es = dtype_size(i.type);
    const auto n = static_cast<std::size_t>(i.numel());
    if (n == 0) return;  // zero-element tensor: `out` may be null
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      if (i.type == dtype_of<T>::value) {
        if (in_memory())
          std::memcpy(out, bytes_.data() + data_start_ + i.begin, n * sizeof(T));
        else  // straight into the destination: no staging copy
          pread_all(reinterpret_cast<unsigned char*>(out), n * sizeof(T), data_start_ + i.begin,
                    i.name);
        return;
      }
    }
    auto convert = [&](const unsigned char* p, std::size_t first, std::size_t count) {
      for (std::size_t k = 0; k < count; ++k)
        out[first + k] = detail::load_elem<T>(p + k * es, i.type);
    };
    for_each_chunk(i, convert);
  }

  [[noreturn]] void fail(const std::string& subject, const std::string& what) const {
    throw error("safetensors::parse", subject.empty() ? source_ : source_ + ": " + subject, what);
  }

  // Validates the file of `size` bytes whose first `available` bytes are at `bytes` (the whole
  // file, or its header length and header).
  void validate(const unsigned char* bytes, std::uint64_t available, std::uint64_t size) {
    using nlohmann::json;
    if (size < 8)
      fail("",
           "file of " + std::to_string(size) + " bytes is shorter than the 8-byte header length");
    std::uint64_t n;
    std::memcpy(&n, bytes, 8);
    if (n == 0) fail("", "header length is 0");
    if (n > max_header_bytes)
      fail("", unidiffuser::detail::expected_got("header length", "<= 100 MiB", n));
    if (n > size - 8)
      fail("", unidiffuser::detail::expected_got("header length exceeds the file",
                                                 "<= " + std::to_string(size - 8), n));
    if (available < 8 + n)  // cannot happen: both callers provide the header
      fail("", "internal: the header was not read");
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
      const char* b = reinterpret_cast<const char*>(bytes + 8);
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
      // Every accepted shape has a representable element count: the product of its non-zero
      // extents must fit in int64 (a zero extent does not excuse an overflowing rest), so numel()
      // and every partial product of the extents are representable.
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      std::uint64_t nonzero = 1;
      bool zero = false;
      for (const json& d : *sh) {
        if (!d.is_number_integer() || (!d.is_number_unsigned() && d.get<std::int64_t>() < 0))
          fail(name, "shape entries must be non-negative integers; got " + d.dump());
        const std::uint64_t e = d.get<std::uint64_t>();
        if (e > kMax || (e != 0 && nonzero > kMax / e))
          fail(name, "shape " + sh->dump() +
                         ": the product of its non-zero extents overflows int64 (exceeds " +
                         std::to_string(kMax) + ")");
        if (e == 0)
          zero = true;
        else
          nonzero *= e;
        ti.shape.push_back(static_cast<std::int64_t>(e));
      }
      const std::uint64_t numel = zero ? 0 : nonzero;
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
      const bool overflow = numel > std::numeric_limits<std::uint64_t>::max() / es;
      if (overflow || numel * es != ti.end - ti.begin)
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
  std::vector<unsigned char> bytes_;      // the whole file (in memory) or empty (open)
  std::shared_ptr<detail::ReadFd> file_;  // the file (open) or null (in memory)
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
  //! Adds a tensor stored as `T` by reference: its bytes are read by write(), so the caller keeps
  //! them alive and unchanged until then. Saving a network this way costs no copy of its weights.
  template <class T>
  Writer& add_ref(const std::string& name, TensorView<const T, cpu> v) {
    std::vector<std::int64_t> shape;
    for (int i = 0; i < v.rank(); ++i) shape.push_back(v.dim(i));
    return add_entry(name, dtype_of<T>::value, shape, v.data(),
                     static_cast<std::size_t>(v.size()) * sizeof(T), false);
  }
  //! Adds a tensor converted from float to a 16-bit storage type (f16 or bf16) or kept as f32.
  Writer& add_converted(const std::string& name, TensorView<const float, cpu> v, dtype as) {
    std::vector<std::int64_t> shape;
    for (int i = 0; i < v.rank(); ++i) shape.push_back(v.dim(i));
    const auto n = static_cast<std::size_t>(v.size());
    if (as == dtype::f32) return add_raw(name, as, shape, v.data(), n * 4);
    if (as != dtype::f16 && as != dtype::bf16)
      throw error("safetensors::Writer::add_converted", name,
                  "target dtype must be F32, F16 or BF16");
    std::vector<std::uint16_t> b(n);
    for (std::size_t k = 0; k < n; ++k)
      b[k] = as == dtype::f16 ? half_t::from_float(v.data()[k]).bits
                              : bfloat16_t::from_float(v.data()[k]).bits;
    return add_raw(name, as, shape, b.data(), n * 2);
  }
  Writer& metadata(const std::string& key, const std::string& value) {
    meta_[key] = value;
    return *this;
  }
  //! Writes the file atomically: a temporary `<path>.tmp-XXXXXX` created exclusively in the
  //! destination's directory receives everything and is fsync'ed, renamed over `path`, and the
  //! directory is fsync'ed. On failure the temporary is removed and `path` is left untouched.
  //! The file gets mode 0644.
  void write(const std::string& path) const {
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
                   {"data_offsets", {off, off + e.size}}};
      off += e.size;
    }
    std::string header = h.dump();
    header.append((8 - header.size() % 8) % 8, ' ');
    const std::uint64_t n = header.size();

    detail::TempFile tmp(path);
    tmp.put(&n, 8);
    tmp.put(header.data(), header.size());
    for (const auto& e : entries_) tmp.put(e.ref ? e.ref : e.bytes.data(), e.size);
    tmp.commit();
  }

 private:
  struct Entry {
    std::string name;
    dtype type;
    std::vector<std::int64_t> shape;
    std::vector<unsigned char> bytes;    // owned copy (add), or empty
    const unsigned char* ref = nullptr;  // the caller's bytes (add_ref), or null
    std::size_t size = 0;
  };
  Writer& add_raw(const std::string& name, dtype t, std::vector<std::int64_t> shape,
                  const void* data, std::size_t bytes) {
    return add_entry(name, t, std::move(shape), data, bytes, true);
  }
  Writer& add_entry(const std::string& name, dtype t, std::vector<std::int64_t> shape,
                    const void* data, std::size_t bytes, bool copy) {
    const char* op = "safetensors::Writer::add";
    if (name.empty() || name == "__metadata__")
      throw error(op, "name", "invalid tensor name '" + name + "'");
    if (!names_.insert(name).second) throw error(op, name, "duplicate tensor name");
    Entry e{name, t, std::move(shape), {}, nullptr, bytes};
    if (copy) {
      e.bytes.resize(bytes);
      if (bytes) std::memcpy(e.bytes.data(), data, bytes);
    } else if (bytes) {
      e.ref = static_cast<const unsigned char*>(data);
    }
    entries_.push_back(std::move(e));
    return *this;
  }
  std::vector<Entry> entries_;
  std::set<std::string> names_;
  std::map<std::string, std::string> meta_;
};

}  // namespace unidiffuser::safetensors
