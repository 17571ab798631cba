//! Statements and the invoices that collect them: usage itemised per period, the invoices Stripe
//! reports (or, in local billing, the statements an operator records as paid), and which usage counts
//! as collected. Only collected plugin fees are paid out to plugin authors.
//!
//! A plugin call's fee is collected when a paid invoice charged it: an invoice of the call's tenant,
//! paid, whose period holds the call, and, for a Stripe invoice, paid in full in money (not by credit
//! or a 100% coupon) and finalized only after the meter event carrying the call's bucket of plugin
//! fees reached Stripe (usage Stripe heard of later is not on that invoice). A statement an operator
//! records as paid (local billing) collects what it states.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use plinth_core::Micros;
use plinth_core::billing::{ProviderInvoice, StatementItem};
use plinth_core::id::TenantId;
use sea_orm::sea_query::{Expr, ExprTrait, Query, SimpleExpr};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect, Set,
};

use super::MODEL_KIND;
use crate::audit::Who;
use crate::entity::{TenantScoped, invoices, meter_pushes, plugin_versions, plugins, usage_events};
use crate::{Result, Store, StoreError};

/// The status of an invoice whose money arrived (Stripe's, and local statements marked paid).
pub(crate) const PAID: &str = "paid";

fn overflow() -> StoreError {
    StoreError::Internal("a statement total overflows".into())
}

/// A condition on `usage_events` rows of plugin calls: a paid invoice in `currency`, paid no later
/// than `paid_by_us`, charged the call (see the module's doc). Overlapping invoices count a call once.
pub(crate) fn collected_in(currency: &str, paid_by_us: i64) -> SimpleExpr {
    let event = |column| (usage_events::Entity, column);
    let invoice = |column| (invoices::Entity, column);
    let push = |column| (meter_pushes::Entity, column);
    let sent_before_finalized = Query::select()
        .expr(Expr::val(1))
        .from(meter_pushes::Entity)
        .and_where(
            Expr::col(push(meter_pushes::Column::TenantId)).equals(event(usage_events::Column::TenantId)),
        )
        .and_where(Expr::col(push(meter_pushes::Column::Meter)).eq(super::METER_PLUGIN_FEES))
        .and_where(
            Expr::col(push(meter_pushes::Column::BucketStartUs))
                .lte(Expr::col(event(usage_events::Column::OccurredAtUs))),
        )
        .and_where(
            Expr::col(event(usage_events::Column::OccurredAtUs))
                .lt(Expr::col(push(meter_pushes::Column::BucketEndUs))),
        )
        // Stripe stamps finalization in whole seconds: a push in that same second counts as before.
        .and_where(
            Expr::col(push(meter_pushes::Column::SentAtUs))
                .lte(Expr::col(invoice(invoices::Column::FinalizedAtUs)).add(999_999)),
        )
        .to_owned();
    let paid_invoice = Query::select()
        .expr(Expr::val(1))
        .from(invoices::Entity)
        .and_where(
            Expr::col(invoice(invoices::Column::TenantId)).equals(event(usage_events::Column::TenantId)),
        )
        .and_where(Expr::col(invoice(invoices::Column::Status)).eq(PAID))
        .and_where(Expr::col(invoice(invoices::Column::PaidAtUs)).lte(paid_by_us))
        .and_where(Expr::col(invoice(invoices::Column::Currency)).eq(currency))
        .and_where(
            Expr::col(invoice(invoices::Column::PeriodStartUs))
                .lte(Expr::col(event(usage_events::Column::OccurredAtUs))),
        )
        .and_where(
            Expr::col(event(usage_events::Column::OccurredAtUs))
                .lt(Expr::col(invoice(invoices::Column::PeriodEndUs))),
        )
        // A Stripe invoice collects what it charged only if it was paid in full in money: one settled
        // by a credit balance or reduced to nothing by a coupon did not bring the fees in.
        .and_where(
            Expr::col(invoice(invoices::Column::Local))
                .eq(true)
                .or(Expr::col(invoice(invoices::Column::TotalCents))
                    .gt(0)
                    .and(
                        Expr::col(invoice(invoices::Column::AmountPaidCents))
                            .gte(Expr::col(invoice(invoices::Column::TotalCents))),
                    )
                    .and(Expr::exists(sent_before_finalized))),
        )
        .to_owned();
    Expr::exists(paid_invoice)
}

