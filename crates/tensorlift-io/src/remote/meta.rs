//! What planning and the cache keep of an object's metadata.

use object_store::ObjectMeta;
use tensorlift_format::FileIdentity;

/// When `meta`'s object was last modified, in nanoseconds since the epoch.
pub(crate) fn modified_ns(meta: &ObjectMeta) -> i128 {
    i128::from(meta.last_modified.timestamp()) * 1_000_000_000 + i128::from(meta.last_modified.timestamp_subsec_nanos())
}

/// An object's identity as a plan keeps it: its length and modification time; its ETag's
/// hash stands for the inode.
pub(crate) fn identity(meta: &ObjectMeta) -> FileIdentity {
    let ns = modified_ns(meta);
    let tag = meta.e_tag.as_deref().map_or(0, |t| tensorlift_format::header_hash(t.as_bytes()));
    FileIdentity { dev: 0, ino: tag, len: meta.size, modified_ns: ns, changed_ns: ns }
}
