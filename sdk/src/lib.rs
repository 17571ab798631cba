//! `plinth-sdk`: a typed Rust client for the Plinth API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), plinth_sdk::Error> {
//! let client = plinth_sdk::Client::new("http://127.0.0.1:8080")?.with_token("plk_live_…");
//! let usage = client.usage(&plinth_sdk::UsageQuery::default()).await?;
//! println!("{} calls this month", usage.total.calls);
//! # Ok(()) }
//! ```
//!
//! Every call that can be billed carries an `Idempotency-Key`, so the client retries transient failures
//! (connection errors, 429 with `Retry-After`, 5xx, and `409 idempotency_in_flight` while a first
//! attempt still runs) without ever being billed twice: a retry gets the first answer back.

#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use plinth_core::error::{ErrorBody, ProtocolErrorBody};
use reqwest::{Method, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

pub use plinth_core::api::*;
pub use plinth_core::billing::*;
pub use plinth_core::id::{
    DatasetId, EventId, InstallationId, InvocationId, KeyId, PluginId, PluginVersionId, TenantId,
    TrainingJobId, UserId,
};
pub use plinth_core::inference::*;
pub use plinth_core::plugins::*;
pub use plinth_core::training::*;
pub use plinth_core::{ErrorCode, Micros, Role, Scope};

/// What can go wrong calling Plinth.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error body.
    #[error("{status} {code:?}: {message} (request {request_id})")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        request_id: String,
        /// From `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// The request did not complete (connection refused, timeout, TLS…).
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    /// The response was not what this version of the SDK expects.
    #[error("unexpected response ({status}): {detail}")]
    Decode { status: u16, detail: String },
    #[error("invalid base URL: {0}")]
    InvalidUrl(String),
    /// A local file the call was to send could not be read.
    #[error("cannot read {}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
}

impl Error {
    /// The API error code, if the server answered with one.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// if let Err(err) = client.classify("sentiment", &["Where is my parcel?"]).await {
    ///     if err.code() == Some(plinth_sdk::ErrorCode::QuotaExceeded) {
    ///         eprintln!("this period's included calls are used up: upgrade the plan");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The HTTP status, if the server answered.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// match client.model("tone").await {
    ///     Err(err) if err.status() == Some(404) => println!("no model named tone"),
    ///     model => println!("tone v{}", model?.version),
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Decode { status, .. } => Some(*status),
            Self::Transport(err) => err.status().map(|s| s.as_u16()),
            Self::InvalidUrl(_) | Self::Io { .. } => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// When to try again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// First back-off; doubles on each retry (capped at `max_wait`), plus a random jitter of up to the
    /// back-off itself.
    pub initial_backoff: Duration,
    /// A `Retry-After` longer than this is returned as an error rather than waited out.
    pub max_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(100),
            max_wait: Duration::from_secs(10),
        }
    }
}

/// Parameters of [`Client::usage`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageQuery {
    /// RFC 3339 time or `YYYY-MM-DD`; the server defaults to 30 days before `to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<UsageGrouping>,
}

/// Parameters of [`Client::audit_log`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// The previous page's `next_before`.
    pub before: Option<String>,
    /// 1 to 200; the server's default is 50.
    pub limit: Option<u64>,
    /// Only actions starting with this, e.g. `login`.
    pub action: Option<String>,
    /// Platform admins: only this tenant.
    pub tenant: Option<TenantId>,
}

/// A Plinth API client. Cheap to clone; clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    retry: RetryPolicy,
    /// The `Idempotency-Key` billed calls carry; a fresh one per call when `None`.
    idempotency_key: Option<String>,
    /// Whether plugin invocations ask to be recorded in full (`Plinth-Record: full`).
    record: bool,
    /// Told how much of an upload's files has been sent.
    progress: Option<Progress>,
}

/// Called as an upload's files are sent: `(bytes sent, bytes in all)`.
pub type Progress = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

/// The size of the pieces an upload is sent in (and progress reported by).
const UPLOAD_CHUNK: usize = 64 << 10;

/// How long an upload (model, plugin version, dataset) may take, its checks on the server included.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// Counts an upload's sent bytes across its files.
#[derive(Clone)]
struct UploadMeter {
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    total: u64,
    progress: Progress,
}

impl UploadMeter {
    /// A multipart file part that reports its bytes as they are taken for sending.
    fn part(&self, bytes: Vec<u8>, file_name: Cow<'static, str>) -> reqwest::multipart::Part {
        let length = bytes.len() as u64;
        let meter = self.clone();
        let bytes = std::sync::Arc::new(bytes);
        let chunks = (0..bytes.len())
            .step_by(UPLOAD_CHUNK)
            .map(move |start| bytes[start..(start + UPLOAD_CHUNK).min(bytes.len())].to_vec());
        let stream = futures_util::stream::iter(chunks).map(move |chunk| {
            let sent = meter
                .sent
                .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed)
                + chunk.len() as u64;
            (meter.progress)(sent, meter.total);
            Ok::<_, std::io::Error>(chunk)
        });
        reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(stream), length)
            .file_name(file_name)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials stay out of logs.
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("retry", &self.retry)
            .field("idempotency_key", &self.idempotency_key)
            .finish_non_exhaustive()
    }
}

/// Whether a request may be sent again after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// GET, DELETE, and POSTs carrying an idempotency key.
    Safe,
    /// Only retried when it surely never reached the server (connection refused).
    Unsafe,
}

