//! The plugin marketplace: listings, immutable published versions with their review state, tenants'
//! installations, and each installation's key-value store.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, binary, string, text, text_null, timestamp_with_time_zone, timestamp_with_time_zone_null,
};

use crate::m0001_accounts::Tenants;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Plugins {
    Table,
    Id,
    AuthorTenantId,
    Name,
    Description,
    CreatedAt,
}

#[derive(DeriveIden)]
enum PluginVersions {
    Table,
    Id,
    PluginId,
    Version,
    WitVersion,
    Capabilities,
    Models,
    PricePerCallMicros,
    Sha256,
    SizeBytes,
    Status,
    Checks,
    ReviewNote,
    CreatedAt,
    ReviewedAt,
}

#[derive(DeriveIden)]
enum Installations {
    Table,
    Id,
    TenantId,
    PluginId,
    VersionId,
    Settings,
    Secrets,
    CreatedAt,
    UpdatedAt,
    DeletedAt,
}

#[derive(DeriveIden)]
enum PluginKv {
    Table,
    InstallationId,
    Key,
    Value,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Plugins::Table)
                    .col(string(Plugins::Id).primary_key())
                    .col(string(Plugins::AuthorTenantId))
                    .col(string(Plugins::Name).unique_key())
                    .col(text(Plugins::Description))
                    .col(timestamp_with_time_zone(Plugins::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_plugins_author")
                            .from(Plugins::Table, Plugins::AuthorTenantId)
                            .to(Tenants::Table, Tenants::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PluginVersions::Table)
                    .col(string(PluginVersions::Id).primary_key())
                    .col(string(PluginVersions::PluginId))
                    .col(string(PluginVersions::Version))
                    .col(string(PluginVersions::WitVersion))
                    .col(string(PluginVersions::Capabilities))
                    .col(text(PluginVersions::Models))
                    .col(big_integer(PluginVersions::PricePerCallMicros))
                    .col(string(PluginVersions::Sha256))
                    .col(big_integer(PluginVersions::SizeBytes))
                    .col(string(PluginVersions::Status))
                    .col(text(PluginVersions::Checks))
                    .col(text_null(PluginVersions::ReviewNote))
                    .col(timestamp_with_time_zone(PluginVersions::CreatedAt))
                    .col(timestamp_with_time_zone_null(PluginVersions::ReviewedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_plugin_versions_plugin")
                            .from(PluginVersions::Table, PluginVersions::PluginId)
                            .to(Plugins::Table, Plugins::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_plugin_versions_plugin_version")
                    .table(PluginVersions::Table)
                    .col(PluginVersions::PluginId)
                    .col(PluginVersions::Version)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Installations::Table)
                    .col(string(Installations::Id).primary_key())
                    .col(string(Installations::TenantId))
                    .col(string(Installations::PluginId))
                    .col(string(Installations::VersionId))
                    .col(text(Installations::Settings))
                    .col(text(Installations::Secrets))
                    .col(timestamp_with_time_zone(Installations::CreatedAt))
                    .col(timestamp_with_time_zone(Installations::UpdatedAt))
                    .col(timestamp_with_time_zone_null(Installations::DeletedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_installations_tenant")
                            .from(Installations::Table, Installations::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_installations_version")
                            .from(Installations::Table, Installations::VersionId)
                            .to(PluginVersions::Table, PluginVersions::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_installations_tenant")
                    .table(Installations::Table)
                    .col(Installations::TenantId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PluginKv::Table)
                    .col(string(PluginKv::InstallationId))
                    .col(string(PluginKv::Key))
                    .col(binary(PluginKv::Value))
                    .col(timestamp_with_time_zone(PluginKv::UpdatedAt))
                    .primary_key(Index::create().col(PluginKv::InstallationId).col(PluginKv::Key))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_plugin_kv_installation")
                            .from(PluginKv::Table, PluginKv::InstallationId)
                            .to(Installations::Table, Installations::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }
}
