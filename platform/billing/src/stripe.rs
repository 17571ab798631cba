//! The Stripe gateway: every call Plinth makes to Stripe, through async-stripe's client (auth, API
//! version, timeouts, `Idempotency-Key`, Stripe's error shape).
//!
//! Requests are form bodies built from the small structs below, and responses are read leniently into
//! structs holding only the fields Plinth uses. async-stripe's generated resource crates would type
//! every field of every object, at the price of a very large build and of failing on any response that
//! lacks a field the generator marked required; the handful of calls here do not need that.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use plinth_core::ErrorCode;
use plinth_core::id::TenantId;
use plinth_store::StoreError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy};
use stripe_client_core::{RequestBuilder, StripeMethod};

/// The Stripe prices a plan is sold at: its monthly fee, and its per-call price (a metered price on
/// the calls meter, tiered so the plan's included calls cost nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanPrices {
    pub flat: String,
    pub metered: String,
}

/// Everything the gateway needs from configuration.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    pub secret_key: String,
    pub webhook_secret: String,
    /// `None` for `https://api.stripe.com/`.
    pub api_base: Option<String>,
    /// Plan id to prices.
    pub plans: BTreeMap<String, PlanPrices>,
    /// The metered price on the plugin-fees meter (one micro-unit per meter unit).
    pub plugin_fees_price: Option<String>,
    /// The metered price on the training meter (one micro-unit per meter unit).
    pub training_price: Option<String>,
    /// Event names of the Stripe billing meters.
    pub calls_meter_event: String,
    pub plugin_fees_meter_event: String,
    pub training_meter_event: String,
    /// Where Checkout sends the customer back to.
    pub success_url: String,
    pub cancel_url: String,
    /// Where Connect onboarding sends the author back to (and where an expired link refreshes).
    pub connect_return_url: String,
    pub connect_refresh_url: String,
}

impl StripeSettings {
    /// The plan a price belongs to.
    #[must_use]
    pub fn plan_of_price(&self, price: &str) -> Option<&str> {
        self.plans
            .iter()
            .find(|(_, prices)| prices.flat == price || prices.metered == price)
            .map(|(plan, _)| plan.as_str())
    }
}

#[derive(Debug, Clone)]
pub struct StripeGateway {
    client: Client,
    pub settings: StripeSettings,
}

/// A Stripe object's id, and whatever else the caller reads.
#[derive(Debug, Deserialize)]
pub struct Created {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
}

/// A Stripe price, as far as the price check reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct PriceInfo {
    pub currency: String,
    /// Per-unit prices: the amount in cents, as an integer and as a decimal string.
    #[serde(default)]
    pub unit_amount: Option<i64>,
    #[serde(default)]
    pub unit_amount_decimal: Option<String>,
    #[serde(default)]
    pub recurring: Option<Recurring>,
    #[serde(default)]
    pub tiers_mode: Option<String>,
    /// Present when expanded.
    #[serde(default)]
    pub tiers: Option<Vec<PriceTier>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Recurring {
    pub interval: String,
    #[serde(default)]
    pub interval_count: Option<i64>,
    /// `licensed` or `metered`.
    #[serde(default)]
    pub usage_type: Option<String>,
    /// The billing meter a metered price counts (`mtr_...`).
    #[serde(default)]
    pub meter: Option<String>,
}

