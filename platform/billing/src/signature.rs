//! `Stripe-Signature` verification: HMAC-SHA256 of `"{t}.{raw body}"` under the endpoint's signing
//! secret, compared in constant time against every `v1` the header carries (Stripe sends several while
//! a secret is being rolled), with the timestamp within a tolerance so a captured delivery cannot be
//! replayed later.

use hmac::{Hmac, KeyInit, Mac};
use sha2_hmac::Sha256;

/// Stripe's default: deliveries older (or newer) than five minutes are refused.
pub const TOLERANCE_SECS: i64 = 300;

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    OutsideTolerance { age_secs: i64 },
    Mismatch,
}

impl std::fmt::Display for SignatureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "the Stripe-Signature header is missing"),
            Self::Malformed => write!(
                f,
                "the Stripe-Signature header needs t=<unix time> and at least one v1=<hex>"
            ),
            Self::OutsideTolerance { age_secs } => write!(
                f,
                "the signature's timestamp is {age_secs} s from now, outside the {TOLERANCE_SECS} s tolerance"
            ),
            Self::Mismatch => write!(f, "no v1 signature matches the body"),
        }
    }
}

impl std::error::Error for SignatureError {}

/// Checks `header` against `body` at time `now` (Unix seconds).
///
/// # Errors
/// [`SignatureError`] naming what is wrong; the caller answers 400 and stores nothing.
pub fn verify(secret: &str, header: Option<&str>, body: &[u8], now: i64) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    // Anyone can sign with an empty key.
    if secret.trim().is_empty() {
        return Err(SignatureError::Mismatch);
    }
    let mut timestamp = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        let Some((key, value)) = part.trim().split_once('=') else {
            continue;
        };
        match key {
            "t" => timestamp = value.parse::<i64>().ok(),
            "v1" => {
                if let Ok(bytes) = hex::decode(value) {
                    candidates.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let age_secs = now - timestamp;
    if age_secs.abs() > TOLERANCE_SECS {
        return Err(SignatureError::OutsideTolerance { age_secs });
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::Mismatch)?;
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time; every candidate is checked against the same MAC.
    if candidates
        .iter()
        .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn a_matching_v1_among_several_passes() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_a", 1_000, body);
        let header = format!("t=1000,v1={},v1={good},v0=abc", "00".repeat(32));
        assert_eq!(verify("whsec_a", Some(&header), body, 1_100), Ok(()));
    }

    #[test]
    fn forgeries_stale_deliveries_and_garbage_fail() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_a", 1_000, body);
        let header = format!("t=1000,v1={good}");
        assert_eq!(
            verify("whsec_b", Some(&header), body, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_a", Some(&header), br#"{"id":"evt_2"}"#, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_a", Some(&header), body, 1_301),
            Err(SignatureError::OutsideTolerance { age_secs: 301 })
        );
        assert_eq!(verify("whsec_a", None, body, 1_000), Err(SignatureError::Missing));
        // Signed with an empty secret, as anyone could: refused whatever the configured one is.
        let blank = format!("t=1000,v1={}", sign("", 1_000, body));
        assert_eq!(
            verify("", Some(&blank), body, 1_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_a", Some("v1=zz"), body, 1_000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify("whsec_a", Some("t=1000"), body, 1_000),
            Err(SignatureError::Malformed)
        );
    }
}
