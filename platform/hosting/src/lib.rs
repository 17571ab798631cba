//! The models tenants upload, hosted. An upload is checked against its plan's quota and proven to load
//! and fit its task before anything is stored; its files are stored by SHA-256 and shared between
//! replicas; versions load on demand one at a time; a version serves only while it is its model's
//! newest live one; files go once no live version uses them; and each replica's catalogue follows the
//! registry every replica shares. Nothing here speaks HTTP: the API reads a request and calls these,
//! and so can a test.

#![forbid(unsafe_code)]

mod budget;
mod files;
mod gate;
mod sync;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use plinth_core::ErrorCode;
use plinth_core::api::PlanIsolation;
use plinth_core::id::TenantId;
use plinth_core::inference::{Model, Task};
use plinth_inference::{Catalog, Engine, InferenceError, LoadedModel, ModelFiles, Tier};
use plinth_store::audit::Who;
use plinth_store::blobs::Blobs;
use plinth_store::models::{ModelRecord, NewModel};
use plinth_store::{Store, StoreError};

use crate::files::Shared;
pub use crate::files::Staged;

/// Models loaded on demand (uploads, older versions) at once, across tenants: each load builds
/// sessions and may take a core for seconds. A freed turn goes to the heaviest plan's load, then the
/// tenant's owing least loading time (see [`budget`]).
const CONCURRENT_LOADS: usize = 1;

/// How long a load waits for its turn before the caller is told to come back.
const LOAD_WAIT: Duration = Duration::from_secs(30);

/// The time a replica spends loading one tenant's models a minute, by default (see
/// [`Hosting::with_tenant_load_time`]): a quarter of the one turn loads take.
pub const TENANT_LOAD_TIME_PER_MINUTE: Duration = Duration::from_secs(15);

/// How long a version that failed to load answers its calls with that failure before it is tried
/// again: each try reads and screens the whole file in the turn every tenant's loads share.
const FAILED_LOAD_KEPT: Duration = Duration::from_secs(60);

/// The most labels a text-classification model may have.
pub const MAX_LABELS: usize = 1_000;

/// The most a version's signature (its inputs and outputs, as JSON) may take: the registry keeps it
/// and every replica reads it at start-up. Real graphs take a few hundred bytes.
const MAX_SIGNATURE_BYTES: usize = 16 << 10;

/// Who a model call is for, in the model's fair queue: the caller's tenant, with its plan's weight.
#[must_use]
pub fn share(auth: &plinth_store::auth::Principal) -> plinth_inference::Share {
    plinth_inference::Share {
        tenant: Arc::from(auth.tenant_id.as_str()),
        weight: auth.isolation.scheduling_weight,
        plan: Arc::from(auth.plan.as_str()),
    }
}

/// Why hosting refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum HostingError {
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
    Inference(#[from] InferenceError),
    /// A fault of the platform's (disk, a task that panicked).
    #[error("{0}")]
    Internal(String),
}

impl HostingError {
    /// The API's code for this failure.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Refused { code, .. } => *code,
            Self::Store(err) => err.code(),
            Self::Inference(err) => err.code(),
            Self::Internal(_) => ErrorCode::Internal,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::Refused {
            code: ErrorCode::ValidationFailed,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A fault of the platform's, with where it was met (the API logs it; the client sees a code).
    /// Called from a closure, not as a function pointer, so the location is the caller's.
    #[track_caller]
    fn internal(err: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{err} (at {})", std::panic::Location::caller()))
    }
}

pub type Result<T, E = HostingError> = std::result::Result<T, E>;

/// A tenant's load waited too long behind its own other loads (one at a time per tenant).
fn loading_others() -> HostingError {
    HostingError::Refused {
        code: ErrorCode::TenantQueueFull,
        message: "models of yours are being loaded (one at a time per tenant; calls for the same version \
                  wait for its load); retry shortly"
            .into(),
        retry_after: Some(Duration::from_secs(5)),
    }
}

/// A new version of a tenant model, as its uploader describes it.
#[derive(Debug, Clone)]
pub struct NewVersion {
    pub name: String,
    pub task: Task,
    /// Class labels in output order (text classification).
    pub labels: Vec<String>,
}

/// How a model is loaded on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loading {
    /// A new upload: its warm-up must answer within the inference timeout.
    Validate,
    /// A version that was accepted before.
    Accepted,
}

/// The hosted models of every tenant on this replica; cheap to clone (handles to the same state).
#[derive(Debug, Clone)]
pub struct Hosting {
    store: Store,
    catalog: Arc<Catalog>,
    engine: Engine,
    /// Where model files live, named by their SHA-256 (shared between replicas).
    files: Blobs,
    /// Held while files are added or removed, and while a version is checked to be current.
    files_lock: Arc<tokio::sync::Mutex<()>>,
    /// Each tenant's place in line for those turns.
    load_gate: Arc<gate::LoadGate>,
    /// Models being uploaded through this replica (tenant, name): the catalogue sync leaves them to
    /// the upload, which loads and serves them itself.
    uploading: Arc<Mutex<HashMap<(TenantId, String), usize>>>,
    /// Tenants whose upload this replica is receiving (one at a time each).
    receiving: Arc<Mutex<HashSet<TenantId>>>,
    /// Versions whose load failed as a model (not for want of a turn), with when and why.
    failed_loads: Arc<Mutex<HashMap<gate::Version, (Instant, String)>>>,
    /// Each tenant's time loading models on this replica (see [`Hosting::with_tenant_load_time`]),
    /// and the turns loads take (see [`Hosting::load`]).
    load_budget: Arc<budget::LoadBudget>,
}

impl Hosting {
    #[must_use]
    pub fn new(store: Store, catalog: Arc<Catalog>, engine: Engine, files: Blobs) -> Self {
        Self {
            store,
            catalog,
            engine,
            files,
            files_lock: Arc::default(),
            load_gate: Arc::default(),
            uploading: Arc::default(),
            receiving: Arc::default(),
            failed_loads: Arc::default(),
            load_budget: Arc::new(budget::LoadBudget::new(
                TENANT_LOAD_TIME_PER_MINUTE,
                CONCURRENT_LOADS,
            )),
        }
    }

    /// Holds each tenant's loads on this replica (uploads' and calls') to `per_minute` of loading
    /// time a minute, and a minute's worth in a row; past it, what would load (a call, an upload) is
    /// answered `rate_limited` with when to retry. Calls to loaded models are not held up.
    ///
    /// Every load reads and screens a whole model file, builds its sessions and warms them up: most
    /// of a core, in the one turn every tenant's loads take. Calls that run, are billed and are rate
    /// limited could still make loads back to back: calls spread over more models than stay loaded,
    /// each letting another go; calls that fit a model's description but fail inside its graph
    /// (refunded); a version uploaded between a call's check and its load; uploads that fail their
    /// checks. The budget bounds what all of those take, per replica, as the cores are.
    #[must_use]
    pub fn with_tenant_load_time(mut self, per_minute: Duration) -> Self {
        self.load_budget = Arc::new(budget::LoadBudget::new(per_minute, CONCURRENT_LOADS));
        self
    }

