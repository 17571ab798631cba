//! Invocation records: how each plugin invocation ended, what it cost and what it logged, kept for the
//! newest invocations of each installation for a few days. Walled by row-level security on Postgres
//! like every other tenant table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{big_integer, string, string_null, text, timestamp_with_time_zone};
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PluginInvocations {
    Table,
    Id,
    TenantId,
    InstallationId,
    PluginId,
    /// The plugin version that ran.
    VersionId,
    RequestId,
    OccurredAt,
    DurationMs,
    ComputeUnits,
    /// `ok` or the error code answered.
    Outcome,
    Message,
    /// JSON array of `{level, message}`.
    Logs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PluginInvocations::Table)
                    .col(string(PluginInvocations::Id).primary_key())
                    .col(string(PluginInvocations::TenantId))
                    .col(string(PluginInvocations::InstallationId))
                    .col(string(PluginInvocations::PluginId))
                    .col(string(PluginInvocations::VersionId))
                    .col(string(PluginInvocations::RequestId))
                    .col(timestamp_with_time_zone(PluginInvocations::OccurredAt))
                    .col(big_integer(PluginInvocations::DurationMs))
                    .col(big_integer(PluginInvocations::ComputeUnits))
                    .col(string(PluginInvocations::Outcome))
                    .col(string_null(PluginInvocations::Message))
                    .col(text(PluginInvocations::Logs))
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            (
                "ix_plugin_invocations_installation",
                PluginInvocations::InstallationId,
            ),
            ("ix_plugin_invocations_plugin", PluginInvocations::PluginId),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(PluginInvocations::Table)
                        .col(column)
                        .col(PluginInvocations::Id)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("ix_plugin_invocations_occurred")
                    .table(PluginInvocations::Table)
                    .col(PluginInvocations::OccurredAt)
                    .to_owned(),
            )
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(&crate::m0008_row_security::wall(
                    "plugin_invocations",
                    &crate::m0008_row_security::visible("tenant_id"),
                ))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(PluginInvocations::Table).to_owned())
            .await
    }
}
