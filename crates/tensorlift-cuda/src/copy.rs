//! Overlapped host-to-device copies from pinned chunks on several streams.
//!
//! Each submitted chunk's copies go on the next stream, followed by an event. A completion
//! thread waits for those events in submission order and only then drops the chunk, which
//! returns it to its pool: the host never reuses a buffer with a copy from it in flight.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cudarc::driver::{sys, CudaEvent, CudaStream};

use crate::error::{check, Call};
use crate::{CudaError, DeviceArena, Gpu, PinnedChunk};

/// One piece of a chunk: `len` bytes at `src_offset` in the chunk go to `dst_offset` in the
/// arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Offset in the pinned chunk.
    pub src_offset: usize,
    /// Offset in the device arena.
    pub dst_offset: usize,
    /// Bytes.
    pub len: usize,
}

type Pending = (CudaEvent, PinnedChunk, Arc<DeviceArena>);

/// Asynchronous copies on `streams` streams with completion tracking.
#[derive(Debug)]
pub struct CopyEngine {
    gpu: Gpu,
    streams: Vec<Arc<CudaStream>>,
    next: usize,
    tx: Option<Sender<Pending>>,
    done: Option<JoinHandle<()>>,
    failure: Arc<Mutex<Option<CudaError>>>,
}

impl CopyEngine {
    /// An engine with `streams` streams (at least one).
    pub fn new(gpu: &Gpu, streams: usize) -> Result<CopyEngine, CudaError> {
        let streams = (0..streams.max(1)).map(|_| gpu.new_stream()).collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel();
        let failure = Arc::new(Mutex::new(None));
        let f = Arc::clone(&failure);
        let g = gpu.clone();
        let done = std::thread::Builder::new()
            .name("tensorlift-cuda-done".into())
            .spawn(move || complete(&g, &rx, &f))
            .map_err(|_| CudaError::OutOfMemory { what: "a completion thread", bytes: 0 })?;
        Ok(CopyEngine { gpu: gpu.clone(), streams, next: 0, tx: Some(tx), done: Some(done), failure })
    }

    /// Queues the copies of `pieces` from `chunk` into `arena`, and takes the chunk until they
    /// have completed. Never waits for the device.
    pub fn copy(&mut self, chunk: PinnedChunk, arena: &Arc<DeviceArena>, pieces: &[Piece]) -> Result<(), CudaError> {
        if let Some(e) = self.failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        let cap = chunk.as_slice().len();
        for p in pieces {
            let src_ok = p.src_offset.checked_add(p.len).is_some_and(|e| e <= cap);
            let dst_ok = p.dst_offset.checked_add(p.len).is_some_and(|e| e <= arena.len());
            if !src_ok || !dst_ok {
                return Err(CudaError::OutOfBounds {
                    what: if src_ok { "device arena" } else { "pinned chunk" },
                    len: p.len,
                });
            }
        }
        let stream = Arc::clone(&self.streams[self.next % self.streams.len()]);
        self.next = self.next.wrapping_add(1);
        self.gpu.bind()?;
        for p in pieces.iter().filter(|p| p.len > 0) {
            // SAFETY: src_offset + len <= the chunk's capacity was checked above.
            let src = unsafe { chunk.ptr().add(p.src_offset) };
            // SAFETY: both ranges were checked against the chunk and the arena; the chunk is
            // page-locked (registered) memory that this engine keeps, unmoved and untouched,
            // until the event recorded after this copy completes; the arena is kept alive
            // alongside it.
            let r = unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    arena.device_ptr() + p.dst_offset as u64,
                    src.cast(),
                    p.len,
                    stream.cu_stream(),
                )
            };
            check(r, "cuMemcpyHtoDAsync")?;
        }
        let event =
            self.gpu.context().new_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC)).call("cuEventCreate")?;
        event.record(&stream).call("cuEventRecord")?;
        match &self.tx {
            Some(tx) => tx
                .send((event, chunk, Arc::clone(arena)))
                .map_err(|_| CudaError::Unavailable("the completion thread stopped".into())),
            None => Err(CudaError::Unavailable("the copy engine is shut down".into())),
        }
    }

    /// Waits until every queued copy has completed; reports the first failure.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        for s in &self.streams {
            s.synchronize().call("cuStreamSynchronize")?;
        }
        match self.failure.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        // Drain: the completion thread releases every chunk once its copies are done.
        self.tx.take();
        if let Some(t) = self.done.take() {
            let _ = t.join();
        }
    }
}

fn complete(gpu: &Gpu, rx: &Receiver<Pending>, failure: &Mutex<Option<CudaError>>) {
    let _ = gpu.bind();
    for (event, chunk, arena) in rx {
        if let Err(source) = event.synchronize() {
            if let Ok(mut f) = failure.lock() {
                f.get_or_insert(CudaError::Driver { call: "cuEventSynchronize", source });
            }
        }
        drop((chunk, arena));
    }
}
