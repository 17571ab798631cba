//! The audit log: who did what to which security-relevant thing (keys, members, plans), written in the
//! same transaction as the change it records.

use chrono::Utc;
use plinth_core::id::{AuditId, TenantId};
use sea_orm::{ActiveModelTrait, ConnectionTrait, Set};

use crate::Result;
use crate::entity::audit_log;

pub(crate) async fn record(
    conn: &impl ConnectionTrait,
    tenant: Option<&TenantId>,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: serde_json::Value,
) -> Result<()> {
    audit_log::ActiveModel {
        id: Set(AuditId::new().to_string()),
        tenant_id: Set(tenant.map(ToString::to_string)),
        actor: Set(actor.to_owned()),
        action: Set(action.to_owned()),
        target: Set(target.map(ToOwned::to_owned)),
        detail: Set((!detail.is_null()).then(|| detail.to_string())),
        created_at: Set(Utc::now()),
    }
    .insert(conn)
    .await?;
    Ok(())
}