impl Client {
    /// A client for the API at `base_url` (e.g. `https://api.plinth.example`).
    ///
    /// ```no_run
    /// # async fn run() -> plinth_sdk::Result<()> {
    /// let client = plinth_sdk::Client::new("https://api.plinth.example")?.with_token(std::env::var("PLINTH_TOKEN").unwrap_or_default());
    /// println!("server ready: {}", client.ready().await?);
    /// # Ok(()) }
    /// ```
    pub fn new(base_url: &str) -> Result<Self> {
        // reqwest is built without a bundled crypto provider; use ring unless the application chose one.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing this race to another thread installing a provider is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let base = Url::parse(base_url).map_err(|err| Error::InvalidUrl(err.to_string()))?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("plinth-sdk-rust/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            base,
            token: None,
            retry: RetryPolicy::default(),
            idempotency_key: None,
            record: false,
            progress: None,
        })
    }

    /// Authenticates every call with an API key or a session token.
    ///
    /// ```no_run
    /// # async fn run() -> plinth_sdk::Result<()> {
    /// let api_key = std::env::var("PLINTH_API_KEY").unwrap_or_default();
    /// let client = plinth_sdk::Client::new("https://api.plinth.example")?.with_token(api_key);
    /// let tenant = client.tenant().await?;
    /// println!("{} on plan {}", tenant.name, tenant.plan);
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Replaces the retry policy (by default 3 retries from a 100 ms back-off, waiting at most 10 s).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let client = client.with_retry(plinth_sdk::RetryPolicy { max_retries: 5, ..Default::default() });
    /// let models = client.models().await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Reports the progress of uploads made through the returned client (models, plugin versions,
    /// datasets): `progress(sent, total)` in bytes of the files, as they are sent.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, model: Vec<u8>) -> plinth_sdk::Result<()> {
    /// let client = client.with_upload_progress(std::sync::Arc::new(|sent, total| {
    ///     eprintln!("{sent} of {total} bytes");
    /// }));
    /// client.upload_model(&serde_json::json!({ "name": "tone", "task": "text-classification" }), model, None).await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn with_upload_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// File parts for an upload of `files`, reporting progress when asked to.
    fn file_parts(
        &self,
        files: Vec<(&'static str, Vec<u8>, Cow<'static, str>)>,
    ) -> Vec<(&'static str, reqwest::multipart::Part)> {
        let meter = self.progress.clone().map(|progress| UploadMeter {
            sent: std::sync::Arc::default(),
            total: files.iter().map(|(_, bytes, _)| bytes.len() as u64).sum(),
            progress,
        });
        files
            .into_iter()
            .map(|(field, bytes, file_name)| {
                let part = match &meter {
                    Some(meter) => meter.part(bytes, file_name),
                    None => reqwest::multipart::Part::bytes(bytes).file_name(file_name),
                };
                (field, part)
            })
            .collect()
    }

    /// Sends `key` as the `Idempotency-Key` of the billed calls made through the returned client
    /// (classify, embed, infer, invoke, echo), instead of a fresh key per call. Use it to make a call
    /// your application may send again, after a crash or from another process, count once: within the
    /// server's window, the same key and request get the first answer back and are not billed again.
    /// One key names one request: make a new `idempotent` client per logical request (a different
    /// request under the same key is refused, `422 idempotency_key_reused`).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let order = "order-1234-classification";
    /// let answer = client.idempotent(order).classify("sentiment", &["Where is my parcel?"]).await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn idempotent(&self, key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
            ..self.clone()
        }
    }

    /// The key a billed call carries: the caller's, or a fresh one.
    fn billed_key(&self) -> String {
        self.idempotency_key.clone().unwrap_or_else(new_idempotency_key)
    }

    // ---- accounts ----

    /// Creates a tenant and its owner; the returned session's token can be passed to [`Self::with_token`].
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, password: String) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::SignupRequest { email: "ada@example.com".into(), password, tenant_name: "Acme".into() };
    /// let session = client.signup(&request).await?;
    /// let client = client.with_token(session.token);
    /// # Ok(()) }
    /// ```
    pub async fn signup(&self, request: &SignupRequest) -> Result<Session> {
        self.call(Method::POST, "/v1/signup", Some(request), None, Replay::Unsafe)
            .await
    }

    /// Logs in with an email and password; the returned session's token can be passed to [`Self::with_token`].
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, password: String) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::LoginRequest { email: "ada@example.com".into(), password, tenant_id: None };
    /// let session = client.login(&request).await?;
    /// for membership in &session.memberships {
    ///     println!("{} ({})", membership.tenant_name, membership.role);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn login(&self, request: &LoginRequest) -> Result<Session> {
        self.call(Method::POST, "/v1/login", Some(request), None, Replay::Unsafe)
            .await
    }

    /// Ends the session whose token the client carries.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, request: plinth_sdk::LoginRequest) -> plinth_sdk::Result<()> {
    /// let session = client.login(&request).await?;
    /// let client = client.with_token(session.token);
    /// // … act as the user …
    /// client.logout().await?;
    /// # Ok(()) }
    /// ```
    pub async fn logout(&self) -> Result<()> {
        self.call_empty(Method::POST, "/v1/logout", Replay::Safe).await
    }

    /// The caller's tenant.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let tenant = client.tenant().await?;
    /// println!("{} ({}) on plan {}", tenant.name, tenant.id, tenant.plan);
    /// # Ok(()) }
    /// ```
    pub async fn tenant(&self) -> Result<Tenant> {
        self.get("/v1/tenant").await
    }

    // ---- API keys ----

    /// The tenant's API keys, redacted (a key's secret is shown only when it is created).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for key in client.api_keys().await? {
    ///     println!("{} {} last used {:?}", key.name, key.redacted, key.last_used_at);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn api_keys(&self) -> Result<Vec<ApiKey>> {
        self.get("/v1/api-keys").await
    }

    /// Creates an API key; the answer carries its secret, which is never shown again.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let scopes = Some(vec![plinth_sdk::Scope::Inference]);
    /// let request = plinth_sdk::CreateApiKeyRequest { name: "production backend".into(), scopes, rate_limit_per_minute: None, expires_at: None };
    /// let created = client.create_api_key(&request).await?;
    /// // `created.secret` is shown only in this answer: put it in your secret store.
    /// println!("created {} ({})", created.key.id, created.key.redacted);
    /// # Ok(()) }
    /// ```
    pub async fn create_api_key(&self, request: &CreateApiKeyRequest) -> Result<CreatedApiKey> {
        self.call(Method::POST, "/v1/api-keys", Some(request), None, Replay::Unsafe)
            .await
    }

    /// Revokes an API key: calls made with it are refused from then on.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, key: plinth_sdk::KeyId) -> plinth_sdk::Result<()> {
    /// let revoked = client.revoke_api_key(&key).await?;
    /// println!("{} revoked at {:?}", revoked.name, revoked.revoked_at);
    /// # Ok(()) }
    /// ```
    pub async fn revoke_api_key(&self, id: &KeyId) -> Result<ApiKey> {
        self.call(
            Method::DELETE,
            &format!("/v1/api-keys/{id}"),
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    // ---- members ----

    /// The tenant's members and their roles.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for member in client.members().await? {
    ///     println!("{} {} since {}", member.email, member.role, member.joined_at);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn members(&self) -> Result<Vec<Member>> {
        self.get("/v1/members").await
    }

    /// Adds a user who has signed up to the caller's tenant, with a role.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::AddMemberRequest { email: "grace@example.com".into(), role: plinth_sdk::Role::Developer };
    /// let member = client.add_member(&request).await?;
    /// println!("{} joined as {}", member.email, member.role);
    /// # Ok(()) }
    /// ```
    pub async fn add_member(&self, request: &AddMemberRequest) -> Result<Member> {
        self.call(Method::POST, "/v1/members", Some(request), None, Replay::Unsafe)
            .await
    }

    /// Changes a member's role.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, user: plinth_sdk::UserId) -> plinth_sdk::Result<()> {
    /// let member = client.update_member(&user, plinth_sdk::Role::Admin).await?;
    /// println!("{} is now {}", member.email, member.role);
    /// # Ok(()) }
    /// ```
    pub async fn update_member(&self, user: &UserId, role: Role) -> Result<Member> {
        let body = UpdateMemberRequest { role };
        self.call(
            Method::PATCH,
            &format!("/v1/members/{user}"),
            Some(&body),
            None,
            Replay::Safe,
        )
        .await
    }

    /// Removes a member from the caller's tenant.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let members = client.members().await?;
    /// if let Some(member) = members.iter().find(|m| m.email == "grace@example.com") {
    ///     client.remove_member(&member.user_id).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn remove_member(&self, user: &UserId) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/members/{user}"), Replay::Safe)
            .await
    }

    // ---- billing ----

    /// The plans on offer.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for plan in client.plans().await? {
    ///     println!("{} ({}): {} calls included", plan.name, plan.id, plan.included_calls);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn plans(&self) -> Result<Vec<Plan>> {
        self.get("/v1/plans").await
    }

    /// The tenant's subscription: its plan, status and current period.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let subscription = client.subscription().await?;
    /// println!("{} ({}) until {}", subscription.plan.name, subscription.status.as_str(), subscription.current_period_end);
    /// # Ok(()) }
    /// ```
    pub async fn subscription(&self) -> Result<Subscription> {
        self.get("/v1/subscription").await
    }

    /// Metered usage over a period, by day or by resource, with its total.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let query = plinth_sdk::UsageQuery { group_by: Some(plinth_sdk::UsageGrouping::Resource), ..Default::default() };
    /// for row in client.usage(&query).await?.rows {
    ///     println!("{}: {} calls, {} units", row.key, row.calls, row.units);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn usage(&self, query: &UsageQuery) -> Result<UsageReport> {
        let query = usage_query_string(query)?;
        self.get(&format!("/v1/usage{query}")).await
    }

    /// Subscribes to or moves to a plan. With Stripe, a first paid plan answers with a Checkout URL to
    /// send the customer to; the plan changes once Stripe confirms.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let change = client.change_plan("pro").await?;
    /// if let Some(url) = change.checkout_url {
    ///     println!("complete the payment at {url}");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn change_plan(&self, plan: &str) -> Result<PlanChange> {
        let body = ChangePlanRequest {
            plan: plan.to_owned(),
        };
        self.call(Method::POST, "/v1/subscription", Some(&body), None, Replay::Safe)
            .await
    }

    /// Cancels at the end of the current period.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let subscription = client.cancel_subscription().await?;
    /// println!("{} ends {}", subscription.plan.name, subscription.current_period_end);
    /// # Ok(()) }
    /// ```
    pub async fn cancel_subscription(&self) -> Result<Subscription> {
        self.call(
            Method::DELETE,
            "/v1/subscription",
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    /// Statements of closed periods, newest first.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for statement in client.invoices().await?.invoices {
    ///     println!("{}: {} cents ({})", statement.period_start, statement.total_cents, statement.currency);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn invoices(&self) -> Result<InvoiceList> {
        self.get("/v1/invoices").await
    }

    /// The current period so far.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let statement = client.upcoming_invoice().await?;
    /// println!("{} calls so far, {} beyond the plan", statement.calls, statement.overage_calls);
    /// # Ok(()) }
    /// ```
    pub async fn upcoming_invoice(&self) -> Result<Statement> {
        self.get("/v1/invoices/upcoming").await
    }

    // ---- plugin authors' payouts ----

    /// Creates (once) the author's Stripe connected account and returns a fresh onboarding link.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let onboarding = client.connect_payouts().await?;
    /// if !onboarding.payouts_enabled {
    ///     println!("finish onboarding at {}", onboarding.url);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn connect_payouts(&self) -> Result<ConnectOnboarding> {
        self.call(
            Method::POST,
            "/v1/author/connect",
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    /// The payouts made to the caller, a plugin author.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for payout in client.payouts().await? {
    ///     println!("{}: {} cents ({})", payout.period, payout.amount_cents, payout.status.as_str());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn payouts(&self) -> Result<Vec<Payout>> {
        self.get("/v1/author/payouts").await
    }

    /// Pays authors for a month that has ended (platform admins); safe to repeat.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let run = client.run_payouts("2025-05").await?;
    /// println!("{} payouts, {} authors still onboarding", run.payouts.len(), run.waiting_for_onboarding);
    /// # Ok(()) }
    /// ```
    pub async fn run_payouts(&self, period: &str) -> Result<PayoutRun> {
        let body = PayoutRequest {
            period: period.to_owned(),
        };
        self.call(Method::POST, "/v1/admin/payouts", Some(&body), None, Replay::Safe)
            .await
    }

    /// Local billing: records that a tenant paid the statement of its closed period starting at
    /// `period_start` (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, tenant: plinth_sdk::TenantId, period_start: chrono::DateTime<chrono::Utc>) -> plinth_sdk::Result<()> {
    /// let invoice = client.mark_statement_paid(&tenant, period_start).await?;
    /// println!("{} is {}", invoice.id, invoice.status);
    /// # Ok(()) }
    /// ```
    pub async fn mark_statement_paid(
        &self,
        tenant: &TenantId,
        period_start: chrono::DateTime<chrono::Utc>,
    ) -> Result<ProviderInvoice> {
        let body = MarkPaidRequest {
            tenant_id: tenant.clone(),
            period_start,
        };
        self.call(
            Method::POST,
            "/v1/admin/statements/paid",
            Some(&body),
            None,
            Replay::Safe,
        )
        .await
    }

    /// Pushes settled usage to Stripe now (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let report = client.sync_usage().await?;
    /// println!("sent {} meter events, {} pending", report.events_sent, report.events_pending);
    /// # Ok(()) }
    /// ```
    pub async fn sync_usage(&self) -> Result<SyncReport> {
        self.call(
            Method::POST,
            "/v1/admin/billing/sync",
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    /// The ledger against what Stripe's meters received (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let reconciliation = client.reconciliation().await?;
    /// for row in reconciliation.rows.iter().filter(|r| r.ledger != r.sent + r.pending) {
    ///     eprintln!("{} {}: ledger {}, sent {}, pending {}", row.tenant_id, row.meter, row.ledger, row.sent, row.pending);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn reconciliation(&self) -> Result<Reconciliation> {
        self.get("/v1/admin/billing/reconciliation").await
    }

    // ---- metering ----

    /// The metered no-op: checks a key, its limits and metering end to end. A fresh idempotency key makes
    /// retries of this one call free.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let answer = client.echo(&serde_json::json!({ "ping": 1 })).await?;
    /// println!("metered as {} (replayed: {})", answer.usage_event_id, answer.replayed);
    /// # Ok(()) }
    /// ```
    pub async fn echo(&self, body: &serde_json::Value) -> Result<EchoResponse> {
        self.echo_with_key(body, &self.billed_key()).await
    }

    /// [`Self::echo`] with the caller's own idempotency key, to tie retries across processes together.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let key = plinth_sdk::new_idempotency_key();
    /// let first = client.echo_with_key(&serde_json::json!({ "ping": 1 }), &key).await?;
    /// // Sent again under the same key (after a crash, say), the call is answered but not billed again.
    /// let again = client.echo_with_key(&serde_json::json!({ "ping": 1 }), &key).await?;
    /// assert_eq!(first.usage_event_id, again.usage_event_id);
    /// # Ok(()) }
    /// ```
    pub async fn echo_with_key(
        &self,
        body: &serde_json::Value,
        idempotency_key: &str,
    ) -> Result<EchoResponse> {
        self.call(
            Method::POST,
            "/v1/echo",
            Some(body),
            Some(idempotency_key),
            Replay::Safe,
        )
        .await
    }

    // ---- models and inference ----

    /// Models the caller can use.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for model in client.models().await? {
    ///     println!("{} v{} ({:?}, {})", model.name, model.version, model.task, model.execution_provider);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn models(&self) -> Result<Vec<Model>> {
        self.get("/v1/models").await
    }

    /// A model the caller can use, by name.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let model = client.model("sentiment").await?;
    /// println!("{} v{}: labels {:?}", model.name, model.version, model.labels);
    /// # Ok(()) }
    /// ```
    pub async fn model(&self, name: &str) -> Result<Model> {
        self.get(&format!("/v1/models/{name}")).await
    }

    /// Uploads a model (a new version if the name exists): the ONNX file, its manifest and, for text
    /// models, its `tokenizer.json`. The server loads it to validate it before accepting.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let manifest = serde_json::json!({ "name": "tone", "task": "text-classification", "labels": ["calm", "angry"] });
    /// let model = std::fs::read("tone/model.onnx")?;
    /// let tokenizer = std::fs::read("tone/tokenizer.json")?;
    /// let uploaded = client.upload_model(&manifest, model, Some(tokenizer)).await?;
    /// println!("uploaded {} v{}", uploaded.name, uploaded.version);
    /// # Ok(()) }
    /// ```
    pub async fn upload_model(
        &self,
        manifest: &serde_json::Value,
        model: Vec<u8>,
        tokenizer: Option<Vec<u8>>,
    ) -> Result<Model> {
        let url = self
            .base
            .join("/v1/models")
            .map_err(|err| Error::InvalidUrl(err.to_string()))?;
        let mut files = vec![("model", model, "model.onnx".into())];
        if let Some(tokenizer) = tokenizer {
            files.push(("tokenizer", tokenizer, "tokenizer.json".into()));
        }
        let form = self.file_parts(files).into_iter().fold(
            reqwest::multipart::Form::new().text("manifest", manifest.to_string()),
            |form, (field, part)| form.part(field, part),
        );
        self.send_multipart(url, form).await
    }

    async fn send_multipart<T: DeserializeOwned>(
        &self,
        url: url::Url,
        form: reqwest::multipart::Form,
    ) -> Result<T> {
        // The server answers an upload once it has checked it: a plugin is compiled (up to two minutes
        // on a busy server) and run once, a model loaded and run. Longer than the client's usual wait.
        let mut request = self.http.post(url).multipart(form).timeout(UPLOAD_TIMEOUT);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            return Err(error_from(response).await);
        }
        let bytes = response.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|err| Error::Decode {
            status: status.as_u16(),
            detail: err.to_string(),
        })
    }

    /// Deletes a tenant model (every version).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for model in client.models().await? {
    ///     if !model.platform && model.name.starts_with("experiment-") {
    ///         client.delete_model(&model.name).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn delete_model(&self, name: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/models/{name}"), Replay::Safe)
            .await
    }

    /// Classifies texts with a text-classification model (e.g. the built-in `sentiment`).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let answer = client.classify("sentiment", &["Where is my parcel?", "Thanks, it arrived!"]).await?;
    /// for result in &answer.results {
    ///     println!("{} ({:.2})", result.label, result.score);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn classify(&self, model: &str, inputs: &[&str]) -> Result<ClassifyResponse> {
        let body = TextRequest {
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
        };
        let key = self.billed_key();
        self.call(
            Method::POST,
            &format!("/v1/models/{model}/classify"),
            Some(&body),
            Some(&key),
            Replay::Safe,
        )
        .await
    }

    /// Embeds texts with an embedding model (e.g. the built-in `minilm-embed`).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let answer = client.embed("minilm-embed", &["Where is my parcel?", "Track my order"]).await?;
    /// println!("{} vectors of {} dimensions", answer.embeddings.len(), answer.dimensions);
    /// # Ok(()) }
    /// ```
    pub async fn embed(&self, model: &str, inputs: &[&str]) -> Result<EmbedResponse> {
        let body = TextRequest {
            inputs: inputs.iter().map(|s| (*s).to_owned()).collect(),
        };
        let key = self.billed_key();
        self.call(
            Method::POST,
            &format!("/v1/models/{model}/embed"),
            Some(&body),
            Some(&key),
            Replay::Safe,
        )
        .await
    }

    /// Open Inference Protocol v2 model metadata.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let metadata = client.model_metadata("sentiment").await?;
    /// for input in &metadata.inputs {
    ///     println!("{}: {} {:?}", input.name, input.datatype, input.shape);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn model_metadata(&self, model: &str) -> Result<ModelMetadata> {
        self.get(&format!("/v2/models/{model}")).await
    }

    /// Counters of a model since it was loaded.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let stats = client.model_statistics("sentiment").await?;
    /// println!("{} ok, {} failed, {} items in {} runs", stats.success_count, stats.failure_count, stats.inference_count, stats.execution_count);
    /// # Ok(()) }
    /// ```
    pub async fn model_statistics(&self, model: &str) -> Result<ModelStatistics> {
        self.get(&format!("/v2/models/{model}/stats")).await
    }

    /// Whether a model is loaded and serving (`false` while its runs keep failing).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// if !client.model_ready("sentiment").await? {
    ///     eprintln!("sentiment is not serving right now");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn model_ready(&self, model: &str) -> Result<bool> {
        self.readiness(&format!("/v2/models/{model}/ready")).await
    }

    /// Metadata of one version of a model.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let metadata = client.model_version_metadata("tone", 2).await?;
    /// println!("{} (versions {:?}): {} inputs", metadata.name, metadata.versions, metadata.inputs.len());
    /// # Ok(()) }
    /// ```
    pub async fn model_version_metadata(&self, model: &str, version: u32) -> Result<ModelMetadata> {
        self.get(&format!("/v2/models/{model}/versions/{version}")).await
    }

    /// Whether one version of a model is loaded and serving.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let model = client.model("tone").await?;
    /// let ready = client.model_version_ready("tone", model.version).await?;
    /// println!("tone v{} ready: {ready}", model.version);
    /// # Ok(()) }
    /// ```
    pub async fn model_version_ready(&self, model: &str, version: u32) -> Result<bool> {
        self.readiness(&format!("/v2/models/{model}/versions/{version}/ready"))
            .await
    }

    /// Counters of one version of a model since it was loaded.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let stats = client.model_version_statistics("tone", 2).await?;
    /// println!("v{}: {} ok, {} failed", stats.version, stats.success_count, stats.failure_count);
    /// # Ok(()) }
    /// ```
    pub async fn model_version_statistics(&self, model: &str, version: u32) -> Result<ModelStatistics> {
        self.get(&format!("/v2/models/{model}/versions/{version}/stats"))
            .await
    }

    /// Deletes one version of a tenant model (the newest remaining one serves unpinned calls).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// // Roll back: unpinned calls go to the newest remaining version.
    /// client.delete_model_version("tone", 3).await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_model_version(&self, model: &str, version: u32) -> Result<()> {
        self.call_empty(
            Method::DELETE,
            &format!("/v1/models/{model}/versions/{version}"),
            Replay::Safe,
        )
        .await
    }

    /// Open Inference Protocol v2 inference on one version of a model.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, request: plinth_sdk::InferRequest) -> plinth_sdk::Result<()> {
    /// let pinned = client.infer_version("tabular-risk", 2, &request).await?;
    /// let newest = client.infer("tabular-risk", &request).await?;
    /// println!("v{}: {} / v{}: {}", pinned.model_version, pinned.outputs[0].data, newest.model_version, newest.outputs[0].data);
    /// # Ok(()) }
    /// ```
    pub async fn infer_version(
        &self,
        model: &str,
        version: u32,
        request: &InferRequest,
    ) -> Result<InferResponse> {
        let key = self.billed_key();
        self.call(
            Method::POST,
            &format!("/v2/models/{model}/versions/{version}/infer"),
            Some(request),
            Some(&key),
            Replay::Safe,
        )
        .await
    }

    /// The server's name, version and protocol extensions (no credentials needed).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let server = client.server_metadata().await?;
    /// println!("{} {} ({})", server.name, server.version, server.extensions.join(", "));
    /// # Ok(()) }
    /// ```
    pub async fn server_metadata(&self) -> Result<ServerMetadata> {
        self.get("/v2").await
    }

    /// Open Inference Protocol v2 inference on tensors.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let input = plinth_sdk::InferInput {
    ///     name: "features".into(), shape: vec![1, 4], datatype: "FP32".into(), parameters: None,
    ///     data: serde_json::json!([0.1, 0.2, 0.3, 0.4]),
    /// };
    /// let request = plinth_sdk::InferRequest { id: None, parameters: None, inputs: vec![input], outputs: None };
    /// let response = client.infer("tabular-risk", &request).await?;
    /// println!("{}: {}", response.outputs[0].name, response.outputs[0].data);
    /// # Ok(()) }
    /// ```
    pub async fn infer(&self, model: &str, request: &InferRequest) -> Result<InferResponse> {
        let key = self.billed_key();
        self.call(
            Method::POST,
            &format!("/v2/models/{model}/infer"),
            Some(request),
            Some(&key),
            Replay::Safe,
        )
        .await
    }

    // ---- training ----

    /// Uploads a labelled dataset from a file: JSON Lines of `{"text", "label"}` (`.jsonl`) or CSV with
    /// `text` and `label` columns (`.csv`), the format told by the extension. Named `name`, else after
    /// the file. The server checks every line (`422 invalid_dataset` names the first bad one) and keeps
    /// the examples sealed; only the summary is ever shown.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let dataset = client.upload_dataset("tickets.jsonl", Some("support tickets")).await?;
    /// println!("{} ({}): {} examples, {} labels", dataset.name, dataset.id, dataset.summary.examples, dataset.summary.labels.len());
    /// # Ok(()) }
    /// ```
    pub async fn upload_dataset(&self, path: impl AsRef<Path>, name: Option<&str>) -> Result<Dataset> {
        let path = path.as_ref();
        let bytes = tokio::fs::read(path).await.map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let file_name = path
            .file_name()
            .map_or_else(|| "dataset".to_owned(), |f| f.to_string_lossy().into_owned());
        self.upload_dataset_bytes(&file_name, bytes, name).await
    }

    /// [`Self::upload_dataset`] from bytes in memory; `file_name`'s extension (`.jsonl` or `.csv`) tells
    /// the format.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let csv = b"text,label\nWhere is my parcel?,shipping\nI was charged twice,billing\n".to_vec();
    /// let dataset = client.upload_dataset_bytes("tickets.csv", csv, None).await?;
    /// println!("{} ({} bytes, {})", dataset.id, dataset.size_bytes, dataset.format);
    /// # Ok(()) }
    /// ```
    pub async fn upload_dataset_bytes(
        &self,
        file_name: &str,
        bytes: Vec<u8>,
        name: Option<&str>,
    ) -> Result<Dataset> {
        let url = self
            .base
            .join("/v1/datasets")
            .map_err(|err| Error::InvalidUrl(err.to_string()))?;
        let media_type = match file_name
            .rsplit_once('.')
            .map(|(_, ext)| ext.to_ascii_lowercase())
        {
            Some(ext) if ext == "jsonl" || ext == "ndjson" => Some("application/jsonl"),
            Some(ext) if ext == "csv" => Some("text/csv"),
            // The server names the formats it takes.
            _ => None,
        };
        let mut form = reqwest::multipart::Form::new();
        if let Some(name) = name {
            form = form.text("name", name.to_owned());
        }
        for (field, part) in self.file_parts(vec![("file", bytes, file_name.to_owned().into())]) {
            let part = match media_type {
                Some(media_type) => part.mime_str(media_type)?,
                None => part,
            };
            form = form.part(field, part);
        }
        self.send_multipart(url, form).await
    }

    /// The tenant's datasets, newest first.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for dataset in client.datasets().await? {
    ///     println!("{} {}: {} examples", dataset.id, dataset.name, dataset.summary.examples);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn datasets(&self) -> Result<Vec<Dataset>> {
        self.get("/v1/datasets").await
    }

    /// A dataset and its summary: examples per label, text lengths.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let dataset = client.dataset("ds_01jz3k2m4n5p6q7r8s9t0vwxyz").await?;
    /// for label in &dataset.summary.labels {
    ///     println!("{}: {} examples", label.label, label.examples);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn dataset(&self, id: &str) -> Result<Dataset> {
        self.get(&format!("/v1/datasets/{id}")).await
    }

    /// Deletes a dataset and its examples: its queued jobs are cancelled and running ones stopped;
    /// finished jobs and deployed models stay.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for dataset in client.datasets().await? {
    ///     if dataset.name.starts_with("scratch-") {
    ///         client.delete_dataset(&dataset.id).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn delete_dataset(&self, id: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/datasets/{id}"), Replay::Safe)
            .await
    }

    /// Starts a training job: a classification head over a platform base model, trained on a dataset
    /// in the background (follow it with [`Self::wait_for_training_job`]). Billed when it ends, per
    /// 1,000 examples × epochs; `429 training_jobs_exceeded` when the plan's jobs at once are running.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::NewTrainingJob {
    ///     dataset: "ds_01jz3k2m4n5p6q7r8s9t0vwxyz".into(),
    ///     model: "support-triage".into(),
    ///     base_model: None,
    ///     hyperparameters: plinth_sdk::Hyperparameters { epochs: Some(50), ..Default::default() },
    /// };
    /// let job = client.create_training_job(&request).await?;
    /// println!("{} is {}", job.id, job.status.as_str());
    /// # Ok(()) }
    /// ```
    pub async fn create_training_job(&self, request: &NewTrainingJob) -> Result<TrainingJob> {
        // Not retried after an ambiguous failure: a second job would be billed too.
        self.call(
            Method::POST,
            "/v1/training-jobs",
            Some(request),
            None,
            Replay::Unsafe,
        )
        .await
    }

    /// The tenant's training jobs, newest first.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for job in client.training_jobs().await? {
    ///     println!("{} {} {}", job.id, job.model, job.status.as_str());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn training_jobs(&self) -> Result<Vec<TrainingJob>> {
        self.get("/v1/training-jobs").await
    }

    /// A training job: its status, progress and, once it succeeded, its evaluation on held-out
    /// examples.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let job = client.training_job("ftj_01jz3k2m4n5p6q7r8s9t0vwxyz").await?;
    /// if let Some(evaluation) = &job.evaluation {
    ///     println!("accuracy {:.3}, macro-F1 {:.3}", evaluation.accuracy, evaluation.macro_f1);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn training_job(&self, id: &str) -> Result<TrainingJob> {
        self.get(&format!("/v1/training-jobs/{id}")).await
    }

    /// What happened to a training job, oldest first.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for event in client.training_events("ftj_01jz3k2m4n5p6q7r8s9t0vwxyz").await? {
    ///     println!("{} {} {}", event.at, event.level, event.message);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn training_events(&self, id: &str) -> Result<Vec<TrainingEvent>> {
        self.get(&format!("/v1/training-jobs/{id}/events")).await
    }

    /// Polls a training job every `poll_interval` (at least 100 ms) until it has finished (succeeded,
    /// failed or cancelled), and returns it. Wrap it in `tokio::time::timeout` to give up sooner.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, job: plinth_sdk::TrainingJob) -> plinth_sdk::Result<()> {
    /// let job = client.wait_for_training_job(&job.id, std::time::Duration::from_secs(2)).await?;
    /// match job.status {
    ///     plinth_sdk::TrainingStatus::Succeeded => println!("ready to deploy"),
    ///     status => eprintln!("{}: {}", status.as_str(), job.error.unwrap_or_default()),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn wait_for_training_job(&self, id: &str, poll_interval: Duration) -> Result<TrainingJob> {
        self.watch_training_job(id, poll_interval, |_| {}).await
    }

    /// [`Self::wait_for_training_job`], showing `on_update` the job as each poll finds it (the finished
    /// job last): to report progress while it trains.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, job: plinth_sdk::TrainingJob) -> plinth_sdk::Result<()> {
    /// let every = std::time::Duration::from_secs(2);
    /// let job = client
    ///     .watch_training_job(&job.id, every, |job| {
    ///         let p = &job.progress;
    ///         eprintln!("{}: embedded {}/{}, epoch {}/{}", job.status.as_str(), p.embedded, p.examples, p.epoch, p.max_epochs);
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn watch_training_job(
        &self,
        id: &str,
        poll_interval: Duration,
        mut on_update: impl FnMut(&TrainingJob),
    ) -> Result<TrainingJob> {
        let poll_interval = poll_interval.max(Duration::from_millis(100));
        loop {
            let job = self.training_job(id).await?;
            on_update(&job);
            if job.status.is_finished() {
                return Ok(job);
            }
            tokio::time::sleep(poll_interval).await;
        }
    }

    /// Cancels a training job: a queued one at once, a running one at its next step (billed for the
    /// epochs it ran); `409 training_job_state` once it has ended.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let job = client.cancel_training_job("ftj_01jz3k2m4n5p6q7r8s9t0vwxyz").await?;
    /// println!("{} is {}", job.id, job.status.as_str());
    /// # Ok(()) }
    /// ```
    pub async fn cancel_training_job(&self, id: &str) -> Result<TrainingJob> {
        self.call(
            Method::POST,
            &format!("/v1/training-jobs/{id}/cancel"),
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    /// Deploys a succeeded job: its model becomes the newest version of the job's tenant model, served
    /// by [`Self::classify`] like any model.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let model = client.deploy_training_job("ftj_01jz3k2m4n5p6q7r8s9t0vwxyz").await?;
    /// let answer = client.classify(&model.name, &["Where is my parcel?"]).await?;
    /// println!("{} v{}: {}", model.name, model.version, answer.results[0].label);
    /// # Ok(()) }
    /// ```
    pub async fn deploy_training_job(&self, id: &str) -> Result<Model> {
        // Safe to repeat: the server refuses to deploy a job twice.
        self.call(
            Method::POST,
            &format!("/v1/training-jobs/{id}/deploy"),
            None::<&()>,
            None,
            Replay::Safe,
        )
        .await
    }

    /// A succeeded job's model as one ONNX file (the base model with the trained head; outputs
    /// `sentence_embedding` and `probs`), to run anywhere ONNX Runtime runs.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let onnx = client.export_training_job("ftj_01jz3k2m4n5p6q7r8s9t0vwxyz").await?;
    /// std::fs::write("support-triage.onnx", onnx)?;
    /// # Ok(()) }
    /// ```
    pub async fn export_training_job(&self, id: &str) -> Result<Vec<u8>> {
        let response = self
            .send(
                Method::GET,
                &format!("/v1/training-jobs/{id}/model.onnx"),
                None::<&()>,
                None,
                Replay::Safe,
            )
            .await?;
        if !response.status().is_success() {
            return Err(error_from(response).await);
        }
        Ok(response.bytes().await?.to_vec())
    }

    /// Deletes a training job that has ended, with its events and trained state (a deployed model
    /// stays); `409 training_job_state` while it is queued or running.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for job in client.training_jobs().await? {
    ///     if job.status == plinth_sdk::TrainingStatus::Failed {
    ///         client.delete_training_job(&job.id).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn delete_training_job(&self, id: &str) -> Result<()> {
        self.call_empty(Method::DELETE, &format!("/v1/training-jobs/{id}"), Replay::Safe)
            .await
    }

    // ---- plugins ----

    /// Creates a marketplace listing authored by the caller's tenant.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let plugin = client.create_plugin("customer-service", "Answers customers from your FAQ.").await?;
    /// println!("created {} ({})", plugin.name, plugin.id);
    /// # Ok(()) }
    /// ```
    pub async fn create_plugin(&self, name: &str, description: &str) -> Result<Plugin> {
        let body = CreatePluginRequest {
            name: name.to_owned(),
            description: description.to_owned(),
        };
        self.call(Method::POST, "/v1/plugins", Some(&body), None, Replay::Unsafe)
            .await
    }

    /// One of the caller's listings, with every version and its review state.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let plugin = client.plugin("customer-service").await?;
    /// for version in &plugin.versions {
    ///     println!("{} {:?} {}", version.version, version.status, version.review_note.as_deref().unwrap_or(""));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn plugin(&self, name: &str) -> Result<Plugin> {
        self.get(&format!("/v1/plugins/{name}")).await
    }

    /// Publishes a version: the manifest (`plugin.json`) and the component (`.wasm`).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let manifest: plinth_sdk::PluginManifest = serde_json::from_slice(&std::fs::read("plugin.json")?)?;
    /// let component = std::fs::read("customer_service.wasm")?;
    /// let version = client.publish_plugin_version(&manifest, component).await?;
    /// println!("{} {}: {:?}", version.plugin, version.version, version.status);
    /// # Ok(()) }
    /// ```
    pub async fn publish_plugin_version(
        &self,
        manifest: &PluginManifest,
        component: Vec<u8>,
    ) -> Result<PluginVersion> {
        let url = self
            .base
            .join(&format!("/v1/plugins/{}/versions", manifest.name))
            .map_err(|err| Error::InvalidUrl(err.to_string()))?;
        let manifest = serde_json::to_string(manifest).map_err(|err| Error::Decode {
            status: 0,
            detail: err.to_string(),
        })?;
        let form = self
            .file_parts(vec![("component", component, "plugin.wasm".into())])
            .into_iter()
            .fold(
                reqwest::multipart::Form::new().text("manifest", manifest),
                |form, (field, part)| form.part(field, part),
            );
        self.send_multipart(url, form).await
    }

    /// Listings with approved versions, optionally matching words in their name or description.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for plugin in client.marketplace(Some("customer")).await? {
    ///     println!("{}: {}", plugin.name, plugin.description);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn marketplace(&self, query: Option<&str>) -> Result<Vec<Plugin>> {
        let mut url = self
            .base
            .join("/v1/marketplace/plugins")
            .map_err(|err| Error::InvalidUrl(err.to_string()))?;
        if let Some(query) = query {
            url.query_pairs_mut().append_pair("q", query);
        }
        self.get(&format!("{}?{}", url.path(), url.query().unwrap_or_default()))
            .await
    }

    /// Versions waiting for review (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for version in client.pending_plugin_versions().await? {
    ///     println!("{} {} ({}): {}", version.plugin, version.version, version.id, version.checks);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn pending_plugin_versions(&self) -> Result<Vec<PluginVersion>> {
        self.get("/v1/admin/plugin-versions").await
    }

    /// Approves or rejects a version (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, version: plinth_sdk::PluginVersionId) -> plinth_sdk::Result<()> {
    /// let note = Some("Logs the customer's message; drop that and resubmit.");
    /// let reviewed = client.review_plugin_version(&version, false, note).await?;
    /// println!("{} {} is {:?}", reviewed.plugin, reviewed.version, reviewed.status);
    /// # Ok(()) }
    /// ```
    pub async fn review_plugin_version(
        &self,
        version: &PluginVersionId,
        approve: bool,
        note: Option<&str>,
    ) -> Result<PluginVersion> {
        let body = ReviewRequest {
            approve,
            note: note.map(ToOwned::to_owned),
        };
        self.call(
            Method::POST,
            &format!("/v1/admin/plugin-versions/{version}/review"),
            Some(&body),
            None,
            Replay::Safe,
        )
        .await
    }

    /// Revokes a version (platform admins): installations running it stop at once.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, version: plinth_sdk::PluginVersionId) -> plinth_sdk::Result<()> {
    /// let revoked = client.revoke_plugin_version(&version, "Writes secrets into its log lines.").await?;
    /// println!("{} {} is {:?}", revoked.plugin, revoked.version, revoked.status);
    /// # Ok(()) }
    /// ```
    pub async fn revoke_plugin_version(
        &self,
        version: &PluginVersionId,
        reason: &str,
    ) -> Result<PluginVersion> {
        let body = RevokeRequest {
            reason: reason.to_owned(),
        };
        self.call(
            Method::POST,
            &format!("/v1/admin/plugin-versions/{version}/revoke"),
            Some(&body),
            None,
            Replay::Safe,
        )
        .await
    }

    /// Installs a plugin in the caller's tenant, approving what it asks for.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::InstallRequest {
    ///     plugin: "customer-service".into(),
    ///     version: None,
    ///     approve_capabilities: vec![plinth_sdk::Capability::Inference, plinth_sdk::Capability::Kv],
    ///     approve_models: vec!["minilm-embed".into(), "sentiment".into()],
    ///     settings: Default::default(),
    ///     secrets: Default::default(),
    ///     record_failures: true,
    /// };
    /// let installation = client.install_plugin(&request).await?;
    /// # Ok(()) }
    /// ```
    pub async fn install_plugin(&self, request: &InstallRequest) -> Result<Installation> {
        self.call(
            Method::POST,
            "/v1/installations",
            Some(request),
            None,
            Replay::Unsafe,
        )
        .await
    }

    /// The plugins installed in the caller's tenant.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for installation in client.installations().await? {
    ///     println!("{} {} ({:?})", installation.plugin, installation.version, installation.version_status);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn installations(&self) -> Result<Vec<Installation>> {
        self.get("/v1/installations").await
    }

    /// Upgrades an installation, or replaces its settings or secrets.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, installation: plinth_sdk::InstallationId) -> plinth_sdk::Result<()> {
    /// let request = plinth_sdk::UpdateInstallationRequest { version: Some("1.1.0".into()), ..Default::default() };
    /// let updated = client.update_installation(&installation, &request).await?;
    /// println!("now on {} ({:?})", updated.version, updated.version_status);
    /// # Ok(()) }
    /// ```
    pub async fn update_installation(
        &self,
        installation: &InstallationId,
        request: &UpdateInstallationRequest,
    ) -> Result<Installation> {
        self.call(
            Method::PATCH,
            &format!("/v1/installations/{installation}"),
            Some(request),
            None,
            Replay::Safe,
        )
        .await
    }

    /// Removes an installation from the caller's tenant.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for installation in client.installations().await? {
    ///     if installation.version_status == plinth_sdk::ReviewStatus::Revoked {
    ///         client.uninstall_plugin(&installation.id).await?;
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn uninstall_plugin(&self, installation: &InstallationId) -> Result<()> {
        self.call_empty(
            Method::DELETE,
            &format!("/v1/installations/{installation}"),
            Replay::Safe,
        )
        .await
    }

    /// Invokes an installed plugin; retried safely with one idempotency key (billed once).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, installation: plinth_sdk::InstallationId) -> plinth_sdk::Result<()> {
    /// let answer = client.invoke(&installation, &serde_json::json!({ "text": "Where is my parcel?" })).await?;
    /// println!("{}", answer["reply"]);
    /// # Ok(()) }
    /// ```
    pub async fn invoke(
        &self,
        installation: &InstallationId,
        request: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let key = self.billed_key();
        self.call(
            Method::POST,
            &format!("/v1/installations/{installation}/invoke"),
            Some(request),
            Some(&key),
            Replay::Safe,
        )
        .await
    }

    /// Invokes an installed plugin and has the invocation recorded in full (`Plinth-Record: full`):
    /// the request, and every call the plugin makes to the platform with its answer. Returns the answer
    /// and the invocation's id, whose record [`Client::invocation_record`] reads; a failed invocation
    /// is recorded too (find it with [`Client::invocations`]).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, installation: plinth_sdk::InstallationId) -> plinth_sdk::Result<()> {
    /// let (answer, invocation) = client
    ///     .invoke_recorded(&installation, &serde_json::json!({ "text": "Where is my parcel?" }))
    ///     .await?;
    /// if let Some(invocation) = invocation {
    ///     let record = client.invocation_record(&installation, &invocation).await?;
    ///     println!("{answer}: {} host calls", record.host_calls.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn invoke_recorded(
        &self,
        installation: &InstallationId,
        request: &serde_json::Value,
    ) -> Result<(serde_json::Value, Option<InvocationId>)> {
        let key = self.billed_key();
        let recording = Self {
            record: true,
            ..self.clone()
        };
        let response = recording
            .send(
                Method::POST,
                &format!("/v1/installations/{installation}/invoke"),
                Some(request),
                Some(&key),
                Replay::Safe,
            )
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(error_from(response).await);
        }
        let invocation = response
            .headers()
            .get("Plinth-Invocation-Id")
            .and_then(|id| id.to_str().ok())
            .and_then(|id| id.parse().ok());
        let bytes = response.bytes().await?;
        let answer = serde_json::from_slice(&bytes).map_err(|err| Error::Decode {
            status: status.as_u16(),
            detail: err.to_string(),
        })?;
        Ok((answer, invocation))
    }

    /// An invocation recorded in full: what `plinth-cli plugin replay` runs a component against.
    /// Not found unless it was recorded (see [`Client::invoke_recorded`] and an installation's
    /// `record_failures`).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, installation: plinth_sdk::InstallationId) -> plinth_sdk::Result<()> {
    /// for entry in client.invocations(&installation, Some(50)).await?.into_iter().filter(|r| r.recorded) {
    ///     let record = client.invocation_record(&installation, &entry.id).await?;
    ///     println!("{} ended {} after {} host calls", record.invocation_id, record.outcome, record.host_calls.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn invocation_record(
        &self,
        installation: &InstallationId,
        invocation: &InvocationId,
    ) -> Result<RecordedInvocation> {
        self.get(&format!(
            "/v1/installations/{installation}/invocations/{invocation}/record"
        ))
        .await
    }

    /// The installation's newest invocation records, newest first (at most `limit`, 1-200): how each
    /// ended, what it cost and what the plugin logged.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client, installation: plinth_sdk::InstallationId) -> plinth_sdk::Result<()> {
    /// for record in client.invocations(&installation, Some(20)).await? {
    ///     println!("{} {} {} ms {}", record.occurred_at, record.outcome, record.duration_ms, record.message.unwrap_or_default());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn invocations(
        &self,
        installation: &InstallationId,
        limit: Option<u32>,
    ) -> Result<Vec<InvocationRecord>> {
        let query = limit.map(|n| format!("?limit={n}")).unwrap_or_default();
        self.get(&format!("/v1/installations/{installation}/invocations{query}"))
            .await
    }

    /// How often the author's plugin was called per version and day, for days on which at least three
    /// tenants besides the author's own called it (counts only: failures are in each tenant's own
    /// invocation records, never shown to the author).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// for day in client.invocation_summary("customer-service").await? {
    ///     println!("{} {}: {} calls", day.day, day.version, day.calls);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn invocation_summary(&self, plugin: &str) -> Result<Vec<InvocationSummary>> {
        self.get(&format!("/v1/plugins/{plugin}/invocations")).await
    }

    /// What the caller's plugins earned in the last 30 days, how much of it was collected, and the
    /// author's balance.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let earnings = client.author_earnings().await?;
    /// for row in &earnings.rows {
    ///     println!("{}: {} calls, earned {} micros", row.plugin, row.calls, row.earnings.0);
    /// }
    /// println!("balance: {} cents", earnings.balance.whole_cents());
    /// # Ok(()) }
    /// ```
    pub async fn author_earnings(&self) -> Result<Earnings> {
        self.get("/v1/author/earnings").await
    }

    // ---- audit log ----

    /// A page of the audit log, newest first: the caller's tenant's (tenant admins), or every entry
    /// (platform admins).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let query = plinth_sdk::AuditQuery { action: Some("api_key.".into()), limit: Some(20), ..Default::default() };
    /// let page = client.audit_log(&query).await?;
    /// for entry in &page.entries {
    ///     println!("{} {} {}", entry.created_at, entry.actor, entry.action);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn audit_log(&self, query: &AuditQuery) -> Result<AuditPage> {
        let mut url =
            Url::parse("http://query.invalid/").map_err(|err| Error::InvalidUrl(err.to_string()))?;
        {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in [
                ("before", query.before.clone()),
                ("limit", query.limit.map(|l| l.to_string())),
                ("action", query.action.clone()),
                ("tenant", query.tenant.as_ref().map(ToString::to_string)),
            ] {
                if let Some(value) = value {
                    pairs.append_pair(name, &value);
                }
            }
        }
        let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
        self.get(&format!("/v1/audit-log{query}")).await
    }

    /// Every audit entry `query` matches, newest first, following the pages up to `max` entries.
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let query = plinth_sdk::AuditQuery { action: Some("login".into()), ..Default::default() };
    /// for entry in client.audit_log_all(&query, 1_000).await? {
    ///     println!("{} {}", entry.created_at, entry.action);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn audit_log_all(&self, query: &AuditQuery, max: usize) -> Result<Vec<AuditEntry>> {
        let mut query = query.clone();
        let mut entries = Vec::new();
        while entries.len() < max {
            let page = self.audit_log(&query).await?;
            let empty = page.entries.is_empty();
            entries.extend(page.entries);
            match page.next_before {
                // A cursor that does not move on (or an empty page) would loop forever.
                Some(next) if !empty && query.before.as_ref() != Some(&next) => query.before = Some(next),
                _ => break,
            }
        }
        entries.truncate(max);
        Ok(entries)
    }

    // ---- operations ----

    /// Whether the server reports itself ready (database reachable, not shutting down).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// if !client.ready().await? {
    ///     eprintln!("Plinth is not ready yet; holding traffic back");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn ready(&self) -> Result<bool> {
        self.readiness("/v2/health/ready").await
    }

    /// Whether the server process answers at all (the liveness probe).
    ///
    /// ```no_run
    /// # async fn run(client: plinth_sdk::Client) -> plinth_sdk::Result<()> {
    /// let live = client.live().await?;
    /// println!("server process answering: {live}");
    /// # Ok(()) }
    /// ```
    pub async fn live(&self) -> Result<bool> {
        Ok(self.get::<ServerLive>("/v2/health/live").await?.live)
    }

    /// A readiness answer: `200` ready, `503` with `ready: false` not ready, anything else an error.
    async fn readiness(&self, path: &str) -> Result<bool> {
        let response = self
            .send(Method::GET, path, None::<&()>, None, Replay::Safe)
            .await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::SERVICE_UNAVAILABLE => Ok(false),
            _ => Err(error_from(response).await),
        }
    }

    // ---- plumbing ----

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::GET, path, None::<&()>, None, Replay::Safe)
            .await
    }

    async fn call_empty(&self, method: Method, path: &str, replay: Replay) -> Result<()> {
        let response = self.send(method, path, None::<&()>, None, replay).await?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(error_from(response).await)
        }
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
        replay: Replay,
    ) -> Result<T> {
        let response = self.send(method, path, body, idempotency_key, replay).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(error_from(response).await);
        }
        let bytes = response.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|err| Error::Decode {
            status: status.as_u16(),
            detail: err.to_string(),
        })
    }

    /// Sends with retries: transient failures are retried with exponential back-off, or after the
    /// server's `Retry-After`.
    async fn send<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        idempotency_key: Option<&str>,
        replay: Replay,
    ) -> Result<reqwest::Response> {
        let url = self
            .base
            .join(path)
            .map_err(|err| Error::InvalidUrl(err.to_string()))?;
        // Exponential back-off with jitter, so clients that failed together do not retry together.
        let mut delays = ExponentialBuilder::default()
            .with_min_delay(self.retry.initial_backoff)
            .with_factor(2.0)
            .with_max_delay(self.retry.max_wait)
            .with_max_times(usize::try_from(self.retry.max_retries).unwrap_or(usize::MAX))
            .with_jitter()
            .build();
        loop {
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            if self.record {
                request = request.header("Plinth-Record", "full");
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let outcome = match request.send().await {
                Ok(response) if response.status().is_server_error() => Ok(read_server_error(response).await),
                other => other,
            };
            let wait = match &outcome {
                Ok(response) if retryable_status(response) && replay == Replay::Safe => {
                    Some(retry_after(response))
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                    Some(retry_after(response))
                }
                // The same keyed request is still running elsewhere: its answer is coming.
                Ok(response)
                    if response.status() == StatusCode::CONFLICT
                        && idempotency_key.is_some()
                        && response.headers().contains_key(header::RETRY_AFTER) =>
                {
                    Some(retry_after(response))
                }
                Err(err)
                    if err.is_connect()
                        || (replay == Replay::Safe && (err.is_timeout() || err.is_request())) =>
                {
                    Some(None)
                }
                Ok(_) | Err(_) => None,
            };
            // The server's Retry-After when it sent one (beyond `max_wait`: give up now), else the
            // next back-off, which never exceeds `max_wait`.
            let pause = wait.and_then(|hint| {
                let delay = delays.next()?;
                match hint {
                    Some(asked) if asked > self.retry.max_wait => None,
                    Some(asked) => Some(asked),
                    None => Some(delay.min(self.retry.max_wait)),
                }
            });
            match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => return Ok(outcome?),
            }
        }
    }
}

