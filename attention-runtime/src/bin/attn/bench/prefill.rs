//! `attn bench prefill`: times the `prefill_*_sm80` kernel
//! ([`attention_runtime::cuda::prefill_sm80`]) against PyTorch SDPA (flash and cuDNN backends,
//! `scripts/bench_sdpa.py`) on the same shapes.
//!
//! Shapes: head dims × {causal, non-causal} × seqlens at a fixed token count (batch =
//! `total_tokens / seqlen`), `heads = 2048 / head_dim` (hidden 2048), bf16, padded layout
//! `[s, b, h, d]`, self-attention (`sq == sk`, heads == groups). FLOPs = `4 · b · h · s² · d`,
//! halved for causal. Timing: CUDA events around each launch, after `warmup` launches, median
//! of `reps`; inputs rotate over enough sets that each launch reads q/k/v that are not in L2
//! (every set is larger than the L2 cache, and at least two sets are used).
//!
//! It also reports the cold NVRTC compile time of each kernel and the warm start (a fresh
//! [`KernelCache`] on the directory the cold run filled: disk load + module load, zero NVRTC
//! calls).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use attention_codegen::render::{KernelConfig, Phase, PrefillTile};
use attention_codegen::{DType, MaskType};
use attention_runtime::cuda::prefill_sm80::{PrefillArgs, PrefillLayout, PrefillSm80Kernel};
use attention_runtime::jit::JitError;
use attention_runtime::kernel_cache::{CacheConfig, CacheOrigin, KernelCache};
use attention_runtime::{AttnError, Result};
use cudarc::driver::{CudaContext, CudaSlice};
use half::bf16;

use super::chart::write_report;
use super::common::{cuda_device, cuda_err, join, median, random_bf16};
use super::prefill_report::{panels, parse_sdpa, table, to_json, CompileTiming, Timing};

/// Options of `attn bench prefill`.
#[derive(Debug, Clone)]
pub struct PrefillOptions {
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
    /// Extra tiles to time per head dim (besides the default), `(head_dim, tile)`.
    pub extra_tiles: Vec<(usize, PrefillTile)>,
    /// Extra Hopper-kernel tiles per head dim, timed where this device runs `prefill_sm90`.
    pub extra_tiles_sm90: Vec<(usize, PrefillTile)>,
    /// Run `python3 <sdpa_script>` for the SDPA baselines (None = skip).
    pub sdpa_script: Option<PathBuf>,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<PathBuf>,
}

impl Default for PrefillOptions {
    fn default() -> Self {
        PrefillOptions {
            head_dims: vec![64, 128, 256],
            seqlens: vec![512, 1024, 2048, 4096, 8192, 16384],
            total_tokens: 16384,
            hidden: 2048,
            reps: 20,
            warmup: 5,
            extra_tiles: Vec::new(),
            extra_tiles_sm90: Vec::new(),
            sdpa_script: Some(PathBuf::from("scripts/bench_sdpa.py")),
            json: None,
        }
    }
}

/// Parse a tile spelled `m<block_m>n<block_n>w<warps>s<stages>` (the key suffix).
pub fn parse_tile(s: &str) -> Result<PrefillTile> {
    let bad = || AttnError::InvalidArgument {
        arg: "--tiles".into(),
        expected: "m<block_m>n<block_n>w<warps>s<stages>, e.g. m128n64w4s2".into(),
        got: s.to_string(),
    };
    let rest = s.strip_prefix('m').ok_or_else(bad)?;
    let (m, rest) = rest.split_once('n').ok_or_else(bad)?;
    let (n, rest) = rest.split_once('w').ok_or_else(bad)?;
    let (w, st) = rest.split_once('s').ok_or_else(bad)?;
    let num = |x: &str| x.parse::<usize>().map_err(|_| bad());
    Ok(PrefillTile {
        block_m: num(m)?,
        block_n: num(n)?,
        warps: num(w)?,
        stages: num(st)?,
    })
}

