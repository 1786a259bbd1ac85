// SPDX-License-Identifier: Apache-2.0
// unidiffuser-bench-cuda: timings of the CUDA backend with CUDA events (median of repeats after a
// warm-up): the cuBLASLt matrix ceilings (fp32, TF32, bf16 at 8192^3); the fused attention at the
// official v1 shape (exact fp32 forward and backward; bf16 tensor-core forward, each kernel
// variant, and backward); the official v1 U-ViT forward (4x64x64 latent, 1,105 tokens) at batch
// 1 and 8 in the fp32, TF32 and bf16 math modes, with a per-layer-kind profile of the bf16
// forwards (nn::LayerProfile: a wait for the device around each layer); one training step
// (forward + backward) at batch 1 in each mode; and a guided t2i DPM-Solver++ run in bf16 (50
// steps by default). One JSON object per line, then a table. Exits 77 without a device.
//
// usage: unidiffuser-bench-cuda [--quick] [--steps N] [--depth D]
//        unidiffuser-bench-cuda --memory fp32|tf32|bf16 B [train]   (peak device memory of one
//        case, in a fresh process)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "unidiffuser/backend/ops.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

namespace ud = unidiffuser;
namespace nn = unidiffuser::nn;
using Dev = ud::cuda;

namespace {

struct Timer {
  cudaEvent_t a, b;
  Timer() {
    cudaEventCreate(&a);
    cudaEventCreate(&b);
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
};

// Median milliseconds of `reps` runs of f after `warm` warm-ups (events on the default stream).
template <class F>
double time_ms(int warm, int reps, F&& f) {
  for (int i = 0; i < warm; ++i) f();
  ud::ops::synchronize(ud::Context<Dev>{});
  Timer t;
  std::vector<double> v;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(t.a);
    f();
    cudaEventRecord(t.b);
    ud::cuda_detail::check(cudaEventSynchronize(t.b), "bench", "event");
    float ms = 0;
    cudaEventElapsedTime(&ms, t.a, t.b);
    v.push_back(ms);
  }
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Row {
  std::string what;
  double ms, tflops;
};
std::vector<Row> rows;
void report(const std::string& what, double ms, double flop) {
  const double tf = flop > 0 ? flop / (ms * 1e-3) / 1e12 : 0;
  std::printf("{\"bench\": \"%s\", \"ms\": %.4f, \"tflops\": %.2f}\n", what.c_str(), ms, tf);
  std::fflush(stdout);
  rows.push_back({what, ms, tf});
}

template <class T>
void gemm_peak(const char* name, std::int64_t n, bool tf32) {
  ud::Tensor<T, Dev> a(ud::Shape{n, n}), b(ud::Shape{n, n}), c(ud::Shape{n, n});
  ud::Context<Dev> ctx;
  ctx.math = tf32 ? ud::MathMode::tf32 : ud::MathMode::fp32;
  // random operands (zeros run faster than real data)
  if constexpr (std::is_floating_point_v<T>) {
    ud::ops::random_normal(ctx, ud::as_rows(a.view()), ud::NoiseKey{1, 1}, 0);
    ud::ops::random_normal(ctx, ud::as_rows(b.view()), ud::NoiseKey{1, 2}, 0);
  } else {
    ud::Tensor<float, Dev> f(ud::Shape{n, n});
    for (auto* t : {&a, &b}) {
      ud::ops::random_normal(ctx, ud::as_rows(f.view()), ud::NoiseKey{1, 3}, 0);
      const float* src = f.data();
      T* dst = t->data();
      ud::cuda_detail::for_each(
          ctx, n * n, [=] __device__(std::int64_t i) { dst[i] = T::from_float(src[i]); }, "cvt");
    }
  }
  ud::cuda_detail::Gemm<T> g;
  g.a = {a.data(), n, n, n, 0};
  g.b = {b.data(), n, n, n, 0};
  g.d = {c.data(), n, n, n, 0};
  const double ms = time_ms(2, 10, [&] { ud::cuda_detail::gemm(ctx, g, "bench"); });
  report(std::string("gemm ") + name + " " + std::to_string(n) + "^3", ms, 2.0 * n * n * n);
}

nn::UViTConfig v1_official(std::int64_t depth) {
  return nn::UViTConfig::official("v1", 64, 4, 2, 1536, depth, 24, 4.0, false, false, 64, 77, 512);
}

// FLOPs of one v1 forward per sample: GEMMs 2 L (4E^2 + 8E^2) per block + attention 4 L^2 E.
double v1_flop(std::int64_t depth, std::int64_t L = 1105, std::int64_t E = 1536) {
  const double blocks = static_cast<double>(depth + 1);
  const double per_block = 2.0 * L * 12.0 * E * E + 4.0 * L * L * E;
  const double skip = (depth / 2) * 2.0 * L * 2.0 * E * E;
  return blocks * per_block + skip;
}

// Random inputs of a batch of B for the v1 network (times 500, data type 1) and its outputs.
struct V1Batch {
  std::vector<ud::Tensor<float, Dev>> xs, ys;
  std::vector<double> t0, t1;
  std::vector<std::int64_t> dt;
  nn::UViTInputs<float, Dev> in;
  std::vector<ud::RowBlock<float, Dev>> ob;
  V1Batch(const nn::UViTConfig& cfg, std::int64_t B, const ud::Context<Dev>& ctx)
      : t0(static_cast<std::size_t>(B), 500.0), t1(t0), dt(static_cast<std::size_t>(B), 1) {
    xs.reserve(cfg.components.size());
    ys.reserve(cfg.components.size());
    for (const auto& c : cfg.components) {
      xs.emplace_back(ud::Shape{B, c.numel()});
      ys.emplace_back(ud::Shape{B, c.numel()});
      ud::ops::random_normal(ctx, ud::as_rows(xs.back().view()), ud::NoiseKey{3, xs.size()}, 0);
      in.x.push_back(ud::as_rows(ud::TensorView<const float, Dev>(xs.back().view())));
      ob.push_back(ud::as_rows(ys.back().view()));
    }
    in.t = {t0, t1};
    in.data_type = dt;
  }
  V1Batch(const V1Batch&) = delete;
  V1Batch& operator=(const V1Batch&) = delete;
};

// Peak device memory of one case in a fresh process (--memory MODE B [train]): memory taken
// with cudaMalloc (weights, 16-bit weight copies, workspaces, tensors) plus the high-water mark
// of the stream-ordered pool, the CUDA context excluded (PyTorch's max_memory_allocated counts
// its allocations the same way).
int memory_case(const std::string& mode_name, std::int64_t B, bool train, std::int64_t depth) {
  cudaFree(nullptr);
  std::size_t f0 = 0, total = 0;
  cudaMemGetInfo(&f0, &total);
  const double context = static_cast<double>(total - f0);
  int dev = 0;
  cudaGetDevice(&dev);
  cudaMemPool_t pool{};
  cudaDeviceGetMemPool(&pool, dev);
  ud::Context<Dev> ctx;
  ctx.math = mode_name == "bf16"   ? ud::MathMode::bf16
             : mode_name == "tf32" ? ud::MathMode::tf32
                                   : ud::MathMode::fp32;
  const auto cfg = v1_official(depth);
  nn::UViT<float, Dev> net(cfg);
  net.init_random(1, 0.02);
  V1Batch v(cfg, B, ctx);
  auto& in = v.in;
  auto& ob = v.ob;
  auto& ys = v.ys;
  typename nn::UViT<float, Dev>::Tape tape;
  std::vector<ud::RowBlock<const float, Dev>> dout;
  for (auto& y : ys) dout.push_back(ud::as_rows(ud::TensorView<const float, Dev>(y.view())));
  for (int i = 0; i < 2; ++i) {
    if (train) {
      net.zero_gradients();
      net.forward(ctx, in, ob, tape);
      net.backward(ctx, tape, dout);
    } else {
      net.forward(ctx, in, ob);
    }
  }
  ud::ops::synchronize(ctx);
  std::size_t f1 = 0;
  cudaMemGetInfo(&f1, &total);
  cuuint64_t reserved = 0, high = 0;
  cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved);
  cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high);
  const double direct = static_cast<double>(total - f1) - context - static_cast<double>(reserved);
  std::printf(
      "{\"memory\": \"v1 %s %s B=%lld\", \"peak_mib\": %.0f, \"cudamalloc_mib\": %.0f, "
      "\"pool_high_mib\": %.0f, \"context_mib\": %.0f}\n",
      train ? "train step" : "forward", mode_name.c_str(), static_cast<long long>(B),
      (direct + static_cast<double>(high)) / 1048576.0, direct / 1048576.0,
      static_cast<double>(high) / 1048576.0, context / 1048576.0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (ud::cuda_detail::device_count() == 0) {
    std::printf("SKIP: no CUDA device present (unidiffuser-bench-cuda needs a GPU)\n");
    return 77;
  }
  bool quick = false;
  int steps = 50;
  std::int64_t depth = 30;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    if (!std::strcmp(argv[i], "--steps") && i + 1 < argc) steps = std::atoi(argv[++i]);
    if (!std::strcmp(argv[i], "--depth") && i + 1 < argc) depth = std::atoll(argv[++i]);
  }
  for (int i = 1; i + 2 < argc; ++i)
    if (!std::strcmp(argv[i], "--memory")) try {
        return memory_case(argv[i + 1], std::atoll(argv[i + 2]),
                           i + 3 < argc && !std::strcmp(argv[i + 3], "train"), depth);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "unidiffuser-bench-cuda: error: %s\n", e.what());
        return 1;
      }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("{\"device\": \"%s\", \"sm\": %d, \"cc\": \"%d.%d\"}\n", prop.name,
              prop.multiProcessorCount, prop.major, prop.minor);
  try {
    gemm_peak<float>("fp32", 8192, false);
    gemm_peak<float>("tf32", 8192, true);
    gemm_peak<ud::bfloat16_t>("bf16", 8192, false);

    const auto cfg = v1_official(depth);
    const std::int64_t L = 1105, E = 1536, H = 24;
    const char* names[] = {"fp32", "tf32", "bf16", "fp16"};
    for (ud::MathMode mode : {ud::MathMode::fp32, ud::MathMode::bf16}) {  // attention alone, v1
      const std::string mn = names[static_cast<int>(mode)];
      for (std::int64_t B : {1, 8}) {
        ud::Tensor<float, Dev> qkv(ud::Shape{B, L, 3 * E}), out(ud::Shape{B, L, E});
        ud::Context<Dev> ctx;
        ctx.math = mode;
        ud::ops::random_normal(ctx, ud::as_rows(qkv.view()), ud::NoiseKey{2, 1}, 0);
        const ud::BatchBlock<const float, Dev> q(qkv.data(), B, L, 3 * E, 3 * E, L * 3 * E);
        const ud::BatchBlock<float, Dev> o(out.data(), B, L, E, E, L * E);
        const double ms = time_ms(1, 5, [&] { ud::ops::attention<float>(ctx, q, H, o); });
        report("attention " + mn + " fwd v1 B=" + std::to_string(B), ms, 4.0 * B * L * L * E);
        if (mode == ud::MathMode::bf16) {  // the kernel's other variant (attention_tc.cuh)
          const ud::cuda_detail::AttnGeom g{L, E, H, E / H, 3 * E, L * 3 * E, E, L * E};
          const float sc = ud::cuda_detail::attn_scale<float>(E / H);
          const double m2 = time_ms(1, 5, [&] {
            ud::cuda_detail::attention_tc<ud::bfloat16_t, 2>(ctx, qkv.data(), g, sc, out.data(), B,
                                                             "bench");
          });
          report("attention bf16 fwd v1 B=" + std::to_string(B) + " (16 rows per warp)", m2,
                 4.0 * B * L * L * E);
          const double m3 = time_ms(1, 5, [&] {
            ud::cuda_detail::attention_tc<ud::bfloat16_t, 3>(ctx, qkv.data(), g, sc, out.data(), B,
                                                             "bench");
          });
          report("attention bf16 fwd v1 B=" + std::to_string(B) + " (key tiles of 32)", m3,
                 4.0 * B * L * L * E);
        }
        ud::Tensor<float, Dev> dq(ud::Shape{B, L, 3 * E});
        const ud::BatchBlock<float, Dev> d(dq.data(), B, L, 3 * E, 3 * E, L * 3 * E);
        const double mb = time_ms(1, 3, [&] {
          ud::ops::attention_backward<float>(ctx, q, H, ud::BatchBlock<const float, Dev>(o), d);
        });
        report("attention " + mn + " bwd v1 B=" + std::to_string(B), mb, 10.0 * B * L * L * E);
      }
    }
    nn::UViT<float, Dev> net(cfg);
    net.init_random(1, 0.02);
    for (ud::MathMode mode : {ud::MathMode::fp32, ud::MathMode::tf32, ud::MathMode::bf16})
      for (std::int64_t B : {1, 8}) {
        if (quick && B == 8) continue;
        const std::string mn = names[static_cast<int>(mode)];
        ud::Context<Dev> ctx;
        ctx.math = mode;
        V1Batch v(cfg, B, ctx);
        auto& in = v.in;
        auto& ob = v.ob;
        auto& ys = v.ys;
        std::size_t f0 = 0, f1 = 0, total = 0;
        cudaMemGetInfo(&f0, &total);
        const double ms = time_ms(2, B == 1 ? 9 : 5, [&] { net.forward(ctx, in, ob); });
        cudaMemGetInfo(&f1, &total);
        report("v1 forward " + mn + " B=" + std::to_string(B), ms, v1_flop(depth) * B);
        std::printf("{\"device_memory_used_mib\": %.0f}\n", (total - f1) / 1048576.0);
        if (mode == ud::MathMode::bf16) {  // where the time goes, by layer kind (3 forwards)
          nn::LayerProfile prof;
          net.set_profile(&prof);
          for (int i = 0; i < 3; ++i) net.forward(ctx, in, ob);
          net.set_profile(nullptr);
          double sum = 0;
          for (std::size_t k = 0; k < nn::kLayerKinds; ++k)
            sum += prof.seconds(static_cast<nn::LayerKind>(k));
          for (std::size_t k = 0; k < nn::kLayerKinds; ++k) {
            const auto kind = static_cast<nn::LayerKind>(k);
            const double sec = prof.seconds(kind) / 3;
            std::printf(
                "{\"profile\": \"v1 forward %s B=%lld\", \"layer\": \"%s\", \"ms\": %.3f, "
                "\"share\": %.3f, \"tflops\": %.1f}\n",
                mn.c_str(), static_cast<long long>(B), nn::kLayerKindNames[k], sec * 1e3,
                prof.seconds(kind) / sum, sec > 0 ? prof.flop(kind) / 3 / sec / 1e12 : 0.0);
          }
        }
        if (B == 1) {  // one training step: training forward + backward
          typename nn::UViT<float, Dev>::Tape tape;
          std::vector<ud::RowBlock<const float, Dev>> dout;
          for (auto& y : ys)
            dout.push_back(ud::as_rows(ud::TensorView<const float, Dev>(y.view())));
          const double tr = time_ms(1, 3, [&] {
            net.zero_gradients();
            net.forward(ctx, in, ob, tape);
            net.backward(ctx, tape, dout);
          });
          report("v1 train step " + mn + " B=1", tr, 3.0 * v1_flop(depth));
        }
      }
    {  // guided t2i with DPM-Solver++ (scale 7, true_uncond), bf16
      ud::Context<Dev> ctx;
      ctx.math = ud::MathMode::bf16;
      const auto layout = cfg.layout<2>();
      for (std::int64_t B : {1, 8}) {
        if (quick && B == 8) continue;
        nn::UViTPredictor<float, 2, Dev> model(net, 1);
        ud::PhiloxNoise noise(7);
        ud::DpmSolverOptions o;
        o.steps = steps;
        const ud::DpmSolver<float, Dev> solver(
            ud::VPSchedule::unidiffuser(ud::TablePrecision::float64), o);
        ud::GuidanceOptions g;
        ud::Tensor<float, Dev> text(ud::Shape{B, layout.size(1)});
        ud::ops::random_normal(ctx, ud::as_rows(text.view()), ud::NoiseKey{9, 9}, 0);
        std::array<ud::TensorView<const float, Dev>, 2> cond{ud::TensorView<const float, Dev>{},
                                                             text.view()};
        const double ms = time_ms(0, 1, [&] {
          auto r =
              ud::sample_mode<float>(ctx, model, noise, layout, ud::Mode::t2i, g, solver, B, cond);
        });
        report("t2i " + std::to_string(steps) + " steps guided bf16 B=" + std::to_string(B), ms,
               2.0 * steps * v1_flop(depth) * B);
      }
    }
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    std::printf("{\"device_memory_used_mib\": %.0f}\n", (total_b - free_b) / 1048576.0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unidiffuser-bench-cuda: error: %s\n", e.what());
    return 1;
  }
  std::printf("\n%-40s %12s %10s\n", "benchmark", "median ms", "TFLOP/s");
  for (const auto& r : rows) std::printf("%-40s %12.3f %10.2f\n", r.what.c_str(), r.ms, r.tflops);
  return 0;
}
