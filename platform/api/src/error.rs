//! The one error type at the HTTP edge. Every failure becomes `{"error": {"code", "message",
//! "request_id"}}` with the status its code implies. Internal failures are logged with where they came
//! from and reach the client as an opaque 500.

use std::fmt;
use std::panic::Location;
use std::time::Duration;

use actix_web::error::{JsonPayloadError, PathError, QueryPayloadError};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use plinth_core::ErrorCode;
use plinth_core::error::{ErrorBody, ErrorDetail, ProtocolErrorBody};
use plinth_store::StoreError;
use plinth_store::auth::AuthError;
use plinth_store::cache::RateDecision;

use crate::request_id;

#[derive(Debug)]
pub struct ApiError {
    code: ErrorCode,
    message: String,
    retry_after: Option<Duration>,
    rate: Option<RateDecision>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            rate: None,
        }
    }

    /// An unexpected failure: logged here with the caller's location, opaque to the client.
    #[track_caller]
    pub fn internal(detail: impl fmt::Display) -> Self {
        let location = Location::caller();
        tracing::error!(error = %detail, at = %location, "internal error");
        Self::new(
            ErrorCode::Internal,
            "an internal error occurred; the request id helps support find it",
        )
    }

    #[must_use]
    pub fn rate_limited(decision: RateDecision) -> Self {
        let wait = decision.retry_after.max(Duration::from_secs(1));
        Self {
            code: ErrorCode::RateLimited,
            message: format!(
                "rate limit of {} requests per minute exceeded; retry after {} s",
                decision.limit,
                wait.as_secs()
            ),
            retry_after: Some(wait),
            rate: Some(decision),
        }
    }

    /// Tells the client when to retry (`Retry-After`).
    #[must_use]
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    #[must_use]
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    #[must_use]
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Adds `RateLimit-*` headers, as the IETF draft names them, for a rate-limit decision.
pub(crate) fn insert_rate_headers(headers: &mut actix_web::http::header::HeaderMap, decision: &RateDecision) {
    let seconds = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    for (name, value) in [
        ("ratelimit-limit", u64::from(decision.limit)),
        ("ratelimit-remaining", u64::from(decision.remaining)),
        ("ratelimit-reset", seconds(decision.reset_after)),
    ] {
        headers.insert(header::HeaderName::from_static(name), HeaderValue::from(value));
    }
    if let Ok(policy) = HeaderValue::from_str(&format!("{};w=60", decision.limit)) {
        headers.insert(header::HeaderName::from_static("ratelimit-policy"), policy);
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let Some(wait) = self.retry_after {
            response.insert_header((header::RETRY_AFTER, wait.as_secs().max(1)));
        }
        let mut response = if request_id::is_inference_protocol() {
            // The protocol's clients (tritonclient, KServe) read `error` as the message string; the
            // code and request id ride alongside.
            response.json(ProtocolErrorBody {
                error: self.message.clone(),
                code: self.code,
                request_id: request_id::current(),
            })
        } else {
            response.json(ErrorBody {
                error: ErrorDetail {
                    code: self.code,
                    message: self.message.clone(),
                    request_id: request_id::current(),
                },
            })
        };
        if let Some(decision) = &self.rate {
            insert_rate_headers(response.headers_mut(), decision);
        }
        // For whoever records failures (see `recent_errors`), without parsing the body again.
        response.extensions_mut().insert(self.code);
        response
    }
}

