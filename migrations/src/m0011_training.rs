//! Fine-tuning: tenants' labelled datasets (sealed at rest), the training jobs over them with their
//! events, and what each plan allows and charges for training. Walled by row-level security on
//! Postgres like every other tenant table.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, boolean, integer, integer_null, string, string_null, text, text_null,
    timestamp_with_time_zone, timestamp_with_time_zone_null,
};
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Plans {
    Table,
    Id,
    /// Price of 1,000 examples × epochs of training, in micro-units.
    TrainingPriceMicros,
    /// Datasets the tenant may keep.
    MaxDatasets,
    /// Bytes of dataset files the tenant may keep.
    MaxDatasetBytes,
    /// Training jobs the tenant may have queued or running at once.
    TrainingJobs,
}

#[derive(DeriveIden)]
enum Subscriptions {
    Table,
    /// One of the Stripe subscription's items is the training price, so training sent to its meter
    /// is invoiced.
    TrainingItem,
}

#[derive(DeriveIden)]
enum Datasets {
    Table,
    Id,
    TenantId,
    Name,
    /// `jsonl` or `csv`.
    Format,
    SizeBytes,
    /// JSON `DatasetSummary`.
    Summary,
    /// The examples as JSON, sealed under the platform's secret key.
    Content,
    CreatedAt,
}

#[derive(DeriveIden)]
enum TrainingJobs {
    Table,
    Id,
    TenantId,
    /// Null once the dataset is deleted.
    DatasetId,
    Model,
    BaseModel,
    Status,
    /// JSON `Hyperparameters`, defaults filled in.
    Hyperparameters,
    /// JSON array of label strings.
    Labels,
    /// JSON `SplitSizes`.
    Split,
    /// JSON `TrainingProgress`.
    Progress,
    /// JSON: the trainer's state after its latest epoch (resumes a job after a restart).
    Checkpoint,
    /// JSON `Evaluation`.
    Evaluation,
    Error,
    DeployedVersion,
    BilledUnits,
    BilledMicros,
    /// Runs started: a job interrupted too often fails instead of starting again.
    Attempts,
    CancelRequested,
    /// The plan's training price when the job was created (micro-units per 1,000 example-epochs).
    PriceMicros,
    /// The replica running it, and when it last said so (the database's clock, microseconds).
    Runner,
    HeartbeatUs,
    CreatedAt,
    StartedAt,
    FinishedAt,
}

#[derive(DeriveIden)]
enum TrainingEvents {
    Table,
    Id,
    TenantId,
    JobId,
    At,
    Level,
    Message,
}

