//! QK-Clip (semantics.md, "Training-side behaviour"; Megatron-Core's `Attention.clip_qk`):
//! every training forward records, per query head, the maximum pre-softmax logit
//! `q k^T * scale + bias` over visible positions, kept as a running maximum over
//! micro-batches; `clip_qk(threshold, alpha)` rescales the query and key rows of
//! `linear_qkv.weight` and resets the record.
//!
//! The clip, per key/value group `g` of a self-attention layer: `m_g` is the record's max over
//! the group's query heads; when `m_g > threshold`, `eta = threshold / m_g`, the group's query
//! rows are multiplied by `eta^alpha` and its key rows by `eta^(1 - alpha)`, so every logit of
//! the group (without q/k biases or norms) is multiplied by `eta` and the group's max becomes
//! the threshold. With `qk_layernorm` (q/k norms after `linear_qkv`) the norms undo a row
//! scale, so the clip changes the weights but not the logits (as in the reference system,
//! which scales the same rows); a NaN in the record (a diverged forward) is refused.
//!
//! The weights a backward reads are the layer's current ones: clip between steps (after the
//! backwards of the forwards it covers), never between a `forward_train` and its `backward`
//! (that is not detected, and the backward would use the rescaled weights). Value rows, gate rows (`output_gate`) and every bias are untouched; the
//! record is reset afterwards, also when nothing was clipped. Megatron's defaults are
//! `threshold` 100 (`qk_clip_threshold`) and `alpha` 0.5 (`qk_clip_alpha`).
//!
//! Where the record lives: as in the reference system, **on the layer**. A
//! [`TrainLayer`](crate::backend::TrainLayer) folds each
//! [`forward_train`](crate::backend::TrainLayer::forward_train)'s per-head max into its own
//! record ([`max_logit_record`](crate::backend::TrainLayer::max_logit_record)) and
//! [`clip_qk`](crate::backend::TrainLayer::clip_qk) rescales its own weight (the CPU layer
//! keeps a [`QkClip`]; the CUDA layer keeps an f32 `[np]` device buffer, raised on the
//! device, see [`CudaLayer::clip_qk_device`](crate::cuda::CudaLayer::clip_qk_device)).
//! [`QkClip`] remains usable on its own for a record the caller keeps (fed with
//! [`CpuSaved::max_logit`](crate::train::CpuSaved::max_logit) through
//! [`QkClip::observe`]) and applied to any layer with [`QkClip::clip_layer`] or to a bare
//! weight with [`QkClip::clip`].
//!
//! Only the training forward records: the inference forward, the cache steps and the
//! backward's recompute of core attention ([`Recompute::CoreAttention`](crate::train::Recompute))
//! do not.

use attention_codegen::AttentionKind;

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::layer::AttentionLayer;
use crate::tensor::Tensor;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// A running max, per query head, of the pre-softmax logits over micro-batches
/// ([`observe`](Self::observe)), and the clip that consumes it ([`clip`](Self::clip),
/// [`clip_layer`](Self::clip_layer)). The CPU [`TrainLayer`](crate::backend::TrainLayer)
/// keeps one of these per layer and feeds it itself; use one directly only for a record the
/// caller manages (see the module docs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QkClip {
    record: Option<Vec<f32>>,
}

/// What a clip did, per key/value group.
#[derive(Debug, Clone, PartialEq)]
pub struct QkClipReport {
    /// `m_g`: the max recorded logit over the group's query heads (`-inf`: none seen).
    pub group_max: Vec<f32>,
    /// `eta_g = threshold / m_g` for a clipped group, 1 otherwise.
    pub eta: Vec<f32>,
    /// The groups whose rows were rescaled.
    pub clipped: Vec<usize>,
}

/// The rows of `linear_qkv.weight` `[W, h]` a clip rescales: `(first row, rows, factor)`
/// per block (a clipped group's query rows, then its key rows).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClipPlan {
    pub report: QkClipReport,
    pub blocks: Vec<(usize, usize, f64)>,
}

