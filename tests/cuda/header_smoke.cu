// SPDX-License-Identifier: Apache-2.0
// Compiled by nvcc in CI: the headers shared between backends must build as CUDA C++, and the
// counter-based noise and the 16-bit storage conversions must give the same bits on the device as
// on the host. Run as a test it skips (exit code 77) when no CUDA device is present.
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

// out[i]: the normal; h16[i], b16[i]: its half and bfloat16 bits (round to nearest even)
__global__ void noise_kernel(float* out, unsigned short* h16, unsigned short* b16, int rows,
                             int cols) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const float n = ud::philox_normal(1234, 7, 100 + i / cols, i % cols);
  out[i] = n;
  h16[i] = ud::half_t::from_float(n).bits;
  b16[i] = ud::bfloat16_t::from_float(n).bits;
}

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device present (the headers compiled with nvcc)\n");
    return 77;
  }
  const int rows = 16, cols = 1000, n = rows * cols;
  float* d = nullptr;
  unsigned short *dh = nullptr, *db = nullptr;
  if (cudaMalloc(&d, n * sizeof(float)) != cudaSuccess ||
      cudaMalloc(&dh, n * sizeof(unsigned short)) != cudaSuccess ||
      cudaMalloc(&db, n * sizeof(unsigned short)) != cudaSuccess)
    return 1;
  noise_kernel<<<(n + 255) / 256, 256>>>(d, dh, db, rows, cols);
  if (cudaGetLastError() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) return 1;
  std::vector<float> h(n);
  std::vector<unsigned short> hh(n), hb(n);
  cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost);
  cudaMemcpy(hh.data(), dh, n * sizeof(unsigned short), cudaMemcpyDeviceToHost);
  cudaMemcpy(hb.data(), db, n * sizeof(unsigned short), cudaMemcpyDeviceToHost);
  cudaFree(d);
  cudaFree(dh);
  cudaFree(db);
  double worst = 0;
  int half_diff = 0, bf16_diff = 0;
  for (int i = 0; i < n; ++i) {
    const float ref = ud::philox_normal(1234, 7, 100 + i / cols, i % cols);
    worst = std::max(worst, std::abs(static_cast<double>(ref) - h[i]));
    half_diff += hh[i] != ud::half_t::from_float(h[i]).bits;  // the conversion of the same float
    bf16_diff += hb[i] != ud::bfloat16_t::from_float(h[i]).bits;
  }
  std::printf(
      "device vs host: Philox normals max |diff| = %.3g; half bits differ in %d, bfloat16 "
      "bits in %d of %d values\n",
      worst, half_diff, bf16_diff, n);
  return worst < 1e-5 && half_diff == 0 && bf16_diff == 0 ? 0 : 1;
}
