//! Which models each tenant can call: the platform's built-in models, visible to all, and each tenant's
//! own uploads, visible only to that tenant. A tenant model is served at its newest version; older
//! versions that clients pin (`/v2/models/{m}/versions/{v}`) are loaded on first use and kept here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use plinth_core::id::TenantId;
use plinth_core::inference::{Model, Task};

use crate::InferenceError;
use crate::engine::{Engine, LoadedModel, ModelFiles};

#[derive(Debug, Default)]
pub struct Catalog {
    platform: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    tenants: RwLock<BTreeMap<(TenantId, String), Arc<LoadedModel>>>,
    pinned: RwLock<BTreeMap<(TenantId, String, u32), Arc<LoadedModel>>>,
}

impl Catalog {
    pub fn add_platform(&self, model: Arc<LoadedModel>) {
        let name = model.info().name.clone();
        self.platform
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, model);
    }

    pub fn add_tenant(&self, tenant: &TenantId, model: Arc<LoadedModel>) {
        let name = model.info().name.clone();
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((tenant.clone(), name), model);
    }

    /// Keeps an older version of a tenant's model that a client asked for by number.
    pub fn add_pinned(&self, tenant: &TenantId, model: Arc<LoadedModel>) {
        let key = (tenant.clone(), model.info().name.clone(), model.info().version);
        self.pinned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, model);
    }

    /// A specific version of a tenant's model, if it is loaded (the newest, or a pinned one).
    #[must_use]
    pub fn find_version(&self, tenant: &TenantId, name: &str, version: u32) -> Option<Arc<LoadedModel>> {
        self.find(tenant, name)
            .filter(|model| model.info().version == version)
            .or_else(|| {
                self.pinned
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(&(tenant.clone(), name.to_owned(), version))
                    .cloned()
            })
    }

    /// Stops serving a tenant's model, every version of it.
    pub fn remove_tenant(&self, tenant: &TenantId, name: &str) {
        self.tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&(tenant.clone(), name.to_owned()));
        self.pinned
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(owner, model, _), _| !(owner == tenant && model == name));
    }

    /// Whether `name` is a platform model's (tenants cannot shadow those).
    #[must_use]
    pub fn is_platform(&self, name: &str) -> bool {
        self.platform
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains_key(name)
    }

    /// The model `name` as `tenant` sees it: its own model of that name, else the platform's.
    #[must_use]
    pub fn find(&self, tenant: &TenantId, name: &str) -> Option<Arc<LoadedModel>> {
        let own = self
            .tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(tenant.clone(), name.to_owned()))
            .cloned();
        own.or_else(|| {
            self.platform
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(name)
                .cloned()
        })
    }

    /// Every model `tenant` can call, platform models first.
    #[must_use]
    pub fn visible_to(&self, tenant: &TenantId) -> Vec<Model> {
        let platform = self
            .platform
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tenants = self
            .tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        platform
            .values()
            .chain(
                tenants
                    .iter()
                    .filter(|((owner, _), _)| owner == tenant)
                    .map(|(_, model)| model),
            )
            .map(|model| model.info().clone())
            .collect()
    }
}

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
    let head: serde_json::Value = serde_json::from_slice(
        &std::fs::read(need("sentiment_head.json")?)
            .map_err(|err| InferenceError::Runtime(err.to_string()))?,
    )
    .map_err(|err| InferenceError::Runtime(format!("sentiment_head.json: {err}")))?;
    let labels: Vec<String> = head["labels"]
        .as_array()
        .map(|labels| {
            labels
                .iter()
                .filter_map(|l| l.as_str().map(ToOwned::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for (name, file, task, labels) in [
        ("minilm-embed", "minilm-embed.onnx", Task::Embedding, Vec::new()),
        ("sentiment", "sentiment.onnx", Task::TextClassification, labels),
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
