//! From a URL to an `object_store` store, configured from the environment, and the objects
//! of a plan.

use crate::process::MadeIn;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::client::ClientConfigKey;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreScheme, RetryConfig};

use super::meta::modified_ns;
use super::options::RemoteOptions;

/// A remote folder (or the folder of a remote file): the store, and where in it.
#[derive(Debug, Clone)]
pub(crate) struct Place {
    pub(crate) shared: Arc<Shared>,
    /// The folder's location in the store (empty for a bucket's root).
    pub(crate) prefix: ObjectPath,
    /// The folder's URL, without a trailing `/`: errors name objects by it.
    pub(crate) url: String,
    /// Whether the store is a plain HTTP server (which cannot list a folder).
    pub(crate) http: bool,
}

impl Place {
    /// An error where `name`, a shard's name from an index, could name something outside
    /// this folder on a plain HTTP server, which may read more into a path than its parts:
    /// `..;` (a path parameter, to Tomcat and Spring), `..\\` (a separator, to IIS) or
    /// `%2e%2e` decoded twice. (The object stores encode every such character.)
    pub(crate) fn check_indexed(&self, name: &str) -> Result<(), io::Error> {
        match name.chars().find(|c| matches!(c, '\\' | ';' | '%' | '?' | '#' | ':')) {
            Some(c) if self.http => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not read over HTTP: a server could read its '{c}' as more than a name"),
            )),
            _ => Ok(()),
        }
    }

    /// The location and URL of `name` (a relative name, already checked) in this folder.
    pub(crate) fn child(&self, name: &str) -> Result<(ObjectPath, PathBuf), io::Error> {
        let joined = match self.prefix.as_ref() {
            "" => name.to_owned(),
            p => format!("{p}/{name}"),
        };
        let location = ObjectPath::parse(&joined)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("'{name}' is not an object name: {e}")))?;
        Ok((location, PathBuf::from(format!("{}/{name}", self.url))))
    }

    /// The folder `name` (a relative name) inside this one.
    pub(crate) fn folder(&self, name: &str) -> Result<Place, io::Error> {
        let (prefix, url) = self.child(name)?;
        Ok(Place { prefix, url: url.to_string_lossy().into_owned(), ..self.clone() })
    }
}

/// Connects to the store of `url` and splits it into the store's folder and the last part
/// of its path (`None` where the URL ends with `/` or names a bucket alone).
pub(crate) fn connect(url: &str, options: &RemoteOptions) -> Result<(Place, Option<String>), io::Error> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_owned());
    let parsed = url::Url::parse(url).map_err(|e| invalid(&format!("not a URL: {e}")))?;
    // What a URL could carry beyond the object's place is refused rather than dropped: a
    // query (a signed URL's) would be lost on the way to the store, and credentials would
    // be printed in every error that names an object.
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("a query string or fragment is not read: settings come from the environment"));
    }
    // (Azure Data Lake's `abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/` names its
    // container where a user would be: a name, not a credential.)
    let container_as_user = matches!(parsed.scheme(), "abfs" | "abfss") && parsed.password().is_none();
    if (!parsed.username().is_empty() && !container_as_user) || parsed.password().is_some() {
        return Err(invalid("credentials in a URL are refused: give them in the environment (AWS_ACCESS_KEY_ID, ...)"));
    }
    let (scheme, path) = ObjectStoreScheme::parse(&parsed)
        .map_err(|e| invalid(&format!("not a URL of a store tensorlift reads: {e}")))?;
    let http = scheme == ObjectStoreScheme::Http;
    let cache_key = super::cache::store_key(&parsed, &path);
    let store = build(scheme, &parsed, options)?;
    // The path's parts as the store spells them (already encoded: joined, not encoded again).
    let mut parts: Vec<String> = path.parts().map(|p| p.as_ref().to_owned()).collect();
    let last = if parsed.path().ends_with('/') { None } else { parts.pop() };
    let prefix = ObjectPath::parse(parts.join("/")).map_err(|e| invalid(&format!("not an object path: {e}")))?;
    let mut folder = parsed;
    if last.is_some() {
        if let Ok(mut segments) = folder.path_segments_mut() {
            segments.pop();
        }
    }
    let permits = tokio::sync::Semaphore::new(options.concurrency.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
    let shared = Arc::new(Shared {
        store,
        options: options.clone(),
        permits,
        cache_key,
        made: MadeIn::here(),
        settle_by: std::sync::Mutex::new(None),
    });
    Ok((Place { shared, prefix, url: folder.as_str().trim_end_matches('/').to_owned(), http }, last))
}

