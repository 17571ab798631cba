//! Money. The ledger is the source of truth; this crate turns it into statements, keeps Stripe in step
//! with it, and pays plugin authors.
//!
//! - **Local mode** (no Stripe key): plan changes apply at once and statements are computed from the
//!   ledger, so the embedded platform shows real numbers.
//! - **Stripe mode**: a customer per tenant, Checkout to subscribe, a subscription with the plan's flat
//!   price plus metered prices; usage is pushed to Stripe meters per tenant per bucket (an hour by
//!   default) by [`Billing::sync_once`]; webhooks update subscription state; authors are paid through
//!   Connect. Statements are computed the same way, so both modes show the same numbers.

#![forbid(unsafe_code)]

pub mod events;
pub mod prices;
pub mod signature;
pub mod stripe;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Months, NaiveDate, Utc};
use plinth_core::ErrorCode;
use plinth_core::Micros;
use plinth_core::api::{Plan, Subscription};
use plinth_core::billing::{
    ConnectOnboarding, InvoiceList, PaymentMode, Payout, PayoutRun, PayoutStatus, PlanChange,
    ProviderInvoice, Reconciliation, Statement, StatementItem, SyncReport,
};
use plinth_core::id::TenantId;
use plinth_store::audit::Who;
use plinth_store::payments::{METER_CALLS, MODEL_KIND, PayoutClaim, ProviderChange};
use plinth_store::plans::{FREE_PLAN, monthly_periods};
use plinth_store::{Store, StoreError};
use tokio::task::JoinHandle;

pub use crate::stripe::{PlanPrices, StripeGateway, StripeSettings, TransferError};

type Result<T> = std::result::Result<T, StoreError>;

/// How the usage sync runs.
#[derive(Debug, Clone, Copy)]
pub struct SyncSettings {
    /// Pause between sync runs.
    pub interval: Duration,
    /// Usage is aggregated per tenant per bucket of this width (an hour in production).
    pub bucket: Duration,
    /// A bucket is closed only this long after it ends, so calls still being served (and possibly
    /// withdrawn) when it ends are settled first.
    pub settle: Duration,
}

impl Default for SyncSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(60),
            bucket: Duration::from_secs(3_600),
            settle: Duration::from_secs(300),
        }
    }
}

/// The money side of the platform; cheap to clone.
#[derive(Debug, Clone)]
pub struct Billing {
    store: Store,
    stripe: Option<Arc<StripeGateway>>,
    sync: SyncSettings,
    /// How long after an invoice is paid its plugin fees wait before they are paid out, so a
    /// chargeback or refund shows up before the money leaves.
    payout_hold: Duration,
}

/// The payout hold unless configured: a week.
pub const DEFAULT_PAYOUT_HOLD: Duration = Duration::from_secs(7 * 86_400);

/// Most buckets one tenant's sync closes in one transaction.
const BUCKETS_PER_TRANSACTION: usize = 500;
/// Most meter events sent per batch.
const SEND_BATCH: u64 = 200;
/// Previous periods `GET /v1/invoices` lists.
const INVOICE_HISTORY: usize = 12;

fn refused(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError::Refused(code, message.into())
}

