// SPDX-License-Identifier: Apache-2.0
// Command-line handling shared by the project's programs (unidiffuser-sample, unidiffuser-golden,
// unidiffuser-bench). Private to the tools: not part of the installed library.
//
// - Args: strict option parsing against a table of known options. Unknown options, missing
//   values, repeated options and stray arguments are errors.
// - Typed values: integers are parsed as their exact type (no sign for unsigned types, no
//   leading '+' or spaces, no trailing junk, no silent wrap-around) and checked against a
//   documented range; reals must be finite and in range.
// - run_main: every exception ends the program with exit code 1 and exactly one line on
//   stderr, "<program>: error: <message>".
#pragma once

#include <algorithm>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdio>
#include <exception>
#include <initializer_list>
#include <map>
#include <new>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <vector>

#include "unidiffuser/core/error.hpp"

namespace unidiffuser::cli {

//! The operation named in every command-line error message.
inline constexpr const char* op = "command line";

//! An option of a command: `--name VALUE` (or `--name=VALUE`) when it takes a value, else a flag.
struct Option {
  std::string name;  //!< without the leading "--"
  bool takes_value = true;
};

//! Parses `text` as an integer of exactly type `I` in [lo, hi]; `subject` names the value in
//! errors (e.g. "--steps").
template <std::integral I>
I parse_integer(std::string_view text, const std::string& subject, I lo, I hi) {
  const std::string range = std::to_string(lo) + ".." + std::to_string(hi);
  I v{};
  const char* first = text.data();
  const char* last = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(first, last, v, 10);
  if (ec == std::errc::result_out_of_range)
    throw_mismatch(op, subject, "integer out of range", range, "'" + std::string(text) + "'");
  if (ec != std::errc() || ptr != last || text.empty())
    throw_mismatch(op, subject, "not an integer", "an integer in " + range,
                   "'" + std::string(text) + "'");
  if (v < lo || v > hi)
    throw_mismatch(op, subject, "integer out of range", range, "'" + std::string(text) + "'");
  return v;
}

//! Parses `text` as a finite double in [lo, hi].
inline double parse_real(std::string_view text, const std::string& subject, double lo, double hi) {
  auto fmt = [](double x) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", x);
    return std::string(b);
  };
  const std::string range = fmt(lo) + ".." + fmt(hi);
  double v = 0;
  const char* last = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), last, v);
  if (ec != std::errc() || ptr != last || text.empty() || !std::isfinite(v))
    throw_mismatch(op, subject, "not a finite number", "a finite number in " + range,
                   "'" + std::string(text) + "'");
  if (v < lo || v > hi)
    throw_mismatch(op, subject, "number out of range", range, "'" + std::string(text) + "'");
  return v;
}

//! The largest `--threads` the programs accept: 4x the hardware threads, at most 1024.
inline int max_threads() {
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  return static_cast<int>(std::min(1024u, 4u * hw));
}

//! Options parsed strictly against a table of known options.
class Args {
 public:
  //! Parses argv[first..argc). `max_positional`: how many non-option arguments are allowed.
  //! "--help" / "-h" set help() and are otherwise ignored.
  Args(std::vector<Option> known, int argc, char** argv, int first = 1,
       std::size_t max_positional = 0)
      : known_(std::move(known)) {
    for (int i = first; i < argc; ++i) {
      const std::string s = argv[i];
      if (s == "--help" || s == "-h") {
        help_ = true;
        continue;
      }
      if (s.size() < 3 || s.rfind("--", 0) != 0) {
        if (positional_.size() >= max_positional)
          throw error(op, "'" + s + "'",
                      max_positional == 0
                          ? "unexpected argument; options start with -- (see --help)"
                          : "too many arguments; expected " + std::to_string(max_positional) +
                                " (see --help)");
        positional_.push_back(s);
        continue;
      }
      const auto eq = s.find('=');
      const std::string name = s.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
      const Option* o = find(name);
      if (!o) throw error(op, "--" + name, "unknown option (see --help)");
      if (values_.count(name)) throw error(op, "--" + name, "given more than once");
      std::string value;
      if (!o->takes_value) {
        if (eq != std::string::npos) throw error(op, "--" + name, "takes no value");
      } else if (eq != std::string::npos) {
        value = s.substr(eq + 1);
      } else if (i + 1 >= argc || std::string_view(argv[i + 1]).rfind("--", 0) == 0) {
        throw error(op, "--" + name, "missing value");
      } else {
        value = argv[++i];
      }
      values_[name] = value;
    }
  }

  bool help() const { return help_; }
  const std::vector<std::string>& positional() const { return positional_; }
  //! Whether the option (flag or valued) was given.
  bool has(const std::string& name) const {
    check_known(name);
    return values_.count(name) != 0;
  }
  //! The option's text, or `def` when absent.
  std::string text(const std::string& name, const std::string& def = "") const {
    check_known(name);
    auto it = values_.find(name);
    return it == values_.end() ? def : it->second;
  }
  //! The option's text; an error when absent.
  std::string required(const std::string& name) const {
    if (!has(name)) throw error(op, "--" + name, "required option missing (see --help)");
    return text(name);
  }
  //! The option's text, which must be one of `allowed`.
  std::string choice(const std::string& name, const std::string& def,
                     std::initializer_list<std::string_view> allowed) const {
    const std::string v = text(name, def);
    std::string list;
    for (auto a : allowed) {
      if (v == a) return v;
      list += (list.empty() ? "" : " | ") + std::string(a);
    }
    throw_mismatch(op, "--" + name, "unknown value", list, "'" + v + "'");
  }
  //! The option as an integer of type `I` in [lo, hi], or `def` when absent.
  template <std::integral I>
  I integer(const std::string& name, I def, I lo, I hi) const {
    return has(name) ? parse_integer<I>(text(name), "--" + name, lo, hi) : def;
  }
  //! The option as a finite double in [lo, hi], or `def` when absent.
  double real(const std::string& name, double def, double lo, double hi) const {
    return has(name) ? parse_real(text(name), "--" + name, lo, hi) : def;
  }
  //! `--threads`: 0 (all hardware threads) .. max_threads().
  int threads(int def = 0) const { return integer<int>("threads", def, 0, max_threads()); }

 private:
  const Option* find(const std::string& name) const {
    for (const auto& o : known_)
      if (o.name == name) return &o;
    return nullptr;
  }
  void check_known(const std::string& name) const {
    if (!find(name))
      throw error("cli::Args", "--" + name, "queried an option that is not declared");
  }
  std::vector<Option> known_;
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
  bool help_ = false;
};

//! Prints "<program>: error: <message>" on one line of stderr.
inline void report(std::string_view program, std::string message) {
  std::replace_if(
      message.begin(), message.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
  std::fflush(stdout);
  std::fprintf(stderr, "%.*s: error: %s\n", static_cast<int>(program.size()), program.data(),
               message.c_str());
}

//! Runs `body` (returning the exit code); any exception becomes one line on stderr and exit 1.
template <class F>
int run_main(std::string_view program, F&& body) noexcept {
  try {
    return body();
  } catch (const error& e) {
    report(program, e.what());
  } catch (const std::bad_alloc&) {
    report(program, "out of memory: an allocation failed (std::bad_alloc)");
  } catch (const std::exception& e) {
    report(program, std::string("unexpected failure: ") + e.what());
  } catch (...) {
    report(program, "unexpected failure: unknown exception");
  }
  return 1;
}

}  // namespace unidiffuser::cli
