//! Fine-tuning: datasets and training jobs. The work is in `crate::training`.

use actix_web::{HttpResponse, web};
use plinth_core::inference::Model;
use plinth_core::training::{Dataset, NewTrainingJob, TrainingEvent, TrainingJob};

use crate::auth::{Auth, scope};
use crate::error::ApiResult;
use crate::state::AppState;

/// Upload a labelled dataset: multipart with a `file` part (JSON Lines of `{"text", "label"}`, or CSV
/// with `text` and `label` columns; UTF-8) and an optional `name`. Checked on upload; the examples are
/// stored sealed and only a summary is ever shown.
#[utoipa::path(post, path = "/v1/datasets", operation_id = "upload_dataset", tag = "training", security(("bearer" = ["admin"])),
    request_body(content_type = "multipart/form-data", description = "`file` (.jsonl or .csv) and an optional `name`"),
    responses(
        (status = 201, body = Dataset),
        (status = 409, description = "`dataset_quota_exceeded`: the plan's datasets or bytes", body = plinth_core::error::ErrorBody),
        (status = 413, description = "`payload_too_large`: a part past its limit, or the body's boundaries and part headers past 64 KiB", body = plinth_core::error::ErrorBody),
        (status = 408, description = "`request_timeout`: the body paused for more than 15 s, or averaged under 4 KiB/s after its first minute", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`invalid_dataset` (the message names the line) or `validation_failed`", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`tenant_queue_full`: another upload of the tenant's is on its way (one at a time), with `Retry-After`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn upload_dataset(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> ApiResult<HttpResponse> {
    let dataset = crate::training::upload_dataset(&state, &auth, &auth.who(), &req, body).await?;
    Ok(HttpResponse::Created().json(dataset))
}

/// The tenant's datasets, newest first.
#[utoipa::path(get, path = "/v1/datasets", operation_id = "list_datasets", tag = "training", security(("bearer" = [])),
    responses((status = 200, body = Vec<Dataset>)))]
pub async fn list_datasets(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Vec<Dataset>>> {
    Ok(web::Json(state.store.datasets(&auth.tenant_id).await?))
}

/// One dataset's summary.
#[utoipa::path(get, path = "/v1/datasets/{id}", operation_id = "get_dataset", tag = "training", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn get_dataset(
    state: web::Data<AppState>,
    auth: Auth,
    id: web::Path<String>,
) -> ApiResult<web::Json<Dataset>> {
    Ok(web::Json(state.store.dataset(&auth.tenant_id, &id).await?))
}

/// Delete a dataset and its examples. Jobs on it that are still queued are cancelled and running ones
/// stopped; finished jobs and deployed models stay.
#[utoipa::path(delete, path = "/v1/datasets/{id}", operation_id = "delete_dataset", tag = "training", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn delete_dataset(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    state
        .store
        .delete_dataset(&auth.tenant_id, &auth.who(), &id)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

/// Start a training job: a classification head over a platform base model's embeddings, trained on
/// the dataset's training split with early stopping on a validation split, and evaluated on a held-out
/// test split. It runs in the background; follow it with `GET /v1/training-jobs/{id}`. Billed when it
/// ends, per 1,000 examples × epochs at the plan's training price.
#[utoipa::path(post, path = "/v1/training-jobs", operation_id = "create_training_job", tag = "training", security(("bearer" = ["admin"])),
    request_body = NewTrainingJob,
    responses(
        (status = 201, body = TrainingJob),
        (status = 404, description = "no such dataset", body = plinth_core::error::ErrorBody),
        (status = 422, description = "`validation_failed`: the model name, base model or a hyperparameter", body = plinth_core::error::ErrorBody),
        (status = 429, description = "`training_jobs_exceeded`: the plan's jobs at once", body = plinth_core::error::ErrorBody),
    ))]
pub async fn create_job(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    body: web::Json<NewTrainingJob>,
) -> ApiResult<HttpResponse> {
    let job = crate::training::create_job(&state, &auth, &auth.who(), body.into_inner()).await?;
    Ok(HttpResponse::Created().json(job))
}

