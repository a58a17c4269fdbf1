//! `attn bench layer`: the whole layer as users call it (device tensors through the public
//! API: `linear_qkv` -> q/k RMS norm -> rope -> attention -> `linear_proj`, bf16), against
//! the same layer written in PyTorch (`scripts/bench_layer.py`: `F.linear`, `F.rms_norm`,
//! rope, SDPA flash and cuDNN) in the same run on the same GPU, for each layer shape
//! ([`LayerShape`]: Llama-3-8B and the head-dim-64 Llama-3.2-1B by default).
//!
//! Calls timed (CUDA events on the runtime's stream, `warmup` calls, then the median of
//! `reps`):
//! - `forward`: [`CudaLayer::forward_device`] over one sequence of `s` tokens;
//! - `static cache`: [`CudaLayer::prefill_device`] of the same `s` tokens into an empty
//!   static cache (rolled back after each call), to compare with `forward`;
//! - `paged`: [`CudaLayer::forward_paged_device`] of the same `s` tokens into an empty paged
//!   pool (block `block_size`);
//! - a `chunk`-token prefill after `ctx_before` cached tokens, through the static cache and
//!   through the paged pool (the call rewrites the same slots, so each call sees the same
//!   cache);
//! - decode steps at batch x context: [`CudaLayer::decode_device_into`] (eager) and the
//!   captured graph's `replay_device` (graph), each step rolled back so the context stays
//!   fixed. Steps are queued back to back; the time per step is the span of `reps` steps
//!   over `reps`, so host launch cost shows where it exceeds the device time. Shapes whose
//!   cache exceeds `max_cache_bytes` are skipped with a note.
//!
//! With `profile_once`, every call runs once after its warm-up inside a profiler window
//! ([`Profiler`]) and the case names go to a manifest; under Nsight Compute that gives each
//! call's kernel times ([`super::ncu`]), which a timing run given the profile reports as the
//! API overhead `(call - kernels) / call`. FLOP and byte counts: [`LayerShape`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use attention_runtime::cuda::{
    CudaLayer, DevicePagedKvCache, DeviceStaticKvCache, DeviceTensor, ElemType,
};
use attention_runtime::kv_cache::{BlockTable, PagedBatch};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{AttnError, ForwardArgs, Result, RuntimeDims, Tensor};
use cudarc::driver::CudaStream;

use super::chart::{svg_path_for, write_svg};
use super::common::{cuda_device, cuda_err, join, median};
use super::layer_report::{panels, parse_torch, table, to_json, torch_for, Kind, LayerShape, Row};
use super::ncu::{parse_manifest, parse_ncu_csv, split_calls, CallKernels};
use super::profile::Profiler;

/// Which groups of calls to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cases {
    /// Prefill from empty: forward, static cache (and paged when `paged`).
    pub prefill: bool,
    /// The chunk after cached tokens (static; paged when `paged`).
    pub chunk: bool,
    /// The paged-pool variants of the two above.
    pub paged: bool,
    /// Decode steps, eager and graph.
    pub decode: bool,
}

impl Cases {
    /// Parse `prefill,chunk,paged,decode` (any subset; `all`).
    pub fn parse(items: &[String]) -> Result<Cases> {
        let mut c = Cases {
            prefill: false,
            chunk: false,
            paged: false,
            decode: false,
        };
        for i in items {
            match i.trim() {
                "prefill" => c.prefill = true,
                "chunk" => c.chunk = true,
                "paged" => c.paged = true,
                "decode" => c.decode = true,
                "all" => {
                    c = Cases {
                        prefill: true,
                        chunk: true,
                        paged: true,
                        decode: true,
                    }
                }
                other => {
                    return Err(AttnError::InvalidArgument {
                        arg: "--cases".into(),
                        expected: "prefill, chunk, paged, decode or all".into(),
                        got: other.into(),
                    })
                }
            }
        }
        Ok(c)
    }
}

