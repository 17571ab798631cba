//! The payment rail: each call's author share on the ledger, Stripe state on subscriptions, webhook
//! events seen once, usage pushed to Stripe meters, invoices, plugin authors' connected accounts and
//! payouts.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, boolean, string, string_null, timestamp_with_time_zone,
    timestamp_with_time_zone_null,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    /// The plugin author's share of this call's amount, fixed when the call is recorded.
    AuthorShareMicros,
}

#[derive(DeriveIden)]
enum Subscriptions {
    Table,
    /// `created` (Unix seconds) of the newest Stripe subscription event applied to this row (plan,
    /// period, ids): older ones are stale.
    StripeEventAt,
    /// `created` of the newest event that set the payment status (subscription or invoice events).
    StatusEventAt,
    /// Usage up to here (microseconds since the epoch) has been handed to Stripe's meters.
    MeterSyncedUntilUs,
}

/// A tenant's past spans on one plan and billing anchor: statements of closed periods are priced at the
/// plan of their span.
#[derive(DeriveIden)]
enum PlanEras {
    Table,
    Id,
    TenantId,
    PlanId,
    FirstPeriodStart,
    FirstPeriodEnd,
    EndedAt,
}

#[derive(DeriveIden)]
enum StripeEvents {
    Table,
    Id,
    Kind,
    Created,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum MeterPushes {
    Table,
    /// Deterministic: tenant, meter and bucket start. Also the Stripe meter event's identifier and the
    /// request's Idempotency-Key.
    Identifier,
    TenantId,
    StripeCustomerId,
    Meter,
    BucketStartUs,
    BucketEndUs,
    Value,
    CreatedAt,
    SentAt,
}

#[derive(DeriveIden)]
enum Invoices {
    Table,
    StripeInvoiceId,
    TenantId,
    PeriodStartUs,
    PeriodEndUs,
    Status,
    Currency,
    TotalCents,
    AmountPaidCents,
    HostedUrl,
    StripeEventAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AuthorAccounts {
    Table,
    TenantId,
    StripeAccountId,
    PayoutsEnabled,
    StripeEventAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Payouts {
    Table,
    Id,
    TenantId,
    Period,
    EarningsMicros,
    AmountCents,
    Currency,
    StripeAccountId,
    StripeTransferId,
    Status,
    CreatedAt,
    PaidAt,
}

/// One column per ALTER: SQLite cannot add several in one statement.
async fn add_column(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    column: ColumnDef,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).add_column(column).to_owned())
        .await
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_column(
            manager,
            UsageEvents::Table,
            big_integer(UsageEvents::AuthorShareMicros).default(0).to_owned(),
        )
        .await?;
        for column in [
            Subscriptions::StripeEventAt,
            Subscriptions::StatusEventAt,
            Subscriptions::MeterSyncedUntilUs,
        ] {
            add_column(manager, Subscriptions::Table, big_integer_null(column)).await?;
        }
        manager
            .create_table(
                Table::create()
                    .table(PlanEras::Table)
                    .col(string(PlanEras::Id).primary_key())
                    .col(string(PlanEras::TenantId))
                    .col(string(PlanEras::PlanId))
                    .col(timestamp_with_time_zone(PlanEras::FirstPeriodStart))
                    .col(timestamp_with_time_zone(PlanEras::FirstPeriodEnd))
                    .col(timestamp_with_time_zone(PlanEras::EndedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_plan_eras_tenant")
                    .table(PlanEras::Table)
                    .col(PlanEras::TenantId)
                    .col(PlanEras::EndedAt)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(StripeEvents::Table)
                    .col(string(StripeEvents::Id).primary_key())
                    .col(string(StripeEvents::Kind))
                    .col(big_integer(StripeEvents::Created))
                    .col(timestamp_with_time_zone(StripeEvents::ReceivedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(MeterPushes::Table)
                    .col(string(MeterPushes::Identifier).primary_key())
                    .col(string(MeterPushes::TenantId))
                    .col(string(MeterPushes::StripeCustomerId))
                    .col(string(MeterPushes::Meter))
                    .col(big_integer(MeterPushes::BucketStartUs))
                    .col(big_integer(MeterPushes::BucketEndUs))
                    .col(big_integer(MeterPushes::Value))
                    .col(timestamp_with_time_zone(MeterPushes::CreatedAt))
                    .col(timestamp_with_time_zone_null(MeterPushes::SentAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_meter_pushes_tenant_bucket")
                    .table(MeterPushes::Table)
                    .col(MeterPushes::TenantId)
                    .col(MeterPushes::BucketStartUs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Invoices::Table)
                    .col(string(Invoices::StripeInvoiceId).primary_key())
                    .col(string(Invoices::TenantId))
                    .col(big_integer(Invoices::PeriodStartUs))
                    .col(big_integer(Invoices::PeriodEndUs))
                    .col(string(Invoices::Status))
                    .col(string(Invoices::Currency))
                    .col(big_integer(Invoices::TotalCents))
                    .col(big_integer(Invoices::AmountPaidCents))
                    .col(string_null(Invoices::HostedUrl))
                    .col(big_integer(Invoices::StripeEventAt))
                    .col(timestamp_with_time_zone(Invoices::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_invoices_tenant_period")
                    .table(Invoices::Table)
                    .col(Invoices::TenantId)
                    .col(Invoices::PeriodStartUs)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuthorAccounts::Table)
                    .col(string(AuthorAccounts::TenantId).primary_key())
                    .col(string(AuthorAccounts::StripeAccountId).unique_key())
                    .col(boolean(AuthorAccounts::PayoutsEnabled))
                    .col(big_integer(AuthorAccounts::StripeEventAt))
                    .col(timestamp_with_time_zone(AuthorAccounts::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Payouts::Table)
                    .col(string(Payouts::Id).primary_key())
                    .col(string(Payouts::TenantId))
                    .col(string(Payouts::Period))
                    .col(big_integer(Payouts::EarningsMicros))
                    .col(big_integer(Payouts::AmountCents))
                    .col(string(Payouts::Currency))
                    .col(string(Payouts::StripeAccountId))
                    .col(string_null(Payouts::StripeTransferId))
                    .col(string(Payouts::Status))
                    .col(timestamp_with_time_zone(Payouts::CreatedAt))
                    .col(timestamp_with_time_zone_null(Payouts::PaidAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_payouts_tenant_period")
                    .table(Payouts::Table)
                    .col(Payouts::TenantId)
                    .col(Payouts::Period)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}
