//! Serving-style generation through a stack of attention layers and the paged KV cache.
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
//! when they finish. There is no embedding or MLP: a token's "hidden state" is random for
//! prompts and, when decoding, the normalized output of the last layer.
//!
//! It runs on the GPU (`CudaLayer::forward_paged` over a device block pool, bf16) when one is
//! present, and otherwise on the CPU reference backend; it says which.

use std::time::Instant;

use attention::runtime::cuda::{CudaLayer, CudaRuntime, DevicePagedKvCache};
use attention::runtime::kv_cache::{BlockAllocator, BlockTable, PagedBatch, PagedKvCache};
use attention::runtime::spec_layer::SpecLayer;
use attention::runtime::{
    AttentionLayer, Device, LayerConfig, Result, RuntimeDims, Tensor, WeightStore,
};
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

struct Request {
    prompt: usize,
    /// Tokens whose k/v are in the cache.
    cached: usize,
    generated: usize,
    blocks: Vec<u32>,
    /// The next decode input (normalized last-layer output).
    next_hidden: Vec<f32>,
}

/// The layer stack and its paged KV cache, on the CPU or on a GPU.
enum Stack {
    Cpu(Vec<SpecLayer>, PagedKvCache),
    Cuda(Vec<CudaLayer>, DevicePagedKvCache),
}

impl Stack {
    fn new(device: &Device, layers: Vec<SpecLayer>, cfg: &LayerConfig, a: &Args) -> Result<Self> {
        let (n, ng, hn) = (layers.len(), cfg.groups, cfg.head_dim);
        Ok(match device {
            Device::Cuda(d) => {
                let stream = CudaRuntime::get(d)?.stream().clone();
                let cache = DevicePagedKvCache::new(
                    &stream,
                    cfg.dtype.into(),
                    n,
                    a.num_blocks,
                    a.block_size,
                    ng,
                    hn,
                )?;
                let gpu = layers
                    .iter()
                    .map(|l| CudaLayer::new(l, d))
                    .collect::<Result<_>>()?;
                Stack::Cuda(gpu, cache)
            }
            Device::Cpu => {
                let cache = PagedKvCache::new(n, a.num_blocks, a.block_size, ng, hn)?;
                Stack::Cpu(layers, cache)
            }
        })
    }

    fn allocator(&self) -> &BlockAllocator {
        match self {
            Stack::Cpu(_, c) => c.allocator(),
            Stack::Cuda(_, c) => c.allocator(),
        }
    }

    fn allocator_mut(&mut self) -> &mut BlockAllocator {
        match self {
            Stack::Cpu(_, c) => c.allocator_mut(),
            Stack::Cuda(_, c) => c.allocator_mut(),
        }
    }

    /// Every layer over the packed step `x` `[T, h]`, with a residual connection so deeper
    /// layers see the tokens too.
    fn step(&mut self, mut x: Tensor, batch: &PagedBatch<'_>) -> Result<Tensor> {
        let n = match self {
            Stack::Cpu(l, _) => l.len(),
            Stack::Cuda(l, _) => l.len(),
        };
        for l in 0..n {
            let out = match self {
                Stack::Cpu(layers, cache) => layers[l].forward_paged(&x, cache, l, batch)?,
                Stack::Cuda(layers, cache) => layers[l].forward_paged(&x, cache, l, batch)?,
            };
            let mut y = out.output;
            for (o, i) in y.data_mut().iter_mut().zip(x.data()) {
                *o += i;
            }
            x = y;
        }
        Ok(x)
    }
}

fn rng(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
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
    let h = config.hidden;
    let mut stack = Stack::new(&device, layers, &config, &a)?;

    let mut seed = 0x2545f4914f6cdd1du64;
    let mut reqs: Vec<Request> = (0..a.requests)
        .map(|i| Request {
            prompt: 8 + (i * 37) % a.max_prompt.saturating_sub(7).max(1),
            cached: 0,
            generated: 0,
            blocks: Vec::new(),
            next_hidden: Vec::new(),
        })
        .collect();
    let total: usize = reqs.iter().map(|r| r.prompt + a.new_tokens).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tokens {msg}",
    )?);

    let start = Instant::now();
    let (mut steps, mut processed, mut decoded) = (0usize, 0usize, 0usize);
    loop {
        // Decode requests first, then prefill chunks.
        let mut order: Vec<usize> = (0..reqs.len())
            .filter(|&i| reqs[i].cached >= reqs[i].prompt && reqs[i].generated < a.new_tokens)
            .collect();
        order.extend((0..reqs.len()).filter(|&i| reqs[i].cached < reqs[i].prompt));
        if order.is_empty() {
            break;
        }
        let mut hidden = Vec::new();
        let mut cu_q = vec![0i32];
        let mut seqlens_k = Vec::new();
        for &i in &order {
            let r = &mut reqs[i];
            let new = if r.cached < r.prompt {
                (r.prompt - r.cached).min(a.chunk)
            } else {
                1
            };
            if r.cached < r.prompt {
                hidden.extend((0..new * h).map(|_| rng(&mut seed)));
            } else {
                hidden.extend_from_slice(&r.next_hidden);
            }
            let need = (r.cached + new).div_ceil(a.block_size);
            if need > r.blocks.len() {
                let more = stack.allocator_mut().alloc(need - r.blocks.len())?;
                r.blocks.extend(more);
            }
            cu_q.push(cu_q.last().unwrap() + new as i32);
            seqlens_k.push((r.cached + new) as i32);
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
        let t = *cu_q.last().unwrap() as usize;
        let x = stack.step(Tensor::new(&[t, h], hidden)?, &batch)?;
        for (row, &i) in order.iter().enumerate() {
            let r = &mut reqs[i];
            let (s, e) = (cu_q[row] as usize, cu_q[row + 1] as usize);
            let was_prefill = r.cached < r.prompt;
            r.cached += e - s;
            if !was_prefill || r.cached == r.prompt {
                // The last position's output becomes the next input, RMS-normalized.
                let last = &x.data()[(e - 1) * h..e * h];
                let rms = (last.iter().map(|v| v * v).sum::<f32>() / h as f32 + 1e-6).sqrt();
                r.next_hidden = last.iter().map(|v| v / rms).collect();
                if !was_prefill {
                    r.generated += 1;
                    decoded += 1;
                }
            }
            if r.generated == a.new_tokens {
                stack.allocator_mut().release_all(&r.blocks)?;
                r.blocks.clear();
            }
        }
        processed += t;
        steps += 1;
        bar.set_position(processed as u64);
        bar.set_message(format!(
            "step {steps}, {} in batch, {} free blocks",
            order.len(),
            stack.allocator().num_free()
        ));
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} requests, {} layers: {processed} tokens in {steps} steps, {secs:.2} s \
         ({:.0} tokens/s overall, {:.0} generated tokens/s); pool back to {} free of {} blocks",
        a.requests,
        a.layers,
        processed as f64 / secs,
        decoded as f64 / secs,
        stack.allocator().num_free(),
        stack.allocator().num_blocks(),
    );
    Ok(())
}