/// Shapes and settings of one `attn bench layer` run.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Layer shapes, each timed in turn (its PyTorch twin first).
    pub shapes: Vec<LayerShape>,
    /// Which calls to time.
    pub cases: Cases,
    /// Prefill lengths (one sequence).
    pub seqlens: Vec<usize>,
    /// Tokens of the chunk after `ctx_before` cached tokens (0 = no chunk rows).
    pub chunk: usize,
    /// Cached tokens before the chunk.
    pub ctx_before: usize,
    /// Paged pool block size.
    pub block_size: usize,
    /// Decode batches.
    pub batches: Vec<usize>,
    /// Decode contexts (cached tokens per sequence).
    pub contexts: Vec<usize>,
    /// Decode shapes whose K+V cache exceeds this are skipped (with a note).
    pub max_cache_bytes: usize,
    /// Untimed calls first.
    pub warmup: usize,
    /// Timed calls per case.
    pub reps: usize,
    /// `python3 <script>` for the PyTorch layer (None = skip).
    pub torch_script: Option<PathBuf>,
    /// Write the JSON report here, and the SVG chart beside it.
    pub json: Option<PathBuf>,
    /// Profile mode: one call per case in a profiler window; the case names go here.
    pub profile_once: Option<PathBuf>,
    /// An ncu CSV log of a `profile_once` run and its manifest: report kernel sums and
    /// overhead per case.
    pub ncu: Option<(PathBuf, PathBuf)>,
}

/// Times calls, or in profile mode runs each once in a profiler window.
struct Runner {
    st: Arc<CudaStream>,
    warmup: usize,
    reps: usize,
    profiler: Option<Profiler>,
    manifest: Vec<String>,
}

