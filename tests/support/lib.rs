//! The test harness: a real `plinth` server on a free port, on SQLite + in-process cache by default, or
//! on Postgres + Redis when `PLINTH_TEST_DATABASE_URL` and `PLINTH_TEST_REDIS_URL` are set. Each
//! [`TestApp`] gets a fresh database (a temporary SQLite file, or its own Postgres schema) and its own
//! Redis key prefix, so tests run in parallel without seeing each other.

pub mod stripe_double;

use std::net::SocketAddr;

use plinth_sdk::{Client, CreateApiKeyRequest, CreatedApiKey, Scope, Session, SignupRequest};
use plinth_server::{Config, RunningServer};
use tempfile::TempDir;

/// The storage a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    SqliteMemory,
    PostgresRedis,
}

pub const PASSWORD: &str = "correct horse battery staple";

/// What tenants' graphs may allocate at once in the test servers (one bound per process: every test
/// server shares it): small enough that asking for more is something any machine could allocate.
pub const TENANT_RUN_MEMORY_MIB: usize = 512;

/// The metrics token of every test server (`PLINTH_METRICS_TOKEN`).
pub const METRICS_TOKEN: &str = "metrics-token-for-tests";

/// A running platform for one test.
#[derive(Debug)]
pub struct TestApp {
    pub addr: SocketAddr,
    pub backend: Backend,
    pub config: Config,
    server: Option<RunningServer>,
    _data_dir: std::sync::Arc<TempDir>,
}

/// A signed-up tenant: its owner's session and an API key.
#[derive(Debug)]
pub struct TestTenant {
    pub session: Session,
    /// Authenticated with the owner's session token.
    pub owner: Client,
    pub key: CreatedApiKey,
    /// Authenticated with `key`.
    pub client: Client,
}

/// The production-mode services named by `PLINTH_TEST_DATABASE_URL` and `PLINTH_TEST_REDIS_URL`, if set.
#[must_use]
pub fn postgres_and_redis() -> Option<(String, String)> {
    let database = std::env::var("PLINTH_TEST_DATABASE_URL")
        .ok()
        .filter(|v| !v.is_empty())?;
    let redis = std::env::var("PLINTH_TEST_REDIS_URL")
        .ok()
        .filter(|v| !v.is_empty())?;
    Some((database, redis))
}

/// The operator, acting through the store (as the `plinth` command line does).
#[must_use]
pub fn operator() -> plinth_store::audit::Who {
    plinth_store::audit::Who::internal(plinth_store::audit::Who::OPERATOR)
}

