//! Plugins on the platform side: publishing checks, the services a running plugin may use (metered
//! model calls, its key-value store), and invocation.

use std::sync::Arc;

use actix_multipart::Multipart;
use futures_util::TryStreamExt;
use plinth_core::id::InstallationId;
use plinth_core::inference::Classification;
use plinth_core::plugins::{Capability, PluginManifest, PluginVersion, ReviewStatus};
use plinth_core::{ErrorCode, Micros};
use plinth_plugin_host::{
    CallContext, Compiled, InvokeError, NoServices, Outcome, PluginError, ServiceError, Services, Trace,
    WIT_VERSIONS,
};
use plinth_store::audit::Who;
use plinth_store::auth::Principal;
use plinth_store::ledger::{Recorded, derived_key};
use plinth_store::plugins::SealedSecrets;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};
use crate::metering::{Billable, IdempotencyKey, metered};
use crate::request_id::RequestId;
use crate::routes::models::{find_model, share};
use crate::state::AppState;

const MAX_MANIFEST_BYTES: usize = 64 << 10;

fn invalid_plugin(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidPlugin, message)
}

impl From<InvokeError> for ApiError {
    fn from(err: InvokeError) -> Self {
        let code = err.code();
        let retry = matches!(err, InvokeError::Busy(_) | InvokeError::Unavailable(_));
        let error = Self::new(code, err.to_string());
        if retry {
            error.retry_after(std::time::Duration::from_secs(1))
        } else {
            error
        }
    }
}

/// Reads a multipart part into memory, refusing it past `limit` bytes.
async fn read_part(field: &mut actix_multipart::Field, limit: usize, what: &str) -> ApiResult<Vec<u8>> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .try_next()
        .await
        .map_err(|err| ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}")))?
    {
        if bytes.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} is larger than {} KiB", limit >> 10),
            ));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// `POST /v1/plugins/{name}/versions`: parts `manifest` (plugin.json) and `component` (.wasm). Runs
/// the automatic checks, stores the component by SHA-256 and records the version for review.
pub(crate) async fn publish(
    state: &AppState,
    auth: &Principal,
    who: &Who,
    plugin: &str,
    mut form: Multipart,
) -> ApiResult<PluginVersion> {
    // Each submission is compiled and run: limited per author before its bytes are even read.
    crate::limits::check(
        state,
        &format!("publish:{}", auth.tenant_id),
        state.settings.limits.publishes_per_author,
    )
    .await?;
    let limit = state.plugins.limits().component_bytes;
    let (mut manifest, mut component) = (None, None);
    while let Some(mut field) = form
        .try_next()
        .await
        .map_err(|err| ApiError::new(ErrorCode::InvalidBody, format!("malformed multipart body: {err}")))?
    {
        match field.name().unwrap_or_default() {
            "manifest" => manifest = Some(read_part(&mut field, MAX_MANIFEST_BYTES, "the manifest").await?),
            "component" => component = Some(read_part(&mut field, limit, "the component").await?),
            other => {
                return Err(invalid_plugin(format!(
                    "unexpected part `{other}`: send `manifest` and `component`"
                )));
            }
        }
    }
    let manifest: PluginManifest =
        serde_json::from_slice(&manifest.ok_or_else(|| invalid_plugin("the `manifest` part is missing"))?)
            .map_err(|err| invalid_plugin(format!("manifest: {err}")))?;
    let component = component.ok_or_else(|| invalid_plugin("the `component` part is missing"))?;
    if manifest.name != plugin {
        return Err(invalid_plugin(format!(
            "manifest.name is `{}` but this is `{plugin}`",
            manifest.name
        )));
    }
    plinth_store::plugins::validate_manifest(&manifest)?;
    if !WIT_VERSIONS.contains(&manifest.wit_version.as_str()) {
        return Err(invalid_plugin(format!(
            "manifest.wit_version: {} is not supported (this host runs {})",
            manifest.wit_version,
            WIT_VERSIONS.join(", ")
        )));
    }
    // The author must own the listing before anything expensive happens.
    state.store.authored_plugin(&auth.tenant_id, plugin).await?;
    if let Some(unknown) = manifest.models.iter().find(|m| !state.models.is_platform(m)) {
        return Err(invalid_plugin(format!(
            "manifest.models: `{unknown}` is not a platform model; plugins may call platform models"
        )));
    }

    let sha256 = hex::encode(Sha256::digest(&component));
    let compiled = state
        .plugins
        .compile(component.clone())
        .await
        .map_err(publishing_error)?;
    if let Some(undeclared) = compiled
        .capabilities
        .iter()
        .find(|c| !manifest.capabilities.contains(c))
    {
        return Err(invalid_plugin(format!(
            "the component imports `plinth:plugin/{}` but the manifest does not declare the `{}` capability",
            undeclared.interface(),
            undeclared.interface()
        )));
    }
    let smoke = smoke_run(state, auth, &compiled, &manifest).await?;
    // Kept by its hash, and shared with the other replicas before the version is recorded.
    let name = format!("{sha256}.wasm");
    let path = state.plugin_files.path(&name);
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        // Whole or not at all: a concurrent publish of the same bytes must not see half a file.
        let partial = state
            .plugin_files
            .path(&format!(".{name}.{}.part", ulid::Ulid::new()));
        tokio::fs::write(&partial, &component)
            .await
            .map_err(ApiError::internal)?;
        tokio::fs::rename(&partial, &path)
            .await
            .map_err(ApiError::internal)?;
    }
    state
        .plugin_files
        .publish(&name)
        .await
        .map_err(ApiError::internal)?;
    let checks = serde_json::json!({
        "imports": compiled.capabilities,
        "smoke_run": smoke,
        "size_bytes": component.len(),
    });
    // Only a component that passed every check is kept compiled.
    state.plugins.remember(&sha256, compiled).await;
    Ok(state
        .store
        .publish_version(
            &auth.tenant_id,
            who,
            &manifest,
            &sha256,
            component.len() as u64,
            &checks,
        )
        .await?)
}