/// A statement from a plan and a period's usage. Each line is rounded to the cent once (half away from
/// zero), as Stripe rounds an invoice line, so the totals agree to the cent.
///
/// # Errors
/// An internal error when a total overflows (the ledger would have to hold absurd amounts).
pub fn statement(
    plan: &Plan,
    (period_start, period_end): (DateTime<Utc>, DateTime<Utc>),
    open: bool,
    items: Vec<StatementItem>,
    invoice: Option<ProviderInvoice>,
) -> Result<Statement> {
    let overflow = || StoreError::Internal(format!("the statement of {period_start} overflows"));
    let calls = items
        .iter()
        .filter(|i| i.kind == MODEL_KIND)
        .try_fold(0_i64, |sum, i| sum.checked_add(i.units))
        .ok_or_else(overflow)?;
    let plugin_fees = Micros::checked_sum(
        items
            .iter()
            .filter(|i| i.kind == plinth_store::plugins::USAGE_KIND)
            .map(|i| i.amount_micros),
    )
    .ok_or_else(overflow)?;
    let training = Micros::checked_sum(
        items
            .iter()
            .filter(|i| i.kind == plinth_store::training::USAGE_KIND)
            .map(|i| i.amount_micros),
    )
    .ok_or_else(overflow)?;
    let overage_calls = calls.saturating_sub(plan.included_calls).max(0);
    let overage = plan
        .price_per_call_micros
        .checked_mul(overage_calls)
        .ok_or_else(overflow)?;
    let subscription_fee_cents = plan.monthly_fee_micros.to_cents();
    let overage_cents = overage.to_cents();
    let plugin_fees_cents = plugin_fees.to_cents();
    let training_cents = training.to_cents();
    let total_cents = subscription_fee_cents
        .checked_add(overage_cents)
        .and_then(|t| t.checked_add(plugin_fees_cents))
        .and_then(|t| t.checked_add(training_cents))
        .ok_or_else(overflow)?;
    Ok(Statement {
        period_start,
        period_end,
        open,
        plan: plan.id.clone(),
        currency: plan.currency.clone(),
        subscription_fee_cents,
        calls,
        included_calls: plan.included_calls,
        overage_calls,
        price_per_call_micros: plan.price_per_call_micros,
        overage_cents,
        plugin_fees_micros: plugin_fees,
        plugin_fees_cents,
        training_micros: training,
        training_cents,
        total_cents,
        items,
        invoice,
    })
}

/// `[start, end)` of a `YYYY-MM` month in UTC.
fn month(period: &str) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let start = NaiveDate::parse_from_str(&format!("{period}-01"), "%Y-%m-%d")
        .ok()
        .filter(|_| period.len() == 7)
        .ok_or_else(|| refused(ErrorCode::ValidationFailed, "period: expected YYYY-MM"))?;
    let end = start
        .checked_add_months(Months::new(1))
        .ok_or_else(|| refused(ErrorCode::ValidationFailed, "period: out of range"))?;
    Ok((
        start.and_time(chrono::NaiveTime::MIN).and_utc(),
        end.and_time(chrono::NaiveTime::MIN).and_utc(),
    ))
}

/// `t` rounded down to a multiple of `width` since the epoch.
fn floor_to(t: DateTime<Utc>, width: Duration) -> DateTime<Utc> {
    let width_us = i64::try_from(width.as_micros()).unwrap_or(i64::MAX).max(1);
    let us = t.timestamp_micros();
    DateTime::from_timestamp_micros(us - us.rem_euclid(width_us)).unwrap_or(t)
}

impl Billing {
    /// # Errors
    /// When the Stripe client cannot be built from `stripe`.
    pub fn new(store: Store, stripe: Option<StripeSettings>, sync: SyncSettings) -> Result<Self> {
        let stripe = stripe.map(StripeGateway::new).transpose()?.map(Arc::new);
        Ok(Self {
            store,
            stripe,
            sync,
            payout_hold: DEFAULT_PAYOUT_HOLD,
        })
    }

    /// Sets how long collected plugin fees wait after their invoice was paid before they are paid out.
    #[must_use]
    pub fn with_payout_hold(mut self, hold: Duration) -> Self {
        self.payout_hold = hold;
        self
    }

    #[must_use]
    pub fn mode(&self) -> PaymentMode {
        if self.stripe.is_some() {
            PaymentMode::Stripe
        } else {
            PaymentMode::Local
        }
    }

    /// Whether plugin fees put on a tenant's bill reach a collected invoice: always in local billing
    /// (the operator records what was paid), and in Stripe mode only with a plugin-fees price on the
    /// subscriptions. Without one, priced plugins cannot be sold.
    #[must_use]
    pub fn collects_plugin_fees(&self) -> bool {
        self.stripe
            .as_ref()
            .is_none_or(|stripe| stripe.settings.plugin_fees_price.is_some())
    }

    /// Whether training put on a tenant's bill reaches a collected invoice: always in local billing,
    /// and in Stripe mode only with a training price on the subscriptions.
    #[must_use]
    pub fn collects_training(&self) -> bool {
        self.stripe
            .as_ref()
            .is_none_or(|stripe| stripe.settings.training_price.is_some())
    }