/// Puts the production defaults of the abuse limits back into a test configuration.
pub fn production_limits(config: &mut Config) {
    let defaults = Config::default();
    config.signups_per_address_per_minute = defaults.signups_per_address_per_minute;
    config.logins_per_address_per_minute = defaults.logins_per_address_per_minute;
    config.unauthenticated_per_minute = defaults.unauthenticated_per_minute;
    config.unmetered_per_tenant_per_minute = defaults.unmetered_per_tenant_per_minute;
    config.publishes_per_author_per_minute = defaults.publishes_per_author_per_minute;
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

/// A port on 127.0.0.1 free now, for a listener started later (a child process, a server started
/// again on the same address), or for one nobody listens on. It lies below the kernel's range for
/// `bind(0)` and outgoing connections, so no other test is handed it meanwhile, nor once the listener
/// has closed (a client still calling would reach that test's server instead); and this process hands
/// it out once.
///
/// # Panics
/// If no such port is free.
#[must_use]
pub fn unshared_port() -> u16 {
    const LOWEST: u16 = 10_000;
    /// Fewer ports than this below the kernel's range: too few to draw from without meeting.
    const FEWEST: u16 = 1_000;
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral < LOWEST + FEWEST {
        // No range to keep apart: the kernel's choice is the best there is.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
    }
    let span = u128::from(ephemeral - LOWEST);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = (0..1_000)
        .map(|_| LOWEST + u16::try_from(ulid::Ulid::new().random() % span).expect("within the span"))
        .find(|port| !handed_out.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below the ephemeral range");
    handed_out.push(port);
    port
}

impl TestApp {
    /// Starts a server with the default test configuration.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Starts a server after `adjust` has edited the configuration.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let backend = if postgres_and_redis().is_some() {
            Backend::PostgresRedis
        } else {
            Backend::SqliteMemory
        };
        Self::spawn_on(backend, adjust).await
    }

    /// Starts a server on a chosen backend (Postgres + Redis need the `PLINTH_TEST_*` variables).
    ///
    /// # Panics
    /// If Postgres + Redis is asked for without the variables set.
    pub async fn spawn_on(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let data_dir = std::sync::Arc::new(tempfile::tempdir().expect("temporary directory"));
        let mut config = Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.path().to_path_buf(),
            workers: 2,
            // One session per model keeps start-up quick; batching still joins concurrent calls.
            inference_sessions: 1,
            log: "warn".to_owned(),
            // Every test signs its tenants up and logs them in from 127.0.0.1; the abuse tests put the
            // production limits back (see `production_limits`).
            signups_per_address_per_minute: 1_000,
            logins_per_address_per_minute: 1_000,
            publishes_per_author_per_minute: 1_000,
            metrics_token: Some(METRICS_TOKEN.to_owned()),
            tenant_run_memory_mib: TENANT_RUN_MEMORY_MIB,
            ..Config::default()
        };
        if backend == Backend::PostgresRedis {
            let (database, redis) =
                postgres_and_redis().expect("PLINTH_TEST_DATABASE_URL and PLINTH_TEST_REDIS_URL");
            config.database_url = Some(database);
            config.database_schema = Some(unique("t_"));
            config.database_max_connections = 8;
            config.redis_url = Some(redis);
            config.redis_prefix = unique("plinth:test:") + ":";
            // Production mode needs a sealing key shared by the replicas.
            config.secret_key = Some(sealing_key());
        }
        adjust(&mut config);
        Self::start(config, backend, data_dir).await
    }

    async fn start(config: Config, backend: Backend, data_dir: std::sync::Arc<TempDir>) -> Self {
        let server = plinth_server::start(&config).await.expect("the platform starts");
        let app = Self {
            addr: server.addr,
            backend,
            config,
            server: Some(server),
            _data_dir: data_dir,
        };
        app.wait_until_ready().await;
        app
    }

    /// Waits for readiness (tenants' models load in the background after start-up).
    ///
    /// # Panics
    /// When the server is not ready within a minute.
    pub async fn wait_until_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let ready = self.http().get(self.url("/v2/health/ready")).send().await;
            if ready.is_ok_and(|response| response.status() == 200) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server never became ready"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// A second server over the same database and cache, as another replica behind a load balancer.
    pub async fn replica(&self) -> Self {
        self.replica_with(|_| {}).await
    }

    /// Another server on the same database, cache and data directory, its configuration edited by
    /// `adjust` (a replica rolled out with new settings).
    pub async fn replica_with(&self, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..self.config.clone()
        };
        adjust(&mut config);
        Self::start(config, self.backend, self._data_dir.clone()).await
    }

    /// The `PLINTH_*` variables that point a `plinth` command at this server's database and cache, with
    /// its sealing keys.
    #[must_use]
    pub fn command_env(&self) -> Vec<(&'static str, String)> {
        let config = &self.config;
        let mut env = vec![
            ("PLINTH_DATA_DIR", config.data_dir.display().to_string()),
            ("PLINTH_LOG", "warn".to_owned()),
            ("PLINTH_SECRET_KEYS_PREVIOUS", config.secret_keys_previous.clone()),
        ];
        let optional = [
            ("PLINTH_DATABASE_URL", &config.database_url),
            ("PLINTH_DATABASE_SCHEMA", &config.database_schema),
            ("PLINTH_REDIS_URL", &config.redis_url),
            ("PLINTH_SECRET_KEY", &config.secret_key),
        ];
        env.extend(
            optional
                .into_iter()
                .filter_map(|(name, value)| Some((name, value.clone()?))),
        );
        env.push(("PLINTH_REDIS_PREFIX", config.redis_prefix.clone()));
        env
    }

    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// An SDK client without credentials.
    #[must_use]
    pub fn client(&self) -> Client {
        Client::new(&self.url("")).expect("valid base URL")
    }

    /// A raw HTTP client, for requests the SDK would never send.
    #[must_use]
    pub fn http(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    #[must_use]
    pub fn store(&self) -> &plinth_store::Store {
        &self.server.as_ref().expect("server running").store
    }

    /// Signs up a fresh tenant with a unique email.
    pub async fn signup(&self) -> Session {
        let email = format!("{}@example.com", unique("user-"));
        self.client()
            .signup(&SignupRequest {
                email,
                password: PASSWORD.to_owned(),
                tenant_name: "Acme".to_owned(),
            })
            .await
            .expect("signup succeeds")
    }

    /// Signs up a tenant and creates an API key with `scopes`.
    pub async fn tenant_with_scopes(&self, scopes: &[Scope]) -> TestTenant {
        let session = self.signup().await;
        let owner = self.client().with_token(&session.token);
        let key = owner
            .create_api_key(&CreateApiKeyRequest {
                name: "test".to_owned(),
                scopes: Some(scopes.to_vec()),
                rate_limit_per_minute: None,
                expires_at: None,
            })
            .await
            .expect("key creation succeeds");
        let client = self.client().with_token(&key.secret);
        TestTenant {
            session,
            owner,
            key,
            client,
        }
    }

    /// A tenant whose key holds every scope.
    pub async fn tenant(&self) -> TestTenant {
        self.tenant_with_scopes(&Scope::ALL).await
    }

    /// A platform admin's account: email and password (operators make one with
    /// `plinth admin create-admin`).
    pub async fn platform_admin_account(&self) -> (String, String) {
        let email = format!("{}@example.com", unique("admin-"));
        let password = "correct horse battery staple".to_owned();
        self.store()
            .create_platform_admin(&email, &password, false, &operator())
            .await
            .expect("platform admin");
        (email, password)
    }

    /// A logged-in platform admin.
    pub async fn platform_admin(&self) -> Client {
        let (email, password) = self.platform_admin_account().await;
        let session = self
            .client()
            .login(&plinth_sdk::LoginRequest {
                email,
                password,
                tenant_id: None,
            })
            .await
            .expect("admin login");
        self.client().with_token(&session.token)
    }

    /// Moves a tenant to `plan` directly in the store (operators do this with `plinth admin set-plan`).
    pub async fn set_plan(&self, tenant: &plinth_sdk::TenantId, plan: &str) {
        self.store()
            .change_plan(tenant, plan, &operator())
            .await
            .expect("plan change");
    }

    /// Moves a tenant to a plan whose rate limit is never reached (benchmarks: the limiter still runs
    /// on every call, which is part of what they measure).
    pub async fn lift_rate_limits(&self, tenant: &plinth_sdk::TenantId) {
        lift_rate_limits(self.store(), tenant).await;
    }

    /// The Prometheus exposition, read with the metrics token.
    pub async fn metrics(&self) -> String {
        let response = self
            .http()
            .get(self.url("/metrics"))
            .bearer_auth(METRICS_TOKEN)
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status(), 200, "metrics with the token");
        response.text().await.expect("metrics text")
    }

    /// Stops the server gracefully, draining the ledger.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await.expect("clean shutdown");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            // Asks the workers to stop; the request is sent now, completion is not awaited.
            drop(server.stop_now());
        }
    }
}

