//! The plugin marketplace: authors publish, platform admins review, tenants install and invoke.

use actix_web::{HttpRequest, HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::id::{InstallationId, InvocationId, PluginVersionId};
use plinth_core::plugins::{
    CreatePluginRequest, Earnings, InstallRequest, Installation, InvocationRecord, InvocationSummary, Plugin,
    PluginVersion, RecordedInvocation, ReviewRequest, RevokeRequest, UpdateInstallationRequest,
};
use serde::Deserialize;

use crate::auth::{Auth, require_platform_admin, scope};
use crate::error::{ApiError, ApiResult};
use crate::metering::IdempotencyKey;
use crate::request_id::RequestId;
use crate::routes::billing::period;
use crate::state::AppState;

/// Create a listing; the caller's tenant is its author.
#[utoipa::path(post, path = "/v1/plugins", operation_id = "create_plugin", tag = "plugins", security(("bearer" = ["admin"])),
    request_body = CreatePluginRequest,
    responses((status = 201, body = Plugin), (status = 422, description = "`validation_failed`: bad or taken name", body = plinth_core::error::ErrorBody)))]
pub async fn create(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<CreatePluginRequest>,
) -> ApiResult<HttpResponse> {
    let plugin = state
        .store
        .create_plugin(&auth.tenant_id, &auth.who(), &body.name, &body.description)
        .await?;
    Ok(HttpResponse::Created().json(plugin))
}

/// One of the caller's listings with every version and its review state.
#[utoipa::path(get, path = "/v1/plugins/{name}", operation_id = "get_plugin", tag = "plugins", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = Plugin), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn get(
    state: web::Data<AppState>,
    auth: Auth,
    name: web::Path<String>,
) -> ApiResult<web::Json<Plugin>> {
    Ok(web::Json(
        state.store.authored_plugin(&auth.tenant_id, &name).await?,
    ))
}

/// Publish a version: multipart parts `manifest` (plugin.json) and `component` (the .wasm). Checked at
/// once (valid component, world version, size, imports within the declared capabilities, models, a
/// smoke run under limits); then it waits for a platform admin's review.
#[utoipa::path(post, path = "/v1/plugins/{name}/versions", operation_id = "publish_plugin_version", tag = "plugins", security(("bearer" = ["admin"])),
    params(("name" = String, Path)),
    request_body(content_type = "multipart/form-data", description = "parts: manifest, component"),
    responses(
        (status = 201, body = PluginVersion),
        (status = 413, description = "`payload_too_large`: a part past its limit, or the body's boundaries and part headers past 64 KiB", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`invalid_plugin`: the checks failed; the message says which", body = plinth_core::error::ErrorBody),
        (status = 408, description = "`request_timeout`: the body paused too long or took too long in all", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`plugin_versions_pending`: the author has as many versions awaiting review as it may", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`rate_limited`: the author's submissions per minute, or another of its submissions is still being checked; with `Retry-After`", body = plinth_core::error::ErrorBody),
        (status = 503, description = "`unavailable`: the replica is checking as many submissions as it takes at once, or its room for submissions arriving is taken (authors without a paid subscription: three quarters of each); with `Retry-After`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn publish(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    name: web::Path<String>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> ApiResult<HttpResponse> {
    let version = crate::plugins::publish(&state, &auth, &auth.who(), &name, &req, body).await?;
    Ok(HttpResponse::Created().json(version))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SearchParams {
    /// Words to find in names and descriptions.
    q: Option<String>,
}

/// The marketplace: listings with approved versions.
#[utoipa::path(get, path = "/v1/marketplace/plugins", operation_id = "marketplace", tag = "plugins", security(("bearer" = [])),
    params(SearchParams),
    responses((status = 200, body = Vec<Plugin>)))]
pub async fn marketplace(
    state: web::Data<AppState>,
    _auth: Auth,
    params: web::Query<SearchParams>,
) -> ApiResult<web::Json<Vec<Plugin>>> {
    Ok(web::Json(state.store.marketplace(params.q.as_deref()).await?))
}

/// Versions waiting for review (platform admins).
#[utoipa::path(get, path = "/v1/admin/plugin-versions", operation_id = "pending_plugin_versions", tag = "plugins", security(("bearer" = [])),
    responses((status = 200, body = Vec<PluginVersion>), (status = 403, body = plinth_core::error::ErrorBody)))]
