//! The catalog holds the real models the issue names, and its kernels cover them.

use std::collections::HashSet;

use attention_codegen::catalog::{catalog, catalog_kernels, catalog_users, manifest};
use attention_codegen::render::{kernels_for_spec, Phase};
use attention_codegen::{AttentionKind, MaskType, QkNorm, Window};

#[test]
fn catalog_has_the_named_models() {
    let cat = catalog();
    let get = |n: &str| {
        cat.iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n}"))
            .spec
            .clone()
    };
    let llama = get("llama-3-8b");
    assert_eq!(
        (llama.heads, llama.gqa, llama.head_dims.clone()),
        (Some(32), Some(8), vec![128])
    );
    assert!(llama.rope.is_some() && !llama.bias && llama.default_mask() == MaskType::Causal);
    let qwen = get("qwen3-8b");
    assert_eq!(qwen.qk_norm, Some(QkNorm::Rms));
    assert_eq!(qwen.rope.unwrap().rotary_base, 1e6);
    let gpt2 = get("gpt2");
    assert_eq!((gpt2.heads, gpt2.head_dims.clone()), (Some(12), vec![64]));
    assert!(gpt2.rope.is_none());
    let mistral = get("mistral-7b");
    assert_eq!(
        mistral.window,
        Some(Window {
            left: 4095,
            right: 0
        })
    );
    let minilm = get("all-minilm-l6-v2");
    assert_eq!(
        (
            minilm.heads,
            minilm.gqa,
            minilm.head_dims.clone(),
            minilm.hidden
        ),
        (Some(12), Some(12), vec![32], Some(384))
    );
    assert!(minilm.rope.is_none() && minilm.bias && minilm.default_mask() == MaskType::Padding);
    // Phi-2: head dim 80 (not a multiple of 32), partial rope over 32 channels, biases.
    let phi = get("phi-2");
    assert_eq!(
        (phi.heads, phi.gqa, phi.head_dims.clone(), phi.hidden),
        (Some(32), Some(32), vec![80], Some(2560))
    );
    let rope = phi.rope.unwrap();
    assert_eq!((rope.rotary_percent, rope.rotary_base), (0.4, 10000.0));
    assert!(phi.bias && phi.qk_norm.is_none() && phi.default_mask() == MaskType::Causal);
    assert!(cat.iter().any(|e| e.spec.head_dims.contains(&256)));
    assert!(cat
        .iter()
        .any(|e| e.spec.kind == AttentionKind::CrossAttention
            && e.spec.rope.is_none()
            && e.spec.gqa == e.spec.heads));
    let names: HashSet<&str> = cat.iter().map(|e| e.name).collect();
    assert_eq!(names.len(), cat.len(), "model names are unique");
}

#[test]
fn catalog_kernels_are_unique_and_cover_every_model() {
    let ks = catalog_kernels().unwrap();
    let keys: HashSet<&str> = ks.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys.len(), ks.len());
    for e in catalog() {
        let mine = kernels_for_spec(&e.spec).unwrap();
        assert!(
            mine.iter().any(|k| k.phase == Phase::PrefillRows),
            "{}",
            e.name
        );
        assert!(
            mine.iter().any(|k| k.phase == Phase::DecodeRows),
            "{}",
            e.name
        );
        assert!(mine.iter().any(|k| k.phase == Phase::QkvPrep), "{}", e.name);
        for k in mine {
            assert!(
                keys.contains(k.key.as_str()),
                "{} of {} not in catalog",
                k.key,
                e.name
            );
        }
    }
    let users = catalog_users().unwrap();
    assert_eq!(users.len(), ks.len());
    let m = manifest().unwrap();
    for (key, models) in users {
        assert!(
            m.contains(&format!("{key} {}\n", models.join(","))),
            "{key}"
        );
    }
}
