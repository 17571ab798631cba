//! Invocation records: how each plugin invocation ended, what it cost and what the plugin logged. The
//! newest `keep` of each installation are kept (older ones go as new ones arrive), and none longer
//! than the retention the operator sets. The installing tenant reads them whole; the plugin's author
//! reads only versions, outcomes, durations and costs, never who called, with what, or the logs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use plinth_core::id::{InstallationId, InvocationId, TenantId};
use plinth_core::plugins::{AuthorInvocation, InvocationLog, InvocationRecord};
use sea_orm::sea_query::Query;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};

use crate::accounts::parse_id;
use crate::entity::{TenantScoped, installations, plugin_invocations, plugin_versions, plugins};
use crate::{Result, Store, StoreError, row_security};

/// Most records one listing returns.
pub const MAX_LISTED: u64 = 200;

/// One finished invocation, to record.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    pub tenant: TenantId,
    pub installation: InstallationId,
    pub version_id: String,
    pub request_id: String,
    pub duration_ms: u64,
    pub compute_units: u64,
    /// `ok` or the error code answered.
    pub outcome: String,
    pub message: Option<String>,
    pub logs: Vec<InvocationLog>,
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// Records an invocation and lets the installation's oldest records go beyond the newest `keep`.
    pub async fn record_invocation(&self, record: NewInvocation, keep: u64) -> Result<InvocationId> {
        row_security::within_tenant(&record.tenant, async {
            let version = plugin_versions::Entity::find_by_id(record.version_id.as_str())
                .one(self.db())
                .await?
                .ok_or(StoreError::NotFound("plugin version"))?;
            let id = InvocationId::new();
            let logs = serde_json::to_string(&record.logs)
                .map_err(|err| StoreError::Internal(format!("invocation logs: {err}")))?;
            plugin_invocations::Entity::insert(plugin_invocations::ActiveModel {
                id: Set(id.to_string()),
                tenant_id: Set(record.tenant.to_string()),
                installation_id: Set(record.installation.to_string()),
                plugin_id: Set(version.plugin_id),
                version_id: Set(record.version_id.clone()),
                request_id: Set(record.request_id.clone()),
                occurred_at: Set(Utc::now()),
                duration_ms: Set(to_i64(record.duration_ms)),
                compute_units: Set(to_i64(record.compute_units)),
                outcome: Set(record.outcome.clone()),
                message: Set(record.message.clone()),
                logs: Set(logs),
            })
            .exec_without_returning(self.relaxed())
            .await?;
            // Ids are ULIDs: in the order they were made.
            let newest = Query::select()
                .column(plugin_invocations::Column::Id)
                .from(plugin_invocations::Entity)
                .and_where(plugin_invocations::Column::InstallationId.eq(record.installation.as_str()))
                .order_by(plugin_invocations::Column::Id, sea_orm::Order::Desc)
                .limit(keep.max(1))
                .to_owned();
            plugin_invocations::Entity::delete_many()
                .filter(plugin_invocations::Column::InstallationId.eq(record.installation.as_str()))
                .filter(plugin_invocations::Column::Id.not_in_subquery(newest))
                .exec(self.relaxed())
                .await?;
            Ok(id)
        })
        .await
    }

    /// The newest records of the tenant's installation, newest first (at most `limit`, up to
    /// [`MAX_LISTED`]). Another tenant's installation is not found.
    pub async fn installation_invocations(
        &self,
        tenant: &TenantId,
        installation: &InstallationId,
        limit: u64,
    ) -> Result<Vec<InvocationRecord>> {
        installations::Entity::find_in(tenant)
            .filter(installations::Column::Id.eq(installation.as_str()))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("installation"))?;
        let rows = plugin_invocations::Entity::find_in(tenant)
            .filter(plugin_invocations::Column::InstallationId.eq(installation.as_str()))
            .order_by_desc(plugin_invocations::Column::Id)
            .limit(limit.clamp(1, MAX_LISTED))
            .all(self.db())
            .await?;
        let names = self.version_names(&rows).await?;
        rows.into_iter()
            .map(|row| {
                let (plugin, version) = names.get(&row.version_id).cloned().unwrap_or_default();
                Ok(InvocationRecord {
                    id: parse_id(&row.id)?,
                    installation_id: parse_id(&row.installation_id)?,
                    plugin,
                    version,
                    request_id: row.request_id,
                    occurred_at: row.occurred_at,
                    duration_ms: u64::try_from(row.duration_ms).unwrap_or(0),
                    compute_units: u64::try_from(row.compute_units).unwrap_or(0),
                    outcome: row.outcome,
                    message: row.message,
                    logs: serde_json::from_str(&row.logs)
                        .map_err(|err| StoreError::Internal(format!("invocation logs: {err}")))?,
                })
            })
            .collect()
    }

    /// The newest invocations of the author's plugin `name` in every tenant, newest first: versions,
    /// outcomes, durations and costs only. Another author's plugin is not found.
    pub async fn author_invocations(
        &self,
        author: &TenantId,
        name: &str,
        limit: u64,
    ) -> Result<Vec<AuthorInvocation>> {
        let plugin = plugins::Entity::find()
            .filter(plugins::Column::Name.eq(name))
            .filter(plugins::Column::AuthorTenantId.eq(author.as_str()))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("plugin"))?;
        // The calls were other tenants' by purpose; only what the author may see leaves this function.
        let rows = row_security::across_tenants(
            plugin_invocations::Entity::find()
                .filter(plugin_invocations::Column::PluginId.eq(plugin.id.as_str()))
                .order_by_desc(plugin_invocations::Column::Id)
                .limit(limit.clamp(1, MAX_LISTED))
                .all(self.db()),
        )
        .await?;
        let names = self.version_names(&rows).await?;
        rows.into_iter()
            .map(|row| {
                Ok(AuthorInvocation {
                    id: parse_id(&row.id)?,
                    version: names
                        .get(&row.version_id)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default(),
                    occurred_at: row.occurred_at,
                    duration_ms: u64::try_from(row.duration_ms).unwrap_or(0),
                    compute_units: u64::try_from(row.compute_units).unwrap_or(0),
                    outcome: row.outcome,
                })
            })
            .collect()
    }

    /// Removes records older than `before` (the retention); returns how many.
    pub async fn purge_invocations(&self, before: DateTime<Utc>) -> Result<u64> {
        Ok(plugin_invocations::Entity::delete_many()
            .filter(plugin_invocations::Column::OccurredAt.lt(before))
            .exec(self.relaxed())
            .await?
            .rows_affected)
    }

    /// Plugin name and version of each version id the rows name.
    async fn version_names(
        &self,
        rows: &[plugin_invocations::Model],
    ) -> Result<HashMap<String, (String, String)>> {
        let mut ids: Vec<&str> = rows.iter().map(|r| r.version_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let versions = plugin_versions::Entity::find()
            .filter(plugin_versions::Column::Id.is_in(ids))
            .all(self.db())
            .await?;
        let mut plugin_ids: Vec<&str> = versions.iter().map(|v| v.plugin_id.as_str()).collect();
        plugin_ids.sort_unstable();
        plugin_ids.dedup();
        let names: HashMap<String, String> = plugins::Entity::find()
            .filter(plugins::Column::Id.is_in(plugin_ids))
            .all(self.db())
            .await?
            .into_iter()
            .map(|p| (p.id, p.name))
            .collect();
        Ok(versions
            .into_iter()
            .map(|v| {
                let name = names.get(&v.plugin_id).cloned().unwrap_or_default();
                (v.id, (name, v.version))
            })
            .collect())
    }
}
