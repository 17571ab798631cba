//! Each model version keeps its graph's signature (inputs and outputs), so a replica starting up
//! describes every tenant's model from the registry and loads one only when it is called. Versions
//! registered before this migration have none: a replica loads those once and fills it in.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::text_null;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Models {
    Table,
    /// JSON `Signature`: the graph's inputs and outputs (name, datatype, shape).
    Signature,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Models::Table)
                    .add_column(text_null(Models::Signature))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Models::Table)
                    .drop_column(Models::Signature)
                    .to_owned(),
            )
            .await
    }
}
