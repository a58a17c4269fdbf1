//! Weights of one tensor-parallel rank: a whole layer or checkpoint sharded at load time
//! ([`shard_layer`], [`load_tp_rank`]), or the reference system's per-rank shards
//! ([`load_mp_rank`]: one safetensors file per rank, `mp_rank_00`, `mp_rank_01`, ..., each
//! holding the rank's shard of every tensor under the same Megatron name;
//! [`save_mp_rank_shards`] writes them).
//!
//! Files written here record `tp_rank` and `tp_size` in their safetensors metadata, and
//! [`load_mp_rank`] checks them when present, so a rank handed another rank's file (same
//! shapes) is an error too; files without that metadata (converted from Megatron's
//! `model_optim_rng.pt`) are checked by shape only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::tp_shard::TpPlan;
use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::layer::AttentionLayer;
use crate::spec_layer::SpecLayer;
use crate::weights::WeightStore;

/// The metadata key holding a shard's rank.
pub const TP_RANK_KEY: &str = "tp_rank";
/// The metadata key holding a shard's tensor-parallel world size.
pub const TP_SIZE_KEY: &str = "tp_size";

/// Rank `tp_rank`'s shard file under `dir`: `dir/mp_rank_{tp_rank:02}.safetensors`.
pub fn mp_rank_path(dir: impl AsRef<Path>, tp_rank: usize) -> PathBuf {
    dir.as_ref()
        .join(format!("mp_rank_{tp_rank:02}.safetensors"))
}

/// Rank `tp_rank`'s shard of `layer` (split over `tp_size` ranks) as a layer with the default
/// submodules and the rank's own config ([`TpPlan::config`]).
///
/// Errors: those of [`TpPlan::new`] and [`TpPlan::shard_state_dict`]; those of
/// [`SpecLayer::load`] when `layer`'s state dict lacks a parameter (a user submodule that does
/// not expose its weights in the default layout).
pub fn shard_layer(
    layer: &dyn AttentionLayer,
    tp_rank: usize,
    tp_size: usize,
) -> Result<SpecLayer> {
    let cfg = layer.config();
    let plan = TpPlan::new(cfg, tp_rank, tp_size)?;
    let shards = plan.shard_state_dict(cfg, &layer.state_dict(""), "")?;
    SpecLayer::load(plan.config(cfg)?, &WeightStore::from_tensors(shards), "")
}

/// Load a whole checkpoint (Megatron names under `prefix`) and keep rank `tp_rank`'s shard.
///
/// Errors: those of [`SpecLayer::load`] for the whole layer (a missing or misshaped tensor
/// named by its key), then those of [`shard_layer`].
pub fn load_tp_rank(
    config: &LayerConfig,
    weights: &WeightStore,
    prefix: &str,
    tp_rank: usize,
    tp_size: usize,
) -> Result<SpecLayer> {
    let whole = SpecLayer::load(config.clone(), weights, prefix)?;
    shard_layer(&whole, tp_rank, tp_size)
}

fn meta_check(shard: &WeightStore, key: &str, rank: usize, want: usize) -> Result<()> {
    match shard.metadata().get(key) {
        Some(v) if v.trim() != want.to_string() => Err(AttnError::Shard {
            rank,
            key: format!("__metadata__.{key}"),
            expected: want.to_string(),
            got: format!("{v} (in {})", shard.source_name()),
        }),
        _ => Ok(()),
    }
}

/// Load rank `tp_rank`'s own shard file (`mp_rank_0N`-style: the rank's shard of every
/// tensor under the whole layer's Megatron names, with `prefix`) for a layer of `config` split
/// over `tp_size` ranks.
///
/// Errors: [`AttnError::Shard`] naming the rank when the file's metadata names another rank
/// or world size, or a tensor has another shape than the rank's shard (a shard of another
/// `tp_size`); those of [`TpPlan::new`]; [`AttnError::MissingWeight`] for a missing tensor.
pub fn load_mp_rank(
    config: &LayerConfig,
    shard: &WeightStore,
    prefix: &str,
    tp_rank: usize,
    tp_size: usize,
) -> Result<SpecLayer> {
    let plan = TpPlan::new(config, tp_rank, tp_size)?;
    meta_check(shard, TP_SIZE_KEY, tp_rank, tp_size)?;
    meta_check(shard, TP_RANK_KEY, tp_rank, tp_rank)?;
    SpecLayer::load(plan.config(config)?, shard, prefix).map_err(|e| match e {
        AttnError::WeightShape { key, expected, got } => AttnError::Shard {
            rank: tp_rank,
            key,
            expected: format!("{expected:?} (rank {tp_rank}'s shard at tp_size = {tp_size})"),
            got: format!("{got:?}"),
        },
        e => e,
    })
}

/// Write every rank's shard of `layer` (Megatron names under `prefix`) to
/// [`mp_rank_path`]`(dir, r)` for `r` in `0..tp_size`, with `tp_rank` / `tp_size` metadata;
/// returns the paths.
///
/// Errors: those of [`shard_layer`]; [`AttnError::Io`].
pub fn save_mp_rank_shards(
    layer: &dyn AttentionLayer,
    dir: impl AsRef<Path>,
    prefix: &str,
    tp_size: usize,
) -> Result<Vec<PathBuf>> {
    (0..tp_size)
        .map(|r| {
            let shard = shard_layer(layer, r, tp_size)?;
            let path = mp_rank_path(&dir, r);
            let meta = BTreeMap::from([
                (TP_RANK_KEY.to_string(), r.to_string()),
                (TP_SIZE_KEY.to_string(), tp_size.to_string()),
            ]);
            WeightStore::save_with_metadata(&path, &shard.state_dict(prefix), &meta)?;
            Ok(path)
        })
        .collect()
}