    fn stripe(&self) -> Result<&StripeGateway> {
        self.stripe.as_deref().ok_or_else(|| {
            refused(
                ErrorCode::PaymentsNotConfigured,
                "payments are not configured: the platform runs in local billing mode (set PLINTH_STRIPE_SECRET_KEY)",
            )
        })
    }

    /// Subscribes the tenant to `plan`, or moves it there. Locally the change is immediate; with Stripe
    /// a first paid plan goes through Checkout (the answer carries its URL) and later changes update
    /// the Stripe subscription, starting a new period now as local changes do.
    pub async fn change_plan(&self, tenant: &TenantId, plan: &str, who: &Who) -> Result<PlanChange> {
        let target = self.store.plan(plan).await?;
        let Some(stripe) = self.stripe.as_deref() else {
            let subscription = self.store.change_plan(tenant, &target.id, who).await?;
            return Ok(self.answer(subscription, None));
        };
        let account = self.store.billing_account(tenant).await?;
        if target.id == FREE_PLAN {
            let subscription = match &account.stripe_subscription_id {
                Some(_) => self.cancel(tenant, who).await?,
                None => self.store.change_plan(tenant, FREE_PLAN, who).await?,
            };
            return Ok(self.answer(subscription, None));
        }
        let prices = stripe.settings.plans.get(&target.id).ok_or_else(|| {
            refused(
                ErrorCode::PlanNotPurchasable,
                format!("plan `{}` has no Stripe prices configured", target.id),
            )
        })?;
        if let Some(subscription_id) = &account.stripe_subscription_id {
            if account.plan.id != target.id || account.cancel_at_period_end {
                // The new period is Stripe's, so its webhook about this change finds nothing to move.
                let period = stripe.change_plan(subscription_id, &target.id, prices).await?;
                self.store.change_plan_in(tenant, &target.id, period, who).await?;
            }
            return Ok(self.answer(self.store.subscription(tenant).await?, None));
        }
        let customer = match account.stripe_customer_id {
            Some(customer) => customer,
            None => {
                let customer = stripe.create_customer(tenant, &account.tenant_name).await?;
                self.store.set_stripe_customer(tenant, &customer).await?;
                customer
            }
        };
        let (session, url) = stripe
            .create_checkout(tenant, &customer, &target.id, prices)
            .await?;
        tracing::info!(%tenant, plan = %target.id, %session, "checkout session created");
        Ok(self.answer(self.store.subscription(tenant).await?, Some(url)))
    }

    fn answer(&self, subscription: Subscription, checkout_url: Option<String>) -> PlanChange {
        PlanChange {
            mode: self.mode(),
            subscription,
            checkout_url,
        }
    }

    /// Cancels the subscription at the end of its period; the tenant keeps its plan until then.
    pub async fn cancel(&self, tenant: &TenantId, who: &Who) -> Result<Subscription> {
        let account = self.store.billing_account(tenant).await?;
        if account.plan.id == FREE_PLAN {
            return self.store.subscription(tenant).await;
        }
        if let (Some(stripe), Some(subscription)) = (self.stripe.as_deref(), &account.stripe_subscription_id)
        {
            stripe.cancel_at_period_end(subscription, true).await?;
        }
        self.store.cancel_at_period_end(tenant, who).await?;
        self.store.subscription(tenant).await
    }

    async fn statement_for(
        &self,
        tenant: &TenantId,
        plan: &Plan,
        period: (DateTime<Utc>, DateTime<Utc>),
        open: bool,
        invoices: &[(i64, i64, ProviderInvoice)],
    ) -> Result<Statement> {
        let items = self.store.statement_items(tenant, period.0, period.1).await?;
        let invoice = invoices
            .iter()
            .find(|(start, end, _)| {
                *start == period.0.timestamp_micros() && *end == period.1.timestamp_micros()
            })
            .map(|(_, _, invoice)| invoice.clone());
        statement(plan, period, open, items, invoice)
    }

    /// The current period so far: what the next invoice will say if nothing else is used.
    pub async fn upcoming(&self, tenant: &TenantId) -> Result<Statement> {
        let account = self.store.billing_account(tenant).await?;
        let invoices = self.store.provider_invoices(tenant).await?;
        self.statement_for(
            tenant,
            &account.plan,
            (account.period_start, account.period_end),
            true,
            &invoices,
        )
        .await
    }

