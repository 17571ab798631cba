//! Stripe webhook events, read into the store's [`ProviderEvent`]. Only the fields Plinth acts on are
//! read; an event of another type is recorded as seen and otherwise ignored.

use chrono::{DateTime, Utc};
use plinth_core::ErrorCode;
use plinth_core::api::SubscriptionStatus;
use plinth_core::billing::ProviderInvoice;
use plinth_store::StoreError;
use plinth_store::payments::{ProviderChange, ProviderEvent};
use serde::Deserialize;
use serde_json::Value;

use crate::stripe::StripeSettings;

#[derive(Debug, Deserialize)]
struct Envelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    data: Data,
}

#[derive(Debug, Deserialize)]
struct Data {
    object: Value,
}

fn text(object: &Value, field: &str) -> Option<String> {
    match object.get(field)? {
        Value::String(s) => Some(s.clone()),
        // Expanded objects carry their id.
        Value::Object(inner) => inner.get("id").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn time(object: &Value, field: &str) -> Option<DateTime<Utc>> {
    object
        .get(field)
        .and_then(Value::as_i64)
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
}

fn required(object: &Value, field: &str) -> Result<String, StoreError> {
    text(object, field).ok_or_else(|| malformed(&format!("data.object.{field} is missing")))
}

fn malformed(message: &str) -> StoreError {
    StoreError::Refused(ErrorCode::InvalidBody, format!("not a Stripe event: {message}"))
}

/// Stripe's subscription statuses, in Plinth's terms: anything that is not paid up is past due.
fn subscription_status(status: &str) -> SubscriptionStatus {
    match status {
        "active" | "trialing" => SubscriptionStatus::Active,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        _ => SubscriptionStatus::PastDue,
    }
}

/// Reads a verified webhook body.
///
/// # Errors
/// `invalid_body` when the JSON is not a Stripe event or lacks a field its type needs.
pub fn parse(body: &[u8], settings: &StripeSettings) -> Result<ProviderEvent, StoreError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|err| malformed(&err.to_string()))?;
    let object = &envelope.data.object;
    let change = match envelope.kind.as_str() {
        // A Checkout completed with a delayed payment method is not paid yet: the plan starts when
        // `checkout.session.async_payment_succeeded` says the money arrived.
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let paid = matches!(
                object.get("payment_status").and_then(Value::as_str),
                Some("paid" | "no_payment_required")
            );
            if object.get("mode").and_then(Value::as_str) != Some("subscription") || !paid {
                ProviderChange::Ignored
            } else {
                ProviderChange::CheckoutCompleted {
                    tenant: text(object, "client_reference_id").and_then(|t| t.parse().ok()),
                    customer: required(object, "customer")?,
                    subscription: required(object, "subscription")?,
                    plan: object
                        .get("metadata")
                        .and_then(|m| m.get("plan_id"))
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                }
            }
        }
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            let items = object
                .get("items")
                .and_then(|i| i.get("data"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let prices: Vec<String> = items
                .iter()
                .filter_map(|item| {
                    item.get("price")
                        .and_then(|p| text(p, "id").or_else(|| p.as_str().map(str::to_owned)))
                })
                .collect();
            let plan = prices
                .iter()
                .find_map(|price| settings.plan_of_price(price).map(str::to_owned))
                .or_else(|| {
                    object
                        .get("metadata")
                        .and_then(|m| m.get("plan_id"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
            // Current API versions keep the period on each item; older ones on the subscription.
            let period_of = |field: &str| {
                items
                    .iter()
                    .find_map(|item| time(item, field))
                    .or_else(|| time(object, field))
            };
            ProviderChange::Subscription {
                plugin_fees_item: settings
                    .plugin_fees_price
                    .as_ref()
                    .is_some_and(|fees| prices.contains(fees)),
                training_item: settings
                    .training_price
                    .as_ref()
                    .is_some_and(|training| prices.contains(training)),
                customer: required(object, "customer")?,
                subscription: required(object, "id")?,
                plan,
                status: subscription_status(object.get("status").and_then(Value::as_str).unwrap_or("active")),
                period_start: period_of("current_period_start"),
                period_end: period_of("current_period_end"),
                cancel_at_period_end: object
                    .get("cancel_at_period_end")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                deleted: envelope.kind == "customer.subscription.deleted",
            }
        }
        "invoice.finalized"
        | "invoice.paid"
        | "invoice.payment_failed"
        | "invoice.voided"
        | "invoice.marked_uncollectible" => {
            let cents = |field: &str| object.get(field).and_then(Value::as_i64).unwrap_or(0);
            let (Some(period_start), Some(period_end)) =
                (time(object, "period_start"), time(object, "period_end"))
            else {
                return Err(malformed("data.object.period_start and period_end are required"));
            };
            ProviderChange::Invoice {
                customer: required(object, "customer")?,
                invoice: ProviderInvoice {
                    id: required(object, "id")?,
                    status: text(object, "status").unwrap_or_else(|| "open".to_owned()),
                    total_cents: cents("total"),
                    amount_paid_cents: cents("amount_paid"),
                    hosted_url: text(object, "hosted_invoice_url"),
                },
                currency: text(object, "currency").unwrap_or_else(|| "usd".to_owned()),
                period_start,
                period_end,
                finalized_at: object
                    .get("status_transitions")
                    .and_then(|t| time(t, "finalized_at")),
                paid_at: object.get("status_transitions").and_then(|t| time(t, "paid_at")),
                settled: match envelope.kind.as_str() {
                    "invoice.paid" => Some(true),
                    "invoice.payment_failed" => Some(false),
                    _ => None,
                },
            }
        }
        // Money given back on an invoice: a refund of its charge, or a credit note against it.
        "charge.refunded" | "credit_note.created" => match text(object, "invoice") {
            Some(invoice) => ProviderChange::Refunded {
                invoice,
                customer: text(object, "customer"),
                disputed: false,
            },
            // API versions from 2025-03-31 no longer name the invoice on a charge: the caller ties
            // the refund to its invoice through the payment (see `taken_back_payment`).
            None => ProviderChange::Ignored,
        },
        "account.updated" => ProviderChange::Account {
            account: required(object, "id")?,
            payouts_enabled: object
                .get("payouts_enabled")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        },
        _ => ProviderChange::Ignored,
    };
    Ok(ProviderEvent {
        id: envelope.id,
        kind: envelope.kind,
        created: envelope.created,
        change,
    })
}

/// Money taken back from a payment that names no invoice: the payment (a PaymentIntent), and whether
/// the customer's bank took it (a dispute) rather than the platform giving it (a refund). Disputes
/// (`charge.dispute.created`, `charge.dispute.funds_withdrawn`: Stripe sends no refund for them) name
/// their charge and payment, never an invoice, and so do refunds (`charge.refunded`) in API versions
/// from 2025-03-31: the caller looks the invoice up. `None` for any other event, and for a refund that
/// names its invoice ([`parse`] ties it).
///
/// # Errors
/// A body that is not a Stripe event.
pub fn taken_back_payment(body: &[u8]) -> Result<Option<(String, bool)>, StoreError> {
    let event: Value = serde_json::from_slice(body).map_err(|err| malformed(&err.to_string()))?;
    let kind = event.get("type").and_then(Value::as_str).unwrap_or_default();
    let object = event.pointer("/data/object");
    let disputed = match kind {
        "charge.dispute.created" | "charge.dispute.funds_withdrawn" => true,
        "charge.refunded" if object.and_then(|o| o.get("invoice")).is_none_or(Value::is_null) => false,
        _ => return Ok(None),
    };
    let payment = object
        .and_then(|o| o.get("payment_intent"))
        .and_then(Value::as_str)
        .map(|payment| (payment.to_owned(), disputed));
    if payment.is_none() {
        tracing::warn!(
            kind,
            "money taken back from a payment without a PaymentIntent: no invoice to tie it to"
        );
    }
    Ok(payment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StripeSettings {
        StripeSettings {
            secret_key: "sk".into(),
            webhook_secret: "whsec".into(),
            api_base: None,
            plans: std::collections::BTreeMap::new(),
            plugin_fees_price: None,
            calls_meter_event: "calls".into(),
            plugin_fees_meter_event: "fees".into(),
            training_price: None,
            training_meter_event: "training".into(),
            success_url: String::new(),
            cancel_url: String::new(),
            connect_return_url: String::new(),
            connect_refresh_url: String::new(),
        }
    }

    fn checkout(kind: &str, payment_status: &str) -> ProviderChange {
        let body = serde_json::json!({
            "id": "evt_1", "type": kind, "created": 1,
            "data": { "object": { "mode": "subscription", "payment_status": payment_status,
                "customer": "cus_1", "subscription": "sub_1", "metadata": { "plan_id": "pro" } } },
        });
        parse(body.to_string().as_bytes(), &settings()).unwrap().change
    }

    #[test]
    fn only_a_paid_checkout_starts_a_plan() {
        assert!(matches!(
            checkout("checkout.session.completed", "paid"),
            ProviderChange::CheckoutCompleted { .. }
        ));
        assert_eq!(
            checkout("checkout.session.completed", "unpaid"),
            ProviderChange::Ignored
        );
        assert!(matches!(
            checkout("checkout.session.async_payment_succeeded", "paid"),
            ProviderChange::CheckoutCompleted { .. }
        ));
    }

    #[test]
    fn refunds_name_the_invoice_they_give_money_back_on() {
        let body = serde_json::json!({
            "id": "evt_2", "type": "charge.refunded", "created": 1,
            "data": { "object": { "id": "ch_1", "invoice": "in_1", "amount_refunded": 100 } },
        });
        assert_eq!(
            parse(body.to_string().as_bytes(), &settings()).unwrap().change,
            ProviderChange::Refunded {
                invoice: "in_1".into(),
                customer: None,
                disputed: false,
            }
        );
    }

    #[test]
    fn disputes_and_refunds_without_an_invoice_name_the_payment_to_look_it_up_by() {
        let taken = |kind: &str, object: serde_json::Value| {
            let body = serde_json::json!({ "id": "evt_3", "type": kind, "created": 1, "data": { "object": object } });
            taken_back_payment(body.to_string().as_bytes()).unwrap()
        };
        let dispute = serde_json::json!({ "id": "du_1", "object": "dispute", "charge": "ch_1", "payment_intent": "pi_1" });
        assert_eq!(
            taken("charge.dispute.created", dispute.clone()),
            Some(("pi_1".into(), true))
        );
        assert_eq!(
            taken("charge.dispute.funds_withdrawn", dispute.clone()),
            Some(("pi_1".into(), true))
        );
        // Closing a dispute takes nothing more.
        assert_eq!(taken("charge.dispute.closed", dispute), None);
        // A refund names its invoice (older API versions: `parse` ties it) or only its payment.
        let refund = serde_json::json!({ "id": "ch_1", "object": "charge", "payment_intent": "pi_1", "refunded": true });
        assert_eq!(
            taken("charge.refunded", refund.clone()),
            Some(("pi_1".into(), false))
        );
        let mut named = refund;
        named["invoice"] = "in_1".into();
        assert_eq!(taken("charge.refunded", named), None);
        // A payment made without a PaymentIntent (no invoice behind it) names none.
        assert_eq!(
            taken(
                "charge.dispute.created",
                serde_json::json!({ "id": "du_2", "charge": "ch_2" })
            ),
            None
        );
    }
}
