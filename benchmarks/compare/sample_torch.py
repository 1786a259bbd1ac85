# SPDX-License-Identifier: Apache-2.0
"""The official UniDiffuser sampling loop in PyTorch, on the U-ViT of torch_uvit.py: the baseline
of `compare_torch.py --step sample`.

Written from ../../shared/spec/ as the official `sample_multi_v1.py` + `dpm_solver_pp.py` do it,
in float32 torch arithmetic throughout (so that it follows the reference's rounding):
  schedule  NoiseScheduleVP('discrete') on the Stable-Diffusion betas computed in float64 and cast
            to float32 (SAMPLERS.md §2.1, §4; the knots are torch.linspace(1/N, 1, N) in float32,
            the interpolation is the official sort-based interpolate_fn)
  solver    DPM-Solver++ (predict_x0=True, no thresholding), method 'fast', order 3, time_uniform
            grid of steps+1 float32 points from T=1 to eps=1/N, solver_type 'dpm_solver',
            no final denoise (SAMPLERS.md §7, §8.1, §10.1)
  model     per-mode model function with classifier-free guidance 'true_uncond' (UNIDIFFUSER.md
            §6, §7.2): network time input t_continuous*N (float32 product), 0 for a condition,
            N for a marginalised group; the v1 data-type token (1) on every call
Two call structures of the guidance reference calls:
  separate  as the official code: the main call, then each reference call as its own forward
  batched   the main and the reference rows concatenated along the batch into one forward, then
            split (what the library's --references batched does); same numbers up to rounding
Two noise policies for the marginalised / guidance inputs: 'fresh' (torch.randn at every call, in
the official draw order; used for timing) and 'fixed' (one stored tensor per modality reused at
every call; how the golden file was made).

`python3 sample_torch.py --check GOLDEN` runs every case of a golden sample_modes file (config,
weights file, conditions, initial states, marginalisation noise and case list all read from the
file) and compares the first model output and the final sample with the file's tolerances."""
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from torch_uvit import UViT, read_safetensors  # noqa: E402


def sd_betas(n=1000):
    """The Stable-Diffusion 'scaled linear' betas, float64, cast to float32 as the official
    sampler does before building the schedule (SAMPLERS.md §2.1, §14.6)."""
    b = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=np.float64) ** 2
    return torch.tensor(b).float()


def interpolate_fn(x, xp, yp):
    """The official piecewise-linear interpolation: x [n, 1], knots xp and values yp [1, K];
    linear extrapolation outside, and an x equal to an interior knot takes the left segment
    (it sorts before the knot). Returns [n, 1]."""
    n, k = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((n, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(torch.eq(x_idx, 0), torch.tensor(1),
                            torch.where(torch.eq(x_idx, k), torch.tensor(k - 2), cand_start_idx))
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(torch.eq(x_idx, 0), torch.tensor(0),
                             torch.where(torch.eq(x_idx, k), torch.tensor(k - 2), cand_start_idx))
    y_positions_expanded = yp.unsqueeze(0).expand(n, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


class NoiseScheduleVP:
    """NoiseScheduleVP('discrete', betas): log alpha linear in t between the knots t = n/N."""

    def __init__(self, betas):
        log_alphas = 0.5 * torch.log(1 - betas).cumsum(dim=0)
        self.total_N = len(log_alphas)
        self.T = 1.0
        self.t_discrete = torch.linspace(1.0 / self.total_N, 1.0, self.total_N).reshape((1, -1))
        self.log_alpha_discrete = log_alphas.reshape((1, -1))

    def marginal_log_mean_coeff(self, t):
        return interpolate_fn(t.reshape((-1, 1)), self.t_discrete, self.log_alpha_discrete).reshape((-1,))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def inverse_lambda(self, lamb):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)).to(lamb), -2.0 * lamb)
        t = interpolate_fn(log_alpha.reshape((-1, 1)), torch.flip(self.log_alpha_discrete, [1]),
                           torch.flip(self.t_discrete, [1]))
        return t.reshape((-1,))


def expand_dims(v, dims):
    return v[(...,) + (None,) * (dims - 1)]


