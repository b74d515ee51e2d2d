//! Whole objects and bounded reply bodies: an index, a `SHA256SUMS`, a header's bytes.

use std::io;
use std::path::Path;

use futures_util::StreamExt;
use object_store::GetOptions;
use tensorlift_format::{FileIdentity, FormatError};

use super::meta::identity;
use super::runtime::{run_until, Deadline};
use super::store::{store_error, Place};

/// A reply's body, which must be exactly `len` bytes: read as it comes, into memory
/// reserved fallibly, and refused as soon as it runs past `len` (a server's `Content-Length`
/// is not trusted to bound it).
pub(crate) async fn body(reply: object_store::GetResult, len: u64, url: &Path) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    body_into(reply, len, url, &mut out).await?;
    Ok(out)
}

/// [`body`], appended to `out` (memory for it reserved there, fallibly).
pub(crate) async fn body_into(
    reply: object_store::GetResult,
    len: u64,
    url: &Path,
    out: &mut Vec<u8>,
) -> Result<(), FormatError> {
    let io_err = |source| FormatError::Io { file: url.to_path_buf(), source };
    out.try_reserve_exact(len as usize).map_err(|_| FormatError::OutOfMemory {
        file: url.to_path_buf(),
        what: "a reply",
        bytes: len,
    })?;
    if len == 0 {
        // Nothing to read, so the body is not polled: a body that fails is resumed by
        // `object_store` from where it stopped, and a resume of an empty range underflows
        // there (`0..0` asked as `bytes=0-{0 - 1}`). (Over HTTP/2, where a reply may say
        // `content-length: 0` and still send a frame; HTTP/1.1's client drops the length of
        // a chunked reply, which object_store then refuses.)
        return Ok(());
    }
    let end = out.len() as u64 + len;
    let mut stream = reply.into_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| io_err(store_error(e)))?;
        if (out.len() + chunk.len()) as u64 > end {
            return Err(io_err(io::Error::new(io::ErrorKind::InvalidData, "the server sent more than it was asked")));
        }
        out.extend_from_slice(&chunk);
    }
    if out.len() as u64 != end {
        return Err(io_err(io::Error::new(io::ErrorKind::UnexpectedEof, "the reply is not the range asked for")));
    }
    Ok(())
}

/// `name` under the folder, read whole if it is at most `max` bytes; `None` if absent.
async fn fetch_file(place: &Place, name: &str, max: u64) -> io::Result<Option<(Vec<u8>, FileIdentity)>> {
    let (location, url) = place.child(name)?;
    let reply = match place.shared.store.get_opts(&location, GetOptions::default()).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(store_error(e)),
    };
    if reply.meta.size > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {} bytes, more than the {max} read", url.display(), reply.meta.size),
        ));
    }
    let id = identity(&reply.meta);
    let bytes = body(reply, id.len, &url).await.map_err(|e| io::Error::other(e.to_string()))?;
    Ok(Some((bytes, id)))
}

/// A remote checkpoint's folder, for the files beside its shards (a `SHA256SUMS`).
#[derive(Debug)]
pub(crate) struct RemoteFolder {
    pub(crate) place: Place,
}

impl RemoteFolder {
    /// `name` under the folder, whole, if it is at most `max` bytes; `None` if absent.
    /// Given up (`Interrupted`) once `cancelled` says nobody waits for it, or (`TimedOut`)
    /// past the options' `plan_timeout`, its requests dropped.
    pub(crate) fn fetch(
        &self,
        name: &str,
        max: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> std::io::Result<Option<(Vec<u8>, tensorlift_format::FileIdentity)>> {
        self.place.shared.same_process()?;
        let place = self.place.clone();
        let name = name.to_owned();
        let deadline = Deadline::plan_timeout(self.place.shared.options.plan_timeout, &format!("fetching {name}"));
        run_until(async move { fetch_file(&place, &name, max).await }, cancelled, &deadline)?
    }
}