    /// Statements of the tenant's closed periods (the last twelve), newest first, each priced at the
    /// plan it ran on and with its Stripe invoice where Stripe has issued one. A period cut short by a
    /// plan change ends at the change.
    pub async fn invoices(&self, tenant: &TenantId) -> Result<InvoiceList> {
        let now = Utc::now();
        let invoices = self.store.provider_invoices(tenant).await?;
        let mut closed = Vec::new();
        for era in self.store.plan_eras(tenant).await? {
            let stop = era.ended_at.unwrap_or(now);
            for (start, end) in monthly_periods(era.first_period).take_while(|&(start, _)| start < stop) {
                // The current span's open period is the upcoming invoice, not a closed one.
                if era.ended_at.is_some() || end <= now {
                    closed.push((era.plan.clone(), (start, end.min(stop))));
                }
            }
        }
        let mut statements = Vec::new();
        for (plan, period) in closed.into_iter().rev().take(INVOICE_HISTORY) {
            statements.push(
                self.statement_for(tenant, &plan, period, false, &invoices)
                    .await?,
            );
        }
        Ok(InvoiceList {
            mode: self.mode(),
            invoices: statements,
        })
    }

    /// Verifies and applies one webhook delivery. Returns whether the event was new (a duplicate
    /// delivery is acknowledged and changes nothing).
    pub async fn receive_webhook(&self, signature: Option<&str>, body: &[u8]) -> Result<bool> {
        let stripe = self.stripe()?;
        signature::verify(
            &stripe.settings.webhook_secret,
            signature,
            body,
            Utc::now().timestamp(),
        )
        .map_err(|err| {
            metrics::counter!("plinth_stripe_webhooks_refused_total").increment(1);
            refused(ErrorCode::InvalidSignature, err.to_string())
        })?;
        let mut event = events::parse(body, &stripe.settings)?;
        if let Some((payment, disputed)) = events::taken_back_payment(body)? {
            // Stripe unreachable: the delivery fails and Stripe sends it again.
            event.change = match stripe.invoice_of_payment(&payment).await? {
                // The customer too: money taken back from an invoice not seen yet is kept for it.
                Some((invoice, customer)) => ProviderChange::Refunded {
                    invoice,
                    customer,
                    disputed,
                },
                None => {
                    tracing::warn!(event = %event.id, %payment, "money taken back from a payment that paid no invoice");
                    ProviderChange::Ignored
                }
            };
        }
        let new = self.store.apply_provider_event(&event).await?;
        metrics::counter!("plinth_stripe_webhooks_total", "new" => new.to_string()).increment(1);
        tracing::info!(event = %event.id, kind = %event.kind, new, "Stripe event received");
        Ok(new)
    }

    /// [`Self::sync_once`] now on the database's clock, the one usage events are stamped on (see
    /// `plinth_store::ledger`): a replica whose own clock runs ahead cannot close buckets that
    /// events are still landing in.
    pub async fn sync_now(&self) -> Result<SyncReport> {
        let now_us = self.store.database_now_us().await?;
        let now = DateTime::<Utc>::from_timestamp_micros(now_us)
            .ok_or_else(|| StoreError::Internal(format!("the database's clock reads {now_us} µs")))?;
        self.sync_once(now).await
    }