pub async fn pending(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Vec<PluginVersion>>> {
    require_platform_admin(&auth, "review plugins")?;
    Ok(web::Json(state.store.pending_versions().await?))
}

/// Approve or reject a version (platform admins). Rejecting an approved version stops the
/// installations that run it, as revoking does.
#[utoipa::path(post, path = "/v1/admin/plugin-versions/{id}/review", operation_id = "review_plugin_version", tag = "plugins", security(("bearer" = [])),
    params(("id" = String, Path)),
    request_body = ReviewRequest,
    responses((status = 200, body = PluginVersion), (status = 403, body = plinth_core::error::ErrorBody), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn review(
    state: web::Data<AppState>,
    auth: Auth,
    id: web::Path<PluginVersionId>,
    body: web::Json<ReviewRequest>,
) -> ApiResult<web::Json<PluginVersion>> {
    require_platform_admin(&auth, "review plugins")?;
    let ReviewRequest { approve, note } = body.into_inner();
    Ok(web::Json(
        state
            .store
            .review_version(&auth.who(), &id, approve, note)
            .await?,
    ))
}

/// Revoke a version (platform admins): a kill switch for a harmful plugin. Every installation running
/// it answers `plugin_revoked` from the next call, on every replica; it leaves the marketplace.
/// Revoking is final; the reason is shown to the author and to the tenants.
#[utoipa::path(post, path = "/v1/admin/plugin-versions/{id}/revoke", operation_id = "revoke_plugin_version", tag = "plugins", security(("bearer" = [])),
    params(("id" = String, Path)),
    request_body = RevokeRequest,
    responses((status = 200, body = PluginVersion), (status = 403, body = plinth_core::error::ErrorBody),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`: a reason is required", body = plinth_core::error::ErrorBody)))]
pub async fn revoke(
    state: web::Data<AppState>,
    auth: Auth,
    id: web::Path<PluginVersionId>,
    body: web::Json<RevokeRequest>,
) -> ApiResult<web::Json<PluginVersion>> {
    require_platform_admin(&auth, "revoke plugins")?;
    let version = state.store.revoke_version(&auth.who(), &id, &body.reason).await?;
    state.marketplace.host().forget(&version.sha256).await;
    Ok(web::Json(version))
}

/// Install an approved version, approving the capabilities and models it asks for.
#[utoipa::path(post, path = "/v1/installations", operation_id = "install_plugin", tag = "plugins", security(("bearer" = ["admin"])),
    request_body = InstallRequest,
    responses(
        (status = 201, body = Installation),
        (status = 409, description = "`plugin_not_approved`", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`: grants do not cover the manifest", body = plinth_core::error::ErrorBody),
    ))]
pub async fn install(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<InstallRequest>,
) -> ApiResult<HttpResponse> {
    let installation = state.marketplace.install(&auth, &auth.who(), &body).await?;
    Ok(HttpResponse::Created().json(installation))
}

/// The tenant's installations.
#[utoipa::path(get, path = "/v1/installations", operation_id = "list_installations", tag = "plugins", security(("bearer" = [])),
    responses((status = 200, body = Vec<Installation>)))]
pub async fn list(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Vec<Installation>>> {
    Ok(web::Json(state.store.installations(&auth.tenant_id).await?))
}

/// How many invocation records to return.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct InvocationsQuery {
    /// 1-200; 50 when absent.
    limit: Option<u64>,
}

