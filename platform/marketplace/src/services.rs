//! What a running plugin may use on behalf of the invoking tenant: its models (each call metered like
//! a direct API call, with an idempotency key derived from the invocation's) and its key-value store.

use std::sync::{Mutex, PoisonError};

use plinth_core::ErrorCode;
use plinth_core::inference::{Classification, InferOutput, InferRequest, InferResponse};
use plinth_hosting::share;
use plinth_inference::{LoadedModel, Tensor};
use plinth_plugin_host::{CallContext, ServiceError, Services, Trace};
use plinth_store::StoreError;
use plinth_store::auth::Principal;
use plinth_store::metering::{Billable, CallKeys};

use crate::{MarketError, Marketplace, Result};

/// The host services of one invocation.
#[derive(Debug)]
pub(crate) struct TenantServices {
    market: Marketplace,
    auth: Principal,
    request_id: String,
    /// What the invocation left behind, once it ended (for its record).
    trace: Mutex<Option<Trace>>,
}

/// What the guest is told: the caller's mistakes in full, the platform's faults without their details
/// (the guest is a third party's code).
fn service_error(err: &MarketError) -> ServiceError {
    match err.code() {
        ErrorCode::InvalidInput | ErrorCode::UnsupportedTask | ErrorCode::NotFound => {
            ServiceError::InvalidInput(err.to_string())
        }
        ErrorCode::PluginLimitExceeded | ErrorCode::QuotaExceeded => {
            ServiceError::QuotaExceeded(err.to_string())
        }
        ErrorCode::Internal => {
            tracing::error!(error = %err, "a plugin's host call failed");
            ServiceError::Unavailable("an internal error occurred".to_owned())
        }
        // Only a refusal's own words (the server still loading models, say); a database's or a
        // cache's error text stays in the log.
        ErrorCode::Unavailable if !is_refusal(err) => {
            tracing::warn!(error = %err, "dependency unavailable");
            ServiceError::Unavailable("a dependency is unavailable; retry shortly".to_owned())
        }
        _ => ServiceError::Unavailable(err.to_string()),
    }
}

/// Whether the failure is a refusal worded for the caller.
fn is_refusal(err: &MarketError) -> bool {
    matches!(
        err,
        MarketError::Refused { .. } | MarketError::Hosting(plinth_hosting::HostingError::Refused { .. })
    )
}

fn store_error(err: StoreError) -> ServiceError {
    service_error(&MarketError::Store(err))
}

impl TenantServices {
    pub(crate) fn new(market: Marketplace, auth: Principal, request_id: String) -> Self {
        Self {
            market,
            auth,
            request_id,
            trace: Mutex::new(None),
        }
    }

