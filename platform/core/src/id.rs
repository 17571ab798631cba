//! Prefixed, typed identifiers (`ten_01J...`): the prefix tells a reader what an id names, and the type
//! system keeps a key id from being passed where a tenant id is expected.
//!
//! The body is a ULID, so ids sort by creation time, which keeps B-tree inserts local.

use std::fmt;
use std::str::FromStr;

/// An id string that does not carry the expected prefix or a valid ULID body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {kind} id (expected `{prefix}_` followed by 26 characters)")]
pub struct InvalidId {
    pub kind: &'static str,
    pub prefix: &'static str,
    pub value: String,
}

/// A ULID greater than every one this process made before, so ids made one after another sort in
/// that order even within a millisecond (the audit log pages by id).
fn next_ulid() -> ulid::Ulid {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new())
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh, time-ordered id.
            #[must_use]
            pub fn new() -> Self {
                Self(format!("{}_{}", $prefix, next_ulid().to_string().to_ascii_lowercase()))
            }

            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(value: &str) -> Result<Self, InvalidId> {
                let valid = value
                    .strip_prefix(concat!($prefix, "_"))
                    .is_some_and(|body| ulid::Ulid::from_string(body).is_ok());
                if valid {
                    Ok(Self(value.to_ascii_lowercase()))
                } else {
                    Err(InvalidId { kind: $kind, prefix: $prefix, value: value.chars().take(64).collect() })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;

            fn try_from(value: String) -> Result<Self, InvalidId> {
                value.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some(concat!("A ", $kind, " id: `", $prefix, "_` and a ULID.")))
                    .examples([serde_json::json!(concat!($prefix, "_01jz3k2m4n5p6q7r8s9t0vwxyz"))])
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

typed_id!(
    /// A tenant: a company or team, the unit of isolation and billing.
    TenantId, "ten", "tenant"
);
typed_id!(
    /// A person who can log in; belongs to tenants through memberships.
    UserId, "usr", "user"
);
typed_id!(
    /// An API key.
    KeyId, "key", "API key"
);
typed_id!(
    /// A login session.
    SessionId, "ses", "session"
);
typed_id!(
    /// A usage event in the ledger.
    EventId, "evt", "usage event"
);
typed_id!(
    /// A version of a tenant's uploaded model.
    ModelId, "mdl", "model"
);
typed_id!(
    /// A tenant's labelled dataset for training.
    DatasetId, "ds", "dataset"
);
typed_id!(
    /// A fine-tuning job.
    TrainingJobId, "ftj", "training job"
);
typed_id!(
    /// An event in a training job's history.
    TrainingEventId, "fte", "training event"
);
typed_id!(
    /// An entry in the audit log.
    AuditId, "aud", "audit entry"
);
typed_id!(
    /// A plugin listing in the marketplace.
    PluginId, "plg", "plugin"
);
typed_id!(
    /// A published version of a plugin.
    PluginVersionId, "plv", "plugin version"
);
typed_id!(
    /// A plugin installed in a tenant.
    InstallationId, "ins", "installation"
);
typed_id!(
    /// The record of one plugin invocation.
    InvocationId, "inv", "invocation"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_foreign_prefixes() {
        let id = TenantId::new();
        assert!(id.as_str().starts_with("ten_"));
        assert_eq!(id.as_str().parse::<TenantId>().unwrap(), id);
        let key_id = KeyId::new();
        let err = key_id.as_str().parse::<TenantId>().unwrap_err();
        assert_eq!(err.kind, "tenant");
        assert!("ten_".parse::<TenantId>().is_err());
        assert!("ten_not-a-ulid-at-all-xxxxxxxx".parse::<TenantId>().is_err());
    }

    #[test]
    fn ids_serialise_as_plain_strings() {
        let id = UserId::new();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert!(serde_json::from_str::<UserId>("\"ten_01jz3k2m4n5p6q7r8s9t0vwxyz\"").is_err());
    }

    #[test]
    fn newer_ids_sort_after_older_ones() {
        let first = EventId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(EventId::new() > first);
    }
}
