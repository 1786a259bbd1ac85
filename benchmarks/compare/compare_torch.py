# SPDX-License-Identifier: Apache-2.0
"""Times the library's U-ViT forward against the PyTorch module of torch_uvit.py at the same
configs, in the same run, interleaved, and prints the ratios and the fraction of the FMA peak.

Every candidate is a long-lived worker process that builds its network once, warms up, and then
runs forwards on request (`unidiffuser-bench uvit --serve`, `compare_torch.py --worker ...`);
the FMA peak is a worker too (`unidiffuser-bench fma --serve`). The script then visits all
workers in turn, round after round (a fresh random order every round), asking each for --per-turn
forwards while the others wait idle. A burst of load from a neighbour on a shared machine
therefore falls on all candidates alike instead of on whichever ran during it, and the medians
over all rounds are compared (also reported: the median over rounds of the per-round ratio).

PyTorch variants (each its own process: OPENBLAS_CORETYPE must be set before torch is imported):
  default          torch as installed
  skylakex         OPENBLAS_CORETYPE=SkylakeX (Debian's OpenBLAS otherwise falls back to SSE3
                   kernels; skipped for MKL builds such as PyPI's)
  mkldnn           nn.Linear -> oneDNN through torch.utils.mkldnn.to_mkldnn
  skylakex+mkldnn  both
  sdpa             attention through F.scaled_dot_product_attention (torch >= 2.0)
  sdpa+compile     that module through torch.compile (torch >= 2.0; compilation is not timed)
Several interpreters (--python A,B) compare several torch builds in the same run, e.g. Debian's
python3-torch and a PyPI torch in a venv. Several library builds or GEMM paths compare too:
--bench A[,B] and --gemm eigen,onednn (a path a build lacks is skipped).
Usage: /usr/bin/python3 compare_torch.py --bench build/release/benchmarks/unidiffuser-bench
       [--gemm auto] [--threads 2] [--rounds 15] [--per-turn 1] [--configs demo,small]
       [--variants default,skylakex,...] [--python /usr/bin/python3[,/path/to/venv/bin/python]]"""
import argparse
import json
import os
import random
import statistics
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


