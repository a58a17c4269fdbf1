#!/usr/bin/env python3
"""The PyTorch layer baseline of `attn bench layer`: the same attention layer as the Rust
bench (linear_qkv -> per-head RMS norm of q and k -> rope (half) -> attention ->
linear_proj; bf16), written the way a PyTorch serving or training stack writes it, with
SDPA's FLASH_ATTENTION and CUDNN_ATTENTION backends.

Cases (one flat JSON object per line on stdout; a failing backend prints ms null and the
reason on stderr; an empty list skips a case):
  prefill: one sequence of --seqlens tokens, causal.
  chunk:   --chunk new tokens after --ctx-before cached ones in a static cache
           [1, groups, ctx_before + chunk, hd]: the new k/v written into the cache, then
           attention of the chunk over the whole cache, bottom-right causal
           (torch.nn.attention.bias.causal_lower_right; where a backend refuses it, an
           explicit boolean mask, and the line says which in "mask").
  decode:  one step of --batches sequences, each with --contexts cached tokens in a static
           cache [b, groups, ctx + 1, hd]: linear_qkv, norm, rope at the position, the new
           k/v written into the cache, attention over the cache, linear_proj. Timed eager
           and as a CUDA graph replay, for each backend (graph only where eager worked).
  train:   (only with --train-seqlens) one training step over one sequence of each length,
           causal: the layer's forward under autograd (x, w_qkv, w_proj and the two norm
           weights require grad) and `torch.autograd.grad(out, [x, w_qkv, w_proj, q_norm,
           k_norm], dout)` (no .grad accumulation). Events before the forward, between
           forward and backward and after the backward: fwd_ms, bwd_ms and ms (the step),
           each the median of --reps after --warmup steps.
Timing: CUDA events. prefill and chunk: --warmup calls, then the median of --reps calls,
each timed on its own. decode: --warmup steps, then --reps steps queued back to back
between two events, time per step = span / reps (as `attn bench layer` times its steps: the
host launch cost shows only where it exceeds the device time).
"""
import argparse
import json
import statistics
import sys

try:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    torch = None


def rope_tables(max_pos, rot, base, dev):
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, device=dev, dtype=torch.float32) / rot))
    ang = torch.arange(max_pos, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)


def rotate_half(t):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([-t2, t1], dim=-1)


