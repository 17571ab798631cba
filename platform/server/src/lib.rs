//! Wiring: configuration in, a running platform out. The `plinth` binary and the end-to-end tests both
//! start the platform through [`start`], so the tests exercise exactly what operators run.

#![forbid(unsafe_code)]

pub mod config;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpServer;
use actix_web::dev::ServerHandle;
use anyhow::Context;
use plinth_api::AppState;
use plinth_store::ledger::{LedgerSettings, Meter};
use plinth_store::{DatabaseSettings, Store, cache};
use tokio::task::JoinHandle;

pub use crate::config::Config;

/// Connects the database named by the configuration (SQLite in the data dir by default) and migrates it.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let settings = match &config.database_url {
        Some(url) => DatabaseSettings {
            url: url.clone(),
            max_connections: config.database_max_connections,
            schema: config.database_schema.clone(),
            credential_cache_ttl: config.credential_cache_ttl(),
        },
        None => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create the data directory {}", config.data_dir.display()))?;
            DatabaseSettings {
                credential_cache_ttl: config.credential_cache_ttl(),
                ..DatabaseSettings::sqlite_in(&config.data_dir)
            }
        }
    };
    let store = Store::connect(&settings)
        .await
        .context("cannot connect to the database")?;
    store
        .migrate()
        .await
        .context("cannot apply database migrations")?;
    if store.row_security_bypassed().await? {
        tracing::warn!(
            "the database role is a superuser or has BYPASSRLS: row-level security, the wall behind \
             the tenant-scoped queries, does not bind it; run the platform as a plain role (infra/README.md)"
        );
    }
    Ok(store)
}

/// A platform serving HTTP.
#[derive(Debug)]
pub struct RunningServer {
    /// The bound address (useful when configured with port 0).
    pub addr: SocketAddr,
    /// The metrics listener, when `PLINTH_METRICS_ADDR` asks for one: its address and its server.
    pub metrics: Option<MetricsListener>,
    pub store: Store,
    /// Shared with the app: readiness answers 503 once set.
    draining: Arc<std::sync::atomic::AtomicBool>,
    handle: ServerHandle,
    server: JoinHandle<std::io::Result<()>>,
    ledger: JoinHandle<()>,
    /// Claims keyed requests and stores their answers; drained at shutdown like the ledger.
    claims: JoinHandle<()>,
    completions: JoinHandle<()>,
    /// The usage sync to Stripe (Stripe mode only); stopped with the server.
    usage_sync: Option<JoinHandle<()>>,
    /// Removes expired idempotent requests and old audit entries; stopped with the server.
    retention: JoinHandle<()>,
    /// Loads tenants' models after start-up; stopped with the server.
    model_loading: JoinHandle<()>,
    /// Follows models uploaded and deleted through other replicas; stopped with the server.
    catalog_sync: JoinHandle<()>,
    training: JoinHandle<()>,
}

impl RunningServer {
    /// Waits until the server stops (on SIGINT/SIGTERM, or [`Self::stop`]), then drains the ledger.
    pub async fn wait(self) -> anyhow::Result<()> {
        let served = self.server.await.context("the HTTP server task failed")?;
        if let Some(sync) = &self.usage_sync {
            sync.abort();
        }
        self.retention.abort();
        self.model_loading.abort();
        self.catalog_sync.abort();
        self.training.abort();
        // The workers are gone, and with them every `Meter` handle: the writer drains and stops.
        self.ledger.await.context("the ledger writer failed")?;
        self.claims
            .await
            .context("the idempotency claims writer failed")?;
        self.completions
            .await
            .context("the idempotent answers writer failed")?;
        served.context("the HTTP server failed")
    }

    /// Serves until SIGTERM or SIGINT, then stops gracefully: readiness answers 503 at once while
    /// requests are still served for `delay` (load balancers stop sending), then the listener closes,
    /// in-flight requests finish (model calls with their batches) and the ledger and the idempotency
    /// writers drain. A second signal stops at once.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed, or as [`Self::wait`].
    pub async fn serve_until_signalled(self, delay: std::time::Duration) -> anyhow::Result<()> {
        let mut signals = StopSignals::install()?;
        let handle = self.handle.clone();
        let metrics = self.metrics.as_ref().map(|m| m.handle.clone());
        let draining = self.draining.clone();
        let stopping = tokio::spawn(async move {
            let signal = signals.next().await;
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                signal,
                delay_secs = delay.as_secs_f64(),
                "stopping: readiness answers 503; serving on until load balancers have noticed, then finishing in-flight requests (signal again to stop at once)"
            );
            let graceful = async {
                tokio::time::sleep(delay).await;
                handle.stop(true).await;
            };
            tokio::select! {
                () = graceful => {}
                signal = signals.next() => {
                    tracing::warn!(signal, "stopping at once");
                    handle.stop(false).await;
                }
            }
            if let Some(metrics) = metrics {
                metrics.stop(true).await;
            }
        });
        let stopped = self.wait().await;
        stopping.abort();
        stopped
    }

    /// Asks the server to stop at once, without waiting (for use where nothing can be awaited).
    pub fn stop_now(self) -> impl std::future::Future<Output = ()> {
        self.handle.stop(false)
    }

    /// Stops accepting connections, finishes in-flight requests, and waits for the ledger to drain.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some(metrics) = &self.metrics {
            metrics.handle.stop(true).await;
        }
        self.handle.stop(true).await;
        self.wait().await
    }
}