/// A transient failure worth retrying: a 429, or a 5xx that is not a definite answer. The server's
/// error code decides when there is one (a plugin that failed fails again, and each attempt's model
/// calls are billed); a bare 502/503/504 from a proxy on the way is retried.
fn retryable_status(response: &reqwest::Response) -> bool {
    let status = response.status();
    if !matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504) {
        return false;
    }
    response
        .extensions()
        .get::<ServerErrorCode>()
        .is_none_or(|code| code.0.is_retryable())
}

/// The error code of a 5xx the server answered, kept on the re-assembled response.
#[derive(Debug, Clone, Copy)]
struct ServerErrorCode(ErrorCode);

/// Reads a 5xx answer to learn its error code, and puts it back together for the caller. (Error
/// bodies are small: the server's are a few hundred bytes.)
async fn read_server_error(response: reqwest::Response) -> reqwest::Response {
    let status = response.status();
    let headers = response.headers().clone();
    // An answer cut off on the way has no code to go by: retried like any transient failure.
    let body = response.bytes().await.unwrap_or_default();
    let code = serde_json::from_slice::<ErrorBody>(&body)
        .map(|b| b.error.code)
        .or_else(|_| serde_json::from_slice::<ProtocolErrorBody>(&body).map(|b| b.code))
        .ok();
    let mut rebuilt = http::Response::new(body);
    *rebuilt.status_mut() = status;
    *rebuilt.headers_mut() = headers;
    if let Some(code) = code {
        rebuilt.extensions_mut().insert(ServerErrorCode(code));
    }
    reqwest::Response::from(rebuilt)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds = response
        .headers()
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_secs(seconds))
}

