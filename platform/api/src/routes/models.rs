//! Models as people use them: list what is callable, and the task endpoints that take text.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::inference::{ClassifyResponse, EmbedResponse, Model, Task, TextRequest};
use plinth_inference::LoadedModel;

use crate::auth::{Auth, scope};
use crate::error::{ApiError, ApiResult};
use crate::metering::{Billable, IdempotencyKey, billed_json, metered};
use crate::request_id::RequestId;
use crate::routes::inference::JSON_ANSWER_ELEMENTS;
use crate::state::AppState;

/// The caller's share of a contended model: its tenant, and its plan's weight.
pub(crate) use plinth_hosting::share;

/// The model `name` as the caller's tenant sees it (loaded again if it was let go), or 404.
pub(crate) async fn find_model(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    name: &str,
) -> ApiResult<Arc<LoadedModel>> {
    Ok(state.hosting.find(&auth.tenant_id, &auth.isolation, name).await?)
}

/// The model `name` for texts it can run for `task`: they are checked against its description first,
/// so a call that cannot run loads nothing (a model is loaded only for calls that run, and are billed).
async fn text_model(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    name: &str,
    texts: &[String],
    task: Task,
) -> ApiResult<Arc<LoadedModel>> {
    plinth_inference::check_texts(&state.hosting.describe(&auth.tenant_id, name)?, texts, task)?;
    find_model(state, auth, name).await
}

/// Models the caller can use: the platform's and the tenant's own.
#[utoipa::path(get, path = "/v1/models", operation_id = "list_models", tag = "models", security(("bearer" = [])),
    responses((status = 200, body = Vec<Model>)))]
pub async fn list(state: web::Data<AppState>, auth: Auth) -> web::Json<Vec<Model>> {
    web::Json(state.models.visible_to(&auth.tenant_id))
}

/// One model: task, labels, tensors and the execution provider serving it. Described without
/// loading it, so asking does not push other tenants' models out of memory.
#[utoipa::path(get, path = "/v1/models/{name}", operation_id = "get_model", tag = "models", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = Model), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn get(
    state: web::Data<AppState>,
    auth: Auth,
    name: web::Path<String>,
) -> ApiResult<web::Json<Model>> {
    Ok(web::Json(state.hosting.describe(&auth.tenant_id, &name)?))
}

/// Classify texts: each gets every label's probability and the most likely label. Billed per text.
#[utoipa::path(post, path = "/v1/models/{name}/classify", tag = "models", security(("bearer" = ["inference"])),
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = TextRequest,
    responses(
        (status = 200, body = ClassifyResponse),
        (status = 400, description = "`invalid_input`", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`unsupported_task`: not a classification model; `idempotency_key_reused`", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`idempotency_in_flight`, with `Retry-After`", body = plinth_core::error::ErrorBody),
        (status = 503, description = "`overloaded`, with `Retry-After`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn classify(
    state: web::Data<AppState>,
    auth: Auth<scope::Inference>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    name: web::Path<String>,
    body: web::Json<TextRequest>,
) -> ApiResult<HttpResponse> {
    let TextRequest { inputs } = body.into_inner();
    let model = text_model(&state, &auth, &name, &inputs, Task::TextClassification).await?;
    let units = inputs.len();
    let billable = Billable::model(&auth, &name, units);
    let work = async { Ok(model.classify(share(&auth), inputs).await?) };
    let (results, recorded) = metered(&state, &auth, idempotency, request_id, billable, work).await?;
    let reply = ClassifyResponse {
        model: model.info().name.clone(),
        results,
    };
    Ok(billed_json(&recorded, &reply))
}

/// Embed texts as vectors (normalised for the built-in model). Billed per text.
#[utoipa::path(post, path = "/v1/models/{name}/embed", tag = "models", security(("bearer" = ["inference"])),
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = TextRequest,
    responses(
        (status = 200, body = EmbedResponse),
        (status = 400, description = "`invalid_input`", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`unsupported_task`: not an embedding model; `idempotency_key_reused`", body = plinth_core::error::ErrorBody),
        (status = 409, description = "`idempotency_in_flight`, with `Retry-After`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn embed(
    state: web::Data<AppState>,
    auth: Auth<scope::Inference>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    name: web::Path<String>,
    body: web::Json<TextRequest>,
) -> ApiResult<HttpResponse> {
    let TextRequest { inputs } = body.into_inner();
    let model = text_model(&state, &auth, &name, &inputs, Task::Embedding).await?;
    let units = inputs.len();
    let billable = Billable::model(&auth, &name, units);
    let work = async {
        let embeddings = model.embed(share(&auth), inputs).await?;
        // Checked before the call counts: an answer that cannot go back is not billed.
        let numbers: usize = embeddings.iter().map(Vec::len).sum();
        if numbers > JSON_ANSWER_ELEMENTS {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the embeddings of these texts take {numbers} numbers, where an answer takes at most \
                     {JSON_ANSWER_ELEMENTS}; send fewer texts at once"
                ),
            ));
        }
        Ok(embeddings)
    };
    let (embeddings, recorded) = metered(&state, &auth, idempotency, request_id, billable, work).await?;
    let reply = EmbedResponse {
        model: model.info().name.clone(),
        dimensions: embeddings.first().map_or(0, Vec::len),
        embeddings,
    };
    Ok(billed_json(&recorded, &reply))
}

