//! What every metered route shares: rate limiting by plan (and per key where set) before the handler
//! runs, `RateLimit-*` headers on the way out, and the `Idempotency-Key` that makes retries free.

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpRequest, web};
use std::task::Poll;

use futures_util::future::{Ready, ready};
use plinth_core::{ErrorCode, Micros};
use plinth_store::auth::{Actor, Principal};
use plinth_store::cache::{Quota, RateDecision};
use plinth_store::ledger::MAX_IDEMPOTENCY_KEY_LEN;
use plinth_store::ledger::UsageRecord;

use crate::auth::authenticate;
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

pub(crate) async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("application state is not registered"))?;
    let principal = authenticate(req.request()).await?;

    // The narrower per-key limit first, so a throttled key does not spend its tenant's budget.
    let mut decision = None;
    if let Actor::ApiKey {
        id,
        rate_limit: Some(quota),
    } = &principal.actor
    {
        decision = check(&state, &format!("key:{id}"), *quota).await;
        if let Some(refused) = decision.filter(|d| !d.allowed) {
            return Err(ApiError::rate_limited(refused).into());
        }
    }
    if let Some(tenant) = check(
        &state,
        &format!("tenant:{}", principal.tenant_id),
        principal.tenant_quota,
    )
    .await
    {
        if !tenant.allowed {
            return Err(ApiError::rate_limited(tenant).into());
        }
        if decision.is_none_or(|key| tenant.remaining < key.remaining) {
            decision = Some(tenant);
        }
    }

    if let Some(cap) = principal.call_cap {
        enforce_cap(&state, &principal.tenant_id, cap).await?;
    }

    let mut response = next.call(req).await?;
    if let Some(decision) = &decision {
        insert_rate_headers(response.headers_mut(), decision);
    }
    Ok(response)
}

/// How long a tenant's count of units this period is reused before it is read from the ledger again.
/// A capped tenant can overshoot its cap by what its rate limit lets through in this window.
const CAP_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses a call once a capped plan's included calls for the period are used. The count comes from
/// the ledger, cached briefly (in Redis in production, so replicas share it). A cache or database
/// hiccup lets the call through, as the rate limiter does.
async fn enforce_cap(state: &AppState, tenant: &plinth_core::id::TenantId, cap: i64) -> Result<(), ApiError> {
    let key = format!("cap:{tenant}");
    let cached = match state.cache.get(&key).await {
        Ok(Some(bytes)) => bytes.try_into().ok().map(i64::from_le_bytes),
        _ => None,
    };
    let used = match cached {
        Some(used) => used,
        None => match state.store.units_this_period(tenant).await {
            Ok(used) => {
                let _ = state.cache.set(&key, &used.to_le_bytes(), CAP_COUNT_TTL).await;
                used
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot count usage against the plan's cap; allowing the call");
                return Ok(());
            }
        },
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

/// What one call bills: `units` of a resource at `unit_price` each.
#[derive(Debug, Clone)]
pub(crate) struct Billable<'a> {
    pub kind: &'a str,
    pub resource: &'a str,
    pub units: usize,
    pub unit_price: Micros,
    /// What of the amount accrues to a plugin's author.
    pub author_share: Micros,
}

impl<'a> Billable<'a> {
    /// A model call: one unit per item, at the plan's per-call price.
    pub(crate) fn model(auth: &Principal, name: &'a str, units: usize) -> Self {
        Self {
            kind: "model",
            resource: name,
            units,
            unit_price: auth.price_per_call,
            author_share: Micros::ZERO,
        }
    }
}

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
        .record(UsageRecord {
            tenant_id: auth.tenant_id.clone(),
            api_key_id: auth.api_key_id().cloned(),
            resource_kind: billable.kind.to_owned(),
            resource_id: billable.resource.to_owned(),
            units: i64::try_from(billable.units).unwrap_or(i64::MAX),
            unit_price: billable.unit_price,
            author_share: billable.author_share,
            idempotency_key: idempotency.0,
            request_id: request_id.0,
        })
        .await?)
}

/// Runs `work` and records its usage; returns when both are done, so the answer still waits for a
/// durable event, but the event's commit (an fsync) overlaps the work instead of following it.
///
/// Work that fails before it waits for anything (bad input, a full queue) is refused without touching
/// the ledger. Work that fails later has its event withdrawn, so only served calls are billed; a replay
/// never withdraws the event of the call it repeats. One race is resolved in the client's favour: when
/// two attempts with the same key run at once and the one that wrote the event fails while the other
/// succeeds, that call goes unbilled.
pub(crate) async fn metered<T>(
    state: &AppState,
    auth: &Principal,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    billable: Billable<'_>,
    work: impl Future<Output = Result<T, ApiError>>,
) -> Result<(T, plinth_store::ledger::Recorded), ApiError> {
    let mut work = std::pin::pin!(work);
    // One poll: does the work finish (or fail) without waiting?
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    if let Poll::Ready(outcome) = first {
        let value = outcome?;
        let recorded = record_usage(state, auth, idempotency, request_id, billable).await?;
        return Ok((value, recorded));
    }
    let (outcome, recorded) =
        tokio::join!(work, record_usage(state, auth, idempotency, request_id, billable));
    match (outcome, recorded) {
        (Ok(value), Ok(recorded)) => Ok((value, recorded)),
        (Err(err), Ok(recorded)) => {
            if !recorded.replayed
                && let Err(withdraw) = state
                    .store
                    .withdraw_usage_event(&auth.tenant_id, &recorded.event_id)
                    .await
            {
                tracing::error!(error = %withdraw, event = %recorded.event_id,
                    "a failed call's usage event could not be withdrawn");
            }
            Err(err)
        }
        (_, Err(err)) => Err(err),
    }
}

/// Answers a metered call with `body`; a replayed idempotency key is marked with
/// `Idempotent-Replayed: true` (served again, not billed again).
pub(crate) fn billed_json(
    recorded: &plinth_store::ledger::Recorded,
    body: &impl serde::Serialize,
) -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .insert_header(("Idempotent-Replayed", recorded.replayed.to_string()))
        .json(body)
}

/// The client's `Idempotency-Key`, or one derived from the request id when none was sent (then every
/// request is its own call).
#[derive(Debug, Clone)]
pub struct IdempotencyKey(pub String);

pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl FromRequest for IdempotencyKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let Some(value) = req.headers().get(IDEMPOTENCY_HEADER) else {
            let request_id = RequestId::from_request(req, payload).into_inner().map(|id| id.0);
            return ready(
                request_id
                    .map(|id| Self(format!("auto:{id}")))
                    .map_err(ApiError::internal),
            );
        };
        let valid = value.to_str().ok().filter(|v| {
            !v.is_empty() && v.len() <= MAX_IDEMPOTENCY_KEY_LEN && v.bytes().all(|b| b.is_ascii_graphic())
        });
        ready(valid.map(|v| Self(v.to_owned())).ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidHeader,
                format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"),
            )
        }))
    }
}
