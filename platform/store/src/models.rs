//! The registry of tenants' uploaded models: immutable, numbered versions of content-addressed files.

use chrono::Utc;
use plinth_core::ErrorCode;
use plinth_core::api::PlanIsolation;
use plinth_core::id::{ModelId, TenantId};
use plinth_core::inference::Signature;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::accounts::parse_id;
use crate::audit::Who;
use crate::entity::{TenantScoped, models, tenants};
use crate::{Result, Store, StoreError};

/// One stored version of a tenant's model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRecord {
    pub id: ModelId,
    pub tenant_id: TenantId,
    pub name: String,
    pub version: u32,
    /// `text-classification`, `embedding` or `raw`.
    pub task: String,
    pub labels: Vec<String>,
    pub sha256: String,
    pub size_bytes: u64,
    pub tokenizer_sha256: Option<String>,
    /// The graph's inputs and outputs; `None` for a version registered before signatures were kept
    /// (or one whose stored signature cannot be read): loading it finds them.
    pub signature: Option<Signature>,
}

/// What an upload registers.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub name: String,
    pub task: String,
    pub labels: Vec<String>,
    pub sha256: String,
    pub size_bytes: u64,
    pub tokenizer_sha256: Option<String>,
    pub signature: Signature,
}

fn to_record(row: models::Model) -> Result<ModelRecord> {
    Ok(ModelRecord {
        id: parse_id(&row.id)?,
        tenant_id: parse_id(&row.tenant_id)?,
        labels: serde_json::from_str(&row.labels)
            .map_err(|err| StoreError::Internal(format!("corrupt labels: {err}")))?,
        version: u32::try_from(row.version).unwrap_or(0),
        size_bytes: u64::try_from(row.size_bytes).unwrap_or(0),
        name: row.name,
        task: row.task,
        sha256: row.sha256,
        tokenizer_sha256: row.tokenizer_sha256,
        // Unreadable is as good as missing: the version is loaded to find it, rather than one row
        // keeping the registry from being read.
        signature: row.signature.and_then(|json| serde_json::from_str(&json).ok()),
    })
}

fn signature_json(signature: &Signature) -> String {
    serde_json::to_string(signature).unwrap_or_else(|_| "null".to_owned())
}

fn quota_exceeded(message: String) -> StoreError {
    StoreError::Refused(ErrorCode::ModelQuotaExceeded, message)
}

