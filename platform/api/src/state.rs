//! What handlers share.

use std::path::PathBuf;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use plinth_billing::Billing;
use plinth_inference::{Catalog, Engine};
use plinth_plugin_host::PluginHost;
use plinth_store::cache::SharedCache;
use plinth_store::ledger::Meter;
use plinth_store::{SecretBox, Store};

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
    /// Compiles and runs plugins.
    pub plugins: Arc<PluginHost>,
    /// Where published plugin components live, named by their SHA-256.
    pub plugin_files: PathBuf,
    /// Seals installation secrets at rest.
    pub secrets: SecretBox,
    /// Statements, plan changes, Stripe.
    pub billing: Billing,
}

/// Edge limits, set from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The largest JSON body accepted.
    pub max_body_bytes: usize,
    /// The largest model file a tenant may upload.
    pub max_model_bytes: u64,
    /// Plugin authors' share of their plugins' revenue, in basis points (8000 = 80%).
    pub author_share_bps: u32,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_model_bytes: 256 * 1024 * 1024,
            author_share_bps: 8_000,
        }
    }
}
