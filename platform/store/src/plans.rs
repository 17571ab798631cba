//! Plans and each tenant's subscription to one. Payment state (Stripe ids, past-due) lives on the same
//! rows so the payment rail attaches without reshaping them.

use chrono::{DateTime, Months, Utc};
use plinth_core::Micros;
use plinth_core::api::{Plan, PlanIsolation, Subscription, SubscriptionStatus};
use plinth_core::id::TenantId;
use sea_orm::{ActiveModelTrait, ConnectionTrait, EntityTrait, QueryOrder, Set};

use crate::audit::Who;
use crate::entity::{TenantScoped, plan_eras, plans, subscriptions};
use crate::{Result, Store, StoreError};

/// The plan every tenant starts on, and whose limits apply while a payment is past due.
pub const FREE_PLAN: &str = "free";

/// The plans a fresh installation offers. Operators edit them afterwards (`plinth admin plan`); seeding
/// never overwrites an edit.
#[must_use]
pub fn default_plans() -> Vec<Plan> {
    let plan = |id: &str,
                name: &str,
                fee: i64,
                included: i64,
                price: i64,
                hard_cap,
                rate,
                burst,
                isolation,
                training: i64| Plan {
        id: id.to_owned(),
        name: name.to_owned(),
        currency: "usd".to_owned(),
        monthly_fee_micros: Micros::units(fee),
        included_calls: included,
        price_per_call_micros: Micros(price),
        hard_cap,
        training_price_micros: Micros(training),
        rate_limit_per_minute: rate,
        burst,
        isolation,
    };
    // The same values as migrations m0007 and m0011 give the shipped plans.
    vec![
        plan(
            FREE_PLAN,
            "Free",
            0,
            1_000,
            0,
            true,
            60,
            10,
            PlanIsolation::FREE,
            0,
        ),
        plan(
            "pro",
            "Pro",
            49,
            100_000,
            400,
            false,
            600,
            100,
            PlanIsolation {
                plugin_instances: 8,
                scheduling_weight: 4,
                max_models: 20,
                max_model_versions: 20,
                max_model_bytes: 20 << 30,
                max_datasets: 20,
                max_dataset_bytes: 256 << 20,
                training_jobs: 2,
            },
            2_000,
        ),
        plan(
            "enterprise",
            "Enterprise",
            990,
            3_000_000,
            200,
            false,
            6_000,
            1_000,
            PlanIsolation {
                plugin_instances: 32,
                scheduling_weight: 16,
                max_models: 200,
                max_model_versions: 50,
                max_model_bytes: 200 << 30,
                max_datasets: 200,
                max_dataset_bytes: 2 << 30,
                training_jobs: 4,
            },
            1_000,
        ),
    ]
}

fn to_plan(model: plans::Model) -> Plan {
    Plan {
        id: model.id,
        name: model.name,
        currency: model.currency,
        monthly_fee_micros: Micros(model.monthly_fee_micros),
        included_calls: model.included_calls,
        price_per_call_micros: Micros(model.price_per_call_micros),
        hard_cap: model.hard_cap,
        training_price_micros: Micros(model.training_price_micros),
        rate_limit_per_minute: u32::try_from(model.rate_limit_per_minute).unwrap_or(0),
        burst: u32::try_from(model.burst).unwrap_or(0),
        isolation: PlanIsolation {
            plugin_instances: u32::try_from(model.plugin_instances).unwrap_or(0),
            scheduling_weight: u32::try_from(model.scheduling_weight).unwrap_or(1),
            max_models: u32::try_from(model.max_models).unwrap_or(0),
            max_model_versions: u32::try_from(model.max_model_versions).unwrap_or(0),
            max_model_bytes: u64::try_from(model.max_model_bytes).unwrap_or(0),
            max_datasets: u32::try_from(model.max_datasets).unwrap_or(0),
            max_dataset_bytes: u64::try_from(model.max_dataset_bytes).unwrap_or(0),
            training_jobs: u32::try_from(model.training_jobs).unwrap_or(0),
        },
    }
}

