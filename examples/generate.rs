//! Serving-style generation through a stack of attention layers and the paged KV cache,
//! written once over the backend seam (`BackendLayer`) and run on the GPU or the CPU.
//!
//!     cargo run --release --example generate -- [--layers 4] [--requests 6] [--new-tokens 32]
//!         [--spec "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope"]
//!         [--weights W.safetensors --prefix "decoder.layers.{}.self_attention."]
//!
//! Several requests of different prompt lengths are scheduled step by step, the way a serving
//! engine does it: every step packs the decode requests first (one token each), then prefill
//! chunks of the requests still reading their prompt, into one mixed batch that every layer
//! runs with `forward_paged` (flash_decode_and_prefill semantics: bottom-right causal over each
//! request's cached keys). Blocks are allocated from the pool as requests grow and returned
//! when they finish. There is no embedding, MLP, residual or norm: a token's hidden state is
//! random for prompts and, when decoding, the last layer's output at the request's previous
//! token.
//!
//! It runs on the GPU when one is present (`CudaLayer`, bf16, every tensor on the device: the
//! prompts are uploaded once, each step's packed input is assembled by device-to-device row
//! copies, and only the step's small metadata (cu_seqlens, lengths, block table) crosses the
//! bus), and otherwise on the CPU reference backend; it says which. It prints tokens per
//! second for prefill (steps that read prompt tokens) and for decode (steps of decode rows
//! only), each step timed to its end on the device.
//!
//! A Llama-3-8B-shaped run on a GPU:
//!
//!     cargo run --release --example generate -- --layers 4 --requests 16 --max-prompt 1024 \
//!         --new-tokens 64 --chunk 512 --block-size 64 --num-blocks 2048 \
//!         --spec "self, heads=32, gqa=8, head_dim=128, qk_layernorm=rms, rope"

use std::time::Instant;

use attention::runtime::backend::{BTensor, Backend, BackendLayer, CpuLayer, PagedCache};
use attention::runtime::cuda::CudaLayer;
use attention::runtime::kv_cache::{BlockTable, PagedBatch};
use attention::runtime::spec_layer::SpecLayer;
use attention::runtime::{Device, Result, RuntimeDims, Tensor, WeightStore};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
struct Args {
    /// The layer spec (the `#[attention]` grammar).
    #[arg(
        long,
        default_value = "self, heads=8, gqa=2, head_dim=64, qk_layernorm=rms, rope"
    )]
    spec: String,
    /// Number of stacked layers.
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Number of requests; prompt lengths vary between 8 and `max_prompt`.
    #[arg(long, default_value_t = 6)]
    requests: usize,
    /// Longest prompt.
    #[arg(long, default_value_t = 96)]
    max_prompt: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Prefill chunk: most prompt tokens one request reads per step.
    #[arg(long, default_value_t = 32)]
    chunk: usize,
    /// Paged KV block size (a power of two >= 16).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Blocks in the pool.
    #[arg(long, default_value_t = 256)]
    num_blocks: usize,
    /// Optional safetensors weights; `--prefix` with `{}` for the layer index.
    #[arg(long)]
    weights: Option<std::path::PathBuf>,
    /// Weight-name prefix, `{}` = layer index.
    #[arg(long, default_value = "decoder.layers.{}.self_attention.")]
    prefix: String,
}

/// One request's state.
struct Request<T> {
    /// Prompt hidden states `[prompt, h]` on the backend.
    prompt: T,
    prompt_len: usize,
    /// Tokens whose k/v are in the cache.
    cached: usize,
    generated: usize,
    blocks: Vec<u32>,
    /// The next decode input `[1, h]` (the last layer's output at the previous token).
    next: Option<T>,
}

/// Totals of a run.
#[derive(Default)]
struct Report {
    steps: usize,
    prefill_tokens: usize,
    prefill_secs: f64,
    decode_tokens: usize,
    decode_secs: f64,
    free_blocks: usize,
    num_blocks: usize,
}