    /// One usage sync: closes every metered tenant's settled buckets up to `now - settle`, then sends
    /// every closed bucket Stripe has not acknowledged (including ones a crashed run left behind).
    pub async fn sync_once(&self, now: DateTime<Utc>) -> Result<SyncReport> {
        let stripe = self.stripe()?;
        let settle = chrono::Duration::from_std(self.sync.settle).unwrap_or_default();
        let until = floor_to(now - settle, self.sync.bucket);
        let mut report = SyncReport::default();
        for tenant in self.store.metered_tenants().await? {
            // One tenant whose buckets cannot be closed must not stop everyone else's usage sync.
            loop {
                match self
                    .store
                    .close_meter_buckets(&tenant, until, self.sync.bucket, BUCKETS_PER_TRANSACTION)
                    .await
                {
                    Ok(closed) => {
                        report.buckets_closed += closed;
                        if closed < BUCKETS_PER_TRANSACTION as u64 {
                            break;
                        }
                    }
                    Err(err) => {
                        metrics::counter!("plinth_meter_sync_errors_total").increment(1);
                        tracing::error!(%tenant, error = %err, "cannot close this tenant's meter buckets; the others go on");
                        break;
                    }
                }
            }
        }
        loop {
            let pending = self.store.unsent_meter_pushes(SEND_BATCH).await?;
            if pending.is_empty() {
                break;
            }
            let batch = pending.len() as u64;
            let mut failed = 0;
            for push in pending {
                let event_name = match push.meter.as_str() {
                    METER_CALLS => &stripe.settings.calls_meter_event,
                    plinth_store::payments::METER_TRAINING => &stripe.settings.training_meter_event,
                    _ => &stripe.settings.plugin_fees_meter_event,
                };
                let sent = stripe
                    .send_meter_event(
                        event_name,
                        &push.stripe_customer_id,
                        push.value,
                        &push.identifier,
                        push.bucket_start.timestamp(),
                    )
                    .await;
                match sent {
                    Ok(()) => {
                        self.store.mark_meter_push_sent(&push.identifier).await?;
                        report.events_sent += 1;
                    }
                    Err(err) => {
                        tracing::warn!(identifier = %push.identifier, error = %err, "meter event not sent; will retry");
                        failed += 1;
                    }
                }
            }
            if failed > 0 || batch < SEND_BATCH {
                report.events_pending = failed;
                break;
            }
        }
        metrics::counter!("plinth_meter_events_sent_total").increment(report.events_sent);
        Ok(report)
    }

