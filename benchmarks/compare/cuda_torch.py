# SPDX-License-Identifier: Apache-2.0
"""PyTorch on the same GPU as unidiffuser-bench-cuda: the official v1 U-ViT (torch_uvit.py, the
official state_dict layout, random weights) timed with CUDA events (median after warm-up) at
batch 1 and 8 in fp32 (TF32 off), TF32, and bf16 autocast with scaled_dot_product_attention
(optionally also under torch.compile), one training step (forward + backward) at batch 1, SDPA
alone at the v1 attention shape, the bf16 / fp32 / TF32 matrix ceilings, and a guided t2i run
(--steps, 50 by default; the network calls of the official sampler, see below); peak device
memory per case (torch.cuda.max_memory_allocated). One JSON object per line, then a table.

usage: python3 cuda_torch.py [--compile] [--t2i-compile] [--quick] [--depth 30] [--steps 50]"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_uvit  # noqa: E402

ROWS = []


def time_ms(f, warm=2, reps=7):
    for _ in range(warm):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def report(what, ms, flop, mem=None):
    tf = flop / (ms * 1e-3) / 1e12 if flop else 0.0
    row = {"bench": what, "ms": round(ms, 4), "tflops": round(tf, 2)}
    if mem is not None:
        row["peak_mib"] = round(mem / 2**20)
    print(json.dumps(row), flush=True)
    ROWS.append(row)


def v1_inputs(B, dev):
    """Random image latent, CLIP image embedding and text embedding of a batch of B."""
    return (torch.randn(B, 4, 64, 64, device=dev), torch.randn(B, 1, 512, device=dev),
            torch.randn(B, 77, 64, device=dev))


def v1_flop(depth, L=1105, E=1536):
    return (depth + 1) * (2.0 * L * 12 * E * E + 4.0 * L * L * E) + (depth // 2) * 2.0 * L * 2 * E * E


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--depth", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--t2i-compile", action="store_true")
    a = ap.parse_args()
    dev = torch.device("cuda")
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__}))
    for name, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                           ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        n = 8192
        x = torch.randn(n, n, device=dev, dtype=dt)
        y = torch.randn(n, n, device=dev, dtype=dt)
        report("gemm %s %d^3" % (name, n), time_ms(lambda: x @ y, 2, 10), 2.0 * n ** 3)
    torch.backends.cuda.matmul.allow_tf32 = False
    L, E, H = 1105, 1536, 24
    for B in (1, 8):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            q, k, v = (torch.randn(B, H, L, E // H, device=dev, dtype=dt) for _ in range(3))
            report("attention %s fwd SDPA B=%d" % (name, B),
                   time_ms(lambda: F.scaled_dot_product_attention(q, k, v), 1, 5), 4.0 * B * L * L * E)
    torch.manual_seed(0)
    net = torch_uvit.UViT(64, 4, 2, 1536, a.depth, 24, 4.0, False, False, 64, 77, 512, "v1").to(dev)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    variants = [("fp32", False, None), ("tf32", True, None), ("bf16 sdpa", False, torch.bfloat16)]
    if a.compile:
        variants.append(("bf16 sdpa compile", False, torch.bfloat16))
    for label, tf32, ac in variants:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch_uvit.USE_SDPA = ac is not None
        model = torch.compile(net) if "compile" in label else net
        for B in (1, 8):
            if a.quick and B == 8:
                continue
            img, clip, text = v1_inputs(B, dev)
            t = torch.full((B,), 500.0, device=dev)
            dtp = torch.ones(B, dtype=torch.long, device=dev)

            def fwd():
                with torch.no_grad(), torch.autocast("cuda", dtype=ac or torch.float32, enabled=ac is not None):
                    return model(img, clip, text, t, t, dtp)

            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(fwd, 3 if "compile" in label else 2, 7 if B == 1 else 5)
            report("v1 forward %s B=%d" % (label, B), ms, v1_flop(a.depth) * B,
                   torch.cuda.max_memory_allocated())
            if B == 1:
                def step():
                    net.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=ac or torch.float32, enabled=ac is not None):
                        y = model(img, clip, text, t, t, dtp)
                    (y[0].float().sum() + y[1].float().sum() + y[2].float().sum()).backward()

                torch.cuda.reset_peak_memory_stats()
                ms = time_ms(step, 2, 3)
                report("v1 train step %s B=1" % label, ms, 3 * v1_flop(a.depth),
                       torch.cuda.max_memory_allocated())
    # Guided t2i (scale 7): per step one network call on 2B rows (the conditional call and the
    # true_uncond reference -- text replaced by noise at time 1000 -- batched, as the library
    # does), the guided combination and a first-order update of the image and CLIP latents: the
    # network work of the official sampler, whose DPM-Solver++ arithmetic adds little. Eager
    # (the official sampler's way) and, with --t2i-compile, compiled (two more compilations).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch_uvit.USE_SDPA = True
    t2i_variants = [("bf16 sdpa", False)] + ([("bf16 sdpa compile", True)] if a.t2i_compile else [])
    for label, compiled in t2i_variants:
        model = torch.compile(net) if compiled else net
        for B in (1, 8):
            if a.quick and B == 8:
                continue
            img, clip, text = v1_inputs(B, dev)
            noise_text = torch.randn(B, 77, 64, device=dev)
            dtp = torch.ones(2 * B, dtype=torch.long, device=dev)
            t_text = torch.cat([torch.zeros(B, device=dev), torch.full((B,), 1000.0, device=dev)])

            def t2i():
                x_img, x_clip = img.clone(), clip.clone()
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    for i in range(a.steps):
                        t_img = torch.full((2 * B,), 1000.0 * (1.0 - i / a.steps), device=dev)
                        out = model(torch.cat([x_img, x_img]), torch.cat([x_clip, x_clip]),
                                    torch.cat([text, noise_text]), t_img, t_text, dtp)
                        e_img = 8.0 * out[0][:B].float() - 7.0 * out[0][B:].float()
                        e_clip = 8.0 * out[1][:B].float() - 7.0 * out[1][B:].float()
                        x_img = 0.999 * x_img - 0.01 * e_img
                        x_clip = 0.999 * x_clip - 0.01 * e_clip
                return x_img, x_clip

            torch.cuda.reset_peak_memory_stats()
            ms = time_ms(t2i, 1, 1)
            report("t2i %d steps guided %s B=%d" % (a.steps, label, B), ms,
                   2.0 * a.steps * v1_flop(a.depth) * B, torch.cuda.max_memory_allocated())
    print("\n%-40s %12s %10s %10s" % ("benchmark", "median ms", "TFLOP/s", "peak MiB"))
    for r in ROWS:
        print("%-40s %12.3f %10.2f %10s" % (r["bench"], r["ms"], r["tflops"], r.get("peak_mib", "")))


if __name__ == "__main__":
    main()