fn rng(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// The serving loop, the same on every backend.
fn generate<L: BackendLayer>(layers: &[L], a: &Args) -> Result<Report, Box<dyn std::error::Error>> {
    let be = layers[0].backend();
    let cfg = layers[0].layer_config().clone();
    let h = cfg.hidden;
    let mut pool = be.paged_cache(
        layers.len(),
        a.num_blocks,
        a.block_size,
        cfg.groups,
        cfg.head_dim,
    )?;
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut reqs: Vec<Request<BTensor<L::Backend>>> = Vec::new();
    for i in 0..a.requests {
        let len = 8 + (i * 37) % a.max_prompt.saturating_sub(7).max(1);
        let host = Tensor::new(&[len, h], (0..len * h).map(|_| rng(&mut seed)).collect())?;
        reqs.push(Request {
            prompt: be.upload(&host)?,
            prompt_len: len,
            cached: 0,
            generated: 0,
            blocks: Vec::new(),
            next: None,
        });
    }
    be.synchronize()?;
    let total: usize = reqs.iter().map(|r| r.prompt_len + a.new_tokens).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tokens {msg}",
    )?);
    let mut rep = Report::default();
    let mut processed = 0usize;
    loop {
        // Decode requests first, then prefill chunks.
        let mut order: Vec<usize> = (0..reqs.len())
            .filter(|&i| reqs[i].cached >= reqs[i].prompt_len && reqs[i].generated < a.new_tokens)
            .collect();
        order.extend((0..reqs.len()).filter(|&i| reqs[i].cached < reqs[i].prompt_len));
        if order.is_empty() {
            break;
        }
        let start = Instant::now();
        let mut cu_q = vec![0i32];
        let mut seqlens_k = Vec::new();
        for &i in &order {
            let r = &mut reqs[i];
            let new = if r.cached < r.prompt_len {
                (r.prompt_len - r.cached).min(a.chunk)
            } else {
                1
            };
            let need = (r.cached + new).div_ceil(a.block_size);
            if need > r.blocks.len() {
                let more = pool.allocator_mut().alloc(need - r.blocks.len())?;
                r.blocks.extend(more);
            }
            cu_q.push(cu_q.last().unwrap() + new as i32);
            seqlens_k.push((r.cached + new) as i32);
        }
        let t = *cu_q.last().unwrap() as usize;
        // The packed input, assembled on the backend.
        let mut x = be.zeros(&[t, h])?;
        let mut prefill_rows = 0;
        for (row, &i) in order.iter().enumerate() {
            let r = &reqs[i];
            let (s, e) = (cu_q[row] as usize, cu_q[row + 1] as usize);
            if r.cached < r.prompt_len {
                be.copy_rows(&mut x, s, &r.prompt, r.cached, e - s)?;
                prefill_rows += e - s;
            } else {
                be.copy_rows(
                    &mut x,
                    s,
                    r.next.as_ref().expect("decoding after prefill"),
                    0,
                    1,
                )?;
            }
        }
        let max_blocks = order
            .iter()
            .map(|&i| reqs[i].blocks.len())
            .max()
            .unwrap_or(1);
        let mut table = BlockTable::new(order.len(), max_blocks)?;
        for (row, &i) in order.iter().enumerate() {
            table.set_row(row, &reqs[i].blocks)?;
        }
        let batch = PagedBatch {
            cu_seqlens_q: &cu_q,
            seqlens_k: &seqlens_k,
            block_table: &table,
        };
        for (l, layer) in layers.iter().enumerate() {
            x = layer.forward_paged(&x, &mut pool, l, &batch)?;
        }
        for (row, &i) in order.iter().enumerate() {
            let r = &mut reqs[i];
            let (s, e) = (cu_q[row] as usize, cu_q[row + 1] as usize);
            let was_prefill = r.cached < r.prompt_len;
            r.cached += e - s;
            if !was_prefill || r.cached == r.prompt_len {
                let mut next = be.zeros(&[1, h])?;
                be.copy_rows(&mut next, 0, &x, e - 1, 1)?;
                r.next = Some(next);
                if !was_prefill {
                    r.generated += 1;
                }
            }
            if r.generated == a.new_tokens {
                pool.allocator_mut().release_all(&r.blocks)?;
                r.blocks.clear();
            }
        }
        be.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        if prefill_rows > 0 {
            rep.prefill_tokens += t;
            rep.prefill_secs += secs;
        } else {
            rep.decode_tokens += t;
            rep.decode_secs += secs;
        }
        processed += t;
        rep.steps += 1;
        bar.set_position(processed as u64);
        bar.set_message(format!(
            "step {}, {} in batch, {} free blocks",
            rep.steps,
            order.len(),
            pool.allocator().num_free()
        ));
    }
    bar.finish();
    rep.free_blocks = pool.allocator().num_free();
    rep.num_blocks = pool.allocator().num_blocks();
    Ok(rep)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = Args::parse();
    let device = Device::best();
    println!("device: the layers run on the {device}");
    let config = SpecLayer::config_from_str(&a.spec, &RuntimeDims::default())?;
    let store = a.weights.as_ref().map(WeightStore::from_file).transpose()?;
    let layers: Vec<SpecLayer> = (0..a.layers)
        .map(|i| match &store {
            Some(w) => SpecLayer::load(config.clone(), w, &a.prefix.replace("{}", &i.to_string())),
            None => SpecLayer::init(config.clone(), 1000 + i as u64),
        })
        .collect::<Result<_, _>>()?;
    let rep = match &device {
        Device::Cuda(d) => {
            let gpu: Vec<CudaLayer> = layers
                .iter()
                .map(|l| CudaLayer::new(l, d))
                .collect::<Result<_>>()?;
            generate(&gpu, &a)?
        }
        Device::Cpu => {
            let cpu: Vec<CpuLayer<SpecLayer>> = layers.into_iter().map(CpuLayer::new).collect();
            generate(&cpu, &a)?
        }
    };
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    println!(
        "{} requests, {} layers, {} steps: prefill {} tokens in {:.3} s ({:.0} tokens/s), \
         decode {} tokens in {:.3} s ({:.0} generated tokens/s); pool back to {} free of {} blocks",
        a.requests,
        a.layers,
        rep.steps,
        rep.prefill_tokens,
        rep.prefill_secs,
        rate(rep.prefill_tokens, rep.prefill_secs),
        rep.decode_tokens,
        rep.decode_secs,
        rate(rep.decode_tokens, rep.decode_secs),
        rep.free_blocks,
        rep.num_blocks,
    );
    Ok(())
}
