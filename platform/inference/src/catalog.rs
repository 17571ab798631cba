//! Which models each tenant can call: the platform's built-in models, visible to all, and each tenant's
//! own uploads, visible only to that tenant. A tenant model is served at its newest version; older
//! versions that clients pin (`/v2/models/{m}/versions/{v}`) are loaded on first use and kept here,
//! the [`PINNED_LOADED`] most recently used of them, at most [`PINNED_PER_TENANT`] of one tenant's
//! (the others are loaded again when asked for). Newest versions are kept loaded up to a bound too
//! (least recently used first out). The catalog knows every tenant model's description whether it is
//! loaded or not (a replica starting up reads them from the registry and loads none): the API loads
//! one on its first call, and again on the next call after it was let go.
//!
//! Signups are free, so both bounds also keep a quarter for tenants on heavier plans than the free
//! one: a crowd of free accounts, each within its own share, calling their models in turn would
//! otherwise push every paying tenant's out, and each of their calls would wait for a load (charged
//! to their loading budget). The tenants on the lightest plan together keep at most three quarters
//! of each bound loaded; past that, their own least recently used goes. Paying tenants' models keep
//! at least the other quarter against any crowd, shared among them least recently used first (one
//! paying tenant's quarter can take it all). A model's tier is its tenant's plan when it was loaded:
//! a tenant that changes plan keeps its loaded models' until they are let go.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use plinth_core::id::TenantId;
use plinth_core::inference::{Model, Task};

use crate::InferenceError;
use crate::engine::{Engine, LoadedModel, ModelFiles};

/// Older versions kept loaded, across tenants; each holds its sessions' memory.
pub const PINNED_LOADED: usize = 16;

/// Older versions one tenant keeps loaded: asking for more evicts its own, not other tenants'.
pub const PINNED_PER_TENANT: usize = 4;

type PinnedKey = (TenantId, String, u32);

type TenantKey = (TenantId, String);

/// Whose model is kept loaded: a tenant on the lightest plan (the free plan's scheduling weight) or on
/// a heavier one. See the module's doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Free,
    Paid,
}

/// A loaded tenant model: when it was last used (a counter), and its tenant's tier.
#[derive(Debug)]
struct Kept {
    model: Arc<LoadedModel>,
    used: AtomicU64,
    tier: Tier,
}

impl Kept {
    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

/// Lets go of the least recently used models past each bound in turn: `tenant`'s past `own`, the
/// free tier's past three quarters of `bound`, any past `bound` (see the module's doc). Returns them,
/// to be dropped once the lock is let go: dropping the last handle to a model frees its sessions,
/// which takes a while.
fn keep_within<K: Ord + Clone>(
    kept: &mut BTreeMap<K, Kept>,
    owner: impl Fn(&K) -> &TenantId,
    tenant: &TenantId,
    own: usize,
    bound: usize,
) -> Vec<Kept> {
    let mut gone = Vec::new();
    let mut let_go = |chosen: &dyn Fn(&K, &Kept) -> bool, bound: usize| {
        while kept.iter().filter(|(key, model)| chosen(key, model)).count() > bound {
            let oldest = kept
                .iter()
                .filter(|(key, model)| chosen(key, model))
                .min_by_key(|(_, model)| model.used())
                .map(|(key, _)| key.clone());
            let Some(model) = oldest.and_then(|oldest| kept.remove(&oldest)) else {
                break;
            };
            gone.push(model);
        }
    };
    let_go(&|key, _| owner(key) == tenant, own);
    let_go(&|_, model| model.tier == Tier::Free, free_share(bound));
    let_go(&|_, _| true, bound);
    gone
}

/// Three quarters of `bound` (at least one): what the tenants on the lightest plan keep together.
fn free_share(bound: usize) -> usize {
    (bound / 4 * 3).max(1)
}

#[derive(Debug, Default)]
pub struct Catalog {
    platform: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    /// Tenants' newest versions that are loaded.
    tenants: RwLock<BTreeMap<TenantKey, Kept>>,
    /// Every tenant model being served, loaded or not: its description.
    known: RwLock<BTreeMap<TenantKey, Model>>,
    /// How many tenant models stay loaded at most (0: no bound).
    loaded_tenant_models: usize,
    /// Pinned versions that are loaded.
    pinned: RwLock<BTreeMap<PinnedKey, Kept>>,
    uses: AtomicU64,
    /// Whether start-up has read every tenant model's description from the registry.
    knows_tenant_models: AtomicBool,
}

impl Catalog {
    /// A catalog keeping at most `loaded_tenant_models` tenants' models loaded at once (0: all).
    #[must_use]
    pub fn with_loaded_tenant_models(loaded_tenant_models: usize) -> Self {
        Self {
            loaded_tenant_models,
            ..Self::default()
        }
    }

