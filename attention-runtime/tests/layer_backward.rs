//! The whole-layer backward on the CPU reference (`TrainLayer for CpuLayer`): directional
//! finite differences of every gradient (input, every parameter, key_value_states, the
//! attention bias) over many feature combinations, packed vs padded, forward_train ==
//! forward, delayed wgrad (bitwise), selective recompute (bitwise, fewer bytes), QK-Clip, and
//! one test per error class.

use std::collections::BTreeMap;

use attention_runtime::backend::{BackendLayer, CpuLayer, TrainLayer};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::train::{BackwardOptions, QkClip, Recompute, TrainOptions};
use attention_runtime::*;

/// A layer of `spec` with seeded weights. Small head dims (`head_dim=N` below the kernels'
/// 32) are set on the parsed spec, past the grammar's check: the CPU reference takes any.
fn layer(spec: &str, seed: u64) -> SpecLayer {
    let mut hd = None;
    let items: Vec<&str> = spec
        .split(',')
        .filter(|it| match it.trim().strip_prefix("head_dim=") {
            Some(v) => {
                hd = Some(v.trim().parse::<usize>().unwrap());
                false
            }
            None => true,
        })
        .collect();
    // The grammar needs a head dim it supports when hidden / heads is not one: give it 32.
    let mut sp =
        attention_codegen::parse_spec(&format!("{}, head_dim=32", items.join(","))).unwrap();
    if let Some(hd) = hd {
        sp.head_dims = vec![hd];
    }
    let cfg = LayerConfig::new(&sp, &RuntimeDims::default()).unwrap();
    SpecLayer::init(cfg, seed).unwrap()
}

fn with_params(l: &SpecLayer, params: &[(String, Tensor)]) -> SpecLayer {
    SpecLayer::load(
        l.config().clone(),
        &WeightStore::from_tensors(params.to_vec()),
        "",
    )
    .unwrap()
}

fn rand_t(rng: &mut SplitMix64, shape: &[usize], amp: f32) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform() * amp)
}

/// Everything a forward call needs, owned.
#[derive(Clone, Default)]
struct Call {
    mask: Option<Tensor>,
    bias: Option<Tensor>,
    kv: Option<Tensor>,
    cu: Option<Vec<i32>>,
    positions: Option<Vec<i64>>,
    mscale: Option<f32>,
}

impl Call {
    fn args(&self) -> ForwardArgs<'_> {
        ForwardArgs {
            attention_mask: self.mask.as_ref(),
            attention_bias: self.bias.as_ref(),
            key_value_states: self.kv.as_ref(),
            positions: self.positions.as_deref(),
            packed: self.cu.as_ref().map(|cu| PackedSeqParams {
                cu_seqlens_q: cu,
                cu_seqlens_kv: cu,
                max_seqlen_q: 0,
                max_seqlen_kv: 0,
            }),
            rope_mscale: self.mscale.unwrap_or(1.0),
            ..ForwardArgs::default()
        }
    }
}

