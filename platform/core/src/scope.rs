//! What a caller may do. API keys carry explicit scopes; people carry a role in a tenant, and a role
//! grants a set of scopes. Both end up as the same [`Scope`] checks at the HTTP edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A permission an API key or a session can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// Call models: task endpoints and the inference protocol.
    #[serde(rename = "inference")]
    Inference,
    /// Install and invoke marketplace plugins.
    #[serde(rename = "plugins")]
    Plugins,
    /// Read plans, subscription, usage and invoices.
    #[serde(rename = "billing:read")]
    BillingRead,
    /// Manage the tenant: API keys, members, subscription.
    #[serde(rename = "admin")]
    Admin,
}

impl Scope {
    pub const ALL: [Self; 4] = [Self::Inference, Self::Plugins, Self::BillingRead, Self::Admin];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Plugins => "plugins",
            Self::BillingRead => "billing:read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| format!("unknown scope `{s}`"))
    }
}

/// A member's role in a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including managing other owners.
    Owner,
    /// Everything except granting or removing ownership.
    Admin,
    /// Builds with the platform: inference, plugins, reading usage.
    Developer,
    /// Reads plans, usage and invoices.
    Viewer,
}

impl Role {
    pub const ALL: [Self; 4] = [Self::Owner, Self::Admin, Self::Developer, Self::Viewer];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Owner => "owner",
            Self::Admin => "admin",
            Self::Developer => "developer",
            Self::Viewer => "viewer",
        }
    }

    /// The scopes a session of a member with this role holds.
    #[must_use]
    pub fn scopes(self) -> &'static [Scope] {
        match self {
            Self::Owner | Self::Admin => &Scope::ALL,
            Self::Developer => &[Scope::Inference, Scope::Plugins, Scope::BillingRead],
            Self::Viewer => &[Scope::BillingRead],
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_roles_round_trip_through_their_wire_names() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
            assert_eq!(serde_json::to_value(scope).unwrap(), scope.as_str());
        }
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_value(role).unwrap(), role.as_str());
        }
    }

    #[test]
    fn viewers_cannot_administer() {
        assert!(!Role::Viewer.scopes().contains(&Scope::Admin));
        assert!(!Role::Developer.scopes().contains(&Scope::Admin));
        assert!(Role::Admin.scopes().contains(&Scope::Admin));
    }
}