/// The installation's newest invocations, newest first: how each ended (`ok` or the error code it
/// answered), its duration, compute units and what the plugin logged. The newest 100 per
/// installation are kept (`PLINTH_INVOCATION_RECORDS`), for 7 days (`PLINTH_INVOCATION_RETENTION_DAYS`).
#[utoipa::path(get, path = "/v1/installations/{id}/invocations", operation_id = "list_invocations", tag = "plugins",
    security(("bearer" = ["plugins"])),
    params(("id" = String, Path), InvocationsQuery),
    responses((status = 200, body = Vec<InvocationRecord>), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn invocations(
    state: web::Data<AppState>,
    auth: Auth<scope::Plugins>,
    id: web::Path<InstallationId>,
    query: web::Query<InvocationsQuery>,
) -> ApiResult<web::Json<Vec<InvocationRecord>>> {
    let limit = query.limit.unwrap_or(50);
    Ok(web::Json(
        state
            .store
            .installation_invocations(&auth.tenant_id, &id, limit)
            .await?,
    ))
}

/// One invocation recorded in full: its request, the installation's settings (secrets' names only) and
/// every call the plugin made to the platform with the answer it got. What `plinth-cli plugin replay`
/// runs a component against; the tenant may hand it to the plugin's author. Invocations are recorded
/// when invoked with `Plinth-Record: full`, or when they fail on an installation with
/// `record_failures`.
#[utoipa::path(get, path = "/v1/installations/{id}/invocations/{invocation}/record", operation_id = "get_invocation_record",
    tag = "plugins", security(("bearer" = ["plugins"])),
    params(("id" = String, Path), ("invocation" = String, Path)),
    responses((status = 200, body = RecordedInvocation),
        (status = 404, description = "No such invocation, or it was not recorded in full", body = plinth_core::error::ErrorBody)))]
pub async fn invocation_record(
    state: web::Data<AppState>,
    auth: Auth<scope::Plugins>,
    path: web::Path<(InstallationId, InvocationId)>,
) -> ApiResult<web::Json<RecordedInvocation>> {
    let (installation, invocation) = path.into_inner();
    Ok(web::Json(
        state
            .store
            .recorded_invocation(&auth.tenant_id, &installation, &invocation)
            .await?,
    ))
}

