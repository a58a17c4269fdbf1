//! [`CpCall`]: the host-side checks and geometry of one context-parallel forward on a GPU
//! ([`super::CpCudaLayer`]), and [`agree`], the check that every rank of the group makes the
//! same call. Host only (no GPU), so CI runs them with the in-process communicator.
//!
//! Layout conventions (as [`super::CpLayer`]): `hidden` is this rank's rows, padded
//! `[s / cp, b, h]` (rank `r`'s chunks `r` and `2 cp - 1 - r` of the whole `[s, b, h]`,
//! [`CpLayout::split`]) or packed `[t / cp, h]` with `args.packed` giving the whole batch's
//! `cu_seqlens_q`; every sequence length a multiple of `2 cp`. `args.positions`, when given,
//! are the whole sequence's (`[s]` or `[t]`). The device path works on batch-major rows:
//! padded row `i * b + bi` is row `bi * (s / cp) + i` there (a packed batch of `b` sequences).

use attention_codegen::{MaskType, Window};

use super::comm::{gather_ready, Communicator};
use super::cp_layout::CpLayout;
use super::cp_plan::Visibility;
use super::CpCommType;
use crate::error::{AttnError, Result};
use crate::layer::ForwardArgs;
use crate::modules::check_cu_seqlens;

fn bad(arg: &str, expected: impl Into<String>, got: impl Into<String>) -> AttnError {
    AttnError::InvalidArgument {
        arg: arg.into(),
        expected: expected.into(),
        got: got.into(),
    }
}

/// The geometry of one call on one rank (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpCall {
    /// Padded input: `(s / cp, b)`; `None` for packed input.
    pub padded: Option<(usize, usize)>,
    /// The whole batch's sequences, batch-major (padded: `b` sequences of `s`).
    pub global_cu: Vec<usize>,
    /// This rank's rows of them (`global_cu / cp`).
    pub local_cu: Vec<usize>,
    /// Rope position of every local row, batch-major.
    pub positions: Vec<i32>,
    /// The mask type in force (the layer's or the call's override).
    pub mask: MaskType,
    /// Its visibility with the layer's window.
    pub vis: Visibility,
}

impl CpCall {
    /// Check one call: `shape` is `hidden`'s, `hidden_size` the layer's `h`, `mask` and
    /// `window` the layer's.
    ///
    /// Errors: [`AttnError::InvalidArgument`] for a mask or bias tensor or a context
    /// (`attention_mask/attention_bias`, `key_value_states`), a mask type other than causal,
    /// causal_bottom_right or no_mask (`mask_type`), a padded sequence that is not a multiple
    /// of `2 cp` (`hidden`), a packed length that is not (`cu_seqlens_q`), positions beyond
    /// int32 (`positions`); [`AttnError::Shape`] for `hidden` of another rank or width, or
    /// positions of another length (`positions`); [`AttnError::CuSeqlens`] for
    /// `cu_seqlens_q` that do not end at `rows * cp` (input split for another `cp_size`), or
    /// `cu_seqlens_kv` other than empty or equal.
    pub fn new(
        layout: CpLayout,
        shape: &[usize],
        hidden_size: usize,
        args: &ForwardArgs<'_>,
        mask: MaskType,
        window: Option<Window>,
    ) -> Result<CpCall> {
        if args.attention_mask.is_some() || args.attention_bias.is_some() {
            return Err(bad(
                "attention_mask/attention_bias",
                "none under context parallelism",
                "a tensor",
            ));
        }
        if args.key_value_states.is_some() {
            return Err(bad(
                "key_value_states",
                "none for self-attention",
                "a tensor",
            ));
        }
        let mask = args.mask_type.unwrap_or(mask);
        let vis = Visibility::new(mask, window)?;
        let cp = layout.cp_size;
        let (padded, global_cu) = match (&args.packed, shape) {
            (None, [s, b, h]) if *h == hidden_size => {
                layout.chunks("hidden", s * cp)?;
                (Some((*s, *b)), (0..=*b).map(|i| i * s * cp).collect())
            }
            (Some(pk), [t, h]) if *h == hidden_size => {
                let cu = check_cu_seqlens("cu_seqlens_q", pk.cu_seqlens_q, t * cp)?;
                if !pk.cu_seqlens_kv.is_empty() && pk.cu_seqlens_kv != pk.cu_seqlens_q {
                    return Err(AttnError::CuSeqlens {
                        arg: "cu_seqlens_kv".into(),
                        expected: "equal to cu_seqlens_q (or empty) for self-attention".into(),
                        got: pk.cu_seqlens_kv.iter().map(|&x| x as i64).collect(),
                    });
                }
                for w in cu.windows(2) {
                    layout.chunks("cu_seqlens_q", w[1] - w[0])?;
                }
                (None, cu)
            }
            _ => {
                return Err(AttnError::Shape {
                    arg: "hidden".into(),
                    expected: if args.packed.is_some() {
                        format!("[t / cp, {hidden_size}] (packed)")
                    } else {
                        format!("[s / cp, b, {hidden_size}]")
                    },
                    got: shape.to_vec(),
                })
            }
        };
        let local_cu: Vec<usize> = global_cu.iter().map(|x| x / cp).collect();
        // Positions of the whole input: padded [s] (shared by the batch), packed [t].
        let whole = match padded {
            Some((s, _)) => s * cp,
            None => global_cu.last().copied().unwrap_or(0),
        };
        let seq_cu: Vec<usize> = match padded {
            Some(_) => vec![0, whole],
            None => global_cu.clone(),
        };
        let rows = layout.local_rows("hidden", &seq_cu)?;
        let pos: Vec<i64> = match args.positions {
            Some(p) if p.len() != whole => {
                return Err(AttnError::Shape {
                    arg: "positions".into(),
                    expected: format!("[{whole}] (the whole sequence's)"),
                    got: vec![p.len()],
                })
            }
            Some(p) => rows.iter().map(|&r| p[r]).collect(),
            None => {
                let mut start = vec![0usize; whole];
                for w in seq_cu.windows(2) {
                    start[w[0]..w[1]].iter_mut().for_each(|s| *s = w[0]);
                }
                rows.iter().map(|&r| (r - start[r]) as i64).collect()
            }
        };
        let pos: Vec<i32> = pos
            .into_iter()
            .map(|p| {
                i32::try_from(p)
                    .map_err(|_| bad("positions", "values that fit in int32", p.to_string()))
            })
            .collect::<Result<_>>()?;
        let positions = match padded {
            Some((_, b)) => (0..b).flat_map(|_| pos.iter().copied()).collect(),
            None => pos,
        };
        Ok(CpCall {
            padded,
            global_cu,
            local_cu,
            positions,
            mask,
            vis,
        })
    }

