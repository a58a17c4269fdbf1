//! The CUDA layer against the CPU reference, on a GPU. Every test that needs one is
//! `#[ignore = "requires a CUDA GPU"]` (always compiled); run them with
//! `scripts/gpu-bundle.sh` and `gpu-bundle/run.sh` on the GPU machine (CONTRIBUTING.md).
//!
//! Each check draws fresh random shapes and inputs (the seed is printed), poisons every
//! intermediate and output buffer with NaN before it is written, fails on NaN, and bounds
//! the relative Frobenius error ||gpu - cpu|| / ||cpu|| by 1e-2 (bf16 and f16).

use attention_runtime::cuda::{CudaLayer, DeviceTensor, ElemType};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{
    AttentionLayer, AttnError, Device, ForwardArgs, PackedSeqParams, RuntimeDims, Tensor,
    WeightStore,
};

mod common;
use common::{fresh_seed, gpu, layer_pair, rel_err, repo_root};

const TOL: f64 = 1e-2;

fn randn(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform() * 1.7)
}

/// What a case feeds the layer besides hidden states.
#[derive(Default, Clone, Copy)]
struct Extras {
    /// Mask tensor shape selector: 0 none, 1 `[b, 1, 1, sk]` key padding, 2 `[b, np, sq, sk]`.
    mask: u8,
    attention_bias: bool,
    packed: bool,
    positions: bool,
    mscale: bool,
}