fn loss(l: &SpecLayer, x: &Tensor, call: &Call, g: &Tensor) -> f64 {
    let y = l.forward(x, &call.args()).unwrap().output;
    y.data()
        .iter()
        .zip(g.data())
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Central difference of `f` along `u` with step `eps`, Richardson-extrapolated (steps `eps`
/// and `eps / 2`) so the truncation error is O(eps^4).
fn directional(f: &dyn Fn(f32) -> f64, eps: f32) -> f64 {
    let d = |e: f32| (f(e) - f(-e)) / (2.0 * e as f64);
    let (d1, d2) = (d(eps), d(eps / 2.0));
    (4.0 * d2 - d1) / 3.0
}

fn perturbed(t: &Tensor, u: &Tensor, e: f32) -> Tensor {
    Tensor::new(
        t.shape(),
        t.data()
            .iter()
            .zip(u.data())
            .map(|(a, b)| a + e * b)
            .collect(),
    )
    .unwrap()
}

/// `fd` vs `an` (the analytic `<grad, u>`): `|fd - an| <= tol * scale + noise`, `scale` the
/// larger of the two and of the typical size of a directional derivative along a random `u`,
/// `|grad| |u| / sqrt(len)` (so a draw of `u` nearly orthogonal to the gradient does not
/// turn rounding noise into a large relative error), and `noise` the f32 rounding noise of
/// the finite difference (a gradient that is exactly zero, like a k-norm bias's without
/// rope, compares rounding noise with rounding noise).
#[allow(clippy::too_many_arguments)]
fn assert_close(what: &str, fd: f64, an: f64, grad: &[f32], u: &[f32], noise: f64, tol: f64) {
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let typical = norm(grad) * norm(u) / (grad.len() as f64).sqrt();
    let scale = an.abs().max(fd.abs()).max(typical);
    let err = (fd - an).abs();
    if std::env::var_os("FD_VERBOSE").is_some() {
        eprintln!("{what}: rel {:.2e}", err / scale.max(1e-30));
    }
    assert!(
        err <= tol * scale + noise,
        "{what}: fd {fd} vs analytic {an} (|diff| {err:.2e}, scale {scale:.2e}, noise {noise:.2e})"
    );
}

/// Checks every gradient of `spec` on `x` / `call` against directional finite differences.
fn check_fd(spec: &str, x: &Tensor, call: &Call, seed: u64, want_bias_grad: bool) {
    let l = layer(spec, seed);
    let cpu = CpuLayer::new(l.clone());
    let mut rng = SplitMix64::new(seed ^ 0x55);
    let g = rand_t(&mut rng, x.shape(), 1.0);
    let (y, mut saved) = cpu
        .forward_train(x, &call.args(), &TrainOptions::default())
        .unwrap();
    assert_eq!(y, l.forward(x, &call.args()).unwrap().output);
    let grads = cpu
        .backward(
            &mut saved,
            &g,
            &BackwardOptions {
                want_bias_grad,
                ..Default::default()
            },
        )
        .unwrap();
    // Small enough for the curvature of a LayerNorm over 4 channels, large enough for f32.
    let eps = 5e-3;
    let tol = 2e-3;
    // f32 rounding of the loss's terms over the step (Richardson's weights included):
    // `8 sum |g y| 2^-24 / eps`.
    let floor = 8.0
        * y.data()
            .iter()
            .zip(g.data())
            .map(|(a, b)| (*a as f64 * *b as f64).abs())
            .sum::<f64>()
        * 2f64.powi(-24)
        / eps as f64;
    // Input.
    let u = rand_t(&mut rng, x.shape(), 1.0);
    let fd = directional(&|e| loss(&l, &perturbed(x, &u, e), call, &g), eps);
    assert_close(
        &format!("{spec}: grad_input"),
        fd,
        dot(grads.grad_input.data(), u.data()),
        grads.grad_input.data(),
        u.data(),
        floor,
        tol,
    );
    assert!(grads.grad_input.data().iter().all(|v| v.is_finite()));
    // key_value_states.
    if let Some(kv) = &call.kv {
        let u = rand_t(&mut rng, kv.shape(), 1.0);
        let fd = directional(
            &|e| {
                let mut c = call.clone();
                c.kv = Some(perturbed(kv, &u, e));
                loss(&l, x, &c, &g)
            },
            eps,
        );
        let gk = grads.grad_key_value_states.as_ref().expect("kv grad");
        assert_close(
            &format!("{spec}: grad_key_value_states"),
            fd,
            dot(gk.data(), u.data()),
            gk.data(),
            u.data(),
            floor,
            tol,
        );
    } else {
        assert!(grads.grad_key_value_states.is_none());
    }
    // attention_bias.
    if let (true, Some(b)) = (want_bias_grad, &call.bias) {
        let u = rand_t(&mut rng, b.shape(), 1.0);
        let fd = directional(
            &|e| {
                let mut c = call.clone();
                c.bias = Some(perturbed(b, &u, e));
                loss(&l, x, &c, &g)
            },
            eps,
        );
        let gb = grads.grad_attention_bias.as_ref().expect("bias grad");
        assert_eq!(gb.shape(), b.shape());
        assert_close(
            &format!("{spec}: grad_attention_bias"),
            fd,
            dot(gb.data(), u.data()),
            gb.data(),
            u.data(),
            floor,
            tol,
        );
    } else {
        assert!(grads.grad_attention_bias.is_none());
    }
    // Every parameter, by its Megatron name.
    let sd = l.state_dict("");
    let mut expected: Vec<&str> = sd
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| *k != "linear_proj.bias")
        .collect();
    expected.sort();
    assert_eq!(
        grads.params.keys().map(String::as_str).collect::<Vec<_>>(),
        expected,
        "{spec}"
    );
    for (i, (name, t)) in sd.iter().enumerate() {
        if name == "linear_proj.bias" {
            continue;
        }
        let u = rand_t(&mut rng, t.shape(), 1.0);
        let fd = directional(
            &|e| {
                let mut p = sd.clone();
                p[i].1 = perturbed(t, &u, e);
                loss(&with_params(&l, &p), x, call, &g)
            },
            eps,
        );
        let gp = &grads.params[name];
        assert_eq!(gp.shape(), t.shape(), "{name}");
        assert!(gp.data().iter().all(|v| v.is_finite()), "{name}");
        assert_close(
            &format!("{spec}: {name}"),
            fd,
            dot(gp.data(), u.data()),
            gp.data(),
            u.data(),
            floor,
            tol,
        );
    }
}

fn padded(s: usize, b: usize, h: usize, seed: u64) -> Tensor {
    rand_t(&mut SplitMix64::new(seed), &[s, b, h], 1.0)
}

#[test]
fn self_attention_feature_combinations() {
    let specs = [
        "self, heads=4, gqa=2, head_dim=8, hidden=16, qk_layernorm=rms, rope, mask=causal",
        "self, heads=2, head_dim=8, hidden=12, qk_layernorm=layer, rope=interleaved, rotary_percent=0.5, qkv_bias, mask=no_mask",
        "self, heads=4, gqa=1, head_dim=4, hidden=8, qk_layernorm=l2, rope, sinks=learnable, window=(2, 0), mask=causal_bottom_right",
        "self, heads=4, gqa=2, head_dim=8, hidden=8, rope=half, rotary_percent=0.5, sinks=off_by_one, output_gate, mask=causal",
        "self, heads=2, gqa=2, head_dim=8, hidden=8, bias=false, window=(1, 1), mask=no_mask, softmax_scale=0.5",
        "self, heads=6, gqa=3, head_dim=4, hidden=10, qk_layernorm=layer, output_gate, sinks=learnable, mask=causal",
    ];
    for (i, spec) in specs.iter().enumerate() {
        let x = padded(5, 2, layer(spec, 1).config().hidden, 10 + i as u64);
        check_fd(spec, &x, &Call::default(), 20 + i as u64, false);
    }
}

#[test]
fn explicit_positions_and_mscale() {
    let spec = "self, heads=2, head_dim=8, hidden=8, rope=interleaved, mask=causal";
    let x = padded(4, 2, 8, 3);
    let call = Call {
        positions: Some(vec![3, 5, 6, 9]),
        mscale: Some(1.3),
        ..Call::default()
    };
    check_fd(spec, &x, &call, 4, false);
}

#[test]
fn mask_tensors_and_bias_with_its_gradient() {
    let mut rng = SplitMix64::new(77);
    // padding: [b, 1, 1, sk], key 3 of entry 1 masked.
    let mut m = Tensor::zeros(&[2, 1, 1, 5]);
    m.data_mut()[5 + 3] = 1.0;
    let spec = "self, heads=2, gqa=1, head_dim=4, hidden=8, qk_layernorm=rms, rope, mask=padding";
    let call = Call {
        mask: Some(m.clone()),
        ..Call::default()
    };
    check_fd(spec, &padded(5, 2, 8, 1), &call, 5, false);
    // padding_causal with a bias [1, np, sq, sk] and its gradient.
    let spec = "self, heads=2, head_dim=4, hidden=8, rope, sinks=off_by_one, mask=padding_causal";
    let call = Call {
        mask: Some(m),
        bias: Some(rand_t(&mut rng, &[1, 2, 5, 5], 1.0)),
        ..Call::default()
    };
    check_fd(spec, &padded(5, 2, 8, 2), &call, 6, true);
    // arbitrary: a per-head mask [b, np, sq, sk] and a bias [b, 1, sq, sk] (-inf somewhere).
    let mut am = Tensor::from_fn(&[2, 2, 4, 4], |_| (rng.uniform() > 0.5) as i32 as f32);
    am.data_mut()[0] = 0.0;
    let mut bias = rand_t(&mut rng, &[2, 1, 4, 4], 1.0);
    bias.data_mut()[5] = f32::NEG_INFINITY;
    let spec =
        "self, heads=2, head_dim=4, hidden=8, qk_layernorm=layer, sinks=learnable, mask=arbitrary";
    let call = Call {
        mask: Some(am),
        bias: Some(bias),
        ..Call::default()
    };
    check_fd(spec, &padded(4, 2, 8, 3), &call, 7, true);
}

fn packed_call(cu: &[i32]) -> Call {
    Call {
        cu: Some(cu.to_vec()),
        ..Call::default()
    }
}

#[test]
fn packed_sequences() {
    let spec = "self, heads=4, gqa=2, head_dim=4, hidden=8, qk_layernorm=rms, rope, output_gate, mask=causal";
    let x = rand_t(&mut SplitMix64::new(8), &[7, 8], 1.0);
    check_fd(spec, &x, &packed_call(&[0, 3, 3, 7]), 9, false);
    // padding_causal packed, with a mask over [n, 1, max_q, max_k] and a bias.
    let mut m = Tensor::zeros(&[2, 1, 4, 4]);
    m.data_mut()[3 * 4 + 1] = 1.0;
    let spec = "self, heads=2, head_dim=4, hidden=8, rope, sinks=learnable, mask=padding_causal";
    let mut call = packed_call(&[0, 3, 7]);
    call.mask = Some(m);
    call.bias = Some(rand_t(&mut SplitMix64::new(3), &[2, 2, 4, 4], 1.0));
    check_fd(spec, &x, &call, 10, true);
}

#[test]
fn packed_equals_padded() {
    let spec =
        "self, heads=4, gqa=2, head_dim=4, hidden=8, qk_layernorm=layer, rope, sinks=learnable, mask=causal";
    let (s, b, h) = (5, 2, 8);
    let x = padded(s, b, h, 11);
    let g = padded(s, b, h, 12);
    // Packed rows: sequence bi's token i at bi * s + i.
    let perm = |t: &Tensor| {
        let mut v = Vec::new();
        for bi in 0..b {
            for i in 0..s {
                v.extend_from_slice(&t.data()[(i * b + bi) * h..][..h]);
            }
        }
        Tensor::new(&[s * b, h], v).unwrap()
    };
    let cpu = CpuLayer::new(layer(spec, 13));
    let run = |x: &Tensor, g: &Tensor, call: &Call| {
        let (y, mut saved) = cpu
            .forward_train(x, &call.args(), &TrainOptions::default())
            .unwrap();
        let gr = cpu
            .backward(&mut saved, g, &BackwardOptions::default())
            .unwrap();
        (y, gr)
    };
    let (y_pad, g_pad) = run(&x, &g, &Call::default());
    let (y_pk, g_pk) = run(&perm(&x), &perm(&g), &packed_call(&[0, 5, 10]));
    let close = |a: &[f32], b: &[f32], what: &str| {
        for (p, q) in a.iter().zip(b) {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "{what}: {p} vs {q}"
            );
        }
    };
    close(perm(&y_pad).data(), y_pk.data(), "output");
    close(
        perm(&g_pad.grad_input).data(),
        g_pk.grad_input.data(),
        "grad_input",
    );
    for (name, t) in &g_pad.params {
        close(t.data(), g_pk.params[name].data(), name);
    }
}