class Layer:
    def __init__(self, hidden, heads, groups, hd, dev):
        g = torch.Generator(device=dev).manual_seed(0)
        self.h, self.np, self.ng, self.hd = hidden, heads, groups, hd
        s = hidden ** -0.5
        self.w_qkv = (torch.randn((heads + 2 * groups) * hd, hidden, device=dev, generator=g) * s).to(torch.bfloat16)
        self.w_proj = (torch.randn(hidden, heads * hd, device=dev, generator=g) * s).to(torch.bfloat16)
        self.qn = torch.ones(hd, device=dev, dtype=torch.bfloat16)
        self.kn = torch.ones(hd, device=dev, dtype=torch.bfloat16)

    def qkv(self, x, pos, cos, sin):
        """x [b, t, h] -> q [b, np, t, hd], k, v [b, ng, t, hd] (normed, rotated)."""
        b, t, _ = x.shape
        y = F.linear(x, self.w_qkv)
        q, k, v = y.split([self.np * self.hd, self.ng * self.hd, self.ng * self.hd], dim=-1)
        q = F.rms_norm(q.view(b, t, self.np, self.hd), (self.hd,), self.qn, 1e-5)
        k = F.rms_norm(k.view(b, t, self.ng, self.hd), (self.hd,), self.kn, 1e-5)
        c, s = cos[pos][:, :, None, :], sin[pos][:, :, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        v = v.view(b, t, self.ng, self.hd)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def proj(self, o):
        b, _, t, _ = o.shape
        return F.linear(o.transpose(1, 2).reshape(b, t, self.np * self.hd), self.w_proj)


def prefill_flops(s, heads, groups, hd, hidden):
    lin = 2 * s * hidden * ((heads + 2 * groups) * hd) + 2 * s * heads * hd * hidden
    att = 4 * s * s * heads * hd / 2
    return lin + att


def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(a.elapsed_time(e))
    return statistics.median(ts)


def timed_queued(fn, warmup, reps):
    """Milliseconds per call of fn queued reps times back to back (after warmup calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a = torch.cuda.Event(enable_timing=True)
    e = torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return a.elapsed_time(e) / max(reps, 1)


def run_train(a, L, cos, sin, backends, shape, dev, seqlens):
    """One training step (forward + backward, autograd) per seqlen and backend."""
    params = [t.detach().clone().requires_grad_() for t in (L.w_qkv, L.w_proj, L.qn, L.kn)]
    T = Layer.__new__(Layer)
    T.h, T.np, T.ng, T.hd = L.h, L.np, L.ng, L.hd
    T.w_qkv, T.w_proj, T.qn, T.kn = params
    for s in seqlens:
        x = ((torch.rand(1, s, a.hidden, device=dev) * 2 - 1).to(torch.bfloat16)).requires_grad_()
        dy = (torch.rand(1, s, a.hidden, device=dev) * 2 - 1).to(torch.bfloat16)
        pos = torch.arange(s, device=dev)[None, :]
        inputs = [x] + params
        for name, be in backends:
            rec = dict(case="train", backend=name, tokens=s, ctx=0, batch=1, ms=None,
                       fwd_ms=None, bwd_ms=None, **shape)
            try:
                with sdpa_kernel([be]):
                    def fwd():
                        q, k, v = T.qkv(x, pos, cos, sin)
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        return T.proj(o)
                    out = fwd()
                    grads = torch.autograd.grad(out, inputs, dy)
                    torch.cuda.synchronize()
                    if not all(bool(torch.isfinite(g).all()) for g in grads):
                        raise RuntimeError("non-finite gradient")
                    del out, grads
                    fw, bw, st = [], [], []
                    for it in range(a.warmup + a.reps):
                        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                        ev[0].record()
                        out = fwd()
                        ev[1].record()
                        torch.autograd.grad(out, inputs, dy)
                        ev[2].record()
                        ev[2].synchronize()
                        del out
                        if it >= a.warmup:
                            fw.append(ev[0].elapsed_time(ev[1]))
                            bw.append(ev[1].elapsed_time(ev[2]))
                            st.append(ev[0].elapsed_time(ev[2]))
                rec.update(ms=statistics.median(st), fwd_ms=statistics.median(fw),
                           bwd_ms=statistics.median(bw))
            except Exception as e:
                print(f"bench_layer train {name} s{s}: {e}", file=sys.stderr)
            torch.cuda.empty_cache()
            print(json.dumps(rec), flush=True)


def ints(text):
    """A comma-separated list of ints; an empty string is an empty list."""
    return [int(x) for x in text.split(",") if x.strip()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlens", default="2048,8192,16384")
    ap.add_argument("--chunk", type=int, default=2048, help="chunk tokens after the cache (0: skip)")
    ap.add_argument("--ctx-before", type=int, default=6144, help="cached tokens before the chunk")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--max-cache-bytes", type=int, default=24 << 30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--train-seqlens", default="", help="training step (fwd + bwd) lengths")
    a = ap.parse_args()
    if torch is None:
        sys.exit("bench_layer.py: PyTorch is not installed")
    dev = torch.device("cuda")
    L = Layer(a.hidden, a.heads, a.groups, a.head_dim, dev)
    shape = {"hidden": a.hidden, "heads": a.heads, "groups": a.groups, "head_dim": a.head_dim}
    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    seqlens, batches, contexts = ints(a.seqlens), ints(a.batches), ints(a.contexts)
    train_seqlens = ints(a.train_seqlens)
    max_pos = max([c + 1 for c in contexts] + seqlens + train_seqlens + [a.ctx_before + a.chunk, 1])
    cos, sin = rope_tables(max_pos, a.head_dim, 10000.0, dev)
    for s in seqlens:
        x = (torch.rand(1, s, a.hidden, device=dev) * 2 - 1).to(torch.bfloat16)
        pos = torch.arange(s, device=dev)[None, :]
        for name, be in backends:
            rec = dict(case="prefill", backend=name, tokens=s, ctx=0, batch=1, ms=None, tflops=None, **shape)
            try:
                with sdpa_kernel([be]):
                    def step():
                        q, k, v = L.qkv(x, pos, cos, sin)
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        return L.proj(o)
                    out = step()
                    torch.cuda.synchronize()
                    if not bool(torch.isfinite(out).all()):
                        raise RuntimeError("non-finite output")
                    ms = timed(step, a.warmup, a.reps)
                rec["ms"] = ms
                rec["tflops"] = prefill_flops(s, a.heads, a.groups, a.head_dim, a.hidden) / (ms * 1e-3) / 1e12
            except Exception as e:
                print(f"bench_layer prefill {name} s{s}: {e}", file=sys.stderr)
            print(json.dumps(rec), flush=True)
    if train_seqlens:
        run_train(a, L, cos, sin, backends, shape, dev, train_seqlens)
    if a.chunk > 0:
        run_chunk(a, L, cos, sin, backends, shape, dev)
    for ctx in contexts:
        for b in batches:
            cache_bytes = 2 * b * a.groups * (ctx + 1) * a.head_dim * 2
            if cache_bytes > a.max_cache_bytes:
                print(f"bench_layer decode b{b} ctx{ctx}: skipped ({cache_bytes} B)", file=sys.stderr)
                continue
            kc = torch.empty(b, a.groups, ctx + 1, a.head_dim, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
            vc = torch.empty(b, a.groups, ctx + 1, a.head_dim, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
            x = (torch.rand(b, 1, a.hidden, device=dev) * 2 - 1).to(torch.bfloat16)
            pos = torch.full((b, 1), ctx, device=dev, dtype=torch.long)
            nbytes = cache_bytes + 2 * (L.w_qkv.numel() + L.w_proj.numel())
            for name, be in backends:
                with sdpa_kernel([be]):
                    def step():
                        q, k, v = L.qkv(x, pos, cos, sin)
                        kc[:, :, ctx:ctx + 1] = k
                        vc[:, :, ctx:ctx + 1] = v
                        o = F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)
                        return L.proj(o)
                    eager_ok = False
                    for mode in ("eager", "graph"):
                        rec = dict(case="decode", backend=name, mode=mode, tokens=1, batch=b, ctx=ctx,
                                   ms=None, gbps=None, **shape)
                        try:
                            if mode == "eager":
                                out = step()
                                torch.cuda.synchronize()
                                if not bool(torch.isfinite(out).all()):
                                    raise RuntimeError("non-finite output")
                                fn = step
                            elif not eager_ok:
                                raise RuntimeError("not captured: the eager step failed")
                            else:
                                s_ = torch.cuda.Stream()
                                s_.wait_stream(torch.cuda.current_stream())
                                with torch.cuda.stream(s_):
                                    for _ in range(3):
                                        step()
                                torch.cuda.current_stream().wait_stream(s_)
                                g = torch.cuda.CUDAGraph()
                                with torch.cuda.graph(g):
                                    step()
                                fn = g.replay
                            ms = timed_queued(fn, a.warmup, a.reps)
                            rec["ms"] = ms
                            rec["gbps"] = nbytes / (ms * 1e-3) / 1e9
                            eager_ok = eager_ok or mode == "eager"
                        except Exception as e:
                            print(f"bench_layer decode {name} {mode} b{b} ctx{ctx}: {e}", file=sys.stderr)
                        print(json.dumps(rec), flush=True)
            del kc, vc
            torch.cuda.empty_cache()


def run_chunk(a, L, cos, sin, backends, shape, dev):
    """--chunk new tokens after --ctx-before cached ones, static cache, bottom-right causal."""
    from torch.nn.attention.bias import causal_lower_right
    c, before = a.chunk, a.ctx_before
    total = before + c
    kc = torch.empty(1, a.groups, total, a.head_dim, device=dev, dtype=torch.bfloat16).uniform_(-1, 1)
    vc = torch.empty_like(kc).uniform_(-1, 1)
    x = (torch.rand(1, c, a.hidden, device=dev) * 2 - 1).to(torch.bfloat16)
    pos = torch.arange(before, total, device=dev)[None, :]
    # Key j is visible to query i when j <= before + i.
    bool_mask = (torch.arange(total, device=dev)[None, :] <= (before + torch.arange(c, device=dev))[:, None])
    flops = (2 * c * a.hidden * (a.heads + 2 * a.groups) * a.head_dim + 2 * c * a.heads * a.head_dim * a.hidden
             + 4 * a.heads * a.head_dim * (c * before + c * c / 2))
    for name, be in backends:
        rec = dict(case="chunk", backend=name, tokens=c, ctx=before, batch=1, mask=None, ms=None,
                   tflops=None, **shape)
        for mask_name, mask in (("lower_right", causal_lower_right(c, total)), ("bool", bool_mask)):
            try:
                with sdpa_kernel([be]):
                    def step():
                        q, k, v = L.qkv(x, pos, cos, sin)
                        kc[:, :, before:] = k
                        vc[:, :, before:] = v
                        o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=True)
                        return L.proj(o)
                    out = step()
                    torch.cuda.synchronize()
                    if not bool(torch.isfinite(out).all()):
                        raise RuntimeError("non-finite output")
                    ms = timed(step, a.warmup, a.reps)
                rec.update(mask=mask_name, ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                break
            except Exception as e:
                print(f"bench_layer chunk {name} ({mask_name} mask) c{c} after {before}: {e}", file=sys.stderr)
        print(json.dumps(rec), flush=True)
    del kc, vc
    torch.cuda.empty_cache()

if __name__ == "__main__":
    main()