/// A Stripe billing meter, as far as the price check reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct MeterInfo {
    pub event_name: String,
    #[serde(default)]
    pub default_aggregation: Option<MeterAggregation>,
    #[serde(default)]
    pub customer_mapping: Option<PayloadKey>,
    #[serde(default)]
    pub value_settings: Option<PayloadKey>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MeterAggregation {
    /// `sum`, `count` or `last`.
    pub formula: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PayloadKey {
    pub event_payload_key: String,
}

/// The payload keys of the meter events Plinth sends: the customer, and the value to sum.
pub const METER_CUSTOMER_KEY: &str = "stripe_customer_id";
pub const METER_VALUE_KEY: &str = "value";

#[derive(Debug, Clone, Deserialize)]
pub struct PriceTier {
    /// `None` for the last, open-ended tier.
    #[serde(default)]
    pub up_to: Option<i64>,
    #[serde(default)]
    pub unit_amount: Option<i64>,
    #[serde(default)]
    pub unit_amount_decimal: Option<String>,
    #[serde(default)]
    pub flat_amount: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct SubscriptionItems {
    pub items: ItemList,
}

#[derive(Debug, Deserialize)]
pub struct ItemList {
    pub data: Vec<Item>,
}

#[derive(Debug, Deserialize)]
pub struct Item {
    pub id: String,
    #[serde(default)]
    pub current_period_start: Option<i64>,
    #[serde(default)]
    pub current_period_end: Option<i64>,
}

#[derive(Serialize)]
struct CustomerForm<'a> {
    name: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct LineItem<'a> {
    price: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<u32>,
}

#[derive(Serialize)]
struct SubscriptionData<'a> {
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct CheckoutForm<'a> {
    mode: &'a str,
    customer: &'a str,
    client_reference_id: &'a str,
    success_url: &'a str,
    cancel_url: &'a str,
    line_items: Vec<LineItem<'a>>,
    metadata: BTreeMap<&'a str, &'a str>,
    subscription_data: SubscriptionData<'a>,
}

#[derive(Serialize)]
struct ItemChange<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<&'a str>,
}

#[derive(Serialize)]
struct PlanChangeForm<'a> {
    items: Vec<ItemChange<'a>>,
    /// A plan change starts a new period now, as in local billing, without proration.
    billing_cycle_anchor: &'a str,
    proration_behavior: &'a str,
    cancel_at_period_end: bool,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct CancelForm {
    cancel_at_period_end: bool,
}

#[derive(Serialize)]
struct MeterEventForm<'a> {
    event_name: &'a str,
    identifier: &'a str,
    timestamp: i64,
    payload: BTreeMap<&'a str, String>,
}

#[derive(Serialize)]
struct AccountForm<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

#[derive(Serialize)]
struct AccountLinkForm<'a> {
    account: &'a str,
    refresh_url: &'a str,
    return_url: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct TransferForm<'a> {
    amount: i64,
    currency: &'a str,
    destination: &'a str,
    transfer_group: &'a str,
    metadata: BTreeMap<&'a str, &'a str>,
}

/// Why a Stripe request did not succeed.
#[derive(Debug)]
enum CallError {
    /// Stripe answered with an error status: for a 4xx other than 409 and 429, it did nothing.
    Answered { status: u16, message: String },
    /// No usable answer (timeout, connection lost, 5xx, unreadable body): it may or may not have acted.
    Unknown(String),
}

impl CallError {
    fn from_stripe(err: &stripe::StripeError) -> Self {
        tracing::warn!(error = %err, "Stripe request failed");
        metrics::counter!("plinth_stripe_errors_total").increment(1);
        match err {
            stripe::StripeError::Stripe(body, status) if *status < 500 => Self::Answered {
                status: *status,
                message: body.message.clone().unwrap_or_else(|| "no message".to_owned()),
            },
            stripe::StripeError::Stripe(body, status) => Self::Unknown(format!(
                "Stripe answered {status}: {}",
                body.message.as_deref().unwrap_or("no message")
            )),
            other => Self::Unknown(format!("Stripe could not be reached: {other}")),
        }
    }

    /// Whether Stripe certainly did nothing: a refusal of the request itself, not a conflict with a
    /// request still running under the same key (409) nor a throttle (429).
    fn refused(&self) -> Option<&str> {
        match self {
            Self::Answered { status, message } if *status != 409 && *status != 429 => Some(message),
            _ => None,
        }
    }
}

impl From<CallError> for StoreError {
    fn from(err: CallError) -> Self {
        let message = match err {
            CallError::Answered { status, message } => format!("Stripe answered {status}: {message}"),
            CallError::Unknown(message) => message,
        };
        StoreError::Refused(ErrorCode::PaymentProviderError, message)
    }
}

/// A transfer that did not go through.
#[derive(Debug)]
pub enum TransferError {
    /// Stripe refused it (e.g. the account cannot receive transfers): no money moved.
    Refused(String),
    /// Its outcome is unknown: look it up before trying again.
    Unknown(StoreError),
}

