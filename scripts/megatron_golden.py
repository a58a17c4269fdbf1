#!/usr/bin/env python3
"""Produce golden attention fixtures with the real Megatron-Core `SelfAttention`.

Runs on a CUDA machine with PyTorch and megatron-core importable (pure local, non
Transformer-Engine layer spec). Writes, per case, under `--work/<case>/`:

* `weights.safetensors`  the layer's state dict under Megatron names, prefixed with
  `decoder.layers.0.self_attention.` (`_extra_state` entries dropped), f32.
* `input.safetensors`    `input` `[s, b, hidden]` f32 (sequence-first).
* `expected.safetensors` `output` `[s, b, hidden]` f32 and, when the layer has a
  projection bias, `output_bias` `[hidden]` f32 (returned beside the output, not added).
  The safetensors metadata header records the provenance (versions, GPU, spec string).
* `intermediates.safetensors` debugging aids captured with hooks: `q_normed`/`k_normed`
  `[s, b, heads|groups, head_dim]` (after q/k norm, before rope), `q_rot`/`k_rot`/`v`
  (inputs of core attention, after rope), `core_out` `[s, b, heads * head_dim]`
  (input of `linear_proj`).

The per-case folders go under `--work`; they and `provenance.json` are packed into
`--out/fixtures.tar.gz`.

Usage (device):
    PYTHONPATH=/tmp/pylib python scripts/megatron_golden.py --out "$OUT"
"""

import argparse
import datetime
import json
import os
import socket
import sys
import tarfile

import torch

PREFIX = "decoder.layers.0.self_attention."