/// Build the layer from `spec` (random weights), run CPU and GPU on random input, compare.
fn check(spec: &str, ex: Extras) {
    let seed = fresh_seed();
    let mut rng = SplitMix64::new(seed);
    let (layer, cuda) = layer_pair(spec, seed);
    let config = layer.config().clone();
    let (np, h) = (config.heads, config.hidden);
    let is_cross = config.kind == attention_codegen::AttentionKind::CrossAttention;
    let b = 1 + (rng.next_u64() % 3) as usize;
    let sq = 1 + (rng.next_u64() % 40) as usize;
    let sk = if is_cross {
        1 + (rng.next_u64() % 40) as usize
    } else {
        sq
    };

    // Packed: split b sequences of random lengths.
    let lens_q: Vec<usize> = (0..b).map(|_| 1 + (rng.next_u64() % 24) as usize).collect();
    let lens_k: Vec<usize> = if is_cross {
        (0..b).map(|_| 1 + (rng.next_u64() % 24) as usize).collect()
    } else {
        lens_q.clone()
    };
    let cu = |l: &[usize]| {
        let mut v = vec![0i32];
        for x in l {
            v.push(v.last().unwrap() + *x as i32);
        }
        v
    };
    let (cu_q, cu_k) = (cu(&lens_q), cu(&lens_k));
    let (tq, tk) = (
        *cu_q.last().unwrap() as usize,
        *cu_k.last().unwrap() as usize,
    );
    let (mq, mk) = (*lens_q.iter().max().unwrap(), *lens_k.iter().max().unwrap());
    let (hidden, ctx) = if ex.packed {
        (
            randn(&mut rng, &[tq, h]),
            is_cross.then(|| randn(&mut rng, &[tk, h])),
        )
    } else {
        (
            randn(&mut rng, &[sq, b, h]),
            is_cross.then(|| randn(&mut rng, &[sk, b, h])),
        )
    };
    let (nb, nsq, nsk) = if ex.packed { (b, mq, mk) } else { (b, sq, sk) };
    let mask = match ex.mask {
        0 => None,
        1 => Some(Tensor::from_fn(&[nb, 1, 1, nsk], |_| {
            f32::from(rng.next_u64().is_multiple_of(4))
        })),
        _ => Some(Tensor::from_fn(&[nb, np, nsq, nsk], |_| {
            f32::from(rng.next_u64().is_multiple_of(3))
        })),
    };
    let bias = ex
        .attention_bias
        .then(|| randn(&mut rng, &[nb, np, nsq, nsk]));
    let npos = if ex.packed { tq } else { sq };
    let positions: Vec<i64> = (0..npos).map(|_| (rng.next_u64() % 200) as i64).collect();
    let args = ForwardArgs {
        attention_mask: mask.as_ref(),
        key_value_states: ctx.as_ref(),
        positions: ex.positions.then_some(positions.as_slice()),
        attention_bias: bias.as_ref(),
        packed: ex.packed.then_some(PackedSeqParams {
            cu_seqlens_q: &cu_q,
            cu_seqlens_kv: if is_cross { &cu_k } else { &[] },
            max_seqlen_q: 0,
            max_seqlen_kv: 0,
        }),
        mask_type: None,
        rope_mscale: if ex.mscale { 1.3 } else { 1.0 },
    };
    let want = layer.forward(&hidden, &args).unwrap();
    let got = cuda.forward(&hidden, &args).unwrap();
    let e = rel_err(&got.output, &want.output);
    println!(
        "{spec} | b={b} sq={sq} sk={sk} (packed: tq={tq} tk={tk}) packed={} mask={} bias={} | seed {seed:#x} | rel err {e:.2e} | {}",
        ex.packed,
        ex.mask,
        ex.attention_bias,
        cuda.forward_kernel_key(&args)
    );
    assert!(e <= TOL, "{spec}: rel err {e} > {TOL} (seed {seed:#x})");
    assert_eq!(got.bias, want.bias, "linear_proj bias is returned unadded");
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mha_rms_rope_causal_bf16() {
    check(
        "self, heads=4, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        Extras::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gqa_layernorm_interleaved_partial_rope_f16() {
    check(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=layer, rope=interleaved, \
         rotary_percent=0.5, mask=causal, dtype=f16",
        Extras {
            positions: true,
            mscale: true,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn mqa_l2_no_rope_no_mask_qkv_bias() {
    check(
        "self, heads=6, gqa=1, head_dim=64, hidden=320, qk_layernorm=l2, qkv_bias, mask=no_mask",
        Extras::default(),
    );
}

/// The head dims of real checkpoints added with issue 9: 32 (MiniLM; rope rotates channel
/// pairs 16 lanes apart), 160 and 224 (8-warp fast-forward tiles), with q/k norms.
#[test]
#[ignore = "requires a CUDA GPU"]
fn head_dims_32_160_224() {
    check(
        "self, heads=12, head_dim=32, hidden=384, mask=padding",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=2, head_dim=32, qk_layernorm=layer, rope, mask=causal",
        Extras::default(),
    );
    check(
        "self, heads=4, gqa=2, head_dim=160, qk_layernorm=rms, rope, mask=causal",
        Extras::default(),
    );
    check(
        "self, heads=2, head_dim=224, rope=interleaved, mask=causal, dtype=f16",
        Extras::default(),
    );
}

/// Head dim 80 (Phi-2), not a multiple of 32: the one-warp-per-row code (qkv_prep, the fast
/// kernel's exact path) leaves lanes 16..31 of the third channel chunk empty, the tensor-core
/// kernel runs 5 k16 steps. Phi-2's own shape (MHA, biases, partial rope 0.4 = 32 channels)
/// packed with explicit positions; rope over all 80 channels (pairs 40 apart) with layer and
/// rms q/k norms, interleaved, f16; window, sinks and gate; mask tensors and a bias; cross.
#[test]
#[ignore = "requires a CUDA GPU"]
fn head_dim_80() {
    check(
        "self, heads=4, head_dim=80, rope, rotary_percent=0.4, mask=causal",
        Extras {
            packed: true,
            positions: true,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=2, head_dim=80, qk_layernorm=layer, rope, mask=causal",
        Extras::default(),
    );
    check(
        "self, heads=4, gqa=1, head_dim=80, qk_layernorm=rms, rope=interleaved, mask=padding, \
         dtype=f16",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=2, head_dim=80, rope, rotary_percent=0.4, window=(5, 0), \
         sinks=learnable, output_gate, mask=causal",
        Extras {
            mscale: true,
            ..Extras::default()
        },
    );
    check(
        "self, heads=2, head_dim=80, qk_layernorm=l2, mask=arbitrary",
        Extras {
            mask: 2,
            attention_bias: true,
            ..Extras::default()
        },
    );
    check(
        "cross, heads=2, head_dim=80, mask=padding",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn gqa_head_dim_256_and_96() {
    check(
        "self, heads=4, gqa=2, head_dim=256, rope, mask=causal",
        Extras::default(),
    );
    check(
        "self, heads=3, head_dim=96, rope, mask=causal, dtype=f16",
        Extras::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn padding_mask_tensor_key_padding_and_full() {
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=padding",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=padding",
        Extras {
            mask: 2,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn padding_causal_and_arbitrary_masks() {
    check(
        "self, heads=4, head_dim=64, mask=padding_causal",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=4, head_dim=128, mask=arbitrary, dtype=f16",
        Extras {
            mask: 2,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn sliding_window_causal_and_bottom_right() {
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal, window=(5, 0)",
        Extras::default(),
    );
    check(
        "self, heads=4, head_dim=64, mask=causal_bottom_right, window=(3, 0)",
        Extras::default(),
    );
    check(
        "self, heads=4, head_dim=64, mask=no_mask, window=(4, 4)",
        Extras::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn sinks_off_by_one_and_learnable() {
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal, sinks=off_by_one",
        Extras::default(),
    );
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal, window=(6, 0), sinks=learnable",
        Extras::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn additive_attention_bias() {
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=causal",
        Extras {
            attention_bias: true,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn output_gate() {
    check(
        "self, heads=4, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal, output_gate",
        Extras::default(),
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn packed_cu_seqlens_self() {
    check(
        "self, heads=4, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal",
        Extras {
            packed: true,
            ..Extras::default()
        },
    );
    check(
        "self, heads=4, gqa=2, head_dim=64, rope, mask=padding_causal, output_gate",
        Extras {
            packed: true,
            mask: 1,
            positions: true,
            attention_bias: true,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cross_attention_padded_and_packed() {
    check(
        "cross, heads=4, head_dim=64, mask=no_mask",
        Extras::default(),
    );
    check(
        "cross, heads=4, head_dim=128, mask=padding, dtype=f16",
        Extras {
            mask: 1,
            ..Extras::default()
        },
    );
    check(
        "cross, heads=4, head_dim=64, mask=causal_bottom_right",
        Extras::default(),
    );
    check(
        "cross, heads=2, head_dim=64, mask=no_mask",
        Extras {
            packed: true,
            ..Extras::default()
        },
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn random_specs() {
    let mut rng = SplitMix64::new(fresh_seed());
    for _ in 0..8 {
        let hd = [64, 80, 128][(rng.next_u64() % 3) as usize];
        let heads = [2, 4, 8][(rng.next_u64() % 3) as usize];
        let gqa = [1, 2, heads][(rng.next_u64() % 3) as usize];
        let norm = [
            "",
            ", qk_layernorm=rms",
            ", qk_layernorm=layer",
            ", qk_layernorm=l2",
        ][(rng.next_u64() % 4) as usize];
        let rope = ["", ", rope", ", rope=interleaved"][(rng.next_u64() % 3) as usize];
        let mask = ["causal", "no_mask", "causal_bottom_right"][(rng.next_u64() % 3) as usize];
        let dtype = ["", ", dtype=f16"][(rng.next_u64() % 2) as usize];
        let spec = format!(
            "self, heads={heads}, gqa={gqa}, head_dim={hd}{norm}{rope}, mask={mask}{dtype}"
        );
        check(
            &spec,
            Extras {
                packed: rng.next_u64().is_multiple_of(2),
                ..Extras::default()
            },
        );
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn megatron_fixture_through_the_cuda_layer() {
    let d = repo_root().join("tests/fixtures/megatron");
    let spec = "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope, mask=causal";
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let weights = WeightStore::from_file(d.join("weights.safetensors")).unwrap();
    let layer = SpecLayer::load(config, &weights, "decoder.layers.0.self_attention.").unwrap();
    let input = WeightStore::from_file(d.join("input.safetensors"))
        .unwrap()
        .get("input", &[16, 2, 512])
        .unwrap();
    let expected = WeightStore::from_file(d.join("expected.safetensors")).unwrap();
    let want = expected.get("output", &[16, 2, 512]).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    cuda.set_poison_outputs(true);
    let got = cuda.forward(&input, &ForwardArgs::default()).unwrap();
    let e = rel_err(&got.output, &want);
    println!("Megatron-Core fixture through the CUDA layer (bf16): rel err {e:.2e}");
    assert!(e <= TOL, "rel err {e} vs Megatron-Core");
    assert_eq!(
        got.bias.unwrap(),
        expected.get("output_bias", &[512]).unwrap()
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn bitwise_deterministic_run_to_run() {
    let spec = "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal, \
                sinks=learnable, output_gate";
    let seed = fresh_seed();
    let config = SpecLayer::config_from_str(spec, &RuntimeDims::default()).unwrap();
    let layer = SpecLayer::init(config, seed).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    let mut rng = SplitMix64::new(seed);
    let x = randn(&mut rng, &[77, 3, 1024]);
    let a = cuda.forward(&x, &ForwardArgs::default()).unwrap().output;
    cuda.set_poison_outputs(true);
    for _ in 0..3 {
        let b = cuda.forward(&x, &ForwardArgs::default()).unwrap().output;
        let same = a
            .data()
            .iter()
            .zip(b.data())
            .all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "two runs on the same input differ (seed {seed:#x})");
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn device_tensor_round_trip_and_oom() {
    let d = gpu();
    let stream = d.context.default_stream();
    let mut rng = SplitMix64::new(fresh_seed());
    let t = randn(&mut rng, &[5, 3, 64]);
    for elem in [ElemType::Bf16, ElemType::F16, ElemType::F32] {
        let dt = DeviceTensor::from_host(&stream, &t, elem).unwrap();
        assert_eq!(dt.shape(), &[5, 3, 64]);
        assert_eq!(dt.strides(), &[192, 64, 1]);
        assert_eq!(dt.rows("x", 64).unwrap(), (15, 64));
        let back = dt.to_host().unwrap();
        let e = rel_err(&back, &t);
        let tol = match elem {
            ElemType::F32 => 0.0,
            ElemType::F16 => 1e-3,
            ElemType::Bf16 => 5e-3,
        };
        assert!(e <= tol, "{elem:?} round trip rel err {e}");
        let packed = dt.view(&[15, 64]).unwrap();
        assert_eq!(packed.rows("x", 64).unwrap(), (15, 64));
        assert!(matches!(packed.rows("x", 32), Err(AttnError::Shape { .. })));
    }
    // 2^42 f32 = 16 TiB: out of memory is an error, not a panic.
    let e = DeviceTensor::uninit(&stream, ElemType::F32, &[1 << 42], "huge").unwrap_err();
    assert!(
        matches!(&e, AttnError::DeviceAlloc { arg, .. } if arg == "huge"),
        "{e}"
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn cuda_layer_errors_name_the_argument() {
    let config = SpecLayer::config_from_str(
        "self, heads=4, head_dim=64, mask=causal",
        &RuntimeDims::default(),
    )
    .unwrap();
    let layer = SpecLayer::init(config, 1).unwrap();
    let cuda = CudaLayer::new(&layer, &gpu()).unwrap();
    let x = Tensor::zeros(&[4, 2, 100]);
    let e = cuda.forward(&x, &ForwardArgs::default()).unwrap_err();
    assert!(
        matches!(&e, AttnError::Shape { arg, .. } if arg == "hidden"),
        "{e}"
    );
    let x = Tensor::from_fn(&[4, 2, 256], |i| i as f32 * 1e-3);
    let m = Tensor::zeros(&[2, 1, 4, 4]);
    let args = ForwardArgs {
        attention_mask: Some(&m),
        ..ForwardArgs::default()
    };
    let e = cuda.forward(&x, &args).unwrap_err();
    assert!(e.to_string().contains("attention_mask"), "{e}");
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn bad_ordinal_is_an_error_on_a_gpu_machine() {
    let e = Device::cuda(4096).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "ordinal"),
        "{e}"
    );
}

/// Runs everywhere: without a GPU the error says the backend is unavailable; with one, the
/// ordinal is out of range. Never a panic.
#[test]
fn bad_ordinal_is_an_error_everywhere() {
    assert!(Device::cuda(1 << 20).is_err());
}
