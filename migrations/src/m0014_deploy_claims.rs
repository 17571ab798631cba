//! A training job's deployment claim records when it was taken, on the database's clock: a claim
//! whose replica stopped before marking the job deployed or releasing it (a crash, a restart) can be
//! taken over once it is old, where before it stayed for good. Claims taken before this migration
//! have no time, and count as old.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::big_integer_null;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum TrainingJobs {
    Table,
    /// Microseconds on the database's clock when the deployment under way was claimed.
    DeployClaimedUs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(TrainingJobs::Table)
                    .add_column(big_integer_null(TrainingJobs::DeployClaimedUs))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(TrainingJobs::Table)
                    .drop_column(TrainingJobs::DeployClaimedUs)
                    .to_owned(),
            )
            .await
    }
}
