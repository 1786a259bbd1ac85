// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the test executables.
#pragma once

#include <string>

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
}  // namespace unidiffuser::testing
