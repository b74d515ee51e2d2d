//! The HTTP client every store uses: `object_store`'s own (reqwest), with what a server
//! sends bounded before `object_store` reads it.
//!
//! `object_store` reads some replies whole: an error reply's body (for its message), a
//! listing page, a credential. It sizes its buffer by the reply's `Content-Length`, so a
//! hostile or broken server could make one allocation of any size (and abort the process)
//! or send an endless body. Here every reply that is not a ranged GET's data is bounded:
//! - an error reply keeps at most [`ERROR_BODY_MAX`] bytes of its body, as one piece of
//!   valid UTF-8 (its message, which `object_store` reads as text; the rest is dropped with
//!   the connection);
//! - a listing page, or any other reply to a request of another method than GET, may hold
//!   at most [`PAGE_MAX`] bytes, else the request fails;
//! - a GET of a whole object at most [`WHOLE_MAX`]: more than any the planner reads (an
//!   index, a `SHA256SUMS`), whose own bound is its check of the length before it reads
//!   (and a whole GET that breaks off is resumed by `object_store` as a ranged one);
//! - one store makes at most [`LIST_PAGES_MAX`] listing requests, however many pages a
//!   server says follow.
//!
//! A weak `ETag` is removed from an object's reply (see [`drop_weak_etag`]), and a
//! credential's lifetime is bounded (see [`credential_bounded`]).
//!
//! Each bounded body reports no more than its bound as its size, so no buffer is sized past
//! it. Ranged GETs (shard data, headers) are passed through: their lengths are checked
//! against the range asked as they are read, and a `Content-Range` that is no byte range
//! (its end before its start, or past the object's length or any number's) is refused
//! before `object_store` does arithmetic on it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody,
    HttpService, ReqwestConnector,
};

/// The most of an error reply's body that is read (its message: a store's are under 2 KiB).
pub(crate) const ERROR_BODY_MAX: usize = 8 << 10;
/// The most a listing page (or any reply read whole but an object) may hold: a page of
/// 1,000 keys is well under 1 MiB.
pub(crate) const PAGE_MAX: usize = 16 << 20;
/// The most a whole object read without a range may hold: past the largest index the
/// planner accepts (100 MB), which it refuses by its length before reading it.
pub(crate) const WHOLE_MAX: usize = 128 << 20;
/// The most listing requests one store makes: a listing of the most objects a folder may
/// have (100,000) takes 100 pages of 1,000.
pub(crate) const LIST_PAGES_MAX: usize = 1_000;

/// The longest a credential is taken to last, from when it is fetched: longer than any
/// provider's tokens (an hour, at most a day), so it only cuts a server's nonsense.
pub(crate) const CREDENTIAL_TTL_MAX: u64 = 24 * 3600;

/// Makes the bounded client from `object_store`'s own, with the store's options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounded {
    /// What a weak ETag in an object's reply does.
    pub(crate) weak_etag: WeakEtag,
}

/// What a weak ETag in an object's reply does (see [`drop_weak_etag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeakEtag {
    /// It is removed: the object is known by its length and `Last-Modified` (S3, HTTP).
    Drop,
    /// The reply is refused: the store's client requires an ETag of every reply (GCS and
    /// Azure, whose own ETags are strong; a weak one comes from something in between).
    Refuse,
}

impl HttpConnector for Bounded {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(BoundedService { inner, listings: AtomicUsize::new(0), weak_etag: self.weak_etag }))
    }
}

#[derive(Debug)]
struct BoundedService {
    inner: HttpClient,
    /// Listing requests made so far.
    listings: AtomicUsize,
    weak_etag: WeakEtag,
}

/// A reply that went past its bound.
#[derive(Debug, thiserror::Error)]
enum Bound {
    #[error("the server's reply is longer than the {0} bytes read of such a reply")]
    Reply(usize),
    #[error(
        "the server's listing goes on past {LIST_PAGES_MAX} pages (a folder may list at most 100,000 objects): \
         name the index or the file instead"
    )]
    Pages,
    #[error("the server's reply says its bytes are `Content-Range: {0}`, which is no object's byte range")]
    ContentRange(String),
    #[error(
        "the reply's ETag is weak ({0}): it cannot tell two versions' bytes apart, and this store's client needs \
         one that can (something between tensorlift and the store, such as a compressing proxy, may have made it weak)"
    )]
    WeakEtag(String),
    #[error(
        "the credential service's token says it expires at {0} seconds past the epoch, more than a day from now \
         (tensorlift takes a credential to last at most a day)"
    )]
    TokenLifetime(u64),
}

