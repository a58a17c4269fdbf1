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

// ---------------------------------------------------------------------------------------
// `attn bench decode`
// ---------------------------------------------------------------------------------------

/// Options of `attn bench decode`: the fused decode step (`flashdec` split + merge: rope of
/// the new q/k, KV append, split-KV attention, LSE merge) against PyTorch SDPA's flash
/// backend, one new token per sequence over a cache already holding `ctx` tokens.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Cached tokens per sequence (the new token goes at position `ctx`).
    pub contexts: Vec<usize>,
    /// Sequences per step.
    pub batches: Vec<usize>,
    /// Query heads.
    pub heads: usize,
    /// KV groups.
    pub groups: usize,
    /// Head dim.
    pub head_dim: usize,
    /// Shapes whose K+V cache (one set) exceeds this many bytes are skipped.
    pub max_cache_bytes: usize,
    /// Timed steps per shape (median reported).
    pub reps: usize,
    /// Untimed steps first.
    pub warmup: usize,
    /// Steps queued behind one blocker copy (see [`run_decode`]).
    pub chunk: usize,
    /// Run `python3 <sdpa_script> --mode decode` for the SDPA flash baseline (None = skip).
    pub sdpa_script: Option<PathBuf>,
    /// Write the JSON report here.
    pub json: Option<PathBuf>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            contexts: vec![8192, 32768],
            batches: vec![1, 4, 16],
            heads: 32,
            groups: 8,
            head_dim: 128,
            max_cache_bytes: 8 << 30,
            reps: 50,
            warmup: 10,
            chunk: 10,
            sdpa_script: Some(PathBuf::from("scripts/bench_sdpa.py")),
            json: None,
        }
    }
}

/// Bytes one decode step must move (bf16): the K and V cache read once
/// (`ctx · groups · hd · 2 B` each per sequence) plus q and out (`heads · hd` each) and the
/// new k and v (`groups · hd` each) per sequence.
pub fn decode_bytes(batch: usize, ctx: usize, heads: usize, groups: usize, hd: usize) -> f64 {
    let per_seq = 2 * ctx * groups * hd * 2 + (2 * heads + 2 * groups) * hd * 2;
    (batch * per_seq) as f64
}

/// One timed decode shape of one implementation (`flashdec` or `sdpa_flash`).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeTiming {
    /// `flashdec` or `sdpa_flash`.
    pub implementation: String,
    /// Sequences.
    pub batch: usize,
    /// Cached tokens per sequence.
    pub ctx: usize,
    /// Bytes counted for one step ([`decode_bytes`]).
    pub bytes: f64,
    /// Median microseconds per step (NaN when the implementation failed).
    pub us: f64,
    /// [`decode_bytes`] over the median time, GB/s (1e9 B/s).
    pub gbps: f64,
    /// KV splits (`flashdec`; 0 otherwise).
    pub splits: usize,
    /// `native` / `repeat_interleave` (SDPA's GQA path), empty for ours.
    pub gqa: String,
    /// Chunks where the host had not queued every step before the blocker finished (their
    /// numbers then include host gaps); 0 expected.
    pub host_behind: usize,
}

/// A device-to-device copy measurement (bytes read + written).
#[derive(Debug, Clone, PartialEq)]
pub struct CopyCeiling {
    /// Who measured it (`cuMemcpyDtoD` here, `torch copy_` from the script).
    pub source: String,
    /// Bytes read + written per copy.
    pub bytes: usize,
    /// Median ms per copy.
    pub ms: f64,
    /// GB/s.
    pub gbps: f64,
}

/// Queue `n` steps in chunks of `chunk`, each chunk behind `blocker` (long device work, so
/// the GPU runs the chunk's steps back to back while the host queues them), with an event
/// between steps; returns per-step ms and the number of chunks where the blocker had already
/// finished when the last step was queued (the host fell behind).
fn time_queued(
    stream: &Arc<CudaStream>,
    n: usize,
    chunk: usize,
    blocker: &mut dyn FnMut() -> Result<()>,
    step: &mut dyn FnMut(usize) -> Result<()>,
) -> Result<(Vec<f64>, usize)> {
    let ctx = stream.context();
    let flag = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let chunk = chunk.max(1);
    let (mut times, mut behind, mut i) = (Vec::with_capacity(n), 0usize, 0usize);
    while i < n {
        let m = chunk.min(n - i);
        let events = (0..=m)
            .map(|_| ctx.new_event(flag))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(cuda_err("cuEventCreate"))?;
        blocker()?;
        events[0].record(stream).map_err(cuda_err("record event"))?;
        for j in 0..m {
            step(i + j)?;
            events[j + 1]
                .record(stream)
                .map_err(cuda_err("record event"))?;
        }
        if events[0]
            .try_is_complete()
            .map_err(cuda_err("cuEventQuery"))?
        {
            behind += 1;
        }
        for w in events.windows(2) {
            times.push(w[0].elapsed_ms(&w[1]).map_err(cuda_err("decode step"))? as f64);
        }
        i += m;
    }
    Ok((times, behind))
}