/// The listener that serves only `GET /metrics`.
#[derive(Debug)]
pub struct MetricsListener {
    pub addr: SocketAddr,
    handle: ServerHandle,
}

/// Serves `GET /metrics` on `addr`, without credentials: the address is meant to be reachable only
/// from the monitoring network.
fn serve_metrics(addr: SocketAddr) -> anyhow::Result<MetricsListener> {
    let server = HttpServer::new(|| {
        actix_web::App::new().route(
            "/metrics",
            actix_web::web::get().to(|| async { plinth_api::metrics::exposition() }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind(addr)
    .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("the metrics server bound no address")?;
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    tracing::info!(%addr, "metrics are served");
    Ok(MetricsListener { addr, handle })
}

/// Opens storage, starts the ledger writer and serves the API on `config.http_addr`.
pub async fn start(config: &Config) -> anyhow::Result<RunningServer> {
    rustls_provider();
    let store = open_store(config).await?;
    let cache = cache::connect(config.redis_url.as_deref(), &config.redis_prefix)
        .await
        .context("cannot connect to the cache")?;
    let (meter, ledger) = Meter::start(
        store.clone(),
        LedgerSettings {
            max_batch: config.ledger_max_batch,
            ..LedgerSettings::default()
        },
    );
    // The recorder first, so that everything started below is measured.
    let _ = plinth_api::metrics::handle();
    let engine = plinth_inference::Engine::new(config.engine_settings()).context("cannot start inference")?;
    let models = Arc::new(plinth_inference::Catalog::with_loaded_tenant_models(
        config.tenant_models_loaded,
    ));
    plinth_inference::load_builtin(&engine, &config.models_dir, &models)
        .context("cannot load the built-in models")?;
    let bounded = config.bounded_memory_mib();
    if let Some(available) = config::memory_available_mib()
        && bounded > available
    {
        // Not refused: a replica rarely has every instance at its limit. But the operator should know
        // that it could, and what to lower.
        tracing::warn!(
            bounded_mib = bounded,
            available_mib = available,
            "plugin instances at their memory limit and tenants' run memory could together take more \
             memory than this replica has: lower PLINTH_PLUGIN_INSTANCES, PLINTH_PLUGIN_MEMORY_MIB or \
             PLINTH_TENANT_RUN_MEMORY_MIB"
        );
    }
    let (model_files, plugin_files) = file_stores(config)?;
    model_files.remove_partial_downloads().await;
    plugin_files.remove_partial_downloads().await;
    let plugins = plinth_plugin_host::PluginHost::new(&plinth_plugin_host::HostSettings {
        limits: plinth_plugin_host::Limits {
            deadline: std::time::Duration::from_millis(config.plugin_deadline_ms),
            memory_bytes: config.plugin_memory_mib << 20,
            kv_keys: config.plugin_kv_keys,
            concurrent_instances: config.plugin_instances,
            threads: match config.plugin_threads {
                0 => plinth_plugin_host::Limits::default().threads,
                threads => threads,
            },
            ..plinth_plugin_host::Limits::default()
        },
        cache_dir: Some(config.data_dir.join("plugin-cache")),
    })
    .context("cannot start the plugin host")?;
    let (claims, claims_writer) = plinth_store::idempotency::Claims::start(store.clone());
    let (completions, completions_writer) = plinth_store::idempotency::Completions::start(store.clone());
    let hosting = plinth_hosting::Hosting::new(store.clone(), models.clone(), engine.clone(), model_files)
        .with_tenant_load_time(std::time::Duration::from_millis(config.tenant_load_ms_per_minute));
    let secrets = checked_secret_box(config, &store).await?;
    let billing = billing(config, store.clone())?;
    let marketplace = plinth_marketplace::Marketplace::new(
        store.clone(),
        meter.clone(),
        hosting.clone(),
        Arc::new(plugins),
        plugin_files,
        secrets.clone(),
        config.market_settings(&billing),
    );
    let state = AppState {
        store: store.clone(),
        cache,
        meter,
        claims,
        completions,
        hosting,
        models,
        engine,
        settings: config.api_settings(),
        marketplace,
        secrets,
        billing,
        recent_errors: plinth_api::RecentErrors::default(),
        draining: Arc::default(),
    };
    let draining = state.draining.clone();
    if !state.billing.collects_plugin_fees() {
        tracing::error!(
            "Stripe mode without PLINTH_STRIPE_PLUGIN_FEES_PRICE: plugin fees cannot be invoiced, so priced plugins answer 402 payment_required"
        );
    }
    let usage_sync = state.billing.spawn_sync();
    let retention = spawn_retention(store.clone(), config);
    state.billing.spawn_price_check();
    // Before any request can stage or store a file: what a crash left behind goes.
    state
        .hosting
        .sweep_files()
        .await
        .context("cannot clean up the model store")?;
    let model_loading = state.hosting.spawn_loading();
    let training = plinth_api::spawn_training(state.clone());
    let catalog_sync = state
        .hosting
        .spawn_catalog_sync(std::time::Duration::from_millis(config.catalog_sync_ms));
    let workers = if config.workers == 0 {
        std::thread::available_parallelism().map_or(2, usize::from)
    } else {
        config.workers
    };
    let server = HttpServer::new(move || plinth_api::app(state.clone()))
        .workers(workers)
        // Stop signals are handled by `RunningServer::serve_until_signalled`: readiness first.
        .disable_signals()
        .shutdown_timeout(config.shutdown_timeout_secs)
        .bind(config.http_addr)
        .with_context(|| format!("cannot listen on {}", config.http_addr))?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .context("the server bound no address")?;
    let server = server.run();
    let handle = server.handle();
    let server = tokio::spawn(server);
    let metrics = match config.metrics_addr {
        Some(addr) => Some(serve_metrics(addr)?),
        None => None,
    };
    tracing::info!(%addr, workers, database = ?store.backend(), payments = ?payment_mode(config), "plinth is serving");
    Ok(RunningServer {
        addr,
        metrics,
        store,
        draining,
        handle,
        server,
        ledger,
        claims: claims_writer,
        completions: completions_writer,
        usage_sync,
        retention,
        model_loading,
        catalog_sync,
        training,
    })
}

/// How often expired idempotent requests and old audit entries are removed.
const RETENTION_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);

/// Rows one purge statement removes at most: each is its own short write.
const PURGE_BATCH: u64 = 5_000;

/// Runs `purge` batch after batch until one removes less than a whole batch; returns how many went.
async fn purge_all<F: Future<Output = plinth_store::Result<u64>>>(
    mut purge: impl FnMut() -> F,
) -> plinth_store::Result<u64> {
    let mut removed = 0;
    loop {
        let batch = purge().await?;
        removed += batch;
        if batch < PURGE_BATCH {
            return Ok(removed);
        }
    }
}

/// Removes, now and every [`RETENTION_INTERVAL`], idempotent requests whose window has passed, and
/// audit entries and plugin invocation records older than their retention. Replicas may run it at
/// once: deletes are idempotent.
fn spawn_retention(store: Store, config: &Config) -> JoinHandle<()> {
    // Validated to at most 36 500 days, so neither this nor the subtraction below can overflow.
    let audit_retention =
        chrono::Duration::days(i64::try_from(config.audit_retention_days).unwrap_or(36_500));
    let invocation_retention =
        chrono::Duration::days(i64::try_from(config.invocation_retention_days).unwrap_or(365));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RETENTION_INTERVAL);
        loop {
            tick.tick().await;
            match purge_all(|| store.purge_idempotent_requests(PURGE_BATCH)).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "expired idempotent requests removed"),
                Err(err) => tracing::warn!(error = %err, "cannot remove expired idempotent requests"),
            }
            let cutoff = chrono::Utc::now() - audit_retention;
            match purge_all(|| store.purge_audit_log(cutoff, PURGE_BATCH)).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "audit entries past their retention removed"),
                Err(err) => tracing::warn!(error = %err, "cannot remove old audit entries"),
            }
            let cutoff = chrono::Utc::now() - invocation_retention;
            match purge_all(|| store.purge_invocations(cutoff, PURGE_BATCH)).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, "plugin invocation records past their retention removed");
                }
                Err(err) => tracing::warn!(error = %err, "cannot remove old plugin invocation records"),
            }
        }
    })
}