CASES = {
    "megatron": dict(
        spec="self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        seq=16,
        batch=2,
        hidden=512,
        heads=8,
        groups=2,
        head_dim=64,
        normalization="RMSNorm",
        add_bias_linear=True,
        rotary_interleaved=False,
        rotary_percent=1.0,
        seed=1234,
    ),
    "megatron_case2": dict(
        spec=(
            "self, heads=8, gqa=1, head_dim=64, hidden=256, qk_layernorm=layer, bias=false, "
            "rope=interleaved, rotary_percent=0.5, mask=causal"
        ),
        seq=13,
        batch=3,
        hidden=256,
        heads=8,
        groups=1,
        head_dim=64,
        normalization="LayerNorm",
        add_bias_linear=False,
        rotary_interleaved=True,
        rotary_percent=0.5,
        seed=4321,
    ),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group(backend="nccl", world_size=1, rank=0)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(123)


def run_case(name, c, out_dir, provenance):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig
    from safetensors.torch import save_file

    config = TransformerConfig(
        num_layers=1,
        hidden_size=c["hidden"],
        num_attention_heads=c["heads"],
        num_query_groups=c["groups"],
        kv_channels=c["head_dim"],
        qk_layernorm=True,
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
    )
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization=c["normalization"])
    attn_spec = layer_spec.submodules.self_attention
    assert attn_spec.params["attn_mask_type"] == AttnMaskType.causal
    attn = build_module(attn_spec, config=config, layer_number=1)

    # Deterministic random weights (CPU generator), large enough that every parameter matters.
    gen = torch.Generator().manual_seed(c["seed"])
    with torch.no_grad():
        for pname, p in attn.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "layernorm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif pname.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    attn = attn.cuda().eval()

    x = torch.randn(c["seq"], c["batch"], c["hidden"], generator=gen, dtype=torch.float32)

    rope = RotaryEmbedding(
        kv_channels=c["head_dim"],
        rotary_percent=c["rotary_percent"],
        rotary_interleaved=c["rotary_interleaved"],
        rotary_base=10000,
        use_cpu_initialization=True,
    )
    rotary_pos_emb = rope(c["seq"])

    captured = {}

    def save_out(key):
        def hook(_mod, _args, out):
            captured[key] = out.detach().float().cpu().contiguous()

        return hook

    def core_pre(_mod, args):
        captured["q_rot"] = args[0].detach().float().cpu().contiguous()
        captured["k_rot"] = args[1].detach().float().cpu().contiguous()
        captured["v"] = args[2].detach().float().cpu().contiguous()

    def proj_pre(_mod, args):
        captured["core_out"] = args[0].detach().float().cpu().contiguous()

    attn.q_layernorm.register_forward_hook(save_out("q_normed"))
    attn.k_layernorm.register_forward_hook(save_out("k_normed"))
    attn.core_attention.register_forward_pre_hook(core_pre)
    attn.linear_proj.register_forward_pre_hook(proj_pre)

    with torch.no_grad():
        output, bias = attn(x.cuda(), attention_mask=None, rotary_pos_emb=rotary_pos_emb)
    torch.cuda.synchronize()

    state = {
        PREFIX + k: v.detach().float().cpu().contiguous()
        for k, v in attn.state_dict().items()
        if not k.endswith("_extra_state") and torch.is_tensor(v)
    }
    meta = dict(provenance)
    meta.update(
        case=name,
        spec=c["spec"],
        seq=str(c["seq"]),
        batch=str(c["batch"]),
        weight_prefix=PREFIX,
        seeds=f"torch.Generator seed {c['seed']} (weights then input), model_parallel_cuda_manual_seed(123)",
        init="matrices 0.05*randn, norm weights 1+0.1*randn, biases (incl. norm bias) 0.1*randn, input randn",
        module_classes=json.dumps(
            {n: type(m).__module__ + "." + type(m).__name__ for n, m in attn.named_children()}
        ),
        config=json.dumps(
            # rotary_percent / rotary_base are GPTModel (RotaryEmbedding) arguments, not
            # TransformerConfig fields; they are recorded here beside the config fields.
            {"rotary_percent": str(c["rotary_percent"]), "rotary_base": "10000"}
            | {
                k: str(getattr(config, k))
                for k in (
                    "hidden_size num_attention_heads num_query_groups kv_channels qk_layernorm "
                    "normalization layernorm_epsilon add_bias_linear add_qkv_bias attention_dropout "
                    "softmax_scale rotary_interleaved window_size "
                    "softmax_type attention_softmax_in_fp32 apply_query_key_layer_scaling"
                ).split()
            }
        ),
    )
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "weights.safetensors"), metadata=meta)
    save_file({"input": x.contiguous()}, os.path.join(out_dir, "input.safetensors"), metadata=meta)
    expected = {"output": output.detach().float().cpu().contiguous()}
    if bias is not None:
        expected["output_bias"] = bias.detach().float().cpu().contiguous()
    meta_e = dict(meta, output_bias_present=str(bias is not None))
    save_file(expected, os.path.join(out_dir, "expected.safetensors"), metadata=meta_e)
    save_file(captured, os.path.join(out_dir, "intermediates.safetensors"), metadata=meta)

    print(f"== case {name}: {c['spec']}")
    for k, v in state.items():
        print(f"   weight {k} {list(v.shape)}")
    for k, v in {**expected, **captured}.items():
        print(f"   tensor {k} {list(v.shape)} finite={bool(torch.isfinite(v).all())} "
              f"absmax={v.abs().max().item():.4f}")
    print("   module classes:", meta["module_classes"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (gets fixtures.tar.gz)")
    ap.add_argument("--work", default="/tmp/megatron_golden", help="folder for the per-case files")
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
        command="PYTHONPATH=/tmp/pylib python scripts/megatron_golden.py --out $OUT",
        tf32="disabled (matmul and cudnn), float32_matmul_precision=highest",
    )
    print(json.dumps(provenance, indent=1))
    init_distributed()

    failed = []
    for name in args.cases.split(","):
        try:
            run_case(name, CASES[name], os.path.join(args.work, name), provenance)
        except Exception as e:  # keep the other case's results
            import traceback

            traceback.print_exc()
            failed.append(name)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    with tarfile.open(os.path.join(args.out, "fixtures.tar.gz"), "w:gz") as tar:
        for name in args.cases.split(","):
            d = os.path.join(args.work, name)
            if os.path.isdir(d):
                tar.add(d, arcname=name)
    torch.distributed.destroy_process_group()
    if failed:
        print("FAILED cases:", failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
