// SPDX-License-Identifier: Apache-2.0
// unidiffuser-sample: UniDiffuser sampling from a U-ViT checkpoint in any of the seven official
// modes. See `unidiffuser-sample --help`.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
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

const char* kUsage =
    R"(usage: unidiffuser-sample --checkpoint FILE (--mode MODE | --task SPEC) --out FILE [options]

Samples UniDiffuser from a U-ViT checkpoint (official or diffusers tensor names, F32/F16/BF16;
any saved layout of 1 to 8 timestep groups) and writes the generated components as safetensors.

  --checkpoint FILE     U-ViT weights (.safetensors)
  --prefix P            only tensors whose names start with P (e.g. param/)       [none]
  --config FILE         JSON config: official constructor arguments + "version", the general
                        form of any layout, or diffusers' config.json; default: the checkpoint's
                        "config" metadata
  --mode MODE           an official mode (two-group layouts): joint | t2i | i2t | i | t | i2t2i |
                        t2i2t
  --task SPEC           any task of any layout, instead of --mode: stages separated by '>' (run
                        in order), each GENERATE[|CONDITION], groups separated by ',' and named by
                        a component (img, text, audio, ...), the group's time name or its index;
                        groups in neither list are marginalised. A conditioned group takes the
                        value an earlier stage sampled, else --conditions. Spaces are ignored.
                        Examples: "img|text" (= t2i), "img,audio|text" (one-to-many),
                        "text|img,audio" (many-to-one), "text|img > img|text" (= i2t2i),
                        "img,text,audio" (joint), "audio" (marginal)
  --conditions FILE     safetensors with the clean conditions the task needs, one tensor per
                        component of each conditioned group, named as the component (float dtypes
                        F32/F16/BF16/F64; exactly one sample's shape, or [1, ...] or [B, ...]):
                          text      [L, Dt]                 (alias y; t2i, t2i2t)
                          img       [C, H, W]               (alias z; i2t, i2t2i)
                          clip_img  [1, Dc]                 (alias c; i2t, i2t2i)
                          empty_text [L, Dt]                (only with --t2i-cfg-mode empty_token;
                                                             empty_NAME for any conditioned NAME)
  --out FILE            output .safetensors (written atomically; must differ from every input,
                        its directory must exist and be writable)
  --steps N             number of function evaluations, 1..100000                  [50]
  --scale S             classifier-free guidance scale (official convention),
                        -1000..1000                                                 [7]
  --guidance-rescale P  rescale phi of the guided data prediction, 0..1 (not official:
                        GuidanceOptions::rescale)                                     [0]
  --guidance-interval LO,HI
                        guide only at solver times tau in [LO, HI], 0 <= LO <= HI <= 1 (not
                        official: GuidanceOptions::interval_lo, interval_hi)          [0,1]
  --guidance-references R
                        batched: a step's reference calls in the main call's forward, (1 + R) B
                        rows, the same samples bit for bit; separate: one forward each, as the
                        official code (less memory) (GuidanceOptions::batch_references) [batched]
  --t2i-cfg-mode M      true_uncond | empty_token                                    [true_uncond]
  --sampler S           dpm_solver++ | dpm_solver | ddim | ddpm                      [dpm_solver++]
  --method M            fast | singlestep | multistep (DPM-Solver only)               [fast]
  --order K             solver order, 1..3                                           [3]
  --skip-type T         time_uniform | logSNR | time_quadratic | t2                  [time_uniform]
  --seed N              noise seed, 0..18446744073709551615                          [1234]
  --batch B             samples, 1..4096                                             [1]
  --threads T           CPU threads, 0 (= all) .. 4 x hardware threads (at most 1024) [0]
  --dtype D             f32 | bf16: the network's block GEMMs with bf16 operands and fp32
                        accumulation, their weights packed in place as bf16 (half their
                        memory); layer norm, attention, residuals and the sampler state stay
                        f32. Needs a oneDNN build on a CPU with AVX512-BF16 or AMX (else a note
                        on stderr and f32). Recorded in the output's settings.     [f32]
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

const std::vector<ud::cli::Option> kOptions = {{"checkpoint"},
                                               {"prefix"},
                                               {"config"},
                                               {"mode"},
                                               {"task"},
                                               {"conditions"},
                                               {"out"},
                                               {"steps"},
                                               {"scale"},
                                               {"guidance-rescale"},
                                               {"guidance-interval"},
                                               {"guidance-references"},
                                               {"sampler"},
                                               {"t2i-cfg-mode"},
                                               {"method"},
                                               {"order"},
                                               {"skip-type"},
                                               {"seed"},
                                               {"batch"},
                                               {"threads"},
                                               {"dtype"},
                                               {"data-type"},
                                               {"allow-nonfinite-weights", false},
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
template <std::size_t K>
struct Progress {
  ud::nn::UViTPredictor<float, K>* net = nullptr;
  int per_nfe = 1, nfe = 0, calls = 0;
  bool quiet = false;
  std::string stage;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void operator()(const ud::Context<ud::cpu>& ctx,
                  const std::array<ud::TensorView<const float>, K>& x,
                  const std::array<std::span<const double>, K>& t,
                  const std::array<ud::TensorView<float>, K>& out) {
    (*net)(ctx, x, t, out);
    ++calls;
    if (!quiet && calls % per_nfe == 0) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "\r%s step %d/%d  %.1fs", stage.c_str(), calls / per_nfe, nfe, s);
      if (calls / per_nfe == nfe) std::fprintf(stderr, "\n");
    }
  }
};

