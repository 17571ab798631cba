//! What every metered route shares: rate limiting by plan (and per key where set) before the handler
//! runs, `RateLimit-*` headers on the way out, and idempotency as Stripe defines it.
//!
//! A request with an `Idempotency-Key` is fingerprinted (method, path, body). The first attempt claims
//! the key and runs; its successful answer is stored (just after it is sent, by a writer that stores
//! many at once; until then a retry is told to come back), and every retry of the same request within
//! the retention window gets those bytes back (`Idempotent-Replayed: true`) without running anything. The
//! same key with a different request is refused (`422 idempotency_key_reused`); a retry while the first
//! attempt still runs is told to come back (`409 idempotency_in_flight`, `Retry-After`). A failed
//! attempt is not stored: retrying the same request runs it again, under the same ledger key.
//!
//! Ledger keys are the server's own (`req:<id>` for keyed requests, `auto:<ulid>` otherwise): nothing a
//! client sends, `X-Request-Id` included, can make two calls share one charge.

use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError, web};

use futures_util::StreamExt;
use futures_util::future::{Ready, ready};
use plinth_core::{ErrorCode, Scope};
use plinth_inference::timing;
use plinth_store::auth::{Actor, Principal};
use plinth_store::cache::{Quota, RateDecision};
use plinth_store::idempotency::{Attempt, Claim, StoredResponse};
use plinth_store::ledger::MAX_IDEMPOTENCY_KEY_LEN;
use plinth_store::metering::CallKeys;
use sha2::{Digest, Sha256};

use crate::auth::{RateCounted, authenticate, check_scope};
use crate::error::{ApiError, insert_rate_headers};
use crate::request_id::RequestId;
use crate::state::AppState;

/// Counts one request against `key`. A cache outage lets the request through (logged and counted):
/// refusing every paying call because the limiter is down would be the worse failure.
async fn check(state: &AppState, key: &str, quota: Quota) -> Option<RateDecision> {
    match state.cache.rate_limit(key, quota).await {
        Ok(decision) => Some(decision),
        Err(err) => {
            metrics::counter!("plinth_rate_limit_errors_total").increment(1);
            tracing::warn!(error = %err, "rate limiter unavailable; allowing the request");
            None
        }
    }
}

/// The plan's (and the key's) rate limits; the decision with the least room left, for the headers.
async fn rate_limit(state: &AppState, principal: &Principal) -> Result<Option<RateDecision>, ApiError> {
    // The narrower per-key limit first, so a throttled key does not spend its tenant's budget.
    let mut decision = None;
    if let Actor::ApiKey {
        id,
        rate_limit: Some(quota),
    } = &principal.actor
    {
        decision = check(state, &format!("key:{id}"), *quota).await;
        if let Some(refused) = decision.filter(|d| !d.allowed) {
            return Err(ApiError::rate_limited(refused));
        }
    }
    if let Some(tenant) = check(
        state,
        &format!("tenant:{}", principal.tenant_id),
        principal.tenant_quota,
    )
    .await
    {
        if !tenant.allowed {
            return Err(ApiError::rate_limited(tenant));
        }
        if decision.is_none_or(|key| tenant.remaining < key.remaining) {
            decision = Some(tenant);
        }
    }
    Ok(decision)
}

/// The client's `Idempotency-Key`, if it sent one.
fn client_key(req: &ServiceRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| {
            !v.is_empty() && v.len() <= MAX_IDEMPOTENCY_KEY_LEN && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(|v| Some(v.to_owned()))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidHeader,
                format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            )
        })
}

