//! Request ids, structured request logs, HTTP metrics and `Server-Timing`, in one middleware at the
//! outer edge.
//!
//! The id comes from a sane incoming `X-Request-Id` or is minted (`req_<ulid>`); it is echoed in the
//! response header, attached to the tracing span, stored in the request's extensions for handlers, and
//! visible to error bodies through a task-local. A request whose stages were timed (a model call's
//! wait in the queue and its run, the usage ledger's commit; see `plinth_inference::timing`) is
//! answered with them in `Server-Timing`, in milliseconds, beside the whole request's `total`.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::future::{Ready, ready};
use tracing::Instrument;

tokio::task_local! {
    static REQUEST_ID: RequestContext;
}

/// What error bodies need to know about the request being handled.
#[derive(Debug, Clone)]
struct RequestContext {
    id: String,
    /// Open Inference Protocol routes, whose clients expect `error` to be a string.
    inference_protocol: bool,
}

pub const HEADER: HeaderName = HeaderName::from_static("x-request-id");
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// The current request's id, as seen by handlers.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

impl FromRequest for RequestId {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, actix_web::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(Ok(req
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or_else(|| Self(current()))))
    }
}

/// The id of the request being handled on this task, or `unknown` outside a request.
#[must_use]
pub fn current() -> String {
    REQUEST_ID
        .try_with(|context| context.id.clone())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Whether the request being handled is on the Open Inference Protocol's `/v2/models` paths.
#[must_use]
pub fn is_inference_protocol() -> bool {
    REQUEST_ID
        .try_with(|context| context.inference_protocol)
        .unwrap_or(false)
}

fn incoming_id(req: &ServiceRequest) -> Option<String> {
    let value = req.headers().get(&HEADER)?.to_str().ok()?;
    let sane = !value.is_empty() && value.len() <= 128 && value.bytes().all(|b| b.is_ascii_graphic());
    sane.then(|| value.to_owned())
}

pub(crate) async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = incoming_id(&req)
        .unwrap_or_else(|| format!("req_{}", ulid::Ulid::new().to_string().to_ascii_lowercase()));
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = crate::metrics::method_label(req.method());
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.path());
    let started = Instant::now();
    let context = RequestContext {
        id: id.clone(),
        inference_protocol: req.path().starts_with("/v2/models"),
    };
    let (result, stages) = REQUEST_ID
        .scope(context, plinth_inference::timing::collect(next.call(req)))
        .instrument(span.clone())
        .await;
    let mut response = result?;
    let elapsed = started.elapsed();
    if !stages.is_empty() {
        let timing = stages
            .iter()
            .chain([&("total", elapsed)])
            .map(|(stage, took)| format!("{stage};dur={:.3}", took.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(value) = HeaderValue::from_str(&timing) {
            response.headers_mut().insert(SERVER_TIMING, value);
        }
    }
    let status = response.status().as_u16();
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    metrics::counter!("http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(elapsed.as_secs_f64());
    span.in_scope(|| tracing::info!(status, elapsed_us = elapsed.as_micros() as u64, "handled"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    Ok(response)
}
