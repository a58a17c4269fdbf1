#!/usr/bin/env python3
"""PyTorch SDPA baselines for `attn bench prefill`: the FLASH_ATTENTION and CUDNN_ATTENTION
backends on the same shapes and with the same timing method as the Rust bench.

Shapes: head dims x {causal, non-causal} x seqlens at --total-tokens tokens (batch =
total / seqlen), heads = hidden / head_dim, bf16, q/k/v stored [b, s, h, d] (the layout the
flash kernels read natively) and passed to SDPA as [b, h, s, d] views. Timing: CUDA events
around each call after --warmup calls, median of --reps, inputs rotated over enough sets
that each call reads q/k/v that are not in L2.

Output: one flat JSON object per line on stdout, with backend, head_dim, causal, seqlen,
batch, heads, ms, tflops (FLOPs = 4 b h s^2 d, halved for causal). A backend that fails on
a shape prints ms/tflops null and the reason on stderr.
"""
import argparse
import json
import statistics
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--total-tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    n = a.total_tokens * a.hidden
    set_bytes = 3 * n * 2
    sets = max(2, -(-4 * l2 // set_bytes))
    gen = torch.Generator(device=dev).manual_seed(0)
    flat = [
        [(torch.rand(n, device=dev, generator=gen, dtype=torch.float32) * 3.4 - 1.7).to(torch.bfloat16) for _ in range(3)]
        for _ in range(sets)
    ]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for hd in [int(x) for x in a.head_dims.split(",")]:
        heads = a.hidden // hd
        for causal in (True, False):
            for s in [int(x) for x in a.seqlens.split(",")]:
                b = a.total_tokens // s
                views = [[t.view(b, s, heads, hd).transpose(1, 2) for t in st] for st in flat]
                flops = 4.0 * b * heads * s * s * hd / (2.0 if causal else 1.0)
                for name, be in backends:
                    rec = {"backend": name, "head_dim": hd, "causal": causal, "seqlen": s,
                           "batch": b, "heads": heads, "ms": None, "tflops": None}
                    try:
                        with sdpa_kernel([be]):
                            times = []
                            for it in range(a.warmup + a.reps):
                                q, k, v = views[it % sets]
                                st = torch.cuda.Event(enable_timing=True)
                                en = torch.cuda.Event(enable_timing=True)
                                st.record()
                                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                en.record()
                                en.synchronize()
                                if it >= a.warmup:
                                    times.append(st.elapsed_time(en))
                        ms = statistics.median(times)
                        rec["ms"] = ms
                        rec["tflops"] = flops / (ms * 1e-3) / 1e12
                    except Exception as e:  # a backend may not support a shape
                        print(f"sdpa {name} hd{hd} causal={causal} s{s}: {e}", file=sys.stderr)
                    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
