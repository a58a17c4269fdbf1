//! Cross-attention over a cached context (encoder-decoder decoding): `set_context` projects
//! the context once into a `CrossKvCache`, `cross_step` runs `linear_q`, attention over the
//! cached context and `linear_proj`. Checked against the full cross forward (the oracle) on
//! padded contexts of different lengths, over a prefill then several decode steps, in
//! several slots and layers; and for each class of bad input (typed error, cache unchanged).

use attention_codegen::MaskType;
use attention_runtime::kv_cache::CrossKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, RuntimeDims, Tensor};

fn layer(spec: &str, seed: u64) -> SpecLayer {
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    SpecLayer::init(config, seed).unwrap()
}

fn randn(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform())
}

/// Max |a - b| / max(1, max |b|).
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}");
    let scale = want.data().iter().fold(1f32, |m, x| m.max(x.abs()));
    let err = got
        .data()
        .iter()
        .zip(want.data())
        .map(|(a, b)| {
            assert!(a.is_finite(), "{what}: non-finite output");
            (a - b).abs()
        })
        .fold(0f32, f32::max);
    assert!(err <= 1e-5 * scale, "{what}: max abs err {err}");
}

/// Padding mask `[b, 1, s, sk]` (1 = masked) hiding keys at or past each slot's length.
fn padding_mask(b: usize, s: usize, sk: usize, lens: &[usize]) -> Tensor {
    Tensor::from_fn(&[b, 1, s, sk], |i| {
        let (bi, j) = (i / (s * sk), i % sk);
        f32::from(j >= lens[bi])
    })
}

/// The full cross forward of `x` `[s, b, h]` over `ctx` `[sk, b, h]` with each slot's keys
/// past `lens` masked: the oracle.
fn full_forward(l: &SpecLayer, x: &Tensor, ctx: &Tensor, lens: &[usize]) -> Tensor {
    let (s, b, sk) = (x.shape()[0], x.shape()[1], ctx.shape()[0]);
    let mask = padding_mask(b, s, sk, lens);
    l.forward(
        x,
        &ForwardArgs {
            key_value_states: Some(ctx),
            attention_mask: Some(&mask),
            mask_type: Some(MaskType::Padding),
            ..Default::default()
        },
    )
    .unwrap()
    .output
}

/// Rows `t0 .. t0 + n` of `[s, b, h]`.
fn rows(x: &Tensor, t0: usize, n: usize) -> Tensor {
    let (b, h) = (x.shape()[1], x.shape()[2]);
    Tensor::new(&[n, b, h], x.data()[t0 * b * h..(t0 + n) * b * h].to_vec()).unwrap()
}

fn snapshot(c: &CrossKvCache) -> Vec<Vec<f32>> {
    (0..c.num_layers())
        .flat_map(|l| {
            [
                c.layer_k(l).unwrap().to_vec(),
                c.layer_v(l).unwrap().to_vec(),
                c.context_lens(l)
                    .unwrap()
                    .iter()
                    .map(|&x| x as f32)
                    .collect(),
            ]
        })
        .collect()
}

/// Two cross layers (a decoder stack) over contexts of different lengths in slots
/// `off .. off + b`: a prefill of `p` tokens then single-token decode steps, each equal to
/// the matching rows of the full forward over every decoder token at once.
fn cached_steps_match_forward(spec: &str, b: usize, off: usize, lens: &[usize], p: usize) {
    let mut rng = SplitMix64::new(7);
    let layers = [layer(spec, 1), layer(spec, 2)];
    let c = layers[0].config().clone();
    let sk = *lens.iter().max().unwrap();
    let total = p + 3;
    let mut cache = CrossKvCache::new(2, sk + 3, off + b + 1, c.heads, c.head_dim).unwrap();
    let mut ctx = randn(&mut rng, &[sk, b, c.hidden]);
    // Junk in the padding positions: never attended to.
    for si in 0..sk {
        for (bi, &len) in lens.iter().enumerate() {
            if si >= len {
                let row = (si * b + bi) * c.hidden;
                ctx.data_mut()[row..row + c.hidden].fill(f32::NAN);
            }
        }
    }
    let x = randn(&mut rng, &[total, b, c.hidden]);
    for (li, l) in layers.iter().enumerate() {
        l.parts()
            .set_context(&ctx, &mut cache, li, off, Some(lens))
            .unwrap();
    }
    for (li, l) in layers.iter().enumerate() {
        assert_eq!(&cache.context_lens(li).unwrap()[off..off + b], lens);
        let mut clean = ctx.clone();
        clean.data_mut().iter_mut().for_each(|v| {
            if v.is_nan() {
                *v = 0.0;
            }
        });
        let want = full_forward(l, &x, &clean, lens);
        // Prefill of p tokens, then decode steps of one.
        let mut t = 0;
        for n in std::iter::once(p).chain(std::iter::repeat_n(1, total - p)) {
            let out = l
                .parts()
                .cross_step(&rows(&x, t, n), &cache, li, off)
                .unwrap();
            assert_eq!(out.bias.is_some(), c.proj_bias);
            assert_close(
                &out.output,
                &rows(&want, t, n),
                &format!("{spec}: layer {li}, tokens {t}..{}", t + n),
            );
            t += n;
        }
    }
}