/// Whether a request lists objects (S3 and GCS: `list-type=2`; Azure: `comp=list`).
fn is_listing(req: &HttpRequest) -> bool {
    req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv.starts_with("list-type=") || kv == "comp=list"))
}

impl HttpService for BoundedService {
    // `#[async_trait]`'s signature, written out.
    fn call<'life0, 'async_trait>(
        &'life0 self,
        req: HttpRequest,
    ) -> Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let listing = is_listing(&req);
            if listing && self.listings.fetch_add(1, Ordering::Relaxed) >= LIST_PAGES_MAX {
                return Err(HttpError::new(HttpErrorKind::Decode, Bound::Pages));
            }
            let ranged = req.headers().contains_key("range");
            // (A query does not tell: Azure's SAS credentials ride in every request's.)
            let get = req.method() == "GET" && !listing;
            let head = req.method() == "HEAD";
            let credential = credential_request(&req);
            let mut reply = self.inner.execute(req).await?;
            if let Some(kind) = credential.filter(|_| reply.status().is_success()) {
                let (mut parts, body) = reply.into_parts();
                let body =
                    Capped { inner: body, seen: 0, max: PAGE_MAX, past: Past::Fail, kept: Vec::new(), done: false };
                let body = HttpResponseBody::new(body).bytes().await?;
                let body = match kind {
                    Credential::Json => credential_bounded(body),
                    Credential::Jwt => jwt_checked(body).map_err(|e| HttpError::new(HttpErrorKind::Decode, e))?,
                };
                parts.headers.remove("content-length");
                return Ok(HttpResponse::from_parts(parts, body.into()));
            }
            if (get || head) && reply.status().is_success() {
                match self.weak_etag {
                    WeakEtag::Drop => drop_weak_etag(&mut reply),
                    WeakEtag::Refuse => {
                        if let Some(tag) = weak_etag(&reply) {
                            return Err(HttpError::new(HttpErrorKind::Decode, Bound::WeakEtag(tag)));
                        }
                    }
                }
            }
            let (max, past) = if !reply.status().is_success() {
                (ERROR_BODY_MAX, Past::Cut)
            } else if get && ranged {
                return content_range_checked(reply);
            } else if get {
                (WHOLE_MAX, Past::Fail)
            } else {
                (PAGE_MAX, Past::Fail)
            };
            let (parts, body) = reply.into_parts();
            let body = HttpResponseBody::new(Capped { inner: body, seen: 0, max, past, kept: Vec::new(), done: false });
            Ok(HttpResponse::from_parts(parts, body))
        })
    }
}

/// How a credential reply tells its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    /// A JSON object with `expires_in` or `expires_on`.
    Json,
    /// A bare JWT, whose `exp` claim says it (Azure Fabric's token service).
    Jwt,
}

/// Whether a request asks for a credential, as `object_store`'s providers do, and how its
/// reply tells the credential's lifetime: of a cloud instance's metadata service (GCE's
/// `Metadata-Flavor` header, Azure's `Metadata`), of an OAuth token endpoint (a form POST; a
/// store's own requests never post forms), or of Azure Fabric's token service (its
/// `x-ms-partner-token` header). AWS's credentials give an expiry date, which cannot overflow.
fn credential_request(req: &HttpRequest) -> Option<Credential> {
    let h = req.headers();
    let form = h.get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/x-www-form-urlencoded"));
    if h.contains_key("x-ms-partner-token") {
        Some(Credential::Jwt)
    } else if h.contains_key("metadata-flavor") || h.contains_key("metadata") || (req.method() == "POST" && form) {
        Some(Credential::Json)
    } else {
        None
    }
}

/// A bare JWT reply, refused where its `exp` claim (seconds since the epoch) lies more than
/// [`CREDENTIAL_TTL_MAX`] ahead: `object_store` adds what is left of it to the clock, and a
/// signed token cannot be rewritten. Read as `object_store` reads it (the second of its
/// dot-separated parts, base64url without padding, a JSON object); one it cannot read is its
/// to judge (it takes such a token to last an hour).
fn jwt_checked(body: bytes::Bytes) -> Result<bytes::Bytes, Bound> {
    use base64::Engine as _;
    let exp = std::str::from_utf8(&body)
        .ok()
        .and_then(|token| token.split('.').nth(1))
        .and_then(|payload| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok())
        .and_then(|claims| serde_json::from_slice::<serde_json::Value>(&claims).ok())
        .and_then(|claims| claims.get("exp").and_then(serde_json::Value::as_u64));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match exp {
        Some(exp) if exp > now.saturating_add(CREDENTIAL_TTL_MAX) => Err(Bound::TokenLifetime(exp)),
        _ => Ok(body),
    }
}

