// SPDX-License-Identifier: Apache-2.0
// unidiffuser-bench: whole-component timings printed as one JSON line.
//   unidiffuser-bench uvit --embed E --depth D --heads H --latent CxHxW --patch P --text LxD
//                          --clip D --batch B --threads T --repeat R [--version v0|v1] [--double]
//                          [--gemm auto|eigen|onednn] [--serve]
//   unidiffuser-bench fma  --threads T [--seconds S] [--serve]   (FP32 FMA peak of this machine)
// --gemm: the block GEMMs through Eigen or through oneDNN on packed weights (builds with
// UNIDIFFUSER_ONEDNN; auto = oneDNN where built in). --serve (for interleaved comparisons, see
// benchmarks/compare/compare_torch.py): after the warm-up, print one JSON line describing the
// run, then for every line read from stdin -- a count n for uvit, seconds for fma -- run and
// print one JSON line with the n forward times (ms) or the FMA rate; ends at end of input.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "unidiffuser/nn/uvit.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ud = unidiffuser;

namespace {

std::map<std::string, std::string> flags(int argc, char** argv, int first) {
  std::map<std::string, std::string> m;
  for (int i = first; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0) throw ud::error("unidiffuser-bench", k, "expected --flag");
    k = k.substr(2);
    if (k == "double" || k == "serve") {
      m[k] = "1";
      continue;
    }
    if (i + 1 >= argc) throw ud::error("unidiffuser-bench", "--" + k, "missing value");
    m[k] = argv[++i];
  }
  return m;
}
std::vector<std::int64_t> dims(const std::string& s, std::size_t n, const char* what) {
  std::vector<std::int64_t> d;
  std::size_t p = 0;
  while (p <= s.size()) {
    const auto q = s.find('x', p);
    d.push_back(
        std::atoll(s.substr(p, q == std::string::npos ? std::string::npos : q - p).c_str()));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  if (d.size() != n)
    throw ud::error("unidiffuser-bench", what,
                    "expected " + std::to_string(n) + " values joined by 'x', got '" + s + "'");
  return d;
}
double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

template <class T>
int bench_uvit(const std::map<std::string, std::string>& f) {
  auto get = [&](const char* k, const char* def) {
    auto it = f.find(k);
    return it == f.end() ? std::string(def) : it->second;
  };
  const auto lat = dims(get("latent", "4x32x32"), 3, "--latent");
  const auto txt = dims(get("text", "77x64"), 2, "--text");
  if (lat[1] != lat[2])
    throw ud::error("unidiffuser-bench", "--latent", "the U-ViT needs a square latent");
  const auto cfg = ud::nn::UViTConfig::official(
      get("version", "v1"), lat[1], lat[0], std::atoll(get("patch", "2").c_str()),
      std::atoll(get("embed", "512").c_str()), std::atoll(get("depth", "12").c_str()),
      std::atoll(get("heads", "8").c_str()), 4.0, false, false, txt[1], txt[0],
      std::atoll(get("clip", "512").c_str()));
  const std::int64_t B = std::atoll(get("batch", "1").c_str());
  const int threads = std::atoi(get("threads", "0").c_str()),
            repeat = std::max(1, std::atoi(get("repeat", "7").c_str()));
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
  const double rss0 = peak_rss_mib();
  ud::nn::UViT<T> net(cfg);
  net.init_random(1);
  const std::string gemm = get("gemm", "auto");
  if (gemm == "eigen")
    net.use_packed_gemm(false);
  else if (gemm == "onednn" && !net.packed_gemm_available())
    throw ud::error("unidiffuser-bench", "--gemm onednn",
                    "this build has no oneDNN path (configure with -DUNIDIFFUSER_ONEDNN=ON)");
  else if (gemm != "auto" && gemm != "onednn")
    throw ud::error("unidiffuser-bench", "--gemm", "expected auto, eigen or onednn; got " + gemm);
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
  auto once = [&] {
    model({x[0].view(), x[1].view()}, {std::span<const double>(ti), std::span<const double>(tt)},
          {o[0].view(), o[1].view()});
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
  const double gflop = net.flops() * static_cast<double>(B) / 1e9;
  const double weight_mib =
      static_cast<double>(net.parameter_count()) * sizeof(T) / (1024.0 * 1024.0);
  if (f.count("serve")) {
    std::printf(
        "{\"bench\": \"uvit\", \"serve\": true, \"gemm\": \"%s\", \"tokens\": %lld, \"params\": "
        "%lld, \"gflop\": %.4f}\n",
        gemm_used, static_cast<long long>(cfg.tokens()),
        static_cast<long long>(net.parameter_count()), gflop);
    std::fflush(stdout);
    int n = 0;
    while (std::scanf("%d", &n) == 1) {
      std::string line = "{\"ms\": [";
      for (double v : timed(std::max(1, n))) line += std::to_string(v) + ", ";
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
      "{\"bench\": \"uvit\", \"dtype\": \"%s\", \"gemm\": \"%s\", \"tokens\": %lld, \"params\": "
      "%lld, \"batch\": %lld, \"threads\": %d, "
      "\"gflop\": %.4f, \"ms_median\": %.3f, \"ms_min\": %.3f, \"ms_max\": %.3f, \"gflops\": %.2f, "
      "\"peak_rss_mib\": %.1f, \"weights_mib\": %.1f, \"rss_at_start_mib\": %.1f}\n",
      sizeof(T) == 4 ? "f32" : "f64", gemm_used, static_cast<long long>(cfg.tokens()),
      static_cast<long long>(net.parameter_count()), static_cast<long long>(B), threads, gflop, med,
      ms.front(), ms.back(), gflop / (med / 1e3), peak_rss_mib(), weight_mib, rss0);
  return 0;
}

// FP32 FMA peak: 12 independent 16-lane accumulators per thread (GCC vector extension; with
// -march=native each update is one vfmadd on a 512-bit register).
typedef float v16 __attribute__((vector_size(64)));
double fma_thread(double seconds, float* sink) {
  v16 acc[12];
  for (int i = 0; i < 12; ++i)
    for (int j = 0; j < 16; ++j) acc[i][j] = 1.0f + 0.001f * static_cast<float>(i + j);
  v16 a, b;
  for (int j = 0; j < 16; ++j) a[j] = 0.999999f, b[j] = 1e-7f;
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
    for (int j = 0; j < 16; ++j) s += acc[i][j];
  *sink = s;
  return static_cast<double>(iters) * 12 * 16 * 2 / el;
}
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
int bench_fma(const std::map<std::string, std::string>& f) {
  const int threads = f.count("threads") ? std::atoi(f.at("threads").c_str()) : 2;
  double secs = f.count("seconds") ? std::atof(f.at("seconds").c_str()) : 1.0;
  if (f.count("serve")) {
    std::printf("{\"bench\": \"fma\", \"serve\": true, \"threads\": %d}\n", threads);
    std::fflush(stdout);
    while (std::scanf("%lf", &secs) == 1) {
      std::printf("{\"gflops\": %.1f}\n", fma_rate(threads, secs) / 1e9);
      std::fflush(stdout);
    }
    return 0;
  }
  std::printf(
      "{\"bench\": \"fma\", \"threads\": %d, \"gflops\": %.1f, \"accumulators\": 12, \"lanes\": "
      "16}\n",
      threads, fma_rate(threads, secs) / 1e9);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) throw ud::error("unidiffuser-bench", "subcommand", "expected 'uvit' or 'fma'");
    const std::string cmd = argv[1];
    const auto f = flags(argc, argv, 2);
    if (cmd == "uvit") return f.count("double") ? bench_uvit<double>(f) : bench_uvit<float>(f);
    if (cmd == "fma") return bench_fma(f);
    throw ud::error("unidiffuser-bench", cmd, "unknown subcommand; expected 'uvit' or 'fma'");
  } catch (const ud::error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