fn payment_mode(config: &Config) -> plinth_core::billing::PaymentMode {
    if config.stripe_settings().is_some() {
        plinth_core::billing::PaymentMode::Stripe
    } else {
        plinth_core::billing::PaymentMode::Local
    }
}

/// The money side, in Stripe mode when the configuration names a Stripe key.
pub fn billing(config: &Config, store: Store) -> anyhow::Result<plinth_billing::Billing> {
    rustls_provider();
    Ok(
        plinth_billing::Billing::new(store, config.stripe_settings(), config.sync_settings())
            .context("cannot set up billing")?
            .with_payout_hold(Duration::from_secs(config.payout_hold_days * 86_400)),
    )
}

/// TLS clients (Redis over rediss://, Stripe) use ring; install it once for the process.
fn rustls_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another component may have installed the same provider first; either way one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The key that seals secrets at rest: configured, or generated once into the data directory.
/// The sealing keys, refused when they cannot open the secrets stored most recently: a replica
/// started with the wrong key (or mid-rotation without the new one) would fail every plugin call that
/// needs a secret, so it does not start at all.
async fn checked_secret_box(config: &Config, store: &Store) -> anyhow::Result<plinth_store::SecretBox> {
    let secrets = secret_box(config)?;
    if let Some(sealed) = store.latest_sealed_secrets().await?
        && let Err(err) = secrets.open(&sealed)
    {
        anyhow::bail!(
            "the configured sealing keys (PLINTH_SECRET_KEY, key id {}, and PLINTH_SECRET_KEYS_PREVIOUS) cannot open the stored secrets: {err}",
            secrets.primary_id()
        );
    }
    Ok(secrets)
}