    /// A tenant's turn to send an upload: one at a time per tenant, as each is staged on disk (up to
    /// the plan's largest model) before it can be checked against its quota.
    ///
    /// # Errors
    /// `tenant_queue_full` (retry shortly) while another upload of the tenant's is on its way.
    pub fn receive_upload(&self, tenant: &TenantId) -> Result<Receiving> {
        let mut receiving = self.receiving.lock().unwrap_or_else(PoisonError::into_inner);
        if !receiving.insert(tenant.clone()) {
            return Err(HostingError::Refused {
                code: ErrorCode::TenantQueueFull,
                message:
                    "another of your uploads is on its way (one at a time per tenant); retry when it is done"
                        .into(),
                retry_after: Some(Duration::from_secs(5)),
            });
        }
        Ok(Receiving {
            set: self.receiving.clone(),
            tenant: tenant.clone(),
        })
    }

    /// Where uploads and other files on their way in are written before they are stored.
    #[must_use]
    pub fn staging_dir(&self) -> PathBuf {
        self.files.dir().join("staging")
    }

    /// Whether `name` may name a tenant model; `field` is what the refusal calls it.
    ///
    /// # Errors
    /// `validation_failed` for a malformed name or a platform model's.
    pub fn check_model_name(&self, field: &str, name: &str) -> Result<()> {
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !name_ok {
            return Err(HostingError::invalid(format!(
                "{field}: 1-64 lower-case letters, digits, `-`, `_` or `.`"
            )));
        }
        if self.catalog.is_platform(name) {
            return Err(HostingError::invalid(format!(
                "{field}: `{name}` is a platform model's name"
            )));
        }
        Ok(())
    }

    fn validate(&self, version: &NewVersion, has_tokenizer: bool) -> Result<()> {
        self.check_model_name("manifest.name", &version.name)?;
        match version.task {
            Task::TextClassification if version.labels.len() < 2 => Err(HostingError::invalid(
                "manifest.labels: a text-classification model needs at least two labels",
            )),
            Task::TextClassification | Task::Embedding if !has_tokenizer => Err(HostingError::invalid(
                "a text model needs its tokenizer.json in a `tokenizer` part",
            )),
            _ if version.labels.iter().any(|l| l.is_empty() || l.len() > 100) => Err(HostingError::invalid(
                "manifest.labels: each label must be 1-100 characters",
            )),
            // Each text's answer scores every label: 256 texts of 16,000 one-letter labels (a 64 KiB
            // manifest) would answer four million scores, each with its label copied.
            _ if version.labels.len() > MAX_LABELS => Err(HostingError::invalid(format!(
                "manifest.labels: at most {MAX_LABELS} labels"
            ))),
            _ => Ok(()),
        }
    }

    /// Loads a model on a blocking thread, one at a time (see [`CONCURRENT_LOADS`]), for `tenant`
    /// whose plan weighs `weight` in the turn. The turn is held until the load really ends, even when
    /// the caller stops waiting for it.
    ///
    /// # Errors
    /// `unavailable` (retry) when other loads hold the turn too long; the engine's refusal of the
    /// model.
    async fn load(
        &self,
        tenant: &TenantId,
        weight: u32,
        files: ModelFiles,
        loading: Loading,
    ) -> Result<Arc<LoadedModel>> {
        self.load_holding(tenant, weight, files, loading, ()).await
    }

    /// [`Self::load`], holding `held` (a tenant's turn) until the load has finished, even if the caller
    /// has gone. The time the load holds its turn is charged to `tenant` (see
    /// [`Self::with_tenant_load_time`]): what starts it is [`Self::admit_load`]ed first.
    async fn load_holding(
        &self,
        tenant: &TenantId,
        weight: u32,
        files: ModelFiles,
        loading: Loading,
        held: impl Send + 'static,
    ) -> Result<Arc<LoadedModel>> {
        let turn = tokio::time::timeout(LOAD_WAIT, self.load_budget.turn(tenant, weight))
            .await
            .map_err(|_| HostingError::Refused {
                code: ErrorCode::Unavailable,
                message: "other models are loading; retry shortly".into(),
                retry_after: Some(Duration::from_secs(5)),
            })?
            .ok_or_else(|| HostingError::internal("the turn to load was never handed on"))?;
        let engine = self.engine.clone();
        // A tuple's fields drop in order, however the load ends (the closure dropped unrun too): the
        // turn every tenant shares is handed on before `held` (the tenant's own line) lets the
        // tenant's next load ask for it, so a load of another tenant's already waiting is never
        // outranked by the load that follows.
        let turn_then_line = (turn, held);
        tokio::task::spawn_blocking(move || {
            let _turn_then_line = turn_then_line;
            match loading {
                Loading::Validate => engine.validate(&files),
                Loading::Accepted => engine.reload(&files),
            }
        })
        .await
        .map_err(|err| HostingError::internal(err))?
        .map_err(HostingError::from)
    }

    /// Checks a staged model against its description and the plan's quota, proves it loads and fits
    /// its task, stores it by SHA-256, records the version and starts serving it.
    ///
    /// Runs to its end on a task of its own, whether or not its caller waits: an upload stopped
    /// between storing its files and registering them (a client hanging up, the handler dropped)
    /// would leave files that no version names and no quota counts.
    ///
    /// # Errors
    /// `validation_failed` for a description that does not fit, the quota's refusal, the engine's
    /// refusal of the model.
    pub async fn install(
        &self,
        tenant: &TenantId,
        who: &Who,
        quota: &PlanIsolation,
        version: NewVersion,
        model: Staged,
        tokenizer: Option<Staged>,
    ) -> Result<Model> {
        self.install_holding(tenant, who, quota, version, model, tokenizer, ())
            .await
    }

    /// [`Self::install`], keeping `held` (the tenant's turn to upload, see [`Self::receive_upload`])
    /// until the install ends rather than until its caller stops waiting: a client hanging up again
    /// and again must not start one install after another.
    ///
    /// # Errors
    /// As [`Self::install`].
    #[expect(clippy::too_many_arguments, reason = "install's, and what it holds")]
    pub async fn install_holding(
        &self,
        tenant: &TenantId,
        who: &Who,
        quota: &PlanIsolation,
        version: NewVersion,
        model: Staged,
        tokenizer: Option<Staged>,
        held: impl Send + 'static,
    ) -> Result<Model> {
        let (hosting, tenant, who, quota) = (self.clone(), tenant.clone(), who.clone(), *quota);
        // A task does not inherit the request's row-security scope: it names the tenant again.
        tokio::spawn(async move {
            let _held = held;
            let install = hosting.install_to_the_end(&tenant, &who, &quota, version, model, tokenizer);
            plinth_store::row_security::within_tenant(&tenant, install).await
        })
        .await
        .map_err(HostingError::internal)?
    }

