//! Multipart bodies (uploads, datasets, plugin submissions) held to bounds as they arrive.
//!
//! The multipart parser (actix-multipart; multer does the same) keeps in memory whatever it has
//! read but not matched yet, without a bound of its own: a body that never sends its boundary, a
//! part's headers that never end, or a line after a part that never ends is buffered whole. A
//! bound on the whole body does not help where a part may be gigabytes (a model). So the raw body
//! is counted before the parser sees it, against what the parser gave back as part contents: the
//! difference is what it can be holding. Past [`MAX_HELD`] the parser is first turned away, to give
//! back what it can from what it holds (what it read ahead); if it asks again without having made
//! any progress, it is stuck on a boundary or headers it cannot find, and the body is refused.
//! Boundaries and part headers are the only bytes fed and never given back, and a form has at most
//! [`MAX_PARTS`] parts, so honest bodies stay far below the bound.
//!
//! The body is also held to a total size, to a longest pause and a lowest average rate, and each
//! piece may be charged against a replica-wide budget (plugin submissions are held in memory).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_multipart::{Field, Multipart, MultipartError};
use actix_web::error::PayloadError;
use actix_web::web::{self, Bytes};
use futures_util::{Stream, TryStreamExt};
use plinth_core::ErrorCode;

use crate::error::{ApiError, ApiResult};

/// The most a form's parser may hold that no part has given back, once it can give none back:
/// boundaries and part headers (hundreds of bytes a part) and a line or header it has not matched.
pub(crate) const MAX_HELD: u64 = 64 << 10;

/// The most fed to the parser at once (the server reads a body in chunks of up to about 136 KiB).
const PIECE: usize = 32 << 10;

/// The most parts a form may have (a browser sends a part for each of its inputs).
pub(crate) const MAX_PARTS: usize = 16;

/// How long a body may pause between two chunks: a link that sends nothing for this long has
/// stopped (S3 drops an idle upload after about 20 s).
pub(crate) const BODY_PAUSE: Duration = Duration::from_secs(15);

/// The lowest average rate a body may arrive at, in bytes a second, after [`RATE_GRACE`]: a body
/// trickled a byte before each pause would otherwise hold its connection, and its uploader's turn,
/// for good. 4 KiB/s is a 32 kbit/s link.
const MIN_RATE: u64 = 4 << 10;
const RATE_GRACE: Duration = Duration::from_secs(60);

/// What a multipart body may add to its parts (boundaries and part headers), for routes that bound
/// the whole body by its parts.
pub(crate) const OVERHEAD: u64 = 64 << 10;

/// Charges the body's running total in bytes against a budget, refusing once it is spent.
pub(crate) type Charge = Box<dyn FnMut(u64) -> ApiResult<()>>;

/// What a body is held to as it arrives.
pub(crate) struct Bounds {
    /// The whole body at most, in bytes (`413`).
    pub(crate) total: u64,
    /// Charged with the running total after each chunk.
    pub(crate) charge: Option<Charge>,
}

impl Bounds {
    pub(crate) fn total(total: u64) -> Self {
        Self { total, charge: None }
    }
}

/// What was fed to the parser and given back by it, and why the body was cut off if it was (the
/// parser only sees that its stream failed).
#[derive(Default)]
struct Counts {
    fed: Cell<u64>,
    given_back: Cell<u64>,
    /// Parts and pieces of parts (and their ends) the parser has given back.
    progress: Cell<u64>,
    refusal: Cell<Option<ApiError>>,
}

impl Counts {
    fn progressed(&self) {
        self.progress.set(self.progress.get() + 1);
    }

    fn error(&self, err: &MultipartError) -> ApiError {
        self.refusal.take().unwrap_or_else(|| {
            ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
        })
    }
}

fn too_slow(why: &str) -> ApiError {
    ApiError::new(ErrorCode::RequestTimeout, format!("the body {why}"))
}

/// A multipart form read part by part, within its bounds.
pub(crate) struct Form {
    parts: Multipart,
    counts: Rc<Counts>,
    seen: usize,
}

impl Form {
    /// Reads `payload` as the multipart form `req`'s `Content-Type` names.
    pub(crate) fn new(req: &actix_web::HttpRequest, payload: web::Payload, bounds: Bounds) -> Self {
        let counts = Rc::new(Counts::default());
        let body = Counted {
            payload,
            bounds,
            counts: Rc::clone(&counts),
            rest: Bytes::new(),
            pause: None,
            began: Instant::now(),
            declined_at: None,
            ended: false,
        };
        Self {
            parts: Multipart::new(req.headers(), body),
            counts,
            seen: 0,
        }
    }

    /// The next part, or `None` after the last. Read each part to its end first (`read`, `skip`,
    /// or `chunk` until `None`): the parser would drain what is left of it unseen, counted as held.
    ///
    /// # Errors
    /// The body's bounds, `invalid_body` for a malformed body or more than [`MAX_PARTS`] parts.
    pub(crate) async fn next_part(&mut self) -> ApiResult<Option<Part>> {
        let field = self
            .parts
            .try_next()
            .await
            .map_err(|err| self.counts.error(&err))?;
        self.counts.progressed();
        let Some(field) = field else {
            return Ok(None);
        };
        self.seen += 1;
        if self.seen > MAX_PARTS {
            return Err(ApiError::new(
                ErrorCode::InvalidBody,
                format!("a form has at most {MAX_PARTS} parts"),
            ));
        }
        Ok(Some(Part {
            field,
            counts: Rc::clone(&self.counts),
            ended: false,
        }))
    }
}