class DPMSolverPP:
    """DPM-Solver++ (data prediction) with the official 'fast' driver (SAMPLERS.md §8.1, §10.1).
    `noise_fn(x, t_continuous)` is the guided noise prediction; `eval_t` records the time of
    every model evaluation."""

    def __init__(self, noise_fn, ns):
        self.noise_fn, self.ns, self.eval_t = noise_fn, ns, []

    def data_prediction_fn(self, x, t):
        self.eval_t.append(t)
        noise = self.noise_fn(x, t)
        dims = x.dim()
        alpha_t, sigma_t = self.ns.marginal_alpha(t), self.ns.marginal_std(t)
        return (x - expand_dims(sigma_t, dims) * noise) / expand_dims(alpha_t, dims)

    def first_update(self, x, s, t):
        ns, dims = self.ns, x.dim()
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
        phi_1 = (torch.exp(-h) - 1.0) / (-1.0)  # the reference's form, not expm1 (SAMPLERS.md §14.3)
        model_s = self.data_prediction_fn(x, s)
        return expand_dims(sigma_t / sigma_s, dims) * x + expand_dims(alpha_t * phi_1, dims) * model_s

    def second_update(self, x, s, t, r1):
        ns, dims = self.ns, x.dim()
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        log_alpha_s1, log_alpha_t = ns.marginal_log_mean_coeff(s1), ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_s1, sigma_t = ns.marginal_std(s), ns.marginal_std(s1), ns.marginal_std(t)
        alpha_s1, alpha_t = torch.exp(log_alpha_s1), torch.exp(log_alpha_t)
        phi_11 = torch.expm1(-r1 * h)
        phi_1 = torch.expm1(-h)
        model_s = self.data_prediction_fn(x, s)
        x_s1 = expand_dims(sigma_s1 / sigma_s, dims) * x - expand_dims(alpha_s1 * phi_11, dims) * model_s
        model_s1 = self.data_prediction_fn(x_s1, s1)
        return (expand_dims(sigma_t / sigma_s, dims) * x - expand_dims(alpha_t * phi_1, dims) * model_s
                - (0.5 / r1) * expand_dims(alpha_t * phi_1, dims) * (model_s1 - model_s))

    def third_update(self, x, s, t, r1, r2):
        ns, dims = self.ns, x.dim()
        lambda_s, lambda_t = ns.marginal_lambda(s), ns.marginal_lambda(t)
        h = lambda_t - lambda_s
        s1 = ns.inverse_lambda(lambda_s + r1 * h)
        s2 = ns.inverse_lambda(lambda_s + r2 * h)
        log_alpha_s1, log_alpha_s2 = ns.marginal_log_mean_coeff(s1), ns.marginal_log_mean_coeff(s2)
        log_alpha_t = ns.marginal_log_mean_coeff(t)
        sigma_s, sigma_s1 = ns.marginal_std(s), ns.marginal_std(s1)
        sigma_s2, sigma_t = ns.marginal_std(s2), ns.marginal_std(t)
        alpha_s1, alpha_s2, alpha_t = torch.exp(log_alpha_s1), torch.exp(log_alpha_s2), torch.exp(log_alpha_t)
        phi_11 = torch.expm1(-r1 * h)
        phi_12 = torch.expm1(-r2 * h)
        phi_1 = torch.expm1(-h)
        phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.0
        phi_2 = phi_1 / h + 1.0
        model_s = self.data_prediction_fn(x, s)
        x_s1 = expand_dims(sigma_s1 / sigma_s, dims) * x - expand_dims(alpha_s1 * phi_11, dims) * model_s
        model_s1 = self.data_prediction_fn(x_s1, s1)
        x_s2 = (expand_dims(sigma_s2 / sigma_s, dims) * x - expand_dims(alpha_s2 * phi_12, dims) * model_s
                + r2 / r1 * expand_dims(alpha_s2 * phi_22, dims) * (model_s1 - model_s))
        model_s2 = self.data_prediction_fn(x_s2, s2)
        return (expand_dims(sigma_t / sigma_s, dims) * x - expand_dims(alpha_t * phi_1, dims) * model_s
                + (1.0 / r2) * expand_dims(alpha_t * phi_2, dims) * (model_s2 - model_s))

    @staticmethod
    def fast_orders(steps, order=3):
        if order == 3:
            k = steps // 3 + 1
            if steps % 3 == 0:
                return [3] * (k - 2) + [2, 1]
            if steps % 3 == 1:
                return [3] * (k - 1) + [1]
            return [3] * (k - 1) + [2]
        if order == 2:
            k = steps // 2
            return [2] * k if steps % 2 == 0 else [2] * k + [1]
        raise ValueError("the fast method needs order 2 or 3")

    def sample(self, x, steps, eps=1e-3, T=1.0, order=3):
        """The 'fast' driver: orders summing to `steps` on the time-uniform grid of steps+1 points,
        r1, r2 of each step from the grid's lambdas."""
        ns = self.ns
        timesteps = torch.linspace(T, eps, steps + 1)
        ones = torch.ones((x.shape[0],))
        i = 0
        for o in self.fast_orders(steps, order):
            vec_s, vec_t = ones * timesteps[i], ones * timesteps[i + o]
            lam_i = ns.marginal_lambda(timesteps[i])
            h = ns.marginal_lambda(timesteps[i + o]) - lam_i
            r1 = None if o <= 1 else (ns.marginal_lambda(timesteps[i + 1]) - lam_i) / h
            r2 = None if o <= 2 else (ns.marginal_lambda(timesteps[i + 2]) - lam_i) / h
            if o == 1:
                x = self.first_update(x, vec_s, vec_t)
            elif o == 2:
                x = self.second_update(x, vec_s, vec_t, r1)
            else:
                x = self.third_update(x, vec_s, vec_t, r1, r2)
            i += o
        return x


