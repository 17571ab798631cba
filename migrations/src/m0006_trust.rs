//! What makes money promises hold against a hostile client: stored responses of keyed requests (so a
//! reused `Idempotency-Key` replays instead of running new work), what an invoice actually collected,
//! payouts as a state machine that can be retried at any age, and where each audited act came from.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::{
    big_integer, big_integer_null, binary_null, boolean, integer, integer_null, string, string_null,
    text_null,
};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// One keyed request per tenant and `Idempotency-Key`: in flight (a lease its worker renews), then
/// completed with the answer that every retry within the retention window gets back.
#[derive(DeriveIden)]
enum IdempotentRequests {
    Table,
    TenantId,
    /// The client's `Idempotency-Key`.
    Key,
    /// Server-minted; names the request in the ledger (`req:<id>`), so a key reused after the retention
    /// window is a new, billed call.
    Id,
    /// SHA-256 of method, path and body: a key reused for anything else is refused.
    Fingerprint,
    /// `in_flight` or `completed`.
    State,
    /// The attempt holding the request now (a random token per attempt).
    Owner,
    /// Until when that attempt holds it; past it (its worker died, or it failed), a retry with the same
    /// request takes over under the same `id`.
    LockedUntilUs,
    ResponseStatus,
    /// JSON object of the response headers that are part of the answer.
    ResponseHeaders,
    ResponseBody,
    CreatedAtUs,
    ExpiresAtUs,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    ClientAddress,
    UserAgent,
}

#[derive(DeriveIden)]
enum Payouts {
    Table,
    TenantId,
    Period,
    Currency,
    /// Transfer attempts made; each has its own Stripe Idempotency-Key (`<payout id>-<attempt>`).
    Attempts,
    /// When the last attempt started: a `transferring` payout is looked up on Stripe only after the
    /// attempt's request has surely ended.
    LastAttemptAtUs,
    /// Stripe's reason, when an attempt was refused.
    Failure,
    /// Bumped each time a failed payout is armed again: transfer attempts of one generation share a
    /// Stripe Idempotency-Key (`<payout id>-<generation>`), so two of them can never both pay.
    Generation,
    Status,
}

#[derive(DeriveIden)]
enum Invoices {
    Table,
    /// When Stripe finalized the invoice (its lines were fixed): usage sent to Stripe after that is
    /// not on it.
    FinalizedAtUs,
    /// A statement an operator recorded as paid (local billing), not a payment provider's invoice.
    Local,
    /// When the invoice was paid: payouts wait a hold period after it, for chargebacks to show.
    PaidAtUs,
}

#[derive(DeriveIden)]
enum MeterPushes {
    Table,
    /// When Stripe acknowledged the meter event (microseconds), to compare with invoice finalization.
    SentAtUs,
}

#[derive(DeriveIden)]
enum Subscriptions {
    Table,
    /// The Stripe subscription carries the plugin-fees price, so plugin fees sent to the meter are
    /// invoiced (a subscription made before that price was configured does not).
    PluginFeesItem,
}

async fn add_column(
    manager: &SchemaManager<'_>,
    table: impl IntoIden,
    column: ColumnDef,
) -> Result<(), DbErr> {
    manager
        .alter_table(Table::alter().table(table).add_column(column).to_owned())
        .await
}

