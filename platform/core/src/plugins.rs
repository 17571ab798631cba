//! Shapes of the plugin marketplace: listings, published versions and their review, installations,
//! and authors' earnings.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::id::{InstallationId, InvocationId, PluginId, PluginVersionId};

/// A host interface a plugin may import: declared in its manifest, approved by the installing tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Call hosted models (each call metered to the tenant).
    Inference,
    /// A key-value store private to the installation.
    Kv,
    /// Read the installation's settings and secrets.
    Config,
    /// Write log lines.
    Log,
}

impl Capability {
    pub const ALL: [Self; 4] = [Self::Inference, Self::Kv, Self::Config, Self::Log];

    /// The WIT interface name (`plinth:plugin/<name>`).
    #[must_use]
    pub const fn interface(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Kv => "kv",
            Self::Config => "config",
            Self::Log => "log",
        }
    }

    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.interface() == name)
    }
}

/// `POST /v1/plugins`: a new listing, owned by the caller's tenant (its author).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatePluginRequest {
    /// Lowercase letters, digits and `-`; unique in the marketplace.
    pub name: String,
    #[serde(default)]
    pub description: String,
}

/// The manifest published with each component (`plugin.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    pub name: String,
    /// Semantic version, e.g. `1.2.0`; unique per plugin.
    pub version: String,
    /// The `plinth:plugin` world version it was built against.
    pub wit_version: String,
    #[serde(default)]
    pub description: String,
    /// The host interfaces the component imports; it may import no others.
    #[serde(default)]
    pub capabilities: Vec<Capability>,
    /// Hosted models it calls.
    #[serde(default)]
    pub models: Vec<String>,
    /// The author's price per invocation, in micro-units of the currency.
    #[serde(default)]
    pub price_per_call_micros: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    /// Passed the automatic checks; waiting for a platform admin.
    Pending,
    /// Installable.
    Approved,
    Rejected,
    /// Pulled by the platform after approval (a kill switch): installations running it stop at once.
    Revoked,
}

/// A published version and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PluginVersion {
    pub id: PluginVersionId,
    pub plugin: String,
    pub version: String,
    pub wit_version: String,
    pub capabilities: Vec<Capability>,
    pub models: Vec<String>,
    pub price_per_call: Micros,
    pub sha256: String,
    pub size_bytes: u64,
    pub status: ReviewStatus,
    /// What the automatic checks found (imports, smoke run).
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub checks: serde_json::Value,
    pub review_note: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A listing with its versions (all of them for its author; approved ones in the marketplace).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plugin {
    pub id: PluginId,
    pub name: String,
    pub description: String,
    pub versions: Vec<PluginVersion>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/admin/plugin-versions/{id}/review`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReviewRequest {
    pub approve: bool,
    #[serde(default)]
    pub note: Option<String>,
}

/// `POST /v1/admin/plugin-versions/{id}/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Shown to the author and to tenants whose installations run the version.
    pub reason: String,
}

/// `POST /v1/installations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstallRequest {
    pub plugin: String,
    /// A specific version; the newest approved one when omitted.
    #[serde(default)]
    pub version: Option<String>,
    /// The capabilities the tenant approves: must cover the version's manifest.
    pub approve_capabilities: Vec<Capability>,
    /// The models the tenant lets it call: must cover the version's manifest.
    #[serde(default)]
    pub approve_models: Vec<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Stored encrypted; never returned.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Record failed invocations in full (request, host calls and their answers), for replay.
    #[serde(default)]
    pub record_failures: bool,
}

/// `PATCH /v1/installations/{id}`: upgrade (or pin) the version, or replace settings or secrets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateInstallationRequest {
    #[serde(default)]
    pub version: Option<String>,
    /// Needed when the new version asks for more than was approved.
    #[serde(default)]
    pub approve_capabilities: Option<Vec<Capability>>,
    #[serde(default)]
    pub approve_models: Option<Vec<String>>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub settings: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub secrets: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub record_failures: Option<bool>,
}

/// A plugin installed in the caller's tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Installation {
    pub id: InstallationId,
    pub plugin: String,
    pub version: String,
    pub version_id: PluginVersionId,
    pub capabilities: Vec<Capability>,
    pub models: Vec<String>,
    pub price_per_call: Micros,
    /// Where the installed version stands: `approved` runs; `revoked` (or `rejected`) answers
    /// `plugin_revoked` until the installation moves to another approved version.
    pub version_status: ReviewStatus,
    /// Why the version was revoked or rejected, when it was.
    pub version_note: Option<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Names of the secrets set (values are never shown).
    pub secret_names: Vec<String>,
    /// Whether failed invocations are recorded in full, for replay.
    pub record_failures: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One invocation of an installed plugin, as its tenant sees it: how it ended, what it cost and what
/// the plugin logged. Kept for the newest invocations of each installation, for a few days.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvocationRecord {
    pub id: InvocationId,
    pub installation_id: InstallationId,
    pub plugin: String,
    pub version: String,
    /// The `X-Request-Id` of the call that ran it.
    pub request_id: String,
    pub occurred_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub compute_units: u64,
    /// `ok`, or the error code the call answered with (`plugin_failed`, `plugin_timeout`, …).
    pub outcome: String,
    /// The error's message, when it failed.
    pub message: Option<String>,
    pub logs: Vec<InvocationLog>,
    /// Whether it was recorded in full, for replay (`GET …/invocations/{invocation}/record`).
    pub recorded: bool,
}

