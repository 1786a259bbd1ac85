// SPDX-License-Identifier: Apache-2.0
// unidiffuser-sample: UniDiffuser sampling from a U-ViT checkpoint in any of the seven official
// modes. See `unidiffuser-sample --help`.
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli.hpp"
#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
#include "unidiffuser/nn/uvit_predictor.hpp"
#include "unidiffuser/sampler/ddim.hpp"
#include "unidiffuser/sampler/dpm_solver.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace ud = unidiffuser;

namespace {

const char* kUsage = R"(usage: unidiffuser-sample --checkpoint FILE --mode MODE --out FILE [options]

Samples UniDiffuser from a U-ViT checkpoint (official or diffusers tensor names, F32/F16/BF16)
and writes the generated latents / text embeddings as safetensors.

  --checkpoint FILE     U-ViT weights (.safetensors)
  --prefix P            only tensors whose names start with P (e.g. param/)       [none]
  --config FILE         JSON config (official constructor arguments + "version"); default: the
                        checkpoint's "config" metadata
  --mode MODE           joint | t2i | i2t | i | t | i2t2i | t2i2t
  --conditions FILE     safetensors with the clean conditions the mode needs (float dtypes
                        F32/F16/BF16/F64; exactly one sample's shape, or [1, ...] or [B, ...]):
                          text      [L, Dt]                 (alias y; t2i, t2i2t)
                          img       [C, H, W]               (alias z; i2t, i2t2i)
                          clip_img  [1, Dc]                 (alias c; i2t, i2t2i)
                          empty_text [L, Dt]                (only with --t2i-cfg-mode empty_token)
  --out FILE            output .safetensors (written atomically; must differ from every input,
                        its directory must exist and be writable)
  --steps N             number of function evaluations, 1..100000                  [50]
  --scale S             classifier-free guidance scale (official convention),
                        -1000..1000                                                 [7]
  --t2i-cfg-mode M      true_uncond | empty_token                                    [true_uncond]
  --sampler S           dpm_solver++ | dpm_solver | ddim | ddpm                      [dpm_solver++]
  --method M            fast | singlestep | multistep (DPM-Solver only)               [fast]
  --order K             solver order, 1..3                                           [3]
  --skip-type T         time_uniform | logSNR | time_quadratic | t2                  [time_uniform]
  --seed N              noise seed, 0..18446744073709551615                          [1234]
  --batch B             samples, 1..4096                                             [1]
  --threads T           CPU threads, 0 (= all) .. 4 x hardware threads (at most 1024) [0]
  --data-type D         v1 data-type token, 0..1                                     [1]
  --allow-nonfinite-weights
                        load a checkpoint holding NaN or infinite weights (refused otherwise)
  --quiet               no progress on stderr

Before the network is allocated, the config is checked against bounds and the checkpoint's
tensors, and the memory the run needs is compared with the memory available.

Exit codes: 0 success; 1 error (one line "unidiffuser-sample: error: ..." on stderr, no output
written); 2 sampling completed and the output was written, but it holds NaN or infinite values
(counted per output tensor on stderr).

Decoding latents into pixels and text embeddings into captions needs the VAE, CLIP and GPT-2
caption models, which this library does not include yet.)";

constexpr const char* kProgram = "unidiffuser-sample";

const std::vector<ud::cli::Option> kOptions = {
    {"checkpoint"},   {"prefix"},     {"config"},
    {"mode"},         {"conditions"}, {"out"},
    {"steps"},        {"scale"},      {"sampler"},
    {"t2i-cfg-mode"}, {"method"},     {"order"},
    {"skip-type"},    {"seed"},       {"batch"},
    {"threads"},      {"data-type"},  {"allow-nonfinite-weights", false},
    {"quiet", false}};

// A condition tensor for group component `spec`, broadcast to B rows: [B, numel]. The stored
// shape must be the component's, or [1] / [B] followed by it; the dtype must be a float type.
ud::Tensor<float> condition(const ud::safetensors::File& f, const ud::ComponentSpec& spec,
                            const std::string& name, const char* alias, std::int64_t batch) {
  const std::string n = f.contains(name) ? name : alias;
  const std::string subject = f.source() + ": " + n;
  if (!f.contains(n))
    throw ud::error("conditions", f.source() + ": " + name,
                    std::string("condition tensor missing (alias '") + alias + "')");
  const auto& info = f.info(n);
  if (info.type != ud::dtype::f32 && info.type != ud::dtype::f16 && info.type != ud::dtype::bf16 &&
      info.type != ud::dtype::f64)
    ud::throw_mismatch("conditions", subject, "condition dtype", "F32, F16, BF16 or F64",
                       ud::dtype_name(info.type));
  std::vector<std::int64_t> one(spec.shape.rank());
  for (int i = 0; i < spec.shape.rank(); ++i) one[static_cast<std::size_t>(i)] = spec.shape[i];
  std::vector<std::int64_t> single = one, rows = one;
  single.insert(single.begin(), 1);
  rows.insert(rows.begin(), batch);
  const bool broadcast = info.shape == one || info.shape == single;
  if (!broadcast && info.shape != rows)
    ud::throw_mismatch("conditions", subject, "condition shape",
                       ud::safetensors::detail::shape_str(one) + " (one sample) or " +
                           ud::safetensors::detail::shape_str(rows) + " (the batch)",
                       ud::safetensors::detail::shape_str(info.shape));
  const auto v = f.get_vector<float>(n);
  const std::int64_t numel = spec.numel();
  ud::Tensor<float> out(ud::Shape{batch, numel});
  for (std::int64_t b = 0; b < batch; ++b)
    std::copy_n(v.data() + (broadcast ? 0 : b * numel), numel, out.data() + b * numel);
  for (float x : out)
    if (!std::isfinite(x)) throw ud::error("conditions", subject, "contains NaN or infinity");
  return out;
}

// The network with a progress line per NFE on stderr.
struct Progress {
  ud::nn::UViTPredictor<float, 2>* net = nullptr;
  int per_nfe = 1, nfe = 0, calls = 0;
  bool quiet = false;
  std::string stage;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void operator()(const ud::Context<ud::cpu>& ctx,
                  const std::array<ud::TensorView<const float>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<float>, 2>& out) {
    (*net)(ctx, x, t, out);
    ++calls;
    if (!quiet && calls % per_nfe == 0) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "\r%s step %d/%d  %.1fs", stage.c_str(), calls / per_nfe, nfe, s);
      if (calls / per_nfe == nfe) std::fprintf(stderr, "\n");
    }
  }
};

