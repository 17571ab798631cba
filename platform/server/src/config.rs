//! Configuration, layered: built-in defaults, then an optional TOML file (`--config` or
//! `PLINTH_CONFIG`), then `PLINTH_*` environment variables. Validated once at start-up, with messages
//! that name the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use plinth_billing::{PlanPrices, StripeSettings, SyncSettings};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting, with its environment variable in the doc comment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `PLINTH_HTTP_ADDR`: where the API listens.
    pub http_addr: SocketAddr,
    /// `PLINTH_DATA_DIR`: the embedded database and, later, model files.
    pub data_dir: PathBuf,
    /// `PLINTH_DATABASE_URL`: `postgres://…` for production; unset means SQLite in the data dir.
    pub database_url: Option<String>,
    /// `PLINTH_DATABASE_SCHEMA`: Postgres schema to use (created if missing).
    pub database_schema: Option<String>,
    /// `PLINTH_DATABASE_MAX_CONNECTIONS`.
    pub database_max_connections: u32,
    /// `PLINTH_REDIS_URL`: `redis://…` for production; unset means in-process cache and limits.
    pub redis_url: Option<String>,
    /// `PLINTH_REDIS_PREFIX`: prefix for every Redis key.
    pub redis_prefix: String,
    /// `PLINTH_MAX_BODY_BYTES`: largest JSON body accepted.
    pub max_body_bytes: usize,
    /// `PLINTH_MAX_MODEL_BYTES`: largest model file a tenant may upload.
    pub max_model_bytes: u64,
    /// `PLINTH_MAX_DATASET_BYTES`: largest dataset file a tenant may upload (plans bound it too).
    pub max_dataset_bytes: u64,
    /// `PLINTH_TRAINING_JOBS`: training jobs this replica runs at once, each on one thread at the
    /// lowest priority.
    pub training_jobs: usize,
    /// `PLINTH_TRAINING_POLL_MS`: how often an idle replica looks for queued training jobs.
    pub training_poll_ms: u64,
    /// `PLINTH_TRAINING_STALE_SECS`: a training job whose replica has not been heard from for this
    /// long (it crashed or was stopped) is resumed by another.
    pub training_stale_secs: u64,
    /// `PLINTH_SECRET_KEY`: 64 hex digits, the key that seals plugin secrets at rest. Unset, the
    /// embedded mode keeps a generated key in `<data_dir>/secret.key`; production mode (Postgres)
    /// refuses to start without it, since every replica must seal with the same key.
    pub secret_key: Option<String>,
    /// `PLINTH_SECRET_KEYS_PREVIOUS`: comma-separated earlier keys (64 hex digits each) that still
    /// open what they sealed, never sealing anything new: the middle of a key rotation.
    pub secret_keys_previous: String,
    /// `PLINTH_PLUGIN_AUTHOR_SHARE_BPS`: plugin authors' share of plugin fees, in basis points.
    pub plugin_author_share_bps: u32,
    /// `PLINTH_PLUGIN_DEADLINE_MS`: how long one plugin invocation may run.
    pub plugin_deadline_ms: u64,
    /// `PLINTH_PLUGIN_MEMORY_MIB`: linear memory one plugin instance may use.
    pub plugin_memory_mib: usize,
    /// `PLINTH_PLUGIN_KV_KEYS`: keys one installation may keep in its key-value store.
    pub plugin_kv_keys: u64,
    /// `PLINTH_CREDENTIAL_CACHE_TTL_MS`: how long a verified key is trusted without re-reading it.
    pub credential_cache_ttl_ms: u64,
    /// `PLINTH_LEDGER_MAX_BATCH`: most usage events written in one INSERT.
    pub ledger_max_batch: usize,
    /// `PLINTH_WORKERS`: HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// `PLINTH_SHUTDOWN_DELAY_SECS`: after SIGTERM (or Ctrl-C), how long readiness answers 503 while
    /// requests are still served, so that load balancers stop sending first. Unset: 5 in production
    /// mode (Postgres), 0 in the embedded default.
    pub shutdown_delay_secs: Option<u64>,
    /// `PLINTH_SHUTDOWN_TIMEOUT_SECS`: then, how long in-flight requests have to finish.
    pub shutdown_timeout_secs: u64,
    /// `PLINTH_BLOB_URL`: shared storage for uploaded model files and plugin components,
    /// `s3://bucket/prefix` (S3 or any S3-compatible service). Unset, they stay in the data directory,
    /// which replicas must then share.
    pub blob_url: Option<String>,
    /// `PLINTH_S3_ENDPOINT`: an S3-compatible service's address (MinIO, R2, Ceph…); unset means AWS.
    pub s3_endpoint: Option<String>,
    /// `PLINTH_S3_REGION`.
    pub s3_region: String,
    /// `PLINTH_S3_ACCESS_KEY_ID` and `PLINTH_S3_SECRET_ACCESS_KEY`; unset, the usual `AWS_*`
    /// variables (or the platform's workload identity) are used.
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    /// `PLINTH_CATALOG_SYNC_MS`: how often each replica compares its model catalogue with the shared
    /// registry (models uploaded or deleted through other replicas).
    pub catalog_sync_ms: u64,
    /// `PLINTH_ORT_DYLIB`: the ONNX Runtime shared library (`scripts/fetch-models.sh` fetches it).
    pub ort_dylib: PathBuf,
    /// `PLINTH_MODELS_DIR`: where the built-in models were prepared.
    pub models_dir: PathBuf,
    /// `PLINTH_EXECUTION_PROVIDER`: `cpu`, `cuda` (refuse to start without it) or `auto` (CUDA, else CPU).
    pub execution_provider: String,
    /// `PLINTH_INFERENCE_THREADS`: ONNX Runtime intra-op threads per session.
    pub inference_threads: usize,
    /// `PLINTH_INFERENCE_SESSIONS`: sessions (and batch workers) per model.
    pub inference_sessions: usize,
    /// `PLINTH_MAX_BATCH`: most items in one model run; 1 turns batching off.
    pub max_batch: usize,
    /// `PLINTH_MAX_QUEUE_DELAY_US`: how long a call waits for others to join its batch.
    pub max_queue_delay_us: u64,
    /// `PLINTH_INFERENCE_QUEUE`: calls queued per model before 503.
    pub inference_queue: usize,
    /// `PLINTH_INFERENCE_SCHEDULING`: `fair` (each tenant's share of a busy model by its plan's weight)
    /// or `fifo` (first come, first served).
    pub inference_scheduling: String,
    /// `PLINTH_INFERENCE_TENANT_QUEUE`: calls one tenant may have queued per model before 429 (at most
    /// `PLINTH_INFERENCE_QUEUE`).
    pub inference_tenant_queue: usize,
    /// `PLINTH_INFERENCE_TIMEOUT_MS`: longest an inference call may take.
    pub inference_timeout_ms: u64,
    /// `PLINTH_PUBLIC_URL`: where users reach the platform; Stripe Checkout and Connect onboarding
    /// send them back here.
    pub public_url: String,
    /// `PLINTH_STRIPE_SECRET_KEY`: turns on Stripe mode. Unset, the platform bills locally.
    pub stripe_secret_key: Option<String>,
    /// `PLINTH_STRIPE_WEBHOOK_SECRET`: the signing secret (`whsec_…`) of the endpoint Stripe posts
    /// to at `/v1/webhooks/stripe`. Required with the secret key.
    pub stripe_webhook_secret: Option<String>,
    /// `PLINTH_STRIPE_API_BASE`: Stripe's API address; unset means `https://api.stripe.com/`.
    pub stripe_api_base: Option<String>,
    /// `PLINTH_STRIPE_PLAN_PRICES`: each paid plan's Stripe prices, `plan=flat_price/metered_price`,
    /// comma-separated (e.g. `pro=price_1A/price_1B`). The metered price is on the calls meter,
    /// graduated so the plan's included calls cost nothing.
    pub stripe_plan_prices: String,
    /// `PLINTH_STRIPE_PLUGIN_FEES_PRICE`: the metered price on the plugin-fees meter (0.0001 cents per
    /// unit: one unit is one micro-dollar).
    pub stripe_plugin_fees_price: Option<String>,
    /// `PLINTH_STRIPE_CALLS_METER`: the event name of the Stripe meter counting model calls.
    pub stripe_calls_meter: String,
    /// `PLINTH_STRIPE_PLUGIN_FEES_METER`: the event name of the Stripe meter summing plugin fees.
    pub stripe_plugin_fees_meter: String,
    /// `PLINTH_STRIPE_TRAINING_PRICE`: the metered price (1 micro-unit per unit) that bills training.
    /// Without it in Stripe mode, training on a plan with a training price is refused.
    pub stripe_training_price: Option<String>,
    /// `PLINTH_STRIPE_TRAINING_METER`: the event name of the training meter.
    pub stripe_training_meter: String,
    /// `PLINTH_BILLING_SYNC_INTERVAL_SECS`: pause between usage syncs to Stripe.
    pub billing_sync_interval_secs: u64,
    /// `PLINTH_BILLING_SYNC_BUCKET_SECS`: usage is sent per tenant per bucket of this many seconds.
    pub billing_sync_bucket_secs: u64,
    /// `PLINTH_BILLING_SYNC_SETTLE_SECS`: how long after a bucket ends it is closed and sent.
    pub billing_sync_settle_secs: u64,
    /// `PLINTH_IDEMPOTENCY_RETENTION_SECS`: how long an `Idempotency-Key` names its request and its
    /// answer is replayed.
    pub idempotency_retention_secs: u64,
    /// `PLINTH_AUDIT_RETENTION_DAYS`: how long audit log entries are kept.
    pub audit_retention_days: u64,
    /// `PLINTH_INVOCATION_RECORDS`: plugin invocation records kept per installation (the newest).
    pub invocation_records: u64,
    /// `PLINTH_INVOCATION_RETENTION_DAYS`: how long a plugin invocation record is kept at most.
    pub invocation_retention_days: u64,
    /// `PLINTH_PAYOUT_HOLD_DAYS`: how long plugin fees wait after their invoice was paid before they
    /// are paid out to authors (refunds and chargebacks show up first).
    pub payout_hold_days: u64,
    /// `PLINTH_TRUSTED_PROXIES`: comma-separated addresses or CIDR ranges of the proxies in front of the
    /// platform whose `X-Forwarded-For` is believed; empty trusts none (the TCP peer is the client).
    pub trusted_proxies: String,
    /// `PLINTH_SIGNUPS_PER_ADDRESS_PER_MINUTE`: sign-ups one client address may make in a minute.
    pub signups_per_address_per_minute: u32,
    /// `PLINTH_LOGINS_PER_ADDRESS_PER_MINUTE`: login attempts one client address may make in a minute.
    pub logins_per_address_per_minute: u32,
    /// `PLINTH_UNAUTHENTICATED_PER_MINUTE`: sign-ups, and logins from networks new to their account,
    /// from all addresses together per minute.
    pub unauthenticated_per_minute: u32,
    /// `PLINTH_UNMETERED_PER_TENANT_PER_MINUTE`: calls one tenant may make per minute to authenticated
    /// routes that are not metered (keys, members, models, installations, usage...).
    pub unmetered_per_tenant_per_minute: u32,
    /// `PLINTH_PORTAL_IDLE_SECS`: a portal session unused this long must log in again.
    pub portal_idle_secs: u64,
    /// `PLINTH_PUBLISHES_PER_AUTHOR_PER_MINUTE`: plugin versions one author may submit per minute (each
    /// is compiled and run once, checked or not).
    pub publishes_per_author_per_minute: u32,
    /// `PLINTH_PLUGIN_THREADS`: threads that run paying tenants' plugin code, at a lower priority
    /// than request handling; three quarters as many more (at least one) run the other tenants'
    /// plugin code and compile components. 0 picks half the cores.
    pub plugin_threads: usize,
    /// `PLINTH_PLUGIN_INSTANCES`: plugin instances this replica runs at once, every tenant's together
    /// (each takes up to `PLINTH_PLUGIN_MEMORY_MIB`); the tenants without a paid plan run at most three
    /// quarters of them.
    pub plugin_instances: u32,
    /// `PLINTH_TENANT_MODELS_LOADED`: tenants' models kept loaded at once (a quarter of them per
    /// tenant, three quarters for the free plan's tenants together), least recently used let go first
    /// (and loaded again on their next call); 0 keeps every one loaded.
    pub tenant_models_loaded: usize,
    /// `PLINTH_TENANT_LOAD_MS_PER_MINUTE`: the time this replica spends loading one tenant's models
    /// (uploads' and calls') a minute, and a minute's worth in a row; what would load past it is `429`.
    pub tenant_load_ms_per_minute: u64,
    /// `PLINTH_TENANT_RUN_MEMORY_MIB`: memory tenants' models may allocate at once while they run, all
    /// of them together (weights aside); a run asking for more fails with `400`.
    pub tenant_run_memory_mib: usize,
    /// `PLINTH_METRICS_TOKEN`: `GET /metrics` on the API listener answers only with
    /// `Authorization: Bearer <this>`; unset, the API listener does not serve metrics at all.
    pub metrics_token: Option<String>,
    /// `PLINTH_METRICS_ADDR`: a second listener serving only `GET /metrics`, without a token, for a
    /// private network (e.g. `0.0.0.0:9090` inside a cluster); unset, none.
    pub metrics_addr: Option<SocketAddr>,
    /// `PLINTH_LOG`: a tracing filter, e.g. `info` or `plinth_api=debug,info`.
    pub log: String,
    /// `PLINTH_LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("data"),
            database_url: None,
            database_schema: None,
            database_max_connections: 16,
            redis_url: None,
            redis_prefix: "plinth:".to_owned(),
            max_body_bytes: 1024 * 1024,
            max_model_bytes: 256 * 1024 * 1024,
            max_dataset_bytes: 64 * 1024 * 1024,
            training_jobs: 1,
            training_poll_ms: 1_000,
            training_stale_secs: 60,
            secret_key: None,
            secret_keys_previous: String::new(),
            plugin_author_share_bps: 8_000,
            plugin_deadline_ms: 2_000,
            plugin_memory_mib: 64,
            plugin_kv_keys: 1_000,
            credential_cache_ttl_ms: 1_000,
            ledger_max_batch: 1_000,
            workers: 0,
            shutdown_delay_secs: None,
            shutdown_timeout_secs: 30,
            catalog_sync_ms: 2_000,
            blob_url: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_owned(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            ort_dylib: plinth_inference::fetched_ort_dylib(),
            models_dir: cache_dir().join("models"),
            execution_provider: "cpu".to_owned(),
            inference_threads: 1,
            inference_sessions: 3,
            max_batch: 32,
            max_queue_delay_us: 0,
            inference_queue: 1_024,
            inference_tenant_queue: 256,
            inference_scheduling: "fair".to_owned(),
            inference_timeout_ms: 30_000,
            public_url: "http://127.0.0.1:8080".to_owned(),
            stripe_secret_key: None,
            stripe_webhook_secret: None,
            stripe_api_base: None,
            stripe_plan_prices: String::new(),
            stripe_plugin_fees_price: None,
            stripe_calls_meter: "plinth_calls".to_owned(),
            stripe_plugin_fees_meter: "plinth_plugin_fees".to_owned(),
            stripe_training_price: None,
            stripe_training_meter: "plinth_training".to_owned(),
            billing_sync_interval_secs: 60,
            billing_sync_bucket_secs: 3_600,
            billing_sync_settle_secs: 300,
            idempotency_retention_secs: 86_400,
            audit_retention_days: 400,
            invocation_records: 100,
            invocation_retention_days: 7,
            payout_hold_days: 7,
            trusted_proxies: String::new(),
            signups_per_address_per_minute: 5,
            logins_per_address_per_minute: 20,
            unauthenticated_per_minute: 600,
            unmetered_per_tenant_per_minute: 1_200,
            portal_idle_secs: 1_800,
            publishes_per_author_per_minute: 2,
            plugin_threads: 0,
            plugin_instances: 64,
            tenant_models_loaded: 32,
            tenant_load_ms_per_minute: 15_000,
            tenant_run_memory_mib: 4_096,
            metrics_token: None,
            metrics_addr: None,
            log: "info".to_owned(),
            log_format: LogFormat::Text,
        }
    }
}

