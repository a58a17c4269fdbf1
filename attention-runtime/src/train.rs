//! Training on the CPU reference backend: a forward that saves what the backward needs
//! ([`forward_train`]), the backward of the whole layer ([`backward`]), delayed weight
//! gradients ([`backward_dw`]), selective recompute of core attention ([`Recompute`]) and
//! QK-Clip ([`QkClip`], module [`qk_clip`]: the layer keeps the running max-logit record and
//! clips its own `linear_qkv`). The backend-neutral entry points are
//! [`TrainLayer`](crate::backend::TrainLayer) (implemented for
//! [`CpuLayer`](crate::backend::CpuLayer)); these functions are the CPU implementation.
//!
//! Semantics are those of Megatron-Core's `Attention` in training (semantics.md, "Training-side
//! behaviour"): gradients of the input and of every parameter under its Megatron name
//! (`linear_qkv.weight`, `linear_qkv.bias`, `q_layernorm.weight` / `.bias`,
//! `k_layernorm.weight` / `.bias`, `linear_proj.weight`, `core_attention.softmax_offset`;
//! cross-attention `linear_q.*`, `linear_kv.*` and the gradient of `key_value_states`).
//! `linear_proj.bias` gets no gradient from the output: the layer returns it unadded (as the
//! reference system does), so its gradient is the caller's.
//!
//! The backward chains, in reverse: `linear_proj` (`dX = dY W`, `dW = dY^T X`), the sigmoid
//! output gate, core attention (FlashAttention-2 backward,
//! [`attend_sequence_backward`](crate::reference::attend_sequence_backward)), rope (the
//! inverse rotation), q/k norms, the GQA split (scattered back into `linear_qkv`'s columns) and
//! `linear_qkv`. f32 storage, f64 accumulation.
//!
//! Dropout is not modelled (attention dropout 0, as in the golden fixtures). Out of scope:
//! `set_for_recompute_input_layernorm` (the input layernorm belongs to the transformer layer,
//! not to this module) and every fp8 part of the reference API (fp8 recipes, `fp8_context`,
//! delayed scaling): the CPU reference trains in f32.

use std::collections::BTreeMap;

use attention_codegen::{AttentionKind, MaskType, Role, Sinks, Window};

use crate::config::LayerConfig;
use crate::error::{AttnError, Result};
use crate::layer::{ForwardArgs, LayerParts};
use crate::modules::{check_cu_seqlens, TrainSubmodule};
use crate::reference::{self, grad, AttendParams, RopeTable, SeqDims, SinkLogits};
use crate::tensor::{broadcast_strides, Tensor};

pub mod qk_clip;
pub use qk_clip::{QkClip, QkClipReport};

/// What the forward keeps for the backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recompute {
    /// Keep every activation the backward reads, core attention's output and softmax
    /// statistics (LSE) included.
    #[default]
    None,
    /// Selective recompute (Megatron's `_checkpointed_attention_forward`, recompute granularity
    /// `selective` over `core_attn`): keep only core attention's inputs (q, k, v after rope);
    /// the backward runs core attention's forward again to get its output and LSE (and the
    /// gated output that `linear_proj` consumed). Gradients are bitwise the same as with
    /// [`Recompute::None`]; see [`CpuSaved::saved_bytes`] for the memory.
    CoreAttention,
}

/// Options of a training forward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainOptions {
    /// What to keep for the backward.
    pub recompute: Recompute,
}

/// Options of a backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackwardOptions {
    /// Delay the weight (and bias) gradients of the linears (`linear_qkv` and `linear_proj`;
    /// cross-attention `linear_q`, `linear_kv`, `linear_proj`) to a later
    /// [`backward_dw`] call, as Megatron's `backward_dw` does for pipeline schedules. The
    /// backward then returns the input, norm and sink gradients only.
    pub delay_wgrad: bool,
    /// Also return the gradient of `attention_bias` (in its own, broadcastable shape).
    pub want_bias_grad: bool,
    /// Bitwise-reproducible gradients (Megatron's `deterministic_mode`). The CPU backend is
    /// always deterministic. On CUDA `false` (the default) runs the fused attention backward,
    /// whose dQ is summed with f32 atomics (so dQ, and the input and `linear_qkv` gradients
    /// that follow from it, vary in the last bits from run to run); `true` runs the
    /// deterministic kernel pair (1.7-2.5x the fast attention backward's time on an H200,
    /// where the fast mode runs the Hopper kernel; see BENCHMARKS.md).
    pub deterministic: bool,
}

/// The gradients of a backward, generic over the backend's tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerGrads<T> {
    /// Gradient of the hidden states, in their shape (`[s, b, h]` or packed `[t, h]`).
    pub grad_input: T,
    /// Cross-attention: gradient of `key_value_states` (`[sk, b, h]` or packed `[tk, h]`).
    pub grad_key_value_states: Option<T>,
    /// Gradient of `attention_bias` in the bias tensor's own shape (the broadcast summed
    /// back), when asked for ([`BackwardOptions::want_bias_grad`]) and a bias was given.
    pub grad_attention_bias: Option<T>,
    /// Parameter gradients under their Megatron names without the layer prefix
    /// (`linear_qkv.weight`, `q_layernorm.bias`, `core_attention.softmax_offset`, ...), each in
    /// its parameter's shape. `linear_proj.bias` never appears (see the module docs); with
    /// [`BackwardOptions::delay_wgrad`] the linears' weights and biases come from
    /// [`backward_dw`] instead.
    pub params: BTreeMap<String, T>,
}

/// Core attention computed outside this module, in place of the layer's own (context
/// parallelism: [`crate::parallel::CpLayer`] exchanges keys and values with the other ranks).
/// Rows are the call's (`[n, np hn]` for q, out and dout, `[n, ng hn]` for k and v, padded row
/// `i * b + bi` or packed); the LSE is the hook's own, handed back to its backward.
pub(crate) trait CoreHook {
    /// Returns `(out [n, np hn], lse, max_logit [np])`.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)>;
    /// Returns `(dq, dk, dv, dsinks [np] for learnable sinks)`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>)>;
}