impl ClipPlan {
    /// The factor of every row of `linear_qkv.weight` (`rows` of them), 1 where untouched.
    pub fn row_factors(&self, rows: usize) -> Vec<f32> {
        let mut f = vec![1.0f32; rows];
        for &(r0, n, s) in &self.blocks {
            f[r0..r0 + n].fill(s as f32);
        }
        f
    }

    /// Rescale a row-major f32 weight of row length `h` (f64 products, rounded once).
    pub fn apply_host(&self, w: &mut [f32], h: usize) {
        for &(r0, n, s) in &self.blocks {
            for x in &mut w[r0 * h..(r0 + n) * h] {
                *x = (*x as f64 * s) as f32;
            }
        }
    }
}

/// The argument checks of every clip (nothing is read or changed): a self-attention config,
/// `threshold` finite and > 0, `alpha` in `[0, 1]`.
pub(crate) fn check_args(c: &LayerConfig, threshold: f32, alpha: f32) -> Result<()> {
    if c.kind != AttentionKind::SelfAttention {
        return Err(bad(
            "config.kind",
            "self-attention (QK-Clip rescales linear_qkv)",
            "cross-attention",
        ));
    }
    if !(threshold.is_finite() && threshold > 0.0) {
        return Err(bad(
            "threshold",
            "a finite value > 0",
            threshold.to_string(),
        ));
    }
    if !(0.0..=1.0).contains(&alpha) {
        return Err(bad("alpha", "a value in [0, 1]", alpha.to_string()));
    }
    Ok(())
}

/// The clip of config `c` for `record` (`[np]`, `None`: nothing observed): the report and
/// the row blocks to rescale. Errors: those of [`check_args`]; `InvalidArgument` (`record`)
/// for a record of another head count or one holding a NaN or +inf (a forward that
/// diverged: no useful `eta` can be computed from it (+inf would zero the rows), so nothing
/// is clipped and the caller keeps the record).
pub(crate) fn plan(
    c: &LayerConfig,
    record: Option<&[f32]>,
    threshold: f32,
    alpha: f32,
) -> Result<ClipPlan> {
    check_args(c, threshold, alpha)?;
    let (np, ng, hn) = (c.heads, c.groups, c.head_dim);
    if let Some(r) = record {
        if r.len() != np {
            return Err(bad(
                "record",
                format!("[{np}] per-head max logits"),
                format!("[{}]", r.len()),
            ));
        }
        if let Some(h) = r.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(bad(
                "record",
                "per-head max logits that are numbers below +inf (a NaN or +inf means a \
                 forward diverged; -inf is a head that saw no key)",
                format!("{} at query head {h}", r[h]),
            ));
        }
    }
    let per = np / ng;
    let gw = if c.output_gate { per * hn } else { 0 };
    let gcols = per * hn + gw + 2 * hn;
    let mut report = QkClipReport {
        group_max: vec![f32::NEG_INFINITY; ng],
        eta: vec![1.0; ng],
        clipped: Vec::new(),
    };
    let mut blocks = Vec::new();
    if let Some(r) = record {
        for g in 0..ng {
            let m = r[g * per..(g + 1) * per]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            report.group_max[g] = m;
            if m > threshold {
                let eta = (threshold as f64) / (m as f64);
                report.eta[g] = eta as f32;
                report.clipped.push(g);
                // Per group [q (per hn) | gate (gw) | k (hn) | v (hn)] rows.
                blocks.push((g * gcols, per * hn, eta.powf(alpha as f64)));
                blocks.push((g * gcols + per * hn + gw, hn, eta.powf(1.0 - alpha as f64)));
            }
        }
    }
    Ok(ClipPlan { report, blocks })
}

fn check_weight(c: &LayerConfig, shape: &[usize]) -> Result<()> {
    let want = [c.qkv_out_features(), c.hidden];
    if shape != want {
        return Err(AttnError::WeightShape {
            key: "linear_qkv.weight".into(),
            expected: want.to_vec(),
            got: shape.to_vec(),
        });
    }
    Ok(())
}

impl QkClip {
    /// An empty record.
    pub fn new() -> Self {
        QkClip::default()
    }

