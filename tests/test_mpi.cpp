// SPDX-License-Identifier: Apache-2.0
// Data-parallel training over MPI (run with mpirun -n 2): every process trains on its share of
// each global batch through train::mpi_reducer; the weights must equal, to float rounding, those
// of one process training on the whole batch (computed by every rank on its own), and be the same
// on every rank. Exit code 0 on success.
#include <mpi.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <span>
#include <vector>

#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/train/mpi.hpp"
#include "unidiffuser/train/trainer.hpp"

namespace ud = unidiffuser;

namespace {
void data(std::uint64_t seed, std::int64_t, std::int64_t first,
          const std::array<ud::RowBlock<float>, 2>& x0, std::span<std::int64_t> dt) {
  for (std::size_t g = 0; g < 2; ++g)
    ud::ops::random_normal(ud::Context<ud::cpu>{}, x0[g], ud::NoiseKey{seed, 10 + g},
                           static_cast<std::uint64_t>(first));
  for (auto& d : dt) d = 1;
}

int run() {
  const auto cfg =
      ud::nn::UViTConfig::official("v1", 4, 2, 2, 16, 3, 2, 2.0, false, false, 3, 3, 4);
  ud::train::TrainerOptions<float, 2> o;
  o.seed = 3;
  o.batch = 8;
  o.lr.lr = 2e-3;
  o.clip_norm = 1.0;
  const int steps = 4;
  ud::nn::UViT<float> one(cfg), dp(cfg);
  one.init_random(4, 0.02);
  dp.init_random(4, 0.02);
  ud::train::Trainer<float, 2> t1(one, o, data);
  for (int s = 0; s < steps; ++s) t1.step(ud::Context<ud::cpu>{1});
  const auto red = ud::train::mpi_reducer(MPI_COMM_WORLD);
  ud::train::Trainer<float, 2> t2(dp, o, data, red);
  double loss = 0;
  for (int s = 0; s < steps; ++s) loss = t2.step(ud::Context<ud::cpu>{1}).loss;
  const ud::nn::UViT<float>& a = one;
  const ud::nn::UViT<float>& b = dp;
  double worst = 0, scale = 0;
  for (std::int64_t i = 0; i < a.parameters().size(); ++i) {
    worst = std::max(worst, std::abs(double(a.parameters()[i]) - b.parameters()[i]));
    scale = std::max(scale, std::abs(double(a.parameters()[i])));
  }
  // every rank holds the same weights: compare a checksum with rank 0's
  double sum = 0;
  for (float v : b.parameters()) sum += v;
  double sum0 = sum;
  MPI_Bcast(&sum0, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  int bad = (worst <= 1e-5 * scale && sum == sum0 && std::isfinite(loss)) ? 0 : 1;
  int any = 0;
  MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  std::printf(
      "rank %d of %d: max |one process - data parallel| = %.3g (max |w| %.3g), loss %.6f, "
      "checksum %s rank 0's\n",
      red.rank, red.world, worst, scale, loss, sum == sum0 ? "equals" : "DIFFERS FROM");
  if (red.world < 2) std::printf("note: run with mpirun -n 2 to exercise the reduction\n");
  return any;
}
}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 1;
  try {
    rc = run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "test_mpi: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
