//! Megatron-Core's `run_realtime_tests` for the attention layer (semantics.md): with q/k
//! norm, the `q_layernorm` / `k_layernorm` parameters are whole on every tensor-parallel rank
//! and must stay bitwise equal; a difference is silent corruption (a bad GPU, a missed
//! all-reduce of their gradients).
//!
//! Each rank hashes its copies (SHA-256 over the name, the shape and the f32 bits,
//! little-endian), the digests are all-gathered over the communicator (bytes, not tensors),
//! and every rank compares every rank's digests with rank 0's, so every rank reports the same
//! [`AttnError::RankMismatch`] naming the first rank that differs.

use sha2::{Digest, Sha256};

use super::comm::Communicator;
use crate::error::{AttnError, Result};
use crate::layer::AttentionLayer;
use crate::tensor::Tensor;

/// SHA-256 of one parameter: its name, its shape (u64 little-endian per dim) and its f32 bits
/// (little-endian), as 64 hex digits.
pub fn param_digest(name: &str, t: &Tensor) -> String {
    let mut h = Sha256::new();
    h.update((name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    h.update((t.shape().len() as u64).to_le_bytes());
    for d in t.shape() {
        h.update((*d as u64).to_le_bytes());
    }
    for v in t.data() {
        h.update(v.to_bits().to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Check that `params` (name, tensor) are bitwise equal on every rank of `comm`; every rank
/// must call it with the same names in the same order.
///
/// Errors: [`AttnError::RankMismatch`] naming the parameter and the first rank (after 0)
/// whose copy differs, or a rank that lacks it (`got` "missing"); those of
/// [`Communicator::all_gather_bytes`].
pub fn check_params_equal<C: Communicator + ?Sized>(
    comm: &C,
    params: &[(String, Tensor)],
) -> Result<()> {
    let mine: String = params
        .iter()
        .map(|(k, t)| format!("{k}\t{}\n", param_digest(k, t)))
        .collect();
    let all = comm.all_gather_bytes(mine.as_bytes())?;
    let parse = |b: &[u8]| -> Vec<(String, String)> {
        String::from_utf8_lossy(b)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, d)| (k.to_string(), d.to_string()))
            .collect()
    };
    let reference = parse(&all[0]);
    for (rank, bytes) in all.iter().enumerate().skip(1) {
        let theirs = parse(bytes);
        for (name, want) in &reference {
            let got = theirs
                .iter()
                .find(|(k, _)| k == name)
                .map_or("missing", |(_, d)| d.as_str());
            if got != want {
                return Err(AttnError::RankMismatch {
                    param: name.clone(),
                    rank,
                    expected: want.clone(),
                    got: got.into(),
                });
            }
        }
        if let Some((name, d)) = theirs
            .iter()
            .find(|(k, _)| !reference.iter().any(|(r, _)| r == k))
        {
            return Err(AttnError::RankMismatch {
                param: name.clone(),
                rank,
                expected: "missing (rank 0 has no such parameter)".into(),
                got: d.clone(),
            });
        }
    }
    Ok(())
}

/// `run_realtime_tests` for one layer: its `q_layernorm.*` and `k_layernorm.*` parameters
/// (none without q/k norm, or for an L2 norm) must be bitwise equal on every rank.
///
/// Errors: those of [`check_params_equal`].
pub fn run_realtime_tests<C: Communicator + ?Sized>(
    comm: &C,
    layer: &dyn AttentionLayer,
) -> Result<()> {
    let norms: Vec<(String, Tensor)> = layer
        .state_dict("")
        .into_iter()
        .filter(|(k, _)| k.starts_with("q_layernorm.") || k.starts_with("k_layernorm."))
        .collect();
    check_params_equal(comm, &norms)
}
