// SPDX-License-Identifier: Apache-2.0
//! \file tensor.hpp
//! Row-major tensors of rank <= 4: an owning `Tensor` and a non-owning `TensorView`, both tagged
//! with the backend whose memory holds the elements, plus `RowBlock`, a 2-D block of rows with a
//! leading dimension (a column range of a [rows, ld] matrix) used to address one component of a
//! per-sample state without copying.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "unidiffuser/backend/tags.hpp"
#include "unidiffuser/core/error.hpp"

namespace unidiffuser {

//! Maximum tensor rank.
inline constexpr int max_rank = 4;

//! A shape of rank 0..4 (rank 0 is a scalar with one element). Extents are non-negative and the
//! product of the non-zero extents fits in int64, so numel(), inner() and every partial product
//! of the extents are representable (a zero extent does not excuse an overflowing rest).
class Shape {
 public:
  constexpr Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) {
    if (dims.size() > static_cast<std::size_t>(max_rank))
      throw_mismatch("Shape", "dims", "rank too large", "<= 4", dims.size());
    for (std::int64_t d : dims) push("dims", d);
  }
  template <class It>
  static Shape from_range(It first, It last, std::string_view subject = "dims") {
    Shape s;
    for (; first != last; ++first) {
      if (s.rank_ >= max_rank)
        throw error("Shape", std::string(subject), "rank larger than 4 is not supported");
      s.push(subject, static_cast<std::int64_t>(*first));
    }
    return s;
  }

  constexpr int rank() const { return rank_; }
  constexpr std::int64_t operator[](int i) const { return dims_[static_cast<std::size_t>(i)]; }
  constexpr std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  //! Product of all extents after the first (elements per sample of a batch-first tensor).
  constexpr std::int64_t inner() const {
    std::int64_t n = 1;
    for (int i = 1; i < rank_; ++i) n *= dims_[static_cast<std::size_t>(i)];
    return n;
  }
  friend constexpr bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[static_cast<std::size_t>(i)] != b.dims_[static_cast<std::size_t>(i)])
        return false;
    return true;
  }
  friend constexpr bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims_[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }
  template <class OS>
  friend OS& operator<<(OS& os, const Shape& s) {
    os << s.str();
    return os;
  }

 private:
  // Appends extent d, rejecting a negative one and a product of non-zero extents above int64.
  void push(std::string_view subject, std::int64_t d) {
    if (d < 0) throw_mismatch("Shape", std::string(subject), "negative extent", ">= 0", d);
    dims_[static_cast<std::size_t>(rank_++)] = d;
    std::int64_t nonzero = 1;
    for (int i = 0; i < rank_; ++i) {
      const std::int64_t e = dims_[static_cast<std::size_t>(i)];
      if (e == 0) continue;
      if (nonzero > std::numeric_limits<std::int64_t>::max() / e)
        throw_mismatch("Shape", std::string(subject),
                       "product of the non-zero extents of " + str() + " (element count)",
                       "<= " + std::to_string(std::numeric_limits<std::int64_t>::max()),
                       "an int64 overflow");
      nonzero *= e;
    }
  }
  std::array<std::int64_t, max_rank> dims_{};
  int rank_ = 0;
};

