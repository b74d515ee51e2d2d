//! The interface between the scheduler ([`crate::pipeline`]) and the destinations
//! ([`crate::dest_host`], [`crate::dest_cuda`]): the scheduler asks a sink for a buffer for
//! each read and hands it back filled; it never names a concrete sink, and the sinks never
//! call back into the scheduler.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use tensorlift_format::LoadPlan;
use tensorlift_io::IoBufMut;

use crate::layout::Read;
use crate::{LoadError, Tensor};

/// Where the bytes of a load go. The scheduler asks for a buffer for each read and hands
/// it back filled.
pub(crate) trait Sink {
    type Buf: IoBufMut;
    /// A buffer for `read`, or `None` when none is free now, with `cx` woken when one is
    /// (the scheduler then waits).
    fn buffer(&mut self, read: &Read, cx: &mut Context<'_>) -> Option<Self::Buf>;
    /// `read` filled `buf`; tensors that are complete go to `ready`.
    fn landed(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        buf: Self::Buf,
        ready: &mut VecDeque<Tensor>,
    ) -> Result<u64, LoadError>;
    /// Background work (device copies) that finished: completed tensors go to `ready`,
    /// and the bytes that reached their destination are returned. `Pending` registers the
    /// waker when there is work outstanding; `Ready(Ok(0))` when there is none.
    fn poll_progress(
        &mut self,
        cx: &mut Context<'_>,
        plan: &LoadPlan,
        ready: &mut VecDeque<Tensor>,
    ) -> Poll<Result<u64, LoadError>>;
    /// Whether background work is outstanding.
    fn busy(&self) -> bool;
    /// Ends the load: waits for background work, then frees what the sink holds.
    fn abort(&mut self);
}