#[test]
fn cross_attention() {
    let mut rng = SplitMix64::new(14);
    let spec = "cross, heads=2, head_dim=4, hidden=8, mask=no_mask";
    let call = Call {
        kv: Some(rand_t(&mut rng, &[6, 2, 8], 1.0)),
        ..Call::default()
    };
    check_fd(spec, &padded(4, 2, 8, 15), &call, 16, false);
    let spec = "cross, heads=2, head_dim=4, hidden=8, qkv_bias, sinks=learnable, mask=padding";
    let mut m = Tensor::zeros(&[2, 1, 1, 6]);
    m.data_mut()[6 + 5] = 1.0;
    let call = Call {
        kv: Some(rand_t(&mut rng, &[6, 2, 8], 1.0)),
        mask: Some(m),
        bias: Some(rand_t(&mut rng, &[2, 2, 4, 6], 1.0)),
        ..Call::default()
    };
    check_fd(spec, &padded(4, 2, 8, 17), &call, 18, true);
    // Packed cross: 2 query sequences over 2 context sequences.
    let spec = "cross, heads=2, head_dim=4, hidden=8, mask=no_mask";
    let kv = rand_t(&mut rng, &[5, 8], 1.0);
    let x = rand_t(&mut rng, &[4, 8], 1.0);
    let l = CpuLayer::new(layer(spec, 19));
    let (cq, ck) = ([0, 1, 4], [0, 3, 5]);
    let args = ForwardArgs {
        key_value_states: Some(&kv),
        packed: Some(PackedSeqParams {
            cu_seqlens_q: &cq,
            cu_seqlens_kv: &ck,
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        ..ForwardArgs::default()
    };
    let (y, mut saved) = l
        .forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
    assert_eq!(y, l.inner().forward(&x, &args).unwrap().output);
    let g = rand_t(&mut rng, &[4, 8], 1.0);
    let gr = l
        .backward(&mut saved, &g, &BackwardOptions::default())
        .unwrap();
    assert_eq!(gr.grad_key_value_states.unwrap().shape(), &[5, 8]);
    // The fd check of the packed form: the input direction only.
    let loss = |x: &Tensor| -> f64 {
        let y = l.inner().forward(x, &args).unwrap().output;
        dot(y.data(), g.data())
    };
    let u = rand_t(&mut rng, &[4, 8], 1.0);
    let fd = directional(&|e| loss(&perturbed(&x, &u, e)), 1e-2);
    assert_close(
        "packed cross grad_input",
        fd,
        dot(gr.grad_input.data(), u.data()),
        gr.grad_input.data(),
        u.data(),
        0.0,
        2e-3,
    );
}

#[test]
fn fully_masked_entry_gives_zero_gradients_not_nan() {
    let spec = "self, heads=2, head_dim=4, hidden=8, qk_layernorm=rms, rope, mask=padding";
    let mut m = Tensor::zeros(&[2, 1, 1, 4]);
    m.data_mut()[4..8].fill(1.0); // entry 1 sees nothing
    let x = padded(4, 2, 8, 21);
    let g = padded(4, 2, 8, 22);
    let cpu = CpuLayer::new(layer(spec, 23));
    let args = ForwardArgs {
        attention_mask: Some(&m),
        ..ForwardArgs::default()
    };
    let (_, mut saved) = cpu
        .forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
    let gr = cpu
        .backward(&mut saved, &g, &BackwardOptions::default())
        .unwrap();
    for i in 0..4 {
        // rows of entry 1
        assert!(gr.grad_input.data()[(i * 2 + 1) * 8..][..8]
            .iter()
            .all(|&v| v == 0.0));
    }
    for t in gr.params.values() {
        assert!(t.data().iter().all(|v| v.is_finite()));
    }
}

fn grads_of(
    cpu: &CpuLayer<SpecLayer>,
    x: &Tensor,
    g: &Tensor,
    call: &Call,
    recompute: Recompute,
    delay: bool,
) -> (BTreeMap<String, Tensor>, Tensor, usize) {
    let (_, mut saved) = cpu
        .forward_train(x, &call.args(), &TrainOptions { recompute })
        .unwrap();
    let bytes = saved.saved_bytes();
    let opts = BackwardOptions {
        delay_wgrad: delay,
        ..Default::default()
    };
    let mut gr = cpu.backward(&mut saved, g, &opts).unwrap();
    if delay {
        for k in ["linear_qkv.weight", "linear_qkv.bias", "linear_proj.weight"] {
            assert!(!gr.params.contains_key(k), "{k} not delayed");
        }
        gr.params.extend(cpu.backward_dw(&mut saved).unwrap());
    }
    (gr.params, gr.grad_input, bytes)
}

#[test]
fn delayed_wgrad_and_selective_recompute_are_bitwise_the_same() {
    for spec in [
        "self, heads=4, gqa=2, head_dim=4, hidden=8, qk_layernorm=rms, rope, sinks=learnable, qkv_bias, output_gate, mask=causal",
        "self, heads=2, head_dim=4, hidden=8, mask=no_mask",
    ] {
        let cpu = CpuLayer::new(layer(spec, 31));
        let (x, g) = (padded(6, 2, 8, 32), padded(6, 2, 8, 33));
        let call = Call::default();
        let (p0, gi0, b0) = grads_of(&cpu, &x, &g, &call, Recompute::None, false);
        let (p1, gi1, _) = grads_of(&cpu, &x, &g, &call, Recompute::None, true);
        let (p2, gi2, b2) = grads_of(&cpu, &x, &g, &call, Recompute::CoreAttention, false);
        let (p3, gi3, _) = grads_of(&cpu, &x, &g, &call, Recompute::CoreAttention, true);
        assert_eq!(p0, p1);
        assert_eq!(p0, p2);
        assert_eq!(p0, p3);
        assert_eq!(gi0, gi1);
        assert_eq!(gi0, gi2);
        assert_eq!(gi0, gi3);
        // Selective recompute drops core attention's output (+ the gated copy) and LSE:
        // n np hn (1 + gate) + b np sq floats.
        let c = cpu.layer_config();
        let (n, np, hn) = (12, c.heads, c.head_dim);
        let gate = c.output_gate as usize;
        assert_eq!(b0 - b2, 4 * (n * np * hn * (1 + gate) + 2 * np * 6));
        // activation_bytes reports both modes from either context, before and after use.
        for recompute in [Recompute::None, Recompute::CoreAttention] {
            let (_, mut saved) = cpu
                .forward_train(&x, &call.args(), &TrainOptions { recompute })
                .unwrap();
            let ab = saved.activation_bytes();
            assert_eq!((ab.full, ab.selective), (b0, b2));
            cpu.backward(&mut saved, &g, &BackwardOptions::default())
                .unwrap();
            assert_eq!(saved.activation_bytes(), ab);
        }
    }
}

#[test]
fn misuse_is_a_typed_error_and_changes_nothing() {
    let spec = "self, heads=2, head_dim=4, hidden=8, rope, mask=causal";
    let cpu = CpuLayer::new(layer(spec, 41));
    let (x, g) = (padded(3, 2, 8, 42), padded(3, 2, 8, 43));
    let args = ForwardArgs::default();
    let (_, mut saved) = cpu
        .forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
    let bytes = saved.saved_bytes();
    // backward_dw before backward.
    let e = cpu.backward_dw(&mut saved).unwrap_err();
    assert!(
        matches!(&e, AttnError::TrainState { call, .. } if call == "backward_dw"),
        "{e}"
    );
    // grad_output of the wrong shape.
    let e = cpu
        .backward(&mut saved, &padded(3, 1, 8, 1), &BackwardOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "grad_output"),
        "{e}"
    );
    // A context of another layer.
    let other = CpuLayer::new(layer(
        "self, heads=2, head_dim=4, hidden=8, mask=causal",
        41,
    ));
    let e = other
        .backward(&mut saved, &g, &BackwardOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "saved"),
        "{e}"
    );
    assert_eq!(saved.saved_bytes(), bytes, "nothing consumed by the errors");
    // The real backward, delayed; then a second backward has no saved forward.
    let opts = BackwardOptions {
        delay_wgrad: true,
        ..Default::default()
    };
    cpu.backward(&mut saved, &g, &opts).unwrap();
    assert_eq!(saved.saved_bytes(), 0);
    let e = cpu.backward(&mut saved, &g, &opts).unwrap_err();
    assert!(
        matches!(&e, AttnError::TrainState { call, .. } if call == "backward"),
        "{e}"
    );
    assert!(saved.wgrad_pending(), "the failed backward changed nothing");
    cpu.backward_dw(&mut saved).unwrap();
    // A second backward_dw.
    let e = cpu.backward_dw(&mut saved).unwrap_err();
    assert!(matches!(&e, AttnError::TrainState { .. }), "{e}");
    // backward_dw after a backward that did not delay.
    let (_, mut saved) = cpu
        .forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
    cpu.backward(&mut saved, &g, &BackwardOptions::default())
        .unwrap();
    let e = cpu.backward_dw(&mut saved).unwrap_err();
    assert!(matches!(&e, AttnError::TrainState { .. }), "{e}");
    // The forward's own errors stay the forward's.
    let e = cpu
        .forward_train(&padded(3, 2, 7, 1), &args, &TrainOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "hidden"),
        "{e}"
    );
}

