//! Checkpoints in object storage and behind HTTP: `s3://`, `gs://`, `az://` (and
//! `abfs://`), `http://` and `https://`.
//!
//! A remote checkpoint is planned like a local one (by `remote_plan`, which
//! [`open_checkpoint`](crate::open_checkpoint) sends such a path to): its index, or the `*.safetensors` objects under the prefix (else
//! its PyTorch files), then each shard's header by ranged GETs (the first 64 KiB at once,
//! then the rest where the header is longer; a PyTorch file's zip directory, record headers
//! and pickle by as many as the pickle reader asks for, bounded), validated by the same
//! parser under the same [`PlanLimits`](crate::PlanLimits). A load then reads each shard's byte ranges by
//! concurrent ranged GETs ([`read_object`]) whose bodies are written straight into the
//! buffers the load lends: its final host memory, or its pinned staging chunks.
//!
//! Every request goes through `object_store` (arrow-rs) and its stores, configured from the
//! environment as each provider's own tools are (`AWS_*`, `GOOGLE_*`, `AZURE_*`), with its
//! retries (backoff on 5xx, throttling, timeouts and dropped connections, a body that breaks
//! off resumed where it stopped); the options here ([`RemoteOptions`]) set how many and how
//! long. Each GET names the ETag the plan saw (`If-Match`) and checks the object's size, so
//! an object replaced during a load fails it ([`IoError::Changed`](crate::IoError::Changed)).
//! The requests run on one small runtime of this crate's own, so that callers need none.
//!
//! Every store's HTTP client bounds what a server sends before `object_store` reads it
//! (`bounded`): error bodies, listing pages, how many pages.
//!
//! The modules here import one way: `options`, `meta`, `runtime` and `bounded` import
//! nothing of the others; `cache` imports `meta`; `store` imports those; `get` and `read` import `store`;
//! and planning (`crate::remote_plan`, beside `crate::checkpoint`) imports them all.

pub(crate) mod bounded;
pub(crate) mod cache;
pub(crate) mod get;
pub(crate) mod meta;
pub(crate) mod options;
pub(crate) mod read;
pub(crate) mod runtime;
pub(crate) mod store;

use std::borrow::Cow;
use std::path::Path;

pub use options::{RemoteOptions, MIN_PART_SIZE};
pub use read::{fetch_discarding, read_object};
pub use store::RemoteObject;

/// Schemes read through object storage.
const SCHEMES: [&str; 8] = ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://", "http://", "https://"];

/// Whether `path` is the URL of a remote checkpoint (by its scheme: `s3://`, `s3a://`,
/// `gs://`, `az://`, `abfs://`, `abfss://`, `http://`, `https://`) rather than a local path.
/// A local folder whose name begins so is reached as `./s3:/...`.
pub fn is_remote(path: &Path) -> bool {
    path.to_str().is_some_and(|p| {
        let lower = p.get(..8).unwrap_or(p).to_ascii_lowercase();
        SCHEMES.iter().any(|s| lower.starts_with(s))
    })
}

/// `path` as it may be printed: for the URL of a remote checkpoint, without what could be a
/// credential (a user and password, a query string such as a signed URL's or a SAS token,
/// a fragment), each replaced by `REDACTED`; anything else as it is. Such URLs are refused,
/// and the refusal, logs and reports name them through this.
pub fn redact_url(path: &Path) -> Cow<'_, Path> {
    let Some(text) = path.to_str().filter(|_| is_remote(path)) else { return Cow::Borrowed(path) };
    let Ok(mut url) = url::Url::parse(text) else {
        // Not parsed, so not split: nothing after the scheme is shown.
        let scheme = text.split("://").next().unwrap_or("");
        return Cow::Owned(format!("{scheme}://REDACTED (not a URL)").into());
    };
    // (Azure Data Lake's `abfss://CONTAINER@ACCOUNT...` names its container where a user
    // would be: a name, kept.)
    let container_as_user = matches!(url.scheme(), "abfs" | "abfss") && url.password().is_none();
    let mut changed = false;
    if url.password().is_some() {
        changed |= url.set_password(Some("REDACTED")).is_ok();
    }
    if !url.username().is_empty() && !container_as_user {
        changed |= url.set_username("REDACTED").is_ok();
    }
    if url.query().is_some() {
        url.set_query(Some("REDACTED"));
        changed = true;
    }
    if url.fragment().is_some() {
        url.set_fragment(Some("REDACTED"));
        changed = true;
    }
    if changed {
        Cow::Owned(url.as_str().into())
    } else {
        Cow::Borrowed(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted_and_places_kept() {
        let r = |s: &str| redact_url(Path::new(s)).to_str().unwrap().to_owned();
        assert_eq!(r("https://user:TOKEN@host/m/"), "https://REDACTED:REDACTED@host/m/");
        assert_eq!(r("https://:TOKEN@host/m/"), "https://:REDACTED@host/m/");
        assert_eq!(
            r("https://acct.blob.core.windows.net/c/m.safetensors?sv=1&sig=SECRET"),
            "https://acct.blob.core.windows.net/c/m.safetensors?REDACTED"
        );
        assert_eq!(r("s3://bucket/m#SECRET"), "s3://bucket/m#REDACTED");
        assert_eq!(r("abfss://container@acct.dfs.core.windows.net/m"), "abfss://container@acct.dfs.core.windows.net/m");
        assert_eq!(
            r("abfss://container:SECRET@acct.dfs.core.windows.net/m"),
            "abfss://REDACTED:REDACTED@acct.dfs.core.windows.net/m"
        );
        assert_eq!(r("s3://bucket/model/"), "s3://bucket/model/");
        assert_eq!(r("/local/path?sig=x"), "/local/path?sig=x");
        assert_eq!(r("https://user:SECRET@[bad/x"), "https://REDACTED (not a URL)");
    }
}
