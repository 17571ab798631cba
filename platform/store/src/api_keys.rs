//! API keys: created with explicit scopes (never more than the creator holds), shown once, stored as a
//! SHA-256 hash, revocable.

use chrono::Utc;
use plinth_core::Scope;
use plinth_core::api::{ApiKey, CreateApiKeyRequest, CreatedApiKey};
use plinth_core::id::{KeyId, TenantId, UserId};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set,
};

use crate::accounts::{parse_id, parse_role, validate_name};
use crate::audit::Who;
use crate::auth::{Actor, Principal};
use crate::entity::{TenantScoped, api_keys, memberships, tenants};
use crate::{Result, Store, StoreError, secret};

const MAX_KEYS_PER_TENANT: u64 = 500;

fn to_api_key(model: api_keys::Model) -> Result<ApiKey> {
    Ok(ApiKey {
        id: parse_id(&model.id)?,
        name: model.name,
        redacted: model.redacted,
        scopes: model
            .scopes
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect(),
        rate_limit_per_minute: model.rate_limit_per_minute.and_then(|v| u32::try_from(v).ok()),
        created_at: model.created_at,
        last_used_at: model.last_used_at,
        expires_at: model.expires_at,
        revoked_at: model.revoked_at,
    })
}

impl Store {
    /// Creates a key for the caller's tenant. The secret is in the result and nowhere else.
    pub async fn create_api_key(
        &self,
        caller: &Principal,
        who: &Who,
        request: &CreateApiKeyRequest,
    ) -> Result<CreatedApiKey> {
        let name = validate_name("name", &request.name)?;
        let mut scopes = request.scopes.clone().unwrap_or_else(|| vec![Scope::Inference]);
        scopes.sort();
        scopes.dedup();
        if scopes.is_empty() {
            return Err(StoreError::invalid("scopes: give at least one scope"));
        }
        if let Some(missing) = scopes.iter().find(|scope| !caller.has(**scope)) {
            return Err(StoreError::Forbidden(format!(
                "you cannot grant the `{missing}` scope, which you do not hold"
            )));
        }
        let rate_limit = match request.rate_limit_per_minute {
            None => None,
            Some(limit @ 1..=1_000_000) => Some(i32::try_from(limit).unwrap_or(i32::MAX)),
            Some(_) => return Err(StoreError::invalid("rate_limit_per_minute: must be 1 to 1000000")),
        };
        let now = Utc::now();
        if request.expires_at.is_some_and(|expires| expires <= now) {
            return Err(StoreError::invalid("expires_at: must be in the future"));
        }

        let txn = self.write_transaction().await?;
        lock_tenant_keys(&txn, &caller.tenant_id).await?;
        still_holds(&txn, caller, &scopes).await?;
        let count = sea_orm::PaginatorTrait::count(
            api_keys::Entity::find_in(&caller.tenant_id).filter(api_keys::Column::RevokedAt.is_null()),
            &txn,
        )
        .await?;
        if count >= MAX_KEYS_PER_TENANT {
            return Err(StoreError::invalid(format!(
                "a tenant can hold at most {MAX_KEYS_PER_TENANT} active keys"
            )));
        }
        let secret = secret::new_api_key();
        let id = KeyId::new();
        let model = api_keys::ActiveModel {
            id: Set(id.to_string()),
            tenant_id: Set(caller.tenant_id.to_string()),
            name: Set(name),
            token_hash: Set(secret::token_hash(&secret)),
            redacted: Set(secret::redact(&secret)),
            scopes: Set(scopes
                .iter()
                .map(|scope| scope.as_str())
                .collect::<Vec<_>>()
                .join(" ")),
            rate_limit_per_minute: Set(rate_limit),
            created_by: Set(Some(caller.actor_id().to_owned())),
            created_at: Set(now),
            last_used_at: Set(None),
            expires_at: Set(request.expires_at),
            revoked_at: Set(None),
        }
        .insert(&txn)
        .await?;
        crate::audit::record(
            &txn,
            Some(&caller.tenant_id),
            who,
            "api_key.create",
            Some(id.as_str()),
            serde_json::json!({ "scopes": scopes }),
        )
        .await?;
        txn.commit().await?;
        Ok(CreatedApiKey {
            secret,
            key: to_api_key(model)?,
        })
    }

    /// The tenant's keys, newest first, revoked ones included (they show when they were revoked).
    pub async fn list_api_keys(&self, tenant: &TenantId) -> Result<Vec<ApiKey>> {
        api_keys::Entity::find_in(tenant)
            .order_by_desc(api_keys::Column::CreatedAt)
            .order_by_desc(api_keys::Column::Id)
            .all(self.db())
            .await?
            .into_iter()
            .map(to_api_key)
            .collect()
    }