/// The shipped plans' values: id, price, datasets, dataset bytes, jobs at once. Plans an operator
/// created get the column defaults, the free plan's.
const SHIPPED: [(&str, i64, i32, i64, i32); 3] = [
    ("free", 0, 2, 8 << 20, 1),
    ("pro", 2_000, 20, 256 << 20, 2),
    ("enterprise", 1_000, 200, 2 << 30, 4),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let (_, price, datasets, bytes, jobs) = SHIPPED[0];
        for column in [
            big_integer(Plans::TrainingPriceMicros).default(price).to_owned(),
            integer(Plans::MaxDatasets).default(datasets).to_owned(),
            big_integer(Plans::MaxDatasetBytes).default(bytes).to_owned(),
            integer(Plans::TrainingJobs).default(jobs).to_owned(),
        ] {
            manager
                .alter_table(Table::alter().table(Plans::Table).add_column(column).to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Subscriptions::Table)
                    .add_column(boolean(Subscriptions::TrainingItem).default(false))
                    .to_owned(),
            )
            .await?;
        for (id, price, datasets, bytes, jobs) in SHIPPED {
            manager
                .exec_stmt(
                    Query::update()
                        .table(Plans::Table)
                        .value(Plans::TrainingPriceMicros, price)
                        .value(Plans::MaxDatasets, datasets)
                        .value(Plans::MaxDatasetBytes, bytes)
                        .value(Plans::TrainingJobs, jobs)
                        .and_where(Expr::col(Plans::Id).eq(id))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(Datasets::Table)
                    .col(string(Datasets::Id).primary_key())
                    .col(string(Datasets::TenantId))
                    .col(string(Datasets::Name))
                    .col(string(Datasets::Format))
                    .col(big_integer(Datasets::SizeBytes))
                    .col(text(Datasets::Summary))
                    .col(text(Datasets::Content))
                    .col(timestamp_with_time_zone(Datasets::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TrainingJobs::Table)
                    .col(string(TrainingJobs::Id).primary_key())
                    .col(string(TrainingJobs::TenantId))
                    .col(string_null(TrainingJobs::DatasetId))
                    .col(string(TrainingJobs::Model))
                    .col(string(TrainingJobs::BaseModel))
                    .col(string(TrainingJobs::Status))
                    .col(text(TrainingJobs::Hyperparameters))
                    .col(text(TrainingJobs::Labels))
                    .col(text(TrainingJobs::Split))
                    .col(text(TrainingJobs::Progress))
                    .col(text_null(TrainingJobs::Checkpoint))
                    .col(text_null(TrainingJobs::Evaluation))
                    .col(text_null(TrainingJobs::Error))
                    .col(integer_null(TrainingJobs::DeployedVersion))
                    .col(big_integer(TrainingJobs::BilledUnits).default(0))
                    .col(big_integer(TrainingJobs::BilledMicros).default(0))
                    .col(integer(TrainingJobs::Attempts).default(0))
                    .col(boolean(TrainingJobs::CancelRequested).default(false))
                    .col(big_integer(TrainingJobs::PriceMicros).default(0))
                    .col(string_null(TrainingJobs::Runner))
                    .col(big_integer_null(TrainingJobs::HeartbeatUs))
                    .col(timestamp_with_time_zone(TrainingJobs::CreatedAt))
                    .col(timestamp_with_time_zone_null(TrainingJobs::StartedAt))
                    .col(timestamp_with_time_zone_null(TrainingJobs::FinishedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TrainingEvents::Table)
                    .col(string(TrainingEvents::Id).primary_key())
                    .col(string(TrainingEvents::TenantId))
                    .col(string(TrainingEvents::JobId))
                    .col(timestamp_with_time_zone(TrainingEvents::At))
                    .col(string(TrainingEvents::Level))
                    .col(text(TrainingEvents::Message))
                    .to_owned(),
            )
            .await?;
        for index in [
            Index::create()
                .name("ix_datasets_tenant")
                .table(Datasets::Table)
                .col(Datasets::TenantId)
                .to_owned(),
            Index::create()
                .name("ix_training_jobs_tenant")
                .table(TrainingJobs::Table)
                .col(TrainingJobs::TenantId)
                .col(TrainingJobs::Id)
                .to_owned(),
            Index::create()
                .name("ix_training_jobs_status")
                .table(TrainingJobs::Table)
                .col(TrainingJobs::Status)
                .col(TrainingJobs::CreatedAt)
                .to_owned(),
            Index::create()
                .name("ix_training_events_job")
                .table(TrainingEvents::Table)
                .col(TrainingEvents::JobId)
                .col(TrainingEvents::Id)
                .to_owned(),
        ] {
            manager.create_index(index).await?;
        }
        if manager.get_database_backend() == DbBackend::Postgres {
            let visible = crate::m0008_row_security::visible("tenant_id");
            let sql: String = ["datasets", "training_jobs", "training_events"]
                .iter()
                .map(|table| crate::m0008_row_security::wall(table, &visible))
                .collect();
            manager.get_connection().execute_unprepared(&sql).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(TrainingEvents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(TrainingJobs::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Datasets::Table).to_owned())
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Subscriptions::Table)
                    .drop_column(Subscriptions::TrainingItem)
                    .to_owned(),
            )
            .await?;
        for column in [
            Plans::TrainingPriceMicros,
            Plans::MaxDatasets,
            Plans::MaxDatasetBytes,
            Plans::TrainingJobs,
        ] {
            manager
                .alter_table(Table::alter().table(Plans::Table).drop_column(column).to_owned())
                .await?;
        }
        Ok(())
    }
}
