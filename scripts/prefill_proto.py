#!/usr/bin/env python3
"""Check and time rendered prefill kernels (sm80 / sm90 CUBINs compiled here by
scripts/nvrtc_check.py --out DIR) against PyTorch on the GPU machine, without the Rust build:
the kernels take FwdParams' fields positionally (templates/partials/params.cu), padded
layout [s, b, h, d], self-attention. Correctness: out and LSE against an f32 reference on
fresh random inputs, out poisoned with NaN first, two launches bitwise equal. Timing: CUDA
events, median of repeats, beside SDPA flash and cuDNN in the same run.

Usage: python3 scripts/prefill_proto.py CUBIN_DIR [--time] [--filter SUBSTR]
"""
import argparse, glob, math, os, re, sys

import numpy as np
import torch
import torch.nn.functional as F
import cupy

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--time", action="store_true")
ap.add_argument("--filter", default="")
ap.add_argument("--exact", action="store_true", help="--filter names one key exactly")
ap.add_argument("--seqlens", default="512,2048,8192,16384")
a = ap.parse_args()

KEY = re.compile(r"prefill_(bf16|f16)_hd(\d+)_(\w+?)_m(\d+)n(\d+)w(\d+)s(\d+)_(sm80|sm90x?)$")


def smem_bytes(arch, bm, bn, st, hd):
    if arch.startswith("sm90"):
        return (bm + 2 * st * bn) * hd * 2 + 1024
    return (bm + 2 * st * bn) * (hd + 8) * 2


def launch(fn, key_info, q, k, v, out, lse, b, h, g, sq, sk, scale):
    dt, hd, mask, bm, bn, w, st, arch = key_info
    p = lambda t: np.uint64(t.data_ptr()) if t is not None else np.uint64(0)
    i32, i64, f32 = np.int32, np.int64, np.float32
    args = (p(q), p(k), p(v), p(out), p(lse), np.uint64(0), np.uint64(0), i32(b), i32(h), i32(g),
            i32(sq), i32(sk), f32(scale), i32(-1), i32(-1),
            np.uint64(0), i64(0), i64(0), i64(0), i64(0),
            np.uint64(0), i64(0), i64(0), i64(0), i64(0),
            np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0),
            i32(0), i32(0), np.uint64(0), i32(0), i32(0))
    grid = ((sq + bm - 1) // bm, h, b)
    fn(grid, (w * 32, 1, 1), args, shared_mem=smem_bytes(arch, bm, bn, st, hd))


def reference(q, k, v, causal, scale):
    # q [s, b, h, d] -> [b, h, s, d] f32
    qf, kf, vf = (t.permute(1, 2, 0, 3).float() for t in (q, k, v))
    hq, hk = qf.shape[1], kf.shape[1]
    if hq != hk:
        kf = kf.repeat_interleave(hq // hk, dim=1)
        vf = vf.repeat_interleave(hq // hk, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        m = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, h, s]
    o = torch.matmul(torch.softmax(s, dim=-1), vf)
    return o.permute(2, 0, 1, 3), lse


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


files = sorted(glob.glob(os.path.join(a.dir, "*.cubin")))
rows = []
status = 0
for f in files:
    key = os.path.basename(f)[:-6]
    m = KEY.match(key)
    if not m or a.filter not in key or (a.exact and key != a.filter):
        continue
    dt, hd, mask, bm, bn, w, st, arch = m.groups()
    hd, bm, bn, w, st = int(hd), int(bm), int(bn), int(w), int(st)
    if mask not in ("causal", "no_mask"):
        continue
    causal = mask == "causal"
    info = (dt, hd, mask, bm, bn, w, st, arch)
    mod = cupy.RawModule(path=f)
    fn = mod.get_function(key)
    fn.max_dynamic_shared_size_bytes = smem_bytes(arch, bm, bn, st, hd)
    tdt = torch.bfloat16 if dt == "bf16" else torch.float16
    scale = 1.0 / math.sqrt(hd)
    # Correctness: ragged shapes, GQA.
    for (s, b, h, g) in [(1, 1, 4, 2), (77, 2, 4, 2), (200, 1, 2, 1), (513, 2, 4, 4), (1000, 1, 8, 2)]:
        torch.manual_seed(hash((key, s, b)) & 0xffffffff)
        q = torch.randn(s, b, h, hd, device="cuda").to(tdt)
        k = torch.randn(s, b, g, hd, device="cuda").to(tdt)
        v = torch.randn(s, b, g, hd, device="cuda").to(tdt)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((h, s * b), float("nan"), device="cuda")
        launch(fn, info, q, k, v, out, lse, b, h, g, s, s, scale)
        torch.cuda.synchronize()
        ro, rl = reference(q, k, v, causal, scale)
        e_o = rel(out, ro)
        # lse [h, s*b], row i*b + bb  <-> rl [b, h, s]
        rl2 = rl.permute(1, 2, 0).reshape(h, s * b)
        e_l = rel(lse, rl2)
        out2 = torch.full_like(q, float("nan"))
        launch(fn, info, q, k, v, out2, lse, b, h, g, s, s, scale)
        torch.cuda.synchronize()
        same = torch.equal(out.view(torch.int16), out2.view(torch.int16))
        ok = not torch.isnan(out).any().item() and e_o < 2e-2 and e_l < 1e-3 and same
        if not ok:
            status = 1
        print(f"{key} s={s} b={b} h={h} g={g}: out {e_o:.2e} lse {e_l:.2e} bitwise {same} {'ok' if ok else 'FAIL'}")
    if not a.time:
        continue
    heads = 2048 // hd
    for s in [int(x) for x in a.seqlens.split(",")]:
        b = 16384 // s
        q = torch.randn(s, b, heads, hd, device="cuda").to(tdt)
        k = torch.randn(s, b, heads, hd, device="cuda").to(tdt)
        v = torch.randn(s, b, heads, hd, device="cuda").to(tdt)
        out = torch.empty_like(q)
        lse = torch.empty((heads, s * b), device="cuda")
        fl = 4.0 * b * heads * s * s * hd / (2 if causal else 1)

        def timeit(fn_, n=20):
            for _ in range(3):
                fn_()
            ts = []
            for _ in range(n):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn_()
                e1.record()
                torch.cuda.synchronize()
                ts.append(e0.elapsed_time(e1))
            return float(np.median(ts))

        t_k = timeit(lambda: launch(fn, info, q, k, v, out, lse, b, heads, heads, s, s, scale))
        qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))
        res = {}
        for name, be in [("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION),
                         ("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION)]:
            try:
                with torch.nn.attention.sdpa_kernel(be):
                    res[name] = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            except Exception as e:  # noqa
                res[name] = float("nan")
        tf = lambda t: fl / (t * 1e-3) / 1e12
        line = (f"TIME {key} s={s} b={b}: {tf(t_k):6.1f} TF/s  flash {tf(res['flash']):6.1f}  cudnn {tf(res['cudnn']):6.1f}"
                f"  x_flash {res['flash'] / t_k:.2f} x_cudnn {res['cudnn'] / t_k:.2f}")
        print(line)
        rows.append(line)
print("\n".join(rows))
sys.exit(status)