/// A plugin built by `scripts/build-plugins.sh`: its manifest and component.
///
/// # Panics
/// If the plugins were not built (`make test` builds them).
#[must_use]
pub fn built_plugin(name: &str) -> (plinth_sdk::PluginManifest, Vec<u8>) {
    let dir = plinth_server::config::cache_dir().join("plugins");
    let read = |file: String| {
        let path = dir.join(file);
        std::fs::read(&path).unwrap_or_else(|err| {
            panic!(
                "{}: {err} (run scripts/build-plugins.sh; `make test` does)",
                path.display()
            )
        })
    };
    let manifest = serde_json::from_slice(&read(format!("{name}.json"))).expect("plugin manifest");
    (manifest, read(format!("{name}.wasm")))
}

impl TestApp {
    /// Publishes a built plugin from `author`, approves it as a platform admin, and installs it in
    /// `tenant` with everything it asks for approved and `settings`.
    pub async fn install_plugin(
        &self,
        author: &TestTenant,
        tenant: &TestTenant,
        name: &str,
        settings: serde_json::Value,
    ) -> plinth_sdk::Installation {
        let (manifest, component) = built_plugin(name);
        self.install_manifest(author, tenant, manifest, component, settings)
            .await
    }

    /// As [`Self::install_plugin`], with the manifest given (e.g. at another price).
    pub async fn install_manifest(
        &self,
        author: &TestTenant,
        tenant: &TestTenant,
        manifest: plinth_sdk::PluginManifest,
        component: Vec<u8>,
        settings: serde_json::Value,
    ) -> plinth_sdk::Installation {
        author
            .owner
            .create_plugin(&manifest.name, &manifest.description)
            .await
            .expect("listing");
        let version = author
            .owner
            .publish_plugin_version(&manifest, component)
            .await
            .expect("publish");
        self.platform_admin()
            .await
            .review_plugin_version(&version.id, true, None)
            .await
            .expect("approve");
        tenant
            .owner
            .install_plugin(&plinth_sdk::InstallRequest {
                plugin: manifest.name.clone(),
                version: None,
                approve_capabilities: manifest.capabilities.clone(),
                approve_models: manifest.models.clone(),
                settings: settings.as_object().cloned().unwrap_or_default(),
                secrets: std::collections::BTreeMap::new(),
                record_failures: false,
            })
            .await
            .expect("install")
    }
}

