# SPDX-License-Identifier: Apache-2.0
"""Times the library's U-ViT forward (or training step, or whole sampling run) against the PyTorch
module of torch_uvit.py at the same configs, in the same run, interleaved, and prints the ratios and
the fraction of the FMA peak.

Every candidate is a long-lived worker process that builds its network once, warms up, and then
runs forwards on request (`unidiffuser-bench uvit --serve`, `compare_torch.py --worker ...`);
the FMA peak is a worker too (`unidiffuser-bench fma --serve`). The script then visits all
workers in turn, round after round (a fresh random order every round), asking each for --per-turn
forwards while the others wait idle. A burst of load from a neighbour on a shared machine
therefore falls on all candidates alike instead of on whichever ran during it, and the medians
over all rounds are compared (also reported: the median over rounds of the per-round ratio).

--step sample times whole sampling runs: the library's `unidiffuser-bench sample --serve` against
sample_torch.py (the official sampling loop: DPM-Solver++ 'fast', order 3, time-uniform grid,
classifier-free guidance 'true_uncond', fresh marginalisation noise at every call) on the same
U-ViT, with the same mode, steps, scale, batch and call structure of the guidance reference calls
(--references separate: one forward per call as the official code; batched: the main and reference
rows of a step in one forward). Each run is the same run every time (fixed seeds). Every
combination of --configs, --modes, --batches and --references is its own interleaved comparison.
Reported besides: the share of each run spent outside the network (1 - median net_ms / median ms).

PyTorch variants (each its own process: OPENBLAS_CORETYPE must be set before torch is imported):
  default          torch as installed
  skylakex         OPENBLAS_CORETYPE=SkylakeX (Debian's OpenBLAS otherwise falls back to SSE3
                   kernels; skipped for MKL builds such as PyPI's)
  mkldnn           nn.Linear -> oneDNN through torch.utils.mkldnn.to_mkldnn
  skylakex+mkldnn  both
  sdpa             attention through F.scaled_dot_product_attention (torch >= 2.0)
  sdpa+compile     that module through torch.compile (torch >= 2.0; compilation is not timed)
  bf16, sdpa+bf16  default / sdpa under torch.autocast('cpu', dtype=torch.bfloat16) (as the official
                   sampling script runs; not float32, so never taken as "the best PyTorch variant";
                   not in the default --variants: slow on CPUs without native bf16 arithmetic)
  sdpa+compile+bf16  the compiled sdpa module under that autocast (compiled on its first call)
The library's math modes: --dtypes f32[,bf16] (bf16: the bench's --dtype bf16, compared with the
best bf16 PyTorch variant as well as with the best float32 one).
Several interpreters (--python A,B) compare several torch builds in the same run, e.g. Debian's
python3-torch and a PyPI torch in a venv. Several library builds or GEMM paths compare too:
--bench A[,B] and --gemm eigen,onednn (a path a build lacks is skipped).
Usage: /usr/bin/python3 compare_torch.py --bench build/release/benchmarks/unidiffuser-bench
       [--gemm auto] [--threads 2] [--rounds 15] [--per-turn 1] [--configs demo,small(,official256)]
       [--variants default,skylakex,...] [--python /usr/bin/python3[,/path/to/venv/bin/python]]
       [--step forward|train|sample] [--modes t2i,joint,...] [--steps 20] [--scale 7] [--batches 1,4]
       [--references batched,separate] [--dtypes f32,bf16]
e.g. whole sampling runs:
       python3 compare_torch.py --step sample --bench build/release/benchmarks/unidiffuser-bench
       --configs demo,small --modes t2i,joint --steps 20 --scale 7 --batches 1,4 --references batched,separate
       --variants default,sdpa,sdpa+compile,bf16,sdpa+bf16"""
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
    # the official UniDiffuser v1 network at 256 px (951 M parameters, about 0.66 TFLOP per forward row)
    "official256": dict(embed=1536, depth=30, heads=24, latent=(4, 32, 32), patch=2, text=(77, 64), clip=512,
                        batch=1),
}
# name: (environment, options); options: mkldnn (nn.Linear -> oneDNN), sdpa (fused attention,
# torch >= 2.0), compile (torch.compile, torch >= 2.0; compile time is not timed), bf16 (the timed
# work under torch.autocast('cpu', dtype=torch.bfloat16))
VARIANTS = {"default": ({}, ()), "skylakex": ({"OPENBLAS_CORETYPE": "SkylakeX"}, ()),
            "mkldnn": ({}, ("mkldnn",)), "skylakex+mkldnn": ({"OPENBLAS_CORETYPE": "SkylakeX"}, ("mkldnn",)),
            "sdpa": ({}, ("sdpa",)), "sdpa+compile": ({}, ("sdpa", "compile")),
            "bf16": ({}, ("bf16",)), "sdpa+bf16": ({}, ("sdpa", "bf16")),
            "sdpa+compile+bf16": ({}, ("sdpa", "compile", "bf16"))}


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


