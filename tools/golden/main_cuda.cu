// SPDX-License-Identifier: Apache-2.0
// unidiffuser-golden-cuda: the golden checker with its network cases (U-ViT forward, objective and
// gradients, sampling in the official modes) on the CUDA backend. Exits 77 without a device.
#include <cstdio>

#include "unidiffuser/backend/ops.hpp"
#define UNIDIFFUSER_GOLDEN_BACKEND ::unidiffuser::cuda
#define main golden_host_main
#include "main.cpp"
#undef main

int main(int argc, char** argv) {
  if (ud::cuda_detail::device_count() == 0) {
    std::printf("SKIP: no CUDA device present (unidiffuser-golden-cuda needs a GPU)\n");
    return 77;
  }
  return golden_host_main(argc, argv);
}
