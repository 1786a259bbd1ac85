// SPDX-License-Identifier: Apache-2.0
//! \file error.hpp
//! The single exception type of the library and helpers that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace unidiffuser {

//! Thrown for every invalid input: wrong shapes, malformed files, impossible configurations.
//! The message always has the form "<operation>: <tensor or subject>: <what>; expected <a>, got
//! <b>" so that a user can tell which call, which tensor and which value was wrong.
class error : public std::runtime_error {
 public:
  error(std::string operation, std::string subject, std::string what)
      : std::runtime_error(compose(operation, subject, what)),
        operation_(std::move(operation)),
        subject_(std::move(subject)) {}

  //! The public operation that rejected its input (e.g. "safetensors::read").
  const std::string& operation() const noexcept { return operation_; }
  //! The tensor, file or parameter concerned.
  const std::string& subject() const noexcept { return subject_; }

 private:
  static std::string compose(const std::string& op, const std::string& subject,
                             const std::string& what) {
    std::string m = op;
    if (!subject.empty()) m += ": " + subject;
    if (!what.empty()) m += ": " + what;
    return m;
  }
  std::string operation_;
  std::string subject_;
};

namespace detail {
template <class A, class B>
std::string expected_got(std::string_view what, const A& expected, const B& got) {
  std::ostringstream os;
  os << what << "; expected " << expected << ", got " << got;
  return os.str();
}
}  // namespace detail

//! Throws `error` with an "expected ..., got ..." message.
template <class A, class B>
[[noreturn]] void throw_mismatch(std::string operation, std::string subject, std::string_view what,
                                 const A& expected, const B& got) {
  throw error(std::move(operation), std::move(subject), detail::expected_got(what, expected, got));
}

//! Throws `error(operation, subject, what)` unless `cond` holds.
inline void require(bool cond, std::string_view operation, std::string_view subject,
                    std::string_view what) {
  if (!cond) throw error(std::string(operation), std::string(subject), std::string(what));
}

}  // namespace unidiffuser
