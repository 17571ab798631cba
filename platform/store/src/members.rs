//! Members of a tenant and their roles. Owners are special: only an owner can grant or take ownership,
//! and the last owner cannot leave or be demoted.

use chrono::Utc;
use plinth_core::Role;
use plinth_core::api::{AddMemberRequest, Member};
use plinth_core::id::{TenantId, UserId};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, ModelTrait, PaginatorTrait, QueryFilter,
    QueryOrder, Set,
};

use crate::accounts::{normalise_email, parse_id, parse_role};
use crate::audit::Who;
use crate::auth::Principal;
use crate::entity::{TenantScoped, memberships, users};
use crate::{Result, Store, StoreError};

fn require_owner_for(caller: &Principal, role: Role) -> Result<()> {
    if role == Role::Owner && caller.role() != Some(Role::Owner) {
        return Err(StoreError::Forbidden(
            "only an owner can grant, change or remove ownership".to_owned(),
        ));
    }
    Ok(())
}

async fn owner_count(conn: &impl ConnectionTrait, tenant: &TenantId) -> Result<u64> {
    Ok(memberships::Entity::find_in(tenant)
        .filter(memberships::Column::Role.eq(Role::Owner.as_str()))
        .count(conn)
        .await?)
}

async fn find_membership(
    conn: &impl ConnectionTrait,
    tenant: &TenantId,
    user: &UserId,
) -> Result<memberships::Model> {
    memberships::Entity::find_in(tenant)
        .filter(memberships::Column::UserId.eq(user.as_str()))
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("member"))
}

async fn to_member(conn: &impl ConnectionTrait, row: &memberships::Model) -> Result<Member> {
    let user = users::Entity::find_by_id(row.user_id.as_str())
        .one(conn)
        .await?
        .ok_or(StoreError::NotFound("user"))?;
    Ok(Member {
        user_id: parse_id(&row.user_id)?,
        email: user.email,
        role: parse_role(&row.role)?,
        joined_at: row.created_at,
    })
}

impl Store {
    pub async fn list_members(&self, tenant: &TenantId) -> Result<Vec<Member>> {
        let rows = memberships::Entity::find_in(tenant)
            .order_by_asc(memberships::Column::CreatedAt)
            .all(self.db())
            .await?;
        let users = users::Entity::find()
            .filter(users::Column::Id.is_in(rows.iter().map(|row| row.user_id.clone())))
            .all(self.db())
            .await?;
        rows.iter()
            .map(|row| {
                let email = users
                    .iter()
                    .find(|u| u.id == row.user_id)
                    .map(|u| u.email.clone())
                    .unwrap_or_default();
                Ok(Member {
                    user_id: parse_id(&row.user_id)?,
                    email,
                    role: parse_role(&row.role)?,
                    joined_at: row.created_at,
                })
            })
            .collect()
    }

    /// Adds a user who already has an account (invitations by email come later).
    pub async fn add_member(
        &self,
        caller: &Principal,
        who: &Who,
        request: &AddMemberRequest,
    ) -> Result<Member> {
        require_owner_for(caller, request.role)?;
        let email = normalise_email(&request.email)?;
        let txn = self.write_transaction().await?;
        let user = users::Entity::find()
            .filter(users::Column::Email.eq(&email))
            .one(&txn)
            .await?
            .ok_or(StoreError::NotFound("user with that email"))?;
        let user_id: UserId = parse_id(&user.id)?;
        if find_membership(&txn, &caller.tenant_id, &user_id).await.is_ok() {
            return Err(StoreError::AlreadyMember);
        }
        let row = memberships::ActiveModel {
            tenant_id: Set(caller.tenant_id.to_string()),
            user_id: Set(user.id.clone()),
            role: Set(request.role.as_str().to_owned()),
            created_at: Set(Utc::now()),
        }
        .insert(&txn)
        .await?;
        crate::audit::record(
            &txn,
            Some(&caller.tenant_id),
            who,
            "member.add",
            Some(&user.id),
            serde_json::json!({ "role": request.role }),
        )
        .await?;
        txn.commit().await?;
        Ok(Member {
            user_id,
            email: user.email,
            role: request.role,
            joined_at: row.created_at,
        })
    }

    pub async fn update_member(
        &self,
        caller: &Principal,
        who: &Who,
        user: &UserId,
        role: Role,
    ) -> Result<Member> {
        require_owner_for(caller, role)?;
        let txn = self.write_transaction().await?;
        crate::api_keys::lock_tenant_keys(&txn, &caller.tenant_id).await?;
        let row = find_membership(&txn, &caller.tenant_id, user).await?;
        let current = parse_role(&row.role)?;
        require_owner_for(caller, current)?;
        if current == Role::Owner && role != Role::Owner && owner_count(&txn, &caller.tenant_id).await? <= 1 {
            return Err(StoreError::LastOwner);
        }
        let mut model: memberships::ActiveModel = row.into();
        model.role = Set(role.as_str().to_owned());
        let row = model.update(&txn).await?;
        crate::audit::record(
            &txn,
            Some(&caller.tenant_id),
            who,
            "member.update",
            Some(user.as_str()),
            serde_json::json!({ "from": current, "to": role }),
        )
        .await?;
        let revoked = crate::api_keys::revoke_keys_beyond(
            &txn,
            &caller.tenant_id,
            user,
            role.scopes(),
            who,
            "its maker's role no longer grants its scopes",
        )
        .await?;
        let member = to_member(&txn, &row).await?;
        txn.commit().await?;
        self.credentials.forget_in_tenant(&caller.tenant_id, Some(user));
        self.forget_keys(&revoked).await;
        Ok(member)
    }

    pub async fn remove_member(&self, caller: &Principal, who: &Who, user: &UserId) -> Result<()> {
        let txn = self.write_transaction().await?;
        crate::api_keys::lock_tenant_keys(&txn, &caller.tenant_id).await?;
        let row = find_membership(&txn, &caller.tenant_id, user).await?;
        let current = parse_role(&row.role)?;
        require_owner_for(caller, current)?;
        if current == Role::Owner && owner_count(&txn, &caller.tenant_id).await? <= 1 {
            return Err(StoreError::LastOwner);
        }
        row.delete(&txn).await?;
        crate::audit::record(
            &txn,
            Some(&caller.tenant_id),
            who,
            "member.remove",
            Some(user.as_str()),
            serde_json::Value::Null,
        )
        .await?;
        let revoked = crate::api_keys::revoke_keys_beyond(
            &txn,
            &caller.tenant_id,
            user,
            &[],
            who,
            "its maker left the tenant",
        )
        .await?;
        txn.commit().await?;
        self.credentials.forget_in_tenant(&caller.tenant_id, Some(user));
        self.forget_keys(&revoked).await;
        Ok(())
    }

    /// Drops revoked keys from the credential cache (this replica at once, others within its TTL).
    async fn forget_keys(&self, token_hashes: &[String]) {
        for hash in token_hashes {
            self.credentials.forget(hash).await;
        }
    }
}
