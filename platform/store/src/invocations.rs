//! Invocation records: how each plugin invocation ended, what it cost and what the plugin logged. The
//! newest `keep` of each installation are kept (older ones go as new ones arrive), and none longer
//! than the retention the operator sets. The installing tenant reads them whole. The plugin's author
//! reads only daily counts per version (calls, failures), and only for days on which several tenants
//! called it: a per-call value the plugin controls (its compute units, duration or outcome) would let
//! a hostile author's plugin spell out a tenant's secrets to its author, one call at a time.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use plinth_core::id::{InstallationId, InvocationId, TenantId};
use plinth_core::plugins::{InvocationLog, InvocationRecord, InvocationSummary, RecordedInvocation};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::accounts::parse_id;
use crate::entity::{TenantScoped, installations, plugin_invocations, plugin_versions, plugins};
use crate::{Result, Store, StoreError, row_security};

/// Most records one listing returns.
pub const MAX_LISTED: u64 = 200;

/// The longest error message a record keeps (the rest is cut, marked).
pub const MAX_MESSAGE_BYTES: usize = 4 << 10;

/// Tenants besides the author's own that must have called a plugin on a day before its author sees
/// that day's count.
pub const MIN_TENANTS_SHOWN: i64 = 3;

/// The largest full record kept (its JSON): a bigger one is not kept, and the summary says so.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// Full records kept per installation: older invocations keep their summary only.
pub const MAX_FULL_RECORDS: u64 = 10;

/// One finished invocation, to record.
#[derive(Debug, Clone)]
pub struct NewInvocation {
    /// Made when the call ended: records sort by it.
    pub id: InvocationId,
    pub occurred_at: DateTime<Utc>,
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
    /// The whole invocation, when it is to be recorded for replay.
    pub record: Option<RecordedInvocation>,
}

/// A record as listed: everything but the full record, which only its own route reads.
#[derive(Debug, FromQueryResult)]
struct Listed {
    id: String,
    installation_id: String,
    version_id: String,
    request_id: String,
    occurred_at: DateTime<Utc>,
    duration_ms: i64,
    compute_units: i64,
    outcome: String,
    message: Option<String>,
    logs: String,
    recorded: bool,
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `message` cut to [`MAX_MESSAGE_BYTES`] at a character boundary.
fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut at {} KiB)", &message[..end], MAX_MESSAGE_BYTES >> 10)
}