    pub fn add_platform(&self, model: Arc<LoadedModel>) {
        let name = model.info().name.clone();
        self.platform
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, model);
    }

    /// Serves `model` as the tenant's newest version of its name, letting go of the least recently
    /// used tenant model past the bound (it stays known, and is loaded again when called). A tenant
    /// keeps at most a quarter of the bound loaded: past that, its own least recently used goes, so
    /// one tenant calling many models in turn cannot push every other tenant's out; the tenants of
    /// `tier` [`Tier::Free`] keep three quarters together (see the module's doc).
    pub fn add_tenant(&self, tenant: &TenantId, model: Arc<LoadedModel>, tier: Tier) {
        let key = (tenant.clone(), model.info().name.clone());
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key.clone(), model.info().clone());
        let mut loaded = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Stamped under the lock: the model just added is the most recently used.
        let used = AtomicU64::new(self.uses.fetch_add(1, Ordering::Relaxed));
        loaded.insert(key, Kept { model, used, tier });
        let bound = self.loaded_tenant_models;
        if bound == 0 {
            return;
        }
        let gone = keep_within(&mut loaded, |(owner, _)| owner, tenant, (bound / 4).max(1), bound);
        drop(loaded);
        metrics::counter!("plinth_tenant_models_evicted_total", "version" => "newest")
            .increment(gone.len() as u64);
    }

    /// Serves `info` as the tenant's newest version of its name without loading it: its first call
    /// loads it. A loaded older version stops serving; a newer one known already stays.
    pub fn know(&self, tenant: &TenantId, info: Model) {
        let key = (tenant.clone(), info.name.clone());
        let version = info.version;
        let mut known = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.get(&key).is_some_and(|newest| newest.version > version) {
            return;
        }
        known.insert(key.clone(), info);
        let mut loaded = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded
            .get(&key)
            .is_some_and(|kept| kept.model.info().version != version)
        {
            loaded.remove(&key);
        }
    }

    /// How many tenants' models (newest versions) are loaded now.
    #[must_use]
    pub fn loaded_tenant_models(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether the tenant has a model of this name being served (loaded now or not).
    #[must_use]
    pub fn serves(&self, tenant: &TenantId, name: &str) -> bool {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(&(tenant.clone(), name.to_owned()))
    }

    /// Keeps an older version of a tenant's model that a client asked for by number, letting go of
    /// the least recently used one past [`PINNED_LOADED`] (past [`PINNED_PER_TENANT`] of the tenant's,
    /// past three quarters of [`PINNED_LOADED`] of `tier` [`Tier::Free`]'s).
    pub fn add_pinned(&self, tenant: &TenantId, model: Arc<LoadedModel>, tier: Tier) {
        let key = (tenant.clone(), model.info().name.clone(), model.info().version);
        let mut pinned = self
            .pinned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Stamped under the lock: the version just added is the most recently used.
        let used = AtomicU64::new(self.uses.fetch_add(1, Ordering::Relaxed));
        pinned.insert(key, Kept { model, used, tier });
        let gone = keep_within(
            &mut pinned,
            |(owner, _, _)| owner,
            tenant,
            PINNED_PER_TENANT,
            PINNED_LOADED,
        );
        drop(pinned);
        metrics::counter!("plinth_tenant_models_evicted_total", "version" => "pinned")
            .increment(gone.len() as u64);
    }

    /// Every tenant model being served (loaded now or not): its tenant, name and version.
    #[must_use]
    pub fn tenant_models(&self) -> Vec<(TenantId, String, u32)> {
        self.known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((tenant, name), info)| (tenant.clone(), name.clone(), info.version))
            .collect()
    }

    /// The older versions kept loaded because clients pinned them: tenant, name, version.
    #[must_use]
    pub fn pinned_versions(&self) -> Vec<(TenantId, String, u32)> {
        self.pinned
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    /// Whether start-up has read every tenant model's description (until then, a model missing from
    /// the catalog may only be late).
    #[must_use]
    pub fn knows_tenant_models(&self) -> bool {
        self.knows_tenant_models.load(Ordering::Acquire)
    }

    /// Start-up has read the tenants' models.
    pub fn finished_reading_tenant_models(&self) {
        self.knows_tenant_models.store(true, Ordering::Release);
    }

    /// Stops serving one older version of a tenant's model.
    pub fn remove_version(&self, tenant: &TenantId, name: &str, version: u32) {
        self.pinned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.clone(), name.to_owned(), version));
    }

    /// A specific version of a tenant's model, if it is loaded (the newest, or a pinned one).
    #[must_use]
    pub fn find_version(&self, tenant: &TenantId, name: &str, version: u32) -> Option<Arc<LoadedModel>> {
        self.find(tenant, name)
            .filter(|model| model.info().version == version)
            .or_else(|| {
                let pinned = self
                    .pinned
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let kept = pinned.get(&(tenant.clone(), name.to_owned(), version))?;
                kept.used
                    .store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
                Some(kept.model.clone())
            })
    }

    /// Stops serving a tenant's model, every version of it.
    pub fn remove_tenant(&self, tenant: &TenantId, name: &str) {
        self.known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.clone(), name.to_owned()));
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.clone(), name.to_owned()));
        self.pinned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(owner, model, _), _| !(owner == tenant && model == name));
    }

    /// The platform models that cannot serve now (see [`LoadedModel::serving`]).
    #[must_use]
    pub fn platform_not_serving(&self) -> Vec<String> {
        self.platform
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|model| !model.serving())
            .map(|model| model.info().name.clone())
            .collect()
    }

    /// Whether `name` is a platform model's (tenants cannot shadow those).
    #[must_use]
    pub fn is_platform(&self, name: &str) -> bool {
        self.platform
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(name)
    }

    /// The model `name` as `tenant` sees it, if it is loaded: its own model of that name (a platform
    /// model never stands in for one not loaded), else the platform's.
    #[must_use]
    pub fn find(&self, tenant: &TenantId, name: &str) -> Option<Arc<LoadedModel>> {
        let own = self
            .tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(tenant.clone(), name.to_owned()))
            .map(|kept| {
                kept.used
                    .store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
                kept.model.clone()
            });
        if own.is_some() || self.serves(tenant, name) {
            return own;
        }
        own.or_else(|| {
            self.platform
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(name)
                .cloned()
        })
    }

    /// The model `name` as `tenant` sees it, described whether it is loaded or not: its own model of
    /// that name, else the platform's.
    #[must_use]
    pub fn describe(&self, tenant: &TenantId, name: &str) -> Option<Model> {
        let own = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(tenant.clone(), name.to_owned()))
            .cloned();
        own.or_else(|| {
            self.platform
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(name)
                .map(|model| model.info().clone())
        })
    }

    /// Every model `tenant` can call, platform models first.
    #[must_use]
    pub fn visible_to(&self, tenant: &TenantId) -> Vec<Model> {
        let platform = self
            .platform
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        platform
            .values()
            .map(|model| model.info().clone())
            .chain(
                known
                    .iter()
                    .filter(|((owner, _), _)| owner == tenant)
                    .map(|(_, info)| info.clone()),
            )
            .collect()
    }
}

