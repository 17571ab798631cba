//! The HTTP edge of Plinth: an actix-web application factory, thin handlers over the domain functions in
//! `plinth-store`, one error type, authentication extractors, rate limiting and the OpenAPI document.
//! Only this crate knows actix.

pub mod auth;
pub mod client;
pub mod error;
mod limits;
mod metering;
pub mod metrics;
pub mod openapi;
mod plugins;
mod portal;
mod recent_errors;
pub mod request_id;
mod routes;
pub use routes::ROUTES;
pub mod state;
mod training;
mod uploads;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::from_fn;
use actix_web::{App, web};
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use crate::error::{ApiError, ApiResult};
pub use crate::metrics::MetricsToken;
pub use crate::recent_errors::RecentErrors;
pub use crate::state::{AbuseLimits, ApiSettings, AppState};
pub use crate::training::{TrainingSettings, spawn_training};
pub use crate::uploads::{CONCURRENT_LOADS as CONCURRENT_MODEL_LOADS, sweep_model_files};

/// Starts serving every tenant's newest model versions, in the background after start-up: the server
/// answers at once (readiness waits for this), and a model that fails to load is logged, counted and
/// skipped rather than keeping the platform down. A registry that cannot be read is tried again.
pub fn spawn_tenant_model_loading(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match load_tenant_models(&state).await {
                Ok(()) => break,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read the model registry; trying again");
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
            }
        }
        state.models.finished_loading_tenant_models();
    })
}

async fn load_tenant_models(state: &AppState) -> Result<(), plinth_store::StoreError> {
    for record in state.store.live_models().await? {
        load_record(state, &record).await;
    }
    Ok(())
}

/// Loads a registered model version and serves it, unless a delete or a newer upload came meanwhile.
/// Returns whether it loaded (a failure is logged and counted).
async fn load_record(state: &AppState, record: &plinth_store::models::ModelRecord) -> bool {
    let files = match uploads::fetch_files(state, record).await {
        Ok(files) => files,
        Err(err) => {
            ::metrics::counter!("plinth_model_load_failures_total").increment(1);
            tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot fetch a tenant model's files");
            return false;
        }
    };
    let engine = state.engine.clone();
    match tokio::task::spawn_blocking(move || engine.load(&files)).await {
        // A delete or a newer upload since the registry was read wins.
        Ok(Ok(model)) => {
            if let Err(err) = uploads::serve_if_current(state, &record.tenant_id, model).await {
                tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot check a tenant model is current");
            }
            true
        }
        Ok(Err(err)) => {
            ::metrics::counter!("plinth_model_load_failures_total").increment(1);
            tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot load a tenant model");
            false
        }
        Err(err) => {
            ::metrics::counter!("plinth_model_load_failures_total").increment(1);
            tracing::error!(error = %err, "model loading panicked");
            false
        }
    }
}

/// Keeps this replica's model catalogue in step with the registry every replica shares: a model
/// uploaded through another replica starts serving here, and one deleted there stops here, within
/// `every`. A version that fails to load is not tried again by this loop (it is logged and counted;
/// its first call tries once more).
pub fn spawn_catalog_sync(state: AppState, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failed = std::collections::HashSet::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Postgres announces each change: compared at once rather than at the next tick.
        let mut changes = match state.store.catalog_changes().await {
            Ok(changes) => changes,
            Err(err) => {
                tracing::warn!(error = %err, "catalogue changes are followed by polling only");
                None
            }
        };
        loop {
            let announced = async {
                match changes.as_mut() {
                    Some(changes) => changes.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => {}
                heard = announced => {
                    if let Err(err) = heard {
                        tracing::warn!(error = %err, "lost the catalogue change listener; polling meanwhile");
                        tokio::time::sleep(every).await;
                    }
                }
            }
            if !state.models.tenant_models_loaded() {
                continue;
            }
            if let Err(err) = sync_catalog(&state, &mut failed).await {
                tracing::warn!(error = %err, "cannot read the model registry to sync the catalogue");
            }
        }
    })
}

type ModelVersionKey = (plinth_core::id::TenantId, String, u32);

