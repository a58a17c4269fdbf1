//! Static-cache prefill and decode of a [`CpLayer`] (CPU reference), each rank caching its
//! own tokens in a [`CpStaticKvCache`] (which rank stores what: [`super::cp_cache`]).
//!
//! - **Prefill** ([`CpLayer::prefill_cp`]): `hidden` is this rank's rows `[s / cp, b, h]` of
//!   a prompt of `s` tokens per slot (a multiple of `2 cp`, [`super::CpLayout::split`]), into empty
//!   slots only. The rank runs the context-parallel forward of its chunks (the layer's
//!   `cp_comm_type`, causal with the layer's window, whatever its mask type, as a
//!   single-rank prefill is) and stores its chunks' keys and values. Returns its rows.
//! - **Decode** ([`CpLayer::decode_cp`]): `hidden` `[1, b, h]`, the same on every rank. Every
//!   rank computes q, k and v of the new token (replicated, rope at the token's position in
//!   its whole sequence), attends it over the keys it stores (plus the new key on the rank
//!   that will store it), giving a partial output and its LSE; the partials are all-gathered
//!   and merged by LSE in rank order (the merge of the `p2p` forward; attention sinks join
//!   once, after the merge), so every rank gets the same bits; then `linear_proj`. The new
//!   token's keys and values are appended on exactly one rank
//!   ([`super::cp_cache::CpCacheBook::decode_owner`]). Visibility is decided on global
//!   positions: bottom-right causal with the layer's window, as on one rank.
//!
//! Both steps leave the appended tokens pending until [`StaticCache::advance`] commits them
//! (the global count: 1 for a decode step), as on one GPU.
//!
//! # Agreement
//! Before a step does anything, the ranks exchange a short description of it (layer, batch
//! slots, tokens, each slot's whole length, and whether the rank accepts it) over
//! [`Communicator::all_gather_bytes`]. A rank whose own checks fail returns its error; the
//! others return [`AttnError::InvalidArgument`] (`context parallel step`) naming it; ranks
//! whose caches disagree (a step committed on one rank only) all return
//! [`AttnError::InvalidArgument`] (`cache`). In every case nothing is stored on any rank and
//! no rank waits on a collective the others never join. Arguments must have the same shapes
//! on every rank (a rank with another `b` would exchange partials of another size).

use std::sync::Mutex;

use attention_codegen::MaskType;

use super::comm::Communicator;
use super::cp::CpLayer;
use super::cp_cache::CpStaticKvCache;
use super::cp_core::{Acc, CpSinks};
use crate::backend::StaticCache;
use crate::error::{AttnError, Result};
use crate::kv_cache::StaticKvCache;
use crate::layer::{AttentionLayer, ForwardArgs, LayerOutput, LayerParts, PackedSeqParams};
use crate::modules::{CoreArgs, CoreAttentionModule};
use crate::reference::{attend_sequence, visible, AttendParams, SeqDims};
use crate::tensor::Tensor;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// Where a prefill's core attention leaves the rank's rotated keys and values.
pub(super) type KvCapture = Mutex<Option<(Tensor, Tensor)>>;

/// A core attention that hands its keys and values to `into`, then runs `inner`.
pub(super) struct CaptureCore<'a> {
    pub(super) inner: &'a dyn CoreAttentionModule,
    pub(super) into: &'a KvCapture,
}

impl CoreAttentionModule for CaptureCore<'_> {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &CoreArgs<'_>) -> Result<Tensor> {
        let out = self.inner.forward(q, k, v, args)?;
        *self.into.lock().unwrap_or_else(|p| p.into_inner()) = Some((k.clone(), v.clone()));
        Ok(out)
    }
}

/// What a rank says about a step before it runs: `[kind, layer, batch_offset, b, s, whole
/// length of each slot...]`.
pub(crate) fn step_meta(
    decode: bool,
    layer: usize,
    batch_offset: usize,
    b: usize,
    s: usize,
    lens: &[usize],
) -> Vec<u64> {
    let mut m = vec![
        decode as u64,
        layer as u64,
        batch_offset as u64,
        b as u64,
        s as u64,
    ];
    m.extend(lens.iter().map(|&l| l as u64));
    m
}

