//! Queued training jobs are claimed by plan before age: each job keeps the scheduling weight of the
//! plan it was queued under. Jobs queued before this migration weigh 1, as on the free plan.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::integer;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TrainingJobs {
    Table,
    /// The plan's `scheduling_weight` when the job was created.
    Weight,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(TrainingJobs::Table)
                    .add_column(integer(TrainingJobs::Weight).default(1))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(TrainingJobs::Table)
                    .drop_column(TrainingJobs::Weight)
                    .to_owned(),
            )
            .await
    }
}
