//! Device-resident decode (`CudaLayer::decode_device` / `decode_device_into`): device tensors
//! in and out, no synchronization inside, one plan per (cache, slots, batch) reused across
//! steps. Checked against the CPU reference, against the host-tensor `decode` and the CUDA
//! graph (bitwise, same split count), and for its typed errors (raised before anything is
//! queued, the cache untouched).
//! `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh` (CONTRIBUTING.md).

use attention_runtime::cuda::{CudaLayer, DeviceStaticKvCache, DeviceTensor, ElemType};
use attention_runtime::kv_cache::StaticKvCache;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttentionLayer, AttnError, ForwardArgs, Tensor};

mod common;
use common::{bits_equal, fresh_seed, layer_pair, rel_err};

const TOL: f64 = 1e-2;

struct Fixture {
    layer: SpecLayer,
    cuda: CudaLayer,
    elem: ElemType,
    h: usize,
    ng: usize,
    hn: usize,
}

fn fixture(spec: &str, sd: u64) -> Fixture {
    let (layer, cuda) = layer_pair(spec, sd);
    let config = layer.config().clone();
    Fixture {
        layer,
        cuda,
        elem: ElemType::from(config.dtype),
        h: config.hidden,
        ng: config.groups,
        hn: config.head_dim,
    }
}

