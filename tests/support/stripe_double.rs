//! A local stand-in for the Stripe endpoints Plinth calls, speaking Stripe's wire format: form-encoded
//! requests with `Authorization: Bearer sk_…` and `Idempotency-Key`, JSON objects with `id` and
//! `object`, Stripe's error shape. It records every request, honours idempotency keys (a repeated key
//! replays the first answer, for as long as Stripe keeps keys: see [`StripeDouble::forget_idempotency_keys`]),
//! counts meter events once per identifier, prices invoices from its own price table as Stripe would,
//! lists transfers by `transfer_group`, and delivers webhooks signed as Stripe signs them. Failures can
//! be injected to play an outage or a lost response.
//!
//! The platform reaches it through `PLINTH_STRIPE_API_BASE`; nothing in the platform knows it is not
//! Stripe.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use actix_web::dev::ServerHandle;
use actix_web::{HttpRequest, HttpResponse, web};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2_hmac::Sha256;

pub const SECRET_KEY: &str = "sk_test_plinth_double";
pub const WEBHOOK_SECRET: &str = "whsec_plinth_double";
pub const CALLS_METER: &str = "plinth_calls";
pub const PLUGIN_FEES_METER: &str = "plinth_plugin_fees";
pub const PLUGIN_FEES_PRICE: &str = "price_plugin_fees";

/// A price as configured in the Stripe dashboard.
#[derive(Debug, Clone)]
pub enum Price {
    /// A licensed monthly price, in cents.
    Flat { cents: i64 },
    /// A metered price on a meter: the first `free_units` cost nothing (a graduated first tier), the
    /// rest `unit_decimal` cents each (Stripe's `unit_amount_decimal`, e.g. `"0.1234"`).
    Metered {
        meter: String,
        free_units: i64,
        unit_decimal: String,
    },
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub form: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
}

/// A meter event Stripe accepted (counted once per identifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    pub event_name: String,
    pub identifier: String,
    pub customer: String,
    pub value: i64,
    pub timestamp: i64,
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    pub status: String,
    pub items: Vec<(String, String)>,
    pub period_start: i64,
    pub period_end: i64,
    pub cancel_at_period_end: bool,
    pub metadata: BTreeMap<String, String>,
}

/// How the next meter-event requests fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Answer normally.
    None,
    /// Accept this many more, then answer 503 without recording (an outage).
    OutageAfter(usize),
    /// Record the event and remember the answer under its idempotency key, but answer 500: the
    /// response is lost on the way back.
    LoseResponses,
}

#[derive(Debug)]
struct State {
    next_id: u64,
    requests: Vec<Recorded>,
    idempotent: HashMap<String, (u16, Value)>,
    prices: BTreeMap<String, Price>,
    customers: BTreeMap<String, BTreeMap<String, String>>,
    sessions: BTreeMap<String, BTreeMap<String, String>>,
    subscriptions: BTreeMap<String, Subscription>,
    meter_events: BTreeMap<String, MeterEvent>,
    duplicate_identifiers: usize,
    accounts: BTreeMap<String, bool>,
    transfers: Vec<Transfer>,
    invoices: Vec<String>,
    /// Each invoice's customer.
    invoice_customers: BTreeMap<String, String>,
    failure: Failure,
    transfer_failure: Failure,
}

/// A transfer Stripe made.
#[derive(Debug, Clone)]
struct Transfer {
    id: String,
    amount: i64,
    destination: String,
    group: String,
    payout: String,
}

