//! Hugging Face weight names (`weights::hf`): each family's layout against a forward written
//! here from the family's own definition (q/k/v projections, GQA by `repeat_kv`, Conv1D
//! `x W + b`), bitwise round trips Megatron -> HF -> load, and every error class.

use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::weights::hf::{self, HfFamily};
use attention_runtime::weights::names::WeightNames;
use attention_runtime::{
    AttentionLayer, AttnError, ForwardArgs, LayerConfig, RuntimeDims, Tensor, WeightStore,
};

fn config(spec: &str) -> LayerConfig {
    SpecLayer::config_from_str(spec, &RuntimeDims::default()).expect("valid spec")
}

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = attention_runtime::modules::SplitMix64::new(seed);
    Tensor::from_fn(shape, |_| rng.uniform() * 0.5)
}

fn bits(sd: &[(String, Tensor)]) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    let mut v: Vec<_> = sd
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.shape().to_vec(),
                t.data().iter().map(|x| x.to_bits()).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

const LLAMA_GQA: &str =
    "self, heads = 8, gqa = 2, head_dim = 64, hidden = 96, bias = false, mask = no_mask";
const QWEN2: &str =
    "self, heads = 4, gqa = 2, head_dim = 64, hidden = 80, bias = false, qkv_bias, rope, mask = causal";
const QWEN3: &str = "self, heads = 4, gqa = 1, head_dim = 64, hidden = 64, bias = false, \
                     qk_layernorm = rms, eps = 1e-6, rope, mask = causal";
const GPT_OSS: &str =
    "self, heads = 4, gqa = 2, head_dim = 64, hidden = 72, sinks = learnable, rope, mask = causal";
const GPT2: &str = "self, heads = 3, head_dim = 64, hidden = 192, mask = no_mask";
const BERT: &str = "self, heads = 2, head_dim = 64, hidden = 96, mask = no_mask";