/// Installs the built plugin `name`, already listed and approved, for the caller of `client`, with
/// everything its manifest asks for approved.
pub async fn install_listed(client: &Client, name: &str) -> plinth_sdk::Installation {
    let (manifest, _) = built_plugin(name);
    client
        .install_plugin(&plinth_sdk::InstallRequest {
            plugin: manifest.name.clone(),
            version: None,
            approve_capabilities: manifest.capabilities.clone(),
            approve_models: manifest.models.clone(),
            settings: serde_json::Map::new(),
            secrets: std::collections::BTreeMap::new(),
            record_failures: false,
        })
        .await
        .expect("install")
}

/// `plinth-cli` talking to `app`, as a developer runs it: with `config` as its own configuration
/// directory and none of the caller's overrides (token, profile, API URL), standard input closed. The
/// binary is the one `cargo test --workspace` built beside the test binaries.
#[must_use]
pub fn plinth_cli(app: &TestApp, config: &std::path::Path) -> tokio::process::Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("a target directory")
        .join("plinth-cli");
    assert!(
        binary.is_file(),
        "{} is missing: `cargo test --workspace` builds it (plinth-cli has tests of its own)",
        binary.display()
    );
    let mut command = tokio::process::Command::new(binary);
    command
        .args(["--api", &app.url("")])
        .env("PLINTH_CONFIG_DIR", config)
        .env_remove("PLINTH_TOKEN")
        .env_remove("PLINTH_PROFILE")
        .env_remove("PLINTH_API_URL")
        .stdin(std::process::Stdio::null());
    command
}

/// A fresh sealing key, as `PLINTH_SECRET_KEY` takes it.
#[must_use]
pub fn sealing_key() -> String {
    plinth_store::SecretBox::generate_key()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Moves a tenant to a plan whose rate limit is never reached (see [`TestApp::lift_rate_limits`]).
pub async fn lift_rate_limits(store: &plinth_store::Store, tenant: &plinth_sdk::TenantId) {
    let unlimited = plinth_sdk::Plan {
        id: "unlimited".to_owned(),
        name: "Unlimited (benchmarks)".to_owned(),
        currency: "usd".to_owned(),
        monthly_fee_micros: plinth_sdk::Micros(0),
        included_calls: 0,
        price_per_call_micros: plinth_sdk::Micros(0),
        hard_cap: false,
        training_price_micros: plinth_sdk::Micros(0),
        rate_limit_per_minute: plinth_store::cache::MAX_PER_MINUTE,
        burst: 1_000_000,
        isolation: plinth_sdk::PlanIsolation {
            plugin_instances: 64,
            scheduling_weight: 1,
            max_models: 1_000,
            max_model_versions: 1_000,
            max_model_bytes: 1 << 40,
            max_datasets: 1_000,
            max_dataset_bytes: 1 << 40,
            training_jobs: 64,
        },
    };
    store.upsert_plan(&unlimited).await.expect("plan");
    store
        .change_plan(tenant, "unlimited", &operator())
        .await
        .expect("plan change");
}

/// An S3-compatible object store for one test: moto's server (which `make test` installs beside the
/// test clients) on a port of its own, with a bucket. Stopped when dropped.
#[derive(Debug)]
pub struct ObjectStorage {
    _server: tokio::process::Child,
    pub endpoint: String,
    pub bucket: String,
}

impl ObjectStorage {
    /// Starts the server and creates the bucket.
    ///
    /// # Panics
    /// When moto is not installed (`make test` installs it) or does not start.
    pub async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let python = std::env::var_os("PLINTH_TEST_PYTHON").map_or_else(
            || {
                std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/plinth/venv-clients/bin/python")
            },
            std::path::PathBuf::from,
        );
        let moto = python.with_file_name("moto_server");
        assert!(
            moto.is_file(),
            "{} is missing: run `make test` (scripts/test.sh installs moto)",
            moto.display()
        );
        let port = unshared_port();
        let server = tokio::process::Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server starts");
        let endpoint = format!("http://127.0.0.1:{port}");
        let bucket = unique("plinth-");
        let http = reqwest::Client::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(created) = http.put(format!("{endpoint}/{bucket}")).send().await
                && created.status().is_success()
            {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "moto_server did not start");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Self {
            _server: server,
            endpoint,
            bucket,
        }
    }

    /// Points a server's uploaded files at this store.
    pub fn configure(&self, config: &mut Config) {
        config.blob_url = Some(format!("s3://{}/plinth", self.bucket));
        config.s3_endpoint = Some(self.endpoint.clone());
        config.s3_access_key_id = Some("test".to_owned());
        config.s3_secret_access_key = Some("test".to_owned());
    }
}

/// Calls `call` until it answers `status`, every 25 ms for at most 20 s; how long that took.
///
/// # Panics
/// When no call answers `status` in time.
pub async fn until_status<F: Future<Output = reqwest::Result<reqwest::Response>>>(
    call: impl Fn() -> F,
    status: u16,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    loop {
        if call().await.expect("request").status() == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "no {status} within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}