/// Reads the request body (up to `limit` bytes) and puts it back for the handler.
async fn take_body(req: &mut ServiceRequest, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut payload = req.take_payload();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| ApiError::new(ErrorCode::InvalidBody, err.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    req.set_payload(Payload::from(body.clone()));
    Ok(body)
}

/// Request headers that change what a body means; part of the fingerprint.
const MEANINGFUL_HEADERS: &[&str] = &[
    "content-type",
    "content-encoding",
    "inference-header-content-length",
];

/// What makes two requests the same request: method, path with query, the headers that change what
/// the body means, and the body.
fn fingerprint(req: &ServiceRequest, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(req.method().as_str().as_bytes());
    hash.update([0]);
    hash.update(req.path().as_bytes());
    hash.update([b'?']);
    hash.update(req.query_string().as_bytes());
    for name in MEANINGFUL_HEADERS {
        hash.update([0]);
        for value in req.headers().get_all(*name) {
            hash.update(value.as_bytes());
            hash.update([b'\n']);
        }
    }
    // Asking for a full record makes another request; hashed only when sent, so the fingerprints of
    // requests without it stay what they were.
    if let Some(record) = req.headers().get("plinth-record") {
        hash.update(b"\0plinth-record:");
        hash.update(record.as_bytes());
    }
    hash.update([0]);
    hash.update(body);
    hex::encode(hash.finalize())
}

/// The largest answer stored for replay. A larger one (big tensors) is not kept: its key is spent, and
/// a retry is told to use a new key.
const MAX_STORED_ANSWER: usize = 4 << 20;

/// Response headers that belong to the answer (and come back with a replay).
const KEPT_HEADERS: &[&str] = &[
    "content-type",
    "plinth-compute-units",
    "plinth-invocation-id",
    "inference-header-content-length",
];

const REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

fn replay(stored: StoredResponse) -> HttpResponse {
    let mut response = HttpResponse::build(StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK));
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            response.insert_header((name, value));
        }
    }
    response.insert_header((REPLAYED, HeaderValue::from_static("true")));
    metrics::counter!("plinth_idempotent_replays_total").increment(1);
    response.body(stored.body)
}

/// Renews a claim's lease while its request runs; ends when the lease was lost to another attempt.
/// Stopped when the request ends, however it ends (a dropped connection included).
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn keep_claimed(state: &AppState, claim: &Claim) -> Renewal {
    let (store, claim) = (state.store.clone(), claim.clone());
    let lease = state.settings.idempotency.lease;
    Renewal(tokio::spawn(async move {
        let mut tick = tokio::time::interval((lease / 3).max(Duration::from_millis(100)));
        tick.tick().await;
        loop {
            tick.tick().await;
            match store.renew_request(&claim, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) => tracing::warn!(error = %err, "cannot renew an idempotent request's lease"),
            }
        }
    }))
}

/// Stores a claim's answer off the request path, renewing its lease until the answer is written:
/// neither a lease that lapses meanwhile nor a client that hangs up first lets a retry run the
/// answered request again.
fn store_answer(state: &AppState, renewal: Renewal, claim: Claim, answer: Option<StoredResponse>) {
    let completions = state.completions.clone();
    tokio::spawn(async move {
        let _ = completions.complete(claim, answer).await.await;
        drop(renewal);
    });
}

/// Runs the handler for a claimed request; stores its answer if it succeeded, gives the claim up if
/// it did not.
async fn run_claimed<B: MessageBody + 'static>(
    state: &AppState,
    claim: Claim,
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let mut renewal = keep_claimed(state, &claim);
    let outcome = tokio::select! {
        outcome = next.call(req) => outcome,
        // The lease went to another attempt (this one stalled past it): stop here, so only one
        // attempt's work and ledger event stand.
        _ = &mut renewal.0 => {
            metrics::counter!("plinth_idempotent_leases_lost_total").increment(1);
            return Err(ApiError::new(
                ErrorCode::IdempotencyInFlight,
                "another attempt at this request took over; retry to get its answer",
            )
            .retry_after(Duration::from_secs(1))
            .into());
        }
    };
    let response = match outcome {
        Ok(response) if response.status().is_success() => response.map_into_boxed_body(),
        other => {
            drop(renewal);
            if let Err(err) = state.store.release_request(&claim).await {
                tracing::warn!(error = %err, "cannot release an idempotent request; its lease will lapse");
            }
            return other.map(ServiceResponse::map_into_boxed_body);
        }
    };
    let (request, response) = response.into_parts();
    let (response, body) = response.into_parts();
    let body = match actix_web::body::to_bytes(body).await {
        Ok(body) => body,
        Err(err) => {
            drop(renewal);
            let _ = state.store.release_request(&claim).await;
            return Err(ApiError::internal(format!("cannot read the response: {err}")).into());
        }
    };
    if body.len() > MAX_STORED_ANSWER {
        // Too large to keep: the key is spent (running it again under it would be free work).
        metrics::counter!("plinth_idempotent_answers_not_kept_total").increment(1);
        store_answer(state, renewal, claim, None);
        return Ok(ServiceResponse::new(
            request,
            response.set_body(BoxBody::new(body)),
        ));
    }
    let stored = StoredResponse {
        status: response.status().as_u16(),
        headers: KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = response.headers().get(*name)?.to_str().ok()?;
                Some(((*name).to_owned(), value.to_owned()))
            })
            .collect(),
        body: body.to_vec(),
    };
    // Stored off the request path; until it is, a retry is told the request is still in flight, and
    // the lease is kept: lapsing meanwhile, it would let a retry run the answered request again.
    store_answer(state, renewal, claim, Some(stored));
    Ok(ServiceResponse::new(
        request,
        response.set_body(BoxBody::new(body)),
    ))
}

