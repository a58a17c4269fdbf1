//! `attn bench layer`: the whole layer as users call it (device tensors through the public
//! API: `linear_qkv` -> q/k RMS norm -> rope -> attention -> `linear_proj`, bf16), against
//! the same layer written in PyTorch (`scripts/bench_layer.py`: `F.linear`, `F.rms_norm`,
//! rope, SDPA flash and cuDNN) in the same run on the same GPU.
//!
//! Calls timed (CUDA events around each call on the runtime's stream, `warmup` calls, then
//! the median of `reps`):
//! - `forward`: [`CudaLayer::forward_device`] over one sequence of `s` tokens;
//! - `cached prefill`: [`CudaLayer::prefill_device`] of the same `s` tokens into an empty
//!   static cache (rolled back after each call), to compare with `forward`;
//! - `chunk after cache`: a `chunk`-token prefill over `ctx_before` cached tokens;
//! - decode steps at batch x context: [`CudaLayer::decode_device_into`] (eager) and the
//!   captured graph's [`LayerDecodeGraph::replay_device`] (graph), each step rolled back so
//!   the context stays fixed. Steps are queued back to back; the time per step is the span
//!   of `reps` steps over `reps`, so host launch cost shows where it exceeds the device time.
//!
//! FLOPs of a prefill: `2 s h (np + 2 ng) hn + 2 s np hn h` for the linears plus
//! `2 s^2 np hn` for causal attention. Bytes of a decode step: the K/V cache read once plus
//! both weight matrices (bf16).

use std::path::PathBuf;
use std::process::Command;

use attention_runtime::cuda::{CudaLayer, DeviceStaticKvCache, DeviceTensor, ElemType};
use attention_runtime::modules::SplitMix64;
use attention_runtime::spec_layer::SpecLayer;
use attention_runtime::{ForwardArgs, Result, RuntimeDims, Tensor};

use super::common::{cuda_device, cuda_err, json_field, median};

/// Shapes and settings of one `attn bench layer` run.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    pub hidden: usize,
    pub heads: usize,
    pub groups: usize,
    pub head_dim: usize,
    pub seqlens: Vec<usize>,
    pub chunk: usize,
    pub ctx_before: usize,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub max_cache_bytes: usize,
    pub warmup: usize,
    pub reps: usize,
    pub torch_script: Option<PathBuf>,
}

fn spec(o: &LayerOptions) -> String {
    format!(
        "self, heads = {}, gqa = {}, head_dim = {}, hidden = {}, qk_layernorm = rms, rope, mask = causal",
        o.heads, o.groups, o.head_dim, o.hidden
    )
}

fn prefill_flops(o: &LayerOptions, s: usize) -> f64 {
    let (h, np, ng, hn, s) = (
        o.hidden as f64,
        o.heads as f64,
        o.groups as f64,
        o.head_dim as f64,
        s as f64,
    );
    2.0 * s * h * (np + 2.0 * ng) * hn + 2.0 * s * np * hn * h + 2.0 * s * s * np * hn
}

/// Milliseconds of `f` on `layer`'s stream: median over `reps` single calls after `warmup`.
fn time_each(
    layer: &CudaLayer,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let st = layer.runtime().stream().clone();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut ts = Vec::new();
    for i in 0..warmup + reps {
        let a = st.record_event(flags).map_err(cuda_err("record event"))?;
        f()?;
        let b = st.record_event(flags).map_err(cuda_err("record event"))?;
        let t = a.elapsed_ms(&b).map_err(cuda_err("layer call"))? as f64;
        if i >= warmup {
            ts.push(t);
        }
    }
    Ok(median(ts))
}

/// Milliseconds per call of `f` queued `reps` times back to back (after `warmup` calls).
fn time_queued(
    layer: &CudaLayer,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let st = layer.runtime().stream().clone();
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    for _ in 0..warmup {
        f()?;
    }
    let a = st.record_event(flags).map_err(cuda_err("record event"))?;
    for _ in 0..reps {
        f()?;
    }
    let b = st.record_event(flags).map_err(cuda_err("record event"))?;
    Ok(a.elapsed_ms(&b).map_err(cuda_err("decode steps"))? as f64 / reps.max(1) as f64)
}

fn random_hidden(
    st: &std::sync::Arc<cudarc::driver::CudaStream>,
    shape: &[usize],
    seed: u64,
) -> Result<DeviceTensor> {
    let mut rng = SplitMix64::new(seed);
    DeviceTensor::from_host(
        st,
        &Tensor::from_fn(shape, |_| rng.uniform()),
        ElemType::Bf16,
    )
}

/// One row of the report.
struct Row {
    case: String,
    ours_ms: f64,
    rate: String,
    torch: Vec<(String, f64)>,
}