/// The running double.
#[derive(Debug, Clone)]
pub struct StripeDouble {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    handle: ServerHandle,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn error(status: u16, kind: &str, message: &str) -> (u16, Value) {
    (status, json!({ "error": { "type": kind, "message": message } }))
}

/// `unit_decimal` cents per unit, times `quantity`, rounded half up to whole cents, exactly.
#[must_use]
pub fn decimal_cents(quantity: i64, unit_decimal: &str) -> i64 {
    const SCALE: i128 = 100_000_000; // 1e-8 cent resolution
    let (whole, fraction) = unit_decimal.split_once('.').unwrap_or((unit_decimal, ""));
    let mut digits = fraction.to_owned();
    digits.truncate(8);
    while digits.len() < 8 {
        digits.push('0');
    }
    let per_unit = i128::from(whole.parse::<i64>().expect("decimal")) * SCALE
        + i128::from(digits.parse::<i64>().expect("decimal"));
    let total = per_unit * i128::from(quantity);
    i64::try_from((total + SCALE / 2) / SCALE).expect("cents")
}

/// `Stripe-Signature` for `body` at time `t` under `secret`, as Stripe computes it.
#[must_use]
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex_encode(&mac.finalize().into_bytes()))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl State {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_{:08}", self.next_id)
    }

    fn subscription_json(&self, sub: &Subscription) -> Value {
        let items: Vec<Value> = sub
            .items
            .iter()
            .map(|(item, price)| {
                json!({
                    "id": item, "object": "subscription_item", "subscription": sub.id,
                    "price": { "id": price, "object": "price" },
                    "current_period_start": sub.period_start, "current_period_end": sub.period_end,
                })
            })
            .collect();
        json!({
            "id": sub.id, "object": "subscription", "customer": sub.customer, "status": sub.status,
            "cancel_at_period_end": sub.cancel_at_period_end, "metadata": sub.metadata,
            "items": { "object": "list", "data": items, "has_more": false },
            "created": sub.period_start, "livemode": false,
        })
    }

    /// Indexed form keys (`items[0][price]`) grouped by index.
    fn indexed(form: &BTreeMap<String, String>, list: &str) -> BTreeMap<usize, BTreeMap<String, String>> {
        let mut out: BTreeMap<usize, BTreeMap<String, String>> = BTreeMap::new();
        for (key, value) in form {
            let Some(rest) = key.strip_prefix(&format!("{list}[")) else {
                continue;
            };
            let Some((index, field)) = rest.split_once("][") else {
                continue;
            };
            let (Ok(index), Some(field)) = (index.parse(), field.strip_suffix(']')) else {
                continue;
            };
            out.entry(index)
                .or_default()
                .insert(field.to_owned(), value.clone());
        }
        out
    }

    fn map(form: &BTreeMap<String, String>, name: &str) -> BTreeMap<String, String> {
        form.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix(&format!("{name}["))
                    .and_then(|rest| rest.strip_suffix(']'))
                    .filter(|field| !field.contains('['))
                    .map(|field| (field.to_owned(), v.clone()))
            })
            .collect()
    }

    fn handle(&mut self, method: &str, path: &str, form: &BTreeMap<String, String>) -> (u16, Value) {
        let created = now();
        match (method, path) {
            ("POST", "/v1/customers") => {
                let id = self.id("cus");
                let metadata = Self::map(form, "metadata");
                self.customers.insert(id.clone(), metadata.clone());
                (
                    200,
                    json!({ "id": id, "object": "customer", "name": form.get("name"), "metadata": metadata, "created": created, "livemode": false }),
                )
            }
            ("POST", "/v1/checkout/sessions") => {
                let Some(customer) = form.get("customer").filter(|c| self.customers.contains_key(*c)) else {
                    return error(400, "invalid_request_error", "No such customer");
                };
                let prices: Vec<String> = Self::indexed(form, "line_items")
                    .values()
                    .filter_map(|item| item.get("price").cloned())
                    .collect();
                if let Some(unknown) = prices.iter().find(|p| !self.prices.contains_key(*p)) {
                    return error(
                        400,
                        "invalid_request_error",
                        &format!("No such price: '{unknown}'"),
                    );
                }
                let id = self.id("cs");
                let mut session = Self::map(form, "metadata");
                session.insert("customer".into(), customer.clone());
                session.insert("prices".into(), prices.join(","));
                session.insert(
                    "client_reference_id".into(),
                    form.get("client_reference_id").cloned().unwrap_or_default(),
                );
                self.sessions.insert(id.clone(), session);
                (
                    200,
                    json!({
                        "id": id, "object": "checkout.session", "mode": form.get("mode"), "customer": customer,
                        "url": format!("https://checkout.stripe.test/c/pay/{id}"), "status": "open",
                        "client_reference_id": form.get("client_reference_id"), "created": created, "livemode": false,
                    }),
                )
            }
            ("POST", "/v1/billing/meter_events") => {
                let event = MeterEvent {
                    event_name: form.get("event_name").cloned().unwrap_or_default(),
                    identifier: form.get("identifier").cloned().unwrap_or_default(),
                    customer: form
                        .get("payload[stripe_customer_id]")
                        .cloned()
                        .unwrap_or_default(),
                    value: form
                        .get("payload[value]")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(-1),
                    timestamp: form
                        .get("timestamp")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(created),
                };
                if event.value < 0
                    || event.identifier.is_empty()
                    || !self.customers.contains_key(&event.customer)
                {
                    return error(
                        400,
                        "invalid_request_error",
                        "meter event needs identifier, a known customer and a value",
                    );
                }
                match self.meter_events.get(&event.identifier) {
                    Some(_) => self.duplicate_identifiers += 1,
                    None => {
                        self.meter_events.insert(event.identifier.clone(), event.clone());
                    }
                }
                (
                    200,
                    json!({
                        "object": "billing.meter_event", "event_name": event.event_name, "identifier": event.identifier,
                        "payload": { "stripe_customer_id": event.customer, "value": event.value.to_string() },
                        "timestamp": event.timestamp, "created": created, "livemode": false,
                    }),
                )
            }
            ("POST", "/v1/accounts") => {
                let id = self.id("acct");
                self.accounts.insert(id.clone(), false);
                (
                    200,
                    json!({ "id": id, "object": "account", "type": form.get("type"), "payouts_enabled": false, "metadata": Self::map(form, "metadata"), "created": created }),
                )
            }
            ("POST", "/v1/account_links") => {
                let Some(account) = form.get("account").filter(|a| self.accounts.contains_key(*a)) else {
                    return error(400, "invalid_request_error", "No such account");
                };
                (
                    200,
                    json!({ "object": "account_link", "url": format!("https://connect.stripe.test/setup/{account}"), "created": created, "expires_at": created + 300 }),
                )
            }
            ("POST", "/v1/transfers") => {
                let destination = form.get("destination").cloned().unwrap_or_default();
                if self.accounts.get(&destination) != Some(&true) {
                    return error(
                        400,
                        "invalid_request_error",
                        "the destination account cannot receive transfers",
                    );
                }
                let amount: i64 = form.get("amount").and_then(|a| a.parse().ok()).unwrap_or(0);
                let id = self.id("tr");
                self.transfers.push(Transfer {
                    id: id.clone(),
                    amount,
                    destination: destination.clone(),
                    group: form.get("transfer_group").cloned().unwrap_or_default(),
                    payout: form.get("metadata[payout]").cloned().unwrap_or_default(),
                });
                (
                    200,
                    json!({ "id": id, "object": "transfer", "amount": amount, "currency": form.get("currency"), "destination": destination, "transfer_group": form.get("transfer_group"), "created": created, "livemode": false }),
                )
            }
            // Each invoice here is paid by the PaymentIntent `pi_<invoice id>`.
            ("GET", "/v1/invoice_payments") => {
                let paid_by = form.get("payment[payment_intent]");
                let known = form
                    .get("payment[type]")
                    .is_some_and(|kind| kind == "payment_intent");
                let data: Vec<Value> = self
                    .invoices
                    .iter()
                    .filter(|invoice| known && paid_by == Some(&format!("pi_{invoice}")))
                    .map(|invoice| {
                        let expanded = form.get("expand[]").is_some_and(|e| e == "data.invoice");
                        let invoice_json = if expanded {
                            json!({ "id": invoice, "object": "invoice", "customer": self.invoice_customers.get(invoice) })
                        } else {
                            json!(invoice)
                        };
                        json!({ "id": format!("inpay_{invoice}"), "object": "invoice_payment", "invoice": invoice_json,
                            "payment": { "type": "payment_intent", "payment_intent": format!("pi_{invoice}") } })
                    })
                    .collect();
                (
                    200,
                    json!({ "object": "list", "url": "/v1/invoice_payments", "has_more": false, "data": data }),
                )
            }
            ("GET", "/v1/transfers") => {
                let group = form.get("transfer_group");
                let data: Vec<Value> = self
                    .transfers
                    .iter()
                    .filter(|t| group.is_none_or(|g| *g == t.group))
                    .map(|t| {
                        json!({ "id": t.id, "object": "transfer", "amount": t.amount,
                            "destination": t.destination, "transfer_group": t.group,
                            "metadata": { "payout": t.payout } })
                    })
                    .collect();
                (
                    200,
                    json!({ "object": "list", "url": "/v1/transfers", "has_more": false, "data": data }),
                )
            }
            _ => {
                if let (Some(id), "GET") = (path.strip_prefix("/v1/prices/"), method) {
                    let expand_tiers = form
                        .iter()
                        .any(|(key, value)| key.starts_with("expand") && value == "tiers");
                    return match self.prices.get(id) {
                        Some(price) => (200, price_json(id, price, expand_tiers)),
                        None => error(404, "invalid_request_error", &format!("No such price: '{id}'")),
                    };
                }
                // The double's meters are named after the event they count: `mtr_<event name>`.
                if let (Some(id), "GET") = (path.strip_prefix("/v1/billing/meters/"), method) {
                    return match id.strip_prefix("mtr_") {
                        Some(event_name) => (
                            200,
                            json!({
                                "id": id, "object": "billing.meter", "event_name": event_name, "status": "active",
                                "default_aggregation": { "formula": "sum" },
                                "customer_mapping": { "event_payload_key": "stripe_customer_id", "type": "by_id" },
                                "value_settings": { "event_payload_key": "value" }, "livemode": false,
                            }),
                        ),
                        None => error(404, "invalid_request_error", &format!("No such meter: '{id}'")),
                    };
                }
                if let Some(id) = path.strip_prefix("/v1/subscriptions/") {
                    let Some(mut sub) = self.subscriptions.get(id).cloned() else {
                        return error(
                            404,
                            "invalid_request_error",
                            &format!("No such subscription: '{id}'"),
                        );
                    };
                    if method == "POST" {
                        for change in Self::indexed(form, "items").into_values() {
                            if change.get("deleted").map(String::as_str) == Some("true") {
                                sub.items.retain(|(item, _)| Some(item) != change.get("id"));
                            } else if let Some(price) = change.get("price") {
                                let item = self.id("si");
                                sub.items.push((item, price.clone()));
                            }
                        }
                        if form.get("billing_cycle_anchor").map(String::as_str) == Some("now") {
                            sub.period_start = created;
                            sub.period_end = created + 30 * 86_400;
                        }
                        if let Some(cancel) = form.get("cancel_at_period_end") {
                            sub.cancel_at_period_end = cancel == "true";
                        }
                        sub.metadata.extend(Self::map(form, "metadata"));
                        self.subscriptions.insert(sub.id.clone(), sub.clone());
                    }
                    return (200, self.subscription_json(&sub));
                }
                error(
                    404,
                    "invalid_request_error",
                    &format!("Unrecognized request URL ({method}: {path})"),
                )
            }
        }
    }
}

