//! A metered no-op. It runs the whole path of a billable call (key, rate limit, ledger) without doing
//! any work, so developers can check their integration and operators can measure the platform's own
//! overhead. Its price is zero; it still appears in usage.

use actix_web::{HttpResponse, web};
use plinth_core::Micros;
use plinth_core::api::EchoResponse;

use crate::auth::Auth;
use crate::error::ApiResult;
use crate::metering::{Billable, IdempotencyKey, record_usage};
use crate::request_id::RequestId;
use crate::state::AppState;

/// Echo the JSON body back, metered as one call. A retry with the same `Idempotency-Key` and body gets
/// the first answer back, byte for byte, with `Idempotent-Replayed: true`, and is not billed again.
#[utoipa::path(post, path = "/v1/echo", tag = "metering", security(("bearer" = [])),
    request_body = serde_json::Value,
    params(("Idempotency-Key" = Option<String>, Header, description = "Names this request for 24 hours: 1-255 visible ASCII characters. Retries get the stored answer; another request under it is refused")),
    responses(
        (status = 200, body = EchoResponse, headers(
            ("RateLimit-Limit" = u32), ("RateLimit-Remaining" = u32), ("RateLimit-Reset" = u32),
            ("Idempotent-Replayed" = bool))),
        (status = 429, description = "`rate_limited`, with `Retry-After`", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`idempotency_in_flight`: the same keyed request is still running; retry after `Retry-After`", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`idempotency_key_reused`: the key names another request", body = plinth_core::error::ErrorBody),
    ))]
pub async fn echo(
    state: web::Data<AppState>,
    auth: Auth,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    body: web::Json<serde_json::Value>,
) -> ApiResult<HttpResponse> {
    let free = Billable {
        kind: "echo",
        resource: "echo",
        units: 1,
        unit_price: Micros::ZERO,
        author_share: Micros::ZERO,
    };
    let recorded = record_usage(&state, &auth, idempotency, request_id, free).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("Idempotent-Replayed", recorded.replayed.to_string()))
        .json(EchoResponse {
            echo: body.into_inner(),
            usage_event_id: recorded.event_id,
            replayed: recorded.replayed,
        }))
}
