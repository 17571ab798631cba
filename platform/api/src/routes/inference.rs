//! The Open Inference Protocol v2 (KServe, Triton): model metadata, readiness and tensor inference, so
//! Triton and KServe clients work unchanged. Calls carry `Authorization: Bearer <key>` like every other.

use actix_web::{HttpResponse, web};
use plinth_core::ErrorCode;
use plinth_core::inference::{
    InferOutput, InferRequest, InferResponse, ModelMetadata, ModelReady, ModelStatistics,
};
use plinth_inference::{LoadedModel, Tensor};
use serde::Deserialize;

use crate::auth::{Auth, scope};
use crate::error::{ApiError, ApiResult};
use crate::metering::{IdempotencyKey, record_usage};
use crate::request_id::RequestId;
use crate::routes::models::find_model;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

fn versioned(
    state: &AppState,
    auth: &plinth_store::auth::Principal,
    path: &ModelPath,
) -> ApiResult<std::sync::Arc<LoadedModel>> {
    let model = find_model(state, auth, &path.name)?;
    match &path.version {
        Some(version) if *version != model.info().version.to_string() => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("model `{}` has no version {version}", path.name),
        )),
        _ => Ok(model),
    }
}

/// Model metadata: versions, inputs and outputs with datatypes and shapes (-1 = dynamic).
#[utoipa::path(get, path = "/v2/models/{name}", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelMetadata), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn metadata(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelMetadata>> {
    let model = versioned(&state, &auth, &path)?;
    let info = model.info();
    Ok(web::Json(ModelMetadata {
        name: info.name.clone(),
        versions: vec![info.version.to_string()],
        platform: "onnxruntime_onnx".to_owned(),
        inputs: info.inputs.clone(),
        outputs: info.outputs.clone(),
    }))
}

/// Whether the model is loaded and serving.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelReady), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn ready(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelReady>> {
    let model = versioned(&state, &auth, &path)?;
    Ok(web::Json(ModelReady {
        name: model.info().name.clone(),
        ready: true,
    }))
}

/// Counters since the model was loaded: calls, items, and executions (fewer than calls when batched).
#[utoipa::path(get, path = "/v2/models/{name}/stats", tag = "inference protocol", security(("bearer" = [])),
    params(("name" = String, Path)),
    responses((status = 200, body = ModelStatistics), (status = 404, body = plinth_core::error::ProtocolErrorBody)))]
pub async fn statistics(
    state: web::Data<AppState>,
    auth: Auth,
    path: web::Path<ModelPath>,
) -> ApiResult<web::Json<ModelStatistics>> {
    Ok(web::Json(versioned(&state, &auth, &path)?.statistics()))
}

/// Run the model on tensors. Datatypes FP32, FP16, INT64, INT32, BOOL and BYTES; the data must hold
/// exactly as many elements as the shape says. Billed per item of the first input's first dimension.
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "inference protocol", security(("bearer" = ["inference"])),
    params(("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "`invalid_input`: names, datatypes or shapes do not fit", body = plinth_core::error::ProtocolErrorBody),
    ))]
pub async fn infer(
    state: web::Data<AppState>,
    auth: Auth<scope::Inference>,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    path: web::Path<ModelPath>,
    body: web::Json<InferRequest>,
) -> ApiResult<HttpResponse> {
    let model = versioned(&state, &auth, &path)?;
    let request = body.into_inner();
    let binary = request.inputs.iter().any(|input| {
        input
            .parameters
            .as_ref()
            .is_some_and(|p| p.contains_key("binary_data_size"))
    });
    if binary {
        return Err(ApiError::new(
            ErrorCode::InvalidInput,
            "the binary tensor extension is not supported yet: send JSON data",
        ));
    }
    let inputs = request
        .inputs
        .iter()
        .map(|input| Tensor::from_json(&input.name, &input.datatype, &input.shape, &input.data))
        .collect::<Result<Vec<_>, _>>()?;
    let units = usize::try_from(LoadedModel::batch_size(&inputs)).unwrap_or(1);
    let wanted = request
        .outputs
        .map(|outputs| outputs.into_iter().map(|o| o.name).collect());
    let outputs = model.infer(inputs, wanted).await?;
    let recorded = record_usage(&state, &auth, idempotency, request_id, "model", &path.name, units).await?;
    let info = model.info();
    Ok(HttpResponse::Ok()
        .insert_header(("Idempotent-Replayed", recorded.replayed.to_string()))
        .json(InferResponse {
            model_name: info.name.clone(),
            model_version: info.version.to_string(),
            id: request.id,
            outputs: outputs
                .into_iter()
                .map(|t| InferOutput {
                    data: t.data.to_json(),
                    datatype: t.data.datatype().as_str().to_owned(),
                    shape: t.shape,
                    name: t.name,
                })
                .collect(),
        }))
}
