// SPDX-License-Identifier: Apache-2.0
// unidiffuser-bench: whole-component timings printed as one JSON line.
//   unidiffuser-bench uvit --embed E --depth D --heads H --latent CxHxW --patch P --text LxD
//                          --clip D --batch B --threads T --repeat R [--version v0|v1] [--double]
//                          [--gemm auto|eigen|onednn] [--dtype f32|bf16|f64] [--serve]
//   unidiffuser-bench uvit ... --profile: the forward's time and rate per layer kind
//   unidiffuser-bench train (the uvit options, [--recompute]): one training step instead
//   unidiffuser-bench sample (the uvit options, --mode M --steps N --scale S
//                          [--references batched|separate]): a whole sampling run instead
//   unidiffuser-bench fma  --threads T [--seconds S] [--serve]   (FP32 FMA peak of this machine)
// --gemm: the block GEMMs through Eigen or through oneDNN on packed weights (builds with
// UNIDIFFUSER_ONEDNN; auto = oneDNN where built in). --serve (for interleaved comparisons, see
// benchmarks/compare/compare_torch.py): after the warm-up, print one JSON line describing the
// run, then for every line read from stdin -- a count n for uvit / train / sample, seconds for
// fma -- run and print one JSON line with the n times (ms) or the FMA rate; ends at end of input.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cli.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"
#include "unidiffuser/train/trainer.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ud = unidiffuser;

