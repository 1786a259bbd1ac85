# SPDX-License-Identifier: Apache-2.0
"""The shapes demo's marginal modes sampled with an exact network (docs/SHAPES.md, attempt 20).

The world of world.hpp (v1) is finite: 2 sizes x 4 colours x 3 shapes x 4 quadrants x the box's
jitter (16 places for a small box, 4 for a large one) = 960 distinct images, each with its
caption; the data law is a mixture of point masses with known weights. For such a law the ideal
network is known in closed form: the posterior mean E[x0 | x_img at level s, x_txt at level t] =
sum_j w_j x0_j, w_j proportional to p_j N(x_img; a_s img_j, s_s^2) N(x_txt; a_t cap_j, s_t^2). A
trained network can at best approach it, so sampling with it shows the law a mode converges to
as training converges. The marginal modes are sampled as the demo samples them (UNIDIFFUSER.md,
official modes i and t): the own group starts from N(0, I) at t = 1, the other group is fresh
N(0, I) noise at level N at every call; DPM-Solver++ (2M, multistep, first step first order;
SAMPLERS.md 10.3) on the continuous VP schedule interpolated from the official scaled-linear
betas (log alpha piecewise linear at t = n / N), time-uniform grid from 1 to 1/N. Samples are read
by the nearest point (image) and by nearest-token decoding per word (caption, as the demo does),
and scored like the demo: per attribute, the total-variation distance of the frequencies from
the data law.

Schedules (a cell's optional fifth field): sd, the official one (default); sd-rescaled, the
demo's --schedule sd-rescaled (sqrt(abar) rescaled so that level N keeps a quarter of its data
trace, docs/SHAPES.md attempt 21); sd/K, the same with 1/K.

Rows (`--rule`):
  official   the demo's rule above
  marginal   the exact marginal network of the group alone (the other group ignored): isolates
             what the own group's pure-noise start does
  floor      the exact marginal network started from the true level-N law (a_T x0 + s_T eps,
             x0 drawn from the data): only the solver's discretisation and the sampling noise

The embedding table is world.hpp's (Philox4x32-10, key 0x7e87, stream 7, Box-Muller), so the
captions are the demo's. Needs numpy. `python3 exact_world.py` prints the table of attempts 20
and 21 (a few minutes on two cores); `--help` lists the options.
"""
import argparse

import numpy as np

N = 1000
SIZES, COLOURS, SHAPES, QUADRANTS = 2, 4, 3, 4
COLOUR_P = [0.4, 0.3, 0.2, 0.1]
PALETTE = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], float)
BOX = [5, 7]
PRIORS = [[0.5, 0.5], COLOUR_P, [1 / 3] * 3, [0.25] * 4]
MASK32 = 0xFFFFFFFF


def philox4x32(ctr, key):
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k[0]) & MASK32, p1 & MASK32,
             ((p0 >> 32) ^ c[3] ^ k[1]) & MASK32, p0 & MASK32]
    return c


def embedding_table():
    """world.hpp embedding_table(): 13 x 32 N(0, 1) entries, in float32."""
    e = np.zeros(13 * 32)
    for i in range(0, 13 * 32, 2):
        b = philox4x32([i, 0, 7, 0x5A17E5], [0x7E87, 0])
        r = np.sqrt(-2 * np.log((b[0] + 0.5) * 2.0**-32))
        th = 2 * 3.14159265358979323846 * ((b[1] + 0.5) * 2.0**-32)
        e[i], e[i + 1] = r * np.cos(th), r * np.sin(th)
    return e.astype(np.float32).astype(float).reshape(13, 32)