template <std::size_t K, class Sampler>
std::array<ud::Tensor<float>, K> run(const ud::Context<ud::cpu>& ctx, Progress<K>& prog,
                                     ud::PhiloxNoise& noise, const ud::GroupLayout<K>& layout,
                                     const ud::Chain<K>& stages, const ud::GuidanceOptions& g,
                                     const Sampler& sampler, std::int64_t batch,
                                     std::array<ud::TensorView<const float>, K> cond,
                                     std::array<ud::TensorView<const float>, K> null) {
  std::array<ud::Tensor<float>, K> result;
  int stage = 0;
  for (const auto& task : stages) {
    auto c = cond;
    for (std::size_t k = 0; k < K; ++k)
      if (task.roles[k] == ud::Role::condition && result[k].size() > 0) c[k] = result[k].view();
    ud::GuidanceOptions pg = g;  // the probe only counts calls: its rescale needs no schedule
    pg.rescale = 0;
    ud::GuidedPredictor<float, K, Progress<K>, ud::PhiloxNoise> probe(ctx, prog, noise, layout,
                                                                      task, pg, batch, c, null);
    prog.per_nfe = probe.calls_per_evaluation();
    prog.nfe = sampler.nfe();
    prog.calls = 0;
    prog.stage = stages.size() > 1
                     ? "stage " + std::to_string(++stage) + "/" + std::to_string(stages.size())
                     : "";
    auto out =
        ud::sample_task<float, K>(ctx, prog, noise, layout, task, g, sampler, batch, c, null);
    for (std::size_t k = 0; k < K; ++k)
      if (task.generated(k)) result[k] = std::move(out[k]);
  }
  return result;
}

// The group a --task name refers to: an index, a component name or a group's time name.
std::size_t group_of(const ud::nn::UViTConfig& cfg, const std::string& ref) {
  if (!ref.empty() && ref.find_first_not_of("0123456789") == std::string::npos && ref.size() < 4 &&
      std::stoul(ref) < cfg.groups())
    return std::stoul(ref);
  for (const auto& c : cfg.components)
    if (c.name == ref) return c.group;
  for (std::size_t g = 0; g < cfg.groups(); ++g)
    if (cfg.time_names[g] == ref) return g;
  std::string known;
  for (std::size_t g = 0; g < cfg.groups(); ++g) {
    known += (g ? "; " : "") + std::to_string(g) + " = " + cfg.time_names[g] + " (";
    bool first = true;
    for (const auto& c : cfg.components)
      if (c.group == g) known += (first ? "" : ", ") + c.name, first = false;
    known += ")";
  }
  throw ud::error(ud::cli::op, "--task", "unknown group '" + ref + "'; the groups are " + known);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::size_t a = 0;
  while (true) {
    const std::size_t b = s.find(sep, a);
    out.push_back(s.substr(a, b == std::string::npos ? std::string::npos : b - a));
    if (b == std::string::npos) return out;
    a = b + 1;
  }
}

