//! Postgres row-level security on every table that holds a tenant's rows: a second wall behind the
//! tenant-scoped queries. A row is visible, and may be written, only when the connection's
//! `plinth.tenant` setting names its tenant or is `*` (the store sets it on every checkout, see
//! `plinth_store::row_security`); a connection that never set it sees nothing. `FORCE` makes the
//! policies bind the tables' owner too, so a deployment that migrates and serves under one role is
//! walled as well. Roles with `SUPERUSER` or `BYPASSRLS` pass through: the app's role must have neither.
//! SQLite has no row security; this migration does nothing there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Tables with a `tenant_id` column (the audit log's platform-wide rows, with none, are visible only
/// to `*`). The marketplace's `plugins` and `plugin_versions` are shared by design and not walled.
const TENANT_TABLES: [&str; 14] = [
    "memberships",
    "sessions",
    "api_keys",
    "audit_log",
    "subscriptions",
    "usage_events",
    "models",
    "installations",
    "meter_pushes",
    "invoices",
    "author_accounts",
    "payouts",
    "plan_eras",
    "idempotent_requests",
];

/// Whether the current connection may see the rows of the tenant in `column`.
pub(crate) fn visible(column: &str) -> String {
    format!("current_setting('plinth.tenant', true) IN ('*', {column})")
}

pub(crate) fn wall(table: &str, condition: &str) -> String {
    format!(
        "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
         ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
         CREATE POLICY tenant_wall ON {table} USING ({condition}) WITH CHECK ({condition});"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let mut sql = String::new();
        for table in TENANT_TABLES {
            sql.push_str(&wall(table, &visible("tenant_id")));
        }
        sql.push_str(&wall("tenants", &visible("id")));
        // A plugin's key-value store belongs to its installation, which belongs to a tenant: the
        // subquery is itself walled, so another tenant's installation is not found.
        sql.push_str(&wall(
            "plugin_kv",
            "EXISTS (SELECT 1 FROM installations i WHERE i.id = plugin_kv.installation_id)",
        ));
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        let mut sql = String::new();
        for table in TENANT_TABLES.iter().chain(&["tenants", "plugin_kv"]) {
            sql.push_str(&format!(
                "DROP POLICY IF EXISTS tenant_wall ON {table};
                 ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY;
                 ALTER TABLE {table} DISABLE ROW LEVEL SECURITY;"
            ));
        }
        manager.get_connection().execute_unprepared(&sql).await?;
        Ok(())
    }
}
