//! Sign-up, login, logout and the caller's tenant.

use actix_web::{HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::api::{LoginRequest, Session, SignupRequest, Tenant};
use plinth_store::auth::Actor;

use crate::auth::Auth;
use crate::client::Origin;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// Create a tenant and its owner; returns a logged-in session.
#[utoipa::path(post, path = "/v1/signup", tag = "accounts", request_body = SignupRequest,
    responses(
        (status = 201, body = Session),
        (status = 409, description = "`email_taken`", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`rate_limited`: too many sign-ups from this address", body = plinth_core::error::ErrorBody),
    ))]
pub async fn signup(
    state: web::Data<AppState>,
    origin: Origin,
    body: web::Json<SignupRequest>,
) -> ApiResult<HttpResponse> {
    let session = state.store.signup(&body, &origin.who("anonymous")).await?;
    Ok(HttpResponse::Created().json(session))
}

/// Exchange email and password for a session token.
#[utoipa::path(post, path = "/v1/login", tag = "accounts", request_body = LoginRequest,
    responses(
        (status = 200, body = Session),
        (status = 401, description = "`invalid_login`", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`rate_limited`: too many attempts for this email or from this address", body = plinth_core::error::ErrorBody),
        (status = 503, description = "`unavailable`: too many password checks in progress", body = plinth_core::error::ErrorBody),
    ))]
pub async fn login(
    state: web::Data<AppState>,
    origin: Origin,
    body: web::Json<LoginRequest>,
) -> ApiResult<web::Json<Session>> {
    Ok(web::Json(
        state
            .store
            .login(
                state.cache.as_ref(),
                &body,
                &origin.who("anonymous"),
                &origin.login_network(),
                state.settings.limits.unauthenticated_global,
            )
            .await?,
    ))
}

/// End the session whose token authenticates this call.
#[utoipa::path(post, path = "/v1/logout", tag = "accounts", security(("bearer" = [])),
    responses((status = 204), (status = 422, description = "called with an API key", body = plinth_core::error::ErrorBody)))]
pub async fn logout(state: web::Data<AppState>, auth: Auth) -> ApiResult<HttpResponse> {
    let Actor::User { session, .. } = &auth.actor else {
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            "logout ends a session; to disable an API key, revoke it with DELETE /v1/api-keys/{id}",
        ));
    };
    state.store.logout(&auth.tenant_id, session).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The tenant the credentials belong to.
#[utoipa::path(get, path = "/v1/tenant", operation_id = "get_tenant", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = Tenant), (status = 401, body = plinth_core::error::ErrorBody)))]
pub async fn tenant(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Tenant>> {
    Ok(web::Json(state.store.tenant(&auth.tenant_id).await?))
}