fn plan_model(plan: &Plan, now: DateTime<Utc>) -> Result<plans::ActiveModel> {
    let int = |value: u32, what: &str| {
        i32::try_from(value).map_err(|_| StoreError::invalid(format!("{what} is too large")))
    };
    Ok(plans::ActiveModel {
        id: Set(plan.id.clone()),
        name: Set(plan.name.clone()),
        currency: Set(plan.currency.clone()),
        monthly_fee_micros: Set(plan.monthly_fee_micros.0),
        included_calls: Set(plan.included_calls),
        price_per_call_micros: Set(plan.price_per_call_micros.0),
        hard_cap: Set(plan.hard_cap),
        rate_limit_per_minute: Set(int(plan.rate_limit_per_minute, "rate_limit_per_minute")?),
        burst: Set(int(plan.burst, "burst")?),
        plugin_instances: Set(int(plan.isolation.plugin_instances, "plugin_instances")?),
        scheduling_weight: Set(int(plan.isolation.scheduling_weight, "scheduling_weight")?),
        max_models: Set(int(plan.isolation.max_models, "max_models")?),
        max_model_versions: Set(int(plan.isolation.max_model_versions, "max_model_versions")?),
        max_model_bytes: Set(i64::try_from(plan.isolation.max_model_bytes)
            .map_err(|_| StoreError::invalid("max_model_bytes is too large"))?),
        training_price_micros: Set(plan.training_price_micros.0),
        max_datasets: Set(int(plan.isolation.max_datasets, "max_datasets")?),
        max_dataset_bytes: Set(i64::try_from(plan.isolation.max_dataset_bytes)
            .map_err(|_| StoreError::invalid("max_dataset_bytes is too large"))?),
        training_jobs: Set(int(plan.isolation.training_jobs, "training_jobs")?),
        stripe_flat_price_id: Set(None),
        stripe_metered_price_id: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
    })
}

fn validate_plan(plan: &Plan) -> Result<()> {
    let slug_ok = !plan.id.is_empty()
        && plan.id.len() <= 40
        && plan
            .id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !slug_ok {
        return Err(StoreError::invalid(
            "plan id must be 1-40 lower-case letters, digits or dashes",
        ));
    }
    if plan.monthly_fee_micros.0 < 0
        || plan.price_per_call_micros.0 < 0
        || plan.training_price_micros.0 < 0
        || plan.included_calls < 0
    {
        return Err(StoreError::invalid(
            "plan prices and included calls cannot be negative",
        ));
    }
    if plan.rate_limit_per_minute == 0 || plan.burst == 0 {
        return Err(StoreError::invalid(
            "rate_limit_per_minute and burst must be positive",
        ));
    }
    if plan.rate_limit_per_minute > crate::cache::MAX_PER_MINUTE {
        return Err(StoreError::invalid(format!(
            "rate_limit_per_minute: at most {} (one a microsecond)",
            crate::cache::MAX_PER_MINUTE
        )));
    }
    if plan.isolation.plugin_instances == 0 || plan.isolation.scheduling_weight == 0 {
        return Err(StoreError::invalid(
            "plugin_instances and scheduling_weight must be positive",
        ));
    }
    if plan.isolation.scheduling_weight > 1_000 {
        return Err(StoreError::invalid("scheduling_weight: at most 1000"));
    }
    let currency_ok = plan.currency.len() == 3 && plan.currency.bytes().all(|b| b.is_ascii_lowercase());
    if !currency_ok || ZERO_DECIMAL_CURRENCIES.contains(&plan.currency.as_str()) {
        return Err(StoreError::invalid(
            "currency: a lower-case ISO 4217 code of a currency with cents (statements and payouts are in hundredths)",
        ));
    }
    Ok(())
}

/// Currencies whose minor unit is not a hundredth (Stripe's zero- and three-decimal lists). Statements
/// and payouts count hundredths of the currency, so plans cannot be priced in these.
const ZERO_DECIMAL_CURRENCIES: &[&str] = &[
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof",
    "xpf", "bhd", "jod", "kwd", "omr", "tnd",
];

/// The billing period containing `now` for a subscription anchored at `start`, rolling monthly.
pub(crate) fn current_period(start: DateTime<Utc>, end: DateTime<Utc>, now: DateTime<Utc>) -> Period {
    monthly_periods((start, end))
        .find(|&(_, end)| end > now)
        .unwrap_or((start, DateTime::<Utc>::MAX_UTC))
}

/// The periods that roll monthly from `first`, end to end.
pub fn monthly_periods(first: Period) -> impl Iterator<Item = Period> {
    std::iter::successors(Some(first), |&(_, end)| {
        end.checked_add_months(Months::new(1)).map(|next| (end, next))
    })
}

impl Store {
    pub(crate) async fn seed_default_plans(&self) -> Result<()> {
        let now = Utc::now();
        for plan in default_plans() {
            if plans::Entity::find_by_id(plan.id.as_str())
                .one(self.db())
                .await?
                .is_none()
            {
                plan_model(&plan, now)?.insert(self.db()).await?;
            }
        }
        Ok(())
    }

