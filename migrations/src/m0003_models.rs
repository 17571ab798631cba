//! Tenants' uploaded models. Files are content-addressed on disk (by SHA-256); rows are immutable
//! versions, soft-deleted so usage history keeps its meaning.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, integer, string, string_null, text, timestamp_with_time_zone, timestamp_with_time_zone_null,
};

use crate::m0001_accounts::Tenants;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Models {
    Table,
    Id,
    TenantId,
    Name,
    Version,
    Task,
    /// JSON array of label strings.
    Labels,
    Sha256,
    SizeBytes,
    TokenizerSha256,
    CreatedAt,
    DeletedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Models::Table)
                    .col(string(Models::Id).primary_key())
                    .col(string(Models::TenantId))
                    .col(string(Models::Name))
                    .col(integer(Models::Version))
                    .col(string(Models::Task))
                    .col(text(Models::Labels))
                    .col(string(Models::Sha256))
                    .col(big_integer(Models::SizeBytes))
                    .col(string_null(Models::TokenizerSha256))
                    .col(timestamp_with_time_zone(Models::CreatedAt))
                    .col(timestamp_with_time_zone_null(Models::DeletedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_models_tenant")
                            .from(Models::Table, Models::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_models_tenant_name_version")
                    .table(Models::Table)
                    .col(Models::TenantId)
                    .col(Models::Name)
                    .col(Models::Version)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}