/// What the new columns say about rows written before them: invoices Stripe reported paid were
/// finalized and paid by the last event about them, and meter events were acknowledged when they
/// were marked sent. (Subscriptions learn whether they carry the plugin-fees price from their next
/// Stripe event.)
async fn backfill(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    let db = manager.get_connection();
    db.execute_unprepared(
        "UPDATE invoices SET paid_at_us = stripe_event_at * 1000000, \
         finalized_at_us = stripe_event_at * 1000000 WHERE status = 'paid'",
    )
    .await?;
    let sent_us = match manager.get_database_backend() {
        sea_orm::DatabaseBackend::Postgres => "CAST(EXTRACT(EPOCH FROM sent_at) * 1000000 AS BIGINT)",
        _ => "CAST((julianday(sent_at) - 2440587.5) * 86400000000.0 AS INTEGER)",
    };
    db.execute_unprepared(&format!(
        "UPDATE meter_pushes SET sent_at_us = {sent_us} WHERE sent_at IS NOT NULL"
    ))
    .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(IdempotentRequests::Table)
                    .col(string(IdempotentRequests::TenantId))
                    .col(string(IdempotentRequests::Key))
                    .col(string(IdempotentRequests::Id))
                    .col(string(IdempotentRequests::Fingerprint))
                    .col(string(IdempotentRequests::State))
                    .col(string(IdempotentRequests::Owner))
                    .col(big_integer(IdempotentRequests::LockedUntilUs))
                    .col(integer_null(IdempotentRequests::ResponseStatus))
                    .col(text_null(IdempotentRequests::ResponseHeaders))
                    .col(binary_null(IdempotentRequests::ResponseBody))
                    .col(big_integer(IdempotentRequests::CreatedAtUs))
                    .col(big_integer(IdempotentRequests::ExpiresAtUs))
                    .primary_key(
                        Index::create()
                            .col(IdempotentRequests::TenantId)
                            .col(IdempotentRequests::Key),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_idempotent_requests_expiry")
                    .table(IdempotentRequests::Table)
                    .col(IdempotentRequests::ExpiresAtUs)
                    .to_owned(),
            )
            .await?;

        add_column(manager, AuditLog::Table, string_null(AuditLog::ClientAddress)).await?;
        add_column(manager, AuditLog::Table, text_null(AuditLog::UserAgent)).await?;

        add_column(
            manager,
            Payouts::Table,
            integer(Payouts::Attempts).default(0).to_owned(),
        )
        .await?;
        add_column(
            manager,
            Payouts::Table,
            big_integer_null(Payouts::LastAttemptAtUs),
        )
        .await?;
        add_column(manager, Payouts::Table, text_null(Payouts::Failure)).await?;
        add_column(
            manager,
            Payouts::Table,
            integer(Payouts::Generation).default(1).to_owned(),
        )
        .await?;
        // A payout left `pending` by the earlier code may have had its transfer sent before a crash:
        // look it up before anything is sent again.
        manager
            .exec_stmt(
                Query::update()
                    .table(Payouts::Table)
                    .value(Payouts::Status, "transferring")
                    .value(Payouts::Attempts, 1)
                    .value(Payouts::LastAttemptAtUs, 0)
                    .and_where(Expr::col(Payouts::Status).eq("pending"))
                    .to_owned(),
            )
            .await?;
        add_column(
            manager,
            Invoices::Table,
            big_integer_null(Invoices::FinalizedAtUs),
        )
        .await?;
        add_column(
            manager,
            Invoices::Table,
            boolean(Invoices::Local).default(false).to_owned(),
        )
        .await?;
        add_column(manager, Invoices::Table, big_integer_null(Invoices::PaidAtUs)).await?;
        add_column(
            manager,
            MeterPushes::Table,
            big_integer_null(MeterPushes::SentAtUs),
        )
        .await?;
        add_column(
            manager,
            Subscriptions::Table,
            boolean(Subscriptions::PluginFeesItem).default(false).to_owned(),
        )
        .await?;
        backfill(manager).await?;
        // One payout per author, run and currency (earnings are paid in the currency they were collected in).
        manager
            .drop_index(
                Index::drop()
                    .name("uq_payouts_tenant_period")
                    .table(Payouts::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("uq_payouts_tenant_period_currency")
                    .table(Payouts::Table)
                    .col(Payouts::TenantId)
                    .col(Payouts::Period)
                    .col(Payouts::Currency)
                    .unique()
                    .to_owned(),
            )
            .await
    }
}