/// A compilation that failed at publishing: the component's fault (422), or the compiler busy (503).
fn publishing_error(err: PluginError) -> ApiError {
    match err {
        PluginError::Busy(message) => {
            ApiError::new(ErrorCode::Unavailable, message).retry_after(std::time::Duration::from_secs(30))
        }
        PluginError::Engine(message) => ApiError::internal(message),
        err => invalid_plugin(err.to_string()),
    }
}

/// Runs the new component once, with an empty request, no grants and no state, as one of the author's
/// plugin instances: it must answer, or refuse the request with an error of its own, without trapping
/// (a panic, a stack overflow), timing out or breaking a limit.
async fn smoke_run(
    state: &AppState,
    author: &Principal,
    compiled: &Arc<Compiled>,
    manifest: &PluginManifest,
) -> ApiResult<serde_json::Value> {
    let call = Arc::new(CallContext {
        tenant_id: author.tenant_id.clone(),
        installation_id: format!("smoke-run:{}", author.tenant_id),
        instances: author.isolation.plugin_instances,
        plugin: manifest.name.clone(),
        granted_models: Vec::new(),
        settings: serde_json::Map::new(),
        secrets: std::collections::BTreeMap::new(),
        idempotency_key: "smoke-run".to_owned(),
    });
    let outcome = state
        .plugins
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
        Err(err) => Err(invalid_plugin(format!("the smoke run failed: {err}"))),
    }
}

/// What a running plugin may use on behalf of the invoking tenant: its models (each call metered like
/// a direct API call, with an idempotency key derived from the invocation's) and its key-value store.
#[derive(Debug)]
struct TenantServices {
    state: AppState,
    auth: Principal,
    request_id: String,
    /// What the invocation left behind, once it ended (for its record).
    trace: std::sync::Mutex<Option<Trace>>,
}

fn service_error(err: &ApiError) -> ServiceError {
    match err.code() {
        ErrorCode::InvalidInput | ErrorCode::UnsupportedTask | ErrorCode::NotFound => {
            ServiceError::InvalidInput(err.message().to_owned())
        }
        ErrorCode::PluginLimitExceeded => ServiceError::QuotaExceeded(err.message().to_owned()),
        _ => ServiceError::Unavailable(err.message().to_owned()),
    }
}

