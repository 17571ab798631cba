//! The Open Inference Protocol v2 (KServe, Triton): model metadata, readiness and tensor inference, so
//! Triton and KServe clients work unchanged. Calls carry `Authorization: Bearer <key>` like every other.

use actix_web::{HttpRequest, HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::id::TenantId;
use plinth_core::inference::{
    InferOutput, InferRequest, InferResponse, ModelMetadata, ModelReady, ModelStatistics, ServerMetadata,
};
use plinth_inference::{LoadedModel, Tensor};
use serde::Deserialize;

use crate::auth::{Auth, scope};
use crate::error::{ApiError, ApiResult};
use crate::metering::{Billable, IdempotencyKey, metered};
use crate::request_id::RequestId;
use crate::routes::models::find_model;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

/// The version `described` found, loaded if it is not: the newest through the catalogue, an older
/// one kept beside it.
///
/// # Errors
/// `not_found` once the version is gone; a load's failure.
async fn load_described(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    info: &plinth_core::inference::Model,
) -> ApiResult<std::sync::Arc<LoadedModel>> {
    let newest = state.hosting.describe(&auth.tenant_id, &info.name)?;
    if newest.version == info.version {
        return find_model(state, auth, &info.name).await;
    }
    state
        .hosting
        .pinned_version(&auth.tenant_id, &auth.isolation, &info.name, info.version)
        .await?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("model `{}` has no version {}", info.name, info.version),
            )
        })
}

/// The version the path names as this server describes it, loaded or not: nothing is loaded to
/// describe it (but an older version registered before signatures were kept, once).
///
/// # Errors
/// `not_found` for no such model or version; `unavailable` while the server is still reading
/// tenants' models.
async fn described(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    path: &ModelPath,
) -> ApiResult<plinth_core::inference::Model> {
    let newest = state.hosting.describe(&auth.tenant_id, &path.name)?;
    let Some(asked) = &path.version else {
        return Ok(newest);
    };
    let no_such_version = || {
        ApiError::new(
            ErrorCode::NotFound,
            format!("model `{}` has no version {asked}", path.name),
        )
    };
    let version: u32 = asked.parse().map_err(|_| no_such_version())?;
    if newest.version == version {
        return Ok(newest);
    }
    if newest.platform {
        return Err(no_such_version());
    }
    state
        .hosting
        .describe_version(&auth.tenant_id, &auth.isolation, &path.name, version)
        .await?
        .ok_or_else(no_such_version)
}

/// The version the path names, if this replica has it loaded (nothing is loaded to find out).
fn loaded(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    path: &ModelPath,
) -> Option<std::sync::Arc<LoadedModel>> {
    let newest = state.models.find(&auth.tenant_id, &path.name);
    let Some(asked) = &path.version else {
        return newest;
    };
    let version: u32 = asked.parse().ok()?;
    newest
        .filter(|model| model.info().version == version)
        .or_else(|| state.models.find_version(&auth.tenant_id, &path.name, version))
}

/// Model metadata: versions, inputs and outputs with datatypes and shapes (-1 = dynamic), described
/// without loading the model.
#[utoipa::path(get, path = "/v2/models/{name}", operation_id = "model_metadata", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn metadata(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelMetadata>> {
    let info = described(&state, &auth, &path).await?;
    let versions = if info.platform {
        vec![info.version.to_string()]
    } else {
        let live = state.store.model_versions(&auth.tenant_id, &info.name).await?;
        // Deleted since it was described.
        if !live.contains(&info.version) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no model named `{}`", info.name),
            ));
        }
        live.iter().map(ToString::to_string).collect()
    };
    Ok(web::Json(ModelMetadata {
        name: info.name.clone(),
        versions,
        platform: "onnxruntime_onnx".to_owned(),
        inputs: info.inputs.clone(),
        outputs: info.outputs.clone(),
    }))
}