    /// All plans, cheapest first.
    pub async fn list_plans(&self) -> Result<Vec<Plan>> {
        let rows = plans::Entity::find()
            .order_by_asc(plans::Column::MonthlyFeeMicros)
            .order_by_asc(plans::Column::Id)
            .all(self.db())
            .await?;
        Ok(rows.into_iter().map(to_plan).collect())
    }

    pub async fn plan(&self, id: &str) -> Result<Plan> {
        find_plan(self.db(), id).await
    }

    /// Creates or replaces a plan (operators).
    pub async fn upsert_plan(&self, plan: &Plan) -> Result<Plan> {
        validate_plan(plan)?;
        let now = Utc::now();
        let mut model = plan_model(plan, now)?;
        match plans::Entity::find_by_id(plan.id.as_str()).one(self.db()).await? {
            Some(existing) => {
                model.created_at = Set(existing.created_at);
                model.stripe_flat_price_id = Set(existing.stripe_flat_price_id);
                model.stripe_metered_price_id = Set(existing.stripe_metered_price_id);
                Ok(to_plan(model.update(self.db()).await?))
            }
            None => Ok(to_plan(model.insert(self.db()).await?)),
        }
    }

    pub async fn subscription(&self, tenant: &TenantId) -> Result<Subscription> {
        let row = subscriptions::Entity::find_in(tenant)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("subscription"))?;
        let now = Utc::now();
        let plan_id = if lapsed(&row, now) {
            FREE_PLAN
        } else {
            row.plan_id.as_str()
        };
        let plan = find_plan(self.db(), plan_id).await?;
        let (start, end) = current_period(row.current_period_start, row.current_period_end, now);
        Ok(Subscription {
            tenant_id: tenant.clone(),
            plan,
            status: SubscriptionStatus::parse(&row.status).unwrap_or(SubscriptionStatus::Active),
            current_period_start: start,
            current_period_end: end,
            cancel_at_period_end: row.cancel_at_period_end && plan_id != FREE_PLAN,
        })
    }

    /// Moves a tenant to another plan, starting a new period now.
    pub async fn change_plan(&self, tenant: &TenantId, plan_id: &str, who: &Who) -> Result<Subscription> {
        self.change_plan_in(tenant, plan_id, None, who).await
    }

    /// Moves a tenant to another plan, starting the given period (the payment provider's), or a
    /// month from now.
    pub async fn change_plan_in(
        &self,
        tenant: &TenantId,
        plan_id: &str,
        period: Option<(DateTime<Utc>, DateTime<Utc>)>,
        who: &Who,
    ) -> Result<Subscription> {
        let txn = self.write_transaction().await?;
        find_plan(&txn, plan_id).await?;
        let row = subscriptions::Entity::find_in(tenant)
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("tenant"))?;
        let previous = row.plan_id.clone();
        // Choosing the plan the tenant is on, with no cancellation to undo, changes nothing: a new
        // period would start the plan's call cap over (free calls without end, on the free plan).
        if previous == plan_id && !row.cancel_at_period_end {
            drop(txn);
            return self.subscription(tenant).await;
        }
        let now = Utc::now();
        let mut model: subscriptions::ActiveModel = row.clone().into();
        reanchor(
            &txn,
            &row,
            &mut model,
            plan_id,
            period.unwrap_or((now, month_after(now))),
        )
        .await?;
        // A payment past due stays so until the payment provider says it was paid: a change of plan
        // does not pay it.
        if row.status != SubscriptionStatus::PastDue.as_str() {
            model.status = Set(SubscriptionStatus::Active.as_str().to_owned());
        }
        model.cancel_at_period_end = Set(false);
        model.updated_at = Set(now);
        model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(tenant),
            who,
            "subscription.change_plan",
            Some(plan_id),
            serde_json::json!({ "from": previous, "to": plan_id }),
        )
        .await?;
        txn.commit().await?;
        self.credentials.forget_in_tenant(tenant, None);
        self.subscription(tenant).await
    }

    /// The tenant's spans on its plans, oldest first; the last is the current one.
    pub async fn plan_eras(&self, tenant: &TenantId) -> Result<Vec<PlanEra>> {
        let row = subscriptions::Entity::find_in(tenant)
            .one(self.db())
            .await?
            .ok_or(StoreError::NotFound("subscription"))?;
        let mut spans: Vec<Span> = plan_eras::Entity::find_in(tenant)
            .order_by_asc(plan_eras::Column::EndedAt)
            .all(self.db())
            .await?
            .into_iter()
            .map(|era| Span {
                plan_id: era.plan_id,
                first: (era.first_period_start, era.first_period_end),
                ended_at: Some(era.ended_at),
            })
            .collect();
        spans.extend(row_eras(&row, Utc::now()));
        let mut eras = Vec::with_capacity(spans.len());
        for span in spans {
            eras.push(PlanEra {
                plan: find_plan(self.db(), &span.plan_id).await?,
                first_period: span.first,
                ended_at: span.ended_at,
            });
        }
        Ok(eras)
    }

    pub(crate) async fn create_free_subscription(
        conn: &impl ConnectionTrait,
        tenant: &TenantId,
        now: DateTime<Utc>,
    ) -> Result<()> {
        subscriptions::ActiveModel {
            tenant_id: Set(tenant.to_string()),
            plan_id: Set(FREE_PLAN.to_owned()),
            status: Set(SubscriptionStatus::Active.as_str().to_owned()),
            current_period_start: Set(now),
            current_period_end: Set(now.checked_add_months(Months::new(1)).unwrap_or(now)),
            cancel_at_period_end: Set(false),
            stripe_customer_id: Set(None),
            stripe_subscription_id: Set(None),
            updated_at: Set(now),
            stripe_event_at: Set(None),
            status_event_at: Set(None),
            meter_synced_until_us: Set(None),
            plugin_fees_item: Set(false),
            training_item: Set(false),
        }
        .insert(conn)
        .await?;
        Ok(())
    }
}