/// Prefill then `steps` decode steps with device tensors, every step enqueued without a
/// synchronization in between; the outputs are read back at the end and compared with the
/// CPU reference step by step. A second device cache decoded through the host-tensor
/// `decode` and a third through a captured graph give bitwise the same outputs.
fn device_decode_matches(spec: &str, b: usize, s: usize, steps: usize) {
    let sd = fresh_seed();
    eprintln!("seed {sd} spec {spec}");
    let f = fixture(spec, sd);
    let mut rng = SplitMix64::new(sd);
    let st = f.cuda.runtime().stream().clone();
    let max_seq = s + steps + 2;
    let mut cpu = StaticKvCache::new(1, max_seq, b, f.ng, f.hn).unwrap();
    let new_dev = || DeviceStaticKvCache::new(&st, f.elem, 1, max_seq, b, f.ng, f.hn).unwrap();
    let (mut dev, mut dev_host, mut dev_graph) = (new_dev(), new_dev(), new_dev());
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[s, b, f.h], |_| rng.uniform() * 1.7);
    f.layer.prefill(&x, &mut cpu, 0, 0, &args).unwrap();
    for d in [&mut dev, &mut dev_host, &mut dev_graph] {
        f.cuda.prefill(&x, d, 0, 0, &args).unwrap();
        d.advance(0, b, s).unwrap();
    }
    cpu.advance(0, b, s).unwrap();
    // The graph fixes its split count at capture: pin the eager paths to it.
    let mut graph = f.cuda.capture_decode(&dev_graph, 0, 0, b, &args).unwrap();
    f.cuda.set_decode_splits(Some(graph.num_splits())).unwrap();
    let xs: Vec<Tensor> = (0..steps)
        .map(|_| Tensor::from_fn(&[1, b, f.h], |_| rng.uniform() * 1.7))
        .collect();
    let xd: Vec<DeviceTensor> = xs
        .iter()
        .map(|x| DeviceTensor::from_host(&st, x, f.elem).unwrap())
        .collect();
    // All steps queued back to back, no synchronization.
    let mut outs = Vec::new();
    for x in &xd {
        outs.push(f.cuda.decode_device(x, &mut dev, 0, 0, &args).unwrap());
        dev.advance(0, b, 1).unwrap();
    }
    for (step, x) in xs.iter().enumerate() {
        let want = f.layer.decode(x, &mut cpu, 0, 0, &args).unwrap().output;
        cpu.advance(0, b, 1).unwrap();
        let got = outs[step].to_host().unwrap();
        assert_eq!(got.shape(), &[1, b, f.h]);
        let e = rel_err(&got, &want);
        assert!(e <= TOL, "step {step}: rel err {e}");
        let host = f.cuda.decode(x, &mut dev_host, 0, 0, &args).unwrap().output;
        dev_host.advance(0, b, 1).unwrap();
        assert!(
            bits_equal(host.data(), got.data()),
            "step {step}: host decode != device decode"
        );
        let g = graph.replay(x, &mut dev_graph).unwrap().output;
        dev_graph.advance(0, b, 1).unwrap();
        assert!(
            bits_equal(g.data(), got.data()),
            "step {step}: graph replay != device decode"
        );
    }
    f.cuda.set_decode_splits(None).unwrap();
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn device_decode_gqa_rope_qknorm() {
    device_decode_matches(
        "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal",
        3,
        70,
        6,
    );
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn device_decode_window_sinks_gate_mqa() {
    device_decode_matches(
        "self, heads=4, gqa=1, head_dim=64, rope=interleaved, window=(20, 0), sinks=learnable, output_gate, mask=causal",
        2,
        45,
        5,
    );
}

/// `decode_device_into` writes into the caller's buffer; its shape and dtype, the hidden
/// states' shape and dtype, and a full cache are typed errors raised before anything is
/// queued: the cache's lengths and contents stay as they were.
#[test]
#[ignore = "requires a CUDA GPU"]
fn device_decode_errors_leave_cache_untouched() {
    let sd = fresh_seed();
    let spec = "self, heads=4, gqa=2, head_dim=64, rope, mask=causal";
    let f = fixture(spec, sd);
    let st = f.cuda.runtime().stream().clone();
    let (b, s) = (2, 5);
    let mut dev = DeviceStaticKvCache::new(&st, f.elem, 1, s + 1, b, f.ng, f.hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[s, b, f.h], |i| (i % 13) as f32 * 0.05);
    f.cuda.prefill(&x, &mut dev, 0, 0, &args).unwrap();
    dev.advance(0, b, s).unwrap();
    let before = dev.gather_kv_host(0, 0, s).unwrap();
    let step = Tensor::from_fn(&[1, b, f.h], |i| (i % 7) as f32 * 0.1);
    let xd = DeviceTensor::from_host(&st, &step, f.elem).unwrap();
    let mut out = DeviceTensor::uninit(&st, f.elem, &[b, f.h], "out").unwrap();
    // Wrong output shape.
    let mut small = DeviceTensor::uninit(&st, f.elem, &[b, f.h - 1], "out").unwrap();
    let e = f
        .cuda
        .decode_device_into(&xd, &mut small, &mut dev, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "out"),
        "{e}"
    );
    // Wrong hidden dtype.
    let xf = DeviceTensor::from_host(&st, &step, ElemType::F32).unwrap();
    let e = f
        .cuda
        .decode_device_into(&xf, &mut out, &mut dev, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::DType { ref arg, .. } if arg == "hidden"),
        "{e}"
    );
    // Wrong hidden shape: 17 new tokens (a step takes 1 to 16), then a wrong hidden size.
    let bad = DeviceTensor::uninit(&st, f.elem, &[17, b, f.h], "x").unwrap();
    let e = f
        .cuda
        .decode_device_into(&bad, &mut out, &mut dev, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "hidden"),
        "{e}"
    );
    let bad = DeviceTensor::uninit(&st, f.elem, &[1, b, f.h + 1], "x").unwrap();
    let e = f
        .cuda
        .decode_device_into(&bad, &mut out, &mut dev, 0, 0, &args)
        .unwrap_err();
    assert!(
        matches!(e, AttnError::Shape { ref arg, .. } if arg == "hidden"),
        "{e}"
    );
    // Explicit positions are refused (prefill takes them).
    let pos = [0i64, 1];
    let with_pos = ForwardArgs {
        positions: Some(&pos),
        ..ForwardArgs::default()
    };
    let e = f
        .cuda
        .decode_device_into(&xd, &mut out, &mut dev, 0, 0, &with_pos)
        .unwrap_err();
    assert!(matches!(e, AttnError::InvalidArgument { .. }), "{e}");
    // One step fits, the next one does not.
    f.cuda
        .decode_device_into(&xd, &mut out, &mut dev, 0, 0, &args)
        .unwrap();
    dev.advance(0, b, 1).unwrap();
    let full = dev.gather_kv_host(0, 0, s + 1).unwrap();
    let e = f
        .cuda
        .decode_device_into(&xd, &mut out, &mut dev, 0, 0, &args)
        .unwrap_err();
    assert!(matches!(e, AttnError::CacheCapacity { .. }), "{e}");
    assert_eq!(dev.seqlens()[..b], [s + 1, s + 1]);
    let after = dev.gather_kv_host(0, 0, s + 1).unwrap();
    assert!(bits_equal(after.0.data(), full.0.data()) && bits_equal(after.1.data(), full.1.data()));
    assert!(bits_equal(
        &full.0.data()[..before.0.numel()],
        before.0.data()
    ));
}

