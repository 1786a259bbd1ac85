// SPDX-License-Identifier: Apache-2.0
// unidiffuser-shapes: the main demo. A two-group UniDiffuser (image + caption) trained on a
// procedural world of coloured shapes samples all seven modes and scores them with rule-based
// attribute readers; writes PNG grids and report.md / report.json (docs/SHAPES.md).
#include <cstdio>
#include <filesystem>
#include <string>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include <Eigen/Core>

// stb_image_write: its implementation is compiled in this translation unit only
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#undef STB_IMAGE_WRITE_IMPLEMENTATION

#include "cli.hpp"
#include "eval.hpp"
#include "model.hpp"
#include "unidiffuser/io/checkpoint.hpp"

namespace {

namespace ud = unidiffuser;
namespace fs = std::filesystem;
constexpr const char* kProgram = "unidiffuser-shapes";

#ifndef UNIDIFFUSER_SHAPES_CHECKPOINT
#define UNIDIFFUSER_SHAPES_CHECKPOINT "examples/shapes/shapes.safetensors"
#endif

const char* kHelp = R"(usage: unidiffuser-shapes [options]

Samples the seven UniDiffuser modes (joint t2i i2t i t i2t2i t2i2t) from a two-group U-ViT trained
on a procedural world of coloured shapes, scores every mode with rule-based attribute readers and
writes a PNG grid per mode plus report.md and report.json.