/// A price as Stripe's API shows it; tiers only when expanded, as Stripe does.
fn price_json(id: &str, price: &Price, expand_tiers: bool) -> Value {
    match price {
        Price::Flat { cents } => json!({
            "id": id, "object": "price", "active": true, "currency": "usd", "type": "recurring",
            "billing_scheme": "per_unit", "unit_amount": cents, "unit_amount_decimal": cents.to_string(),
            "recurring": { "interval": "month", "interval_count": 1, "usage_type": "licensed", "meter": null },
            "tiers_mode": null, "livemode": false,
        }),
        Price::Metered {
            meter,
            free_units,
            unit_decimal,
        } => {
            let open = json!({ "up_to": null, "unit_amount": null, "unit_amount_decimal": unit_decimal, "flat_amount": null, "flat_amount_decimal": null });
            let tiers = if *free_units > 0 {
                json!([{ "up_to": free_units, "unit_amount": 0, "unit_amount_decimal": "0", "flat_amount": null, "flat_amount_decimal": null }, open])
            } else {
                json!([open])
            };
            let mut body = json!({
                "id": id, "object": "price", "active": true, "currency": "usd", "type": "recurring",
                "billing_scheme": "tiered", "tiers_mode": "graduated", "unit_amount": null, "unit_amount_decimal": null,
                "recurring": { "interval": "month", "interval_count": 1, "usage_type": "metered", "meter": format!("mtr_{meter}") },
                "livemode": false,
            });
            if expand_tiers {
                body["tiers"] = tiers;
            }
            body
        }
    }
}

