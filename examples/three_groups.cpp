// SPDX-License-Identifier: Apache-2.0
// Three modalities in one UniDiffuser: the running example of docs/CUSTOM_LAYOUTS.md.
//
// A toy world with one hidden attribute, a class c in {0, 1, 2, 3}, seen by three modalities:
//   img   [1, 8, 8]  a vertical bar in columns 2c, 2c + 1 (a patched image, patch 4)
//   text  [1, 8]     the class word, a fixed random 8-dim embedding (one token)
//   audio [16, 1]    a tone sin(2 pi (c + 1) n / 16), one token per sample
// Each modality is its own timestep group. The program trains the three-group U-ViT with the
// library's Trainer (an independent level per group), saves it (the layout in the metadata),
// reloads it by itself, and samples conditionals, many-to-one, one-to-many, a chain, the joint
// and a marginal, each scored by nearest-prototype readers.
//
//   three_groups [--train-steps N] [--samples N] [--out FILE] [--threads T]
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <unidiffuser/unidiffuser.hpp>

namespace ud = unidiffuser;

namespace {

constexpr int kClasses = 4, kSide = 8, kPatch = 4, kWord = 8, kTone = 16;
constexpr double kPi = 3.14159265358979323846;

// 1. The layout: one component per group, named parameter prefixes, validated.
ud::nn::UViTConfig make_config() {
  using ud::nn::ComponentKind;
  ud::nn::UViTConfig c;
  c.embed_dim = 64;
  c.depth = 3;
  c.num_heads = 4;
  c.mlp_ratio = 2.0;
  c.time_names = {"time_img_embed", "time_text_embed", "time_audio_embed"};
  c.components = {{.name = "img",
                   .kind = ComponentKind::patched_image,
                   .group = 0,
                   .channels = 1,
                   .size = kSide,
                   .patch = kPatch,
                   .in_name = "img_embed",
                   .out_name = "img_out"},
                  {.name = "text",
                   .kind = ComponentKind::tokens,
                   .group = 1,
                   .length = 1,
                   .dim = kWord,
                   .in_name = "text_embed",
                   .out_name = "text_out"},
                  {.name = "audio",
                   .kind = ComponentKind::tokens,
                   .group = 2,
                   .length = kTone,
                   .dim = 1,
                   .in_name = "audio_embed",
                   .out_name = "audio_out"}};
  c.validate();  // names, slots, groups and sizes: an error naming the field otherwise
  return c;
}

// 2. The world: clean values of each modality for a class.
void render(int c, std::size_t group, float* x) {
  if (group == 0)
    for (int i = 0; i < kSide * kSide; ++i) x[i] = (i % kSide) / 2 == c ? 1.f : -1.f;
  if (group == 1)  // word embeddings: N(0, 1) entries from a fixed Philox key
    for (int j = 0; j < kWord; ++j)
      x[j] = static_cast<float>(
          ud::philox_normal(77, static_cast<std::uint64_t>(c), 0, static_cast<std::uint64_t>(j)));
  if (group == 2)
    for (int n = 0; n < kTone; ++n)
      x[n] = static_cast<float>(std::sin(2 * kPi * (c + 1) * n / kTone));
}
int class_of(std::uint64_t seed, std::int64_t index) {  // uniform, a pure function of the index
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(index);  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<int>((z ^ (z >> 31)) % kClasses);
}
// The reader: the class whose clean rendering is nearest.
int read(std::size_t group, const float* x, std::int64_t n) {
  int best = 0;
  double bd = 1e300;
  std::vector<float> p(static_cast<std::size_t>(n));
  for (int c = 0; c < kClasses; ++c) {
    render(c, group, p.data());
    double d = 0;
    for (std::int64_t i = 0; i < n; ++i) d += (x[i] - p[i]) * (x[i] - p[i]);
    if (d < bd) bd = d, best = c;
  }
  return best;
}

using Trainer = ud::train::Trainer<float, 3>;

// 3. Training: the data source fills each group's rows for samples first .. first + rows.
void train(ud::nn::UViT<float>& net, std::int64_t steps) {
  Trainer::Options o;
  o.seed = 1;
  o.batch = 64;
  o.lr = {
      .lr = 3e-3, .min_lr = 1e-5, .warmup = 50, .total = steps, .decay = ud::train::Decay::cosine};
  o.clip_norm = 1.0;
  o.ema_decay = 0.99;
  // The loss weights every element the same (the reference's choice): the 64-pixel image
  // outweighs the 8-dim word. ud::train::group_mean_weights(layout) would weight each group's
  // MSE the same instead; on this world it gave weaker conditionals (docs/CUSTOM_LAYOUTS.md).
  Trainer tr(net, o,
             [](std::uint64_t seed, std::int64_t, std::int64_t first, const Trainer::Views& x0,
                std::span<std::int64_t>) {
               for (std::int64_t r = 0; r < x0[0].rows; ++r)
                 for (std::size_t g = 0; g < 3; ++g)
                   render(class_of(seed, first + r), g, x0[g].data + r * x0[g].ld);
             });
  const auto last = tr.run(ud::Context<ud::cpu>{}, steps, std::max<std::int64_t>(steps / 5, 1));
  std::printf("trained %lld steps, final loss %.4f\n", static_cast<long long>(steps), last.loss);
  const auto ema = tr.ema().weights();  // sample with the EMA weights
  std::copy_n(ema.data(), ema.size(), net.parameters().data());
  net.parameters_changed();
}

// 4. Sampling a task chain and scoring it.
struct Score {
  double value;
  const char* what;
};
Score run(ud::nn::UViT<float>& net, const std::string& name, const ud::Chain<3>& chain,
          double scale, std::int64_t batch) {
  const auto layout = net.config().layout<3>();
  ud::nn::UViTPredictor<float, 3> model(net);
  // conditions: the clean values of a class per sample, for every group a stage conditions on
  std::array<ud::Tensor<float>, 3> cond;
  std::array<ud::TensorView<const float>, 3> cv{};
  std::vector<int> truth(static_cast<std::size_t>(batch));
  for (std::int64_t b = 0; b < batch; ++b) truth[static_cast<std::size_t>(b)] = class_of(2024, b);
  for (std::size_t g = 0; g < 3; ++g) {
    cond[g] = ud::Tensor<float>(ud::Shape{batch, layout.size(g)});
    for (std::int64_t b = 0; b < batch; ++b)
      render(truth[static_cast<std::size_t>(b)], g, cond[g].data() + b * layout.size(g));
    cv[g] = cond[g].view();
  }
  ud::DpmSolverOptions so;
  so.steps = 12;
  so.order = 2;
  so.method = ud::SolverMethod::multistep;
  const ud::DpmSolver<float> solver(ud::VPSchedule::unidiffuser(), so);
  ud::GuidanceOptions g;
  g.scale = scale;
  ud::PhiloxNoise noise(7);
  const auto out = ud::sample_chain<float, 3>(ud::Context<ud::cpu>{}, model, noise, layout, chain,
                                              g, solver, batch, cv);
  // read every generated group; conditionals score against the condition's class, the joint by
  // agreement, a marginal by its largest deviation from the uniform frequencies
  std::vector<std::array<int, 3>> got(static_cast<std::size_t>(batch), {-1, -1, -1});
  for (std::size_t k = 0; k < 3; ++k)
    if (out[k].size() > 0)
      for (std::int64_t b = 0; b < batch; ++b)
        got[static_cast<std::size_t>(b)][k] =
            read(k, out[k].data() + b * layout.size(k), layout.size(k));
  const bool conditional = chain.front().count(ud::Role::condition) > 0;
  const auto& last = chain.back();
  double hits = 0;
  std::array<double, kClasses> freq{};
  for (std::int64_t b = 0; b < batch; ++b) {
    const auto& r = got[static_cast<std::size_t>(b)];
    bool ok = true;
    int first = -1;
    for (std::size_t k = 0; k < 3; ++k) {
      if (!last.generated(k)) continue;
      if (first < 0) first = r[k];
      ok = ok && (conditional ? r[k] == truth[static_cast<std::size_t>(b)] : r[k] == first);
    }
    hits += ok;
    freq[static_cast<std::size_t>(first)] += 1.0 / static_cast<double>(batch);
  }
  Score s{hits / static_cast<double>(batch), conditional ? "accuracy" : "agreement"};
  if (last.count(ud::Role::generate) == 1 && !conditional) {
    s.value = 0;
    for (double f : freq) s.value = std::max(s.value, std::abs(f - 1.0 / kClasses));
    s.what = "max |freq - 1/4|";
  }
  std::printf("  %-24s scale %-3g %-17s %.3f\n", name.c_str(), scale, s.what, s.value);
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::int64_t steps = 1500, samples = 256;
    std::string out = "three_groups.safetensors";
    for (int i = 1; i < argc; i += 2) {
      const std::string k = argv[i];
      if (i + 1 >= argc) throw ud::error("three_groups", k, "missing value");
      const std::string v = argv[i + 1];
      auto integer = [&] {
        std::size_t used = 0;
        long long n = -1;
        try {
          n = std::stoll(v, &used);
        } catch (const std::exception&) {
        }
        if (used != v.size() || n < 0 || n > 100000000)
          throw ud::error("three_groups", k, "expected an integer in 0..1e8, got '" + v + "'");
        return n;
      };
      if (k == "--train-steps")
        steps = integer();
      else if (k == "--samples")
        samples = std::max<long long>(integer(), 1);
      else if (k == "--out")
        out = v;
      else if (k == "--threads")
        Eigen::setNbThreads(static_cast<int>(integer()));
      else
        throw ud::error("three_groups", k,
                        "unknown option (--train-steps, --samples, --out, --threads)");
    }
    if (steps < 1) throw ud::error("three_groups", "--train-steps", "must be >= 1");
    ud::nn::UViT<float> net(make_config());
    net.init_random(1);
    train(net, steps);
    // 5. Save with the layout in the metadata, reload from the file alone.
    ud::save_checkpoint(net, out);
    const auto f = ud::safetensors::File::read(out);
    ud::nn::UViT<float> loaded(ud::checkpoint_config(f));
    ud::load_checkpoint(loaded, f);
    std::printf("saved and reloaded %s (%zu groups)\n", out.c_str(), loaded.config().groups());
    namespace T = ud::tasks;
    constexpr std::size_t img = 0, text = 1, audio = 2;
    for (double scale : {0.0, 3.0}) {
      run(loaded, "img | text", {T::conditional<3>(img, text)}, scale, samples);
      run(loaded, "audio | img", {T::conditional<3>(audio, img)}, scale, samples);
      run(loaded, "text | img, audio", {T::make<3>({text}, {img, audio})}, scale, samples);
      run(loaded, "img, audio | text", {T::make<3>({img, audio}, {text})}, scale, samples);
      run(loaded, "text | img > img | text", T::variation<3>(img, text), scale, samples);
    }
    run(loaded, "img, text, audio", {T::joint_all<3>()}, 0.0, samples);
    run(loaded, "audio", {T::marginal<3>(audio)}, 0.0, 4 * samples);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "three_groups: error: %s\n", e.what());
    return 1;
  }
}