/// Core attention's forward, by the layer's spec or by `hook`.
fn core_forward(
    spec: &CoreSpec,
    hook: Option<&dyn CoreHook>,
    c: &LayerConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sinks: Option<&[f32]>,
) -> Result<CoreOut> {
    match hook {
        None => spec.forward(c, q, k, v, sinks),
        Some(h) => {
            let (out, lse, max_logit) = h.forward(q, k, v)?;
            Ok(CoreOut {
                out,
                lse: vec![lse],
                max_logit,
            })
        }
    }
}

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

// ---------------------------------------------------------------------------------------
// Parameters

#[derive(Debug, Clone)]
struct Lin {
    name: &'static str,
    w: Vec<f32>,
    b: Option<Vec<f32>>,
    outf: usize,
    inf: usize,
}

impl Lin {
    /// `x W^T + b`, the bias added in f32 after the product (as the layer's forward does).
    fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut y = reference::linear(x, &self.w, None, n, self.inf, self.outf)?;
        if let Some(b) = &self.b {
            for row in y.chunks_exact_mut(self.outf) {
                for (v, bb) in row.iter_mut().zip(b) {
                    *v += bb;
                }
            }
        }
        Ok(y)
    }
}

#[derive(Debug, Clone, Default)]
struct NormP {
    w: Option<Vec<f32>>,
    b: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
struct Params {
    /// `linear_qkv` (self) or `linear_q` (cross).
    inp: Lin,
    /// `linear_kv` (cross).
    kv: Option<Lin>,
    qn: Option<NormP>,
    kn: Option<NormP>,
    sinks: Option<Vec<f32>>,
    proj: Lin,
}

fn no_train(role: Role) -> AttnError {
    AttnError::NoBackendImpl {
        role: role.name().into(),
        backend: "cpu backward".into(),
        hint: "implement attention::runtime::modules::TrainSubmodule for the submodule's \
               type (its math must be the role's default math over its own parameters) and \
               return it from its role trait's `train()`"
            .into(),
    }
}

fn sd(role: Role, m: Option<&dyn TrainSubmodule>) -> Result<BTreeMap<String, Tensor>> {
    Ok(m.ok_or_else(|| no_train(role))?
        .train_state_dict()?
        .into_iter()
        .collect())
}

fn take(
    role: Role,
    d: &mut BTreeMap<String, Tensor>,
    p: &str,
    shape: &[usize],
) -> Result<Option<Vec<f32>>> {
    match d.remove(p) {
        None => Ok(None),
        Some(t) if t.shape() == shape => Ok(Some(t.into_data())),
        Some(t) => Err(AttnError::WeightShape {
            key: format!("{}.{p}", role.name()),
            expected: shape.to_vec(),
            got: t.shape().to_vec(),
        }),
    }
}

fn lin(role: Role, m: Option<&dyn TrainSubmodule>, outf: usize, inf: usize) -> Result<Lin> {
    let mut d = sd(role, m)?;
    let w =
        take(role, &mut d, "weight", &[outf, inf])?.ok_or_else(|| AttnError::MissingWeight {
            key: format!("{}.weight", role.name()),
            source_name: "the submodule's train_state_dict".into(),
        })?;
    let b = take(role, &mut d, "bias", &[outf])?;
    Ok(Lin {
        name: role.name(),
        w,
        b,
        outf,
        inf,
    })
}

fn norm(role: Role, m: Option<&dyn TrainSubmodule>, hn: usize) -> Result<NormP> {
    let mut d = sd(role, m)?;
    Ok(NormP {
        w: take(role, &mut d, "weight", &[hn])?,
        b: take(role, &mut d, "bias", &[hn])?,
    })
}

fn params(parts: &LayerParts<'_>) -> Result<Params> {
    let c = parts.config();
    let (np, hn, h) = (c.heads, c.head_dim, c.hidden);
    let (inp, kv, qn, kn, core, proj) = match parts {
        LayerParts::SelfAttention(p) => {
            if c.kind != AttentionKind::SelfAttention {
                return Err(bad("config.kind", "self-attention", "cross-attention"));
            }
            let inp = lin(
                Role::LinearQkv,
                p.linear_qkv.train(),
                c.qkv_out_features(),
                h,
            )?;
            let (qn, kn) = match (c.qk_norm, p.q_layernorm, p.k_layernorm) {
                (None, None, None) => (None, None),
                (Some(_), Some(q), Some(k)) => (
                    Some(norm(Role::QLayernorm, q.train(), hn)?),
                    Some(norm(Role::KLayernorm, k.train(), hn)?),
                ),
                (Some(_), _, _) => {
                    return Err(bad(
                        "q_layernorm/k_layernorm",
                        "a norm module (the config has qk_layernorm)",
                        "none",
                    ))
                }
                (None, _, _) => {
                    return Err(bad(
                        "q_layernorm/k_layernorm",
                        "none (the config has no qk_layernorm)",
                        "a norm module",
                    ))
                }
            };
            (inp, None, qn, kn, p.core_attention, p.linear_proj)
        }
        LayerParts::CrossAttention(p) => {
            if c.kind != AttentionKind::CrossAttention {
                return Err(bad("config.kind", "cross-attention", "self-attention"));
            }
            c.check_cross_extras()?;
            let inp = lin(Role::LinearQ, p.linear_q.train(), np * hn, h)?;
            let kv = lin(Role::LinearKv, p.linear_kv.train(), 2 * np * hn, h)?;
            (inp, Some(kv), None, None, p.core_attention, p.linear_proj)
        }
    };
    let mut cd = sd(Role::CoreAttention, core.train())?;
    let sinks = take(Role::CoreAttention, &mut cd, "softmax_offset", &[np])?;
    if c.sinks == Some(Sinks::Learnable) && sinks.is_none() {
        return Err(bad(
            "core_attention.softmax_offset",
            format!("[{np}] learnable sink logits"),
            "none",
        ));
    }
    let proj = lin(Role::LinearProj, proj.train(), h, np * hn)?;
    Ok(Params {
        inp,
        kv,
        qn,
        kn,
        sinks: if c.sinks == Some(Sinks::Learnable) {
            sinks
        } else {
            None
        },
        proj,
    })
}

// ---------------------------------------------------------------------------------------
// Core attention over every batch entry / packed sequence

/// One batch entry or packed sequence: its rows in q's and k's row space.
#[derive(Debug, Clone)]
struct Entry {
    q_rows: Vec<usize>,
    k_rows: Vec<usize>,
}

/// Core attention's arguments, owned (the saved context outlives the call's borrows).
#[derive(Debug, Clone)]
struct CoreSpec {
    entries: Vec<Entry>,
    mask_type: MaskType,
    window: Option<Window>,
    scale: f32,
    sinks: Option<Sinks>,
    mask: Option<(Tensor, [usize; 4])>,
    bias: Option<(Tensor, [usize; 4])>,
}

/// Core attention's forward result: `out` `[n, np hn]` (q's rows), LSE per entry, max logit.
struct CoreOut {
    out: Vec<f32>,
    lse: Vec<Vec<f32>>,
    max_logit: Vec<f32>,
}

fn gather(data: &[f32], rows: &[usize], w: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows.len() * w);
    for &r in rows {
        v.extend_from_slice(&data[r * w..][..w]);
    }
    v
}

