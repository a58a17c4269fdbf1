#!/usr/bin/env python3
"""PyTorch SDPA baselines for `attn bench prefill` (default, `--mode prefill`),
`attn bench backward` (`--mode backward`) and `attn bench decode` (`--mode decode`).

Prefill mode: the FLASH_ATTENTION and CUDNN_ATTENTION backends on the same shapes and with the
same timing method as the Rust bench.

Shapes: head dims x {causal, non-causal} x seqlens at --total-tokens tokens (batch =
total / seqlen), heads = hidden / head_dim, bf16, q/k/v stored [b, s, h, d] (the layout the
flash kernels read natively) and passed to SDPA as [b, h, s, d] views. Timing: CUDA events
around each call after --warmup calls, median of --reps, inputs rotated over enough sets
that each call reads q/k/v that are not in L2.

Output: one flat JSON object per line on stdout, with backend, head_dim, causal, seqlen,
batch, heads, ms, tflops (FLOPs = 4 b h s^2 d, halved for causal). A backend that fails on
a shape prints ms/tflops null and the reason on stderr.

Backward mode: the prefill shapes (and the same L2-beating input rotation, over q, k, v and
dout); per backend (FLASH_ATTENTION, CUDNN_ATTENTION) and shape, q/k/v are leaf tensors
(requires_grad) and the forward `out = F.scaled_dot_product_attention(q, k, v, is_causal=...)`
runs once per input set outside the timed region, under the backend. Timed: CUDA events around
`torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`, i.e. SDPA's whole backward
(its own preprocess, e.g. flash's dot(dO, O), and its dQ accumulation/conversion included;
no .grad accumulation; dout is laid out as out, copied outside the timing), after --warmup
calls, median of --reps. FLOPs = 2.5 x the forward's.
Same output lines as prefill mode.

Decode mode: one new token per sequence, q [b, heads, 1, hd] against a filled cache k/v
[b, groups, ctx, hd] (bf16, contiguous), FLASH_ATTENTION backend with enable_gqa=True. If the
flash backend refuses enable_gqa (or the 1-token query), k/v are repeat_interleave'd to
[b, heads, ctx, hd] once, outside the timed region, and each line says
"gqa": "repeat_interleave" (else "native"). Bytes = b * (2 * ctx * groups * hd * 2 +
(2 * heads + 2 * groups) * hd * 2): the K/V cache read once plus q, out and the new k, v
(the same count the Rust side uses). Timing: every chunk of calls is queued behind a long
device-to-device copy so the GPU runs them back to back (host launch cost hidden, as in a
serving loop), CUDA events between calls, median over --reps calls after --warmup, inputs
rotated over enough cache sets (at least 2) that a call never finds its K/V in L2.
"host_behind" counts chunks where the blocker finished before all calls were queued (then
those numbers include host gaps). A first line with "backend": "copy" gives the card's
device-to-device copy bandwidth (bytes read + written) timed the same way.
"""
import argparse
import json
import statistics
import sys

try:  # torch is imported lazily so `--help` works without it
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - reported in main
    torch = None


def decode_bytes(b, ctx, heads, groups, hd):
    """Bytes a decode step must move (bf16): K+V cache once, q, out, new k and v."""
    return b * (2 * ctx * groups * hd * 2 + (2 * heads + 2 * groups) * hd * 2)


def time_queued(fn, n_calls, chunk, blocker):
    """Per-call ms of fn(i) for i in range(n_calls), queued behind blocker() in chunks;
    returns (times, chunks where the host fell behind)."""
    times, behind = [], 0
    i = 0
    while i < n_calls:
        m = min(chunk, n_calls - i)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(m + 1)]
        blocker()
        ev[0].record()
        for j in range(m):
            fn(i + j)
            ev[j + 1].record()
        if ev[0].query():
            behind += 1
        ev[-1].synchronize()
        times += [ev[j].elapsed_time(ev[j + 1]) for j in range(m)]
        i += m
    return times, behind