/// Whether one more version of `model` (of `size_bytes`) fits the plan's quota, over the tenant's live
/// versions.
async fn check_quota(
    db: &impl ConnectionTrait,
    tenant: &TenantId,
    name: &str,
    size_bytes: u64,
    quota: &PlanIsolation,
) -> Result<()> {
    let live: Vec<(String, i64)> = models::Entity::find_in(tenant)
        .select_only()
        .column(models::Column::Name)
        .column(models::Column::SizeBytes)
        .filter(models::Column::DeletedAt.is_null())
        .into_tuple()
        .all(db)
        .await?;
    let mut names: Vec<&str> = live.iter().map(|(name, _)| name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    if !names.contains(&name) && names.len() >= quota.max_models as usize {
        return Err(quota_exceeded(format!(
            "the plan keeps {} uploaded models: delete one, or move to a larger plan",
            quota.max_models
        )));
    }
    let versions = live.iter().filter(|(n, _)| n == name).count();
    if versions >= quota.max_model_versions as usize {
        return Err(quota_exceeded(format!(
            "the plan keeps {} versions of a model: delete old versions of `{name}`, or move to a larger plan",
            quota.max_model_versions
        )));
    }
    let used: u64 = live
        .iter()
        .map(|(_, size)| u64::try_from(*size).unwrap_or(0))
        .fold(0, u64::saturating_add);
    if used.saturating_add(size_bytes) > quota.max_model_bytes {
        return Err(quota_exceeded(format!(
            "the plan keeps {} bytes of models and {used} are used; this upload has {size_bytes}",
            quota.max_model_bytes
        )));
    }
    Ok(())
}

impl Store {
    /// Refuses (`model_quota_exceeded`) an upload of `size_bytes` to `name` that would not fit the
    /// quota now. A check before the expensive work; [`Self::register_model`] checks again, atomically.
    pub async fn check_model_quota(
        &self,
        tenant: &TenantId,
        name: &str,
        size_bytes: u64,
        quota: &PlanIsolation,
    ) -> Result<()> {
        check_quota(self.db(), tenant, name, size_bytes, quota).await
    }

    /// Records a new version of `model.name` for the tenant (1 for a new name), if it fits `quota`.
    pub async fn register_model(
        &self,
        tenant: &TenantId,
        who: &Who,
        model: &NewModel,
        quota: &PlanIsolation,
    ) -> Result<ModelRecord> {
        let txn = self.write_transaction().await?;
        // Concurrent uploads of one tenant take turns here, so together they cannot pass the quota
        // (SQLite's write transaction already serialises them).
        tenants::Entity::find_by_id(tenant.to_string())
            .lock_exclusive()
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("tenant"))?;
        check_quota(&txn, tenant, &model.name, model.size_bytes, quota).await?;
        let latest = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(&model.name))
            .order_by_desc(models::Column::Version)
            .one(&txn)
            .await?;
        let version = latest.map_or(1, |row| row.version + 1);
        let id = ModelId::new();
        let inserted = models::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(tenant.to_string()),
            name: Set(model.name.clone()),
            version: Set(version),
            task: Set(model.task.clone()),
            labels: Set(serde_json::to_string(&model.labels).unwrap_or_else(|_| "[]".to_owned())),
            sha256: Set(model.sha256.clone()),
            size_bytes: Set(i64::try_from(model.size_bytes).unwrap_or(i64::MAX)),
            tokenizer_sha256: Set(model.tokenizer_sha256.clone()),
            created_at: Set(Utc::now()),
            deleted_at: Set(None),
            signature: Set(Some(signature_json(&model.signature))),
        }
        .insert(&txn)
        .await;
        let row = match inserted {
            Err(err) if crate::is_unique_violation(&err) => {
                return Err(StoreError::invalid(
                    "another upload of this model finished first; retry",
                ));
            }
            other => other?,
        };
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "model.upload",
            Some(id.as_str()),
            serde_json::json!({ "name": model.name, "version": version, "sha256": model.sha256 }),
        )
        .await?;
        self.announce_catalog_change(&txn).await?;
        txn.commit().await?;
        to_record(row)
    }

    /// Keeps the signature found by loading a version registered without one.
    pub async fn record_model_signature(
        &self,
        tenant: &TenantId,
        model: &ModelId,
        signature: &Signature,
    ) -> Result<()> {
        let updated = models::Entity::update_many()
            .col_expr(
                models::Column::Signature,
                sea_orm::sea_query::Expr::value(signature_json(signature)),
            )
            .filter(models::Column::TenantId.eq(tenant.to_string()))
            .filter(models::Column::Id.eq(model.to_string()))
            .exec(self.db())
            .await?;
        if updated.rows_affected == 0 {
            return Err(StoreError::NotFound("model version"));
        }
        Ok(())
    }

    /// The newest live version number of every tenant model: tenant, name, version (what a replica
    /// compares its catalogue with, often; the records themselves are read only for what changed).
    pub async fn live_model_versions(&self) -> Result<Vec<(TenantId, String, u32)>> {
        let rows: Vec<(String, String, Option<i32>)> = crate::row_security::across_tenants(
            models::Entity::find()
                .select_only()
                .column(models::Column::TenantId)
                .column(models::Column::Name)
                .column_as(models::Column::Version.max(), "version")
                .filter(models::Column::DeletedAt.is_null())
                .group_by(models::Column::TenantId)
                .group_by(models::Column::Name)
                .into_tuple()
                .all(self.db()),
        )
        .await?;
        rows.into_iter()
            .map(|(tenant, name, version)| {
                Ok((
                    parse_id(&tenant)?,
                    name,
                    version.and_then(|v| u32::try_from(v).ok()).unwrap_or(0),
                ))
            })
            .collect()
    }

    /// The newest live version of every tenant model, for a replica's catalogue.
    pub async fn live_models(&self) -> Result<Vec<ModelRecord>> {
        let rows = crate::row_security::across_tenants(
            models::Entity::find()
                .filter(models::Column::DeletedAt.is_null())
                .order_by_asc(models::Column::TenantId)
                .order_by_asc(models::Column::Name)
                .order_by_desc(models::Column::Version)
                .all(self.db()),
        )
        .await?;
        let mut latest: Vec<models::Model> = Vec::new();
        for row in rows {
            if !latest
                .last()
                .is_some_and(|last| last.tenant_id == row.tenant_id && last.name == row.name)
            {
                latest.push(row);
            }
        }
        latest.into_iter().map(to_record).collect()
    }

    /// One live version of a tenant's model.
    pub async fn model_version(&self, tenant: &TenantId, name: &str, version: u32) -> Result<ModelRecord> {
        let row = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(name))
            .filter(models::Column::Version.eq(i32::try_from(version).unwrap_or(i32::MAX)))
            .filter(models::Column::DeletedAt.is_null())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("model version"))?;
        to_record(row)
    }

    /// The live version numbers of a tenant's model, oldest first.
    pub async fn model_versions(&self, tenant: &TenantId, name: &str) -> Result<Vec<u32>> {
        let rows = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(name))
            .filter(models::Column::DeletedAt.is_null())
            .order_by_asc(models::Column::Version)
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| u32::try_from(row.version).ok())
            .collect())
    }

    /// Deletes one version of a tenant's model, not its newest (delete the model for that).
    pub async fn delete_model_version(
        &self,
        tenant: &TenantId,
        who: &Who,
        name: &str,
        version: u32,
    ) -> Result<ModelRecord> {
        let txn = self.write_transaction().await?;
        let rows = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(name))
            .filter(models::Column::DeletedAt.is_null())
            .order_by_desc(models::Column::Version)
            .all(&txn)
            .await?;
        let wanted = i32::try_from(version).unwrap_or(i32::MAX);
        let Some(position) = rows.iter().position(|row| row.version == wanted) else {
            return Err(StoreError::NotFound("model version"));
        };
        if position == 0 {
            return Err(StoreError::invalid(format!(
                "version {version} is the newest version of `{name}`, the one served: upload a newer one first, or delete the model"
            )));
        }
        let row = rows
            .into_iter()
            .nth(position)
            .ok_or(StoreError::NotFound("model version"))?;
        let mut model: models::ActiveModel = row.clone().into();
        model.deleted_at = Set(Some(Utc::now()));
        model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "model.delete_version",
            Some(row.id.as_str()),
            serde_json::json!({ "name": name, "version": version }),
        )
        .await?;
        self.announce_catalog_change(&txn).await?;
        txn.commit().await?;
        to_record(row)
    }

    /// Whether any live model version, of any tenant, uses the file with this content hash (as its
    /// model or its tokenizer). Files nothing uses can be removed.
    pub async fn model_file_in_use(&self, sha256: &str) -> Result<bool> {
        // Files are shared by content across tenants: another tenant's use keeps one.
        crate::row_security::across_tenants(self.file_used_by_anyone(sha256)).await
    }

    async fn file_used_by_anyone(&self, sha256: &str) -> Result<bool> {
        let used = models::Entity::find()
            .filter(models::Column::DeletedAt.is_null())
            .filter(
                sea_orm::Condition::any()
                    .add(models::Column::Sha256.eq(sha256))
                    .add(models::Column::TokenizerSha256.eq(sha256)),
            )
            .one(self.db())
            .await?;
        Ok(used.is_some())
    }

    /// The files (content hashes) of every version of a tenant's model, live or not.
    pub async fn model_files(&self, tenant: &TenantId, name: &str) -> Result<Vec<String>> {
        let rows = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(name))
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .flat_map(|row| std::iter::once(row.sha256).chain(row.tokenizer_sha256))
            .collect())
    }

    /// Deletes every version of a tenant's model (kept as history, no longer served).
    pub async fn delete_model(&self, tenant: &TenantId, who: &Who, name: &str) -> Result<()> {
        let txn = self.write_transaction().await?;
        let rows = models::Entity::find_in(tenant)
            .filter(models::Column::Name.eq(name))
            .filter(models::Column::DeletedAt.is_null())
            .all(&txn)
            .await?;
        if rows.is_empty() {
            return Err(StoreError::NotFound("model"));
        }
        let now = Utc::now();
        for row in rows {
            let mut model: models::ActiveModel = row.into();
            model.deleted_at = Set(Some(now));
            model.update(&txn).await?;
        }
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "model.delete",
            Some(name),
            serde_json::Value::Null,
        )
        .await?;
        self.announce_catalog_change(&txn).await?;
        txn.commit().await?;
        Ok(())
    }
}