impl StripeGateway {
    /// # Errors
    /// When the secret key cannot be sent as a header.
    pub fn new(settings: StripeSettings) -> Result<Self, StoreError> {
        let mut builder = ClientBuilder::new(settings.secret_key.clone())
            .timeout(Duration::from_secs(20))
            .app_info("plinth", Some(env!("CARGO_PKG_VERSION").to_owned()), None);
        if let Some(base) = &settings.api_base {
            // The client appends `v1/...` to the base.
            let base = if base.ends_with('/') {
                base.clone()
            } else {
                format!("{base}/")
            };
            builder = builder.url(base);
        }
        let client = builder
            .build()
            .map_err(|err| StoreError::Internal(format!("cannot build the Stripe client: {err}")))?;
        Ok(Self { client, settings })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: StripeMethod,
        path: &str,
        form: Option<&impl Serialize>,
        idempotency_key: Option<&str>,
    ) -> Result<T, StoreError> {
        Ok(self.request(method, path, form, idempotency_key).await?)
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: StripeMethod,
        path: &str,
        form: Option<&impl Serialize>,
        idempotency_key: Option<&str>,
    ) -> Result<T, CallError> {
        let mut request = RequestBuilder::new(method, path);
        // Parameters go in the query of a GET and in the form body of anything else, as Stripe reads them.
        request = match (form, method) {
            (Some(params), StripeMethod::Get) => request.query(params),
            (Some(form), _) => request.form(form),
            (None, _) => request,
        };
        let strategy = match idempotency_key {
            Some(key) => RequestStrategy::Idempotent(
                IdempotencyKey::new(key).map_err(|err| CallError::Unknown(err.to_string()))?,
            ),
            None => RequestStrategy::Once,
        };
        let started = std::time::Instant::now();
        let value: miniserde::json::Value = request
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await
            .map_err(|err| CallError::from_stripe(&err))?;
        metrics::histogram!("plinth_stripe_request_seconds").record(started.elapsed().as_secs_f64());
        serde_json::from_str(&miniserde::json::to_string(&value))
            .map_err(|err| CallError::Unknown(format!("Stripe's answer to {path} was not understood: {err}")))
    }

    /// Creates the tenant's Stripe customer. The idempotency key is the tenant's, so two racing first
    /// checkouts get one customer.
    pub async fn create_customer(&self, tenant: &TenantId, name: &str) -> Result<String, StoreError> {
        let form = CustomerForm {
            name,
            metadata: BTreeMap::from([("tenant_id", tenant.as_str())]),
        };
        let customer: Created = self
            .call(
                StripeMethod::Post,
                "/customers",
                Some(&form),
                Some(&format!("customer-{tenant}")),
            )
            .await?;
        Ok(customer.id)
    }

    /// A Checkout Session that subscribes `customer` to `plan`; returns its id and URL.
    pub async fn create_checkout(
        &self,
        tenant: &TenantId,
        customer: &str,
        plan: &str,
        prices: &PlanPrices,
    ) -> Result<(String, String), StoreError> {
        let mut line_items = vec![
            LineItem {
                price: &prices.flat,
                quantity: Some(1),
            },
            LineItem {
                price: &prices.metered,
                quantity: None,
            },
        ];
        for usage_price in [&self.settings.plugin_fees_price, &self.settings.training_price]
            .into_iter()
            .flatten()
        {
            line_items.push(LineItem {
                price: usage_price,
                quantity: None,
            });
        }
        let metadata = BTreeMap::from([("tenant_id", tenant.as_str()), ("plan_id", plan)]);
        let form = CheckoutForm {
            mode: "subscription",
            customer,
            client_reference_id: tenant.as_str(),
            success_url: &self.settings.success_url,
            cancel_url: &self.settings.cancel_url,
            line_items,
            metadata: metadata.clone(),
            subscription_data: SubscriptionData { metadata },
        };
        let session: Created = self
            .call(StripeMethod::Post, "/checkout/sessions", Some(&form), None)
            .await?;
        let url = session.url.ok_or_else(|| {
            StoreError::Refused(
                ErrorCode::PaymentProviderError,
                "Stripe returned no Checkout URL".into(),
            )
        })?;
        Ok((session.id, url))
    }