    async fn install_to_the_end(
        &self,
        tenant: &TenantId,
        who: &Who,
        quota: &PlanIsolation,
        version: NewVersion,
        model: Staged,
        tokenizer: Option<Staged>,
    ) -> Result<Model> {
        self.validate(&version, tokenizer.is_some())?;
        self.store
            .check_model_quota(tenant, &version.name, model.size(), quota)
            .await?;
        // Both of an upload's loads (checked, then served) are charged; once admitted, it finishes.
        self.admit_load(tenant)?;

        // Loading is the validation, from the staged files, before anything is stored: ONNX Runtime
        // parses the graph, the inputs and outputs must fit the task, and a warm-up must answer in time.
        let staged_files = ModelFiles {
            name: version.name.clone(),
            version: 0,
            task: version.task,
            labels: version.labels.clone(),
            model: model.path().to_path_buf(),
            tokenizer: tokenizer.as_ref().map(|t| t.path().to_path_buf()),
            platform: false,
        };
        let validated = self
            .load(
                tenant,
                quota.scheduling_weight,
                staged_files.clone(),
                Loading::Validate,
            )
            .await?
            .info()
            .clone();
        let signature = validated.signature();
        let described = serde_json::to_vec(&signature).map_or(usize::MAX, |json| json.len());
        if described > MAX_SIGNATURE_BYTES {
            return Err(HostingError::Refused {
                code: ErrorCode::InvalidModel,
                message: format!(
                    "the graph's {} inputs and {} outputs take {} KiB to describe; at most {} KiB",
                    signature.inputs.len(),
                    signature.outputs.len(),
                    described.div_ceil(1024),
                    MAX_SIGNATURE_BYTES >> 10
                ),
                retry_after: None,
            });
        }

        // From registering to serving, this replica's catalogue sync leaves the model to this upload.
        let _uploading = Uploading::mark(self, tenant, &version.name);
        // Into the shared content-addressed store and the registry: uploads and deletes take turns
        // here, so a delete never removes a file an upload is about to register.
        let (record, model_path, tokenizer_path) = {
            let _files = self.files_lock.lock().await;
            let registered = async {
                let model_path = self.store_file(&model, "onnx").await?;
                let tokenizer_path = match &tokenizer {
                    Some(staged) => Some(self.store_file(staged, "json").await?),
                    None => None,
                };
                let record = self
                    .store
                    .register_model(
                        tenant,
                        who,
                        &NewModel {
                            name: version.name.clone(),
                            task: task_name(version.task).to_owned(),
                            labels: version.labels.clone(),
                            sha256: model.sha256().to_owned(),
                            size_bytes: model.size(),
                            tokenizer_sha256: tokenizer.as_ref().map(|t| t.sha256().to_owned()),
                            signature,
                        },
                        quota,
                    )
                    .await?;
                // A delete of identical bytes through another replica may have removed the shared
                // copies between publishing and registering: now that the registry names them, they
                // stay.
                let stored = [
                    Some(format!("{}.onnx", model.sha256())),
                    tokenizer.as_ref().map(|t| format!("{}.json", t.sha256())),
                ];
                for name in stored.iter().flatten() {
                    // Registered already: a failure here is logged rather than undoing the upload.
                    if let Err(err) = self.files.ensure_published(name).await {
                        tracing::error!(file = %name, error = %err, "cannot check a model file is in shared storage");
                    }
                }
                Ok::<_, HostingError>((record, model_path, tokenizer_path))
            }
            .await;
            match registered {
                Ok(registered) => registered,
                Err(err) => {
                    let stored = [
                        Some(model.sha256().to_owned()),
                        tokenizer.as_ref().map(|t| t.sha256().to_owned()),
                    ];
                    self.remove_unused_files(stored.iter().flatten(), Shared::Remove)
                        .await;
                    return Err(err);
                }
            }
        };
        // Registered: the upload is kept whatever happens next, so it answers as uploaded (a failure
        // now would be sent again, as another version). Served at once if it loads from where it is
        // stored; if that load fails (a busy machine past the warm-up deadline, no turn in time), it
        // is described from the registry and loaded on its first call, as after a restart.
        let served = self
            .load(
                tenant,
                quota.scheduling_weight,
                ModelFiles {
                    version: record.version,
                    model: model_path,
                    tokenizer: tokenizer_path,
                    ..staged_files
                },
                Loading::Accepted,
            )
            .await;
        let uploaded = match served {
            Ok(served) => {
                let info = served.info().clone();
                if let Err(err) = self.serve_if_current(tenant, tier(quota), served).await {
                    // The catalogue sync serves it here once the registry answers again.
                    tracing::warn!(%tenant, model = %record.name, error = %err, "cannot check an uploaded model is current");
                }
                info
            }
            Err(err) => {
                metrics::counter!("plinth_model_load_failures_total").increment(1);
                tracing::warn!(%tenant, model = %record.name, version = record.version, error = %err, "an uploaded model did not load to serve; it loads on its first call");
                // As its check loaded it, numbered.
                let info = Model {
                    version: record.version,
                    ..validated
                };
                if let Err(err) = self.know_if_current(&record, info.clone()).await {
                    tracing::warn!(%tenant, model = %record.name, error = %err, "cannot check an uploaded model is current");
                }
                info
            }
        };
        Ok(uploaded)
    }

    /// Deletes a tenant model, every version: it stops serving at once, and its files go once no live
    /// version of any tenant uses them. Usage history keeps its name.
    ///
    /// # Errors
    /// `insufficient_scope` for a platform model; the registry's `not_found`.
    pub async fn delete_model(&self, tenant: &TenantId, who: &Who, name: &str) -> Result<()> {
        if self.catalog.is_platform(name) {
            return Err(HostingError::Refused {
                code: ErrorCode::InsufficientScope,
                message: "platform models cannot be deleted by tenants".into(),
                retry_after: None,
            });
        }
        let _files = self.files_lock.lock().await;
        self.store.delete_model(tenant, who, name).await?;
        self.catalog.remove_tenant(tenant, name);
        let files = self.store.model_files(tenant, name).await?;
        self.remove_unused_files(files.iter(), Shared::Remove).await;
        Ok(())
    }

    /// Deletes one version of a tenant model (not its newest): it stops serving at once, and its files
    /// go once nothing uses them.
    ///
    /// # Errors
    /// The registry's refusal: `not_found`, or `validation_failed` for the newest version.
    pub async fn delete_version(&self, tenant: &TenantId, who: &Who, name: &str, version: u32) -> Result<()> {
        let _files = self.files_lock.lock().await;
        let record = self
            .store
            .delete_model_version(tenant, who, name, version)
            .await?;
        self.catalog.remove_version(tenant, name, version);
        let files: Vec<String> = std::iter::once(record.sha256)
            .chain(record.tokenizer_sha256)
            .collect();
        self.remove_unused_files(files.iter(), Shared::Remove).await;
        Ok(())
    }

    /// The model `name` as `tenant` sees it: the platform's or its own, loaded again if it was let go
    /// (in a turn its `plan` weighs in).
    ///
    /// # Errors
    /// `not_found` when there is no such model; `unavailable` (retry shortly) while the server has
    /// just started and is still reading tenants' models; a load's failure.
    pub async fn find(
        &self,
        tenant: &TenantId,
        plan: &PlanIsolation,
        name: &str,
    ) -> Result<Arc<LoadedModel>> {
        if let Some(model) = self.catalog.find(tenant, name) {
            return Ok(model);
        }
        if self.catalog.serves(tenant, name) {
            // Not loaded since start-up, or let go of to bound memory: loaded for this call.
            return self.reload(tenant, plan, name).await;
        }
        Err(self.unknown(name))
    }

    /// The model `name` as `tenant` sees it (the platform's or its own), described whether it is
    /// loaded or not: nothing is loaded to describe it.
    ///
    /// # Errors
    /// As [`Self::find`]: `not_found`, or `unavailable` while the server is still reading tenants'
    /// models.
    pub fn describe(&self, tenant: &TenantId, name: &str) -> Result<Model> {
        self.catalog
            .describe(tenant, name)
            .ok_or_else(|| self.unknown(name))
    }

