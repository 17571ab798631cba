//! Money as integers. Every amount in Plinth is a count of micro-units (millionths) of the plan's
//! currency, so a per-call price of $0.0004 is exact (400) and sums never drift. Floats never touch money.
//!
//! Arithmetic is checked: there is no `+` on [`Micros`], only operations that say when they overflow,
//! so an absurd amount becomes an error rather than a wrapped (or, in debug builds, panicking) sum.

use std::fmt;

/// An amount in millionths of a currency unit (for USD: 1 dollar = 1,000,000).
#[derive(
    Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct Micros(pub i64);

impl Micros {
    pub const ZERO: Self = Self(0);

    /// Whole currency units, e.g. `Micros::units(49)` for $49.
    #[must_use]
    pub const fn units(units: i64) -> Self {
        Self(units * 1_000_000)
    }

    /// `price * quantity`, or `None` on overflow.
    #[must_use]
    pub fn checked_mul(self, quantity: i64) -> Option<Self> {
        self.0.checked_mul(quantity).map(Self)
    }

    /// Rounds to the nearest minor unit (cent for USD), half away from zero, for payment rails that
    /// settle in minor units.
    #[must_use]
    pub const fn to_cents(self) -> i64 {
        let cents = self.0 / 10_000;
        let rest = self.0 % 10_000;
        if rest >= 5_000 {
            cents + 1
        } else if rest <= -5_000 {
            cents - 1
        } else {
            cents
        }
    }
}

impl Micros {
    /// `self + other`, or `None` on overflow.
    #[must_use]
    pub const fn checked_add(self, other: Self) -> Option<Self> {
        match self.0.checked_add(other.0) {
            Some(sum) => Some(Self(sum)),
            None => None,
        }
    }

    /// `self - other`, or `None` on overflow.
    #[must_use]
    pub const fn checked_sub(self, other: Self) -> Option<Self> {
        match self.0.checked_sub(other.0) {
            Some(difference) => Some(Self(difference)),
            None => None,
        }
    }

    /// The sum of `amounts`, or `None` when it overflows.
    pub fn checked_sum(amounts: impl IntoIterator<Item = Self>) -> Option<Self> {
        amounts.into_iter().try_fold(Self::ZERO, Self::checked_add)
    }

    /// `self * bps / 10_000`, rounded down: a share in basis points (8000 = 80%).
    #[must_use]
    pub fn share_bps(self, bps: u32) -> Option<Self> {
        let share = i128::from(self.0) * i128::from(bps) / 10_000;
        i64::try_from(share).ok().map(Self)
    }

    /// Whole minor units (cents), rounded down; what a payout can transfer.
    #[must_use]
    pub const fn whole_cents(self) -> i64 {
        self.0.div_euclid(10_000)
    }
}

impl fmt::Debug for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}µ", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_round_half_away_from_zero() {
        assert_eq!(Micros(4_999).to_cents(), 0);
        assert_eq!(Micros(5_000).to_cents(), 1);
        assert_eq!(Micros::units(49).to_cents(), 4_900);
        assert_eq!(Micros(-5_000).to_cents(), -1);
    }

    #[test]
    fn multiplication_reports_overflow() {
        assert_eq!(Micros(400).checked_mul(3), Some(Micros(1_200)));
        assert_eq!(Micros(i64::MAX).checked_mul(2), None);
        assert_eq!(Micros::checked_sum([Micros(1), Micros(2)]), Some(Micros(3)));
        assert_eq!(Micros::checked_sum([Micros(i64::MAX), Micros(1)]), None);
        assert_eq!(Micros(i64::MIN).checked_sub(Micros(1)), None);
    }

    #[test]
    fn shares_round_down_and_cents_are_whole() {
        assert_eq!(Micros(125_000).share_bps(8_000), Some(Micros(100_000)));
        assert_eq!(Micros(3).share_bps(8_000), Some(Micros(2)));
        assert_eq!(Micros(i64::MAX).share_bps(10_000), Some(Micros(i64::MAX)));
        assert_eq!(Micros(19_999).whole_cents(), 1);
        assert_eq!(Micros(-1).whole_cents(), -1);
    }
}