#[test]
fn cached_steps_equal_the_full_forward_on_padded_contexts() {
    cached_steps_match_forward(
        "cross, heads=4, head_dim=64, mask=padding",
        3,
        1,
        &[7, 2, 5],
        4,
    );
}

#[test]
fn cached_steps_with_sinks_biases_and_one_slot() {
    cached_steps_match_forward(
        "cross, heads=2, head_dim=64, hidden=48, sinks=learnable, mask=no_mask",
        1,
        0,
        &[9],
        2,
    );
    cached_steps_match_forward(
        "cross, heads=3, head_dim=64, bias=false, sinks=off_by_one, mask=[padding, no_mask]",
        2,
        2,
        &[1, 6],
        1,
    );
}

/// With a window, each slot's queries are aligned bottom-right to its own context: the
/// forward over that slot's unpadded context.
#[test]
fn cached_steps_with_a_window_align_to_each_slot_context() {
    let spec = "cross, heads=2, head_dim=64, window=(3, 0), mask=no_mask";
    let mut rng = SplitMix64::new(11);
    let l = layer(spec, 3);
    let c = l.config().clone();
    let lens = [8, 4];
    let (b, s) = (2, 3);
    let mut cache = CrossKvCache::new(1, 8, 2, c.heads, c.head_dim).unwrap();
    let ctx = randn(&mut rng, &[8, b, c.hidden]);
    let x = randn(&mut rng, &[s, b, c.hidden]);
    l.parts()
        .set_context(&ctx, &mut cache, 0, 0, Some(&lens))
        .unwrap();
    let got = l.parts().cross_step(&x, &cache, 0, 0).unwrap().output;
    let column = |t: &Tensor, bi: usize, n: usize| {
        let h = c.hidden;
        let mut d = Vec::new();
        for si in 0..n {
            d.extend_from_slice(&t.data()[(si * b + bi) * h..][..h]);
        }
        Tensor::new(&[n, 1, h], d).unwrap()
    };
    for (bi, &len) in lens.iter().enumerate() {
        let want = l
            .forward(
                &column(&x, bi, s),
                &ForwardArgs {
                    key_value_states: Some(&column(&ctx, bi, len)),
                    ..Default::default()
                },
            )
            .unwrap()
            .output;
        assert_close(&column(&got, bi, s), &want, &format!("slot {bi}"));
    }
}

/// A slot's context replaced by a shorter one: the stale positions past it are not read.
#[test]
fn a_shorter_context_replaces_a_longer_one() {
    let spec = "cross, heads=2, head_dim=64, mask=padding";
    let mut rng = SplitMix64::new(5);
    let l = layer(spec, 4);
    let c = l.config().clone();
    let mut cache = CrossKvCache::new(1, 10, 2, c.heads, c.head_dim).unwrap();
    let long = randn(&mut rng, &[10, 2, c.hidden]);
    l.parts()
        .set_context(&long, &mut cache, 0, 0, None)
        .unwrap();
    assert_eq!(cache.context_lens(0).unwrap(), &[10, 10]);
    // Slot 1 only gets a new, 3-position context.
    let short = randn(&mut rng, &[3, 1, c.hidden]);
    l.parts()
        .set_context(&short, &mut cache, 0, 1, None)
        .unwrap();
    assert_eq!(cache.context_lens(0).unwrap(), &[10, 3]);
    let x = randn(&mut rng, &[2, 1, c.hidden]);
    let got = l.parts().cross_step(&x, &cache, 0, 1).unwrap().output;
    assert_close(&got, &full_forward(&l, &x, &short, &[3]), "slot 1");
}

