// SPDX-License-Identifier: Apache-2.0
// Foundation benchmarks: one sampler step on the official joint state (B = 16, 21,824 values per
// sample), Philox throughput, schedule queries and safetensors load throughput. After the Google
// Benchmark run, a side-by-side measurement compares the cost of one sampler step with the
// estimated cost of one official v1 network forward (2.33 TFLOP, UVIT.md §7) at this machine's
// measured sgemm rate.
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "unidiffuser/backend/cpu/ops.hpp"
#include "unidiffuser/io/safetensors.hpp"
#include "unidiffuser/sampler/ddim.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

namespace ud = unidiffuser;

namespace {

constexpr std::int64_t kBatch = 16;
constexpr std::int64_t kJoint = 4 * 64 * 64 + 512 + 77 * 64;  // 21,824

// A stand-in network: returns a fixed, realistic noise prediction (one copy of the state's size,
// which is included in the measured step cost), so the state stays bounded over repeated runs.
struct FreeModel {
  const ud::Tensor<float>* eps;
  void operator()(ud::TensorView<const float>, double, ud::TensorView<float> out) const {
    ud::ops::copy<float>(ud::Context<ud::cpu>{}, eps->view(), out);
  }
};
const ud::Tensor<float>& fixed_eps() {
  static const ud::Tensor<float> e = [] {
    ud::Tensor<float> t(ud::Shape{16, 4 * 64 * 64 + 512 + 77 * 64});
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(t.view()), ud::NoiseKey{2, 0}, 0);
    return t;
  }();
  return e;
}

ud::Tensor<float> state() {
  ud::Tensor<float> x(ud::Shape{kBatch, kJoint});
  ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(x.view()), ud::NoiseKey{1, 0}, 0);
  return x;
}

template <class Solver>
void run_sampler(benchmark::State& st, const Solver& s, int nfe) {
  auto x = state();
  auto ws = s.make_workspace(kBatch, kJoint);
  // initialise the workspace so that no step works on garbage
  s.sample(ud::Context<ud::cpu>{}, x.view(), FreeModel{&fixed_eps()}, ws);
  const auto x0 = state();
  for (auto _ : st) {
    ud::ops::copy<float>(ud::Context<ud::cpu>{}, x0.view(), x.view());  // same start every run
    s.sample(ud::Context<ud::cpu>{}, x.view(), FreeModel{&fixed_eps()}, ws);
    benchmark::DoNotOptimize(x.data());
  }
  st.counters["per_nfe_s"] =
      benchmark::Counter(static_cast<double>(nfe) * static_cast<double>(st.iterations()),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * nfe * kBatch * kJoint * 4 * 3);
}

ud::DpmSolverOptions opts(ud::SolverMethod m, int order, int steps) {
  ud::DpmSolverOptions o;
  o.method = m;
  o.order = order;
  o.steps = steps;
  return o;
}

void BM_DpmSolverPP_fast_o3(benchmark::State& st) {
  run_sampler(
      st, ud::DpmSolver<float>(ud::VPSchedule::unidiffuser(), opts(ud::SolverMethod::fast, 3, 50)),
      50);
}
void BM_DpmSolverPP_multistep_o3(benchmark::State& st) {
  run_sampler(
      st,
      ud::DpmSolver<float>(ud::VPSchedule::unidiffuser(), opts(ud::SolverMethod::multistep, 3, 50)),
      50);
}
void BM_DpmSolverPP_singlestep_o2(benchmark::State& st) {
  run_sampler(st,
              ud::DpmSolver<float>(ud::VPSchedule::unidiffuser(),
                                   opts(ud::SolverMethod::singlestep, 2, 50)),
              50);
}
void BM_DpmSolver_eps_fast_o3(benchmark::State& st) {
  auto o = opts(ud::SolverMethod::fast, 3, 50);
  o.predict_x0 = false;
  run_sampler(st, ud::DpmSolver<float>(ud::VPSchedule::unidiffuser(), o), 50);
}
void BM_DDIM_eta0(benchmark::State& st) {
  ud::DdimOptions o;
  run_sampler(st, ud::Ddim<float>(ud::VPSchedule::unidiffuser(), o), o.steps);
}
void BM_DDPM(benchmark::State& st) {
  ud::DdimOptions o;
  run_sampler(st, ud::Ddpm<float>(ud::VPSchedule::unidiffuser(), o), o.steps);
}
BENCHMARK(BM_DpmSolverPP_fast_o3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DpmSolverPP_multistep_o3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DpmSolverPP_singlestep_o2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DpmSolver_eps_fast_o3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DDIM_eta0)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_DDPM)->Unit(benchmark::kMillisecond);

