//! The portal's fine-tuning pages: a tenant's datasets and training jobs, and one job followed from
//! queued to deployed. Each handler calls the same domain functions as `/v1/datasets` and
//! `/v1/training-jobs`; what they refuse is shown on the page the visitor is on.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError, web};
use plinth_core::id::{DatasetId, TrainingJobId};
use plinth_core::training::{Hyperparameters, NewTrainingJob};
use plinth_core::{ErrorCode, Scope};
use serde::Deserialize;

use super::pages::{CsrfQuery, Empty, chrome, shown};
use super::session::{Posted, Visitor};
use super::view::{self, Chrome};
use super::{PageResult, page, see_other};
use crate::error::ApiError;
use crate::state::AppState;

/// What the training page shows besides its tables: a refusal, and the job form as it was sent.
#[derive(Default)]
struct TrainingExtras {
    upload_error: Option<String>,
    job_error: Option<String>,
    draft: view::JobDraft,
}

async fn training_page(
    state: &AppState,
    visitor: &Visitor,
    chrome: Chrome,
    extras: TrainingExtras,
    status: StatusCode,
) -> PageResult {
    let tenant = &visitor.principal.tenant_id;
    let datasets = state.store.datasets(tenant).await?;
    let jobs = state.store.training_jobs(tenant).await?;
    Ok(page(
        status,
        &view::TrainingPage {
            chrome,
            datasets: datasets.iter().map(view::DatasetRow::from).collect(),
            jobs: jobs.iter().map(view::JobRow::from).collect(),
            can_manage: visitor.principal.has(Scope::Admin),
            csrf: visitor.csrf.clone(),
            upload_error: extras.upload_error,
            job_error: extras.job_error,
            draft: extras.draft,
        },
    ))
}

