//! The audit log, as its readers see it: a tenant's admins read their tenant's entries; platform
//! admins read every entry, the platform's own acts included.

use actix_web::web;
use plinth_core::ErrorCode;
use plinth_core::api::AuditPage;
use plinth_core::id::TenantId;
use plinth_store::audit::AuditQuery;
use serde::Deserialize;

use crate::auth::{Auth, scope};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Entries older than this entry id: the previous page's `next_before`.
    before: Option<String>,
    /// Entries per page, 1 to 200 (default 50).
    limit: Option<u64>,
    /// Only actions starting with this, e.g. `login` or `plugin.`.
    action: Option<String>,
    /// Platform admins: only this tenant's entries (default: every entry).
    tenant: Option<TenantId>,
}

/// Security-relevant acts, newest first: logins (succeeded and failed), keys, members, plan changes
/// (by the API and by Stripe), installations (settings and secret *names*), model uploads and
/// deletes, payouts, and platform admins' acts; each with its actor, time, client address and user
/// agent.
#[utoipa::path(get, path = "/v1/audit-log", operation_id = "audit_log", tag = "accounts", security(("bearer" = ["admin"])),
    params(AuditParams),
    responses((status = 200, body = AuditPage),
        (status = 403, body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`: limit out of range", body = plinth_core::error::ErrorBody)))]
pub async fn list(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    params: web::Query<AuditParams>,
) -> ApiResult<web::Json<AuditPage>> {
    let platform_admin = crate::auth::is_platform_admin(&auth);
    if platform_admin {
        // Operators read every tenant's log, and the platform's own entries.
        plinth_store::row_security::open_to_operator();
    }
    let params = params.into_inner();
    let tenant = match (platform_admin, params.tenant) {
        (true, tenant) => tenant,
        (false, Some(asked)) if asked != auth.tenant_id => {
            return Err(ApiError::new(ErrorCode::NotFound, "no such tenant"));
        }
        (false, _) => Some(auth.tenant_id.clone()),
    };
    let query = AuditQuery {
        tenant,
        before: params.before,
        action_prefix: params.action,
        limit: params.limit.unwrap_or(50),
    };
    Ok(web::Json(state.store.audit_log(&query).await?))
}
