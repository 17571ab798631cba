//! Plugins on the platform side, without HTTP. [`Marketplace`] publishes an author's component once
//! it passes the automatic checks (compiled, imports within its declared capabilities, platform models
//! only, a smoke run under limits), installs approved versions with what a tenant grants them and their
//! secrets sealed, and invokes an installation: metered once at the plugin's price, its model calls
//! metered on their own through [`services`], and recorded.
//!
//! The HTTP API reads requests (multipart parts, JSON) and turns [`MarketError`] into its error body.

#![forbid(unsafe_code)]

mod publishing;
mod records;
mod services;

pub use publishing::{AuthorTurn, BodyRoom, PUBLISH_MEMORY, PUBLISHES_AT_ONCE, PublishSlot};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use plinth_core::billing::PaymentMode;
use plinth_core::id::{InstallationId, InvocationId};
use plinth_core::plugins::{
    Capability, InstallRequest, Installation, PluginManifest, PluginVersion, ReviewStatus,
    UpdateInstallationRequest,
};
use plinth_core::{ErrorCode, Micros};
use plinth_hosting::{Hosting, HostingError};
use plinth_inference::InferenceError;
use plinth_plugin_host::{
    CallContext, Compiled, InvokeError, NoServices, Outcome, PluginError, PluginHost, Services, WIT_VERSIONS,
};
use plinth_store::audit::Who;
use plinth_store::auth::Principal;
use plinth_store::blobs::Blobs;
use plinth_store::ledger::{Meter, Recorded};
use plinth_store::metering::{Billable, CallKeys};
use plinth_store::plugins::{Runnable, SealedSecrets};
use plinth_store::{SecretBox, Store, StoreError};
use sha2::{Digest, Sha256};

use crate::services::TenantServices;

/// Versions one author may have awaiting review, every listing's together: each keeps its component
/// (up to the component limit) stored until it is reviewed.
pub const MAX_PENDING_VERSIONS: usize = 10;

/// Most secrets an installation holds.
const MAX_SECRETS: usize = 32;
/// Longest secret name, in bytes (letters, digits, `_`, `-`, `.`).
const MAX_SECRET_NAME: usize = 64;
/// Longest secret value, in bytes.
const MAX_SECRET_VALUE: usize = 4 << 10;

