//! What handlers share.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use plinth_inference::Catalog;
use plinth_store::Store;
use plinth_store::cache::SharedCache;
use plinth_store::ledger::Meter;

#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub cache: SharedCache,
    pub meter: Meter,
    pub models: Arc<Catalog>,
    pub metrics: PrometheusHandle,
    pub settings: ApiSettings,
}

/// Edge limits, set from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The largest JSON body accepted.
    pub max_body_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
        }
    }
}