/// A line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvocationLog {
    pub level: String,
    pub message: String,
}

/// How often one version of the author's plugin answered a call on one day (UTC), across the tenants
/// that called it, and only for days on which several tenants besides the author's own did. Never who
/// called, with what, what it logged, whether a call failed, nor a single call's duration or cost:
/// the plugin controls those, and could carry a tenant's data out to its author through them (a
/// plugin failing on purpose on one tenant's calls would spell out that tenant's secrets in the
/// author's daily failure counts). Authors see failures of their own tenant's calls in its invocation
/// records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvocationSummary {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub version: String,
    /// Calls it answered (the billed ones; failures are not counted).
    pub calls: u64,
}

/// One plugin's invocations and the author's share, in a period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EarningsRow {
    pub plugin: String,
    pub calls: i64,
    /// What tenants were charged for the plugin.
    pub gross: Micros,
    /// The author's share of it, collected or not.
    pub earnings: Micros,
    /// The part whose invoice was paid: it can be paid out.
    pub payable: Micros,
    /// The part still waiting for its invoice to be paid (or whose invoice was refunded, voided or
    /// not paid: it is never paid out).
    pub pending: Micros,
}

/// `GET /v1/author/earnings`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Earnings {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The author's share, in basis points (8000 = 80%).
    pub share_bps: u32,
    pub rows: Vec<EarningsRow>,
    /// The author's share in the period, collected or not.
    pub total: Micros,
    /// Of `total`, what tenants have paid for.
    pub payable: Micros,
    /// Of `total`, what is not collected (yet).
    pub pending: Micros,
    /// All time: collected earnings not yet paid out (negative after a refund of paid-out revenue:
    /// the next payouts withhold it).
    pub balance: Micros,
    /// All time: what payouts have transferred or are transferring.
    pub paid_out: Micros,
}

/// One invocation recorded in full, to replay it outside the platform (`plinth-cli plugin replay`):
/// the request, what the tenant configured, the sandbox's limits, and every call the plugin made to
/// the platform's services with the answer it got, in order. Kept when the caller asked
/// (`Plinth-Record: full`) or, for a failed invocation, when the installation records failures.
/// Secrets are never recorded: each secret's value (of 4 characters or more) is replaced wherever it
/// appears by `[secret NAME]`, which is also what a replay gives the plugin for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordedInvocation {
    pub invocation_id: InvocationId,
    pub plugin: String,
    pub version: String,
    /// The WIT world version the plugin was built against.
    pub world: String,
    /// The request, as the plugin received it (JSON text).
    pub request: String,
    /// The models the installation granted.
    pub granted_models: Vec<String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub settings: serde_json::Map<String, serde_json::Value>,
    /// Names of the secrets that were set (their values are not recorded).
    pub secret_names: Vec<String>,
    pub limits: RecordedLimits,
    pub host_calls: Vec<HostCall>,
    /// `ok`, or the error code the call answered.
    pub outcome: String,
    /// The plugin's answer (when `ok`) or the error's message.
    pub output: String,
}

/// The sandbox's limits the invocation ran under, so a replay runs under the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RecordedLimits {
    pub deadline_ms: u64,
    pub memory_bytes: u64,
    pub fuel: u64,
    pub inference_calls: u32,
}

/// What `[secret NAME]` stands for: a secret's value, wherever it appears in a record.
#[must_use]
pub fn secret_placeholder(name: &str) -> String {
    format!("[secret {name}]")
}

/// A call a plugin made to a platform service, and the answer it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostCall {
    pub request: HostRequest,
    pub answer: HostAnswer,
}

/// Bytes, as base64 in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use base64::Engine;
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map(Self)
            .map_err(serde::de::Error::custom)
    }
}

/// What the plugin asked of a service (the WIT function and its arguments). Bytes are base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum HostRequest {
    Classify { model: String, texts: Vec<String> },
    Embed { model: String, texts: Vec<String> },
    Infer { model: String, request: String },
    KvGet { key: String },
    KvSet { key: String, value: Bytes },
    KvDelete { key: String },
    KvList { prefix: String },
}

impl std::fmt::Display for HostRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Classify { model, texts } => write!(f, "inference.classify({model:?}, {texts:?})"),
            Self::Embed { model, texts } => write!(f, "inference.embed({model:?}, {texts:?})"),
            Self::Infer { model, request } => write!(f, "inference.infer({model:?}, {request:?})"),
            Self::KvGet { key } => write!(f, "kv.get({key:?})"),
            Self::KvSet { key, value } => write!(f, "kv.set({key:?}, {} bytes)", value.0.len()),
            Self::KvDelete { key } => write!(f, "kv.delete({key:?})"),
            Self::KvList { prefix } => write!(f, "kv.list-keys({prefix:?})"),
        }
    }
}

/// What a service answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HostAnswer {
    Classifications(Vec<crate::inference::Classification>),
    Embeddings(Vec<Vec<f32>>),
    /// An Open Inference Protocol response, as JSON text.
    Response(String),
    /// A key's value (base64), if it was set.
    Value(Option<Bytes>),
    Stored,
    /// Whether a deleted key existed.
    Existed(bool),
    Keys(Vec<String>),
    Refused(HostRefusal),
    /// No answer came: the invocation was stopped (its deadline) while the call was in flight.
    Interrupted,
}

/// A service call that failed, as the plugin saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostRefusal {
    /// `invalid_input`, `quota_exceeded` or `unavailable`.
    pub kind: String,
    pub message: String,
}
