//! `attn bench backward`: times the attention backward ([`attention_runtime::cuda::backward`]:
//! preprocess D = rowsum(dO ∘ O), dK/dV, dQ) against PyTorch SDPA's flash and cuDNN backward
//! (`scripts/bench_sdpa.py --mode backward`) on the same shapes, in the same run.
//!
//! Shapes: as `attn bench prefill`'s: head dims × {causal, non-causal} × seqlens at a fixed
//! token count (batch = `total_tokens / seqlen`), `heads = hidden / head_dim` (GQA-free),
//! bf16, padded layout `[s, b, h, d]`, self-attention. FLOPs = 2.5 × the forward's
//! (`4 · b · h · s² · d`, halved for causal).
//!
//! What is timed: the forward kernel ([`PrefillSm80Kernel`]) writes O and the LSE for every
//! input set once per shape, untimed; then CUDA events bracket each
//! [`AttentionBackward::launch`] (the D preprocess, dK/dV and dQ kernels, plus the stream
//! allocation of its f32 D scratch), after `warmup` launches, median of `reps`. Inputs
//! (q, k, v, O, dO) rotate over enough sets that each launch reads tensors that are not in L2.
//! The SDPA side times `torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)` on a
//! forward run once outside the timed region: SDPA's own backward, its preprocess included.

use std::path::PathBuf;
use std::process::Command;

use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use attention_codegen::{DType, MaskType};
use attention_runtime::cuda::backward::{AttentionBackward, BwdArgs, BwdLayout};
use attention_runtime::cuda::prefill_sm80::{PrefillArgs, PrefillLayout, PrefillSm80Kernel};
use attention_runtime::{AttnError, Result};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaSlice;
use half::bf16;

use super::backward_report::{panels, table, to_json};
use super::chart::write_report;
use super::common::{cuda_device, cuda_err, join, median, random_bf16};
use super::prefill_report::{parse_sdpa, Timing};

/// Implementation name of our backward in the report: the default, fast mode (the fused
/// kernel; dQ by f32 atomics).
pub const OURS: &str = "attn_backward";
/// Our deterministic mode (dK/dV and dQ kernels, no atomics).
pub const OURS_DET: &str = "attn_backward_deterministic";

/// Options of `attn bench backward`.
#[derive(Debug, Clone)]
pub struct BackwardOptions {
    /// Head dims to time.
    pub head_dims: Vec<usize>,
    /// Sequence lengths.
    pub seqlens: Vec<usize>,
    /// Tokens per launch (batch = total / seqlen).
    pub total_tokens: usize,
    /// Model width: heads = hidden / head_dim.
    pub hidden: usize,
    /// Timed launches per shape (median reported).
    pub reps: usize,
    /// Untimed launches first.
    pub warmup: usize,
    /// Run `python3 <sdpa_script> --mode backward` for the SDPA baselines (None = skip).
    pub sdpa_script: Option<PathBuf>,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<PathBuf>,
}

impl Default for BackwardOptions {
    fn default() -> Self {
        BackwardOptions {
            head_dims: vec![64, 128, 256],
            seqlens: vec![2048, 4096, 8192, 16384],
            total_tokens: 16384,
            hidden: 2048,
            reps: 10,
            warmup: 3,
            sdpa_script: Some(PathBuf::from("scripts/bench_sdpa.py")),
            json: None,
        }
    }
}

/// FLOPs of one backward: 2.5 × the forward's `4 · b · h · s² · d` (halved for causal).
pub fn backward_flops(
    batch: usize,
    heads: usize,
    seqlen: usize,
    head_dim: usize,
    causal: bool,
) -> f64 {
    2.5 * super::prefill::flops(batch, heads, seqlen, head_dim, causal)
}

fn mask_of(causal: bool) -> MaskType {
    if causal {
        MaskType::Causal
    } else {
        MaskType::NoMask
    }
}

fn forward_config(head_dim: usize, causal: bool) -> KernelConfig {
    let mut c = KernelConfig::new(Phase::PrefillSm80, DType::Bf16, head_dim);
    c.mask = Some(mask_of(causal));
    c.tile = Some(PrefillTile::for_head_dim(head_dim));
    c
}

/// One input set: q, k, v and dO, and the forward's O and LSE of that q, k, v.
struct Set {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    dout: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
}

fn check_divisors(arg: &str, of: &str, total: usize, vals: &[usize]) -> Result<()> {
    for &x in vals {
        if x == 0 || !total.is_multiple_of(x) {
            return Err(AttnError::InvalidArgument {
                arg: arg.into(),
                expected: format!("divisors of {of} = {total}"),
                got: x.to_string(),
            });
        }
    }
    Ok(())
}

