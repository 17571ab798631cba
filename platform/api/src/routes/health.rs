//! Liveness, readiness (Open Inference Protocol v2 paths, as Kubernetes probes and Triton clients expect)
//! and Prometheus metrics.

use actix_web::{HttpResponse, web};
use plinth_core::api::{ServerLive, ServerReady};

use crate::state::AppState;

/// The process is up.
#[utoipa::path(get, path = "/v2/health/live", tag = "operations", responses((status = 200, body = ServerLive)))]
pub async fn live() -> web::Json<ServerLive> {
    web::Json(ServerLive { live: true })
}

/// The database and the cache answer; 503 otherwise.
#[utoipa::path(get, path = "/v2/health/ready", tag = "operations",
    responses((status = 200, body = ServerReady), (status = 503, body = ServerReady)))]
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let database = state.store.ping().await;
    let cache = state.cache.ping().await;
    if let Err(err) = &database {
        tracing::warn!(error = %err, "readiness: database unavailable");
    }
    if let Err(err) = &cache {
        tracing::warn!(error = %err, "readiness: cache unavailable");
    }
    let ready = database.is_ok() && cache.is_ok();
    let mut response = if ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response.json(ServerReady { ready })
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
