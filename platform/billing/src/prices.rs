//! Does Stripe charge what the plans say? The prices live in Stripe's dashboard and the plans in
//! Plinth's database; nothing ties them together but the operator's care, so drift between them would
//! bill tenants amounts their statements do not show. This compares them.

use plinth_core::Micros;
use plinth_core::api::Plan;

use crate::stripe::{METER_CUSTOMER_KEY, METER_VALUE_KEY, MeterInfo, PayloadKey, PriceInfo, PriceTier};

/// Micro-units per cent.
const MICROS_PER_CENT: i64 = 10_000;

/// A Stripe decimal amount in cents (`"4900"`, `"0.1234"`) as micro-units; `None` when it is malformed
/// or finer than a micro-unit. (Stripe sends these as strings; the conversion is four decimal places,
/// too small to warrant a decimal-arithmetic dependency.)
#[must_use]
pub fn cents_decimal_to_micros(amount: &str) -> Option<Micros> {
    let (whole, fraction) = amount.split_once('.').unwrap_or((amount, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let fraction = fraction.trim_end_matches('0');
    if fraction.len() > 4 {
        return None;
    }
    let fraction_micros: i64 = format!("{fraction:0<4}").parse().ok()?;
    whole
        .parse::<i64>()
        .ok()?
        .checked_mul(MICROS_PER_CENT)?
        .checked_add(fraction_micros)
        .map(Micros)
}

fn monthly(price: &PriceInfo, usage_type: &str, id: &str, problems: &mut Vec<String>) {
    match &price.recurring {
        Some(recurring)
            if recurring.interval == "month"
                && recurring.interval_count.unwrap_or(1) == 1
                && recurring.usage_type.as_deref().unwrap_or("licensed") == usage_type => {}
        _ => problems.push(format!(
            "price {id}: must be a monthly {usage_type} recurring price"
        )),
    }
}

fn currency(plan: &Plan, price: &PriceInfo, id: &str, problems: &mut Vec<String>) {
    if !price.currency.eq_ignore_ascii_case(&plan.currency) {
        problems.push(format!(
            "price {id}: currency {} but plan `{}` is in {}",
            price.currency, plan.id, plan.currency
        ));
    }
}

/// Whether a tier charges exactly `per_unit` for each unit, and nothing flat.
fn tier_charges(tier: &PriceTier, per_unit: Micros) -> bool {
    tier.flat_amount.unwrap_or(0) == 0
        && amount(tier.unit_amount_decimal.as_deref(), tier.unit_amount) == Some(per_unit)
}

/// An amount Stripe gives both ways, in cents: the decimal string when present (it carries sub-cent
/// prices), else the integer.
fn amount(decimal: Option<&str>, integer: Option<i64>) -> Option<Micros> {
    match decimal {
        Some(decimal) => cents_decimal_to_micros(decimal),
        None => integer?.checked_mul(MICROS_PER_CENT).map(Micros),
    }
}

/// An amount in cents for a message: `4900`, `0.1234`.
fn cents(amount: Micros) -> String {
    (amount.0 as f64 / MICROS_PER_CENT as f64).to_string()
}

fn unit_amount(price: &PriceInfo) -> Option<Micros> {
    amount(price.unit_amount_decimal.as_deref(), price.unit_amount)
}

/// What is wrong with `price` as the monthly fee of `plan` (nothing when it matches).
#[must_use]
pub fn flat_price_problems(plan: &Plan, id: &str, price: &PriceInfo) -> Vec<String> {
    let mut problems = Vec::new();
    currency(plan, price, id, &mut problems);
    monthly(price, "licensed", id, &mut problems);
    let amount = unit_amount(price);
    if amount != Some(plan.monthly_fee_micros) {
        problems.push(format!(
            "price {id}: charges {} cents a month but plan `{}` costs {} cents",
            unit_amount(price).map_or_else(|| "no".to_owned(), cents),
            plan.id,
            plan.monthly_fee_micros.to_cents()
        ));
    }
    problems
}

/// What is wrong with `price` as the per-call price of `plan`: a metered, graduated price whose first
/// tier covers the included calls for nothing and whose next tier charges the plan's per-call price.
#[must_use]
pub fn metered_price_problems(plan: &Plan, id: &str, price: &PriceInfo) -> Vec<String> {
    let mut problems = Vec::new();
    currency(plan, price, id, &mut problems);
    monthly(price, "metered", id, &mut problems);
    let free = |tier: &PriceTier| tier_charges(tier, Micros::ZERO);
    let per_call = |tier: &PriceTier| tier_charges(tier, plan.price_per_call_micros);
    let tiers = price.tiers.as_deref().unwrap_or_default();
    let matches = price.tiers_mode.as_deref() == Some("graduated")
        && match tiers {
            [included, rest] => {
                included.up_to == Some(plan.included_calls)
                    && free(included)
                    && rest.up_to.is_none()
                    && per_call(rest)
            }
            // No included calls: one open tier at the per-call price.
            [only] => plan.included_calls == 0 && only.up_to.is_none() && per_call(only),
            _ => false,
        };
    let flat_per_unit = price.tiers.is_none()
        && plan.included_calls == 0
        && unit_amount(price) == Some(plan.price_per_call_micros);
    if !matches && !flat_per_unit {
        problems.push(format!(
            "price {id}: must be graduated with the first {} calls free and {} cents per call after, as plan `{}` states",
            plan.included_calls,
            cents(plan.price_per_call_micros),
            plan.id
        ));
    }
    problems
}

/// What is wrong with `price` as the plugin-fees (or training) price: metered at one micro-unit
/// (0.0001 cents) per unit.
#[must_use]
pub fn plugin_fees_price_problems(id: &str, price: &PriceInfo) -> Vec<String> {
    let mut problems = Vec::new();
    monthly(price, "metered", id, &mut problems);
    let one_micro = Some(Micros(1));
    let per_unit = unit_amount(price);
    let tiered = price.tiers.as_deref().is_some_and(
        |tiers| matches!(tiers, [only] if only.up_to.is_none() && tier_charges(only, Micros(1))),
    );
    if per_unit != one_micro && !tiered {
        problems.push(format!(
            "price {id}: plugin fees are metered in micro-units, so it must charge 0.0001 cents per unit"
        ));
    }
    problems
}

/// What is wrong with the meter a metered price counts: it must be the meter the platform sends
/// `expected` events to, summing their values per customer as Plinth's events carry them, or the
/// usage pushed never reaches the invoice (or reaches it miscounted).
#[must_use]
pub fn meter_problems(id: &str, meter: Option<&MeterInfo>, expected: &str) -> Vec<String> {
    let Some(meter) = meter else {
        return vec![format!(
            "price {id}: is not attached to a billing meter (usage is sent as `{expected}` events)"
        )];
    };
    let mut problems = Vec::new();
    if meter.event_name != expected {
        problems.push(format!(
            "price {id}: counts the meter of `{}` events, but usage is sent as `{expected}`",
            meter.event_name
        ));
    }
    let formula = meter.default_aggregation.as_ref().map(|a| a.formula.as_str());
    if formula != Some("sum") {
        problems.push(format!(
            "price {id}: its meter must sum event values, not `{}`",
            formula.unwrap_or("unset")
        ));
    }
    let reads = |setting: &Option<PayloadKey>, key: &str| {
        setting.as_ref().is_some_and(|s| s.event_payload_key == key)
    };
    if !reads(&meter.customer_mapping, METER_CUSTOMER_KEY) || !reads(&meter.value_settings, METER_VALUE_KEY) {
        problems.push(format!(
            "price {id}: its meter must read the customer from `{METER_CUSTOMER_KEY}` and the value from `{METER_VALUE_KEY}`"
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stripe::Recurring;

    fn plan() -> Plan {
        Plan {
            included_calls: 100,
            ..crate::tests::plan()
        }
    }

    fn price(usage_type: &str, amount: Option<&str>, tiers: Option<Vec<PriceTier>>) -> PriceInfo {
        PriceInfo {
            currency: "usd".into(),
            unit_amount: None,
            unit_amount_decimal: amount.map(Into::into),
            recurring: Some(Recurring {
                interval: "month".into(),
                interval_count: Some(1),
                usage_type: Some(usage_type.into()),
                meter: None,
            }),
            tiers_mode: tiers.as_ref().map(|_| "graduated".into()),
            tiers,
        }
    }

    fn tier(up_to: Option<i64>, amount: &str) -> PriceTier {
        PriceTier {
            up_to,
            unit_amount: None,
            unit_amount_decimal: Some(amount.into()),
            flat_amount: None,
        }
    }

    #[test]
    fn decimal_cents_become_micro_units_exactly() {
        assert_eq!(cents_decimal_to_micros("4900"), Some(Micros::units(49)));
        assert_eq!(cents_decimal_to_micros("0.1234"), Some(Micros(1_234)));
        assert_eq!(cents_decimal_to_micros("0.04"), Some(Micros(400)));
        assert_eq!(cents_decimal_to_micros("0.000100"), Some(Micros(1)));
        assert_eq!(cents_decimal_to_micros("0"), Some(Micros::ZERO));
        assert_eq!(
            cents_decimal_to_micros("0.00001"),
            None,
            "finer than a micro-unit"
        );
        for bad in ["", ".5", "1.2.3", "-1", "1e3", "99999999999999999999"] {
            assert_eq!(cents_decimal_to_micros(bad), None, "{bad}");
        }
    }

    #[test]
    fn matching_prices_pass_and_drift_is_named() {
        let plan = plan();
        assert!(flat_price_problems(&plan, "p_flat", &price("licensed", Some("4900"), None)).is_empty());
        let wrong_fee = flat_price_problems(&plan, "p_flat", &price("licensed", Some("5900"), None));
        assert!(
            wrong_fee[0].contains("5900") && wrong_fee[0].contains("4900"),
            "{wrong_fee:?}"
        );
        assert_eq!(
            flat_price_problems(&plan, "p_flat", &price("metered", Some("4900"), None)).len(),
            1,
            "a metered flat fee"
        );

        let good = price(
            "metered",
            None,
            Some(vec![tier(Some(100), "0"), tier(None, "0.1234")]),
        );
        assert!(metered_price_problems(&plan, "p_calls", &good).is_empty());
        // Whole-cent amounts may come as integers only.
        let mut integer_tiers = good.clone();
        if let Some(tiers) = &mut integer_tiers.tiers {
            tiers[0].unit_amount_decimal = None;
            tiers[0].unit_amount = Some(0);
        }
        assert!(metered_price_problems(&plan, "p_calls", &integer_tiers).is_empty());
        for drifted in [
            vec![tier(Some(50), "0"), tier(None, "0.1234")],
            vec![tier(Some(100), "0"), tier(None, "0.2")],
            vec![tier(Some(100), "0.01"), tier(None, "0.1234")],
            vec![tier(None, "0.1234")],
        ] {
            let problems = metered_price_problems(&plan, "p_calls", &price("metered", None, Some(drifted)));
            assert_eq!(problems.len(), 1, "{problems:?}");
        }
        let mut other_currency = good.clone();
        other_currency.currency = "eur".into();
        assert_eq!(metered_price_problems(&plan, "p_calls", &other_currency).len(), 1);

        assert!(plugin_fees_price_problems("p_fees", &price("metered", Some("0.0001"), None)).is_empty());
        assert_eq!(
            plugin_fees_price_problems("p_fees", &price("metered", Some("0.01"), None)).len(),
            1
        );
    }

    #[test]
    fn a_metered_price_must_count_the_meter_usage_is_sent_to() {
        let meter = |name: &str, formula: &str, customer: &str| MeterInfo {
            event_name: name.into(),
            default_aggregation: Some(crate::stripe::MeterAggregation {
                formula: formula.into(),
            }),
            customer_mapping: Some(PayloadKey {
                event_payload_key: customer.into(),
            }),
            value_settings: Some(PayloadKey {
                event_payload_key: "value".into(),
            }),
        };
        let good = meter("plinth_calls", "sum", "stripe_customer_id");
        assert!(meter_problems("p", Some(&good), "plinth_calls").is_empty());
        let wrong = meter_problems(
            "p",
            Some(&meter("api_calls", "sum", "stripe_customer_id")),
            "plinth_calls",
        );
        assert!(wrong.len() == 1 && wrong[0].contains("api_calls"), "{wrong:?}");
        assert_eq!(
            meter_problems(
                "p",
                Some(&meter("plinth_calls", "count", "stripe_customer_id")),
                "plinth_calls"
            )
            .len(),
            1,
            "a meter counting events bills one unit per bucket"
        );
        assert_eq!(
            meter_problems(
                "p",
                Some(&meter("plinth_calls", "sum", "customer")),
                "plinth_calls"
            )
            .len(),
            1
        );
        assert_eq!(meter_problems("p", None, "plinth_calls").len(), 1);
    }
}
