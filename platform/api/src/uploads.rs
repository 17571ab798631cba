//! Tenant model uploads over HTTP: the multipart parts streamed to disk while hashing, the manifest
//! read; the rest (checks, storage, serving) is `plinth_hosting`'s.

use std::path::Path;

use plinth_core::ErrorCode;
use plinth_core::inference::{Model, Task};
use plinth_hosting::{NewVersion, Staged};
use plinth_store::auth::Principal;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::{ApiError, ApiResult};
use crate::multipart::{Bounds, Form, Part};
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

impl From<Manifest> for NewVersion {
    fn from(manifest: Manifest) -> Self {
        Self {
            name: manifest.name,
            task: manifest.task,
            labels: manifest.labels,
        }
    }
}

const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
const MAX_TOKENIZER_BYTES: u64 = 32 * 1024 * 1024;

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::ValidationFailed, message)
}

/// Streams a part to a staging file, hashing it, refusing it past `limit` bytes.
pub(crate) async fn stage(part: &mut Part, dir: &Path, limit: u64, what: &str) -> ApiResult<Staged> {
    let staged = Staged::begun(dir.join(format!("{}.part", ulid::Ulid::new())));
    // Buffered: a part may arrive in pieces of a few bytes (its contents cut at each `\r--`).
    let mut file = tokio::io::BufWriter::with_capacity(
        1 << 20,
        tokio::fs::File::create(staged.path())
            .await
            .map_err(ApiError::internal)?,
    );
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let result = async {
        while let Some(chunk) = part.chunk().await? {
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
    result?;
    Ok(staged.finished(hex::encode(hasher.finalize()), size))
}

async fn read_manifest(part: &mut Part) -> ApiResult<Manifest> {
    let bytes = part.read(MAX_MANIFEST_BYTES, "the manifest").await?;
    serde_json::from_slice(&bytes).map_err(|err| invalid(format!("manifest: {err}")))
}

/// Handles `POST /v1/models`.
pub(crate) async fn upload(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    req: &actix_web::HttpRequest,
    payload: actix_web::web::Payload,
) -> ApiResult<Model> {
    let quota = &auth.isolation;
    let receiving = state.hosting.receive_upload(&auth.tenant_id)?;
    let staging = state.hosting.staging_dir();
    tokio::fs::create_dir_all(&staging)
        .await
        .map_err(ApiError::internal)?;
    let model_limit = state.settings.max_model_bytes.min(quota.max_model_bytes);
    let mut form = Form::new(
        req,
        payload,
        Bounds::total(
            model_limit.saturating_add(MAX_TOKENIZER_BYTES + MAX_MANIFEST_BYTES + crate::multipart::OVERHEAD),
        ),
    );
    let (mut manifest, mut model, mut tokenizer) = (None, None, None);
    let outcome: ApiResult<()> = async {
        while let Some(mut part) = form.next_part().await? {
            let name = part.name().to_owned();
            // A browser sends a file input left empty as a part with an empty file name: no file.
            if part.file_name() == Some("") {
                part.skip().await?;
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
                "manifest" => manifest = Some(read_manifest(&mut part).await?),
                "model" => model = Some(stage(&mut part, &staging, model_limit, "the model").await?),
                "tokenizer" => {
                    tokenizer = Some(stage(&mut part, &staging, MAX_TOKENIZER_BYTES, "the tokenizer").await?);
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
        (Some(manifest), Some(model)) => Ok(state
            .hosting
            .install_holding(
                &auth.tenant_id,
                who,
                quota,
                manifest.into(),
                model,
                tokenizer,
                receiving,
            )
            .await?),
        (None, _) => Err(invalid("the `manifest` part is missing")),
        (_, None) => Err(invalid("the `model` part (the .onnx file) is missing")),
    }
}
