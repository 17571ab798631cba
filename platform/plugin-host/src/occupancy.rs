//! Who holds plugin instances right now: each tenant and each installation may hold only so many, so
//! one of them cannot take the instance pool from everyone else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Instances held, per key. Keys with none are removed, so the map only holds what runs.
#[derive(Debug, Default)]
pub(crate) struct Occupancy {
    held: Mutex<HashMap<String, u32>>,
}

/// A refusal: the key at its limit, and what to tell the caller.
#[derive(Debug)]
pub(crate) struct Full {
    pub(crate) key: String,
    message: String,
}

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Instances taken for one invocation; given back on drop, whatever ends the invocation.
#[derive(Debug)]
pub(crate) struct Seat {
    occupancy: Arc<Occupancy>,
    keys: Vec<String>,
}

impl Occupancy {
    /// Takes one instance under every key at once, or none when any key is at its limit (and says
    /// which, with its description).
    pub(crate) fn take(self: &Arc<Self>, claims: &[(String, u32, &str)]) -> Result<Seat, Full> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((key, limit, what)) = claims
            .iter()
            .find(|(key, limit, _)| held.get(key).copied().unwrap_or(0) >= *limit)
        {
            return Err(Full {
                key: key.clone(),
                message: format!("{what} may run {limit} plugin instances at once, and {limit} are running"),
            });
        }
        for (key, _, _) in claims {
            *held.entry(key.clone()).or_default() += 1;
        }
        Ok(Seat {
            occupancy: self.clone(),
            keys: claims.iter().map(|(key, _, _)| key.clone()).collect(),
        })
    }

    #[cfg(test)]
    fn held(&self, key: &str) -> u32 {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut held = self.occupancy.held.lock().unwrap_or_else(PoisonError::into_inner);
        for key in &self.keys {
            if let Some(count) = held.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_per_key_and_seats_come_back() {
        let occupancy = Arc::new(Occupancy::default());
        let claims = |installation: &str| {
            vec![
                ("tenant:a".to_owned(), 2, "the tenant"),
                (format!("installation:{installation}"), 1, "the installation"),
            ]
        };
        let first = occupancy.take(&claims("x")).expect("first");
        let refused = occupancy
            .take(&claims("x"))
            .expect_err("installation at its limit");
        assert_eq!(refused.key, "installation:x");
        assert!(refused.to_string().contains("the installation"), "{refused}");
        // The refusal took nothing.
        assert_eq!(occupancy.held("tenant:a"), 1);
        let second = occupancy.take(&claims("y")).expect("another installation");
        let refused = occupancy.take(&claims("z")).expect_err("tenant at its limit");
        assert_eq!(refused.key, "tenant:a");
        assert!(refused.to_string().contains("the tenant"), "{refused}");
        drop((first, second));
        assert_eq!(occupancy.held("tenant:a"), 0);
        assert!(
            occupancy
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty()
        );
        assert!(occupancy.take(&claims("z")).is_ok());
    }
}