    /// Local rows.
    pub fn rows(&self) -> usize {
        self.local_cu.last().copied().unwrap_or(0)
    }

    /// What every rank of the group must call identically: `cp_size`, the exchange, the
    /// layer's dims, dtype, mask and window, and the whole batch's geometry.
    pub fn descriptor(
        &self,
        cp_size: usize,
        comm_type: CpCommType,
        layer: &crate::config::LayerConfig,
    ) -> String {
        format!(
            "cp_size {cp_size}, cp_comm_type {comm_type}, heads {}, groups {}, head_dim {}, \
             hidden {}, dtype {:?}, mask {}, window {:?}, {}, cu_seqlens {:?}",
            layer.heads,
            layer.groups,
            layer.head_dim,
            layer.hidden,
            layer.dtype,
            self.mask.name(),
            layer.window.map(|w| (w.left, w.right)),
            match self.padded {
                Some((s, b)) => format!("padded s = {}, b = {b}", s * cp_size),
                None => "packed".into(),
            },
            self.global_cu
        )
    }
}

/// Check that every rank of `comm` calls with the same `descriptor` (rank 0's), before any
/// collective of the call, so a mismatch is an error on every rank instead of collectives of
/// different sizes (a hang or garbage in NCCL). [`agree_ready`] with a rank that is ready.
///
/// Errors: those of [`agree_ready`].
pub fn agree<C: Communicator + ?Sized>(comm: &C, descriptor: &str) -> Result<()> {
    agree_ready(comm, Ok(()), |_| descriptor.to_string())
}

/// Every rank's readiness for one call, in one all-gather of bytes
/// (`parallel::comm::gather_ready`, crate-internal): `local` is what this rank prepared (the call checked,
/// planned, its kernels loaded and its buffers allocated), whose `describe` every rank must
/// send identically, or the error that stopped it. Every rank must call it once per call,
/// failed or not, so that no rank waits in a collective for a peer that has given up.
///
/// Returns `local` when every rank is ready with rank 0's description.
///
/// Errors: on a rank whose `local` failed, that error (after the all-gather); on the others,
/// [`AttnError::Collective`] (`op` "context-parallel call", `rank` the first failed rank,
/// `got` its error); when every rank is ready but the descriptors differ,
/// [`AttnError::RankMismatch`] (`param` "context-parallel call") naming the first rank whose
/// call differs, with both descriptors; those of [`Communicator::all_gather_bytes`].
pub fn agree_ready<C: Communicator + ?Sized, T>(
    comm: &C,
    local: Result<T>,
    describe: impl FnOnce(&T) -> String,
) -> Result<T> {
    let (local, all) = gather_ready(
        comm,
        local,
        |t| describe(t).into_bytes(),
        "context-parallel call",
        "every rank ready (its call checked and planned, kernels loaded, buffers allocated)",
    )?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (rank, d) in all.iter().enumerate().skip(1) {
        if d != &all[0] {
            return Err(AttnError::RankMismatch {
                param: "context-parallel call".into(),
                rank,
                expected: text(&all[0]),
                got: text(d),
            });
        }
    }
    Ok(local)
}