/// A credential reply's body with its lifetime bounded by [`CREDENTIAL_TTL_MAX`]:
/// `expires_in` (seconds from now) and `expires_on` (Azure's, seconds since the epoch), a
/// number or a string of digits, each as the reply wrote it. `object_store` adds them to the
/// clock, which panics past its range (`expires_in` of 2^63 seconds): a panic in its task,
/// or an abort in a program built with `panic = "abort"`. Anything else (not JSON, no such
/// field, a value that is no whole number) is left for `object_store` to judge.
fn credential_bounded(body: bytes::Bytes) -> bytes::Bytes {
    use serde_json::Value;
    let Ok(Value::Object(mut reply)) = serde_json::from_slice::<Value>(&body) else { return body };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut changed = false;
    for (field, max) in [("expires_in", CREDENTIAL_TTL_MAX), ("expires_on", now.saturating_add(CREDENTIAL_TTL_MAX))] {
        let Some(value) = reply.get_mut(field) else { continue };
        let past = match value {
            Value::Number(n) => n.as_u64().is_some_and(|n| n > max),
            Value::String(s) => s.parse::<u64>().is_ok_and(|n| n > max),
            _ => false,
        };
        if past {
            *value = if value.is_string() { Value::String(max.to_string()) } else { Value::from(max) };
            changed = true;
        }
    }
    match changed {
        true => serde_json::to_vec(&reply).map_or(body, bytes::Bytes::from),
        false => body,
    }
}

/// Removes a weak `ETag` (`W/"..."`) from an object's reply: it says two versions mean the
/// same, not that their bytes are, so it cannot tell a replaced object's bytes from the
/// planned ones. `object_store` would take it as the object's identity: it resumes a body
/// that broke off with a GET of the rest, accepted when the weak ETag matches (bytes of two
/// versions spliced in one tensor). Without it, the object is known by its length and
/// `Last-Modified` (or refused where it has neither), and a broken body fails its part.
/// (Where the store's client requires an ETag of every reply, the reply is refused instead:
/// see [`WeakEtag`].)
fn drop_weak_etag(reply: &mut HttpResponse) {
    if weak_etag(reply).is_some() {
        reply.headers_mut().remove("etag");
    }
}

/// The reply's ETag, where it is weak.
fn weak_etag(reply: &HttpResponse) -> Option<String> {
    let tag = reply.headers().get("etag")?;
    tag.as_bytes().starts_with(b"W/").then(|| String::from_utf8_lossy(tag.as_bytes()).into_owned())
}

/// A ranged GET's reply, refused where its `Content-Range` is one `object_store` would read
/// as numbers but no byte range of any object can be: its first byte after its last, its
/// last at or past the object's length, or its last the largest number (`object_store`
/// makes the end exclusive by adding one, which overflows: a panic in a debug build).
/// Anything else is `object_store`'s to judge (a missing or malformed header, or another
/// range than asked, is its error).
fn content_range_checked(reply: HttpResponse) -> Result<HttpResponse, HttpError> {
    let Some(value) = reply.headers().get("content-range").and_then(|v| v.to_str().ok()) else {
        return Ok(reply);
    };
    let numbers = value.trim().strip_prefix("bytes ").and_then(|rest| {
        let (range, size) = rest.split_once('/')?;
        let (first, last) = range.split_once('-')?;
        Some((first.parse::<u64>().ok()?, last.parse::<u64>().ok()?, size.parse::<u64>().ok()))
    });
    match numbers {
        Some((first, last, size)) if first > last || last == u64::MAX || size.is_some_and(|n| last >= n) => {
            Err(HttpError::new(HttpErrorKind::Decode, Bound::ContentRange(value.to_owned())))
        }
        _ => Ok(reply),
    }
}

/// What a [`Capped`] body does past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// Ends there: the body is read to its end or its bound and given as one piece of
    /// valid UTF-8 (an error reply's message, which `object_store` reads as text: a
    /// character cut in two would lose the reply's status).
    Cut,
    /// Fails the request.
    Fail,
}