// "GEN[|COND] > ..." -> the stages (tasks::make validates each).
template <std::size_t K>
ud::Chain<K> parse_task(std::string spec, const ud::nn::UViTConfig& cfg) {
  std::erase_if(spec, [](char c) { return c == ' ' || c == '\t'; });
  ud::Chain<K> chain;
  for (const std::string& st : split(spec, '>')) {
    const auto parts = split(st, '|');
    if (parts.size() > 2 || parts[0].empty() || (parts.size() == 2 && parts[1].empty()))
      throw ud::error(ud::cli::op, "--task",
                      "stage '" + st + "' is not GENERATE[|CONDITION] (e.g. \"img|text\")");
    std::array<std::vector<std::size_t>, 2> lists;
    for (std::size_t i = 0; i < parts.size(); ++i)
      for (const std::string& r : split(parts[i], ',')) lists[i].push_back(group_of(cfg, r));
    try {
      chain.push_back(ud::tasks::make<K>(lists[0], lists[1]));
    } catch (const ud::error& e) {
      throw ud::error(ud::cli::op, "--task", "stage '" + st + "': " + e.what());
    }
  }
  return chain;
}

// Every group a chain conditions on before any stage generated it: the user must give it.
template <std::size_t K>
std::array<bool, K> user_conditions(const ud::Chain<K>& chain) {
  std::array<bool, K> need{}, made{};
  for (const auto& t : chain)
    for (std::size_t g = 0; g < K; ++g) {
      if (t.roles[g] == ud::Role::condition && !made[g]) need[g] = true;
      if (t.generated(g)) made[g] = true;
    }
  return need;
}