template <class Sampler>
std::array<ud::Tensor<float>, 2> run(Progress& prog, ud::PhiloxNoise& noise,
                                     const ud::GroupLayout<2>& layout, ud::Mode mode,
                                     const ud::GuidanceOptions& g, const Sampler& sampler,
                                     std::int64_t batch,
                                     std::array<ud::TensorView<const float>, 2> cond,
                                     std::array<ud::TensorView<const float>, 2> null) {
  std::array<ud::Tensor<float>, 2> result;
  int stage = 0;
  const auto stages = ud::tasks::stages(mode);
  for (const auto& task : stages) {
    auto c = cond;
    for (std::size_t k = 0; k < 2; ++k)
      if (task.roles[k] == ud::Role::condition && result[k].size() > 0) c[k] = result[k].view();
    ud::GuidedPredictor<float, 2, Progress, ud::PhiloxNoise> probe(
        ud::Context<ud::cpu>{}, prog, noise, layout, task, g, batch, c, null);
    prog.per_nfe = probe.forwards_per_call();
    prog.nfe = sampler.nfe();
    prog.calls = 0;
    prog.stage = stages.size() > 1
                     ? "stage " + std::to_string(++stage) + "/" + std::to_string(stages.size())
                     : "";
    auto out = ud::sample_task<float, 2>(ud::Context<ud::cpu>{}, prog, noise, layout, task, g,
                                         sampler, batch, c, null);
    for (std::size_t k = 0; k < 2; ++k)
      if (task.generated(k)) result[k] = std::move(out[k]);
  }
  return result;
}

