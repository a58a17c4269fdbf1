#!/usr/bin/env python3
"""Re-implement Megatron-Core self-attention in float64 numpy, straight from
/work/shared/reference/semantics.md, and compare it with the golden fixtures that
scripts/megatron_golden.py produced with the real Megatron-Core `SelfAttention`.

Needs `numpy` and `safetensors`. Usage:
    python scripts/numpy_reference_check.py [tests/fixtures/megatron tests/fixtures/megatron_case2]

Each fixture folder holds weights/input/expected(/intermediates).safetensors; the layer's
hyper-parameters come from the metadata header (`config` JSON) that the generator wrote.
Exits non-zero when the relative error of the output exceeds 1e-5.
"""

import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

PREFIX = "decoder.layers.0.self_attention."
TOLERANCE = 1e-5


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def norm(x, w, b, kind, eps):
    """q/k norm over the last dim (head_dim)."""
    if kind == "RMSNorm":
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def rope(t, positions, percent, base, interleaved):
    """t: [s, b, heads, hn]; rotates the first hn*percent channels."""
    hn = t.shape[-1]
    dim = int(hn * percent)
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    f = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [s, dim/2]
    rot, rest = t[..., :dim], t[..., dim:]
    if not interleaved:
        ang = np.concatenate([f, f], axis=-1)[:, None, None, :]
        t1, t2 = rot[..., : dim // 2], rot[..., dim // 2 :]
        rotated = np.concatenate([-t2, t1], axis=-1)
        out = rot * np.cos(ang) + rotated * np.sin(ang)
    else:
        c = np.cos(f)[:, None, None, :]
        s = np.sin(f)[:, None, None, :]
        t0, t1 = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2] = t0 * c - t1 * s
        out[..., 1::2] = t1 * c + t0 * s
    return np.concatenate([out, rest], axis=-1)


def reference(x, w, cfg):
    s, b, _ = x.shape
    n_heads = int(cfg["num_attention_heads"])
    groups = int(cfg["num_query_groups"])
    hn = int(cfg["kv_channels"])
    per = n_heads // groups
    eps = float(cfg["layernorm_epsilon"])
    kind = cfg["normalization"]

    def get(name):
        v = w.get(PREFIX + name)
        return None if v is None else v.astype(np.float64)

    # 1. linear_qkv (bias added inside).
    y = x @ get("linear_qkv.weight").T
    if get("linear_qkv.bias") is not None:
        y = y + get("linear_qkv.bias")
    # 2. per-group interleaved split.
    y = y.reshape(s, b, groups, (per + 2) * hn)
    q = y[..., : per * hn].reshape(s, b, n_heads, hn)
    k = y[..., per * hn : (per + 1) * hn]
    v = y[..., (per + 1) * hn :]
    # 3. q/k norm.
    q_n = norm(q, get("q_layernorm.weight"), get("q_layernorm.bias"), kind, eps)
    k_n = norm(k, get("k_layernorm.weight"), get("k_layernorm.bias"), kind, eps)
    # 4. rope on q and k.
    pos = np.arange(s)
    percent = float(cfg["rotary_percent"])
    base = float(cfg["rotary_base"])
    inter = cfg["rotary_interleaved"] == "True"
    q_r = rope(q_n, pos, percent, base, inter)
    k_r = rope(k_n, pos, percent, base, inter)
    # 5. causal softmax attention, query head i uses group i // per.
    scale = 1.0 / np.sqrt(hn)
    k_h = np.repeat(k_r, per, axis=2)  # [s, b, np, hn]
    v_h = np.repeat(v, per, axis=2)
    scores = np.einsum("ibhd,jbhd->bhij", q_r, k_h) * scale
    mask = np.triu(np.ones((s, s), dtype=bool), k=1)  # key j > query i is masked
    scores = np.where(mask, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    ctx = np.einsum("bhij,jbhd->ibhd", p, v_h).reshape(s, b, n_heads * hn)
    # 6. linear_proj without its bias; bias returned separately.
    out = ctx @ get("linear_proj.weight").T
    return out, get("linear_proj.bias"), dict(
        q_normed=q_n, k_normed=k_n, q_rot=q_r, k_rot=k_r, v=v, core_out=ctx
    )


def check(folder):
    folder = Path(folder)
    with safe_open(str(folder / "expected.safetensors"), "np") as f:
        meta = f.metadata()
    cfg = json.loads(meta["config"])
    w = load_file(str(folder / "weights.safetensors"))
    x = load_file(str(folder / "input.safetensors"))["input"].astype(np.float64)
    exp = load_file(str(folder / "expected.safetensors"))
    inter_path = folder / "intermediates.safetensors"
    inter = load_file(str(inter_path)) if inter_path.exists() else {}

    for name, t in {**w, **exp, "input": x}.items():
        assert np.isfinite(t).all(), f"{folder}: {name} has non-finite values"

    out, bias, mids = reference(x, w, cfg)
    print(f"{folder} [{meta['spec']}] megatron-core {meta['megatron_core']} on {meta['gpu']}")
    for name, t in mids.items():
        if name in inter:
            print(f"  {name:9s} {list(inter[name].shape)} rel err {rel_err(t, inter[name]):.3e}")
    err = rel_err(out, exp["output"])
    print(f"  output    {list(exp['output'].shape)} rel err {err:.3e}")
    if bias is not None or "output_bias" in exp:
        assert bias is not None and "output_bias" in exp, "output_bias presence mismatch"
        berr = rel_err(bias, exp["output_bias"])
        print(f"  output_bias {list(exp['output_bias'].shape)} rel err {berr:.3e}")
        err = max(err, berr)
    return err


def main():
    folders = sys.argv[1:] or [
        p for p in ("tests/fixtures/megatron", "tests/fixtures/megatron_case2") if Path(p).exists()
    ]
    worst = max(check(f) for f in folders)
    print(f"worst relative error {worst:.3e} (tolerance {TOLERANCE:.0e})")
    sys.exit(0 if worst < TOLERANCE else 1)


if __name__ == "__main__":
    main()