/// Megatron -> `family` names -> load with detection: same parameters bitwise, same output
/// bitwise, and the family reported.
fn round_trip(spec: &str, family: HfFamily, prefix: &str) {
    let cfg = config(spec);
    let layer = SpecLayer::init(cfg.clone(), 7).unwrap();
    let hf_sd = layer
        .state_dict_named(prefix, WeightNames::HfFamily(family))
        .unwrap();
    assert!(hf_sd.iter().all(|(k, _)| k.starts_with(prefix)));
    let store = WeightStore::from_tensors(hf_sd.clone());
    let (back, layout) =
        SpecLayer::load_named(cfg.clone(), &store, prefix, WeightNames::Hf).unwrap();
    let layout = layout.expect("hf names report their layout");
    assert_eq!(layout.family, family);
    assert_eq!(layout.prefix, prefix);
    assert_eq!(
        bits(&back.state_dict("")),
        bits(&layer.state_dict("")),
        "{spec}"
    );
    // And back out again: the HF dict is reproduced bitwise.
    let again = back
        .state_dict_named(prefix, WeightNames::HfFamily(family))
        .unwrap();
    assert_eq!(bits(&again), bits(&hf_sd));
    let x = rand_tensor(&[5, 2, cfg.hidden], 3);
    let a = layer.forward(&x, &ForwardArgs::default()).unwrap();
    let b = back.forward(&x, &ForwardArgs::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn round_trip_llama_mistral_qwen_families() {
    round_trip(LLAMA_GQA, HfFamily::Llama, "model.layers.3.self_attn.");
    round_trip(QWEN2, HfFamily::Llama, "model.layers.0.self_attn.");
    round_trip(QWEN3, HfFamily::Llama, "model.layers.1.self_attn.");
    round_trip(GPT_OSS, HfFamily::Llama, "model.layers.2.self_attn.");
}

#[test]
fn round_trip_gpt2() {
    round_trip(GPT2, HfFamily::Gpt2, "h.4.attn.");
}

#[test]
fn round_trip_bert() {
    round_trip(BERT, HfFamily::Bert, "encoder.layer.0.attention.");
}

#[test]
fn qwen3_names_and_shapes() {
    let cfg = config(QWEN3);
    let layer = SpecLayer::init(cfg, 1).unwrap();
    let sd = layer
        .state_dict_named("p.", WeightNames::HfFamily(HfFamily::Llama))
        .unwrap();
    let mut got: Vec<(String, Vec<usize>)> = sd
        .iter()
        .map(|(k, t)| (k.clone(), t.shape().to_vec()))
        .collect();
    got.sort();
    let want: Vec<(String, Vec<usize>)> = [
        ("p.k_norm.weight", vec![64]),
        ("p.k_proj.weight", vec![64, 64]),
        ("p.o_proj.weight", vec![64, 256]),
        ("p.q_norm.weight", vec![64]),
        ("p.q_proj.weight", vec![256, 64]),
        ("p.v_proj.weight", vec![64, 64]),
    ]
    .into_iter()
    .map(|(k, s)| (k.to_string(), s))
    .collect();
    assert_eq!(got, want);
}

/// Softmax attention of one head over rows `q` `[s, hn]`, `k`/`v` `[s, hn]`, no mask.
fn head_attention(q: &[f32], k: &[f32], v: &[f32], s: usize, hn: usize) -> Vec<f32> {
    let scale = 1.0 / (hn as f64).sqrt();
    let mut out = vec![0f32; s * hn];
    for i in 0..s {
        let logits: Vec<f64> = (0..s)
            .map(|j| {
                (0..hn)
                    .map(|d| q[i * hn + d] as f64 * k[j * hn + d] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hn {
            out[i * hn + d] = (0..s).map(|j| e[j] / z * v[j * hn + d] as f64).sum::<f64>() as f32;
        }
    }
    out
}

/// `x` `[n, i]` times `w`: `[o, i]` (nn.Linear) or, `conv1d`, `[i, o]` (GPT-2's Conv1D).
fn matmul(x: &[f32], n: usize, w: &Tensor, conv1d: bool, b: Option<&Tensor>) -> Vec<f32> {
    let (o, i) = if conv1d {
        (w.shape()[1], w.shape()[0])
    } else {
        (w.shape()[0], w.shape()[1])
    };
    let wd = w.data();
    let mut y = vec![0f32; n * o];
    for r in 0..n {
        for c in 0..o {
            let mut acc = 0f64;
            for t in 0..i {
                let wv = if conv1d { wd[t * o + c] } else { wd[c * i + t] };
                acc += x[r * i + t] as f64 * wv as f64;
            }
            y[r * o + c] = acc as f32 + b.map_or(0.0, |b| b.data()[c]);
        }
    }
    y
}

/// The family's own forward (one sequence, batch 1, no mask, no rope, no norm) from its
/// Hugging Face tensors: `q_h = x Wq_h`, query head `h` reads kv head `h / (np / ng)`
/// (`repeat_kv`), output `o_proj(concat_h attn_h)`, bias included.
fn hf_forward(
    sd: &WeightStore,
    family: HfFamily,
    p: &str,
    cfg: &LayerConfig,
    x: &[f32],
    s: usize,
) -> Vec<f32> {
    let (np, ng, hn, h) = (cfg.heads, cfg.groups, cfg.head_dim, cfg.hidden);
    let g = |k: &str| {
        let key = format!("{p}{k}");
        sd.contains(&key).then(|| sd_tensor(sd, &key))
    };
    let (q, k, v, o_w, o_b, conv) = match family {
        HfFamily::Gpt2 => {
            let qkv = matmul(
                x,
                s,
                &g("c_attn.weight").unwrap(),
                true,
                g("c_attn.bias").as_ref(),
            );
            let w = np * hn + 2 * ng * hn;
            let col = |r: std::ops::Range<usize>| -> Vec<f32> {
                (0..s)
                    .flat_map(|i| qkv[i * w..][r.clone()].to_vec())
                    .collect()
            };
            (
                col(0..np * hn),
                col(np * hn..(np + ng) * hn),
                col((np + ng) * hn..w),
                g("c_proj.weight").unwrap(),
                g("c_proj.bias"),
                true,
            )
        }
        _ => {
            let (qn, kn, vn, on) = if family == HfFamily::Bert {
                ("self.query", "self.key", "self.value", "output.dense")
            } else {
                ("q_proj", "k_proj", "v_proj", "o_proj")
            };
            let lin = |n: &str| {
                matmul(
                    x,
                    s,
                    &g(&format!("{n}.weight")).unwrap(),
                    false,
                    g(&format!("{n}.bias")).as_ref(),
                )
            };
            (
                lin(qn),
                lin(kn),
                lin(vn),
                g(&format!("{on}.weight")).unwrap(),
                g(&format!("{on}.bias")),
                false,
            )
        }
    };
    let per = np / ng;
    let head = |t: &[f32], heads: usize, hi: usize| -> Vec<f32> {
        (0..s)
            .flat_map(|i| t[(i * heads + hi) * hn..][..hn].to_vec())
            .collect()
    };
    let mut ctx = vec![0f32; s * np * hn];
    for hi in 0..np {
        let o = head_attention(
            &head(&q, np, hi),
            &head(&k, ng, hi / per),
            &head(&v, ng, hi / per),
            s,
            hn,
        );
        for i in 0..s {
            ctx[(i * np + hi) * hn..][..hn].copy_from_slice(&o[i * hn..][..hn]);
        }
    }
    matmul(&ctx, s, &o_w, conv, o_b.as_ref())
        .chunks(h)
        .flat_map(|c| c.to_vec())
        .collect()
}

fn sd_tensor(sd: &WeightStore, key: &str) -> Tensor {
    // The store checks shapes; read the shape by trying an impossible one.
    match sd.get(key, &[usize::MAX]) {
        Err(AttnError::WeightShape { got, .. }) => sd.get(key, &got).unwrap(),
        other => panic!("unexpected {other:?}"),
    }
}

/// Random tensors under `family`'s names -> the layer -> its output (plus `linear_proj`'s
/// bias) equals the family's own forward.
fn matches_family_forward(spec: &str, family: HfFamily, prefix: &str) {
    let cfg = config(spec);
    // Random HF tensors: made by saving a random layer, then every tensor replaced by fresh
    // random values (so nothing depends on our own layout).
    let shaped = SpecLayer::init(cfg.clone(), 1)
        .unwrap()
        .state_dict_named(prefix, WeightNames::HfFamily(family))
        .unwrap();
    let fresh: Vec<(String, Tensor)> = shaped
        .iter()
        .enumerate()
        .map(|(i, (k, t))| (k.clone(), rand_tensor(t.shape(), 100 + i as u64)))
        .collect();
    let store = WeightStore::from_tensors(fresh);
    let (layer, _) =
        SpecLayer::load_named(cfg.clone(), &store, prefix, WeightNames::HfFamily(family)).unwrap();
    let s = 6;
    let x = rand_tensor(&[s, 1, cfg.hidden], 9);
    let out = layer.forward(&x, &ForwardArgs::default()).unwrap();
    let mut ours = out.output.into_data();
    if let Some(b) = out.bias {
        for row in ours.chunks_mut(cfg.hidden) {
            for (y, bb) in row.iter_mut().zip(b.data()) {
                *y += bb;
            }
        }
    }
    let want = hf_forward(&store, family, prefix, &cfg, x.data(), s);
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in ours.iter().zip(&want) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let err = (num / den).sqrt();
    assert!(err < 1e-5, "{spec}: rel err {err}");
}

#[test]
fn llama_gqa_layout_matches_repeat_kv() {
    matches_family_forward(LLAMA_GQA, HfFamily::Llama, "model.layers.0.self_attn.");
    matches_family_forward(
        "self, heads = 4, gqa = 1, head_dim = 64, hidden = 64, qkv_bias, mask = no_mask",
        HfFamily::Llama,
        "",
    );
}

#[test]
fn gpt2_conv1d_layout_matches() {
    matches_family_forward(GPT2, HfFamily::Gpt2, "h.0.attn.");
}

#[test]
fn bert_layout_matches() {
    matches_family_forward(BERT, HfFamily::Bert, "encoder.layer.0.attention.");
}

fn hf_store(spec: &str, family: HfFamily, prefix: &str) -> Vec<(String, Tensor)> {
    SpecLayer::init(config(spec), 2)
        .unwrap()
        .state_dict_named(prefix, WeightNames::HfFamily(family))
        .unwrap()
}

#[test]
fn detection_from_the_block_prefix_ignores_the_rest_of_the_model() {
    let mut sd = hf_store(LLAMA_GQA, HfFamily::Llama, "model.layers.0.self_attn.");
    sd.push((
        "model.layers.0.mlp.up_proj.weight".into(),
        Tensor::zeros(&[2, 2]),
    ));
    sd.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        Tensor::zeros(&[32]),
    ));
    sd.push((
        "model.layers.1.self_attn.q_proj.weight".into(),
        Tensor::zeros(&[2, 2]),
    ));
    let store = WeightStore::from_tensors(sd);
    let layout = hf::detect(&store, "model.layers.0.").unwrap();
    assert_eq!(layout.family, HfFamily::Llama);
    assert_eq!(layout.prefix, "model.layers.0.self_attn.");
    SpecLayer::load_named(
        config(LLAMA_GQA),
        &store,
        "model.layers.0.",
        WeightNames::Hf,
    )
    .unwrap();

    // GPT-2's causal-mask buffer `attn.bias` is not the layer's.
    let mut sd = hf_store(GPT2, HfFamily::Gpt2, "h.0.attn.");
    sd.push(("h.0.attn.bias".into(), Tensor::zeros(&[1, 1, 4, 4])));
    sd.push(("h.0.ln_1.weight".into(), Tensor::zeros(&[192])));
    let store = WeightStore::from_tensors(sd);
    let (_, l) = SpecLayer::load_named(config(GPT2), &store, "h.0.", WeightNames::Hf).unwrap();
    assert_eq!(l.unwrap().prefix, "h.0.attn.");

    // BERT's post-attention LayerNorm sits under `attention.output` but is not the layer's.
    let mut sd = hf_store(BERT, HfFamily::Bert, "encoder.layer.2.attention.");
    sd.push((
        "encoder.layer.2.attention.output.LayerNorm.weight".into(),
        Tensor::zeros(&[96]),
    ));
    let store = WeightStore::from_tensors(sd);
    let (_, l) =
        SpecLayer::load_named(config(BERT), &store, "encoder.layer.2.", WeightNames::Hf).unwrap();
    assert_eq!(l.unwrap().family, HfFamily::Bert);
}

#[test]
fn missing_key_names_key_and_family() {
    let sd: Vec<_> = hf_store(LLAMA_GQA, HfFamily::Llama, "m.")
        .into_iter()
        .filter(|(k, _)| k != "m.k_proj.weight")
        .collect();
    let store = WeightStore::from_tensors(sd);
    match SpecLayer::load_named(config(LLAMA_GQA), &store, "m.", WeightNames::Hf) {
        Err(AttnError::HfMissingWeight { family, key, .. }) => {
            assert_eq!(family, HfFamily::Llama);
            assert_eq!(key, "m.k_proj.weight");
        }
        other => panic!("expected HfMissingWeight, got {:?}", other.map(|_| ())),
    }
    // A spec with q/k norms over a checkpoint without them.
    let store = WeightStore::from_tensors(hf_store(LLAMA_GQA, HfFamily::Llama, "m."));
    let qk =
        "self, heads = 8, gqa = 2, head_dim = 64, hidden = 96, bias = false, qk_layernorm = rms";
    let e = SpecLayer::load_named(config(qk), &store, "m.", WeightNames::Hf).unwrap_err();
    assert!(
        matches!(&e, AttnError::HfMissingWeight { key, .. } if key == "m.q_norm.weight"),
        "{e}"
    );
    // A forced family absent under the prefix.
    let e = SpecLayer::load_named(
        config(LLAMA_GQA),
        &store,
        "m.",
        WeightNames::HfFamily(HfFamily::Bert),
    )
    .unwrap_err();
    assert!(
        matches!(&e, AttnError::HfMissingWeight { family: HfFamily::Bert, key, .. } if key == "m.self.query.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("bert (BERT/MiniLM)"), "{e}");
}

#[test]
fn extra_key_names_key_and_family() {
    // A checkpoint with biases loaded into a spec without them.
    let store = WeightStore::from_tensors(hf_store(BERT, HfFamily::Bert, "a."));
    let no_bias = "self, heads = 2, head_dim = 64, hidden = 96, bias = false, mask = no_mask";
    let e = SpecLayer::load_named(config(no_bias), &store, "a.", WeightNames::Hf).unwrap_err();
    match &e {
        AttnError::HfExtraWeight {
            family,
            key,
            expected,
        } => {
            assert_eq!(*family, HfFamily::Bert);
            assert_eq!(key, "a.self.query.bias");
            assert!(expected.contains("no qkv bias"), "{expected}");
        }
        other => panic!("expected HfExtraWeight, got {other}"),
    }
    // An unknown tensor under the attention module.
    let mut sd = hf_store(QWEN3, HfFamily::Llama, "l.");
    sd.push(("l.q_proj.lora_A".into(), Tensor::zeros(&[2])));
    let store = WeightStore::from_tensors(sd);
    let e = SpecLayer::load_named(config(QWEN3), &store, "l.", WeightNames::Hf).unwrap_err();
    assert!(
        matches!(&e, AttnError::HfExtraWeight { key, family: HfFamily::Llama, .. } if key == "l.q_proj.lora_A"),
        "{e}"
    );
    // q/k norms in the checkpoint, none in the spec.
    let store = WeightStore::from_tensors(hf_store(QWEN3, HfFamily::Llama, "l."));
    let plain = "self, heads = 4, gqa = 1, head_dim = 64, hidden = 64, bias = false, rope";
    let e = SpecLayer::load_named(config(plain), &store, "l.", WeightNames::Hf).unwrap_err();
    assert!(
        matches!(&e, AttnError::HfExtraWeight { key, .. } if key == "l.q_norm.weight"),
        "{e}"
    );
}

#[test]
fn misshaped_key_names_key_family_and_shapes() {
    // GPT-2 weights given as nn.Linear [out, in] instead of Conv1D [in, out].
    let sd: Vec<_> = hf_store(GPT2, HfFamily::Gpt2, "h.1.attn.")
        .into_iter()
        .map(|(k, t)| {
            if k == "h.1.attn.c_attn.weight" {
                let s = t.shape().to_vec();
                (k, Tensor::zeros(&[s[1], s[0]]))
            } else {
                (k, t)
            }
        })
        .collect();
    let store = WeightStore::from_tensors(sd);
    match SpecLayer::load_named(config(GPT2), &store, "h.1.", WeightNames::Hf) {
        Err(AttnError::HfWeightShape {
            family,
            key,
            expected,
            got,
        }) => {
            assert_eq!(family, HfFamily::Gpt2);
            assert_eq!(key, "h.1.attn.c_attn.weight");
            assert_eq!(expected, vec![192, 576]);
            assert_eq!(got, vec![576, 192]);
        }
        other => panic!("expected HfWeightShape, got {:?}", other.map(|_| ())),
    }
    // A checkpoint with fewer kv heads than the spec says.
    let store = WeightStore::from_tensors(hf_store(LLAMA_GQA, HfFamily::Llama, ""));
    let mha = "self, heads = 8, gqa = 8, head_dim = 64, hidden = 96, bias = false";
    let e = SpecLayer::load_named(config(mha), &store, "", WeightNames::Hf).unwrap_err();
    assert!(
        matches!(&e, AttnError::HfWeightShape { key, expected, got, .. }
            if key == "k_proj.weight" && expected == &vec![512, 96] && got == &vec![128, 96]),
        "{e}"
    );
}

#[test]
fn no_family_and_two_families_are_errors() {
    let store =
        WeightStore::from_tensors(hf_store(BERT, HfFamily::Bert, "encoder.layer.0.attention."));
    let e = SpecLayer::load_named(config(BERT), &store, "encoder.layer.9.", WeightNames::Hf)
        .unwrap_err();
    match &e {
        AttnError::HfFamilyNotFound { prefix, got, .. } => {
            assert_eq!(prefix, "encoder.layer.9.");
            assert_eq!(got, "none");
        }
        other => panic!("expected HfFamilyNotFound, got {other}"),
    }
    // Keys under the prefix but none of a family's: the error lists them.
    let e = hf::detect(&store, "encoder.").unwrap_err();
    assert!(
        e.to_string()
            .contains("encoder.layer.0.attention.self.query.weight"),
        "{e}"
    );
    // Megatron names are not Hugging Face names.
    let meg = SpecLayer::init(config(BERT), 0).unwrap().state_dict("x.");
    let e = hf::detect(&WeightStore::from_tensors(meg), "x.").unwrap_err();
    assert!(matches!(e, AttnError::HfFamilyNotFound { .. }), "{e}");

    let mut sd = hf_store(BERT, HfFamily::Bert, "z.");
    sd.extend(hf_store(BERT, HfFamily::Gpt2, "z."));
    let e = hf::detect(&WeightStore::from_tensors(sd), "z.").unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, got, .. } if arg == "prefix" && got.contains("gpt2") && got.contains("bert")),
        "{e}"
    );
}

#[test]
fn specs_a_family_cannot_express_are_refused() {
    let store = WeightStore::from_tensors(hf_store(BERT, HfFamily::Bert, ""));
    // GQA in BERT.
    let gqa = "self, heads = 2, gqa = 1, head_dim = 64, hidden = 96";
    let e = SpecLayer::load_named(config(gqa), &store, "", WeightNames::Hf).unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "gqa"),
        "{e}"
    );
    // An output gate (no family stores one in these names).
    let gate = "self, heads = 2, head_dim = 64, hidden = 96, output_gate";
    let layer = SpecLayer::init(config(gate), 0).unwrap();
    let e = layer
        .state_dict_named("", WeightNames::HfFamily(HfFamily::Llama))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "output_gate"),
        "{e}"
    );
    // Cross-attention.
    let cross = "cross, heads = 2, head_dim = 64, hidden = 96";
    let layer = SpecLayer::init(config(cross), 0).unwrap();
    let e = layer
        .state_dict_named("", WeightNames::HfFamily(HfFamily::Bert))
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "kind"),
        "{e}"
    );
    // Saving needs a family.
    let e = SpecLayer::init(config(BERT), 0)
        .unwrap()
        .state_dict_named("", WeightNames::Hf)
        .unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, .. } if arg == "names"),
        "{e}"
    );
}