void BM_PhiloxNormal(benchmark::State& st) {
  ud::Tensor<float> x(ud::Shape{kBatch, kJoint});
  std::uint64_t stream = 0;
  for (auto _ : st) {
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(x.view()), ud::NoiseKey{3, stream++},
                           0);
    benchmark::DoNotOptimize(x.data());
  }
  st.SetItemsProcessed(static_cast<std::int64_t>(st.iterations()) * x.size());
}
BENCHMARK(BM_PhiloxNormal)->Unit(benchmark::kMicrosecond);

void BM_ScheduleLambda(benchmark::State& st) {
  const auto ns = ud::VPSchedule::unidiffuser();
  double t = 0.001, acc = 0;
  for (auto _ : st) {
    acc += ns.marginal_lambda(t);
    t = t > 0.999 ? 0.001 : t + 0.000731;
  }
  benchmark::DoNotOptimize(acc);
  st.SetItemsProcessed(static_cast<std::int64_t>(st.iterations()));
}
void BM_ScheduleInverseLambda(benchmark::State& st) {
  const auto ns = ud::VPSchedule::unidiffuser();
  double l = -2.6, acc = 0;
  for (auto _ : st) {
    acc += ns.inverse_lambda(l);
    l = l > 3.5 ? -2.6 : l + 0.00731;
  }
  benchmark::DoNotOptimize(acc);
  st.SetItemsProcessed(static_cast<std::int64_t>(st.iterations()));
}
BENCHMARK(BM_ScheduleLambda);
BENCHMARK(BM_ScheduleInverseLambda);

std::string name_of(int k) {
  std::string s = "t";
  s += static_cast<char>('0' + k);
  return s;
}
void BM_SafetensorsLoad(benchmark::State& st) {
  const auto path =
      (std::filesystem::temp_directory_path() / "unidiffuser_bench_load.safetensors").string();
  const std::int64_t n = 16 << 20;  // 64 MiB of float32 in 8 tensors
  {
    ud::safetensors::Writer w;
    ud::Tensor<float> t(ud::Shape{n / 8});
    std::fill(t.begin(), t.end(), 0.5f);
    for (int k = 0; k < 8; ++k) w.add(name_of(k), t);
    w.write(path);
  }
  for (auto _ : st) {
    const auto f = ud::safetensors::File::read(path);
    for (int k = 0; k < 8; ++k) {
      auto t = f.get<float>(name_of(k));
      benchmark::DoNotOptimize(t.data());
    }
  }
  st.SetBytesProcessed(static_cast<std::int64_t>(st.iterations()) * n * 4);
  std::filesystem::remove(path);
}
BENCHMARK(BM_SafetensorsLoad)->Unit(benchmark::kMillisecond);

template <class F>
double median_seconds(F&& f, int reps) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// The sampler-step vs network-forward ratio, measured side by side.
void step_vs_forward() {
  // sgemm rate on a network-like shape: tokens (1105 for the official model) x 1536 x 1536
  const int m = 1105, k = 1536, n = 1536;
  Eigen::MatrixXf A = Eigen::MatrixXf::Random(m, k), B = Eigen::MatrixXf::Random(k, n), C(m, n);
  C.noalias() = A * B;
  const double gemm_s = median_seconds([&] { C.noalias() = A * B; }, 9);
  const double gflops = 2.0 * m * n * k / gemm_s / 1e9;
  const ud::DpmSolver<float> s(ud::VPSchedule::unidiffuser(), ud::DpmSolverOptions{});
  auto x = state();
  auto ws = s.make_workspace(kBatch, kJoint);
  s.sample(ud::Context<ud::cpu>{}, x.view(), FreeModel{&fixed_eps()}, ws);
  const auto x0 = state();
  const double run_s = median_seconds(
      [&] {
        ud::ops::copy<float>(ud::Context<ud::cpu>{}, x0.view(), x.view());
        s.sample(ud::Context<ud::cpu>{}, x.view(), FreeModel{&fixed_eps()}, ws);
      },
      15);
  const double step_s = run_s / s.nfe();              // per NFE, whole batch of 16
  const double forward_s = 2.33e12 / (gflops * 1e9);  // one forward of ONE sample
  std::printf("\nside-by-side (medians): Eigen sgemm %dx%dx%d: %.1f GFLOP/s\n", m, k, n, gflops);
  std::printf(
      "  DPM-Solver++ (official fast o3, 50 NFE) sampler work per NFE, B = 16 joint states: %.3f "
      "ms\n",
      step_s * 1e3);
  std::printf(
      "  estimated official v1 forward (2.33 TFLOP) at that rate: %.1f ms per sample, %.1f ms for "
      "B = 16\n",
      forward_s * 1e3, forward_s * 16 * 1e3);
  std::printf(
      "  ratio sampler step / network forward (same batch): %.5f %%  (requirement: < 1 %%)\n",
      100.0 * step_s / (forward_s * 16));
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  step_vs_forward();
  return 0;
}
