//! Byte ranges of remote objects into the buffers a load lends, by concurrent ranged GETs.

use std::io;
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange};
use tokio::sync::oneshot;

use super::runtime::runtime;
use super::store::RemoteObject;
use crate::op::SendPtr;
use crate::{IoBufMut, IoError, ReadFailed, ReadFuture};

/// Reads `len` bytes at `offset` of `object` into `buf[buf_offset..]`, taking the buffer and
/// handing it back when done, as [`Reader::read`](crate::Reader::read) does for a file.
///
/// The range is cut into parts of [`RemoteOptions::part_size`](super::RemoteOptions::part_size)
/// bytes, fetched at once by ranged GETs (at most
/// [`concurrency`](super::RemoteOptions::concurrency) in flight per checkpoint), each body
/// written straight into its place in the buffer. Each GET asks for the ETag planning saw and
/// checks the object's length: an object replaced or cut since is
/// [`IoError::Changed`]. A range past the end of the object as planned is an error at once.
/// Dropping the future cancels the requests still in flight; the
/// buffer is dropped once they have let go of it.
pub fn read_object<B: IoBufMut>(
    object: &Arc<RemoteObject>,
    offset: u64,
    buf: B,
    buf_offset: usize,
    len: usize,
) -> ReadFuture<B> {
    let url = object.url().to_path_buf();
    let mut buf = match crate::reader::admit(&url, buf, buf_offset, len) {
        Ok(buf) => buf,
        Err(done) => return done,
    };
    // A range past the object's end is no GET's: refused here, with the buffer handed back.
    if offset.checked_add(len as u64).is_none_or(|end| end > object.len()) {
        let source = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at {offset} run past the end of the {}-byte object", object.len()),
        );
        let error = IoError::Read { file: url, offset, len: len as u64, source };
        return ReadFuture::ready(Err(ReadFailed { error, buf: Some(buf) }));
    }
    if !buf.ready_for_cpu_writes() {
        let source = io::Error::new(io::ErrorKind::OutOfMemory, "the kernel could not make the buffer's pages present");
        let error = IoError::Read { file: url, offset, len: len as u64, source };
        return ReadFuture::ready(Err(ReadFailed { error, buf: Some(buf) }));
    }
    let runtime = match object.shared.same_process().and_then(|()| runtime()) {
        Ok(rt) => rt,
        Err(source) => {
            let error = IoError::Read { file: url, offset, len: len as u64, source };
            return ReadFuture::ready(Err(ReadFailed { error, buf: Some(buf) }));
        }
    };
    // SAFETY: buf_offset + len <= capacity was checked above.
    let dst = SendPtr(unsafe { buf.stable_mut_ptr().add(buf_offset) });
    let (mut tx, rx) = oneshot::channel();
    let object = Arc::clone(object);
    runtime.spawn(async move {
        // The buffer moved here with the task: `dst` stays valid (an `IoBufMut`'s bytes do not
        // move with it) until the task hands it back below.
        let result = tokio::select! {
            r = fill(&object, offset, dst, len) => r,
            // Nobody waits for the bytes: the GETs in flight are dropped, which closes their
            // connections.
            () = tx.closed() => Err(IoError::Read {
                file: object.url().to_path_buf(),
                offset,
                len: len as u64,
                source: io::Error::new(io::ErrorKind::Interrupted, "the read was dropped"),
            }),
        };
        // The task lets go of the object before the load hears back: the load's own drop of
        // it is the last, on the load's thread, where a copy being cached is settled.
        drop(object);
        let _ = tx.send(match result {
            Ok(()) => Ok(buf),
            Err(error) => Err(ReadFailed { error, buf: Some(buf) }),
        });
    });
    ReadFuture::waiting(rx, url, offset, len as u64)
}

/// Fetches `[offset, offset + len)` into `dst[..len]`, one ranged GET per part, all at once.
async fn fill(object: &RemoteObject, offset: u64, dst: SendPtr, len: usize) -> Result<(), IoError> {
    let part = usize::try_from(object.options().part_size()).unwrap_or(usize::MAX);
    let parts = (0..len).step_by(part).map(|start| {
        // SAFETY: start < len, and `dst` is valid for `len` bytes.
        let at = SendPtr(unsafe { dst.0.add(start) });
        fetch(object, offset + start as u64, at, part.min(len - start))
    });
    futures_util::future::try_join_all(parts).await.map(|_| ())
}

/// One ranged GET of `len` bytes at `offset`, its body written to `dst[..len]`.
async fn fetch(object: &RemoteObject, offset: u64, dst: SendPtr, len: usize) -> Result<(), IoError> {
    fetch_with(object, offset, len, move |done, bytes| {
        let dst = dst;
        // SAFETY: done < len here (bytes is not empty, or it is a no-op at done <= len), and
        // `dst` is valid for `len` bytes.
        let at = unsafe { dst.0.add(done) };
        // SAFETY: done + bytes.len() <= len (`fetch_with` checks it first); `dst`'s buffer is
        // owned by this read's task until it completes, and no other part writes this part's
        // bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
        if let Some(copy) = &object.cache {
            copy.write(offset + done as u64, bytes.clone());
        }
    })
    .await
}

