#!/usr/bin/env python3
"""Produce golden backward fixtures with the real Megatron-Core attention modules' autograd.

Runs on a CUDA machine with PyTorch and megatron-core importable (pure local, non
Transformer-Engine layer spec, fp32, TF32 off). For each case it builds the layer, fills its
parameters from a seeded generator, runs the forward on `input` (with `requires_grad`),
then `output.backward(grad_output)` (the loss `sum(output * grad_output)`), and writes under
`--work/<case>/`:

* `weights.safetensors`   the layer's state dict under Megatron names, prefixed with
  `decoder.layers.0.self_attention.` (cross: `decoder.layers.0.cross_attention.`), f32.
* `input.safetensors`     `input` `[s, b, hidden]`, `grad_output` `[s, b, hidden]`;
  padding case: `attention_mask` uint8 `[b, 1, s, s]` (1 = masked out, Megatron's
  convention); cross case: `key_value_states` `[sk, b, hidden]`.
* `expected.safetensors`  `output` `[s, b, hidden]`, `output_bias` `[hidden]` when the layer
  has a projection bias (returned unadded, so it gets no gradient), `grad_input`
  `[s, b, hidden]`, `grad.<name>` for every parameter that received a gradient (`<name>` is
  the Megatron name without the prefix, e.g. `grad.linear_qkv.weight`); cross case:
  `grad_key_value_states` `[sk, b, hidden]`.
* `README.txt`            the spec string in our grammar and the provenance.

Every file's safetensors metadata repeats the provenance. The per-case folders and
`provenance.json` are packed into `--out/fixtures_backward.tar.gz`.

Usage (device, repository root, the megatron-core wheel unzipped into /tmp/pylib):
    PYTHONPATH=/tmp/pylib python scripts/megatron_golden_backward.py --out "$OUT"
"""

import argparse
import datetime
import json
import os
import sys
import tarfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from megatron_golden import CASES as FORWARD_CASES, init_distributed  # noqa: E402

SELF_PREFIX = "decoder.layers.0.self_attention."
CROSS_PREFIX = "decoder.layers.0.cross_attention."

BASE = dict(
    qk_layernorm=True,
    window=None,
    softmax_type="vanilla",
    output_gate=False,
    mask="causal",
    kind="self",
    seq_kv=None,
)

CASES = {
    # The two forward fixtures' configs (tests/fixtures/megatron{,_case2}): RMS q/k norm, half
    # rope, GQA 8/2, biases; LayerNorm q/k norm (with bias), interleaved partial rope, one
    # group, no linear biases.
    "megatron": {**BASE, **FORWARD_CASES["megatron"], "seed": 2234},
    "megatron_case2": {**BASE, **FORWARD_CASES["megatron_case2"], "seed": 5321},
    # Learnable sinks, a sliding window, the output gate, GQA 8/4 at head dim 32.
    "megatron_sinks_gate": dict(
        BASE,
        spec=(
            "self, heads=8, gqa=4, head_dim=32, hidden=128, qk_layernorm=rms, rope, "
            "window=(5, 0), sinks=learnable, output_gate, mask=causal"
        ),
        seq=12,
        batch=2,
        hidden=128,
        heads=8,
        groups=4,
        head_dim=32,
        normalization="RMSNorm",
        add_bias_linear=True,
        rotary_interleaved=False,
        rotary_percent=1.0,
        window=(5, 0),
        softmax_type="learnable",
        output_gate=True,
        seed=777,
    ),
    # A key-padding mask tensor (per sequence lengths 11 and 6 of 11), no q/k norm, no bias.
    "megatron_padding": dict(
        BASE,
        spec=(
            "self, heads=4, gqa=2, head_dim=64, hidden=256, bias=false, rope, mask=padding"
        ),
        seq=11,
        batch=2,
        hidden=256,
        heads=4,
        groups=2,
        head_dim=64,
        normalization="RMSNorm",
        add_bias_linear=False,
        rotary_interleaved=False,
        rotary_percent=1.0,
        qk_layernorm=False,
        mask="padding",
        lengths=[11, 6],
        seed=888,
    ),
    # Cross-attention (no GQA in Megatron's CrossAttention, no q/k norm, no rope).
    "megatron_cross": dict(
        BASE,
        spec="cross, heads=4, head_dim=32, hidden=128, mask=no_mask",
        seq=7,
        seq_kv=10,
        batch=2,
        hidden=128,
        heads=4,
        groups=4,
        head_dim=32,
        normalization="RMSNorm",
        add_bias_linear=True,
        rotary_interleaved=False,
        rotary_percent=1.0,
        qk_layernorm=False,
        mask="no_mask",
        kind="cross",
        seed=999,
    ),
}