/// Fill `dst` with copies of pieces of `src` starting at offsets drawn from `seed` (random
/// contents that differ between buffers, without a host round trip of the whole cache).
fn fill_from(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<bf16>,
    dst: &mut CudaSlice<bf16>,
    seed: u64,
) -> Result<()> {
    let piece = src.len() / 2;
    let mut rng = crate::modules::SplitMix64::new(seed);
    let mut at = 0;
    while at < dst.len() {
        let len = piece.min(dst.len() - at);
        let off = ((rng.uniform().abs() * piece as f32) as usize).min(src.len() - len);
        stream
            .memcpy_dtod(&src.slice(off..off + len), &mut dst.slice_mut(at..at + len))
            .map_err(cuda_err("memcpy_dtod cache fill"))?;
        at += len;
    }
    Ok(())
}

fn raw<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    use cudarc::driver::DevicePtr;
    let (p, _sync) = s.device_ptr(stream);
    p
}

struct DecodeSet {
    q: CudaSlice<bf16>,
    k_new: CudaSlice<bf16>,
    v_new: CudaSlice<bf16>,
    k_cache: CudaSlice<bf16>,
    v_cache: CudaSlice<bf16>,
}

/// Time the fused decode step on every shape (rope half over all channels, bf16, cache
/// layout `[ctx + 1, batch, groups, hd]`, every sequence at position `ctx`), then run the
/// SDPA script in decode mode; prints the ratio table and writes the JSON.
///
/// Timing: each chunk of `chunk` steps is queued behind two 1 GiB device-to-device copies,
/// so the steps run back to back on the GPU (launch cost hidden, as under graph replay or a
/// busy serving loop); CUDA events between steps; median of `reps` after `warmup`; the step
/// rotates over enough cache sets (at least 2) that 4 × L2 is touched between reuses.
pub fn run_decode(opts: &DecodeOptions) -> Result<String> {
    use crate::cuda::decode::{flash_decode_kernels, launch_flash_decode, num_splits};
    use crate::cuda::decode::{FlashDecodeArgs, RopeTables};
    use attention_codegen::RopeMode;

    let bad = |arg: &str, expected: &str, got: String| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got,
    };
    if opts.groups == 0 || opts.heads == 0 || !opts.heads.is_multiple_of(opts.groups) {
        return Err(bad(
            "heads",
            "a positive multiple of groups",
            format!("heads {} groups {}", opts.heads, opts.groups),
        ));
    }
    if opts.contexts.contains(&0) || opts.batches.contains(&0) {
        return Err(bad(
            "contexts/batches",
            "positive values",
            format!("{:?} / {:?}", opts.contexts, opts.batches),
        ));
    }
    if opts.reps == 0 {
        return Err(bad("reps", "at least 1", "0".into()));
    }
    let dev = match crate::device::Device::cuda(0)? {
        crate::device::Device::Cuda(d) => d,
        crate::device::Device::Cpu => {
            return Err(AttnError::BackendUnavailable("no CUDA device".into()))
        }
    };
    let rt = crate::cuda::CudaRuntime::get(&dev)?;
    let stream = rt.stream().clone();
    let ctx = dev.context.clone();
    let (heads, groups, hd) = (opts.heads, opts.groups, opts.head_dim);
    let l2 = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(cuda_err("L2 size"))? as usize;
    let sms = crate::cuda::decode::sm_count(&rt)?;

    // Copy ceiling + blocker buffers: 1 GiB each.
    let cn = 1usize << 29;
    let csrc = random_bf16(&stream, 1 << 24, 7)?;
    let mut big_src: CudaSlice<bf16> = stream.alloc_zeros(cn).map_err(cuda_err("alloc copy"))?;
    fill_from(&stream, &csrc, &mut big_src, 8)?;
    let mut big_dst: CudaSlice<bf16> = stream.alloc_zeros(cn).map_err(cuda_err("alloc copy"))?;
    let copy_once = |dst: &mut CudaSlice<bf16>| {
        stream
            .memcpy_dtod(&big_src, dst)
            .map_err(cuda_err("memcpy_dtod copy ceiling"))
    };
    // The blocker and the copy measurement share `big_dst`; a RefCell lets both closures
    // write it (they never run at the same time).
    let big_dst_cell = std::cell::RefCell::new(&mut big_dst);
    let mut blocker = || -> Result<()> {
        let mut d = big_dst_cell.borrow_mut();
        copy_once(&mut d)?;
        copy_once(&mut d)
    };
    let (ct, _) = time_queued(
        &stream,
        opts.warmup + opts.reps,
        opts.chunk,
        &mut || -> Result<()> {
            let mut d = big_dst_cell.borrow_mut();
            copy_once(&mut d)
        },
        &mut |_| -> Result<()> {
            let mut d = big_dst_cell.borrow_mut();
            copy_once(&mut d)
        },
    )?;
    let cms = median(ct[opts.warmup.min(ct.len())..].to_vec());
    let mut ceilings = vec![CopyCeiling {
        source: "cuMemcpyDtoD".into(),
        bytes: 2 * cn * 2,
        ms: cms,
        gbps: (2 * cn * 2) as f64 / (cms * 1e-3) / 1e9,
    }];

    // Rope tables (half, all channels, theta 10000) for every position used.
    let max_ctx = opts.contexts.iter().copied().max().unwrap_or(1);
    let rows = max_ctx + 1;
    let half = hd / 2;
    let (mut cs, mut sn) = (vec![0f32; rows * half], vec![0f32; rows * half]);
    for p in 0..rows {
        for f in 0..half {
            let a = p as f64 * 10000f64.powf(-2.0 * f as f64 / hd as f64);
            cs[p * half + f] = a.cos() as f32;
            sn[p * half + f] = a.sin() as f32;
        }
    }
    let tables = RopeTables::new(&stream, &cs, &sn, rows, 1.0)?;
    drop((cs, sn));

    let mut cfg = KernelConfig::new(Phase::FlashDecode, DType::Bf16, hd);
    cfg.rope = Some((RopeMode::Half, hd));
    let (key, split_f, merge_f) = flash_decode_kernels(&rt, &cfg)?;

    let mut timings: Vec<DecodeTiming> = Vec::new();
    for &c in &opts.contexts {
        for &b in &opts.batches {
            let cache_elems = (c + 1) * b * groups * hd;
            let cache_bytes = 2 * cache_elems * 2;
            if cache_bytes > opts.max_cache_bytes {
                eprintln!(
                    "skipping ctx {c} batch {b}: K+V cache {cache_bytes} B > {} B",
                    opts.max_cache_bytes
                );
                continue;
            }
            let sets = (4 * l2).div_ceil(cache_bytes).max(2);
            let mut data = Vec::with_capacity(sets);
            for i in 0..sets as u64 {
                let mut k_cache: CudaSlice<bf16> = stream
                    .alloc_zeros(cache_elems)
                    .map_err(cuda_err("alloc k cache"))?;
                let mut v_cache: CudaSlice<bf16> = stream
                    .alloc_zeros(cache_elems)
                    .map_err(cuda_err("alloc v cache"))?;
                fill_from(&stream, &csrc, &mut k_cache, 100 + 2 * i)?;
                fill_from(&stream, &csrc, &mut v_cache, 101 + 2 * i)?;
                data.push(DecodeSet {
                    q: random_bf16(&stream, b * heads * hd, 10 * i + 1)?,
                    k_new: random_bf16(&stream, b * groups * hd, 10 * i + 2)?,
                    v_new: random_bf16(&stream, b * groups * hd, 10 * i + 3)?,
                    k_cache,
                    v_cache,
                });
            }
            let splits = num_splits(sms, b, groups, c + 1);
            let lens = stream
                .clone_htod(&vec![c as i32; b])
                .map_err(cuda_err("clone_htod cache_seqlens"))?;
            let o_part: CudaSlice<f32> = stream
                .alloc_zeros(splits * b * heads * hd)
                .map_err(cuda_err("alloc o_part"))?;
            let lse_part: CudaSlice<f32> = stream
                .alloc_zeros(splits * b * heads)
                .map_err(cuda_err("alloc lse_part"))?;
            let lse: CudaSlice<f32> = stream
                .alloc_zeros(heads * b)
                .map_err(cuda_err("alloc lse"))?;
            // Poisoned output: every element must be written by the merge kernel.
            let out = stream
                .clone_htod(&vec![bf16::from_f32(f32::NAN); b * heads * hd])
                .map_err(cuda_err("clone_htod out"))?;
            let args: Vec<FlashDecodeArgs> = data
                .iter()
                .map(|d| FlashDecodeArgs {
                    q: raw(&d.q, &stream),
                    k_new: raw(&d.k_new, &stream),
                    v_new: raw(&d.v_new, &stream),
                    k_cache: raw(&d.k_cache, &stream),
                    v_cache: raw(&d.v_cache, &stream),
                    cache_seqlens: raw(&lens, &stream),
                    rope_cos: raw(&tables.cos, &stream),
                    rope_sin: raw(&tables.sin, &stream),
                    o_part: raw(&o_part, &stream),
                    lse_part: raw(&lse_part, &stream),
                    out: raw(&out, &stream),
                    lse: raw(&lse, &stream),
                    sinks: 0,
                    gate: 0,
                    batch: b as i32,
                    batch_offset: 0,
                    max_batch: b as i32,
                    num_heads: heads as i32,
                    num_groups: groups as i32,
                    num_splits: splits as i32,
                    softmax_scale: 1.0 / (hd as f32).sqrt(),
                    window_left: -1,
                    window_right: -1,
                })
                .collect();
            let mut step =
                |i: usize| launch_flash_decode(&stream, &key, &split_f, &merge_f, &args[i % sets]);
            step(0)?;
            let host_out = stream
                .clone_dtoh(&out)
                .map_err(cuda_err("clone_dtoh out"))?;
            stream.synchronize().map_err(cuda_err("decode check"))?;
            if host_out.iter().any(|x| !x.to_f32().is_finite()) {
                return Err(AttnError::Cuda {
                    call: format!("{key} (ctx {c}, batch {b})"),
                    msg: "the output holds NaN/inf or unwritten elements".into(),
                });
            }
            let (t, behind) = time_queued(
                &stream,
                opts.warmup + opts.reps,
                opts.chunk,
                &mut blocker,
                &mut step,
            )?;
            let ms = median(t[opts.warmup.min(t.len())..].to_vec());
            timings.push(DecodeTiming {
                implementation: "flashdec".into(),
                batch: b,
                ctx: c,
                bytes: decode_bytes(b, c, heads, groups, hd),
                us: ms * 1e3,
                gbps: decode_bytes(b, c, heads, groups, hd) / (ms * 1e-3) / 1e9,
                splits,
                gqa: String::new(),
                host_behind: behind,
            });
            drop(args);
            drop(data);
        }
    }
    drop((big_src, big_dst, csrc, tables));
    stream.synchronize().map_err(cuda_err("synchronize"))?;

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
            .args(["--mode", "decode"])
            .args(["--contexts", &join(&opts.contexts)])
            .args(["--batches", &join(&opts.batches)])
            .args(["--heads", &heads.to_string()])
            .args(["--groups", &groups.to_string()])
            .args(["--head-dim", &hd.to_string()])
            .args(["--max-cache-bytes", &opts.max_cache_bytes.to_string()])
            .args(["--reps", &opts.reps.to_string()])
            .args(["--warmup", &opts.warmup.to_string()])
            .args(["--chunk", &opts.chunk.to_string()])
            .output();
        match res {
            Ok(o) => {
                let text = String::from_utf8_lossy(&o.stdout);
                let (t, c) = parse_sdpa_decode(&text);
                timings.extend(t);
                ceilings.extend(c);
                let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                if !o.status.success() {
                    sdpa_note = format!("bench_sdpa.py failed ({}): {err}", o.status);
                } else if !err.is_empty() {
                    sdpa_note = err;
                }
            }
            Err(e) => sdpa_note = format!("could not run python3 {}: {e}", script.display()),
        }
        if !sdpa_note.is_empty() {
            eprintln!("{sdpa_note}");
        }
    }
    let table = decode_table(&timings, &ceilings, &dev.name);
    if let Some(path) = &opts.json {
        std::fs::write(
            path,
            decode_json(&timings, &ceilings, &dev.name, &sdpa_note),
        )
        .map_err(|e| AttnError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
    }
    Ok(table)
}

