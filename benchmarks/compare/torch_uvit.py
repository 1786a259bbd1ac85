# SPDX-License-Identifier: Apache-2.0
"""A PyTorch U-ViT (v0/v1 layout) written from ../../shared/spec/UVIT.md, with the official
state_dict names, used as the baseline of compare_torch.py. `python3 torch_uvit.py --check GOLDEN`
verifies it against a golden uvit file (every input set, golden tolerances)."""
import json
import math
import struct
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# True: attention through F.scaled_dot_product_attention (PyTorch >= 2.0, same math, fused kernel).
USE_SDPA = False


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, L, E = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if USE_SDPA:
            o = F.scaled_dot_product_attention(q, k, v)
            return self.proj(o.transpose(1, 2).reshape(B, L, E))
        a = (q @ k.transpose(-2, -1)) * (E // self.heads) ** -0.5
        a = a.softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(B, L, E))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, skip):
        super().__init__()
        if skip:
            self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class UViT(nn.Module):
    def __init__(self, img_size, in_chans, patch_size, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 qkv_bias=False, mlp_time_embed=False, text_dim=64, num_text_tokens=77, clip_img_dim=512,
                 version="v1"):
        super().__init__()
        self.p, self.C, self.S, self.E, self.v1 = patch_size, in_chans, img_size, embed_dim, version == "v1"
        self.Lt = num_text_tokens
        np_ = (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, 3 + num_text_tokens + np_, embed_dim))
        if self.v1:
            self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        if mlp_time_embed:
            self.time_img_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                                nn.Linear(4 * embed_dim, embed_dim))
            self.time_text_embed = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(),
                                                 nn.Linear(4 * embed_dim, embed_dim))
        else:
            self.time_img_embed = self.time_text_embed = nn.Identity()
        self.text_embed = nn.Linear(text_dim, embed_dim)
        self.text_out = nn.Linear(embed_dim, text_dim)
        self.clip_img_embed = nn.Linear(clip_img_dim, embed_dim)
        self.clip_img_out = nn.Linear(embed_dim, clip_img_dim)
        nb = depth // 2
        self.in_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, False) for _ in range(nb)])
        self.mid_block = Block(embed_dim, num_heads, mlp_ratio, qkv_bias, False)
        self.out_blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, True) for _ in range(nb)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        if self.v1:
            self.token_embedding = nn.Embedding(2, embed_dim)

    def forward(self, img, clip_img, text, t_img, t_text, data_type=None):
        B, C, H, W = img.shape
        p, E = self.p, self.E
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        ti = self.time_img_embed(timestep_embedding(t_img, E)).unsqueeze(1)
        tt = self.time_text_embed(timestep_embedding(t_text, E)).unsqueeze(1)
        toks = [ti, tt]
        if self.v1:
            toks.append(self.token_embedding(data_type).unsqueeze(1))
        toks += [self.text_embed(text), self.clip_img_embed(clip_img), x]
        x = torch.cat(toks, dim=1)
        pe = self.pos_embed
        if self.v1:
            pe = torch.cat([pe[:, :2], self.pos_embed_token, pe[:, 2:]], dim=1)
        lead = pe.shape[1] - (self.S // p) ** 2
        if H != self.S:
            g = self.S // p
            q = pe[:, lead:].reshape(1, g, g, E).permute(0, 3, 1, 2)
            q = F.interpolate(q, size=(H // p, W // p), mode="bilinear", align_corners=False)
            pe = torch.cat([pe[:, :lead], q.permute(0, 2, 3, 1).reshape(1, -1, E)], dim=1)
        x = x + pe
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.norm(x)
        n = lead - 1 - self.Lt
        text_out = self.text_out(x[:, n:n + self.Lt])
        clip_out = self.clip_img_out(x[:, n + self.Lt:n + self.Lt + 1])
        y = self.decoder_pred(x[:, lead:])
        h = H // p
        y = y.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return y, clip_out, text_out


def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    kinds = {"F32": np.float32, "F64": np.float64, "I64": np.int64}
    out = {}
    for k, v in header.items():
        a, b = v["data_offsets"]
        out[k] = torch.from_numpy(np.frombuffer(data[a:b], dtype=kinds[v["dtype"]]).reshape(v["shape"]).copy())
    return out, meta


def check(path):
    t, meta = read_safetensors(path)
    cfg = json.loads(meta["config"])
    tol = json.loads(meta["checks"])["tolerances"]["output"]
    model = UViT(**cfg).eval()
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param/")}, strict=True)
    sets = sorted({k.split("/")[1] for k in t if k.startswith("input/")})
    ok = True
    with torch.no_grad():
        for s in sets:
            i = lambda n: t["input/%s/%s" % (s, n)]
            dt = i("data_type") if cfg["version"] == "v1" else None
            outs = model(i("img"), i("clip_img"), i("text"), i("t_img"), i("t_text"), dt)
            for name, o in zip(["img_out", "clip_img_out", "text_out"], outs):
                ref = t["output/%s/%s" % (s, name)]
                good = bool(torch.all((o - ref).abs() <= tol["atol"] + tol["rtol"] * ref.abs()))
                print("torch_uvit %s/%s max_abs %.2e %s" % (s, name, float((o - ref).abs().max()), "PASS" if good else "FAIL"))
                ok &= good
    return ok


def mixed(path):
    """Relative L2 error against the file's float64 outputs of PyTorch's autocast (CPU) in bf16
    and fp16: the yardstick of the library's mixed-precision modes."""
    t, meta = read_safetensors(path)
    cfg = json.loads(meta["config"])
    model = UViT(**cfg).eval()
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("param/")}, strict=True)
    sets = sorted({k.split("/")[1] for k in t if k.startswith("input/")})
    for dtype in (torch.bfloat16, torch.float16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            for s in sets:
                i = lambda n: t["input/%s/%s" % (s, n)]
                dt = i("data_type") if cfg["version"] == "v1" else None
                outs = model(i("img"), i("clip_img"), i("text"), i("t_img"), i("t_text"), dt)
                for name, o in zip(["img_out", "clip_img_out", "text_out"], outs):
                    ref = t.get("output_f64/%s/%s" % (s, name))
                    if ref is None:
                        continue
                    e = float(torch.linalg.norm(o.double() - ref) / torch.linalg.norm(ref))
                    print("torch autocast %s %s/%s rel L2 %.4g" % (str(dtype)[6:], s, name, e))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        sys.exit(0 if check(sys.argv[2]) else 1)
    if len(sys.argv) == 3 and sys.argv[1] == "--mixed":
        sys.exit(mixed(sys.argv[2]))
    print(__doc__)
