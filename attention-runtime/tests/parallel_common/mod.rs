//! Shared by the parallel tests (`parallel_*.rs`): layers with small head dims, random
//! tensors, running N ranks on threads, and the comparison.
#![allow(dead_code)]

use std::time::Duration;

use attention_runtime::modules::SplitMix64;
use attention_runtime::parallel::{run_ranks, InProcessComm};
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{LayerConfig, Result, RuntimeDims, Tensor};

/// How long a rank waits for a peer in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// f32 tolerance on the largest absolute difference, relative to the largest magnitude of
/// the single-rank result.
pub const TOL: f32 = 1e-5;

/// The config of `spec`. Small head dims (`head_dim=N` below the grammar's 32) are set on the
/// parsed spec: the CPU reference takes any.
pub fn config(spec: &str) -> LayerConfig {
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
    let mut sp =
        attention_codegen::parse_spec(&format!("{}, head_dim=32", items.join(","))).unwrap();
    if let Some(hd) = hd {
        sp.head_dims = vec![hd];
    }
    LayerConfig::new(&sp, &RuntimeDims::default()).unwrap()
}

/// A layer of `spec` with seeded random weights.
pub fn layer(spec: &str, seed: u64) -> SpecLayer {
    SpecLayer::init(config(spec), seed).unwrap()
}

/// Uniform in `[-amp, amp)`.
pub fn rand_t(rng: &mut SplitMix64, shape: &[usize], amp: f32) -> Tensor {
    Tensor::from_fn(shape, |_| rng.uniform() * amp)
}

/// Run `f` on `n` ranks (threads) and unwrap every rank's result, naming the rank.
pub fn ranks<T: Send>(n: usize, f: impl Fn(InProcessComm) -> Result<T> + Sync) -> Vec<T> {
    run_ranks(n, TIMEOUT, f)
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

/// Largest `|got - want|` over the largest `|want|` (at least 1).
pub fn rel_max_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.shape(), want.shape(), "shapes");
    let scale = want.data().iter().fold(1f32, |m, x| m.max(x.abs()));
    let diff = got
        .data()
        .iter()
        .zip(want.data())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    if got.data().iter().any(|x| !x.is_finite()) {
        return f32::INFINITY;
    }
    diff / scale
}

/// Assert `got` equals `want` within [`TOL`].
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_max_err(got, want);
    assert!(e <= TOL, "{what}: relative max error {e} > {TOL}");
}
