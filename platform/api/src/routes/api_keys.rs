//! API keys of the caller's tenant.

use actix_web::{HttpResponse, web};
use plinth_core::api::{ApiKey, CreateApiKeyRequest, CreatedApiKey};
use plinth_core::id::KeyId;

use crate::auth::{Auth, scope};
use crate::error::ApiResult;
use crate::state::AppState;

/// List the tenant's keys (secrets are never shown again).
#[utoipa::path(get, path = "/v1/api-keys", operation_id = "list_api_keys", tag = "api keys", security(("bearer" = ["admin"])),
    responses((status = 200, body = Vec<ApiKey>), (status = 403, body = plinth_core::error::ErrorBody)))]
pub async fn list(state: web::Data<AppState>, auth: Auth<scope::Admin>) -> ApiResult<web::Json<Vec<ApiKey>>> {
    Ok(web::Json(state.store.list_api_keys(&auth.tenant_id).await?))
}

/// Create a key. The response holds the secret; it is shown only once.
#[utoipa::path(post, path = "/v1/api-keys", operation_id = "create_api_key", tag = "api keys", security(("bearer" = ["admin"])),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, body = CreatedApiKey),
        (status = 403, description = "`insufficient_scope`: granting a scope the caller lacks", body = plinth_core::error::ErrorBody),
        (status = 422, body = plinth_core::error::ErrorBody),
    ))]
pub async fn create(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<CreateApiKeyRequest>,
) -> ApiResult<HttpResponse> {
    let created = state.store.create_api_key(&auth, &auth.who(), &body).await?;
    Ok(HttpResponse::Created().json(created))
}

/// Revoke a key. It stops working within a second on every replica.
#[utoipa::path(delete, path = "/v1/api-keys/{id}", operation_id = "revoke_api_key", tag = "api keys", security(("bearer" = ["admin"])),
    params(("id" = KeyId, Path)),
    responses((status = 200, body = ApiKey), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn revoke(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<KeyId>,
) -> ApiResult<web::Json<ApiKey>> {
    Ok(web::Json(
        state.store.revoke_api_key(&auth, &auth.who(), &id).await?,
    ))
}
