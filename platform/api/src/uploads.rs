//! Tenant model uploads: stream the multipart parts to disk while hashing, validate the manifest,
//! prove the model loads and fits its task, store it by SHA-256, record the version, start serving it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_multipart::{Field, Multipart};
use futures_util::TryStreamExt;
use plinth_core::ErrorCode;
use plinth_core::id::TenantId;
use plinth_core::inference::{Model, Task};
use plinth_inference::{LoadedModel, ModelFiles};
use plinth_store::auth::Principal;
use plinth_store::models::{ModelRecord, NewModel};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The `manifest` part of an upload.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// 1-64 lower-case letters, digits, `-`, `_` or `.`; not a platform model's name.
    pub name: String,
    pub task: Task,
    /// Class labels in output order (text classification).
    #[serde(default)]
    pub labels: Vec<String>,
}

const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
const MAX_TOKENIZER_BYTES: u64 = 32 * 1024 * 1024;

/// A part streamed to the staging directory; its file goes with it unless it was moved into the store
/// (a refused upload, or a client that hangs up mid-way, leaves nothing behind).
pub(crate) struct Staged {
    pub(crate) path: PathBuf,
    sha256: String,
    size: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message)
}

pub(crate) fn multipart_error(err: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
}

/// Streams a part to a staging file, hashing it, refusing it past `limit` bytes.
pub(crate) async fn stage(mut field: Field, dir: &Path, limit: u64, what: &str) -> ApiResult<Staged> {
    let path = dir.join(format!("{}.part", ulid::Ulid::new()));
    let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result = async {
        while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
            size += chunk.len() as u64;
            if size > limit {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("{what} is larger than {limit} bytes"),
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        file.flush().await.map_err(ApiError::internal)
    }
    .await;
    if let Err(err) = result {
        let _ = tokio::fs::remove_file(&path).await;
        return Err(err);
    }
    Ok(Staged {
        path,
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

async fn read_manifest(mut field: Field) -> ApiResult<Manifest> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field.try_next().await.map_err(multipart_error)? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the manifest is larger than 64 KiB",
            ));
        }
    }
    serde_json::from_slice(&bytes).map_err(|err| invalid(format!("manifest: {err}")))
}

/// Whether `name` may name a tenant model; `field` is what the refusal calls it.
pub(crate) fn check_model_name(state: &AppState, field: &str, name: &str) -> ApiResult<()> {
    let name_ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !name_ok {
        return Err(invalid(format!(
            "{field}: 1-64 lower-case letters, digits, `-`, `_` or `.`"
        )));
    }
    if state.models.is_platform(name) {
        return Err(invalid(format!("{field}: `{name}` is a platform model's name")));
    }
    Ok(())
}

fn validate(state: &AppState, manifest: &Manifest, has_tokenizer: bool) -> ApiResult<()> {
    check_model_name(state, "manifest.name", &manifest.name)?;
    match manifest.task {
        Task::TextClassification if manifest.labels.len() < 2 => Err(invalid(
            "manifest.labels: a text-classification model needs at least two labels",
        )),
        Task::TextClassification | Task::Embedding if !has_tokenizer => Err(invalid(
            "a text model needs its tokenizer.json in a `tokenizer` part",
        )),
        _ if manifest.labels.iter().any(|l| l.is_empty() || l.len() > 100) => {
            Err(invalid("manifest.labels: each label must be 1-100 characters"))
        }
        _ => Ok(()),
    }
}

/// Moves a staged file to its content address (keeping an identical existing file), and publishes it
/// to the replicas' shared storage before it is registered: once the registry names it, every replica
/// can fetch it.
async fn store_file(state: &AppState, staged: &Staged, extension: &str) -> ApiResult<PathBuf> {
    let name = format!("{}.{extension}", staged.sha256);
    let target = state.model_files.path(&name);
    if tokio::fs::try_exists(&target).await.unwrap_or(false) {
        let _ = tokio::fs::remove_file(&staged.path).await;
    } else {
        tokio::fs::rename(&staged.path, &target)
            .await
            .map_err(ApiError::internal)?;
    }
    state
        .model_files
        .publish(&name)
        .await
        .map_err(ApiError::internal)?;
    Ok(target)
}