    /// Why a model this replica neither serves nor describes is not found.
    fn unknown(&self, name: &str) -> HostingError {
        if !self.catalog.knows_tenant_models() {
            // Just started: tenants' models are read in the background, and this one may be among them.
            return HostingError::Refused {
                code: ErrorCode::Unavailable,
                message: "the server has just started and is still reading models; retry shortly".into(),
                retry_after: Some(Duration::from_secs(2)),
            };
        }
        no_model(name)
    }

    /// Whether `name` is one of the platform's own models (what plugins may call).
    #[must_use]
    pub fn is_platform(&self, name: &str) -> bool {
        self.catalog.is_platform(name)
    }

    /// Waits for a turn to load a version: behind a load of the same version (the caller then
    /// usually finds it loaded), then behind the tenant's other loads (see [`gate`]).
    async fn turns_to_load(
        &self,
        tenant: &TenantId,
        name: &str,
        version: u32,
    ) -> Result<(gate::Turn<gate::Version>, gate::Turn<TenantId>)> {
        let key = (tenant.clone(), name.to_owned(), version);
        tokio::time::timeout(LOAD_WAIT, async {
            let version_turn = self.load_gate.versions.turn(key).await;
            (version_turn, self.load_gate.tenants.turn(tenant.clone()).await)
        })
        .await
        .map_err(|_| loading_others())
    }

    /// Loads a tenant's newest version of `name` that is not loaded (not called since start-up, or let
    /// go to bound memory), and serves it.
    ///
    /// # Errors
    /// `not_found` once the model is gone; `unavailable` (retry) when a newer version came while this
    /// one loaded; a load's failure (kept for [`FAILED_LOAD_KEPT`] and answered without trying again).
    pub async fn reload(
        &self,
        tenant: &TenantId,
        plan: &PlanIsolation,
        name: &str,
    ) -> Result<Arc<LoadedModel>> {
        let versions = self.store.model_versions(tenant, name).await?;
        let Some(&version) = versions.last() else {
            return Err(no_model(name));
        };
        let key = (tenant.clone(), name.to_owned(), version);
        self.failed_recently(&key)?;
        let (_version_turn, tenant_turn) = self.turns_to_load(tenant, name, version).await?;
        // Loaded, or found not to load, by a call this one waited for.
        if let Some(loaded) = self.catalog.find(tenant, name) {
            return Ok(loaded);
        }
        self.failed_recently(&key)?;
        let record = self.store.model_version(tenant, name, version).await?;
        let model = match self
            .load_accepted(key, plan.scheduling_weight, &record, tenant_turn)
            .await
        {
            Err(err) if err.code() == ErrorCode::NotFound => {
                return Err(self
                    .newest_moved(tenant, name, "the version being loaded was deleted meanwhile")
                    .await);
            }
            loaded => loaded?,
        };
        // Another call may have loaded it while this one waited for its turn: one copy is served.
        if let Some(loaded) = self.catalog.find(tenant, name) {
            return Ok(loaded);
        }
        if !self.serve_if_current(tenant, tier(plan), model.clone()).await? {
            return Err(self
                .newest_moved(tenant, name, "a newer version was uploaded while this one loaded")
                .await);
        }
        metrics::counter!("plinth_tenant_models_reloaded_total").increment(1);
        Ok(model)
    }

    /// Why a load of `name`'s newest version does not serve, when its newest version changed while it
    /// loaded (`why`): the model is gone (`not_found`), or has another newest version to retry for.
    async fn newest_moved(&self, tenant: &TenantId, name: &str, why: &str) -> HostingError {
        match self.store.model_versions(tenant, name).await {
            Ok(versions) if versions.is_empty() => no_model(name),
            Ok(_) => HostingError::Refused {
                code: ErrorCode::Unavailable,
                message: format!("{why} (model `{name}`); retry"),
                retry_after: Some(Duration::from_secs(1)),
            },
            Err(err) => err.into(),
        }
    }

    /// Whether this version's load failed recently, so that its calls are answered with the failure
    /// (a model's `ready` is then false).
    #[must_use]
    pub fn load_failed(&self, tenant: &TenantId, name: &str, version: u32) -> bool {
        self.failed_recently(&(tenant.clone(), name.to_owned(), version))
            .is_err()
    }

    /// The failure of this version's last load, if it was recent: answered again rather than tried.
    fn failed_recently(&self, version: &gate::Version) -> Result<()> {
        let failed = self.failed_loads.lock().unwrap_or_else(PoisonError::into_inner);
        match failed.get(version) {
            Some((at, reason)) if at.elapsed() < FAILED_LOAD_KEPT => Err(HostingError::Refused {
                code: ErrorCode::InvalidModel,
                message: format!("this version failed to load: {reason}"),
                retry_after: Some(FAILED_LOAD_KEPT.saturating_sub(at.elapsed())),
            }),
            _ => Ok(()),
        }
    }

    /// Loads a version accepted before, holding the tenant's turn; a failure as a model is remembered
    /// (see [`FAILED_LOAD_KEPT`]).
    async fn load_accepted(
        &self,
        version: gate::Version,
        weight: u32,
        record: &ModelRecord,
        tenant_turn: gate::Turn<TenantId>,
    ) -> Result<Arc<LoadedModel>> {
        self.admit_load(&version.0)?;
        let loaded = async {
            let files = self.fetch_files(record).await?;
            self.load_holding(&version.0, weight, files, Loading::Accepted, tenant_turn)
                .await
        };
        let model = match loaded.await {
            Ok(model) => model,
            Err(err) if err.code() == ErrorCode::InvalidModel => {
                self.remember_failure(version, &err);
                return Err(err);
            }
            // Deleted while it loaded (here or through another replica), its files with it.
            Err(err) if err.code() == ErrorCode::Internal => {
                let (tenant, name, number) = &version;
                return match self.store.model_version(tenant, name, *number).await {
                    Err(StoreError::NotFound(_)) => Err(HostingError::Refused {
                        code: ErrorCode::NotFound,
                        message: format!("no version {number} of a model named `{name}`"),
                        retry_after: None,
                    }),
                    _ => Err(err),
                };
            }
            Err(err) => return Err(err),
        };
        // Registered before signatures were kept (or with one this runtime reads otherwise): described
        // as loaded from now on.
        self.store_signature(record, &model).await;
        Ok(model)
    }

