//! Request and response shapes of subscriptions, statements, invoices, Stripe webhooks and author
//! payouts.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Micros;
use crate::api::Subscription;

/// How the platform takes payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PaymentMode {
    /// No payment provider: plan changes apply at once and statements are computed from the ledger.
    Local,
    /// Stripe: Checkout to subscribe, usage pushed to Stripe meters, invoices from Stripe.
    Stripe,
}

/// `POST /v1/subscription`: subscribe to, or move to, a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ChangePlanRequest {
    pub plan: String,
}

/// The answer to a plan change: the subscription as it stands, and where the customer pays when the
/// change needs a payment method first (Stripe Checkout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanChange {
    pub mode: PaymentMode,
    pub subscription: Subscription,
    /// Set when the customer must complete Stripe Checkout; the plan changes when Stripe confirms it.
    pub checkout_url: Option<String>,
}

/// One resource's usage in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatementItem {
    /// `model`, `plugin` or `training`.
    pub kind: String,
    /// The model's or the plugin's name (for training, the model trained).
    pub name: String,
    /// Billed units (model items, plugin invocations, thousands of examples × epochs of training).
    pub units: i64,
    /// List price of those units: for models at the plan's per-call price before included calls; for
    /// plugins what the plugin charges.
    pub amount_micros: Micros,
}

/// What a Stripe invoice says about a period, as its webhooks reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProviderInvoice {
    pub id: String,
    /// Stripe's status: `draft`, `open`, `paid`, `uncollectible`, `void`.
    pub status: String,
    pub total_cents: i64,
    pub amount_paid_cents: i64,
    pub hosted_url: Option<String>,
}

/// A tenant's bill for one period, computed from the ledger. Every line is rounded to the cent once,
/// as Stripe rounds its invoice lines, so the total matches Stripe's invoice to the cent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Statement {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// Whether the period is still running (an upcoming invoice) or over.
    pub open: bool,
    pub plan: String,
    pub currency: String,
    /// The plan's monthly fee.
    pub subscription_fee_cents: i64,
    /// Model units in the period.
    pub calls: i64,
    pub included_calls: i64,
    /// Units beyond the included ones, billed at `price_per_call_micros`.
    pub overage_calls: i64,
    pub price_per_call_micros: Micros,
    pub overage_cents: i64,
    /// Plugin fees, at each plugin's price.
    pub plugin_fees_micros: Micros,
    pub plugin_fees_cents: i64,
    /// Training, per 1,000 examples × epochs at the plan's training price.
    #[serde(default)]
    pub training_micros: Micros,
    #[serde(default)]
    pub training_cents: i64,
    pub total_cents: i64,
    /// Usage by model and by plugin.
    pub items: Vec<StatementItem>,
    /// The Stripe invoice for this period, once Stripe has issued one.
    pub invoice: Option<ProviderInvoice>,
}

/// `GET /v1/invoices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvoiceList {
    pub mode: PaymentMode,
    /// Closed periods, newest first.
    pub invoices: Vec<Statement>,
}

/// Where a plugin author connects (or finishes connecting) a Stripe account to be paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConnectOnboarding {
    pub account_id: String,
    /// Stripe-hosted onboarding; single use and short-lived: ask again for a fresh one.
    pub url: String,
    pub payouts_enabled: bool,
}

/// Where a payout stands. `pending` -> `transferring` -> `paid` | `failed`; a transfer that may have
/// reached Stripe stays `transferring` until Stripe is asked, so it is never sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PayoutStatus {
    /// Recorded, not sent yet.
    Pending,
    /// Sent (or being sent) to Stripe; its outcome is not known yet.
    Transferring,
    Paid,
    /// Stripe refused the transfer; nothing moved, and a later run retries it.
    Failed,
}

impl PayoutStatus {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Transferring => "transferring",
            Self::Paid => "paid",
            Self::Failed => "failed",
        }
    }

    #[must_use]
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Pending, Self::Transferring, Self::Paid, Self::Failed]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// One transfer of an author's collected earnings, made by the payout run for a month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Payout {
    pub id: String,
    /// `YYYY-MM` (UTC): the run that made it; it pays what was collected up to that month's end and
    /// not paid before.
    pub period: String,
    /// What this payout pays: whole cents of the author's balance (the sub-cent rest carries over).
    pub earnings_micros: Micros,
    pub amount_cents: i64,
    pub currency: String,
    pub status: PayoutStatus,
    pub stripe_transfer_id: Option<String>,
    /// Why the last attempt failed, when it did.
    pub failure: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// `POST /v1/admin/payouts`: pay every connected author their earnings for a closed month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PayoutRequest {
    /// `YYYY-MM`, a month that has ended.
    pub period: String,
}

/// `POST /v1/admin/statements/paid`: in local billing, an operator records that a tenant paid the
/// statement of a closed period (Stripe mode learns this from Stripe).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MarkPaidRequest {
    pub tenant_id: crate::id::TenantId,
    /// The `period_start` of one of the tenant's closed statements (`GET /v1/invoices`).
    pub period_start: DateTime<Utc>,
}

/// What a payout run did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PayoutRun {
    pub period: String,
    /// Payouts made or confirmed by this run (a rerun returns the same ones).
    pub payouts: Vec<Payout>,
    /// Authors with earnings who have not finished Stripe onboarding; paid on a later run.
    pub waiting_for_onboarding: usize,
}

/// What one usage sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SyncReport {
    /// Buckets closed by this run (ledger totals fixed for sending).
    pub buckets_closed: u64,
    /// Meter events sent to Stripe (including ones a crashed run had closed but not sent).
    pub events_sent: u64,
    /// Meter events still waiting (Stripe unreachable); the next run sends them.
    pub events_pending: u64,
}

/// Ledger totals against what was handed to Stripe, per tenant and meter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReconciliationRow {
    pub tenant_id: String,
    /// `calls`, `plugin_fees` or `training`.
    pub meter: String,
    /// Usage the sync has covered so far (up to `synced_until`).
    pub synced_until: Option<DateTime<Utc>>,
    /// The ledger's total for the covered range (units, or micro-units of plugin fees and training).
    pub ledger: i64,
    /// What Stripe acknowledged.
    pub sent: i64,
    /// Closed but not yet acknowledged.
    pub pending: i64,
}

/// `GET /v1/admin/billing/reconciliation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reconciliation {
    pub rows: Vec<ReconciliationRow>,
    /// Every row's ledger total equals sent plus pending.
    pub balanced: bool,
}