class UniDiffuserModel:
    """The per-mode guided noise prediction of the official sampler (UNIDIFFUSER.md §7.2) on a
    torch_uvit.UViT. State layouts: joint [z | clip_img | text] and t2i / i [z | clip_img], rows
    flattened; i2t / t the text [B, L, D] itself.

    cond: {'text'} for t2i, {'z', 'clip_img'} for i2t. noise(name, shape) returns the noise of
    modality name ('z', 'clip_img', 'text') of that shape: fresh or fixed.
    references: 'separate' (one forward per call, official) or 'batched' (one forward of all the
    calls' rows). forward: what runs the network (default: net itself; e.g. its torch.compile'd
    or oneDNN-converted copy), net giving the shapes. With a clock (time.perf_counter), net_ms
    accumulates the time inside the forwards; calls and rows count them."""

    def __init__(self, net, mode, scale, cond, noise, references="separate", N=1000, data_type=1,
                 forward=None, clock=None):
        if mode not in ("joint", "t2i", "i2t", "i", "t"):
            raise ValueError("mode must be joint, t2i, i2t, i or t")
        if references not in ("separate", "batched"):
            raise ValueError("references must be separate or batched")
        self.net, self.mode, self.scale, self.cond, self.noise = net, mode, float(scale), cond, noise
        self.batched, self.N, self.data_type, self.clock = references == "batched", N, data_type, clock
        self.v1, self.run_net = net.v1, forward or net
        self.C, self.S, self.Dc, self.L = net.C, net.S, net.clip_img_embed.in_features, net.Lt
        self.Dt = net.text_embed.in_features
        self.net_ms, self.calls, self.rows = 0.0, 0, 0

    # state <-> modalities (the official split / combine)
    def split(self, x):
        B, zd = x.shape[0], self.C * self.S * self.S
        parts = x.split([zd, self.Dc] + ([self.L * self.Dt] if self.mode == "joint" else []), dim=1)
        out = [parts[0].reshape(B, self.C, self.S, self.S), parts[1].reshape(B, 1, self.Dc)]
        return out + ([parts[2].reshape(B, self.L, self.Dt)] if self.mode == "joint" else [])

    @staticmethod
    def combine(*ts):
        return torch.cat([t.reshape(t.shape[0], -1) for t in ts], dim=-1)

    def initial_state(self, B, generator=None):
        """The official draw: z, clip_img, text (all three, whatever the mode), then combined."""
        z = torch.randn(B, self.C, self.S, self.S, generator=generator)
        c = torch.randn(B, 1, self.Dc, generator=generator)
        y = torch.randn(B, self.L, self.Dt, generator=generator)
        return {"joint": lambda: self.combine(z, c, y), "t2i": lambda: self.combine(z, c),
                "i": lambda: self.combine(z, c), "i2t": lambda: y, "t": lambda: y}[self.mode]()

    def nnet(self, calls):
        """Network outputs (z, clip_img, text) of every call (z, clip, text, t_img, t_text)."""
        B = calls[0][0].shape[0]
        if self.batched and len(calls) > 1:
            cat = [torch.cat([c[k] for c in calls]) for k in range(5)]
            outs = self.forward(*cat)
            return list(zip(*(o.split(B) for o in outs)))
        return [self.forward(*c) for c in calls]

    def forward(self, z, c, y, t_img, t_text):
        dt = torch.full((z.shape[0],), self.data_type, dtype=torch.long) if self.v1 else None
        t0 = self.clock() if self.clock else None
        out = self.run_net(z, c, y, t_img, t_text, dt)
        if self.clock:
            self.net_ms += (self.clock() - t0) * 1e3
        self.calls += 1
        self.rows += z.shape[0]
        return out

    def __call__(self, x, t_continuous):
        t = t_continuous * self.N  # float32 product (UNIDIFFUSER.md §9.1)
        full = torch.ones_like(t) * self.N  # the marginal time N
        zero = torch.zeros_like(t)  # the condition time 0 (an int tensor in the official code;
        # the time embedding casts it to float, so a float zero is the same input)
        s, guide = self.scale, self.scale != 0
        if self.mode == "joint":
            z, c, y = self.split(x)
            calls = [(z, c, y, t, t)]
            if guide:  # noise drawn after the main call: z, clip_img, text (same stream as drawn here)
                nz, nc = self.noise("z", z.shape), self.noise("clip_img", c.shape)
                ny = self.noise("text", y.shape)
                calls += [(nz, nc, y, full, t), (z, c, ny, t, full)]
            outs = self.nnet(calls)
            e = self.combine(*outs[0])
            if not guide:
                return e
            u = self.combine(outs[2][0], outs[2][1], outs[1][2])  # image marginal, text marginal
            return e + s * (e - u)
        if self.mode == "t2i":
            z, c = self.split(x)
            text = self.cond["text"]
            calls = [(z, c, text, t, zero)]
            if guide:
                calls.append((z, c, self.noise("text", text.shape), t, full))
            outs = self.nnet(calls)
            e = self.combine(outs[0][0], outs[0][1])
            return e if not guide else e + s * (e - self.combine(outs[1][0], outs[1][1]))
        if self.mode == "i2t":
            z0, c0 = self.cond["z"], self.cond["clip_img"]
            calls = [(z0, c0, x, zero, t)]
            if guide:
                calls.append((self.noise("z", z0.shape), self.noise("clip_img", c0.shape), x, full, t))
            outs = self.nnet(calls)
            e = outs[0][2]
            return e if not guide else e + s * (e - outs[1][2])
        B = x.shape[0]
        if self.mode == "i":  # noise drawn before the call: text
            z, c = self.split(x)
            out = self.nnet([(z, c, self.noise("text", (B, self.L, self.Dt)), t, full)])[0]
            return self.combine(out[0], out[1])
        # t: noise drawn before the call: z, then clip_img
        nz = self.noise("z", (B, self.C, self.S, self.S))
        nc = self.noise("clip_img", (B, 1, self.Dc))
        return self.nnet([(nz, nc, x, full, t)])[0][2]


