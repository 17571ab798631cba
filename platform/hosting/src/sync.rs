//! Each replica's catalogue of tenant models, read from the registry at start-up in the background
//! and kept in step with it. A model is described from the registry and loaded on its first call.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use plinth_core::id::TenantId;
use plinth_core::inference::Model;
use plinth_inference::Tier;
use plinth_store::StoreError;
use plinth_store::models::ModelRecord;
use tokio::task::JoinHandle;

use crate::Hosting;

type ModelVersionKey = (TenantId, String, u32);

impl Hosting {
    /// Starts serving every tenant's newest model versions, in the background after start-up: the
    /// server answers at once (readiness waits for this). Models are described from the registry, not
    /// loaded; only a version registered before signatures were kept is loaded (once: its signature is
    /// then stored), and one that fails to is logged, counted and skipped rather than keeping the
    /// platform down. A registry that cannot be read is tried again.
    #[must_use]
    pub fn spawn_loading(&self) -> JoinHandle<()> {
        let hosting = self.clone();
        tokio::spawn(async move {
            loop {
                match hosting.read_tenant_models().await {
                    Ok(()) => break,
                    Err(err) => {
                        tracing::error!(error = %err, "cannot read the model registry; trying again");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            hosting.catalog.finished_reading_tenant_models();
        })
    }

    async fn read_tenant_models(&self) -> Result<(), StoreError> {
        let runs_on = self.runs_on();
        // Read and described under the files lock, which uploads and deletes hold while they register:
        // one that comes meanwhile waits for this, then wins.
        let unsigned = {
            let _files = self.files_lock.lock().await;
            let mut unsigned = Vec::new();
            for record in self.store.live_models().await? {
                match describe(&record, runs_on) {
                    Some(info) => self.catalog.know(&record.tenant_id, info),
                    None => unsigned.push(record),
                }
            }
            unsigned
        };
        for record in &unsigned {
            self.load_record(record).await;
        }
        Ok(())
    }

    /// The execution provider tenants' models will run on once loaded.
    pub(crate) fn runs_on(&self) -> &'static str {
        if self.engine.prefers_gpu() { "cuda" } else { "cpu" }
    }

    /// Serves a registered version, described rather than loaded, unless a delete or a newer upload
    /// came meanwhile. Returns whether it serves.
    pub(crate) async fn know_if_current(
        &self,
        record: &ModelRecord,
        info: Model,
    ) -> Result<bool, StoreError> {
        let _files = self.files_lock.lock().await;
        let versions = self.store.model_versions(&record.tenant_id, &record.name).await?;
        let current = versions.last() == Some(&record.version);
        if current {
            self.catalog.know(&record.tenant_id, info);
        }
        Ok(current)
    }

    /// Loads a registered model version and serves it, unless a delete or a newer upload came
    /// meanwhile, and stores the signature it was registered without. Returns whether it loaded (a
    /// failure is logged and counted).
    async fn load_record(&self, record: &ModelRecord) -> bool {
        let files = match self.fetch_files(record).await {
            Ok(files) => files,
            Err(err) => {
                metrics::counter!("plinth_model_load_failures_total").increment(1);
                tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot fetch a tenant model's files");
                return false;
            }
        };
        // In the turn every load takes (at the lightest plan's weight: the registry does not say the
        // tenant's plan, and these loads serve no waiting call), charged to the tenant, within the
        // warm-up deadline; kept loaded in the free tier's share for the same reason (a paying
        // tenant's model let go from there is loaded again, into its own, on its next call).
        match self
            .load_holding(&record.tenant_id, 1, files, crate::Loading::Accepted, ())
            .await
        {
            // A delete or a newer upload since the registry was read wins.
            Ok(model) => {
                self.store_signature(record, &model).await;
                if let Err(err) = self.serve_if_current(&record.tenant_id, Tier::Free, model).await {
                    tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot check a tenant model is current");
                }
                true
            }
            Err(err) => {
                metrics::counter!("plinth_model_load_failures_total").increment(1);
                tracing::error!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot load a tenant model");
                false
            }
        }
    }

    /// Stores the signature of a loaded version in the registry where it was kept without one, or
    /// with another (a failure is logged: a version kept without one is loaded to be described until
    /// it is stored).
    pub(crate) async fn store_signature(&self, record: &ModelRecord, model: &plinth_inference::LoadedModel) {
        let signature = model.info().signature();
        if record.signature.as_ref() != Some(&signature)
            && let Err(err) = self
                .store
                .record_model_signature(&record.tenant_id, &record.id, &signature)
                .await
        {
            tracing::warn!(model = %record.name, tenant = %record.tenant_id, error = %err, "cannot store a tenant model's signature");
        }
    }

    /// Keeps this replica's model catalogue in step with the registry every replica shares: a model
    /// uploaded through another replica starts serving here (described, and loaded on its first call
    /// here), and one deleted there stops here, within `every`. A version without a signature that
    /// fails to load is not tried again by this loop (it is logged and counted, and not served here
    /// until the next start-up tries it again).
    #[must_use]
    pub fn spawn_catalog_sync(&self, every: Duration) -> JoinHandle<()> {
        let hosting = self.clone();
        tokio::spawn(async move {
            let mut failed = HashSet::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Postgres announces each change: compared at once rather than at the next tick.
            let mut changes = match hosting.store.catalog_changes().await {
                Ok(changes) => changes,
                Err(err) => {
                    tracing::warn!(error = %err, "catalogue changes are followed by polling only");
                    None
                }
            };
            loop {
                let announced = async {
                    match changes.as_mut() {
                        Some(changes) => changes.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {}
                    heard = announced => {
                        if let Err(err) = heard {
                            tracing::warn!(error = %err, "lost the catalogue change listener; polling meanwhile");
                            tokio::time::sleep(every).await;
                        }
                    }
                }
                if !hosting.catalog.knows_tenant_models() {
                    continue;
                }
                if let Err(err) = hosting.sync_catalog(&mut failed).await {
                    tracing::warn!(error = %err, "cannot read the model registry to sync the catalogue");
                }
            }
        })
    }

    async fn sync_catalog(&self, failed: &mut HashSet<ModelVersionKey>) -> Result<(), StoreError> {
        // Names and versions only: a version's record (its signature) is read once it is new here.
        let newest = self.store.live_model_versions().await?;
        let live: HashMap<(&TenantId, &str), u32> = newest
            .iter()
            .map(|(tenant, name, version)| ((tenant, name.as_str()), *version))
            .collect();
        let served: HashMap<(TenantId, String), u32> = self
            .catalog
            .tenant_models()
            .into_iter()
            .map(|(tenant, name, version)| ((tenant, name), version))
            .collect();
        let runs_on = self.runs_on();
        let mut removed = false;
        for (tenant, name) in served.keys() {
            if !live.contains_key(&(tenant, name.as_str())) {
                // Deleted through another replica. Checked again under the files lock, as a delete
                // here would hold it: an upload through this replica may have just registered it.
                let _files = self.files_lock.lock().await;
                if self.store.model_versions(tenant, name).await?.is_empty() {
                    self.catalog.remove_tenant(tenant, name);
                    removed = true;
                    metrics::counter!("plinth_catalog_changes_total", "change" => "removed").increment(1);
                    tracing::info!(%tenant, model = %name, "a model deleted elsewhere stopped serving here");
                }
            }
        }
        // Older versions pinned here and deleted elsewhere (one version, or the whole model) stop too.
        for (tenant, name, version) in self.catalog.pinned_versions() {
            if let Err(StoreError::NotFound(_)) = self.store.model_version(&tenant, &name, version).await {
                self.catalog.remove_version(&tenant, &name, version);
                removed = true;
                metrics::counter!("plinth_catalog_changes_total", "change" => "removed").increment(1);
            }
        }
        if removed {
            // This replica's copies of the deleted model's files go too.
            let _files = self.files_lock.lock().await;
            self.remove_local_unused_files().await?;
        }
        for (tenant, name, version) in &newest {
            let key = (tenant.clone(), name.clone());
            // A different version than the registry's newest: a newer upload, or the newest deleted.
            let current = served.get(&key).is_some_and(|v| v == version);
            let version_key = (tenant.clone(), name.clone(), *version);
            let uploading_here = self
                .uploading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(&key);
            if current || uploading_here || failed.contains(&version_key) {
                continue;
            }
            let record = match self.store.model_version(tenant, name, *version).await {
                // Deleted since the registry was read.
                Err(StoreError::NotFound(_)) => continue,
                other => other?,
            };
            if let Some(info) = describe(&record, runs_on) {
                if self.know_if_current(&record, info).await? {
                    metrics::counter!("plinth_catalog_changes_total", "change" => "added").increment(1);
                    tracing::info!(tenant = %record.tenant_id, model = %record.name, version = record.version, "a model uploaded elsewhere serves here");
                }
            } else if self.load_record(&record).await {
                metrics::counter!("plinth_catalog_changes_total", "change" => "loaded").increment(1);
                tracing::info!(tenant = %record.tenant_id, model = %record.name, version = record.version, "a model uploaded elsewhere serves here");
            } else {
                failed.insert(version_key);
            }
        }
        Ok(())
    }
}

/// A registered version as the catalogue lists it before it is loaded: `None` when the registry has
/// no signature for it (it must be loaded to be described).
pub(crate) fn describe(record: &ModelRecord, runs_on: &str) -> Option<Model> {
    let signature = record.signature.clone()?;
    let task = crate::registry_task(&record.task)?;
    Some(Model {
        name: record.name.clone(),
        task,
        labels: record.labels.clone(),
        version: record.version,
        platform: false,
        execution_provider: runs_on.to_owned(),
        inputs: signature.inputs,
        outputs: signature.outputs,
    })
}