#[test]
fn empty_steps_give_empty_outputs() {
    let l = layer("cross, heads=2, head_dim=64, mask=padding", 1);
    let c = l.config().clone();
    let mut cache = CrossKvCache::new(1, 4, 2, c.heads, c.head_dim).unwrap();
    let ctx = Tensor::from_fn(&[4, 2, c.hidden], |i| (i as f32).sin());
    l.parts().set_context(&ctx, &mut cache, 0, 0, None).unwrap();
    let out = l
        .parts()
        .cross_step(&Tensor::zeros(&[0, 2, c.hidden]), &cache, 0, 0)
        .unwrap();
    assert_eq!(out.output.shape(), &[0, 2, c.hidden]);
    let out = l
        .parts()
        .cross_step(&Tensor::zeros(&[1, 0, c.hidden]), &cache, 0, 2)
        .unwrap();
    assert_eq!(out.output.shape(), &[1, 0, c.hidden]);
}

fn arg_of(e: &AttnError) -> String {
    match e {
        AttnError::InvalidArgument { arg, .. }
        | AttnError::Shape { arg, .. }
        | AttnError::CacheCapacity { arg, .. } => arg.clone(),
        other => panic!("unexpected error kind: {other:?}"),
    }
}

#[test]
fn bad_input_is_a_typed_error_and_leaves_the_cache_unchanged() {
    let spec = "cross, heads=2, head_dim=64, mask=padding";
    let l = layer(spec, 9);
    let c = l.config().clone();
    let h = c.hidden;
    let mut rng = SplitMix64::new(3);
    let mut cache = CrossKvCache::new(2, 6, 3, c.heads, c.head_dim).unwrap();
    let ctx = randn(&mut rng, &[5, 2, h]);
    l.parts()
        .set_context(&ctx, &mut cache, 0, 0, Some(&[5, 3]))
        .unwrap();
    let before = snapshot(&cache);
    let x = randn(&mut rng, &[1, 2, h]);

    // set_context: each error names its argument; nothing is written.
    let p = l.parts();
    let cases: Vec<(&str, AttnError)> = vec![
        (
            "key_value_states",
            p.set_context(&randn(&mut rng, &[5, 2, h + 1]), &mut cache, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "key_value_states",
            p.set_context(&randn(&mut rng, &[10, h]), &mut cache, 0, 0, None)
                .unwrap_err(),
        ),
        (
            "context_lens",
            p.set_context(&ctx, &mut cache, 0, 0, Some(&[5]))
                .unwrap_err(),
        ),
        (
            "context_lens[1]",
            p.set_context(&ctx, &mut cache, 0, 0, Some(&[5, 0]))
                .unwrap_err(),
        ),
        (
            "context_lens[0]",
            p.set_context(&ctx, &mut cache, 0, 0, Some(&[6, 1]))
                .unwrap_err(),
        ),
        (
            "layer",
            p.set_context(&ctx, &mut cache, 2, 0, None).unwrap_err(),
        ),
        (
            "key_value_states",
            p.set_context(&Tensor::zeros(&[0, 2, h]), &mut cache, 0, 0, None)
                .unwrap_err(),
        ),
    ];
    for (want, e) in &cases {
        assert_eq!(&arg_of(e), want, "{e}");
    }
    // Slots past max_batch, and a context longer than the cache holds.
    let e = p.set_context(&ctx, &mut cache, 0, 2, None).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::CacheCapacity {
                capacity: 3,
                needed: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = p
        .set_context(&randn(&mut rng, &[7, 2, h]), &mut cache, 0, 0, None)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::CacheCapacity { ref arg, capacity: 6, needed: 7 } if arg.starts_with("max_ctx")),
        "{e}"
    );
    // A cache for other heads or head dim.
    let mut other = CrossKvCache::new(1, 6, 3, c.heads + 1, c.head_dim).unwrap();
    let e = p.set_context(&ctx, &mut other, 0, 0, None).unwrap_err();
    assert_eq!(arg_of(&e), "cache", "{e}");
    let e = p.cross_step(&x, &other, 0, 0).unwrap_err();
    assert_eq!(arg_of(&e), "cache", "{e}");
    assert_eq!(snapshot(&cache), before);

    // cross_step.
    for (want, e) in [
        (
            "hidden",
            p.cross_step(&randn(&mut rng, &[1, 2, h - 1]), &cache, 0, 0)
                .unwrap_err(),
        ),
        (
            "hidden",
            p.cross_step(&randn(&mut rng, &[2, h]), &cache, 0, 0)
                .unwrap_err(),
        ),
        ("layer", p.cross_step(&x, &cache, 5, 0).unwrap_err()),
        // Slot 2 and every slot of layer 1 hold no context.
        ("cache", p.cross_step(&x, &cache, 0, 1).unwrap_err()),
        ("cache", p.cross_step(&x, &cache, 1, 0).unwrap_err()),
    ] {
        assert_eq!(arg_of(&e), want, "{e}");
    }
    let e = p.cross_step(&x, &cache, 0, 2).unwrap_err();
    assert!(
        matches!(
            e,
            AttnError::CacheCapacity {
                capacity: 3,
                needed: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = p.cross_step(&x, &cache, 1, 0).unwrap_err();
    assert!(e.to_string().contains("batch slot 0"), "{e}");

    // A finished request: its slots are empty again in every layer.
    cache.reset_slots(1, 1).unwrap();
    assert_eq!(cache.context_lens(0).unwrap(), &[5, 0, 0]);
    let e = p.cross_step(&x, &cache, 0, 0).unwrap_err();
    assert!(e.to_string().contains("batch slot 1"), "{e}");
    let x1 = Tensor::new(&[1, 1, h], x.data()[..h].to_vec()).unwrap();
    assert!(p.cross_step(&x1, &cache, 0, 0).is_ok());
    assert!(cache.reset_slots(2, 2).is_err());
    cache.reset();
    assert_eq!(cache.context_lens(0).unwrap(), &[0, 0, 0]);
}

#[test]
fn a_self_attention_layer_refuses_a_context_cache() {
    let l = layer("self, heads=2, head_dim=64, mask=causal", 1);
    let h = l.config().hidden;
    let mut cache = CrossKvCache::new(1, 4, 1, 2, 64).unwrap();
    let ctx = Tensor::zeros(&[4, 1, h]);
    let e = l
        .parts()
        .set_context(&ctx, &mut cache, 0, 0, None)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::InvalidArgument { ref arg, ref got, .. } if arg == "layer" && got == "self-attention"),
        "{e}"
    );
    let e = l
        .parts()
        .cross_step(&Tensor::zeros(&[1, 1, h]), &cache, 0, 0)
        .unwrap_err();
    assert_eq!(arg_of(&e), "layer");
    assert_eq!(cache.context_lens(0).unwrap(), &[0]);
}

#[test]
fn cache_construction_and_store_errors() {
    for (dims, name) in [
        ([0, 4, 1, 2, 8], "num_layers"),
        ([1, 0, 1, 2, 8], "max_ctx"),
        ([1, 4, 0, 2, 8], "max_batch"),
        ([1, 4, 1, 0, 8], "heads"),
        ([1, 4, 1, 2, 0], "head_dim"),
    ] {
        let e = CrossKvCache::new(dims[0], dims[1], dims[2], dims[3], dims[4]).unwrap_err();
        assert_eq!(arg_of(&e), name);
    }
    let e = CrossKvCache::new(1, usize::MAX / 2, 4, 2, 8).unwrap_err();
    assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
    let mut c = CrossKvCache::new(2, 4, 2, 2, 8).unwrap();
    let k = Tensor::from_fn(&[3, 2, 2, 8], |i| i as f32);
    let v = Tensor::from_fn(&[3, 2, 2, 8], |i| -(i as f32));
    let e = c
        .store(0, 0, &k, &Tensor::zeros(&[3, 1, 2, 8]), None)
        .unwrap_err();
    assert_eq!(arg_of(&e), "v");
    let e = c
        .store(0, 0, &Tensor::zeros(&[3, 2, 2, 4]), &v, None)
        .unwrap_err();
    assert_eq!(arg_of(&e), "k");
    c.store(1, 0, &k, &v, Some(&[3, 1])).unwrap();
    assert_eq!(c.context_lens(1).unwrap(), &[3, 1]);
    assert_eq!(c.context_len(0, 1).unwrap(), 0);
    assert_eq!(arg_of(&c.context_len(0, 2).unwrap_err()), "slot");
    // Slot 1 keeps position 0 of column 1 only.
    let (kk, vv) = c.gather_kv(1, 1).unwrap();
    assert_eq!(kk, k.data()[16..32].to_vec());
    assert_eq!(vv, v.data()[16..32].to_vec());
    let (kk, _) = c.gather_kv(1, 0).unwrap();
    let want: Vec<f32> = (0..3)
        .flat_map(|p| k.data()[p * 32..p * 32 + 16].to_vec())
        .collect();
    assert_eq!(kk, want);
    assert!(c.gather_kv(0, 0).unwrap().0.is_empty());
}
