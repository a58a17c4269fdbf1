//! The layer: qkv split, gate, norms and rope wired together, packed vs padded, cross
//! attention, KV-cache steps, weights round trip, and one test per error class.

use std::sync::Mutex;

use attention_codegen::{
    AttentionKind, AttentionSpec, MaskType, QkNorm, Role, Rope, RopeMode, Sinks, Window,
};
use attention_runtime::kv_cache::{BlockTable, PagedBatch, PagedKvCache, StaticKvCache};
use attention_runtime::modules::SplitMix64;
use attention_runtime::*;
use proptest::prelude::*;

struct SelfLayer {
    cfg: LayerConfig,
    qkv: Linear,
    qn: Option<QkNormLayer>,
    kn: Option<QkNormLayer>,
    core: Box<dyn CoreAttentionModule>,
    proj: Linear,
}

impl SelfLayer {
    fn init(spec: &AttentionSpec, dims: &RuntimeDims, seed: u64) -> Result<Self> {
        let cfg = LayerConfig::new(spec, dims)?;
        Ok(SelfLayer {
            qkv: Linear::init(&cfg, Role::LinearQkv, seed)?,
            qn: cfg
                .qk_norm
                .map(|_| QkNormLayer::init(&cfg, Role::QLayernorm, seed))
                .transpose()?,
            kn: cfg
                .qk_norm
                .map(|_| QkNormLayer::init(&cfg, Role::KLayernorm, seed))
                .transpose()?,
            core: Box::new(DotProductAttention::init(&cfg, Role::CoreAttention, seed)?),
            proj: Linear::init(&cfg, Role::LinearProj, seed)?,
            cfg,
        })
    }
    fn load(
        spec: &AttentionSpec,
        dims: &RuntimeDims,
        w: &WeightStore,
        prefix: &str,
    ) -> Result<Self> {
        let cfg = LayerConfig::new(spec, dims)?;
        Ok(SelfLayer {
            qkv: Linear::load(&cfg, Role::LinearQkv, w, prefix)?,
            qn: cfg
                .qk_norm
                .map(|_| QkNormLayer::load(&cfg, Role::QLayernorm, w, prefix))
                .transpose()?,
            kn: cfg
                .qk_norm
                .map(|_| QkNormLayer::load(&cfg, Role::KLayernorm, w, prefix))
                .transpose()?,
            core: Box::new(DotProductAttention::load(
                &cfg,
                Role::CoreAttention,
                w,
                prefix,
            )?),
            proj: Linear::load(&cfg, Role::LinearProj, w, prefix)?,
            cfg,
        })
    }
}

impl AttentionLayer for SelfLayer {
    fn config(&self) -> &LayerConfig {
        &self.cfg
    }
    fn parts(&self) -> LayerParts<'_> {
        LayerParts::SelfAttention(SelfAttentionParts {
            config: &self.cfg,
            linear_qkv: &self.qkv,
            q_layernorm: self.qn.as_ref().map(|n| n as &dyn NormModule),
            k_layernorm: self.kn.as_ref().map(|n| n as &dyn NormModule),
            core_attention: self.core.as_ref(),
            linear_proj: &self.proj,
        })
    }
}

struct CrossLayer {
    cfg: LayerConfig,
    q: Linear,
    kv: Linear,
    core: Box<dyn CoreAttentionModule>,
    proj: Linear,
}

impl AttentionLayer for CrossLayer {
    fn config(&self) -> &LayerConfig {
        &self.cfg
    }
    fn parts(&self) -> LayerParts<'_> {
        LayerParts::CrossAttention(CrossAttentionParts {
            config: &self.cfg,
            linear_q: &self.q,
            linear_kv: &self.kv,
            core_attention: self.core.as_ref(),
            linear_proj: &self.proj,
        })
    }
}

/// A core attention that records q, k, v and returns q.
#[derive(Default)]
struct Recorder(Mutex<Vec<Tensor>>);

impl CoreAttentionModule for Recorder {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, _: &CoreArgs<'_>) -> Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .extend([q.clone(), k.clone(), v.clone()]);
        Ok(q.clone())
    }
}

fn spec(heads: usize, gqa: usize, hd: usize) -> AttentionSpec {
    let mut s = AttentionSpec::new(AttentionKind::SelfAttention);
    s.heads = Some(heads);
    s.gqa = Some(gqa);
    s.head_dims = vec![hd];
    s
}

fn rand_t(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform())
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "index {i}: {x} vs {y}"
        );
    }
}

fn eye(out: usize, inp: usize) -> Tensor {
    Tensor::from_fn(&[out, inp], |i| if i / inp == i % inp { 1.0 } else { 0.0 })
}