def build(c):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=c["hidden"],
        num_attention_heads=c["heads"],
        num_query_groups=c["groups"],
        kv_channels=c["head_dim"],
        qk_layernorm=c["qk_layernorm"],
        normalization=c["normalization"],
        layernorm_epsilon=1e-5,
        add_bias_linear=c["add_bias_linear"],
        attention_dropout=0.0,
        hidden_dropout=0.0,
        params_dtype=torch.float32,
        bf16=False,
        fp16=False,
        use_cpu_initialization=True,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        rotary_interleaved=c["rotary_interleaved"],
        window_size=c["window"],
        softmax_type=c["softmax_type"],
        attention_output_gate=c["output_gate"],
    )
    if c["kind"] == "cross":
        attn = CrossAttention(
            config=config,
            submodules=CrossAttentionSubmodules(
                linear_q=ColumnParallelLinear,
                linear_kv=ColumnParallelLinear,
                core_attention=DotProductAttention,
                linear_proj=RowParallelLinear,
            ),
            layer_number=1,
            attn_mask_type=AttnMaskType.no_mask,
        )
        return config, attn
    layer_spec = get_gpt_layer_local_spec(
        qk_layernorm=c["qk_layernorm"], normalization=c["normalization"]
    )
    attn_spec = layer_spec.submodules.self_attention
    if c["mask"] == "padding":
        attn_spec.params["attn_mask_type"] = AttnMaskType.padding
    else:
        assert attn_spec.params["attn_mask_type"] == AttnMaskType.causal
    return config, build_module(attn_spec, config=config, layer_number=1)


