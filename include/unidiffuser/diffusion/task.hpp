// SPDX-License-Identifier: Apache-2.0
//! \file task.hpp
//! Sampling tasks: a role per group (generate / condition / marginalize), task helpers for any
//! number of groups K (conditionals, many-to-one, one-to-many, joint, marginals, multi-stage
//! chains) and the official two-group modes as presets (UNIDIFFUSER.md §5, §7, §8, §10).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "unidiffuser/core/error.hpp"

namespace unidiffuser {

//! What a group does during sampling.
enum class Role {
  generate,     //!< part of the ODE state; time input N * tau (shared by all generated groups)
  condition,    //!< clean user value; time input 0
  marginalize,  //!< fresh N(0, I) noise; time input N
};

//! A role for each of the K groups. At least one group must be generated.
template <std::size_t K>
struct Task {
  std::array<Role, K> roles{};

  bool generated(std::size_t g) const { return roles[g] == Role::generate; }
  std::size_t count(Role r) const {
    std::size_t n = 0;
    for (Role x : roles) n += x == r;
    return n;
  }
  void validate(std::string_view op) const {
    if (count(Role::generate) == 0)
      throw error(std::string(op), "task", "at least one group must be generated");
  }
};

//! The official sampling modes (K = 2: group 0 = image {z, c}, group 1 = text {y}).
enum class Mode { joint, t2i, i2t, i, t, i2t2i, t2i2t };

inline Mode parse_mode(std::string_view s) {
  constexpr std::pair<std::string_view, Mode> all[] = {
      {"joint", Mode::joint}, {"t2i", Mode::t2i},     {"i2t", Mode::i2t},    {"i", Mode::i},
      {"t", Mode::t},         {"i2t2i", Mode::i2t2i}, {"t2i2t", Mode::t2i2t}};
  for (const auto& [name, m] : all)
    if (name == s) return m;
  throw error(
      "parse_mode", "mode",
      "unknown mode '" + std::string(s) + "'; expected joint, t2i, i2t, i, t, i2t2i or t2i2t");
}
inline std::string_view mode_name(Mode m) {
  switch (m) {
    case Mode::joint: return "joint";
    case Mode::t2i: return "t2i";
    case Mode::i2t: return "i2t";
    case Mode::i: return "i";
    case Mode::t: return "t";
    case Mode::i2t2i: return "i2t2i";
    case Mode::t2i2t: return "t2i2t";
  }
  return "?";
}

//! A multi-stage task: the stages run in order and each stage's conditioned groups take the
//! latest sampled value of that group when an earlier stage generated it (sample_chain).
template <std::size_t K>
using Chain = std::vector<Task<K>>;

namespace tasks {

//! Any K: generate the groups in `generate`, condition on those in `condition`, marginalise the
//! rest. Indices must be < K and appear once; at least one group is generated.
template <std::size_t K>
Task<K> make(const std::vector<std::size_t>& generate,
             const std::vector<std::size_t>& condition = {}) {
  const char* op = "tasks::make";
  if (generate.empty()) throw error(op, "generate", "at least one group must be generated");
  Task<K> t;
  t.roles.fill(Role::marginalize);
  std::array<bool, K> seen{};
  auto set = [&](const std::vector<std::size_t>& v, Role r, const char* what) {
    for (std::size_t g : v) {
      if (g >= K)
        throw error(
            op, what,
            "group index " + std::to_string(g) + " out of range (K = " + std::to_string(K) + ")");
      if (seen[g])
        throw error(op, what, "group " + std::to_string(g) + " listed twice (generate/condition)");
      seen[g] = true;
      t.roles[g] = r;
    }
  };
  set(generate, Role::generate, "generate");
  set(condition, Role::condition, "condition");
  return t;
}
//! Every group generated together (the joint of all K).
template <std::size_t K>
Task<K> joint_all() {
  Task<K> t;
  t.roles.fill(Role::generate);
  return t;
}
//! Group g alone, every other group marginalised.
template <std::size_t K>
Task<K> marginal(std::size_t g) {
  return make<K>({g});
}
//! Group `target` given group `given`, the others marginalised (t2i, i2t for K = 2).
template <std::size_t K>
Task<K> conditional(std::size_t target, std::size_t given) {
  return make<K>({target}, {given});
}
//! The generalisation of i2t2i: from a clean `from`, sample `via` (the rest marginalised), then
//! sample `from` again given the sampled `via`.
template <std::size_t K>
Chain<K> variation(std::size_t from, std::size_t via) {
  if (from == via)
    throw error("tasks::variation", "via",
                "must differ from `from` (group " + std::to_string(from) + ")");
  return {conditional<K>(via, from), conditional<K>(from, via)};
}

inline constexpr std::size_t image = 0;  //!< group index of the image group in the official layout
inline constexpr std::size_t text = 1;   //!< group index of the text group
inline Task<2> joint() {
  return {{Role::generate, Role::generate}};
}
inline Task<2> t2i() {
  return {{Role::generate, Role::condition}};
}
inline Task<2> i2t() {
  return {{Role::condition, Role::generate}};
}
inline Task<2> i() {
  return {{Role::generate, Role::marginalize}};
}
inline Task<2> t() {
  return {{Role::marginalize, Role::generate}};
}

//! The single-stage tasks of a mode, in execution order: i2t2i = {i2t, t2i} (the sampled text
//! state conditions the second stage), t2i2t = {t2i, i2t}.
inline std::vector<Task<2>> stages(Mode m) {
  switch (m) {
    case Mode::joint: return {joint()};
    case Mode::t2i: return {t2i()};
    case Mode::i2t: return {i2t()};
    case Mode::i: return {i()};
    case Mode::t: return {t()};
    case Mode::i2t2i: return {i2t(), t2i()};
    case Mode::t2i2t: return {t2i(), i2t()};
  }
  return {};
}
}  // namespace tasks

}  // namespace unidiffuser