fn at(s: &[usize; 4], e: usize, h: usize, i: usize, j: usize) -> usize {
    e * s[0] + h * s[1] + i * s[2] + j * s[3]
}

impl CoreSpec {
    fn dims(&self, c: &LayerConfig, e: &Entry) -> SeqDims {
        SeqDims {
            sq: e.q_rows.len(),
            sk: e.k_rows.len(),
            heads: c.heads,
            groups: c.kv_groups(),
            head_dim: c.head_dim,
        }
    }

    /// Runs `f` with entry `e`'s attention params.
    fn with_params<R>(
        &self,
        e: usize,
        sinks: Option<&[f32]>,
        f: impl FnOnce(&AttendParams<'_>) -> R,
    ) -> R {
        let mf = self
            .mask
            .as_ref()
            .map(|(t, s)| move |h: usize, i: usize, j: usize| t.data()[at(s, e, h, i, j)] != 0.0);
        let bf = self
            .bias
            .as_ref()
            .map(|(t, s)| move |h: usize, i: usize, j: usize| t.data()[at(s, e, h, i, j)]);
        let mut p = AttendParams::new(self.scale, self.mask_type);
        p.window = self.window;
        p.mask_fn = mf.as_ref().map(|f| f as reference::MaskFn<'_>);
        p.bias_fn = bf.as_ref().map(|f| f as reference::BiasFn<'_>);
        p.sinks = match (self.sinks, sinks) {
            (None, _) => None,
            (Some(Sinks::OffByOne), _) => Some(SinkLogits::OffByOne),
            (Some(Sinks::Learnable), Some(s)) => Some(SinkLogits::PerHead(s)),
            (Some(Sinks::Learnable), None) => None,
        };
        f(&p)
    }

    fn forward(
        &self,
        c: &LayerConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sinks: Option<&[f32]>,
    ) -> Result<CoreOut> {
        let (qw, kw) = (c.heads * c.head_dim, c.kv_groups() * c.head_dim);
        let mut out = vec![0f32; q.len()];
        let mut lse = Vec::with_capacity(self.entries.len());
        let mut max_logit = vec![f32::NEG_INFINITY; c.heads];
        for (ei, e) in self.entries.iter().enumerate() {
            let dims = self.dims(c, e);
            let (qe, ke, ve) = (
                gather(q, &e.q_rows, qw),
                gather(k, &e.k_rows, kw),
                gather(v, &e.k_rows, kw),
            );
            let r = self.with_params(ei, sinks, |p| {
                reference::attend_sequence(&qe, &ke, &ve, dims, p)
            })?;
            for (i, &row) in e.q_rows.iter().enumerate() {
                out[row * qw..][..qw].copy_from_slice(&r.out[i * qw..][..qw]);
            }
            for (m, x) in max_logit.iter_mut().zip(&r.max_logit) {
                if *x > *m {
                    *m = *x;
                }
            }
            lse.push(r.lse);
        }
        Ok(CoreOut {
            out,
            lse,
            max_logit,
        })
    }

    /// Returns `(dq, dk, dv, dsinks, dbias)`; `dbias` in the bias tensor's shape.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn backward(
        &self,
        c: &LayerConfig,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        core: &CoreOut,
        dout: &[f32],
        sinks: Option<&[f32]>,
        want_dbias: bool,
    ) -> Result<(
        Vec<f32>,
        Vec<f32>,
        Vec<f32>,
        Option<Vec<f32>>,
        Option<Vec<f32>>,
    )> {
        let (qw, kw) = (c.heads * c.head_dim, c.kv_groups() * c.head_dim);
        let np = c.heads;
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f64; k.len()];
        let mut dv = vec![0f64; v.len()];
        let mut dsinks = sinks.map(|_| vec![0f64; np]);
        let want_dbias = want_dbias && self.bias.is_some();
        let mut dbias = self
            .bias
            .as_ref()
            .filter(|_| want_dbias)
            .map(|(t, _)| vec![0f64; t.numel()]);
        for (ei, e) in self.entries.iter().enumerate() {
            let dims = self.dims(c, e);
            let (qe, ke, ve, oe, de) = (
                gather(q, &e.q_rows, qw),
                gather(k, &e.k_rows, kw),
                gather(v, &e.k_rows, kw),
                gather(&core.out, &e.q_rows, qw),
                gather(dout, &e.q_rows, qw),
            );
            let g = self.with_params(ei, sinks, |p| {
                reference::attend_sequence_backward(
                    &qe,
                    &ke,
                    &ve,
                    &oe,
                    &core.lse[ei],
                    &de,
                    dims,
                    p,
                    want_dbias,
                )
            })?;
            for (i, &row) in e.q_rows.iter().enumerate() {
                dq[row * qw..][..qw].copy_from_slice(&g.dq[i * qw..][..qw]);
            }
            for (j, &row) in e.k_rows.iter().enumerate() {
                for c in 0..kw {
                    dk[row * kw + c] += g.dk[j * kw + c] as f64;
                    dv[row * kw + c] += g.dv[j * kw + c] as f64;
                }
            }
            if let (Some(acc), Some(ds)) = (dsinks.as_mut(), g.dsinks.as_ref()) {
                for (a, d) in acc.iter_mut().zip(ds) {
                    *a += *d as f64;
                }
            }
            if let (Some(acc), Some(db), Some(s)) = (
                dbias.as_mut(),
                g.dbias.as_ref(),
                self.bias.as_ref().map(|b| &b.1),
            ) {
                let (sq, sk) = (dims.sq, dims.sk);
                for h in 0..np {
                    for i in 0..sq {
                        for j in 0..sk {
                            acc[at(s, ei, h, i, j)] += db[(h * sq + i) * sk + j] as f64;
                        }
                    }
                }
            }
        }
        let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        Ok((dq, f(dk), f(dv), dsinks.map(f), dbias.map(f)))
    }
}

trait KvGroups {
    fn kv_groups(&self) -> usize;
}

impl KvGroups for LayerConfig {
    /// Cross-attention has no GQA (`ng = np`).
    fn kv_groups(&self) -> usize {
        match self.kind {
            AttentionKind::SelfAttention => self.groups,
            AttentionKind::CrossAttention => self.heads,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The saved context

/// Weight gradients computed later ([`backward_dw`]): `dW = dY^T X`, `db = colsum dY`.
#[derive(Debug, Clone)]
struct PendingDw {
    lin: &'static str,
    has_bias: bool,
    dy: Vec<f32>,
    x: Vec<f32>,
    n: usize,
    inf: usize,
    outf: usize,
}

impl PendingDw {
    fn run(&self, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let dw = grad::linear_weight_grad(&self.dy, &self.x, self.n, self.inf, self.outf)?;
        out.insert(
            format!("{}.weight", self.lin),
            Tensor::new(&[self.outf, self.inf], dw)?,
        );
        if self.has_bias {
            let db = grad::linear_bias_grad(&self.dy, self.n, self.outf)?;
            out.insert(format!("{}.bias", self.lin), Tensor::new(&[self.outf], db)?);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Stage {
    /// Activations saved, no backward yet.
    Forward,
    /// Backward ran with `delay_wgrad`; these weight gradients wait for `backward_dw`.
    PendingDw(Vec<PendingDw>),
    /// Backward (and `backward_dw`, if delayed) done.
    Done { delayed: bool },
}

/// The activations a backward reads.
#[derive(Debug, Clone)]
struct Acts {
    /// The layer input rows `[n, h]`.
    x: Vec<f32>,
    /// Cross-attention context rows `[nk, h]`.
    ctx: Option<Vec<f32>>,
    /// q and k before the q/k norms (with `qk_layernorm`).
    q_raw: Option<Vec<f32>>,
    k_raw: Option<Vec<f32>>,
    /// Core attention's inputs (after rope): q `[n, np hn]`, k/v `[nk, ng hn]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The output gate's logits `[n, np hn]`.
    gate: Option<Vec<f32>>,
    /// Core attention's output and LSE ([`Recompute::None`] only).
    core: Option<CoreOut>,
    /// The gated core output (`linear_proj`'s input) when there is a gate
    /// ([`Recompute::None`] only; without a gate it is `core.out`).
    gated: Option<Vec<f32>>,
    /// Rope positions per row.
    positions: Vec<i64>,
}

impl std::fmt::Debug for CoreOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreOut")
            .field("out", &self.out.len())
            .field("lse", &self.lse.len())
            .finish()
    }
}

impl Clone for CoreOut {
    fn clone(&self) -> Self {
        CoreOut {
            out: self.out.clone(),
            lse: self.lse.clone(),
            max_logit: self.max_logit.clone(),
        }
    }
}

impl Acts {
    fn bytes(&self) -> usize {
        let f = |v: &Vec<f32>| v.len() * 4;
        let o = |v: &Option<Vec<f32>>| v.as_ref().map_or(0, f);
        f(&self.x)
            + o(&self.ctx)
            + o(&self.q_raw)
            + o(&self.k_raw)
            + f(&self.q)
            + f(&self.k)
            + f(&self.v)
            + o(&self.gate)
            + self
                .core
                .as_ref()
                .map_or(0, |c| f(&c.out) + c.lse.iter().map(f).sum::<usize>())
            + o(&self.gated)
            + self.positions.len() * 8
    }
}

/// Saved-activation bytes of one layer's forward in each [`Recompute`] mode
/// ([`CpuSaved::activation_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationBytes {
    /// With [`Recompute::None`].
    pub full: usize,
    /// With [`Recompute::CoreAttention`].
    pub selective: usize,
}

/// What [`forward_train`] saves for [`backward`]: the activations, the call's arguments
/// (owned copies of mask, bias, packed metadata) and the state of the backward
/// (activations consumed, weight gradients pending for [`backward_dw`]).
#[derive(Debug, Clone)]
pub struct CpuSaved {
    config: LayerConfig,
    recompute: Recompute,
    out_shape: Vec<usize>,
    ctx_shape: Option<Vec<usize>>,
    n: usize,
    nk: usize,
    core: CoreSpec,
    rope_mscale: f32,
    max_logit: Vec<f32>,
    acts: Option<Acts>,
    stage: Stage,
}

impl CpuSaved {
    /// Per query head, the max pre-softmax logit `q k^T * scale + bias` over visible positions
    /// of this forward (every batch entry / sequence), `[np]`; `-inf` for a head that saw
    /// nothing. The [`TrainLayer`](crate::backend::TrainLayer) that ran the forward already
    /// folded it into its own record; feed it to [`QkClip::observe`] only for a record the
    /// caller keeps.
    pub fn max_logit(&self) -> &[f32] {
        &self.max_logit
    }

    /// Bytes of activations held for the backward (f32 tensors, i64 positions; the owned mask
    /// and bias tensors not counted, they are the caller's inputs). 0 once a backward consumed
    /// them. With [`Recompute::CoreAttention`] core attention's output and LSE (and the gated
    /// output) are not held: the difference to [`Recompute::None`] is
    /// `4 * (n np hn (1 + gate) + N np sq)` bytes (`N` entries).
    pub fn saved_bytes(&self) -> usize {
        self.acts.as_ref().map_or(0, Acts::bytes)
    }

    /// Bytes of activations a forward of this call's shape holds for the backward in each
    /// mode (computed from the shapes, so also after a backward consumed them): what
    /// selective recompute saves per layer is `full - selective` (core attention's output,
    /// its gated copy with an output gate, and the LSE).
    pub fn activation_bytes(&self) -> ActivationBytes {
        let c = &self.config;
        let (n, nk, h) = (self.n, self.nk, c.hidden);
        let (qw, kw) = (c.heads * c.head_dim, c.kv_groups() * c.head_dim);
        let is_self = c.kind == AttentionKind::SelfAttention;
        let norm = c.qk_norm.is_some() && is_self;
        let floats = n * h
            + if is_self { 0 } else { nk * h }
            + if norm { n * qw + nk * kw } else { 0 }
            + n * qw
            + 2 * nk * kw
            + if c.output_gate { n * qw } else { 0 };
        let positions = if is_self { n * 8 } else { 0 };
        let lse: usize = self
            .core
            .entries
            .iter()
            .map(|e| c.heads * e.q_rows.len())
            .sum();
        let selective = floats * 4 + positions;
        let full = selective + 4 * (n * qw * (1 + c.output_gate as usize) + lse);
        ActivationBytes { full, selective }
    }

    /// The mode the forward ran in.
    pub fn recompute(&self) -> Recompute {
        self.recompute
    }

    /// Whether weight gradients wait for [`backward_dw`].
    pub fn wgrad_pending(&self) -> bool {
        matches!(self.stage, Stage::PendingDw(_))
    }
}

// ---------------------------------------------------------------------------------------
// Forward

fn hidden_rows(arg: &str, x: &Tensor, h: usize, packed: bool) -> Result<(usize, usize, usize)> {
    if packed {
        x.expect_shape(arg, &[None, Some(h)])?;
        Ok((x.shape()[0], x.shape()[0], 1))
    } else {
        x.expect_shape(arg, &[None, None, Some(h)])?;
        Ok((x.shape()[0] * x.shape()[1], x.shape()[0], x.shape()[1]))
    }
}

fn bcast(
    arg: &str,
    t: Option<&Tensor>,
    target: [usize; 4],
) -> Result<Option<(Tensor, [usize; 4])>> {
    t.map(|t| Ok((t.clone(), broadcast_strides(arg, t.shape(), target)?)))
        .transpose()
}

/// The entries and broadcast target of a call: padded `b` entries of `sq` / `sk` rows
/// (`row = i * b + bi`), or packed sequences.
#[allow(clippy::too_many_arguments)]
fn core_spec(
    c: &LayerConfig,
    args: &ForwardArgs<'_>,
    n: usize,
    (s, b): (usize, usize),
    (nk, sk): (usize, usize),
    cu_kv: Option<&[i32]>,
) -> Result<CoreSpec> {
    let mask_type = args.mask_type.unwrap_or(c.mask);
    if args.attention_mask.is_some() && !mask_type.takes_mask_tensor() {
        return Err(bad(
            "attention_mask",
            "none for this mask type (only padding, padding_causal, arbitrary take a mask)",
            format!("a mask tensor with mask type {}", mask_type.name()),
        ));
    }
    let (entries, target) = match &args.packed {
        None => {
            let entries = (0..b)
                .map(|bi| Entry {
                    q_rows: (0..s).map(|i| i * b + bi).collect(),
                    k_rows: (0..sk).map(|j| j * b + bi).collect(),
                })
                .collect();
            (entries, [b, c.heads, s, sk])
        }
        Some(pk) => {
            let cq = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, n)?;
            let ck = check_cu_seqlens("cu_seqlens_kv", cu_kv.unwrap_or(pk.cu_seqlens_q), nk)?;
            if cq.len() != ck.len() {
                return Err(AttnError::CuSeqlens {
                    arg: "cu_seqlens_kv".into(),
                    expected: format!("{} entries, as cu_seqlens_q", cq.len()),
                    got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                });
            }
            let ns = cq.len() - 1;
            let mq = (0..ns)
                .map(|i| cq[i + 1] - cq[i])
                .max()
                .unwrap_or(0)
                .max(pk.max_seqlen_q);
            let mk = (0..ns)
                .map(|i| ck[i + 1] - ck[i])
                .max()
                .unwrap_or(0)
                .max(pk.max_seqlen_kv);
            let entries = (0..ns)
                .map(|i| Entry {
                    q_rows: (cq[i]..cq[i + 1]).collect(),
                    k_rows: (ck[i]..ck[i + 1]).collect(),
                })
                .collect();
            (entries, [ns, c.heads, mq, mk])
        }
    };
    let mask_t = if mask_type.takes_mask_tensor() {
        args.attention_mask
    } else {
        None
    };
    Ok(CoreSpec {
        entries,
        mask_type,
        window: c.window,
        scale: c.softmax_scale,
        sinks: c.sinks,
        mask: bcast("attention_mask", mask_t, target)?,
        bias: bcast("attention_bias", args.attention_bias, target)?,
    })
}

/// Gate (`o * sigmoid(g)`, f32 as the forward) and `linear_proj`.
fn gated(o: &[f32], gate: Option<&Vec<f32>>) -> Option<Vec<f32>> {
    gate.map(|g| {
        o.iter()
            .zip(g)
            .map(|(&x, &g)| x * grad::sigmoid(g))
            .collect()
    })
}

/// A training forward of `parts` over `hidden` with `args` (the same arguments and errors as
/// [`LayerParts::forward`]): returns the output (bitwise the forward's) and the saved
/// context for [`backward`].
///
/// Errors: those of the forward; [`AttnError::NoBackendImpl`] for a submodule without a
/// [`TrainSubmodule`].
pub fn forward_train(
    parts: &LayerParts<'_>,
    hidden: &Tensor,
    args: &ForwardArgs<'_>,
    opts: &TrainOptions,
) -> Result<(Tensor, CpuSaved)> {
    forward_train_with(parts, hidden, args, opts, None)
}

/// [`forward_train`] with core attention by `hook` (when given).
pub(crate) fn forward_train_with(
    parts: &LayerParts<'_>,
    hidden: &Tensor,
    args: &ForwardArgs<'_>,
    opts: &TrainOptions,
    hook: Option<&dyn CoreHook>,
) -> Result<(Tensor, CpuSaved)> {
    let c = parts.config();
    let p = params(parts)?;
    let packed = args.packed.is_some();
    let (np, hn) = (c.heads, c.head_dim);
    let ng = c.kv_groups();
    let (n, s, b) = hidden_rows("hidden", hidden, c.hidden, packed)?;
    let x = hidden.data().to_vec();
    let is_self = c.kind == AttentionKind::SelfAttention;
    let (mut q, mut k, v, gate, q_raw, k_raw, ctx, nk, ctx_shape, core, positions);
    if is_self {
        if args.key_value_states.is_some() {
            return Err(bad(
                "key_value_states",
                "none for self-attention",
                "a tensor",
            ));
        }
        positions = crate::plan::forward_positions(n, s, b, args)?;
        if let Some(pk) = &args.packed {
            check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, n)?;
            if !pk.cu_seqlens_kv.is_empty() && pk.cu_seqlens_kv != pk.cu_seqlens_q {
                return Err(AttnError::CuSeqlens {
                    arg: "cu_seqlens_kv".into(),
                    expected: "equal to cu_seqlens_q (or empty) for self-attention".into(),
                    got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                });
            }
        }
        core = core_spec(c, args, n, (s, b), (n, s), None)?;
        nk = n;
        ctx = None;
        ctx_shape = None;
        // linear_qkv and the GQA-interleaved split.
        let per = np / ng;
        let y = p.inp.forward(&x, n)?;
        let gw = if c.output_gate { per * hn } else { 0 };
        let gcols = per * hn + gw + 2 * hn;
        let (mut qv, mut gv, mut kv_, mut vv) = (
            Vec::with_capacity(n * np * hn),
            Vec::with_capacity(if c.output_gate { n * np * hn } else { 0 }),
            Vec::with_capacity(n * ng * hn),
            Vec::with_capacity(n * ng * hn),
        );
        for row in y.chunks_exact(ng * gcols) {
            for g in row.chunks_exact(gcols) {
                qv.extend_from_slice(&g[..per * hn]);
                gv.extend_from_slice(&g[per * hn..per * hn + gw]);
                kv_.extend_from_slice(&g[per * hn + gw..per * hn + gw + hn]);
                vv.extend_from_slice(&g[per * hn + gw + hn..]);
            }
        }
        gate = c.output_gate.then_some(gv);
        v = vv;
        match (c.qk_norm, &p.qn, &p.kn) {
            (Some(kind), Some(qn), Some(kn)) => {
                let (mut qn_, mut kn_) = (qv.clone(), kv_.clone());
                reference::normalize_rows(
                    &mut qn_,
                    hn,
                    kind,
                    c.eps,
                    qn.w.as_deref(),
                    qn.b.as_deref(),
                )?;
                reference::normalize_rows(
                    &mut kn_,
                    hn,
                    kind,
                    c.eps,
                    kn.w.as_deref(),
                    kn.b.as_deref(),
                )?;
                q_raw = Some(qv);
                k_raw = Some(kv_);
                q = qn_;
                k = kn_;
            }
            _ => {
                q_raw = None;
                k_raw = None;
                q = qv;
                k = kv_;
            }
        }
        if let Some(r) = &c.rope {
            let table = RopeTable::new(r, hn)?;
            table.apply(&mut q, np, &positions, args.rope_mscale)?;
            table.apply(&mut k, ng, &positions, args.rope_mscale)?;
        }
    } else {
        let kvs = args.key_value_states.ok_or_else(|| {
            bad(
                "key_value_states",
                "the context [sk, b, h] for cross-attention",
                "none",
            )
        })?;
        let (nk_, sk, bk) = hidden_rows("key_value_states", kvs, c.hidden, packed)?;
        if bk != b {
            return Err(AttnError::Shape {
                arg: "key_value_states".into(),
                expected: format!("[sk, {b}, {}]", c.hidden),
                got: kvs.shape().to_vec(),
            });
        }
        nk = nk_;
        core = core_spec(
            c,
            args,
            n,
            (s, b),
            (nk, sk),
            args.packed.map(|pk| pk.cu_seqlens_kv),
        )?;
        let cx = kvs.data().to_vec();
        q = p.inp.forward(&x, n)?;
        let kvp = p.kv.as_ref().expect("cross-attention has linear_kv");
        let y = kvp.forward(&cx, nk)?;
        let (mut kk, mut vv) = (
            Vec::with_capacity(nk * np * hn),
            Vec::with_capacity(nk * np * hn),
        );
        for hrow in y.chunks_exact(2 * hn) {
            kk.extend_from_slice(&hrow[..hn]);
            vv.extend_from_slice(&hrow[hn..]);
        }
        k = kk;
        v = vv;
        gate = None;
        q_raw = None;
        k_raw = None;
        ctx = Some(cx);
        ctx_shape = Some(kvs.shape().to_vec());
        positions = Vec::new();
    }
    let co = core_forward(&core, hook, c, &q, &k, &v, p.sinks.as_deref())?;
    let g = gated(&co.out, gate.as_ref());
    // linear_proj's bias is returned unadded, not added here.
    let out = reference::linear(
        g.as_deref().unwrap_or(&co.out),
        &p.proj.w,
        None,
        n,
        p.proj.inf,
        p.proj.outf,
    )?;
    let output = Tensor::new(&[n, c.hidden], out)?.reshape(hidden.shape())?;
    let max_logit = co.max_logit.clone();
    let keep = opts.recompute == Recompute::None;
    let acts = Acts {
        x,
        ctx,
        q_raw,
        k_raw,
        q,
        k,
        v,
        gate,
        core: keep.then_some(co),
        gated: if keep { g } else { None },
        positions,
    };
    Ok((
        output,
        CpuSaved {
            config: c.clone(),
            recompute: opts.recompute,
            out_shape: hidden.shape().to_vec(),
            ctx_shape,
            n,
            nk,
            core,
            rope_mscale: args.rope_mscale,
            max_logit,
            acts: Some(acts),
            stage: Stage::Forward,
        },
    ))
}

// ---------------------------------------------------------------------------------------
// Backward

fn stage_name(s: &Stage) -> &'static str {
    match s {
        Stage::Forward => "a context whose backward has not run",
        Stage::PendingDw(_) => "a context whose weight gradients are pending",
        Stage::Done { delayed: false } => {
            "a context whose backward already ran (without delay_wgrad)"
        }
        Stage::Done { delayed: true } => "a context whose backward_dw already ran",
    }
}

fn check_layer(parts: &LayerParts<'_>, saved: &CpuSaved, call: &str) -> Result<()> {
    if parts.config() != &saved.config {
        return Err(bad(
            "saved",
            format!("a context saved by this layer's forward_train (for {call})"),
            "a context of a layer with another config",
        ));
    }
    Ok(())
}

/// The backward of [`forward_train`]: `grad_output` has the forward output's shape
/// (`[s, b, h]` or packed `[t, h]`). Returns the gradients ([`LayerGrads`]); the saved
/// activations are consumed (a second backward on the context is an error).
///
/// The layer's parameters are read again here: they must be the ones the forward ran with
/// (apply an optimizer step or a QK-Clip after the backward, as with autograd).
///
/// Errors (nothing consumed or changed): [`AttnError::Shape`] (`grad_output` of another
/// shape), [`AttnError::TrainState`] (a context without saved activations: its backward
/// already ran), [`AttnError::InvalidArgument`] (`saved`: a context of a layer with another
/// config), [`AttnError::NoBackendImpl`].
pub fn backward(
    parts: &LayerParts<'_>,
    saved: &mut CpuSaved,
    grad_output: &Tensor,
    opts: &BackwardOptions,
) -> Result<LayerGrads<Tensor>> {
    backward_with(parts, saved, grad_output, opts, None)
}

/// [`backward`] with core attention by `hook` (the one the forward ran with).
pub(crate) fn backward_with(
    parts: &LayerParts<'_>,
    saved: &mut CpuSaved,
    grad_output: &Tensor,
    opts: &BackwardOptions,
    hook: Option<&dyn CoreHook>,
) -> Result<LayerGrads<Tensor>> {
    check_layer(parts, saved, "backward")?;
    if !matches!(saved.stage, Stage::Forward) || saved.acts.is_none() {
        return Err(AttnError::TrainState {
            call: "backward".into(),
            expected: "a saved forward (a context from forward_train whose backward has not run)"
                .into(),
            got: stage_name(&saved.stage).into(),
        });
    }
    if grad_output.shape() != saved.out_shape.as_slice() {
        return Err(AttnError::Shape {
            arg: "grad_output".into(),
            expected: format!("{:?} (the forward output's shape)", saved.out_shape),
            got: grad_output.shape().to_vec(),
        });
    }
    let p = params(parts)?;
    let acts = saved.acts.as_ref().expect("checked above");
    let (grads, pending) = backward_inner(saved, acts, &p, grad_output.data(), opts, hook)?;
    // Only now, with everything computed, consume the activations.
    saved.acts = None;
    saved.stage = if opts.delay_wgrad {
        Stage::PendingDw(pending)
    } else {
        Stage::Done { delayed: false }
    };
    Ok(grads)
}

fn backward_inner(
    saved: &CpuSaved,
    a: &Acts,
    p: &Params,
    dy: &[f32],
    opts: &BackwardOptions,
    hook: Option<&dyn CoreHook>,
) -> Result<(LayerGrads<Tensor>, Vec<PendingDw>)> {
    let c = &saved.config;
    let (np, hn, h) = (c.heads, c.head_dim, c.hidden);
    let ng = c.kv_groups();
    let n = saved.n;
    let w = np * hn;
    let mut params = BTreeMap::new();
    let mut pending = Vec::new();
    let wgrad = |params: &mut BTreeMap<String, Tensor>,
                 pending: &mut Vec<PendingDw>,
                 lin: &Lin,
                 dy: Vec<f32>,
                 x: Vec<f32>,
                 n: usize|
     -> Result<()> {
        let pd = PendingDw {
            lin: lin.name,
            has_bias: lin.b.is_some(),
            dy,
            x,
            n,
            inf: lin.inf,
            outf: lin.outf,
        };
        if opts.delay_wgrad {
            pending.push(pd);
            Ok(())
        } else {
            pd.run(params)
        }
    };
    // Core attention's output: saved, or recomputed (selective recompute).
    let recomputed;
    let co = match &a.core {
        Some(co) => co,
        None => {
            recomputed = core_forward(&saved.core, hook, c, &a.q, &a.k, &a.v, p.sinks.as_deref())?;
            &recomputed
        }
    };
    let g_rec;
    let proj_in: &[f32] = match (&a.gate, &a.gated) {
        (None, _) => &co.out,
        (Some(_), Some(g)) => g,
        (Some(gt), None) => {
            g_rec = gated(&co.out, Some(gt)).expect("gate");
            &g_rec
        }
    };
    // linear_proj: dX = dY W, dW = dY^T X (bias: no gradient, returned unadded).
    let d_proj_in = grad::linear_backward_input(dy, &p.proj.w, n, w, h)?;
    {
        let mut proj = p.proj.clone();
        proj.b = None;
        wgrad(
            &mut params,
            &mut pending,
            &proj,
            dy.to_vec(),
            proj_in.to_vec(),
            n,
        )?;
    }
    // Output gate.
    let (d_core, d_gate) = match &a.gate {
        Some(g) => {
            let (d_o, d_g) = grad::gate_backward(&d_proj_in, &co.out, g)?;
            (d_o, Some(d_g))
        }
        None => (d_proj_in, None),
    };
    // Core attention.
    let (mut dq, mut dk, dv, dsinks, dbias) = match hook {
        None => saved.core.backward(
            c,
            &a.q,
            &a.k,
            &a.v,
            co,
            &d_core,
            p.sinks.as_deref(),
            opts.want_bias_grad,
        )?,
        Some(h) => {
            let (dq, dk, dv, ds) = h.backward(&a.q, &a.k, &a.v, &co.out, &co.lse[0], &d_core)?;
            (dq, dk, dv, ds.filter(|_| p.sinks.is_some()), None)
        }
    };
    if let Some(ds) = dsinks {
        params.insert(
            "core_attention.softmax_offset".to_string(),
            Tensor::new(&[np], ds)?,
        );
    }
    let grad_attention_bias = match (dbias, &saved.core.bias) {
        (Some(db), Some((t, _))) => Some(Tensor::new(t.shape(), db)?),
        _ => None,
    };
    let (grad_input, grad_kv) = if c.kind == AttentionKind::SelfAttention {
        // Rope: the inverse rotation.
        if let Some(r) = &c.rope {
            let table = RopeTable::new(r, hn)?;
            table.apply_backward(&mut dq, np, &a.positions, saved.rope_mscale)?;
            table.apply_backward(&mut dk, ng, &a.positions, saved.rope_mscale)?;
        }
        // q/k norms.
        if let (Some(kind), Some(qn), Some(kn), Some(qr), Some(kr)) =
            (c.qk_norm, &p.qn, &p.kn, &a.q_raw, &a.k_raw)
        {
            for (role, np_, raw, d) in [
                ("q_layernorm", qn, qr, &mut dq),
                ("k_layernorm", kn, kr, &mut dk),
            ] {
                let g = grad::normalize_rows_backward(
                    raw,
                    d,
                    hn,
                    kind,
                    c.eps,
                    np_.w.as_deref(),
                    np_.b.as_deref(),
                )?;
                *d = g.dx;
                if let Some(dw) = g.dweight {
                    params.insert(format!("{role}.weight"), Tensor::new(&[hn], dw)?);
                }
                if let Some(db) = g.dbias {
                    params.insert(format!("{role}.bias"), Tensor::new(&[hn], db)?);
                }
            }
        }
        // Scatter back into linear_qkv's columns (per group [q | gate | k | v]).
        let per = np / ng;
        let gw = if c.output_gate { per * hn } else { 0 };
        let gcols = per * hn + gw + 2 * hn;
        let qkv_out = ng * gcols;
        let mut dyq = vec![0f32; n * qkv_out];
        for r in 0..n {
            for g in 0..ng {
                let base = r * qkv_out + g * gcols;
                dyq[base..][..per * hn].copy_from_slice(&dq[(r * np + g * per) * hn..][..per * hn]);
                if let Some(dg) = &d_gate {
                    dyq[base + per * hn..][..gw]
                        .copy_from_slice(&dg[(r * np + g * per) * hn..][..gw]);
                }
                dyq[base + per * hn + gw..][..hn].copy_from_slice(&dk[(r * ng + g) * hn..][..hn]);
                dyq[base + per * hn + gw + hn..][..hn]
                    .copy_from_slice(&dv[(r * ng + g) * hn..][..hn]);
            }
        }
        let dx = grad::linear_backward_input(&dyq, &p.inp.w, n, h, qkv_out)?;
        wgrad(&mut params, &mut pending, &p.inp, dyq, a.x.clone(), n)?;
        (Tensor::new(&saved.out_shape, dx)?, None)
    } else {
        let nk = saved.nk;
        let dx = grad::linear_backward_input(&dq, &p.inp.w, n, h, w)?;
        wgrad(&mut params, &mut pending, &p.inp, dq, a.x.clone(), n)?;
        // linear_kv's columns per head [k_h | v_h].
        let mut dykv = vec![0f32; nk * 2 * w];
        for r in 0..nk {
            for hh in 0..np {
                let base = (r * np + hh) * 2 * hn;
                dykv[base..][..hn].copy_from_slice(&dk[(r * np + hh) * hn..][..hn]);
                dykv[base + hn..][..hn].copy_from_slice(&dv[(r * np + hh) * hn..][..hn]);
            }
        }
        let kvp = p.kv.as_ref().expect("cross-attention has linear_kv");
        let dctx = grad::linear_backward_input(&dykv, &kvp.w, nk, h, 2 * w)?;
        wgrad(
            &mut params,
            &mut pending,
            kvp,
            dykv,
            a.ctx.clone().expect("cross context"),
            nk,
        )?;
        let shape = saved.ctx_shape.clone().expect("cross context shape");
        (
            Tensor::new(&saved.out_shape, dx)?,
            Some(Tensor::new(&shape, dctx)?),
        )
    };
    Ok((
        LayerGrads {
            grad_input,
            grad_key_value_states: grad_kv,
            grad_attention_bias,
            params,
        },
        pending,
    ))
}

/// The delayed weight gradients of a backward that ran with
/// [`BackwardOptions::delay_wgrad`]: `linear_qkv.weight` / `.bias` and `linear_proj.weight`
/// (cross-attention: `linear_q.*`, `linear_kv.*`, `linear_proj.weight`), bitwise equal to what
/// a one-step backward returns.
///
/// Errors ([`AttnError::TrainState`], nothing changed): before the backward, after a backward
/// that did not delay them, or a second time.
pub fn backward_dw(saved: &mut CpuSaved) -> Result<BTreeMap<String, Tensor>> {
    let Stage::PendingDw(pending) = &saved.stage else {
        return Err(AttnError::TrainState {
            call: "backward_dw".into(),
            expected: "a context whose backward ran with delay_wgrad and whose weight \
                       gradients are still pending"
                .into(),
            got: stage_name(&saved.stage).into(),
        });
    };
    let mut out = BTreeMap::new();
    for pd in pending {
        pd.run(&mut out)?;
    }
    saved.stage = Stage::Done { delayed: true };
    Ok(out)
}
