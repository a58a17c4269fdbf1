//! A caller's stream and a caller's buffers: `CudaRuntime::with_stream` + `set_runtime` run a
//! layer's device calls on another stream with bitwise the same results, and
//! `DeviceTensorRef` / `DeviceTensorMut` read and write a caller's cudarc views without
//! copies. `#[ignore = "requires a CUDA GPU"]`; run through `scripts/gpu-bundle.sh`.

use attention_runtime::cuda::{
    CudaLayer, CudaRuntime, DeviceStaticKvCache, DeviceTensor, DeviceTensorMut, DeviceTensorRef,
    ElemType,
};
use attention_runtime::device::CudaDevice;
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttnError, Device, ForwardArgs, RuntimeDims, Tensor};
use half::bf16;

mod common;
use common::gpu;

const SPEC: &str =
    "self, heads = 8, gqa = 2, head_dim = 128, qk_layernorm = rms, rope, mask = causal";

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut g = SplitMix64::new(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| g.uniform()).collect()).unwrap()
}

fn layers(dev: &CudaDevice) -> (CudaLayer, CudaLayer) {
    let config = SpecLayer::config_from_str(SPEC, &RuntimeDims::default()).unwrap();
    let layer = SpecLayer::init(config, 77).unwrap();
    (
        CudaLayer::new(&layer, dev).unwrap(),
        CudaLayer::new(&layer, dev).unwrap(),
    )
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn a_caller_stream_gives_bitwise_the_default_stream_results() {
    let dev = gpu();
    let (default, mut mine) = layers(&dev);
    let stream = dev.context.new_stream().unwrap();
    let rt = CudaRuntime::get(&dev)
        .unwrap()
        .with_stream(stream.clone())
        .unwrap();
    mine.set_runtime(rt.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(mine.runtime().stream(), &stream));
    let h = default.config().hidden;
    let x = rand(&[64, 2, h], 1);
    let xd = DeviceTensor::from_host(CudaRuntime::get(&dev).unwrap().stream(), &x, ElemType::Bf16)
        .unwrap();
    let xm = DeviceTensor::from_host(&stream, &x, ElemType::Bf16).unwrap();
    let want = default
        .forward_device(&xd, &ForwardArgs::default())
        .unwrap()
        .0
        .to_host()
        .unwrap();
    let got = mine
        .forward_device(&xm, &ForwardArgs::default())
        .unwrap()
        .0
        .to_host()
        .unwrap();
    assert_eq!(got, want);
    // Prefill + decode on the caller's stream, with a cache made on it.
    let mut c1 =
        DeviceStaticKvCache::new(default.runtime().stream(), ElemType::Bf16, 1, 64, 2, 2, 128)
            .unwrap();
    let mut c2 = DeviceStaticKvCache::new(&stream, ElemType::Bf16, 1, 64, 2, 2, 128).unwrap();
    let p = rand(&[9, 2, h], 2);
    let a = default
        .prefill(&p, &mut c1, 0, 0, &ForwardArgs::default())
        .unwrap();
    let b = mine
        .prefill(&p, &mut c2, 0, 0, &ForwardArgs::default())
        .unwrap();
    assert_eq!(a.output, b.output);
    c1.advance(0, 2, 9).unwrap();
    c2.advance(0, 2, 9).unwrap();
    for step in 0..3 {
        let d = rand(&[1, 2, h], 10 + step);
        let a = default
            .decode(&d, &mut c1, 0, 0, &ForwardArgs::default())
            .unwrap();
        let b = mine
            .decode(&d, &mut c2, 0, 0, &ForwardArgs::default())
            .unwrap();
        assert_eq!(a.output, b.output, "decode step {step}");
        c1.advance(0, 2, 1).unwrap();
        c2.advance(0, 2, 1).unwrap();
    }
}

#[test]
#[ignore = "requires a CUDA GPU"]
fn a_caller_s_views_are_read_and_written_in_place() {
    let dev = gpu();
    let (layer, _) = layers(&dev);
    let rt = layer.runtime().clone();
    let st = rt.stream().clone();
    let h = layer.config().hidden;
    let x = rand(&[16, 1, h], 3);
    let host_bf16: Vec<bf16> = x.data().iter().map(|&v| bf16::from_f32(v)).collect();
    // A caller's buffer with one extra leading row; the view skips it.
    let mut buf = st.alloc_zeros::<bf16>((16 + 1) * h).unwrap();
    st.memcpy_htod(&host_bf16, &mut buf.slice_mut(h..)).unwrap();
    let want = {
        let xd = DeviceTensor::from_host(&st, &x, ElemType::Bf16).unwrap();
        layer
            .forward_device(&xd, &ForwardArgs::default())
            .unwrap()
            .0
            .to_host()
            .unwrap()
    };
    let view = buf.slice(h..);
    let wrapped = DeviceTensorRef::new(&rt, &view, &[16, 1, h]).unwrap();
    let got = layer
        .forward_device(&wrapped, &ForwardArgs::default())
        .unwrap()
        .0
        .to_host()
        .unwrap();
    drop(wrapped);
    assert_eq!(got, want);
    // The caller's buffer is still theirs (not freed, unchanged).
    let back = st.clone_dtoh(&buf).unwrap();
    assert_eq!(&back[h..], &host_bf16[..]);

    // Decode into a caller's output view.
    let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, 32, 1, 2, 128).unwrap();
    let mut cache2 = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, 32, 1, 2, 128).unwrap();
    let d = rand(&[1, 1, h], 4);
    let dd = DeviceTensor::from_host(&st, &d, ElemType::Bf16).unwrap();
    let want = layer
        .decode_device(&dd, &mut cache, 0, 0, &ForwardArgs::default())
        .unwrap()
        .to_host()
        .unwrap();
    let mut out = st.alloc_zeros::<bf16>(h).unwrap();
    {
        let mut view = out.slice_mut(..);
        let mut o = DeviceTensorMut::new(&rt, &mut view, &[1, 1, h]).unwrap();
        layer
            .decode_device_into(&dd, &mut o, &mut cache2, 0, 0, &ForwardArgs::default())
            .unwrap();
    }
    let got: Vec<f32> = st
        .clone_dtoh(&out)
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    assert_eq!(got, want.data());

    // A view shorter than the shape is a typed error.
    let short = buf.slice(..h);
    match DeviceTensorRef::new(&rt, &short, &[2, 1, h]) {
        Err(AttnError::InvalidArgument { arg, .. }) => assert_eq!(arg, "slice"),
        Err(e) => panic!("expected InvalidArgument, got {e}"),
        Ok(_) => panic!("expected an error"),
    };
    // The refused wrap left the caller's buffer alone (not freed, unchanged).
    let back = st.clone_dtoh(&buf).unwrap();
    assert_eq!(&back[h..], &host_bf16[..]);
    st.synchronize().unwrap();
}