/// Run the bench; returns the markdown table (and writes a JSON report / SVG beside it when
/// `json` is given by the caller).
pub fn run_layer(o: &LayerOptions) -> Result<String> {
    let dev = cuda_device()?;
    let config = SpecLayer::config_from_str(&spec(o), &RuntimeDims::default())?;
    let layer = SpecLayer::init(config, 7)?;
    let cuda = CudaLayer::new(&layer, &dev)?;
    let st = cuda.runtime().stream().clone();
    let (h, ng, hn) = (o.hidden, o.groups, o.head_dim);
    let args = ForwardArgs::default();
    let mut rows: Vec<Row> = Vec::new();
    let torch = run_torch(o);

    for &s in &o.seqlens {
        let x = random_hidden(&st, &[s, 1, h], s as u64)?;
        let fwd = time_each(&cuda, o.warmup, o.reps, || {
            cuda.forward_device(&x, &args).map(|_| ())
        })?;
        let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, s, 1, ng, hn)?;
        let pre = time_each(&cuda, o.warmup, o.reps, || {
            let r = cuda.prefill_device(&x, &mut cache, 0, 0, &args).map(|_| ());
            cache.rollback();
            r
        })?;
        let tf = |ms: f64| format!("{:.1} TFLOP/s", prefill_flops(o, s) / (ms * 1e-3) / 1e12);
        let t = torch_for(&torch, "prefill", &[("tokens", s)]);
        rows.push(Row {
            case: format!("prefill {s} (forward)"),
            ours_ms: fwd,
            rate: tf(fwd),
            torch: t.clone(),
        });
        rows.push(Row {
            case: format!("prefill {s} (static cache)"),
            ours_ms: pre,
            rate: format!("{} ({:.2}x forward)", tf(pre), fwd / pre),
            torch: t,
        });
    }
    // One prefill chunk through the paged pool (block 64) against the plain forward on the
    // same tokens, both through the host-tensor API (upload, layer, read-back).
    if let Some(&s) = o.seqlens.iter().find(|&&s| s == 8192).or(o.seqlens.first()) {
        use attention_runtime::cuda::DevicePagedKvCache;
        use attention_runtime::kv_cache::{BlockTable, PagedBatch};
        let bs = 64;
        let nb = s.div_ceil(bs);
        let mut pool = DevicePagedKvCache::new(&st, ElemType::Bf16, 1, nb, bs, ng, hn)?;
        let mut table = BlockTable::new(1, nb)?;
        let ids = pool.allocator_mut().alloc(nb)?;
        table.set_row(0, &ids)?;
        let mut rng = SplitMix64::new(5);
        let xh = Tensor::from_fn(&[s, h], |_| rng.uniform());
        let (cu, lens) = ([0, s as i32], [s as i32]);
        let batch = PagedBatch {
            cu_seqlens_q: &cu,
            seqlens_k: &lens,
            block_table: &table,
        };
        let paged = time_each(&cuda, o.warmup, o.reps, || {
            cuda.forward_paged(&xh, &mut pool, 0, &batch).map(|_| ())
        })?;
        let x3 = Tensor::new(&[s, 1, h], xh.data().to_vec())?;
        let plain = time_each(&cuda, o.warmup, o.reps, || {
            cuda.forward(&x3, &args).map(|_| ())
        })?;
        rows.push(Row {
            case: format!("paged prefill {s} (block {bs}, host tensors)"),
            ours_ms: paged,
            rate: format!(
                "{:.2}x forward (host tensors, {plain:.3} ms)",
                plain / paged
            ),
            torch: Vec::new(),
        });
        let xd = DeviceTensor::from_host(&st, &xh, ElemType::Bf16)?;
        let x3d = DeviceTensor::from_host(&st, &x3, ElemType::Bf16)?;
        let paged_d = time_each(&cuda, o.warmup, o.reps, || {
            cuda.forward_paged_device(&xd, &mut pool, 0, &batch)
                .map(|_| ())
        })?;
        let plain_d = time_each(&cuda, o.warmup, o.reps, || {
            cuda.forward_device(&x3d, &args).map(|_| ())
        })?;
        rows.push(Row {
            case: format!("paged prefill {s} (block {bs}, device tensors)"),
            ours_ms: paged_d,
            rate: format!("{:.2}x forward_device ({plain_d:.3} ms)", plain_d / paged_d),
            torch: Vec::new(),
        });
    }
    if o.chunk > 0 {
        let (c, before) = (o.chunk, o.ctx_before);
        let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, before + c, 1, ng, hn)?;
        let x0 = random_hidden(&st, &[before, 1, h], 11)?;
        cuda.prefill_device(&x0, &mut cache, 0, 0, &args)?;
        cache.advance(0, 1, before)?;
        let x = random_hidden(&st, &[c, 1, h], 12)?;
        let ms = time_each(&cuda, o.warmup, o.reps, || {
            let r = cuda.prefill_device(&x, &mut cache, 0, 0, &args).map(|_| ());
            cache.rollback();
            r
        })?;
        rows.push(Row {
            case: format!("chunk {c} after {before} cached"),
            ours_ms: ms,
            rate: String::new(),
            torch: Vec::new(),
        });
    }
    for &ctx in &o.contexts {
        for &b in &o.batches {
            let cache_bytes = 2 * b * ng * (ctx + 1) * hn * 2;
            if cache_bytes > o.max_cache_bytes {
                eprintln!("attn bench layer: decode b{b} ctx{ctx} skipped (cache {cache_bytes} B)");
                continue;
            }
            let mut cache = DeviceStaticKvCache::new(&st, ElemType::Bf16, 1, ctx + 1, b, ng, hn)?;
            // Fill the cache with real keys: prefill in chunks of at most 64k tokens.
            // (One random chunk reused: the keys differ by position through rope.)
            let step = (65536 / b).clamp(1, ctx);
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
            let x = random_hidden(&st, &[1, b, h], 99)?;
            let mut out = DeviceTensor::uninit(&st, ElemType::Bf16, &[b, h], "out")?;
            let eager = time_queued(&cuda, o.warmup, o.reps, || {
                let r = cuda.decode_device_into(&x, &mut out, &mut cache, 0, 0, &args);
                cache.rollback();
                r
            })?;
            let mut graph = cuda.capture_decode(&cache, 0, 0, b, &args)?;
            let replay = time_queued(&cuda, o.warmup, o.reps, || {
                let r = graph.replay_device(&x, &mut out, &mut cache);
                cache.rollback();
                r
            })?;
            let weights = 2 * h * ((o.heads + 2 * ng) * hn + o.heads * hn);
            let gbs = |ms: f64| {
                format!(
                    "{:.0} GB/s",
                    (cache_bytes + weights) as f64 / (ms * 1e-3) / 1e9
                )
            };
            let key = [("batch", b), ("ctx", ctx)];
            rows.push(Row {
                case: format!("decode b{b} ctx{ctx} eager"),
                ours_ms: eager,
                rate: format!("{} ({:.2}x graph)", gbs(eager), eager / replay),
                torch: torch_for(&torch, "decode-eager", &key),
            });
            rows.push(Row {
                case: format!("decode b{b} ctx{ctx} graph"),
                ours_ms: replay,
                rate: gbs(replay),
                torch: torch_for(&torch, "decode-graph", &key),
            });
        }
    }
    st.synchronize().map_err(cuda_err("bench layer"))?;
    let mut t = String::from("| call | ours (ms) | rate | PyTorch layer (ms) | ours / PyTorch |\n|---|---|---|---|---|\n");
    for r in &rows {
        let tp = r
            .torch
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.3}"))
            .collect::<Vec<_>>()
            .join(", ");
        let ratio = r
            .torch
            .iter()
            .map(|(n, ms)| format!("{n} {:.2}x", ms / r.ours_ms))
            .collect::<Vec<_>>()
            .join(", ");
        t.push_str(&format!(
            "| {} | {:.3} | {} | {} | {} |\n",
            r.case, r.ours_ms, r.rate, tp, ratio
        ));
    }
    Ok(t)
}