/// The tenant's training jobs, newest first.
#[utoipa::path(get, path = "/v1/training-jobs", operation_id = "list_training_jobs", tag = "training", security(("bearer" = [])),
    responses((status = 200, body = Vec<TrainingJob>)))]
pub async fn list_jobs(state: web::Data<AppState>, auth: Auth) -> ApiResult<web::Json<Vec<TrainingJob>>> {
    Ok(web::Json(state.store.training_jobs(&auth.tenant_id).await?))
}

/// One job: status, progress, and once it succeeded, its evaluation.
#[utoipa::path(get, path = "/v1/training-jobs/{id}", operation_id = "get_training_job", tag = "training", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = TrainingJob), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn get_job(
    state: web::Data<AppState>,
    auth: Auth,
    id: web::Path<String>,
) -> ApiResult<web::Json<TrainingJob>> {
    Ok(web::Json(state.store.training_job(&auth.tenant_id, &id).await?))
}

/// What happened to a job, oldest first.
#[utoipa::path(get, path = "/v1/training-jobs/{id}/events", operation_id = "list_training_events", tag = "training", security(("bearer" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = Vec<TrainingEvent>), (status = 404, body = plinth_core::error::ErrorBody)))]
pub async fn events(
    state: web::Data<AppState>,
    auth: Auth,
    id: web::Path<String>,
) -> ApiResult<web::Json<Vec<TrainingEvent>>> {
    Ok(web::Json(
        state.store.training_events(&auth.tenant_id, &id).await?,
    ))
}

/// Cancel a job: a queued one at once, a running one at its next step (billed for the epochs it ran).
#[utoipa::path(post, path = "/v1/training-jobs/{id}/cancel", operation_id = "cancel_training_job", tag = "training", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses(
        (status = 200, body = TrainingJob),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 409, description = "`training_job_state`: the job already ended", body = plinth_core::error::ErrorBody),
    ))]
pub async fn cancel(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<String>,
) -> ApiResult<web::Json<TrainingJob>> {
    Ok(web::Json(
        state
            .store
            .cancel_training_job(&auth.tenant_id, &auth.who(), &id)
            .await?,
    ))
}

/// Deploy a succeeded job: its model becomes the newest version of the job's tenant model, served by
/// `classify` and `/v2` like any model.
#[utoipa::path(post, path = "/v1/training-jobs/{id}/deploy", operation_id = "deploy_training_job", tag = "training", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses(
        (status = 201, body = Model),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 409, description = "`training_job_state`: not succeeded, or already deployed; `model_quota_exceeded`", body = plinth_core::error::ErrorBody),
    ))]
pub async fn deploy(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let model = crate::training::deploy(&state, &auth, &auth.who(), &id).await?;
    Ok(HttpResponse::Created().json(model))
}

/// Download a succeeded job's model as one ONNX file (the base graph with the trained head; outputs
/// `sentence_embedding` and `probs`), to run anywhere ONNX Runtime runs. It reads the base model's
/// `tokenizer.json`.
#[utoipa::path(get, path = "/v1/training-jobs/{id}/model.onnx", operation_id = "export_training_job", tag = "training", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses(
        (status = 200, content_type = "application/octet-stream", description = "the ONNX model"),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 409, description = "`training_job_state`: not succeeded", body = plinth_core::error::ErrorBody),
    ))]
pub async fn export(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let (job, bytes) = crate::training::export(&state, &auth, &auth.who(), &id).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((
            actix_web::http::header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}.onnx\"", job.model),
        ))
        .body(bytes))
}

/// Delete a job that has ended, with its events and trained state (a deployed model stays).
#[utoipa::path(delete, path = "/v1/training-jobs/{id}", operation_id = "delete_training_job", tag = "training", security(("bearer" = ["admin"])),
    params(("id" = String, Path)),
    responses(
        (status = 204),
        (status = 404, body = plinth_core::error::ErrorBody),
        (status = 409, description = "`training_job_state`: still queued or running", body = plinth_core::error::ErrorBody),
    ))]
pub async fn delete_job(
    state: web::Data<AppState>,
    auth: Auth<scope::Admin>,
    id: web::Path<String>,
) -> ApiResult<HttpResponse> {
    state
        .store
        .delete_training_job(&auth.tenant_id, &auth.who(), &id)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