/// What the gate decided about a metered request.
enum Admission {
    /// No `Idempotency-Key`: run it under a fresh ledger key.
    Unkeyed,
    /// Answer with the stored response of the request's first run.
    Replay(StoredResponse),
    /// Run it under the claim.
    Claimed(Claim),
}

/// Authentication, rate limits, the idempotency claim and the plan's cap, before the handler.
async fn admit(
    state: &AppState,
    req: &mut ServiceRequest,
    scope: Option<Scope>,
    max_body: Option<usize>,
) -> Result<(Admission, Option<RateDecision>), ApiError> {
    let principal = authenticate(req.request()).await?;
    req.extensions_mut().insert(RateCounted);
    // Counted before anything else is looked at: a malformed key is refused within the limit too.
    let decision = admit_call(state, &principal, scope).await?;
    let Some(key) = client_key(req)? else {
        if let Some(cap) = principal.call_cap {
            enforce_cap(state, &principal.tenant_id, cap).await?;
        }
        return Ok((Admission::Unkeyed, decision));
    };
    let body = take_body(req, max_body.unwrap_or(state.settings.max_body_bytes)).await?;
    let fingerprint = fingerprint(req, &body);
    let attempt = state
        .claims
        .attempt(
            &state.store,
            &principal.tenant_id,
            &key,
            &fingerprint,
            state.settings.idempotency,
        )
        .await?;
    let claim = match attempt {
        Attempt::Run(claim) => claim,
        // Replays are served even past a cap: the call was billed when it ran.
        Attempt::Replay(stored) => return Ok((Admission::Replay(stored), decision)),
        Attempt::InFlight => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyInFlight,
                "a request with this Idempotency-Key is still being processed; retry to get its answer",
            )
            .retry_after(Duration::from_secs(1)));
        }
        Attempt::NotKept => {
            return Err(ApiError::new(
                ErrorCode::IdempotencyAnswerNotKept,
                "this request ran, but its answer was too large to keep for replay; send it with a new Idempotency-Key to run it again",
            ));
        }
        Attempt::Mismatch => {
            metrics::counter!("plinth_idempotency_key_reuse_total").increment(1);
            return Err(ApiError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used for a different request (method, path or body); use a new key for a new request",
            ));
        }
    };
    if let Some(cap) = principal.call_cap
        && let Err(refused) = enforce_cap(state, &principal.tenant_id, cap).await
    {
        let _ = state.store.release_request(&claim).await;
        return Err(refused);
    }
    Ok((Admission::Claimed(claim), decision))
}

/// The checks every billable call passes first: the scope, then the rate limits.
async fn admit_call(
    state: &AppState,
    principal: &Principal,
    scope: Option<Scope>,
) -> Result<Option<RateDecision>, ApiError> {
    check_scope(principal, scope)?;
    rate_limit(state, principal).await
}

/// Admits a billable call that a signed-in page makes on its visitor's behalf, with its own
/// idempotency key: the same checks as the metered routes' middleware.
pub(crate) async fn admit_interactive(
    state: &AppState,
    principal: &Principal,
    scope: Scope,
) -> Result<IdempotencyKey, ApiError> {
    admit_call(state, principal, Some(scope)).await?;
    if let Some(cap) = principal.call_cap {
        enforce_cap(state, &principal.tenant_id, cap).await?;
    }
    Ok(IdempotencyKey(CallKeys::unkeyed()))
}

/// Middleware of a metered route. `scope` is what the route requires of the caller; `max_body` the
/// largest body it takes (the JSON limit when `None`): a keyed request's body is read up to it to
/// fingerprint the request.
pub(crate) async fn middleware(
    scope: Option<Scope>,
    max_body: Option<usize>,
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("application state is not registered"))?;
    // A refusal is answered here, inside the request's scope, so its body carries the request id.
    let (admission, decision) = match timing::time("admit", admit(&state, &mut req, scope, max_body)).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            let response = req.into_response(refused.error_response());
            note_failure(&state, &response);
            return Ok(response);
        }
    };
    let mut response = match admission {
        Admission::Unkeyed => {
            req.extensions_mut().insert(IdempotencyKey(CallKeys::unkeyed()));
            next.call(req).await?.map_into_boxed_body()
        }
        Admission::Replay(stored) => req.into_response(replay(stored)),
        Admission::Claimed(claim) => {
            req.extensions_mut().insert(IdempotencyKey(CallKeys {
                call: claim.ledger_key(),
                attempt: claim.attempt_key(),
                inherited: claim.inherited(),
            }));
            run_claimed(&state, claim, req, next).await?
        }
    };
    if let Some(decision) = &decision {
        insert_rate_headers(response.headers_mut(), decision);
    }
    note_failure(&state, &response);
    Ok(response)
}

