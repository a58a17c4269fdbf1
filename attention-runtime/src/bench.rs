//! `attn bench prefill`: times the fast forward kernel ([`crate::cuda::fwd_fast`]) against
//! PyTorch SDPA (flash and cuDNN backends, `scripts/bench_sdpa.py`) on the same shapes.
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

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use attention_codegen::render::{FastTile, KernelConfig, Phase};
use attention_codegen::{DType, MaskType};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;

use crate::cuda::fwd_fast::{FastArgs, FastForward, FastLayout};
use crate::error::{AttnError, Result};
use crate::kernel_cache::{CacheConfig, CacheOrigin, KernelCache};

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
    pub extra_tiles: Vec<(usize, FastTile)>,
    /// Run `python3 <sdpa_script>` for the SDPA baselines (None = skip).
    pub sdpa_script: Option<PathBuf>,
    /// Write the JSON report here.
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
            sdpa_script: Some(PathBuf::from("scripts/bench_sdpa.py")),
            json: None,
        }
    }
}

/// Parse a tile spelled `m<block_m>n<block_n>w<warps>s<stages>` (the key suffix).
pub fn parse_tile(s: &str) -> Result<FastTile> {
    let bad = || AttnError::InvalidArgument {
        arg: "tile".into(),
        expected: "m<block_m>n<block_n>w<warps>s<stages>, e.g. m128n64w4s2".into(),
        got: s.to_string(),
    };
    let rest = s.strip_prefix('m').ok_or_else(bad)?;
    let (m, rest) = rest.split_once('n').ok_or_else(bad)?;
    let (n, rest) = rest.split_once('w').ok_or_else(bad)?;
    let (w, st) = rest.split_once('s').ok_or_else(bad)?;
    let num = |x: &str| x.parse::<usize>().map_err(|_| bad());
    Ok(FastTile {
        block_m: num(m)?,
        block_n: num(n)?,
        warps: num(w)?,
        stages: num(st)?,
    })
}

/// One timed shape of one implementation.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// `fwdfast:<tile>`, `sdpa_flash` or `sdpa_cudnn`.
    pub implementation: String,
    /// Head dim.
    pub head_dim: usize,
    /// Causal (top-left) or no mask.
    pub causal: bool,
    /// Sequence length.
    pub seqlen: usize,
    /// Batch.
    pub batch: usize,
    /// Heads.
    pub heads: usize,
    /// Median milliseconds per launch (NaN when the implementation failed).
    pub ms: f64,
    /// TFLOP/s at the median.
    pub tflops: f64,
}

/// Compile-time report of one kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileTiming {
    /// Kernel key.
    pub key: String,
    /// Cold NVRTC compile, ms.
    pub cold_ms: f64,
    /// Warm start from the disk cache (entry read + module load), ms.
    pub warm_ms: f64,
    /// NVRTC compiles during the warm start (should be 0).
    pub warm_compiles: u64,
    /// Where the cold lookup found the kernel (`Compiled` expected).
    pub cold_origin: String,
    /// Where the warm lookup found it (`Disk` expected).
    pub warm_origin: String,
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

fn cuda_err(call: &str) -> impl FnOnce(cudarc::driver::DriverError) -> AttnError + '_ {
    move |e| AttnError::Cuda {
        call: call.to_string(),
        msg: e.to_string(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn config(head_dim: usize, causal: bool, tile: FastTile) -> KernelConfig {
    let mut c = KernelConfig::new(Phase::ForwardFast, DType::Bf16, head_dim);
    c.mask = Some(if causal {
        MaskType::Causal
    } else {
        MaskType::NoMask
    });
    c.tile = Some(tile);
    c
}

/// Random bf16 device buffer (deterministic pattern, values in about [-1.7, 1.7]).
fn random_bf16(stream: &Arc<CudaStream>, n: usize, seed: u64) -> Result<CudaSlice<bf16>> {
    let mut rng = crate::modules::SplitMix64::new(seed);
    let host: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.uniform() * 1.7))
        .collect();
    stream
        .clone_htod(&host)
        .map_err(cuda_err("clone_htod bench input"))
}

