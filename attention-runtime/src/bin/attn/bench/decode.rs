//! `attn bench decode`: times the fused decode step (`decode_splitkv`: rope + KV append + split-KV
//! attention + combine) against PyTorch SDPA's flash backend (`scripts/bench_sdpa.py --mode
//! decode`), one new token per sequence over a filled cache; reports GB/s of the K/V read
//! once, next to the card's device-to-device copy bandwidth; and the split-KV decode of a
//! paged batch's decode rows (`decode_splitkv` in its paged mode) on the same shapes, K/V in a pool
//! behind a shuffled block table, against the static step.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use attention_codegen::render::{KernelConfig, Phase};
use attention_codegen::DType;
use attention_runtime::modules::SplitMix64;
use attention_runtime::{AttnError, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use super::chart::write_report;
use super::common::{cuda_device, cuda_err, join, median, random_bf16};
use super::decode_report::{
    decode_json, decode_table, panels, parse_sdpa_decode, CopyCeiling, DecodeTiming, READ_ONLY,
};
use super::read_ceiling::ReadProbe;

/// Options of `attn bench decode`: the fused decode step (`decode_splitkv` split + combine: rope of
/// the new q/k, KV append, split-KV attention, LSE combine) against PyTorch SDPA's flash
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
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<PathBuf>,
    /// Pool block sizes of the paged decode timing (empty: skip it).
    pub paged_block_sizes: Vec<usize>,
    /// Extra split counts to time the static step at (`decode_splitkv_s<N>` rows).
    pub split_sweep: Vec<usize>,
    /// New-token counts (2 to 16) of multi-token steps timed beside the one-token step
    /// (`decode_splitkv_t<T>` rows; empty: none).
    pub tokens: Vec<usize>,
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
            paged_block_sizes: vec![16, 64],
            split_sweep: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

/// Bytes one decode step must move (bf16): the K and V cache read once
/// (`ctx · groups · hd · 2 B` each per sequence) plus q and out (`heads · hd` each) and the
/// new k and v (`groups · hd` each) per sequence.
pub fn decode_bytes(batch: usize, ctx: usize, heads: usize, groups: usize, hd: usize) -> f64 {
    decode_bytes_tokens(batch, ctx, 1, heads, groups, hd)
}

/// [`decode_bytes`] of a step of `tokens` new tokens per sequence: the cache once, q, out and
/// the new k and v per token.
pub fn decode_bytes_tokens(
    batch: usize,
    ctx: usize,
    tokens: usize,
    heads: usize,
    groups: usize,
    hd: usize,
) -> f64 {
    let per_seq = 2 * ctx * groups * hd * 2 + tokens * (2 * heads + 2 * groups) * hd * 2;
    (batch * per_seq) as f64
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
    let mut rng = SplitMix64::new(seed);
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

/// One paged decode shape: `batch` decode rows with `ctx + 1` keys each in a pool of `bs`-row
/// blocks, `splits` KV splits, `sets` pools rotated over.
struct PagedShape {
    ctx: usize,
    batch: usize,
    bs: usize,
    splits: usize,
    sets: usize,
}

/// Time the paged batch's decode kernel (`decode_splitkv` paged mode + combine) on one shape: each
/// sequence's `ctx + 1` keys in pool blocks of `bs` rows at shuffled block ids, q already
/// rotated (the paged batch's qkv_prep does it), timed as [`run_decode`] times the static
/// step. Returns the timing with `bytes` / `gbps` left for the caller.
fn time_paged(
    rt: &attention_runtime::cuda::CudaRuntime,
    stream: &Arc<CudaStream>,
    opts: &DecodeOptions,
    shape: PagedShape,
    csrc: &CudaSlice<bf16>,
    blocker: &mut dyn FnMut() -> Result<()>,
) -> Result<DecodeTiming> {
    use attention_runtime::cuda::decode::{decode_splitkv_kernels, launch_decode_splitkv_paged};
    use attention_runtime::cuda::params::PagedDecodeParams;
    let PagedShape {
        ctx: c,
        batch: b,
        bs,
        splits,
        sets,
    } = shape;
    let (heads, groups, hd) = (opts.heads, opts.groups, opts.head_dim);
    let mut cfg = KernelConfig::new(Phase::DecodeSplitKv, DType::Bf16, hd);
    cfg.paged_kv = true;
    let (key, split_f, combine_f) = decode_splitkv_kernels(rt, &cfg)?;
    let per_seq = (c + 1).div_ceil(bs);
    let blocks = b * per_seq;
    let pool_elems = blocks * bs * groups * hd;
    // Block ids shuffled (Fisher-Yates), so consecutive blocks of a sequence are scattered.
    let mut ids: Vec<i32> = (0..blocks as i32).collect();
    let mut rng = SplitMix64::new(0x9a9ed ^ (c * 31 + b * 7 + bs) as u64);
    for i in (1..ids.len()).rev() {
        let j = ((rng.uniform().abs() * (i + 1) as f32) as usize).min(i);
        ids.swap(i, j);
    }
    let up = |v: &[i32], what: &str| {
        stream
            .clone_htod(v)
            .map_err(cuda_err(&format!("clone_htod {what}")))
    };
    let table = up(&ids, "block table")?;
    let cu = up(&(0..=b as i32).collect::<Vec<_>>(), "cu_seqlens_q")?;
    let lens = up(&vec![(c + 1) as i32; b], "seqlens_k")?;
    let requests = up(&(0..b as i32).collect::<Vec<_>>(), "requests")?;
    // One query row per request: merge row i is request i's token i.
    let row_starts = up(&(0..=b as i32).collect::<Vec<_>>(), "row_starts")?;
    let f32s = |n: usize, what: &str| -> Result<CudaSlice<f32>> {
        stream
            .alloc_zeros(n)
            .map_err(cuda_err(&format!("alloc {what}")))
    };
    let o_part = f32s(splits * b * heads * hd, "o_part")?;
    let lse_part = f32s(splits * b * heads, "lse_part")?;
    let lse = f32s(heads * b, "lse")?;
    let out = stream
        .clone_htod(&vec![bf16::from_f32(f32::NAN); b * heads * hd])
        .map_err(cuda_err("clone_htod out"))?;
    let mut pools = Vec::with_capacity(sets);
    for i in 0..sets as u64 {
        let mut k: CudaSlice<bf16> = stream
            .alloc_zeros(pool_elems)
            .map_err(cuda_err("alloc k pool"))?;
        let mut v: CudaSlice<bf16> = stream
            .alloc_zeros(pool_elems)
            .map_err(cuda_err("alloc v pool"))?;
        fill_from(stream, csrc, &mut k, 300 + 2 * i)?;
        fill_from(stream, csrc, &mut v, 301 + 2 * i)?;
        pools.push((random_bf16(stream, b * heads * hd, 20 * i + 5)?, k, v));
    }
    let params: Vec<PagedDecodeParams> = pools
        .iter()
        .map(|(q, k, v)| PagedDecodeParams {
            q: raw(q, stream),
            k_pool: raw(k, stream),
            v_pool: raw(v, stream),
            o_part: raw(&o_part, stream),
            lse_part: raw(&lse_part, stream),
            out: raw(&out, stream),
            lse: raw(&lse, stream),
            requests: raw(&requests, stream),
            cu_seqlens_q: raw(&cu, stream),
            seqlens_k: raw(&lens, stream),
            block_table: raw(&table, stream),
            row_starts: raw(&row_starts, stream),
            row_tokens: raw(&requests, stream),
            batch: b as i32,
            merge_rows: b as i32,
            num_heads: heads as i32,
            num_groups: groups as i32,
            num_splits: splits as i32,
            total_q: b as i32,
            block_size: bs as i32,
            max_blocks_per_seq: per_seq as i32,
            softmax_scale: 1.0 / (hd as f32).sqrt(),
            window_left: -1,
            window_right: -1,
            ..PagedDecodeParams::default()
        })
        .collect();
    // SAFETY: every buffer above has the shape PagedDecodeParams documents for these dims;
    // the block table holds each of the pool's blocks once.
    let mut step = |i: usize| unsafe {
        launch_decode_splitkv_paged(stream, &key, &split_f, &combine_f, &params[i % sets])
    };
    step(0)?;
    let host_out = stream
        .clone_dtoh(&out)
        .map_err(cuda_err("clone_dtoh out"))?;
    stream
        .synchronize()
        .map_err(cuda_err("paged decode check"))?;
    if host_out.iter().any(|x| !x.to_f32().is_finite()) {
        return Err(AttnError::Cuda {
            call: format!("{key} (ctx {c}, batch {b}, block {bs})"),
            msg: "the output holds NaN/inf or unwritten elements".into(),
        });
    }
    let (t, behind) = time_queued(
        stream,
        opts.warmup + opts.reps,
        opts.chunk,
        blocker,
        &mut step,
    )?;
    let ms = median(t[opts.warmup.min(t.len())..].to_vec());
    Ok(DecodeTiming {
        implementation: format!("decode_splitkv_paged_bs{bs}"),
        batch: b,
        ctx: c,
        bytes: f64::NAN,
        us: ms * 1e3,
        gbps: f64::NAN,
        splits,
        gqa: String::new(),
        host_behind: behind,
    })
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
    use attention_codegen::RopeMode;
    use attention_runtime::cuda::decode::{
        decode_slots, decode_splitkv_kernels, launch_decode_splitkv, num_splits,
    };
    use attention_runtime::cuda::decode::{DecodeSplitKvArgs, RopeTables};

    let bad = |arg: &str, expected: &str, got: String| AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got,
    };
    if opts.groups == 0 || opts.heads == 0 || !opts.heads.is_multiple_of(opts.groups) {
        return Err(bad(
            "--heads",
            "a positive multiple of --groups",
            format!("heads {} groups {}", opts.heads, opts.groups),
        ));
    }
    if opts.contexts.contains(&0) || opts.batches.contains(&0) {
        return Err(bad(
            "--contexts/--batches",
            "positive values",
            format!("{:?} / {:?}", opts.contexts, opts.batches),
        ));
    }
    if let Some(&n) = opts.split_sweep.iter().find(|&&n| !(1..=128).contains(&n)) {
        return Err(bad(
            "--split-sweep",
            "split counts in 1..=128",
            n.to_string(),
        ));
    }
    if opts.reps == 0 {
        return Err(bad("--reps", "at least 1", "0".into()));
    }
    let max_tokens = attention_codegen::render::DECODE_SPLITKV_MAX_TOKENS;
    if let Some(&n) = opts
        .tokens
        .iter()
        .find(|&&n| !(2..=max_tokens).contains(&n))
    {
        return Err(bad("--tokens", "new-token counts in 2..=16", n.to_string()));
    }
    let tmax = opts.tokens.iter().copied().max().unwrap_or(1).max(1);
    let dev = cuda_device()?;
    let rt = attention_runtime::cuda::CudaRuntime::get(&dev)?;
    let stream = rt.stream().clone();
    let ctx = dev.context.clone();
    let (heads, groups, hd) = (opts.heads, opts.groups, opts.head_dim);
    let l2 = ctx
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map_err(cuda_err("L2 size"))? as usize;
    let sms = attention_runtime::cuda::decode::sm_count(&rt)?;

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
    // Read-only ceiling: one kernel reading the 1 GiB source (a decode step only reads).
    let mut probe = ReadProbe::new(&rt, sms)?;
    let (rt_ms, _) = time_queued(
        &stream,
        opts.warmup + opts.reps,
        opts.chunk,
        &mut blocker,
        &mut |_| probe.read(&stream, &big_src),
    )?;
    let rms = median(rt_ms[opts.warmup.min(rt_ms.len())..].to_vec());
    ceilings.push(CopyCeiling {
        source: READ_ONLY.into(),
        bytes: cn * 2,
        ms: rms,
        gbps: (cn * 2) as f64 / (rms * 1e-3) / 1e9,
    });

    // Rope tables (half, all channels, theta 10000) for every position used.
    let max_ctx = opts.contexts.iter().copied().max().unwrap_or(1);
    let rows = max_ctx + tmax;
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

    let mut cfg = KernelConfig::new(Phase::DecodeSplitKv, DType::Bf16, hd);
    cfg.rope = Some((RopeMode::Half, hd));
    let (key, split_f, combine_f) = decode_splitkv_kernels(&rt, &cfg)?;
    let slots = decode_slots(&rt, &cfg)?;
    // The multi-token kernels: the row-block variant for heads / groups x T rows.
    let optin = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(cuda_err("shared memory opt-in"))? as usize;
    let mut multi = Vec::new();
    for &t in &opts.tokens {
        let rb =
            attention_codegen::render::decode_splitkv_row_blocks(hd, heads / groups * t, optin)
                .ok_or_else(|| {
                    bad(
                        "--head-dim",
                        "a head dim whose decode tile fits",
                        hd.to_string(),
                    )
                })?;
        let mut c = cfg.clone();
        c.row_blocks = rb;
        c.warps = attention_codegen::render::decode_splitkv_warps(rb);
        let kernels = decode_splitkv_kernels(&rt, &c)?;
        let slots = decode_slots(&rt, &c)?;
        multi.push((t, kernels, slots));
    }

    let mut timings: Vec<DecodeTiming> = Vec::new();
    for &c in &opts.contexts {
        for &b in &opts.batches {
            let cache_elems = (c + tmax) * b * groups * hd;
            let cache_bytes = 2 * cache_elems * 2;
            // The limit counts the context's K+V as the SDPA script does (its cache holds no
            // slot for the new token), so both sides skip the same shapes.
            if 2 * c * b * groups * hd * 2 > opts.max_cache_bytes {
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
                    q: random_bf16(&stream, tmax * b * heads * hd, 10 * i + 1)?,
                    k_new: random_bf16(&stream, tmax * b * groups * hd, 10 * i + 2)?,
                    v_new: random_bf16(&stream, tmax * b * groups * hd, 10 * i + 3)?,
                    k_cache,
                    v_cache,
                });
            }
            let splits = num_splits(slots, b, groups, c + 1);
            let most = opts
                .split_sweep
                .iter()
                .copied()
                .chain([splits])
                .chain(
                    multi
                        .iter()
                        .map(|(t, _, s)| num_splits(*s, b, groups, c + t)),
                )
                .max()
                .unwrap_or(1);
            let lens = stream
                .clone_htod(&vec![c as i32; b])
                .map_err(cuda_err("clone_htod cache_seqlens"))?;
            let o_part: CudaSlice<f32> = stream
                .alloc_zeros(most * tmax * b * heads * hd)
                .map_err(cuda_err("alloc o_part"))?;
            let lse_part: CudaSlice<f32> = stream
                .alloc_zeros(most * tmax * b * heads)
                .map_err(cuda_err("alloc lse_part"))?;
            let lse: CudaSlice<f32> = stream
                .alloc_zeros(heads * tmax * b)
                .map_err(cuda_err("alloc lse"))?;
            // Poisoned output: every element must be written by the combine kernel.
            let out = stream
                .clone_htod(&vec![bf16::from_f32(f32::NAN); tmax * b * heads * hd])
                .map_err(cuda_err("clone_htod out"))?;
            let args: Vec<DecodeSplitKvArgs> = data
                .iter()
                .map(|d| DecodeSplitKvArgs {
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
                    num_tokens: 1,
                    softmax_scale: 1.0 / (hd as f32).sqrt(),
                    window_left: -1,
                    window_right: -1,
                })
                .collect();
            let mut step = |i: usize| {
                launch_decode_splitkv(&stream, &key, &split_f, &combine_f, &args[i % sets])
            };
            step(0)?;
            let host_out = stream
                .clone_dtoh(&out.slice(0..b * heads * hd))
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
                implementation: "decode_splitkv".into(),
                batch: b,
                ctx: c,
                bytes: decode_bytes(b, c, heads, groups, hd),
                us: ms * 1e3,
                gbps: decode_bytes(b, c, heads, groups, hd) / (ms * 1e-3) / 1e9,
                splits,
                gqa: String::new(),
                host_behind: behind,
            });
            for (t, (tkey, tsplit, tcombine), tslots) in &multi {
                let n = *t;
                let tsplits = num_splits(*tslots, b, groups, c + n);
                let targs: Vec<DecodeSplitKvArgs> = args
                    .iter()
                    .map(|a| DecodeSplitKvArgs {
                        num_splits: tsplits as i32,
                        num_tokens: n as i32,
                        ..*a
                    })
                    .collect();
                let mut step = |i: usize| {
                    launch_decode_splitkv(&stream, tkey, tsplit, tcombine, &targs[i % sets])
                };
                step(0)?;
                let host_out = stream
                    .clone_dtoh(&out.slice(0..n * b * heads * hd))
                    .map_err(cuda_err("clone_dtoh out"))?;
                stream.synchronize().map_err(cuda_err("decode check"))?;
                if host_out.iter().any(|x| !x.to_f32().is_finite()) {
                    return Err(AttnError::Cuda {
                        call: format!("{tkey} (ctx {c}, batch {b}, {n} tokens)"),
                        msg: "the output holds NaN/inf or unwritten elements".into(),
                    });
                }
                let (tt, behind) = time_queued(
                    &stream,
                    opts.warmup + opts.reps,
                    opts.chunk,
                    &mut blocker,
                    &mut step,
                )?;
                let ms = median(tt[opts.warmup.min(tt.len())..].to_vec());
                let bytes = decode_bytes_tokens(b, c, n, heads, groups, hd);
                timings.push(DecodeTiming {
                    implementation: format!("decode_splitkv_t{n}"),
                    batch: b,
                    ctx: c,
                    bytes,
                    us: ms * 1e3,
                    gbps: bytes / (ms * 1e-3) / 1e9,
                    splits: tsplits,
                    gqa: String::new(),
                    host_behind: behind,
                });
            }
            for &n in &opts.split_sweep {
                let swept: Vec<DecodeSplitKvArgs> = args
                    .iter()
                    .map(|a| DecodeSplitKvArgs {
                        num_splits: n as i32,
                        ..*a
                    })
                    .collect();
                let mut step = |i: usize| {
                    launch_decode_splitkv(&stream, &key, &split_f, &combine_f, &swept[i % sets])
                };
                let (t, behind) = time_queued(
                    &stream,
                    opts.warmup + opts.reps,
                    opts.chunk,
                    &mut blocker,
                    &mut step,
                )?;
                let ms = median(t[opts.warmup.min(t.len())..].to_vec());
                let bytes = decode_bytes(b, c, heads, groups, hd);
                timings.push(DecodeTiming {
                    implementation: format!("decode_splitkv_s{n}"),
                    batch: b,
                    ctx: c,
                    bytes,
                    us: ms * 1e3,
                    gbps: bytes / (ms * 1e-3) / 1e9,
                    splits: n,
                    gqa: String::new(),
                    host_behind: behind,
                });
            }
            drop(args);
            drop(data);
            for &bs in &opts.paged_block_sizes {
                let mut t = time_paged(
                    &rt,
                    &stream,
                    opts,
                    PagedShape {
                        ctx: c,
                        batch: b,
                        bs,
                        splits,
                        sets,
                    },
                    &csrc,
                    &mut blocker,
                )?;
                t.bytes = decode_bytes(b, c, heads, groups, hd);
                t.gbps = t.bytes / (t.us * 1e-6) / 1e9;
                timings.push(t);
            }
        }
    }
    drop((big_src, big_dst, csrc, tables));
    stream.synchronize().map_err(cuda_err("synchronize"))?;

    let mut sdpa_note = String::new();
    if let Some(script) = &opts.sdpa_script {
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
        let p = panels(&timings, &ceilings);
        write_report(
            path,
            &decode_json(&timings, &ceilings, &dev.name, &sdpa_note),
            &format!("attn bench decode: decode_splitkv vs SDPA ({})", dev.name),
            &p,
            p.len().min(3),
        )?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_bytes_formula() {
        // K+V: 2 * 8192 * 8 * 128 * 2 B; q, out: 32 * 128 * 2 B each; new k, v: 8 * 128 * 2 B each.
        let per = 2.0 * 8192.0 * 8.0 * 128.0 * 2.0 + (64.0 + 16.0) * 128.0 * 2.0;
        assert_eq!(decode_bytes(1, 8192, 32, 8, 128), per);
        assert_eq!(decode_bytes(4, 8192, 32, 8, 128), 4.0 * per);
    }
}