/// The files of a registered model version, fetched from the replicas' shared storage if this
/// replica does not have them yet (their hashes checked).
pub(crate) async fn fetch_files(state: &AppState, record: &ModelRecord) -> ApiResult<ModelFiles> {
    let task = serde_json::from_value(serde_json::Value::String(record.task.clone()))
        .map_err(|_| ApiError::internal("unknown task in the model registry"))?;
    let fetch = |sha256: String, extension: &'static str| async move {
        state
            .model_files
            .fetch(&format!("{sha256}.{extension}"), &sha256)
            .await
            .map_err(ApiError::internal)
    };
    let tokenizer = match &record.tokenizer_sha256 {
        Some(sha256) => Some(fetch(sha256.clone(), "json").await?),
        None => None,
    };
    Ok(ModelFiles {
        name: record.name.clone(),
        version: record.version,
        task,
        labels: record.labels.clone(),
        model: fetch(record.sha256.clone(), "onnx").await?,
        tokenizer,
        platform: false,
    })
}

pub(crate) fn task_name(task: Task) -> &'static str {
    match task {
        Task::TextClassification => "text-classification",
        Task::Embedding => "embedding",
        Task::Raw => "raw",
    }
}

/// Models loaded on demand (uploads, older versions) at once, across tenants: each load builds
/// sessions and may take a core for seconds.
pub const CONCURRENT_LOADS: usize = 1;

/// How long a load waits for its turn before the caller is told to come back.
const LOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// How a model is loaded on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loading {
    /// A new upload: its warm-up must answer within the inference timeout.
    Validate,
    /// A version that was accepted before.
    Accepted,
}

/// Loads a model on a blocking thread, one at a time (see [`CONCURRENT_LOADS`]). The turn is held
/// until the load really ends, even when the caller stops waiting for it.
pub(crate) async fn load(
    state: &AppState,
    files: ModelFiles,
    loading: Loading,
) -> ApiResult<Arc<LoadedModel>> {
    let turn = tokio::time::timeout(LOAD_WAIT, state.model_loading.clone().acquire_owned())
        .await
        .map_err(|_| {
            ApiError::new(ErrorCode::Unavailable, "other models are loading; retry shortly")
                .retry_after(std::time::Duration::from_secs(5))
        })?
        .map_err(ApiError::internal)?;
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        match loading {
            Loading::Validate => engine.validate(&files),
            Loading::Accepted => engine.load(&files),
        }
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
}

/// Deletes a tenant model, every version: it stops serving at once, and its files go once no live
/// version of any tenant uses them. Usage history keeps its name.
pub(crate) async fn delete_model(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    name: &str,
) -> ApiResult<()> {
    if state.models.is_platform(name) {
        return Err(ApiError::new(
            ErrorCode::InsufficientScope,
            "platform models cannot be deleted by tenants",
        ));
    }
    let _files = state.model_files_lock.lock().await;
    state.store.delete_model(&auth.tenant_id, who, name).await?;
    state.models.remove_tenant(&auth.tenant_id, name);
    let files = state.store.model_files(&auth.tenant_id, name).await?;
    remove_unused_files(state, files.iter(), Shared::Remove).await;
    Ok(())
}

/// Handles `POST /v1/models`.
pub(crate) async fn upload(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    mut form: Multipart,
) -> ApiResult<Model> {
    let quota = &auth.isolation;
    let dir = state.model_files.dir().to_path_buf();
    let staging = dir.join("staging");
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(ApiError::internal)?;
    let (mut manifest, mut model, mut tokenizer) = (None, None, None);
    let outcome: ApiResult<()> = async {
        while let Some(mut field) = form.try_next().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
            // A browser sends a file input left empty as a part with an empty file name: no file.
            if field
                .content_disposition()
                .and_then(|disposition| disposition.get_filename())
                == Some("")
            {
                while field.try_next().await.map_err(multipart_error)?.is_some() {}
                continue;
            }
            let repeated = match name.as_str() {
                "manifest" => manifest.is_some(),
                "model" => model.is_some(),
                "tokenizer" => tokenizer.is_some(),
                _ => false,
            };
            if repeated {
                return Err(invalid(format!("the `{name}` part is sent twice")));
            }
            match name.as_str() {
                "manifest" => manifest = Some(read_manifest(field).await?),
                "model" => {
                    let limit = state.settings.max_model_bytes.min(quota.max_model_bytes);
                    model = Some(stage(field, &staging, limit, "the model").await?);
                }
                "tokenizer" => {
                    tokenizer = Some(stage(field, &staging, MAX_TOKENIZER_BYTES, "the tokenizer").await?);
                }
                other => {
                    return Err(invalid(format!(
                        "unexpected part `{other}`: send `model`, `manifest` and `tokenizer`"
                    )));
                }
            }
        }
        Ok(())
    }
    .await;
    // On every early return the staged parts remove themselves (see `Staged`).
    outcome?;
    match (manifest, model) {
        (Some(manifest), Some(model)) => install(state, auth, who, manifest, model, tokenizer).await,
        (None, _) => Err(invalid("the `manifest` part is missing")),
        (_, None) => Err(invalid("the `model` part (the .onnx file) is missing")),
    }
}