namespace {

// "AxBxC": exactly n integers joined by 'x', each in 1..hi.
std::vector<std::int64_t> dims(const std::string& s, std::size_t n, const std::string& what,
                               std::int64_t hi) {
  std::vector<std::string> parts(1);
  for (char c : s) {
    if (c == 'x')
      parts.emplace_back();
    else
      parts.back().push_back(c);
  }
  if (parts.size() != n)
    ud::throw_mismatch(ud::cli::op, what, "dimensions",
                       std::to_string(n) + " integers joined by 'x'", "'" + s + "'");
  std::vector<std::int64_t> d;
  for (const auto& p : parts)
    d.push_back(ud::cli::parse_integer<std::int64_t>(p, what + " '" + s + "'", 1, hi));
  return d;
}
// The next request line of --serve, trimmed; false at end of input.
bool next_request(std::string& line) {
  while (std::getline(std::cin, line)) {
    const auto b = line.find_first_not_of(" \t\r");
    if (b == std::string::npos) continue;  // blank line
    line = line.substr(b, line.find_last_not_of(" \t\r") - b + 1);
    return true;
  }
  return false;
}
double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

// The network of the uvit / train / sample options.
ud::nn::UViTConfig config_of(const ud::cli::Args& a) {
  const auto lat = dims(a.text("latent", "4x32x32"), 3, "--latent", 65536);
  const auto txt = dims(a.text("text", "77x64"), 2, "--text", 65536);
  if (lat[1] != lat[2])
    ud::throw_mismatch(ud::cli::op, "--latent", "the U-ViT needs a square latent", "H == W",
                       a.text("latent"));
  const auto cfg = ud::nn::UViTConfig::official(
      a.choice("version", "v1", {"v0", "v1"}), lat[1], lat[0],
      a.integer<std::int64_t>("patch", 2, 1, 65536),
      a.integer<std::int64_t>("embed", 512, 1, 65536),
      a.integer<std::int64_t>("depth", 12, 1, 4096), a.integer<std::int64_t>("heads", 8, 1, 65536),
      4.0, false, false, txt[1], txt[0], a.integer<std::int64_t>("clip", 512, 1, 65536));
  ud::check_config_bounds(cfg);
  return cfg;
}

// Threads for OpenMP and Eigen (0: their defaults).
void set_threads(int threads) {
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
}
// A network of random weights on the --gemm path: eigen (no packing), else oneDNN on weights
// packed as `packing` says where the build has it (onednn: required).
template <class T>
std::unique_ptr<ud::nn::UViT<T>> random_network(const ud::nn::UViTConfig& cfg,
                                                const std::string& gemm,
                                                ud::nn::WeightPacking packing) {
  auto net = std::make_unique<ud::nn::UViT<T>>(cfg);
  net->init_random(1);
  if (gemm == "onednn" && !net->packed_gemm_available())
    throw ud::error("unidiffuser-bench", "--gemm onednn",
                    "this build has no oneDNN path (configure with -DUNIDIFFUSER_ONEDNN=ON)");
  net->set_weight_packing(gemm == "eigen" ? ud::nn::WeightPacking::none : packing);
  return net;
}

// --dtype bf16: the context's math mode, or fp32 with a note on stderr where this build or CPU
// has no bf16 products.
ud::MathMode math_of(const ud::cli::Args& a) {
  if (a.choice("dtype", "f32", {"f32", "bf16", "f64"}) != "bf16") return ud::MathMode::fp32;
  if (ud::ops::math_supported(ud::Context<ud::cpu>{}, ud::MathMode::bf16))
    return ud::MathMode::bf16;
  std::fprintf(stderr,
               "unidiffuser-bench: note: --dtype bf16 needs a oneDNN build on a CPU with "
               "AVX512-BF16 or AMX; this run computes fp32\n");
  return ud::MathMode::fp32;
}
const char* dtype_name(std::size_t size, ud::MathMode math) {
  return size == 8 ? "f64" : math == ud::MathMode::bf16 ? "bf16" : "f32";
}

double fma_rate(int threads, double secs);
int effective_threads(int threads) {
  if (threads > 0) return threads;
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// --profile: `repeat` rounds of (the FMA peak for 0.2 s, one forward with a layer profile), then
// one JSON line per layer kind -- its time per forward (thread time / threads), share of the
// forward, products and rate as a fraction of the median FMA peak -- one for the rest (thread
// time outside the profiled layers: imbalance, waits, glue) and one for the whole forward.
template <class T, class F>
int profile_forwards(ud::nn::UViT<T>& net, F&& once, int repeat, int threads, double gflop) {
  ud::nn::LayerProfile prof;
  net.set_profile(&prof);
  std::vector<double> peaks;
  double wall = 0;
  for (int r = 0; r < repeat; ++r) {
    peaks.push_back(fma_rate(threads, 0.2) / 1e9);
    const auto t0 = std::chrono::steady_clock::now();
    once();
    wall += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  net.set_profile(nullptr);
  std::sort(peaks.begin(), peaks.end());
  const double peak = peaks[peaks.size() / 2], n = static_cast<double>(repeat),
               th = static_cast<double>(threads), fwd_ms = wall / n * 1e3;
  double in_layers = 0;
  auto line = [&](const char* kind, double ms, double gf) {
    std::printf(
        "{\"bench\": \"uvit_profile\", \"kind\": \"%s\", \"ms_per_forward\": %.3f, \"share\": "
        "%.4f, \"gflop_per_forward\": %.4f, \"gflops\": %.2f, \"peak_fraction\": %.4f}\n",
        kind, ms, ms / fwd_ms, gf, ms > 0 ? gf / (ms / 1e3) : 0.0,
        ms > 0 ? gf / (ms / 1e3) / peak : 0.0);
  };
  for (std::size_t k = 0; k < ud::nn::kLayerKinds; ++k) {
    const auto kind = static_cast<ud::nn::LayerKind>(k);
    const double ms = prof.seconds(kind) / th / n * 1e3;
    in_layers += ms;
    line(ud::nn::kLayerKindNames[k], ms, prof.flop(kind) / n / 1e9);
  }
  line("rest", std::max(0.0, fwd_ms - in_layers), 0.0);
  std::printf(
      "{\"bench\": \"uvit_profile\", \"kind\": \"forward\", \"ms_per_forward\": %.3f, "
      "\"gflop_per_forward\": %.4f, \"gflops\": %.2f, \"peak_fraction\": %.4f, \"threads\": %d, "
      "\"forwards\": %d, \"fma_peak_gflops\": %.1f}\n",
      fwd_ms, gflop, gflop / (fwd_ms / 1e3), gflop / (fwd_ms / 1e3) / peak, threads, repeat, peak);
  return 0;
}

// `train`: one training step (training forward with its tape, the UniDiffuser loss gradient,
// backward, AdamW, EMA) instead of one forward.
template <class T>
int bench_uvit(const ud::cli::Args& a, bool train) {
  const auto cfg = config_of(a);
  const std::int64_t B = a.integer<std::int64_t>("batch", 1, 1, 65536);
  const int threads = a.threads(), repeat = a.integer("repeat", 7, 1, 100000);
  const std::string gemm = a.choice("gemm", "auto", {"auto", "eigen", "onednn"});
  const ud::MathMode math = math_of(a);
  if (train && a.choice("dtype", "f32", {"f32", "bf16", "f64"}) == "bf16")
    throw ud::error("unidiffuser-bench train", "--dtype bf16",
                    "bf16 is an inference mode; train in f32 (or f64)");
  if (math == ud::MathMode::bf16 && gemm == "eigen")
    throw ud::error("unidiffuser-bench", "--dtype bf16",
                    "bf16 products run through oneDNN; --gemm eigen is fp32 only");
  // bf16: the block weights packed in place as bf16 (half their memory), as for inference
  const auto packing =
      math == ud::MathMode::bf16 ? ud::nn::WeightPacking::in_place : ud::nn::WeightPacking::copies;
  ud::check_memory_fits(ud::estimate_memory<T>(cfg, B, 0, 0, packing), "unidiffuser-bench uvit");
  set_threads(threads);
  const double rss0 = peak_rss_mib();
  const auto owned = random_network<T>(cfg, gemm, packing);
  ud::nn::UViT<T>& net = *owned;
  const char* gemm_used = net.packed_gemm() ? "onednn" : "eigen";
  ud::nn::UViTPredictor<T, 2> model(net);
  const auto& layout = model.layout();
  std::array<ud::Tensor<T>, 2> x, o;
  for (std::size_t g = 0; g < 2; ++g) {
    x[g] = ud::Tensor<T>(ud::Shape{B, layout.size(g)});
    o[g] = ud::Tensor<T>(ud::Shape{B, layout.size(g)});
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(x[g].view()), ud::NoiseKey{2, g}, 0);
  }
  std::vector<double> ti(static_cast<std::size_t>(B), 500.0),
      tt(static_cast<std::size_t>(B), 250.0);
  std::unique_ptr<ud::train::Trainer<T, 2>> trainer;
  if (train) {
    ud::train::TrainerOptions<T, 2> to;
    to.batch = B;
    to.lr.lr = 1e-5;
    to.recompute = a.has("recompute");
    trainer = std::make_unique<ud::train::Trainer<T, 2>>(
        net, to,
        [](std::uint64_t seed, std::int64_t, std::int64_t first,
           const std::array<ud::RowBlock<T>, 2>& x0, std::span<std::int64_t>) {
          for (std::size_t g = 0; g < 2; ++g)
            ud::ops::random_normal(ud::Context<ud::cpu>{}, x0[g], ud::NoiseKey{seed, 50 + g},
                                   static_cast<std::uint64_t>(first));
        });
  }
  auto once = [&] {
    if (trainer) {
      trainer->step(ud::Context<ud::cpu>{threads, math});
      return;
    }
    model(ud::Context<ud::cpu>{threads, math}, {x[0].view(), x[1].view()},
          {std::span<const double>(ti), std::span<const double>(tt)}, {o[0].view(), o[1].view()});
  };
  auto timed = [&](int n) {
    std::vector<double> ms;
    for (int r = 0; r < n; ++r) {
      const auto a = std::chrono::steady_clock::now();
      once();
      ms.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
    }
    return ms;
  };
  once();  // warm-up: workspace allocation, page faults, weight packing
  // a training step: forward, and a backward of about twice its products
  const double gflop = net.flops() * static_cast<double>(B) / 1e9 * (train ? 3.0 : 1.0);
  if (a.has("profile")) {
    if (train)
      throw ud::error("unidiffuser-bench train", "--profile",
                      "profiles the forward's layers: use 'unidiffuser-bench uvit --profile'");
    if (a.has("serve"))
      throw ud::error("unidiffuser-bench uvit", "--profile", "not with --serve: choose one");
    return profile_forwards(net, once, repeat, effective_threads(threads), gflop);
  }
  const char* bench = train ? "train" : "uvit";
  const double weight_mib =
      static_cast<double>(net.parameter_count()) * sizeof(T) / (1024.0 * 1024.0);
  if (a.has("serve")) {
    std::printf(
        "{\"bench\": \"%s\", \"serve\": true, \"dtype\": \"%s\", \"gemm\": \"%s\", "
        "\"tokens\": %lld, \"params\": %lld, \"gflop\": %.4f}\n",
        bench, dtype_name(sizeof(T), math), gemm_used, static_cast<long long>(cfg.tokens()),
        static_cast<long long>(net.parameter_count()), gflop);
    std::fflush(stdout);
    std::string request;
    while (next_request(request)) {
      const int n =
          ud::cli::parse_integer<int>(request, "--serve request (forward count)", 1, 100000);
      std::string line = "{\"ms\": [";
      for (double v : timed(n)) line += std::to_string(v) + ", ";
      line.resize(line.size() - 2);
      std::printf("%s]}\n", line.c_str());
      std::fflush(stdout);
    }
    return 0;
  }
  auto ms = timed(repeat);
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  std::printf(
      "{\"bench\": \"%s\", \"dtype\": \"%s\", \"gemm\": \"%s\", \"tokens\": %lld, \"params\": "
      "%lld, \"batch\": %lld, \"threads\": %d, "
      "\"gflop\": %.4f, \"ms_median\": %.3f, \"ms_min\": %.3f, \"ms_max\": %.3f, \"gflops\": %.2f, "
      "\"peak_rss_mib\": %.1f, \"weights_mib\": %.1f, \"rss_at_start_mib\": %.1f}\n",
      bench, dtype_name(sizeof(T), math), gemm_used, static_cast<long long>(cfg.tokens()),
      static_cast<long long>(net.parameter_count()), static_cast<long long>(B), threads, gflop, med,
      ms.front(), ms.back(), gflop / (med / 1e3), peak_rss_mib(), weight_mib, rss0);
  return 0;
}

// The network of a sampling run, timing its calls: the sampler's and the guidance's own work is
// the rest of the run.
template <class T>
struct TimedNet {
  ud::nn::UViTPredictor<T, 2>* model;
  double ms = 0;
  std::uint64_t calls = 0, rows = 0;
  void operator()(const ud::Context<ud::cpu>& ctx, const std::array<ud::TensorView<const T>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<T>, 2>& out) {
    const auto a = std::chrono::steady_clock::now();
    (*model)(ctx, x, t, out);
    ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count();
    ++calls;
    rows += static_cast<std::uint64_t>(x[0].dim(0));
  }
};

// A whole sampling run of an official mode (DPM-Solver++, the fast driver of order 3 on the
// time-uniform grid, as the official sampling script; the sample tool's default) on random
// weights and random conditions: the initial noise, every step's network calls with guidance,
// the solver updates and the results.
template <class T>
int bench_sample(const ud::cli::Args& a) {
  const auto cfg = config_of(a);
  const std::int64_t B = a.integer<std::int64_t>("batch", 1, 1, 65536);
  const int threads = a.threads(), repeat = a.integer("repeat", 3, 1, 100000);
  const std::string gemm = a.choice("gemm", "auto", {"auto", "eigen", "onednn"});
  const std::string mode = a.choice("mode", "t2i", {"joint", "t2i", "i2t", "i", "t"});
  const std::string refs = a.choice("references", "batched", {"batched", "separate"});
  const ud::MathMode math = math_of(a);
  if (math == ud::MathMode::bf16 && gemm == "eigen")
    throw ud::error("unidiffuser-bench", "--dtype bf16",
                    "bf16 products run through oneDNN; --gemm eigen is fp32 only");
  ud::GuidanceOptions g;
  g.scale = a.real("scale", 7.0, 0.0, 1000.0);
  g.batch_references = refs == "batched";
  ud::DpmSolverOptions so;
  so.steps = a.integer("steps", 20, 1, 1000);
  const ud::Task<2> task = mode == "joint" ? ud::tasks::joint()
                           : mode == "t2i" ? ud::tasks::t2i()
                           : mode == "i2t" ? ud::tasks::i2t()
                           : mode == "i"   ? ud::tasks::i()
                                           : ud::tasks::t();
  // the network's largest call: the main and reference rows batched
  const std::int64_t per_call = g.scale != 0 && g.batch_references
                                    ? 1 + static_cast<std::int64_t>(task.count(ud::Role::generate))
                                    : 1;
  const auto packing =
      gemm == "eigen" ? ud::nn::WeightPacking::none : ud::nn::WeightPacking::in_place;
  ud::check_memory_fits(ud::estimate_memory<T>(cfg, B * per_call, 0, 0, packing),
                        "unidiffuser-bench sample");
  set_threads(threads);
  const double rss0 = peak_rss_mib();
  // sampling never reads the weights back: packed in place
  const auto owned = random_network<T>(cfg, gemm, packing);
  ud::nn::UViT<T>& net = *owned;
  const char* gemm_used = net.packed_gemm() ? "onednn" : "eigen";
  ud::nn::UViTPredictor<T, 2> model(net);
  const auto& layout = model.layout();
  std::array<ud::Tensor<T>, 2> cond;
  std::array<ud::TensorView<const T>, 2> cv{};
  for (std::size_t k = 0; k < 2; ++k) {
    if (task.roles[k] != ud::Role::condition) continue;
    cond[k] = ud::Tensor<T>(ud::Shape{B, layout.size(k)});
    ud::ops::random_normal(ud::Context<ud::cpu>{}, ud::as_rows(cond[k].view()), ud::NoiseKey{3, k},
                           0);
    cv[k] = cond[k].view();
  }
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  const auto grid = ud::VPSchedule::unidiffuser(ud::TablePrecision::float32_reference);
  const ud::DpmSolver<T> solver(ns, so, &grid);
  TimedNet<T> timed_net{&model};
  struct Run {
    double ms, net_ms;
  };
  auto once = [&] {
    ud::PhiloxNoise noise(7);  // the same run every time
    timed_net.ms = 0;
    const auto t0 = std::chrono::steady_clock::now();
    auto out = ud::sample_task<T, 2>(ud::Context<ud::cpu>{threads, math}, timed_net, noise, layout,
                                     task, g, solver, B, cv);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    for (const auto& o : out)  // a non-finite sample would mean a broken run, not a slow one
      for (std::int64_t i = 0; i < o.size(); ++i)
        if (!std::isfinite(static_cast<double>(o.data()[i])))
          throw ud::error("unidiffuser-bench sample", "result", "non-finite sample value");
    return Run{ms, timed_net.ms};
  };
  auto timed = [&](int n) {
    std::vector<Run> r;
    for (int i = 0; i < n; ++i) r.push_back(once());
    return r;
  };
  once();  // warm-up: workspaces, page faults, weight packing
  const std::uint64_t calls = timed_net.calls, rows = timed_net.rows;
  const double gflop = net.flops() * static_cast<double>(rows) / 1e9;
  const auto describe = [&](std::string extra) {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "\"bench\": \"sample\", \"mode\": \"%s\", \"steps\": %d, \"scale\": %g, "
                  "\"references\": \"%s\", \"dtype\": \"%s\", \"gemm\": \"%s\", \"tokens\": "
                  "%lld, \"params\": "
                  "%lld, \"batch\": %lld, \"threads\": %d, \"network_calls\": %llu, "
                  "\"network_rows\": %llu, \"gflop\": %.4f",
                  mode.c_str(), so.steps, g.scale, refs.c_str(), dtype_name(sizeof(T), math),
                  gemm_used, static_cast<long long>(cfg.tokens()),
                  static_cast<long long>(net.parameter_count()), static_cast<long long>(B), threads,
                  static_cast<unsigned long long>(calls), static_cast<unsigned long long>(rows),
                  gflop);
    return "{" + std::string(buf) + extra + "}";
  };
  if (a.has("serve")) {
    std::printf("%s\n", describe(", \"serve\": true").c_str());
    std::fflush(stdout);
    std::string request;
    while (next_request(request)) {
      const int n = ud::cli::parse_integer<int>(request, "--serve request (run count)", 1, 100000);
      std::string ms = "{\"ms\": [", net_ms = "\"net_ms\": [";
      for (const auto& r : timed(n)) {
        ms += std::to_string(r.ms) + ", ";
        net_ms += std::to_string(r.net_ms) + ", ";
      }
      ms.resize(ms.size() - 2);
      net_ms.resize(net_ms.size() - 2);
      std::printf("%s], %s]}\n", ms.c_str(), net_ms.c_str());
      std::fflush(stdout);
    }
    return 0;
  }
  auto runs = timed(repeat);
  std::sort(runs.begin(), runs.end(), [](const Run& x, const Run& y) { return x.ms < y.ms; });
  const Run med = runs[runs.size() / 2];
  char buf[512];
  std::snprintf(buf, sizeof buf,
                ", \"ms_median\": %.3f, \"ms_min\": %.3f, \"ms_max\": %.3f, "
                "\"network_ms\": %.3f, \"outside_network\": %.5f, \"gflops\": %.2f, "
                "\"peak_rss_mib\": %.1f, \"weights_mib\": %.1f, \"rss_at_start_mib\": %.1f",
                med.ms, runs.front().ms, runs.back().ms, med.net_ms, (med.ms - med.net_ms) / med.ms,
                gflop / (med.ms / 1e3), peak_rss_mib(),
                static_cast<double>(net.parameter_count()) * sizeof(T) / (1024.0 * 1024.0), rss0);
  std::printf("%s\n", describe(buf).c_str());
  return 0;
}

// FP32 FMA peak: 12 independent accumulators per thread, each one register of the widest vector
// the build targets (GCC vector extension: 16 lanes with AVX-512, 8 with AVX / AVX2, else 4), so
// that with -march=native each update is one vfmadd on a register and the 12 accumulators and two
// operands fit in the register file (16 registers without AVX-512: a 16-lane vector there takes
// two, and 24 accumulator registers spill).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vlane __attribute__((vector_size(kLanes * sizeof(float))));
double fma_thread(double seconds, float* sink) {
  vlane acc[12];
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < kLanes; ++j) acc[i][j] = 1.0f + 0.001f * static_cast<float>(i + j);
  vlane a, b;
  for (int j = 0; j < kLanes; ++j) a[j] = 0.999999f, b[j] = 1e-7f;
  std::uint64_t iters = 0;
  const auto t0 = std::chrono::steady_clock::now();
  double el = 0;
  do {
    for (int k = 0; k < 4096; ++k)
      for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + b;
    iters += 4096;
    el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  } while (el < seconds);
  float s = 0;
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < kLanes; ++j) s += acc[i][j];
  *sink = s;
  return static_cast<double>(iters) * 12 * kLanes * 2 / el;
}
constexpr double kMinSeconds = 1e-3, kMaxSeconds = 3600;
double fma_rate(int threads, double secs) {
  std::vector<double> rate(static_cast<std::size_t>(threads));
  std::vector<float> sink(static_cast<std::size_t>(threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      rate[static_cast<std::size_t>(t)] = fma_thread(secs, &sink[static_cast<std::size_t>(t)]);
    });
  for (auto& p : pool) p.join();
  double total = 0;
  for (double r : rate) total += r;
  return total;
}
int bench_fma(const ud::cli::Args& a) {
  int threads = a.threads(2);  // 0: one per hardware thread
  if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double secs = a.real("seconds", 1.0, kMinSeconds, kMaxSeconds);
  if (a.has("serve")) {
    std::printf("{\"bench\": \"fma\", \"serve\": true, \"threads\": %d}\n", threads);
    std::fflush(stdout);
    std::string request;
    while (next_request(request)) {
      const double s =
          ud::cli::parse_real(request, "--serve request (seconds)", kMinSeconds, kMaxSeconds);
      std::printf("{\"gflops\": %.1f}\n", fma_rate(threads, s) / 1e9);
      std::fflush(stdout);
    }
    return 0;
  }
  std::printf(
      "{\"bench\": \"fma\", \"threads\": %d, \"gflops\": %.1f, \"accumulators\": 12, \"lanes\": "
      "%d}\n",
      threads, fma_rate(threads, secs) / 1e9, kLanes);
  return 0;
}