/// One part of a [`Form`].
pub(crate) struct Part {
    field: Field,
    counts: Rc<Counts>,
    /// The parser must not be asked for a part's contents after their end.
    ended: bool,
}

impl Part {
    /// The part's name (`Content-Disposition`), or `""`.
    pub(crate) fn name(&self) -> &str {
        self.field.name().unwrap_or_default()
    }

    /// The file name a browser gives a file input's part (`""` for an input left empty).
    pub(crate) fn file_name(&self) -> Option<&str> {
        self.field
            .content_disposition()
            .and_then(|disposition| disposition.get_filename())
    }

    /// The part's `Content-Type`, if it has one.
    pub(crate) fn content_type(&self) -> Option<String> {
        self.field.content_type().map(ToString::to_string)
    }

    /// The next chunk of the part's contents, or `None` at its end.
    ///
    /// # Errors
    /// As [`Form::next_part`].
    pub(crate) async fn chunk(&mut self) -> ApiResult<Option<Bytes>> {
        if self.ended {
            return Ok(None);
        }
        let chunk = self
            .field
            .try_next()
            .await
            .map_err(|err| self.counts.error(&err))?;
        self.counts.progressed();
        self.ended = chunk.is_none();
        if let Some(chunk) = &chunk {
            let given_back = &self.counts.given_back;
            given_back.set(given_back.get() + chunk.len() as u64);
        }
        Ok(chunk)
    }

    /// The part's contents in memory, refused past `limit` bytes.
    ///
    /// # Errors
    /// `payload_too_large` past `limit` (`what` names the part), or as [`Part::chunk`].
    pub(crate) async fn read(&mut self, limit: u64, what: &str) -> ApiResult<Vec<u8>> {
        let mut bytes = Vec::new();
        while let Some(chunk) = self.chunk().await? {
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("{what} is larger than {} KiB", limit >> 10),
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    /// Reads the part to its end, keeping nothing.
    ///
    /// # Errors
    /// As [`Part::chunk`].
    pub(crate) async fn skip(&mut self) -> ApiResult<()> {
        while self.chunk().await?.is_some() {}
        Ok(())
    }
}

/// The body as the parser is fed it, in pieces of at most [`PIECE`]: each counted, and the body
/// cut off (with the reason in `counts`) once it passes its total, pauses for more than
/// [`BODY_PAUSE`], falls below [`MIN_RATE`], is refused by its charge, or leaves the parser stuck
/// holding more than [`MAX_HELD`].
struct Counted {
    payload: web::Payload,
    bounds: Bounds,
    counts: Rc<Counts>,
    /// What is left of the last chunk received.
    rest: Bytes,
    /// Running while the body is awaited.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    began: Instant,
    /// The parser's progress when it was last turned away to give back what it holds.
    declined_at: Option<u64>,
    ended: bool,
}

type Piece = Option<Result<Bytes, PayloadError>>;

impl Counted {
    fn refuse(&mut self, why: ApiError) -> Poll<Piece> {
        self.counts.refusal.set(Some(why));
        self.ended = true;
        let cut = std::io::Error::other("the body was refused as it arrived");
        Poll::Ready(Some(Err(PayloadError::Io(cut))))
    }

    /// Whether the body, `fed` bytes in, is within its total, rate and charge.
    fn within(&mut self, fed: u64) -> ApiResult<()> {
        let bounds = &mut self.bounds;
        if fed > bounds.total {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than {} KiB", bounds.total >> 10),
            ));
        }
        let elapsed = self.began.elapsed();
        if elapsed > RATE_GRACE && u128::from(fed) * 1000 < u128::from(MIN_RATE) * elapsed.as_millis() {
            return Err(too_slow(&format!(
                "arrives at less than {} KiB/s",
                MIN_RATE >> 10
            )));
        }
        match &mut bounds.charge {
            Some(charge) => charge(fed),
            None => Ok(()),
        }
    }
}

impl Stream for Counted {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Piece> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let counts = Rc::clone(&this.counts);
        if counts.fed.get().saturating_sub(counts.given_back.get()) > MAX_HELD {
            let progress = counts.progress.get();
            if this.declined_at == Some(progress) {
                return this.refuse(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "the body has more than {} KiB outside its parts' contents: a boundary \
                         that never comes, or a part's headers or a line too long",
                        MAX_HELD >> 10
                    ),
                ));
            }
            // Turned away once, to give back what it can of what it holds; asked again.
            this.declined_at = Some(progress);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.declined_at = None;
        if this.rest.is_empty() {
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Pending => {
                    let pause = this
                        .pause
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(BODY_PAUSE)));
                    return match pause.as_mut().poll(cx) {
                        Poll::Ready(()) => this.refuse(too_slow(&format!(
                            "paused for more than {} s",
                            BODY_PAUSE.as_secs()
                        ))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(err))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(err)));
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    this.pause = None;
                    this.rest = chunk;
                }
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(PIECE));
        let fed = counts.fed.get() + piece.len() as u64;
        counts.fed.set(fed);
        match this.within(fed) {
            Ok(()) => Poll::Ready(Some(Ok(piece))),
            Err(refused) => this.refuse(refused),
        }
    }
}