namespace fs = std::filesystem;

// An input file must exist and be a regular file (a directory or a device is refused before
// anything reads it).
void check_input(const std::string& path, const char* option) {
  std::error_code ec;
  const auto st = fs::status(path, ec);
  if (ec || !fs::exists(st))
    throw ud::error("input file", std::string(option) + " " + path, "no such file");
  if (!fs::is_regular_file(st))
    throw ud::error("input file", std::string(option) + " " + path, "not a regular file");
}

// The output must not be any input, must not be a directory, and its directory must exist and
// be writable: all checked before sampling.
void check_output(const std::string& out,
                  const std::vector<std::pair<const char*, std::string>>& inputs) {
  std::error_code ec;
  const fs::path o = fs::weakly_canonical(fs::absolute(out), ec);
  for (const auto& [option, in] : inputs) {
    if (in.empty()) continue;
    std::error_code e1, e2;
    const bool same = fs::equivalent(out, in, e1) ||
                      (!ec && fs::weakly_canonical(fs::absolute(in), e2) == o && !e2);
    if (same)
      throw ud::error("output file", "--out " + out,
                      std::string("is the same file as ") + option + " " + in +
                          "; refusing to overwrite an input");
  }
  if (fs::is_directory(out, ec)) throw ud::error("output file", "--out " + out, "is a directory");
  fs::path dir = fs::absolute(out).parent_path();
  if (!fs::is_directory(dir, ec))
    throw ud::error("output file", "--out " + out,
                    "the output directory " + dir.string() + " does not exist");
  if (::access(dir.c_str(), W_OK | X_OK) != 0)
    throw ud::error(
        "output file", "--out " + out,
        "the output directory " + dir.string() + " is not writable: " + std::strerror(errno));
}

// The network config: --config FILE (a JSON object) or the checkpoint's "config" metadata.
ud::nn::UViTConfig load_config(const std::string& path, const ud::safetensors::File& f,
                               const std::string& prefix) {
  try {
    if (path.empty()) return ud::checkpoint_config(f, prefix);
    std::ifstream in(path);
    if (!in) throw ud::error("config", "--config " + path, "cannot open the config file");
    const auto j = nlohmann::json::parse(in);
    if (!j.is_object())
      ud::throw_mismatch("config", "--config " + path, "config JSON", "an object {...}",
                         std::string(j.type_name()));
    return ud::checkpoint_config_from(j, f, prefix);
  } catch (const nlohmann::json::exception& e) {
    throw ud::error("config", path.empty() ? f.source() + ": config metadata" : "--config " + path,
                    std::string("malformed config: ") + e.what());
  }
}

// Non-finite values per output tensor, e.g. "img: 3 of 256"; empty when all are finite.
std::string nonfinite_report(const std::vector<std::pair<std::string, ud::Tensor<float>>>& outs) {
  std::string r;
  for (const auto& [name, t] : outs) {
    std::int64_t bad = 0;
    for (float v : t) bad += !std::isfinite(v);
    if (bad)
      r += (r.empty() ? "" : ", ") + name + ": " + std::to_string(bad) + " of " +
           std::to_string(t.size());
  }
  return r;
}