/// Why the marketplace refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MarketError {
    /// The caller's request cannot be done as asked: `code` says why.
    #[error("{message}")]
    Refused {
        code: ErrorCode,
        message: String,
        /// When trying again may succeed.
        retry_after: Option<Duration>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hosting(#[from] HostingError),
    #[error(transparent)]
    Inference(#[from] InferenceError),
    /// A fault of the platform's (disk, shared storage, the compiler).
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = MarketError> = std::result::Result<T, E>;

impl MarketError {
    fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Refused {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn invalid_plugin(message: impl Into<String>) -> Self {
        Self::refused(ErrorCode::InvalidPlugin, message)
    }

    /// A fault of the platform's, with where it was met (the API logs it; the client sees a code).
    /// Called from a closure, not as a function pointer, so the location is the caller's.
    #[track_caller]
    fn internal(detail: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{detail} (at {})", std::panic::Location::caller()))
    }

    /// The API's code for this failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused { code, .. } => *code,
            Self::Store(err) => err.code(),
            Self::Hosting(err) => err.code(),
            Self::Inference(err) => err.code(),
            Self::Internal(_) => ErrorCode::Internal,
        }
    }
}

impl From<InvokeError> for MarketError {
    fn from(err: InvokeError) -> Self {
        let retry = matches!(err, InvokeError::Busy(_) | InvokeError::Unavailable(_));
        Self::Refused {
            code: err.code(),
            message: err.to_string(),
            retry_after: retry.then_some(Duration::from_secs(1)),
        }
    }
}

/// How plugins are run and paid for here.
#[derive(Debug, Clone, Copy)]
pub struct MarketSettings {
    /// Authors' share of their plugins' revenue, in basis points (8000 = 80%).
    pub author_share_bps: u32,
    /// Invocation records kept per installation (the newest).
    pub invocation_records: u64,
    /// Local billing, or Stripe (where a tenant's bill is a Stripe subscription).
    pub payment_mode: PaymentMode,
    /// Whether plugin fees put on a bill reach a collected invoice (in Stripe mode, only with a
    /// plugin-fees price on the subscriptions).
    pub collects_plugin_fees: bool,
}

/// Publishing, installing and invoking plugins. Cheap to clone.
#[derive(Clone)]
pub struct Marketplace {
    store: Store,
    meter: Meter,
    hosting: Hosting,
    host: Arc<PluginHost>,
    /// Where published components live, named by their SHA-256 (shared between replicas).
    files: Blobs,
    /// Seals installations' secrets at rest.
    secrets: SecretBox,
    settings: MarketSettings,
    publishing: Arc<publishing::Publishing>,
}

impl std::fmt::Debug for Marketplace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marketplace")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A plugin's answer, and the invocation's record.
#[derive(Debug)]
pub struct Invoked {
    pub outcome: Outcome,
    /// `None` when no record is written (too many waiting).
    pub invocation: Option<InvocationId>,
}

/// One invocation as its caller asked for it.
#[derive(Debug)]
pub struct Invocation<'a> {
    pub installation: &'a InstallationId,
    /// The ledger keys the call is billed under.
    pub keys: CallKeys,
    /// The request's id, kept on its usage events and its record.
    pub request_id: String,
    pub request: &'a serde_json::Value,
    /// Record it in full for replay (as well as when it fails and the installation records failures).
    pub record: bool,
}

impl Marketplace {
    #[must_use]
    pub fn new(
        store: Store,
        meter: Meter,
        hosting: Hosting,
        host: Arc<PluginHost>,
        files: Blobs,
        secrets: SecretBox,
        settings: MarketSettings,
    ) -> Self {
        Self {
            store,
            meter,
            hosting,
            host,
            files,
            secrets,
            settings,
            publishing: Arc::default(),
        }
    }

    /// `author`'s turn to submit, taken before its body is read (see [`publishing`]): hold it until
    /// [`Self::publish`] returns.
    ///
    /// # Errors
    /// `rate_limited` while another of the author's submissions is under way.
    pub fn publish_turn(&self, author: &Principal) -> Result<AuthorTurn> {
        self.publishing.author_turn(&author.tenant_id)
    }

    /// Room for `author`'s submission's body in the replica's budget, grown as it arrives (see
    /// [`publishing`]): hold it until [`Self::publish`] returns.
    #[must_use]
    pub fn publish_room(&self, author: &Principal) -> BodyRoom {
        publishing::Publishing::room(&self.publishing, author.paid_subscription)
    }

    /// One of the replica's slots to check a submission in, taken once its body is in (see
    /// [`publishing`]): hold it until [`Self::publish`] returns.
    ///
    /// # Errors
    /// `unavailable` while the replica checks as many submissions as it takes at once (authors
    /// without a paid subscription, three quarters of them).
    pub fn publish_slot(&self, author: &Principal) -> Result<PublishSlot> {
        self.publishing.slot(author.paid_subscription)
    }

    /// Compiles and runs plugins.
    #[must_use]
    pub fn host(&self) -> &PluginHost {
        &self.host
    }

    #[must_use]
    pub fn settings(&self) -> &MarketSettings {
        &self.settings
    }

    /// Publishes a version of the author's plugin from its manifest (plugin.json) and component: runs
    /// the automatic checks, stores the component by SHA-256 and records the version for review.
    ///
    /// # Errors
    /// `invalid_plugin` with the check that failed; `not_found` when the author does not own the
    /// listing; `unavailable` while the compiler is busy.
    pub async fn publish(
        &self,
        _slot: &PublishSlot,
        author: &Principal,
        who: &Who,
        plugin: &str,
        manifest: &[u8],
        component: Vec<u8>,
    ) -> Result<PluginVersion> {
        let manifest: PluginManifest = serde_json::from_slice(manifest)
            .map_err(|err| MarketError::invalid_plugin(format!("manifest: {err}")))?;
        if manifest.name != plugin {
            return Err(MarketError::invalid_plugin(format!(
                "manifest.name is `{}` but this is `{plugin}`",
                manifest.name
            )));
        }
        plinth_store::plugins::validate_manifest(&manifest)?;
        if !WIT_VERSIONS.contains(&manifest.wit_version.as_str()) {
            return Err(MarketError::invalid_plugin(format!(
                "manifest.wit_version: {} is not supported (this host runs {})",
                manifest.wit_version,
                WIT_VERSIONS.join(", ")
            )));
        }
        // The author must own the listing, and the version be new, before anything expensive happens:
        // a version already published would be compiled, run and stored only to be refused.
        let listing = self.store.authored_plugin(&author.tenant_id, plugin).await?;
        let pending = self
            .store
            .authored_plugins(&author.tenant_id)
            .await?
            .iter()
            .flat_map(|plugin| &plugin.versions)
            .filter(|version| version.status == ReviewStatus::Pending)
            .count();
        if pending >= MAX_PENDING_VERSIONS {
            return Err(MarketError::refused(
                ErrorCode::PluginVersionsPending,
                format!(
                    "{pending} of your versions await review, the most an author may have; publish more once some are reviewed"
                ),
            ));
        }
        if listing.versions.iter().any(|v| v.version == manifest.version) {
            return Err(StoreError::Refused(
                ErrorCode::ValidationFailed,
                format!(
                    "version: {plugin} {} is already published; versions are immutable",
                    manifest.version
                ),
            )
            .into());
        }
        if let Some(unknown) = manifest.models.iter().find(|m| !self.hosting.is_platform(m)) {
            return Err(MarketError::invalid_plugin(format!(
                "manifest.models: `{unknown}` is not a platform model; plugins may call platform models"
            )));
        }

        let sha256 = hex::encode(Sha256::digest(&component));
        let size_bytes = component.len();
        let compiled = self
            .host
            .compile(component.clone())
            .await
            .map_err(publishing_error)?;
        if let Some(undeclared) = compiled
            .capabilities
            .iter()
            .find(|c| !manifest.capabilities.contains(c))
        {
            return Err(MarketError::invalid_plugin(format!(
                "the component imports `plinth:plugin/{}` but the manifest does not declare the `{}` capability",
                undeclared.interface(),
                undeclared.interface()
            )));
        }
        let smoke = self.smoke_run(author, &compiled, &manifest).await?;
        self.keep_component(&sha256, component).await?;
        let checks = serde_json::json!({
            "imports": compiled.capabilities,
            "smoke_run": smoke,
            "size_bytes": size_bytes,
        });
        // Not kept compiled: the version waits for approval, and is compiled again (from the disk
        // cache) when it is first invoked.
        drop(compiled);
        Ok(self
            .store
            .publish_version(
                &author.tenant_id,
                who,
                &manifest,
                &sha256,
                size_bytes as u64,
                &checks,
            )
            .await?)
    }

    /// Keeps a component by its hash, shared with the other replicas before its version is recorded.
    async fn keep_component(&self, sha256: &str, component: Vec<u8>) -> Result<()> {
        let name = format!("{sha256}.wasm");
        let path = self.files.path(&name);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            // Whole or not at all: a concurrent publish of the same bytes must not see half a file.
            let partial = self.files.path(&format!(".{name}.{}.part", ulid::Ulid::new()));
            tokio::fs::write(&partial, &component)
                .await
                .map_err(|err| MarketError::internal(err))?;
            tokio::fs::rename(&partial, &path)
                .await
                .map_err(|err| MarketError::internal(err))?;
        }
        self.files
            .publish(&name)
            .await
            .map_err(|err| MarketError::internal(err))
    }

    /// Runs the new component once, with an empty request, no grants and no state, as one of the
    /// author's plugin instances: it must answer, or refuse the request with an error of its own,
    /// without trapping (a panic, a stack overflow), timing out or breaking a limit.
    async fn smoke_run(
        &self,
        author: &Principal,
        compiled: &Arc<Compiled>,
        manifest: &PluginManifest,
    ) -> Result<serde_json::Value> {
        let call = Arc::new(CallContext {
            tenant_id: author.tenant_id.clone(),
            installation_id: format!("smoke-run:{}", author.tenant_id),
            instances: author.isolation.plugin_instances,
            paying: author.paid_subscription,
            plugin: manifest.name.clone(),
            granted_models: Vec::new(),
            settings: serde_json::Map::new(),
            secrets: BTreeMap::new(),
            idempotency_key: "smoke-run".to_owned(),
        });
        let outcome = self
            .host
            .invoke(compiled.clone(), call, Arc::new(NoServices), "{}".to_owned())
            .await;
        match outcome {
            Ok(outcome) => {
                Ok(serde_json::json!({ "result": "answered", "compute_units": outcome.compute_units }))
            }
            Err(InvokeError::Rejected(message) | InvokeError::Failed(message)) => {
                Ok(serde_json::json!({ "result": "refused the empty request", "message": message }))
            }
            Err(err @ (InvokeError::Busy(_) | InvokeError::Unavailable(_))) => Err(err.into()),
            Err(err) => Err(MarketError::invalid_plugin(format!(
                "the smoke run failed: {err}"
            ))),
        }
    }

    /// Installs an approved version in the caller's tenant, with every capability and model it asks
    /// for approved in `request`; its secrets sealed.
    ///
    /// # Errors
    /// `plugin_not_approved`; `validation_failed` when the grants do not cover the version, or a
    /// secret is malformed.
    pub async fn install(
        &self,
        auth: &Principal,
        who: &Who,
        request: &InstallRequest,
    ) -> Result<Installation> {
        let version = self
            .store
            .approved_version(&request.plugin, request.version.as_deref())
            .await?;
        check_grants(&version, &request.approve_capabilities, &request.approve_models)?;
        let sealed = self.seal_secrets(&request.secrets)?;
        let mut installation = self
            .store
            .install(
                &auth.tenant_id,
                who,
                &version,
                &request.settings,
                &sealed,
                request.record_failures,
            )
            .await?;
        installation.secret_names = sealed.names;
        Ok(installation)
    }

    /// Moves an installation to another approved version (what it asks for approved, or approved
    /// before), or replaces its settings or secrets.
    ///
    /// # Errors
    /// As [`Self::install`]; `not_found` for another tenant's installation.
    pub async fn update_installation(
        &self,
        auth: &Principal,
        who: &Who,
        id: &InstallationId,
        request: &UpdateInstallationRequest,
    ) -> Result<Installation> {
        let current = self.store.runnable(&auth.tenant_id, id).await?.installation;
        let version = match &request.version {
            Some(wanted) => {
                let version = self.store.approved_version(&current.plugin, Some(wanted)).await?;
                let capabilities = request
                    .approve_capabilities
                    .as_ref()
                    .unwrap_or(&current.capabilities);
                let models = request.approve_models.as_ref().unwrap_or(&current.models);
                check_grants(&version, capabilities, models)?;
                Some(version)
            }
            None => None,
        };
        let sealed = request
            .secrets
            .as_ref()
            .map(|secrets| self.seal_secrets(secrets))
            .transpose()?;
        Ok(self
            .store
            .update_installation(
                &auth.tenant_id,
                who,
                id,
                plinth_store::plugins::InstallationChange {
                    version: version.as_ref(),
                    settings: request.settings.as_ref(),
                    secrets: sealed.as_ref(),
                    record_failures: request.record_failures,
                },
            )
            .await?)
    }

    /// Seals an installation's secrets for storage.
    fn seal_secrets(&self, secrets: &BTreeMap<String, String>) -> Result<SealedSecrets> {
        let refuse = |message: String| Err(MarketError::refused(ErrorCode::ValidationFailed, message));
        if secrets.len() > MAX_SECRETS {
            return refuse(format!("secrets: at most {MAX_SECRETS}"));
        }
        for (name, value) in secrets {
            let name_ok = !name.is_empty()
                && name.len() <= MAX_SECRET_NAME
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
            if !name_ok {
                return refuse(format!(
                    "secrets: a name is 1 to {MAX_SECRET_NAME} letters, digits, `_`, `-` or `.`"
                ));
            }
            if value.len() > MAX_SECRET_VALUE {
                return refuse(format!("secrets.{name}: at most {} KiB", MAX_SECRET_VALUE >> 10));
            }
        }
        if secrets.is_empty() {
            return Ok(SealedSecrets::default());
        }
        let plain = serde_json::to_vec(secrets).map_err(|err| MarketError::internal(err))?;
        Ok(SealedSecrets {
            sealed: self.secrets.seal(&plain)?,
            names: secrets.keys().cloned().collect(),
        })
    }

    fn open_secrets(&self, sealed: &str) -> Result<BTreeMap<String, String>> {
        if sealed.is_empty() {
            return Ok(BTreeMap::new());
        }
        let plain = self.secrets.open(sealed)?;
        serde_json::from_slice(&plain).map_err(|err| MarketError::internal(err))
    }

    /// Whether the tenant has a bill that a priced call can go on: a paid plan in good standing (in
    /// Stripe mode, a Stripe subscription carrying the plugin-fees price, since that is what Stripe
    /// invoices).
    fn can_be_charged(&self, auth: &Principal) -> bool {
        auth.paid_subscription
            && self.settings.collects_plugin_fees
            && (self.settings.payment_mode == PaymentMode::Local || auth.provider_subscription)
    }

    /// What one invocation bills. The author's own tenant neither pays for its plugin nor earns from
    /// it, so an author cannot pay itself; anyone else pays the plugin's price, and only from a bill
    /// that will be collected.
    fn plugin_charge<'a>(&self, auth: &Principal, runnable: &'a Runnable) -> Result<Billable<'a>> {
        let installed = &runnable.installation;
        let own = runnable.author == auth.tenant_id;
        let price = if own {
            Micros::ZERO
        } else {
            installed.price_per_call
        };
        if price > Micros::ZERO && !self.can_be_charged(auth) {
            return Err(MarketError::refused(
                ErrorCode::PaymentRequired,
                format!(
                    "`{}` costs {} micro-units per call, and this tenant has no paid subscription to charge it to; subscribe to a paid plan (POST /v1/subscription)",
                    installed.plugin, price.0
                ),
            ));
        }
        Ok(Billable {
            kind: plinth_store::plugins::USAGE_KIND,
            resource: installed.version_id.as_str(),
            units: 1,
            unit_price: price,
            // Rounded down to the micro-unit: the platform keeps the remainder.
            author_share: price
                .share_bps(self.settings.author_share_bps)
                .unwrap_or(Micros::ZERO),
        })
    }

    /// Runs an installation's plugin on the request, metered once at the plugin's price (its model
    /// calls are metered on their own). A revoked version does not run. Recorded in full for replay
    /// when the caller asked, or when it fails and the installation records failures.
    ///
    /// # Errors
    /// `plugin_revoked`, `payment_required`, the plugin's own failure (`plugin_failed`,
    /// `plugin_timeout`, `plugin_concurrency_exceeded`…), or the ledger's.
    pub async fn invoke(&self, auth: &Principal, invocation: Invocation<'_>) -> Result<(Invoked, Recorded)> {
        let Invocation {
            installation,
            keys,
            request_id,
            request,
            record,
        } = invocation;
        let runnable = self.store.runnable(&auth.tenant_id, installation).await?;
        let installed = &runnable.installation;
        if installed.version_status != ReviewStatus::Approved {
            return Err(MarketError::refused(
                ErrorCode::PluginRevoked,
                format!(
                    "{} {} was withdrawn by the platform{}; move this installation to another approved version (PATCH /v1/installations/{{id}}) or uninstall it",
                    installed.plugin,
                    installed.version,
                    installed
                        .version_note
                        .as_deref()
                        .map(|note| format!(": {note}"))
                        .unwrap_or_default()
                ),
            ));
        }
        let billable = self.plugin_charge(auth, &runnable)?;
        let compiled = self.compiled(&runnable.sha256).await?;
        let call = Arc::new(CallContext {
            tenant_id: auth.tenant_id.clone(),
            installation_id: installed.id.to_string(),
            instances: auth.isolation.plugin_instances,
            paying: auth.paid_subscription,
            plugin: installed.plugin.clone(),
            granted_models: installed.models.clone(),
            settings: installed.settings.clone(),
            secrets: self.open_secrets(&runnable.sealed_secrets)?,
            idempotency_key: keys.attempt.clone(),
        });
        let services = Arc::new(TenantServices::new(
            self.clone(),
            auth.clone(),
            request_id.clone(),
        ));
        let recorder = (record || installed.record_failures).then(|| {
            Arc::new(plinth_plugin_host::Recorder::new(
                services.clone(),
                plinth_store::invocations::MAX_RECORD_BYTES,
            ))
        });
        let host_services: Arc<dyn Services> = match &recorder {
            Some(recorder) => recorder.clone(),
            None => services.clone(),
        };
        let request = request.to_string();
        let work = async {
            let ran = self
                .host
                .invoke(compiled, call.clone(), host_services, request.clone())
                .await;
            let ran_ref = &ran;
            let full = recorder.filter(|_| record || ran.is_err()).map(|recorder| {
                move || {
                    records::full_record(self.host.limits(), installed, &call, request, ran_ref, &recorder)
                }
            });
            let invocation =
                records::record_invocation(self, auth, installed, &request_id, &services, &ran, full);
            Ok::<_, MarketError>(Invoked {
                outcome: ran?,
                invocation,
            })
        };
        self.meter
            .metered(auth, keys, request_id.clone(), billable, work)
            .await
    }

    /// The compiled component with this hash: kept in memory, or fetched (a version published through
    /// another replica comes from shared storage the first time) and compiled.
    async fn compiled(&self, sha256: &str) -> Result<Arc<Compiled>> {
        self.host
            .load(sha256, async {
                let path = self
                    .files
                    .fetch(&format!("{sha256}.wasm"), sha256)
                    .await
                    .map_err(|err| PluginError::Engine(err.to_string()))?;
                tokio::fs::read(&path)
                    .await
                    .map_err(|err| PluginError::Engine(format!("{}: {err}", path.display())))
            })
            .await
            .map_err(|err| match &*err {
                PluginError::Busy(message) => MarketError::Refused {
                    code: ErrorCode::Unavailable,
                    message: message.clone(),
                    retry_after: Some(Duration::from_secs(5)),
                },
                err => MarketError::internal(err),
            })
    }
}