#[test]
fn qkv_split_index_mapping_and_gate() {
    // np 4, ng 2, hn 2, gate: per group [q 4 | gate 4 | k 2 | v 2] = 12 columns, 24 total.
    let mut sp = spec(4, 2, 2);
    sp.output_gate = true;
    sp.bias = false;
    sp.hidden = Some(24);
    let cfg = LayerConfig::new(&sp, &RuntimeDims::default()).unwrap();
    assert_eq!(cfg.qkv_out_features(), 24);
    let rec = Recorder::default();
    let layer = SelfLayer {
        qkv: Linear::new(eye(24, 24), None).unwrap(),
        qn: None,
        kn: None,
        core: Box::new(Recorder::default()),
        proj: Linear::new(eye(24, 8), None).unwrap(),
        cfg,
    };
    let parts = SelfAttentionParts {
        core_attention: &rec,
        ..match layer.parts() {
            LayerParts::SelfAttention(p) => p,
            _ => unreachable!(),
        }
    };
    let x = Tensor::from_fn(&[1, 1, 24], |i| i as f32);
    let out = parts
        .forward(
            &x,
            &ForwardArgs {
                mask_type: Some(MaskType::NoMask),
                ..Default::default()
            },
        )
        .unwrap();
    let rec = rec.0.lock().unwrap();
    let (q, k, v) = (&rec[0], &rec[1], &rec[2]);
    assert_eq!(q.shape(), &[1, 1, 4, 2]);
    assert_eq!(k.shape(), &[1, 1, 2, 2]);
    assert_eq!(q.data(), &[0., 1., 2., 3., 12., 13., 14., 15.]);
    assert_eq!(k.data(), &[8., 9., 20., 21.]);
    assert_eq!(v.data(), &[10., 11., 22., 23.]);
    // Output (proj = identity into the first 8 of 24) = q * sigmoid(gate); gates 4..8, 16..20.
    let gates = [4., 5., 6., 7., 16., 17., 18., 19.];
    let want: Vec<f32> = q
        .data()
        .iter()
        .zip(gates)
        .map(|(q, g)| q / (1.0 + (-g as f32).exp()))
        .collect();
    close(&out.output.data()[..8], &want, 1e-6);
    assert!(out.output.data()[8..].iter().all(|x| *x == 0.0));
    assert_eq!(out.output.shape(), &[1, 1, 24]);
}

#[test]
fn qkv_split_without_gate_gqa() {
    // np 4, ng 2, hn 1: per group [q q | k | v].
    let mut sp = spec(4, 2, 1);
    sp.hidden = Some(8);
    let cfg = LayerConfig::new(&sp, &RuntimeDims::default()).unwrap();
    let rec = Recorder::default();
    let qkv = Linear::new(eye(8, 8), Some(Tensor::zeros(&[8]))).unwrap();
    let proj = Linear::new(eye(8, 4), None).unwrap();
    let parts = SelfAttentionParts {
        config: &cfg,
        linear_qkv: &qkv,
        q_layernorm: None,
        k_layernorm: None,
        core_attention: &rec,
        linear_proj: &proj,
    };
    let x = Tensor::from_fn(&[1, 1, 8], |i| i as f32);
    parts.forward(&x, &ForwardArgs::default()).unwrap();
    let r = rec.0.lock().unwrap();
    assert_eq!(r[0].data(), &[0., 1., 4., 5.]);
    assert_eq!(r[1].data(), &[2., 6.]);
    assert_eq!(r[2].data(), &[3., 7.]);
}

