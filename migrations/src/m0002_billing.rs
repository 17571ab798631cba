//! Plans, subscriptions and the usage ledger. Stripe ids are nullable columns so the payment rail can
//! attach to these rows later without reshaping them.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, boolean, integer, string, string_null, timestamp_with_time_zone,
};

use crate::m0001_accounts::Tenants;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Plans {
    Table,
    Id,
    Name,
    Currency,
    MonthlyFeeMicros,
    IncludedCalls,
    PricePerCallMicros,
    HardCap,
    RateLimitPerMinute,
    Burst,
    StripeFlatPriceId,
    StripeMeteredPriceId,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Subscriptions {
    Table,
    TenantId,
    PlanId,
    Status,
    CurrentPeriodStart,
    CurrentPeriodEnd,
    CancelAtPeriodEnd,
    StripeCustomerId,
    StripeSubscriptionId,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum UsageEvents {
    Table,
    Id,
    TenantId,
    ApiKeyId,
    ResourceKind,
    ResourceId,
    Units,
    UnitPriceMicros,
    AmountMicros,
    IdempotencyKey,
    RequestId,
    /// Microseconds since the Unix epoch: integer time keeps range scans and hourly or daily
    /// aggregation identical on SQLite and Postgres.
    OccurredAtUs,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Plans::Table)
                    .col(string(Plans::Id).primary_key())
                    .col(string(Plans::Name))
                    .col(string(Plans::Currency))
                    .col(big_integer(Plans::MonthlyFeeMicros))
                    .col(big_integer(Plans::IncludedCalls))
                    .col(big_integer(Plans::PricePerCallMicros))
                    .col(boolean(Plans::HardCap))
                    .col(integer(Plans::RateLimitPerMinute))
                    .col(integer(Plans::Burst))
                    .col(string_null(Plans::StripeFlatPriceId))
                    .col(string_null(Plans::StripeMeteredPriceId))
                    .col(timestamp_with_time_zone(Plans::CreatedAt))
                    .col(timestamp_with_time_zone(Plans::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Subscriptions::Table)
                    .col(string(Subscriptions::TenantId).primary_key())
                    .col(string(Subscriptions::PlanId))
                    .col(string(Subscriptions::Status))
                    .col(timestamp_with_time_zone(Subscriptions::CurrentPeriodStart))
                    .col(timestamp_with_time_zone(Subscriptions::CurrentPeriodEnd))
                    .col(boolean(Subscriptions::CancelAtPeriodEnd).default(false))
                    .col(string_null(Subscriptions::StripeCustomerId))
                    .col(string_null(Subscriptions::StripeSubscriptionId))
                    .col(timestamp_with_time_zone(Subscriptions::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_subscriptions_tenant")
                            .from(Subscriptions::Table, Subscriptions::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_subscriptions_plan")
                            .from(Subscriptions::Table, Subscriptions::PlanId)
                            .to(Plans::Table, Plans::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // No foreign keys on the ledger: it is append-only, must outlive deleted keys, and its insert
        // path is the hottest in the system.
        manager
            .create_table(
                Table::create()
                    .table(UsageEvents::Table)
                    .col(string(UsageEvents::Id).primary_key())
                    .col(string(UsageEvents::TenantId))
                    .col(string_null(UsageEvents::ApiKeyId))
                    .col(string(UsageEvents::ResourceKind))
                    .col(string(UsageEvents::ResourceId))
                    .col(big_integer(UsageEvents::Units))
                    .col(big_integer(UsageEvents::UnitPriceMicros))
                    .col(big_integer(UsageEvents::AmountMicros))
                    .col(string(UsageEvents::IdempotencyKey))
                    .col(string(UsageEvents::RequestId))
                    .col(big_integer(UsageEvents::OccurredAtUs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_usage_events_idempotency")
                    .table(UsageEvents::Table)
                    .col(UsageEvents::TenantId)
                    .col(UsageEvents::IdempotencyKey)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_usage_events_tenant_time")
                    .table(UsageEvents::Table)
                    .col(UsageEvents::TenantId)
                    .col(UsageEvents::OccurredAtUs)
                    .to_owned(),
            )
            .await
    }
}