//! Non-owning view of a contiguous row-major tensor in `Backend` memory. `T` may be const.
template <class T, class Backend = cpu>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  using backend_type = Backend;

  constexpr TensorView() = default;
  constexpr TensorView(T* data, Shape shape) : data_(data), shape_(shape) {}
  //! Views of non-const elements convert to views of const elements.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr TensorView(const TensorView<U, Backend>& o) : data_(o.data()), shape_(o.shape()) {}

  constexpr T* data() const { return data_; }
  //! The view itself (so that code taking a Tensor's view() also takes a view).
  constexpr TensorView view() const { return *this; }
  constexpr const Shape& shape() const { return shape_; }
  constexpr int rank() const { return shape_.rank(); }
  constexpr std::int64_t size() const { return shape_.numel(); }
  constexpr std::int64_t dim(int i) const { return shape_[i]; }
  constexpr bool empty() const { return size() == 0; }

  //! The same elements under another shape with the same element count.
  TensorView reshape(Shape s) const {
    if (s.numel() != shape_.numel())
      throw_mismatch("TensorView::reshape", shape_.str(), "element count", shape_.numel(),
                     s.numel());
    return TensorView(data_, s);
  }
  //! Rows [first, first + count) along the first axis.
  TensorView rows(std::int64_t first, std::int64_t count) const {
    if (rank() < 1 || first < 0 || count < 0 || first + count > shape_[0])
      throw error("TensorView::rows", shape_.str(),
                  "row range [" + std::to_string(first) + ", " + std::to_string(first + count) +
                      ") out of bounds");
    Shape s = shape_;
    s = with_first(s, count);
    return TensorView(data_ + first * shape_.inner(), s);
  }

  //! Host element access (CPU backend only).
  template <class... I>
  T& operator()(I... idx) const {
    static_assert(is_host_backend_v<Backend>, "element access is for host tensors only");
    static_assert(sizeof...(I) >= 1 && sizeof...(I) <= max_rank, "bad index count");
    const std::int64_t ix[] = {static_cast<std::int64_t>(idx)...};
    std::int64_t off = 0;
    for (int i = 0; i < static_cast<int>(sizeof...(I)); ++i) off = off * shape_[i] + ix[i];
    return data_[off];
  }
  T& operator[](std::int64_t i) const {
    static_assert(is_host_backend_v<Backend>, "element access is for host tensors only");
    return data_[i];
  }
  T* begin() const { return data_; }
  T* end() const { return data_ + size(); }

 private:
  static Shape with_first(Shape s, std::int64_t n) {
    std::array<std::int64_t, max_rank> d{};
    for (int i = 0; i < s.rank(); ++i) d[static_cast<std::size_t>(i)] = s[i];
    d[0] = n;
    return Shape::from_range(d.begin(), d.begin() + s.rank());
  }
  T* data_ = nullptr;
  Shape shape_{};
};

//! `rows` rows of `cols` elements, consecutive rows `ld` elements apart (ld >= cols).
template <class T, class Backend = cpu>
struct RowBlock {
  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;

  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr RowBlock(const RowBlock<U, Backend>& o)
      : data(o.data), rows(o.rows), cols(o.cols), ld(o.ld) {}
  constexpr RowBlock() = default;
  constexpr RowBlock(T* d, std::int64_t r, std::int64_t c, std::int64_t l)
      : data(d), rows(r), cols(c), ld(l) {}
};

//! `samples` blocks of [rows, cols] (rows `ld` elements apart), consecutive samples `stride`
//! elements apart: one activation of a batch, each sample in its own workspace slot. A null
//! `data` is an absent operand (an optional input or an output not wanted).
template <class T, class Backend = cpu>
struct BatchBlock {
  T* data = nullptr;
  std::int64_t samples = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t ld = 0;
  std::int64_t stride = 0;

  constexpr BatchBlock() = default;
  constexpr BatchBlock(T* d, std::int64_t s, std::int64_t r, std::int64_t c, std::int64_t l,
                       std::int64_t st)
      : data(d), samples(s), rows(r), cols(c), ld(l), stride(st) {}
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr BatchBlock(const BatchBlock<U, Backend>& o)
      : data(o.data), samples(o.samples), rows(o.rows), cols(o.cols), ld(o.ld), stride(o.stride) {}
  //! Every sample of a row block as a one-row block ([samples, cols] -> [samples; 1, cols]).
  static constexpr BatchBlock per_row(RowBlock<T, Backend> b) {
    return BatchBlock(b.data, b.rows, 1, b.cols, b.cols, b.ld);
  }

  constexpr explicit operator bool() const { return data != nullptr; }
  constexpr RowBlock<T, Backend> sample(std::int64_t s) const {
    return RowBlock<T, Backend>(data + s * stride, rows, cols, ld);
  }
  constexpr T* row(std::int64_t s, std::int64_t r) const { return data + s * stride + r * ld; }
  //! Samples [first, first + count).
  constexpr BatchBlock sample_range(std::int64_t first, std::int64_t count) const {
    return BatchBlock(data ? data + first * stride : nullptr, count, rows, cols, ld, stride);
  }
  //! Rows [first, first + count) of every sample.
  constexpr BatchBlock row_range(std::int64_t first, std::int64_t count) const {
    return BatchBlock(data ? data + first * ld : nullptr, samples, count, cols, ld, stride);
  }
  //! Columns [first, first + count) of every sample.
  constexpr BatchBlock col_range(std::int64_t first, std::int64_t count) const {
    return BatchBlock(data ? data + first : nullptr, samples, rows, count, ld, stride);
  }
};