async fn serve(state: web::Data<Arc<Mutex<State>>>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let method = req.method().as_str().to_owned();
    let path = req.path().to_owned();
    // Stripe reads parameters from the query of a GET and from the form body of anything else.
    let parameters: &[u8] = if method == "GET" {
        req.query_string().as_bytes()
    } else {
        &body
    };
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(parameters).into_owned().collect();
    let key = req
        .headers()
        .get("Idempotency-Key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let authorized = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {SECRET_KEY}"));
    let (status, body) = {
        let mut state = state.lock().expect("double state");
        state.requests.push(Recorded {
            method: method.clone(),
            path: path.clone(),
            form: form.clone(),
            idempotency_key: key.clone(),
        });
        if !authorized {
            error(401, "invalid_request_error", "Invalid API Key provided")
        } else if let Some(replay) = key.as_ref().and_then(|k| state.idempotent.get(k)).cloned() {
            replay
        } else {
            let meter_event = path == "/v1/billing/meter_events";
            let outage = match state.failure {
                Failure::OutageAfter(0) if meter_event => true,
                Failure::OutageAfter(n) if meter_event => {
                    state.failure = Failure::OutageAfter(n - 1);
                    false
                }
                _ => false,
            };
            if outage {
                error(503, "api_error", "Stripe is unavailable")
            } else {
                let answer = state.handle(&method, &path, &form);
                if let Some(key) = &key
                    && method == "POST"
                    && answer.0 < 500
                {
                    state.idempotent.insert(key.clone(), answer.clone());
                }
                let transfer = path == "/v1/transfers" && method == "POST";
                if (meter_event && state.failure == Failure::LoseResponses)
                    || (transfer && state.transfer_failure == Failure::LoseResponses)
                {
                    error(500, "api_error", "the connection was reset")
                } else {
                    answer
                }
            }
        }
    };
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).expect("status"))
        .insert_header(("Request-Id", format!("req_{}", ulid::Ulid::new())))
        .json(body)
}

