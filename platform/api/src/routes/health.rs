//! Liveness, readiness (Open Inference Protocol v2 paths, as Kubernetes probes and Triton clients expect)
//! and Prometheus metrics.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::api::{ServerLive, ServerReady};
use plinth_core::error::ErrorBody;

use crate::error::ApiError;

use crate::state::AppState;

/// The process is up.
#[utoipa::path(get, path = "/v2/health/live", operation_id = "server_live", tag = "operations", responses((status = 200, body = ServerLive)))]
pub async fn live() -> web::Json<ServerLive> {
    web::Json(ServerLive { live: true })
}

/// The database answers, the platform's models serve and the tenants' models have been read from the
/// registry since start-up (each loads on its first call); 503 otherwise. The cache (Redis) is not
/// part of it: without the cache a replica still serves (rate limits fall back to each replica's own,
/// see the README), so pulling every replica out of rotation for it would only turn a degraded
/// service into an outage. A tenant's own model failing is that model's readiness, not the server's.
#[utoipa::path(get, path = "/v2/health/ready", operation_id = "server_ready", tag = "operations",
    responses((status = 200, body = ServerReady), (status = 503, body = ServerReady)))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return HttpResponse::ServiceUnavailable().json(ServerReady { ready: false });
    }
    let database = state.store.ping().await;
    if let Err(err) = &database {
        tracing::warn!(error = %err, "readiness: database unavailable");
    }
    let failing = state.models.platform_not_serving();
    if !failing.is_empty() {
        tracing::warn!(models = ?failing, "readiness: platform models cannot serve");
    }
    let known = state.models.knows_tenant_models();
    let ready = database.is_ok() && failing.is_empty() && known;
    let mut response = if ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(ServerReady { ready })
}

/// Prometheus text exposition, for the holder of the metrics token (`PLINTH_METRICS_TOKEN`); 404 when
/// none is configured (metrics are then only on their own listener, `PLINTH_METRICS_ADDR`).
#[utoipa::path(get, path = "/metrics", tag = "operations", security(("bearer" = [])),
    responses((status = 200, content_type = "text/plain"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn metrics(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let Some(token) = &state.settings.metrics_token else {
        return Err(ApiError::new(
            ErrorCode::RouteNotFound,
            "metrics are not served on this listener",
        ));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !token.admits(presented.trim()) {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            "send `Authorization: Bearer <metrics token>`",
        ));
    }
    Ok(crate::metrics::exposition())
}