/// Keeps a failed call in its tenant's recent errors (an unauthenticated one has no tenant to show it to).
fn note_failure<B>(state: &AppState, response: &ServiceResponse<B>) {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return;
    }
    let req = response.request();
    let Some(principal) = req.extensions().get::<Arc<Principal>>().cloned() else {
        return;
    };
    let call = crate::recent_errors::FailedCall {
        at: chrono::Utc::now(),
        // A label from a fixed set: a client chooses the method's bytes.
        method: match req.method().as_str() {
            known @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => known.to_owned(),
            _ => "OTHER".to_owned(),
        },
        path: req.path().chars().take(200).collect(),
        status: status.as_u16(),
        code: response
            .response()
            .extensions()
            .get::<ErrorCode>()
            .and_then(|code| serde_json::to_value(code).ok())
            .and_then(|code| code.as_str().map(ToOwned::to_owned)),
        request_id: crate::request_id::current(),
    };
    state
        .recent_errors
        .record(&state.cache, &principal.tenant_id, call);
}

/// How long a tenant's count of units this period is reused before it is read from the ledger again.
/// A capped tenant can overshoot its cap by what its rate limit lets through in this window.
const CAP_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses a call once a capped plan's included calls for the period are used. The count comes from
/// the ledger, cached briefly (in Redis in production, so replicas share it). A cache hiccup falls
/// back to the ledger; when the ledger cannot be counted the call is refused (it could not be recorded
/// either), so a cap never opens by failing.
async fn enforce_cap(state: &AppState, tenant: &plinth_core::id::TenantId, cap: i64) -> Result<(), ApiError> {
    let key = format!("cap:{tenant}");
    let cached = match state.cache.get(&key).await {
        Ok(Some(bytes)) => bytes.try_into().ok().map(i64::from_le_bytes),
        _ => None,
    };
    let used = match cached {
        Some(used) => used,
        None => {
            let used = state.store.units_this_period(tenant).await?;
            let _ = state.cache.set(&key, &used.to_le_bytes(), CAP_COUNT_TTL).await;
            used
        }
    };
    if used >= cap {
        return Err(ApiError::new(
            ErrorCode::QuotaExceeded,
            format!(
                "the plan's {cap} included calls for this period are used; upgrade the plan (POST /v1/subscription) to continue"
            ),
        ));
    }
    Ok(())
}

pub(crate) use plinth_store::metering::Billable;

/// Records one billable call and returns once it is durable.
pub(crate) async fn record_usage(
    state: &AppState,
    auth: &Principal,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    billable: Billable<'_>,
) -> Result<plinth_store::ledger::Recorded, ApiError> {
    Ok(state
        .meter
        .charge(auth, idempotency.0, request_id.0, billable)
        .await?)
}

/// Runs `work` and records its usage (see [`plinth_store::ledger::Meter::metered`]).
pub(crate) async fn metered<T>(
    state: &AppState,
    auth: &Principal,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    billable: Billable<'_>,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<(T, plinth_store::ledger::Recorded), ApiError> {
    state
        .meter
        .metered(auth, idempotency.0, request_id.0, billable, work)
        .await
}

/// Answers a metered call with `body`. `Idempotent-Replayed` says whether the ledger already held the
/// call's event (a retry whose first answer was lost: served again, not billed again).
pub(crate) fn billed_json(
    recorded: &plinth_store::ledger::Recorded,
    body: &impl serde::Serialize,
) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .insert_header(("Idempotent-Replayed", recorded.replayed.to_string()))
        .json(body)
}

/// The ledger keys of this call, chosen by the metering middleware, never by the client.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub CallKeys);

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl FromRequest for IdempotencyKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Self>()
                .cloned()
                .ok_or_else(|| ApiError::internal("a metered handler runs outside the metering middleware")),
        )
    }
}
