//! Turning a bearer token into a [`Principal`]: who is calling, for which tenant, with which scopes and
//! which rate limit.
//!
//! Verified credentials are cached in-process for a short TTL (one second by default), so a verified
//! key costs a hash and a map lookup, and a revoked key stops working everywhere within that TTL even
//! with many replicas. Revoking through this replica also evicts the entry at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use plinth_core::id::{KeyId, SessionId, TenantId, UserId};
use plinth_core::{Role, Scope};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use crate::accounts::{parse_id, parse_role};
use crate::cache::Quota;
use crate::entity::{api_keys, memberships, sessions, users};
use crate::{Result, Store, StoreError, plans, row_security, secret};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    ApiKey {
        id: KeyId,
        rate_limit: Option<Quota>,
    },
    User {
        id: UserId,
        session: SessionId,
        role: Role,
        platform_admin: bool,
    },
}

/// An authenticated caller, as every handler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub actor: Actor,
    pub scopes: Vec<Scope>,
    /// The tenant's plan limit (the free plan's while a payment is past due).
    pub tenant_quota: Quota,
    /// The plan's list price per metered unit, recorded with each usage event.
    pub price_per_call: plinth_core::Micros,
    /// Model units the tenant may use per period, on plans that stop at their included calls.
    pub call_cap: Option<i64>,
    /// The tenant is on a paid plan in good standing, so priced calls (plugins) have a bill to go on.
    pub paid_subscription: bool,
    /// ...and that bill is a Stripe subscription carrying the plugin-fees price (what Stripe mode needs
    /// to invoice a plugin's fee).
    pub provider_subscription: bool,
    /// The plan in force (the free plan while a payment is past due).
    pub plan: String,
    /// The plan's share of capacity: plugin instances, model scheduling weight, upload quotas.
    pub isolation: plinth_core::api::PlanIsolation,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Principal {
    #[must_use]
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }

    /// The id recorded in the audit log for this caller's actions.
    #[must_use]
    pub fn actor_id(&self) -> &str {
        match &self.actor {
            Actor::ApiKey { id, .. } => id.as_str(),
            Actor::User { id, .. } => id.as_str(),
        }
    }

    #[must_use]
    pub fn api_key_id(&self) -> Option<&KeyId> {
        match &self.actor {
            Actor::ApiKey { id, .. } => Some(id),
            Actor::User { .. } => None,
        }
    }

    /// The member's role, for calls made with a session; keys act with their scopes alone.
    #[must_use]
    pub fn role(&self) -> Option<Role> {
        match &self.actor {
            Actor::User { role, .. } => Some(*role),
            Actor::ApiKey { .. } => None,
        }
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the token is malformed or unknown")]
    Invalid,
    #[error("the API key was revoked")]
    Revoked,
    #[error("the token has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The in-process cache of verified credentials, keyed by token hash.
#[derive(Clone)]
pub(crate) struct CredentialCache(moka::future::Cache<String, Arc<Principal>>);

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CredentialCache")
            .field(&self.0.entry_count())
            .finish()
    }
}

impl CredentialCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self(
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
        )
    }

    /// Evicts every cached credential of `tenant` (or only those of `user` in it), after a change of
    /// roles, membership or plan, so this replica applies it at once.
    pub(crate) fn forget_in_tenant(&self, tenant: &TenantId, user: Option<&UserId>) {
        let (tenant, user) = (tenant.clone(), user.cloned());
        let evicted = self.0.invalidate_entries_if(move |_, principal| {
            principal.tenant_id == tenant
                && user
                    .as_ref()
                    .is_none_or(|user| matches!(&principal.actor, Actor::User { id, .. } if id == user))
        });
        if let Err(err) = evicted {
            tracing::warn!(error = %err, "could not evict cached credentials; they expire within the TTL");
        }
    }

    pub(crate) async fn forget(&self, token_hash: &str) {
        self.0.invalidate(token_hash).await;
    }
}

/// How stale `last_used_at` may get before a verification refreshes it: one write per key per minute.
const LAST_USED_GRANULARITY: chrono::Duration = chrono::Duration::seconds(60);