/// Cold compile and warm start of each kernel; `dir` is an empty scratch directory.
fn compile_report(
    ctx: &Arc<CudaContext>,
    arch: &str,
    configs: &[KernelConfig],
    dir: &std::path::Path,
) -> Result<Vec<CompileTiming>> {
    let to_err = |e: crate::jit::JitError| AttnError::Cuda {
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
        let _kernel = FastForward::from_cubin(ctx, c, cubin.bytes.clone())?;
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
    let dev = match crate::device::Device::cuda(0)? {
        crate::device::Device::Cuda(d) => d,
        crate::device::Device::Cpu => {
            return Err(AttnError::BackendUnavailable("no CUDA device".into()))
        }
    };
    let ctx = dev.context.clone();
    let stream = ctx.default_stream();
    let arch = dev.arch();
    for &s in &opts.seqlens {
        if s == 0 || !opts.total_tokens.is_multiple_of(s) {
            return Err(AttnError::InvalidArgument {
                arg: "seqlens".into(),
                expected: format!("divisors of total_tokens = {}", opts.total_tokens),
                got: s.to_string(),
            });
        }
    }
    for &hd in &opts.head_dims {
        if hd == 0 || !opts.hidden.is_multiple_of(hd) {
            return Err(AttnError::InvalidArgument {
                arg: "head_dims".into(),
                expected: format!("divisors of hidden = {}", opts.hidden),
                got: hd.to_string(),
            });
        }
    }

    // Compile report on the default kernels.
    let mut default_cfgs = Vec::new();
    for &hd in &opts.head_dims {
        for causal in [true, false] {
            default_cfgs.push(config(hd, causal, FastTile::for_head_dim(hd)));
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
        let mut tiles = vec![FastTile::for_head_dim(hd)];
        for (h, t) in &opts.extra_tiles {
            if *h == hd && !tiles.contains(t) {
                tiles.push(*t);
            }
        }
        for causal in [true, false] {
            for tile in &tiles {
                let kernel = match FastForward::compile(&ctx, &config(hd, causal, *tile)) {
                    Ok(k) => k,
                    Err(e) => {
                        eprintln!("skipping tile {} for hd {hd}: {e}", tile.key());
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
                            FastArgs {
                                q: &set.q,
                                k: &set.k,
                                v: &set.v,
                                out: &mut out,
                                lse: &mut lse,
                                batch,
                                num_heads: heads,
                                num_groups: heads,
                                layout: FastLayout::Padded {
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
                        implementation: format!("fwdfast:{}", tile.key()),
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
        let join = |v: &[usize]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
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
        std::fs::write(path, to_json(&timings, &compile, &dev.name, &sdpa_note)).map_err(|e| {
            AttnError::Io {
                path: path.display().to_string(),
                source: e,
            }
        })?;
    }
    Ok(table)
}

/// Parse the script's output: one flat JSON object per line with `backend`, `head_dim`,
/// `causal`, `seqlen`, `batch`, `heads`, `ms`, `tflops`. Lines that do not parse are skipped.
pub fn parse_sdpa(text: &str) -> Vec<Timing> {
    let field = |line: &str, name: &str| -> Option<String> {
        let pat = format!("\"{name}\":");
        let start = line.find(&pat)? + pat.len();
        let rest = line[start..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    text.lines()
        .filter_map(|l| {
            let num = |n: &str| field(l, n)?.parse::<f64>().ok();
            let int = |n: &str| field(l, n)?.parse::<usize>().ok();
            Some(Timing {
                implementation: format!("sdpa_{}", field(l, "backend")?),
                head_dim: int("head_dim")?,
                causal: field(l, "causal")? == "true",
                seqlen: int("seqlen")?,
                batch: int("batch")?,
                heads: int("heads")?,
                ms: num("ms").unwrap_or(f64::NAN),
                tflops: num("tflops").unwrap_or(f64::NAN),
            })
        })
        .collect()
}

fn find<'a>(t: &'a [Timing], imp: &str, hd: usize, causal: bool, s: usize) -> Option<&'a Timing> {
    t.iter().find(|x| {
        x.implementation == imp && x.head_dim == hd && x.causal == causal && x.seqlen == s
    })
}

/// The ratio table: per shape, TFLOP/s of the default tile, the best tile, SDPA flash and
/// cuDNN, and ours (best) over each.
pub fn table(t: &[Timing], compile: &[CompileTiming], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    let _ = writeln!(s, "kernel compile: cold NVRTC ms (origin) / warm start: disk cache + module load ms (origin) / NVRTC calls when warm");
    for c in compile {
        let _ = writeln!(
            s,
            "  {:<48} {:>8.1} ({}) {:>8.2} ({}) {}",
            c.key, c.cold_ms, c.cold_origin, c.warm_ms, c.warm_origin, c.warm_compiles
        );
    }
    let _ = writeln!(
        s,
        "| hd | causal | seqlen | batch | fast default | fast best (tile) | sdpa flash | sdpa cudnn | best/flash | best/cudnn |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    let mut shapes: Vec<(usize, bool, usize, usize)> = t
        .iter()
        .filter(|x| x.implementation.starts_with("fwdfast"))
        .map(|x| (x.head_dim, x.causal, x.seqlen, x.batch))
        .collect();
    shapes.dedup();
    shapes.sort_by_key(|x| (x.0, !x.1, x.2));
    shapes.dedup();
    for (hd, causal, sl, batch) in shapes {
        let def = format!("fwdfast:{}", FastTile::for_head_dim(hd).key());
        let d = find(t, &def, hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let best = t
            .iter()
            .filter(|x| {
                x.implementation.starts_with("fwdfast")
                    && x.head_dim == hd
                    && x.causal == causal
                    && x.seqlen == sl
            })
            .max_by(|a, b| {
                a.tflops
                    .partial_cmp(&b.tflops)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        let (bt, bname) = best
            .map(|x| {
                (
                    x.tflops,
                    x.implementation.trim_start_matches("fwdfast:").to_string(),
                )
            })
            .unwrap_or((f64::NAN, String::new()));
        let fl = find(t, "sdpa_flash", hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let cu = find(t, "sdpa_cudnn", hd, causal, sl)
            .map(|x| x.tflops)
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "| {hd} | {causal} | {sl} | {batch} | {d:.1} | {bt:.1} ({bname}) | {fl:.1} | {cu:.1} | {:.2} | {:.2} |",
            bt / fl,
            bt / cu
        );
    }
    s
}

fn json_num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "null".into()
    }
}

fn json_str(x: &str) -> String {
    let mut s = String::from("\"");
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// The JSON report: `{device, timings: [...], compile: [...], sdpa_note}`.
pub fn to_json(t: &[Timing], compile: &[CompileTiming], device: &str, note: &str) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"timings\": [\n");
    for (i, x) in t.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"implementation\": {}, \"head_dim\": {}, \"causal\": {}, \"seqlen\": {}, \"batch\": {}, \"heads\": {}, \"ms\": {}, \"tflops\": {}}}",
            json_str(&x.implementation),
            x.head_dim,
            x.causal,
            x.seqlen,
            x.batch,
            x.heads,
            json_num(x.ms),
            json_num(x.tflops)
        );
        s.push_str(if i + 1 < t.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"compile\": [\n");
    for (i, c) in compile.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"key\": {}, \"cold_ms\": {}, \"cold_origin\": {}, \"warm_ms\": {}, \"warm_origin\": {}, \"warm_nvrtc_calls\": {}}}",
            json_str(&c.key),
            json_num(c.cold_ms),
            json_str(&c.cold_origin),
            json_num(c.warm_ms),
            json_str(&c.warm_origin),
            c.warm_compiles
        );
        s.push_str(if i + 1 < compile.len() { ",\n" } else { "\n" });
    }
    let _ = writeln!(s, "  ],\n  \"sdpa_note\": {}\n}}", json_str(note));
    s
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
            FastTile {
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

    #[test]
    fn sdpa_lines_parse() {
        let text = "noise\n{\"backend\": \"flash\", \"head_dim\": 128, \"causal\": true, \"seqlen\": 2048, \"batch\": 8, \"heads\": 16, \"ms\": 1.5, \"tflops\": 300.25}\n";
        let t = parse_sdpa(text);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].implementation, "sdpa_flash");
        assert_eq!((t[0].head_dim, t[0].causal, t[0].seqlen), (128, true, 2048));
        assert_eq!(t[0].tflops, 300.25);
        let j = to_json(&t, &[], "dev \"x\"", "");
        assert!(j.contains("\"implementation\": \"sdpa_flash\""));
        assert!(j.contains("dev \\\"x\\\""));
    }
}