/// Upload a model: multipart parts `model` (the .onnx file), `manifest` (JSON: name, task, labels) and,
/// for text models, `tokenizer` (tokenizer.json). The model is loaded to validate it; each upload of a
/// name adds a version. Private to the tenant.
#[utoipa::path(post, path = "/v1/models", operation_id = "upload_model", tag = "models", security(("bearer" = ["admin"])),
    request_body(content_type = "multipart/form-data", description = "parts: model, manifest, tokenizer"),
    responses(
        (status = 201, body = Model),
        (status = 409, description = "`model_quota_exceeded`: the plan's models, versions or bytes", body = plinth_core::error::ErrorBody),
        (status = 413, description = "`payload_too_large`: a part past its limit, or the body's boundaries and part headers past 64 KiB", body = plinth_core::error::ErrorBody),
        (status = 408, description = "`request_timeout`: the body paused for more than 15 s, or averaged under 4 KiB/s after its first minute", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`invalid_model` or `validation_failed`", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`tenant_queue_full`: another upload of the tenant's is on its way (one at a time), with `Retry-After`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn upload(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> ApiResult<HttpResponse> {
    let model = crate::uploads::upload(&state, &auth, &auth.who(), &req, body).await?;
    Ok(HttpResponse::Created().json(model))
}

/// Delete a tenant model (every version). It stops serving at once; usage history keeps its name.
#[utoipa::path(delete, path = "/v1/models/{name}", operation_id = "delete_model", tag = "models", security(("bearer" = ["admin"])),
    params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn delete(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    name: web::Path<String>,
) -> ApiResult<HttpResponse> {
    state
        .hosting
        .delete_model(&auth.tenant_id, &auth.who(), &name)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Delete one version of a tenant model, to make room under the plan's quota. Not the newest version,
/// the one served: upload a newer one first, or delete the model.
#[utoipa::path(delete, path = "/v1/models/{name}/versions/{version}", operation_id = "delete_model_version", tag = "models", security(("bearer" = ["admin"])),
    params(("name" = String, Path), ("version" = u32, Path)),
    responses(
        (status = 204),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`: the newest version", body = plinth_core::error::ErrorBody),
    ))]
pub async fn delete_version(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    path: web::Path<(String, u32)>,
) -> ApiResult<HttpResponse> {
    let (name, version) = path.into_inner();
    state
        .hosting
        .delete_version(&auth.tenant_id, &auth.who(), &name, version)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
