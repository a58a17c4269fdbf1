//! One engine-style scenario written once over `BackendLayer`, run by the CPU test
//! (`backend_seam.rs`) and the GPU test (`gpu_backend_seam.rs`) on the same generated struct.

use attention::runtime::backend::{Backend, BackendLayer, PagedCache, StaticCache};
use attention::runtime::kv_cache::{BlockTable, PagedBatch};
use attention::runtime::layer::ForwardArgs;
use attention::runtime::modules::SplitMix64;
use attention::runtime::{Result, Tensor};

/// A random host tensor in [-1, 1).
pub fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut g = SplitMix64::new(seed);
    let n = shape.iter().product();
    Tensor::new(shape, (0..n).map(|_| g.uniform()).collect()).unwrap()
}

/// Every output of the scenario, on the host, in call order, with a name each.
pub type Outputs = Vec<(String, Tensor)>;

/// Forward (padded), a static-cache prefill of two slots then three decode steps, and two
/// paged steps (two prefills, then one decode row beside a prefill chunk), all through the
/// seam. `h` is the layer's hidden size.
pub fn scenario<L: BackendLayer>(layer: &L, seed: u64) -> Result<Outputs> {
    let be = layer.backend();
    let c = layer.layer_config().clone();
    let (h, ng, hn) = (c.hidden, c.groups, c.head_dim);
    let mut out = Vec::new();
    let args = ForwardArgs::default();

    let x = be.upload(&rand_tensor(&[7, 2, h], seed))?;
    let y = layer.forward(&x, &args)?;
    out.push(("forward".to_string(), be.download(&y)?));

    let mut cache = be.static_cache(1, 32, 3, ng, hn)?;
    let x = be.upload(&rand_tensor(&[5, 2, h], seed + 1))?;
    let y = layer.prefill(&x, &mut cache, 0, 1, &args)?;
    cache.advance(1, 2, 5)?;
    out.push(("prefill".to_string(), be.download(&y)?));
    for step in 0..3 {
        let x = be.upload(&rand_tensor(&[1, 2, h], seed + 10 + step))?;
        let y = layer.decode(&x, &mut cache, 0, 1, &args)?;
        cache.advance(1, 2, 1)?;
        out.push((format!("decode {step}"), be.download(&y)?));
    }
    assert_eq!(cache.seqlens(), &[0, 8, 8]);

    let mut pool = be.paged_cache(1, 16, 16, ng, hn)?;
    let ids = pool.allocator_mut().alloc(5)?;
    let mut table = BlockTable::new(2, 3)?;
    table.set_row(0, &ids[..2])?;
    table.set_row(1, &ids[2..])?;
    // Step 1: request 0 reads 20 prompt tokens, request 1 reads 9.
    let x = be.upload(&rand_tensor(&[29, h], seed + 20))?;
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 20, 29],
        seqlens_k: &[20, 9],
        block_table: &table,
    };
    let y = layer.forward_paged(&x, &mut pool, 0, &batch)?;
    out.push(("paged prefill".to_string(), be.download(&y)?));
    // Step 2: request 0 decodes one token, request 1 reads a chunk of 30 (spans 3 blocks).
    let x = be.upload(&rand_tensor(&[31, h], seed + 21))?;
    let batch = PagedBatch {
        cu_seqlens_q: &[0, 1, 31],
        seqlens_k: &[21, 39],
        block_table: &table,
    };
    let y = layer.forward_paged(&x, &mut pool, 0, &batch)?;
    out.push(("paged mixed".to_string(), be.download(&y)?));

    // Rows copied between backend tensors (what an engine does to build the next batch).
    let mut z = be.zeros(&[3, h])?;
    be.copy_rows(&mut z, 1, &y, 0, 2)?;
    out.push(("copy_rows".to_string(), be.download(&z)?));
    be.synchronize()?;
    Ok(out)
}