impl TenantServices {
    /// Runs a host call's work with only the calling tenant's rows visible: guest code runs on the
    /// plugin host's own runtime, outside the request whose row-security scope named the tenant.
    async fn walled<F: Future>(&self, work: F) -> F::Output {
        plinth_store::row_security::within_tenant(&self.auth.tenant_id, work).await
    }

    async fn model_call<T>(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        units: usize,
        work: impl Future<Output = ApiResult<T>>,
    ) -> Result<T, ServiceError> {
        let key = derived_key(&call.idempotency_key, sequence);
        let idempotency = IdempotencyKey {
            attempt: key.clone(),
            call: key,
            inherited: false,
        };
        let billable = Billable::model(&self.auth, model, units);
        let request_id = RequestId(self.request_id.clone());
        metered(&self.state, &self.auth, idempotency, request_id, billable, work)
            .await
            .map(|(value, _)| value)
            .map_err(|err| service_error(&err))
    }
}

#[async_trait::async_trait]
impl Services for TenantServices {
    fn finished(&self, _call: &CallContext, trace: Trace) {
        *self
            .trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(trace);
    }

    async fn classify(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Classification>, ServiceError> {
        self.walled(async move {
            let loaded = find_model(&self.state, &self.auth, model)
                .await
                .map_err(|err| service_error(&err))?;
            let units = texts.len();
            self.model_call(call, sequence, model, units, async {
                Ok(loaded.classify(share(&self.auth), texts).await?)
            })
            .await
        })
        .await
    }

    async fn embed(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>, ServiceError> {
        self.walled(async move {
            let loaded = find_model(&self.state, &self.auth, model)
                .await
                .map_err(|err| service_error(&err))?;
            let units = texts.len();
            self.model_call(call, sequence, model, units, async {
                Ok(loaded.embed(share(&self.auth), texts).await?)
            })
            .await
        })
        .await
    }

    async fn infer(
        &self,
        call: &CallContext,
        sequence: u32,
        model: &str,
        request: String,
    ) -> Result<String, ServiceError> {
        self.walled(async move {
            let loaded = find_model(&self.state, &self.auth, model)
                .await
                .map_err(|err| service_error(&err))?;
            let request: plinth_core::inference::InferRequest = serde_json::from_str(&request)
                .map_err(|err| ServiceError::InvalidInput(format!("request: {err}")))?;
            let inputs = request
                .inputs
                .iter()
                .map(|i| plinth_inference::Tensor::from_json(&i.name, &i.datatype, &i.shape, &i.data))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| ServiceError::InvalidInput(err.to_string()))?;
            let units = plinth_inference::LoadedModel::batch_size(&inputs)
                .map_err(|err| ServiceError::InvalidInput(err.to_string()))?;
            let units = usize::try_from(units).unwrap_or(1);
            let wanted = request.outputs.map(|o| o.into_iter().map(|o| o.name).collect());
            let outputs = self
                .model_call(call, sequence, model, units, async {
                    Ok(loaded.infer(share(&self.auth), inputs, wanted).await?)
                })
                .await?;
            let response = plinth_core::inference::InferResponse {
                model_name: loaded.info().name.clone(),
                model_version: loaded.info().version.to_string(),
                id: request.id,
                outputs: outputs
                    .into_iter()
                    .map(|t| plinth_core::inference::InferOutput {
                        datatype: t.data.datatype().as_str().to_owned(),
                        data: t.data.to_json(),
                        name: t.name,
                        shape: t.shape,
                        parameters: None,
                    })
                    .collect(),
            };
            serde_json::to_string(&response).map_err(|err| ServiceError::Unavailable(err.to_string()))
        })
        .await
    }

    async fn kv_get(&self, call: &CallContext, key: &str) -> Result<Option<Vec<u8>>, ServiceError> {
        self.walled(async move {
            self.state
                .store
                .kv_get(&call.installation_id, key)
                .await
                .map_err(|err| ServiceError::Unavailable(err.to_string()))
        })
        .await
    }

    async fn kv_set(
        &self,
        call: &CallContext,
        key: &str,
        value: Vec<u8>,
        max_keys: u64,
    ) -> Result<(), ServiceError> {
        self.walled(async move {
            match self
                .state
                .store
                .kv_set(&call.installation_id, key, value, max_keys)
                .await
            {
                Ok(()) => Ok(()),
                Err(plinth_store::StoreError::Refused(_, message)) => {
                    Err(ServiceError::QuotaExceeded(message))
                }
                Err(err) => Err(ServiceError::Unavailable(err.to_string())),
            }
        })
        .await
    }

    async fn kv_delete(&self, call: &CallContext, key: &str) -> Result<bool, ServiceError> {
        self.walled(async move {
            self.state
                .store
                .kv_delete(&call.installation_id, key)
                .await
                .map_err(|err| ServiceError::Unavailable(err.to_string()))
        })
        .await
    }

    async fn kv_list(&self, call: &CallContext, prefix: &str) -> Result<Vec<String>, ServiceError> {
        self.walled(async move {
            self.state
                .store
                .kv_list(&call.installation_id, prefix)
                .await
                .map_err(|err| ServiceError::Unavailable(err.to_string()))
        })
        .await
    }
}

/// Seals an installation's secrets for storage.
/// Most secrets an installation holds.
const MAX_SECRETS: usize = 32;
/// Longest secret name, in bytes (letters, digits, `_`, `-`, `.`).
const MAX_SECRET_NAME: usize = 64;
/// Longest secret value, in bytes.
const MAX_SECRET_VALUE: usize = 4 << 10;

pub(crate) fn seal_secrets(
    state: &AppState,
    secrets: &std::collections::BTreeMap<String, String>,
) -> ApiResult<SealedSecrets> {
    let refuse = |message: String| Err(ApiError::new(ErrorCode::ValidationFailed, message));
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
    let names = secrets.keys().cloned().collect();
    if secrets.is_empty() {
        return Ok(SealedSecrets::default());
    }
    let plain = serde_json::to_vec(secrets).map_err(ApiError::internal)?;
    Ok(SealedSecrets {
        sealed: state.secrets.seal(&plain)?,
        names,
    })
}

fn open_secrets(state: &AppState, sealed: &str) -> ApiResult<std::collections::BTreeMap<String, String>> {
    if sealed.is_empty() {
        return Ok(std::collections::BTreeMap::new());
    }
    let plain = state.secrets.open(sealed)?;
    serde_json::from_slice(&plain).map_err(ApiError::internal)
}

/// Checks that what the tenant approves covers what the version asks for.
/// Installs an approved version in the caller's tenant, with every capability and model it asks for
/// approved in `request`; its secrets sealed.
pub(crate) async fn install(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    request: &plinth_core::plugins::InstallRequest,
) -> ApiResult<plinth_core::plugins::Installation> {
    let version = state
        .store
        .approved_version(&request.plugin, request.version.as_deref())
        .await?;
    check_grants(&version, &request.approve_capabilities, &request.approve_models)?;
    let sealed = seal_secrets(state, &request.secrets)?;
    let mut installation = state
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
pub(crate) async fn update_installation(
    state: &AppState,
    auth: &Principal,
    who: &plinth_store::audit::Who,
    id: &InstallationId,
    request: &plinth_core::plugins::UpdateInstallationRequest,
) -> ApiResult<plinth_core::plugins::Installation> {
    let current = state.store.runnable(&auth.tenant_id, id).await?.installation;
    let version = match &request.version {
        Some(wanted) => {
            let version = state
                .store
                .approved_version(&current.plugin, Some(wanted))
                .await?;
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
        .map(|secrets| seal_secrets(state, secrets))
        .transpose()?;
    Ok(state
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

pub(crate) fn check_grants(
    version: &PluginVersion,
    capabilities: &[Capability],
    models: &[String],
) -> ApiResult<()> {
    if let Some(missing) = version.capabilities.iter().find(|c| !capabilities.contains(c)) {
        return Err(ApiError::new(
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
        return Err(ApiError::new(
            ErrorCode::ValidationFailed,
            format!(
                "approve_models: {} {} calls the model `{missing}`; approve it to install",
                version.plugin, version.version
            ),
        ));
    }
    Ok(())
}

/// Whether the tenant has a bill that a priced call can go on: a paid plan in good standing (in Stripe
/// mode, a Stripe subscription carrying the plugin-fees price, since that is what Stripe invoices).
fn can_be_charged(state: &AppState, auth: &Principal) -> bool {
    auth.paid_subscription
        && state.billing.collects_plugin_fees()
        && (state.billing.mode() == plinth_core::billing::PaymentMode::Local || auth.provider_subscription)
}

/// What one invocation bills. The author's own tenant neither pays for its plugin nor earns from it,
/// so an author cannot pay itself; anyone else pays the plugin's price, and only from a bill that will
/// be collected.
fn plugin_charge<'a>(
    state: &AppState,
    auth: &Principal,
    runnable: &'a plinth_store::plugins::Runnable,
) -> ApiResult<Billable<'a>> {
    let installed = &runnable.installation;
    let own = runnable.author == auth.tenant_id;
    let price = if own {
        Micros::ZERO
    } else {
        installed.price_per_call
    };
    if price > Micros::ZERO && !can_be_charged(state, auth) {
        return Err(ApiError::new(
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
            .share_bps(state.settings.author_share_bps)
            .unwrap_or(Micros::ZERO),
    })
}

/// `POST /v1/installations/{id}/invoke`: runs the plugin on the request, metered once at the plugin's
/// price (its model calls are metered on their own). A revoked version does not run. Recorded in full
/// for replay when `record` (the caller asked) or when it fails and the installation records failures.
pub(crate) async fn invoke(
    state: &AppState,
    auth: &Principal,
    idempotency: IdempotencyKey,
    request_id: RequestId,
    installation: &InstallationId,
    request: &serde_json::Value,
    record: bool,
) -> ApiResult<(Invoked, Recorded)> {
    let runnable = state.store.runnable(&auth.tenant_id, installation).await?;
    let installed = &runnable.installation;
    if installed.version_status != ReviewStatus::Approved {
        return Err(ApiError::new(
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
    let billable = plugin_charge(state, auth, &runnable)?;
    let compiled = state
        .plugins
        .load(&runnable.sha256, async {
            // Published through another replica: fetched from shared storage the first time.
            let path = state
                .plugin_files
                .fetch(&format!("{}.wasm", runnable.sha256), &runnable.sha256)
                .await
                .map_err(|err| PluginError::Engine(err.to_string()))?;
            tokio::fs::read(&path)
                .await
                .map_err(|err| PluginError::Engine(format!("{}: {err}", path.display())))
        })
        .await
        .map_err(|err| match &*err {
            PluginError::Busy(message) => ApiError::new(ErrorCode::Unavailable, message.clone())
                .retry_after(std::time::Duration::from_secs(5)),
            err => ApiError::internal(err.to_string()),
        })?;
    let call = Arc::new(CallContext {
        tenant_id: auth.tenant_id.clone(),
        installation_id: installed.id.to_string(),
        instances: auth.isolation.plugin_instances,
        plugin: installed.plugin.clone(),
        granted_models: installed.models.clone(),
        settings: installed.settings.clone(),
        secrets: open_secrets(state, &runnable.sealed_secrets)?,
        idempotency_key: idempotency.attempt.clone(),
    });
    let services = Arc::new(TenantServices {
        state: state.clone(),
        auth: auth.clone(),
        request_id: request_id.0.clone(),
        trace: std::sync::Mutex::new(None),
    });
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
    let request_id_text = request_id.0.clone();
    let work = async {
        let ran = state
            .plugins
            .invoke(compiled, call.clone(), host_services, request.clone())
            .await;
        let ran_ref = &ran;
        let full = recorder
            .filter(|_| record || ran.is_err())
            .map(|recorder| move || full_record(state, installed, &call, request, ran_ref, &recorder));
        let invocation = record_invocation(state, auth, installed, &request_id_text, &services, &ran, full);
        Ok(Invoked {
            outcome: ran?,
            invocation,
        })
    };
    metered(state, auth, idempotency, request_id, billable, work).await
}

/// The invocation recorded in full, secrets replaced; or why it could not be.
fn full_record(
    state: &AppState,
    installed: &plinth_core::plugins::Installation,
    call: &CallContext,
    request: String,
    ran: &Result<Outcome, InvokeError>,
    recorder: &plinth_plugin_host::Recorder,
) -> Result<plinth_core::plugins::RecordedInvocation, plinth_plugin_host::TooLarge> {
    let host_calls = recorder.take()?;
    let (outcome, output) = plinth_plugin_host::ending(ran);
    let mut full = plinth_core::plugins::RecordedInvocation {
        invocation_id: plinth_core::id::InvocationId::new(),
        plugin: installed.plugin.clone(),
        version: installed.version.clone(),
        world: plinth_plugin_host::WIT_VERSIONS[0].to_owned(),
        request,
        granted_models: call.granted_models.clone(),
        settings: call.settings.clone(),
        secret_names: call.secrets.keys().cloned().collect(),
        limits: plinth_plugin_host::recorded_limits(state.plugins.limits()),
        host_calls,
        outcome,
        output,
    };
    plinth_plugin_host::redact(&mut full, &call.secrets);
    Ok(full)
}

/// A plugin's answer, and the invocation's record.
#[derive(Debug)]
pub(crate) struct Invoked {
    pub(crate) outcome: Outcome,
    /// `None` when no record is written (too many waiting).
    pub(crate) invocation: Option<plinth_core::id::InvocationId>,
}

/// Records how an invocation that ran ended, off the request path: a record that cannot be written is
/// logged, and the call is answered either way. Returns the record's id.
fn record_invocation(
    state: &AppState,
    auth: &Principal,
    installed: &plinth_core::plugins::Installation,
    request_id: &str,
    services: &TenantServices,
    ran: &Result<Outcome, InvokeError>,
    full: Option<
        impl FnOnce() -> Result<plinth_core::plugins::RecordedInvocation, plinth_plugin_host::TooLarge>,
    >,
) -> Option<plinth_core::id::InvocationId> {
    let Some(trace) = services
        .trace
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    else {
        // Refused before it ran (instances busy, input too large): nothing to record.
        return None;
    };
    // Recording never holds up calls: beyond this many records waiting to be written, the newest are
    // dropped and counted (before any work goes into them).
    static WAITING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(RECORDS_WAITING);
    let Ok(permit) = WAITING.try_acquire() else {
        metrics::counter!("plinth_plugin_invocation_records_dropped_total").increment(1);
        return None;
    };
    let (outcome, mut message) = match ran {
        Ok(_) => ("ok".to_owned(), None),
        Err(err) => (err.code_name(), Some(err.to_string())),
    };
    let full = match full.map(|build| build()) {
        Some(Ok(full)) => Some(full),
        Some(Err(too_large)) => {
            let note = format!(
                "(not recorded in full: its host calls and answers took more than {} KiB)",
                too_large.budget >> 10
            );
            message = Some(message.map_or_else(|| note.clone(), |message| format!("{message} {note}")));
            None
        }
        None => None,
    };
    let id = full
        .as_ref()
        .map_or_else(plinth_core::id::InvocationId::new, |full| {
            full.invocation_id.clone()
        });
    let record = plinth_store::invocations::NewInvocation {
        id: id.clone(),
        occurred_at: chrono::Utc::now(),
        tenant: auth.tenant_id.clone(),
        installation: installed.id.clone(),
        version_id: installed.version_id.to_string(),
        request_id: request_id.to_owned(),
        duration_ms: u64::try_from(trace.duration.as_millis()).unwrap_or(u64::MAX),
        compute_units: trace.compute_units,
        outcome,
        message,
        logs: trace
            .logs
            .into_iter()
            .map(|line| plinth_core::plugins::InvocationLog {
                level: line.level.to_owned(),
                message: line.message,
            })
            .collect(),
        record: full,
    };
    let (store, keep) = (state.store.clone(), state.settings.invocation_records);
    tokio::spawn(async move {
        if let Err(err) = store.record_invocation(record, keep).await {
            tracing::warn!(error = %err, "cannot record a plugin invocation");
        }
        drop(permit);
    });
    Some(id)
}

/// Invocation records waiting to be written, at most.
const RECORDS_WAITING: usize = 256;