    /// Moves a live subscription to another plan's prices, starting a new period now. Returns the new
    /// period as Stripe set it.
    pub async fn change_plan(
        &self,
        subscription: &str,
        plan: &str,
        prices: &PlanPrices,
    ) -> Result<Option<(DateTime<Utc>, DateTime<Utc>)>, StoreError> {
        let current: SubscriptionItems = self
            .call(
                StripeMethod::Get,
                &format!("/subscriptions/{subscription}"),
                None::<&()>,
                None,
            )
            .await?;
        let plugin_fees = self.settings.plugin_fees_price.as_deref();
        let mut items: Vec<ItemChange<'_>> = current
            .items
            .data
            .iter()
            .map(|item| ItemChange {
                id: Some(&item.id),
                deleted: Some(true),
                price: None,
            })
            .collect();
        for price in [
            Some(prices.flat.as_str()),
            Some(prices.metered.as_str()),
            plugin_fees,
            self.settings.training_price.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            items.push(ItemChange {
                id: None,
                deleted: None,
                price: Some(price),
            });
        }
        let form = PlanChangeForm {
            items,
            billing_cycle_anchor: "now",
            proration_behavior: "none",
            cancel_at_period_end: false,
            metadata: BTreeMap::from([("plan_id", plan)]),
        };
        let updated: SubscriptionItems = self
            .call(
                StripeMethod::Post,
                &format!("/subscriptions/{subscription}"),
                Some(&form),
                None,
            )
            .await?;
        Ok(updated.items.data.iter().find_map(|item| {
            let start = DateTime::from_timestamp(item.current_period_start?, 0)?;
            let end = DateTime::from_timestamp(item.current_period_end?, 0)?;
            Some((start, end))
        }))
    }