impl Runner {
    /// Profile mode: warm up, then one call in a window; returns NaN.
    fn profile_one(
        &mut self,
        case: &str,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<f64>> {
        let Some(p) = self.profiler.as_mut() else {
            return Ok(None);
        };
        for _ in 0..self.warmup.max(1) {
            f()?;
        }
        // Named before the window opens: its marker is in the profile even if the call fails.
        self.manifest.push(case.to_string());
        p.window(f)?;
        Ok(Some(f64::NAN))
    }

    /// Milliseconds of `f`: median over `reps` single calls (CUDA events around each).
    fn each(&mut self, case: &str, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        if let Some(ms) = self.profile_one(case, &mut f)? {
            return Ok(ms);
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut ts = Vec::with_capacity(self.reps);
        for i in 0..self.warmup + self.reps {
            let a = self
                .st
                .record_event(flags)
                .map_err(cuda_err("record event"))?;
            f()?;
            let b = self
                .st
                .record_event(flags)
                .map_err(cuda_err("record event"))?;
            let t = a.elapsed_ms(&b).map_err(cuda_err("layer call"))? as f64;
            if i >= self.warmup {
                ts.push(t);
            }
        }
        Ok(median(ts))
    }

    /// Milliseconds per call of `f` queued `reps` times back to back.
    fn queued(&mut self, case: &str, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        if let Some(ms) = self.profile_one(case, &mut f)? {
            return Ok(ms);
        }
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        for _ in 0..self.warmup {
            f()?;
        }
        self.st.synchronize().map_err(cuda_err("synchronize"))?;
        let a = self
            .st
            .record_event(flags)
            .map_err(cuda_err("record event"))?;
        for _ in 0..self.reps {
            f()?;
        }
        let b = self
            .st
            .record_event(flags)
            .map_err(cuda_err("record event"))?;
        Ok(a.elapsed_ms(&b).map_err(cuda_err("decode steps"))? as f64 / self.reps.max(1) as f64)
    }
}

fn random_hidden(st: &Arc<CudaStream>, shape: &[usize], seed: u64) -> Result<DeviceTensor> {
    let mut rng = SplitMix64::new(seed);
    DeviceTensor::from_host(
        st,
        &Tensor::from_fn(shape, |_| rng.uniform()),
        ElemType::Bf16,
    )
}

fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AttnError + '_ {
    move |e| AttnError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// A paged pool holding one sequence of `tokens` in blocks of `bs`, with its table.
fn paged_pool(
    st: &Arc<CudaStream>,
    shape: &LayerShape,
    tokens: usize,
    bs: usize,
) -> Result<(DevicePagedKvCache, BlockTable)> {
    let nb = tokens.div_ceil(bs).max(1);
    let mut pool =
        DevicePagedKvCache::new(st, ElemType::Bf16, 1, nb, bs, shape.groups, shape.head_dim)?;
    let mut table = BlockTable::new(1, nb)?;
    let ids = pool.allocator_mut().alloc(nb)?;
    table.set_row(0, &ids)?;
    Ok((pool, table))
}

/// Time every case of one layer shape; rows go to `rows`, notes (skipped shapes) to
/// `notes`.
fn run_shape(
    o: &LayerOptions,
    shape: &LayerShape,
    run: &mut Runner,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let dev = cuda_device()?;
    let torch = if run.profiler.is_some() {
        Vec::new()
    } else {
        parse_torch(&run_torch(o, shape, notes))
    };
    let config = SpecLayer::config_from_str(&shape.spec(), &RuntimeDims::default())?;
    let layer = SpecLayer::init(config, 7)?;
    let cuda = CudaLayer::new(&layer, &dev)?;
    let st = cuda.runtime().stream().clone();
    let (h, ng, hn) = (shape.hidden, shape.groups, shape.head_dim);
    let args = ForwardArgs::default();
    let bs = o.block_size;
    // A row of this shape with its work and PyTorch times; `ours_ms` is set by the caller.
    let row = |kind: Kind, tokens: usize, ctx: usize, batch: usize| {
        let work = if kind.is_decode() {
            shape.decode_bytes(batch, ctx)
        } else {
            shape.prefill_flops(tokens, ctx)
        };
        let paged = matches!(kind, Kind::PagedPrefill | Kind::ChunkPaged);
        Row {
            preset: shape.name.clone(),
            kind,
            tokens,
            ctx,
            batch,
            block: if paged { bs } else { 0 },
            ours_ms: f64::NAN,
            work,
            torch: torch_for(&torch, kind, tokens, ctx, batch),
            kernels: None,
        }
    };

    if o.cases.prefill {
        for &s in &o.seqlens {
            let x = random_hidden(&st, &[s, 1, h], s as u64)?;
            let mut r = row(Kind::Forward, s, 0, 1);
            r.ours_ms = run.each(&r.case(), || cuda.forward_device(&x, &args).map(|_| ()))?;
            rows.push(r);
            let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, s, 1, ng, hn)?;
            let mut r = row(Kind::StaticPrefill, s, 0, 1);
            r.ours_ms = run.each(&r.case(), || {
                let res = cuda.prefill_device(&x, &mut cache, 0, 0, &args).map(|_| ());
                cache.rollback();
                res
            })?;
            rows.push(r);
            drop(cache);
            if o.cases.paged {
                let (mut pool, table) = paged_pool(&st, shape, s, bs)?;
                let xp = random_hidden(&st, &[s, h], s as u64)?;
                let (cu, lens) = ([0, s as i32], [s as i32]);
                let batch = PagedBatch {
                    cu_seqlens_q: &cu,
                    seqlens_k: &lens,
                    block_table: &table,
                };
                let mut r = row(Kind::PagedPrefill, s, 0, 1);
                r.ours_ms = run.each(&r.case(), || {
                    cuda.forward_paged_device(&xp, &mut pool, 0, &batch)
                        .map(|_| ())
                })?;
                rows.push(r);
            }
        }
    }

    if o.cases.chunk && o.chunk > 0 {
        let (c, before) = (o.chunk, o.ctx_before);
        let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, before + c, 1, ng, hn)?;
        if before > 0 {
            let x0 = random_hidden(&st, &[before, 1, h], 11)?;
            cuda.prefill_device(&x0, &mut cache, 0, 0, &args)?;
            cache.advance(0, 1, before)?;
        }
        let x = random_hidden(&st, &[c, 1, h], 12)?;
        let mut r = row(Kind::ChunkStatic, c, before, 1);
        r.ours_ms = run.each(&r.case(), || {
            let res = cuda.prefill_device(&x, &mut cache, 0, 0, &args).map(|_| ());
            cache.rollback();
            res
        })?;
        rows.push(r);
        drop(cache);
        if o.cases.paged {
            let (mut pool, table) = paged_pool(&st, shape, before + c, bs)?;
            if before > 0 {
                let x0 = random_hidden(&st, &[before, h], 11)?;
                let (cu, lens) = ([0, before as i32], [before as i32]);
                let first = PagedBatch {
                    cu_seqlens_q: &cu,
                    seqlens_k: &lens,
                    block_table: &table,
                };
                cuda.forward_paged_device(&x0, &mut pool, 0, &first)?;
            }
            let xp = random_hidden(&st, &[c, h], 12)?;
            let (cu, lens) = ([0, c as i32], [(before + c) as i32]);
            let batch = PagedBatch {
                cu_seqlens_q: &cu,
                seqlens_k: &lens,
                block_table: &table,
            };
            let mut r = row(Kind::ChunkPaged, c, before, 1);
            r.ours_ms = run.each(&r.case(), || {
                cuda.forward_paged_device(&xp, &mut pool, 0, &batch)
                    .map(|_| ())
            })?;
            rows.push(r);
        }
    }