//! Throws unless `b` is [samples; rows, cols]; `op` and `name` go into the message.
template <class T, class Backend>
void check_batch(std::string_view op, std::string_view name, const BatchBlock<T, Backend>& b,
                 std::int64_t samples, std::int64_t rows, std::int64_t cols) {
  if (b.samples != samples || b.rows != rows || b.cols != cols)
    throw_mismatch(std::string(op), std::string(name), "shape [samples; rows, cols]",
                   "[" + std::to_string(samples) + "; " + std::to_string(rows) + ", " +
                       std::to_string(cols) + "]",
                   "[" + std::to_string(b.samples) + "; " + std::to_string(b.rows) + ", " +
                       std::to_string(b.cols) + "]");
  if (b.data == nullptr && samples * rows * cols != 0)
    throw error(std::string(op), std::string(name), "null data");
}

//! Columns [first, first + count) of a batch-first tensor viewed as [shape[0], inner].
template <class T, class Backend>
RowBlock<T, Backend> column_block(const TensorView<T, Backend>& v, std::int64_t first,
                                  std::int64_t count) {
  const std::int64_t rows = v.rank() == 0 ? 1 : v.dim(0);
  const std::int64_t ld = v.rank() == 0 ? 1 : v.shape().inner();
  if (first < 0 || count < 0 || first + count > ld)
    throw error("column_block", v.shape().str(),
                "column range [" + std::to_string(first) + ", " + std::to_string(first + count) +
                    ") exceeds the " + std::to_string(ld) + " elements per row");
  return RowBlock<T, Backend>(v.data() + first, rows, count, ld);
}
//! The whole tensor as a block of [shape[0], inner] rows.
template <class T, class Backend>
RowBlock<T, Backend> as_rows(const TensorView<T, Backend>& v) {
  return column_block(v, 0, v.rank() == 0 ? 1 : v.shape().inner());
}

namespace detail {
//! Memory allocator of a backend; CPU memory is 64-byte aligned for vector loads.
template <class Backend>
struct allocator;
template <class Backend>
struct host_allocator {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    return ::operator new (bytes, std::align_val_t{64});
  }
  static void deallocate(void* p) noexcept {
    if (p) ::operator delete (p, std::align_val_t{64});
  }
};
template <>
struct allocator<cpu> : host_allocator<cpu> {};
template <>
struct allocator<reference> : host_allocator<reference> {};
}  // namespace detail

//! Owning, contiguous, row-major tensor in `Backend` memory. Move-only: copies are explicit
//! (`ops::copy`) so that no hidden device transfers or allocations happen.
template <class T, class Backend = cpu>
class Tensor {
  static_assert(!std::is_const_v<T>, "Tensor<T>: T must not be const");
  static_assert(std::is_trivially_copyable_v<T>, "Tensor<T>: T must be trivially copyable");

 public:
  using value_type = T;
  using backend_type = Backend;

  Tensor() = default;
  explicit Tensor(Shape shape) : shape_(shape) {
    data_ = static_cast<T*>(
        detail::allocator<Backend>::allocate(static_cast<std::size_t>(shape.numel()) * sizeof(T)));
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  Tensor(Tensor&& o) noexcept : data_(std::exchange(o.data_, nullptr)), shape_(o.shape_) {
    o.shape_ = empty_shape();
  }
  Tensor& operator=(Tensor&& o) noexcept {
    if (this != &o) {
      detail::allocator<Backend>::deallocate(data_);
      data_ = std::exchange(o.data_, nullptr);
      shape_ = std::exchange(o.shape_, empty_shape());
    }
    return *this;
  }
  ~Tensor() { detail::allocator<Backend>::deallocate(data_); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  std::int64_t size() const { return shape_.numel(); }
  std::int64_t dim(int i) const { return shape_[i]; }

  TensorView<T, Backend> view() { return {data_, shape_}; }
  TensorView<const T, Backend> view() const { return {data_, shape_}; }
  operator TensorView<T, Backend>() { return view(); }
  operator TensorView<const T, Backend>() const { return view(); }

  template <class... I>
  T& operator()(I... idx) {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const {
    return view()(idx...);
  }
  T& operator[](std::int64_t i) { return view()[i]; }
  const T& operator[](std::int64_t i) const { return view()[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + size(); }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size(); }

 private:
  // An empty tensor is [0] (a rank-0 shape would mean one scalar element).
  static Shape empty_shape() {
    std::int64_t zero = 0;
    return Shape::from_range(&zero, &zero + 1);
  }
  T* data_ = nullptr;
  Shape shape_ = empty_shape();
};

//! Throws unless `v` has shape `expected`; `op` and `name` go into the message.
template <class V>
void check_shape(std::string_view op, std::string_view name, const V& v, const Shape& expected) {
  if (v.shape() != expected)
    throw_mismatch(std::string(op), std::string(name), "shape", expected.str(), v.shape().str());
}

}  // namespace unidiffuser