/// A refusal shown on the training page, with the form as it was sent.
async fn training_refusal(
    state: &AppState,
    visitor: &Visitor,
    err: ApiError,
    extras: TrainingExtras,
) -> PageResult {
    let chrome = chrome(state, visitor, "Training", "training").await?;
    training_page(state, visitor, chrome, extras, err.status_code()).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct TrainingQuery {
    uploaded: Option<String>,
}

pub(crate) async fn training(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<TrainingQuery>,
) -> PageResult {
    let mut chrome = chrome(&state, &visitor, "Training", "training").await?;
    chrome.flash = query
        .uploaded
        .as_ref()
        .map(|name| format!("Dataset “{name}” uploaded and checked."));
    training_page(
        &state,
        &visitor,
        chrome,
        TrainingExtras::default(),
        StatusCode::OK,
    )
    .await
}

/// A dataset upload: multipart parts `file` and `name` as the API takes them, the CSRF token in the
/// query (see `upload_model`).
pub(crate) async fn upload_dataset(
    state: web::Data<AppState>,
    visitor: Visitor,
    query: web::Query<CsrfQuery>,
    req: actix_web::HttpRequest,
    body: web::Payload,
) -> PageResult {
    visitor.verify_csrf(query.csrf.as_deref())?;
    visitor.require(Scope::Admin)?;
    match crate::training::upload_dataset(&state, &visitor.principal, &visitor.who(), &req, body).await {
        Ok(dataset) => Ok(see_other(&format!(
            "/portal/training?{}",
            serde_urlencoded::to_string([("uploaded", &dataset.name)]).map_err(ApiError::internal)?
        ))),
        Err(err) => {
            let err = shown(err)?;
            let extras = TrainingExtras {
                upload_error: Some(err.message().to_owned()),
                ..TrainingExtras::default()
            };
            training_refusal(&state, &visitor, err, extras).await
        }
    }
}

pub(crate) async fn delete_dataset(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<DatasetId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    state
        .store
        .delete_dataset(&visitor.principal.tenant_id, &visitor.who(), id.as_str())
        .await?;
    Ok(see_other("/portal/training"))
}

#[derive(Debug, Deserialize)]
pub(crate) struct JobForm {
    dataset: String,
    model: String,
    #[serde(default)]
    epochs: String,
    #[serde(default)]
    learning_rate: String,
}

/// An optional number field: `None` when left empty.
fn optional<T: std::str::FromStr>(value: &str, field: &str, what: &str) -> Result<Option<T>, ApiError> {
    match value.trim() {
        "" => Ok(None),
        value => value
            .parse()
            .map(Some)
            .map_err(|_| ApiError::new(ErrorCode::ValidationFailed, format!("{field}: {what}"))),
    }
}

/// Starts a job from the form, then follows it on its own page.
pub(crate) async fn create_job(state: web::Data<AppState>, posted: Posted<JobForm>) -> PageResult {
    let Posted { visitor, form } = posted;
    visitor.require(Scope::Admin)?;
    let started = async {
        let hyperparameters = Hyperparameters {
            epochs: optional(&form.epochs, "epochs", "a whole number of epochs")?,
            learning_rate: optional(&form.learning_rate, "learning rate", "a number such as 0.01")?,
            ..Hyperparameters::default()
        };
        let request = NewTrainingJob {
            dataset: form.dataset.clone(),
            model: form.model.trim().to_owned(),
            base_model: None,
            hyperparameters,
        };
        crate::training::create_job(&state, &visitor.principal, &visitor.who(), request).await
    }
    .await;
    match started {
        Ok(job) => Ok(see_other(&format!("/portal/training/jobs/{}", job.id))),
        Err(err) => {
            let err = shown(err)?;
            let extras = TrainingExtras {
                job_error: Some(err.message().to_owned()),
                draft: view::JobDraft {
                    dataset: form.dataset,
                    model: form.model,
                    epochs: form.epochs,
                    learning_rate: form.learning_rate,
                },
                ..TrainingExtras::default()
            };
            training_refusal(&state, &visitor, err, extras).await
        }
    }
}

async fn job_page(
    state: &AppState,
    visitor: &Visitor,
    id: &TrainingJobId,
    mut chrome: Chrome,
    error: Option<String>,
    status: StatusCode,
) -> PageResult {
    let tenant = &visitor.principal.tenant_id;
    let job = state.store.training_job(tenant, id.as_str()).await?;
    let events = state.store.training_events(tenant, id.as_str()).await?;
    let dataset = match &job.dataset {
        Some(dataset) => match state.store.dataset(tenant, dataset).await {
            Ok(dataset) => Some(dataset.name),
            Err(plinth_store::StoreError::NotFound(_)) => None,
            Err(err) => return Err(err.into()),
        },
        None => None,
    };
    let currency = state.store.subscription(tenant).await?.plan.currency;
    if error.is_some() {
        chrome.flash = None;
    }
    let mut view = view::TrainingJobPage::new(chrome, &job, dataset, &events, &currency);
    view.can_manage = visitor.principal.has(Scope::Admin);
    view.csrf.clone_from(&visitor.csrf);
    view.error = error;
    Ok(page(status, &view))
}

/// A refusal shown on the job's page; a missing job is a 404 page.
async fn job_refusal(
    state: &AppState,
    visitor: &Visitor,
    id: &TrainingJobId,
    err: impl Into<ApiError>,
) -> PageResult {
    let err = shown(err)?;
    if err.status_code() == StatusCode::NOT_FOUND {
        return Err(err.into());
    }
    let chrome = chrome(state, visitor, "Training job", "training").await?;
    job_page(
        state,
        visitor,
        id,
        chrome,
        Some(err.message().to_owned()),
        err.status_code(),
    )
    .await
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeployedQuery {
    /// The version a deployment just made (only a number travels in the link).
    deployed: Option<u32>,
}

pub(crate) async fn job(
    state: web::Data<AppState>,
    visitor: Visitor,
    id: web::Path<TrainingJobId>,
    query: web::Query<DeployedQuery>,
) -> PageResult {
    let mut chrome = chrome(&state, &visitor, "Training job", "training").await?;
    chrome.flash = query
        .deployed
        .map(|version| format!("Deployed as version {version}; calls move to it once it loads."));
    job_page(&state, &visitor, &id, chrome, None, StatusCode::OK).await
}

pub(crate) async fn cancel_job(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<TrainingJobId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    match state
        .store
        .cancel_training_job(&visitor.principal.tenant_id, &visitor.who(), id.as_str())
        .await
    {
        Ok(_) => Ok(see_other(&format!("/portal/training/jobs/{id}"))),
        Err(err) => job_refusal(&state, &visitor, &id, err).await,
    }
}

pub(crate) async fn deploy_job(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<TrainingJobId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    match crate::training::deploy(&state, &visitor.principal, &visitor.who(), id.as_str()).await {
        Ok(model) => Ok(see_other(&format!(
            "/portal/training/jobs/{id}?deployed={}",
            model.version
        ))),
        Err(err) => job_refusal(&state, &visitor, &id, err).await,
    }
}

/// A succeeded job's model as one ONNX file, as `/v1/training-jobs/{id}/model.onnx` gives it.
pub(crate) async fn export_job(
    state: web::Data<AppState>,
    visitor: Visitor,
    id: web::Path<TrainingJobId>,
) -> PageResult {
    visitor.require(Scope::Admin)?;
    match crate::training::export(&state, &visitor.principal, &visitor.who(), id.as_str()).await {
        Ok((job, bytes)) => Ok(HttpResponse::Ok()
            .content_type("application/octet-stream")
            .insert_header((
                actix_web::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.onnx\"", job.model),
            ))
            .body(bytes)),
        Err(err) => job_refusal(&state, &visitor, &id, err).await,
    }
}

pub(crate) async fn delete_job(
    state: web::Data<AppState>,
    posted: Posted<Empty>,
    id: web::Path<TrainingJobId>,
) -> PageResult {
    let visitor = posted.visitor;
    visitor.require(Scope::Admin)?;
    match state
        .store
        .delete_training_job(&visitor.principal.tenant_id, &visitor.who(), id.as_str())
        .await
    {
        Ok(()) => Ok(see_other("/portal/training")),
        Err(err) => job_refusal(&state, &visitor, &id, err).await,
    }
}