/// Time every shape; returns the ratio table (and writes the JSON and SVG).
pub fn run_backward(opts: &BackwardOptions) -> Result<String> {
    let dev = cuda_device()?;
    let ctx = dev.context.clone();
    let stream = ctx.default_stream();
    check_divisors(
        "--seqlens",
        "--total-tokens",
        opts.total_tokens,
        &opts.seqlens,
    )?;
    check_divisors("--head-dims", "--hidden", opts.hidden, &opts.head_dims)?;

    let n = opts.total_tokens * opts.hidden;
    let min_hd = opts.head_dims.iter().min().copied().unwrap_or(64);
    let n_lse = opts.total_tokens * (opts.hidden / min_hd);
    let l2 = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(cuda_err("L2 size"))? as usize;
    // q, k, v, O, dO (bf16) per set.
    let set_bytes = 5 * n * 2;
    let sets = (4 * l2).div_ceil(set_bytes).max(2);
    let mut inputs: Vec<Set> = (0..sets as u64)
        .map(|i| {
            Ok(Set {
                q: random_bf16(&stream, n, 4 * i + 1)?,
                k: random_bf16(&stream, n, 4 * i + 2)?,
                v: random_bf16(&stream, n, 4 * i + 3)?,
                dout: random_bf16(&stream, n, 4 * i + 4)?,
                out: stream.alloc_zeros(n).map_err(cuda_err("alloc out"))?,
                lse: stream.alloc_zeros(n_lse).map_err(cuda_err("alloc lse"))?,
            })
        })
        .collect::<Result<_>>()?;
    let mut dq: CudaSlice<bf16> = stream.alloc_zeros(n).map_err(cuda_err("alloc dq"))?;
    let mut dk: CudaSlice<bf16> = stream.alloc_zeros(n).map_err(cuda_err("alloc dk"))?;
    let mut dv: CudaSlice<bf16> = stream.alloc_zeros(n).map_err(cuda_err("alloc dv"))?;

    let mut timings: Vec<Timing> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    for &hd in &opts.head_dims {
        let heads = opts.hidden / hd;
        let scale = 1.0 / (hd as f32).sqrt();
        for causal in [true, false] {
            let kernels =
                PrefillSm80Kernel::compile(&ctx, &forward_config(hd, causal)).and_then(|f| {
                    AttentionBackward::new(&ctx, DType::Bf16, hd, mask_of(causal), false, false)
                        .map(|b| (f, b))
                });
            let (fwd, bwd) = match kernels {
                Ok(k) => k,
                Err(e) => {
                    let note = format!("hd {hd} causal={causal}: kernels unavailable: {e}");
                    eprintln!("{note}");
                    notes.push(note);
                    continue;
                }
            };
            // Which fused kernel "ours" is (sm80, sm90, an opt-in sm90 variant).
            let note = format!(
                "hd {hd} causal={causal}: fast mode runs {}",
                bwd.fused_key().unwrap_or("the deterministic pair")
            );
            eprintln!("{note}");
            notes.push(note);
            for &s in &opts.seqlens {
                for (imp, deterministic) in [(OURS, false), (OURS_DET, true)] {
                    let batch = opts.total_tokens / s;
                    // A failed launch (e.g. an argument the kernels refuse) is a note and a
                    // NaN row, not the end of the sweep.
                    let mut time_shape = || -> Result<f64> {
                        let layout = PrefillLayout::Padded {
                            seqlen_q: s,
                            seqlen_k: s,
                        };
                        // O and LSE of every set, untimed.
                        for set in inputs.iter_mut() {
                            fwd.launch(
                                &stream,
                                PrefillArgs {
                                    q: &set.q,
                                    k: &set.k,
                                    v: &set.v,
                                    out: &mut set.out,
                                    lse: &mut set.lse,
                                    batch,
                                    num_heads: heads,
                                    num_groups: heads,
                                    layout,
                                    softmax_scale: scale,
                                    window: (-1, -1),
                                    sinks: None,
                                    gate: None,
                                    max_logit: None,
                                },
                            )?;
                        }
                        let mut ms = Vec::with_capacity(opts.reps);
                        for it in 0..opts.warmup + opts.reps {
                            let set = &inputs[it % sets];
                            let start = stream
                                .record_event(Some(CU_EVENT_DEFAULT))
                                .map_err(cuda_err("record event"))?;
                            bwd.launch(
                                &stream,
                                BwdArgs {
                                    q: &set.q,
                                    k: &set.k,
                                    v: &set.v,
                                    out: &set.out,
                                    lse: &set.lse,
                                    deterministic,
                                    dout: &set.dout,
                                    dq: &mut dq,
                                    dk: &mut dk,
                                    dv: &mut dv,
                                    batch,
                                    num_heads: heads,
                                    num_groups: heads,
                                    layout: BwdLayout::Padded {
                                        seqlen_q: s,
                                        seqlen_k: s,
                                    },
                                    softmax_scale: scale,
                                    window: (-1, -1),
                                    sinks: None,
                                    dsinks: None,
                                    mask: None,
                                    bias: None,
                                    dbias: None,
                                },
                            )?;
                            let end = stream
                                .record_event(Some(CU_EVENT_DEFAULT))
                                .map_err(cuda_err("record event"))?;
                            let t = start.elapsed_ms(&end).map_err(cuda_err("backward run"))?;
                            if it >= opts.warmup {
                                ms.push(t as f64);
                            }
                        }
                        Ok(median(ms))
                    };
                    let m = time_shape().unwrap_or_else(|e| {
                        let note = format!("hd {hd} causal={causal} s{s} {imp}: {e}");
                        eprintln!("{note}");
                        notes.push(note);
                        f64::NAN
                    });
                    timings.push(Timing {
                        implementation: imp.into(),
                        head_dim: hd,
                        causal,
                        seqlen: s,
                        batch,
                        heads,
                        ms: m,
                        tflops: backward_flops(batch, heads, s, hd, causal) / (m * 1e-3) / 1e12,
                    });
                }
            }
        }
    }
    drop(inputs);
    drop((dq, dk, dv));
    stream.synchronize().map_err(cuda_err("synchronize"))?;

    // SDPA baselines in the same command.
    if let Some(script) = &opts.sdpa_script {
        let res = Command::new("python3")
            .arg(script)
            .args(["--mode", "backward"])
            .args(["--head-dims", &join(&opts.head_dims)])
            .args(["--seqlens", &join(&opts.seqlens)])
            .args(["--total-tokens", &opts.total_tokens.to_string()])
            .args(["--hidden", &opts.hidden.to_string()])
            .args(["--reps", &opts.reps.to_string()])
            .args(["--warmup", &opts.warmup.to_string()])
            .output();
        match res {
            Ok(o) => {
                // Per-shape failures go to stderr while the other lines still parse.
                timings.extend(parse_sdpa(&String::from_utf8_lossy(&o.stdout)));
                let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                if !o.status.success() {
                    notes.push(format!(
                        "bench_sdpa.py --mode backward failed ({}): {err}",
                        o.status
                    ));
                } else if !err.is_empty() {
                    notes.push(format!("bench_sdpa.py: {err}"));
                }
            }
            Err(e) => notes.push(format!("could not run python3 {}: {e}", script.display())),
        }
    }
    let note = notes.join("\n");
    if !note.is_empty() {
        eprintln!("{note}");
    }

    let table = table(&timings, &dev.name);
    if let Some(path) = &opts.json {
        write_report(
            path,
            &to_json(&timings, &dev.name, &note),
            &format!(
                "attn bench backward: attention backward vs SDPA ({})",
                dev.name
            ),
            &panels(&timings),
            2,
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_flops_are_two_and_a_half_forwards() {
        assert_eq!(
            backward_flops(2, 3, 4, 5, false),
            2.5 * 4.0 * 2.0 * 3.0 * 16.0 * 5.0
        );
        assert_eq!(
            backward_flops(2, 3, 4, 5, true),
            2.5 * 2.0 * 2.0 * 3.0 * 16.0 * 5.0
        );
        // hd 128, 16 heads, one 16k sequence, causal: 2.5 * 2 * 16 * 16384^2 * 128.
        let f = backward_flops(1, 16, 16384, 128, true);
        assert!((f - 2.5 * 2.0 * 16.0 * 16384f64.powi(2) * 128.0).abs() < 1.0);
    }

    #[test]
    fn divisors_are_checked() {
        assert!(check_divisors("seqlens", "total_tokens", 16384, &[2048, 16384]).is_ok());
        for bad in [0, 3000] {
            assert!(matches!(
                check_divisors("seqlens", "total_tokens", 16384, &[bad]),
                Err(AttnError::InvalidArgument { .. })
            ));
        }
    }
}