def vm_hwm_mib(pid):
    """Peak resident set of a live process (Linux /proc), MiB; nan where unavailable."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(cfg, threads, options):
    """Serves forward timings of one PyTorch variant: one JSON line when ready, then for every
    count n read from stdin one line {"ms": [n times]}."""
    import torch
    sys.path.insert(0, HERE)
    import torch_uvit
    from torch_uvit import UViT
    major = int(torch.__version__.split(".")[0])
    if major < 2 and ("sdpa" in options or "compile" in options):
        return emit({"skipped": "needs torch >= 2.0", "torch": torch.__version__})
    if os.environ.get("OPENBLAS_CORETYPE") and "BLAS_INFO=mkl" in torch.__config__.show():
        return emit({"skipped": "MKL build: OpenBLAS core type does not apply", "torch": torch.__version__})
    torch_uvit.USE_SDPA = "sdpa" in options
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    c = CONFIGS[cfg]
    C, H, W = c["latent"]
    train = "train" in options
    m = UViT(img_size=H, in_chans=C, patch_size=c["patch"], embed_dim=c["embed"], depth=c["depth"],
             num_heads=c["heads"], text_dim=c["text"][1], num_text_tokens=c["text"][0], clip_img_dim=c["clip"])
    m = m.train() if train else m.eval()
    for p in m.parameters():
        p.data.normal_(0, 0.02)
    if "mkldnn" in options and train:
        return emit({"skipped": "to_mkldnn is for inference", "torch": torch.__version__})
    if "mkldnn" in options:
        from torch.utils import mkldnn as mk
        m = mk.to_mkldnn(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.03) if train else None
    if "compile" in options:
        m = torch.compile(m)
    B = c["batch"]
    args = (torch.randn(B, C, H, W), torch.randn(B, 1, c["clip"]), torch.randn(B, *c["text"]),
            torch.full((B,), 500.0), torch.full((B,), 250.0), torch.ones(B, dtype=torch.long))
    if train:  # one training step: forward, the UniDiffuser loss (MSE over all elements), backward, AdamW
        eps = [torch.randn(B, C, H, W), torch.randn(B, 1, c["clip"]), torch.randn(B, *c["text"])]

        def step():
            opt.zero_grad(set_to_none=True)
            out = m(*args)
            loss = torch.cat([((o - e) ** 2).flatten(1) for o, e in zip(out, eps)], 1).mean()
            loss.backward()
            opt.step()

        step()
        step()
        emit({"ready": True, "torch": torch.__version__})
        for line in sys.stdin:
            ms = []
            for _ in range(max(1, int(line))):
                t0 = time.perf_counter()
                step()
                ms.append((time.perf_counter() - t0) * 1e3)
            emit({"ms": ms})
        return
    with torch.inference_mode():
        m(*args)
        m(*args)
        emit({"ready": True, "torch": torch.__version__})
        for line in sys.stdin:
            ms = []
            for _ in range(max(1, int(line))):
                t0 = time.perf_counter()
                m(*args)
                ms.append((time.perf_counter() - t0) * 1e3)
            emit({"ms": ms})


class Worker:
    def __init__(self, label, cmd, env=None):
        self.label, self.times, self.skipped = label, [], None
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.p.stdout.readline() or '{"skipped": "worker exited"}')
        if "skipped" in self.info:
            self.skipped = self.info["skipped"]
            self.close()

    def ask(self, what):
        self.p.stdin.write("%s\n" % what)
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        if self.p.stdin:
            self.p.stdin.close()
        self.p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", default=None, help="comma-separated unidiffuser-bench binaries")
    ap.add_argument("--gemm", default="auto", help="comma-separated GEMM paths of the library: auto, eigen, onednn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-turn", type=int, default=1, help="forwards per candidate per round")
    ap.add_argument("--fma-seconds", type=float, default=0.3)
    ap.add_argument("--configs", default="demo,small")
    ap.add_argument("--step", default="forward", choices=["forward", "train"],
                    help="time forwards, or training steps (forward + backward + AdamW)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--python", default=sys.executable,
                    help="comma-separated interpreters, each with its own torch (e.g. Debian's and a venv's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--options", default="")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.threads, tuple(o for o in a.options.split(",") if o))
    if not a.bench:
        ap.error("--bench is required")
    pythons = a.python.split(",")
    golden = os.path.join(HERE, "..", "..", "tests", "data", "golden", "uvit_v1_tiny.safetensors")
    for py in pythons:
        subprocess.run([py, os.path.join(HERE, "torch_uvit.py"), "--check", golden], check=True)
    rng = random.Random(a.seed)
    print("command: %s" % " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    for cfg in a.configs.split(","):
        c = CONFIGS[cfg]
        args = ["--embed", str(c["embed"]), "--depth", str(c["depth"]), "--heads", str(c["heads"]),
                "--latent", "x".join(map(str, c["latent"])), "--patch", str(c["patch"]),
                "--text", "x".join(map(str, c["text"])), "--clip", str(c["clip"]), "--batch", str(c["batch"]),
                "--threads", str(a.threads)]
        ours, theirs = [], []
        for bench in a.bench.split(","):
            for g in a.gemm.split(","):
                sub = "train" if a.step == "train" else "uvit"
                w = Worker("unidiffuser[%s]" % g, [bench, sub] + args + ["--gemm", g, "--serve"])
                if w.skipped:  # this build lacks the path (the bench said why on stderr)
                    continue
                w.label = "unidiffuser[%s]%s" % (w.info["gemm"], "" if len(a.bench.split(",")) == 1
                                                  else " " + os.path.relpath(bench))
                ours.append(w)
        for py in pythons:
            for name in a.variants.split(","):
                env, opts = VARIANTS[name]
                wopts = opts + (("train",) if a.step == "train" else ())
                w = Worker(name, [py, __file__, "--worker", cfg, "--threads", str(a.threads), "--options",
                                  ",".join(wopts)], env=dict(os.environ, **env))
                if w.skipped:
                    continue
                w.label = "torch %s %s" % (w.info["torch"], name)
                theirs.append(w)
        fma = Worker("fma", [a.bench.split(",")[0], "fma", "--threads", str(a.threads), "--serve"])
        gflop = ours[0].info["gflop"]
        everyone = ours + theirs
        peaks = []
        per_round = []  # per round: {label: median time of the turn}
        t0 = time.time()
        for r in range(a.rounds):
            order = everyone + [fma]
            rng.shuffle(order)
            row = {}
            for w in order:
                if w is fma:
                    peaks.append(w.ask(a.fma_seconds)["gflops"])
                else:
                    ms = w.ask(a.per_turn)["ms"]
                    w.times += ms
                    row[w.label] = statistics.median(ms)
            per_round.append(row)
        for w in everyone:  # peak resident memory of each worker process (whole process)
            w.hwm = vm_hwm_mib(w.p.pid)
        for w in everyone + [fma]:
            w.close()
        peak = statistics.median(peaks)
        print("config %s: %d rounds of %d %s per candidate, interleaved (%.0f s); FMA peak median %.1f "
              "GFLOP/s (range %.1f-%.1f over %d measurements)"
              % (cfg, a.rounds, a.per_turn, "training step(s)" if a.step == "train" else "forward(s)",
                 time.time() - t0, peak, min(peaks), max(peaks), len(peaks)))
        best = min(theirs, key=lambda w: statistics.median(w.times))
        for w in everyone:
            med = statistics.median(w.times)
            q = sorted(w.times)
            print("  %-40s median %8.1f ms  (min %8.1f, max %8.1f)  %6.1f GFLOP/s = %3.0f %% of peak  "
                  "peak RSS %6.0f MiB%s"
                  % (w.label, med, q[0], q[-1], gflop / med * 1e3, 100 * gflop / med * 1e3 / peak, w.hwm,
                     "" if w in ours else "  -> %.2fx the best library time" % (med / min(
                         statistics.median(o.times) for o in ours))))
        for o in ours:
            mo = statistics.median(o.times)
            paired = statistics.median(row[best.label] / row[o.label] for row in per_round)
            print("  %s vs the best PyTorch variant (%s): %.2fx faster (ratio of medians; median of "
                  "per-round ratios %.2fx); %.0f %% of the FMA peak"
                  % (o.label, best.label, statistics.median(best.times) / mo, paired,
                     100 * gflop / mo * 1e3 / peak))
            for py in pythons:
                mine = [w for w in theirs if w.p.args[0] == py]
                if mine and len(pythons) > 1:
                    b = min(mine, key=lambda w: statistics.median(w.times))
                    print("    vs the best variant of %s (%s): %.2fx" % (py, b.label, statistics.median(b.times) / mo))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
