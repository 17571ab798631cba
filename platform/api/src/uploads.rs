//! Tenant model uploads: stream the multipart parts to disk while hashing, validate the manifest,
//! prove the model loads and fits its task, store it by SHA-256, record the version, start serving it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_multipart::{Field, Multipart};
use futures_util::TryStreamExt;
use plinth_core::ErrorCode;
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

struct Staged {
    path: PathBuf,
    sha256: String,
    size: u64,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message)
}

fn multipart_error(err: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}"))
}

/// Streams a part to a staging file, hashing it, refusing it past `limit` bytes.
async fn stage(mut field: Field, dir: &Path, limit: u64, what: &str) -> ApiResult<Staged> {
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

fn validate(state: &AppState, manifest: &Manifest, has_tokenizer: bool) -> ApiResult<()> {
    let name_ok = !manifest.name.is_empty()
        && manifest.name.len() <= 64
        && manifest
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !name_ok {
        return Err(invalid(
            "manifest.name: 1-64 lower-case letters, digits, `-`, `_` or `.`",
        ));
    }
    if state.models.is_platform(&manifest.name) {
        return Err(invalid(format!(
            "manifest.name: `{}` is a platform model's name",
            manifest.name
        )));
    }
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

/// Moves a staged file to its content address (keeping an identical existing file).
async fn store_file(staged: &Staged, dir: &Path, extension: &str) -> ApiResult<PathBuf> {
    let target = dir.join(format!("{}.{extension}", staged.sha256));
    if tokio::fs::try_exists(&target).await.unwrap_or(false) {
        let _ = tokio::fs::remove_file(&staged.path).await;
    } else {
        tokio::fs::rename(&staged.path, &target)
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(target)
}

pub(crate) fn task_name(task: Task) -> &'static str {
    match task {
        Task::TextClassification => "text-classification",
        Task::Embedding => "embedding",
        Task::Raw => "raw",
    }
}

/// The files of a stored model version, for loading.
pub(crate) fn files_of(dir: &Path, record: &ModelRecord) -> Option<ModelFiles> {
    let task = serde_json::from_value(serde_json::Value::String(record.task.clone())).ok()?;
    Some(ModelFiles {
        name: record.name.clone(),
        version: record.version,
        task,
        labels: record.labels.clone(),
        model: dir.join(format!("{}.onnx", record.sha256)),
        tokenizer: record
            .tokenizer_sha256
            .as_ref()
            .map(|sha| dir.join(format!("{sha}.json"))),
        platform: false,
    })
}

pub(crate) async fn load(state: &AppState, files: ModelFiles) -> ApiResult<Arc<LoadedModel>> {
    let engine = state.engine.clone();
    tokio::task::spawn_blocking(move || engine.load(&files))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// Handles `POST /v1/models`.
pub(crate) async fn upload(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    mut form: Multipart,
) -> ApiResult<Model> {
    let quota = &auth.isolation;
    let dir = state.model_files.clone();
    let staging = dir.join("staging");
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(ApiError::internal)?;
    let (mut manifest, mut model, mut tokenizer) = (None, None, None);
    let outcome: ApiResult<()> = async {
        while let Some(field) = form.try_next().await.map_err(multipart_error)? {
            let name = field.name().unwrap_or_default().to_owned();
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
    let cleanup = |staged: &[&Option<Staged>]| {
        for path in staged.iter().filter_map(|s| s.as_ref().map(|s| s.path.clone())) {
            let _ = std::fs::remove_file(path);
        }
    };
    if let Err(err) = outcome {
        cleanup(&[&model, &tokenizer]);
        return Err(err);
    }
    let checked = match (&manifest, &model) {
        (Some(manifest), Some(_)) => validate(state, manifest, tokenizer.is_some()),
        (None, _) => Err(invalid("the `manifest` part is missing")),
        (_, None) => Err(invalid("the `model` part (the .onnx file) is missing")),
    };
    let checked = match (checked, &manifest, &model) {
        (Ok(()), Some(manifest), Some(staged)) => state
            .store
            .check_model_quota(&auth.tenant_id, &manifest.name, staged.size, quota)
            .await
            .map_err(ApiError::from),
        (checked, ..) => checked,
    };
    if let Err(err) = checked {
        cleanup(&[&model, &tokenizer]);
        return Err(err);
    }
    let (Some(manifest), Some(model)) = (manifest, model) else {
        unreachable!("checked above")
    };

    // From here on files are in the shared content-addressed store: uploads and deletes take turns,
    // so a delete never removes a file an upload is about to use.
    let _files = state.model_files_lock.lock().await;
    let model_path = store_file(&model, &dir, "onnx").await;
    let tokenizer_path = match (&tokenizer, &model_path) {
        (Some(staged), Ok(_)) => Some(store_file(staged, &dir, "json").await).transpose(),
        _ => Ok(None),
    };
    let stored = [
        Some(model.sha256.clone()),
        tokenizer.as_ref().map(|t| t.sha256.clone()),
    ];
    let registered = async {
        let files = ModelFiles {
            name: manifest.name.clone(),
            version: 0,
            task: manifest.task,
            labels: manifest.labels.clone(),
            model: model_path?,
            tokenizer: tokenizer_path?,
            platform: false,
        };
        // Loading is the validation: ONNX Runtime parses the graph, and the inputs and outputs must fit
        // the task.
        load(state, files.clone()).await?;
        let record = state
            .store
            .register_model(
                &auth.tenant_id,
                who,
                &NewModel {
                    name: manifest.name,
                    task: task_name(manifest.task).to_owned(),
                    labels: manifest.labels,
                    sha256: model.sha256.clone(),
                    size_bytes: model.size,
                    tokenizer_sha256: tokenizer.as_ref().map(|t| t.sha256.clone()),
                },
                quota,
            )
            .await?;
        load(
            state,
            ModelFiles {
                version: record.version,
                ..files
            },
        )
        .await
    }
    .await;
    match registered {
        Ok(served) => {
            state.models.add_tenant(&auth.tenant_id, served.clone());
            Ok(served.info().clone())
        }
        Err(err) => {
            cleanup(&[&Some(model), &tokenizer]);
            remove_unused_files(state, stored.iter().flatten()).await;
            Err(err)
        }
    }
}

/// Removes the stored files with these hashes that no live model version uses (the caller holds
/// `model_files_lock`). A failure is logged: a file left behind costs disk, not correctness.
pub(crate) async fn remove_unused_files(state: &AppState, hashes: impl Iterator<Item = &String>) {
    for sha256 in hashes {
        match state.store.model_file_in_use(sha256).await {
            Ok(true) => {}
            Ok(false) => {
                for extension in ["onnx", "json"] {
                    let path = state.model_files.join(format!("{sha256}.{extension}"));
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