/// Tensors and caches of another GPU are typed errors before anything is queued. Needs two
/// GPUs (run on the two-GPU machine); with one it says so and checks nothing.
#[test]
#[ignore = "requires two CUDA GPUs"]
fn tensors_and_caches_of_another_device_are_typed_errors() {
    let Ok(Device::Cuda(other)) = Device::cuda(1) else {
        eprintln!("SKIPPED: one GPU only; this test needs two");
        return;
    };
    let dev = gpu();
    let (layer, _) = layers(&dev);
    let h = layer.config().hidden;
    let st1 = CudaRuntime::get(&other).unwrap().stream().clone();
    let x = DeviceTensor::from_host(&st1, &rand(&[4, 1, h], 5), ElemType::Bf16).unwrap();
    let wrong_device = |e: AttnError, arg: &str| match e {
        AttnError::InvalidArgument { arg: a, got, .. } => {
            assert_eq!(a, arg);
            assert!(got.contains("device 1"), "{got}");
        }
        e => panic!("expected InvalidArgument on {arg}, got {e}"),
    };
    wrong_device(
        layer
            .forward_device(&x, &ForwardArgs::default())
            .unwrap_err(),
        "hidden",
    );
    let st0 = layer.runtime().stream().clone();
    let mut cache0 = DeviceStaticKvCache::new(&st0, ElemType::Bf16, 1, 16, 1, 2, 128).unwrap();
    wrong_device(
        layer
            .prefill_device(&x, &mut cache0, 0, 0, &ForwardArgs::default())
            .unwrap_err(),
        "hidden",
    );
    assert_eq!(cache0.seqlens(), &[0]);
    let mut cache1 = DeviceStaticKvCache::new(&st1, ElemType::Bf16, 1, 16, 1, 2, 128).unwrap();
    let x0 = DeviceTensor::from_host(&st0, &rand(&[4, 1, h], 6), ElemType::Bf16).unwrap();
    wrong_device(
        layer
            .prefill_device(&x0, &mut cache1, 0, 0, &ForwardArgs::default())
            .unwrap_err(),
        "cache",
    );
    let d1 = DeviceTensor::from_host(&st1, &rand(&[1, 1, h], 7), ElemType::Bf16).unwrap();
    wrong_device(
        layer
            .decode_device(&d1, &mut cache0, 0, 0, &ForwardArgs::default())
            .unwrap_err(),
        "hidden",
    );
}