    /// Whether `tenant` may load now, within its budget of loading time on this replica.
    fn admit_load(&self, tenant: &TenantId) -> Result<()> {
        self.load_budget.admit(tenant, Instant::now()).map_err(|wait| {
            metrics::counter!("plinth_tenant_model_loads_refused_total").increment(1);
            // In whole seconds, rounded up: a client that waits as told is let in.
            let wait = Duration::from_secs(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
                .max(Duration::from_secs(1));
            HostingError::Refused {
                code: ErrorCode::RateLimited,
                message: format!(
                    "this server has spent as much time loading your models as it spends on one tenant's \
                     (models not called for a while are let go, and loaded again when called); retry in \
                     {} s",
                    wait.as_secs()
                ),
                retry_after: Some(wait),
            }
        })
    }

    fn remember_failure(&self, version: gate::Version, err: &HostingError) {
        let mut failed = self.failed_loads.lock().unwrap_or_else(PoisonError::into_inner);
        failed.retain(|_, (at, _)| at.elapsed() < FAILED_LOAD_KEPT);
        failed.insert(version, (Instant::now(), err.to_string()));
    }

    /// An older version of a tenant model, loaded and kept beside the newest (pinned); `None` when the
    /// registry has no such version, or it was deleted while it loaded.
    ///
    /// # Errors
    /// A load's failure; the registry unreadable.
    pub async fn pinned_version(
        &self,
        tenant: &TenantId,
        plan: &PlanIsolation,
        name: &str,
        version: u32,
    ) -> Result<Option<Arc<LoadedModel>>> {
        if let Some(model) = self.catalog.find_version(tenant, name, version) {
            return Ok(Some(model));
        }
        let key = (tenant.clone(), name.to_owned(), version);
        self.failed_recently(&key)?;
        let (_version_turn, tenant_turn) = self.turns_to_load(tenant, name, version).await?;
        // Loaded, or found not to load, by a call this one waited for.
        if let Some(model) = self.catalog.find_version(tenant, name, version) {
            return Ok(Some(model));
        }
        self.failed_recently(&key)?;
        let record = match self.store.model_version(tenant, name, version).await {
            Err(StoreError::NotFound(_)) => return Ok(None),
            other => other?,
        };
        // Loads take turns; one that waited may find the version loaded by now.
        let model = self
            .load_accepted(key, plan.scheduling_weight, &record, tenant_turn)
            .await?;
        if let Some(loaded) = self.catalog.find_version(tenant, name, version) {
            return Ok(Some(loaded));
        }
        // Kept only if the version was not deleted while it loaded.
        let _files = self.files_lock.lock().await;
        match self.store.model_version(tenant, name, version).await {
            Err(StoreError::NotFound(_)) => return Ok(None),
            other => other?,
        };
        self.catalog.add_pinned(tenant, model.clone(), tier(plan));
        Ok(Some(model))
    }

    /// A version of a tenant's model as the registry describes it, loaded or not; `None` when the
    /// registry keeps no such version. Only a version registered before signatures were kept is
    /// loaded to describe it.
    ///
    /// # Errors
    /// The registry unreadable; that load's failure.
    pub async fn describe_version(
        &self,
        tenant: &TenantId,
        plan: &PlanIsolation,
        name: &str,
        version: u32,
    ) -> Result<Option<Model>> {
        if let Some(model) = self.catalog.find_version(tenant, name, version) {
            return Ok(Some(model.info().clone()));
        }
        let record = match self.store.model_version(tenant, name, version).await {
            Err(StoreError::NotFound(_)) => return Ok(None),
            other => other?,
        };
        match sync::describe(&record, self.runs_on()) {
            Some(info) => Ok(Some(info)),
            None => Ok(self
                .pinned_version(tenant, plan, name, version)
                .await?
                .map(|model| model.info().clone())),
        }
    }

    /// Serves a loaded tenant model if it is still its model's newest live version: a delete or a
    /// newer upload may have come while it loaded, and must not be undone by it. It is kept loaded
    /// as the model of a tenant of `tier`.
    async fn serve_if_current(&self, tenant: &TenantId, tier: Tier, model: Arc<LoadedModel>) -> Result<bool> {
        let _files = self.files_lock.lock().await;
        let versions = self.store.model_versions(tenant, &model.info().name).await?;
        if versions.last() != Some(&model.info().version) {
            return Ok(false);
        }
        self.catalog.add_tenant(tenant, model, tier);
        Ok(true)
    }

    /// The files of a registered model version, fetched from the replicas' shared storage if this
    /// replica does not have them yet (their hashes checked).
    async fn fetch_files(&self, record: &ModelRecord) -> Result<ModelFiles> {
        let task = registry_task(&record.task)
            .ok_or_else(|| HostingError::internal("unknown task in the model registry"))?;
        let fetch = |sha256: String, extension: &'static str| async move {
            self.files
                .fetch(&format!("{sha256}.{extension}"), &sha256)
                .await
                .map_err(|err| HostingError::internal(err))
        };
        let tokenizer = match &record.tokenizer_sha256 {
            Some(sha256) => Some(fetch(sha256.clone(), "json").await?),
            None => None,
        };
        Ok(ModelFiles {
            name: record.name.clone(),
            version: record.version,
            task,
            labels: record.labels.clone(),
            model: fetch(record.sha256.clone(), "onnx").await?,
            tokenizer,
            platform: false,
        })
    }
}

/// The tier whose share of the loaded models a tenant on `plan` takes (see [`Catalog`]): heavier
/// plans than the free one are kept before it. Keyed by weight, as the turn to load is: a plan an
/// operator weighs like the free one is kept like it.
fn tier(plan: &PlanIsolation) -> Tier {
    if plan.scheduling_weight > PlanIsolation::FREE.scheduling_weight {
        Tier::Paid
    } else {
        Tier::Free
    }
}

/// The refusal of a call to a tenant model that no longer exists.
fn no_model(name: &str) -> HostingError {
    HostingError::Refused {
        code: ErrorCode::NotFound,
        message: format!("no model named `{name}`"),
        retry_after: None,
    }
}

/// The registry's name of a task.
fn task_name(task: Task) -> &'static str {
    match task {
        Task::TextClassification => "text-classification",
        Task::Embedding => "embedding",
        Task::Raw => "raw",
    }
}

/// The task the registry names (see [`task_name`]); `None` for a name this build does not know.
fn registry_task(name: &str) -> Option<Task> {
    [Task::TextClassification, Task::Embedding, Task::Raw]
        .into_iter()
        .find(|task| task_name(*task) == name)
}

/// A tenant's upload being received, for as long as it lives (see [`Hosting::receive_upload`]).
#[derive(Debug)]
pub struct Receiving {
    set: Arc<Mutex<HashSet<TenantId>>>,
    tenant: TenantId,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.tenant);
    }
}

/// Marks a model as being uploaded through this replica for as long as it lives.
struct Uploading {
    /// Uploads of each model under way here: two of one name (an upload and a deploy, say) may
    /// overlap, and the first to end must not unmark the other.
    counts: Arc<Mutex<HashMap<(TenantId, String), usize>>>,
    key: (TenantId, String),
}

