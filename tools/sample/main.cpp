// SPDX-License-Identifier: Apache-2.0
// unidiffuser-sample: UniDiffuser sampling from a U-ViT checkpoint in any of the seven official
// modes. See `unidiffuser-sample --help`.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "unidiffuser/diffusion/noise.hpp"
#include "unidiffuser/diffusion/pipeline.hpp"
#include "unidiffuser/io/checkpoint.hpp"
#include "unidiffuser/nn/uvit.hpp"
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
  --conditions FILE     safetensors with the clean conditions the mode needs:
                          text      [L, Dt] or [B, L, Dt]   (alias y; t2i, t2i2t)
                          img       [C, H, W] or [B, C, H, W] (alias z; i2t, i2t2i)
                          clip_img  [1, Dc] or [B, 1, Dc]   (alias c; i2t, i2t2i)
                          empty_text [L, Dt]                (only with --t2i-cfg-mode empty_token)
  --out FILE            output .safetensors (written atomically)
  --steps N             number of function evaluations                              [50]
  --scale S             classifier-free guidance scale (official convention)        [7]
  --t2i-cfg-mode M      true_uncond | empty_token                                    [true_uncond]
  --sampler S           dpm_solver++ | dpm_solver | ddim | ddpm                      [dpm_solver++]
  --method M            fast | singlestep | multistep (DPM-Solver only)               [fast]
  --order K             solver order                                                 [3]
  --skip-type T         time_uniform | logSNR | time_quadratic | t2                  [time_uniform]
  --seed N              noise seed                                                   [1234]
  --batch B             samples                                                      [1]
  --threads T           CPU threads (0 = all)                                        [0]
  --data-type D         v1 data-type token                                           [1]
  --quiet               no progress on stderr

Decoding latents into pixels and text embeddings into captions needs the VAE, CLIP and GPT-2
caption models, which this library does not include yet.)";

struct Args {
  std::map<std::string, std::string> kv;
  bool quiet = false;
  std::string get(const std::string& k, const std::string& def = "") const {
    auto it = kv.find(k);
    return it == kv.end() ? def : it->second;
  }
  std::string need(const std::string& k) const {
    auto it = kv.find(k);
    if (it == kv.end())
      throw ud::error("unidiffuser-sample", "--" + k, "required option missing (see --help)");
    return it->second;
  }
  long long num(const std::string& k, long long def) const {
    const std::string v = get(k);
    if (v.empty()) return def;
    char* end = nullptr;
    const long long r = std::strtoll(v.c_str(), &end, 10);
    if (!end || *end)
      throw ud::error("unidiffuser-sample", "--" + k, "expected an integer, got '" + v + "'");
    return r;
  }
  double real(const std::string& k, double def) const {
    const std::string v = get(k);
    if (v.empty()) return def;
    char* end = nullptr;
    const double r = std::strtod(v.c_str(), &end);
    if (!end || *end || !std::isfinite(r))
      throw ud::error("unidiffuser-sample", "--" + k, "expected a finite number, got '" + v + "'");
    return r;
  }
};

Args parse(int argc, char** argv) {
  Args a;
  static const char* known[] = {"checkpoint", "prefix",   "config",    "mode",         "conditions",
                                "out",        "steps",    "scale",     "t2i-cfg-mode", "sampler",
                                "method",     "order",    "skip-type", "seed",         "batch",
                                "threads",    "data-type"};
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "--help" || s == "-h") {
      std::puts(kUsage);
      std::exit(0);
    }
    if (s == "--quiet") {
      a.quiet = true;
      continue;
    }
    if (s.rfind("--", 0) != 0)
      throw ud::error("unidiffuser-sample", s, "unexpected argument (see --help)");
    s = s.substr(2);
    bool ok = false;
    for (const char* k : known) ok = ok || s == k;
    if (!ok) throw ud::error("unidiffuser-sample", "--" + s, "unknown option (see --help)");
    if (i + 1 >= argc) throw ud::error("unidiffuser-sample", "--" + s, "missing value");
    a.kv[s] = argv[++i];
  }
  return a;
}

