# SPDX-License-Identifier: Apache-2.0
"""Times the library's U-ViT forward against the PyTorch module of torch_uvit.py at the same
configs, in the same run, and prints the ratios. Each PyTorch variant runs in its own process
(OPENBLAS_CORETYPE must be set before torch is imported):
  default          torch as installed
  skylakex         OPENBLAS_CORETYPE=SkylakeX (Debian's OpenBLAS otherwise falls back to SSE3
                   kernels; skipped for MKL builds such as PyPI's)
  mkldnn           nn.Linear -> oneDNN through torch.utils.mkldnn.to_mkldnn
  skylakex+mkldnn  both
  sdpa             attention through F.scaled_dot_product_attention (torch >= 2.0)
  sdpa+compile     that module through torch.compile (torch >= 2.0; compilation is not timed)
Several interpreters (--python A,B) compare several torch builds in the same run, e.g. Debian's
python3-torch and a PyPI torch in a venv. On a shared, noisy machine use --rounds R: the library
and every variant are timed R times, interleaved, and the median of the per-round ratios to the
best variant is reported next to each round's numbers.
Usage: /usr/bin/python3 compare_torch.py --bench build/release/benchmarks/unidiffuser-bench
       [--threads 2] [--repeat 7] [--rounds 1] [--configs demo,small]
       [--python /usr/bin/python3[,/path/to/venv/bin/python]]"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "demo": dict(embed=128, depth=6, heads=4, latent=(4, 16, 16), patch=2, text=(16, 16), clip=32, batch=16),
    "small": dict(embed=512, depth=12, heads=8, latent=(4, 32, 32), patch=2, text=(77, 64), clip=512, batch=4),
}
# name: (environment, options); options: mkldnn (nn.Linear -> oneDNN), sdpa (fused attention,
# torch >= 2.0), compile (torch.compile, torch >= 2.0; compile time is not timed)
VARIANTS = {"default": ({}, ()), "skylakex": ({"OPENBLAS_CORETYPE": "SkylakeX"}, ()),
            "mkldnn": ({}, ("mkldnn",)), "skylakex+mkldnn": ({"OPENBLAS_CORETYPE": "SkylakeX"}, ("mkldnn",)),
            "sdpa": ({}, ("sdpa",)), "sdpa+compile": ({}, ("sdpa", "compile"))}


def worker(cfg, threads, repeat, options):
    import torch
    sys.path.insert(0, HERE)
    import torch_uvit
    from torch_uvit import UViT
    major = int(torch.__version__.split(".")[0])
    if major < 2 and ("sdpa" in options or "compile" in options):
        print(json.dumps({"skipped": "needs torch >= 2.0", "torch": torch.__version__}))
        return
    if os.environ.get("OPENBLAS_CORETYPE") and "BLAS_INFO=mkl" in torch.__config__.show():
        print(json.dumps({"skipped": "MKL build: OpenBLAS core type does not apply", "torch": torch.__version__}))
        return
    torch_uvit.USE_SDPA = "sdpa" in options
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = CONFIGS[cfg]
    C, H, W = c["latent"]
    m = UViT(img_size=H, in_chans=C, patch_size=c["patch"], embed_dim=c["embed"], depth=c["depth"],
             num_heads=c["heads"], text_dim=c["text"][1], num_text_tokens=c["text"][0], clip_img_dim=c["clip"]).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    if "mkldnn" in options:
        from torch.utils import mkldnn as mk
        m = mk.to_mkldnn(m)
    if "compile" in options:
        m = torch.compile(m)
    B = c["batch"]
    args = (torch.randn(B, C, H, W), torch.randn(B, 1, c["clip"]), torch.randn(B, *c["text"]),
            torch.full((B,), 500.0), torch.full((B,), 250.0), torch.ones(B, dtype=torch.long))
    ms = []
    with torch.inference_mode():
        m(*args)
        m(*args)
        for _ in range(repeat):
            t0 = time.perf_counter()
            m(*args)
            ms.append((time.perf_counter() - t0) * 1e3)
    ms.sort()
    print(json.dumps({"ms_median": ms[len(ms) // 2], "ms_min": ms[0], "torch": torch.__version__}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--configs", default="demo,small")
    ap.add_argument("--python", default=sys.executable,
                    help="comma-separated interpreters, each with its own torch (e.g. Debian's and a venv's)")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--options", default="")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.threads, a.repeat, tuple(o for o in a.options.split(",") if o))
    pythons = a.python.split(",")
    golden = os.path.join(HERE, "..", "..", "tests", "data", "golden", "uvit_v1_tiny.safetensors")
    for py in pythons:
        subprocess.run([py, os.path.join(HERE, "torch_uvit.py"), "--check", golden], check=True)
    for cfg in a.configs.split(","):
        c = CONFIGS[cfg]
        cmd = [a.bench, "uvit", "--embed", str(c["embed"]), "--depth", str(c["depth"]), "--heads", str(c["heads"]),
               "--latent", "x".join(map(str, c["latent"])), "--patch", str(c["patch"]),
               "--text", "x".join(map(str, c["text"])), "--clip", str(c["clip"]), "--batch", str(c["batch"]),
               "--threads", str(a.threads), "--repeat", str(a.repeat)]
        ratios, fractions = [], []
        for rnd in range(a.rounds):
            ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            fma = json.loads(subprocess.run([a.bench, "fma", "--threads", str(a.threads)], check=True,
                                            capture_output=True, text=True).stdout)
            fractions.append(ours["gflops"] / fma["gflops"])
            print("config %s round %d: unidiffuser %.1f ms (median of %d), %.1f GFLOP/s = %.0f %% of the FMA "
                  "peak measured right after it (%.1f GFLOP/s)"
                  % (cfg, rnd + 1, ours["ms_median"], a.repeat, ours["gflops"], 100 * fractions[-1], fma["gflops"]))
            best = None
            for py in pythons:
                for name, (env, opts) in VARIANTS.items():
                    e = dict(os.environ, **env)
                    w = [py, __file__, "--bench", a.bench, "--worker", cfg, "--threads", str(a.threads),
                         "--repeat", str(a.repeat), "--options", ",".join(opts)]
                    r = json.loads(subprocess.run(w, check=True, capture_output=True, text=True, env=e).stdout)
                    if "skipped" in r:
                        continue
                    best = r["ms_median"] if best is None else min(best, r["ms_median"])
                    print("  torch %-8s %-16s %8.1f ms  -> unidiffuser is %.2fx faster"
                          % (r["torch"], name, r["ms_median"], r["ms_median"] / ours["ms_median"]))
            ratios.append(best / ours["ms_median"])
            print("  against the best PyTorch variant: %.2fx" % ratios[-1])
        ratios.sort()
        fractions.sort()
        print("config %s: median over %d rounds of the ratio to the best PyTorch variant: %.2fx (rounds, sorted: %s); "
              "fraction of the FMA peak: median %.0f %% (rounds, sorted: %s)"
              % (cfg, a.rounds, ratios[len(ratios) // 2], ", ".join("%.2f" % x for x in ratios),
                 100 * fractions[len(fractions) // 2], ", ".join("%.0f %%" % (100 * x) for x in fractions)))


if __name__ == "__main__":
    main()