pub(crate) async fn find_plan(conn: &impl ConnectionTrait, id: &str) -> Result<Plan> {
    plans::Entity::find_by_id(id)
        .one(conn)
        .await?
        .map(to_plan)
        .ok_or(StoreError::NotFound("plan"))
}

/// A span of a tenant's history on one plan, billed in monthly periods from its first period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanEra {
    pub plan: Plan,
    pub first_period: (DateTime<Utc>, DateTime<Utc>),
    /// When the span ended (its last period is cut there); `None` for the current one.
    pub ended_at: Option<DateTime<Utc>>,
}

pub(crate) fn month_after(t: DateTime<Utc>) -> DateTime<Utc> {
    t.checked_add_months(Months::new(1)).unwrap_or(t)
}

/// A span as stored: the plan's id, its first period, and when it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    plan_id: String,
    first: Period,
    ended_at: Option<DateTime<Utc>>,
}

/// `[start, end)` of a billing period.
pub type Period = (DateTime<Utc>, DateTime<Utc>);

/// The spans the stored subscription row stands for: its plan from its anchor, and for a plan canceled
/// at period end without a payment provider, the free plan from that end on. The last one is current.
fn row_eras(row: &subscriptions::Model, now: DateTime<Utc>) -> Vec<Span> {
    let span = |plan_id: &str, first: Period, ended_at| Span {
        plan_id: plan_id.to_owned(),
        first,
        ended_at,
    };
    let anchor = (row.current_period_start, row.current_period_end);
    if lapsed(row, now) {
        let end = row.current_period_end;
        vec![
            span(&row.plan_id, anchor, Some(end)),
            span(FREE_PLAN, (end, month_after(end)), None),
        ]
    } else {
        vec![span(&row.plan_id, anchor, None)]
    }
}

/// Ends the row's current span(s) at the new anchor's start, archiving them for statements of their
/// closed periods, and sets `model` to `plan` anchored at `period`.
pub(crate) async fn reanchor(
    conn: &impl ConnectionTrait,
    row: &subscriptions::Model,
    model: &mut subscriptions::ActiveModel,
    plan: &str,
    period: (DateTime<Utc>, DateTime<Utc>),
) -> Result<()> {
    if plan == row.plan_id && period.0 == row.current_period_start {
        model.current_period_end = Set(period.1);
        return Ok(());
    }
    for Span {
        plan_id,
        first,
        ended_at: ended,
    } in row_eras(row, period.0)
    {
        let ended_at = ended.unwrap_or(period.0);
        if ended_at <= first.0 {
            continue;
        }
        plan_eras::ActiveModel {
            id: Set(format!("{}-{}", row.tenant_id, first.0.timestamp_micros())),
            tenant_id: Set(row.tenant_id.clone()),
            plan_id: Set(plan_id),
            first_period_start: Set(first.0),
            first_period_end: Set(first.1),
            ended_at: Set(ended_at),
        }
        .insert(conn)
        .await?;
    }
    model.plan_id = Set(plan.to_owned());
    model.current_period_start = Set(period.0);
    model.current_period_end = Set(period.1);
    Ok(())
}