/// Seals under the configured (or, embedded, the generated) key; opens under it and the previous ones.
///
/// # Errors
/// When a key is malformed, or the generated key cannot be read or written.
pub fn secret_box(config: &Config) -> anyhow::Result<plinth_store::SecretBox> {
    Ok(plinth_store::SecretBox::with_previous(
        &secret_key(config)?,
        &config.previous_secret_keys()?,
    ))
}

fn secret_key(config: &Config) -> anyhow::Result<[u8; 32]> {
    let parse = |hex_key: &str| -> anyhow::Result<[u8; 32]> {
        let bytes = hex::decode(hex_key.trim()).context("the secret key is not hex")?;
        bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("the secret key must be 32 bytes (64 hex digits)"))
    };
    if let Some(key) = &config.secret_key {
        return parse(key);
    }
    let path = config.data_dir.join("secret.key");
    match std::fs::read_to_string(&path) {
        Ok(key) => parse(&key).with_context(|| format!("in {}", path.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let key = plinth_store::SecretBox::generate_key();
            let mut file = std::fs::OpenOptions::new();
            file.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
            let mut file = file
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            std::io::Write::write_all(&mut file, hex::encode(key).as_bytes())?;
            tracing::info!(path = %path.display(), "generated the key that seals secrets at rest");
            Ok(key)
        }
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// SIGTERM and SIGINT, as they arrive.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            terminate: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("cannot handle SIGTERM")?,
        })
    }

    /// The next stop signal's name.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Where uploaded model files and plugin components live: the data directory, shared through
/// `PLINTH_BLOB_URL` when it is set.
fn file_stores(config: &Config) -> anyhow::Result<(plinth_store::blobs::Blobs, plinth_store::blobs::Blobs)> {
    use plinth_store::blobs::{Blobs, S3Settings, connect};
    let dir = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let dir = config.data_dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    };
    let (models, plugins) = (dir("models")?, dir("plugins")?);
    let Some(url) = &config.blob_url else {
        return Ok((Blobs::local(models), Blobs::local(plugins)));
    };
    let s3 = S3Settings {
        endpoint: config.s3_endpoint.clone(),
        region: config.s3_region.clone(),
        access_key_id: config.s3_access_key_id.clone(),
        secret_access_key: config.s3_secret_access_key.clone(),
    };
    let (store, prefix) = connect(url, &s3).context("PLINTH_BLOB_URL")?;
    let under = |kind: &str| {
        if prefix.is_empty() {
            kind.to_owned()
        } else {
            format!("{prefix}/{kind}")
        }
    };
    tracing::info!(%url, "uploaded files are shared through object storage");
    Ok((
        Blobs::shared(models, store.clone(), &under("models")),
        Blobs::shared(plugins, store, &under("plugins")),
    ))
}
