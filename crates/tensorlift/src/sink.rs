//! The interface between the scheduler ([`crate::pipeline`]) and the destinations
//! ([`crate::dest_host`], [`crate::dest_cuda`]): the scheduler asks a sink for a buffer for
//! each read and hands it back filled; it never names a concrete sink, and the sinks never
//! call back into the scheduler.

use std::collections::VecDeque;
use std::task::{Context, Poll};

use tensorlift_format::LoadPlan;
use tensorlift_io::IoBufMut;

use crate::layout::Read;
use crate::open::ShardIo;
use crate::{LoadError, Tensor};

/// How a sink takes a read (see [`Sink::serve`]).
pub(crate) enum Serve {
    /// Read it into a buffer the sink lends, as usual.
    Read,
    /// The sink moves its bytes itself.
    Taken,
    /// The sink would move its bytes itself, but has too much in flight now: the scheduler
    /// waits, and what the sink waits for (its staging pool) wakes it.
    Later,
}

/// Where the bytes of a load go. The scheduler asks for a buffer for each read and hands
/// it back filled.
pub(crate) trait Sink {
    type Buf: IoBufMut;
    /// A buffer for `read`, or `None` when none is free now, with `cx` woken when one is
    /// (the scheduler then waits). `idle`: the load holds no buffer (no read of its in
    /// flight, the sink not [`busy`](Sink::busy)), so that waiting would be on other loads
    /// alone, which may never give one back: a sink whose buffers are shared gives it one.
    fn buffer(
        &mut self,
        plan: &LoadPlan,
        read: &Read,
        idle: bool,
        cx: &mut Context<'_>,
    ) -> Result<Option<Self::Buf>, LoadError>;
    /// Whether the sink moves `read`'s bytes from `file` itself, with no read into a lent
    /// buffer (the CUDA sink copies a shard in the page cache to the device by DMA straight
    /// from it). A read it takes reaches its destination as background work
    /// ([`poll_progress`](Sink::poll_progress)), which also checks that the file did not
    /// change while it was read, and is never handed to [`landed`](Sink::landed).
    /// `idle` as for [`buffer`](Sink::buffer): a sink that would wait for one answers
    /// [`Serve::Read`] instead.
    fn serve(&mut self, _plan: &LoadPlan, _read: &Read, _file: &ShardIo, _idle: bool, _cx: &mut Context<'_>) -> Serve {
        Serve::Read
    }
    /// Whether reads of shard `shard` that the sink took are still in flight: it holds the
    /// file open until they are done.
    fn holds(&self, _shard: usize) -> bool {
        false
    }
    /// Bytes of taken reads still in flight.
    fn taken_bytes(&self) -> u64 {
        0
    }
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
