//! The plugin marketplace: authors' listings and immutable versions, admin review, tenants'
//! installations (with the capabilities and models they approved), each installation's key-value
//! store, and what authors earned from the ledger.

use chrono::Utc;
use plinth_core::ErrorCode;
use plinth_core::Micros;
use plinth_core::id::{InstallationId, PluginId, PluginVersionId, TenantId};
use plinth_core::plugins::{Capability, Installation, Plugin, PluginManifest, PluginVersion, ReviewStatus};
use sea_orm::sea_query::{Expr, ExprTrait, Func, LikeExpr, LockType, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::accounts::parse_id;
use crate::audit::Who;
use crate::entity::{TenantScoped, installations, plugin_kv, plugin_versions, plugins};
use crate::{Result, Store, StoreError};

/// The usage-event kind of a plugin invocation; its resource id is the plugin version id.
pub const USAGE_KIND: &str = "plugin";

fn status_str(status: ReviewStatus) -> &'static str {
    match status {
        ReviewStatus::Pending => "pending",
        ReviewStatus::Approved => "approved",
        ReviewStatus::Rejected => "rejected",
        ReviewStatus::Revoked => "revoked",
    }
}

fn parse_status(raw: &str) -> ReviewStatus {
    match raw {
        "approved" => ReviewStatus::Approved,
        "rejected" => ReviewStatus::Rejected,
        "revoked" => ReviewStatus::Revoked,
        _ => ReviewStatus::Pending,
    }
}

fn capabilities_str(capabilities: &[Capability]) -> String {
    capabilities
        .iter()
        .map(|c| c.interface())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_capabilities(raw: &str) -> Vec<Capability> {
    raw.split_whitespace().filter_map(Capability::parse).collect()
}

fn to_version(plugin: &str, row: plugin_versions::Model) -> Result<PluginVersion> {
    Ok(PluginVersion {
        id: parse_id(&row.id)?,
        plugin: plugin.to_owned(),
        capabilities: parse_capabilities(&row.capabilities),
        models: serde_json::from_str(&row.models).unwrap_or_default(),
        price_per_call: Micros(row.price_per_call_micros),
        size_bytes: u64::try_from(row.size_bytes).unwrap_or(0),
        status: parse_status(&row.status),
        checks: serde_json::from_str(&row.checks).unwrap_or_default(),
        version: row.version,
        wit_version: row.wit_version,
        sha256: row.sha256,
        review_note: row.review_note,
        created_at: row.created_at,
    })
}

/// Plugin names: lowercase letters, digits and `-`, 2 to 64 characters.
fn validate_plugin_name(name: &str) -> Result<()> {
    let valid = (2..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "name: 2-64 lowercase letters, digits and `-`",
        ))
    }
}

/// `major.minor.patch`, digits only (pre-release tags are not accepted in the marketplace).
fn parse_semver(version: &str) -> Option<(u64, u64, u64)> {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().ok());
    let parsed = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(parsed)
}

/// A tenant's installation that has not been uninstalled, or not found.
async fn live_installation(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    installation: &InstallationId,
) -> Result<installations::Model> {
    installations::Entity::find_in(tenant)
        .filter(installations::Column::Id.eq(installation.as_str()))
        .filter(installations::Column::DeletedAt.is_null())
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("installation"))
}

/// An installation's secrets, sealed for storage, with their names (which the audit log records;
/// values never leave the sealed form).
#[derive(Debug, Clone, Default)]
pub struct SealedSecrets {
    pub sealed: String,
    pub names: Vec<String>,
}

/// What `update_installation` changes: each part when given.
#[derive(Debug, Clone, Copy, Default)]
pub struct InstallationChange<'a> {
    pub version: Option<&'a PluginVersion>,
    pub settings: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub secrets: Option<&'a SealedSecrets>,
    pub record_failures: Option<bool>,
}

/// The setting names whose values differ between `before` and `after` (added, removed or changed).
fn changed_settings(
    before: &serde_json::Map<String, serde_json::Value>,
    after: &serde_json::Map<String, serde_json::Value>,
) -> Vec<String> {
    let mut names: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|name| before.get(*name) != after.get(*name))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