impl Store {
    /// Tells every replica, once the transaction commits, that the model registry changed (Postgres
    /// `NOTIFY`; replicas on SQLite find out by polling).
    async fn announce_catalog_change(&self, txn: &sea_orm::DatabaseTransaction) -> Result<()> {
        if self.backend() == sea_orm::DbBackend::Postgres {
            sea_orm::ConnectionTrait::execute_unprepared(txn, &format!("NOTIFY {}", self.catalog_channel))
                .await?;
        }
        Ok(())
    }

    /// Announcements of model registry changes, where the database makes them (Postgres).
    ///
    /// # Errors
    /// When the listening connection cannot be opened.
    pub async fn catalog_changes(&self) -> Result<Option<CatalogChanges>> {
        if self.backend() != sea_orm::DbBackend::Postgres {
            return Ok(None);
        }
        let fail = |err: sea_orm::sqlx::Error| {
            StoreError::Internal(format!("cannot listen for catalogue changes: {err}"))
        };
        let mut listener =
            sea_orm::sqlx::postgres::PgListener::connect_with(self.db().get_postgres_connection_pool())
                .await
                .map_err(fail)?;
        listener.listen(&self.catalog_channel).await.map_err(fail)?;
        Ok(Some(CatalogChanges(listener)))
    }
}

/// A connection that hears when any replica changes the model registry.
#[derive(Debug)]
pub struct CatalogChanges(sea_orm::sqlx::postgres::PgListener);

impl CatalogChanges {
    /// Waits for the next change. After a lost connection it reconnects (changes meanwhile are missed:
    /// the periodic comparison catches them).
    ///
    /// # Errors
    /// When the connection was lost.
    pub async fn next(&mut self) -> Result<()> {
        self.0
            .recv()
            .await
            .map(|_| ())
            .map_err(|err| StoreError::Internal(format!("catalogue change listener: {err}")))
    }
}