pub use plinth_inference::cache_dir;

/// A configuration problem, worded for the operator.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Environment variables that are read elsewhere, not by this struct.
const OTHER_VARIABLES: &[&str] = &[
    "config",
    "cache_dir",
    "admin_password",
    "test_database_url",
    "test_redis_url",
    "test_python",
];

impl Config {
    /// Loads defaults, the file (if any) and the environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PLINTH_CONFIG").map(PathBuf::from));
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(file) = &file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("PLINTH_").ignore(OTHER_VARIABLES));
        let config: Self = figment.extract().map_err(|err| {
            let messages: Vec<String> = err.into_iter().map(|e| e.to_string()).collect();
            ConfigError(messages.join("; "))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: &str| Err(ConfigError(message.to_owned()));
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
        {
            return fail("PLINTH_DATABASE_URL must start with postgres://, postgresql:// or sqlite:");
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://") || url == "memory")
        {
            return fail("PLINTH_REDIS_URL must start with redis:// or rediss://");
        }
        if self.database_schema.is_some()
            && !self
                .database_url
                .as_deref()
                .is_some_and(|u| u.starts_with("postgres"))
        {
            return fail("PLINTH_DATABASE_SCHEMA applies only to a postgres:// PLINTH_DATABASE_URL");
        }
        if self.database_max_connections == 0 {
            return fail("PLINTH_DATABASE_MAX_CONNECTIONS must be at least 1");
        }
        let production = self
            .database_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres"));
        if production && self.secret_key.is_none() {
            return fail(
                "production mode (a postgres:// PLINTH_DATABASE_URL) needs PLINTH_SECRET_KEY, the same on every replica (e.g. from `openssl rand -hex 32`): a key generated per replica would seal secrets the others cannot open",
            );
        }
        if self
            .blob_url
            .as_deref()
            .is_some_and(|url| !url.starts_with("s3://") || url.len() <= "s3://".len())
        {
            return fail("PLINTH_BLOB_URL must be s3://bucket or s3://bucket/prefix");
        }
        if self.catalog_sync_ms < 100 {
            return fail("PLINTH_CATALOG_SYNC_MS must be at least 100");
        }
        if self.previous_secret_keys().is_err() {
            return fail("PLINTH_SECRET_KEYS_PREVIOUS must be comma-separated keys of 64 hex digits each");
        }
        if let Some(key) = &self.secret_key
            && !(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return fail(
                "PLINTH_SECRET_KEY must be 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`",
            );
        }
        if self.plugin_author_share_bps > 10_000 {
            return fail("PLINTH_PLUGIN_AUTHOR_SHARE_BPS must be at most 10000 (100%)");
        }
        if !(10..=60_000).contains(&self.plugin_deadline_ms) {
            return fail("PLINTH_PLUGIN_DEADLINE_MS must be between 10 and 60000");
        }
        if !(1..=60_000).contains(&self.tenant_load_ms_per_minute) {
            return fail("PLINTH_TENANT_LOAD_MS_PER_MINUTE must be between 1 and 60000");
        }
        if !(64..=1 << 20).contains(&self.tenant_run_memory_mib) {
            return fail("PLINTH_TENANT_RUN_MEMORY_MIB must be between 64 and 1048576");
        }
        if !(1..=4_096).contains(&self.plugin_memory_mib) {
            return fail("PLINTH_PLUGIN_MEMORY_MIB must be between 1 and 4096");
        }
        if !(1..=30 * 86_400).contains(&self.portal_idle_secs) {
            return fail("PLINTH_PORTAL_IDLE_SECS must be between 1 and 2592000 (30 days)");
        }
        if self.max_body_bytes < 1024 {
            return fail("PLINTH_MAX_BODY_BYTES must be at least 1024");
        }
        if !(1..=5_000).contains(&self.ledger_max_batch) {
            return fail("PLINTH_LEDGER_MAX_BATCH must be between 1 and 5000");
        }
        if self.credential_cache_ttl_ms > 60_000 {
            return fail(
                "PLINTH_CREDENTIAL_CACHE_TTL_MS must be at most 60000: it bounds how long a revoked key works",
            );
        }
        if self
            .execution_provider
            .parse::<plinth_inference::ExecutionProvider>()
            .is_err()
        {
            return fail("PLINTH_EXECUTION_PROVIDER must be cpu, cuda or auto");
        }
        if self
            .inference_scheduling
            .parse::<plinth_inference::Scheduling>()
            .is_err()
        {
            return fail("PLINTH_INFERENCE_SCHEDULING must be fair or fifo");
        }
        if self.inference_threads == 0
            || self.inference_sessions == 0
            || self.max_batch == 0
            || self.inference_queue == 0
            || self.inference_tenant_queue == 0
        {
            return fail(
                "PLINTH_INFERENCE_THREADS, PLINTH_INFERENCE_SESSIONS, PLINTH_MAX_BATCH, PLINTH_INFERENCE_QUEUE and PLINTH_INFERENCE_TENANT_QUEUE must be at least 1",
            );
        }
        if self.metrics_token.as_ref().is_some_and(|token| token.len() < 16) {
            return fail("PLINTH_METRICS_TOKEN must be at least 16 characters");
        }
        if self.stripe_secret_key.is_some() != self.stripe_webhook_secret.is_some() {
            return fail(
                "PLINTH_STRIPE_SECRET_KEY and PLINTH_STRIPE_WEBHOOK_SECRET go together: set both for Stripe, neither for local billing",
            );
        }
        // A blank secret (an empty variable left to fill in later) would sign with an empty key,
        // which anyone can: a forged `checkout.session.completed` would then buy any plan.
        let named = |secret: &Option<String>, prefixes: &[&str]| {
            secret.as_deref().is_none_or(|secret| {
                prefixes.iter().any(|prefix| {
                    secret
                        .strip_prefix(prefix)
                        .is_some_and(|rest| !rest.trim().is_empty())
                })
            })
        };
        if !named(&self.stripe_secret_key, &["sk_", "rk_"]) {
            return fail(
                "PLINTH_STRIPE_SECRET_KEY must be a Stripe secret or restricted key (sk_… or rk_…); unset both Stripe settings for local billing",
            );
        }
        if !named(&self.stripe_webhook_secret, &["whsec_"]) {
            return fail(
                "PLINTH_STRIPE_WEBHOOK_SECRET must be the endpoint's signing secret (whsec_…); unset both Stripe settings for local billing",
            );
        }
        self.plan_prices()?;
        if !(1..=86_400).contains(&self.billing_sync_bucket_secs) || self.billing_sync_interval_secs == 0 {
            return fail(
                "PLINTH_BILLING_SYNC_BUCKET_SECS must be 1 to 86400 and PLINTH_BILLING_SYNC_INTERVAL_SECS at least 1",
            );
        }
        if self.billing_sync_settle_secs > 86_400 {
            return fail("PLINTH_BILLING_SYNC_SETTLE_SECS must be at most 86400");
        }
        if !(60..=30 * 86_400).contains(&self.idempotency_retention_secs) {
            return fail("PLINTH_IDEMPOTENCY_RETENTION_SECS must be between 60 and 2592000 (30 days)");
        }
        if !(1..=36_500).contains(&self.audit_retention_days) {
            return fail("PLINTH_AUDIT_RETENTION_DAYS must be between 1 and 36500");
        }
        if !(1..=10_000).contains(&self.invocation_records) {
            return fail("PLINTH_INVOCATION_RECORDS must be between 1 and 10000");
        }
        if !(1..=365).contains(&self.invocation_retention_days) {
            return fail("PLINTH_INVOCATION_RETENTION_DAYS must be between 1 and 365");
        }
        if self.payout_hold_days > 180 {
            return fail("PLINTH_PAYOUT_HOLD_DAYS must be at most 180");
        }
        self.trusted_proxy_ranges()?;
        if [
            self.signups_per_address_per_minute,
            self.logins_per_address_per_minute,
            self.unauthenticated_per_minute,
            self.unmetered_per_tenant_per_minute,
            self.publishes_per_author_per_minute,
        ]
        .contains(&0)
        {
            return fail(
                "PLINTH_SIGNUPS_PER_ADDRESS_PER_MINUTE, PLINTH_LOGINS_PER_ADDRESS_PER_MINUTE, PLINTH_UNAUTHENTICATED_PER_MINUTE, PLINTH_UNMETERED_PER_TENANT_PER_MINUTE and PLINTH_PUBLISHES_PER_AUTHOR_PER_MINUTE must be at least 1",
            );
        }
        if self.plugin_threads > 256 {
            return fail("PLINTH_PLUGIN_THREADS must be at most 256");
        }
        // At least 4, so that the unpaying tenants' three quarters leave paying ones one; at most 1,024, as
        // each instance's memories reserve address space (4 GiB each, four an instance).
        if !(4..=1_024).contains(&self.plugin_instances) {
            return fail("PLINTH_PLUGIN_INSTANCES must be between 4 and 1024");
        }
        // One would be the free plan's tenants' to fill, leaving paying ones none (see the catalog).
        if self.tenant_models_loaded == 1 {
            return fail("PLINTH_TENANT_MODELS_LOADED must be 0 (no bound) or at least 2");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
            return fail("PLINTH_LOG is not a valid filter (e.g. `info` or `plinth_api=debug,info`)");
        }
        Ok(())
    }

    /// How long readiness answers 503 before the listener closes, after a stop signal.
    #[must_use]
    pub fn shutdown_delay(&self) -> std::time::Duration {
        let production = self
            .database_url
            .as_deref()
            .is_some_and(|u| u.starts_with("postgres"));
        std::time::Duration::from_secs(self.shutdown_delay_secs.unwrap_or(if production { 5 } else { 0 }))
    }

    /// The earlier sealing keys of `PLINTH_SECRET_KEYS_PREVIOUS`.
    ///
    /// # Errors
    /// When an entry is not 64 hex digits.
    pub fn previous_secret_keys(&self) -> Result<Vec<[u8; 32]>, ConfigError> {
        self.secret_keys_previous
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                hex::decode(k)
                    .ok()
                    .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        ConfigError("a key in PLINTH_SECRET_KEYS_PREVIOUS is not 64 hex digits".into())
                    })
            })
            .collect()
    }

    /// The proxies whose `X-Forwarded-For` is believed.
    ///
    /// # Errors
    /// When an entry is neither an address nor a CIDR range.
    pub fn trusted_proxy_ranges(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|entry| {
                entry
                    .parse::<ipnet::IpNet>()
                    .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError(format!(
                            "PLINTH_TRUSTED_PROXIES: `{entry}` is not an address or CIDR range"
                        ))
                    })
            })
            .collect()
    }

    /// How plugins are run and paid for; `billing` says how bills are collected.
    #[must_use]
    pub fn market_settings(&self, billing: &plinth_billing::Billing) -> plinth_marketplace::MarketSettings {
        plinth_marketplace::MarketSettings {
            author_share_bps: self.plugin_author_share_bps,
            invocation_records: self.invocation_records,
            payment_mode: billing.mode(),
            collects_plugin_fees: billing.collects_plugin_fees(),
        }
    }

    /// The HTTP edge's settings.
    #[must_use]
    pub fn api_settings(&self) -> plinth_api::ApiSettings {
        let per_minute = |n: u32| plinth_store::cache::Quota {
            per_minute: n,
            burst: n,
        };
        plinth_api::ApiSettings {
            max_body_bytes: self.max_body_bytes,
            max_model_bytes: self.max_model_bytes,
            idempotency: plinth_store::idempotency::IdempotencySettings {
                retention: Duration::from_secs(self.idempotency_retention_secs),
                ..plinth_store::idempotency::IdempotencySettings::default()
            },
            trusted_proxies: self.trusted_proxy_ranges().unwrap_or_default(),
            metrics_token: self.metrics_token.as_deref().map(plinth_api::MetricsToken::new),
            portal_idle: Duration::from_secs(self.portal_idle_secs),
            limits: plinth_api::AbuseLimits {
                signups_per_address: per_minute(self.signups_per_address_per_minute),
                logins_per_address: per_minute(self.logins_per_address_per_minute),
                unauthenticated_global: per_minute(self.unauthenticated_per_minute),
                unmetered_per_tenant: per_minute(self.unmetered_per_tenant_per_minute),
                publishes_per_author: per_minute(self.publishes_per_author_per_minute),
            },
            training: plinth_api::TrainingSettings {
                base_models_dir: self.models_dir.clone(),
                max_dataset_bytes: self.max_dataset_bytes,
                concurrent_jobs: self.training_jobs.max(1),
                poll: Duration::from_millis(self.training_poll_ms.max(10)),
                stale_after: Duration::from_secs(self.training_stale_secs.max(1)),
            },
        }
    }

    /// The inference engine's settings.
    #[must_use]
    pub fn engine_settings(&self) -> plinth_inference::EngineSettings {
        plinth_inference::EngineSettings {
            ort_dylib: self.ort_dylib.clone(),
            provider: self
                .execution_provider
                .parse()
                .unwrap_or(plinth_inference::ExecutionProvider::Cpu),
            intra_threads: self.inference_threads,
            sessions_per_model: self.inference_sessions,
            max_batch: self.max_batch,
            max_queue_delay: Duration::from_micros(self.max_queue_delay_us),
            queue_capacity: self.inference_queue,
            tenant_queue_capacity: self.inference_tenant_queue,
            scheduling: self.inference_scheduling.parse().unwrap_or_default(),
            timeout: Duration::from_millis(self.inference_timeout_ms),
            tenant_run_memory: self.tenant_run_memory_mib << 20,
            ..plinth_inference::EngineSettings::default()
        }
    }

    /// The most memory, in MiB, that the bounded pools of what tenants run may take at once: every
    /// plugin instance at its memory limit, and tenants' models' run memory (weights, the platform's
    /// models and requests in flight aside).
    #[must_use]
    pub fn bounded_memory_mib(&self) -> u64 {
        let mib = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        u64::from(self.plugin_instances)
            .saturating_mul(mib(self.plugin_memory_mib))
            .saturating_add(mib(self.tenant_run_memory_mib))
    }

    fn plan_prices(&self) -> Result<BTreeMap<String, PlanPrices>, ConfigError> {
        let mut plans = BTreeMap::new();
        for entry in self
            .stripe_plan_prices
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let parsed = entry.split_once('=').and_then(|(plan, prices)| {
                let (flat, metered) = prices.split_once('/')?;
                Some((plan.trim(), flat.trim(), metered.trim()))
            });
            match parsed {
                Some((plan, flat, metered))
                    if !plan.is_empty() && !flat.is_empty() && !metered.is_empty() =>
                {
                    plans.insert(
                        plan.to_owned(),
                        PlanPrices {
                            flat: flat.to_owned(),
                            metered: metered.to_owned(),
                        },
                    );
                }
                _ => {
                    return Err(ConfigError(format!(
                        "PLINTH_STRIPE_PLAN_PRICES: `{entry}` is not `plan=flat_price/metered_price`"
                    )));
                }
            }
        }
        Ok(plans)
    }

    /// Stripe's settings, when Stripe mode is configured.
    #[must_use]
    pub fn stripe_settings(&self) -> Option<StripeSettings> {
        let (Some(secret_key), Some(webhook_secret)) = (&self.stripe_secret_key, &self.stripe_webhook_secret)
        else {
            return None;
        };
        let public = self.public_url.trim_end_matches('/');
        Some(StripeSettings {
            secret_key: secret_key.clone(),
            webhook_secret: webhook_secret.clone(),
            api_base: self.stripe_api_base.clone(),
            plans: self.plan_prices().unwrap_or_default(),
            plugin_fees_price: self.stripe_plugin_fees_price.clone(),
            calls_meter_event: self.stripe_calls_meter.clone(),
            plugin_fees_meter_event: self.stripe_plugin_fees_meter.clone(),
            training_price: self.stripe_training_price.clone(),
            training_meter_event: self.stripe_training_meter.clone(),
            success_url: format!("{public}/portal/billing?checkout=success"),
            cancel_url: format!("{public}/portal/billing?checkout=canceled"),
            connect_return_url: format!("{public}/portal/author?connect=done"),
            connect_refresh_url: format!("{public}/portal/author?connect=refresh"),
        })
    }

    /// How the usage sync to Stripe runs.
    #[must_use]
    pub fn sync_settings(&self) -> SyncSettings {
        SyncSettings {
            interval: Duration::from_secs(self.billing_sync_interval_secs),
            bucket: Duration::from_secs(self.billing_sync_bucket_secs),
            settle: Duration::from_secs(self.billing_sync_settle_secs),
        }
    }

    /// The configuration with secrets replaced, for printing.
    #[must_use]
    pub fn redacted(&self) -> Self {
        let hide = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>".to_owned());
        Self {
            secret_key: hide(&self.secret_key),
            s3_secret_access_key: hide(&self.s3_secret_access_key),
            secret_keys_previous: if self.secret_keys_previous.is_empty() {
                String::new()
            } else {
                "<redacted>".to_owned()
            },
            stripe_secret_key: hide(&self.stripe_secret_key),
            metrics_token: hide(&self.metrics_token),
            stripe_webhook_secret: hide(&self.stripe_webhook_secret),
            ..self.clone()
        }
    }

    #[must_use]
    pub fn credential_cache_ttl(&self) -> Duration {
        Duration::from_millis(self.credential_cache_ttl_ms)
    }
}

