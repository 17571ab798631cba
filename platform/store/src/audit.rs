//! The audit log: who did what to which security-relevant thing (keys, members, plans, plugins, models,
//! payouts, operator acts, logins), from where, written in the same transaction as the change it records.

use chrono::{DateTime, Utc};
use plinth_core::api::{AuditEntry, AuditPage};
use plinth_core::id::{AuditId, TenantId};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::entity::audit_log;
use crate::{Result, Store, StoreError};
use sea_orm::sea_query::{Expr, LikeExpr};

/// Who acts, and from where: recorded with every audited change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// A user id, an API key id, or one of [`Who::OPERATOR`], [`Who::STRIPE`], [`Who::SYSTEM`].
    pub actor: String,
    pub client_address: Option<String>,
    pub user_agent: Option<String>,
}

impl Who {
    /// The `plinth` command line, run by whoever operates the platform.
    pub const OPERATOR: &'static str = "operator";
    /// Stripe, through a verified webhook.
    pub const STRIPE: &'static str = "stripe";
    /// The platform itself (background jobs).
    pub const SYSTEM: &'static str = "system";

    /// An actor without a network origin (the CLI, a webhook, a job).
    #[must_use]
    pub fn internal(actor: &str) -> Self {
        Self {
            actor: actor.to_owned(),
            client_address: None,
            user_agent: None,
        }
    }

    /// The same origin, acting as `actor` (e.g. once a login has identified the user).
    #[must_use]
    pub fn as_actor(&self, actor: &str) -> Self {
        Self {
            actor: actor.to_owned(),
            ..self.clone()
        }
    }
}

/// The longest user agent kept; the rest is cut.
const MAX_USER_AGENT: usize = 256;

pub(crate) async fn record(
    conn: &impl ConnectionTrait,
    tenant: Option<&TenantId>,
    who: &Who,
    action: &str,
    target: Option<&str>,
    detail: serde_json::Value,
) -> Result<()> {
    audit_log::ActiveModel {
        id: Set(AuditId::new().to_string()),
        tenant_id: Set(tenant.map(ToString::to_string)),
        actor: Set(who.actor.clone()),
        action: Set(action.to_owned()),
        target: Set(target.map(ToOwned::to_owned)),
        detail: Set((!detail.is_null()).then(|| detail.to_string())),
        created_at: Set(Utc::now()),
        client_address: Set(who.client_address.clone()),
        user_agent: Set(who
            .user_agent
            .as_ref()
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect())),
    }
    .insert(conn)
    .await?;
    Ok(())
}

/// Records a platform operator's act on a tenant's thing (a plugin review, a payout, a payment
/// recorded): in the tenant's log without the operator's address and user agent (tenants learn what
/// was done and by which operator account, not from where), and in full in the platform's log.
pub(crate) async fn record_operator_act(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    who: &Who,
    action: &str,
    target: Option<&str>,
    detail: serde_json::Value,
) -> Result<()> {
    if who.client_address.is_some() || who.user_agent.is_some() {
        record(conn, None, who, action, target, detail.clone()).await?;
    }
    record(
        conn,
        Some(tenant),
        &Who::internal(&who.actor),
        action,
        target,
        detail,
    )
    .await
}

/// Which entries a page shows.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// `Some`: only this tenant's entries; `None`: every entry (platform admins).
    pub tenant: Option<TenantId>,
    /// Entries older than this entry id (the previous page's `next_before`).
    pub before: Option<String>,
    /// Only actions starting with this, e.g. `login` or `plugin.`.
    pub action_prefix: Option<String>,
    /// Entries per page, 1 to 200.
    pub limit: u64,
}

fn to_entry(row: audit_log::Model) -> Result<AuditEntry> {
    Ok(AuditEntry {
        tenant_id: row
            .tenant_id
            .as_deref()
            .map(crate::accounts::parse_id)
            .transpose()?,
        detail: row
            .detail
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .unwrap_or(serde_json::Value::Null),
        id: row.id,
        actor: row.actor,
        action: row.action,
        target: row.target,
        client_address: row.client_address,
        user_agent: row.user_agent,
        created_at: row.created_at,
    })
}

impl Store {
    /// A page of the audit log, newest first.
    pub async fn audit_log(&self, query: &AuditQuery) -> Result<AuditPage> {
        if !(1..=200).contains(&query.limit) {
            return Err(StoreError::invalid("limit: must be 1 to 200"));
        }
        // Actions are dotted lower-case words: anything else (`%`, `_` wildcards included) names none.
        if let Some(prefix) = &query.action_prefix
            && (prefix.len() > 64
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'.' || b == b'_'))
        {
            return Err(StoreError::invalid("action: lower-case letters, `.` and `_`"));
        }
        let mut select = audit_log::Entity::find().order_by_desc(audit_log::Column::Id);
        if let Some(tenant) = &query.tenant {
            select = select.filter(audit_log::Column::TenantId.eq(tenant.as_str()));
        }
        if let Some(before) = &query.before {
            select = select.filter(audit_log::Column::Id.lt(before.as_str()));
        }
        if let Some(prefix) = query.action_prefix.as_deref().filter(|p| !p.is_empty()) {
            // `_` is a LIKE wildcard (and part of action names): matched literally.
            let pattern = format!("{}%", prefix.replace('\\', "\\\\").replace('_', "\\_"));
            select = select.filter(sea_orm::sea_query::ExprTrait::like(
                Expr::col(audit_log::Column::Action),
                LikeExpr::new(pattern).escape('\\'),
            ));
        }
        let mut rows = select.limit(query.limit + 1).all(self.db()).await?;
        let more = rows.len() as u64 > query.limit;
        rows.truncate(usize::try_from(query.limit).unwrap_or(usize::MAX));
        let next_before = more.then(|| rows.last().map(|row| row.id.clone())).flatten();
        Ok(AuditPage {
            entries: rows.into_iter().map(to_entry).collect::<Result<_>>()?,
            next_before,
        })
    }

    /// Records an act that changes nothing else (a failed login, an operator command).
    pub async fn audit(
        &self,
        tenant: Option<&TenantId>,
        who: &Who,
        action: &str,
        target: Option<&str>,
        detail: serde_json::Value,
    ) -> Result<()> {
        record(self.db(), tenant, who, action, target, detail).await
    }

    /// Removes entries older than `cutoff`, at most `limit` of them (so one purge never holds SQLite's
    /// writer for long); returns how many.
    pub async fn purge_audit_log(&self, cutoff: DateTime<Utc>, limit: u64) -> Result<u64> {
        let old: Vec<String> = audit_log::Entity::find()
            .filter(audit_log::Column::CreatedAt.lt(cutoff))
            .select_only()
            .column(audit_log::Column::Id)
            .limit(limit)
            .into_tuple()
            .all(self.db())
            .await?;
        let mut removed = 0;
        for batch in old.chunks(500) {
            removed += audit_log::Entity::delete_many()
                .filter(audit_log::Column::Id.is_in(batch.iter().map(String::as_str)))
                .exec(self.db())
                .await?
                .rows_affected;
        }
        Ok(removed)
    }
}