impl StripeDouble {
    /// Starts the double on a free port with the given price table.
    pub async fn start(prices: BTreeMap<String, Price>) -> Self {
        let state = Arc::new(Mutex::new(State {
            next_id: 0,
            requests: Vec::new(),
            idempotent: HashMap::new(),
            prices,
            customers: BTreeMap::new(),
            sessions: BTreeMap::new(),
            subscriptions: BTreeMap::new(),
            meter_events: BTreeMap::new(),
            duplicate_identifiers: 0,
            accounts: BTreeMap::new(),
            transfers: Vec::new(),
            invoices: Vec::new(),
            invoice_customers: BTreeMap::new(),
            failure: Failure::None,
            transfer_failure: Failure::None,
        }));
        let data = web::Data::new(state.clone());
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .default_service(web::to(serve))
        })
        .workers(1)
        .bind(("127.0.0.1", 0))
        .expect("bind the Stripe double");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { addr, state, handle }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("double state")
    }

    /// Points a platform configuration at this double, selling `plans` (plan id, flat price id,
    /// metered price id).
    pub fn configure(&self, config: &mut plinth_server::Config, plans: &[(&str, &str, &str)]) {
        config.stripe_secret_key = Some(SECRET_KEY.to_owned());
        config.stripe_webhook_secret = Some(WEBHOOK_SECRET.to_owned());
        config.stripe_api_base = Some(format!("http://{}/", self.addr));
        config.stripe_plan_prices = plans
            .iter()
            .map(|(plan, flat, metered)| format!("{plan}={flat}/{metered}"))
            .collect::<Vec<_>>()
            .join(",");
        config.stripe_plugin_fees_price = Some(PLUGIN_FEES_PRICE.to_owned());
        config.stripe_calls_meter = CALLS_METER.to_owned();
        config.stripe_plugin_fees_meter = PLUGIN_FEES_METER.to_owned();
    }

    #[must_use]
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    #[must_use]
    pub fn meter_events(&self) -> Vec<MeterEvent> {
        self.state().meter_events.values().cloned().collect()
    }

    /// Sum of accepted meter events of one meter for one customer.
    #[must_use]
    pub fn meter_total(&self, event_name: &str, customer: &str) -> i64 {
        self.meter_events()
            .iter()
            .filter(|e| e.event_name == event_name && e.customer == customer)
            .map(|e| e.value)
            .sum()
    }

    /// Meter events sent again with an identifier already counted (Stripe ignores them).
    #[must_use]
    pub fn duplicate_identifiers(&self) -> usize {
        self.state().duplicate_identifiers
    }

    /// Changes a price, as an operator editing it in the dashboard would.
    pub fn set_price(&self, id: &str, price: Price) {
        self.state().prices.insert(id.to_owned(), price);
    }

    pub fn fail_meter_events(&self, failure: Failure) {
        self.state().failure = failure;
    }

    #[must_use]
    pub fn customer_metadata(&self, customer: &str) -> Option<BTreeMap<String, String>> {
        self.state().customers.get(customer).cloned()
    }

    #[must_use]
    pub fn subscription(&self, id: &str) -> Option<Subscription> {
        self.state().subscriptions.get(id).cloned()
    }

    /// Transfers made: id, amount in cents, destination account.
    #[must_use]
    pub fn transfers(&self) -> Vec<(String, i64, String)> {
        self.state()
            .transfers
            .iter()
            .map(|t| (t.id.clone(), t.amount, t.destination.clone()))
            .collect()
    }

    /// How the next transfer requests fail (`LoseResponses`: made, but the answer is lost).
    pub fn fail_transfers(&self, failure: Failure) {
        self.state().transfer_failure = failure;
    }

    /// Stripe keeps idempotency keys for 24 hours; this plays that time passing: a repeated key is a
    /// new request again.
    pub fn forget_idempotency_keys(&self) {
        self.state().idempotent.clear();
    }

    /// The customer gets the money of the last invoice back: Stripe refunds its charge and says so.
    pub async fn refund_last_invoice(&self, platform: &str) {
        let invoice = self
            .state()
            .invoices
            .last()
            .cloned()
            .expect("an invoice to refund");
        let event = self.event(
            "charge.refunded",
            now(),
            json!({ "id": format!("ch_{invoice}"), "object": "charge", "invoice": invoice,
                    "refunded": true, "amount_refunded": 1 }),
        );
        assert!(self.deliver(platform, &event).await.status().is_success());
    }

    /// The customer's bank disputes the payment of the last invoice and takes the money back: Stripe
    /// says so with a dispute, which names the charge and PaymentIntent, not the invoice.
    pub async fn dispute_last_invoice(&self, platform: &str) {
        let invoice = self
            .state()
            .invoices
            .last()
            .cloned()
            .expect("an invoice to dispute");
        let id = self.state().id("du");
        let event = self.event(
            "charge.dispute.created",
            now(),
            json!({ "id": id, "object": "dispute", "charge": format!("ch_{invoice}"),
                    "payment_intent": format!("pi_{invoice}"), "amount": 1, "currency": "usd",
                    "reason": "fraudulent", "status": "needs_response" }),
        );
        assert!(self.deliver(platform, &event).await.status().is_success());
    }

    /// Signs and posts an event to the platform's webhook endpoint, as Stripe does.
    pub async fn deliver(&self, platform: &str, event: &Value) -> reqwest::Response {
        let body = event.to_string();
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
            .post(format!("{platform}/v1/webhooks/stripe"))
            .header("Content-Type", "application/json")
            .header("Stripe-Signature", signature(WEBHOOK_SECRET, now(), &body))
            .body(body)
            .send()
            .await
            .expect("webhook delivery")
    }

    /// A Stripe event envelope.
    #[must_use]
    pub fn event(&self, kind: &str, created: i64, object: Value) -> Value {
        let id = self.state().id("evt");
        let mut event = json!({
            "id": id, "object": "event", "type": kind, "created": created, "livemode": false,
            "api_version": "2025-10-29.clover", "pending_webhooks": 1, "data": {},
        });
        event["data"]["object"] = object;
        event
    }

    /// The customer pays on the Checkout page: Stripe creates the subscription and tells the platform.
    /// Returns the subscription id.
    pub async fn complete_checkout(&self, platform: &str, checkout_url: &str) -> String {
        let session_id = checkout_url.rsplit('/').next().expect("session id").to_owned();
        let (session, subscription) = {
            let mut state = self.state();
            let session = state
                .sessions
                .get(&session_id)
                .cloned()
                .expect("known Checkout session");
            let id = state.id("sub");
            let start = now();
            let mut items = Vec::new();
            for price in session["prices"].split(',') {
                let item = state.id("si");
                items.push((item, price.to_owned()));
            }
            let metadata: BTreeMap<String, String> = session
                .iter()
                .filter(|(k, _)| k.as_str() == "tenant_id" || k.as_str() == "plan_id")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let sub = Subscription {
                id: id.clone(),
                customer: session["customer"].clone(),
                status: "active".into(),
                items,
                period_start: start,
                period_end: start + 30 * 86_400,
                cancel_at_period_end: false,
                metadata,
            };
            state.subscriptions.insert(id.clone(), sub.clone());
            (session, sub)
        };
        let created = now();
        let completed = self.event(
            "checkout.session.completed",
            created,
            json!({
                "id": session_id, "object": "checkout.session", "mode": "subscription", "status": "complete",
                "customer": session["customer"], "subscription": subscription.id, "payment_status": "paid",
                "client_reference_id": session["client_reference_id"],
                "metadata": { "tenant_id": session.get("tenant_id"), "plan_id": session.get("plan_id") },
            }),
        );
        let created_event = {
            let object = self.state().subscription_json(&subscription);
            self.event("customer.subscription.created", created, object)
        };
        for event in [completed, created_event] {
            let response = self.deliver(platform, &event).await;
            assert!(
                response.status().is_success(),
                "webhook refused: {}",
                response.text().await.unwrap_or_default()
            );
        }
        subscription.id
    }

    /// The invoice Stripe would issue for the subscription's current period: each flat price, and each
    /// metered price over the meter events of this customer timestamped in the period, every line
    /// rounded to the cent.
    #[must_use]
    pub fn invoice_total(&self, subscription: &str) -> i64 {
        let state = self.state();
        let sub = state.subscriptions.get(subscription).expect("subscription");
        let mut total = 0;
        for (_, price) in &sub.items {
            total += match state.prices.get(price).expect("price") {
                Price::Flat { cents } => *cents,
                Price::Metered {
                    meter,
                    free_units,
                    unit_decimal,
                } => {
                    let used: i64 = state
                        .meter_events
                        .values()
                        .filter(|e| {
                            &e.event_name == meter
                                && e.customer == sub.customer
                                && (sub.period_start..sub.period_end).contains(&e.timestamp)
                        })
                        .map(|e| e.value)
                        .sum();
                    decimal_cents((used - free_units).max(0), unit_decimal)
                }
            };
        }
        total
    }

    /// Closes the current period: issues its invoice and reports it paid (or its payment failed).
    /// Returns the invoice's total in cents.
    pub async fn invoice_period(&self, platform: &str, subscription: &str, paid: bool) -> i64 {
        let total = self.invoice_total(subscription);
        let event = self.issue_invoice(subscription, paid);
        let response = self.deliver(platform, &event).await;
        assert!(response.status().is_success());
        total
    }

    /// Closes the current period's invoice, paid or not, and returns the event that says so, not yet
    /// delivered (events reach the platform in any order).
    pub fn issue_invoice(&self, subscription: &str, paid: bool) -> Value {
        let total = self.invoice_total(subscription);
        let (id, sub) = {
            let mut state = self.state();
            let id = state.id("in");
            state.invoices.push(id.clone());
            let sub = state
                .subscriptions
                .get(subscription)
                .cloned()
                .expect("subscription");
            state.invoice_customers.insert(id.clone(), sub.customer.clone());
            (id, sub)
        };
        let kind = if paid {
            "invoice.paid"
        } else {
            "invoice.payment_failed"
        };
        self.event(
            kind,
            now(),
            json!({
                "id": id, "object": "invoice", "customer": sub.customer, "subscription": sub.id,
                "status": if paid { "paid" } else { "open" }, "currency": "usd",
                "total": total, "amount_due": total, "amount_paid": if paid { total } else { 0 },
                "period_start": sub.period_start, "period_end": sub.period_end,
                "status_transitions": { "finalized_at": now(), "paid_at": if paid { Some(now()) } else { None } },
                "hosted_invoice_url": format!("https://invoice.stripe.test/{id}"),
            }),
        )
    }

    /// The author finished onboarding: payouts are enabled and Stripe says so.
    pub async fn enable_payouts(&self, platform: &str, account: &str) {
        self.state().accounts.insert(account.to_owned(), true);
        let event = self.event(
            "account.updated",
            now(),
            json!({ "id": account, "object": "account", "payouts_enabled": true, "charges_enabled": true }),
        );
        assert!(self.deliver(platform, &event).await.status().is_success());
    }

    /// The subscription as Stripe's JSON.
    #[must_use]
    pub fn subscription_json(&self, id: &str) -> Value {
        let state = self.state();
        state.subscription_json(state.subscriptions.get(id).expect("subscription"))
    }

    pub async fn stop(&self) {
        self.handle.stop(false).await;
    }
}