const char* kUsage = R"(usage: unidiffuser-bench uvit [options] [--profile]
       unidiffuser-bench train [options] [--recompute]
       unidiffuser-bench sample [options] [--mode M] [--steps N] [--scale S] [--references R]
       unidiffuser-bench fma [--threads T] [--seconds S] [--serve]

Whole-component timings printed as one JSON line.

uvit options (U-ViT forward on random weights; train: one training step -- forward with its tape,
the loss gradient, backward, AdamW, EMA -- on random data, --recompute for per-block recomputation;
gflop counts 3x the forward's products):
  --embed E             embedding width                                  1..65536   [512]
  --depth D             blocks                                           1..4096    [12]
  --heads H             attention heads                                  1..65536   [8]
  --latent CxHxW        image latent, H == W                             each 1..65536 [4x32x32]
  --patch P             patch size                                       1..65536   [2]
  --text LxD            text tokens x text dim                           each 1..65536 [77x64]
  --clip D              CLIP image embedding dim                         1..65536   [512]
  --batch B             samples per forward                              1..65536   [1]
  --repeat R            timed forwards (median reported)                 1..100000  [7]
  --version V           v0 | v1                                                     [v1]
  --gemm G              auto | eigen | onednn (onednn needs UNIDIFFUSER_ONEDNN)     [auto]
  --dtype D             f32 | bf16 | f64 (bf16: block GEMMs with bf16 operands and fp32
                        accumulation, block weights packed in place as bf16 -- needs oneDNN
                        and a CPU with AVX512-BF16 or AMX, else a note and f32; not for
                        train)                                                      [f32]
  --double              float64 instead of float32 (--dtype f64)
  --profile             (uvit) where the forward's time goes: --repeat rounds of the FMA peak
                        (0.2 s) and one forward with a layer profile, then one JSON line per
                        layer kind (embed, skip_linear, layer_norm, qkv, attention, proj,
                        fc1_gelu, fc2, heads; then the rest, and the whole forward): time per
                        forward (thread time / threads), share, GFLOP and the rate as a fraction
                        of the median FMA peak of the same rounds
sample options (the uvit options, and: a whole sampling run of an official mode on random
weights and random conditions -- DPM-Solver++, fast driver, order 3 -- timed with its network
calls apart; gflop counts the network rows of one run; --repeat defaults to 3):
  --mode M              joint | t2i | i2t | i | t                                   [t2i]
  --steps N             solver steps (network evaluations)               1..1000    [20]
  --scale S             guidance scale (0: none)                         0..1000    [7]
  --references R        batched (the reference calls of a step in the main call) |
                        separate (one call each, as the official code)              [batched]
fma options (FP32 FMA peak of this machine):
  --seconds S           measuring time                                   0.001..3600 [1]
common:
  --threads T           threads, 0 = all (fma: one per hardware thread)  0..4 x hardware threads
                        (at most 1024)                                   [uvit 0, fma 2]
  --serve               after the warm-up print one JSON line describing the run, then for every
                        line of stdin (uvit, train, sample: a count 1..100000 of forwards, steps or
                        runs; fma: seconds) run and print one JSON line ("ms": the times; sample
                        also "net_ms": the network's share of each run); ends at end of input. A
                        malformed line is an error.

Errors: one line "unidiffuser-bench: error: ..." on stderr and exit code 1.)";

int bench_main(int argc, char** argv) {
  if (argc >= 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h")) {
    std::puts(kUsage);
    return 0;
  }
  if (argc < 2)
    throw ud::error(ud::cli::op, "subcommand",
                    "missing; expected 'uvit', 'train', 'sample' or 'fma' (see --help)");
  const std::string cmd = argv[1];
  std::vector<ud::cli::Option> known;
  if (cmd == "uvit" || cmd == "train")
    known = {
        {"embed"},   {"depth"},         {"heads"},         {"latent"},       {"patch"},
        {"text"},    {"clip"},          {"batch"},         {"threads"},      {"repeat"},
        {"version"}, {"gemm"},          {"double", false}, {"serve", false}, {"recompute", false},
        {"dtype"},   {"profile", false}};
  else if (cmd == "sample")
    known = {{"embed"},      {"depth"},         {"heads"},        {"latent"},  {"patch"},
             {"text"},       {"clip"},          {"batch"},        {"threads"}, {"repeat"},
             {"version"},    {"gemm"},          {"mode"},         {"steps"},   {"scale"},
             {"references"}, {"double", false}, {"serve", false}, {"dtype"}};
  else if (cmd == "fma")
    known = {{"threads"}, {"seconds"}, {"serve", false}};
  else
    ud::throw_mismatch(ud::cli::op, "subcommand", "unknown subcommand",
                       "'uvit', 'train', 'sample' or 'fma'", "'" + cmd + "'");
  const ud::cli::Args a(known, argc, argv, 2);
  if (a.help()) {
    std::puts(kUsage);
    return 0;
  }
  if (cmd == "fma") return bench_fma(a);
  const bool f64 = a.has("double") || a.choice("dtype", "f32", {"f32", "bf16", "f64"}) == "f64";
  if (cmd == "sample") return f64 ? bench_sample<double>(a) : bench_sample<float>(a);
  const bool train = cmd == "train";
  return f64 ? bench_uvit<double>(a, train) : bench_uvit<float>(a, train);
}

}  // namespace

int main(int argc, char** argv) {
  return ud::cli::run_main("unidiffuser-bench", [&] { return bench_main(argc, argv); });
}