/// The PyTorch layer's JSON lines (empty when the script is off or fails; the reason goes
/// to stderr).
fn run_torch(o: &LayerOptions) -> Vec<String> {
    let Some(script) = &o.torch_script else {
        return Vec::new();
    };
    let j = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let res = Command::new("python3")
        .arg(script)
        .args(["--hidden", &o.hidden.to_string()])
        .args(["--heads", &o.heads.to_string()])
        .args(["--groups", &o.groups.to_string()])
        .args(["--head-dim", &o.head_dim.to_string()])
        .args(["--seqlens", &j(&o.seqlens)])
        .args(["--batches", &j(&o.batches)])
        .args(["--contexts", &j(&o.contexts)])
        .args(["--max-cache-bytes", &o.max_cache_bytes.to_string()])
        .args(["--reps", &o.reps.to_string()])
        .output();
    match res {
        Ok(out) => {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(String::from)
                .collect()
        }
        Err(e) => {
            eprintln!(
                "attn bench layer: could not run python3 {}: {e}",
                script.display()
            );
            Vec::new()
        }
    }
}

/// `(backend, ms)` of the PyTorch lines of `case` whose fields match `key`.
fn torch_for(lines: &[String], case: &str, key: &[(&str, usize)]) -> Vec<(String, f64)> {
    let (case, mode) = match case.split_once('-') {
        Some((c, m)) => (c, Some(m)),
        None => (case, None),
    };
    lines
        .iter()
        .filter(|l| json_field(l, "case").as_deref() == Some(case))
        .filter(|l| mode.is_none_or(|m| json_field(l, "mode").as_deref() == Some(m)))
        .filter(|l| {
            key.iter()
                .all(|(k, v)| json_field(l, k) == Some(v.to_string()))
        })
        .filter_map(|l| {
            let ms = json_field(l, "ms")?.parse::<f64>().ok()?;
            Some((json_field(l, "backend")?, ms))
        })
        .collect()
}