/// The memory this process may use, in MiB: the lower of its cgroup's limit (a container's; cgroup
/// v2, else v1) and the machine's; `None` where neither can be read.
#[must_use]
pub fn memory_available_mib() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let container = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    .find_map(|path| read(path).as_deref().and_then(cgroup_limit_mib));
    let machine = read("/proc/meminfo").as_deref().and_then(mem_total_mib);
    // cgroup v1 says "no limit" with a number near `i64::MAX`: the machine's memory is then lower.
    container.into_iter().chain(machine).min()
}

/// A cgroup's `memory.max` (v2) or `memory.limit_in_bytes` (v1): bytes, or `max` (no limit).
fn cgroup_limit_mib(text: &str) -> Option<u64> {
    text.trim().parse::<u64>().ok().map(|bytes| bytes >> 20)
}

/// `MemTotal` of `/proc/meminfo` (in kB).
fn mem_total_mib(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|line| line.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib >> 10)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's test jail returns its own large error type
mod tests {
    use super::*;

    #[test]
    fn the_memory_available_is_the_containers_limit_or_the_machines() {
        assert_eq!(cgroup_limit_mib("8589934592\n"), Some(8_192));
        assert_eq!(cgroup_limit_mib("max\n"), None);
        // cgroup v1 without a limit: larger than any machine's memory, which is then the bound.
        assert_eq!(cgroup_limit_mib("9223372036854771712\n"), Some(8_796_093_022_207));
        let meminfo = "MemTotal:       24567920 kB\nMemFree:        20000000 kB\n";
        assert_eq!(mem_total_mib(meminfo), Some(23_992));
        assert_eq!(mem_total_mib("MemFree: 1 kB\n"), None);
        // The defaults: 64 instances of 64 MiB, and 4 GiB for tenants' runs.
        assert_eq!(Config::default().bounded_memory_mib(), 8_192);
    }

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("plinth.toml", "http_addr = \"0.0.0.0:9000\"\nlog = \"debug\"\n")?;
            jail.set_env("PLINTH_LOG", "warn");
            let config = Config::load(Some(Path::new("plinth.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.http_addr.port(), 9000);
            assert_eq!(config.log, "warn");
            assert_eq!(config.ledger_max_batch, 1_000);
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLINTH_HTTP_ADDR", "not-an-address");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("http_addr"), "{err}");
            jail.set_env("PLINTH_HTTP_ADDR", "127.0.0.1:1");
            jail.set_env("PLINTH_DATABASE_URL", "mysql://x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("PLINTH_DATABASE_URL"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn stripe_settings_parse_and_pair_up() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLINTH_STRIPE_SECRET_KEY", "sk_test_1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("PLINTH_STRIPE_WEBHOOK_SECRET"), "{err}");
            jail.set_env("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_1");
            jail.set_env(
                "PLINTH_STRIPE_PLAN_PRICES",
                "pro=price_a/price_b, enterprise=price_c/price_d",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let stripe = config.stripe_settings().expect("stripe mode");
            assert_eq!(stripe.plans["pro"].metered, "price_b");
            assert_eq!(stripe.plan_of_price("price_c"), Some("enterprise"));
            assert_eq!(config.redacted().stripe_secret_key.as_deref(), Some("<redacted>"));
            jail.set_env("PLINTH_STRIPE_PLAN_PRICES", "pro=price_a");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("PLINTH_STRIPE_PLAN_PRICES"), "{err}");
            jail.set_env("PLINTH_STRIPE_PLAN_PRICES", "pro=price_a/price_b");
            // Left blank to fill in later: anyone could sign webhooks with an empty secret.
            for blank in ["", " ", "whsec_"] {
                jail.set_env("PLINTH_STRIPE_WEBHOOK_SECRET", blank);
                let err = Config::load(None).unwrap_err().to_string();
                assert!(err.contains("PLINTH_STRIPE_WEBHOOK_SECRET"), "{blank:?}: {err}");
            }
            jail.set_env("PLINTH_STRIPE_WEBHOOK_SECRET", "whsec_1");
            jail.set_env("PLINTH_STRIPE_SECRET_KEY", "");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("PLINTH_STRIPE_SECRET_KEY"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn production_mode_needs_a_sealing_key_shared_by_the_replicas() {
        let production = Config {
            database_url: Some("postgres://plinth@db/plinth".into()),
            ..Config::default()
        };
        let refused = production.validate().unwrap_err().to_string();
        assert!(refused.contains("PLINTH_SECRET_KEY"), "{refused}");
        let keyed = Config {
            secret_key: Some("ab".repeat(32)),
            secret_keys_previous: format!("{}, {}", "cd".repeat(32), "ef".repeat(32)),
            ..production
        };
        keyed.validate().unwrap();
        assert_eq!(keyed.previous_secret_keys().unwrap().len(), 2);
        let malformed = Config {
            secret_keys_previous: "not-a-key".into(),
            ..keyed
        };
        assert!(malformed.validate().is_err());
    }

    #[test]
    fn trusted_proxies_are_addresses_or_ranges() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLINTH_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7,::1");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.trusted_proxy_ranges().map_err(|e| e.to_string())?.len(), 3);
            jail.set_env("PLINTH_TRUSTED_PROXIES", "10.0.0.0/8,proxy.internal");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("proxy.internal"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_bound_on_tenants_models_leaves_paying_tenants_room() {
        let one = Config {
            tenant_models_loaded: 1,
            ..Config::default()
        };
        let refused = one.validate().unwrap_err().to_string();
        assert!(refused.contains("PLINTH_TENANT_MODELS_LOADED"), "{refused}");
        for allowed in [0, 2, 32] {
            Config {
                tenant_models_loaded: allowed,
                ..Config::default()
            }
            .validate()
            .unwrap();
        }
    }

    #[test]
    fn unknown_settings_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PLINTH_HTTP_ADRR", "127.0.0.1:1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.to_lowercase().contains("http_adrr"), "{err}");
            Ok(())
        });
    }
}