impl Store {
    /// Verifies a bearer token: an API key (`plk_live_…`) or a session token (`pls_…`).
    pub async fn authenticate(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let is_key = secret::is_well_formed_api_key(token);
        if !is_key && !secret::is_well_formed_session_token(token) {
            return Err(AuthError::Invalid);
        }
        let hash = secret::token_hash(token);
        let principal = self
            .credentials
            .0
            .try_get_with_by_ref(&hash, async {
                // A credential is found by its hash before anyone knows whose it is.
                let principal = row_security::across_tenants(async {
                    if is_key {
                        self.load_api_key(&hash).await
                    } else {
                        self.load_session(&hash).await
                    }
                })
                .await?;
                Ok::<_, AuthError>(Arc::new(principal))
            })
            .await
            .map_err(|err: Arc<AuthError>| match &*err {
                AuthError::Invalid => AuthError::Invalid,
                AuthError::Revoked => AuthError::Revoked,
                AuthError::Expired => AuthError::Expired,
                AuthError::Store(inner) => AuthError::Store(StoreError::Internal(inner.to_string())),
            })?;
        if principal.expires_at.is_some_and(|expires| expires <= Utc::now()) {
            return Err(AuthError::Expired);
        }
        // From here on the request sees only its caller's rows.
        row_security::narrow_to(&principal.tenant_id);
        Ok(principal)
    }

    async fn load_api_key(&self, hash: &str) -> Result<Principal, AuthError> {
        let key = api_keys::Entity::find()
            .filter(api_keys::Column::TokenHash.eq(hash))
            .one(self.db())
            .await
            .map_err(StoreError::from)?
            .ok_or(AuthError::Invalid)?;
        if key.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        let now = Utc::now();
        if key.expires_at.is_some_and(|expires| expires <= now) {
            return Err(AuthError::Expired);
        }
        let tenant_id: TenantId = parse_id(&key.tenant_id)?;
        let plans::Terms {
            plan,
            paid_subscription,
            provider_subscription,
        } = plans::terms(self.db(), &tenant_id).await?;
        if key
            .last_used_at
            .is_none_or(|last| now - last > LAST_USED_GRANULARITY)
        {
            self.touch_api_key(key.clone(), now);
        }
        let scopes = key
            .scopes
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        let rate_limit = key
            .rate_limit_per_minute
            .and_then(|per_minute| u32::try_from(per_minute).ok())
            .map(|per_minute| Quota {
                per_minute,
                burst: (per_minute / 6).max(1),
            });
        Ok(Principal {
            actor: Actor::ApiKey {
                id: parse_id(&key.id)?,
                rate_limit,
            },
            tenant_id,
            scopes,
            tenant_quota: Quota {
                per_minute: plan.rate_limit_per_minute,
                burst: plan.burst,
            },
            price_per_call: plan.price_per_call_micros,
            call_cap: plan.hard_cap.then_some(plan.included_calls),
            paid_subscription,
            provider_subscription,
            isolation: plan.isolation,
            plan: plan.id.clone(),
            expires_at: key.expires_at,
        })
    }

    /// Records when a key was last used, off the request path.
    fn touch_api_key(&self, key: api_keys::Model, now: DateTime<Utc>) {
        let db = self.db().clone();
        tokio::spawn(async move {
            let id = key.id.clone();
            let mut model: api_keys::ActiveModel = key.into();
            model.last_used_at = Set(Some(now));
            if let Err(err) = model.update(&db).await {
                tracing::warn!(key_id = %id, error = %err, "could not record API key use");
            }
        });
    }

    async fn load_session(&self, hash: &str) -> Result<Principal, AuthError> {
        let session = sessions::Entity::find()
            .filter(sessions::Column::TokenHash.eq(hash))
            .one(self.db())
            .await
            .map_err(StoreError::from)?
            .ok_or(AuthError::Invalid)?;
        if session.revoked_at.is_some() {
            return Err(AuthError::Invalid);
        }
        if session.expires_at <= Utc::now() {
            return Err(AuthError::Expired);
        }
        // The membership is re-read, so a removed member loses access within the cache TTL.
        let membership =
            memberships::Entity::find_by_id((session.tenant_id.clone(), session.user_id.clone()))
                .one(self.db())
                .await
                .map_err(StoreError::from)?
                .ok_or(AuthError::Invalid)?;
        let user = users::Entity::find_by_id(session.user_id.as_str())
            .one(self.db())
            .await
            .map_err(StoreError::from)?
            .ok_or(AuthError::Invalid)?;
        let tenant_id: TenantId = parse_id(&session.tenant_id)?;
        let plans::Terms {
            plan,
            paid_subscription,
            provider_subscription,
        } = plans::terms(self.db(), &tenant_id).await?;
        let role = parse_role(&membership.role)?;
        Ok(Principal {
            actor: Actor::User {
                id: parse_id(&user.id)?,
                session: parse_id(&session.id)?,
                role,
                platform_admin: user.is_platform_admin,
            },
            tenant_id,
            scopes: role.scopes().to_vec(),
            tenant_quota: Quota {
                per_minute: plan.rate_limit_per_minute,
                burst: plan.burst,
            },
            price_per_call: plan.price_per_call_micros,
            call_cap: plan.hard_cap.then_some(plan.included_calls),
            paid_subscription,
            provider_subscription,
            isolation: plan.isolation,
            plan: plan.id.clone(),
            expires_at: Some(session.expires_at),
        })
    }
}