/// The committed sentiment head (`weight` as rows per label).
fn sentiment_head(path: &Path) -> Result<plinth_training::Head, InferenceError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        labels: Vec<String>,
        weight: Vec<Vec<f32>>,
        bias: Vec<f32>,
    }
    let bad = |err: String| InferenceError::Runtime(format!("sentiment_head.json: {err}"));
    let bytes = std::fs::read(path).map_err(|err| bad(err.to_string()))?;
    let stored: Stored = serde_json::from_slice(&bytes).map_err(|err| bad(err.to_string()))?;
    let dim = stored.weight.first().map_or(0, Vec::len);
    if stored.weight.len() != stored.labels.len()
        || stored.bias.len() != stored.labels.len()
        || stored.weight.iter().any(|row| row.len() != dim)
    {
        return Err(bad("weights, biases and labels do not match".into()));
    }
    Ok(plinth_training::Head {
        labels: stored.labels,
        dim,
        weight: stored.weight.concat(),
        bias: stored.bias,
    })
}

/// The file of a built-in graph (`minilm-embed`, `sentiment`) for where `engine` runs. The base model
/// stores its weights as int8: on a CPU each token is quantized to 8 bits and multiplied by them in
/// integers (`NAME.onnx`, 1.6-2.4x faster), on a GPU in float (`NAME.gpu.onnx`: ONNX Runtime's CUDA
/// provider has no kernels for the integer products). Both are made by `builtin/assemble.py`.
fn builtin_graph(stem: &str, engine: &Engine) -> String {
    if engine.prefers_gpu() {
        format!("{stem}.gpu.onnx")
    } else {
        format!("{stem}.onnx")
    }
}