/// FLOPs of one forward: `4 · b · h · s² · d`, halved for causal.
pub fn flops(batch: usize, heads: usize, seqlen: usize, head_dim: usize, causal: bool) -> f64 {
    let f = 4.0 * batch as f64 * heads as f64 * (seqlen as f64).powi(2) * head_dim as f64;
    if causal {
        f / 2.0
    } else {
        f
    }
}

fn config(head_dim: usize, causal: bool, tile: PrefillTile) -> KernelConfig {
    config_of(Phase::PrefillSm80, head_dim, causal, tile)
}

/// The Hopper kernel's default config, when the registry runs it on this device.
fn config_sm90(arch: &str, head_dim: usize, causal: bool) -> Option<KernelConfig> {
    let target = attention_codegen::registry::Target::from_arch(arch).ok()?;
    let c = config_of(
        Phase::PrefillSm90,
        head_dim,
        causal,
        PrefillTile::for_head_dim_sm90(head_dim, false),
    );
    attention_codegen::registry::prefill_sm90(&c, target).map(|mut c| {
        c.tile = None;
        c.tile = Some(c.prefill_tile());
        c
    })
}

fn config_of(phase: Phase, head_dim: usize, causal: bool, tile: PrefillTile) -> KernelConfig {
    let mut c = KernelConfig::new(phase, DType::Bf16, head_dim);
    c.mask = Some(if causal {
        MaskType::Causal
    } else {
        MaskType::NoMask
    });
    c.tile = Some(tile);
    c
}

/// Cold compile and warm start of each kernel; `dir` is an empty scratch directory.
fn compile_report(
    ctx: &Arc<CudaContext>,
    arch: &str,
    configs: &[KernelConfig],
    dir: &std::path::Path,
) -> Result<Vec<CompileTiming>> {
    let to_err = |e: JitError| AttnError::Cuda {
        call: "kernel cache".into(),
        msg: e.to_string(),
    };
    let cold_cache = KernelCache::new(CacheConfig::new(Some(dir.to_path_buf())));
    let mut out = Vec::new();
    for c in configs {
        let src = c.render().map_err(|e| AttnError::Render(e.to_string()))?;
        let t0 = Instant::now();
        let (_, origin) = cold_cache
            .lookup(&src.key, &src.source, arch)
            .map_err(to_err)?;
        let cold_ms = t0.elapsed().as_secs_f64() * 1e3;
        if origin != CacheOrigin::Compiled {
            tracing::warn!("{}: expected a cold compile, got {origin:?}", src.key);
        }
        // A fresh cache (as a new process would have) on the same directory.
        let warm_cache = KernelCache::new(CacheConfig::new(Some(dir.to_path_buf())));
        let t1 = Instant::now();
        let (cubin, warm_origin) = warm_cache
            .lookup(&src.key, &src.source, arch)
            .map_err(to_err)?;
        let _kernel = PrefillSm80Kernel::from_cubin(ctx, c, cubin.bytes.clone())?;
        let warm_ms = t1.elapsed().as_secs_f64() * 1e3;
        out.push(CompileTiming {
            key: src.key,
            cold_ms,
            warm_ms,
            warm_compiles: warm_cache.stats().compiles,
            cold_origin: format!("{origin:?}"),
            warm_origin: format!("{warm_origin:?}"),
        });
    }
    Ok(out)
}