/// Exchange every rank's `meta` and whether it accepts the step (`local`); every rank then
/// returns the same verdict (see the module docs): its own error, another rank's refusal, or
/// a disagreement.
pub(crate) fn agree<C: Communicator, T>(comm: &C, meta: &[u64], local: Result<T>) -> Result<T> {
    let mut bytes = vec![local.is_ok() as u8];
    meta.iter().for_each(|m| bytes.extend(m.to_le_bytes()));
    let all = comm.all_gather_bytes(&bytes)?;
    let plan = local?;
    if let Some((r, _)) = all.iter().enumerate().find(|(_, b)| b.first() != Some(&1)) {
        return Err(bad(
            "context parallel step",
            "every rank of the context-parallel group to accept the step",
            format!("rank {r} refused it (see that rank's error)"),
        ));
    }
    let decode = |b: &[u8]| -> Vec<u64> {
        b[1..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect()
    };
    let me = comm.rank();
    if let Some((r, other)) = all.iter().enumerate().find(|(_, b)| b[1..] != bytes[1..]) {
        return Err(bad(
            "cache",
            "the same step on every rank of the context-parallel group ([decode, layer, \
             batch_offset, b, s, whole length of each slot])",
            format!("rank {me}: {meta:?}, rank {r}: {:?}", decode(other)),
        ));
    }
    Ok(plan)
}

/// The decode step's core attention on one rank (see the module docs): q `[b, np, hn]`, k/v
/// `[b, ng, hn]` (the new token of each slot, packed one per slot).
struct DecodeCore<'a, C> {
    comm: &'a C,
    cache: &'a CpStaticKvCache<StaticKvCache>,
    layer: usize,
    batch_offset: usize,
    /// Whole length of each slot before the step (the new token's position).
    lens: &'a [usize],
    /// The rank that stores each slot's new token.
    owners: &'a [usize],
    dims: (usize, usize, usize),
    scale: f32,
    window: Option<attention_codegen::Window>,
    sinks: Option<CpSinks>,
    captured: KvCapture,
}

impl<C: Communicator<Tensor = Tensor> + Sync> CoreAttentionModule for DecodeCore<'_, C> {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, _: &CoreArgs<'_>) -> Result<Tensor> {
        let (np, ng, hn) = self.dims;
        let b = self.lens.len();
        q.expect_shape("q", &[Some(b), Some(np), Some(hn)])?;
        k.expect_shape("k", &[Some(b), Some(ng), Some(hn)])?;
        v.expect_shape("v", &[Some(b), Some(ng), Some(hn)])?;
        let me = self.cache.layout().cp_rank;
        let (on, kw) = (b * np * hn, ng * hn);
        // This rank's partials: output [b, np, hn], then LSE [np, b].
        let mut part = vec![0f32; on + b * np];
        part[on..].fill(f32::NEG_INFINITY);
        for bi in 0..b {
            let slot = self.batch_offset + bi;
            let mut pos = self.cache.book().positions_of(self.layer, slot, me);
            let (mut kk, mut vv) = self.cache.inner().gather_kv(self.layer, slot, pos.len())?;
            if self.owners[bi] == me {
                pos.push(self.lens[bi]);
                kk.extend_from_slice(&k.data()[bi * kw..(bi + 1) * kw]);
                vv.extend_from_slice(&v.data()[bi * kw..(bi + 1) * kw]);
            }
            if pos.is_empty() {
                continue;
            }
            let (g, window) = (self.lens[bi], self.window);
            let f = |_h: usize, _i: usize, j: usize| {
                !visible(MaskType::CausalBottomRight, window, 1, g + 1, 0, pos[j])
            };
            let mut p = AttendParams::new(self.scale, MaskType::NoMask);
            p.mask_fn = Some(&f);
            let dims = SeqDims {
                sq: 1,
                sk: pos.len(),
                heads: np,
                groups: ng,
                head_dim: hn,
            };
            let r = attend_sequence(&q.data()[bi * np * hn..][..np * hn], &kk, &vv, dims, &p)?;
            part[bi * np * hn..][..np * hn].copy_from_slice(&r.out);
            for h in 0..np {
                part[on + h * b + bi] = r.lse[h];
            }
        }
        let n = part.len();
        let cp = self.cache.layout().cp_size;
        let mut all = Tensor::zeros(&[cp * n]);
        self.comm.all_gather(&Tensor::new(&[n], part)?, &mut all)?;
        let mut acc = Acc::new(b, np, hn);
        for blk in all.data().chunks_exact(n) {
            acc.merge(0, b, &blk[..on], &blk[on..]);
        }
        *self.captured.lock().unwrap_or_else(|p| p.into_inner()) = Some((k.clone(), v.clone()));
        Tensor::new(&[b, np, hn], acc.finish(self.sinks.as_ref()))
    }
}

