//! Members of the caller's tenant.

use actix_web::{HttpResponse, web};
use plinth_core::api::{AddMemberRequest, Member, UpdateMemberRequest};
use plinth_core::id::UserId;

use crate::auth::{Auth, scope};
use crate::error::ApiResult;
use crate::state::AppState;

/// List members and their roles.
#[utoipa::path(get, path = "/v1/members", operation_id = "list_members", tag = "members", security(("bearer" = [])),
    responses((status = 200, body = Vec<Member>)))]
pub async fn list(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Vec<Member>>> {
    Ok(web::Json(state.store.list_members(&auth.tenant_id).await?))
}

/// Add a user who has an account. Only owners may add owners.
#[utoipa::path(post, path = "/v1/members", operation_id = "add_member", tag = "members", security(("bearer" = ["admin"])),
    request_body = AddMemberRequest,
    responses(
        (status = 201, body = Member),
        (status = 404, description = "no user with that email", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`already_member`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn add(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<AddMemberRequest>,
) -> ApiResult<HttpResponse> {
    let member = state.store.add_member(&auth, &auth.who(), &body).await?;
    Ok(HttpResponse::Created().json(member))
}

/// Change a member's role. The last owner cannot be demoted.
#[utoipa::path(patch, path = "/v1/members/{user_id}", operation_id = "update_member", tag = "members", security(("bearer" = ["admin"])),
    params(("user_id" = UserId, Path)), request_body = UpdateMemberRequest,
    responses((status = 200, body = Member), (status = 409, description = "`last_owner`", body = plinth_core::error::ErrorBody)))]
pub async fn update(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    user_id: web::Path<UserId>,
    body: web::Json<UpdateMemberRequest>,
) -> ApiResult<web::Json<Member>> {
    Ok(web::Json(
        state
            .store
            .update_member(&auth, &auth.who(), &user_id, body.role)
            .await?,
    ))
}

/// Remove a member. The last owner cannot be removed.
#[utoipa::path(delete, path = "/v1/members/{user_id}", operation_id = "remove_member", tag = "members", security(("bearer" = ["admin"])),
    params(("user_id" = UserId, Path)),
    responses((status = 204), (status = 409, description = "`last_owner`", body = plinth_core::error::ErrorBody)))]
pub async fn remove(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    user_id: web::Path<UserId>,
) -> ApiResult<HttpResponse> {
    state.store.remove_member(&auth, &auth.who(), &user_id).await?;
    Ok(HttpResponse::NoContent().finish())
}