    if o.cases.decode {
        for &ctx in &o.contexts {
            for &b in &o.batches {
                let cache_bytes = shape.cache_bytes(b, ctx);
                if cache_bytes > o.max_cache_bytes {
                    let note = format!(
                        "{} decode b{b} ctx{ctx} skipped: K+V cache {cache_bytes} B > --max-cache-bytes {}",
                        shape.name, o.max_cache_bytes
                    );
                    eprintln!("attn bench layer: {note}");
                    notes.push(note);
                    continue;
                }
                let mut cache =
                    DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, ctx + 1, b, ng, hn)?;
                // Fill the cache with real keys: prefill in chunks of at most 16k tokens.
                // (One random chunk reused: the keys differ by position through rope.)
                let step = (16384 / b).clamp(1, ctx.max(1));
                let xf = random_hidden(&st, &[step, b, h], b as u64)?;
                let mut done = 0;
                while done < ctx {
                    let n = step.min(ctx - done);
                    let x = if n == step {
                        None
                    } else {
                        Some(random_hidden(&st, &[n, b, h], (done + b) as u64)?)
                    };
                    cuda.prefill_device(x.as_ref().unwrap_or(&xf), &mut cache, 0, 0, &args)?;
                    cache.advance(0, b, n)?;
                    done += n;
                }
                drop(xf);
                let x = random_hidden(&st, &[1, b, h], 99)?;
                let mut out = DeviceTensor::uninit(&st, ElemType::Bf16, &[b, h], "out")?;
                let mut eager = row(Kind::DecodeEager, 1, ctx, b);
                eager.ours_ms = run.queued(&eager.case(), || {
                    let res = cuda.decode_device_into(&x, &mut out, &mut cache, 0, 0, &args);
                    cache.rollback();
                    res
                })?;
                let mut graph = cuda.capture_decode(&cache, 0, 0, b, &args)?;
                let mut replay = row(Kind::DecodeGraph, 1, ctx, b);
                replay.ours_ms = run.queued(&replay.case(), || {
                    let res = graph.replay_device(&x, &mut out, &mut cache);
                    cache.rollback();
                    res
                })?;
                rows.push(eager);
                rows.push(replay);
            }
        }
    }
    st.synchronize().map_err(cuda_err("bench layer"))?;
    Ok(())
}

/// Attach each row's kernels from the ncu log and manifest; a problem becomes a note.
fn attach_kernels(
    rows: &mut [Row],
    csv: &std::path::Path,
    manifest: &std::path::Path,
    notes: &mut Vec<String>,
) {
    let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(io_err(p));
    let calls: Result<Vec<CallKernels>> = (|| {
        let kernels = parse_ncu_csv(&read(csv)?)?;
        split_calls(&kernels, &parse_manifest(&read(manifest)?))
    })();
    match calls {
        Ok(calls) => {
            let mut matched = 0;
            for r in rows.iter_mut() {
                let name = r.case();
                if let Some(c) = calls.iter().find(|c| c.case == name) {
                    r.kernels = Some(c.clone());
                    matched += 1;
                }
            }
            if matched < rows.len() {
                let note = format!(
                    "kernel times for {matched} of {} calls (the profile covers {} cases)",
                    rows.len(),
                    calls.len()
                );
                eprintln!("attn bench layer: {note}");
                notes.push(note);
            }
        }
        Err(e) => {
            let note = format!("no kernel times from {}: {e}", csv.display());
            eprintln!("attn bench layer: {note}");
            notes.push(note);
        }
    }
}