/// Refuses the first of `values` (a setting's value from the environment, and the variable
/// it came from) for which `unfit` holds, naming the variable and `what` is wrong with it,
/// never the value.
fn refuse_setting(
    values: impl IntoIterator<Item = (Option<String>, &'static str)>,
    unfit: fn(&str) -> bool,
    what: &str,
) -> Result<(), io::Error> {
    match values.into_iter().find(|(v, _)| v.as_deref().is_some_and(unfit)) {
        Some((_, name)) => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name} holds {what}"))),
        None => Ok(()),
    }
}

/// What an HTTP header cannot hold: a control character but tab (what `http`'s
/// `HeaderValue::from_str` refuses). The stores' request signers put credentials in headers
/// and panic on one (a secret made from a file often ends in a newline).
fn unheadable(v: &str) -> bool {
    v.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

const UNHEADABLE: &str = "a control character (a trailing newline?), which no HTTP header may hold";

/// An endpoint's URL that carries more than a place: a user, a password, a query or a
/// fragment (an `@` in a URL's path is a place's). Stores sign their requests with
/// credentials of their own variables, and the endpoint's URL is printed whole in every
/// error the store's client reports: what such a URL carries (a password, a signed query)
/// would be printed with it.
fn carries_secret(v: &str) -> bool {
    match url::Url::parse(v) {
        Ok(u) => !u.username().is_empty() || u.password().is_some() || u.query().is_some() || u.fragment().is_some(),
        // Not a URL, which the store's error would print as it is: refused if it could be
        // one of those.
        Err(_) => v.contains(['@', '?', '#']),
    }
}

const SECRET: &str = "a user, password, query or fragment ('@', '?' or '#'): an endpoint is a scheme, host, port \
                      and path, and credentials go in their own variables";

/// The store for `scheme`, with the provider's configuration from the environment and this
/// crate's retry and timeout options on top.
fn build(scheme: ObjectStoreScheme, url: &url::Url, o: &RemoteOptions) -> Result<Arc<dyn ObjectStore>, io::Error> {
    let retry = RetryConfig {
        max_retries: o.retries,
        retry_timeout: o.retry_window,
        backoff: object_store::BackoffConfig::default(),
    };
    let timeout = format!("{}ms", o.timeout.as_millis().max(1));
    let connect = format!("{}ms", (o.timeout.as_millis() / 10).max(1));
    let text = url.as_str();
    // The cloud stores' builders share these steps (and nothing else: no trait of theirs).
    use super::bounded::{Bounded, WeakEtag};
    macro_rules! cloud {
        ($builder:expr, $key:path, $weak:expr) => {
            Arc::new(
                $builder
                    .with_http_connector(Bounded { weak_etag: $weak })
                    .with_url(text)
                    .with_retry(retry)
                    .with_config($key(ClientConfigKey::Timeout), timeout)
                    .with_config($key(ClientConfigKey::ConnectTimeout), connect)
                    .build()
                    .map_err(store_error)?,
            )
        };
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let env = AmazonS3Builder::from_env();
            let settings = |keys: &[(AmazonS3ConfigKey, &'static str)]| {
                keys.iter().map(|(key, name)| (env.get_config_value(key), *name)).collect::<Vec<_>>()
            };
            let credentials = settings(&[
                (AmazonS3ConfigKey::AccessKeyId, "AWS_ACCESS_KEY_ID"),
                (AmazonS3ConfigKey::Token, "AWS_SESSION_TOKEN"),
                (AmazonS3ConfigKey::Region, "AWS_REGION"),
                (AmazonS3ConfigKey::DefaultRegion, "AWS_DEFAULT_REGION"),
            ]);
            refuse_setting(credentials, unheadable, UNHEADABLE)?;
            let endpoints = settings(&[
                (AmazonS3ConfigKey::Endpoint, "AWS_ENDPOINT_URL (or AWS_ENDPOINT)"),
                (AmazonS3ConfigKey::S3Endpoint, "AWS_ENDPOINT_URL_S3"),
                (AmazonS3ConfigKey::StsEndpoint, "AWS_ENDPOINT_URL_STS"),
                (AmazonS3ConfigKey::MetadataEndpoint, "AWS_METADATA_ENDPOINT"),
            ]);
            refuse_setting(endpoints, carries_secret, SECRET)?;
            cloud!(env, AmazonS3ConfigKey::Client, WeakEtag::Drop)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let env = GoogleCloudStorageBuilder::from_env();
            refuse_setting(
                [(env.get_config_value(&GoogleConfigKey::BaseUrl), "GOOGLE_BASE_URL")],
                carries_secret,
                SECRET,
            )?;
            cloud!(env, GoogleConfigKey::Client, WeakEtag::Refuse)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let env = MicrosoftAzureBuilder::from_env();
            refuse_setting(
                [(env.get_config_value(&AzureConfigKey::Token), "AZURE_STORAGE_TOKEN")],
                unheadable,
                UNHEADABLE,
            )?;
            let endpoints = [
                (env.get_config_value(&AzureConfigKey::Endpoint), "AZURE_STORAGE_ENDPOINT (or AZURE_ENDPOINT)"),
                (env.get_config_value(&AzureConfigKey::MsiEndpoint), "AZURE_MSI_ENDPOINT"),
            ];
            refuse_setting(endpoints, carries_secret, SECRET)?;
            cloud!(env, object_store::azure::AzureConfigKey::Client, WeakEtag::Refuse)
        }
        ObjectStoreScheme::Http => {
            let base = &url[..url::Position::BeforePath];
            Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_http_connector(Bounded { weak_etag: WeakEtag::Drop })
                    .with_url(base)
                    .with_retry(retry)
                    // The user named an http:// URL: plain HTTP is what they asked for.
                    .with_config(ClientConfigKey::AllowHttp, (url.scheme() == "http").to_string())
                    .with_config(ClientConfigKey::Timeout, timeout)
                    .with_config(ClientConfigKey::ConnectTimeout, connect)
                    .build()
                    .map_err(store_error)?,
            )
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{other:?} URLs are not read remotely (a local file is named by its path)"),
            ))
        }
    };
    Ok(store)
}

