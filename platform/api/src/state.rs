//! What handlers share.

use std::sync::Arc;

use plinth_billing::Billing;
use plinth_inference::{Catalog, Engine};
use plinth_store::cache::{Quota, SharedCache};
use plinth_store::idempotency::{Claims, Completions, IdempotencySettings};
use plinth_store::ledger::Meter;
use plinth_store::{SecretBox, Store};

#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub cache: SharedCache,
    pub meter: Meter,
    /// Claims keyed requests, many per write.
    pub claims: Claims,
    /// Stores keyed requests' answers off the request path.
    pub completions: Completions,
    /// The models served here (the catalogue `hosting` keeps).
    pub models: Arc<Catalog>,
    /// Loads models (the engine `hosting` loads uploads with).
    pub engine: Engine,
    /// Tenants' uploaded models: stored, loaded on demand, kept in step across replicas.
    pub hosting: plinth_hosting::Hosting,
    pub settings: ApiSettings,
    /// Plugins: published, installed, invoked.
    pub marketplace: plinth_marketplace::Marketplace,
    /// Seals installation secrets at rest.
    pub secrets: SecretBox,
    /// Statements, plan changes, Stripe.
    pub billing: Billing,
    /// Each tenant's last failed calls, for the portal.
    pub recent_errors: crate::recent_errors::RecentErrors,
    /// Set when the server is asked to stop: readiness answers 503 from then on, so that load
    /// balancers stop sending before the listener closes.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// Edge limits, set from the server's configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The largest JSON body accepted.
    pub max_body_bytes: usize,
    /// The largest model file a tenant may upload.
    pub max_model_bytes: u64,
    /// How keyed requests are held and how long their answers are kept.
    pub idempotency: IdempotencySettings,
    /// Proxies whose `X-Forwarded-For` is believed (see [`crate::client`]).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Who may read `/metrics` on the API listener; `None`: nobody (metrics stay on their own
    /// listener, if any).
    pub metrics_token: Option<crate::metrics::MetricsToken>,
    /// A portal session unused this long must log in again.
    pub portal_idle: std::time::Duration,
    pub limits: AbuseLimits,
    /// Datasets and training jobs.
    pub training: crate::training::TrainingSettings,
}

/// Limits on the routes an attacker pushes hardest, beside each plan's limit on metered calls.
#[derive(Debug, Clone, Copy)]
pub struct AbuseLimits {
    /// Sign-ups per client address.
    pub signups_per_address: Quota,
    /// Login attempts per client address (each email is limited on its own too).
    pub logins_per_address: Quota,
    /// Sign-ups and logins from everywhere together: the password hashers' budget.
    pub unauthenticated_global: Quota,
    /// Authenticated calls to unmetered routes (keys, members, models, installations...) per tenant.
    pub unmetered_per_tenant: Quota,
    /// Plugin versions submitted per author (each one is compiled and run).
    pub publishes_per_author: Quota,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        let per_minute = |n: u32| Quota {
            per_minute: n,
            burst: n,
        };
        Self {
            signups_per_address: per_minute(5),
            logins_per_address: per_minute(20),
            unauthenticated_global: per_minute(600),
            unmetered_per_tenant: per_minute(1_200),
            publishes_per_author: per_minute(2),
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_model_bytes: 256 * 1024 * 1024,
            idempotency: IdempotencySettings::default(),
            trusted_proxies: Vec::new(),
            metrics_token: None,
            portal_idle: std::time::Duration::from_secs(30 * 60),
            limits: AbuseLimits::default(),
            training: crate::training::TrainingSettings {
                base_models_dir: std::path::PathBuf::from("models"),
                max_dataset_bytes: 64 * 1024 * 1024,
                concurrent_jobs: 1,
                poll: std::time::Duration::from_secs(1),
                stale_after: std::time::Duration::from_secs(60),
            },
        }
    }
}
