//! Rendering: every head dim × mask × dtype variant renders, has no `#include`, is
//! deterministic, and its key is unique and names its entry point.

use std::collections::HashSet;

use attention_codegen::render::{
    configs_for_head_dim, kernels_for_spec, kernels_for_spec_with_head_dim, KernelConfig, Phase,
    PrepLayout, RenderError,
};
use attention_codegen::{
    AttentionKind, AttentionSpec, DType, MaskType, QkNorm, Rope, RopeMode, Sinks, Window,
    SUPPORTED_HEAD_DIMS,
};

/// Every attention-kernel config over head dims × dtypes × masks × window × sinks × bias.
fn all_attention_configs() -> Vec<KernelConfig> {
    let mut out = Vec::new();
    for &hd in SUPPORTED_HEAD_DIMS {
        for dtype in [DType::Bf16, DType::F16] {
            for sinks in [None, Some(Sinks::OffByOne), Some(Sinks::Learnable)] {
                for has_window in [false, true] {
                    for mask in MaskType::ALL {
                        if has_window && !mask.accepts_window() {
                            continue;
                        }
                        for has_bias in [false, true] {
                            let mut c = KernelConfig::new(Phase::PrefillRows, dtype, hd);
                            c.mask = Some(mask);
                            c.has_window = has_window;
                            c.sinks = sinks;
                            c.has_bias = has_bias;
                            c.output_gate = has_bias; // exercise the gate too
                            out.push(c);
                        }
                    }
                    for (phase, causal) in [
                        (Phase::DecodeRows, true),
                        (Phase::DecodeRows, false),
                        (Phase::DecodeRowsPaged, true),
                    ] {
                        let mut c = KernelConfig::new(phase, dtype, hd);
                        c.causal = causal;
                        c.has_window = has_window;
                        c.sinks = sinks;
                        out.push(c);
                    }
                }
            }
            for layout in [PrepLayout::SelfAttention, PrepLayout::CrossAttention] {
                for norm in [
                    None,
                    Some(QkNorm::Layer),
                    Some(QkNorm::Rms),
                    Some(QkNorm::L2),
                ] {
                    for rope in [
                        None,
                        Some((RopeMode::Half, hd)),
                        Some((RopeMode::Interleaved, hd / 2)),
                    ] {
                        if layout == PrepLayout::CrossAttention && rope.is_some() {
                            continue;
                        }
                        let gates: &[bool] = match layout {
                            PrepLayout::SelfAttention => &[false, true],
                            PrepLayout::CrossAttention => &[false],
                        };
                        for &gate in gates {
                            let mut c = KernelConfig::new(Phase::QkvPrep, dtype, hd);
                            c.layout = layout;
                            c.qk_norm = norm;
                            c.rope = rope;
                            c.output_gate = gate;
                            out.push(c);
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_variant_renders_without_includes_and_deterministically() {
    let configs = all_attention_configs();
    let mut keys = HashSet::new();
    let mut sources = HashSet::new();
    for c in &configs {
        let a = c.render().unwrap_or_else(|e| panic!("{}: {e}", c.key()));
        let b = c.render().unwrap();
        assert_eq!(
            a.source.as_bytes(),
            b.source.as_bytes(),
            "{} not deterministic",
            a.key
        );
        assert!(!a.source.contains("#include"), "{} has an #include", a.key);
        assert!(
            !a.source.contains("{{") && !a.source.contains("{%"),
            "{}: tera left",
            a.key
        );
        let entry = "extern \"C\" __global__ void __launch_bounds__(";
        assert!(a.source.contains(entry), "{}", a.key);
        assert!(
            a.source.contains(&format!(") {}(", a.key)),
            "{}: entry not named by key",
            a.key
        );
        assert_eq!(a.head_dim, c.head_dim);
        assert_eq!(a.dtype, c.dtype);
        assert!(a.key.starts_with(c.phase.prefix()), "{}", a.key);
        assert!(keys.insert(a.key.clone()), "duplicate key {}", a.key);
        // Different keys give different sources: the key encodes what changes the source.
        assert!(
            sources.insert(a.source.clone()),
            "{}: same source as another key",
            a.key
        );
    }
    assert!(configs.len() > 500, "{} configs", configs.len());
}

#[test]
fn sources_specialize_the_parameters() {
    let mut c = KernelConfig::new(Phase::PrefillRows, DType::F16, 192);
    c.mask = Some(MaskType::Arbitrary);
    c.sinks = Some(Sinks::Learnable);
    let k = c.render().unwrap();
    assert_eq!(k.key, "prefill_rows_f16_hd192_arbitrary_sinkl_w4");
    assert!(k.source.contains("constexpr int HEAD_DIM = 192;"));
    assert!(k.source.contains("typedef f16_t elem_t;"));
    assert!(k.source.contains("p.mask[b * p.mask_stride_b"));
    assert!(k.source.contains("sinks[head] * LOG2E"));
    assert_eq!(k.mask, Some(MaskType::Arbitrary));

    let mut d = KernelConfig::new(Phase::DecodeRows, DType::Bf16, 64);
    d.causal = false;
    let k = d.render().unwrap();
    assert_eq!(k.key, "decode_rows_bf16_hd64_full_w4");
    assert!(!k
        .source
        .contains("hi_ = min(hi_, (long long)i + sk - sq + 1)"));
    d.causal = true;
    assert!(d
        .render()
        .unwrap()
        .source
        .contains("hi_ = min(hi_, (long long)i + sk - sq + 1)"));
}

fn llama() -> AttentionSpec {
    AttentionSpec {
        heads: Some(32),
        gqa: Some(8),
        head_dims: vec![128],
        bias: false,
        rope: Some(Rope::default()),
        window: Some(Window {
            left: 4095,
            right: 0,
        }),
        sinks: Some(Sinks::Learnable),
        masks: vec![MaskType::Causal, MaskType::Padding],
        ..AttentionSpec::new(AttentionKind::SelfAttention)
    }
}

#[test]
fn kernels_for_spec_covers_phases_head_dims_and_masks() {
    let mut spec = llama();
    spec.head_dims = vec![64, 128];
    let ks = kernels_for_spec(&spec).unwrap();
    let keys: Vec<&str> = ks.iter().map(|k| k.key.as_str()).collect();
    for hd in [64, 128] {
        let tile = attention_codegen::render::PrefillTile::for_head_dim(hd).key();
        for want in [
            format!("qkv_prep_bf16_hd{hd}_self_nonorm_ropehalf{hd}_w4"),
            // The decode step's prep: decode_splitkv applies the rope itself.
            format!("qkv_prep_bf16_hd{hd}_self_nonorm_norope_w4"),
            format!("prefill_bf16_hd{hd}_causal_win_sinkl_{tile}_sm80"),
            format!("prefill_bf16_hd{hd}_causal_win_sinkl_bias_{tile}_sm80"),
            format!("prefill_bf16_hd{hd}_padding_win_sinkl_{tile}_sm80"),
            format!("prefill_bf16_hd{hd}_padding_win_sinkl_bias_{tile}_sm80"),
            format!("prefill_rows_bf16_hd{hd}_causal_win_sinkl_w4"),
            format!("prefill_rows_bf16_hd{hd}_causal_win_sinkl_bias_w4"),
            format!("prefill_rows_bf16_hd{hd}_padding_win_sinkl_w4"),
            format!("prefill_rows_bf16_hd{hd}_padding_win_sinkl_bias_w4"),
            format!("decode_rows_bf16_hd{hd}_causal_win_sinkl_w4"),
            format!("decode_rows_bf16_hd{hd}_causal_win_sinkl_paged_w4"),
            format!("decode_splitkv_bf16_hd{hd}_ropehalf{hd}_win_sinkl_w4"),
            // Multi-token decode steps: 32 and 64 query rows per pass.
            format!("decode_splitkv_bf16_hd{hd}_ropehalf{hd}_win_sinkl_rb2_w4"),
            format!("decode_splitkv_bf16_hd{hd}_ropehalf{hd}_win_sinkl_rb4_w8"),
            format!("decode_splitkv_bf16_hd{hd}_norope_win_sinkl_paged_rb2_w4"),
            format!("decode_splitkv_bf16_hd{hd}_norope_win_sinkl_paged_rb4_w8"),
            format!("append_kv_bf16_hd{hd}_w4"),
            // Static-cache prefill and the paged batch on tensor cores.
            format!("prefill_bf16_hd{hd}_causal_bottom_right_win_sinkl_{tile}_sm80"),
            format!("prefill_bf16_hd{hd}_causal_bottom_right_win_sinkl_paged_{tile}_sm80"),
            // The paged batch's decode rows on the split-KV decode kernel.
            format!("decode_splitkv_bf16_hd{hd}_norope_win_sinkl_paged_w4"),
        ] {
            assert!(keys.contains(&want.as_str()), "missing {want} in {keys:?}");
        }
    }
    // Both head dims also list the Hopper family (the union over devices): the four forward
    // variants, the static-cache and the paged prefill, all on the warp-specialized tile.
    for hd in [64, 128] {
        let ws = attention_codegen::render::PrefillTile::for_head_dim_sm90_ws(hd).key();
        let paged = &ws;
        for want in [
            format!("prefill_bf16_hd{hd}_causal_win_sinkl_{ws}_sm90"),
            format!("prefill_bf16_hd{hd}_causal_win_sinkl_bias_{ws}_sm90"),
            format!("prefill_bf16_hd{hd}_padding_win_sinkl_{ws}_sm90"),
            format!("prefill_bf16_hd{hd}_padding_win_sinkl_bias_{ws}_sm90"),
            format!("prefill_bf16_hd{hd}_causal_bottom_right_win_sinkl_{ws}_sm90"),
            format!("prefill_bf16_hd{hd}_causal_bottom_right_win_sinkl_paged_{paged}_sm90"),
        ] {
            assert!(keys.contains(&want.as_str()), "missing {want} in {keys:?}");
        }
    }
    assert_eq!(ks.len(), 54);
    assert_eq!(
        ks.iter().filter(|k| k.phase == Phase::PrefillSm90).count(),
        12
    );
    assert_eq!(
        ks.iter().filter(|k| k.phase == Phase::PrefillRows).count(),
        8
    );
    assert_eq!(
        ks.iter().filter(|k| k.phase == Phase::PrefillSm80).count(),
        12
    );
}

#[test]
fn cross_attention_has_no_paged_kernel_and_a_context_cache_step() {
    let spec = AttentionSpec {
        heads: Some(8),
        head_dims: vec![64],
        masks: vec![MaskType::NoMask],
        ..AttentionSpec::new(AttentionKind::CrossAttention)
    };
    let keys: Vec<String> = kernels_for_spec(&spec)
        .unwrap()
        .into_iter()
        .map(|k| k.key)
        .collect();
    assert_eq!(
        keys,
        [
            "qkv_prep_bf16_hd64_cross_nonorm_norope_w4",
            "prefill_bf16_hd64_no_mask_m128n128w4s2_sm80",
            "prefill_bf16_hd64_no_mask_m128n128w12s3_sm90",
            "prefill_rows_bf16_hd64_no_mask_w4",
            "prefill_bf16_hd64_no_mask_bias_m128n128w4s2_sm80",
            "prefill_bf16_hd64_no_mask_bias_m128n128w12s3_sm90",
            "prefill_rows_bf16_hd64_no_mask_bias_w4",
            // The context-cache step: prefill_*_no_mask_sm80 / _sm90 above, or this where
            // neither can run.
            "decode_rows_bf16_hd64_full_w4",
            // Fills the context cache.
            "append_kv_bf16_hd64_w4"
        ]
    );
}

#[test]
fn empty_head_dims_give_no_kernels_and_runtime_head_dim_renders() {
    let mut spec = llama();
    spec.head_dims.clear();
    assert!(kernels_for_spec(&spec).unwrap().is_empty());
    let ks = kernels_for_spec_with_head_dim(&spec, 96).unwrap();
    assert!(!ks.is_empty());
    assert!(ks
        .iter()
        .all(|k| k.head_dim == 96 && k.key.contains("_hd96_")));
}

#[test]
fn duplicate_masks_are_rendered_once() {
    let mut spec = llama();
    spec.masks = vec![MaskType::Causal, MaskType::Causal];
    let ks = kernels_for_spec(&spec).unwrap();
    let keys: HashSet<&str> = ks.iter().map(|k| k.key.as_str()).collect();
    assert_eq!(keys.len(), ks.len());
}

#[test]
fn error_unsupported_head_dim() {
    let mut spec = llama();
    spec.head_dims = vec![72];
    let e = kernels_for_spec(&spec).unwrap_err();
    assert!(
        matches!(e, RenderError::UnsupportedHeadDim { head_dim: 72, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("head_dim") && e.to_string().contains("72"));
    let mut c = KernelConfig::new(Phase::DecodeRows, DType::Bf16, 100);
    c.causal = true;
    assert!(matches!(
        c.render(),
        Err(RenderError::UnsupportedHeadDim { head_dim: 100, .. })
    ));
}

#[test]
fn error_head_dim_not_in_spec() {
    let e = kernels_for_spec_with_head_dim(&llama(), 64).unwrap_err();
    assert_eq!(
        e,
        RenderError::HeadDimNotInSpec {
            head_dim: 64,
            spec: vec![128]
        }
    );
}

#[test]
fn error_no_masks() {
    let mut spec = llama();
    spec.masks.clear();
    assert_eq!(kernels_for_spec(&spec).unwrap_err(), RenderError::NoMasks);
    assert_eq!(
        KernelConfig::new(Phase::PrefillRows, DType::Bf16, 64)
            .render()
            .unwrap_err(),
        RenderError::MissingMask
    );
}

#[test]
fn error_window_on_arbitrary_mask() {
    let mut spec = llama();
    spec.masks = vec![MaskType::Arbitrary];
    let e = configs_for_head_dim(&spec, 128)
        .and_then(|cs| cs.iter().map(|c| c.render()).collect::<Result<Vec<_>, _>>())
        .unwrap_err();
    assert_eq!(
        e,
        RenderError::WindowOnMask {
            mask: MaskType::Arbitrary
        }
    );
    assert!(e.to_string().contains("arbitrary"));
}

#[test]
fn error_rotary_dim() {
    let mut spec = llama();
    spec.rope = Some(Rope {
        rotary_percent: 0.3,
        ..Rope::default()
    }); // 128 * 0.3 = 38.4 -> 38 ok
    assert!(kernels_for_spec(&spec).is_ok());
    spec.head_dims = vec![96];
    spec.rope = Some(Rope {
        rotary_percent: 0.01,
        ..Rope::default()
    }); // 0
    let e = kernels_for_spec(&spec).unwrap_err();
    assert!(
        matches!(
            e,
            RenderError::RotaryDim {
                head_dim: 96,
                rot_dim: 0,
                ..
            }
        ),
        "{e:?}"
    );
    spec.rope = Some(Rope {
        rotary_percent: 0.05,
        ..Rope::default()
    }); // 4.8 -> 4 ok
    assert!(kernels_for_spec(&spec).is_ok());
    spec.rope = Some(Rope {
        rotary_percent: 0.07,
        ..Rope::default()
    }); // 6.72 -> 6 ok
    assert!(kernels_for_spec(&spec).is_ok());
    spec.rope = Some(Rope {
        rotary_percent: 0.08,
        ..Rope::default()
    }); // 7.68 -> 7 odd
    assert!(matches!(
        kernels_for_spec(&spec),
        Err(RenderError::RotaryDim { rot_dim: 7, .. })
    ));
}

#[test]
fn error_bad_tile() {
    let mut c = KernelConfig::new(Phase::QkvPrep, DType::Bf16, 64);
    c.warps = 0;
    assert_eq!(c.render().unwrap_err(), RenderError::BadTile { warps: 0 });
    c.warps = 33;
    assert_eq!(c.render().unwrap_err(), RenderError::BadTile { warps: 33 });
    c.warps = 8;
    assert_eq!(
        c.render().unwrap().key,
        "qkv_prep_bf16_hd64_self_nonorm_norope_w8"
    );
}

#[test]
fn error_cross_attention_with_rope_or_gate() {
    let mut c = KernelConfig::new(Phase::QkvPrep, DType::Bf16, 64);
    c.layout = PrepLayout::CrossAttention;
    c.rope = Some((RopeMode::Half, 64));
    assert!(matches!(
        c.render(),
        Err(RenderError::Unsupported {
            argument: "rope",
            ..
        })
    ));
    c.rope = None;
    c.output_gate = true;
    assert!(matches!(
        c.render(),
        Err(RenderError::Unsupported {
            argument: "output_gate",
            ..
        })
    ));
    let spec = AttentionSpec {
        heads: Some(8),
        head_dims: vec![64],
        output_gate: true,
        ..AttentionSpec::new(AttentionKind::CrossAttention)
    };
    assert!(matches!(
        kernels_for_spec(&spec),
        Err(RenderError::Unsupported { .. })
    ));
}

#[test]
fn decode_row_blocks_cover_the_step_within_shared_memory() {
    use attention_codegen::render::{
        decode_splitkv_row_blocks as rb, decode_splitkv_warps, KernelConfig,
    };
    let h200 = 232_448; // 227 KiB opt-in per block
    assert_eq!(rb(128, 4, h200), Some(1)); // one token of 4 heads per group
    assert_eq!(rb(128, 16, h200), Some(1));
    assert_eq!(rb(128, 17, h200), Some(2));
    assert_eq!(rb(128, 33, h200), Some(4));
    assert_eq!(rb(128, 64, h200), Some(4));
    assert_eq!(rb(128, 128, h200), Some(4)); // two passes of 64 rows
    assert_eq!(rb(64, 20, h200), Some(2));
    assert_eq!(rb(256, 64, h200), Some(1)); // head dim 256: one row block, four passes
    let a100 = 166_912; // 163 KiB
    assert_eq!(rb(256, 4, a100), None); // its 198 KiB ring does not fit
    assert_eq!(rb(128, 64, a100), Some(4));
    assert_eq!(rb(128, 64, 48 * 1024), None);
    // The variants render; a row-block count outside 1/2/4 or a block size other than
    // decode_splitkv_warps is refused.
    for r in [1, 2, 4] {
        let mut c = KernelConfig::new(Phase::DecodeSplitKv, DType::Bf16, 128);
        c.row_blocks = r;
        c.warps = decode_splitkv_warps(r);
        let k = c.render().unwrap();
        assert!(
            k.source.contains(&format!("ROW_BLOCKS = {r};")),
            "{}",
            k.key
        );
    }
    // The registry's choice for a step renders, with the variant's block size.
    for (rows, want) in [(4, "_w4"), (20, "_rb2_w4"), (64, "_rb4_w8")] {
        let c = attention_codegen::registry::decode_splitkv_rows(&llama(), 128, rows, h200)
            .unwrap()
            .unwrap();
        let k = c.render().unwrap();
        assert!(k.key.ends_with(want), "{rows} rows: {}", k.key);
    }
    let mut c = KernelConfig::new(Phase::DecodeSplitKv, DType::Bf16, 128);
    c.row_blocks = 3;
    assert!(c.render().is_err());
    c.row_blocks = 4; // with 4 warps
    assert!(c.render().is_err());
    let mut c = KernelConfig::new(Phase::PrefillRows, DType::Bf16, 128);
    c.mask = Some(MaskType::Causal);
    c.row_blocks = 2;
    assert!(c.render().is_err());
}

/// The Hopper tile with a producer warpgroup: `warps` = consumer warps + 4, 128 bytes of
/// mbarriers in its shared memory; a fifth warpgroup or rows that are not whole warpgroups
/// are refused.
#[test]
fn warp_specialized_sm90_tile() {
    use attention_codegen::render::PrefillTile;
    let ws = PrefillTile::for_head_dim_sm90_ws(128);
    assert_eq!(
        (ws.block_m, ws.block_n, ws.warps, ws.stages),
        (128, 128, 12, 3)
    );
    assert!(ws.producer_sm90());
    let plain = PrefillTile { warps: 8, ..ws };
    assert!(!plain.producer_sm90());
    assert_eq!(ws.smem_bytes_sm90(128), plain.smem_bytes_sm90(128) + 128);
    assert!(ws.smem_bytes_sm90(128) <= 227 * 1024);
    // Head dim 256: three stages do not fit, two do.
    assert_eq!(PrefillTile::for_head_dim_sm90_ws(256).stages, 2);
    let mut c = KernelConfig::new(Phase::PrefillSm90, DType::Bf16, 128);
    c.mask = Some(MaskType::Causal);
    c.tile = Some(ws);
    let k = c.render().unwrap();
    assert!(k.key.ends_with("_m128n128w12s3_sm90"), "{}", k.key);
    assert!(k.source.contains("constexpr int WARPS = 12;"), "{}", k.key);
    for bad in [
        PrefillTile { warps: 16, ..ws },
        PrefillTile {
            block_m: 96,
            warps: 10,
            ..ws
        },
    ] {
        c.tile = Some(bad);
        assert!(
            matches!(c.render(), Err(RenderError::BadPrefillTile { .. })),
            "{bad:?}"
        );
    }
}