#[test]
fn megatron_names_are_the_default_and_unchanged() {
    assert_eq!(WeightNames::default(), WeightNames::Megatron);
    let layer = SpecLayer::init(config(QWEN3), 4).unwrap();
    let sd = layer
        .state_dict_named("decoder.layers.0.self_attention.", WeightNames::Megatron)
        .unwrap();
    assert_eq!(sd, layer.state_dict("decoder.layers.0.self_attention."));
    let store = WeightStore::from_tensors(sd);
    let (back, layout) = SpecLayer::load_named(
        config(QWEN3),
        &store,
        "decoder.layers.0.self_attention.",
        WeightNames::Megatron,
    )
    .unwrap();
    assert!(layout.is_none());
    assert_eq!(bits(&back.state_dict("")), bits(&layer.state_dict("")));
}

#[test]
fn names_parse_and_print() {
    for (s, n) in [
        ("megatron", WeightNames::Megatron),
        ("hf", WeightNames::Hf),
        ("hf:llama", WeightNames::HfFamily(HfFamily::Llama)),
        ("hf:gpt2", WeightNames::HfFamily(HfFamily::Gpt2)),
        ("hf:bert", WeightNames::HfFamily(HfFamily::Bert)),
    ] {
        assert_eq!(s.parse::<WeightNames>().unwrap(), n);
        assert_eq!(n.to_string(), s);
    }
    assert_eq!(
        "hf:qwen3".parse::<WeightNames>().unwrap(),
        WeightNames::HfFamily(HfFamily::Llama)
    );
    let e = "huggingface".parse::<WeightNames>().unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { arg, got, .. } if arg == "names" && got == "huggingface"),
        "{e}"
    );
    let e = "hf:t5".parse::<WeightNames>().unwrap_err();
    assert!(
        matches!(&e, AttnError::InvalidArgument { got, .. } if got == "t5"),
        "{e}"
    );
}