impl Store {
    /// Usage in `[from, to)` by model, by plugin (named) and training by model, largest amount first.
    pub async fn statement_items(
        &self,
        tenant: &TenantId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<StatementItem>> {
        #[derive(Debug, FromQueryResult)]
        struct Row {
            resource_kind: String,
            resource_id: String,
            units: i64,
            amount: i64,
        }
        let rows = usage_events::Entity::find_in(tenant)
            .filter(usage_events::Column::OccurredAtUs.gte(from.timestamp_micros()))
            .filter(usage_events::Column::OccurredAtUs.lt(to.timestamp_micros()))
            .filter(usage_events::Column::ResourceKind.is_in([
                MODEL_KIND,
                crate::plugins::USAGE_KIND,
                crate::training::USAGE_KIND,
            ]))
            .select_only()
            .column(usage_events::Column::ResourceKind)
            .column(usage_events::Column::ResourceId)
            .column_as(Expr::cust("CAST(SUM(units) AS BIGINT)"), "units")
            .column_as(Expr::cust("CAST(SUM(amount_micros) AS BIGINT)"), "amount")
            .group_by(usage_events::Column::ResourceKind)
            .group_by(usage_events::Column::ResourceId)
            .into_model::<Row>()
            .all(self.db())
            .await?;
        // Plugin usage is keyed by version: name it after its plugin, summing versions.
        let version_ids: Vec<&str> = rows
            .iter()
            .filter(|r| r.resource_kind == crate::plugins::USAGE_KIND)
            .map(|r| r.resource_id.as_str())
            .collect();
        let mut plugin_of: HashMap<String, String> = HashMap::new();
        if !version_ids.is_empty() {
            let versions = plugin_versions::Entity::find()
                .filter(plugin_versions::Column::Id.is_in(version_ids))
                .all(self.db())
                .await?;
            let plugin_ids: Vec<String> = versions.iter().map(|v| v.plugin_id.clone()).collect();
            let names: HashMap<String, String> = plugins::Entity::find()
                .filter(plugins::Column::Id.is_in(plugin_ids))
                .all(self.db())
                .await?
                .into_iter()
                .map(|p| (p.id, p.name))
                .collect();
            for version in versions {
                let name = names
                    .get(&version.plugin_id)
                    .cloned()
                    .unwrap_or(version.plugin_id);
                plugin_of.insert(version.id, name);
            }
        }
        let mut items: Vec<StatementItem> = Vec::new();
        for row in rows {
            let name = if row.resource_kind == crate::plugins::USAGE_KIND {
                plugin_of
                    .get(&row.resource_id)
                    .cloned()
                    .unwrap_or(row.resource_id)
            } else {
                row.resource_id
            };
            match items
                .iter_mut()
                .find(|i| i.kind == row.resource_kind && i.name == name)
            {
                Some(item) => {
                    item.units = item.units.checked_add(row.units).ok_or_else(overflow)?;
                    item.amount_micros = item
                        .amount_micros
                        .checked_add(Micros(row.amount))
                        .ok_or_else(overflow)?;
                }
                None => items.push(StatementItem {
                    kind: row.resource_kind,
                    name,
                    units: row.units,
                    amount_micros: Micros(row.amount),
                }),
            }
        }
        items.sort_by(|a, b| {
            b.amount_micros
                .cmp(&a.amount_micros)
                .then_with(|| a.name.cmp(&b.name))
        });
        Ok(items)
    }

    /// Stripe invoices a tenant has received, with the period whose usage they bill (Unix µs).
    pub async fn provider_invoices(&self, tenant: &TenantId) -> Result<Vec<(i64, i64, ProviderInvoice)>> {
        let rows = invoices::Entity::find_in(tenant)
            .order_by_desc(invoices::Column::PeriodStartUs)
            .all(self.db())
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    row.period_start_us,
                    row.period_end_us,
                    ProviderInvoice {
                        id: row.stripe_invoice_id,
                        status: row.status,
                        total_cents: row.total_cents,
                        amount_paid_cents: row.amount_paid_cents,
                        hosted_url: row.hosted_url,
                    },
                )
            })
            .collect())
    }

    /// The currencies of paid invoices: what collected plugin fees can be paid out in.
    pub(crate) async fn collected_currencies(&self) -> Result<Vec<String>> {
        #[derive(Debug, FromQueryResult)]
        struct Row {
            currency: String,
        }
        let rows = invoices::Entity::find()
            .filter(invoices::Column::Status.eq(PAID))
            .select_only()
            .column(invoices::Column::Currency)
            .distinct()
            .into_model::<Row>()
            .all(self.db())
            .await?;
        Ok(rows.into_iter().map(|row| row.currency).collect())
    }

    /// Local billing: records that the tenant paid the statement of the closed period starting at
    /// `period` (`start`, `end`, its total and currency), so its plugin fees become payable to their
    /// authors. Recording the same period twice changes nothing.
    pub async fn mark_statement_paid(
        &self,
        tenant: &TenantId,
        who: &Who,
        period: (DateTime<Utc>, DateTime<Utc>),
        total_cents: i64,
        currency: &str,
    ) -> Result<ProviderInvoice> {
        let id = format!("local_{}_{}", tenant.as_str(), period.0.timestamp_micros());
        let txn = self.write_transaction().await?;
        let existing = invoices::Entity::find_by_id(id.as_str()).one(&txn).await?;
        let row = match existing {
            Some(row) => row,
            None => {
                let row = invoices::ActiveModel {
                    stripe_invoice_id: Set(id.clone()),
                    tenant_id: Set(tenant.to_string()),
                    period_start_us: Set(period.0.timestamp_micros()),
                    period_end_us: Set(period.1.timestamp_micros()),
                    status: Set(PAID.to_owned()),
                    currency: Set(currency.to_ascii_lowercase()),
                    total_cents: Set(total_cents),
                    amount_paid_cents: Set(total_cents),
                    hosted_url: Set(None),
                    stripe_event_at: Set(0),
                    updated_at: Set(Utc::now()),
                    finalized_at_us: Set(Some(Utc::now().timestamp_micros())),
                    local: Set(true),
                    paid_at_us: Set(Some(Utc::now().timestamp_micros())),
                }
                .insert(&txn)
                .await?;
                crate::audit::record_operator_act(
                    &txn,
                    tenant,
                    who,
                    "statement.mark_paid",
                    Some(&id),
                    serde_json::json!({ "period_start": period.0, "period_end": period.1,
                        "total_cents": total_cents, "currency": currency }),
                )
                .await?;
                row
            }
        };
        txn.commit().await?;
        Ok(ProviderInvoice {
            id: row.stripe_invoice_id,
            status: row.status,
            total_cents: row.total_cents,
            amount_paid_cents: row.amount_paid_cents,
            hosted_url: row.hosted_url,
        })
    }
}