/// How often the author's plugin was called, per version and UTC day, across the tenants that called
/// it, for days on which at least three tenants besides the author's own did. Never who called, with
/// what, what it logged, whether a call failed, nor a single call's duration or cost: values the plugin
/// controls could carry a tenant's data out to its author.
#[utoipa::path(get, path = "/v1/plugins/{name}/invocations", operation_id = "invocation_summary", tag = "plugins",
    security(("bearer" = ["admin"])),
    params(("name" = String, Path)),
    responses((status = 200, body = Vec<InvocationSummary>), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn invocation_summary(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    name: web::Path<String>,
) -> ApiResult<web::Json<Vec<InvocationSummary>>> {
    Ok(web::Json(
        state.store.invocation_summary(&auth.tenant_id, &name).await?,
    ))
}

/// Upgrade (or move to another approved version), or replace settings or secrets.
#[utoipa::path(patch, path = "/v1/installations/{id}", operation_id = "update_installation", tag = "plugins", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    request_body = UpdateInstallationRequest,
    responses((status = 200, body = Installation), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn update(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<InstallationId>,
    body: web::Json<UpdateInstallationRequest>,
) -> ApiResult<web::Json<Installation>> {
    Ok(web::Json(
        state
            .marketplace
            .update_installation(&auth, &auth.who(), &id, &body)
            .await?,
    ))
}

/// Uninstall: the installation and its stored state are removed.
#[utoipa::path(delete, path = "/v1/installations/{id}", operation_id = "uninstall_plugin", tag = "plugins", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn uninstall(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<InstallationId>,
) -> ApiResult<HttpResponse> {
    state.store.uninstall(&auth.tenant_id, &auth.who(), &id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Invoke an installed plugin: the JSON body is its request, its JSON answer is the response. Billed
/// once at the plugin's price (plus the model calls it makes); `Plinth-Compute-Units` reports the
/// compute it used, `Plinth-Invocation-Id` its record. With `Plinth-Record: full` the invocation is
/// recorded in full, for replay (`GET …/invocations/{invocation}/record`).
#[utoipa::path(post, path = "/v1/installations/{id}/invoke", operation_id = "invoke_plugin", tag = "plugins", security(("bearer" = ["plugins"])),
    params(("id" = String, Path), ("Idempotency-Key" = Option<String>, Header),
        ("Plinth-Record" = Option<String>, Header, description = "`full`: record the request, every host call and its answer")),
    request_body = serde_json::Value,
    responses(
        (status = 200, description = "The plugin's answer", body = serde_json::Value),
        (status = 400, description = "`plugin_rejected_request`", body = plinth_core::error::ErrorBody),
        (status = 402, description = "`payment_required`: a priced plugin and no paid subscription", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`idempotency_in_flight`, with `Retry-After`", body = plinth_core::error::ErrorBody),
        (status = 410, description = "`plugin_revoked`: the platform withdrew the installed version", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`plugin_limit_exceeded`; `idempotency_key_reused`", body = plinth_core::error::ErrorBody),
        (status = 502, description = "`plugin_failed`", body = plinth_core::error::ErrorBody),
        (status = 504, description = "`plugin_timeout`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn invoke(
    state: web::Data<AppState>,
    auth: Auth<scope::Plugins>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    id: web::Path<InstallationId>,
    http: HttpRequest,
    body: web::Json<serde_json::Value>,
) -> ApiResult<HttpResponse> {
    let record = match http.headers().get("Plinth-Record").map(|v| v.to_str()) {
        None => false,
        Some(Ok("full")) => true,
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidHeader,
                "Plinth-Record: the only value is `full`",
            ));
        }
    };
    let invocation = plinth_marketplace::Invocation {
        installation: &id,
        keys: idempotency.0,
        request_id: request_id.0,
        request: &body,
        record,
    };
    let (invoked, recorded) = state.marketplace.invoke(&auth, invocation).await?;
    let mut response = HttpResponse::Ok();
    response
        .insert_header(("Idempotent-Replayed", recorded.replayed.to_string()))
        .insert_header(("Plinth-Compute-Units", invoked.outcome.compute_units.to_string()));
    if let Some(invocation) = &invoked.invocation {
        response.insert_header(("Plinth-Invocation-Id", invocation.to_string()));
    }
    Ok(response
        .content_type("application/json")
        .body(invoked.outcome.response))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EarningsParams {
    /// Start (RFC 3339 or YYYY-MM-DD), moved back to the start of its UTC day; 30 days before `to` by
    /// default.
    from: Option<String>,
    /// End, exclusive, moved on to the end of its UTC day; now by default.
    to: Option<String>,
}

/// What the caller's plugins earned: invocations, what tenants paid, and the author's share. Counted
/// over whole UTC days (`from` and `to` in the answer say which): the calls are other tenants', and a
/// shorter window would tell when a particular tenant called.
#[utoipa::path(get, path = "/v1/author/earnings", operation_id = "author_earnings", tag = "plugins", security(("bearer" = ["billing:read"])),
    params(EarningsParams),
    responses((status = 200, body = Earnings)))]
pub async fn earnings(
    state: web::Data<AppState>,
    auth: Auth<scope::BillingRead>,
    params: web::Query<EarningsParams>,
) -> ApiResult<web::Json<Earnings>> {
    let (from, to) = period(params.from.as_deref(), params.to.as_deref())?;
    Ok(web::Json(
        state
            .store
            .author_earnings(
                &auth.tenant_id,
                from,
                to,
                state.marketplace.settings().author_share_bps,
            )
            .await?,
    ))
}