/// An `object_store` error as an I/O error that keeps it as its cause, of the kind that fits.
pub(crate) fn store_error(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            io::ErrorKind::PermissionDenied
        }
        object_store::Error::Precondition { .. } => io::ErrorKind::Other,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// One object of a planned remote checkpoint, as planning saw it: a load reads it by ranged
/// GETs that must find the same object (ETag and size).
#[derive(Debug)]
pub struct RemoteObject {
    pub(crate) shared: Arc<Shared>,
    pub(crate) location: ObjectPath,
    url: PathBuf,
    size: u64,
    e_tag: Option<String>,
    /// Seconds and nanoseconds of the last modification, as the store reported it.
    modified_ns: i128,
    /// Its local copy, being written as it is read (see [`super::cache`]).
    pub(crate) cache: Option<Arc<super::cache::CacheFile>>,
}

impl Drop for RemoteObject {
    fn drop(&mut self) {
        // The load is done with the object: its copy is made whole (its last writes land)
        // or given up, so that a copy is never left half made by a process that exits.
        // (Not in a forked child: the copy's writer is the parent's thread.)
        // (A minute for all of a checkpoint's copies together, from the first object let
        // go: not a minute each, one after another, on a slow disk.)
        if let Some(copy) = self.cache.as_ref().filter(|_| self.shared.same_process().is_ok()) {
            let now = std::time::Instant::now();
            let by = *self
                .shared
                .settle_by
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get_or_insert(now + std::time::Duration::from_secs(60));
            copy.settle(by.saturating_duration_since(now));
        }
    }
}

impl RemoteObject {
    pub(crate) fn new(shared: Arc<Shared>, location: ObjectPath, url: PathBuf, meta: &ObjectMeta) -> Self {
        // A copy is made where the options name a cache folder.
        let cache = shared.options.cache_dir.as_ref().and_then(|root| {
            let local = super::cache::local_path(root, &shared.cache_key, &location)?;
            let note = super::cache::Note::of(url.to_str()?, meta);
            super::cache::CacheFile::create(root, local, note).map(Arc::new)
        });
        let mut object = Self::uncached(shared, location, url, meta);
        object.cache = cache;
        object
    }

    /// An object of which no local copy is made: a PyTorch file, whose tensors need not
    /// cover every byte, so that a copy made as a load reads it would never be whole (and
    /// whose local copy the next load could not plan from).
    pub(crate) fn uncached(shared: Arc<Shared>, location: ObjectPath, url: PathBuf, meta: &ObjectMeta) -> Self {
        let (size, e_tag) = (meta.size, meta.e_tag.clone());
        RemoteObject { shared, location, url, size, e_tag, modified_ns: modified_ns(meta), cache: None }
    }