    /// The running max per query head `[np]`, if any forward was observed since the last
    /// reset.
    pub fn record(&self) -> Option<&[f32]> {
        self.record.as_deref()
    }

    /// Fold one forward's per-head max logits `[np]` into the running max. A NaN sticks (the
    /// head's record stays NaN until a reset, and [`clip`](Self::clip) then refuses). Errors
    /// ([`AttnError::Shape`], `max_logit`; nothing changes) for an empty slice or a head
    /// count other than the record's.
    pub fn observe(&mut self, max_logit: &[f32]) -> Result<()> {
        if max_logit.is_empty() {
            return Err(AttnError::Shape {
                arg: "max_logit".into(),
                expected: "[np] per-head max logits, np >= 1".into(),
                got: vec![0],
            });
        }
        match &mut self.record {
            None => self.record = Some(max_logit.to_vec()),
            Some(r) => {
                if r.len() != max_logit.len() {
                    return Err(AttnError::Shape {
                        arg: "max_logit".into(),
                        expected: format!("[{}] (the recorded heads)", r.len()),
                        got: vec![max_logit.len()],
                    });
                }
                for (a, &b) in r.iter_mut().zip(max_logit) {
                    if b > *a || b.is_nan() {
                        *a = b;
                    }
                }
            }
        }
        Ok(())
    }

    /// Forget the record.
    pub fn reset(&mut self) {
        self.record = None;
    }

    /// Clip `weight` (`linear_qkv.weight` `[(np + 2 ng) hn (+ np hn gate), h]` of a
    /// self-attention layer of config `c`) with this record, per the module docs: per group
    /// `m_g = max` of the record over the group's heads; when `m_g > threshold`,
    /// `eta = threshold / m_g`, the group's query rows are scaled by `eta^alpha` and its key
    /// rows by `eta^(1 - alpha)` (f64 products rounded once to f32; value and gate rows
    /// untouched). The record is reset afterwards (also when nothing was clipped; with no
    /// record nothing is clipped and `group_max` is `-inf`).
    ///
    /// Errors (nothing changed): [`AttnError::InvalidArgument`] for a cross-attention config,
    /// a `threshold` not finite and positive, an `alpha` outside `[0, 1]` (NaN included), a
    /// record of another head count; [`AttnError::WeightShape`] for a weight of another
    /// shape.
    pub fn clip(
        &mut self,
        c: &LayerConfig,
        weight: &mut Tensor,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport> {
        check_args(c, threshold, alpha)?;
        check_weight(c, weight.shape())?;
        let p = plan(c, self.record.as_deref(), threshold, alpha)?;
        p.apply_host(weight.data_mut(), c.hidden);
        self.record = None;
        Ok(p.report)
    }

    /// [`clip`](Self::clip) on `layer`'s own `linear_qkv.weight`, reached through
    /// [`AttentionLayer::linear_qkv_mut`] and
    /// [`LinearModule::weight_mut`](crate::modules::LinearModule::weight_mut) (a
    /// [`SpecLayer`](crate::spec_layer::SpecLayer), a struct generated by `#[attention]`).
    ///
    /// Errors (nothing changed): those of [`clip`](Self::clip);
    /// [`AttnError::NoBackendImpl`] (role `linear_qkv`) for a layer or `linear_qkv` module
    /// that does not hand out its weight.
    pub fn clip_layer<L: AttentionLayer + ?Sized>(
        &mut self,
        layer: &mut L,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport> {
        let c = layer.config().clone();
        check_args(&c, threshold, alpha)?;
        let no_weight = |what: &str| AttnError::NoBackendImpl {
            role: "linear_qkv".into(),
            backend: "qk_clip".into(),
            hint: format!(
                "{what} (the weight `[out, in]` its forward reads, in the default layout)"
            ),
        };
        let w = layer
            .linear_qkv_mut()
            .ok_or_else(|| no_weight("implement AttentionLayer::linear_qkv_mut for the layer"))?
            .weight_mut()
            .ok_or_else(|| {
                no_weight("implement LinearModule::weight_mut for the linear_qkv module's type")
            })?;
        self.clip(&c, w, threshold, alpha)
    }
}