impl Store {
    /// Records an invocation and lets the installation's oldest records go beyond the newest `keep`
    /// (and its oldest full records beyond the newest [`MAX_FULL_RECORDS`]). Nothing is recorded for
    /// an installation removed meanwhile: its records went with it.
    pub async fn record_invocation(&self, record: NewInvocation, keep: u64) -> Result<()> {
        row_security::within_tenant(&record.tenant, async {
            let version = plugin_versions::Entity::find_by_id(record.version_id.as_str())
                .one(self.db())
                .await?
                .ok_or(StoreError::NotFound("plugin version"))?;
            let logs = serde_json::to_string(&record.logs)
                .map_err(|err| StoreError::Internal(format!("invocation logs: {err}")))?;
            let mut message = record.message.as_deref().map(bounded);
            let full = match &record.record {
                Some(full) => {
                    let json = serde_json::to_string(full)
                        .map_err(|err| StoreError::Internal(format!("invocation record: {err}")))?;
                    if json.len() <= MAX_RECORD_BYTES {
                        Some(json)
                    } else {
                        let note = format!(
                            "(not recorded in full: the record would take {} KiB, more than the {} KiB kept)",
                            json.len() >> 10,
                            MAX_RECORD_BYTES >> 10
                        );
                        message = Some(match message {
                            Some(message) => format!("{message} {note}"),
                            None => note,
                        });
                        None
                    }
                }
                None => None,
            };
            let _turn = self.write_turn().await;
            let txn = self.write_transaction().await?;
            // Uninstalling marks the installation under the same lock: a record either lands before
            // (and is removed with the rest) or finds it gone.
            let live = installations::Entity::find_in(&record.tenant)
                .filter(installations::Column::Id.eq(record.installation.as_str()))
                .filter(installations::Column::DeletedAt.is_null())
                .lock_exclusive()
                .one(&txn)
                .await?;
            if live.is_none() {
                return Ok(());
            }
            let recorded_in_full = full.is_some();
            plugin_invocations::Entity::insert(plugin_invocations::ActiveModel {
                id: Set(record.id.to_string()),
                tenant_id: Set(record.tenant.to_string()),
                installation_id: Set(record.installation.to_string()),
                plugin_id: Set(version.plugin_id),
                version_id: Set(record.version_id.clone()),
                request_id: Set(record.request_id.clone()),
                occurred_at: Set(record.occurred_at),
                duration_ms: Set(to_i64(record.duration_ms)),
                compute_units: Set(to_i64(record.compute_units)),
                outcome: Set(record.outcome.clone()),
                message: Set(message),
                logs: Set(logs),
                record: Set(full),
            })
            .exec_without_returning(&txn)
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
                .exec(&txn)
                .await?;
            if recorded_in_full {
                let newest_full = Query::select()
                    .column(plugin_invocations::Column::Id)
                    .from(plugin_invocations::Entity)
                    .and_where(plugin_invocations::Column::InstallationId.eq(record.installation.as_str()))
                    .and_where(plugin_invocations::Column::Record.is_not_null())
                    .order_by(plugin_invocations::Column::Id, sea_orm::Order::Desc)
                    .limit(MAX_FULL_RECORDS)
                    .to_owned();
                plugin_invocations::Entity::update_many()
                    .col_expr(
                        plugin_invocations::Column::Record,
                        Expr::value(Option::<String>::None),
                    )
                    .filter(plugin_invocations::Column::InstallationId.eq(record.installation.as_str()))
                    .filter(plugin_invocations::Column::Record.is_not_null())
                    .filter(plugin_invocations::Column::Id.not_in_subquery(newest_full))
                    .exec(&txn)
                    .await?;
            }
            txn.commit().await?;
            Ok(())
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
            .filter(installations::Column::DeletedAt.is_null())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("installation"))?;
        use plugin_invocations::Column;
        let rows = plugin_invocations::Entity::find_in(tenant)
            .select_only()
            .columns([
                Column::Id,
                Column::InstallationId,
                Column::VersionId,
                Column::RequestId,
                Column::OccurredAt,
                Column::DurationMs,
                Column::ComputeUnits,
                Column::Outcome,
                Column::Message,
                Column::Logs,
            ])
            .column_as(
                sea_orm::sea_query::ExprTrait::is_not_null(Expr::col(Column::Record)),
                "recorded",
            )
            .filter(Column::InstallationId.eq(installation.as_str()))
            .order_by_desc(Column::Id)
            .limit(limit.clamp(1, MAX_LISTED))
            .into_model::<Listed>()
            .all(self.db())
            .await?;
        let names = self
            .version_names(rows.iter().map(|row| row.version_id.as_str()))
            .await?;
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
                    recorded: row.recorded,
                })
            })
            .collect()
    }

    /// The full record of one of the tenant's invocations. Another tenant's installation or
    /// invocation, or one not recorded in full, is not found.
    pub async fn recorded_invocation(
        &self,
        tenant: &TenantId,
        installation: &InstallationId,
        invocation: &InvocationId,
    ) -> Result<RecordedInvocation> {
        installations::Entity::find_in(tenant)
            .filter(installations::Column::Id.eq(installation.as_str()))
            .filter(installations::Column::DeletedAt.is_null())
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("recorded invocation"))?;
        let record = plugin_invocations::Entity::find_in(tenant)
            .select_only()
            .column(plugin_invocations::Column::Record)
            .filter(plugin_invocations::Column::Id.eq(invocation.as_str()))
            .filter(plugin_invocations::Column::InstallationId.eq(installation.as_str()))
            .into_tuple::<Option<String>>()
            .one(self.db())
            .await?
            .flatten()
            .ok_or(StoreError::NotFound("recorded invocation"))?;
        serde_json::from_str(&record).map_err(|err| StoreError::Internal(format!("invocation record: {err}")))
    }

    /// Daily calls of the author's plugin `name` that it answered (those billed), per version, newest
    /// day first, only for days on which at least [`MIN_TENANTS_SHOWN`] tenants other than the
    /// author's own had one. Failed calls are not counted: the author's earnings count the billed
    /// ones, and the difference would tell failures apart. Another author's plugin is not found.
    pub async fn invocation_summary(&self, author: &TenantId, name: &str) -> Result<Vec<InvocationSummary>> {
        let plugin = plugins::Entity::find()
            .filter(plugins::Column::Name.eq(name))
            .filter(plugins::Column::AuthorTenantId.eq(author.as_str()))
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("plugin"))?;
        let backend = self.backend();
        let (day, author_param, plugin_param) = match backend {
            DbBackend::Postgres => (
                "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                "$1",
                "$2",
            ),
            // Stored as text, UTC, date first.
            _ => ("substr(occurred_at, 1, 10)", "?", "?"),
        };
        // The author's own calls are counted, but do not make a day busy: they would be no other
        // tenant's.
        let sql = format!(
            "SELECT {day} AS day, version_id, COUNT(*) AS calls, \
             COUNT(DISTINCT CASE WHEN tenant_id <> {author_param} THEN tenant_id END) AS tenants \
             FROM plugin_invocations WHERE plugin_id = {plugin_param} AND outcome = 'ok' \
             GROUP BY 1, 2 ORDER BY 1 DESC, 2"
        );
        // Other tenants' calls by purpose; only counts of busy days leave this function.
        let rows =
            row_security::across_tenants(self.db().query_all_raw(sea_orm::Statement::from_sql_and_values(
                backend,
                sql,
                [author.as_str().into(), plugin.id.as_str().into()],
            )))
            .await?;
        let mut busy = Vec::new();
        for row in rows {
            let tenants: i64 = row.try_get("", "tenants")?;
            if tenants >= MIN_TENANTS_SHOWN {
                busy.push((
                    row.try_get::<String>("", "day")?,
                    row.try_get::<String>("", "version_id")?,
                    row.try_get::<i64>("", "calls")?,
                ));
            }
        }
        let versions: HashMap<String, String> = plugin_versions::Entity::find()
            .filter(plugin_versions::Column::PluginId.eq(plugin.id.as_str()))
            .all(self.db())
            .await?
            .into_iter()
            .map(|v| (v.id, v.version))
            .collect();
        Ok(busy
            .into_iter()
            .map(|(day, version_id, calls)| InvocationSummary {
                day,
                version: versions.get(&version_id).cloned().unwrap_or_default(),
                calls: u64::try_from(calls).unwrap_or(0),
            })
            .collect())
    }

    /// Removes up to `limit` records older than `before` (the retention); returns how many.
    pub async fn purge_invocations(&self, before: DateTime<Utc>, limit: u64) -> Result<u64> {
        let old = Query::select()
            .column(plugin_invocations::Column::Id)
            .from(plugin_invocations::Entity)
            .and_where(plugin_invocations::Column::OccurredAt.lt(before))
            .limit(limit.max(1))
            .to_owned();
        let _turn = self.write_turn().await;
        Ok(plugin_invocations::Entity::delete_many()
            .filter(plugin_invocations::Column::Id.in_subquery(old))
            .exec(self.db())
            .await?
            .rows_affected)
    }

    /// Plugin name and version of each version id named.
    async fn version_names<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Result<HashMap<String, (String, String)>> {
        let mut ids: Vec<&str> = ids.collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_cut_at_a_character_boundary_and_marked() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_MESSAGE_BYTES + 32, "{}", cut.len());
        assert!(cut.ends_with("(cut at 4 KiB)"));
        assert!(cut.starts_with("éé"));
    }
}