/// Writes `sentiment` as the platform assembles it: the embedding graph with the committed head, by
/// the code that deploys tenants' trained models (`scripts/fetch-models.sh` leaves an equivalent
/// copy; this one replaces it). A directory that cannot be written keeps the fetched copy.
fn assemble_sentiment(dir: &Path, sentiment: &str, base: &Path, head: &plinth_training::Head) {
    let target = dir.join(sentiment);
    let written = std::fs::read(base).and_then(|base| {
        let model = plinth_training::onnx::with_head(&base, head);
        if std::fs::read(&target).is_ok_and(|existing| existing == model) {
            return Ok(());
        }
        // Servers starting side by side each write their own file and rename it into place.
        let part = dir.join(format!(
            ".{sentiment}.{}.{:?}.part",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&part, &model)?;
        std::fs::rename(&part, &target).inspect_err(|_| {
            let _ = std::fs::remove_file(&part);
        })
    });
    if let Err(err) = written {
        tracing::warn!(error = %err, file = sentiment, "cannot assemble the sentiment model; serving the fetched copy");
    }
}

/// The files of the built-in embedding model in `dir` as `engine` serves it, the base that training
/// adapts.
#[must_use]
pub fn builtin_embedding_files(dir: &Path, engine: &Engine) -> ModelFiles {
    ModelFiles {
        name: BASE_MODEL.to_owned(),
        version: 1,
        task: Task::Embedding,
        labels: Vec::new(),
        model: dir.join(builtin_graph("minilm-embed", engine)),
        tokenizer: Some(dir.join("tokenizer.json")),
        platform: true,
    }
}

/// The platform's embedding model, which training adapts.
pub const BASE_MODEL: &str = "minilm-embed";

/// Loads the built-in models that `scripts/fetch-models.sh` prepared in `dir`.
///
/// # Errors
/// When a file is missing (with the command that makes it) or a model does not load.
pub fn load_builtin(engine: &Engine, dir: &Path, catalog: &Catalog) -> Result<(), InferenceError> {
    let need = |file: &str| {
        let path = dir.join(file);
        if path.is_file() {
            Ok(path)
        } else {
            Err(InferenceError::Runtime(format!(
                "built-in model file {} is missing: run scripts/fetch-models.sh (make run does), or set PLINTH_MODELS_DIR",
                path.display()
            )))
        }
    };
    let tokenizer = need("tokenizer.json")?;
    let head = sentiment_head(&need("sentiment_head.json")?)?;
    let (embedding, sentiment) = (
        builtin_graph("minilm-embed", engine),
        builtin_graph("sentiment", engine),
    );
    assemble_sentiment(dir, &sentiment, &need(&embedding)?, &head);
    let labels = head.labels;
    for (name, file, task, labels) in [
        ("minilm-embed", &embedding, Task::Embedding, Vec::new()),
        ("sentiment", &sentiment, Task::TextClassification, labels),
    ] {
        let files = ModelFiles {
            name: name.to_owned(),
            version: 1,
            task,
            labels,
            model: need(file)?,
            tokenizer: Some(tokenizer.clone()),
            platform: true,
        };
        catalog.add_platform(engine.load(&files)?);
    }
    Ok(())
}
