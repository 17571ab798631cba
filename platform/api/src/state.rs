//! What handlers share.

use std::path::PathBuf;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use plinth_inference::{Catalog, Engine};
use plinth_store::Store;
use plinth_store::cache::SharedCache;
use plinth_store::ledger::Meter;

#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub cache: SharedCache,
    pub meter: Meter,
    pub models: Arc<Catalog>,
    /// Loads uploaded models.
    pub engine: Engine,
    /// Where uploaded model files live, named by their SHA-256.
    pub model_files: PathBuf,
    pub metrics: PrometheusHandle,
    pub settings: ApiSettings,
}

/// Edge limits, set from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The largest JSON body accepted.
    pub max_body_bytes: usize,
    /// The largest model file a tenant may upload.
    pub max_model_bytes: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_model_bytes: 256 * 1024 * 1024,
        }
    }
}