/// Whether the model can serve: `503` with `ready: false` while it cannot (its runs keep failing on
/// the runtime's side, or its load failed within the last minute). A tenant's version not loaded
/// here is ready (its first call loads it); asking does not load it.
#[utoipa::path(get, path = "/v2/models/{name}/ready", operation_id = "model_ready", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelReady), (status = 503, body = ModelReady), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn ready(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<HttpResponse> {
    let (name, ready) = match loaded(&state, &auth, &path) {
        Some(model) => (model.info().name.clone(), model.serving()),
        None => {
            let info = described(&state, &auth, &path).await?;
            let failed = state
                .hosting
                .load_failed(&auth.tenant_id, &info.name, info.version);
            (info.name, !failed)
        }
    };
    let mut response = if ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    Ok(response.json(ModelReady { name, ready }))
}

/// Counters since the model was loaded on this server: calls, items, and executions (fewer than
/// calls when batched). A version not loaded here counts nothing, and asking does not load it.
#[utoipa::path(get, path = "/v2/models/{name}/stats", operation_id = "model_statistics", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelStatistics), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn statistics(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelStatistics>> {
    if let Some(model) = loaded(&state, &auth, &path) {
        return Ok(web::Json(model.statistics()));
    }
    let info = described(&state, &auth, &path).await?;
    Ok(web::Json(ModelStatistics {
        name: info.name,
        version: info.version.to_string(),
        success_count: 0,
        failure_count: 0,
        inference_count: 0,
        execution_count: 0,
    }))
}

/// The server's name, version and protocol extensions (`get_server_metadata()` in Triton's clients).
/// Public, like the health probes: it says nothing about any tenant.
#[utoipa::path(get, path = "/v2", operation_id = "server_metadata", tag = "inference protocol",
    responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> web::Json<ServerMetadata> {
    web::Json(ServerMetadata {
        name: "plinth".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        // Tensors as raw bytes after the JSON header, and per-model statistics.
        extensions: vec!["binary_tensor_data".to_owned(), "statistics".to_owned()],
    })
}

/// Metadata of one version of a model (the newest, or an older one still kept).
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", operation_id = "model_version_metadata",
    tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = plinth_core::error::ProtocolErrorBody),
        (status = 429, description = "`tenant_queue_full`: the tenant's other models took too long to load (its loads take turns), with `Retry-After`", body = plinth_core::error::ProtocolErrorBody)))]
pub async fn version_metadata(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelMetadata>> {
    metadata(state, auth, path).await
}

/// Whether one version of a model is loaded and serving.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", operation_id = "model_version_ready",
    tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ModelReady), (status = 503, body = ModelReady), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn version_ready(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<HttpResponse> {
    ready(state, auth, path).await
}

/// Counters of one version of a model since it was loaded.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/stats", operation_id = "model_version_statistics",
    tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = ModelStatistics), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn version_statistics(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelStatistics>> {
    statistics(state, auth, path).await
}

/// Run one version of the model on tensors: as `/v2/models/{name}/infer`, pinned to `version`.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", operation_id = "model_version_infer",
    tag = "inference protocol", security(("bearer" = ["inference"])),
    params(("name" = String, Path), ("version" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "`invalid_input`: names, datatypes, shapes or batch sizes do not fit", body = plinth_core::error::ProtocolErrorBody),
        (status = 404, description = "no such model or version", body = plinth_core::error::ProtocolErrorBody),
        (status = 409, description = "`idempotency_in_flight`, with `Retry-After`", body = plinth_core::error::ProtocolErrorBody),
        (status = 422, description = "`idempotency_key_reused`", body = plinth_core::error::ProtocolErrorBody),
    ))]
pub async fn version_infer(
    state: web::Data<AppState>,
    auth: Auth<scope::Inference>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    path: web::Path<ModelPath>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    infer(state, auth, idempotency, request_id, path, req, payload).await
}

/// Run the model on tensors. Datatypes FP32, FP16, INT64, INT32, BOOL and BYTES; the data must hold
/// exactly as many elements as the shape says. Every input's first dimension is the batch: they must
/// agree, and the call is billed per item of it.
#[utoipa::path(post, path = "/v2/models/{name}/infer", operation_id = "model_infer", tag = "inference protocol", security(("bearer" = ["inference"])),
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "`invalid_input`: names, datatypes, shapes or batch sizes do not fit", body = plinth_core::error::ProtocolErrorBody),
        (status = 409, description = "`idempotency_in_flight`, with `Retry-After`", body = plinth_core::error::ProtocolErrorBody),
        (status = 422, description = "`idempotency_key_reused`", body = plinth_core::error::ProtocolErrorBody),
    ))]