/// A staged model file (and its tokenizer), written from bytes the platform made (a trained model).
pub(crate) async fn stage_bytes(state: &AppState, bytes: &[u8]) -> ApiResult<Staged> {
    let staging = state.model_files.dir().join("staging");
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(ApiError::internal)?;
    let path = staging.join(format!("{}.part", ulid::Ulid::new()));
    let staged = Staged {
        path,
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
    };
    tokio::fs::write(&staged.path, bytes)
        .await
        .map_err(ApiError::internal)?;
    Ok(staged)
}

/// Checks a staged model against its manifest and the plan's quota, proves it loads and fits its
/// task, stores it by SHA-256, records the version and starts serving it.
pub(crate) async fn install(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    manifest: Manifest,
    model: Staged,
    tokenizer: Option<Staged>,
) -> ApiResult<Model> {
    let quota = &auth.isolation;
    validate(state, &manifest, tokenizer.is_some())?;
    state
        .store
        .check_model_quota(&auth.tenant_id, &manifest.name, model.size, quota)
        .await?;

    // Loading is the validation, from the staged files, before anything is stored: ONNX Runtime parses
    // the graph, the inputs and outputs must fit the task, and a warm-up must answer in time.
    let staged_files = ModelFiles {
        name: manifest.name.clone(),
        version: 0,
        task: manifest.task,
        labels: manifest.labels.clone(),
        model: model.path.clone(),
        tokenizer: tokenizer.as_ref().map(|t| t.path.clone()),
        platform: false,
    };
    load(state, staged_files.clone(), Loading::Validate).await?;

    // From registering to serving, this replica's catalogue sync leaves the model to this upload.
    let _uploading = Uploading::mark(state, &auth.tenant_id, &manifest.name);
    // Into the shared content-addressed store and the registry: uploads and deletes take turns here,
    // so a delete never removes a file an upload is about to register.
    let (record, model_path, tokenizer_path) = {
        let _files = state.model_files_lock.lock().await;
        let registered = async {
            let model_path = store_file(state, &model, "onnx").await?;
            let tokenizer_path = match &tokenizer {
                Some(staged) => Some(store_file(state, staged, "json").await?),
                None => None,
            };
            let record = state
                .store
                .register_model(
                    &auth.tenant_id,
                    who,
                    &NewModel {
                        name: manifest.name.clone(),
                        task: task_name(manifest.task).to_owned(),
                        labels: manifest.labels.clone(),
                        sha256: model.sha256.clone(),
                        size_bytes: model.size,
                        tokenizer_sha256: tokenizer.as_ref().map(|t| t.sha256.clone()),
                    },
                    quota,
                )
                .await?;
            // A delete of identical bytes through another replica may have removed the shared copies
            // between publishing and registering: now that the registry names them, they stay.
            let stored = [
                Some(format!("{}.onnx", model.sha256)),
                tokenizer.as_ref().map(|t| format!("{}.json", t.sha256)),
            ];
            for name in stored.iter().flatten() {
                // Registered already: a failure here is logged rather than undoing the upload.
                if let Err(err) = state.model_files.ensure_published(name).await {
                    tracing::error!(file = %name, error = %err, "cannot check a model file is in shared storage");
                }
            }
            Ok::<_, ApiError>((record, model_path, tokenizer_path))
        }
        .await;
        match registered {
            Ok(registered) => registered,
            Err(err) => {
                let stored = [Some(&model.sha256), tokenizer.as_ref().map(|t| &t.sha256)];
                remove_unused_files(state, stored.into_iter().flatten(), Shared::Remove).await;
                return Err(err);
            }
        }
    };
    let served = load(
        state,
        ModelFiles {
            version: record.version,
            model: model_path,
            tokenizer: tokenizer_path,
            ..staged_files
        },
        Loading::Accepted,
    )
    .await?;
    serve_if_current(state, &auth.tenant_id, served.clone()).await?;
    Ok(served.info().clone())
}