#[test]
fn qk_clip_running_max_clip_and_reset() {
    // No q/k bias, no norm: scaling the q rows by eta^a and k rows by eta^(1-a) scales every
    // logit of the group by eta, so the clipped group's max logit becomes the threshold.
    let spec = "self, heads=4, gqa=2, head_dim=8, hidden=16, bias=false, rope, mask=causal";
    let mut l = layer(spec, 51);
    // Large weights so logits are large.
    let mut sd = l.state_dict("");
    for (k, t) in sd.iter_mut() {
        if k == "linear_qkv.weight" {
            t.data_mut().iter_mut().for_each(|v| *v *= 6.0);
        }
    }
    l = with_params(&l, &sd);
    let x1 = padded(6, 2, 16, 52);
    let x2 = padded(6, 2, 16, 53);
    let mut rec = QkClip::new();
    let mut seen = vec![f32::NEG_INFINITY; 4];
    for x in [&x1, &x2] {
        let (_, saved) = CpuLayer::new(l.clone())
            .forward_train(x, &ForwardArgs::default(), &TrainOptions::default())
            .unwrap();
        rec.observe(saved.max_logit()).unwrap();
        for (s, m) in seen.iter_mut().zip(saved.max_logit()) {
            *s = s.max(*m);
        }
    }
    assert_eq!(rec.record().unwrap(), seen.as_slice());
    let gmax = [seen[0].max(seen[1]), seen[2].max(seen[3])];
    // A threshold between the two groups' maxima clips only the larger one.
    let (hi, lo) = if gmax[0] > gmax[1] { (0, 1) } else { (1, 0) };
    let threshold = (gmax[0] + gmax[1]) / 2.0;
    let before = l.state_dict("");
    let report = l.clip_qk(&mut rec, threshold, 0.3).unwrap();
    assert!(rec.record().is_none(), "record reset");
    assert_eq!(report.clipped, vec![hi]);
    assert_eq!(report.eta[lo], 1.0);
    let after = l.state_dict("");
    let (w0, w1) = (&before[0].1, &after[0].1);
    assert_eq!(before[0].0, "linear_qkv.weight");
    let eta = (threshold / gmax[hi]) as f64;
    let gcols = 2 * 8 + 2 * 8;
    for row in 0..w0.shape()[0] {
        let (g, c) = (row / gcols, row % gcols);
        let f = if g != hi {
            1.0
        } else if c < 16 {
            eta.powf(0.3) // query rows: eta^alpha
        } else if c < 24 {
            eta.powf(0.7) // key rows: eta^(1 - alpha)
        } else {
            1.0 // value rows
        };
        for j in 0..16 {
            let (a, b) = (w0.data()[row * 16 + j], w1.data()[row * 16 + j]);
            let want = a as f64 * f;
            assert!(
                (b as f64 - want).abs() <= 1e-6 * want.abs(),
                "row {row}: {b} vs {want}"
            );
        }
    }
    // The other parameters are untouched, and the clipped group's max logit is now the
    // threshold.
    assert_eq!(before[1..], after[1..]);
    let mut m = f32::NEG_INFINITY;
    for x in [&x1, &x2] {
        let (_, saved) = CpuLayer::new(l.clone())
            .forward_train(x, &ForwardArgs::default(), &TrainOptions::default())
            .unwrap();
        m = m.max(saved.max_logit()[2 * hi].max(saved.max_logit()[2 * hi + 1]));
    }
    assert!(
        (m - threshold).abs() < 1e-4 * threshold,
        "{m} vs {threshold}"
    );
    // Errors.
    let mut r = QkClip::new();
    r.observe(&[1.0; 4]).unwrap();
    assert!(matches!(
        r.observe(&[1.0; 3]).unwrap_err(),
        AttnError::Shape { .. }
    ));
    assert!(matches!(
        l.clip_qk(&mut r, 0.0, 0.5).unwrap_err(),
        AttnError::InvalidArgument { arg, .. } if arg == "threshold"
    ));
    assert!(matches!(
        l.clip_qk(&mut r, 10.0, 1.5).unwrap_err(),
        AttnError::InvalidArgument { arg, .. } if arg == "alpha"
    ));
    assert!(r.record().is_some(), "a refused clip keeps the record");
    let mut cross = layer("cross, heads=2, head_dim=4, hidden=8", 1);
    assert!(matches!(
        cross.clip_qk(&mut r, 10.0, 0.5).unwrap_err(),
        AttnError::InvalidArgument { .. }
    ));
}

