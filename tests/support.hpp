// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the test executables.
#pragma once

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/core/error.hpp"

namespace unidiffuser::testing {
//! The message of the unidiffuser::error that f() throws, or "<no error>".
template <class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const unidiffuser::error& e) {
    return e.what();
  }
  return "<no error>";
}
//! The CPU math modes to check: fp32, and bf16 where this build and CPU have it (a test message
//! says when not).
inline std::vector<MathMode> cpu_math_modes() {
  std::vector<MathMode> maths{MathMode::fp32};
  if (ops::math_supported(Context<cpu>{}, MathMode::bf16))
    maths.push_back(MathMode::bf16);
  else
    MESSAGE("bf16 not checked: this build or CPU has no bf16 products");
  return maths;
}
}  // namespace unidiffuser::testing