/// Loads again a tenant's newest version of `name` that was let go to bound memory, and serves it.
pub(crate) async fn reload(state: &AppState, tenant: &TenantId, name: &str) -> ApiResult<Arc<LoadedModel>> {
    let gone = || ApiError::new(ErrorCode::NotFound, format!("no model named `{name}`"));
    let versions = state.store.model_versions(tenant, name).await?;
    let Some(&version) = versions.last() else {
        return Err(gone());
    };
    let record = state.store.model_version(tenant, name, version).await?;
    let files = fetch_files(state, &record).await?;
    let model = load(state, files, Loading::Accepted).await?;
    // Another call may have loaded it while this one waited for its turn: one copy is served.
    if let Some(loaded) = state.models.find(tenant, name) {
        return Ok(loaded);
    }
    if !serve_if_current(state, tenant, model.clone()).await? {
        return Err(gone());
    }
    metrics::counter!("plinth_tenant_models_reloaded_total").increment(1);
    Ok(model)
}

/// Serves a loaded tenant model if it is still its model's newest live version: a delete or a newer
/// upload may have come while it loaded, and must not be undone by it.
pub(crate) async fn serve_if_current(
    state: &AppState,
    tenant: &TenantId,
    model: Arc<LoadedModel>,
) -> ApiResult<bool> {
    let _files = state.model_files_lock.lock().await;
    let versions = state.store.model_versions(tenant, &model.info().name).await?;
    if versions.last() != Some(&model.info().version) {
        return Ok(false);
    }
    state.models.add_tenant(tenant, model);
    Ok(true)
}

/// Removes whatever the model store holds that no live model version uses: staged parts of uploads
/// that never finished and files whose registration never happened (a crash, a client that hung up).
/// Run at start-up, before the server takes requests. (Each replica keeps its own store.)
///
/// # Errors
/// When the registry cannot be read.
pub async fn sweep_model_files(state: &AppState) -> Result<(), plinth_store::StoreError> {
    let _files = state.model_files_lock.lock().await;
    let _ = tokio::fs::remove_dir_all(state.model_files.path("staging")).await;
    remove_local_unused_files(state).await
}

/// Removes this replica's copies of model files no live version uses (the caller holds
/// `model_files_lock`).
pub(crate) async fn remove_local_unused_files(state: &AppState) -> Result<(), plinth_store::StoreError> {
    let Ok(mut entries) = tokio::fs::read_dir(state.model_files.dir()).await else {
        return Ok(());
    };
    let mut unused = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((sha256, "onnx" | "json")) = name.split_once('.') else {
            continue;
        };
        if !state.store.model_file_in_use(sha256).await? {
            unused.push(sha256.to_owned());
        }
    }
    // This replica's copies only: another replica may be about to register a file it published.
    remove_unused_files(state, unused.iter(), Shared::Keep).await;
    Ok(())
}

/// Whether removing unused files removes them from the replicas' shared storage too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shared {
    Remove,
    Keep,
}

/// Removes the stored files with these hashes that no live model version uses (the caller holds
/// `model_files_lock`). A failure is logged: a file left behind costs disk, not correctness.
pub(crate) async fn remove_unused_files(
    state: &AppState,
    hashes: impl Iterator<Item = &String>,
    shared: Shared,
) {
    for sha256 in hashes {
        match state.store.model_file_in_use(sha256).await {
            Ok(true) => {}
            Ok(false) => {
                let names = ["onnx", "json"].map(|extension| format!("{sha256}.{extension}"));
                if shared == Shared::Remove {
                    for name in &names {
                        if let Err(err) = state.model_files.remove_shared(name).await {
                            tracing::warn!(file = %name, error = %err, "cannot remove a model file from shared storage");
                        }
                    }
                    // Files are shared by content across tenants: an upload of the same bytes through
                    // another replica may have registered meanwhile. Then they go back, from here.
                    if !matches!(state.store.model_file_in_use(sha256).await, Ok(false)) {
                        for name in &names {
                            if state.model_files.path(name).exists()
                                && let Err(err) = state.model_files.publish(name).await
                            {
                                tracing::error!(file = %name, error = %err, "cannot restore a model file another upload registered");
                            }
                        }
                        continue;
                    }
                }
                for name in &names {
                    let path = state.model_files.path(name);
                    match tokio::fs::remove_file(&path).await {
                        Ok(()) => tracing::info!(file = %path.display(), "removed a model file nothing uses"),
                        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                        Err(err) => {
                            tracing::warn!(file = %path.display(), error = %err, "cannot remove a model file");
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot tell whether a model file is in use; kept"),
        }
    }
}

/// Marks a model as being uploaded through this replica for as long as it lives.
struct Uploading {
    set: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(TenantId, String)>>>,
    key: (TenantId, String),
}

impl Uploading {
    fn mark(state: &AppState, tenant: &TenantId, name: &str) -> Self {
        let key = (tenant.clone(), name.to_owned());
        state
            .uploading
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone());
        Self {
            set: state.uploading.clone(),
            key,
        }
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.key);
    }
}