/// A user `linear_qkv` that does not declare a training view (`train()` stays `None`).
struct UserLinear(Linear);

impl LinearModule for UserLinear {
    fn in_features(&self) -> usize {
        self.0.in_features()
    }
    fn out_features(&self) -> usize {
        self.0.out_features()
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
    fn bias(&self) -> Option<&Tensor> {
        LinearModule::bias(&self.0)
    }
}

struct UserLayer {
    cfg: LayerConfig,
    qkv: UserLinear,
    core: DotProductAttention,
    proj: Linear,
}

impl AttentionLayer for UserLayer {
    fn config(&self) -> &LayerConfig {
        &self.cfg
    }
    fn parts(&self) -> LayerParts<'_> {
        LayerParts::SelfAttention(SelfAttentionParts {
            config: &self.cfg,
            linear_qkv: &self.qkv,
            q_layernorm: None,
            k_layernorm: None,
            core_attention: &self.core,
            linear_proj: &self.proj,
        })
    }
}

#[test]
fn a_user_submodule_without_a_training_view_is_refused_by_role() {
    let l = layer("self, heads=2, head_dim=4, hidden=8, mask=causal", 61);
    let cfg = l.config().clone();
    let user = UserLayer {
        qkv: UserLinear(Linear::init(&cfg, attention_codegen::Role::LinearQkv, 1).unwrap()),
        core: DotProductAttention::init(&cfg, attention_codegen::Role::CoreAttention, 1).unwrap(),
        proj: Linear::init(&cfg, attention_codegen::Role::LinearProj, 1).unwrap(),
        cfg,
    };
    let x = padded(3, 1, 8, 62);
    // The forward runs (the user module's own math) ...
    user.forward(&x, &ForwardArgs::default()).unwrap();
    // ... but a training forward cannot differentiate a module it cannot see into.
    let e = CpuLayer::new(user)
        .forward_train(&x, &ForwardArgs::default(), &TrainOptions::default())
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::NoBackendImpl { role, .. } if role == "linear_qkv"),
        "{e}"
    );
}

