//! Plans, the tenant's subscription, and usage from the ledger.

use actix_web::web;
use chrono::{DateTime, NaiveDate, Utc};
use plinth_core::ErrorCode;
use plinth_core::api::{Plan, Subscription, UsageGrouping, UsageReport};
use plinth_core::billing::{ChangePlanRequest, InvoiceList, PlanChange, Statement};
use serde::Deserialize;

use crate::auth::{Auth, scope};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The plans on offer. Public: no credentials needed.
#[utoipa::path(get, path = "/v1/plans", operation_id = "list_plans", tag = "billing", responses((status = 200, body = Vec<Plan>)))]
pub async fn plans(state: web::Data<AppState>) -> ApiResult<web::Json<Vec<Plan>>> {
    Ok(web::Json(state.store.list_plans().await?))
}

/// The tenant's plan, status and current billing period.
#[utoipa::path(get, path = "/v1/subscription", operation_id = "get_subscription", tag = "billing", security(("bearer" = ["billing:read"])),
    responses((status = 200, body = Subscription), (status = 403, body = plinth_core::error::ErrorBody)))]
pub async fn subscription(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
) -> ApiResult<web::Json<Subscription>> {
    Ok(web::Json(state.store.subscription(&auth.tenant_id).await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Start, inclusive: RFC 3339 time or `YYYY-MM-DD` (UTC midnight), from 1970 to 9999. Default: 30
    /// days before `to`.
    from: Option<String>,
    /// End, exclusive: RFC 3339 time or `YYYY-MM-DD`, from 1970 to 9999. Default: now.
    to: Option<String>,
    /// `day` (default) or `resource`.
    group_by: Option<UsageGrouping>,
}

/// Whether a reporting period may name `date`: from 1970 to 9999. chrono's dates reach years
/// ±262143, where a period's default start (days earlier) or its end's next day would overflow.
pub(crate) fn within_reach(date: &impl chrono::Datelike) -> bool {
    (1970..=9999).contains(&date.year())
}

/// A time from 1970 to 9999 (see [`within_reach`]).
fn parse_time(field: &str, value: &str) -> ApiResult<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            NaiveDate::parse_from_str(value, "%Y-%m-%d").map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        })
        .ok()
        .filter(within_reach)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidQuery,
                format!("{field}: expected an RFC 3339 time or YYYY-MM-DD, from 1970 to 9999"),
            )
        })
}

/// A reporting period `[from, to)` from query parameters: `to` defaults to now, `from` to 30 days
/// before `to`.
pub(crate) fn period(from: Option<&str>, to: Option<&str>) -> ApiResult<(DateTime<Utc>, DateTime<Utc>)> {
    let to = to
        .map(|v| parse_time("to", v))
        .transpose()?
        .unwrap_or_else(Utc::now);
    let from = from
        .map(|v| parse_time("from", v))
        .transpose()?
        .unwrap_or(to - chrono::Duration::days(30));
    Ok((from, to))
}

/// Metered calls, units and amounts in a time range, by UTC day or by resource.
#[utoipa::path(get, path = "/v1/usage", operation_id = "usage_report", tag = "billing", security(("bearer" = ["billing:read"])),
    params(UsageParams),
    responses((status = 200, body = UsageReport), (status = 400, description = "`invalid_query`", body = plinth_core::error::ErrorBody)))]
pub async fn usage(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
    params: web::Query<UsageParams>,
) -> ApiResult<web::Json<UsageReport>> {
    let (from, to) = period(params.from.as_deref(), params.to.as_deref())?;
    let report = state
        .store
        .usage_report(&auth.tenant_id, from, to, params.group_by.unwrap_or_default())
        .await?;
    Ok(web::Json(report))
}

/// Subscribe to a plan or change plans. In local billing the change is immediate. With Stripe, a
/// first paid plan answers with a Checkout URL (the plan changes when Stripe confirms payment); a
/// tenant already paying moves at once, starting a new period; `free` cancels at period end.
#[utoipa::path(post, path = "/v1/subscription", operation_id = "change_plan", tag = "billing", security(("bearer" = ["admin"])),
    request_body = ChangePlanRequest,
    responses((status = 200, body = PlanChange),
        (status = 404, description = "`not_found`: no such plan", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`plan_not_purchasable`", body = plinth_core::error::ErrorBody),
        (status = 502, description = "`payment_provider_error`", body = plinth_core::error::ErrorBody)))]
pub async fn change_plan(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<ChangePlanRequest>,
) -> ApiResult<web::Json<PlanChange>> {
    Ok(web::Json(
        state
            .billing
            .change_plan(&auth.tenant_id, &body.plan, &auth.who())
            .await?,
    ))
}

/// Cancel at the end of the current period; the plan stays until then, then the tenant is on `free`.
#[utoipa::path(delete, path = "/v1/subscription", operation_id = "cancel_subscription", tag = "billing", security(("bearer" = ["admin"])),
    responses((status = 200, body = Subscription), (status = 502, body = plinth_core::error::ErrorBody)))]
pub async fn cancel(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
) -> ApiResult<web::Json<Subscription>> {
    Ok(web::Json(
        state.billing.cancel(&auth.tenant_id, &auth.who()).await?,
    ))
}

/// Statements of the tenant's closed periods, newest first, with Stripe's invoice where there is one.
#[utoipa::path(get, path = "/v1/invoices", operation_id = "list_invoices", tag = "billing", security(("bearer" = ["billing:read"])),
    responses((status = 200, body = InvoiceList)))]
pub async fn invoices(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
) -> ApiResult<web::Json<InvoiceList>> {
    Ok(web::Json(state.billing.invoices(&auth.tenant_id).await?))
}

/// The current period so far: subscription fee, included calls, overage and plugin fees, itemised.
#[utoipa::path(get, path = "/v1/invoices/upcoming", operation_id = "upcoming_invoice", tag = "billing", security(("bearer" = ["billing:read"])),
    responses((status = 200, body = Statement)))]
pub async fn upcoming(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
) -> ApiResult<web::Json<Statement>> {
    Ok(web::Json(state.billing.upcoming(&auth.tenant_id).await?))
}