def worker(cfg, threads, options, sample=None):
    """Serves timings of one PyTorch variant: one JSON line when ready, then for every count n read
    from stdin one line {"ms": [n times]} (forwards, training steps, or with `sample` -- a dict of
    mode, steps, scale, batch, references -- whole sampling runs, then also "net_ms")."""
    import contextlib
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
    if sample:  # built on the plain module (its shapes; to_mkldnn replaces its nn.Linear in place)
        import sample_torch
        run = sample_torch.SamplingRun(m, sample["mode"], sample["steps"], sample["scale"],
                                       sample["references"], sample["batch"])
    if "mkldnn" in options and train:
        return emit({"skipped": "to_mkldnn is for inference", "torch": torch.__version__})
    if "mkldnn" in options:
        from torch.utils import mkldnn as mk
        m = mk.to_mkldnn(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, weight_decay=0.03) if train else None
    if "compile" in options:
        m = torch.compile(m)
    # the timed work's precision: float32, or bf16 autocast (training: forward and loss under it)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in options else contextlib.nullcontext

    def serve(once, describe=dict):
        """Warm-up (compilation, workspaces), the ready line (with describe()), then the requests:
        once() runs one unit and returns the time inside the network (ms) or None."""
        once()
        if not sample:  # a second forward or step; a whole sampling run already made many calls
            once()
        emit(dict(ready=True, torch=torch.__version__, **describe()))
        for line in sys.stdin:
            ms, net_ms = [], []
            for _ in range(max(1, int(line))):
                t0 = time.perf_counter()
                n = once()
                ms.append((time.perf_counter() - t0) * 1e3)
                net_ms.append(n)
            emit({"ms": ms} if net_ms[0] is None else {"ms": ms, "net_ms": net_ms})

    if sample:
        run.model.run_net = m  # the variant's module runs the network

        def once():
            with amp():
                x = run()
            if not bool(torch.isfinite(x).all()):  # a broken run, not a slow one
                raise RuntimeError("non-finite sample value")
            return run.model.net_ms

        with torch.inference_mode():
            return serve(once, lambda: {"network_calls": run.model.calls, "network_rows": run.model.rows})
    B = c["batch"]
    args = (torch.randn(B, C, H, W), torch.randn(B, 1, c["clip"]), torch.randn(B, *c["text"]),
            torch.full((B,), 500.0), torch.full((B,), 250.0), torch.ones(B, dtype=torch.long))
    if train:  # one training step: forward, the UniDiffuser loss (MSE over all elements), backward, AdamW
        eps = [torch.randn(B, C, H, W), torch.randn(B, 1, c["clip"]), torch.randn(B, *c["text"])]

        def step():
            opt.zero_grad(set_to_none=True)
            with amp():
                out = m(*args)
                loss = torch.cat([((o - e) ** 2).flatten(1) for o, e in zip(out, eps)], 1).float().mean()
            loss.backward()
            opt.step()

        return serve(step)

    def forward():
        with amp():
            m(*args)

    with torch.inference_mode():
        serve(forward)