/// Selective recompute's cost on one layer of the `megatron` fixture's config at a longer
/// sequence: activation bytes per mode and the time of forward + backward. Timing only:
/// `cargo test -p attention-runtime --test layer_backward -- --ignored --nocapture recompute_cost`.
#[test]
#[ignore = "timing report, not a check"]
fn recompute_cost() {
    let spec = "self, heads=8, gqa=2, head_dim=64, hidden=512, qk_layernorm=rms, rope, mask=causal";
    let cpu = CpuLayer::new(layer(spec, 71));
    let (s, b) = (256, 2);
    let (x, g) = (padded(s, b, 512, 72), padded(s, b, 512, 73));
    for recompute in [Recompute::None, Recompute::CoreAttention] {
        let t0 = std::time::Instant::now();
        let (_, mut saved) = cpu
            .forward_train(&x, &ForwardArgs::default(), &TrainOptions { recompute })
            .unwrap();
        let t1 = std::time::Instant::now();
        let bytes = saved.saved_bytes();
        cpu.backward(&mut saved, &g, &BackwardOptions::default())
            .unwrap();
        let t2 = std::time::Instant::now();
        eprintln!(
            "{recompute:?}: saved {bytes} bytes ({:?}), forward {:.1} ms, backward {:.1} ms",
            saved.activation_bytes(),
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3
        );
    }
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// A random self-attention spec over the features that have a backward.
    fn spec_strategy() -> impl Strategy<Value = (String, usize)> {
        (
            prop_oneof![Just((2, 2)), Just((4, 2)), Just((4, 1)), Just((3, 3))],
            prop_oneof![Just(4usize), Just(8)],
            prop_oneof![Just(""), Just(", qk_layernorm=rms"), Just(", qk_layernorm=layer"), Just(", qk_layernorm=l2")],
            prop_oneof![
                Just(""),
                Just(", rope"),
                Just(", rope=interleaved"),
                Just(", rope, rotary_percent=0.5")
            ],
            prop_oneof![Just(""), Just(", sinks=off_by_one"), Just(", sinks=learnable")],
            any::<bool>(),
            prop_oneof![Just(""), Just(", window=(2, 0)"), Just(", window=(3, -1)")],
            prop_oneof![
                Just("no_mask"),
                Just("causal"),
                Just("causal_bottom_right")
            ],
            prop_oneof![Just(""), Just(", bias=false"), Just(", qkv_bias")],
            2usize..5,
        )
            .prop_map(
                |((np, ng), hd, norm, rope, sinks, gate, window, mask, bias, s)| {
                    (
                        format!(
                            "self, heads={np}, gqa={ng}, head_dim={hd}, hidden=8{norm}{rope}{sinks}{}{window}{bias}, mask={mask}",
                            if gate { ", output_gate" } else { "" }
                        ),
                        s,
                    )
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn random_feature_combinations_match_finite_differences(
            (spec, s) in spec_strategy(),
            seed in 0u64..1000,
        ) {
            let x = padded(s, 2, 8, seed);
            check_fd(&spec, &x, &Call::default(), seed + 1, false);
        }
    }
}

/// Cross-attention has no q/k norm, rope or output gate (`LayerConfig::new` refuses them, as
/// the reference system's `CrossAttention` has none). A config assembled field by field past
/// that check is refused by training (a typed error naming the feature) rather than trained
/// with the feature silently ignored.
#[test]
fn cross_attention_config_with_self_only_features_is_refused() {
    let base = layer("cross, heads=2, head_dim=4, hidden=8, mask=no_mask", 81)
        .config()
        .clone();
    let ctx = padded(3, 1, 8, 82);
    let x = padded(2, 1, 8, 83);
    let args = ForwardArgs {
        key_value_states: Some(&ctx),
        ..ForwardArgs::default()
    };
    type Edit = fn(&mut LayerConfig);
    let edits: [(&str, Edit); 3] = [
        ("qk_layernorm", |c| {
            c.qk_norm = Some(attention_codegen::QkNorm::Rms)
        }),
        ("rope", |c| {
            c.rope = Some(attention_codegen::Rope {
                mode: attention_codegen::RopeMode::Half,
                rotary_percent: 1.0,
                rotary_base: 10000.0,
            })
        }),
        ("output_gate", |c| c.output_gate = true),
    ];
    for (arg, edit) in edits {
        let mut c = base.clone();
        edit(&mut c);
        let e = CpuLayer::new(SpecLayer::init(c, 84).unwrap())
            .forward_train(&x, &args, &TrainOptions::default())
            .unwrap_err();
        assert!(
            matches!(&e, AttnError::InvalidArgument { arg: got, .. } if got == arg),
            "{arg}: {e}"
        );
    }
    // The config as LayerConfig::new builds it trains.
    CpuLayer::new(SpecLayer::init(base, 84).unwrap())
        .forward_train(&x, &args, &TrainOptions::default())
        .unwrap();
}