/// An independent naive self-attention layer (rms q/k norm or none, half rope over the
/// config's rotary dim, causal, GQA) in f64.
fn naive_self(l: &SelfLayer, x: &Tensor) -> Vec<f32> {
    let c = &l.cfg;
    let (s, b, h) = (x.shape()[0], x.shape()[1], c.hidden);
    let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
    let per = np / ng;
    let w = l.qkv.weight.data();
    let bias = l
        .qkv
        .bias
        .as_ref()
        .map(|t| t.data().to_vec())
        .unwrap_or(vec![0.0; w.len() / h]);
    let norm_w = |n: &Option<QkNormLayer>| {
        n.as_ref()
            .map(|n| n.weight.as_ref().unwrap().data().to_vec())
    };
    let (qw, kw) = (norm_w(&l.qn), norm_w(&l.kn));
    let (rot, base) = (c.rotary_dim(), c.rope.map_or(0.0, |r| r.rotary_base));
    let col = |g: usize, off: usize| g * (per + 2) * hn + off;
    // get(t, bi, column) of the qkv output
    let y = |t: usize, bi: usize, o: usize| -> f64 {
        (0..h)
            .map(|i| x.data()[(t * b + bi) * h + i] as f64 * w[o * h + i] as f64)
            .sum::<f64>()
            + bias[o] as f64
    };
    // RMS norm (when the layer has one), then half rope on the first `rot` channels (pairs
    // j, j + rot / 2); channels past `rot` pass through.
    let norm_rope = |v: Vec<f64>, wt: &Option<Vec<f32>>, pos: usize| -> Vec<f64> {
        let n: Vec<f64> = match wt {
            Some(wt) => {
                let ms = v.iter().map(|a| a * a).sum::<f64>() / hn as f64;
                v.iter()
                    .zip(wt)
                    .map(|(a, w)| a / (ms + c.eps as f64).sqrt() * *w as f64)
                    .collect()
            }
            None => v,
        };
        let half = rot / 2;
        let mut out = n.clone();
        for j in 0..half {
            let a = pos as f64 / base.powf(2.0 * j as f64 / rot as f64);
            out[j] = n[j] * a.cos() - n[j + half] * a.sin();
            out[j + half] = n[j + half] * a.cos() + n[j] * a.sin();
        }
        out
    };
    let mut attn = vec![0f32; s * b * np * hn];
    for bi in 0..b {
        for hh in 0..np {
            let g = hh / per;
            let qv = |t: usize| {
                norm_rope(
                    (0..hn)
                        .map(|d| y(t, bi, col(g, (hh % per) * hn + d)))
                        .collect(),
                    &qw,
                    t,
                )
            };
            let kv = |t: usize| {
                norm_rope(
                    (0..hn).map(|d| y(t, bi, col(g, per * hn + d))).collect(),
                    &kw,
                    t,
                )
            };
            let vv = |t: usize| {
                (0..hn)
                    .map(|d| y(t, bi, col(g, per * hn + hn + d)))
                    .collect::<Vec<f64>>()
            };
            for i in 0..s {
                let qi = qv(i);
                let logits: Vec<f64> = (0..=i)
                    .map(|j| {
                        qi.iter().zip(kv(j)).map(|(a, b)| a * b).sum::<f64>() / (hn as f64).sqrt()
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = logits.iter().map(|l| (l - m).exp()).sum();
                for (j, l) in logits.iter().enumerate() {
                    let p = (l - m).exp() / z;
                    for (d, vd) in vv(j).iter().enumerate() {
                        attn[((i * b + bi) * np + hh) * hn + d] += (p * vd) as f32;
                    }
                }
            }
        }
    }
    let pw = l.proj.weight.data();
    let k = np * hn;
    (0..s * b * h)
        .map(|idx| {
            let (r, o) = (idx / h, idx % h);
            (0..k)
                .map(|i| attn[r * k + i] as f64 * pw[o * k + i] as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

#[test]
fn layer_matches_independent_naive_forward_and_bias_not_added() {
    let mut sp = spec(4, 2, 8);
    sp.qk_norm = Some(QkNorm::Rms);
    sp.rope = Some(Rope::default());
    let l = SelfLayer::init(
        &sp,
        &RuntimeDims {
            hidden: Some(24),
            ..Default::default()
        },
        7,
    )
    .unwrap();
    let mut rng = SplitMix64::new(11);
    let x = rand_t(&mut rng, &[5, 2, 24]);
    let out = l.forward(&x, &ForwardArgs::default()).unwrap();
    assert_eq!(out.output.shape(), &[5, 2, 24]);
    close(out.output.data(), &naive_self(&l, &x), 1e-4);
    // The proj bias is returned, not added.
    let bias = out.bias.clone().expect("bias = true by default");
    assert_eq!(&bias, l.proj.bias.as_ref().unwrap());
    assert!(bias.data().iter().any(|b| b.abs() > 1e-3));
}

/// Head dim 80 (Phi-2; not a multiple of 32): a Phi-2-shaped layer (MHA, biases, no q/k
/// norm, partial rope 0.4 = 32 rotated channels, base 10000) and a full rope over all 80
/// channels (pairs j, j + 40) with an RMS q/k norm and GQA, against the naive f64 layer.
#[test]
fn head_dim_80_partial_and_full_rope_match_naive_forward() {
    let mut phi2 = spec(4, 4, 80);
    phi2.rope = Some(Rope {
        mode: RopeMode::Half,
        rotary_percent: 0.4,
        rotary_base: 10000.0,
    });
    let mut full = spec(4, 2, 80);
    full.qk_norm = Some(QkNorm::Rms);
    full.rope = Some(Rope::default());
    for (sp, rot) in [(phi2, 32), (full, 80)] {
        let l = SelfLayer::init(
            &sp,
            &RuntimeDims {
                hidden: Some(48),
                ..Default::default()
            },
            8,
        )
        .unwrap();
        assert_eq!((l.cfg.head_dim, l.cfg.rotary_dim()), (80, rot));
        let mut rng = SplitMix64::new(12);
        let x = rand_t(&mut rng, &[7, 2, 48]);
        let out = l.forward(&x, &ForwardArgs::default()).unwrap();
        assert_eq!(out.output.shape(), &[7, 2, 48]);
        close(out.output.data(), &naive_self(&l, &x), 1e-4);
    }
}

fn packed_vs_padded(sp: &AttentionSpec, lens: &[usize], seed: u64, tol: f32) {
    let l = SelfLayer::init(
        sp,
        &RuntimeDims {
            hidden: Some(16),
            ..Default::default()
        },
        seed,
    )
    .unwrap();
    let h = 16;
    let mut rng = SplitMix64::new(seed ^ 99);
    let seqs: Vec<Tensor> = lens.iter().map(|&n| rand_t(&mut rng, &[n, 1, h])).collect();
    let mut packed = Vec::new();
    let mut cu = vec![0i32];
    for s in &seqs {
        packed.extend_from_slice(s.data());
        cu.push(cu.last().unwrap() + s.shape()[0] as i32);
    }
    let t = *cu.last().unwrap() as usize;
    let pk = PackedSeqParams {
        cu_seqlens_q: &cu,
        cu_seqlens_kv: &cu,
        max_seqlen_q: 0,
        max_seqlen_kv: 0,
    };
    let args = ForwardArgs {
        packed: Some(pk),
        ..Default::default()
    };
    let out = l
        .forward(&Tensor::new(&[t, h], packed).unwrap(), &args)
        .unwrap();
    assert_eq!(out.output.shape(), &[t, h]);
    for (i, s) in seqs.iter().enumerate() {
        let one = l.forward(s, &ForwardArgs::default()).unwrap();
        close(
            &out.output.data()[cu[i] as usize * h..cu[i + 1] as usize * h],
            one.output.data(),
            tol,
        );
    }
}

#[test]
fn packed_equals_padded_sequence_by_sequence() {
    let mut sp = spec(4, 2, 4);
    sp.qk_norm = Some(QkNorm::Layer);
    sp.rope = Some(Rope {
        mode: RopeMode::Interleaved,
        rotary_percent: 0.5,
        rotary_base: 500.0,
    });
    sp.sinks = Some(Sinks::Learnable);
    sp.output_gate = true;
    packed_vs_padded(&sp, &[3, 1, 5, 0, 2], 1, 1e-5);
}

#[test]
fn padded_batch_with_padding_mask_equals_separate_sequences() {
    // Right-padded batch of lengths [2, 4] with a [b, 1, 1, sk] padding mask and
    // padding_causal: the real rows equal each sequence alone.
    let mut sp = spec(2, 1, 4);
    sp.rope = Some(Rope::default());
    sp.masks = vec![MaskType::PaddingCausal];
    let l = SelfLayer::init(
        &sp,
        &RuntimeDims {
            hidden: Some(8),
            ..Default::default()
        },
        3,
    )
    .unwrap();
    let mut rng = SplitMix64::new(5);
    let x = rand_t(&mut rng, &[4, 2, 8]);
    let lens = [2usize, 4];
    let mask = Tensor::from_fn(
        &[2, 1, 1, 4],
        |i| if i % 4 >= lens[i / 4] { 1.0 } else { 0.0 },
    );
    let out = l
        .forward(
            &x,
            &ForwardArgs {
                attention_mask: Some(&mask),
                ..Default::default()
            },
        )
        .unwrap();
    for (bi, &n) in lens.iter().enumerate() {
        let xs = Tensor::from_fn(&[n, 1, 8], |i| x.data()[((i / 8) * 2 + bi) * 8 + i % 8]);
        let one = l.forward(&xs, &ForwardArgs::default()).unwrap();
        for si in 0..n {
            close(
                &out.output.data()[(si * 2 + bi) * 8..][..8],
                &one.output.data()[si * 8..][..8],
                1e-5,
            );
        }
    }
}

#[test]
fn bias_broadcast_and_mask_override() {
    let mut sp = spec(2, 2, 4);
    sp.masks = vec![MaskType::NoMask];
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 9).unwrap();
    let mut rng = SplitMix64::new(8);
    let x = rand_t(&mut rng, &[3, 2, 8]);
    let small = rand_t(&mut rng, &[3, 3]);
    let full = Tensor::from_fn(&[2, 2, 3, 3], |i| small.data()[i % 9]);
    let a = l
        .forward(
            &x,
            &ForwardArgs {
                attention_bias: Some(&small),
                ..Default::default()
            },
        )
        .unwrap();
    let b = l
        .forward(
            &x,
            &ForwardArgs {
                attention_bias: Some(&full),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(a, b);
    let none = l.forward(&x, &ForwardArgs::default()).unwrap();
    assert_ne!(a, none);
    // Overriding the mask to causal changes the output; causal == causal_bottom_right here.
    let c = l
        .forward(
            &x,
            &ForwardArgs {
                mask_type: Some(MaskType::Causal),
                ..Default::default()
            },
        )
        .unwrap();
    let d = l
        .forward(
            &x,
            &ForwardArgs {
                mask_type: Some(MaskType::CausalBottomRight),
                ..Default::default()
            },
        )
        .unwrap();
    assert_ne!(c, none);
    assert_eq!(c, d);
}

#[test]
fn cross_attention_shapes_and_kv_split() {
    let mut sp = AttentionSpec::new(AttentionKind::CrossAttention);
    sp.heads = Some(2);
    sp.head_dims = vec![2];
    sp.hidden = Some(8);
    sp.masks = vec![MaskType::NoMask];
    let cfg = LayerConfig::new(&sp, &RuntimeDims::default()).unwrap();
    let rec = Recorder::default();
    let q = Linear::new(eye(4, 8), None).unwrap();
    let kv = Linear::new(eye(8, 8), None).unwrap();
    let proj = Linear::new(eye(8, 4), Some(Tensor::from_fn(&[8], |i| i as f32))).unwrap();
    let parts = CrossAttentionParts {
        config: &cfg,
        linear_q: &q,
        linear_kv: &kv,
        core_attention: &rec,
        linear_proj: &proj,
    };
    let x = Tensor::from_fn(&[3, 2, 8], |i| i as f32);
    let ctx = Tensor::from_fn(&[5, 2, 8], |i| 100.0 + i as f32);
    let out = parts
        .forward(
            &x,
            &ForwardArgs {
                key_value_states: Some(&ctx),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(out.output.shape(), &[3, 2, 8]);
    assert_eq!(out.bias.unwrap().shape(), &[8]);
    let r = rec.0.lock().unwrap();
    assert_eq!(r[0].shape(), &[3, 2, 2, 2]);
    assert_eq!(r[1].shape(), &[5, 2, 2, 2]);
    // Per head [k_h | v_h]: head 1 of the first context row = columns 4..6 (k), 6..8 (v).
    assert_eq!(&r[1].data()[2..4], &[104.0, 105.0]);
    assert_eq!(&r[2].data()[2..4], &[106.0, 107.0]);
    drop(r);
    // With the real core attention: output rows are finite and shaped; missing context fails.
    let layer = CrossLayer {
        q: Linear::init(&cfg, Role::LinearQ, 1).unwrap(),
        kv: Linear::init(&cfg, Role::LinearKv, 1).unwrap(),
        core: Box::new(DotProductAttention::init(&cfg, Role::CoreAttention, 1).unwrap()),
        proj: Linear::init(&cfg, Role::LinearProj, 1).unwrap(),
        cfg,
    };
    let o = layer
        .forward(
            &x,
            &ForwardArgs {
                key_value_states: Some(&ctx),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(o.output.shape(), &[3, 2, 8]);
    let e = layer.forward(&x, &ForwardArgs::default()).unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidArgument { ref arg, .. } if arg == "key_value_states"),
        "{e}"
    );
    // Packed cross attention uses cu_seqlens_kv for the context.
    let xp = Tensor::from_fn(&[4, 8], |i| (i as f32).sin());
    let cp = Tensor::from_fn(&[6, 8], |i| (i as f32).cos());
    let (cq, ck) = ([0, 1, 4], [0, 5, 6]);
    let pk = PackedSeqParams {
        cu_seqlens_q: &cq,
        cu_seqlens_kv: &ck,
        max_seqlen_q: 0,
        max_seqlen_kv: 0,
    };
    let o = layer
        .forward(
            &xp,
            &ForwardArgs {
                key_value_states: Some(&cp),
                packed: Some(pk),
                ..Default::default()
            },
        )
        .unwrap();
    let second = layer
        .forward(
            &Tensor::new(&[3, 1, 8], xp.data()[8..].to_vec()).unwrap(),
            &ForwardArgs {
                key_value_states: Some(&Tensor::new(&[1, 1, 8], cp.data()[40..].to_vec()).unwrap()),
                ..Default::default()
            },
        )
        .unwrap();
    close(&o.output.data()[8..], second.output.data(), 1e-5);
}

#[test]
fn weights_round_trip_through_safetensors() {
    let mut sp = spec(4, 2, 4);
    sp.qk_norm = Some(QkNorm::Layer);
    sp.rope = Some(Rope::default());
    sp.sinks = Some(Sinks::Learnable);
    let dims = RuntimeDims {
        hidden: Some(16),
        ..Default::default()
    };
    let l = SelfLayer::init(&sp, &dims, 42).unwrap();
    let prefix = "decoder.layers.3.self_attention.";
    let sd = l.state_dict(prefix);
    let names: Vec<&str> = sd.iter().map(|(k, _)| k.as_str()).collect();
    for n in [
        "linear_qkv.weight",
        "linear_qkv.bias",
        "q_layernorm.weight",
        "q_layernorm.bias",
        "k_layernorm.weight",
        "core_attention.softmax_offset",
        "linear_proj.weight",
        "linear_proj.bias",
    ] {
        assert!(
            names.contains(&format!("{prefix}{n}").as_str()),
            "missing {n} in {names:?}"
        );
    }
    let path = std::env::temp_dir().join(format!(
        "attn_rt_roundtrip_{}.safetensors",
        std::process::id()
    ));
    WeightStore::save(&path, &sd).unwrap();
    let store = WeightStore::from_file(&path).unwrap();
    std::fs::remove_file(&path).ok();
    let l2 = SelfLayer::load(&sp, &dims, &store, prefix).unwrap();
    let mut rng = SplitMix64::new(1);
    let x = rand_t(&mut rng, &[4, 2, 16]);
    assert_eq!(
        l.forward(&x, &ForwardArgs::default()).unwrap(),
        l2.forward(&x, &ForwardArgs::default()).unwrap()
    );
    // A different seed gives a different layer.
    let l3 = SelfLayer::init(&sp, &dims, 43).unwrap();
    assert_ne!(
        l.forward(&x, &ForwardArgs::default()).unwrap(),
        l3.forward(&x, &ForwardArgs::default()).unwrap()
    );
}

#[test]
fn weights_read_bf16_and_f16() {
    let vals = [1.0f32, -2.5, 0.375];
    let b16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let f16: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
        .collect();
    let views = vec![
        (
            "a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![3], &b16).unwrap(),
        ),
        (
            "b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![1, 3], &f16)
                .unwrap(),
        ),
    ];
    let bytes = safetensors::serialize(views, &None).unwrap();
    let s = WeightStore::from_bytes(&bytes).unwrap();
    assert_eq!(s.get("a", &[3]).unwrap().data(), &vals);
    assert_eq!(s.get("b", &[1, 3]).unwrap().data(), &vals);
}

#[test]
fn static_cache_prefill_then_decode_equals_full_forward() {
    // Head dim 80 (Phi-2) as well: the cache rows are not a multiple of 32 channels.
    for hd in [4, 80] {
        static_cache_prefill_then_decode(hd);
    }
}

fn static_cache_prefill_then_decode(hd: usize) {
    let mut sp = spec(4, 2, hd);
    sp.qk_norm = Some(QkNorm::Rms);
    sp.rope = Some(Rope::default());
    sp.window = Some(Window { left: 2, right: 0 });
    sp.sinks = Some(Sinks::OffByOne);
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 5).unwrap();
    let (s, b, h) = (6, 2, 4 * hd);
    let mut rng = SplitMix64::new(2);
    let x = rand_t(&mut rng, &[s, b, h]);
    let full = l.forward(&x, &ForwardArgs::default()).unwrap();
    let mut cache = StaticKvCache::new(1, 8, 3, 2, hd).unwrap();
    // Prefill 4 tokens into slots 1..3, then decode 2 steps.
    let pre = Tensor::new(&[4, b, h], x.data()[..4 * b * h].to_vec()).unwrap();
    let o = l
        .prefill(&pre, &mut cache, 0, 1, &ForwardArgs::default())
        .unwrap();
    cache.advance(1, b, 4).unwrap();
    close(o.output.data(), &full.output.data()[..4 * b * h], 1e-5);
    for t in 4..s {
        let step = Tensor::new(&[1, b, h], x.data()[t * b * h..(t + 1) * b * h].to_vec()).unwrap();
        let o = l
            .decode(&step, &mut cache, 0, 1, &ForwardArgs::default())
            .unwrap();
        cache.advance(1, b, 1).unwrap();
        close(
            o.output.data(),
            &full.output.data()[t * b * h..(t + 1) * b * h],
            1e-5,
        );
    }
    assert_eq!(cache.seqlens(), &[0, 6, 6]);
    // decode refuses more than one token.
    assert!(matches!(
        l.decode(&pre, &mut cache, 0, 1, &ForwardArgs::default()),
        Err(AttnError::Shape { .. })
    ));
}

#[test]
fn paged_forward_equals_full_forward() {
    // Head dim 80 (Phi-2, partial rope 0.4) as well.
    for (hd, rotary_percent) in [(4, 1.0), (80, 0.4)] {
        paged_forward(hd, rotary_percent);
    }
}

fn paged_forward(hd: usize, rotary_percent: f64) {
    let mut sp = spec(2, 1, hd);
    sp.rope = Some(Rope {
        rotary_percent,
        ..Rope::default()
    });
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 6).unwrap();
    let h = 2 * hd;
    let mut rng = SplitMix64::new(3);
    let a = rand_t(&mut rng, &[20, 1, h]);
    let bseq = rand_t(&mut rng, &[3, 1, h]);
    let fa = l.forward(&a, &ForwardArgs::default()).unwrap();
    let fb = l.forward(&bseq, &ForwardArgs::default()).unwrap();
    let mut cache = PagedKvCache::new(1, 8, 16, 1, hd).unwrap();
    let mut table = BlockTable::new(2, 4).unwrap();
    let ids = cache.allocator_mut().alloc(3).unwrap();
    table.set_row(0, &ids[..2]).unwrap(); // a: 20 tokens
    table.set_row(1, &ids[2..]).unwrap(); // b: 3 tokens
                                          // Step 1: prefill a[0..19] and b[0..2].
    let mut x1 = a.data()[..19 * h].to_vec();
    x1.extend_from_slice(&bseq.data()[..2 * h]);
    let (cu, sk) = ([0, 19, 21], [19, 2]);
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &sk,
        block_table: &table,
    };
    let o = l
        .forward_paged(&Tensor::new(&[21, h], x1).unwrap(), &mut cache, 0, &batch)
        .unwrap();
    close(
        &o.output.data()[..19 * h],
        &fa.output.data()[..19 * h],
        1e-5,
    );
    close(&o.output.data()[19 * h..], &fb.output.data()[..2 * h], 1e-5);
    // Step 2: decode one token each.
    let mut x2 = a.data()[19 * h..].to_vec();
    x2.extend_from_slice(&bseq.data()[2 * h..]);
    let (cu, sk) = ([0, 1, 2], [20, 3]);
    let batch = PagedBatch {
        cu_seqlens_q: &cu,
        seqlens_k: &sk,
        block_table: &table,
    };
    let o = l
        .forward_paged(&Tensor::new(&[2, h], x2).unwrap(), &mut cache, 0, &batch)
        .unwrap();
    close(&o.output.data()[..h], &fa.output.data()[19 * h..], 1e-5);
    close(&o.output.data()[h..], &fb.output.data()[2 * h..], 1e-5);
}

// ---- one test per error class ----

#[test]
fn error_shape_names_the_argument() {
    let l = SelfLayer::init(&spec(2, 2, 4), &RuntimeDims::default(), 1).unwrap();
    let e = l
        .forward(&Tensor::zeros(&[3, 1, 9]), &ForwardArgs::default())
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, ref got, .. } if arg == "hidden" && got == &vec![3, 1, 9]),
        "{e}"
    );
    let pos = [0i64, 1];
    let e = l
        .forward(
            &Tensor::zeros(&[3, 1, 8]),
            &ForwardArgs {
                positions: Some(&pos),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "positions"),
        "{e}"
    );
    let bad_bias = Tensor::zeros(&[3, 2, 2]);
    let e = l
        .forward(
            &Tensor::zeros(&[3, 1, 8]),
            &ForwardArgs {
                attention_bias: Some(&bad_bias),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "attention_bias"),
        "{e}"
    );
    let mask = Tensor::zeros(&[1, 1, 1, 3]);
    let e = l
        .forward(
            &Tensor::zeros(&[3, 1, 8]),
            &ForwardArgs {
                attention_mask: Some(&mask),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidArgument { ref arg, .. } if arg == "attention_mask"),
        "{e}"
    );
}

#[test]
fn error_cu_seqlens_names_the_argument() {
    let l = SelfLayer::init(&spec(2, 2, 4), &RuntimeDims::default(), 1).unwrap();
    let x = Tensor::zeros(&[5, 8]);
    for (cu, rule) in [
        (&[1, 5][..], "first"),
        (&[0, 3, 2, 5][..], "non-decreasing"),
        (&[0, 4][..], "last"),
        (&[0][..], "length"),
    ] {
        let pk = PackedSeqParams {
            cu_seqlens_q: cu,
            cu_seqlens_kv: &[],
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        };
        let e = l
            .forward(
                &x,
                &ForwardArgs {
                    packed: Some(pk),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(
            matches!(e, AttnError::CuSeqlens { ref arg, ref expected, .. } if arg == "cu_seqlens_q" && expected.contains(rule)),
            "{e}"
        );
    }
    let pk = PackedSeqParams {
        cu_seqlens_q: &[0, 2, 5],
        cu_seqlens_kv: &[0, 3, 5],
        max_seqlen_q: 0,
        max_seqlen_kv: 0,
    };
    let e = l
        .forward(
            &x,
            &ForwardArgs {
                packed: Some(pk),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, AttnError::CuSeqlens { ref arg, .. } if arg == "cu_seqlens_kv"),
        "{e}"
    );
}

#[test]
fn error_missing_weight_names_the_key() {
    let mut sp = spec(2, 2, 4);
    sp.qk_norm = Some(QkNorm::Rms);
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 1).unwrap();
    let sd: Vec<_> = l
        .state_dict("p.")
        .into_iter()
        .filter(|(k, _)| k != "p.k_layernorm.weight")
        .collect();
    let store = WeightStore::from_tensors(sd);
    let e = SelfLayer::load(&sp, &RuntimeDims::default(), &store, "p.")
        .err()
        .unwrap();
    assert!(
        matches!(e, AttnError::MissingWeight { ref key, .. } if key == "p.k_layernorm.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("p.k_layernorm.weight"));
}

#[test]
fn error_weight_shape_names_the_key() {
    let sp = spec(2, 2, 4);
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 1).unwrap();
    let mut sd = l.state_dict("");
    for (k, t) in sd.iter_mut() {
        if k == "linear_proj.weight" {
            *t = Tensor::zeros(&[8, 7]);
        }
    }
    let e = SelfLayer::load(
        &sp,
        &RuntimeDims::default(),
        &WeightStore::from_tensors(sd),
        "",
    )
    .err()
    .unwrap();
    assert!(
        matches!(e, AttnError::WeightShape { ref key, ref expected, ref got } if key == "linear_proj.weight" && expected == &vec![8, 8] && got == &vec![8, 7]),
        "{e}"
    );
}

#[test]
fn error_config_mismatch() {
    let e = LayerConfig::new(
        &spec(4, 2, 64),
        &RuntimeDims {
            heads: Some(8),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, AttnError::ConfigMismatch { ref field, ref spec, ref config } if field == "heads" && spec == "4" && config == "8"),
        "{e}"
    );
    let e = LayerConfig::new(
        &AttentionSpec::new(AttentionKind::SelfAttention),
        &RuntimeDims::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, AttnError::ConfigMismatch { ref field, ref spec, ref config } if field == "heads" && spec == "unset" && config == "unset"),
        "{e}"
    );
    let e = LayerConfig::new(&spec(4, 3, 64), &RuntimeDims::default()).unwrap_err();
    assert!(
        matches!(e, AttnError::ConfigMismatch { ref field, .. } if field == "groups"),
        "{e}"
    );
    // Defaults resolved from the runtime side.
    let mut s = AttentionSpec::new(AttentionKind::SelfAttention);
    s.heads = Some(8);
    let c = LayerConfig::new(
        &s,
        &RuntimeDims {
            hidden: Some(512),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((c.groups, c.head_dim, c.hidden), (8, 64, 512));
    assert!((c.softmax_scale - 0.125).abs() < 1e-7);
    assert_eq!(c.qkv_out_features(), 3 * 512);
}

#[test]
fn hidden_512_forward_is_fast_enough() {
    let sp = spec(8, 2, 64);
    let l = SelfLayer::init(&sp, &RuntimeDims::default(), 1).unwrap();
    let mut rng = SplitMix64::new(1);
    let x = rand_t(&mut rng, &[16, 2, 512]);
    let t = std::time::Instant::now();
    let o = l.forward(&x, &ForwardArgs::default()).unwrap();
    assert!(o.output.data().iter().all(|v| v.is_finite()));
    assert!(t.elapsed().as_secs_f32() < 2.0, "took {:?}", t.elapsed());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Packed equals padded over random shapes, masks and features.
    #[test]
    fn packed_equals_padded_random(ng in 1usize..3, per in 1usize..3, hd in 1usize..4,
                                   lens in proptest::collection::vec(0usize..5, 1..4),
                                   seed in any::<u64>(), gate in any::<bool>(), rope in any::<bool>()) {
        let hn = hd * 2;
        let mut sp = spec(ng * per, ng, hn);
        sp.output_gate = gate;
        sp.rope = rope.then(Rope::default);
        sp.qk_norm = Some(QkNorm::L2);
        packed_vs_padded(&sp, &lens, seed, 1e-4);
    }
}

#[test]
fn error_weight_dtype_and_malformed_file() {
    let ints: Vec<u8> = [1i32, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![(
        "w",
        safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![2], &ints).unwrap(),
    )];
    let s = WeightStore::from_bytes(&safetensors::serialize(views, &None).unwrap()).unwrap();
    let e = s.get("w", &[2]).unwrap_err();
    assert!(
        matches!(e, AttnError::DType { ref arg, .. } if arg == "w"),
        "{e}"
    );
    let e = WeightStore::from_bytes(b"not a safetensors file").unwrap_err();
    assert!(matches!(e, AttnError::Safetensors { .. }), "{e}");
    let e = WeightStore::from_file("/nonexistent/dir/w.safetensors").unwrap_err();
    assert!(
        matches!(e, AttnError::Io { ref path, .. } if path.contains("w.safetensors")),
        "{e}"
    );
}