/// A compilation that failed at publishing: the component's fault (422), or the compiler busy (503).
fn publishing_error(err: PluginError) -> MarketError {
    match err {
        PluginError::Busy(message) => MarketError::Refused {
            code: ErrorCode::Unavailable,
            message,
            retry_after: Some(Duration::from_secs(30)),
        },
        PluginError::Engine(message) => MarketError::Internal(message),
        err => MarketError::invalid_plugin(err.to_string()),
    }
}

/// Checks that what the tenant approves covers what the version asks for.
fn check_grants(version: &PluginVersion, capabilities: &[Capability], models: &[String]) -> Result<()> {
    if let Some(missing) = version.capabilities.iter().find(|c| !capabilities.contains(c)) {
        return Err(MarketError::refused(
            ErrorCode::ValidationFailed,
            format!(
                "approve_capabilities: {} {} needs `{}`; approve it to install",
                version.plugin,
                version.version,
                missing.interface()
            ),
        ));
    }
    if let Some(missing) = version.models.iter().find(|m| !models.contains(m)) {
        return Err(MarketError::refused(
            ErrorCode::ValidationFailed,
            format!(
                "approve_models: {} {} calls the model `{missing}`; approve it to install",
                version.plugin, version.version
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::{Path, PathBuf};

    use plinth_core::api::{SignupRequest, UsageGrouping};
    use plinth_inference::{Catalog, Engine, EngineSettings};
    use plinth_plugin_host::HostSettings;
    use plinth_store::DatabaseSettings;
    use plinth_store::ledger::LedgerSettings;

    use super::*;

    /// A plugin built by `scripts/build-plugins.sh` (which `scripts/test.sh` runs): manifest, component.
    fn built_plugin(name: &str) -> (Vec<u8>, Vec<u8>) {
        let read = |file: String| {
            let path = plinth_inference::cache_dir().join("plugins").join(file);
            std::fs::read(&path)
                .unwrap_or_else(|err| panic!("{}: {err} (scripts/build-plugins.sh)", path.display()))
        };
        (read(format!("{name}.json")), read(format!("{name}.wasm")))
    }

    async fn signup(store: &Store, email: &str) -> Principal {
        let session = store
            .signup(
                &SignupRequest {
                    email: email.into(),
                    password: "correct horse battery".into(),
                    tenant_name: email.into(),
                },
                &Who::internal(Who::OPERATOR),
            )
            .await
            .unwrap();
        (*store.authenticate(&session.token).await.unwrap()).clone()
    }

    /// The marketplace on SQLite, with the built-in models (the sentiment model plugins call).
    async fn marketplace(dir: &Path) -> Marketplace {
        let store = Store::connect(&DatabaseSettings::sqlite_in(dir)).await.unwrap();
        store.migrate().await.unwrap();
        let (meter, _writer) = Meter::start(store.clone(), LedgerSettings::default());
        let engine = Engine::new(EngineSettings {
            ort_dylib: std::env::var_os("PLINTH_ORT_DYLIB")
                .map_or_else(plinth_inference::fetched_ort_dylib, PathBuf::from),
            ..EngineSettings::default()
        })
        .expect("ONNX Runtime (scripts/setup.sh fetches it)");
        let catalog = Arc::new(Catalog::with_loaded_tenant_models(usize::MAX));
        plinth_inference::load_builtin(&engine, &plinth_inference::cache_dir().join("models"), &catalog)
            .expect("the built-in models (scripts/setup.sh prepares them)");
        let blobs = |name: &str| {
            let path = dir.join(name);
            std::fs::create_dir_all(&path).unwrap();
            Blobs::local(path)
        };
        let hosting = Hosting::new(store.clone(), catalog, engine, blobs("models"));
        let host = PluginHost::new(&HostSettings {
            limits: plinth_plugin_host::Limits::default(),
            cache_dir: None,
        })
        .unwrap();
        let settings = MarketSettings {
            author_share_bps: 8_000,
            invocation_records: 100,
            payment_mode: PaymentMode::Local,
            collects_plugin_fees: true,
        };
        let secrets = SecretBox::new(&SecretBox::generate_key());
        Marketplace::new(
            store,
            meter,
            hosting,
            Arc::new(host),
            blobs("plugins"),
            secrets,
            settings,
        )
    }

    /// Without any HTTP: a real component is published through its checks, approved, installed and
    /// invoked; the invocation and the model calls it makes land in the ledger, a retry with the same
    /// keys is not billed again, and a tenant with no bill to put its price on is refused before it runs.
    #[tokio::test]
    async fn a_published_plugin_runs_for_its_tenant_and_every_call_it_makes_is_metered_once() {
        let dir = tempfile::tempdir().unwrap();
        let market = marketplace(dir.path()).await;
        let operator = Who::internal(Who::OPERATOR);
        let author = signup(&market.store, "author@example.com").await;
        let customer = signup(&market.store, "customer@example.com").await;
        market
            .store
            .create_plugin(&author.tenant_id, &operator, "sentiment-monitor", "scores news")
            .await
            .unwrap();
        let (manifest, component) = built_plugin("sentiment-monitor");

        // Someone else's listing: refused before anything is compiled.
        let slot = market.publish_slot(&customer).unwrap();
        let foreign = market
            .publish(
                &slot,
                &customer,
                &operator,
                "sentiment-monitor",
                &manifest,
                component.clone(),
            )
            .await
            .unwrap_err();
        assert_eq!(foreign.code(), ErrorCode::NotFound, "{foreign:?}");

        let version = market
            .publish(
                &slot,
                &author,
                &operator,
                "sentiment-monitor",
                &manifest,
                component,
            )
            .await
            .unwrap();
        assert_eq!(version.status, ReviewStatus::Pending);
        market
            .store
            .review_version(&operator, &version.id, true, None)
            .await
            .unwrap();

        let granted = InstallRequest {
            plugin: "sentiment-monitor".into(),
            version: None,
            approve_capabilities: version.capabilities.clone(),
            approve_models: version.models.clone(),
            settings: serde_json::Map::new(),
            secrets: BTreeMap::from([("webhook".to_owned(), "s3cret".to_owned())]),
            record_failures: false,
        };
        let ungranted = market
            .install(
                &author,
                &operator,
                &InstallRequest {
                    plugin: "sentiment-monitor".into(),
                    version: None,
                    approve_capabilities: Vec::new(),
                    approve_models: Vec::new(),
                    settings: serde_json::Map::new(),
                    secrets: BTreeMap::new(),
                    record_failures: false,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(ungranted.code(), ErrorCode::ValidationFailed);

        // The author runs its own plugin without paying for it; its model calls are billed.
        let own = market.install(&author, &operator, &granted).await.unwrap();
        assert_eq!(own.secret_names, ["webhook"]);
        let request = serde_json::json!({"topic": "ACME", "texts": ["great quarter", "terrible losses"]});
        // A keyed call, as the API keys one: the call's key for every attempt, each attempt its own.
        let keys = CallKeys {
            call: "req:first".into(),
            attempt: "req:first:1".into(),
            inherited: false,
        };
        let invoke = |keys: CallKeys| Invocation {
            installation: &own.id,
            keys,
            request_id: "req-1".into(),
            request: &request,
            record: true,
        };
        let (invoked, recorded) = market.invoke(&author, invoke(keys.clone())).await.unwrap();
        assert!(!recorded.replayed);
        let answer: serde_json::Value = serde_json::from_str(&invoked.outcome.response).unwrap();
        assert_eq!(answer["scored"].as_array().map(Vec::len), Some(2), "{answer}");
        assert_eq!(answer["scored"][1]["label"], "negative", "{answer}");
        assert!(invoked.invocation.is_some());
        // A retry of the same call (its event already there) is served, not billed again.
        let retry = CallKeys {
            attempt: "req:first:2".into(),
            ..keys
        };
        let (_, again) = market.invoke(&author, invoke(retry)).await.unwrap();
        assert!(again.replayed);

        let now = chrono::Utc::now();
        let usage = market
            .store
            .usage_report(
                &author.tenant_id,
                now - chrono::Duration::hours(1),
                now + chrono::Duration::hours(1),
                UsageGrouping::Resource,
            )
            .await
            .unwrap();
        let row = |key: &str| usage.rows.iter().find(|row| row.key == key).cloned();
        let plugin = row(&format!("plugin:{}", version.id)).unwrap();
        assert_eq!(
            (plugin.calls, plugin.amount_micros),
            (1, Micros::ZERO),
            "{usage:?}"
        );
        // Each attempt's model calls are its own work: two attempts, two sets of model calls.
        let model = row("model:sentiment").unwrap();
        assert_eq!((model.calls, model.units), (2, 4), "{usage:?}");

        // The customer is on the free plan: the plugin's price has no bill to go on.
        let theirs = market.install(&customer, &operator, &granted).await.unwrap();
        let refused = market
            .invoke(
                &customer,
                Invocation {
                    installation: &theirs.id,
                    keys: CallKeys::unkeyed(),
                    request_id: "req-2".into(),
                    request: &request,
                    record: false,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::PaymentRequired, "{refused:?}");
        assert_eq!(
            market.store.usage_event_count(&customer.tenant_id).await.unwrap(),
            0
        );

        // Another tenant's installation is not there at all.
        let other = market
            .invoke(
                &customer,
                Invocation {
                    installation: &own.id,
                    keys: CallKeys::unkeyed(),
                    request_id: "req-3".into(),
                    request: &request,
                    record: false,
                },
            )
            .await
            .unwrap_err();
        assert_eq!(other.code(), ErrorCode::NotFound, "{other:?}");
    }
}