impl Uploading {
    fn mark(hosting: &Hosting, tenant: &TenantId, name: &str) -> Self {
        let key = (tenant.clone(), name.to_owned());
        *hosting
            .uploading
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default() += 1;
        Self {
            counts: hosting.uploading.clone(),
            key,
        }
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::PathBuf;

    use plinth_core::api::SignupRequest;
    use plinth_inference::EngineSettings;
    use plinth_store::DatabaseSettings;

    use super::*;

    #[test]
    fn an_internal_fault_says_where_it_was_met() {
        let fault = std::fs::read("/nonexistent/plinth")
            .map_err(|err| HostingError::internal(err))
            .unwrap_err();
        let line = line!() - 2;
        assert!(
            fault
                .to_string()
                .ends_with(&format!("(at {}:{line}:28)", file!())),
            "{fault}"
        );
    }

    /// A graph that answers one row (made by `tests/fixtures/make_models.py`, which `scripts/test.sh`
    /// runs).
    fn model_bytes() -> Vec<u8> {
        std::fs::read(plinth_inference::cache_dir().join("test-models/one-row.onnx"))
            .expect("tests/fixtures/make_models.py's models (scripts/test.sh makes them)")
    }

    async fn hosting(dir: &std::path::Path) -> (Hosting, TenantId) {
        let store = Store::connect(&DatabaseSettings::sqlite_in(dir)).await.unwrap();
        store.migrate().await.unwrap();
        let session = store
            .signup(
                &SignupRequest {
                    email: "owner@example.com".into(),
                    password: "correct horse battery".into(),
                    tenant_name: "Acme".into(),
                },
                &Who::internal(Who::OPERATOR),
            )
            .await
            .unwrap();
        let engine = Engine::new(EngineSettings {
            ort_dylib: std::env::var_os("PLINTH_ORT_DYLIB")
                .map_or_else(plinth_inference::fetched_ort_dylib, PathBuf::from),
            ..EngineSettings::default()
        })
        .expect("ONNX Runtime (scripts/setup.sh fetches it)");
        let files = dir.join("models");
        std::fs::create_dir_all(&files).unwrap();
        let catalog = Arc::new(Catalog::with_loaded_tenant_models(usize::MAX));
        (
            Hosting::new(store, catalog, engine, Blobs::local(files)),
            session.tenant.id,
        )
    }

    /// [`hosting`] keeping at most `bound` tenant models loaded.
    async fn bounded_hosting(dir: &std::path::Path, bound: usize) -> (TenantId, Hosting) {
        let (unbounded, tenant) = hosting(dir).await;
        let bounded = Hosting::new(
            unbounded.store.clone(),
            Arc::new(Catalog::with_loaded_tenant_models(bound)),
            unbounded.engine.clone(),
            Blobs::local(dir.join("models")),
        );
        (tenant, bounded)
    }

    fn version(name: &str) -> NewVersion {
        NewVersion {
            name: name.into(),
            task: Task::Raw,
            labels: Vec::new(),
        }
    }

    /// The files of a model version called `name` served as a raw graph from `model`.
    fn raw_files(name: &str, version: u32, model: &std::path::Path) -> ModelFiles {
        ModelFiles {
            name: name.into(),
            version,
            task: Task::Raw,
            labels: Vec::new(),
            model: model.to_path_buf(),
            tokenizer: None,
            platform: false,
        }
    }

    /// Signups are free: loads queued by any number of fresh accounts, each within its own budget
    /// and owing nothing, do not go ahead of a paying tenant's load, even one that has just loaded;
    /// and every load queued gets its turn in the end.
    #[tokio::test]
    async fn fresh_free_accounts_queuing_loads_do_not_go_ahead_of_a_paying_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, paying) = hosting(dir.path()).await;
        let staged = hosting.stage_bytes(&model_bytes()).await.unwrap();
        let files = raw_files("queued", 1, staged.path());
        // The paying tenant has just loaded for 5 s; a load of someone else's holds the turn.
        hosting
            .load_budget
            .charge(&paying, Duration::from_secs(5), Instant::now());
        let held = hosting.load_budget.turn(&TenantId::new(), 1).await.unwrap();
        let mut loads = Vec::new();
        let mut queue = |tenant: TenantId, weight: u32| {
            let (hosting, files) = (hosting.clone(), files.clone());
            loads.push(tokio::spawn(async move {
                hosting
                    .load(&tenant, weight, files, Loading::Accepted)
                    .await
                    .is_ok()
            }));
        };
        let waiting = || hosting.load_budget.waiting();
        let sybils: Vec<TenantId> = (0..8).map(|_| TenantId::new()).collect();
        for (tenant, weight) in sybils
            .iter()
            .map(|sybil| (sybil, PlanIsolation::FREE.scheduling_weight))
            .chain([(&paying, 4)])
        {
            let before = waiting();
            queue(tenant.clone(), weight);
            while waiting() == before {
                tokio::task::yield_now().await;
            }
        }