/// What an installation needs to run: its version's component and the grants.
#[derive(Debug, Clone)]
pub struct Runnable {
    pub installation: Installation,
    /// The plugin's author: its calls to its own plugin are neither charged nor earn it anything.
    pub author: TenantId,
    pub sha256: String,
    /// The installation's sealed secrets, as stored.
    pub sealed_secrets: String,
}

impl Store {
    /// Creates a listing owned by the author's tenant.
    pub async fn create_plugin(
        &self,
        author: &TenantId,
        who: &Who,
        name: &str,
        description: &str,
    ) -> Result<Plugin> {
        validate_plugin_name(name)?;
        if description.len() > 2_000 {
            return Err(StoreError::invalid("description: at most 2000 bytes"));
        }
        let txn = self.write_transaction().await?;
        let id = PluginId::new();
        let now = Utc::now();
        let inserted = plugins::ActiveModel {
            id: Set(id.to_string()),
            author_tenant_id: Set(author.to_string()),
            name: Set(name.to_owned()),
            description: Set(description.to_owned()),
            created_at: Set(now),
        }
        .insert(&txn)
        .await;
        match inserted {
            Err(err) if crate::is_unique_violation(&err) => {
                return Err(StoreError::Refused(
                    ErrorCode::ValidationFailed,
                    format!("name: a plugin named `{name}` already exists"),
                ));
            }
            other => other?,
        };
        crate::audit::record(
            &txn,
            Some(author),
            who,
            "plugin.create",
            Some(id.as_str()),
            serde_json::Value::Null,
        )
        .await?;
        txn.commit().await?;
        Ok(Plugin {
            id,
            name: name.to_owned(),
            description: description.to_owned(),
            versions: Vec::new(),
            created_at: now,
        })
    }