async fn error_from(response: reqwest::Response) -> Error {
    let status = response.status().as_u16();
    let retry_after = retry_after(&response);
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    match response.bytes().await {
        Ok(bytes) => match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Error::Api {
                status,
                code: body.error.code,
                message: body.error.message,
                request_id: body.error.request_id,
                retry_after,
            },
            Err(_) if let Ok(body) = serde_json::from_slice::<ProtocolErrorBody>(&bytes) => Error::Api {
                status,
                code: body.code,
                message: body.error,
                request_id: body.request_id,
                retry_after,
            },
            Err(_) => Error::Decode {
                status,
                detail: format!("{} (request {request_id})", String::from_utf8_lossy(&bytes)),
            },
        },
        Err(err) => Error::Transport(err),
    }
}

/// A fresh key for one logical call.
#[must_use]
pub fn new_idempotency_key() -> String {
    format!("sdk_{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}

fn usage_query_string(query: &UsageQuery) -> Result<String> {
    let mut url = Url::parse("http://query.invalid/").map_err(|err| Error::InvalidUrl(err.to_string()))?;
    {
        let mut pairs = url.query_pairs_mut();
        if let Some(from) = &query.from {
            pairs.append_pair("from", from);
        }
        if let Some(to) = &query.to {
            pairs.append_pair("to", to);
        }
        if let Some(group_by) = query.group_by {
            pairs.append_pair(
                "group_by",
                match group_by {
                    UsageGrouping::Day => "day",
                    UsageGrouping::Resource => "resource",
                },
            );
        }
    }
    Ok(url
        .query()
        .filter(|q| !q.is_empty())
        .map(|q| format!("?{q}"))
        .unwrap_or_default())
}