/// One ranged GET of `len` bytes at `offset`, each piece of its body handed to `land` with
/// the bytes before it, in order, never past `len`: the GET names the ETag planning saw,
/// and a reply from a changed object, for another range, or longer or shorter than asked
/// is an error.
async fn fetch_with(
    object: &RemoteObject,
    offset: u64,
    len: usize,
    mut land: impl FnMut(usize, &bytes::Bytes),
) -> Result<(), IoError> {
    let file = || object.url().to_path_buf();
    let range = offset..offset + len as u64;
    // The semaphore is never closed.
    let _permit = object.shared.permits.acquire().await;
    let options = GetOptions {
        range: Some(GetRange::Bounded(range.clone())),
        if_match: object.if_match(),
        ..GetOptions::default()
    };
    let reply =
        object.shared.store.get_opts(&object.location, options).await.map_err(|e| request_error(object, &range, e))?;
    if let Some(what) = object.change(&reply.meta) {
        let what = format!("{what} (changed during the load; at the GET of bytes {}..{})", range.start, range.end);
        return Err(IoError::Changed { file: file(), what });
    }
    if reply.range != range {
        let at = reply.range.end.min(range.end);
        return Err(IoError::UnexpectedEof { file: file(), offset, len: len as u64, at });
    }
    let mut body = reply.into_stream();
    let mut done = 0usize;
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|e| request_error(object, &range, e))?;
        if bytes.len() > len - done {
            return Err(IoError::Read {
                file: file(),
                offset,
                len: len as u64,
                source: io::Error::new(io::ErrorKind::InvalidData, "the server sent more bytes than the range asked"),
            });
        }
        land(done, &bytes);
        done += bytes.len();
    }
    if done != len {
        return Err(IoError::UnexpectedEof { file: file(), offset, len: len as u64, at: offset + done as u64 });
    }
    Ok(())
}

/// A failed request (after the store's retries) as the error that names the object and range.
pub(crate) fn request_error(object: &RemoteObject, range: &std::ops::Range<u64>, e: object_store::Error) -> IoError {
    let file = object.url().to_path_buf();
    match e {
        object_store::Error::Precondition { .. } => IoError::Changed {
            file,
            what: format!(
                "its ETag is no longer {} (replaced during the load; at the GET of bytes {}..{})",
                object.e_tag().unwrap_or("the one planned"),
                range.start,
                range.end
            ),
        },
        object_store::Error::NotFound { .. } => IoError::Changed {
            file,
            what: format!("it was deleted during the load (at the GET of bytes {}..{})", range.start, range.end),
        },
        source => IoError::Remote { file, offset: range.start, len: range.end - range.start, source: Box::new(source) },
    }
}

/// The GET limit of a remote checkpoint: every byte of `objects` fetched by ranged GETs of
/// their part size, at their concurrency (as a load asks for them), counted and dropped,
/// never copied. What `loader-bench` compares a remote load with. Returns the bytes fetched.
pub fn fetch_discarding(objects: &[Arc<RemoteObject>]) -> Result<u64, IoError> {
    let Some(first) = objects.first() else { return Ok(0) };
    let runtime = first.shared.same_process().and_then(|()| runtime()).map_err(|source| IoError::Read {
        file: first.url().to_path_buf(),
        offset: 0,
        len: 0,
        source,
    })?;
    let objects: Vec<Arc<RemoteObject>> = objects.to_vec();
    let task = runtime.spawn(async move {
        // Parts are made as the GETs go (an object may say it is of any length), each GET
        // checked as a load's are, its bytes counted and dropped; the store's permits bound
        // the GETs in flight, and this the parts waiting for one.
        let window = objects.iter().map(|o| o.options().concurrency).max().unwrap_or(1).max(1);
        let parts = objects.into_iter().flat_map(|o| {
            let (part, end) = (o.options().part_size(), o.len());
            let step = usize::try_from(part).unwrap_or(usize::MAX);
            (0..end).step_by(step).map(move |at| (Arc::clone(&o), at, part.min(end - at)))
        });
        futures_util::stream::iter(parts)
            .map(|(o, offset, len)| async move {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                fetch_with(&o, offset, len, |_, _| ()).await.map(|()| len as u64)
            })
            .buffer_unordered(window)
            .try_fold(0u64, |sum, n| async move { Ok(sum.saturating_add(n)) })
            .await
    });
    crate::block_on(task).unwrap_or_else(|e| {
        Err(IoError::Read {
            file: first.url().to_path_buf(),
            offset: 0,
            len: 0,
            source: io::Error::other(e.to_string()),
        })
    })
}