// A condition tensor for group component `name`, broadcast to B rows: [B, numel].
ud::Tensor<float> condition(const ud::safetensors::File& f, const std::string& name,
                            const char* alias, std::int64_t numel, std::int64_t batch) {
  std::string n = f.contains(name) ? name : alias;
  if (!f.contains(n))
    throw ud::error("unidiffuser-sample", f.source() + ": " + name,
                    std::string("condition tensor missing (alias '") + alias + "')");
  const auto t = f.get<float>(n);
  ud::Tensor<float> out(ud::Shape{batch, numel});
  if (t.size() == numel) {
    for (std::int64_t b = 0; b < batch; ++b) std::copy(t.begin(), t.end(), out.data() + b * numel);
  } else if (t.size() == numel * batch) {
    std::copy(t.begin(), t.end(), out.data());
  } else {
    ud::throw_mismatch("unidiffuser-sample", f.source() + ": " + n, "element count",
                       std::to_string(numel) + " (one sample) or " + std::to_string(numel * batch) +
                           " (the batch)",
                       t.shape().str());
  }
  for (float v : out)
    if (!std::isfinite(v))
      throw ud::error("unidiffuser-sample", f.source() + ": " + n, "contains NaN or infinity");
  return out;
}

// The network with a progress line per NFE on stderr.
struct Progress {
  ud::nn::UViTPredictor<float, 2>* net = nullptr;
  int per_nfe = 1, nfe = 0, calls = 0;
  bool quiet = false;
  std::string stage;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void operator()(const std::array<ud::TensorView<const float>, 2>& x,
                  const std::array<std::span<const double>, 2>& t,
                  const std::array<ud::TensorView<float>, 2>& out) {
    (*net)(x, t, out);
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
    ud::GuidedPredictor<float, 2, Progress, ud::PhiloxNoise> probe(prog, noise, layout, task, g,
                                                                   batch, c, null);
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

int main_impl(int argc, char** argv) {
  const Args a = parse(argc, argv);
  const std::string ckpt = a.need("checkpoint"), out_path = a.need("out");
  const ud::Mode mode = ud::parse_mode(a.need("mode"));
  const std::string prefix = a.get("prefix");
  const auto f = ud::safetensors::File::read(ckpt);
  nlohmann::json cfg_json;
  if (!a.get("config").empty()) {
    std::ifstream in(a.get("config"));
    if (!in) throw ud::error("unidiffuser-sample", a.get("config"), "cannot open the config file");
    try {
      cfg_json = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw ud::error("unidiffuser-sample", a.get("config"),
                      std::string("malformed JSON: ") + e.what());
    }
  }
  const auto cfg = a.get("config").empty() ? ud::checkpoint_config(f, prefix)
                                           : ud::checkpoint_config_from(cfg_json, f, prefix);
  const std::int64_t batch = a.num("batch", 1), steps = a.num("steps", 50),
                     order = a.num("order", 3);
  if (batch < 1 || batch > 4096)
    ud::throw_mismatch("unidiffuser-sample", "--batch", "batch size", "1..4096", batch);
  const int threads = static_cast<int>(a.num("threads", 0));
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);

  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f, prefix);
  ud::nn::UViTPredictor<float, 2> model(net, a.num("data-type", 1));
  const auto& layout = model.layout();

  // conditions
  std::array<ud::Tensor<float>, 2> cond, null;
  std::array<ud::TensorView<const float>, 2> cv{}, nv{};
  const bool needs_text = mode == ud::Mode::t2i || mode == ud::Mode::t2i2t;
  const bool needs_img = mode == ud::Mode::i2t || mode == ud::Mode::i2t2i;
  ud::GuidanceOptions g;
  g.scale = a.real("scale", 7.0);
  const std::string cfg_mode = a.get("t2i-cfg-mode", "true_uncond");
  if (cfg_mode == "empty_token")
    g.cfg_mode = ud::CfgMode::empty_condition;
  else if (cfg_mode != "true_uncond")
    throw ud::error("unidiffuser-sample", "--t2i-cfg-mode",
                    "expected true_uncond or empty_token, got '" + cfg_mode + "'");
  if (needs_text || needs_img || g.cfg_mode == ud::CfgMode::empty_condition) {
    const auto cf = ud::safetensors::File::read(a.need("conditions"));
    const auto& img = layout.group(ud::tasks::image);
    const auto& txt = layout.group(ud::tasks::text);
    if (needs_text) {
      cond[1] = condition(cf, "text", "y", txt.components[0].numel(), batch);
      cv[1] = cond[1].view();
    }
    if (needs_img) {
      auto z = condition(cf, "img", "z", img.components[0].numel(), batch);
      auto c = condition(cf, "clip_img", "c", img.components[1].numel(), batch);
      cond[0] = ud::Tensor<float>(ud::Shape{batch, layout.size(0)});
      for (std::int64_t b = 0; b < batch; ++b) {
        std::copy_n(z.data() + b * z.dim(1), z.dim(1), cond[0].data() + b * layout.size(0));
        std::copy_n(c.data() + b * c.dim(1), c.dim(1),
                    cond[0].data() + b * layout.size(0) + z.dim(1));
      }
      cv[0] = cond[0].view();
    }
    if (g.cfg_mode == ud::CfgMode::empty_condition) {
      if (mode != ud::Mode::t2i && mode != ud::Mode::t2i2t)
        throw ud::error("unidiffuser-sample", "--t2i-cfg-mode",
                        "empty_token applies to t2i and t2i2t only");
      null[1] = condition(cf, "empty_text", "empty_y", txt.components[0].numel(), batch);
      nv[1] = null[1].view();
    }
  }