/// Run the bench; returns the markdown table. With `json`, writes the JSON report and the
/// SVG chart beside it; with `profile_once`, writes the manifest instead. When a shape
/// fails, the other shapes still run and are reported (the table printed, the files
/// written), then its error is returned.
pub fn run_layer(o: &LayerOptions) -> Result<String> {
    if o.reps == 0 {
        return Err(AttnError::InvalidArgument {
            arg: "--reps".into(),
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    let dev = cuda_device()?;
    let rt = attention_runtime::cuda::CudaRuntime::get(&dev)?;
    let profiler = match &o.profile_once {
        Some(_) => Some(Profiler::new(&dev, rt.stream())?),
        None => None,
    };
    let mut run = Runner {
        st: rt.stream().clone(),
        warmup: o.warmup,
        reps: o.reps,
        profiler,
        manifest: Vec::new(),
    };
    let (mut rows, mut notes) = (Vec::new(), Vec::new());
    // A shape that fails (e.g. a kernel that does not compile for its head dim) does not
    // lose the others' results: they are reported, then the first error is returned.
    let mut failed: Option<AttnError> = None;
    for shape in &o.shapes {
        if let Err(e) = run_shape(o, shape, &mut run, &mut rows, &mut notes) {
            let note = format!("{} stopped: {e}", shape.name);
            eprintln!("attn bench layer: {note}");
            notes.push(note);
            failed.get_or_insert(e);
        }
    }
    if let Some(path) = &o.profile_once {
        let mut text = run.manifest.join("\n");
        text.push('\n');
        std::fs::write(path, text).map_err(io_err(path))?;
        let msg = format!(
            "profiled {} calls once each (one profiler window per call, marker kernel first); case names in {}",
            run.manifest.len(),
            path.display()
        );
        return match failed {
            Some(e) => {
                println!("{msg}");
                Err(e)
            }
            None => Ok(msg),
        };
    }
    if let Some((csv, manifest)) = &o.ncu {
        attach_kernels(&mut rows, csv, manifest, &mut notes);
    }
    if let Some(path) = &o.json {
        std::fs::write(path, to_json(&rows, &o.shapes, &dev.name, &notes)).map_err(io_err(path))?;
        let svg = svg_path_for(path);
        let ctxs = if o.cases.decode {
            o.contexts.clone()
        } else {
            Vec::new()
        };
        let p = panels(&rows, &o.shapes, &ctxs);
        if !p.is_empty() {
            let cols = 2 + ctxs.len();
            write_svg(
                &svg,
                &format!("attn bench layer vs the PyTorch layer ({})", dev.name),
                &p,
                cols,
            )?;
        }
    }
    let mut t = table(&rows, &dev.name);
    for n in &notes {
        t.push_str(&format!("note: {n}\n"));
    }
    match failed {
        Some(e) => {
            println!("{t}");
            Err(e)
        }
        None => Ok(t),
    }
}

/// The PyTorch layer's JSON lines for `shape` (empty when the script is off or fails; the
/// reason goes to stderr and `notes`).
fn run_torch(o: &LayerOptions, shape: &LayerShape, notes: &mut Vec<String>) -> Vec<String> {
    let Some(script) = &o.torch_script else {
        return Vec::new();
    };
    let on = |b: bool, v: &[usize]| if b { join(v) } else { String::new() };
    let chunk = if o.cases.chunk { o.chunk } else { 0 };
    let res = Command::new("python3")
        .arg(script)
        .args(["--hidden", &shape.hidden.to_string()])
        .args(["--heads", &shape.heads.to_string()])
        .args(["--groups", &shape.groups.to_string()])
        .args(["--head-dim", &shape.head_dim.to_string()])
        .args(["--seqlens", &on(o.cases.prefill, &o.seqlens)])
        .args(["--chunk", &chunk.to_string()])
        .args(["--ctx-before", &o.ctx_before.to_string()])
        .args(["--batches", &on(o.cases.decode, &o.batches)])
        .args(["--contexts", &on(o.cases.decode, &o.contexts)])
        .args(["--max-cache-bytes", &o.max_cache_bytes.to_string()])
        .args(["--warmup", &o.warmup.to_string()])
        .args(["--reps", &o.reps.to_string()])
        .output();
    match res {
        Ok(out) => {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                notes.push(format!(
                    "{} ({}) exited with {}",
                    script.display(),
                    shape.name,
                    out.status
                ));
            }
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
                .collect()
        }
        Err(e) => {
            let note = format!("could not run python3 {}: {e}", script.display());
            eprintln!("attn bench layer: {note}");
            notes.push(note);
            Vec::new()
        }
    }
}
