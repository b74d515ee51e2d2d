//! The HTTP client every store uses: `object_store`'s own (reqwest), with what a server
//! sends bounded before `object_store` reads it.
//!
//! `object_store` reads some replies whole: an error reply's body (for its message), a
//! listing page, a credential. It sizes its buffer by the reply's `Content-Length`, so a
//! hostile or broken server could make one allocation of any size (and abort the process)
//! or send an endless body. Here every reply that is not a ranged GET's data is bounded:
//! - an error reply keeps at most [`ERROR_BODY_MAX`] bytes of its body (its message; the
//!   rest is dropped with the connection);
//! - a listing page, or any other reply to a request with a query or of another method than
//!   GET, may hold at most [`PAGE_MAX`] bytes, else the request fails;
//! - a whole object (an index, a `SHA256SUMS`) at most [`WHOLE_MAX`], more than any the
//!   planner accepts (it checks the length first);
//! - one store makes at most [`LIST_PAGES_MAX`] listing requests, however many pages a
//!   server says follow.
//!
//! Each bounded body reports no more than its bound as its size, so no buffer is sized past
//! it. Ranged GETs (shard data, headers) are passed through: their lengths are checked
//! against the range asked as they are read.

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

/// Makes the bounded client from `object_store`'s own, with the store's options.
#[derive(Debug, Default)]
pub(crate) struct Bounded;

impl HttpConnector for Bounded {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(BoundedService { inner, listings: AtomicUsize::new(0) }))
    }
}

#[derive(Debug)]
struct BoundedService {
    inner: HttpClient,
    /// Listing requests made so far.
    listings: AtomicUsize,
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
            let whole = req.method() == "GET" && req.uri().query().is_none();
            let reply = self.inner.execute(req).await?;
            let (max, past) = if !reply.status().is_success() {
                (ERROR_BODY_MAX, Past::Cut)
            } else if ranged && !listing {
                return Ok(reply);
            } else if whole {
                (WHOLE_MAX, Past::Fail)
            } else {
                (PAGE_MAX, Past::Fail)
            };
            let (parts, body) = reply.into_parts();
            let body = HttpResponseBody::new(Capped { inner: body, seen: 0, max, past });
            Ok(HttpResponse::from_parts(parts, body))
        })
    }
}

/// What a [`Capped`] body does past its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// Ends there (an error reply's message, cut short).
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
}

impl Body for Capped {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.past == Past::Cut && self.seen >= self.max {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        let Some(data) = frame.data_ref() else { return Poll::Ready(Some(Ok(frame))) };
        let left = self.max - self.seen;
        if data.len() <= left {
            self.seen += data.len();
            return Poll::Ready(Some(Ok(frame)));
        }
        match self.past {
            Past::Cut => {
                let kept = data.slice(..left);
                self.seen = self.max;
                Poll::Ready(Some(Ok(Frame::data(kept))))
            }
            Past::Fail => Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, Bound::Reply(self.max))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.past == Past::Cut && self.seen >= self.max) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // What the server says, never past the bound: buffers are sized by this.
        let mut hint = SizeHint::new();
        hint.set_lower(self.inner.size_hint().lower().min((self.max - self.seen) as u64));
        hint
    }
}