    async fn plugin_named(&self, name: &str) -> Result<plugins::Model> {
        plugins::Entity::find()
            .filter(plugins::Column::Name.eq(name))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("plugin"))
    }

    /// The listing `name` if the caller's tenant authored it (another author's is not found).
    pub async fn authored_plugin(&self, author: &TenantId, name: &str) -> Result<Plugin> {
        let row = self.plugin_named(name).await?;
        if row.author_tenant_id != author.as_str() {
            return Err(StoreError::NotFound("plugin"));
        }
        self.with_versions(row, false).await
    }

    /// Every listing `author` owns, with all their versions, by name.
    pub async fn authored_plugins(&self, author: &TenantId) -> Result<Vec<Plugin>> {
        let rows = plugins::Entity::find()
            .filter(plugins::Column::AuthorTenantId.eq(author.as_str()))
            .order_by_asc(plugins::Column::Name)
            .all(self.db())
            .await?;
        let mut listed = Vec::with_capacity(rows.len());
        for row in rows {
            listed.push(self.with_versions(row, false).await?);
        }
        Ok(listed)
    }

    async fn with_versions(&self, row: plugins::Model, approved_only: bool) -> Result<Plugin> {
        let mut query = plugin_versions::Entity::find().filter(plugin_versions::Column::PluginId.eq(&row.id));
        if approved_only {
            query = query.filter(plugin_versions::Column::Status.eq("approved"));
        }
        let mut versions = query
            .all(self.db())
            .await?
            .into_iter()
            .map(|v| to_version(&row.name, v))
            .collect::<Result<Vec<_>>>()?;
        versions.sort_by_key(|v| std::cmp::Reverse(parse_semver(&v.version)));
        Ok(Plugin {
            id: parse_id(&row.id)?,
            name: row.name,
            description: row.description,
            versions,
            created_at: row.created_at,
        })
    }

    /// Records a version that passed the automatic checks; it waits for review.
    pub async fn publish_version(
        &self,
        author: &TenantId,
        who: &Who,
        manifest: &PluginManifest,
        sha256: &str,
        size_bytes: u64,
        checks: &serde_json::Value,
    ) -> Result<PluginVersion> {
        let plugin = self.authored_plugin(author, &manifest.name).await?;
        let txn = self.write_transaction().await?;
        let id = PluginVersionId::new();
        let inserted = plugin_versions::ActiveModel {
            id: Set(id.to_string()),
            plugin_id: Set(plugin.id.to_string()),
            version: Set(manifest.version.clone()),
            wit_version: Set(manifest.wit_version.clone()),
            capabilities: Set(capabilities_str(&manifest.capabilities)),
            models: Set(serde_json::to_string(&manifest.models).unwrap_or_else(|_| "[]".into())),
            price_per_call_micros: Set(manifest.price_per_call_micros),
            sha256: Set(sha256.to_owned()),
            size_bytes: Set(i64::try_from(size_bytes).unwrap_or(i64::MAX)),
            status: Set(status_str(ReviewStatus::Pending).to_owned()),
            checks: Set(checks.to_string()),
            review_note: Set(None),
            created_at: Set(Utc::now()),
            reviewed_at: Set(None),
        }
        .insert(&txn)
        .await;
        let row = match inserted {
            Err(err) if crate::is_unique_violation(&err) => {
                return Err(StoreError::Refused(
                    ErrorCode::ValidationFailed,
                    format!(
                        "version: {} {} is already published; versions are immutable",
                        manifest.name, manifest.version
                    ),
                ));
            }
            other => other?,
        };
        crate::audit::record(
            &txn,
            Some(author),
            who,
            "plugin.publish",
            Some(id.as_str()),
            serde_json::json!({ "plugin": manifest.name, "version": manifest.version, "sha256": sha256 }),
        )
        .await?;
        txn.commit().await?;
        to_version(&manifest.name, row)
    }

    /// A platform admin approves or rejects a version. Rejecting an approved version stops the
    /// installations running it, as revoking does; a revoked version stays revoked.
    pub async fn review_version(
        &self,
        who: &Who,
        version: &PluginVersionId,
        approve: bool,
        note: Option<String>,
    ) -> Result<PluginVersion> {
        let txn = self.write_transaction().await?;
        let row = plugin_versions::Entity::find_by_id(version.as_str())
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("plugin version"))?;
        if row.status == status_str(ReviewStatus::Revoked) {
            return Err(StoreError::Refused(
                ErrorCode::ValidationFailed,
                "this version was revoked, which is final; the author can publish a new version".into(),
            ));
        }
        let plugin = plugins::Entity::find_by_id(row.plugin_id.as_str())
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("plugin"))?;
        let status = if approve {
            ReviewStatus::Approved
        } else {
            ReviewStatus::Rejected
        };
        let was = row.status.clone();
        let mut model: plugin_versions::ActiveModel = row.into();
        model.status = Set(status_str(status).to_owned());
        model.review_note = Set(note.clone());
        model.reviewed_at = Set(Some(Utc::now()));
        let row = model.update(&txn).await?;
        crate::audit::record_operator_act(
            &txn,
            &parse_id(&plugin.author_tenant_id)?,
            who,
            if approve {
                "plugin.approve"
            } else {
                "plugin.reject"
            },
            Some(version.as_str()),
            serde_json::json!({ "plugin": plugin.name, "version": row.version, "was": was, "note": note }),
        )
        .await?;
        txn.commit().await?;
        to_version(&plugin.name, row)
    }

    /// Pulls a version after approval (a platform admin's kill switch): installations running it stop
    /// at once, on every replica, since each invocation reads the version's status; it leaves the
    /// marketplace. Revoking is final.
    pub async fn revoke_version(
        &self,
        who: &Who,
        version: &PluginVersionId,
        reason: &str,
    ) -> Result<PluginVersion> {
        let reason = reason.trim();
        if reason.is_empty() || reason.chars().count() > 1_000 {
            return Err(StoreError::invalid("reason: 1-1000 characters"));
        }
        let txn = self.write_transaction().await?;
        let row = plugin_versions::Entity::find_by_id(version.as_str())
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("plugin version"))?;
        let plugin = plugins::Entity::find_by_id(row.plugin_id.as_str())
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("plugin"))?;
        let was = row.status.clone();
        let mut model: plugin_versions::ActiveModel = row.into();
        model.status = Set(status_str(ReviewStatus::Revoked).to_owned());
        model.review_note = Set(Some(reason.to_owned()));
        model.reviewed_at = Set(Some(Utc::now()));
        let row = model.update(&txn).await?;
        let running = installations::Entity::find()
            .filter(installations::Column::VersionId.eq(version.as_str()))
            .filter(installations::Column::DeletedAt.is_null())
            .count(&txn)
            .await?;
        crate::audit::record_operator_act(
            &txn,
            &parse_id(&plugin.author_tenant_id)?,
            who,
            "plugin.revoke",
            Some(version.as_str()),
            serde_json::json!({ "plugin": plugin.name, "version": row.version, "was": was,
                "reason": reason, "installations": running }),
        )
        .await?;
        txn.commit().await?;
        to_version(&plugin.name, row)
    }

    /// Versions waiting for review, oldest first (platform admins).
    pub async fn pending_versions(&self) -> Result<Vec<PluginVersion>> {
        let rows = plugin_versions::Entity::find()
            .filter(plugin_versions::Column::Status.eq("pending"))
            .order_by_asc(plugin_versions::Column::CreatedAt)
            .all(self.db())
            .await?;
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            let plugin = plugins::Entity::find_by_id(row.plugin_id.as_str())
                .one(self.db())
                .await?
                .ok_or(StoreError::NotFound("plugin"))?;
            versions.push(to_version(&plugin.name, row)?);
        }
        Ok(versions)
    }

    /// The marketplace: listings with at least one approved version, matching `query` in the name or
    /// description, with their approved versions (newest first).
    pub async fn marketplace(&self, query: Option<&str>) -> Result<Vec<Plugin>> {
        let mut select = plugins::Entity::find().order_by_asc(plugins::Column::Name);
        if let Some(query) = query.map(str::trim).filter(|q| !q.is_empty()) {
            let pattern = format!("%{}%", query.to_lowercase().replace(['%', '_'], ""));
            let lower = |column: plugins::Column| Expr::expr(Func::lower(Expr::col(column)));
            select = select.filter(
                Condition::any()
                    .add(lower(plugins::Column::Name).like(pattern.clone()))
                    .add(lower(plugins::Column::Description).like(pattern)),
            );
        }
        let mut listed = Vec::new();
        for row in select.limit(200).all(self.db()).await? {
            let plugin = self.with_versions(row, true).await?;
            if !plugin.versions.is_empty() {
                listed.push(plugin);
            }
        }
        Ok(listed)
    }

    /// An approved version of a listing: the one named, or the newest.
    pub async fn approved_version(&self, plugin: &str, version: Option<&str>) -> Result<PluginVersion> {
        let row = self.plugin_named(plugin).await?;
        let all = self.with_versions(row, false).await?;
        let wanted = match version {
            Some(version) => all
                .versions
                .into_iter()
                .find(|v| v.version == version)
                .ok_or(StoreError::NotFound("plugin version"))?,
            None => all
                .versions
                .into_iter()
                .find(|v| v.status == ReviewStatus::Approved)
                .ok_or_else(|| {
                    StoreError::Refused(
                        ErrorCode::PluginNotApproved,
                        format!("`{plugin}` has no approved version yet"),
                    )
                })?,
        };
        if wanted.status != ReviewStatus::Approved {
            return Err(StoreError::Refused(
                ErrorCode::PluginNotApproved,
                format!("{plugin} {} is not approved for installation", wanted.version),
            ));
        }
        Ok(wanted)
    }

    /// Installs an approved version in a tenant. The grants must cover what the manifest asks for.
    pub async fn install(
        &self,
        tenant: &TenantId,
        who: &Who,
        version: &PluginVersion,
        settings: &serde_json::Map<String, serde_json::Value>,
        secrets: &SealedSecrets,
        record_failures: bool,
    ) -> Result<Installation> {
        let txn = self.write_transaction().await?;
        let plugin = self.plugin_named(&version.plugin).await?;
        let existing = installations::Entity::find_in(tenant)
            .filter(installations::Column::PluginId.eq(&plugin.id))
            .filter(installations::Column::DeletedAt.is_null())
            .count(&txn)
            .await?;
        if existing > 0 {
            return Err(StoreError::Refused(
                ErrorCode::ValidationFailed,
                format!(
                    "plugin: `{}` is already installed; upgrade that installation instead",
                    version.plugin
                ),
            ));
        }
        let id = InstallationId::new();
        let now = Utc::now();
        installations::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(tenant.to_string()),
            plugin_id: Set(plugin.id.clone()),
            version_id: Set(version.id.to_string()),
            settings: Set(serde_json::Value::Object(settings.clone()).to_string()),
            secrets: Set(secrets.sealed.clone()),
            record_failures: Set(record_failures),
            created_at: Set(now),
            updated_at: Set(now),
            deleted_at: Set(None),
        }
        .insert(&txn)
        .await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "plugin.install",
            Some(id.as_str()),
            serde_json::json!({ "plugin": version.plugin, "version": version.version,
                "capabilities": version.capabilities, "models": version.models,
                "settings": settings.keys().collect::<Vec<_>>(), "secrets": secrets.names,
                "record_failures": record_failures }),
        )
        .await?;
        txn.commit().await?;
        Ok(self.runnable(tenant, &id).await?.installation)
    }

    /// Changes an installation's version, settings, secrets or recording (each when given).
    pub async fn update_installation(
        &self,
        tenant: &TenantId,
        who: &Who,
        installation: &InstallationId,
        change: InstallationChange<'_>,
    ) -> Result<Installation> {
        let InstallationChange {
            version,
            settings,
            secrets,
            record_failures,
        } = change;
        let txn = self.write_transaction().await?;
        let row = live_installation(&txn, tenant, installation).await?;
        let settings_changed = settings.map(|after| match serde_json::from_str(&row.settings) {
            Ok(serde_json::Value::Object(before)) => changed_settings(&before, after),
            _ => after.keys().cloned().collect(),
        });
        let mut model: installations::ActiveModel = row.into();
        if let Some(version) = version {
            model.version_id = Set(version.id.to_string());
        }
        if let Some(settings) = settings {
            model.settings = Set(serde_json::Value::Object(settings.clone()).to_string());
        }
        if let Some(secrets) = secrets {
            model.secrets = Set(secrets.sealed.clone());
        }
        if let Some(record_failures) = record_failures {
            model.record_failures = Set(record_failures);
        }
        model.updated_at = Set(Utc::now());
        model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "plugin.update",
            Some(installation.as_str()),
            serde_json::json!({ "version": version.map(|v| v.version.clone()),
                "settings_changed": settings_changed, "secrets": secrets.map(|s| &s.names),
                "record_failures": record_failures }),
        )
        .await?;
        txn.commit().await?;
        Ok(self.runnable(tenant, installation).await?.installation)
    }

    /// The most recently changed installation secrets, sealed: what a starting replica must be able
    /// to open (every tenant's rows, on purpose).
    pub async fn latest_sealed_secrets(&self) -> Result<Option<String>> {
        Ok(installations::Entity::find()
            .filter(installations::Column::Secrets.ne(""))
            .filter(installations::Column::DeletedAt.is_null())
            .order_by_desc(installations::Column::UpdatedAt)
            .one(self.db())
            .await?
            .map(|row| row.secrets))
    }

    /// Reseals the installations' secrets that are not sealed under `secrets`' primary key: the last
    /// step of a key rotation, run by an operator over every tenant. Returns how many were resealed.
    /// A row changed meanwhile keeps its new value (sealed under the primary key already).
    pub async fn reseal_installation_secrets(&self, secrets: &crate::SecretBox) -> Result<u64> {
        const PAGE: u64 = 500;
        let mut resealed = 0;
        let mut after = String::new();
        loop {
            // Every tenant's rows, on purpose: a rotation covers the whole platform.
            let rows = installations::Entity::find()
                .filter(installations::Column::Id.gt(after.as_str()))
                .order_by_asc(installations::Column::Id)
                .limit(PAGE)
                .all(self.db())
                .await?;
            let Some(last) = rows.last() else {
                return Ok(resealed);
            };
            after = last.id.clone();
            for row in rows {
                if row.secrets.is_empty() || !secrets.needs_resealing(&row.secrets) {
                    continue;
                }
                let sealed = secrets.seal(&secrets.open(&row.secrets)?)?;
                let updated = installations::Entity::update_many()
                    .col_expr(installations::Column::Secrets, Expr::value(sealed))
                    .filter(installations::Column::Id.eq(&row.id))
                    .filter(installations::Column::Secrets.eq(&row.secrets))
                    .exec(self.db())
                    .await?;
                resealed += updated.rows_affected;
            }
        }
    }

    /// Removes an installation, its key-value state and its invocation records.
    pub async fn uninstall(&self, tenant: &TenantId, who: &Who, installation: &InstallationId) -> Result<()> {
        let txn = self.write_transaction().await?;
        let row = live_installation(&txn, tenant, installation).await?;
        let id = row.id.clone();
        // Marked removed first: that takes the row's lock, which an invocation record being written
        // holds meanwhile, so the deletes below see every record that made it in.
        let mut model: installations::ActiveModel = row.into();
        model.deleted_at = Set(Some(Utc::now()));
        model.secrets = Set(String::new());
        model.update(&txn).await?;
        plugin_kv::Entity::delete_many()
            .filter(plugin_kv::Column::InstallationId.eq(&id))
            .exec(&txn)
            .await?;
        // Its invocation records go with it: their logs may echo the secrets removed here.
        crate::entity::plugin_invocations::Entity::delete_many()
            .filter(crate::entity::plugin_invocations::Column::InstallationId.eq(&id))
            .exec(&txn)
            .await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "plugin.uninstall",
            Some(installation.as_str()),
            serde_json::Value::Null,
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    /// The tenant's installations.
    pub async fn installations(&self, tenant: &TenantId) -> Result<Vec<Installation>> {
        let rows = installations::Entity::find_in(tenant)
            .filter(installations::Column::DeletedAt.is_null())
            .order_by_asc(installations::Column::CreatedAt)
            .all(self.db())
            .await?;
        let mut listed = Vec::with_capacity(rows.len());
        for row in rows {
            listed.push(self.resolve(row).await?.installation);
        }
        Ok(listed)
    }

    /// An installation with what running it needs.
    pub async fn runnable(&self, tenant: &TenantId, installation: &InstallationId) -> Result<Runnable> {
        let row = live_installation(self.db(), tenant, installation).await?;
        self.resolve(row).await
    }

    /// An installation row with its version and listing.
    async fn resolve(&self, row: installations::Model) -> Result<Runnable> {
        let version = plugin_versions::Entity::find_by_id(row.version_id.as_str())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("plugin version"))?;
        let plugin = plugins::Entity::find_by_id(version.plugin_id.as_str())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("plugin"))?;
        let sha256 = version.sha256.clone();
        let version = to_version(&plugin.name, version)?;
        let settings = match serde_json::from_str(&row.settings) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => serde_json::Map::new(),
        };
        Ok(Runnable {
            installation: Installation {
                id: parse_id(&row.id)?,
                plugin: plugin.name,
                version: version.version,
                version_id: version.id,
                capabilities: version.capabilities,
                models: version.models,
                price_per_call: version.price_per_call,
                version_status: version.status,
                version_note: version.review_note,
                settings,
                secret_names: Vec::new(),
                record_failures: row.record_failures,
                created_at: row.created_at,
                updated_at: row.updated_at,
            },
            author: parse_id(&plugin.author_tenant_id)?,
            sha256,
            sealed_secrets: row.secrets,
        })
    }

    /// The component hash of every version (to compile approved ones at start-up).
    pub async fn plugin_components(&self) -> Result<Vec<(PluginVersionId, String)>> {
        let rows = plugin_versions::Entity::find().all(self.db()).await?;
        rows.into_iter()
            .map(|row| Ok((parse_id(&row.id)?, row.sha256)))
            .collect()
    }

    pub async fn kv_get(&self, installation: &str, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(
            plugin_kv::Entity::find_by_id((installation.to_owned(), key.to_owned()))
                .one(self.db())
                .await?
                .map(|row| row.value),
        )
    }

    /// Stores a value, refusing a new key once the installation holds `max_keys`.
    pub async fn kv_set(&self, installation: &str, key: &str, value: Vec<u8>, max_keys: u64) -> Result<()> {
        let txn = self.write_transaction().await?;
        kv_turn(&txn, installation).await?;
        let exists = plugin_kv::Entity::find_by_id((installation.to_owned(), key.to_owned()))
            .count(&txn)
            .await?
            > 0;
        if !exists {
            let held = plugin_kv::Entity::find()
                .filter(plugin_kv::Column::InstallationId.eq(installation))
                .count(&txn)
                .await?;
            if held >= max_keys {
                return Err(StoreError::Refused(
                    ErrorCode::PluginLimitExceeded,
                    format!("the installation already holds {max_keys} keys"),
                ));
            }
        }
        plugin_kv::Entity::insert(plugin_kv::ActiveModel {
            installation_id: Set(installation.to_owned()),
            key: Set(key.to_owned()),
            value: Set(value),
            updated_at: Set(Utc::now()),
        })
        .on_conflict(
            OnConflict::columns([plugin_kv::Column::InstallationId, plugin_kv::Column::Key])
                .update_columns([plugin_kv::Column::Value, plugin_kv::Column::UpdatedAt])
                .to_owned(),
        )
        .exec(&txn)
        .await?;
        txn.commit().await?;
        Ok(())
    }

    pub async fn kv_delete(&self, installation: &str, key: &str) -> Result<bool> {
        let txn = self.write_transaction().await?;
        kv_turn(&txn, installation).await?;
        let deleted = plugin_kv::Entity::delete_by_id((installation.to_owned(), key.to_owned()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(deleted.rows_affected > 0)
    }

    /// An installation's keys that start with `prefix`, byte for byte (the first 1,000 in order).
    pub async fn kv_list(&self, installation: &str, prefix: &str) -> Result<Vec<String>> {
        // `%` and `_` in a prefix are themselves, not wildcards; SQLite's LIKE ignores ASCII case, so
        // what it matches is checked again here.
        let mut pattern = String::with_capacity(prefix.len() + 1);
        for c in prefix.chars() {
            if matches!(c, '%' | '_' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('%');
        let rows = plugin_kv::Entity::find()
            .filter(plugin_kv::Column::InstallationId.eq(installation))
            .filter(plugin_kv::Column::Key.like(LikeExpr::new(pattern).escape('\\')))
            .order_by_asc(plugin_kv::Column::Key)
            .limit(1_000)
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| row.key)
            .filter(|key| key.starts_with(prefix))
            .collect())
    }
}

/// Waits for the installation's turn to write its key-value store, held until `txn` ends: its writes
/// take turns, so concurrent invocations (on any replica) cannot each count room for one more key and
/// pass the limit together, nor a delete free a key between a write's look and its insert. (SQLite's
/// write transaction already serialises them; the lock also lets the inserts' foreign-key checks
/// through.) An uninstalled installation writes nothing.
async fn kv_turn(txn: &DatabaseTransaction, installation: &str) -> Result<()> {
    installations::Entity::find_by_id(installation.to_owned())
        .filter(installations::Column::DeletedAt.is_null())
        .lock(LockType::NoKeyUpdate)
        .one(txn)
        .await?
        .ok_or(StoreError::NotFound("installation"))?;
    Ok(())
}

/// Checks a manifest's own fields (the component is checked by the host).
///
/// # Errors
/// The first field that is wrong, by name.
pub fn validate_manifest(manifest: &PluginManifest) -> Result<()> {
    validate_plugin_name(&manifest.name)?;
    if parse_semver(&manifest.version).is_none() {
        return Err(StoreError::invalid(
            "version: must be a semantic version like 1.2.0",
        ));
    }
    if manifest.price_per_call_micros < 0 || manifest.price_per_call_micros > 100_000_000 {
        return Err(StoreError::invalid(
            "price_per_call_micros: must be 0 to 100000000 (100 currency units)",
        ));
    }
    if manifest.models.len() > 16 || manifest.models.iter().any(|m| m.is_empty() || m.len() > 100) {
        return Err(StoreError::invalid("models: at most 16 names of 1-100 bytes"));
    }
    if !manifest.models.is_empty() && !manifest.capabilities.contains(&Capability::Inference) {
        return Err(StoreError::invalid(
            "models: a plugin that calls models must declare the `inference` capability",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_settings_name_what_was_added_removed_or_changed() {
        let before = serde_json::json!({ "a": 1, "b": 2, "c": 3 });
        let after = serde_json::json!({ "a": 1, "b": 5, "d": 4 });
        assert_eq!(
            changed_settings(before.as_object().unwrap(), after.as_object().unwrap()),
            ["b", "c", "d"]
        );
    }
}