/// `forward_paged_device` (device tensors, asynchronous) equals the host-tensor
/// `forward_paged` bitwise on a mixed batch (a decode row and a prefill chunk straddling
/// blocks), and rejects a hidden tensor of the wrong dtype before touching the pool.
#[test]
#[ignore = "requires a CUDA GPU"]
fn paged_device_equals_host() {
    use attention_runtime::cuda::DevicePagedKvCache;
    use attention_runtime::kv_cache::{BlockTable, PagedBatch};
    let sd = fresh_seed();
    let spec = "self, heads=8, gqa=2, head_dim=128, qk_layernorm=rms, rope, mask=causal";
    eprintln!("seed {sd} spec {spec}");
    let f = fixture(spec, sd);
    let st = f.cuda.runtime().stream().clone();
    let (bs, blocks) = (16, 32);
    let pool = || DevicePagedKvCache::new(&st, f.elem, 1, blocks, bs, f.ng, f.hn).unwrap();
    let (mut a, mut b) = (pool(), pool());
    let mut table = BlockTable::new(2, 8).unwrap();
    for r in 0..2 {
        let ids = a.allocator_mut().alloc(4).unwrap();
        assert_eq!(b.allocator_mut().alloc(4).unwrap(), ids);
        table.set_row(r, &ids).unwrap();
    }
    let mut rng = SplitMix64::new(sd);
    // Step 1: prefill 21 and 40 tokens; step 2: a decode row and a 13-token chunk.
    for (cu, lens) in [([0, 21, 61], [21, 40]), ([0, 1, 14], [22, 53])] {
        let t = cu[2] as usize;
        let x = Tensor::from_fn(&[t, f.h], |_| rng.uniform() * 1.7);
        let batch = PagedBatch {
            cu_seqlens_q: &cu,
            seqlens_k: &lens,
            block_table: &table,
        };
        let host = f.cuda.forward_paged(&x, &mut a, 0, &batch).unwrap().output;
        let xd = DeviceTensor::from_host(&st, &x, f.elem).unwrap();
        let dev = f
            .cuda
            .forward_paged_device(&xd, &mut b, 0, &batch)
            .unwrap()
            .to_host()
            .unwrap();
        assert!(
            bits_equal(host.data(), dev.data()),
            "device paged != host paged"
        );
        let xf = DeviceTensor::from_host(&st, &x, ElemType::F32).unwrap();
        let e = f
            .cuda
            .forward_paged_device(&xf, &mut b, 0, &batch)
            .unwrap_err();
        assert!(
            matches!(e, AttnError::DType { ref arg, .. } if arg == "hidden"),
            "{e}"
        );
    }
}

/// A static cache of another element type is a typed error naming `cache` on every cache
/// path (prefill, device prefill, decode), raised before anything is written.
#[test]
#[ignore = "requires a CUDA GPU"]
fn cache_of_another_dtype_is_refused() {
    let sd = fresh_seed();
    let f = fixture("self, heads=4, gqa=2, head_dim=64, rope, mask=causal", sd);
    let st = f.cuda.runtime().stream().clone();
    let mut cache = DeviceStaticKvCache::new(&st, ElemType::F16, 1, 8, 1, f.ng, f.hn).unwrap();
    let args = ForwardArgs::default();
    let x = Tensor::from_fn(&[2, 1, f.h], |i| (i % 5) as f32 * 0.1);
    let is_cache_dtype =
        |e: &AttnError| matches!(e, AttnError::DType { arg, .. } if arg == "cache");
    let e = f.cuda.prefill(&x, &mut cache, 0, 0, &args).unwrap_err();
    assert!(is_cache_dtype(&e), "{e}");
    let xd = DeviceTensor::from_host(&st, &x, f.elem).unwrap();
    let e = f
        .cuda
        .prefill_device(&xd, &mut cache, 0, 0, &args)
        .unwrap_err();
    assert!(is_cache_dtype(&e), "{e}");
    let step = Tensor::from_fn(&[1, 1, f.h], |i| (i % 3) as f32 * 0.1);
    let e = f.cuda.decode(&step, &mut cache, 0, 0, &args).unwrap_err();
    assert!(is_cache_dtype(&e), "{e}");
    assert_eq!(cache.seqlens()[0], 0);
}
