//! Stripe's webhook, plugin authors' payouts, and the operators' billing controls.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::Utc;
use plinth_core::billing::{
    ConnectOnboarding, MarkPaidRequest, Payout, PayoutRequest, PayoutRun, ProviderInvoice, Reconciliation,
    SyncReport,
};

use crate::auth::{Auth, require_platform_admin, scope};
use crate::error::ApiResult;
use crate::state::AppState;

/// Stripe's events. Authenticated by the `Stripe-Signature` header over the raw body; each event id is
/// applied once, and an event older than the state it describes changes nothing.
#[utoipa::path(post, path = "/v1/webhooks/stripe", tag = "payments",
    request_body(content = String, description = "A Stripe event, exactly as Stripe sent it", content_type = "application/json"),
    responses((status = 200, description = "Received (new or duplicate)"),
        (status = 400, description = "`invalid_signature`", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`payments_not_configured`", body = plinth_core::error::ErrorBody)))]
pub async fn stripe_webhook(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let signature = req
        .headers()
        .get("Stripe-Signature")
        .and_then(|value| value.to_str().ok());
    let new = state.billing.receive_webhook(signature, &body).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "received": true, "duplicate": !new })))
}

/// Connect a Stripe account to be paid plugin earnings: creates it on first call and answers with a
/// fresh onboarding link.
#[utoipa::path(post, path = "/v1/author/connect", operation_id = "connect_payouts", tag = "payments", security(("bearer" = ["admin"])),
    responses((status = 200, body = ConnectOnboarding),
        (status = 409, description = "`payments_not_configured`", body = plinth_core::error::ErrorBody)))]
pub async fn connect(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
) -> ApiResult<web::Json<ConnectOnboarding>> {
    Ok(web::Json(state.billing.connect(&auth.tenant_id).await?))
}

/// The author's payouts, newest month first.
#[utoipa::path(get, path = "/v1/author/payouts", operation_id = "author_payouts", tag = "payments", security(("bearer" = ["billing:read"])),
    responses((status = 200, body = Vec<Payout>)))]
pub async fn payouts(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
) -> ApiResult<web::Json<Vec<Payout>>> {
    Ok(web::Json(state.billing.payouts(&auth.tenant_id).await?))
}

/// Pay every onboarded author what tenants paid for their plugins up to the end of a month that has
/// ended, less what was paid before (platform admins). Rerunning is safe, at any age: each payout is
/// recorded before its transfer, and one whose outcome was lost is looked up on Stripe before retrying.
#[utoipa::path(post, path = "/v1/admin/payouts", operation_id = "run_payouts", tag = "payments", security(("bearer" = [])),
    request_body = PayoutRequest,
    responses((status = 200, body = PayoutRun), (status = 403, body = plinth_core::error::ErrorBody),
        (status = 422, body = plinth_core::error::ErrorBody)))]
pub async fn run_payouts(
    state: web::Data<AppState>,
    auth: Auth,
    body: web::Json<PayoutRequest>,
) -> ApiResult<web::Json<PayoutRun>> {
    require_platform_admin(&auth, "run payouts")?;
    Ok(web::Json(
        state
            .billing
            .run_payouts(&body.period, Utc::now(), &auth.who())
            .await?,
    ))
}

/// Local billing: record that a tenant paid the statement of one of its closed periods (platform
/// admins), so the plugin fees on it become payable to their authors. Stripe mode learns this from
/// Stripe (`409 managed_by_payment_provider`).
#[utoipa::path(post, path = "/v1/admin/statements/paid", operation_id = "mark_statement_paid", tag = "payments", security(("bearer" = [])),
    request_body = MarkPaidRequest,
    responses((status = 200, body = ProviderInvoice), (status = 403, body = plinth_core::error::ErrorBody),
        (status = 404, description = "`not_found`: no closed statement starts then", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`managed_by_payment_provider`", body = plinth_core::error::ErrorBody)))]
pub async fn mark_paid(
    state: web::Data<AppState>,
    auth: Auth,
    body: web::Json<MarkPaidRequest>,
) -> ApiResult<web::Json<ProviderInvoice>> {
    require_platform_admin(&auth, "record payments")?;
    Ok(web::Json(
        state
            .billing
            .mark_statement_paid(&body.tenant_id, body.period_start, &auth.who())
            .await?,
    ))
}

/// Push settled usage to Stripe now instead of at the next interval (platform admins).
#[utoipa::path(post, path = "/v1/admin/billing/sync", operation_id = "sync_usage", tag = "payments", security(("bearer" = [])),
    responses((status = 200, body = SyncReport), (status = 403, body = plinth_core::error::ErrorBody)))]
pub async fn sync(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<SyncReport>> {
    require_platform_admin(&auth, "run the usage sync")?;
    let report = state.billing.sync_now().await?;
    state
        .store
        .audit(None, &auth.who(), "billing.sync", None, serde_json::json!(report))
        .await?;
    Ok(web::Json(report))
}

/// Ledger totals against what Stripe's meters were sent, per tenant and meter (platform admins).
#[utoipa::path(get, path = "/v1/admin/billing/reconciliation", operation_id = "billing_reconciliation", tag = "payments", security(("bearer" = [])),
    responses((status = 200, body = Reconciliation), (status = 403, body = plinth_core::error::ErrorBody)))]
pub async fn reconciliation(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Reconciliation>> {
    require_platform_admin(&auth, "reconcile billing")?;
    Ok(web::Json(state.billing.reconcile().await?))
}