    /// Runs [`Self::sync_once`] every interval until the process stops. Stripe mode only.
    #[must_use]
    pub fn spawn_sync(&self) -> Option<JoinHandle<()>> {
        self.stripe.as_ref()?;
        let billing = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(billing.sync.interval).await;
                // Each run in a task of its own: one that panics is counted and the next runs anyway.
                let run = tokio::spawn({
                    let billing = billing.clone();
                    async move { billing.sync_now().await }
                });
                match run.await {
                    Ok(Ok(report)) => {
                        metrics::gauge!("plinth_meter_sync_last_success_timestamp_seconds")
                            .set(Utc::now().timestamp() as f64);
                        metrics::gauge!("plinth_meter_sync_pending_events").set(report.events_pending as f64);
                        if report.buckets_closed + report.events_sent > 0 {
                            tracing::info!(?report, "usage synced to Stripe");
                        }
                    }
                    Ok(Err(err)) => {
                        metrics::counter!("plinth_meter_sync_errors_total").increment(1);
                        tracing::warn!(error = %err, "usage sync failed; will retry");
                    }
                    Err(err) => {
                        metrics::counter!("plinth_meter_sync_panics_total").increment(1);
                        tracing::error!(error = %err, "usage sync panicked; will retry");
                    }
                }
            }
        }))
    }

    /// Compares every configured Stripe price with the plan it sells (fee, included calls, per-call
    /// price, currency, monthly recurrence) and the plugin-fees price with its micro-unit, and checks
    /// each metered price counts the meter usage is sent to; returns one line per difference, none
    /// when Stripe charges what the plans say.
    pub async fn check_prices(&self) -> Result<Vec<String>> {
        let stripe = self.stripe()?;
        let mut problems = Vec::new();
        let mut meters = Meters::default();
        for (plan_id, ids) in &stripe.settings.plans {
            let plan = match self.store.plan(plan_id).await {
                Ok(plan) => plan,
                Err(StoreError::NotFound(_)) => {
                    problems.push(format!(
                        "PLINTH_STRIPE_PLAN_PRICES names `{plan_id}`, which is not a plan"
                    ));
                    continue;
                }
                Err(err) => return Err(err),
            };
            let flat = stripe.price(&ids.flat).await?;
            problems.extend(prices::flat_price_problems(&plan, &ids.flat, &flat));
            let metered = stripe.price(&ids.metered).await?;
            problems.extend(prices::metered_price_problems(&plan, &ids.metered, &metered));
            let counted = meters.of(stripe, &metered).await?;
            problems.extend(prices::meter_problems(
                &ids.metered,
                counted,
                &stripe.settings.calls_meter_event,
            ));
        }
        if let Some(id) = &stripe.settings.plugin_fees_price {
            let price = stripe.price(id).await?;
            problems.extend(prices::plugin_fees_price_problems(id, &price));
            let counted = meters.of(stripe, &price).await?;
            problems.extend(prices::meter_problems(
                id,
                counted,
                &stripe.settings.plugin_fees_meter_event,
            ));
        }
        if let Some(id) = &stripe.settings.training_price {
            let price = stripe.price(id).await?;
            problems.extend(prices::plugin_fees_price_problems(id, &price));
            let counted = meters.of(stripe, &price).await?;
            problems.extend(prices::meter_problems(
                id,
                counted,
                &stripe.settings.training_meter_event,
            ));
        }
        Ok(problems)
    }

    /// Checks the prices once in the background (at start-up) and logs each difference as an error;
    /// the platform keeps serving, since Stripe being slow to answer must not stop it.
    pub fn spawn_price_check(&self) -> Option<JoinHandle<()>> {
        self.stripe.as_ref()?;
        let billing = self.clone();
        Some(tokio::spawn(async move {
            match billing.check_prices().await {
                Ok(problems) => {
                    metrics::gauge!("plinth_stripe_price_mismatches").set(problems.len() as f64);
                    for problem in &problems {
                        tracing::error!(%problem, "a Stripe price does not match its plan; run `plinth billing check-prices`");
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "could not compare the Stripe prices with the plans");
                }
            }
        }))
    }

    /// Ledger totals against what was handed to Stripe.
    pub async fn reconcile(&self) -> Result<Reconciliation> {
        let rows = self.store.reconciliation().await?;
        let balanced = rows.iter().all(|r| r.ledger == r.sent + r.pending);
        Ok(Reconciliation { rows, balanced })
    }

    /// Creates the author's connected account on first use and returns a fresh onboarding link.
    pub async fn connect(&self, tenant: &TenantId) -> Result<ConnectOnboarding> {
        let stripe = self.stripe()?;
        let (account, payouts_enabled) = match self.store.author_account(tenant).await? {
            Some(existing) => existing,
            None => {
                let account = stripe.create_connected_account(tenant).await?;
                self.store.save_author_account(tenant, &account).await?;
                self.store
                    .author_account(tenant)
                    .await?
                    .ok_or(StoreError::NotFound("connected account"))?
            }
        };
        let url = stripe.onboarding_link(&account).await?;
        Ok(ConnectOnboarding {
            account_id: account,
            url,
            payouts_enabled,
        })
    }

    pub async fn payouts(&self, tenant: &TenantId) -> Result<Vec<Payout>> {
        self.store.payouts(tenant).await
    }

    /// Pays every connected author what tenants paid for their plugins up to the end of `period` (a
    /// month that has ended), less what earlier payouts paid: one payout per author, run and currency.
    /// Only invoices paid at least the payout hold before `now` count.
    ///
    /// Each payout is recorded with its amount before any transfer, then claimed for an attempt. An
    /// attempt whose outcome was lost (a crash, a timeout) leaves the payout `transferring`; the next
    /// run looks the transfer up on Stripe by the payout's id before trying again, so a rerun a minute
    /// or a month later never pays twice.
    pub async fn run_payouts(&self, period: &str, now: DateTime<Utc>, who: &Who) -> Result<PayoutRun> {
        let stripe = self.stripe()?;
        let (_, until) = month(period)?;
        if until > now {
            return Err(refused(
                ErrorCode::ValidationFailed,
                format!("period: {period} has not ended yet"),
            ));
        }
        let paid_by = now - chrono::Duration::from_std(self.payout_hold).unwrap_or_default();
        let mut run = PayoutRun {
            period: period.to_owned(),
            payouts: Vec::new(),
            waiting_for_onboarding: 0,
        };
        for author in self.store.plugin_authors().await? {
            let mut currencies: Vec<String> = self
                .store
                .author_balances(&author, until, paid_by)
                .await?
                .into_iter()
                .filter(|b| b.available().whole_cents() >= 1)
                .map(|b| b.currency)
                .collect();
            // Payouts of this run already recorded (some perhaps still transferring) are settled too,
            // and so are earlier runs' payouts still under way: each run finishes what any run began.
            let recorded = self.store.payouts(&author).await?;
            currencies.extend(
                recorded
                    .iter()
                    .filter(|p| p.period == period)
                    .map(|p| p.currency.clone()),
            );
            currencies.sort();
            currencies.dedup();
            let unfinished: Vec<Payout> = recorded
                .into_iter()
                .filter(|p| {
                    p.period != period
                        && matches!(p.status, PayoutStatus::Pending | PayoutStatus::Transferring)
                })
                .collect();
            if currencies.is_empty() && unfinished.is_empty() {
                continue;
            }
            if !matches!(self.store.author_account(&author).await?, Some((_, true))) {
                run.waiting_for_onboarding += 1;
                continue;
            }
            for payout in unfinished {
                let Some(claim) = self
                    .store
                    .open_payout(&author, who, &payout.period, &payout.currency, until, paid_by)
                    .await?
                else {
                    continue;
                };
                run.payouts.push(self.settle(stripe, claim, now, who).await?);
            }
            for currency in currencies {
                let Some(claim) = self
                    .store
                    .open_payout(&author, who, period, &currency, until, paid_by)
                    .await?
                else {
                    continue;
                };
                run.payouts.push(self.settle(stripe, claim, now, who).await?);
            }
        }
        Ok(run)
    }

    /// Takes one payout as far as it can go now.
    async fn settle(
        &self,
        stripe: &StripeGateway,
        claim: PayoutClaim,
        now: DateTime<Utc>,
        who: &Who,
    ) -> Result<Payout> {
        if matches!(claim.payout.status, PayoutStatus::Paid | PayoutStatus::Failed) {
            return Ok(claim.payout);
        }
        let stale_before = now - TRANSFER_SETTLES;
        let Some(claim) = self
            .store
            .begin_transfer(
                &claim.payout.id,
                now.timestamp_micros(),
                stale_before.timestamp_micros(),
            )
            .await?
        else {
            // Settled meanwhile, or an attempt that may still be running: leave it to the next run.
            return self.store.payout(&claim.payout.id).await;
        };
        if claim.attempts > 1
            && let Some(transfer) = stripe
                .find_transfer(&claim.payout.id, &claim.payout.period)
                .await?
        {
            tracing::info!(payout = %claim.payout.id, %transfer, "an earlier attempt had paid; recorded");
            return self.store.finish_payout(&claim, who, Ok(&transfer)).await;
        }
        let sent = stripe
            .transfer(
                claim.payout.amount_cents,
                &claim.payout.currency,
                &claim.stripe_account_id,
                &claim.payout.id,
                &claim.attempt_key(),
            )
            .await;
        match sent {
            Ok(transfer) => self.store.finish_payout(&claim, who, Ok(&transfer)).await,
            Err(TransferError::Refused(reason)) => self.store.finish_payout(&claim, who, Err(&reason)).await,
            Err(TransferError::Unknown(err)) => {
                tracing::warn!(payout = %claim.payout.id, error = %err,
                    "the transfer's outcome is unknown; the next run looks it up before trying again");
                self.store.payout(&claim.payout.id).await
            }
        }
    }

    /// Local billing: records that a tenant paid the statement of its closed period starting at
    /// `period_start`, so the plugin fees on it become payable to their authors.
    pub async fn mark_statement_paid(
        &self,
        tenant: &TenantId,
        period_start: DateTime<Utc>,
        who: &Who,
    ) -> Result<ProviderInvoice> {
        if self.stripe.is_some() {
            return Err(refused(
                ErrorCode::ManagedByPaymentProvider,
                "Stripe reports which invoices are paid; statements cannot be marked paid by hand",
            ));
        }
        let closed = self.invoices(tenant).await?;
        let statement = closed
            .invoices
            .iter()
            .find(|s| s.period_start == period_start)
            .ok_or(StoreError::NotFound("closed statement starting then"))?;
        self.store
            .mark_statement_paid(
                tenant,
                who,
                (statement.period_start, statement.period_end),
                statement.total_cents,
                &statement.currency,
            )
            .await
    }
}