/// A body read to at most `max` bytes.
struct Capped {
    inner: HttpResponseBody,
    seen: usize,
    max: usize,
    past: Past,
    /// What a [`Past::Cut`] body has read so far.
    kept: Vec<u8>,
    /// Ended: nothing more is read.
    done: bool,
}

impl Capped {
    /// A [`Past::Cut`] body's one piece: what it kept, as valid UTF-8.
    fn message(&mut self) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        self.done = true;
        let text = String::from_utf8_lossy(&self.kept).into_owned();
        self.kept = Vec::new();
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))))
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                // The end, or a body that broke off: a message ends with what it kept (the
                // reply's status is what counts).
                Poll::Ready(None | Some(Err(_))) if self.past == Past::Cut => return self.message(),
                Poll::Ready(other) => {
                    self.done = other.as_ref().is_none_or(Result::is_err);
                    return Poll::Ready(other);
                }
                Poll::Pending => return Poll::Pending,
            };
            let Some(data) = frame.data_ref() else {
                match self.past {
                    // Trailers: a message has ended.
                    Past::Cut => return self.message(),
                    Past::Fail => return Poll::Ready(Some(Ok(frame))),
                }
            };
            let left = self.max - self.seen;
            let n = data.len().min(left);
            match self.past {
                Past::Cut => {
                    self.kept.extend_from_slice(&data[..n]);
                    self.seen += n;
                    if self.seen >= self.max {
                        return self.message();
                    }
                }
                Past::Fail if data.len() <= left => {
                    self.seen += n;
                    return Poll::Ready(Some(Ok(frame)));
                }
                Past::Fail => {
                    self.done = true;
                    return Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, Bound::Reply(self.max)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.past == Past::Fail && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // What the server says, never past the bound: buffers are sized by this.
        let left = (self.max - self.seen) as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        // (A message's valid UTF-8 may be longer than the bytes it kept: no upper bound.)
        if let (Some(upper), Past::Fail) = (inner.upper(), self.past) {
            hint.set_upper(upper.min(left));
        }
        hint.set_lower(inner.lower().min(hint.upper().unwrap_or(left)));
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounded(json: &str) -> serde_json::Value {
        serde_json::from_slice(&credential_bounded(bytes::Bytes::from(json.to_owned()))).unwrap()
    }

    #[test]
    fn a_credentials_lifetime_is_cut_to_a_day_as_it_was_written() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        // GCE's metadata server and OAuth endpoints: a number of seconds.
        let got = bounded(r#"{"access_token": "t", "expires_in": 18446744073709551615, "token_type": "Bearer"}"#);
        assert_eq!((got["access_token"].as_str(), got["expires_in"].as_u64()), (Some("t"), Some(CREDENTIAL_TTL_MAX)));
        // Azure's instance metadata: strings, and a time since the epoch.
        let got = bounded(
            r#"{"access_token": "t", "expires_in": "99999999999999999999", "expires_on": "18446744073709551615"}"#,
        );
        assert_eq!(got["expires_in"].as_str(), Some("99999999999999999999"), "past u64: object_store's error");
        let on: u64 = got["expires_on"].as_str().unwrap().parse().unwrap();
        assert!(on >= now + CREDENTIAL_TTL_MAX && on < now + CREDENTIAL_TTL_MAX + 60, "{on}");
        // What a provider sends is untouched, byte for byte.
        for json in [r#"{"access_token": "t", "expires_in": 3599}"#, r#"{"expires_on": "1506484173"}"#, "not json"] {
            assert_eq!(credential_bounded(bytes::Bytes::from(json)), json.as_bytes(), "{json}");
        }
    }

    #[test]
    fn a_fabric_token_past_a_day_is_refused_and_others_pass_untouched() {
        use base64::Engine as _;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let jwt = |claims: &str| {
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            bytes::Bytes::from(format!("{}.{}.sig", b64(r#"{"alg":"RS256"}"#), b64(claims)))
        };
        let far = jwt(&format!(r#"{{"exp": {}}}"#, u64::MAX));
        assert!(matches!(jwt_checked(far), Err(Bound::TokenLifetime(e)) if e == u64::MAX));
        let hour = jwt(&format!(r#"{{"exp": {}, "aud": "storage"}}"#, now + 3600));
        assert_eq!(jwt_checked(hour.clone()).unwrap(), hour);
        for other in [bytes::Bytes::from("not a token"), jwt("not json"), jwt(r#"{"exp": "soon"}"#)] {
            assert_eq!(jwt_checked(other.clone()).unwrap(), other);
        }
    }
}
