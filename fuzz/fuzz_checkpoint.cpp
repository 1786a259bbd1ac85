// SPDX-License-Identifier: Apache-2.0
// libFuzzer target for the checkpoint loader: parse the input as safetensors, take the config
// from its "config" metadata, check its bounds, compare the tensors with it without a network,
// and only when the estimated memory is small build nn::UViT<float> and load the weights (with
// and without allow_nonfinite). Every rejection must be a unidiffuser::error; anything else (a
// crash, a sanitizer report, std::bad_alloc or another exception) is a bug.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "unidiffuser/core/error.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/nn/uvit.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace ud = unidiffuser;
  constexpr std::uint64_t kMaxBytes = 64u << 20;  // networks built per input
  try {
    const auto f =
        ud::safetensors::File::parse(std::vector<unsigned char>(data, data + size), "fuzz");
    const auto cfg = ud::checkpoint_config(f);
    ud::check_config_bounds(cfg);
    ud::check_checkpoint(cfg, f);
    if (ud::estimate_memory<float>(cfg, 1).total > kMaxBytes) return 0;
    ud::nn::UViT<float> net(cfg);
    try {
      ud::load_checkpoint(net, f);
    } catch (const ud::error&) {
      ud::load_checkpoint(net, f, "", ud::CheckpointNaming::automatic, /*allow_nonfinite=*/true);
    }
  } catch (const ud::error&) {
  }
  return 0;
}
