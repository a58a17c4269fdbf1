//! [`Communicator`]: the collectives tensor and context parallelism need, over a backend's
//! tensors, implemented in process for N threads ([`super::InProcessComm`], host tensors) and
//! over NCCL ([`super::NcclComm`], device tensors).
//!
//! Semantics are NCCL's (and `torch.distributed`'s) over flat, row-major element buffers; the
//! caller gives the shapes. Every rank of the group must call the same collectives in the
//! same order with the same sizes. A collective that cannot complete (a peer timed out,
//! failed, called another collective or sent another size) is an
//! [`AttnError::Collective`] on this rank, never a hang: see each
//! implementation for how it bounds the wait.

use crate::error::{AttnError, Result};

/// Marker bytes of [`gather_ready`]'s all-gather: a ready rank's payload or a failed rank's
/// error.
const READY: u8 = b'+';
const FAILED: u8 = b'!';

/// Every rank's readiness for one step and its payload, in one all-gather of bytes: `local`
/// is what this rank prepared (or the error that stopped it), `payload` its bytes for the
/// peers. Every rank must call it once per step, failed or not, so that no rank waits in a
/// collective for a peer that has given up.
///
/// Returns `local` and every rank's payload, in rank order, when every rank is ready.
///
/// Errors: on a rank whose `local` failed, that error (after the all-gather); on the others,
/// [`AttnError::Collective`] (`op`, `rank` the first failed rank, `expected`, `got` "rank r
/// failed: " and its error); those of [`Communicator::all_gather_bytes`].
pub(crate) fn gather_ready<C: Communicator + ?Sized, T>(
    comm: &C,
    local: Result<T>,
    payload: impl FnOnce(&T) -> Vec<u8>,
    op: &str,
    expected: &str,
) -> Result<(T, Vec<Vec<u8>>)> {
    let mut msg = Vec::new();
    match &local {
        Ok(t) => {
            msg.push(READY);
            msg.extend(payload(t));
        }
        Err(e) => {
            msg.push(FAILED);
            msg.extend_from_slice(e.to_string().as_bytes());
        }
    }
    let all = comm.all_gather_bytes(&msg)?;
    let local = local?;
    if let Some((rank, m)) = all
        .iter()
        .enumerate()
        .find(|(_, m)| m.first() != Some(&READY))
    {
        return Err(AttnError::Collective {
            op: op.into(),
            rank,
            expected: expected.into(),
            got: format!(
                "rank {rank} failed: {}",
                String::from_utf8_lossy(m.get(1..).unwrap_or(&[]))
            ),
        });
    }
    Ok((local, all.into_iter().map(|m| m[1..].to_vec()).collect()))
}

/// Collectives over the tensors of one backend, within one group of ranks `0..world_size`.
///
/// Block conventions (elements, row-major): `all_gather` puts rank `i`'s `send` at block `i`
/// of `recv` (`recv` has `world_size` times `send`'s elements: concatenated along dim 0);
/// `reduce_scatter_sum` gives rank `i` block `i` of the elementwise sum of every rank's
/// `send`; `all_to_all` sends block `j` of `send` to rank `j` and puts what rank `i` sent this
/// rank at block `i` of `recv`.
///
/// Errors: [`AttnError::Shape`] (naming `recv` or `send`) for buffers whose element counts do
/// not fit the collective (nothing is sent), [`AttnError::Collective`] when the exchange
/// fails, [`AttnError::InvalidArgument`] for a peer rank outside the group.
pub trait Communicator {
    /// The tensor the collectives move: [`crate::Tensor`] on the host,
    /// [`crate::cuda::DeviceTensor`] on a GPU.
    type Tensor;
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// In place, every rank's `t` summed elementwise; every rank gets the same bits.
    fn all_reduce_sum(&self, t: &mut Self::Tensor) -> Result<()>;
    /// `recv` = every rank's `send` concatenated in rank order.
    fn all_gather(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()>;
    /// `recv` = block `rank` of the elementwise sum of every rank's `send`.
    fn reduce_scatter_sum(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()>;
    /// Block `j` of `send` to rank `j`; block `i` of `recv` from rank `i` (equal blocks).
    fn all_to_all(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()>;
    /// Send `send` to rank `to` and receive `recv` from rank `from` in one step (a ring step
    /// is `to = rank + 1`, `from = rank - 1`, modulo the world size); `to` must receive
    /// exactly `send`'s element count.
    fn send_recv(
        &self,
        send: &Self::Tensor,
        to: usize,
        recv: &mut Self::Tensor,
        from: usize,
    ) -> Result<()>;
    /// Every rank's `bytes`, in rank order (the control plane: digests, ids, small metadata;
    /// ranks may send different lengths).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Rank `root`'s `bytes` on every rank (other ranks' `bytes` are ignored).
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>>;
}

/// Check `recv`'s element count against `want` for `op`.
pub(crate) fn check_numel(arg: &str, op: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("{want} elements for {op}"),
            got: vec![got],
        })
    }
}

/// Check that `n` elements split into `world` equal blocks.
pub(crate) fn check_blocks(arg: &str, op: &str, n: usize, world: usize) -> Result<usize> {
    if world > 0 && n.is_multiple_of(world) {
        Ok(n / world)
    } else {
        Err(AttnError::Shape {
            arg: arg.into(),
            expected: format!("a multiple of world_size = {world} elements for {op}"),
            got: vec![n],
        })
    }
}

/// Check a peer rank.
pub(crate) fn check_peer(arg: &str, peer: usize, world: usize) -> Result<()> {
    if peer < world {
        Ok(())
    } else {
        Err(AttnError::InvalidArgument {
            arg: arg.into(),
            expected: format!("a rank below world_size = {world}"),
            got: peer.to_string(),
        })
    }
}

/// A borrowed communicator is one (several layers of a rank, e.g. a stack of
/// [`super::CpLayer`]s, share the rank's group).
impl<C: Communicator + ?Sized> Communicator for &C {
    type Tensor = C::Tensor;
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&self, t: &mut Self::Tensor) -> Result<()> {
        (**self).all_reduce_sum(t)
    }
    fn all_gather(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()> {
        (**self).all_gather(send, recv)
    }
    fn reduce_scatter_sum(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()> {
        (**self).reduce_scatter_sum(send, recv)
    }
    fn all_to_all(&self, send: &Self::Tensor, recv: &mut Self::Tensor) -> Result<()> {
        (**self).all_to_all(send, recv)
    }
    fn send_recv(
        &self,
        send: &Self::Tensor,
        to: usize,
        recv: &mut Self::Tensor,
        from: usize,
    ) -> Result<()> {
        (**self).send_recv(send, to, recv, from)
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        (**self).all_gather_bytes(bytes)
    }
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Result<Vec<u8>> {
        (**self).broadcast_bytes(bytes, root)
    }
}