    /// Revokes a key of the caller's tenant. Idempotent; takes effect on this replica at once and on
    /// every other within the credential cache TTL.
    pub async fn revoke_api_key(&self, caller: &Principal, who: &Who, id: &KeyId) -> Result<ApiKey> {
        let txn = self.write_transaction().await?;
        let row = api_keys::Entity::find_in(&caller.tenant_id)
            .filter(api_keys::Column::Id.eq(id.as_str()))
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("API key"))?;
        if row.revoked_at.is_some() {
            return to_api_key(row);
        }
        let hash = row.token_hash.clone();
        let mut model: api_keys::ActiveModel = row.into();
        model.revoked_at = Set(Some(Utc::now()));
        let row = model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(&caller.tenant_id),
            who,
            "api_key.revoke",
            Some(id.as_str()),
            serde_json::Value::Null,
        )
        .await?;
        txn.commit().await?;
        self.credentials.forget(&hash).await;
        to_api_key(row)
    }
}

/// Takes the tenant's turn at managing keys: making a key and revoking a member's keys both lock the
/// tenant's row first, so neither misses the other (a key made while its maker is removed or demoted
/// is either refused or seen and revoked). SQLite's write transactions take turns anyway.
pub(crate) async fn lock_tenant_keys(conn: &impl ConnectionTrait, tenant: &TenantId) -> Result<()> {
    tenants::Entity::find_by_id(tenant.as_str())
        .lock_exclusive()
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("tenant"))?;
    Ok(())
}

/// Whether `caller` still holds `scopes` now, within the key-management turn: its credentials were
/// checked a moment ago (through a cache), and its membership or role may have changed since.
async fn still_holds(conn: &impl ConnectionTrait, caller: &Principal, scopes: &[Scope]) -> Result<()> {
    match &caller.actor {
        Actor::User { id, .. } => {
            let membership = memberships::Entity::find_in(&caller.tenant_id)
                .filter(memberships::Column::UserId.eq(id.as_str()))
                .one(conn)
                .await?
                .ok_or_else(|| StoreError::Forbidden("you are no longer a member of this tenant".into()))?;
            let role = parse_role(&membership.role)?;
            if let Some(missing) = scopes.iter().find(|scope| !role.scopes().contains(scope)) {
                return Err(StoreError::Forbidden(format!(
                    "your role no longer grants the `{missing}` scope"
                )));
            }
        }
        Actor::ApiKey { id, .. } => {
            let active = api_keys::Entity::find_in(&caller.tenant_id)
                .filter(api_keys::Column::Id.eq(id.as_str()))
                .filter(api_keys::Column::RevokedAt.is_null())
                .one(conn)
                .await?;
            if active.is_none() {
                return Err(StoreError::Forbidden(
                    "the key making this one was revoked".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Revokes, in `conn`'s transaction, the tenant's active keys that `user` made (directly, or through
/// a key of theirs that made it) holding any scope outside `kept`: every one when the user leaves the
/// tenant, those beyond the new role's scopes when their role changes. A key acts with the authority
/// of whoever made it, so it cannot outlast that authority. Each revocation is audited with `reason`.
/// Returns the revoked keys' token hashes, for the credential cache to forget once committed.
pub(crate) async fn revoke_keys_beyond(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    user: &UserId,
    kept: &[Scope],
    who: &Who,
    reason: &str,
) -> Result<Vec<String>> {
    // Revoked keys too: a key made by one revoked earlier is still the user's.
    let keys = api_keys::Entity::find_in(tenant).all(conn).await?;
    // The user's keys, then the keys those made, until no key is added.
    let mut makers = vec![user.to_string()];
    let mut theirs: Vec<&api_keys::Model> = Vec::new();
    while let Some(maker) = makers.pop() {
        for key in &keys {
            if key.created_by.as_deref() == Some(maker.as_str()) && !theirs.iter().any(|k| k.id == key.id) {
                theirs.push(key);
                makers.push(key.id.clone());
            }
        }
    }
    let mut forgotten = Vec::new();
    let now = Utc::now();
    for key in theirs.into_iter().filter(|key| key.revoked_at.is_none()) {
        let beyond = key
            .scopes
            .split_whitespace()
            .any(|scope| !kept.iter().any(|kept| kept.as_str() == scope));
        if !beyond {
            continue;
        }
        let mut model: api_keys::ActiveModel = key.clone().into();
        model.revoked_at = Set(Some(now));
        model.update(conn).await?;
        crate::audit::record(
            conn,
            Some(tenant),
            who,
            "api_key.revoke",
            Some(&key.id),
            serde_json::json!({ "reason": reason, "made_by": user.as_str() }),
        )
        .await?;
        forgotten.push(key.token_hash.clone());
    }
    Ok(forgotten)
}
