//! Queued training jobs are claimed by plan before age: each job keeps the scheduling weight of the
//! plan it was queued under. Jobs queued before this migration weigh 1, as on the free plan. An index
//! in that order finds the next job without sorting every queued one.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::integer;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TrainingJobs {
    Table,
    Status,
    /// The plan's `scheduling_weight` when the job was created.
    Weight,
    CreatedAt,
    Id,
}

const QUEUE_INDEX: &str = "ix_training_jobs_queue";

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
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(QUEUE_INDEX)
                    .table(TrainingJobs::Table)
                    .col(TrainingJobs::Status)
                    .col((TrainingJobs::Weight, IndexOrder::Desc))
                    .col(TrainingJobs::CreatedAt)
                    .col(TrainingJobs::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name(QUEUE_INDEX)
                    .table(TrainingJobs::Table)
                    .to_owned(),
            )
            .await?;
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