    /// What the invocation left behind, once it ended.
    pub(crate) fn take_trace(&self) -> Option<Trace> {
        self.trace.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Runs a host call's work with only the calling tenant's rows visible: guest code runs on the
    /// plugin host's own runtime, outside the request whose row-security scope named the tenant.
    async fn walled<F: Future>(&self, work: F) -> F::Output {
        plinth_store::row_security::within_tenant(&self.auth.tenant_id, work).await
    }

    /// The granted model `name` (the host checked the grant), found as the tenant sees it.
    async fn model(&self, name: &str) -> Result<std::sync::Arc<LoadedModel>, ServiceError> {
        self.market
            .hosting
            .find(&self.auth.tenant_id, &self.auth.isolation, name)
            .await
            .map_err(|err| service_error(&err.into()))
    }

    /// Runs a model call's `work`, metered under a key derived from the invocation's attempt.
    async fn model_call<T>(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        units: usize,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T, ServiceError> {
        let keys = CallKeys::derived(&call.idempotency_key, sequence);
        let billable = Billable::model(&self.auth, model, units);
        self.market
            .meter
            .metered(&self.auth, keys, self.request_id.clone(), billable, work)
            .await
            .map(|(value, _)| value)
            .map_err(|err| service_error(&err))
    }
}

#[async_trait::async_trait]
impl Services for TenantServices {
    fn finished(&self, _call: &CallContext, trace: Trace) {
        *self.trace.lock().unwrap_or_else(PoisonError::into_inner) = Some(trace);
    }

    async fn classify(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError> {
        self.walled(async move {
            let loaded = self.model(model).await?;
            let units = texts.len();
            self.model_call(call, sequence, model, units, async {
                Ok(loaded.classify(share(&self.auth), texts).await?)
            })
            .await
        })
        .await
    }

    async fn embed(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        self.walled(async move {
            let loaded = self.model(model).await?;
            let units = texts.len();
            self.model_call(call, sequence, model, units, async {
                Ok(loaded.embed(share(&self.auth), texts).await?)
            })
            .await
        })
        .await
    }

    async fn infer(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError> {
        self.walled(async move {
            let loaded = self.model(model).await?;
            let request: InferRequest = serde_json::from_str(&request)
                .map_err(|err| ServiceError::InvalidInput(format!("request: {err}")))?;
            let inputs = request
                .inputs
                .iter()
                .map(|i| Tensor::from_json(&i.name, &i.datatype, &i.shape, &i.data))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| ServiceError::InvalidInput(err.to_string()))?;
            let units = LoadedModel::batch_size(&inputs)
                .map_err(|err| ServiceError::InvalidInput(err.to_string()))?;
            let units = usize::try_from(units).unwrap_or(1);
            let wanted = request.outputs.map(|o| o.into_iter().map(|o| o.name).collect());
            let outputs = self
                .model_call(call, sequence, model, units, async {
                    Ok(loaded.infer(share(&self.auth), inputs, wanted).await?)
                })
                .await?;
            let response = InferResponse {
                model_name: loaded.info().name.clone(),
                model_version: loaded.info().version.to_string(),
                id: request.id,
                outputs: outputs
                    .into_iter()
                    .map(|t| InferOutput {
                        datatype: t.data.datatype().as_str().to_owned(),
                        data: t.data.to_json(),
                        name: t.name,
                        shape: t.shape,
                        parameters: None,
                    })
                    .collect(),
            };
            serde_json::to_string(&response).map_err(|err| ServiceError::Unavailable(err.to_string()))
        })
        .await
    }

    async fn kv_get(&self, call: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        self.walled(async move {
            self.market
                .store
                .kv_get(&call.installation_id, key)
                .await
                .map_err(store_error)
        })
        .await
    }

    async fn kv_set(
        &self,
        call: &CallContext,
        key: &str,
        value: Vec<u8>,
        max_keys: u64,
    ) -> Result<(), ServiceError> {
        self.walled(async move {
            match self
                .market
                .store
                .kv_set(&call.installation_id, key, value, max_keys)
                .await
            {
                Ok(()) => Ok(()),
                Err(StoreError::Refused(_, message)) => Err(ServiceError::QuotaExceeded(message)),
                Err(err) => Err(store_error(err)),
            }
        })
        .await
    }

    async fn kv_delete(&self, call: &CallContext, key: &str) -> Result<bool, ServiceError> {
        self.walled(async move {
            self.market
                .store
                .kv_delete(&call.installation_id, key)
                .await
                .map_err(store_error)
        })
        .await
    }

    async fn kv_list(&self, call: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        self.walled(async move {
            self.market
                .store
                .kv_list(&call.installation_id, prefix)
                .await
                .map_err(store_error)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use plinth_hosting::HostingError;

    use super::*;

    /// A guest is third-party code: it learns what went wrong with its own call, and only the kind of
    /// a platform fault, never the fault's text (a database's address, a file's path).
    #[test]
    fn a_guest_is_told_its_own_mistakes_in_full_and_only_the_kind_of_a_platform_fault() {
        let secret = "connection to 10.0.0.5:5432 refused; /var/lib/plinth/models/x.onnx";
        let faults = [
            MarketError::Store(StoreError::Unavailable(secret.into())),
            MarketError::Store(StoreError::Internal(secret.into())),
            MarketError::Hosting(HostingError::Store(StoreError::Unavailable(secret.into()))),
            MarketError::Hosting(HostingError::Internal(secret.into())),
            MarketError::Internal(secret.into()),
        ];
        for fault in &faults {
            let told = service_error(fault);
            assert!(
                matches!(told, ServiceError::Unavailable(_)),
                "{fault:?} -> {told:?}"
            );
            assert!(!told.to_string().contains("10.0.0.5"), "{fault:?} -> {told:?}");
        }

        let loading = MarketError::Hosting(HostingError::Refused {
            code: ErrorCode::Unavailable,
            message: "the server has just started and is still loading models; retry shortly".into(),
            retry_after: Some(Duration::from_secs(2)),
        });
        assert!(
            service_error(&loading)
                .to_string()
                .contains("still loading models")
        );
        let missing = MarketError::Hosting(HostingError::Refused {
            code: ErrorCode::NotFound,
            message: "no model named `nope`".into(),
            retry_after: None,
        });
        assert!(matches!(service_error(&missing), ServiceError::InvalidInput(m) if m.contains("nope")));
        let bad = MarketError::Inference(plinth_inference::InferenceError::InvalidInput(
            "shape [2] is not [1]".into(),
        ));
        assert!(matches!(service_error(&bad), ServiceError::InvalidInput(m) if m.contains("shape")));
    }
}
