// SPDX-License-Identifier: Apache-2.0
// unidiffuser-shapes3: three modalities in one UniDiffuser. The shapes world seen as an image, a
// caption and a sound (a 64-sample signal carried by a component kind this program registers, not
// the library); one U-ViT with three timestep groups samples every task over them — each ordered
// pair, two-to-one, one-to-two, the joint and each marginal — scored by the world's readers;
// writes a PNG grid per task and report.md / report.json (docs/CUSTOM_LAYOUTS.md).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>

// stb_image_write: its implementation is compiled in this translation unit only
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#undef STB_IMAGE_WRITE_IMPLEMENTATION

#include "cli.hpp"
#include "eval3.hpp"
#include "three.hpp"
#include "unidiffuser/io/checkpoint.hpp"

namespace {

namespace ud = unidiffuser;
namespace fs = std::filesystem;
constexpr const char* kProgram = "unidiffuser-shapes3";

#ifndef UNIDIFFUSER_SHAPES3_CHECKPOINT
#define UNIDIFFUSER_SHAPES3_CHECKPOINT "examples/shapes/shapes3.safetensors"
#endif

const char* kHelp = R"(usage: unidiffuser-shapes3 [options]

Three modalities in one UniDiffuser: the shapes world as an image, a caption and a 64-sample sound
(a component kind registered by this program). Samples every task over the three groups (each
ordered pair A->B, two-to-one AB->C, one-to-two A->BC, the joint, each marginal) with guidance,
scores them with the world's attribute readers and writes a PNG grid per task plus report.md and
report.json.

