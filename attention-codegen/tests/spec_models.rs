//! Specs of real models parse into the expected values; defaults and the canonical form.

use attention_codegen::{
    parse_spec, AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Role, Rope, RopeMode, Sinks,
    Window,
};

fn spec(src: &str) -> AttentionSpec {
    parse_spec(src).unwrap_or_else(|e| panic!("{src:?}: {}", e.with_source(src)))
}

#[test]
fn defaults() {
    assert_eq!(
        spec("self"),
        AttentionSpec::new(AttentionKind::SelfAttention)
    );
    assert_eq!(
        spec("cross"),
        AttentionSpec::new(AttentionKind::CrossAttention)
    );
    let s = spec("cross");
    assert_eq!(s.masks, vec![MaskType::Causal]);
    assert_eq!(s.eps, 1e-5);
    assert!(s.bias && !s.qkv_bias && !s.output_gate);
    assert_eq!(s.dtype, DType::Bf16);
}

#[test]
fn llama3_8b() {
    let src = "self, heads = 32, gqa = 8, head_dim = 128, hidden = 4096, bias = false, rope, \
               rotary_base = 500000.0, mask = causal";
    let s = spec(src);
    let mut want = AttentionSpec::new(AttentionKind::SelfAttention);
    want.heads = Some(32);
    want.gqa = Some(8);
    want.head_dims = vec![128];
    want.hidden = Some(4096);
    want.bias = false;
    want.rope = Some(Rope {
        mode: RopeMode::Half,
        rotary_percent: 1.0,
        rotary_base: 500000.0,
    });
    assert_eq!(s, want);
    assert_eq!(
        s.to_string(),
        "self, heads = 32, gqa = 8, head_dim = 128, hidden = 4096, bias = false, rope = half, \
         rotary_base = 500000.0"
    );
    assert_eq!(src.parse::<AttentionSpec>().unwrap(), s);
}

#[test]
fn qwen3_qk_rms() {
    let s = spec(
        "self, heads = 32, gqa = 8, head_dim = 128, hidden = 4096, qk_layernorm = rms, \
         eps = 1e-6, bias = false, rope, rotary_base = 1000000.0",
    );
    assert_eq!(s.qk_norm, Some(QkNorm::Rms));
    assert_eq!(s.eps, 1e-6);
    assert!(!s.has_qkv_bias());
    assert_eq!(s.rope.unwrap().rotary_base, 1e6);
}

#[test]
fn gpt2() {
    let s = spec("self, heads = 12, head_dim = 64, hidden = 768, mask = causal");
    assert_eq!((s.heads, s.gqa, s.hidden), (Some(12), None, Some(768)));
    assert_eq!(s.head_dims, vec![64]);
    assert!(s.rope.is_none());
    assert!(s.bias);
    assert_eq!(s.masks, vec![MaskType::Causal]);
}

#[test]
fn mistral_sliding_window() {
    let s =
        spec("self, heads = 32, gqa = 8, head_dim = 128, bias = false, rope, window = (4095, 0)");
    assert_eq!(
        s.window,
        Some(Window {
            left: 4095,
            right: 0
        })
    );
    let s = spec("self, mask = causal_bottom_right, window = (-1, -1)");
    assert_eq!(
        s.window,
        Some(Window {
            left: -1,
            right: -1
        })
    );
}

#[test]
fn head_dim_256_hidden_differs() {
    // Gemma-style: hidden (2048) != heads * head_dim (8 * 256); allowed, as in Megatron.
    let s = spec("self, heads = 8, gqa = 1, head_dim = 256, hidden = 2048, qk_layernorm, rope = interleaved, rotary_percent = 0.5");
    assert_eq!(s.head_dims, vec![256]);
    assert_eq!(s.hidden, Some(2048));
    assert_eq!(s.qk_norm, Some(QkNorm::Layer));
    assert_eq!(s.rope.unwrap().mode, RopeMode::Interleaved);
    assert_eq!(s.rope.unwrap().rotary_percent, 0.5);
}

#[test]
fn cross_t5_and_whisper() {
    let t5 = spec("cross, heads = 8, head_dim = 64, hidden = 512, bias = false, mask = padding");
    assert_eq!(t5.kind, AttentionKind::CrossAttention);
    assert_eq!(t5.masks, vec![MaskType::Padding]);
    let whisper = spec("cross, heads = 20, gqa = 20, head_dim = 64, hidden = 1280, mask = no_mask, dtype = f16, linear_q = my::Q, linear_kv = KvProj");
    assert_eq!(whisper.gqa, Some(20));
    assert_eq!(whisper.dtype, DType::F16);
    assert_eq!(whisper.override_for(Role::LinearQ), Some("my::Q"));
    assert_eq!(whisper.override_for(Role::LinearKv), Some("KvProj"));
}

#[test]
fn lists_keep_order() {
    let s = spec("self, head_dim = [128, 64, 256], mask = [padding_causal, causal, arbitrary]");
    assert_eq!(s.head_dims, vec![128, 64, 256]);
    assert_eq!(
        s.masks,
        vec![
            MaskType::PaddingCausal,
            MaskType::Causal,
            MaskType::Arbitrary
        ]
    );
    assert_eq!(s.default_mask(), MaskType::PaddingCausal);
    let s = spec("self, head_dim = [96], mask = [no_mask]");
    assert_eq!(s.head_dims, vec![96]);
    assert_eq!(s.masks, vec![MaskType::NoMask]);
}

#[test]
fn every_other_key() {
    let s = spec(
        "self, gqa = 4, qkv_bias, bias = false, softmax_scale = 0.125, sinks = learnable, \
         output_gate, linear_proj = crate::Proj, core_attention = ::x::Core, linear_qkv = Qkv",
    );
    assert!(s.qkv_bias && s.has_qkv_bias() && s.output_gate);
    assert_eq!(s.softmax_scale, Some(0.125));
    assert_eq!(s.sinks, Some(Sinks::Learnable));
    assert_eq!(
        s.overrides,
        vec![
            (Role::LinearProj, "crate::Proj".to_string()),
            (Role::CoreAttention, "::x::Core".to_string()),
            (Role::LinearQkv, "Qkv".to_string()),
        ]
    );
    assert_eq!(
        spec("self, sinks = off_by_one").sinks,
        Some(Sinks::OffByOne)
    );
    assert_eq!(spec("self, qk_layernorm = l2").qk_norm, Some(QkNorm::L2));
}