pub async fn infer(
    state: web::Data<AppState>,
    auth: Auth<scope::Inference>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    path: web::Path<ModelPath>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    // No such model or version is answered (`404`; `503` while the server starts) before the body is
    // read; the model is loaded (when it is not) only for inputs that fit its description, so a call
    // that cannot run loads nothing.
    let info = described(&state, &auth, &path).await?;
    let body = read_body(payload, TENSOR_BODY_LIMIT).await?;
    let json_length = json_length(&req, &body)?;
    // The parsed request is let go of before the call waits for the model: only its tensors, its id
    // and which outputs it wants are kept.
    let (id, all_binary, wanted, inputs) = {
        let _turn = JSON_DECODING.turn(&auth.tenant_id, json_length).await?;
        let (mut request, mut binary) = split_binary(&body, json_length)?;
        let inputs = std::mem::take(&mut request.inputs)
            .iter()
            .map(|input| match binary_size(input.parameters.as_ref()) {
                Some(size) => {
                    let bytes = take(&mut binary, size, &input.name)?;
                    Tensor::from_binary(&input.name, &input.datatype, &input.shape, bytes)
                        .map_err(ApiError::from)
                }
                None => Tensor::from_json(&input.name, &input.datatype, &input.shape, &input.data)
                    .map_err(ApiError::from),
            })
            .collect::<ApiResult<Vec<_>>>()?;
        if !binary.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                "the body has binary data that no input claims",
            ));
        }
        // Outputs go back in binary when the request asks for it, per output or for all.
        let all_binary = flag(request.parameters.as_ref(), "binary_data_output");
        let wanted: Option<Vec<(String, bool)>> = request.outputs.map(|outputs| {
            outputs
                .into_iter()
                .map(|o| (o.name, flag(o.parameters.as_ref(), "binary_data") || all_binary))
                .collect()
        });
        (request.id, all_binary, wanted, inputs)
    };
    drop(body);
    let units = usize::try_from(LoadedModel::batch_size(&inputs)?).unwrap_or(1);
    let names: Option<Vec<String>> = wanted
        .as_ref()
        .map(|w| w.iter().map(|(name, _)| name.clone()).collect());
    plinth_inference::check_tensors(&info, &inputs, names.as_deref())?;
    let model = load_described(&state, &auth, &info).await?;
    let billable = Billable::model(&auth, &path.name, units);
    let as_binary = |output: &str| {
        wanted
            .as_ref()
            .map_or(all_binary, |w| w.iter().any(|(name, b)| name == output && *b))
    };
    let work = async {
        let outputs = model
            .infer(crate::routes::models::share(&auth), inputs, names)
            .await?;
        // Checked before the call counts: an answer that cannot go back as asked is not billed.
        let in_json: usize = outputs
            .iter()
            .filter(|t| !as_binary(&t.name))
            .map(|t| t.data.len())
            .sum();
        if in_json > JSON_ANSWER_ELEMENTS {
            return Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!(
                    "the model answered {in_json} elements to send back as JSON, where at most \
                     {JSON_ANSWER_ELEMENTS} are; ask for them in binary (`binary_data_output`)"
                ),
            ));
        }
        Ok(outputs)
    };
    let (outputs, recorded) = metered(&state, &auth, idempotency, request_id, billable, work).await?;

    let mut blobs = Vec::new();
    let outputs = outputs
        .into_iter()
        .map(|t| {
            let as_binary = as_binary(&t.name);
            let datatype = t.data.datatype().as_str().to_owned();
            if as_binary {
                let bytes = t.data.to_binary();
                let mut parameters = serde_json::Map::new();
                parameters.insert("binary_data_size".to_owned(), bytes.len().into());
                blobs.extend_from_slice(&bytes);
                InferOutput {
                    name: t.name,
                    shape: t.shape,
                    datatype,
                    parameters: Some(parameters),
                    data: serde_json::Value::Null,
                }
            } else {
                InferOutput {
                    data: t.data.to_json(),
                    name: t.name,
                    shape: t.shape,
                    datatype,
                    parameters: None,
                }
            }
        })
        .collect();
    let info = model.info();
    let response = InferResponse {
        model_name: info.name.clone(),
        model_version: info.version.to_string(),
        id,
        outputs,
    };
    let mut reply = HttpResponse::Ok();
    reply.insert_header(("Idempotent-Replayed", recorded.replayed.to_string()));
    if blobs.is_empty() {
        return Ok(reply.json(response));
    }
    let mut bytes = serde_json::to_vec(&response).map_err(ApiError::internal)?;
    reply.insert_header((HEADER_LENGTH, bytes.len().to_string()));
    bytes.extend_from_slice(&blobs);
    Ok(reply.content_type("application/octet-stream").body(bytes))
}