struct Inputs {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

/// Time every shape; returns the timings (ours and, when the script ran, SDPA's) and the
/// compile report, prints the ratio table and writes the JSON.
pub fn run_prefill(opts: &PrefillOptions) -> Result<String> {
    let dev = cuda_device()?;
    let ctx = dev.context.clone();
    let stream = ctx.default_stream();
    let arch = dev.arch();
    for &s in &opts.seqlens {
        if s == 0 || !opts.total_tokens.is_multiple_of(s) {
            return Err(AttnError::InvalidArgument {
                arg: "--seqlens".into(),
                expected: format!("divisors of --total-tokens = {}", opts.total_tokens),
                got: s.to_string(),
            });
        }
    }
    for &hd in &opts.head_dims {
        if hd == 0 || !opts.hidden.is_multiple_of(hd) {
            return Err(AttnError::InvalidArgument {
                arg: "--head-dims".into(),
                expected: format!("divisors of hidden = {}", opts.hidden),
                got: hd.to_string(),
            });
        }
    }

    // Compile report on the default kernels.
    let mut default_cfgs = Vec::new();
    for &hd in &opts.head_dims {
        for causal in [true, false] {
            default_cfgs.push(config(hd, causal, PrefillTile::for_head_dim(hd)));
            default_cfgs.extend(config_sm90(&arch, hd, causal));
        }
    }
    let scratch = std::env::temp_dir().join(format!("attn-bench-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(|e| AttnError::Io {
        path: scratch.display().to_string(),
        source: e,
    })?;
    let compile = compile_report(&ctx, &arch, &default_cfgs, &scratch);
    let _ = std::fs::remove_dir_all(&scratch);
    let compile = compile?;

    // Inputs: the largest shape needs total_tokens * hidden elements per tensor.
    let n = opts.total_tokens * opts.hidden;
    let l2 = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(cuda_err("L2 size"))? as usize;
    let set_bytes = 3 * n * 2;
    let sets = (4 * l2).div_ceil(set_bytes).max(2);
    let inputs: Vec<Inputs> = (0..sets as u64)
        .map(|i| {
            Ok(Inputs {
                q: random_bf16(&stream, n, 3 * i + 1)?,
                k: random_bf16(&stream, n, 3 * i + 2)?,
                v: random_bf16(&stream, n, 3 * i + 3)?,
            })
        })
        .collect::<Result<_>>()?;
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(n).map_err(cuda_err("alloc out"))?;
    let mut lse: CudaSlice<f32> = stream
        .alloc_zeros(
            opts.total_tokens * (opts.hidden / opts.head_dims.iter().min().copied().unwrap_or(64)),
        )
        .map_err(cuda_err("alloc lse"))?;

    let mut timings: Vec<Timing> = Vec::new();
    for &hd in &opts.head_dims {
        let heads = opts.hidden / hd;
        let mut tiles = vec![PrefillTile::for_head_dim(hd)];
        for (h, t) in &opts.extra_tiles {
            if *h == hd && !tiles.contains(t) {
                tiles.push(*t);
            }
        }
        for causal in [true, false] {
            // The sm80 tiles, then the Hopper kernel where this device runs it.
            let mut runs: Vec<(String, KernelConfig)> = tiles
                .iter()
                .map(|t| (format!("prefill_sm80:{}", t.key()), config(hd, causal, *t)))
                .collect();
            // (Extra Hopper tiles run on any wgmma device, also at head dims where the
            // registry does not choose the Hopper kernel.)
            let default_tile = config_sm90(&arch, hd, causal).map(|c| {
                let t = c.prefill_tile();
                runs.push((format!("prefill_sm90:{}", t.key()), c));
                t
            });
            let wgmma = matches!(
                attention_codegen::registry::Target::from_arch(&arch),
                Ok(attention_codegen::registry::Target::Device { wgmma: true, .. })
            );
            for (_, t) in opts
                .extra_tiles_sm90
                .iter()
                .filter(|(h, t)| wgmma && *h == hd && Some(*t) != default_tile)
            {
                let c = config_of(Phase::PrefillSm90, hd, causal, *t);
                runs.push((format!("prefill_sm90:{}", t.key()), c));
            }
            for (label, cfg) in &runs {
                let kernel = match PrefillSm80Kernel::compile(&ctx, cfg) {
                    Ok(k) => k,
                    Err(e) => {
                        eprintln!("skipping {label} for hd {hd}: {e}");
                        continue;
                    }
                };
                for &s in &opts.seqlens {
                    let batch = opts.total_tokens / s;
                    let mut ms = Vec::with_capacity(opts.reps);
                    for it in 0..opts.warmup + opts.reps {
                        let set = &inputs[it % sets];
                        let start = stream
                            .record_event(Some(
                                cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                            ))
                            .map_err(cuda_err("record event"))?;
                        kernel.launch(
                            &stream,
                            PrefillArgs {
                                q: &set.q,
                                k: &set.k,
                                v: &set.v,
                                out: &mut out,
                                lse: &mut lse,
                                batch,
                                num_heads: heads,
                                num_groups: heads,
                                layout: PrefillLayout::Padded {
                                    seqlen_q: s,
                                    seqlen_k: s,
                                },
                                softmax_scale: 1.0 / (hd as f32).sqrt(),
                                window: (-1, -1),
                                sinks: None,
                                gate: None,
                                max_logit: None,
                            },
                        )?;
                        let end = stream
                            .record_event(Some(
                                cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                            ))
                            .map_err(cuda_err("record event"))?;
                        let t = start.elapsed_ms(&end).map_err(cuda_err("kernel run"))?;
                        if it >= opts.warmup {
                            ms.push(t as f64);
                        }
                    }
                    let m = median(ms);
                    timings.push(Timing {
                        implementation: label.clone(),
                        head_dim: hd,
                        causal,
                        seqlen: s,
                        batch,
                        heads,
                        ms: m,
                        tflops: flops(batch, heads, s, hd, causal) / (m * 1e-3) / 1e12,
                    });
                }
            }
        }
    }
    drop(inputs);
    drop(out);
    drop(lse);
    stream.synchronize().map_err(cuda_err("synchronize"))?;

    // SDPA baselines in the same command.
    let mut sdpa_note = String::new();
    if let Some(script) = &opts.sdpa_script {
        let res = Command::new("python3")
            .arg(script)
            .args(["--head-dims", &join(&opts.head_dims)])
            .args(["--seqlens", &join(&opts.seqlens)])
            .args(["--total-tokens", &opts.total_tokens.to_string()])
            .args(["--hidden", &opts.hidden.to_string()])
            .args(["--reps", &opts.reps.to_string()])
            .args(["--warmup", &opts.warmup.to_string()])
            .output();
        match res {
            Ok(o) if o.status.success() => {
                timings.extend(parse_sdpa(&String::from_utf8_lossy(&o.stdout)));
            }
            Ok(o) => {
                sdpa_note = format!(
                    "bench_sdpa.py failed ({}): {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            Err(e) => sdpa_note = format!("could not run python3 {}: {e}", script.display()),
        }
        if !sdpa_note.is_empty() {
            eprintln!("{sdpa_note}");
        }
    }

    let table = table(&timings, &compile, &dev.name);
    if let Some(path) = &opts.json {
        write_report(
            path,
            &to_json(&timings, &compile, &dev.name, &sdpa_note),
            &format!(
                "attn bench prefill: prefill_sm80 / prefill_sm90 vs SDPA ({})",
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
    fn flops_formula() {
        assert_eq!(flops(2, 3, 4, 5, false), 4.0 * 2.0 * 3.0 * 16.0 * 5.0);
        assert_eq!(flops(2, 3, 4, 5, true), 2.0 * 2.0 * 3.0 * 16.0 * 5.0);
    }

    #[test]
    fn tiles_parse_and_reject() {
        assert_eq!(
            parse_tile("m128n64w4s2").unwrap(),
            PrefillTile {
                block_m: 128,
                block_n: 64,
                warps: 4,
                stages: 2
            }
        );
        for bad in ["", "m128", "128n64w4s2", "m128n64w4sx"] {
            assert!(matches!(
                parse_tile(bad),
                Err(AttnError::InvalidArgument { .. })
            ));
        }
    }
}
