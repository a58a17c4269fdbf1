//! QK-Clip on the GPU ([`crate::train::qk_clip`]): the layer's running max-logit record is an
//! f32 `[np]` device buffer. Each [`forward_train_device`](CudaLayer::forward_train_device)
//! raises it on the device from the forward kernel's per-head max logit (the first forward
//! after a reset copies it, later ones launch `max_logit_fold_<dtype>`), so nothing goes
//! through the host per forward. [`clip_qk_device`](CudaLayer::clip_qk_device) reads the
//! `[np]` record to the host once, computes the per-group factors as the CPU does, rescales
//! the device `linear_qkv.weight` in place (`qk_clip_scale_rows_<dtype>`: f32 products
//! rounded once to bf16/f16) and drops the record. The layer keeps no host copy of
//! `linear_qkv.weight` (only `linear_proj`'s bias, which the clip does not touch), and every
//! later forward, cache step or captured decode graph reads the rescaled buffer in place.

use super::*;
use crate::cuda::train_ops::{self, LoadedPrepBackward, PrepBackwardKernels};
use crate::train::qk_clip::{check_args, plan};
use crate::train::QkClipReport;

impl CudaLayer {
    /// Raise the layer's record by one training forward's per-head max logit `fwd` (`[np]`,
    /// on the layer's stream); queued, no host round trip.
    pub(super) fn raise_max_logit_record(
        &self,
        k: &LoadedPrepBackward,
        fwd: &CudaSlice<f32>,
    ) -> Result<()> {
        let st = self.rt.stream();
        let mut rec = self.qk_record.lock().unwrap_or_else(|p| p.into_inner());
        match rec.as_mut() {
            Some(r) => k.max_fold(st, fwd, r),
            None => {
                *rec = Some(
                    st.clone_dtod(fwd)
                        .map_err(crate::cuda::tensor::cuda_err("clone_dtod max-logit record"))?,
                );
                Ok(())
            }
        }
    }

    /// The layer's QK-Clip record `[np]` on the host (see
    /// [`TrainLayer::max_logit_record`](crate::backend::TrainLayer::max_logit_record)):
    /// `None` when no [`forward_train_device`](Self::forward_train_device) ran since the last
    /// clip. Synchronizes the stream (one `[np]` read).
    ///
    /// Errors: [`AttnError::Cuda`] when the read fails (an earlier launch's error surfaces
    /// here).
    pub fn max_logit_record_device(&self) -> Result<Option<Vec<f32>>> {
        let rec = self.qk_record.lock().unwrap_or_else(|p| p.into_inner());
        rec.as_ref()
            .map(|r| {
                self.rt
                    .stream()
                    .clone_dtoh(r)
                    .map_err(crate::cuda::tensor::cuda_err("clone_dtoh max-logit record"))
            })
            .transpose()
    }

    /// QK-Clip on the device `linear_qkv.weight` with the layer's record (see
    /// [`TrainLayer::clip_qk`](crate::backend::TrainLayer::clip_qk) for the formula): reads
    /// the record once (synchronizing the stream), queues the in-place rescale of the
    /// clipped groups' query and key rows, and resets the record. The report's `eta` and
    /// `group_max` are the CPU formula's over the device record.
    ///
    /// Errors (nothing changed): [`AttnError::InvalidArgument`] for a cross-attention layer,
    /// a `threshold` not finite and > 0, an `alpha` outside `[0, 1]`; [`AttnError::Cuda`]
    /// when reading the record fails; kernel compile / load errors.
    pub fn clip_qk_device(&mut self, threshold: f32, alpha: f32) -> Result<QkClipReport> {
        check_args(&self.config, threshold, alpha)?;
        let record = self.max_logit_record_device()?;
        self.clip_qk_device_with_record(record.as_deref(), threshold, alpha)
    }

    /// [`clip_qk_device`](Self::clip_qk_device) with a host record `[np]` the caller
    /// supplies (e.g. reduced across tensor-parallel replicas; `None`: nothing observed)
    /// instead of the layer's; the layer's record is reset all the same.
    ///
    /// Errors (nothing changed): those of `clip_qk_device`;
    /// [`AttnError::InvalidArgument`] (`record`) for a record of another head count or one
    /// holding a NaN.
    pub fn clip_qk_device_with_record(
        &mut self,
        record: Option<&[f32]>,
        threshold: f32,
        alpha: f32,
    ) -> Result<QkClipReport> {
        let st = self.rt.stream().clone();
        let p = plan(&self.config, record, threshold, alpha)?;
        if !p.blocks.is_empty() {
            let k = train_ops::load(&self.rt, &PrepBackwardKernels::render(&self.prep)?)?;
            let Projections::SelfAttention { qkv } = &mut self.proj_in else {
                unreachable!("check_args refused cross-attention");
            };
            let factors = upload(&st, &p.row_factors(qkv.out_features()), "qk_clip factors")?;
            match self.elem {
                ElemType::Bf16 => k.scale_rows::<bf16>(&st, &mut qkv.weight, &factors)?,
                ElemType::F16 => k.scale_rows::<f16>(&st, &mut qkv.weight, &factors)?,
                ElemType::F32 => {
                    return Err(AttnError::DType {
                        arg: "spec dtype".into(),
                        expected: "bf16 or f16".into(),
                        got: "f32".into(),
                    })
                }
            }
        }
        *self.qk_record.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(p.report)
    }

    /// The device `linear_qkv.weight` `[W, h]` in the layer's dtype (self-attention; `None`
    /// for cross-attention), e.g. to read it back after [`clip_qk_device`](Self::clip_qk_device).
    pub fn linear_qkv_weight(&self) -> Option<&DeviceTensor> {
        match &self.proj_in {
            Projections::SelfAttention { qkv } => Some(&qkv.weight),
            Projections::CrossAttention { .. } => None,
        }
    }
}
