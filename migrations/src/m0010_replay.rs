//! Full invocation records, for replay: the record itself beside the invocation's summary, and the
//! installation's choice to record its failures.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{boolean, text_null};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PluginInvocations {
    Table,
    /// JSON: the request, the settings and every host call with its answer (`RecordedInvocation`).
    Record,
}

#[derive(DeriveIden)]
enum Installations {
    Table,
    RecordFailures,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(PluginInvocations::Table)
                    .add_column(text_null(PluginInvocations::Record))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Installations::Table)
                    .add_column(boolean(Installations::RecordFailures).default(false))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(PluginInvocations::Table)
                    .drop_column(PluginInvocations::Record)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Installations::Table)
                    .drop_column(Installations::RecordFailures)
                    .to_owned(),
            )
            .await
    }
}
