#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Interleaved A/B timing of the U-ViT forward in two unidiffuser-bench binaries (e.g. the forward
before and after a change, each built with the same flags): both run as --serve workers, every
round asks each for the same number of forwards in a fresh random order, so load bursts on a
shared machine hit both alike. Prints medians, the ratio of medians and the median per-round
ratio (A/B: above 1 means B is faster) for the demo and small configs of compare_torch.py, at
their benchmark batch and at batch 1.

usage: ab_forward.py --a BENCH_A --b BENCH_B [--threads 2] [--rounds 9] [--configs demo,small]
                     [--gemm auto|eigen|onednn]
"""
import argparse
import json
import random
import statistics
import subprocess

CONFIGS = {
    "demo": dict(embed=128, depth=6, heads=4, latent="4x16x16", patch=2, text="16x16", clip=32, batch=16, n=3),
    "small": dict(embed=512, depth=12, heads=8, latent="4x32x32", patch=2, text="77x64", clip=512, batch=4, n=1),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--configs", default="demo,small")
    ap.add_argument("--gemm", default="auto", help="GEMM path of both binaries: auto, eigen, onednn")
    o = ap.parse_args()
    for name in o.configs.split(","):
        c = CONFIGS[name]
        for batch in (c["batch"], 1):
            args = ["uvit", "--embed", str(c["embed"]), "--depth", str(c["depth"]), "--heads", str(c["heads"]),
                    "--latent", c["latent"], "--patch", str(c["patch"]), "--text", c["text"],
                    "--clip", str(c["clip"]), "--batch", str(batch), "--threads", str(o.threads),
                    "--repeat", "3", "--gemm", o.gemm, "--serve"]
            procs = {k: subprocess.Popen([b] + args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                     for k, b in (("a", o.a), ("b", o.b))}
            for p in procs.values():
                p.stdout.readline()
            times = {k: [] for k in procs}
            for _ in range(o.rounds):
                order = list(procs)
                random.shuffle(order)
                for k in order:
                    procs[k].stdin.write(f"{c['n']}\n")
                    procs[k].stdin.flush()
                    times[k].append(statistics.median(json.loads(procs[k].stdout.readline())["ms"]))
            for p in procs.values():
                p.stdin.close()
                p.wait()
            ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
            rr = statistics.median([x / y for x, y in zip(times["a"], times["b"])])
            print(f"{name:5s} {o.gemm:6s} batch {batch:2d} threads {o.threads}: A {ma:9.2f} ms  B {mb:9.2f} ms  "
                  f"A/B medians {ma / mb:.3f}  median per-round {rr:.3f}", flush=True)


if __name__ == "__main__":
    main()