  --checkpoint FILE   network to evaluate (default: the committed one,
                      )" UNIDIFFUSER_SHAPES3_CHECKPOINT R"()
  --prefix P          tensor-name prefix in the file (e.g. ema/ for a trainer state file)
  --retrain           train from scratch first (docs/CUSTOM_LAYOUTS.md), write
                      OUT/shapes3.safetensors and evaluate it
  --out DIR           output directory (default shapes3-out; created)
  --scale S[,S...]    guidance scales tried besides 0 (default 1,2,3; each 0..20); a task's
                      best scale is the one of highest accuracy, where its bars apply
  --interval LO,HI    guide only at solver times tau in [LO, HI] (GuidanceOptions::interval_lo,
                      interval_hi; 1 = pure noise; default 0.5,1: guidance at low noise
                      amplifies the sound's model error, docs/CUSTOM_LAYOUTS.md)
  --rescale PHI       guidance rescale in [0, 1] (GuidanceOptions::rescale: the guided data
                      prediction keeps the conditional one's spread; default 0, the official)
  --samples N         samples per task and scale (default 256; 1..65536)
  --marginal-samples N  samples of each marginal (default 1024; 1..65536)
  --steps N           DPM-Solver++ steps (default 12; 1..1000)
  --seed S            evaluation seed (default 2024)
  --threads N         threads (0: all hardware threads; default 0)
  --quiet             no progress lines
  --check             exit with status 3 when a quality bar fails
training (with --retrain):
  --train-steps N     optimisation steps (default 10000)   --batch N   (default 128)
  --lr X              peak learning rate (default 3e-3)   --train-seed S (default 1)
  --embed E --depth D --heads H   network size (default 128, 7, 4)
  --min-snr G         min-SNR-gamma weighting of the loss over levels (0: off; default 0)
  --loss-weights I,C,S  weight of the image, caption and sound squared errors (default 1,2,4,
                      the committed network's; 1,1,1 is the mean over all 992 elements, where
                      the sound's 64 count for 6 %)
  --resume            continue OUT/train_state.safetensors

Prints the quality table. Exit codes: 0 done; 1 error (one line on stderr); 3 (with --check) a
quality bar failed.
)";

//! The comma-separated reals of `text` (at least one), each within [lo, hi].
std::vector<double> reals(const std::string& text, const std::string& flag, double lo, double hi) {
  std::vector<double> v;
  for (std::size_t at = 0;;) {
    const std::size_t end = std::min(text.find(',', at), text.size());
    v.push_back(ud::cli::parse_real(text.substr(at, end - at), flag, lo, hi));
    if (end == text.size()) return v;
    at = end + 1;
  }
}

int main_impl(int argc, char** argv) {
  const ud::cli::Args a({{"checkpoint"},   {"prefix"},       {"retrain", false},
                         {"out"},          {"scale"},        {"rescale"},
                         {"interval"},     {"samples"},      {"marginal-samples"},
                         {"steps"},        {"seed"},         {"threads"},
                         {"quiet", false}, {"check", false}, {"train-steps"},
                         {"batch"},        {"lr"},           {"train-seed"},
                         {"embed"},        {"depth"},        {"heads"},
                         {"min-snr"},      {"loss-weights"}, {"resume", false}},
                        argc, argv);
  if (a.help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  const bool retrain = a.has("retrain"), quiet = a.has("quiet");
  for (const char* k : {"train-steps", "batch", "lr", "train-seed", "embed", "depth", "heads",
                        "min-snr", "loss-weights", "resume"})
    if (a.has(k) && !retrain)
      throw ud::error(ud::cli::op, std::string("--") + k, "applies with --retrain only");
  if (retrain && a.has("checkpoint"))
    throw ud::error(ud::cli::op, "--checkpoint", "--retrain evaluates the network it trains");
  const std::string out = a.text("out", "shapes3-out");
  shapes::EvalSettings ev;
  const auto scales = reals(a.text("scale", "1,2,3"), "--scale", 0.0, 20.0);
  ev.rescale = a.real("rescale", 0.0, 0.0, 1.0);
  {
    const auto iv = reals(a.text("interval", "0.5,1"), "--interval", 0.0, 1.0);
    if (iv.size() != 2 || !(iv[0] <= iv[1]))
      throw ud::error(ud::cli::op, "--interval",
                      "expected LO,HI with 0 <= LO <= HI <= 1; got '" + a.text("interval") + "'");
    ev.interval_lo = iv[0], ev.interval_hi = iv[1];
  }
  ev.samples = a.integer<std::int64_t>("samples", 256, 1, 65536);
  ev.marginal_samples = a.integer<std::int64_t>("marginal-samples", 1024, 1, 65536);
  ev.steps = a.integer("steps", 12, 1, 1000);
  ev.seed = a.integer<std::uint64_t>("seed", 2024, 0, UINT64_MAX);
  ev.quiet = quiet;
  const int threads = a.threads();
#if defined(_OPENMP)
  if (threads > 0) omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);

  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out))
    throw ud::error("output directory", "--out " + out, "cannot create it: " + ec.message());

  // the sound's kind must be registered before a network naming it is built or loaded
  shapes::register_kinds();
  std::string ckpt = a.text("checkpoint", UNIDIFFUSER_SHAPES3_CHECKPOINT);
  if (retrain) {
    shapes::TrainSettings ts;
    ts.steps = a.integer<std::int64_t>("train-steps", ts.steps, 1, 100000000);
    ts.batch = a.integer<std::int64_t>("batch", ts.batch, 1, 65536);
    ts.lr = a.real("lr", ts.lr, 1e-7, 1.0);
    ts.min_snr = a.real("min-snr", ts.min_snr, 0.0, 1e6);
    ts.seed = a.integer<std::uint64_t>("train-seed", ts.seed, 0, UINT64_MAX);
    {
      ts.group_weights = reals(a.text("loss-weights", "1,2,4"), "--loss-weights", 0.0, 1e6);
      if (ts.group_weights.size() != 3)
        throw ud::error(ud::cli::op, "--loss-weights",
                        "expected three comma-separated weights (image, caption, sound); got '" +
                            a.text("loss-weights") + "'");
    }
    shapes::ModelSize ms;
    ms.embed_dim = a.integer<std::int64_t>("embed", ms.embed_dim, 8, 4096);
    ms.depth = a.integer<std::int64_t>("depth", ms.depth, 1, 64);
    ms.heads = a.integer<std::int64_t>("heads", ms.heads, 1, 64);
    ckpt = (fs::path(out) / "shapes3.safetensors").string();
    shapes::train3(ms, ts, ckpt, (fs::path(out) / "train_state.safetensors").string(),
                   a.has("resume"), quiet);
  }
  if (!retrain && !a.has("checkpoint") && !fs::exists(ckpt))
    throw ud::error("checkpoint", ckpt,
                    "no trained checkpoint at the default path; train one with --retrain or pass "
                    "--checkpoint FILE");
  const auto f = ud::safetensors::File::open(ckpt);
  const std::string prefix = a.text("prefix");
  const auto cfg = ud::checkpoint_config(f, prefix);
  ud::check_config_bounds(cfg);
  if (cfg.groups() != 3)
    throw ud::error("checkpoint", ckpt,
                    "expected the three-group layout (image, caption, sound); the file has " +
                        std::to_string(cfg.groups()) + " groups");
  ud::check_checkpoint(cfg, f, prefix);
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f, prefix);
  ev.betas = shapes::schedule_betas(shapes::checkpoint_schedule(f));
  const auto rows = shapes::evaluate3(net, ev, scales, out);
  const int failed = shapes::write_reports(rows, ev, ckpt, out, kProgram);
  return a.has("check") && failed > 0 ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ud::cli::run_main(kProgram, [&] { return main_impl(argc, argv); });
}