int main_impl(int argc, char** argv) {
  const ud::cli::Args a(kOptions, argc, argv);
  if (a.help()) {
    std::puts(kUsage);
    return 0;
  }
  // 1. every option, before any file is read
  const std::string ckpt = a.required("checkpoint"), out_path = a.required("out");
  const ud::Mode mode = ud::parse_mode(a.required("mode"));
  const std::string prefix = a.text("prefix"), config_path = a.text("config");
  const std::string cond_path = a.text("conditions");
  const int steps = a.integer("steps", 50, 1, 100000), order = a.integer("order", 3, 1, 3);
  const std::int64_t batch = a.integer<std::int64_t>("batch", 1, 1, 4096);
  const std::uint64_t seed = a.integer<std::uint64_t>("seed", 1234, 0, UINT64_MAX);
  const std::int64_t data_type = a.integer<std::int64_t>("data-type", 1, 0, 1);
  const int threads = a.threads();
  const std::string sampler =
      a.choice("sampler", "dpm_solver++", {"dpm_solver++", "dpm_solver", "ddim", "ddpm"});
  const std::string method = a.choice("method", "fast", {"fast", "singlestep", "multistep"});
  const std::string skip_type = a.text("skip-type", "time_uniform");
  const auto spacing = ud::parse_spacing(skip_type);
  ud::GuidanceOptions g;
  g.scale = a.real("scale", 7.0, -1000, 1000);
  const std::string cfg_mode =
      a.choice("t2i-cfg-mode", "true_uncond", {"true_uncond", "empty_token"});
  if (cfg_mode == "empty_token") g.cfg_mode = ud::CfgMode::empty_condition;
  const bool needs_text = mode == ud::Mode::t2i || mode == ud::Mode::t2i2t;
  const bool needs_img = mode == ud::Mode::i2t || mode == ud::Mode::i2t2i;
  if (g.cfg_mode == ud::CfgMode::empty_condition && !needs_text)
    throw ud::error(ud::cli::op, "--t2i-cfg-mode", "empty_token applies to t2i and t2i2t only");
  const bool needs_conditions = needs_text || needs_img;
  if (needs_conditions && cond_path.empty())
    throw ud::error(ud::cli::op, "--conditions",
                    "required for mode " + std::string(ud::mode_name(mode)) + " (see --help)");

  // 2. files: inputs are regular files, the output is none of them and can be written
  check_input(ckpt, "--checkpoint");
  if (!config_path.empty()) check_input(config_path, "--config");
  if (!cond_path.empty()) check_input(cond_path, "--conditions");
  check_output(out_path,
               {{"--checkpoint", ckpt}, {"--config", config_path}, {"--conditions", cond_path}});

#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);

  // 3. config and checkpoint checked, memory estimated, before the network is allocated
  const auto f = ud::safetensors::File::read(ckpt);
  const auto cfg = load_config(config_path, f, prefix);
  ud::check_config_bounds(cfg);
  ud::check_checkpoint(cfg, f, prefix);
  const auto layout = cfg.layout<2>();
  // The guided predictor calls the network with one batch of rows at a time; its own buffers,
  // the solver's workspace and the results take a few more [B, D] matrices (16 is generous).
  auto need = ud::estimate_memory<float>(cfg, batch);
  const std::uint64_t extra = 16 * static_cast<std::uint64_t>(batch) *
                              static_cast<std::uint64_t>(layout.size(0) + layout.size(1)) *
                              sizeof(float);
  const auto add = [](std::uint64_t x, std::uint64_t y) {
    return x > UINT64_MAX - y ? UINT64_MAX : x + y;
  };
  need.workspace = add(need.workspace, extra);
  need.total = add(need.total, extra);
  ud::check_memory_fits(need, "sampling batch " + std::to_string(batch) + " (network + buffers)");

  // 4. conditions
  std::array<ud::Tensor<float>, 2> cond, null;
  std::array<ud::TensorView<const float>, 2> cv{}, nv{};
  if (needs_conditions) {
    const auto cf = ud::safetensors::File::read(cond_path);
    const auto& img = layout.group(ud::tasks::image);
    const auto& txt = layout.group(ud::tasks::text);
    if (needs_text) {
      cond[1] = condition(cf, txt.components[0], "text", "y", batch);
      cv[1] = cond[1].view();
    }
    if (needs_img) {
      auto z = condition(cf, img.components[0], "img", "z", batch);
      auto c = condition(cf, img.components[1], "clip_img", "c", batch);
      cond[0] = ud::Tensor<float>(ud::Shape{batch, layout.size(0)});
      for (std::int64_t b = 0; b < batch; ++b) {
        std::copy_n(z.data() + b * z.dim(1), z.dim(1), cond[0].data() + b * layout.size(0));
        std::copy_n(c.data() + b * c.dim(1), c.dim(1),
                    cond[0].data() + b * layout.size(0) + z.dim(1));
      }
      cv[0] = cond[0].view();
    }
    if (g.cfg_mode == ud::CfgMode::empty_condition) {
      null[1] = condition(cf, txt.components[0], "empty_text", "empty_y", batch);
      nv[1] = null[1].view();
    }
  }

  // 5. the network
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f, prefix, ud::CheckpointNaming::automatic,
                      a.has("allow-nonfinite-weights"));
  ud::nn::UViTPredictor<float, 2> model(net, data_type);

  // 6. sampling
  // coefficients from the float64 table, time grid from the reference's float32 table
  // (docs/NOTES.md)
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  const auto grid = ud::VPSchedule::unidiffuser(ud::TablePrecision::float32_reference);
  ud::PhiloxNoise noise(seed);
  Progress prog;
  prog.net = &model;
  prog.quiet = a.has("quiet");
  std::array<ud::Tensor<float>, 2> result;
  if (sampler == "dpm_solver++" || sampler == "dpm_solver") {
    ud::DpmSolverOptions o;
    o.steps = steps;
    o.order = order;
    o.method = ud::parse_solver_method(method);
    o.skip_type = spacing;
    o.predict_x0 = sampler == "dpm_solver++";
    const ud::DpmSolver<float> s(ns, o, &grid);
    result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
  } else {
    ud::DdimOptions o;
    o.steps = steps;
    o.skip_type = spacing;
    o.seed = seed;
    if (sampler == "ddpm") {
      const ud::Ddpm<float> s(ns, o);
      result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
    } else {
      const ud::Ddim<float> s(ns, o);
      result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
    }
  }

  // 7. output
  std::vector<std::pair<std::string, ud::Tensor<float>>> outs;
  for (std::size_t k = 0; k < 2; ++k) {
    if (result[k].size() == 0) continue;
    const auto& grp = layout.group(k);
    for (std::size_t c = 0; c < grp.components.size(); ++c) {
      const auto& spec = grp.components[c];
      std::vector<std::int64_t> dims{batch};
      for (int i = 0; i < spec.shape.rank(); ++i) dims.push_back(spec.shape[i]);
      ud::Tensor<float> t(ud::Shape::from_range(dims.begin(), dims.end()));
      for (std::int64_t b = 0; b < batch; ++b)
        std::copy_n(result[k].data() + b * layout.size(k) + layout.offset(k, c), spec.numel(),
                    t.data() + b * spec.numel());
      outs.emplace_back(spec.name, std::move(t));
    }
  }
  ud::safetensors::Writer w;
  for (const auto& [name, t] : outs) w.add<float>(name, t);
  nlohmann::json settings = {{"mode", std::string(ud::mode_name(mode))},
                             {"steps", steps},
                             {"scale", g.scale},
                             {"sampler", sampler},
                             {"method", method},
                             {"order", order},
                             {"skip_type", skip_type},
                             {"seed", seed},
                             {"batch", batch},
                             {"t2i_cfg_mode", cfg_mode},
                             {"checkpoint", ckpt},
                             {"data_type", data_type}};
  w.metadata("settings", settings.dump());
  w.metadata("config", cfg.to_json().dump());
  w.write(out_path);
  const std::string bad = nonfinite_report(outs);
  if (!bad.empty()) {
    ud::cli::report(kProgram, "the output holds NaN or infinite values (" + bad +
                                  "); the file was written anyway: " + out_path);
    return 2;
  }
  if (!a.has("quiet")) std::fprintf(stderr, "wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ud::cli::run_main(kProgram, [&] { return main_impl(argc, argv); });
}