def run_case(name, c, out_dir, provenance):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from safetensors.torch import save_file

    prefix = CROSS_PREFIX if c["kind"] == "cross" else SELF_PREFIX
    config, attn = build(c)

    gen = torch.Generator().manual_seed(c["seed"])
    with torch.no_grad():
        for pname, p in attn.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "layernorm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif pname.endswith("softmax_offset"):
                p.copy_(noise)  # sink logits of order one, so they matter
            elif pname.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    attn = attn.cuda().train()

    s, b, h = c["seq"], c["batch"], c["hidden"]
    x = torch.randn(s, b, h, generator=gen, dtype=torch.float32)
    g = torch.randn(s, b, h, generator=gen, dtype=torch.float32)
    inputs = {"input": x.clone(), "grad_output": g.clone()}

    kwargs = {}
    kv = None
    if c["kind"] == "cross":
        kv = torch.randn(c["seq_kv"], b, h, generator=gen, dtype=torch.float32)
        inputs["key_value_states"] = kv.clone()
        kv = kv.cuda().requires_grad_(True)
        kwargs["key_value_states"] = kv
    else:
        rope = RotaryEmbedding(
            kv_channels=c["head_dim"],
            rotary_percent=c["rotary_percent"],
            rotary_interleaved=c["rotary_interleaved"],
            rotary_base=10000,
            use_cpu_initialization=True,
        )
        kwargs["rotary_pos_emb"] = rope(s)
    mask = None
    if c["mask"] == "padding":
        # Key padding: sequence bi sees keys 0 .. lengths[bi]; no row is fully masked
        # (Megatron fills masked logits with -10000, not -inf).
        mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
        for bi, n in enumerate(c["lengths"]):
            mask[bi, :, :, n:] = True
        inputs["attention_mask"] = mask.to(torch.uint8)
        mask = mask.cuda()

    xg = x.cuda().requires_grad_(True)
    output, bias = attn(xg, attention_mask=mask, **kwargs)
    output.backward(g.cuda())
    torch.cuda.synchronize()

    state = {
        prefix + k: v.detach().float().cpu().contiguous()
        for k, v in attn.state_dict().items()
        if not k.endswith("_extra_state") and torch.is_tensor(v)
    }
    expected = {
        "output": output.detach().float().cpu().contiguous(),
        "grad_input": xg.grad.detach().float().cpu().contiguous(),
    }
    if bias is not None:
        expected["output_bias"] = bias.detach().float().cpu().contiguous()
    if kv is not None:
        expected["grad_key_value_states"] = kv.grad.detach().float().cpu().contiguous()
    no_grad = []
    for pname, p in attn.named_parameters():
        if p.grad is None:
            no_grad.append(pname)
        else:
            expected["grad." + pname] = p.grad.detach().float().cpu().contiguous()

    meta = dict(provenance)
    meta.update(
        case=name,
        spec=c["spec"],
        seq=str(s),
        batch=str(b),
        weight_prefix=prefix,
        seeds=f"torch.Generator seed {c['seed']} (weights, input, grad_output, context)",
        init=(
            "matrices 0.05*randn, norm weights 1+0.1*randn, biases (incl. norm bias) "
            "0.1*randn, softmax_offset randn, input/grad_output/key_value_states randn"
        ),
        loss="sum(output * grad_output); output_bias is returned unadded and not in the loss",
        params_without_grad=json.dumps(no_grad),
        config=json.dumps(
            {"rotary_percent": str(c["rotary_percent"]), "rotary_base": "10000"}
            | {
                k: str(getattr(config, k))
                for k in (
                    "hidden_size num_attention_heads num_query_groups kv_channels qk_layernorm "
                    "normalization layernorm_epsilon add_bias_linear add_qkv_bias "
                    "attention_dropout softmax_scale rotary_interleaved window_size "
                    "softmax_type attention_output_gate attention_softmax_in_fp32 "
                    "apply_query_key_layer_scaling"
                ).split()
            }
        ),
        module_classes=json.dumps(
            {n: type(m).__module__ + "." + type(m).__name__ for n, m in attn.named_children()}
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "weights.safetensors"), metadata=meta)
    save_file(inputs, os.path.join(out_dir, "input.safetensors"), metadata=meta)
    save_file(expected, os.path.join(out_dir, "expected.safetensors"), metadata=meta)

    lines = [
        f"Golden backward fixture, spec: `{c['spec']}`",
        "",
        "Produced by the REAL reference system's autograd: Megatron-Core "
        f"{provenance['megatron_core']} "
        + ("CrossAttention (ColumnParallelLinear linear_q/linear_kv, DotProductAttention, "
           "RowParallelLinear)" if c["kind"] == "cross" else
           "SelfAttention from get_gpt_layer_local_spec(...).submodules.self_attention")
        + f", world size 1, fp32 on {provenance['gpu']}, TF32 off, dropouts 0, fusions off.",
        "Loss: sum(output * grad_output); `output.backward(grad_output)`.",
        f"Parameters without a gradient: {no_grad} (linear_proj.bias is returned unadded).",
        "",
        f"Environment: torch {provenance['torch']} (CUDA {provenance['torch_cuda']}), "
        f"Python {provenance['python']}, date {provenance['date_utc']}.",
        "Command (device, repo root, megatron-core wheel unzipped into /tmp/pylib):",
        "    PYTHONPATH=/tmp/pylib python scripts/megatron_golden_backward.py --out $OUT",
        "",
        f"Weight prefix: `{prefix}`",
        "Files:",
    ]
    for fname, tensors in (("weights", state), ("input", inputs), ("expected", expected)):
        lines.append(f"- {fname}.safetensors:")
        for k, v in tensors.items():
            lines.append(f"    {k} {list(v.shape)} {str(v.dtype).replace('torch.', '')}")
    if c["mask"] == "padding":
        lines.append(
            "attention_mask: uint8 [b, 1, s, s], 1 = masked out (key padding, lengths "
            f"{c['lengths']}); Megatron fills masked logits with -10000 (no row is fully masked)."
        )
    lines.append("")
    lines.append("Config: " + meta["config"])
    with open(os.path.join(out_dir, "README.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")

    print(f"== case {name}: {c['spec']}")
    for k, v in expected.items():
        print(f"   {k} {list(v.shape)} finite={bool(torch.isfinite(v).all())} "
              f"absmax={v.abs().max().item():.4g} norm={v.norm().item():.4g}")
    print("   no grad:", no_grad)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gets fixtures_backward.tar.gz)")
    ap.add_argument("--work", default="/tmp/megatron_golden_bwd", help="per-case folders")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    import megatron.core
    from megatron.core import package_info

    provenance = dict(
        megatron_core=package_info.__version__,
        megatron_core_path=os.path.dirname(megatron.core.__file__),
        torch=torch.__version__,
        torch_cuda=str(torch.version.cuda),
        gpu=torch.cuda.get_device_name(0),
        python=sys.version.split()[0],
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="PYTHONPATH=/tmp/pylib python scripts/megatron_golden_backward.py --out $OUT",
        tf32="disabled (matmul and cudnn), float32_matmul_precision=highest",
    )
    print(json.dumps(provenance, indent=1))
    init_distributed()

    failed = []
    names = args.cases.split(",")
    for name in names:
        try:
            run_case(name, CASES[name], os.path.join(args.work, name), provenance)
        except Exception:  # keep the other cases' results
            import traceback

            traceback.print_exc()
            failed.append(name)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    with tarfile.open(os.path.join(args.out, "fixtures_backward.tar.gz"), "w:gz") as tar:
        for name in names:
            d = os.path.join(args.work, name)
            if os.path.isdir(d):
                tar.add(d, arcname=name)
    torch.distributed.destroy_process_group()
    if failed:
        print("FAILED cases:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