def inside(shape, d, u, v):
    if shape == 1:
        return True
    if shape == 0:
        c = d / 2
        return (u + 0.5 - c) ** 2 + (v + 0.5 - c) ** 2 <= c * c
    return abs(u - d // 2) <= v // 2


def world():
    """Every distinct (image, caption) of world v1 with its probability and attributes."""
    table = embedding_table()
    imgs, caps, probs, attrs = [], [], [], []
    for s in range(SIZES):
        d = BOX[s]
        room = 8 - d + 1
        for c in range(COLOURS):
            for h in range(SHAPES):
                for q in range(QUADRANTS):
                    for jx in range(room):
                        for jy in range(room):
                            x0, y0 = (q % 2) * 8 + jx, (q // 2) * 8 + jy
                            im = -np.ones((3, 16, 16))
                            for v in range(d):
                                for u in range(d):
                                    if inside(h, d, u, v):
                                        im[:, y0 + v, x0 + u] = 2 * PALETTE[c] - 1
                            imgs.append(im.ravel())
                            words = [s, 2 + c, 6 + h, 9 + q // 2, 11 + q % 2]
                            caps.append(np.concatenate([table[w] for w in words]))
                            probs.append(0.5 * COLOUR_P[c] / SHAPES / QUADRANTS / room**2)
                            attrs.append((s, c, h, q))
    return np.array(imgs), np.array(caps), np.array(probs), np.array(attrs), table


def image_code(imgs, probs, name):
    """world.hpp ImageCode on the pixel images: pixels | centred | centred-half."""
    if name == "pixels":
        return imgs
    mean = (probs[:, None] * imgs).sum(0).reshape(3, 256).mean(1)
    centred = (imgs.reshape(-1, 3, 256) - mean[None, :, None]).reshape(len(imgs), -1)
    return centred if name == "centred" else centred / 2


def log_alpha_knots(schedule="sd"):
    """sd: the official scaled-linear betas; sd/K: the same with sqrt(abar) rescaled by the affine
    map that keeps level 1 and takes level N to 1/K of its value (ud::rescale_terminal);
    sd-rescaled: sd/4, the demo's --schedule sd-rescaled."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, N) ** 2
    sa = np.sqrt(np.cumprod(1 - betas))
    if schedule == "sd-rescaled":
        schedule = "sd/4"
    if schedule != "sd":
        k = float(schedule.split("/")[1])
        lo = sa[-1] / k
        sa = (sa - sa[-1]) * (sa[0] - lo) / (sa[0] - sa[-1]) + lo
    return np.log(sa)


LA = log_alpha_knots()


def coef(t):
    a = np.exp(np.interp(t, np.arange(1, N + 1) / N, LA))
    s = np.sqrt(1 - a * a)
    return a, s, np.log(a / s)


def log_likelihood(x, pts, t):
    a, s, _ = coef(t)
    d2 = (x * x).sum(1)[:, None] - 2 * a * (x @ pts.T) + a * a * (pts * pts).sum(1)[None]
    return -d2 / (2 * s * s)


def sample(own, other, probs, rule, steps, n, seed):
    rng = np.random.default_rng(seed)
    grid = np.linspace(1.0, 1.0 / N, steps + 1)
    a_T, s_T, _ = coef(1.0)
    if rule == "floor":
        k = rng.choice(len(probs), size=n, p=probs)
        x = a_T * own[k] + s_T * rng.standard_normal((n, own.shape[1]))
    else:
        x = rng.standard_normal((n, own.shape[1]))
    prev = h_prev = None
    for i in range(steps):
        _, s_s, l_s = coef(grid[i])
        a_t, s_t, l_t = coef(grid[i + 1])
        h = l_t - l_s
        lw = np.log(probs)[None] + log_likelihood(x, own, grid[i])
        if rule == "official":
            lw = lw + log_likelihood(rng.standard_normal((n, other.shape[1])), other, 1.0)
        lw -= lw.max(1, keepdims=True)
        w = np.exp(lw)
        x0 = (w / w.sum(1, keepdims=True)) @ own
        if prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev
        x = (s_t / s_s) * x - a_t * np.expm1(-h) * d
        prev, h_prev = x0, h
    return x


def read_images(x, pts, attrs):
    d2 = (x * x).sum(1)[:, None] - 2 * (x @ pts.T) + (pts * pts).sum(1)[None]
    return attrs[d2.argmin(1)]


def read_captions(x, table):
    n = len(x)
    tok = ((x.reshape(n, 5, 1, 32) - table[None, None]) ** 2).sum(-1).argmin(-1)
    ok = ((tok[:, 0] < 2) & (tok[:, 1] >= 2) & (tok[:, 1] < 6) & (tok[:, 2] >= 6) & (tok[:, 2] < 9)
          & (tok[:, 3] >= 9) & (tok[:, 3] < 11) & (tok[:, 4] >= 11))
    att = np.stack([tok[:, 0], tok[:, 1] - 2, tok[:, 2] - 6, (tok[:, 3] - 9) * 2 + tok[:, 4] - 11], 1)
    att[~ok] = -1
    return att


def tvs(att):
    out = []
    for k, p in enumerate(PRIORS):
        f = np.array([(att[:, k] == v).mean() for v in range(len(p))])
        out.append(0.5 * np.abs(f - np.array(p)).sum())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2048, help="samples per cell (default 2048)")
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds per cell (default 2)")
    ap.add_argument("--cells", default="default",
                    help="comma-separated mode:code:rule:steps[:schedule] cells, e.g. "
                    "i:pixels:official:12 or i:pixels:official:12:sd-rescaled (schedule sd, "
                    "sd-rescaled or sd/K; default sd)")
    args = ap.parse_args()
    cells = args.cells.split(",") if args.cells != "default" else [
        f"{m}:{c}:{r}:{s}" for m, c, r, s in [
            ("i", "pixels", "official", 12), ("i", "pixels", "official", 50),
            ("i", "pixels", "marginal", 50), ("i", "pixels", "floor", 12),
            ("i", "pixels", "floor", 50), ("i", "centred", "official", 12),
            ("i", "centred", "official", 50), ("i", "centred-half", "official", 12),
            ("i", "centred-half", "official", 50), ("t", "pixels", "official", 12),
            ("t", "pixels", "marginal", 12), ("t", "pixels", "floor", 12),
            ("t", "centred-half", "official", 12)]] + [
        f"{m}:pixels:{r}:{s}:sd-rescaled" for m, r, s in [
            ("i", "official", 12), ("i", "official", 50), ("i", "floor", 12), ("i", "floor", 50),
            ("t", "official", 12), ("t", "floor", 12)]]
    imgs, caps, probs, attrs, table = world()
    print(f"world v1: {len(imgs)} distinct pairs; {args.samples} samples per cell and seed")
    print("| mode | image code | rule | steps | schedule | TV size / colour / shape / position (one row per seed) |")
    print("|---|---|---|---|---|---|")
    global LA
    for cell in cells:
        mode, code, rule, steps, *sched = cell.split(":")
        LA = log_alpha_knots(sched[0] if sched else "sd")
        img = image_code(imgs, probs, code)
        rows = []
        for seed in range(args.seeds):
            if mode == "i":
                x = sample(img, caps, probs, rule, int(steps), args.samples, seed)
                att = read_images(x, img, attrs)
            else:
                x = sample(caps, img, probs, rule, int(steps), args.samples, seed)
                att = read_captions(x, table)
            rows.append(" / ".join(f"{v:.3f}" for v in tvs(att)))
        print(f"| {mode} | {code} | {rule} | {steps} | {sched[0] if sched else 'sd'} | {'; '.join(rows)} |", flush=True)


if __name__ == "__main__":
    main()
