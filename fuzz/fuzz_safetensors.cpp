// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the safetensors reader: any input either parses into a file whose every
// tensor converts (to double, and to float tensors of rank <= 4) without reading out of bounds,
// or throws unidiffuser::error. Anything else (a crash, a sanitizer report, another exception
// type) is a bug. Conversion work is capped by element count to keep the target fast.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace st = unidiffuser::safetensors;
  constexpr std::int64_t kMaxElements = 1 << 16;  // per input, all tensors together
  try {
    const auto f = st::File::parse(std::vector<unsigned char>(data, data + size), "fuzz");
    std::int64_t budget = kMaxElements;
    for (const auto& t : f.tensors()) {
      (void)f.raw(t.name);
      if (t.numel() > budget) continue;
      budget -= t.numel();
      const auto v = f.get_vector<double>(t.name);
      if (static_cast<std::int64_t>(v.size()) != t.numel()) __builtin_trap();
      if (t.shape.size() <= 4) {
        const auto x = f.get<float>(t.name);
        if (x.size() != t.numel()) __builtin_trap();
      }
    }
  } catch (const unidiffuser::error&) {
  }
  return 0;
}