def fresh_noise(generator):
    """The official policy: a new standard normal draw at every network call."""
    return lambda name, shape: torch.randn(shape, generator=generator)


def fixed_noise(tensors):
    """One stored tensor per modality, reused at every call (the golden files' policy)."""
    return lambda name, shape: tensors[name]


class SamplingRun:
    """One whole official sampling run on random conditions, the same run at every call (what
    `unidiffuser-bench sample` times): the schedule, the three initial draws, `steps` solver
    evaluations with their guided network calls (fresh marginalisation / guidance noise from a
    generator seeded with `seed` at the start of every run), the final state. The conditions are
    drawn once. Returns the final state; model.net_ms is the time inside the network."""

    def __init__(self, net, mode, steps, scale, references, batch, forward=None, seed=7, N=1000, data_type=1):
        g = torch.Generator().manual_seed(seed + 1)
        S, C, Dc, L, Dt = net.S, net.C, net.clip_img_embed.in_features, net.Lt, net.text_embed.in_features
        cond = ({"text": torch.randn(batch, L, Dt, generator=g)} if mode == "t2i" else
                {"z": torch.randn(batch, C, S, S, generator=g), "clip_img": torch.randn(batch, 1, Dc, generator=g)}
                if mode == "i2t" else {})
        self.model = UniDiffuserModel(net, mode, scale, cond, None, references, N=N, data_type=data_type,
                                      forward=forward, clock=time.perf_counter)
        self.steps, self.batch, self.seed, self.N = steps, batch, seed, N

    def __call__(self):
        g = torch.Generator().manual_seed(self.seed)
        m = self.model
        m.noise, m.net_ms, m.calls, m.rows = fresh_noise(g), 0.0, 0, 0
        ns = NoiseScheduleVP(sd_betas(self.N))  # built per run, as the official sample_fn does
        x = m.initial_state(self.batch, g)
        return DPMSolverPP(m, ns).sample(x, self.steps, eps=1.0 / self.N, T=1.0)


