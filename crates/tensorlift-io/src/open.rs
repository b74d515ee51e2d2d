//! Opening a checkpoint: a local one by `checkpoint`, a remote one (`s3://`, `gs://`,
//! `az://`, `http(s)://`) by `remote_plan`.

use std::path::Path;

use tensorlift_format::FormatError;

use crate::checkpoint::{open_local, Checkpoint, PlanLimits, PlanObserver, Quiet};

/// Resolves `path` (a `.safetensors` file, an index JSON file, or a folder; or the URL of
/// one in object storage or behind HTTP) into a plan, reading only headers. A folder uses
/// its `model.safetensors.index.json` when present, else every `*.safetensors` file in it
/// in natural order.
pub fn open_checkpoint(path: &Path, limits: &PlanLimits) -> Result<Checkpoint, FormatError> {
    open_checkpoint_observed(path, limits, &Quiet)
}

/// [`open_checkpoint`], telling `observer` when every header has been read and as each is
/// validated, so that a load can start reading a shard while the rest are planned. Headers
/// are all read first (one after another, within the header budget), then parsed on up to
/// one thread per CPU, then checked across shards. (A remote checkpoint's planning only asks
/// the observer whether it is [cancelled](PlanObserver::cancelled), and then drops its
/// requests in flight: its load waits for the whole plan.)
pub fn open_checkpoint_observed(
    path: &Path,
    limits: &PlanLimits,
    observer: &dyn PlanObserver,
) -> Result<Checkpoint, FormatError> {
    if crate::remote::is_remote(path) {
        return crate::remote_plan::open_remote(path, limits, observer);
    }
    open_local(path, limits, observer)
}
