//! Money as integers. Every amount in Plinth is a count of micro-units (millionths) of the plan's
//! currency, so a per-call price of $0.0004 is exact (400) and sums never drift. Floats never touch money.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign};

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

impl Add for Micros {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self(self.0 + other.0)
    }
}

impl AddAssign for Micros {
    fn add_assign(&mut self, other: Self) {
        self.0 += other.0;
    }
}

impl Sum for Micros {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::ZERO, Add::add)
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
        assert_eq!([Micros(1), Micros(2)].into_iter().sum::<Micros>(), Micros(3));
    }
}