    /// A price with its tiers.
    pub async fn price(&self, id: &str) -> Result<PriceInfo, StoreError> {
        #[derive(Serialize)]
        struct Expand {
            expand: [&'static str; 1],
        }
        self.call(
            StripeMethod::Get,
            &format!("/prices/{id}"),
            Some(&Expand { expand: ["tiers"] }),
            None,
        )
        .await
    }

    /// A billing meter.
    pub async fn meter(&self, meter: &str) -> Result<MeterInfo, StoreError> {
        self.call(
            StripeMethod::Get,
            &format!("/billing/meters/{meter}"),
            None::<&()>,
            None,
        )
        .await
    }

    /// Cancels (or resumes) a subscription at the end of its period.
    pub async fn cancel_at_period_end(&self, subscription: &str, cancel: bool) -> Result<(), StoreError> {
        let _: Created = self
            .call(
                StripeMethod::Post,
                &format!("/subscriptions/{subscription}"),
                Some(&CancelForm {
                    cancel_at_period_end: cancel,
                }),
                None,
            )
            .await?;
        Ok(())
    }

    /// Reports one bucket of usage. `identifier` makes Stripe count it once however often it is sent;
    /// it is also the request's Idempotency-Key.
    pub async fn send_meter_event(
        &self,
        event_name: &str,
        customer: &str,
        value: i64,
        identifier: &str,
        timestamp: i64,
    ) -> Result<(), StoreError> {
        let form = MeterEventForm {
            event_name,
            identifier,
            timestamp,
            payload: BTreeMap::from([
                (METER_CUSTOMER_KEY, customer.to_owned()),
                (METER_VALUE_KEY, value.to_string()),
            ]),
        };
        let _: serde_json::Value = self
            .call(
                StripeMethod::Post,
                "/billing/meter_events",
                Some(&form),
                Some(identifier),
            )
            .await?;
        Ok(())
    }

    /// An Express connected account for a plugin author (one per author, by idempotency key).
    pub async fn create_connected_account(&self, tenant: &TenantId) -> Result<String, StoreError> {
        let form = AccountForm {
            kind: "express",
            metadata: BTreeMap::from([("tenant_id", tenant.as_str())]),
        };
        let account: Created = self
            .call(
                StripeMethod::Post,
                "/accounts",
                Some(&form),
                Some(&format!("account-{tenant}")),
            )
            .await?;
        Ok(account.id)
    }

    /// A fresh onboarding link for a connected account.
    pub async fn onboarding_link(&self, account: &str) -> Result<String, StoreError> {
        let form = AccountLinkForm {
            account,
            refresh_url: &self.settings.connect_refresh_url,
            return_url: &self.settings.connect_return_url,
            kind: "account_onboarding",
        };
        #[derive(Deserialize)]
        struct Link {
            url: String,
        }
        let link: Link = self
            .call(StripeMethod::Post, "/account_links", Some(&form), None)
            .await?;
        Ok(link.url)
    }

    /// Transfers `amount_cents` to a connected account, in `group` (the payout's id, by which it can be
    /// found again); `key` makes retries of one attempt one transfer (for 24 hours, on Stripe's side).
    pub async fn transfer(
        &self,
        amount_cents: i64,
        currency: &str,
        destination: &str,
        group: &str,
        key: &str,
    ) -> Result<String, TransferError> {
        let form = TransferForm {
            amount: amount_cents,
            currency,
            destination,
            transfer_group: group,
            metadata: BTreeMap::from([("payout", group)]),
        };
        match self
            .request::<Created>(StripeMethod::Post, "/transfers", Some(&form), Some(key))
            .await
        {
            Ok(transfer) => Ok(transfer.id),
            Err(err) => match err.refused() {
                Some(message) => Err(TransferError::Refused(message.to_owned())),
                None => Err(TransferError::Unknown(err.into())),
            },
        }
    }

    /// The invoice a payment (a PaymentIntent) paid, if any, and its customer, from Stripe's invoice
    /// payments.
    pub async fn invoice_of_payment(
        &self,
        payment_intent: &str,
    ) -> Result<Option<(String, Option<String>)>, StoreError> {
        #[derive(Serialize)]
        struct Query<'a> {
            #[serde(rename = "payment[type]")]
            kind: &'a str,
            #[serde(rename = "payment[payment_intent]")]
            payment_intent: &'a str,
            limit: u32,
            #[serde(rename = "expand[]")]
            expand: &'a str,
        }
        #[derive(Deserialize)]
        struct Invoice {
            id: String,
            customer: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Expandable {
            Object(Invoice),
            Id(String),
        }
        #[derive(Deserialize)]
        struct InvoicePayment {
            invoice: Expandable,
        }
        #[derive(Deserialize)]
        struct List {
            data: Vec<InvoicePayment>,
        }
        let page: List = self
            .call(
                StripeMethod::Get,
                "/invoice_payments",
                Some(&Query {
                    kind: "payment_intent",
                    payment_intent,
                    limit: 1,
                    expand: "data.invoice",
                }),
                None,
            )
            .await?;
        Ok(page.data.into_iter().next().map(|payment| match payment.invoice {
            Expandable::Object(invoice) => (invoice.id, invoice.customer),
            Expandable::Id(id) => (id, None),
        }))
    }

    /// The transfer made for the payout `payout`, if any: what a payout whose last attempt's outcome
    /// is unknown looks up before trying again, at any age. Transfers are found by their
    /// `transfer_group` (the payout's id; `payouts-<period>` for payouts made before that) and told
    /// apart by their `payout` metadata.
    pub async fn find_transfer(&self, payout: &str, period: &str) -> Result<Option<String>, StoreError> {
        #[derive(Serialize)]
        struct Query<'a> {
            transfer_group: &'a str,
            limit: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            starting_after: Option<&'a str>,
        }
        #[derive(Deserialize)]
        struct Transfer {
            id: String,
            #[serde(default)]
            metadata: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        struct List {
            data: Vec<Transfer>,
            #[serde(default)]
            has_more: bool,
        }
        let mut mine = Vec::new();
        for group in [payout.to_owned(), format!("payouts-{period}")] {
            // Every page: the legacy group holds every author's transfer of a month.
            let mut after: Option<String> = None;
            loop {
                let page: List = self
                    .call(
                        StripeMethod::Get,
                        "/transfers",
                        Some(&Query {
                            transfer_group: &group,
                            limit: 100,
                            starting_after: after.as_deref(),
                        }),
                        None,
                    )
                    .await?;
                after = page.data.last().map(|t| t.id.clone());
                mine.extend(
                    page.data
                        .into_iter()
                        .filter(|t| t.metadata.get("payout").map(String::as_str) == Some(payout))
                        .map(|t| t.id),
                );
                if !page.has_more || after.is_none() {
                    break;
                }
            }
            if !mine.is_empty() {
                break;
            }
        }
        if mine.len() > 1 {
            tracing::error!(%payout, transfers = mine.len(), "more than one transfer for one payout");
        }
        Ok(mine.into_iter().next())
    }
}
