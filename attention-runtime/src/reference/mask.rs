//! The generated part of every mask type and the sliding window, as a visibility predicate.

use attention_codegen::{MaskType, Window};

/// Whether key `j` is visible to query `i` (of `sq` queries and `sk` keys) under the
/// generated part of `mask` and the window. Caller-given mask tensors (`padding`,
/// `padding_causal`, `arbitrary`) are applied separately.
///
/// - `causal`, `padding_causal`: `j <= i` (top-left aligned).
/// - `causal_bottom_right`: `j <= i + sk - sq`.
/// - `no_mask`, `padding`, `arbitrary`: every key.
/// - window `(l, r)`: `i + sk - sq - l <= j <= i + sk - sq + r`, `-1` = unbounded side.
pub fn visible(
    mask: MaskType,
    window: Option<Window>,
    sq: usize,
    sk: usize,
    i: usize,
    j: usize,
) -> bool {
    let (i, j) = (i as i64, j as i64);
    let diag = i + sk as i64 - sq as i64;
    let causal_ok = match mask {
        MaskType::Causal | MaskType::PaddingCausal => j <= i,
        MaskType::CausalBottomRight => j <= diag,
        MaskType::NoMask | MaskType::Padding | MaskType::Arbitrary => true,
    };
    if !causal_ok {
        return false;
    }
    match window {
        None => true,
        Some(w) => (w.left < 0 || j >= diag - w.left) && (w.right < 0 || j <= diag + w.right),
    }
}