/// Numbers of an answer sent back as JSON, all outputs (or embeddings) together. As JSON a number
/// takes up to tens of bytes of text, and a `serde_json::Value` (32 bytes) while a protocol answer
/// is built: a run's largest answer (16 Mi elements) would take about a gigabyte, and a few such
/// calls at once the process's memory. Larger protocol answers go back in binary, four bytes an
/// element or so; larger embeddings, in calls of fewer texts.
pub(crate) const JSON_ANSWER_ELEMENTS: usize = 1 << 20;

/// The binary extension's header: how many leading bytes of the body are the JSON request.
const HEADER_LENGTH: &str = "Inference-Header-Content-Length";
/// The largest inference-protocol body: 16 MiB.
pub(crate) const TENSOR_BODY_LIMIT: usize = 16 * 1024 * 1024;

async fn read_body(mut payload: web::Payload, limit: usize) -> ApiResult<web::BytesMut> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| ApiError::new(ErrorCode::InvalidJson, err.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("the body is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// JSON text of tensor requests parsed at once, across requests, in bytes: parsed, such JSON takes
/// up to thirty times its size (each number a `serde_json::Value`) until it becomes tensors, so many
/// large requests at once could take the process's memory. Requests of at most [`SMALL_JSON`] bytes
/// do not count. One tenant's requests hold at most a quarter of it at once (one request alone may
/// hold more), so one tenant cannot keep everyone else's large requests waiting.
const JSON_DECODE_BUDGET: usize = 16 << 20;
const SMALL_JSON: usize = 64 << 10;
/// How long a large JSON request waits for its turn before it is told to retry.
const JSON_TURN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

static JSON_DECODING: JsonBudget = JsonBudget::new(JSON_DECODE_BUDGET);

/// Bytes of JSON being parsed: in all, and by tenant.
struct JsonBudget {
    bytes: tokio::sync::Semaphore,
    by_tenant: std::sync::Mutex<std::collections::BTreeMap<TenantId, usize>>,
    size: usize,
}

/// A request's share of the budget while it is parsed.
struct JsonTurn<'a> {
    budget: &'a JsonBudget,
    tenant: TenantId,
    bytes: usize,
    _permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl JsonBudget {
    const fn new(size: usize) -> Self {
        Self {
            bytes: tokio::sync::Semaphore::const_new(size),
            by_tenant: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            size,
        }
    }

    /// A turn to parse `length` bytes of the tenant's JSON: none needed for a small request.
    async fn turn(&self, tenant: &TenantId, length: usize) -> ApiResult<Option<JsonTurn<'_>>> {
        if length <= SMALL_JSON {
            return Ok(None);
        }
        let bytes = length.min(self.size);
        {
            let mut by_tenant = self
                .by_tenant
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let held = by_tenant.entry(tenant.clone()).or_default();
            if *held > 0 && *held + bytes > self.size / 4 {
                return Err(ApiError::new(
                    ErrorCode::TenantQueueFull,
                    "much of your JSON is being parsed already; retry shortly, or send tensors in binary",
                )
                .retry_after(std::time::Duration::from_secs(1)));
            }
            *held += bytes;
        }
        // From here the share is given back on drop, whatever happens.
        let mut turn = JsonTurn {
            budget: self,
            tenant: tenant.clone(),
            bytes,
            _permit: None,
        };
        let permits = u32::try_from(bytes).unwrap_or(u32::MAX);
        match tokio::time::timeout(JSON_TURN_WAIT, self.bytes.acquire_many(permits)).await {
            Ok(Ok(permit)) => {
                turn._permit = Some(permit);
                Ok(Some(turn))
            }
            _ => Err(ApiError::new(
                ErrorCode::Unavailable,
                "many large JSON tensor requests are being parsed; retry shortly, or send tensors in binary",
            )
            .retry_after(std::time::Duration::from_secs(1))),
        }
    }
}

impl Drop for JsonTurn<'_> {
    fn drop(&mut self) {
        let mut by_tenant = self
            .budget
            .by_tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(held) = by_tenant.get_mut(&self.tenant) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                by_tenant.remove(&self.tenant);
            }
        }
    }
}