class Worker:
    def __init__(self, label, cmd, env=None):
        self.label, self.times, self.net_times, self.skipped, self.fp32 = label, [], [], None, True
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
    ap.add_argument("--per-turn", type=int, default=1, help="forwards (steps, runs) per candidate per round")
    ap.add_argument("--fma-seconds", type=float, default=0.3)
    ap.add_argument("--configs", default="demo,small")
    ap.add_argument("--step", default="forward", choices=["forward", "train", "sample"],
                    help="time forwards, training steps (forward + backward + AdamW), or whole sampling runs")
    ap.add_argument("--modes", default="t2i", help="sample: comma-separated modes (joint, t2i, i2t, i, t)")
    ap.add_argument("--steps", type=int, default=20, help="sample: solver steps (network evaluations)")
    ap.add_argument("--scale", type=float, default=7.0, help="sample: guidance scale (0: none)")
    ap.add_argument("--batches", default="1", help="sample: comma-separated batch sizes (forward and "
                    "train use the config's)")
    ap.add_argument("--references", default="batched,separate",
                    help="sample: comma-separated call structures of the guidance reference calls")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if "bf16" not in v))
    ap.add_argument("--dtypes", default="f32", help="comma-separated math modes of the library: f32, bf16")
    ap.add_argument("--python", default=sys.executable,
                    help="comma-separated interpreters, each with its own torch (e.g. Debian's and a venv's)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--options", default="")
    ap.add_argument("--sample", default=None, help="worker: the sampling run (JSON)")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.threads, tuple(o for o in a.options.split(",") if o),
                      json.loads(a.sample) if a.sample else None)
    if not a.bench:
        ap.error("--bench is required")
    pythons = a.python.split(",")
    golden = os.path.join(HERE, "..", "..", "tests", "data", "golden")
    for py in pythons:
        subprocess.run([py, os.path.join(HERE, "torch_uvit.py"), "--check",
                        os.path.join(golden, "uvit_v1_tiny.safetensors")], check=True)
        if a.step == "sample":
            subprocess.run([py, os.path.join(HERE, "sample_torch.py"), "--check",
                            os.path.join(golden, "sample_modes.safetensors")], check=True)
    rng = random.Random(a.seed)
    print("command: %s" % " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]))
    # one interleaved comparison per config (and, sampling, per mode, batch and call structure)
    if a.step == "sample":
        combos = [(cfg, dict(mode=m, steps=a.steps, scale=a.scale, batch=int(b), references=r))
                  for cfg in a.configs.split(",") for m in a.modes.split(",") for b in a.batches.split(",")
                  for r in a.references.split(",")]
    else:
        combos = [(cfg, None) for cfg in a.configs.split(",")]
    unit = {"forward": "forward(s)", "train": "training step(s)", "sample": "sampling run(s)"}[a.step]
    for cfg, smp in combos:
        c = CONFIGS[cfg]
        args = ["--embed", str(c["embed"]), "--depth", str(c["depth"]), "--heads", str(c["heads"]),
                "--latent", "x".join(map(str, c["latent"])), "--patch", str(c["patch"]),
                "--text", "x".join(map(str, c["text"])), "--clip", str(c["clip"]),
                "--batch", str(smp["batch"] if smp else c["batch"]), "--threads", str(a.threads)]
        if smp:
            args += ["--mode", smp["mode"], "--steps", str(smp["steps"]), "--scale", repr(smp["scale"]),
                     "--references", smp["references"]]
        ours, theirs = [], []
        for bench in a.bench.split(","):
            for g in a.gemm.split(","):
                for dt in a.dtypes.split(","):
                    sub = {"forward": "uvit", "train": "train", "sample": "sample"}[a.step]
                    w = Worker("unidiffuser[%s]" % g, [bench, sub] + args + ["--gemm", g, "--dtype", dt, "--serve"])
                    if w.skipped:  # this build lacks the path (the bench said why on stderr)
                        continue
                    dtype = w.info.get("dtype", "f32")  # f32 where bf16 fell back (the bench said why)
                    w.label = "unidiffuser[%s%s]%s" % (w.info["gemm"], "" if dtype == "f32" else " " + dtype,
                                                       "" if len(a.bench.split(",")) == 1
                                                       else " " + os.path.relpath(bench))
                    w.fp32 = dtype == "f32"
                    ours.append(w)
        for py in pythons:
            for name in a.variants.split(","):
                env, opts = VARIANTS[name]
                wopts = opts + (("train",) if a.step == "train" else ())
                w = Worker(name, [py, __file__, "--worker", cfg, "--threads", str(a.threads), "--options",
                                  ",".join(wopts)] + (["--sample", json.dumps(smp)] if smp else []),
                           env=dict(os.environ, **env))
                if w.skipped:
                    continue
                w.label = "torch %s %s" % (w.info["torch"], name)
                w.fp32 = "bf16" not in opts
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
                    reply = w.ask(a.per_turn)
                    w.times += reply["ms"]
                    w.net_times += reply.get("net_ms", [])
                    row[w.label] = statistics.median(reply["ms"])
            per_round.append(row)
        for w in everyone:  # peak resident memory of each worker process (whole process)
            w.hwm = vm_hwm_mib(w.p.pid)
        for w in everyone + [fma]:
            w.close()
        peak = statistics.median(peaks)
        what = ""
        if smp:
            i = ours[0].info
            what = (" %s, %d steps, scale %g, batch %d, references %s (%d network calls, %d rows, %.2f GFLOP "
                    "per run)" % (smp["mode"], smp["steps"], smp["scale"], smp["batch"], smp["references"],
                                  i["network_calls"], i["network_rows"], gflop))
        print("config %s%s: %d rounds of %d %s per candidate, interleaved (%.0f s); FMA peak median %.1f "
              "GFLOP/s (range %.1f-%.1f over %d measurements)"
              % (cfg, what, a.rounds, a.per_turn, unit, time.time() - t0, peak, min(peaks), max(peaks), len(peaks)))
        for w in theirs:  # like for like: the same network calls of the same sizes
            if smp and (w.info.get("network_calls"), w.info.get("network_rows")) != (
                    ours[0].info["network_calls"], ours[0].info["network_rows"]):
                print("  WARNING: %s makes %s network calls of %s rows per run, the library %d of %d"
                      % (w.label, w.info.get("network_calls"), w.info.get("network_rows"),
                         ours[0].info["network_calls"], ours[0].info["network_rows"]))
        best_ours = min(statistics.median(o.times) for o in ours)
        for w in everyone:
            med = statistics.median(w.times)
            q = sorted(w.times)
            outside = ("  outside the network %4.1f %%" % (100 * (1 - statistics.median(w.net_times) / med))
                       if w.net_times else "")
            print("  %-40s median %8.1f ms  (min %8.1f, max %8.1f)  %6.1f GFLOP/s = %3.0f %% of peak  "
                  "peak RSS %6.0f MiB%s%s"
                  % (w.label, med, q[0], q[-1], gflop / med * 1e3, 100 * gflop / med * 1e3 / peak, w.hwm, outside,
                     "" if w in ours else "  -> %.2fx the best library time" % (med / best_ours)))
        if not theirs:
            continue
        fp32 = [w for w in theirs if w.fp32] or theirs  # the float32 variants: the like-for-like baseline
        half = [w for w in theirs if not w.fp32]  # the bf16 autocast variants
        for o in ours:
            mo = statistics.median(o.times)
            # like for like: float32 against float32; bf16 against bf16 autocast, then float32 too
            for best in ([min(fp32, key=lambda w: statistics.median(w.times))] if o.fp32 or not half else
                         [min(half, key=lambda w: statistics.median(w.times))] +
                         [min(v, key=lambda w: statistics.median(w.times)) for v in [[w for w in fp32 if w.fp32]] if v]):
                paired = statistics.median(row[best.label] / row[o.label] for row in per_round)
                print("  %s vs the best %sPyTorch variant (%s): %.2fx faster (ratio of medians; median of "
                      "per-round ratios %.2fx); %.0f %% of the FMA peak"
                      % (o.label, "float32 " if best.fp32 else "bf16 ", best.label,
                         statistics.median(best.times) / mo, paired, 100 * gflop / mo * 1e3 / peak))
            best = min(fp32, key=lambda w: statistics.median(w.times))
            for py in pythons:
                mine = [w for w in fp32 if w.p.args[0] == py]
                if mine and len(pythons) > 1:
                    b = min(mine, key=lambda w: statistics.median(w.times))
                    print("    vs the best variant of %s (%s): %.2fx" % (py, b.label, statistics.median(b.times) / mo))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
