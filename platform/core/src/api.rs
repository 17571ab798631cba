//! Request and response bodies of the public API, shared by the server and the SDK.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::id::{EventId, KeyId, TenantId, UserId};
use crate::money::Micros;
use crate::scope::{Role, Scope};

// ---- accounts ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignupRequest {
    pub email: String,
    /// At least 10 characters.
    pub password: String,
    /// The company or team name shown in the portal.
    pub tenant_name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// Which tenant to act in when the user belongs to several; defaults to the oldest membership.
    #[serde(default)]
    pub tenant_id: Option<TenantId>,
}

/// A login session. The token is shown once; send it as `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Session {
    pub token: String,
    pub expires_at: DateTime<Utc>,
    pub user: User,
    pub tenant: Tenant,
    pub role: Role,
    /// Every tenant the user belongs to, to switch between them at login.
    pub memberships: Vec<Membership>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// The id of the current plan.
    pub plan: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Membership {
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Member {
    pub user_id: UserId,
    pub email: String,
    pub role: Role,
    pub joined_at: DateTime<Utc>,
}

/// Adds an existing user (who has signed up) to the caller's tenant.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddMemberRequest {
    pub email: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateMemberRequest {
    pub role: Role,
}

// ---- API keys ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateApiKeyRequest {
    /// A label to recognise the key by, e.g. "production backend".
    pub name: String,
    /// Defaults to `["inference"]`. A caller cannot grant scopes it does not hold.
    #[serde(default)]
    pub scopes: Option<Vec<Scope>>,
    /// An extra per-key limit, below the plan's tenant-wide limit.
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiKey {
    pub id: KeyId,
    pub name: String,
    /// The first and last characters of the secret, to recognise it: `plk_live_AbC…9xYz`.
    pub redacted: String,
    pub scopes: Vec<Scope>,
    pub rate_limit_per_minute: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A new key. `secret` is shown only in this response; Plinth stores only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedApiKey {
    pub secret: String,
    #[serde(flatten)]
    pub key: ApiKey,
}

// ---- plans and subscription ----

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    /// A stable slug: `free`, `pro`, `enterprise`.
    pub id: String,
    pub name: String,
    /// ISO 4217, lower case.
    pub currency: String,
    /// Monthly fee in micro-units of `currency`.
    pub monthly_fee_micros: Micros,
    /// Calls included in the monthly fee.
    pub included_calls: i64,
    /// Price of each call beyond the included ones, in micro-units.
    pub price_per_call_micros: Micros,
    /// When true, calls beyond the included ones are refused rather than billed.
    pub hard_cap: bool,
    /// Price of training: per 1,000 examples × epochs, in micro-units.
    #[serde(default)]
    pub training_price_micros: Micros,
    /// Sustained request rate per tenant: at most 60,000,000 a minute (one a microsecond).
    pub rate_limit_per_minute: u32,
    /// Requests that may arrive at once on top of the sustained rate.
    pub burst: u32,
    /// What keeps the tenant from crowding out others: plugin instances, model share, upload quotas.
    #[serde(flatten)]
    pub isolation: PlanIsolation,
}

/// A plan's share of the platform's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanIsolation {
    /// Plugin instances the tenant may run at once; more at the same time are answered `429`.
    pub plugin_instances: u32,
    /// The tenant's share of a model that several tenants are waiting on, relative to theirs: a tenant
    /// with weight 4 is served four items for each one of a tenant with weight 1. Also its priority,
    /// heaviest first, for a replica's turn to load models and for queued training jobs; the tenants
    /// on plans weighing 1 (when their models were loaded) keep at most three quarters of a replica's
    /// loaded models together.
    pub scheduling_weight: u32,
    /// Uploaded models the tenant may keep.
    pub max_models: u32,
    /// Versions kept per uploaded model (delete old ones to upload more).
    pub max_model_versions: u32,
    /// Bytes of uploaded model files, every version counted.
    pub max_model_bytes: u64,
    /// Datasets the tenant may keep for training.
    #[serde(default = "PlanIsolation::free_max_datasets")]
    pub max_datasets: u32,
    /// Bytes of dataset files, every dataset counted.
    #[serde(default = "PlanIsolation::free_max_dataset_bytes")]
    pub max_dataset_bytes: u64,
    /// Training jobs queued or running at once.
    #[serde(default = "PlanIsolation::free_training_jobs")]
    pub training_jobs: u32,
}

impl PlanIsolation {
    /// The free plan's: what every tenant gets at least.
    pub const FREE: Self = Self {
        plugin_instances: 2,
        scheduling_weight: 1,
        max_models: 2,
        max_model_versions: 5,
        max_model_bytes: 1 << 30,
        max_datasets: 2,
        max_dataset_bytes: 8 << 20,
        training_jobs: 1,
    };

    const fn free_max_datasets() -> u32 {
        Self::FREE.max_datasets
    }

    const fn free_max_dataset_bytes() -> u64 {
        Self::FREE.max_dataset_bytes
    }

    const fn free_training_jobs() -> u32 {
        Self::FREE.training_jobs
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    /// A payment failed; the tenant is held to the free plan's limits until it is paid.
    PastDue,
    Canceled,
}

impl SubscriptionStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::PastDue, Self::Canceled]
            .into_iter()
            .find(|status| status.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Subscription {
    pub tenant_id: TenantId,
    pub plan: Plan,
    pub status: SubscriptionStatus,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
}

// ---- usage ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UsageGrouping {
    /// One row per UTC day, keyed `YYYY-MM-DD`.
    #[default]
    Day,
    /// One row per billed resource, keyed `kind:id` (e.g. `model:sentiment`).
    Resource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageRow {
    pub key: String,
    /// Metered calls (ledger events).
    pub calls: i64,
    /// Billed units (e.g. items in a batch).
    pub units: i64,
    pub amount_micros: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub group_by: UsageGrouping,
    pub rows: Vec<UsageRow>,
    pub total: UsageRow,
}

// ---- the metered no-op ----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EchoResponse {
    /// The request body, unchanged.
    pub echo: serde_json::Value,
    /// The ledger event that metered this call.
    pub usage_event_id: EventId,
    /// True when the ledger already held this call's event (a retry whose first answer was lost), so
    /// it was not billed again. A stored replay repeats the first answer byte for byte and says so in
    /// the `Idempotent-Replayed` header instead.
    pub replayed: bool,
}

// ---- audit log ----

/// One security-relevant act: who did what to which thing, from where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    pub id: String,
    /// The tenant it concerns; `None` for platform-wide acts (seen by platform admins only).
    pub tenant_id: Option<TenantId>,
    /// A user id, an API key id, `stripe` (webhooks), `operator` (the CLI) or `system`.
    pub actor: String,
    /// A dotted verb, e.g. `api_key.create`, `login.failed`, `plugin.revoke`.
    pub action: String,
    pub target: Option<String>,
    /// What changed (never a secret's value).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub detail: serde_json::Value,
    /// The client's address, as the platform determined it (see `PLINTH_TRUSTED_PROXIES`).
    pub client_address: Option<String>,
    pub user_agent: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/audit-log`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `before` for the next (older) page; `None` on the last page.
    pub next_before: Option<String>,
}

// ---- health (KServe / Open Inference Protocol v2 shapes) ----

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerLive {
    pub live: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerReady {
    pub ready: bool,
}