    /// Its URL, which names it in errors.
    pub fn url(&self) -> &Path {
        &self.url
    }

    /// Its length in bytes when planned.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether it was empty when planned.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Its ETag when planned, if the store gives one.
    pub fn e_tag(&self) -> Option<&str> {
        self.e_tag.as_deref()
    }

    /// When it was last modified, in nanoseconds since the epoch, as the store said.
    pub fn modified_ns(&self) -> i128 {
        self.modified_ns
    }

    /// How it is read (part size, concurrency, retries).
    pub fn options(&self) -> &RemoteOptions {
        &self.shared.options
    }

    /// What differs between `meta` (a later reply) and the object as planned, if anything: its
    /// length, its ETag (one that is gone counts as changed), or, where it had no ETag, its
    /// modification time.
    pub(crate) fn change(&self, meta: &ObjectMeta) -> Option<String> {
        if meta.size != self.size {
            return Some(format!("its length is now {} bytes, not {}", meta.size, self.size));
        }
        match (&self.e_tag, &meta.e_tag) {
            (Some(was), Some(now)) if was != now => Some(format!("its ETag is now {now}, not {was}")),
            (Some(was), None) => Some(format!("the reply has no ETag, where it was {was}")),
            (None, Some(now)) => Some(format!("it has an ETag now ({now}), and had none")),
            _ if modified_ns(meta) != self.modified_ns => Some("its modification time moved".to_owned()),
            _ => None,
        }
    }

    /// The ETag to ask for with `If-Match`: a strong one. (The HTTP client drops weak ETags,
    /// which cannot tell bytes apart, before `object_store` sees them: see
    /// `bounded::drop_weak_etag`. One would never match there.)
    pub(crate) fn if_match(&self) -> Option<String> {
        self.e_tag.as_ref().filter(|t| !t.starts_with("W/")).cloned()
    }
}

/// What every object of one remote checkpoint shares: its store, its options, and the bound
/// on its requests in flight.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn object_store::ObjectStore>,
    pub(crate) options: RemoteOptions,
    pub(crate) permits: tokio::sync::Semaphore,
    /// The folder of this store's copies in a cache folder ([`super::cache::store_key`]).
    pub(crate) cache_key: String,
    /// The process that connected: its connections (and the permits its requests hold)
    /// are that process's, which a forked child must not use.
    pub(crate) made: MadeIn,
    /// When the load's copies being written must be whole, set as the first object is let
    /// go (see `RemoteObject`'s drop).
    pub(crate) settle_by: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Shared {
    /// The store as it displays itself (its kind and place), never as its `Debug` would
    /// show it: some stores' credentials (an Azure account key or SAS token, a Google
    /// bearer token) print their secrets there.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &format_args!("{}", self.store))
            .field("options", &self.options)
            .field("cache_key", &self.cache_key)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// An error where this is a process forked from the one that planned the checkpoint
    /// (its pooled connections are the parent's sockets, its permits may be held by the
    /// parent's requests): such a child plans the checkpoint again.
    pub(crate) fn same_process(&self) -> Result<(), io::Error> {
        match self.made.elsewhere() {
            false => Ok(()),
            true => Err(io::Error::other(
                "a remote checkpoint planned before a fork is not read in the forked process (its connections are \
                 the parent's): plan or open it again there",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plans_debug_shows_no_store_credentials() {
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account("account")
            .with_container_name("container")
            .with_access_key("U0VDUkVUS0VZU0VDUkVUS0VZ")
            .build()
            .unwrap();
        // What Debug of the store itself would show, which is why Shared does not use it.
        assert!(format!("{store:?}").contains("U0VDUkVUS0VZ") || format!("{store:?}").contains("83, 69, 67"));
        let shared = Shared {
            store: Arc::new(store),
            options: RemoteOptions::default(),
            permits: tokio::sync::Semaphore::new(1),
            cache_key: "key".into(),
            made: MadeIn::here(),
            settle_by: std::sync::Mutex::new(None),
        };
        let shown = format!("{shared:?}");
        assert!(shown.contains("MicrosoftAzure") && shown.contains("account"), "{shown}");
        assert!(!shown.contains("U0VDUkVUS0VZ") && !shown.contains("83, 69, 67"), "{shown}");
    }
}