  --checkpoint FILE   network to evaluate (default: the committed one,
                      )" UNIDIFFUSER_SHAPES_CHECKPOINT R"()
  --prefix P          tensor-name prefix in the file (e.g. ema/ for a trainer state file)
  --retrain           train from scratch first (about an hour on two cores; docs/SHAPES.md),
                      write OUT/shapes.safetensors and evaluate it
  --out DIR           output directory (default shapes-out; created)
  --full              sweep guidance scales 0, 1, 3, 7 for every guided mode
  --scale S           the "best" scale of the default run (default 3; 0..20)
  --samples N         samples per conditional cell (default 256; 1..65536)
  --marginal-samples N  samples of modes i and t (default 2048; 1..65536)
  --steps N           DPM-Solver++ steps (default 12; 1..1000)
  --marginal-steps N  DPM-Solver++ steps of the marginal modes i and t (0: --steps; default 50)
  --seed S            evaluation seed (default 2024)
  --threads N         threads (0: all hardware threads; default 0)
  --quiet             no progress lines
  --check             exit with status 3 when a quality bar fails
  --image-code C      the image's latent code, pixels | standardised | centred | centred-half
                      (world.hpp):
                      with --retrain the code to train with (default pixels); otherwise
                      overrides the checkpoint's "image_code" metadata (absent: pixels), e.g. for
                      a trainer state file evaluated with --prefix ema/
  --schedule S        the diffusion schedule, sd (the official scaled-linear betas) |
                      sd-rescaled (those with a quarter of the terminal data trace) | linear
                      (DDPM's 1e-4 .. 0.02): with --retrain the schedule to train with (default
                      sd-rescaled); otherwise overrides the checkpoint's "schedule" metadata
                      (absent: sd)
training (with --retrain):
  --train-steps N     optimisation steps (default 16000)   --batch N   (default 128)
  --lr X              peak learning rate (default 3e-3)   --train-seed S (default 2)
  --embed E --depth D --heads H   network size (default 128, 7, 4)
  --pos-std X         initial std of the positional table (default 0.5)
  --loss L            elements (mean over all elements) | group-mean (mean of the groups' MSEs)
                      (default elements)
  --marginal-p P      per group, the probability that a training sample sees that group as
                      sampling marginalises it: N(0, I) noise at level N (default 0)
  --min-snr G         min-SNR-gamma weighting of the loss over levels (0: off; default 0)
  --world V           world version to train on: 1 (default) | 2 (small circles cut by three
                      pixels per corner, an experiment); recorded in the checkpoint, which
                      evaluation follows (world.hpp)
  --resume            continue OUT/train_state.safetensors

Prints the quality table. Exit codes: 0 done; 1 error (one line on stderr); 3 (with --check) a
quality bar failed.
)";

int main_impl(int argc, char** argv) {
  const ud::cli::Args a(
      {{"checkpoint"},    {"prefix"},        {"retrain", false}, {"out"},
       {"full", false},   {"scale"},         {"samples"},        {"marginal-samples"},
       {"steps"},         {"seed"},          {"threads"},        {"quiet", false},
       {"check", false},  {"train-steps"},   {"batch"},          {"lr"},
       {"pos-std"},       {"train-seed"},    {"embed"},          {"depth"},
       {"heads"},         {"resume", false}, {"loss"},           {"marginal-p"},
       {"min-snr"},       {"image-code"},    {"world"},          {"schedule"},
       {"marginal-steps"}},
      argc, argv);
  if (a.help()) {
    std::fputs(kHelp, stdout);
    return 0;
  }
  const bool retrain = a.has("retrain"), quiet = a.has("quiet");
  for (const char* k : {"train-steps", "batch", "lr", "pos-std", "train-seed", "embed", "depth",
                        "heads", "resume", "loss", "marginal-p", "min-snr", "world"})
    if (a.has(k) && !retrain)
      throw ud::error(ud::cli::op, std::string("--") + k, "applies with --retrain only");
  if (retrain && a.has("checkpoint"))
    throw ud::error(ud::cli::op, "--checkpoint", "--retrain evaluates the network it trains");
  const std::string out = a.text("out", "shapes-out");
  shapes::EvalSettings ev;
  ev.full = a.has("full");
  ev.best_scale = a.real("scale", 3.0, 0.0, 20.0);
  ev.samples = a.integer<std::int64_t>("samples", 256, 1, 65536);
  ev.marginal_samples = a.integer<std::int64_t>("marginal-samples", 2048, 1, 65536);
  ev.steps = a.integer("steps", 12, 1, 1000);
  ev.marginal_steps = a.integer("marginal-steps", 50, 0, 1000);
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

  std::string ckpt = a.text("checkpoint", UNIDIFFUSER_SHAPES_CHECKPOINT);
  if (retrain) {
    shapes::TrainSettings ts = shapes::committed_settings();
    ts.steps = a.integer<std::int64_t>("train-steps", ts.steps, 1, 100000000);
    ts.batch = a.integer<std::int64_t>("batch", ts.batch, 1, 65536);
    ts.lr = a.real("lr", ts.lr, 1e-7, 1.0);
    ts.pos_std = a.real("pos-std", ts.pos_std, 0.0, 10.0);
    ts.loss = a.choice("loss", ts.loss, {"elements", "group-mean"});
    ts.marginal_p = a.real("marginal-p", ts.marginal_p, 0.0, 1.0);
    ts.min_snr = a.real("min-snr", ts.min_snr, 0.0, 1e6);
    ts.seed = a.integer<std::uint64_t>("train-seed", ts.seed, 0, UINT64_MAX);
    ts.image_code = a.choice("image-code", ts.image_code,
                             {"pixels", "standardised", "centred", "centred-half"});
    ts.world = a.integer("world", ts.world, 1, shapes::kWorldVersions);
    ts.schedule = a.choice("schedule", ts.schedule, {"sd", "sd-rescaled", "linear"});
    shapes::ModelSize ms;
    ms.embed_dim = a.integer<std::int64_t>("embed", ms.embed_dim, 8, 4096);
    ms.depth = a.integer<std::int64_t>("depth", ms.depth, 1, 64);
    ms.heads = a.integer<std::int64_t>("heads", ms.heads, 1, 64);
    ckpt = (fs::path(out) / "shapes.safetensors").string();
    shapes::train(ms, ts, ckpt, (fs::path(out) / "train_state.safetensors").string(),
                  a.has("resume"), quiet);
  }
  if (!retrain && !a.has("checkpoint") && !fs::exists(ckpt))
    throw ud::error("checkpoint", ckpt,
                    "no trained checkpoint at the default path; train one with --retrain (about "
                    "an hour on two cores) or pass --checkpoint FILE");
  const auto f = ud::safetensors::File::open(ckpt);
  const std::string prefix = a.text("prefix");
  const auto cfg = ud::checkpoint_config(f, prefix);
  ud::check_config_bounds(cfg);
  ud::check_checkpoint(cfg, f, prefix);
  ud::nn::UViT<float> net(cfg);
  ud::load_checkpoint(net, f, prefix);
  ev.world = shapes::checkpoint_world_version(f);
  ev.code =
      a.has("image-code")
          ? shapes::image_code(a.choice("image-code", "pixels",
                                        {"pixels", "standardised", "centred", "centred-half"}),
                               ev.world)
          : shapes::checkpoint_image_code(f);
  ev.betas = shapes::schedule_betas(
      a.has("schedule") ? a.choice("schedule", "sd", {"sd", "sd-rescaled", "linear"})
                        : shapes::checkpoint_schedule(f));
  const auto rows = shapes::evaluate(net, ev, out);
  const int failed = shapes::write_reports(rows, ev, ckpt, out);
  return a.has("check") && failed > 0 ? 3 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  return ud::cli::run_main(kProgram, [&] { return main_impl(argc, argv); });
}