def run_decode(a):
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    heads, groups, hd = a.heads, a.groups, a.head_dim
    rep = heads // groups
    # Blocker / copy ceiling: 1 GiB device-to-device copies.
    cn = 1 << 29
    csrc = torch.empty(cn, device=dev, dtype=torch.bfloat16).uniform_(-1.7, 1.7)
    cdst = torch.empty_like(csrc)

    def blocker():
        for _ in range(3):
            cdst.copy_(csrc)

    ct, cbehind = time_queued(lambda i: cdst.copy_(csrc), a.warmup + a.reps, a.chunk, blocker)
    cms = statistics.median(ct[a.warmup:])
    print(json.dumps({"backend": "copy", "bytes": 2 * cn * 2, "ms": cms,
                      "gbps": 2 * cn * 2 / (cms * 1e-3) / 1e9, "host_behind": cbehind}), flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return (torch.rand(*shape, device=dev, generator=gen) * 3.4 - 1.7).to(torch.bfloat16)

    for ctx in [int(x) for x in a.contexts.split(",")]:
        for b in [int(x) for x in a.batches.split(",")]:
            cache = 2 * b * groups * ctx * hd * 2
            nbytes = decode_bytes(b, ctx, heads, groups, hd)
            rec = {"backend": "flash", "batch": b, "ctx": ctx, "heads": heads, "groups": groups,
                   "head_dim": hd, "gqa": "native", "us": None, "gbps": None, "host_behind": None,
                   "bytes": nbytes}
            if cache > a.max_cache_bytes:
                print(f"sdpa decode b{b} ctx{ctx}: skipped, cache {cache} B > {a.max_cache_bytes}",
                      file=sys.stderr)
                continue
            sets = max(2, -(-4 * l2 // cache))
            data = [(rnd(b, heads, 1, hd), rnd(b, groups, ctx, hd), rnd(b, groups, ctx, hd))
                    for _ in range(sets)]
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    try:
                        q, k, v = data[0]
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        torch.cuda.synchronize()

                        def call(i):
                            q, k, v = data[i % sets]
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    except Exception as e:  # flash refused GQA: expand outside the timing
                        print(f"sdpa flash decode b{b} ctx{ctx}: enable_gqa refused ({e}); "
                              "falling back to repeat_interleave'd K/V", file=sys.stderr)
                        rec["gqa"] = "repeat_interleave"
                        data = [(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))
                                for q, k, v in data]

                        def call(i):
                            q, k, v = data[i % sets]
                            return F.scaled_dot_product_attention(q, k, v)
                    out = call(0)
                    torch.cuda.synchronize()
                    if not bool(torch.isfinite(out).all()):
                        raise RuntimeError("non-finite output")
                    t, behind = time_queued(call, a.warmup + a.reps, a.chunk, blocker)
                ms = statistics.median(t[a.warmup:])
                rec["us"] = ms * 1e3
                rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
                rec["host_behind"] = behind
            except Exception as e:  # report and go on with the next shape
                print(f"sdpa flash decode b{b} ctx{ctx}: {e}", file=sys.stderr)
            del data
            torch.cuda.empty_cache()
            print(json.dumps(rec), flush=True)


def run_backward(a):
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    n = a.total_tokens * a.hidden
    set_bytes = 5 * n * 2  # q, k, v, dout, and the saved out
    sets = max(2, -(-4 * l2 // set_bytes))
    gen = torch.Generator(device=dev).manual_seed(0)
    flat = [
        [(torch.rand(n, device=dev, generator=gen, dtype=torch.float32) * 3.4 - 1.7).to(torch.bfloat16)
         for _ in range(4)]
        for _ in range(sets)
    ]
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for hd in [int(x) for x in a.head_dims.split(",")]:
        heads = a.hidden // hd
        for causal in (True, False):
            for s in [int(x) for x in a.seqlens.split(",")]:
                b = a.total_tokens // s
                flops = 2.5 * 4.0 * b * heads * s * s * hd / (2.0 if causal else 1.0)
                for name, be in backends:
                    rec = {"backend": name, "head_dim": hd, "causal": causal, "seqlen": s,
                           "batch": b, "heads": heads, "ms": None, "tflops": None}
                    graphs = []
                    try:
                        with sdpa_kernel([be]):
                            # Forward once per set, untimed; the graph is kept for the
                            # repeated backward (retain_graph).
                            for st in flat:
                                q, k, v, do = [t.view(b, s, heads, hd).transpose(1, 2) for t in st]
                                q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
                                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                                # dout in out's own memory layout (empty_like keeps its strides),
                                # so no backend copies it into the layout it wants.
                                graphs.append((out, (q, k, v), torch.empty_like(out).copy_(do)))
                            times = []
                            for it in range(a.warmup + a.reps):
                                out, inp, do = graphs[it % sets]
                                st = torch.cuda.Event(enable_timing=True)
                                en = torch.cuda.Event(enable_timing=True)
                                st.record()
                                torch.autograd.grad(out, inp, do, retain_graph=True)
                                en.record()
                                en.synchronize()
                                if it >= a.warmup:
                                    times.append(st.elapsed_time(en))
                        ms = statistics.median(times)
                        rec["ms"] = ms
                        rec["tflops"] = flops / (ms * 1e-3) / 1e12
                    except Exception as e:  # a backend may not support a shape
                        print(f"sdpa {name} backward hd{hd} causal={causal} s{s}: {e}", file=sys.stderr)
                    del graphs
                    torch.cuda.empty_cache()
                    print(json.dumps(rec), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["prefill", "backward", "decode"], default="prefill")
    ap.add_argument("--head-dims", default="64,128,256")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--total-tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--contexts", default="8192,32768", help="decode: cached tokens")
    ap.add_argument("--batches", default="1,4,16", help="decode: sequences")
    ap.add_argument("--heads", type=int, default=32, help="decode: query heads")
    ap.add_argument("--groups", type=int, default=8, help="decode: KV groups")
    ap.add_argument("--head-dim", type=int, default=128, help="decode: head dim")
    ap.add_argument("--max-cache-bytes", type=int, default=8 << 30,
                    help="decode: skip shapes whose K+V cache is larger")
    ap.add_argument("--chunk", type=int, default=10, help="decode: calls queued per blocker")
    a = ap.parse_args()
    if torch is None:
        sys.exit("bench_sdpa.py: PyTorch is not installed")
    if a.mode == "decode":
        run_decode(a)
        return
    if a.mode == "backward":
        run_backward(a)
        return
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