/// How long after a transfer attempt began its request has surely ended (Stripe's client gives up
/// after 20 seconds): only then is a `transferring` payout looked up and retried.
const TRANSFER_SETTLES: chrono::Duration = chrono::Duration::minutes(10);

/// The meters the checked prices count, each looked up once.
#[derive(Default)]
struct Meters(std::collections::HashMap<String, stripe::MeterInfo>);

impl Meters {
    /// The meter `price` counts; `None` when it counts none.
    async fn of(
        &mut self,
        stripe: &StripeGateway,
        price: &stripe::PriceInfo,
    ) -> Result<Option<&stripe::MeterInfo>> {
        let Some(id) = price.recurring.as_ref().and_then(|r| r.meter.as_ref()) else {
            return Ok(None);
        };
        if !self.0.contains_key(id) {
            let meter = stripe.meter(id).await?;
            self.0.insert(id.clone(), meter);
        }
        Ok(self.0.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn plan() -> Plan {
        Plan {
            id: "pro".into(),
            name: "Pro".into(),
            currency: "usd".into(),
            monthly_fee_micros: Micros::units(49),
            included_calls: 10,
            price_per_call_micros: Micros(1_234),
            hard_cap: false,
            training_price_micros: Micros(0),
            rate_limit_per_minute: 600,
            burst: 100,
            isolation: plinth_core::api::PlanIsolation::FREE,
        }
    }

    fn item(kind: &str, name: &str, units: i64, amount: i64) -> StatementItem {
        StatementItem {
            kind: kind.into(),
            name: name.into(),
            units,
            amount_micros: Micros(amount),
        }
    }

    #[test]
    fn statements_charge_overage_and_plugin_fees_rounded_once_per_line() {
        let now = Utc::now();
        let s = statement(
            &plan(),
            (now, now),
            true,
            vec![
                item("model", "sentiment", 20, 20 * 1_234),
                item("model", "minilm", 7, 7 * 1_234),
                item("plugin", "triage", 3, 3 * 2_505),
            ],
            None,
        )
        .unwrap();
        assert_eq!(s.calls, 27);
        assert_eq!(s.overage_calls, 17);
        // 17 x 1234 = 20978 micro-dollars = 2.0978 cents -> 2 cents.
        assert_eq!(s.overage_cents, 2);
        // 3 x 2505 = 7515 micro-dollars = 0.7515 cents -> 1 cent.
        assert_eq!(s.plugin_fees_cents, 1);
        assert_eq!(s.subscription_fee_cents, 4_900);
        assert_eq!(s.total_cents, 4_903);
    }

    #[test]
    fn included_calls_cost_nothing() {
        let now = Utc::now();
        let s = statement(
            &plan(),
            (now, now),
            true,
            vec![item("model", "m", 10, 12_340)],
            None,
        )
        .unwrap();
        assert_eq!((s.overage_calls, s.overage_cents, s.total_cents), (0, 0, 4_900));
    }

    #[test]
    fn absurd_amounts_are_an_error_not_a_wrapped_total() {
        let now = Utc::now();
        let huge = vec![item("plugin", "a", 1, i64::MAX), item("plugin", "b", 1, i64::MAX)];
        assert!(statement(&plan(), (now, now), true, huge, None).is_err());
        let mut costly = plan();
        costly.price_per_call_micros = Micros(i64::MAX / 2);
        let calls = vec![item("model", "m", 1_000, 0)];
        assert!(statement(&costly, (now, now), true, calls, None).is_err());
    }

    #[test]
    fn months_parse_strictly() {
        let (from, to) = month("2026-02").unwrap();
        assert_eq!(from.to_rfc3339(), "2026-02-01T00:00:00+00:00");
        assert_eq!(to.to_rfc3339(), "2026-03-01T00:00:00+00:00");
        assert!(month("2026-2").is_err());
        assert!(month("2026-13").is_err());
        assert!(month("soon").is_err());
    }

    #[test]
    fn sync_ranges_end_on_the_bucket_grid() {
        let t = "2026-11-23T10:07:31Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            floor_to(t, Duration::from_secs(3_600)).to_rfc3339(),
            "2026-11-23T10:00:00+00:00"
        );
        assert_eq!(
            floor_to(t, Duration::from_secs(1)).to_rfc3339(),
            "2026-11-23T10:07:31+00:00"
        );
    }
}