/// Whether a subscription canceled at period end has reached that end without a payment provider to
/// end it (local billing): the tenant is back on the free plan.
pub(crate) fn lapsed(row: &subscriptions::Model, now: DateTime<Utc>) -> bool {
    row.cancel_at_period_end && row.stripe_subscription_id.is_none() && row.current_period_end <= now
}

/// The terms a tenant's calls run under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Terms {
    /// Its plan's limits and price, or, while a payment is past due, the free plan's limits (at the
    /// subscribed plan's price: usage is still owed).
    pub plan: Plan,
    /// On a plan other than free, in good standing: there is a bill to put charges on.
    pub paid_subscription: bool,
    /// That bill is a payment provider's (Stripe) subscription.
    pub provider_subscription: bool,
}

pub(crate) async fn terms(conn: &impl ConnectionTrait, tenant: &TenantId) -> Result<Terms> {
    let row = subscriptions::Entity::find_in(tenant)
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("subscription"))?;
    if lapsed(&row, Utc::now()) {
        return Ok(Terms {
            plan: find_plan(conn, FREE_PLAN).await?,
            paid_subscription: false,
            provider_subscription: false,
        });
    }
    let subscribed = find_plan(conn, &row.plan_id).await?;
    let active = row.status == SubscriptionStatus::Active.as_str();
    let paid_subscription = active && row.plan_id != FREE_PLAN;
    let provider_subscription =
        paid_subscription && row.stripe_subscription_id.is_some() && row.plugin_fees_item;
    let plan = if active {
        subscribed
    } else {
        Plan {
            price_per_call_micros: subscribed.price_per_call_micros,
            training_price_micros: subscribed.training_price_micros,
            ..find_plan(conn, FREE_PLAN).await?
        }
    };
    Ok(Terms {
        plan,
        paid_subscription,
        provider_subscription,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_roll_forward_monthly() {
        let start = "2026-01-31T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let end = "2026-02-28T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let now = "2026-04-15T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
        let (s, e) = current_period(start, end, now);
        assert!(s <= now && now < e);
        assert_eq!(s.to_rfc3339(), "2026-03-28T00:00:00+00:00");
    }

    #[test]
    fn a_plan_canceled_at_period_end_gives_way_to_free_there() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let row = subscriptions::Model {
            tenant_id: "ten_1".into(),
            plan_id: "pro".into(),
            status: "active".into(),
            current_period_start: at("2026-01-10T00:00:00Z"),
            current_period_end: at("2026-02-10T00:00:00Z"),
            cancel_at_period_end: true,
            stripe_customer_id: None,
            stripe_subscription_id: None,
            updated_at: at("2026-01-10T00:00:00Z"),
            stripe_event_at: None,
            status_event_at: None,
            meter_synced_until_us: None,
            plugin_fees_item: false,
            training_item: false,
        };
        assert_eq!(row_eras(&row, at("2026-02-01T00:00:00Z")).len(), 1, "not yet");
        let eras = row_eras(&row, at("2026-03-01T00:00:00Z"));
        assert_eq!(eras[0].plan_id, "pro");
        assert_eq!(eras[0].ended_at, Some(at("2026-02-10T00:00:00Z")));
        assert_eq!(
            (eras[1].plan_id.as_str(), eras[1].first.0, eras[1].ended_at),
            (FREE_PLAN, at("2026-02-10T00:00:00Z"), None)
        );
        // With Stripe, Stripe ends the subscription; nothing lapses here.
        let stripe = subscriptions::Model {
            stripe_subscription_id: Some("sub_1".into()),
            ..row
        };
        assert_eq!(row_eras(&stripe, at("2026-03-01T00:00:00Z")).len(), 1);
    }

    #[test]
    fn a_plans_rate_is_at_most_one_a_microsecond() {
        let mut plan = default_plans().remove(1);
        plan.rate_limit_per_minute = crate::cache::MAX_PER_MINUTE;
        assert!(validate_plan(&plan).is_ok());
        plan.rate_limit_per_minute += 1;
        assert!(validate_plan(&plan).is_err());
    }

    #[test]
    fn plans_are_priced_in_currencies_with_cents() {
        let mut plan = default_plans().remove(1);
        plan.currency = "jpy".into();
        assert!(validate_plan(&plan).is_err());
        plan.currency = "EUR".into();
        assert!(validate_plan(&plan).is_err());
        plan.currency = "eur".into();
        assert!(validate_plan(&plan).is_ok());
    }

    #[test]
    fn default_plans_are_valid_and_free_is_first() {
        let plans = default_plans();
        assert_eq!(plans[0].id, FREE_PLAN);
        for plan in &plans {
            validate_plan(plan).unwrap();
        }
    }
}