/// How much of the body is the JSON request (the rest, if any, is binary tensor data).
fn json_length(req: &HttpRequest, body: &[u8]) -> ApiResult<usize> {
    match req.headers().get(HEADER_LENGTH) {
        None => Ok(body.len()),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|length| *length <= body.len())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidHeader,
                    format!("{HEADER_LENGTH} must be a length within the body"),
                )
            }),
    }
}

/// Splits a body into the JSON request and the binary tensor data after it (if any).
fn split_binary(body: &[u8], json_length: usize) -> ApiResult<(InferRequest, &[u8])> {
    let (json, binary) = body.split_at(json_length);
    let request = serde_json::from_slice(json).map_err(|err| {
        let code = if err.is_data() {
            ErrorCode::InvalidBody
        } else {
            ErrorCode::InvalidJson
        };
        ApiError::new(code, format!("the inference request is not valid: {err}"))
    })?;
    Ok((request, binary))
}

fn binary_size(parameters: Option<&serde_json::Map<String, serde_json::Value>>) -> Option<u64> {
    parameters?.get("binary_data_size")?.as_u64()
}

fn flag(parameters: Option<&serde_json::Map<String, serde_json::Value>>, name: &str) -> bool {
    parameters
        .and_then(|p| p.get(name))
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false)
}

fn take<'b>(binary: &mut &'b [u8], size: u64, name: &str) -> ApiResult<&'b [u8]> {
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    if size > binary.len() {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            format!("input `{name}`: binary_data_size runs past the body"),
        ));
    }
    let (head, rest) = binary.split_at(size);
    *binary = rest;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_json_requests_share_a_budget_of_bytes_being_parsed() {
        let budget = JsonBudget::new(JSON_DECODE_BUDGET);
        let (a, b) = (TenantId::new(), TenantId::new());
        assert!(budget.turn(&a, SMALL_JSON).await.unwrap().is_none());
        // A request larger than the whole budget takes all of it, and runs alone.
        let all = budget.turn(&a, JSON_DECODE_BUDGET * 4).await.unwrap();
        assert_eq!(budget.bytes.available_permits(), 0);
        drop(all);
        assert_eq!(budget.bytes.available_permits(), JSON_DECODE_BUDGET);
        // One tenant holds at most a quarter at once; others still get their turns.
        let quarter = budget.turn(&a, JSON_DECODE_BUDGET / 4).await.unwrap();
        let more = budget.turn(&a, SMALL_JSON + 1).await.map(|_| ()).unwrap_err();
        assert_eq!(more.code(), ErrorCode::TenantQueueFull);
        let other = budget.turn(&b, JSON_DECODE_BUDGET / 2).await.unwrap();
        assert!(other.is_some());
        drop((quarter, other));
        assert_eq!(budget.bytes.available_permits(), JSON_DECODE_BUDGET);
        assert!(budget.turn(&a, SMALL_JSON + 1).await.unwrap().is_some());
    }
}