// The official aliases of the official component names (y, z, c).
std::string alias_of(const std::string& name) {
  if (name == "text") return "y";
  if (name == "img") return "z";
  if (name == "clip_img") return "c";
  return name;
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

// Everything the options say, parsed and checked before any file is read.
struct Settings {
  std::string ckpt, out_path, prefix, config_path, cond_path, mode_name, task_spec;
  int steps = 50, order = 3, threads = 0;
  std::int64_t batch = 1, data_type = 1;
  std::uint64_t seed = 1234;
  std::string sampler, method, skip_type, cfg_mode;
  ud::Spacing spacing{};
  ud::GuidanceOptions g;
  bool quiet = false, allow_nonfinite = false;
  ud::MathMode math = ud::MathMode::fp32;  // --dtype bf16 where supported
};

template <std::size_t K>
int sample(const Settings& st, const ud::safetensors::File& f, const ud::nn::UViTConfig& cfg) {
  const auto layout = cfg.layout<K>();
  // the stages: an official mode (two groups) or --task
  ud::Chain<K> chain;
  if (!st.mode_name.empty()) {
    if constexpr (K == 2)
      chain = ud::tasks::stages(ud::parse_mode(st.mode_name));
    else
      throw ud::error(ud::cli::op, "--mode",
                      "the official modes need a two-group layout; this checkpoint has " +
                          std::to_string(K) + " groups: use --task");
  } else {
    chain = parse_task<K>(st.task_spec, cfg);
  }
  const std::string what =
      st.mode_name.empty() ? "task '" + st.task_spec + "'" : "mode " + st.mode_name;
  const auto need = user_conditions(chain);
  const bool needs_conditions = std::find(need.begin(), need.end(), true) != need.end();
  // (the official modes were checked in main_impl: empty_token with t2i / t2i2t only)
  if (st.g.cfg_mode == ud::CfgMode::empty_condition && !needs_conditions)
    throw ud::error(ud::cli::op, "--t2i-cfg-mode", "empty_token needs a conditioned group");
  if (needs_conditions && st.cond_path.empty())
    throw ud::error(ud::cli::op, "--conditions", "required for " + what + " (see --help)");

  // The guided predictor calls the network with the main and reference rows of a step batched
  // (B x (1 + generated groups) rows at most, an upper bound over the stages); its own buffers,
  // the solver's workspace and the results take a few more [B, D] matrices (16 x (1 + that) is
  // generous). The network packs its weights in place: sampling never reads them back.
  std::int64_t per_call = 1;
  if (st.g.scale != 0 && st.g.batch_references)
    for (const auto& task : chain)
      per_call = std::max<std::int64_t>(
          per_call, 1 + static_cast<std::int64_t>(task.count(ud::Role::generate)));
  auto mem =
      ud::estimate_memory<float>(cfg, st.batch * per_call, 0, 0, ud::nn::WeightPacking::in_place);
  std::uint64_t row = 0;
  for (std::size_t k = 0; k < K; ++k) row += static_cast<std::uint64_t>(layout.size(k));
  const std::uint64_t extra =
      16 * static_cast<std::uint64_t>(st.batch * (1 + per_call)) * row * sizeof(float);
  const auto add = [](std::uint64_t x, std::uint64_t y) {
    return x > UINT64_MAX - y ? UINT64_MAX : x + y;
  };
  mem.workspace = add(mem.workspace, extra);
  mem.total = add(mem.total, extra);
  ud::check_memory_fits(mem, "sampling batch " + std::to_string(st.batch) + " (network + buffers)");

  // conditions: one tensor per component of each group the user conditions on
  std::array<ud::Tensor<float>, K> cond, null;
  std::array<ud::TensorView<const float>, K> cv{}, nv{};
  if (needs_conditions) {
    const auto cf = ud::safetensors::File::read(st.cond_path);
    auto group_rows = [&](std::size_t k, const std::string& pre) {
      ud::Tensor<float> t(ud::Shape{st.batch, layout.size(k)});
      const auto& comps = layout.group(k).components;
      for (std::size_t c = 0; c < comps.size(); ++c) {
        const auto x = condition(cf, comps[c], pre + comps[c].name,
                                 (pre + alias_of(comps[c].name)).c_str(), st.batch);
        for (std::int64_t b = 0; b < st.batch; ++b)
          std::copy_n(x.data() + b * x.dim(1), x.dim(1),
                      t.data() + b * layout.size(k) + layout.offset(k, c));
      }
      return t;
    };
    for (std::size_t k = K; k-- > 0;) {  // last group first: text before image (K = 2)
      if (!need[k]) continue;
      cond[k] = group_rows(k, "");
      cv[k] = cond[k].view();
      if (st.g.cfg_mode == ud::CfgMode::empty_condition) {
        null[k] = group_rows(k, "empty_");
        nv[k] = null[k].view();
      }
    }
  }

  // the network
  ud::nn::UViT<float> net(cfg);
  net.set_weight_packing(ud::nn::WeightPacking::in_place);  // no second copy of the weights
  ud::load_checkpoint(net, f, st.prefix, ud::CheckpointNaming::automatic, st.allow_nonfinite);
  ud::nn::UViTPredictor<float, K> model(net, st.data_type);

  // sampling: coefficients from the float64 table, time grid from the reference's float32
  // table (docs/NOTES.md)
  const auto ns = ud::VPSchedule::unidiffuser(ud::TablePrecision::float64);
  const auto grid = ud::VPSchedule::unidiffuser(ud::TablePrecision::float32_reference);
  ud::PhiloxNoise noise(st.seed);
  ud::Context<ud::cpu> ctx{};
  ctx.math = st.math;
  Progress<K> prog;
  prog.net = &model;
  prog.quiet = st.quiet;
  std::array<ud::Tensor<float>, K> result;
  if (st.sampler == "dpm_solver++" || st.sampler == "dpm_solver") {
    ud::DpmSolverOptions o;
    o.steps = st.steps;
    o.order = st.order;
    o.method = ud::parse_solver_method(st.method);
    o.skip_type = st.spacing;
    o.predict_x0 = st.sampler == "dpm_solver++";
    const ud::DpmSolver<float> s(ns, o, &grid);
    result = run<K>(ctx, prog, noise, layout, chain, st.g, s, st.batch, cv, nv);
  } else {
    ud::DdimOptions o;
    o.steps = st.steps;
    o.skip_type = st.spacing;
    o.seed = st.seed;
    if (st.sampler == "ddpm") {
      const ud::Ddpm<float> s(ns, o);
      result = run<K>(ctx, prog, noise, layout, chain, st.g, s, st.batch, cv, nv);
    } else {
      const ud::Ddim<float> s(ns, o);
      result = run<K>(ctx, prog, noise, layout, chain, st.g, s, st.batch, cv, nv);
    }
  }

  // output: one tensor per generated component, [B, ...its shape]
  std::vector<std::pair<std::string, ud::Tensor<float>>> outs;
  for (std::size_t k = 0; k < K; ++k) {
    if (result[k].size() == 0) continue;
    const auto& grp = layout.group(k);
    for (std::size_t c = 0; c < grp.components.size(); ++c) {
      const auto& spec = grp.components[c];
      std::vector<std::int64_t> dims{st.batch};
      for (int i = 0; i < spec.shape.rank(); ++i) dims.push_back(spec.shape[i]);
      ud::Tensor<float> t(ud::Shape::from_range(dims.begin(), dims.end()));
      for (std::int64_t b = 0; b < st.batch; ++b)
        std::copy_n(result[k].data() + b * layout.size(k) + layout.offset(k, c), spec.numel(),
                    t.data() + b * spec.numel());
      outs.emplace_back(spec.name, std::move(t));
    }
  }
  ud::safetensors::Writer w;
  for (const auto& [name, t] : outs) w.add<float>(name, t);
  nlohmann::json settings = {
      {"steps", st.steps},     {"scale", st.g.scale},      {"sampler", st.sampler},
      {"method", st.method},   {"order", st.order},        {"skip_type", st.skip_type},
      {"seed", st.seed},       {"batch", st.batch},        {"t2i_cfg_mode", st.cfg_mode},
      {"checkpoint", st.ckpt}, {"data_type", st.data_type}};
  if (st.g.rescale > 0) settings["guidance_rescale"] = st.g.rescale;
  if (st.g.interval_lo > 0 || st.g.interval_hi < 1)
    settings["guidance_interval"] = {st.g.interval_lo, st.g.interval_hi};
  if (!st.g.batch_references) settings["guidance_references"] = "separate";
  if (st.math == ud::MathMode::bf16) settings["dtype"] = "bf16";
  if (st.mode_name.empty())
    settings["task"] = st.task_spec;
  else
    settings["mode"] = st.mode_name;
  w.metadata("settings", settings.dump());
  w.metadata("config", cfg.to_json().dump());
  w.write(st.out_path);
  const std::string bad = nonfinite_report(outs);
  if (!bad.empty()) {
    ud::cli::report(kProgram, "the output holds NaN or infinite values (" + bad +
                                  "); the file was written anyway: " + st.out_path);
    return 2;
  }
  if (!st.quiet) std::fprintf(stderr, "wrote %s\n", st.out_path.c_str());
  return 0;
}

// The sampling stack is compiled per group count (its state is std::array<..., K>): layouts of
// 1 .. kMaxGroups groups are instantiated here; raise it to sample more (each K adds compile time).
constexpr std::size_t kMaxGroups = 8;
template <std::size_t... I>
int dispatch(const Settings& st, const ud::safetensors::File& f, const ud::nn::UViTConfig& cfg,
             std::index_sequence<I...>) {
  int rc = 0;
  const bool done =
      ((cfg.groups() == I + 1 ? (rc = sample<I + 1>(st, f, cfg), true) : false) || ...);
  if (!done)
    throw ud::error(ud::cli::op, st.ckpt,
                    "layout of " + std::to_string(cfg.groups()) +
                        " timestep groups: this program samples layouts of 1 to " +
                        std::to_string(kMaxGroups) +
                        " groups (kMaxGroups in tools/sample/main.cpp)");
  return rc;
}

int main_impl(int argc, char** argv) {
  const ud::cli::Args a(kOptions, argc, argv);
  if (a.help()) {
    std::puts(kUsage);
    return 0;
  }
  // 1. every option, before any file is read
  Settings st;
  st.ckpt = a.required("checkpoint");
  st.out_path = a.required("out");
  st.mode_name = a.text("mode");
  st.task_spec = a.text("task");
  if (st.mode_name.empty() == st.task_spec.empty())
    throw ud::error(ud::cli::op, "--mode",
                    st.mode_name.empty() ? "required: give --mode (official modes) or --task"
                                         : "give --mode or --task, not both");
  if (!st.mode_name.empty()) (void)ud::parse_mode(st.mode_name);
  st.prefix = a.text("prefix");
  st.config_path = a.text("config");
  st.cond_path = a.text("conditions");
  st.steps = a.integer("steps", 50, 1, 100000);
  st.order = a.integer("order", 3, 1, 3);
  st.batch = a.integer<std::int64_t>("batch", 1, 1, 4096);
  st.seed = a.integer<std::uint64_t>("seed", 1234, 0, UINT64_MAX);
  st.data_type = a.integer<std::int64_t>("data-type", 1, 0, 1);
  st.threads = a.threads();
  st.sampler = a.choice("sampler", "dpm_solver++", {"dpm_solver++", "dpm_solver", "ddim", "ddpm"});
  st.method = a.choice("method", "fast", {"fast", "singlestep", "multistep"});
  st.skip_type = a.text("skip-type", "time_uniform");
  st.spacing = ud::parse_spacing(st.skip_type);
  st.g.scale = a.real("scale", 7.0, -1000, 1000);
  st.g.rescale = a.real("guidance-rescale", 0.0, 0.0, 1.0);
  if (a.has("guidance-interval")) {
    const std::string iv = a.text("guidance-interval");
    const auto comma = iv.find(',');
    if (comma == std::string::npos)
      throw ud::error(ud::cli::op, "--guidance-interval", "expected LO,HI; got '" + iv + "'");
    st.g.interval_lo = ud::cli::parse_real(iv.substr(0, comma), "--guidance-interval", 0.0, 1.0);
    st.g.interval_hi = ud::cli::parse_real(iv.substr(comma + 1), "--guidance-interval", 0.0, 1.0);
    if (st.g.interval_lo > st.g.interval_hi)
      throw ud::error(ud::cli::op, "--guidance-interval", "expected LO <= HI; got '" + iv + "'");
  }
  st.g.batch_references =
      a.choice("guidance-references", "batched", {"batched", "separate"}) == "batched";
  st.cfg_mode = a.choice("t2i-cfg-mode", "true_uncond", {"true_uncond", "empty_token"});
  if (st.cfg_mode == "empty_token") st.g.cfg_mode = ud::CfgMode::empty_condition;
  if (st.g.cfg_mode == ud::CfgMode::empty_condition && !st.mode_name.empty() &&
      st.mode_name != "t2i" && st.mode_name != "t2i2t")
    throw ud::error(ud::cli::op, "--t2i-cfg-mode", "empty_token applies to t2i and t2i2t only");
  if (!st.mode_name.empty() && st.cond_path.empty()) {
    const ud::Mode m = ud::parse_mode(st.mode_name);
    if (m == ud::Mode::t2i || m == ud::Mode::t2i2t || m == ud::Mode::i2t || m == ud::Mode::i2t2i)
      throw ud::error(ud::cli::op, "--conditions",
                      "required for mode " + st.mode_name + " (see --help)");
  }
  st.quiet = a.has("quiet");
  st.allow_nonfinite = a.has("allow-nonfinite-weights");
  if (a.choice("dtype", "f32", {"f32", "bf16"}) == "bf16") {
    if (ud::ops::math_supported(ud::Context<ud::cpu>{}, ud::MathMode::bf16))
      st.math = ud::MathMode::bf16;
    else
      std::fprintf(stderr,
                   "unidiffuser-sample: note: --dtype bf16 needs a oneDNN build on a CPU with "
                   "AVX512-BF16 or AMX; sampling in f32\n");
  }

  // 2. files: inputs are regular files, the output is none of them and can be written
  check_input(st.ckpt, "--checkpoint");
  if (!st.config_path.empty()) check_input(st.config_path, "--config");
  if (!st.cond_path.empty()) check_input(st.cond_path, "--conditions");
  check_output(
      st.out_path,
      {{"--checkpoint", st.ckpt}, {"--config", st.config_path}, {"--conditions", st.cond_path}});

#if defined(_OPENMP)
  if (st.threads > 0) omp_set_num_threads(st.threads);
#endif
  Eigen::setNbThreads(st.threads);

  // 3. config and checkpoint checked, memory estimated, before the network is allocated
  const auto f = ud::safetensors::File::open(st.ckpt);
  const auto cfg = load_config(st.config_path, f, st.prefix);
  ud::check_config_bounds(cfg);
  ud::check_checkpoint(cfg, f, st.prefix);
  return dispatch(st, f, cfg, std::make_index_sequence<kMaxGroups>{});
}

}  // namespace

int main(int argc, char** argv) {
  return ud::cli::run_main(kProgram, [&] { return main_impl(argc, argv); });
}