  const std::string sampler = a.get("sampler", "dpm_solver++");
  // coefficients from the float64 table, time grid from the reference's float32 table
  // (docs/NOTES.md)
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  const auto grid = ud::VPSchedule::unidiffuser(ud::TablePrecision::float32_reference);
  ud::PhiloxNoise noise(static_cast<std::uint64_t>(a.num("seed", 1234)));
  Progress prog;
  prog.net = &model;
  prog.quiet = a.quiet;
  std::array<ud::Tensor<float>, 2> result;
  if (sampler == "dpm_solver++" || sampler == "dpm_solver") {
    ud::DpmSolverOptions o;
    o.steps = static_cast<int>(steps);
    o.order = static_cast<int>(order);
    o.method = ud::parse_solver_method(a.get("method", "fast"));
    o.skip_type = ud::parse_spacing(a.get("skip-type", "time_uniform"));
    o.predict_x0 = sampler == "dpm_solver++";
    const ud::DpmSolver<float> s(ns, o, &grid);
    result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
  } else if (sampler == "ddim" || sampler == "ddpm") {
    ud::DdimOptions o;
    o.steps = static_cast<int>(steps);
    o.skip_type = ud::parse_spacing(a.get("skip-type", "time_uniform"));
    o.seed = static_cast<std::uint64_t>(a.num("seed", 1234));
    if (sampler == "ddpm") {
      const ud::Ddpm<float> s(ns, o);
      result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
    } else {
      const ud::Ddim<float> s(ns, o);
      result = run(prog, noise, layout, mode, g, s, batch, cv, nv);
    }
  } else {
    throw ud::error("unidiffuser-sample", "--sampler",
                    "expected dpm_solver++, dpm_solver, ddim or ddpm, got '" + sampler + "'");
  }

  ud::safetensors::Writer w;
  for (std::size_t k = 0; k < 2; ++k) {
    if (result[k].size() == 0) continue;
    const auto& grp = layout.group(k);
    for (std::size_t c = 0; c < grp.components.size(); ++c) {
      const auto& spec = grp.components[c];
      ud::Tensor<float> t(ud::Shape{batch, spec.numel()});
      for (std::int64_t b = 0; b < batch; ++b)
        std::copy_n(result[k].data() + b * layout.size(k) + layout.offset(k, c), spec.numel(),
                    t.data() + b * spec.numel());
      std::vector<std::int64_t> dims{batch};
      for (int i = 0; i < spec.shape.rank(); ++i) dims.push_back(spec.shape[i]);
      w.add<float>(spec.name, t.view().reshape(ud::Shape::from_range(dims.begin(), dims.end())));
    }
  }
  nlohmann::json settings = {{"mode", std::string(ud::mode_name(mode))},
                             {"steps", steps},
                             {"scale", g.scale},
                             {"sampler", sampler},
                             {"method", a.get("method", "fast")},
                             {"order", order},
                             {"skip_type", a.get("skip-type", "time_uniform")},
                             {"seed", a.num("seed", 1234)},
                             {"batch", batch},
                             {"t2i_cfg_mode", cfg_mode},
                             {"checkpoint", ckpt},
                             {"data_type", a.num("data-type", 1)}};
  w.metadata("settings", settings.dump());
  w.metadata("config", cfg.to_json().dump());
  w.write(out_path);
  if (!a.quiet) std::fprintf(stderr, "wrote %s\n", out_path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return main_impl(argc, argv);
  } catch (const ud::error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