impl<L: AttentionLayer, C: Communicator<Tensor = Tensor> + Sync> CpLayer<L, C> {
    fn check_default_core(&self) -> Result<crate::layer::SelfAttentionParts<'_>> {
        let LayerParts::SelfAttention(parts) = self.layer.parts() else {
            return Err(bad("config.kind", "self-attention", "cross-attention"));
        };
        if parts.core_attention.train().is_none() {
            return Err(AttnError::NoBackendImpl {
                role: "core_attention".into(),
                backend: "context parallel".into(),
                hint: "the default core attention's math (TrainSubmodule)".into(),
            });
        }
        Ok(parts)
    }

    /// Local checks of a step of `s` tokens per slot (`hidden_shape` the whole step's
    /// `[s, b, h]`), its starts; then the agreement of every rank.
    fn plan_step(
        &self,
        decode: bool,
        hidden_shape: &[usize],
        cache: &CpStaticKvCache<StaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<crate::plan::StaticStep> {
        let (s, b) = (
            hidden_shape.first().copied().unwrap_or(0),
            hidden_shape.get(1).copied().unwrap_or(0),
        );
        let local = (|| {
            if cache.layout() != self.layout {
                return Err(bad(
                    "cache",
                    format!("a cache of context-parallel rank {}", self.layout.cp_rank),
                    format!("rank {}'s", cache.layout().cp_rank),
                ));
            }
            self.check_default_core()?;
            crate::plan::static_step(
                self.layer.config(),
                hidden_shape,
                cache,
                layer,
                batch_offset,
                args,
            )
        })();
        let in_range = layer < cache.num_layers() && batch_offset + b <= cache.max_batch();
        let lens: Vec<usize> = match in_range {
            true => (batch_offset..batch_offset + b)
                .map(|slot| cache.book().visible_len(layer, slot))
                .collect(),
            false => Vec::new(),
        };
        let meta = step_meta(decode, layer, batch_offset, b, s, &lens);
        agree(&self.comm, &meta, local)
    }

    /// Prefill of this rank's rows `[s / cp, b, h]` of a prompt into empty slots
    /// `batch_offset .. + b` of `layer` (see the module docs). `args`: `positions` (the whole
    /// prompt's, `[s]`) and `rope_mscale` only.
    ///
    /// Errors (every rank returns one, nothing is stored): those of [`crate::plan::static_step`]
    /// for the whole step `[s, b, h]` and of [`CpStaticKvCache::check_step`] (a slot that
    /// holds tokens, a length that is not a multiple of `2 cp`, a full cache on any rank);
    /// [`AttnError::NoBackendImpl`] for a core attention other than the default; a cache of
    /// another rank (`cache`); disagreement between ranks (see the module docs);
    /// [`AttnError::Collective`].
    pub fn prefill_cp(
        &self,
        hidden: &Tensor,
        cache: &mut CpStaticKvCache<StaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        let cp = self.layout.cp_size;
        let mut whole = hidden.shape().to_vec();
        if let Some(s) = whole.first_mut() {
            *s *= cp;
        }
        let plan = self.plan_step(false, &whole, cache, layer, batch_offset, args)?;
        let capture = KvCapture::default();
        // The plan's positions are `[s * b]` (token-major); the forward takes the prompt's `[s]`.
        let positions: Vec<i64> = plan
            .positions
            .iter()
            .step_by(plan.b.max(1))
            .copied()
            .collect();
        let fwd = ForwardArgs {
            positions: Some(&positions),
            mask_type: Some(MaskType::Causal),
            rope_mscale: args.rope_mscale,
            ..ForwardArgs::default()
        };
        let y = self.forward_capture(hidden, &fwd, Some(&capture))?;
        let (k, v) = capture
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| bad("core_attention", "a call with keys and values", "none"))?;
        cache.inner_mut().append(layer, batch_offset, &k, &v)?;
        let owners = cache.book().prefill_owners(plan.s);
        for slot in batch_offset..batch_offset + plan.b {
            cache.add_pending(layer, slot, &owners);
        }
        Ok(y)
    }

    /// One decode step: `hidden` `[1, b, h]` (the same on every rank) for slots
    /// `batch_offset .. + b` of `layer` (see the module docs). `args`: `positions` (`[1]`)
    /// and `rope_mscale` only. Returns `[1, b, h]`, the same on every rank.
    ///
    /// Errors (every rank returns one, nothing is stored): those of [`crate::plan::static_step`]
    /// and of [`CpStaticKvCache::check_step`] (a full cache on the rank that would store the
    /// token); [`AttnError::NoBackendImpl`] for a core attention other than the default; a
    /// cache of another rank (`cache`); disagreement between ranks (see the module docs);
    /// [`AttnError::Collective`].
    pub fn decode_cp(
        &self,
        hidden: &Tensor,
        cache: &mut CpStaticKvCache<StaticKvCache>,
        layer: usize,
        batch_offset: usize,
        args: &ForwardArgs<'_>,
    ) -> Result<LayerOutput> {
        let cfg = self.layer.config();
        hidden.expect_shape("hidden", &[Some(1), None, Some(cfg.hidden)])?;
        let plan = self.plan_step(true, hidden.shape(), cache, layer, batch_offset, args)?;
        let b = plan.b;
        let parts = self.check_default_core()?;
        let owners: Vec<usize> = (batch_offset..batch_offset + b)
            .map(|slot| cache.book().decode_owner(layer, slot))
            .collect();
        let core = DecodeCore {
            comm: &self.comm,
            cache: &*cache,
            layer,
            batch_offset,
            lens: &plan.starts,
            owners: &owners,
            dims: (cfg.heads, cfg.groups, cfg.head_dim),
            scale: cfg.softmax_scale,
            window: cfg.window,
            sinks: self.sinks(&parts)?,
            captured: KvCapture::default(),
        };
        let cu: Vec<i32> = (0..=b as i32).collect();
        let local_parts = crate::layer::SelfAttentionParts {
            core_attention: &core,
            ..parts
        };
        let fwd = ForwardArgs {
            positions: Some(&plan.positions),
            packed: Some(PackedSeqParams {
                cu_seqlens_q: &cu,
                cu_seqlens_kv: &[],
                max_seqlen_q: 1,
                max_seqlen_kv: 0,
            }),
            rope_mscale: args.rope_mscale,
            ..ForwardArgs::default()
        };
        let x = hidden.clone().reshape(&[b, cfg.hidden])?;
        let y = local_parts.forward(&x, &fwd)?;
        let (k, v) = core
            .captured
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| bad("core_attention", "a call with keys and values", "none"))?;
        let (ng, hn) = (cfg.groups, cfg.head_dim);
        let me = self.layout.cp_rank;
        for (bi, &o) in owners.iter().enumerate() {
            if o == me {
                let kw = ng * hn;
                let row =
                    |t: &Tensor| Tensor::new(&[1, 1, ng, hn], t.data()[bi * kw..][..kw].to_vec());
                cache
                    .inner_mut()
                    .append(layer, batch_offset + bi, &row(&k)?, &row(&v)?)?;
            }
            cache.add_pending(layer, batch_offset + bi, &[o as u32]);
        }
        Ok(LayerOutput {
            output: y.output.reshape(hidden.shape())?,
            bias: y.bias,
        })
    }
}