async fn sync_catalog(
    state: &AppState,
    failed: &mut std::collections::HashSet<ModelVersionKey>,
) -> Result<(), plinth_store::StoreError> {
    let records = state.store.live_models().await?;
    let live: std::collections::HashMap<(&plinth_core::id::TenantId, &str), u32> = records
        .iter()
        .map(|r| ((&r.tenant_id, r.name.as_str()), r.version))
        .collect();
    let served: std::collections::HashMap<(plinth_core::id::TenantId, String), u32> = state
        .models
        .tenant_models()
        .into_iter()
        .map(|(tenant, name, version)| ((tenant, name), version))
        .collect();
    let mut removed = false;
    for (tenant, name) in served.keys() {
        if !live.contains_key(&(tenant, name.as_str())) {
            // Deleted through another replica. Checked again under the files lock, as a delete here
            // would hold it: an upload through this replica may have just registered it.
            let _files = state.model_files_lock.lock().await;
            if state.store.model_versions(tenant, name).await?.is_empty() {
                state.models.remove_tenant(tenant, name);
                removed = true;
                ::metrics::counter!("plinth_catalog_changes_total", "change" => "removed").increment(1);
                tracing::info!(%tenant, model = %name, "a model deleted elsewhere stopped serving here");
            }
        }
    }
    // Older versions pinned here and deleted elsewhere (one version, or the whole model) stop too.
    for (tenant, name, version) in state.models.pinned_versions() {
        if let Err(plinth_store::StoreError::NotFound(_)) =
            state.store.model_version(&tenant, &name, version).await
        {
            state.models.remove_version(&tenant, &name, version);
            removed = true;
            ::metrics::counter!("plinth_catalog_changes_total", "change" => "removed").increment(1);
        }
    }
    if removed {
        // This replica's copies of the deleted model's files go too.
        let _files = state.model_files_lock.lock().await;
        uploads::remove_local_unused_files(state).await?;
    }
    for record in &records {
        let key = (record.tenant_id.clone(), record.name.clone());
        // A different version than the registry's newest: a newer upload, or the newest deleted.
        let current = served.get(&key).is_some_and(|v| *v == record.version);
        let version_key = (record.tenant_id.clone(), record.name.clone(), record.version);
        let uploading_here = state
            .uploading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&key);
        if current || uploading_here || failed.contains(&version_key) {
            continue;
        }
        if load_record(state, record).await {
            ::metrics::counter!("plinth_catalog_changes_total", "change" => "loaded").increment(1);
            tracing::info!(tenant = %record.tenant_id, model = %record.name, version = record.version, "a model uploaded elsewhere serves here");
        } else {
            failed.insert(version_key);
        }
    }
    Ok(())
}

/// Builds the application: routes, body limits, error shapes, request ids and metrics.
pub fn app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let max_body = state.settings.max_body_bytes;
    App::new()
        .app_data(web::Data::new(state))
        .app_data(
            web::JsonConfig::default()
                .limit(max_body)
                .error_handler(error::json_error),
        )
        .app_data(web::PayloadConfig::default().limit(max_body))
        .app_data(web::QueryConfig::default().error_handler(error::query_error))
        .app_data(web::PathConfig::default().error_handler(error::path_error))
        .configure(routes::configure)
        .configure(portal::configure)
        .service(web::redirect("/docs", "/docs/"))
        .service(SwaggerUi::new("/docs/{_:.*}").url("/openapi.json", openapi::ApiDoc::openapi()))
        .default_service(web::to(error::route_not_found))
        .wrap(from_fn(reference_headers))
        .wrap(from_fn(row_scope))
        .wrap(from_fn(request_id::middleware))
}

/// What the API reference (`/docs/`), and any other page outside the portal, may load and do in a
/// browser. It shares the portal's origin, and so its session cookie: whatever got into the page
/// could act as the signed-in user, so only its own scripts run (Swagger UI styles its elements
/// inline, and draws icons as data URLs), it talks only to this server, and no other site may frame it.
const REFERENCE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; \
     object-src 'none'";

/// Sets [`REFERENCE_POLICY`] and its companions on every HTML page and script that has no policy of
/// its own (the portal sets a stricter one). Decided by what the response is, not by its path: a
/// path spelt differently (`/%64ocs/`) routes to the same page.
async fn reference_headers(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    use actix_web::http::header::{self, HeaderValue};
    let mut response = next.call(req).await?;
    let page = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/html") || value.contains("javascript"));
    if page && !response.headers().contains_key(header::CONTENT_SECURITY_POLICY) {
        let headers = response.headers_mut();
        for (name, value) in [
            (header::CONTENT_SECURITY_POLICY, REFERENCE_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "same-origin"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
    }
    Ok(response)
}

/// Handles each request in a row-security scope of its own: every tenant's rows until its caller is
/// verified, only the caller's after (`plinth_store::row_security`).
async fn row_scope(
    req: ServiceRequest,
    next: actix_web::middleware::Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    plinth_store::row_security::within_request(next.call(req)).await
}
