// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the safetensors reader: any input either parses into a file whose every
// tensor converts without reading out of bounds, or throws unidiffuser::error. Anything else
// (a crash, a sanitizer report, another exception type) is a bug.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unidiffuser/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace st = unidiffuser::safetensors;
  try {
    const auto f = st::File::parse(std::vector<unsigned char>(data, data + size), "fuzz");
    for (const auto& t : f.tensors()) {
      if (t.numel() > (1 << 20)) continue;
      const auto v = f.get_vector<double>(t.name);
      (void)v;
      if (t.shape.size() <= 4) (void)f.get<float>(t.name);
    }
  } catch (const unidiffuser::error&) {
  }
  return 0;
}