        drop(held);
        for load in loads {
            assert!(load.await.unwrap(), "every load queued got its turn");
        }
        // After the load holding it, the turn went to the paying tenant's, then to the free accounts
        // owing nothing, in the order they asked (the order loads were answered in may differ: the
        // next load starts as the last hands the turn on, before its caller hears of it).
        let started = hosting.load_budget.started();
        assert_eq!(started[1], paying);
        assert_eq!(started[2..], sybils);
    }

    /// A tenant loading version after version has one load at a time in the turn every tenant
    /// shares: when its load ends, the turn goes to another tenant's load already waiting before the
    /// tenant's next load may ask for it, even when the tenant would rank first (it owes less).
    #[tokio::test]
    async fn a_tenants_next_load_does_not_ask_for_the_turn_before_its_last_one_hands_it_on() {
        /// Counts the loads still waiting for a turn when the tenant's line is let go.
        struct LineLetGo(Hosting, Arc<Mutex<Option<usize>>>);
        impl Drop for LineLetGo {
            fn drop(&mut self) {
                *self.1.lock().unwrap() = Some(self.0.load_budget.waiting());
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let staged = hosting.stage_bytes(&model_bytes()).await.unwrap();
        let files = raw_files("versions", 1, staged.path());
        // Another tenant, owing a minute of loading, waits behind a load holding the turn; then the
        // tenant's load, holding its line.
        let other = TenantId::new();
        hosting
            .load_budget
            .charge(&other, Duration::from_secs(15), Instant::now());
        let held = hosting.load_budget.turn(&TenantId::new(), 1).await.unwrap();
        let others_load = tokio::spawn({
            let (hosting, files) = (hosting.clone(), files.clone());
            async move { hosting.load(&other, 1, files, Loading::Accepted).await }
        });
        while hosting.load_budget.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let let_go = Arc::new(Mutex::new(None));
        let line = LineLetGo(hosting.clone(), let_go.clone());
        let tenants_load = tokio::spawn({
            let hosting = hosting.clone();
            async move {
                hosting
                    .load_holding(&tenant, 1, files, Loading::Accepted, line)
                    .await
            }
        });
        while hosting.load_budget.waiting() < 2 {
            tokio::task::yield_now().await;
        }

        // Owing nothing, the tenant's load goes first; when it ends, the other's has the turn before
        // the tenant's line is let go.
        drop(held);
        tenants_load.await.unwrap().unwrap();
        assert_eq!(*let_go.lock().unwrap(), Some(0));
        others_load.await.unwrap().unwrap();
    }

    /// An upload is kept once registered, so it answers as uploaded whatever its serving load does:
    /// a load that fails then (past the warm-up deadline on a busy machine, no turn in time) leaves
    /// the model described and loaded on its first call, where a failure would have the client send
    /// it again as another version of its quota.
    #[tokio::test]
    async fn an_upload_whose_serving_load_fails_is_kept_and_loads_on_its_first_call() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let who = Who::internal(Who::OPERATOR);
        let bytes = model_bytes();
        let staged = hosting.stage_bytes(&bytes).await.unwrap();
        // The copy the serving load reads (the check reads the staged one) is not a graph.
        let stored = dir
            .path()
            .join("models")
            .join(format!("{}.onnx", staged.sha256()));
        std::fs::write(&stored, b"not a graph").unwrap();

        let uploaded = hosting
            .install(&tenant, &who, &PlanIsolation::FREE, version("kept"), staged, None)
            .await
            .expect("registered, so uploaded");
        assert_eq!(uploaded.version, 1);
        assert_eq!(hosting.store.model_versions(&tenant, "kept").await.unwrap(), [1]);
        assert_eq!(
            hosting.catalog.describe(&tenant, "kept").as_ref(),
            Some(&uploaded)
        );
        assert_eq!(hosting.catalog.loaded_tenant_models(), 0);

        std::fs::write(&stored, &bytes).unwrap();
        let loaded = hosting.find(&tenant, &PlanIsolation::FREE, "kept").await.unwrap();
        assert_eq!(loaded.info(), &uploaded);
        assert_eq!(hosting.catalog.loaded_tenant_models(), 1);
    }

    /// A replica starting up lists every tenant model with its inputs and outputs, read from the
    /// registry, and loads none until it is called: start-up does not grow with the models tenants
    /// keep. A version registered before signatures were kept is loaded once, and its signature kept.
    #[tokio::test]
    async fn a_replica_starting_up_describes_tenant_models_and_loads_each_on_its_first_call() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let who = Who::internal(Who::OPERATOR);
        let bytes = model_bytes();
        for name in ["first", "second"] {
            let staged = hosting.stage_bytes(&bytes).await.unwrap();
            hosting
                .install(&tenant, &who, &PlanIsolation::FREE, version(name), staged, None)
                .await
                .unwrap();
        }
        let uploaded = hosting.catalog.visible_to(&tenant);
        let replica = async || {
            let replica = Hosting::new(
                hosting.store.clone(),
                Arc::new(Catalog::with_loaded_tenant_models(usize::MAX)),
                hosting.engine.clone(),
                Blobs::local(dir.path().join("models")),
            );
            replica.spawn_loading().await.unwrap();
            assert!(replica.catalog.knows_tenant_models());
            assert_eq!(replica.catalog.visible_to(&tenant), uploaded);
            replica
        };

        let started = replica().await;
        assert_eq!(started.catalog.loaded_tenant_models(), 0);
        assert_eq!(
            started.catalog.describe(&tenant, "second").as_ref(),
            uploaded.get(1)
        );
        let first = started
            .find(&tenant, &PlanIsolation::FREE, "first")
            .await
            .unwrap();
        assert_eq!(first.info(), &uploaded[0]);
        assert_eq!(started.catalog.loaded_tenant_models(), 1);

        // As if `second` had been registered before signatures were kept.
        let db = sea_orm::Database::connect(format!("sqlite://{}", dir.path().join("plinth.db").display()))
            .await
            .unwrap();
        sea_orm::ConnectionTrait::execute_unprepared(
            &db,
            "UPDATE models SET signature = NULL WHERE name = 'second'",
        )
        .await
        .unwrap();
        assert_eq!(replica().await.catalog.loaded_tenant_models(), 1);
        assert_eq!(replica().await.catalog.loaded_tenant_models(), 0);
    }

    /// A replica starting up reads the registry only once an upload or delete in progress through it
    /// has finished: a model deleted meanwhile is not brought back by an older reading.
    #[tokio::test]
    async fn a_replica_starting_up_lets_a_delete_in_progress_finish_first() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let who = Who::internal(Who::OPERATOR);
        for name in ["kept", "deleted"] {
            let staged = hosting.stage_bytes(&model_bytes()).await.unwrap();
            hosting
                .install(&tenant, &who, &PlanIsolation::FREE, version(name), staged, None)
                .await
                .unwrap();
        }
        let replica = Hosting::new(
            hosting.store.clone(),
            Arc::new(Catalog::with_loaded_tenant_models(usize::MAX)),
            hosting.engine.clone(),
            Blobs::local(dir.path().join("models")),
        );
        // A delete through the replica, in progress as it starts (`delete_model`, step by step).
        let delete = replica.files_lock.lock().await;
        let starting = replica.spawn_loading();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!replica.catalog.knows_tenant_models());
        // (Its catalogue has nothing to remove yet: had start-up read the registry before the delete,
        // nothing would take `deleted` out of it again.)
        replica
            .store
            .delete_model(&tenant, &who, "deleted")
            .await
            .unwrap();
        drop(delete);
        starting.await.unwrap();
        assert!(replica.catalog.knows_tenant_models());
        assert!(replica.catalog.describe(&tenant, "kept").is_some());
        assert_eq!(replica.catalog.describe(&tenant, "deleted"), None);
    }

    /// One tenant loading many models lets its own go past a quarter of the bound, not other
    /// tenants'; a version that failed to load is answered with that failure for a while rather than
    /// loaded again at every call.
    #[tokio::test]
    async fn a_tenant_with_many_models_lets_its_own_go_and_a_failed_load_is_not_retried_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (tenant, hosting) = bounded_hosting(dir.path(), 4).await;
        let who = Who::internal(Who::OPERATOR);
        let other = hosting
            .store
            .signup(
                &SignupRequest {
                    email: "other@example.com".into(),
                    password: "correct horse battery".into(),
                    tenant_name: "Other".into(),
                },
                &who,
            )
            .await
            .unwrap()
            .tenant
            .id;
        let quota = PlanIsolation {
            max_models: 10,
            ..PlanIsolation::FREE
        };
        let bytes = model_bytes();
        let upload = async |tenant: &TenantId, name: &str| {
            let staged = hosting.stage_bytes(&bytes).await.unwrap();
            hosting
                .install(tenant, &who, &quota, version(name), staged, None)
                .await
                .unwrap();
        };
        upload(&other, "theirs").await;
        for name in ["a", "b", "c", "d", "e"] {
            upload(&tenant, name).await;
        }
        assert!(hosting.catalog.find(&other, "theirs").is_some());
        assert_eq!(hosting.catalog.loaded_tenant_models(), 2);
        // Its first model, let go, loads again on call, and its other one goes.
        hosting.find(&tenant, &PlanIsolation::FREE, "a").await.unwrap();
        assert!(hosting.catalog.find(&tenant, "e").is_none());

        let key = (tenant.clone(), "e".to_owned(), 1);
        hosting.remember_failure(
            key.clone(),
            &HostingError::Inference(InferenceError::InvalidModel("no kernel for an operator".into())),
        );
        assert!(hosting.load_failed(&tenant, "e", 1));
        let refused = hosting
            .find(&tenant, &PlanIsolation::FREE, "e")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), ErrorCode::InvalidModel);
        assert!(refused.to_string().contains("no kernel"), "{refused}");
        assert!(hosting.catalog.find(&tenant, "e").is_none());
        hosting.failed_loads.lock().unwrap().get_mut(&key).unwrap().0 -= FAILED_LOAD_KEPT;
        assert!(!hosting.load_failed(&tenant, "e", 1));
        hosting.find(&tenant, &PlanIsolation::FREE, "e").await.unwrap();
    }

    /// Signups are free: a crowd of free accounts calling their models in turn lets go of each
    /// other's, newest versions and pinned ones alike, not a paying tenant's, which would otherwise be
    /// the least recently used; paying tenants' models still take the place of the least recently
    /// used.
    #[tokio::test]
    async fn a_crowd_of_free_accounts_calling_models_in_turn_keeps_a_paying_tenants_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, _) = hosting(dir.path()).await;
        let staged = hosting.stage_bytes(&model_bytes()).await.unwrap();
        // The newest version, and an older one called by number.
        let [model, older] = [1, 2].map(|version| {
            hosting
                .engine
                .load(&raw_files("m", version, staged.path()))
                .unwrap()
        });
        // Four loaded at most: three for the free tier together.
        let catalog = Catalog::with_loaded_tenant_models(4);
        let paying = TenantId::new();
        catalog.add_tenant(&paying, model.clone(), Tier::Paid);
        catalog.add_pinned(&paying, older.clone(), Tier::Paid);
        let crowd: Vec<TenantId> = (0..20).map(|_| TenantId::new()).collect();
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let evicted = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            for free in crowd.iter().chain(&crowd) {
                catalog.add_tenant(free, model.clone(), Tier::Free);
                catalog.add_pinned(free, older.clone(), Tier::Free);
            }
        });
        // Each of the crowd's 40 newest and 40 pinned versions was let go in turn but the last
        // three and twelve, every one counted.
        let evicted: Vec<(String, u64)> = evicted
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "plinth_tenant_models_evicted_total")
            .map(|(key, _, _, value)| {
                let version = key.key().labels().map(|l| l.value().to_owned()).collect();
                let metrics_util::debugging::DebugValue::Counter(count) = value else {
                    panic!("a counter");
                };
                (version, count)
            })
            .collect();
        assert_eq!(evicted.len(), 2, "{evicted:?}");
        assert!(evicted.contains(&("newest".to_owned(), 37)), "{evicted:?}");
        assert!(evicted.contains(&("pinned".to_owned(), 28)), "{evicted:?}");
        assert!(catalog.find(&paying, "m").is_some());
        assert!(catalog.find_version(&paying, "m", 2).is_some());
        assert_eq!(catalog.loaded_tenant_models(), 4);
        // The crowd's most recent three newest versions (and twelve pinned ones, of sixteen) are kept.
        let kept = |tenants: &[TenantId]| {
            tenants
                .iter()
                .filter(|free| catalog.find(free, "m").is_some())
                .count()
        };
        assert_eq!((kept(&crowd[17..]), kept(&crowd[..17])), (3, 0));
        let pinned = catalog.pinned_versions();
        assert_eq!(pinned.len(), 1 + 12);
        assert!(pinned.iter().any(|(tenant, _, _)| *tenant == paying));

        // Paying tenants' models take the place of the least recently used, paying or free: the
        // first paying tenant's (used before the crowd's last three), then the crowd's.
        let heavier: Vec<TenantId> = (0..4).map(|_| TenantId::new()).collect();
        for tenant in &heavier {
            catalog.add_tenant(tenant, model.clone(), Tier::Paid);
        }
        assert!(catalog.find(&paying, "m").is_none());
        assert_eq!(kept(&crowd), 0);
        assert_eq!(kept(&heavier), 4);
    }

    /// A paying tenant's upload stays loaded while free accounts upload theirs past the bound: each
    /// upload is kept in the tier of its tenant's plan.
    #[tokio::test]
    async fn uploads_are_kept_loaded_in_the_tier_of_their_tenants_plan() {
        let dir = tempfile::tempdir().unwrap();
        let (paying, hosting) = bounded_hosting(dir.path(), 4).await;
        let who = Who::internal(Who::OPERATOR);
        let bytes = model_bytes();
        let upload = async |tenant: &TenantId, plan: &PlanIsolation| {
            let staged = hosting.stage_bytes(&bytes).await.unwrap();
            hosting
                .install(tenant, &who, plan, version("m"), staged, None)
                .await
                .unwrap();
        };
        let pro = PlanIsolation {
            scheduling_weight: 4,
            ..PlanIsolation::FREE
        };
        upload(&paying, &pro).await;
        for at in 0..5 {
            let free = hosting
                .store
                .signup(
                    &SignupRequest {
                        email: format!("free-{at}@example.com"),
                        password: "correct horse battery".into(),
                        tenant_name: "Free".into(),
                    },
                    &who,
                )
                .await
                .unwrap()
                .tenant
                .id;
            upload(&free, &PlanIsolation::FREE).await;
        }
        assert_eq!(hosting.catalog.loaded_tenant_models(), 4);
        assert!(hosting.catalog.find(&paying, "m").is_some());
    }

    /// A client that hangs up does not stop its upload halfway: stopped between storing its files and
    /// registering them, it would leave files no version names and no quota counts. Nor does it get
    /// its turn to upload back before the upload ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_whose_caller_stops_waiting_runs_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let who = Who::internal(Who::OPERATOR);
        let staged = hosting.stage_bytes(&model_bytes()).await.unwrap();
        // Held here: the upload, checked and loaded, waits to store its files.
        let files = hosting.files_lock.clone().lock_owned().await;
        let receiving = hosting.receive_upload(&tenant).unwrap();
        let mut upload = Box::pin(hosting.install_holding(
            &tenant,
            &who,
            &PlanIsolation::FREE,
            version("scorer"),
            staged,
            None,
            receiving,
        ));
        let waiting_for_the_files = async {
            while !hosting
                .uploading
                .lock()
                .unwrap()
                .contains_key(&(tenant.clone(), "scorer".to_owned()))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::select! {
            outcome = &mut upload => panic!("the upload ended before it stored its files: {outcome:?}"),
            () = waiting_for_the_files => {}
        }
        // The caller stops waiting; the tenant's turn to upload stays with the upload, which then
        // stores its files.
        drop(upload);
        assert!(hosting.receive_upload(&tenant).is_err());
        drop(files);
        let registered = async {
            loop {
                if let Ok(record) = hosting.store.model_version(&tenant, "scorer", 1).await {
                    return record;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let record = tokio::time::timeout(Duration::from_secs(20), registered)
            .await
            .expect("the upload stopped with its caller");
        let stored = dir.path().join("models").join(format!("{}.onnx", record.sha256));
        assert!(stored.exists());
        let turn_back = async {
            while hosting.receive_upload(&tenant).is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), turn_back)
            .await
            .expect("the tenant's turn to upload came back when the upload ended");
    }

    /// Without any HTTP: an upload is checked, stored by its hash, served, held to its plan's quota,
    /// and gone with its files once deleted; a refused one leaves nothing behind.
    #[tokio::test]
    async fn an_upload_is_served_held_to_its_quota_and_leaves_no_files_once_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (hosting, tenant) = hosting(dir.path()).await;
        let who = Who::internal(Who::OPERATOR);
        let bytes = model_bytes();
        let quota = PlanIsolation {
            max_models: 1,
            ..PlanIsolation::FREE
        };

        let upload = async |name: &str| {
            let staged = hosting.stage_bytes(&bytes).await.unwrap();
            hosting
                .install(&tenant, &who, &quota, version(name), staged, None)
                .await
        };
        let refused = upload("Not A Name").await.unwrap_err();
        assert!(
            matches!(
                refused,
                HostingError::Refused {
                    code: ErrorCode::ValidationFailed,
                    ..
                }
            ),
            "{refused:?}"
        );
        let staged: Vec<_> = std::fs::read_dir(hosting.staging_dir()).unwrap().collect();
        assert!(staged.is_empty(), "a refused upload left {staged:?}");

        let model = upload("scorer").await.unwrap();
        assert_eq!((model.name.as_str(), model.version), ("scorer", 1));
        assert!(hosting.catalog.find(&tenant, "scorer").is_some());
        let stored = dir.path().join("models").join(format!(
            "{}.onnx",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
        ));
        assert!(stored.exists());

        // A second model is past this plan's quota: refused before it is loaded or stored.
        let over = upload("another").await.unwrap_err();
        assert!(
            matches!(&over, HostingError::Store(err) if err.code() == ErrorCode::ModelQuotaExceeded),
            "{over:?}"
        );

        hosting.delete_model(&tenant, &who, "scorer").await.unwrap();
        assert!(hosting.catalog.find(&tenant, "scorer").is_none());
        assert!(!stored.exists(), "the deleted model's file stayed");
        let gone = hosting
            .reload(&tenant, &PlanIsolation::FREE, "scorer")
            .await
            .unwrap_err();
        assert!(
            matches!(
                gone,
                HostingError::Refused {
                    code: ErrorCode::NotFound,
                    ..
                }
            ),
            "{gone:?}"
        );
    }
}
