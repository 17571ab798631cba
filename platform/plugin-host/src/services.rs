//! What the host asks of the platform on a plugin's behalf, and the facts of one invocation.

use std::collections::BTreeMap;

use plinth_core::id::TenantId;
use plinth_core::inference::Classification;

pub use plinth_core::plugins::Capability;

/// Who is invoking which installation, and what it may use.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub tenant_id: TenantId,
    pub installation_id: String,
    /// Plugin instances the tenant may run at once (its plan's).
    pub instances: u32,
    /// The tenant pays for its plan (a paid plan in good standing). The tenants that do not together
    /// run at most three quarters of the instance pool: accounts that cost nothing to open cannot
    /// take all of it.
    pub paying: bool,
    /// The plugin's name, for logs and metrics.
    pub plugin: String,
    /// Models the manifest declared and the tenant approved.
    pub granted_models: Vec<String>,
    /// Settings (JSON values) and decrypted secrets of the installation.
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub secrets: BTreeMap<String, String>,
    /// This attempt at the invocation's ledger key: host calls derive theirs from it, so a model call
    /// retried within the attempt is billed once, and every attempt's calls are billed as its own.
    pub idempotency_key: String,
}

/// A failed host service call, as the plugin will see it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    QuotaExceeded(String),
    #[error("{0}")]
    Unavailable(String),
}

/// The platform side of the host interfaces. `sequence` numbers a plugin's model calls within one
/// invocation (1, 2, …), for their idempotency keys.
#[async_trait::async_trait]
pub trait Services: Send + Sync + std::fmt::Debug {
    async fn classify(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError>;

    async fn embed(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError>;

    /// An Open Inference Protocol request and response, as JSON text.
    async fn infer(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError>;

    async fn kv_get(&self, call: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError>;

    /// Stores a value; refuses a new key beyond `max_keys` for the installation.
    async fn kv_set(
        &self,
        call: &CallContext,
        key: &str,
        value: Vec<u8>,
        max_keys: u64,
    ) -> Result<(), ServiceError>;

    async fn kv_delete(&self, call: &CallContext, key: &str) -> Result<bool, ServiceError>;

    async fn kv_list(&self, call: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError>;

    /// Told once an invocation has ended, however it ended (answered, refused, failed, trapped,
    /// stopped at a limit or the deadline), with what it left behind: for invocation records.
    fn finished(&self, _call: &CallContext, _trace: Trace) {}
}

/// What an invocation left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub logs: Vec<LogLine>,
    pub duration: std::time::Duration,
    /// Fuel burnt.
    pub compute_units: u64,
}

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    pub level: &'static str,
    pub message: String,
}

/// Services that grant nothing: no models, an empty store that keeps nothing. What a component gets
/// when it runs outside any installation (the publishing smoke run, benchmarks of the host alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoServices;

#[async_trait::async_trait]
impl Services for NoServices {
    async fn classify(
        &self,
        _: &CallContext,
        _: u32,
        _: &str,
        _: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError> {
        Err(ServiceError::Unavailable(
            "no models outside an installation".into(),
        ))
    }

    async fn embed(
        &self,
        _: &CallContext,
        _: u32,
        _: &str,
        _: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        Err(ServiceError::Unavailable(
            "no models outside an installation".into(),
        ))
    }

    async fn infer(&self, _: &CallContext, _: u32, _: &str, _: String) -> Result<String, ServiceError> {
        Err(ServiceError::Unavailable(
            "no models outside an installation".into(),
        ))
    }

    async fn kv_get(&self, _: &CallContext, _: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(None)
    }

    async fn kv_set(&self, _: &CallContext, _: &str, _: Vec<u8>, _: u64) -> Result<(), ServiceError> {
        Err(ServiceError::Unavailable(
            "no storage outside an installation".into(),
        ))
    }

    async fn kv_delete(&self, _: &CallContext, _: &str) -> Result<bool, ServiceError> {
        Ok(false)
    }

    async fn kv_list(&self, _: &CallContext, _: &str) -> Result<Vec<String>, ServiceError> {
        Ok(Vec::new())
    }
}