impl From<StoreError> for ApiError {
    #[track_caller]
    fn from(err: StoreError) -> Self {
        let code = err.code();
        match (code, err) {
            (ErrorCode::Internal, err) => Self::internal(err),
            (ErrorCode::Unavailable, err) => {
                tracing::warn!(error = %err, "dependency unavailable");
                Self {
                    retry_after: Some(Duration::from_secs(1)),
                    ..Self::new(code, "a dependency is unavailable; retry shortly")
                }
            }
            (_, StoreError::TooManyAttempts(wait)) => Self {
                retry_after: Some(wait),
                ..Self::new(ErrorCode::RateLimited, "too many attempts; retry later")
            },
            (code, err) => Self::new(code, err.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    #[track_caller]
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Invalid => Self::new(
                ErrorCode::InvalidCredentials,
                "the API key or session token is not valid",
            ),
            AuthError::Expired => Self::new(
                ErrorCode::InvalidCredentials,
                "the API key or session token has expired",
            ),
            AuthError::Revoked => Self::new(ErrorCode::ApiKeyRevoked, "this API key was revoked"),
            AuthError::Store(err) => err.into(),
        }
    }
}

impl From<plinth_hosting::HostingError> for ApiError {
    #[track_caller]
    fn from(err: plinth_hosting::HostingError) -> Self {
        use plinth_hosting::HostingError as E;
        match err {
            E::Refused {
                code,
                message,
                retry_after,
            } => Self {
                retry_after,
                ..Self::new(code, message)
            },
            E::Store(err) => err.into(),
            E::Inference(err) => err.into(),
            E::Internal(detail) => Self::internal(detail),
        }
    }
}

impl From<plinth_marketplace::MarketError> for ApiError {
    #[track_caller]
    fn from(err: plinth_marketplace::MarketError) -> Self {
        use plinth_marketplace::MarketError as E;
        match err {
            E::Refused {
                code,
                message,
                retry_after,
            } => Self {
                retry_after,
                ..Self::new(code, message)
            },
            E::Store(err) => err.into(),
            E::Hosting(err) => err.into(),
            E::Inference(err) => err.into(),
            E::Internal(detail) => Self::internal(detail),
        }
    }
}

impl From<plinth_inference::InferenceError> for ApiError {
    #[track_caller]
    fn from(err: plinth_inference::InferenceError) -> Self {
        let code = err.code();
        if code == ErrorCode::Internal {
            return Self::internal(err);
        }
        let retry_after = matches!(code, ErrorCode::Overloaded | ErrorCode::TenantQueueFull)
            .then_some(Duration::from_secs(1));
        Self {
            retry_after,
            ..Self::new(code, err.to_string())
        }
    }
}

#[allow(clippy::needless_pass_by_value)] // actix's error-handler signature
pub(crate) fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let api = match &err {
        JsonPayloadError::OverflowKnownLength { .. } | JsonPayloadError::Overflow { .. } => {
            ApiError::new(ErrorCode::PayloadTooLarge, err.to_string())
        }
        JsonPayloadError::ContentType => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "send the body as JSON with `Content-Type: application/json`",
        ),
        JsonPayloadError::Deserialize(inner) if inner.is_data() => ApiError::new(
            ErrorCode::InvalidBody,
            format!("the body does not match the expected shape: {inner}"),
        ),
        JsonPayloadError::Deserialize(inner) => ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not valid JSON: {inner}"),
        ),
        _ => ApiError::new(ErrorCode::InvalidJson, err.to_string()),
    };
    api.into()
}

#[allow(clippy::needless_pass_by_value)] // actix's error-handler signature
pub(crate) fn query_error(err: QueryPayloadError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::new(ErrorCode::InvalidQuery, format!("invalid query string: {err}")).into()
}

/// A path segment that cannot be an id names nothing: 404, like an id that does not exist.
pub(crate) fn path_error(_err: PathError, _req: &HttpRequest) -> actix_web::Error {
    ApiError::new(ErrorCode::NotFound, "no such resource").into()
}

pub(crate) async fn route_not_found(req: HttpRequest) -> ApiResult<HttpResponse> {
    Err(ApiError::new(
        ErrorCode::RouteNotFound,
        format!("no route for {} {}", req.method(), req.path()),
    ))
}

pub(crate) async fn method_not_allowed(req: HttpRequest) -> ApiResult<HttpResponse> {
    Err(ApiError::new(
        ErrorCode::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.path()),
    ))
}