/// Parse the script's decode output: one flat JSON object per line; `"backend": "copy"`
/// lines give a [`CopyCeiling`] (`bytes`, `ms`, `gbps`), `"backend": "flash"` lines a
/// [`DecodeTiming`] (`batch`, `ctx`, `us`, `gbps`, `gqa`, `host_behind`; null numbers become
/// NaN / 0). Lines that do not parse are skipped.
pub fn parse_sdpa_decode(text: &str) -> (Vec<DecodeTiming>, Vec<CopyCeiling>) {
    let field = |line: &str, name: &str| -> Option<String> {
        let pat = format!("\"{name}\":");
        let start = line.find(&pat)? + pat.len();
        let rest = line[start..].trim_start();
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    let (mut t, mut c) = (Vec::new(), Vec::new());
    for l in text.lines() {
        let num = |n: &str| field(l, n).and_then(|x| x.parse::<f64>().ok());
        let int = |n: &str| field(l, n).and_then(|x| x.parse::<usize>().ok());
        match field(l, "backend").as_deref() {
            Some("copy") => {
                if let (Some(bytes), Some(ms)) = (int("bytes"), num("ms")) {
                    c.push(CopyCeiling {
                        source: "torch copy_".into(),
                        bytes,
                        ms,
                        gbps: num("gbps").unwrap_or(f64::NAN),
                    });
                }
            }
            Some(be) => {
                if let (Some(batch), Some(ctx)) = (int("batch"), int("ctx")) {
                    t.push(DecodeTiming {
                        implementation: format!("sdpa_{be}"),
                        batch,
                        ctx,
                        bytes: num("bytes").unwrap_or(f64::NAN),
                        us: num("us").unwrap_or(f64::NAN),
                        gbps: num("gbps").unwrap_or(f64::NAN),
                        splits: 0,
                        gqa: field(l, "gqa").unwrap_or_default(),
                        host_behind: int("host_behind").unwrap_or(0),
                    });
                }
            }
            None => {}
        }
    }
    (t, c)
}

/// The decode table: per (ctx, batch), ours and SDPA flash in µs and GB/s, ours / SDPA, and
/// each as a share of the measured copy bandwidth.
pub fn decode_table(t: &[DecodeTiming], ceilings: &[CopyCeiling], device: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "device: {device}");
    for c in ceilings {
        let _ = writeln!(
            s,
            "copy ceiling ({}, {} MiB read+written): {:.0} GB/s ({:.3} ms)",
            c.source,
            c.bytes >> 20,
            c.gbps,
            c.ms
        );
    }
    let ceil = ceilings.first().map_or(f64::NAN, |c| c.gbps);
    let _ = writeln!(
        s,
        "| ctx | batch | MB moved | flashdec µs | flashdec GB/s | splits | sdpa flash µs | sdpa flash GB/s | sdpa gqa | ours/sdpa | ours % copy | sdpa % copy |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut shapes: Vec<(usize, usize)> = t.iter().map(|x| (x.ctx, x.batch)).collect();
    shapes.sort();
    shapes.dedup();
    for (c, b) in shapes {
        let get = |imp: &str| {
            t.iter()
                .find(|x| x.implementation == imp && x.ctx == c && x.batch == b)
        };
        let ours = get("flashdec");
        let sd = get("sdpa_flash");
        let (ou, og, sp) = ours.map_or((f64::NAN, f64::NAN, 0), |x| (x.us, x.gbps, x.splits));
        let (su, sg) = sd.map_or((f64::NAN, f64::NAN), |x| (x.us, x.gbps));
        let gqa = sd.map_or("-", |x| x.gqa.as_str());
        let behind: usize = ours.map_or(0, |x| x.host_behind) + sd.map_or(0, |x| x.host_behind);
        let mb = ours.or(sd).map_or(f64::NAN, |x| x.bytes / 1e6);
        let _ = writeln!(
            s,
            "| {c} | {b} | {mb:.1} | {ou:.1} | {og:.0} | {sp} | {su:.1} | {sg:.0} | {gqa} | {:.2} | {:.0}% | {:.0}% |{}",
            og / sg,
            100.0 * og / ceil,
            100.0 * sg / ceil,
            if behind > 0 {
                format!(" (host behind in {behind} chunks)")
            } else {
                String::new()
            }
        );
    }
    s
}

/// The decode JSON report: `{device, copy: [...], timings: [...], sdpa_note}`.
pub fn decode_json(
    t: &[DecodeTiming],
    ceilings: &[CopyCeiling],
    device: &str,
    note: &str,
) -> String {
    let mut s = String::from("{\n");
    let _ = writeln!(s, "  \"device\": {},", json_str(device));
    s.push_str("  \"copy\": [\n");
    for (i, c) in ceilings.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"source\": {}, \"bytes\": {}, \"ms\": {}, \"gbps\": {}}}",
            json_str(&c.source),
            c.bytes,
            json_num(c.ms),
            json_num(c.gbps)
        );
        s.push_str(if i + 1 < ceilings.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n  \"timings\": [\n");
    for (i, x) in t.iter().enumerate() {
        let _ = write!(
            s,
            "    {{\"implementation\": {}, \"ctx\": {}, \"batch\": {}, \"bytes\": {}, \"us\": {}, \"gbps\": {}, \"splits\": {}, \"gqa\": {}, \"host_behind\": {}}}",
            json_str(&x.implementation),
            x.ctx,
            x.batch,
            json_num(x.bytes),
            json_num(x.us),
            json_num(x.gbps),
            x.splits,
            json_str(&x.gqa),
            x.host_behind
        );
        s.push_str(if i + 1 < t.len() { ",\n" } else { "\n" });
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

    #[test]
    fn decode_bytes_formula() {
        // K+V: 2 * 8192 * 8 * 128 * 2 B; q, out: 32 * 128 * 2 B each; new k, v: 8 * 128 * 2 B each.
        let per = 2.0 * 8192.0 * 8.0 * 128.0 * 2.0 + (64.0 + 16.0) * 128.0 * 2.0;
        assert_eq!(decode_bytes(1, 8192, 32, 8, 128), per);
        assert_eq!(decode_bytes(4, 8192, 32, 8, 128), 4.0 * per);
    }

    #[test]
    fn sdpa_decode_lines_parse() {
        let text = "warn\n{\"backend\": \"copy\", \"bytes\": 2147483648, \"ms\": 0.7, \"gbps\": 3067.8, \"host_behind\": 0}\n{\"backend\": \"flash\", \"batch\": 4, \"ctx\": 8192, \"heads\": 32, \"groups\": 8, \"head_dim\": 128, \"gqa\": \"native\", \"us\": 52.5, \"gbps\": 2557.1, \"host_behind\": 0, \"bytes\": 134299648}\n{\"backend\": \"flash\", \"batch\": 16, \"ctx\": 32768, \"heads\": 32, \"groups\": 8, \"head_dim\": 128, \"gqa\": \"native\", \"us\": null, \"gbps\": null, \"host_behind\": null, \"bytes\": 1}\n";
        let (t, c) = parse_sdpa_decode(text);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].bytes, 2147483648);
        assert_eq!(c[0].gbps, 3067.8);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].implementation, "sdpa_flash");
        assert_eq!((t[0].batch, t[0].ctx, t[0].us), (4, 8192, 52.5));
        assert_eq!(t[0].gqa, "native");
        assert!(t[1].us.is_nan() && t[1].gbps.is_nan());
        let ours = DecodeTiming {
            implementation: "flashdec".into(),
            batch: 4,
            ctx: 8192,
            bytes: decode_bytes(4, 8192, 32, 8, 128),
            us: 45.0,
            gbps: decode_bytes(4, 8192, 32, 8, 128) / 45e-6 / 1e9,
            splits: 9,
            gqa: String::new(),
            host_behind: 0,
        };
        let mut all = t.clone();
        all.push(ours);
        let table = decode_table(&all, &c, "dev");
        let row = table
            .lines()
            .find(|l| l.starts_with("| 8192 | 4 |"))
            .unwrap();
        let ratio = all[2].gbps / all[0].gbps;
        assert!(row.contains(&format!("| {ratio:.2} |")), "{row}");
        let j = decode_json(&all, &c, "dev", "note");
        assert!(j.contains("\"implementation\": \"flashdec\""));
        assert!(j.contains("\"us\": null"));
    }
}
