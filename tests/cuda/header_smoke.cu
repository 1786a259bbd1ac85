// SPDX-License-Identifier: Apache-2.0
// Compiled by nvcc in CI: the headers shared between backends must build as CUDA C++, and the
// counter-based noise must give the same numbers on the device as on the host. Run as a test it
// skips (exit code 77) when no CUDA device is present.
#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

#include "unidiffuser/config.hpp"
#include "unidiffuser/core/dtype.hpp"
#include "unidiffuser/core/rng.hpp"
#include "unidiffuser/core/tensor.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"
#include "unidiffuser/schedule/vp.hpp"

namespace ud = unidiffuser;

__global__ void noise_kernel(float* out, int rows, int cols) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const float n = ud::philox_normal(1234, 7, 100 + i / cols, i % cols);
  out[i] = ud::half_t::from_float(n).to_float() - ud::half_t::from_float(n).to_float() + n;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device present (the headers compiled with nvcc)\n");
    return 77;
  }
  const int rows = 16, cols = 1000;
  float* d = nullptr;
  if (cudaMalloc(&d, rows * cols * sizeof(float)) != cudaSuccess) return 1;
  noise_kernel<<<(rows * cols + 255) / 256, 256>>>(d, rows, cols);
  if (cudaGetLastError() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return 1;
  std::vector<float> h(rows * cols);
  cudaMemcpy(h.data(), d, h.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(d);
  double worst = 0;
  for (int i = 0; i < rows * cols; ++i) {
    const double ref = ud::philox_normal(1234, 7, 100 + i / cols, i % cols);
    worst = std::max(worst, std::abs(ref - h[i]));
  }
  std::printf("device vs host Philox normals: max |diff| = %.3g\n", worst);
  return worst < 1e-5 ? 0 : 1;
}