def check(path):
    t, meta = read_safetensors(path)
    wpath = os.path.join(os.path.dirname(os.path.abspath(path)), meta["weights_file"])
    w, wmeta = read_safetensors(wpath)
    cfg = json.loads(wmeta["config"]) if "config" in wmeta else {}
    cfg.update(json.loads(meta["config"]))  # the sampling file's config wins; version from the weights file
    net = UViT(**cfg).eval()
    net.load_state_dict({k[6:]: v for k, v in w.items() if k.startswith("param/")}, strict=True)
    params = json.loads(meta["case_params"])
    tol = json.loads(meta["checks"])["tolerances"]
    cond_all = {k[5:]: v for k, v in t.items() if k.startswith("cond/")}
    ok = True
    with torch.no_grad():
        for case in json.loads(meta["cases"]):
            p = params[case]
            assert (p["method"], p["order"], p["skip_type"], p["predict_x0"], p["solver_type"],
                    p["denoise"], p["t2i_cfg_mode"]) == ("fast", 3, "time_uniform", True, "dpm_solver",
                                                          False, "true_uncond"), "unsupported case %s" % case
            mode = p["mode"]
            cond = ({"text": cond_all["t2i_text"]} if mode == "t2i" else
                    {"z": cond_all["i2t_z"], "clip_img": cond_all["i2t_clip_img"]} if mode == "i2t" else {})
            marg = {k.split("/")[2]: v for k, v in t.items() if k.startswith("marg_noise/%s/" % case)}
            model = UniDiffuserModel(net, mode, p.get("scale", 0.0), cond, fixed_noise(marg), "separate",
                                     N=p["N"], data_type=p["data_type"])
            ns = NoiseScheduleVP(sd_betas(p["N"]))
            x_init = t["mode/%s/x_init" % case]
            B = x_init.shape[0]
            steps = int(t["mode/%s/steps" % case][0])
            for refs in ("separate", "batched"):
                model.batched = refs == "batched"
                first = model(x_init, torch.ones(B))
                solver = DPMSolverPP(model, ns)
                x = solver.sample(x_init, steps, eps=p["eps"], T=p["T"], order=p["order"])
                eval_t = torch.stack([e[0] for e in solver.eval_t])
                rows = [("first_model_out", first, t["mode/%s/first_model_out" % case],
                         tol["first_model_out"]["atol"], tol["first_model_out"]["rtol"]),
                        ("x_final", x, t["mode/%s/x_final" % case], p["atol_final"], p.get("rtol_final", 0.0))]
                msg = []
                for name, got, ref, atol, rtol in rows:
                    good = bool(torch.all((got - ref).abs() <= atol + rtol * ref.abs()))
                    ok &= good
                    msg.append("%s max_abs %.2e (atol %.0e) %s" % (name, float((got - ref).abs().max()), atol,
                                                                  "PASS" if good else "FAIL"))
                ref_t = t["mode/%s/eval_t" % case]
                same_nfe = len(eval_t) == len(ref_t)
                ok &= same_nfe
                msg.append("NFE %d/%d eval_t max_abs %s" % (len(eval_t), len(ref_t), "%.1e" % float(
                    (eval_t - ref_t).abs().max()) if same_nfe else "n/a FAIL"))
                print("sample_torch %-15s %-8s %s" % (case, refs, "  ".join(msg)))
    return ok


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(0 if check(sys.argv[2]) else 1)
    print(__doc__)
